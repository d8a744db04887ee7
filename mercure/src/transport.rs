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

use crate::config::HubConfig;
use crate::update::Update;
use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
    context::PublishErrorKind,
    stream,
};
use futures::StreamExt;
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

/// How long a publish may wait for JetStream's acknowledgement.
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the stream did not take an update.
#[derive(Debug)]
pub(crate) enum PublishFailure {
    /// Larger than NATS takes: sending it again cannot help.
    TooLarge(String),
    /// NATS or JetStream unavailable: not stored; later may work.
    Unavailable(String),
    /// Sent, but no acknowledgement came back (timed out, connection lost): the stream may
    /// still store it, even after NATS comes back, since the client sends what it had queued.
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
        let info = js.create_or_update_stream(wanted).await?;
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

    /// Stores `update` (which has its id); returns its stream sequence, that of the first
    /// copy when the stream already held one. Fails at once while NATS is disconnected, and
    /// after [`PUBLISH_TIMEOUT`] at most otherwise: a publisher is answered, not held. A
    /// publish sent and not acknowledged is [`PublishFailure::Unconfirmed`]: sent again with
    /// the same id, it is stored once either way.
    pub(crate) async fn publish(&self, update: &Update) -> Result<u64, PublishFailure> {
        let unavailable = |e: &dyn std::fmt::Display| PublishFailure::Unavailable(e.to_string());
        let state = self.js.client().connection_state();
        if state != async_nats::connection::State::Connected {
            return Err(PublishFailure::Unavailable(format!("NATS is {state}")));
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", update.id.as_deref().unwrap_or_default());
        let stored = async {
            self.js
                .publish_with_headers(self.subject.clone(), headers, update.to_form().into())
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

    /// Hands every update of the stream to `apply` with its sequence and the time the stream
    /// stored it, in order, from the sequence `from` gives (asked again after each failure),
    /// until `from` or `apply` says the hub is gone. A message that is not an update is handed
    /// as `None`, so that its sequence counts.
    pub(crate) async fn follow(
        &self,
        from: impl Fn() -> Option<u64>,
        apply: impl Fn(u64, Option<Update>, SystemTime) -> bool,
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
        apply: &impl Fn(u64, Option<Update>, SystemTime) -> bool,
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
            let update = match Update::from_form(&message.payload) {
                Ok(update) if update.id.is_some() => Some(update),
                Ok(_) => {
                    tracing::warn!(sequence, "an update without an id in the stream; skipped");
                    None
                }
                Err(e) => {
                    tracing::warn!(sequence, error = %e, "not an update in the stream; skipped");
                    None
                }
            };
            if !apply(sequence, update, published) {
                return Ok(());
            }
        }
        Err("the stream's consumer ended".into())
    }
}
