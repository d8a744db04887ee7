//! The `jetstream` transport: a hub's updates go through one JetStream stream, which every hub
//! naming it follows with an ordered consumer of its own (ephemeral, no acks) and applies in
//! the stream's order to its in-memory history.
//!
//! - **Publishing** stores the update with `Nats-Msg-Id` set to its id: the stream drops a
//!   second copy within its duplicate window, so a publisher retrying a request whose answer it
//!   lost (a hub killed mid-request) does not dispatch it twice.
//! - **Ids and order** are the stream's: an update keeps the id the hub gave it, and every hub
//!   sees the updates in the same order, so a `Last-Event-ID` given by one hub is found by any
//!   other, and by the same hub after a restart (it reads the stream back at start).
//! - **Limits** are the history's: `MERCURE_HISTORY_SIZE` updates, `MERCURE_HISTORY_BYTES`
//!   bytes, `MERCURE_HISTORY_MAX_AGE`; the oldest go first.
//! - **Packs**: the publisher inside `dataviz all` hands over the updates of a whole batch at
//!   once ([`crate::Hub::publish_many`]), and they travel as one stream message, a pack: one
//!   update per line, with the header [`PACK_HEADER`] giving their count. Storing and
//!   delivering one message per update cost nats-server as much as every other stream of the
//!   pipeline together. An update keeps its own id and place: its position is the pack's
//!   sequence and its index in the pack ([`position`]).
//! - **Encoding**: a message holds its updates in postcard ([`Update::to_stored`], each as a
//!   byte string, so that one that cannot be read is skipped alone), marked by the header
//!   [`ENCODING_HEADER`]. What earlier versions stored is still read back: lines of JSON
//!   (`json`), and forms as the publish request carries them (no header).

use crate::config::HubConfig;
use crate::update::Update;
use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
    context::PublishErrorKind,
    stream,
};
use futures::StreamExt;
use sha2::Digest as _;
use std::time::{Duration, SystemTime};

/// How long a starting hub may take to read the stream's history back.
pub(crate) const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a publish waits for this hub's own copy once the stream has stored the update.
pub(crate) const DISPATCH_WAIT: Duration = Duration::from_secs(5);
/// The stream's duplicate window, at most (it cannot outlast the age limit).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How often a follower checks whether its client reconnected (its consumer is then gone).
const RECONNECT_CHECK: Duration = Duration::from_millis(250);
/// Delay before following the stream again after a failure, at most.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// How long a starting hub waits for JetStream to make or update its stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);

/// Creates or updates the hub's stream, again while JetStream does not answer (NATS restarting
/// as the hub starts, a cluster electing its leader) for up to [`OPEN_TIMEOUT`]: a request
/// sent just before the connection dropped is never answered, and a hub that gave up on it
/// would stop the whole process.
async fn create_or_update(
    js: &jetstream::Context,
    wanted: stream::Config,
) -> Result<stream::Info, async_nats::Error> {
    use jetstream::context::CreateStreamErrorKind as Kind;
    let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
    let mut delay = Duration::from_millis(100);
    loop {
        match js.create_or_update_stream(wanted.clone()).await {
            Ok(info) => return Ok(info),
            Err(e)
                if matches!(e.kind(), Kind::TimedOut | Kind::JetStreamUnavailable)
                    && tokio::time::Instant::now() + delay < deadline =>
            {
                tracing::warn!(stream = wanted.name, error = %e, retry_in = ?delay, "JetStream did not answer; asking again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How long a publish may wait for JetStream's acknowledgement.
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// The header of a pack: how many updates it holds.
pub(crate) const PACK_HEADER: &str = "Dataviz-Updates";
/// The header naming how the updates of a stream message are encoded: [`ENCODING_POSTCARD`],
/// or `json` (lines of [`Update::from_json_line`], what earlier versions stored). Without it,
/// they are forms ([`Update::to_form`]), one per line.
pub(crate) const ENCODING_HEADER: &str = "Dataviz-Encoding";
/// A sequence of byte strings ([`pack`]), each an update as [`Update::to_stored`] makes it.
const ENCODING_POSTCARD: &str = "postcard";
const ENCODING_JSON: &str = "json";
/// What an update's length adds to it in a message, at most ([`pack`]: a varint of 32 bits).
pub(crate) const FRAME_BYTES: usize = 5;
/// Updates in one pack, at most: an update's position keeps its index in 16 bits.
pub(crate) const PACK_UPDATES: usize = 4096;
/// Room kept in a pack for its headers, below the server's largest message.
const PACK_HEADROOM: usize = 4096;

/// Where an update stands in the order of the stream: the sequence of the message that
/// carried it, then its index in that message (0 for a message of one update). Positions only
/// grow, along the stream.
pub(crate) fn position(sequence: u64, index: usize) -> u64 {
    (sequence << 16) | index as u64
}

/// A message's payload of `stored` updates: postcard's sequence of byte strings (their count,
/// then each with its length), so that an update that cannot be read is skipped alone.
fn pack(stored: &[Vec<u8>]) -> Vec<u8> {
    postcard::to_stdvec(stored).expect("byte strings encode")
}

/// The updates of a message of an earlier version, one per line when it is a pack.
fn lines(payload: &[u8], packed: bool) -> Vec<&[u8]> {
    match packed {
        true => payload.split(|b| *b == b'\n').collect(),
        false => vec![payload],
    }
}

/// The updates of a payload [`pack`] made, each still encoded.
fn unpack(payload: &[u8]) -> Result<Vec<&[u8]>, String> {
    match postcard::take_from_bytes(payload) {
        Ok((parts, [])) => Ok(parts),
        Ok((_, rest)) => Err(format!("{} bytes past the updates' end", rest.len())),
        Err(e) => Err(format!("not a pack of updates: {e}")),
    }
}

/// Why the stream did not take an update.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishFailure {
    /// Larger than NATS takes: sending it again cannot help.
    #[error("{0}")]
    TooLarge(String),
    /// NATS or JetStream unavailable: not stored; later may work.
    #[error("{0}")]
    Unavailable(String),
    /// Sent, but no acknowledgement came back (timed out, connection lost): the stream may
    /// still store it, even after NATS comes back, since the client sends what it had queued.
    #[error("{0}")]
    Unconfirmed(String),
}

#[derive(Clone)]
pub(crate) struct Transport {
    js: jetstream::Context,
    stream: String,
    subject: String,
    /// The stream's last sequence when this hub opened it: the history to read back.
    pub(crate) last_sequence: u64,
}

impl Transport {
    /// Creates the stream, or brings its limits to the configured ones.
    pub(crate) async fn open(
        config: &HubConfig,
        js: jetstream::Context,
    ) -> Result<Transport, async_nats::Error> {
        let subject = format!("{}.updates", config.mercure_stream);
        let max_age = config.mercure_history_max_age;
        let wanted = stream::Config {
            name: config.mercure_stream.clone(),
            subjects: vec![subject.clone()],
            // With no history kept, the stream still carries updates between hubs: bytes and
            // age bound it then.
            max_messages: match config.mercure_history_size {
                0 => -1,
                size => i64::try_from(size).unwrap_or(i64::MAX),
            },
            // One update beyond the history's bytes, so that the newest, however large, is
            // always kept (the hub's own copy keeps to MERCURE_HISTORY_BYTES, as `local` does).
            max_bytes: i64::try_from(
                config
                    .mercure_history_bytes
                    .saturating_add(js.client().server_info().max_payload),
            )
            .unwrap_or(i64::MAX),
            max_age,
            duplicate_window: if max_age.is_zero() {
                DUPLICATE_WINDOW
            } else {
                DUPLICATE_WINDOW.min(max_age)
            },
            num_replicas: config.mercure_stream_replicas,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let info = create_or_update(&js, wanted).await?;
        Ok(Transport {
            js,
            stream: config.mercure_stream.clone(),
            subject,
            // A stream whose updates all went past the age limit still has a last sequence,
            // but nothing left to read back.
            last_sequence: match info.state.messages {
                0 => 0,
                _ => info.state.last_sequence,
            },
        })
    }

    /// Bytes of updates one pack may carry ([`Transport::publish`]).
    pub(crate) fn pack_bytes(&self) -> usize {
        self.js
            .client()
            .server_info()
            .max_payload
            .saturating_sub(PACK_HEADROOM)
    }

    /// Stores updates as one message: `stored` (one update as [`Update::to_stored`] makes it,
    /// or a pack's, within [`Transport::pack_bytes`] together with [`FRAME_BYTES`] each, and at
    /// most [`PACK_UPDATES`]), `ids` their
    /// ids, in order. Returns the message's stream sequence, that of the first copy when the
    /// stream already held one: the deduplication id is the update's id, and for a pack its
    /// count and a digest of its ids, so that a pack's headers stay a few bytes however long
    /// the ids. Fails at once while NATS is disconnected, and after [`PUBLISH_TIMEOUT`] at most
    /// otherwise: a publisher is answered, not held. A message sent and not acknowledged is
    /// [`PublishFailure::Unconfirmed`]: sent again alike, it is stored once either way.
    pub(crate) async fn publish<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
        stored: &[Vec<u8>],
    ) -> Result<u64, PublishFailure> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(ENCODING_HEADER, ENCODING_POSTCARD);
        match stored {
            [_] => {
                let id = ids.into_iter().next().unwrap_or_default();
                headers.insert("Nats-Msg-Id", id);
            }
            _ => {
                let mut digest = sha2::Sha256::new();
                for id in ids {
                    digest.update(id.as_bytes());
                    digest.update(b"\n");
                }
                let id = format!("pack/{}/{:x}", stored.len(), digest.finalize());
                headers.insert("Nats-Msg-Id", id.as_str());
                headers.insert(PACK_HEADER, stored.len().to_string().as_str());
            }
        };
        self.store(headers, pack(stored).into()).await
    }

    async fn store(
        &self,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<u64, PublishFailure> {
        let unavailable = |e: &dyn std::fmt::Display| PublishFailure::Unavailable(e.to_string());
        let state = self.js.client().connection_state();
        if state != async_nats::connection::State::Connected {
            return Err(PublishFailure::Unavailable(format!("NATS is {state}")));
        }
        let stored = async {
            self.js
                .publish_with_headers(self.subject.clone(), headers, payload)
                .await?
                .await
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, stored).await {
            Ok(Ok(ack)) => Ok(ack.sequence),
            Ok(Err(e)) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                Err(PublishFailure::TooLarge(e.to_string()))
            }
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
                ) =>
            {
                Err(PublishFailure::Unconfirmed(e.to_string()))
            }
            Ok(Err(e)) => Err(unavailable(&e)),
            Err(_) => Err(PublishFailure::Unconfirmed(format!(
                "no acknowledgement from JetStream within {PUBLISH_TIMEOUT:?}"
            ))),
        }
    }

    /// Hands the updates of every message of the stream (one, or a pack's) to `apply` with
    /// the message's sequence and the time the stream stored it, in order, from the sequence
    /// `from` gives (asked again after each failure), until `from` or `apply` says the hub is
    /// gone. A message without an update that can be read is handed with none, so that its
    /// sequence counts.
    pub(crate) async fn follow(
        &self,
        from: impl Fn() -> Option<u64>,
        apply: impl Fn(u64, Vec<Update>, SystemTime) -> bool,
    ) {
        const FIRST_DELAY: Duration = Duration::from_millis(100);
        let mut delay = FIRST_DELAY;
        let mut failed_at = None;
        while let Some(start) = from() {
            // Updates were applied since the last failure: this one is not a repeat of it.
            if failed_at != Some(start) {
                delay = FIRST_DELAY;
            }
            match self.read(start, &apply).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(
                        stream = self.stream,
                        error = %e,
                        retry_in = ?delay,
                        "following the stream of updates failed; following it again"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                    failed_at = from();
                }
            }
        }
    }

    /// One ordered consumer from `start`; `Ok` once `apply` says the hub is gone.
    async fn read(
        &self,
        start: u64,
        apply: &impl Fn(u64, Vec<Update>, SystemTime) -> bool,
    ) -> Result<(), async_nats::Error> {
        // An ephemeral consumer dies with the server it lives on; the ordered consumer would
        // notice by its missing heartbeats, seconds later. A reconnection of the client (a
        // restarted server, a failover) since this consumer was asked for starts a new one at
        // once instead.
        let statistics = self.js.client().statistics();
        let connects = || {
            statistics
                .connects
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let connected = connects();
        let consumer = self
            .js
            .get_stream(&self.stream)
            .await?
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.subject.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let mut check = tokio::time::interval(RECONNECT_CHECK);
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = check.tick() => {
                    if connects() != connected {
                        return Err("NATS reconnected".into());
                    }
                    continue;
                }
            };
            let Some(message) = message else { break };
            let message = message?;
            let info = message.info()?;
            let (sequence, published) = (info.stream_sequence, info.published.into());
            let header = |name| message.headers.as_ref().and_then(|h| h.get(name));
            let packed = header(PACK_HEADER).is_some();
            let read: Vec<Result<Update, String>> =
                match header(ENCODING_HEADER).map(|e| e.as_str()) {
                    Some(ENCODING_POSTCARD) => match unpack(&message.payload) {
                        Ok(parts) => parts.into_iter().map(Update::from_stored).collect(),
                        Err(e) => vec![Err(e)],
                    },
                    Some(ENCODING_JSON) => (lines(&message.payload, packed).into_iter())
                        .map(|line| Update::from_json_line(line).map_err(|e| e.to_string()))
                        .collect(),
                    _ => (lines(&message.payload, packed).into_iter())
                        .map(|line| Update::from_form(line).map_err(|e| e.to_string()))
                        .collect(),
                };
            let updates = read
                .into_iter()
                .filter_map(|read| match read {
                    Ok(update) if update.id.is_some() => Some(update),
                    Ok(_) => {
                        tracing::warn!(sequence, "an update without an id in the stream; skipped");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(sequence, error = %e, "not an update in the stream; skipped");
                        None
                    }
                })
                .collect();
            if !apply(sequence, updates, published) {
                return Ok(());
            }
        }
        Err("the stream's consumer ended".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_reads_back_update_by_update() {
        let updates: Vec<Update> = (0..3)
            .map(|n| Update::new(vec![format!("t/{n}")], format!("{{\"n\": {n}}}\nline")))
            .collect();
        let mut stored: Vec<Vec<u8>> = updates.iter().map(Update::to_stored).collect();
        let payload = pack(&stored);
        // Each update's length adds at most FRAME_BYTES; the count, a few bytes of headroom.
        let framed: usize = stored.iter().map(|s| s.len() + FRAME_BYTES).sum();
        assert!(payload.len() <= framed + 3);
        let read: Vec<Update> = (unpack(&payload).unwrap().into_iter())
            .map(|part| Update::from_stored(part).unwrap())
            .collect();
        assert_eq!(read, updates);
        // One that cannot be read is skipped alone.
        stored[1] = b"\xff\xff".to_vec();
        let payload = pack(&stored);
        let parts = unpack(&payload).unwrap();
        assert_eq!(Update::from_stored(parts[0]).unwrap(), updates[0]);
        assert!(Update::from_stored(parts[1]).is_err());
        assert_eq!(Update::from_stored(parts[2]).unwrap(), updates[2]);
        // A payload cut short, or with bytes past its end, is not a pack.
        let payload = pack(&stored[..1]);
        assert!(unpack(&payload[..payload.len() - 1]).is_err());
        assert!(unpack(&[&payload[..], b"x"].concat()).is_err());
        assert_eq!(
            lines(b"a\nb", true),
            [b"a".as_slice(), b"b"],
            "earlier packs, one update per line"
        );
    }
}
