//! Replay: the processor run again over a range of RAW, and of nats-server's MQTT stream where
//! it keeps messages for replay (`MQTT_INTAKE=nats`).
//!
//! The raw messages keep their ids, so what was stored before is not stored again: a replay of
//! a range already ingested writes no row, and one over messages that were refused (say, for a
//! gateway that exists now) ingests them. The messages go through the same decision as live
//! ones ([`Processor::outcomes`], or [`classify`](crate::classify) for a dry run) and are
//! settled by the same code ([`consume::settle`]).
//!
//! Progress is kept in a durable consumer named after the range: an interrupted replay resumes
//! where it stopped when run again with the same range (`restart` starts over).

use crate::{Outcome, Processor, Read};
use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use dataviz_core::{
    consume::{self, Settle, Stage},
    ingested::{self, EarlierIds},
    shutdown::Shutdown,
    streams::{self, RAW_STREAM},
    topic,
};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Which raw messages to replay.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Range {
    /// Stored at or after this time.
    pub since: DateTime<Utc>,
    /// Stored at or before this time; `None`: up to the last message stored when the replay
    /// starts.
    pub until: Option<DateTime<Utc>>,
    /// Only this gateway's messages.
    pub gateway: Option<i32>,
    /// Only this device's messages (its code, as in the topic).
    pub device: Option<String>,
}

impl Range {
    /// Whether a raw message read from a message on `subject` is of the range's gateway and
    /// device: a pack's members may be of any gateway. A message that cannot be read is in a
    /// range of no device, and of a gateway when on its subject (not a pack's).
    fn wants(&self, read: &Read, subject: &str) -> bool {
        if self.gateway.is_none() && self.device.is_none() {
            return true;
        }
        let Read::Raw(raw, _) = read else {
            return self.device.is_none() && subject != streams::RAW_PACK_SUBJECT;
        };
        match topic::parse(&raw.topic) {
            Ok(topic) => {
                self.gateway.is_none_or(|id| id == topic.gateway_id)
                    && self
                        .device
                        .as_ref()
                        .is_none_or(|code| code == topic.device_code)
            }
            Err(_) => {
                self.device.is_none()
                    && self
                        .gateway
                        .is_none_or(|id| dataviz_core::topic::gateway_of(&raw.topic) == Some(id))
            }
        }
    }
}

/// How to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Say what would happen; publish and create nothing.
    pub dry_run: bool,
    /// Start over instead of resuming an interrupted replay of the same range.
    pub restart: bool,
    /// How long to wait, at the end, for the writer to store the replayed readings.
    pub wait: Duration,
}

/// Told how a replay advances (a progress bar, a log line).
pub trait Observer {
    /// The replay found `messages` to read.
    fn start(&mut self, _messages: u64) {}
    /// `messages` have been read so far.
    fn read(&mut self, _messages: u64) {}
}

impl Observer for () {}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Raw messages read from RAW (each member of a pack, [`dataviz_core::pack`]).
    pub read: u64,
    /// Read, but of another gateway or device than the one asked for (a pack's members may be
    /// of any).
    pub skipped: u64,
    /// Their readings were already stored: nothing written again.
    pub already_stored: u64,
    /// Published to READINGS for the first time.
    pub new_messages: u64,
    /// The readings those hold.
    pub new_rows: u64,
    /// Sent to DEAD.
    pub dead: u64,
    /// Of the new messages, how many the writer had stored when the replay ended.
    pub written: u64,
    /// A dry run: how many messages would meet each fate.
    pub would: BTreeMap<String, u64>,
    /// Stopped by the caller's signal before the end of the range; run again to resume.
    pub interrupted: bool,
    pub elapsed: Duration,
}

/// Replays `range` through `processor`, telling `observer` how it goes, until the end of the
/// range or `stop`. A message that fails for now (a database or NATS away) stops the replay
/// with an error, and the next run resumes from it.
pub async fn replay(
    processor: &Processor,
    pool: &deadpool_postgres::Pool,
    range: &Range,
    options: Options,
    observer: &mut impl Observer,
    stop: &Shutdown,
) -> anyhow::Result<Summary> {
    if let Some(until) = range.until {
        anyhow::ensure!(until > range.since, "--until must be after --since");
    }
    let js = &processor.js;
    let name = consumer_name(range);
    let start = time::OffsetDateTime::from_unix_timestamp_nanos(
        range
            .since
            .timestamp_nanos_opt()
            .context("--since out of range")?
            .into(),
    )?;
    let mut readers = Vec::new();
    for (stream, filter) in stores(js, range).await? {
        let end_seq = stream.get_info().await?.state.last_sequence;
        if options.restart || options.dry_run {
            let _ = stream.delete_consumer(&name).await;
        }
        let reader: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                // A dry run keeps no position and acknowledges nothing.
                durable_name: (!options.dry_run).then(|| name.clone()),
                ack_policy: if options.dry_run {
                    consumer::AckPolicy::None
                } else {
                    consumer::AckPolicy::Explicit
                },
                description: Some(format!("dataviz replay since {}", range.since.to_rfc3339())),
                deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
                filter_subjects: filter,
                ack_wait: Duration::from_secs(60),
                max_ack_pending: 10_000,
                // An abandoned replay's position is kept a week, then the server forgets it.
                inactive_threshold: Duration::from_secs(7 * 24 * 3600),
                ..Default::default()
            })
            .await
            .context("creating the replay consumer (an interrupted replay of this range with other settings? use --restart)")?;
        readers.push((stream, reader, end_seq));
    }
    let mut pending = 0;
    for (_, reader, _) in &mut readers {
        pending += reader.info().await?.num_pending;
    }
    observer.start(pending);
    let started = Instant::now();
    let mut summary = Summary::default();
    // The messages of the streams read: raw messages or packs of them.
    let mut fetched = 0;
    // The keys of the messages it publishes for the first time.
    let mut new_keys: Vec<Uuid> = Vec::new();
    let earlier = EarlierIds::default();
    'streams: for (_, reader, end_seq) in &mut readers {
        loop {
            let max_bytes = consume::fetch_bytes(js.client().server_info().max_payload);
            let (messages, end) = fetch(reader, *end_seq, range.until, max_bytes).await?;
            if messages.is_empty() && (end || reader.info().await?.num_pending == 0) {
                break;
            }
            fetched += messages.len() as u64;
            let (reads, owners) = crate::members(&messages);
            summary.read += reads.len() as u64;
            // The raw messages of the range's gateway and device (a pack's members may be of
            // any); the others are done at once.
            let wanted: Vec<bool> = (reads.iter().zip(&owners))
                .map(|(read, &owner)| range.wants(read, &messages[owner].subject))
                .collect();
            summary.skipped += wanted.iter().filter(|wanted| !**wanted).count() as u64;
            if options.dry_run {
                for (read, _) in reads.iter().zip(&wanted).filter(|(_, wanted)| **wanted) {
                    *summary
                        .would
                        .entry(dry_run(processor, read).await?)
                        .or_default() += 1;
                }
            } else {
                let fetch = Fetch {
                    messages: &messages,
                    reads,
                    owners: &owners,
                    wanted: &wanted,
                };
                replay_fetch(
                    processor,
                    pool,
                    &earlier,
                    &name,
                    fetch,
                    &mut summary,
                    &mut new_keys,
                )
                .await?;
            }
            observer.read(fetched);
            if end {
                break;
            }
            if stop.is_cancelled() {
                summary.interrupted = true;
                break 'streams;
            }
        }
    }
    if !options.dry_run && !summary.interrupted {
        for (stream, _, _) in &readers {
            let _ = stream.delete_consumer(&name).await;
        }
        summary.written = wait_for_writer(pool, &new_keys, options.wait).await? as u64;
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The streams that keep raw messages, each with the subjects of `range`'s gateway there: RAW,
/// with what the bridge stored, QoS 0 messages, re-queued letters (and the copies the processor
/// kept of what it read from nats-server before that stream kept it); and nats-server's MQTT
/// stream when it keeps messages for replay (`MQTT_INTAKE=nats`,
/// [`streams::StreamSettings::mqtt_stream`]). Only there: a replay's consumer on a stream
/// that keeps a message until every consumer took it would hold messages for itself.
async fn stores(
    js: &jetstream::Context,
    range: &Range,
) -> anyhow::Result<Vec<(jetstream::stream::Stream, Vec<String>)>> {
    let raw = js
        .get_stream(RAW_STREAM)
        .await
        .context("opening RAW (has dataviz migrate run?)")?;
    let raw_subjects = match range.gateway {
        Some(id) => vec![
            streams::raw_subject(Some(id)),
            streams::raw_intake_subject(Some(id)),
            streams::RAW_PACK_SUBJECT.to_owned(),
        ],
        None => vec![streams::RAW_SUBJECTS.into()],
    };
    let mut stores = vec![(raw, raw_subjects)];
    if let Ok(mqtt) = js.get_stream(streams::MQTT_STREAM).await
        && mqtt.cached_info().config.retention == jetstream::stream::RetentionPolicy::Limits
    {
        let gateway = range.gateway.map_or("*".to_owned(), |id| id.to_string());
        let subject = format!("{}gateways.{gateway}.>", streams::MQTT_SUBJECT_PREFIX);
        stores.push((mqtt, vec![subject]));
    }
    Ok(stores)
}
/// The next messages of the range, and whether the range ends with them.
async fn fetch(
    reader: &mut consumer::PullConsumer,
    end_seq: u64,
    until: Option<DateTime<Utc>>,
    max_bytes: usize,
) -> anyhow::Result<(Vec<jetstream::Message>, bool)> {
    // Bounded in bytes too: a fetch of packs holds many raw messages per message, and large
    // messages hold many bytes.
    let mut unit = reader
        .fetch()
        .max_messages(500)
        .max_bytes(max_bytes)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("reading RAW: {e}"))?;
    let mut messages = Vec::new();
    while let Some(message) = unit.next().await {
        let message = message.map_err(|e| anyhow::anyhow!("reading RAW: {e}"))?;
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("reading RAW: {e}"))?;
        let published = dataviz_core::message::chrono_time(info.published);
        if info.stream_sequence > end_seq || until.is_some_and(|u| published > u) {
            return Ok((messages, true));
        }
        messages.push(message);
    }
    Ok((messages, false))
}

/// What a dry run says of one raw message.
async fn dry_run(processor: &Processor, read: &Read) -> anyhow::Result<String> {
    let raw = match read {
        Read::Raw(raw, _) => raw,
        Read::Settled(Outcome::Dead(letter)) => {
            return Ok(format!("would go to DEAD: {}", letter.reason));
        }
        Read::Settled(_) => return Ok("would be retried".to_owned()),
    };
    Ok(match processor.dry_run(raw).await? {
        Ok(_) => "would be processed".to_owned(),
        Err((reason, _)) => format!("would go to DEAD: {reason}"),
    })
}

/// One fetch of a replay: its messages, the raw messages they hold ([`crate::members`]), and
/// which of those the range wants.
struct Fetch<'a> {
    messages: &'a [jetstream::Message],
    reads: Vec<Read>,
    owners: &'a [usize],
    wanted: &'a [bool],
}

/// Processes and settles one fetch of the replay `name`, counting what became of each raw
/// message. Its READINGS messages are its own ([`Processor::publish_in`]).
async fn replay_fetch(
    processor: &Processor,
    pool: &deadpool_postgres::Pool,
    earlier: &EarlierIds,
    name: &str,
    fetch: Fetch<'_>,
    summary: &mut Summary,
    new_keys: &mut Vec<Uuid>,
) -> anyhow::Result<()> {
    // Where each wanted raw message is among all of them.
    let mut places = Vec::with_capacity(fetch.reads.len());
    let wanted: Vec<Read> = (fetch.reads.into_iter().zip(fetch.wanted).enumerate())
        .filter(|(_, (_, wanted))| **wanted)
        .map(|(place, (read, _))| {
            places.push(place);
            read
        })
        .collect();
    let outcomes = processor.outcomes(wanted).await;
    // Per message: its id, key and readings, when it has readings.
    let readings: Vec<Option<(Uuid, Uuid, u64)>> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Readings(b) => Some((b.id, ingested::key(b), b.readings.len() as u64)),
            _ => None,
        })
        .collect();
    let units = outcomes.iter().filter_map(|o| match o {
        Outcome::Readings(b) => Some(b),
        _ => None,
    });
    let known = ingested::stored(&*pool.get().await?, earlier, units).await?;
    let settles = processor.publish_in(outcomes, Some(name)).await;
    let mut stopped = None;
    for (settle, readings) in settles.iter().zip(&readings) {
        match (settle, readings) {
            (Settle::Done, Some((id, _, _))) if known.contains(id) => summary.already_stored += 1,
            (Settle::Done, Some((_, key, rows))) => {
                summary.new_messages += 1;
                summary.new_rows += rows;
                new_keys.push(*key);
            }
            (Settle::Done, None) => {}
            (Settle::Dead(_), _) => summary.dead += 1,
            (Settle::Retry(failure), _) => {
                stopped.get_or_insert_with(|| failure.error.clone());
            }
        }
    }
    let mut every: Vec<Settle> = fetch.owners.iter().map(|_| Settle::Done).collect();
    for (place, settle) in places.into_iter().zip(settles) {
        every[place] = settle;
    }
    let settles = crate::per_message(fetch.messages.len(), fetch.owners, every);
    consume::settle(&processor.js, Processor::NAME, fetch.messages, settles).await;
    match stopped {
        Some(e) => anyhow::bail!("replay stopped: {e} (run the same command again to resume)"),
        None => Ok(()),
    }
}

/// The durable consumer keeping an interrupted replay's position: one per range and filter.
fn consumer_name(range: &Range) -> String {
    let key = format!(
        "{}|{:?}|{:?}|{:?}",
        range.since.timestamp_micros(),
        range.until.map(|u| u.timestamp_micros()),
        range.gateway,
        range.device
    );
    // FNV-1a: a stable name, no need for a cryptographic hash.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("replay_{hash:016x}")
}

/// Waits until the writer stored the messages of the keys `keys`; returns how many it has.
async fn wait_for_writer(
    pool: &deadpool_postgres::Pool,
    keys: &[Uuid],
    wait: Duration,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + wait;
    loop {
        let mut stored = 0;
        for chunk in keys.chunks(10_000) {
            stored += ingested::stored_keys(&*pool.get().await?, chunk)
                .await?
                .len();
        }
        if stored == keys.len() || Instant::now() >= deadline {
            return Ok(stored);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_names_its_consumer_stably() {
        let range = Range {
            since: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            until: None,
            gateway: Some(7),
            device: None,
        };
        let name = consumer_name(&range);
        assert_eq!(name, consumer_name(&range.clone()));
        assert!(name.starts_with("replay_") && name.len() == "replay_".len() + 16);
        let other = Range {
            gateway: Some(8),
            ..range
        };
        assert_ne!(consumer_name(&other), name);
    }
}
