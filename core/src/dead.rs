//! The DEAD stream as an operator sees it: list, show, re-queue and purge dead letters.
//!
//! A dead letter is named by its sequence in DEAD. Re-queueing publishes the original raw
//! message (same id, topic, receive time and payload) to RAW again, then deletes the letter:
//! the processor handles it as new, and if it fails again it comes back to DEAD. The raw id is
//! kept, so a message whose readings were stored after all is not stored twice. A letter that
//! holds only the beginning of its payload (too large for DEAD: [`DeadLetter::whole_size`]) is
//! re-queued whole, from the object store where it was kept.

use crate::message::{
    DeadLetter, DeadReason, HeaderError, MAX_TOPIC_HEADER, error_kept, header_len,
};
use crate::streams::{self, DEAD_STREAM};
use crate::topic::MAX_DEVICE_CODE_LEN;
use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use std::time::Duration;

/// One dead letter and where it is stored.
#[derive(Debug, Clone)]
pub struct DeadEntry {
    /// Its sequence in DEAD: the id operators use.
    pub seq: u64,
    /// When DEAD stored it.
    pub stored_at: DateTime<Utc>,
    /// The letter, or why it could not be read (not written by Dataviz).
    pub letter: Result<DeadLetter, HeaderError>,
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    /// The refusing stage (`bridge`, `processor`, `writer`).
    pub stage: Option<String>,
    /// The reason.
    pub reason: Option<DeadReason>,
    /// The gateway named by the original topic.
    pub gateway: Option<i32>,
}

impl DeadFilter {
    fn subject(&self) -> String {
        streams::dead_subject(
            self.stage.as_deref().unwrap_or("*"),
            self.reason.map_or("*", DeadReason::name),
        )
    }

    fn matches(&self, entry: &DeadEntry) -> bool {
        match self.gateway {
            None => true,
            Some(gateway) => entry
                .letter
                .as_ref()
                .is_ok_and(|l| crate::topic::gateway_of(&l.raw.topic) == Some(gateway)),
        }
    }
}

fn entry(
    seq: u64,
    time: DateTime<Utc>,
    headers: Option<&async_nats::HeaderMap>,
    payload: bytes::Bytes,
) -> DeadEntry {
    DeadEntry {
        seq,
        stored_at: time,
        letter: DeadLetter::from_parts(headers, payload),
    }
}

/// The dead letters matching `filter`, oldest first, at most `limit`.
pub async fn list(
    js: &jetstream::Context,
    filter: &DeadFilter,
    limit: usize,
) -> anyhow::Result<Vec<DeadEntry>> {
    read(js, filter, limit, false).await
}

/// [`list`], with the letters' payloads left out when `headers_only`.
async fn read(
    js: &jetstream::Context,
    filter: &DeadFilter,
    limit: usize,
    headers_only: bool,
) -> anyhow::Result<Vec<DeadEntry>> {
    let stream = js
        .get_stream(DEAD_STREAM)
        .await
        .context("opening DEAD (created by the first Dataviz role to start)")?;
    let mut reader: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: filter.subject(),
            ack_policy: consumer::AckPolicy::None,
            headers_only,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .context("reading DEAD")?;
    let mut remaining = reader.info().await?.num_pending as usize;
    let mut out = Vec::new();
    while remaining > 0 && out.len() < limit {
        let mut batch = reader
            .fetch()
            .max_messages(remaining.min(500))
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("reading DEAD: {e}"))?;
            got += 1;
            let info = message
                .info()
                .map_err(|e| anyhow::anyhow!("reading DEAD: {e}"))?;
            let time = crate::message::chrono_time(info.published);
            let found = entry(
                info.stream_sequence,
                time,
                message.headers.as_ref(),
                message.payload.clone(),
            );
            if filter.matches(&found) && out.len() < limit {
                out.push(found);
            }
        }
        if got == 0 {
            break;
        }
        remaining = remaining.saturating_sub(got);
    }
    Ok(out)
}

/// One dead letter by its sequence.
pub async fn get(js: &jetstream::Context, seq: u64) -> anyhow::Result<DeadEntry> {
    let stream = js.get_stream(DEAD_STREAM).await.context("opening DEAD")?;
    let message = stream
        .get_raw_message(seq)
        .await
        .with_context(|| format!("no dead letter {seq}"))?;
    let time = crate::message::chrono_time(message.time);
    Ok(entry(seq, time, Some(&message.headers), message.payload))
}

/// A message that cannot go to RAW as it is becomes a dead letter of `stage`: one whose topic
/// is too long for a header ([`MAX_TOPIC_HEADER`]: never a topic Dataviz reads) as
/// `bad_topic`, one too large for the NATS server once headers are added (RAW's, DEAD's) as
/// `oversized`. A letter holding only its payload's beginning ([`DeadLetter::whole_size`]) needs
/// the whole kept beside it by the caller ([`keep_whole`]), for `dlq requeue`.
pub fn unfit(
    raw: &crate::message::RawMessage,
    stage: &str,
    max_payload: usize,
) -> Option<DeadLetter> {
    if fits(raw, max_payload) {
        return None;
    }
    let mut letter = DeadLetter {
        raw: raw.clone(),
        stage: stage.into(),
        reason: DeadReason::Oversized,
        error: String::new(),
        source_seq: None,
        whole_size: None,
    };
    if header_len(&raw.topic) > MAX_TOPIC_HEADER {
        letter.reason = DeadReason::BadTopic;
        letter.error = format!(
            "longer than any topic Dataviz reads (gateways/<id>/<device>, device codes of at \
             most {MAX_DEVICE_CODE_LEN} bytes)"
        );
        cut(&mut letter, max_payload);
        return Some(letter);
    }
    let kept = cut(&mut letter, max_payload)?;
    letter.error = format!(
        "payload of {} bytes is over what the NATS server accepts ({max_payload} bytes); the first {kept} bytes are kept",
        raw.payload.len()
    );
    Some(letter)
}

/// What headers take in the server's `max_payload` besides the topic and a dead letter's error:
/// the raw id and receive time, the deduplication id, a letter's stage, reason and size, the
/// header block's framing; with a margin.
const HEADER_ROOM: usize = 4096;

/// The largest payload a message of `topic` may have under the server's `max_payload`, with its
/// headers: the topic travels in one, escaped ([`header_len`]: a byte outside ASCII takes
/// three; [`MAX_TOPIC_HEADER`] at most), as does `error`, a dead letter's ([`error_kept`]).
fn payload_limit(topic: &str, error: &str, max_payload: usize) -> usize {
    let topic = header_len(topic).min(MAX_TOPIC_HEADER);
    max_payload.saturating_sub(HEADER_ROOM + topic + header_len(error_kept(error)))
}

/// Whether `raw` can go to a stream as it is, so that [`unfit`] says nothing of it: its topic
/// fits in a header and its payload beside its headers.
pub fn fits(raw: &crate::message::RawMessage, max_payload: usize) -> bool {
    let (payload, topic) = (raw.payload.len(), raw.topic.len());
    // Decided without escaping the topic for nearly every message: escaped, a byte takes three
    // at most.
    if 3 * topic <= MAX_TOPIC_HEADER && payload + HEADER_ROOM + 3 * topic <= max_payload {
        return true;
    }
    let topic = header_len(&raw.topic);
    topic <= MAX_TOPIC_HEADER && payload + HEADER_ROOM + topic <= max_payload
}

/// Cuts the payload of `letter` to its first bytes when it is too large for DEAD with headers,
/// and says how many it keeps; [`DeadLetter::whole_size`] then says it was cut.
fn cut(letter: &mut DeadLetter, max_payload: usize) -> Option<usize> {
    let limit = payload_limit(&letter.raw.topic, &letter.error, max_payload);
    let size = letter.raw.payload.len();
    if size <= limit {
        return None;
    }
    let kept = limit.min(64 * 1024);
    letter.raw.payload = letter.raw.payload.slice(..kept);
    letter.whole_size = Some(size as u64);
    Some(kept)
}

/// Stores `letter` in DEAD. One too large for DEAD with headers (a stage refused a message as
/// large as the server takes) keeps its first bytes there, and its whole payload beside
/// ([`keep_whole`]).
pub async fn store(js: &jetstream::Context, letter: &mut DeadLetter) -> anyhow::Result<()> {
    let whole = letter.raw.payload.clone();
    if cut(letter, js.client().server_info().max_payload).is_some() {
        keep_whole(js, letter, &whole).await?;
    }
    letter.store(js).await?;
    Ok(())
}

/// Keeps the whole `payload` of `letter`, whose own payload is only its beginning
/// ([`DeadLetter::whole_size`]), for as long as DEAD keeps letters. Storing it again replaces
/// it.
pub async fn keep_whole(
    js: &jetstream::Context,
    letter: &DeadLetter,
    payload: &[u8],
) -> anyhow::Result<()> {
    js.get_object_store(streams::DEAD_PAYLOADS_BUCKET)
        .await
        .context("opening the object store of whole payloads")?
        .put(letter.whole_name().as_str(), &mut &payload[..])
        .await
        .context("storing a dead letter's whole payload")?;
    Ok(())
}

/// The letter's original payload: its own, or the whole one kept beside it.
pub async fn whole_payload(
    js: &jetstream::Context,
    letter: &DeadLetter,
) -> anyhow::Result<bytes::Bytes> {
    use tokio::io::AsyncReadExt as _;
    let Some(size) = letter.whole_size else {
        return Ok(letter.raw.payload.clone());
    };
    let gone = || {
        format!(
            "the whole payload ({size} bytes) of message {} is no longer kept",
            letter.raw.id
        )
    };
    let mut object = js
        .get_object_store(streams::DEAD_PAYLOADS_BUCKET)
        .await
        .context("opening the object store of whole payloads")?
        .get(letter.whole_name())
        .await
        .with_context(gone)?;
    let mut whole = Vec::with_capacity(usize::try_from(size).unwrap_or_default());
    object.read_to_end(&mut whole).await.with_context(gone)?;
    Ok(whole.into())
}

/// Removes the whole payload kept for `letter`, if any.
async fn forget_whole(js: &jetstream::Context, letter: &DeadLetter) -> anyhow::Result<()> {
    if letter.whole_size.is_some() {
        js.get_object_store(streams::DEAD_PAYLOADS_BUCKET)
            .await?
            .delete(letter.whole_name())
            .await?;
    }
    Ok(())
}

/// Publishes the letter's raw message to RAW again (its whole payload), then removes the letter
/// from DEAD.
pub async fn requeue(js: &jetstream::Context, seq: u64) -> anyhow::Result<()> {
    let found = get(js, seq).await?;
    let letter = found.letter.with_context(|| {
        format!("dead letter {seq} was not written by Dataviz: it cannot be re-queued")
    })?;
    let payload = whole_payload(js, &letter)
        .await
        .with_context(|| format!("dead letter {seq} cannot be re-queued"))?;
    let fits = payload_limit(&letter.raw.topic, "", js.client().server_info().max_payload);
    anyhow::ensure!(
        payload.len() <= fits,
        "dead letter {seq} cannot be re-queued: its payload of {} bytes is over what the NATS \
         server accepts ({fits} bytes with headers); raise the server's max_payload first",
        payload.len()
    );
    // A retried re-queue of the same letter is stored once.
    let dedup = format!("requeue:{seq}:{}", letter.raw.id);
    streams::publish_stored(
        js,
        letter.raw.subject(),
        letter.raw.headers(Some(&dedup)),
        payload,
    )
    .await
    .context("RAW did not store the re-queued message")?;
    js.get_stream(DEAD_STREAM)
        .await?
        .delete_message(seq)
        .await
        .with_context(|| format!("re-queued, but dead letter {seq} not deleted"))?;
    if let Err(e) = forget_whole(js, &letter).await {
        tracing::warn!(seq, error = %e, "re-queued; its whole payload is left to expire with DEAD_RETENTION");
    }
    Ok(())
}

/// Deletes the dead letters matching `filter`; returns how many. The whole payloads kept beside
/// them ([`keep_whole`]) go with them.
pub async fn purge(js: &jetstream::Context, filter: &DeadFilter) -> anyhow::Result<u64> {
    let stream = js.get_stream(DEAD_STREAM).await.context("opening DEAD")?;
    let with_whole = letters_kept_whole(js, filter).await?;
    let purged = purge_letters(js, &stream, filter).await?;
    if !with_whole.is_empty() {
        let store = js
            .get_object_store(streams::DEAD_PAYLOADS_BUCKET)
            .await
            .context("opening the object store of whole payloads")?;
        for (seq, name) in with_whole {
            if let Err(e) = store.delete(&name).await {
                tracing::warn!(seq, error = %e, "purged; its whole payload is left to expire with DEAD_RETENTION");
            }
        }
    }
    Ok(purged)
}

/// The letters matching `filter` whose whole payload is kept beside them: their sequences and
/// the names of their whole payloads. Any stage's letter may have one (a message cut to fit
/// DEAD), but few do: the letters are read, headers only, only while some whole payload is
/// kept, and then only for those.
async fn letters_kept_whole(
    js: &jetstream::Context,
    filter: &DeadFilter,
) -> anyhow::Result<Vec<(u64, String)>> {
    let store = js
        .get_object_store(streams::DEAD_PAYLOADS_BUCKET)
        .await
        .context("opening the object store of whole payloads")?;
    let mut kept = std::collections::HashSet::new();
    let mut objects = store.list().await.context("listing the whole payloads")?;
    while let Some(object) = objects.next().await {
        kept.insert(object.context("listing the whole payloads")?.name);
    }
    if kept.is_empty() {
        return Ok(Vec::new());
    }
    let letters = read(js, filter, usize::MAX, true).await?;
    Ok(letters
        .into_iter()
        .filter_map(|entry| {
            let letter = entry.letter.ok()?;
            let name = letter.whole_name();
            (letter.whole_size.is_some() && kept.contains(&name)).then_some((entry.seq, name))
        })
        .collect())
}

async fn purge_letters(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    filter: &DeadFilter,
) -> anyhow::Result<u64> {
    if filter.gateway.is_none() {
        let purged = stream
            .purge()
            .filter(filter.subject())
            .await
            .context("purging DEAD")?;
        return Ok(purged.purged);
    }
    let mut deleted = 0;
    for found in list(js, filter, usize::MAX).await? {
        if stream.delete_message(found.seq).await.is_ok() {
            deleted += 1;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::RawMessage;
    use bytes::Bytes;

    /// The bytes `headers` take in a message, as the NATS client writes them.
    fn header_bytes(headers: &async_nats::HeaderMap) -> usize {
        let fields: usize = headers
            .iter()
            .flat_map(|(name, values)| values.iter().map(move |v| (name, v)))
            .map(|(name, value)| {
                AsRef::<str>::as_ref(name).len() + ": ".len() + value.as_str().len() + 2
            })
            .sum();
        "NATS/1.0\r\n".len() + fields + 2
    }

    #[test]
    fn oversized_messages_become_dead_letters() {
        let raw = RawMessage::received("gateways/1/d".into(), Bytes::from(vec![b'x'; 10_000]));
        assert!(unfit(&raw, "bridge", 1 << 20).is_none());
        let dead = unfit(&raw, "bridge", 8192).unwrap();
        assert_eq!(dead.reason, DeadReason::Oversized);
        assert_eq!(dead.raw.payload.len(), 8192 - 4096 - "gateways/1/d".len());
        assert_eq!((dead.raw.id, dead.stage.as_str()), (raw.id, "bridge"));
        assert_eq!(dead.whole_size, Some(10_000));
    }

    /// The topic travels in RAW's header, escaped: 5,000 bytes of `é` take 15,000 there. A
    /// payload that fits beside a short topic does not beside such a one, and becomes a dead
    /// letter that fits in turn; one just under the limit fits with its headers.
    #[test]
    fn a_long_topic_counts_against_the_payload_limit() {
        const MAX_PAYLOAD: usize = 512 * 1024;
        let topic = format!("gateways/1/{}", "é".repeat(2_500));
        let message = |size: usize| RawMessage::received(topic.clone(), vec![b'x'; size].into());
        let short =
            |size: usize| RawMessage::received("gateways/1/d".into(), vec![b'x'; size].into());
        let limit = payload_limit(&topic, "", MAX_PAYLOAD);
        assert_eq!(limit, MAX_PAYLOAD - 4096 - "gateways/1/".len() - 15_000);

        assert!(fits(&short(MAX_PAYLOAD - 8192), MAX_PAYLOAD));
        assert!(!fits(&message(MAX_PAYLOAD - 8192), MAX_PAYLOAD));
        assert!(!fits(&message(limit + 1), MAX_PAYLOAD));
        let just_under = message(limit);
        assert!(fits(&just_under, MAX_PAYLOAD));
        let dedup_id = "x".repeat(200);
        let headers = just_under.headers(Some(&dedup_id));
        assert!(header_bytes(&headers) + limit <= MAX_PAYLOAD);

        let over = message(MAX_PAYLOAD - 8192);
        let letter = unfit(&over, "bridge", MAX_PAYLOAD).expect("a dead letter");
        assert_eq!(letter.reason, DeadReason::Oversized);
        assert_eq!(letter.raw.topic, topic);
        assert_eq!(letter.whole_size, Some(over.payload.len() as u64));
        assert!(
            header_bytes(&letter.headers()) + letter.raw.payload.len() <= MAX_PAYLOAD,
            "the letter fits in DEAD"
        );
    }

    /// A letter's error counts against its payload as its header holds it: 2,000 characters at
    /// most, however long the error (one naming a long topic whole, say).
    #[test]
    fn a_letter_s_error_counts_as_its_header_keeps_it() {
        let kept = "é".repeat(2000);
        assert_eq!(error_kept(&"é".repeat(30_000)), kept);
        assert_eq!(error_kept("short"), "short");
        assert_eq!(
            payload_limit("t", &"é".repeat(30_000), 1 << 20),
            payload_limit("t", &kept, 1 << 20)
        );
        let raw = RawMessage::received("t".into(), Bytes::from_static(b"{}"));
        let letter = DeadLetter {
            raw,
            stage: "processor".into(),
            reason: DeadReason::BadTopic,
            error: "é".repeat(30_000),
            source_seq: None,
            whole_size: None,
        };
        let error = letter.headers();
        let error = error.get(crate::message::HEADER_DEAD_ERROR).unwrap();
        assert_eq!(error.as_str().len(), header_len(&kept));
    }

    /// NATS refuses headers over 64 KiB, and MQTT allows 65,535 bytes of topic. A topic whose
    /// escaped form takes over [`MAX_TOPIC_HEADER`] bytes (never one Dataviz reads) cannot go
    /// to RAW: it makes a `bad_topic` letter, which keeps the topic's beginning and says so.
    #[test]
    fn a_topic_too_long_for_a_header_makes_a_letter_that_fits() {
        let prefix = "gateways/1/";
        let ascii = |extra: usize| {
            let topic = format!(
                "{prefix}{}",
                "a".repeat(MAX_TOPIC_HEADER - prefix.len() + extra)
            );
            RawMessage::received(topic, Bytes::from_static(b"{}"))
        };
        assert!(fits(&ascii(0), 1 << 20));
        assert!(unfit(&ascii(0), "bridge", 1 << 20).is_none());
        let letter = unfit(&ascii(1), "bridge", 1 << 20).expect("a dead letter");
        assert_eq!(letter.reason, DeadReason::BadTopic);

        let topic = format!("{prefix}{}", "é".repeat(20_000));
        let raw = RawMessage::received(topic.clone(), Bytes::from_static(b"{}"));
        assert!(!fits(&raw, 1 << 20));
        let letter = unfit(&raw, "bridge", 1 << 20).expect("a dead letter");
        assert_eq!(
            (letter.reason, letter.whole_size, &letter.raw.payload),
            (DeadReason::BadTopic, None, &raw.payload)
        );
        let headers = letter.headers();
        assert!(header_bytes(&headers) < 64 * 1024, "NATS takes its headers");
        let back = DeadLetter::from_parts(Some(&headers), letter.raw.payload.clone()).unwrap();
        assert!(topic.starts_with(&back.raw.topic));
        assert!(header_len(&back.raw.topic) <= MAX_TOPIC_HEADER);
        // Cut on a character: `é` takes six bytes escaped.
        assert!(header_len(&back.raw.topic) > MAX_TOPIC_HEADER - 6);
        assert!(
            back.error.starts_with(&format!(
                "the topic takes 40011 bytes, the first {} kept: longer than any topic",
                back.raw.topic.len()
            )),
            "{}",
            back.error
        );
    }
}
