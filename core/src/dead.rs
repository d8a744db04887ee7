//! The DEAD stream as an operator sees it: list, show, re-queue and purge dead letters.
//!
//! A dead letter is named by its sequence in DEAD. Re-queueing publishes the original raw
//! message (same id, topic, receive time and payload) to RAW again, then deletes the letter:
//! the processor handles it as new, and if it fails again it comes back to DEAD. The raw id is
//! kept, so a message whose readings were stored after all is not stored twice.

use crate::message::{DeadLetter, DeadReason, HeaderError};
use crate::streams::{self, DEAD_STREAM};
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
    let stream = js
        .get_stream(DEAD_STREAM)
        .await
        .context("opening DEAD (created by the first Dataviz role to start)")?;
    let mut reader: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: filter.subject(),
            ack_policy: consumer::AckPolicy::None,
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
            let time = DateTime::from_timestamp_nanos(info.published.unix_timestamp_nanos() as i64);
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
    let time = DateTime::from_timestamp_nanos(message.time.unix_timestamp_nanos() as i64);
    Ok(entry(seq, time, Some(&message.headers), message.payload))
}

/// Publishes the letter's raw message to RAW again, then removes the letter from DEAD.
pub async fn requeue(js: &jetstream::Context, seq: u64) -> anyhow::Result<()> {
    let found = get(js, seq).await?;
    let letter = found.letter.with_context(|| {
        format!("dead letter {seq} was not written by Dataviz: it cannot be re-queued")
    })?;
    // A retried re-queue of the same letter is stored once.
    let dedup = format!("requeue:{seq}:{}", letter.raw.id);
    streams::publish_stored(
        js,
        letter.raw.subject(),
        letter.raw.headers(Some(&dedup)),
        letter.raw.payload.clone(),
    )
    .await
    .context("RAW did not store the re-queued message")?;
    js.get_stream(DEAD_STREAM)
        .await?
        .delete_message(seq)
        .await
        .with_context(|| format!("re-queued, but dead letter {seq} not deleted"))?;
    Ok(())
}

/// Deletes the dead letters matching `filter`; returns how many.
pub async fn purge(js: &jetstream::Context, filter: &DeadFilter) -> anyhow::Result<u64> {
    let stream = js.get_stream(DEAD_STREAM).await.context("opening DEAD")?;
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
