//! The processor: RAW → registry → READINGS.
//!
//! For each raw message: parse the topic and payload ([`dataviz_core::topic`],
//! [`dataviz_core::payload`]), find or create the device and its tags ([`registry`]), and make
//! one [`MessageReadings`] under the message's id ([`dataviz_core::identity`]: derived from
//! the message when it has `ts`, else the raw message's id). The units of a fetch of raw
//! messages go to READINGS packed, one message per gateway ([`ReadingsMessage`]). A raw message
//! is acknowledged only once READINGS (or DEAD) stored its result.
//!
//! With `MQTT_INTAKE=nats` it also reads, with no bridge, what nats-server's MQTT listener
//! stored (stream `$MQTT_msgs`, which keeps it for replay as RAW keeps the bridge's): each such
//! message gets its id and receive time from its place in that stream
//! ([`RawMessage::stored_by_broker`]). QoS 0 messages, which nats-server does not store, it
//! takes as they come and stores in RAW ([`at_most_once`]).
//!
//! Failures are sorted in one place, [`Outcome`]: a message that can never succeed (bad topic,
//! bad payload, unknown gateway, a value PostgreSQL cannot store) goes to DEAD with the reason;
//! anything else (database or NATS unreachable) is handed back and retried with backoff.

pub mod at_most_once;
pub mod registry;
pub mod replay;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use dataviz_core::{
    consume::{self, Failure, Settle, Stage, Transient},
    db::ErrorKind,
    identity,
    message::{
        DeadLetter, DeadReason, HeaderError, MessageReadings, RawMessage, ReadingsMessage,
        TagReading, chrono_time,
    },
    ops::{Progress, metric},
    pack,
    payload::{self, Payload, PayloadLimits},
    shutdown::Shutdown,
    streams::{self, Intake, StreamSettings},
    topic,
    value::Value,
};
use futures::StreamExt;
use futures::future::join_all;
use registry::{Registry, RegistryError, Resolved};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Messages of one fetch decided at once ([`Processor::outcomes`]): how many of a worker's
/// registry misses go to the database together. Two workers take 8 connections at most, the
/// default pool's size, and only while devices are new.
pub const RESOLVE_CONCURRENCY: usize = 4;

/// Processor settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ProcessorConfig {
    /// Concurrent consume loops in this process.
    #[arg(long, env = "WORKER_COUNT", value_name = "WORKER_COUNT", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_count: u16,
    /// Largest payload accepted, in bytes; larger ones go to DEAD.
    #[arg(long, env = "MAX_PAYLOAD_BYTES", value_name = "MAX_PAYLOAD_BYTES", default_value_t = PayloadLimits::DEFAULT.max_bytes)]
    pub max_payload_bytes: usize,
    /// Most readings in one payload; more go to DEAD.
    #[arg(
        long,
        env = "MAX_READINGS_PER_MESSAGE",
        value_name = "MAX_READINGS_PER_MESSAGE",
        default_value_t = PayloadLimits::DEFAULT.max_readings
    )]
    pub max_readings_per_message: usize,
    /// Messages fetched per batch by each worker; the members of packs are handled this many at a
    /// time.
    #[arg(
        long,
        env = "PROCESSOR_BATCH_SIZE",
        value_name = "PROCESSOR_BATCH_SIZE",
        default_value_t = 500
    )]
    pub processor_batch_size: usize,
}

impl ProcessorConfig {
    pub fn limits(&self) -> PayloadLimits {
        PayloadLimits {
            max_bytes: self.max_payload_bytes,
            max_readings: self.max_readings_per_message,
        }
    }
}

/// What becomes of one raw message, before anything is published.
#[derive(Debug)]
pub enum Outcome {
    /// Readings to publish to READINGS.
    Readings(MessageReadings),
    /// Refused for good: to DEAD.
    Dead(DeadLetter),
    /// Failed for now: hand back, retry later.
    Retry(Transient),
}

/// The processor: shared registry and settings.
pub struct Processor {
    registry: Registry,
    limits: PayloadLimits,
    js: jetstream::Context,
    /// Raw messages decided and published at once ([`Processor::members_at_once`]).
    members_at_once: usize,
}

impl Stage for Processor {
    const NAME: &'static str = "processor";

    /// Decides what becomes of each raw message and publishes the readings to READINGS,
    /// waiting until stored: a message is done once READINGS holds its readings.
    async fn handle(&self, messages: &[jetstream::Message]) -> Vec<Settle> {
        let (reads, owners) = members(messages);
        // A fetch of packs holds many raw messages per message: they go a batch's worth at a
        // time, so that what a worker holds at once (their readings, decided and published)
        // is what a fetch of messages stored alone gives it.
        let mut settles = Vec::with_capacity(reads.len());
        let mut reads = reads.into_iter().peekable();
        while reads.peek().is_some() {
            let step: Vec<Read> = reads.by_ref().take(self.members_at_once).collect();
            let outcomes = self.outcomes(step).await;
            settles.extend(self.publish(outcomes).await);
        }
        per_message(messages.len(), &owners, settles)
    }
}

/// The raw messages of a fetch, in order: a message's own, or the members of a pack
/// ([`dataviz_core::pack`]); each with the index of the message it came from.
pub(crate) fn members(messages: &[jetstream::Message]) -> (Vec<Read>, Vec<usize>) {
    let mut reads = Vec::with_capacity(messages.len());
    let mut owners = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        if !pack::is_pack(message.headers.as_ref()) {
            reads.push(Processor::read(message));
            owners.push(index);
            continue;
        }
        let seq = message.info().ok().map(|i| i.stream_sequence);
        match pack::decode(message.headers.as_ref(), &message.payload) {
            Ok(members) => {
                owners.extend(std::iter::repeat_n(index, members.len()));
                reads.extend(members.into_iter().map(|raw| Read::Raw(raw, seq)));
            }
            Err(e) => {
                let raw =
                    RawMessage::received(message.subject.to_string(), message.payload.clone());
                reads.push(Read::Settled(dead(
                    raw,
                    DeadReason::ForeignMessage,
                    e.to_string(),
                )));
                owners.push(index);
            }
        }
    }
    (reads, owners)
}

/// One settle per message (`count` of them) from its members' (`owners[i]`: the message of
/// member `i`, as [`members`] gives them): a member to retry hands the whole message back (the
/// members done already are absorbed downstream, as any redelivery is); otherwise the
/// members' letters are stored; otherwise it is done. A message of no member is done.
pub(crate) fn per_message(count: usize, owners: &[usize], settles: Vec<Settle>) -> Vec<Settle> {
    let mut out: Vec<Settle> = (0..count).map(|_| Settle::Done).collect();
    for (&owner, settle) in owners.iter().zip(settles) {
        out[owner] = match (std::mem::replace(&mut out[owner], Settle::Done), settle) {
            (retry @ Settle::Retry(_), _) | (_, retry @ Settle::Retry(_)) => retry,
            (Settle::Dead(mut letters), Settle::Dead(more)) => {
                letters.extend(more);
                Settle::Dead(letters)
            }
            (dead @ Settle::Dead(_), Settle::Done) | (Settle::Done, dead @ Settle::Dead(_)) => dead,
            (Settle::Done, Settle::Done) => Settle::Done,
        };
    }
    out
}

/// A message handed to the processor, read: the raw message and where RAW keeps it, or what
/// becomes of it already.
pub(crate) enum Read {
    /// To process; RAW keeps it at this sequence (`None`: a message of a replay's own).
    Raw(RawMessage, Option<u64>),
    /// Decided already: a dead letter, or a retry.
    Settled(Outcome),
}

/// What [`Processor::decide_now`] could say of a message.
enum Decision {
    Now(Outcome),
    Waits(Pending),
}

/// A raw message read and classified, waiting on the registry for its device and tags.
struct Pending {
    raw: RawMessage,
    raw_seq: Option<u64>,
    gateway_id: i32,
    device_code: String,
    payload: Payload,
}

/// What becomes of a message once the registry answered for its device and tags.
fn conclude(
    pending: Pending,
    resolved: Result<Resolved, RegistryError>,
    max_payload: usize,
) -> Outcome {
    let Pending {
        raw,
        raw_seq,
        gateway_id,
        device_code,
        payload,
    } = pending;
    match resolved {
        Ok(resolved) => {
            let mut unit = unit(&raw, gateway_id, device_code, payload, resolved);
            unit.raw_seq = raw_seq;
            // A unit takes under four times its payload in READINGS: a reading's id and type
            // take less than the twenty bytes it takes at least in the payload, but a JSON
            // value is held as serde_json writes it, and a number in exponent form grows
            // (`1E15,`, five bytes, becomes `1000000000000000.0,`, 3.8 times). So only a
            // payload over a quarter of the server's limit can make a READINGS message over
            // it, and only such a one is measured (tested below).
            if raw.payload.len() > max_payload / 4
                && let Some(letter) = too_large(raw, &unit, max_payload)
            {
                return letter;
            }
            Outcome::Readings(unit)
        }
        Err(e @ RegistryError::UnknownGateway(_)) => {
            dead(raw, DeadReason::UnknownGateway, e.to_string())
        }
        Err(RegistryError::Database(e)) if e.kind() == ErrorKind::Permanent => dead(
            raw,
            DeadReason::Unstorable,
            format!("refused by PostgreSQL: {e}"),
        ),
        Err(e @ RegistryError::Database(_)) => Outcome::Retry(Transient {
            failure: Failure::Database,
            error: e.to_string(),
        }),
    }
}

impl Processor {
    pub fn new(
        pool: deadpool_postgres::Pool,
        js: jetstream::Context,
        limits: PayloadLimits,
    ) -> Processor {
        Processor {
            registry: Registry::new(pool),
            limits,
            js,
            members_at_once: 500,
        }
    }

    /// Decides and publishes at most `n` raw messages at once (500 unless told): a fetch holds
    /// more when it holds packs.
    pub fn members_at_once(mut self, n: usize) -> Processor {
        self.members_at_once = n.max(1);
        self
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// What becomes of each raw message read ([`members`]), nothing published yet, in order.
    ///
    /// Most messages are decided by the registry's cache alone, here, without waiting. The
    /// others (a device or tag not cached, a tag whose type changes: after a start, every
    /// device once) cost database round trips: they wait grouped by device, each device's in
    /// order (a tag's type is the latest message's), up to [`RESOLVE_CONCURRENCY`] devices at
    /// once. Only those are made futures: one waiting on the registry takes kilobytes, and
    /// made for every message of a fetch they were megabytes of fresh memory per fetch.
    pub(crate) async fn outcomes(&self, reads: Vec<Read>) -> Vec<Outcome> {
        // Read once per fetch: `server_info` copies the server's whole description.
        let max_payload = self.js.client().server_info().max_payload;
        let mut outcomes = Vec::with_capacity(reads.len());
        // Per device with a message waiting, its place in `waiting`.
        let mut devices: HashMap<(i32, String), usize> = HashMap::new();
        let mut waiting: Vec<Vec<(usize, Pending)>> = Vec::new();
        for (index, read) in reads.into_iter().enumerate() {
            match self.decide_now(read, max_payload, &devices) {
                Decision::Now(outcome) => outcomes.push(Some(outcome)),
                Decision::Waits(pending) => {
                    outcomes.push(None);
                    let device = (pending.gateway_id, pending.device_code.clone());
                    let group = *devices.entry(device).or_insert_with(|| {
                        waiting.push(Vec::new());
                        waiting.len() - 1
                    });
                    waiting[group].push((index, pending));
                }
            }
        }
        if !waiting.is_empty() {
            // The futures made first: a stream holding the closure would not be `Send` for
            // every lifetime, which the consume loop needs.
            let decided: Vec<_> = waiting
                .into_iter()
                .map(|group| async move {
                    let mut decided = Vec::with_capacity(group.len());
                    for (index, pending) in group {
                        let resolved = self
                            .registry
                            .resolve(
                                pending.gateway_id,
                                &pending.device_code,
                                &pending.payload.readings,
                                pending.raw.received_at,
                            )
                            .await;
                        decided.push((index, conclude(pending, resolved, max_payload)));
                    }
                    decided
                })
                .collect();
            let mut decided = futures::stream::iter(decided).buffer_unordered(RESOLVE_CONCURRENCY);
            while let Some(group) = decided.next().await {
                for (index, outcome) in group {
                    outcomes[index] = Some(outcome);
                }
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every message decided"))
            .collect()
    }

    /// What becomes of one message, when that can be said without waiting: it cannot be read,
    /// or the registry's cache knows its device and tags. Otherwise the message, read, waits
    /// on the registry; so does every later message of a device in `waiting` (a device with a
    /// message of the fetch waiting already), which then keeps its order: a tag's type is the
    /// latest message's, and a message the cache would answer with the type an earlier one is
    /// changing would otherwise be decided before it.
    fn decide_now(
        &self,
        read: Read,
        max_payload: usize,
        waiting: &HashMap<(i32, String), usize>,
    ) -> Decision {
        let (raw, raw_seq) = match read {
            Read::Raw(raw, raw_seq) => (raw, raw_seq),
            Read::Settled(outcome) => return Decision::Now(outcome),
        };
        let (gateway_id, device_code, payload) = match classify(&raw, &self.limits) {
            Ok(Readable {
                gateway_id,
                device_code,
                payload,
            }) => (gateway_id, device_code.to_owned(), payload),
            Err((reason, error)) => return Decision::Now(dead(raw, reason, error)),
        };
        let pending = Pending {
            raw,
            raw_seq,
            gateway_id,
            device_code,
            payload,
        };
        // Nearly always empty: a device waits only while the cache does not know it yet.
        if !waiting.is_empty()
            && waiting.contains_key(&(pending.gateway_id, pending.device_code.clone()))
        {
            return Decision::Waits(pending);
        }
        let cached = self.registry.resolve_cached(
            pending.gateway_id,
            &pending.device_code,
            &pending.payload.readings,
            pending.raw.received_at,
        );
        match cached {
            Some(resolved) => Decision::Now(conclude(pending, resolved, max_payload)),
            None => Decision::Waits(pending),
        }
    }

    /// The raw message of a message of RAW or of nats-server's MQTT stream, and where that
    /// stream keeps it.
    fn read(message: &jetstream::Message) -> Read {
        let info = message.info().ok();
        match raw_at(message, info.as_ref()) {
            Ok(raw) => Read::Raw(raw, info.map(|i| i.stream_sequence)),
            Err(e) => {
                let raw =
                    RawMessage::received(message.subject.to_string(), message.payload.clone());
                Read::Settled(dead(raw, DeadReason::ForeignMessage, e.to_string()))
            }
        }
    }

    /// Publishes the readings of `outcomes` to READINGS, waiting until stored, and says what
    /// became of each message: done once READINGS holds its readings. The readings go packed,
    /// a READINGS message per gateway ([`ReadingsMessage::pack`]); each message gets the result
    /// of the READINGS message that holds its readings.
    pub(crate) async fn publish(&self, outcomes: Vec<Outcome>) -> Vec<Settle> {
        self.publish_in(outcomes, None).await
    }

    /// [`Processor::publish`] under deduplication ids within `scope`, who publishes
    /// ([`ReadingsMessage::dedup_id_in`]): a replay.
    pub(crate) async fn publish_in(
        &self,
        outcomes: Vec<Outcome>,
        scope: Option<&str>,
    ) -> Vec<Settle> {
        let (packed, homes) = ReadingsMessage::pack(outcomes.iter().filter_map(|o| match o {
            Outcome::Readings(unit) => Some(unit),
            _ => None,
        }));
        let stored = join_all(
            packed
                .iter()
                .map(|m| streams::publish_readings_in(&self.js, m, scope)),
        )
        .await;
        let mut homes = homes.into_iter();
        // Counted per fetch, not per message: a metric's lookup costs more than its increment.
        const OUTCOMES: [&str; 3] = ["readings", "dead", "retry"];
        const READINGS: usize = 0;
        const DEAD: usize = 1;
        const RETRY: usize = 2;
        let (mut readings, mut counts) = (0u64, [0u64; 3]);
        let settles = outcomes
            .into_iter()
            .map(|outcome| {
                let (label, settle) = match outcome {
                    Outcome::Readings(unit) => {
                        let home = homes.next().expect("one home per unit");
                        match &stored[home] {
                            Ok(_) => {
                                readings += unit.readings.len() as u64;
                                (READINGS, Settle::Done)
                            }
                            Err(e) => (RETRY, Settle::retry(Failure::Nats, e)),
                        }
                    }
                    Outcome::Dead(letter) => (DEAD, Settle::dead(letter)),
                    Outcome::Retry(transient) => (RETRY, Settle::Retry(transient)),
                };
                counts[label] += 1;
                settle
            })
            .collect();
        metrics::counter!(metric::PROCESSOR_READINGS).increment(readings);
        for (label, count) in OUTCOMES.into_iter().zip(counts) {
            if count > 0 {
                metrics::counter!(metric::PROCESSOR_MESSAGES, "outcome" => label).increment(count);
            }
        }
        settles
    }

    /// What would become of a raw message, without creating anything: `Ok` with the number of
    /// readings, or the dead-letter reason and error.
    pub async fn dry_run(
        &self,
        raw: &RawMessage,
    ) -> Result<Result<usize, (DeadReason, String)>, RegistryError> {
        let readable = match classify(raw, &self.limits) {
            Ok(readable) => readable,
            Err(refused) => return Ok(Err(refused)),
        };
        let payload = readable.payload;
        match self.registry.check_gateway(readable.gateway_id).await {
            Ok(()) => Ok(Ok(payload.readings.len())),
            Err(e @ RegistryError::UnknownGateway(_)) => {
                Ok(Err((DeadReason::UnknownGateway, e.to_string())))
            }
            Err(e) => Err(e),
        }
    }
}

/// The dead letter of a message whose readings would make a READINGS message larger than the
/// server takes (a larger unit travels alone, [`ReadingsMessage::pack`]): publishing it could
/// only fail again and again. `None` when it fits.
fn too_large(raw: RawMessage, unit: &MessageReadings, max_payload: usize) -> Option<Outcome> {
    let (packed, _) = ReadingsMessage::pack([unit]);
    let size = packed.first().map_or(0, |m| m.payload().len());
    // Its one header, the deduplication id, takes under a hundred bytes.
    let limit = max_payload.saturating_sub(1024);
    if size <= limit {
        return None;
    }
    Some(dead(
        raw,
        DeadReason::Oversized,
        format!(
            "its readings take {size} bytes in READINGS, over what the NATS server accepts \
             ({max_payload} bytes, {limit} with headers)"
        ),
    ))
}

/// The raw message a message of RAW or of nats-server's MQTT stream holds
/// ([`RawMessage::stored`]), its place in its stream read already.
fn raw_at(
    message: &jetstream::Message,
    info: Option<&jetstream::message::Info>,
) -> Result<RawMessage, HeaderError> {
    let (seq, stored_at) = match info {
        Some(info) => (info.stream_sequence, chrono_time(info.published)),
        None => (0, Utc::now()),
    };
    RawMessage::stored(
        &message.subject,
        seq,
        stored_at,
        message.headers.as_ref(),
        message.payload.clone(),
    )
}

fn dead(raw: RawMessage, reason: DeadReason, error: String) -> Outcome {
    Outcome::Dead(DeadLetter {
        raw,
        stage: Processor::NAME.into(),
        reason,
        error,
        source_seq: None,
        whole_size: None,
    })
}

/// A raw message that may become readings: its gateway, its device's code and its payload.
#[derive(Debug)]
pub struct Readable<'a> {
    pub gateway_id: i32,
    pub device_code: &'a str,
    pub payload: Payload,
}

/// What a raw message is before the registry is asked: readable, or why it can only go to
/// DEAD. Pure, and the one classification of the live path ([`Processor::outcomes`]) and of
/// `replay --dry-run` ([`Processor::dry_run`]).
pub fn classify<'a>(
    raw: &'a RawMessage,
    limits: &PayloadLimits,
) -> Result<Readable<'a>, (DeadReason, String)> {
    let topic = topic::parse(&raw.topic).map_err(|e| (DeadReason::BadTopic, e.to_string()))?;
    let payload = payload::parse(&raw.payload, limits).map_err(|e| (e.kind(), e.to_string()))?;
    if let Some(problem) = unstorable(&payload) {
        return Err((DeadReason::Unstorable, problem));
    }
    Ok(Readable {
        gateway_id: topic.gateway_id,
        device_code: topic.device_code,
        payload,
    })
}

/// A value PostgreSQL refuses to store, named; such a message can only go to DEAD.
fn unstorable(payload: &Payload) -> Option<String> {
    fn json_has_nul(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(a) => a.iter().any(json_has_nul),
            serde_json::Value::Object(o) => {
                o.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v))
            }
            _ => false,
        }
    }
    payload.readings.iter().find_map(|(tag, value)| {
        let bad = tag.contains('\0')
            || match value {
                Value::Text(s) => s.contains('\0'),
                Value::Json(j) => json_has_nul(j),
                _ => false,
            };
        bad.then(|| format!("tag {tag:?}: PostgreSQL text cannot hold the NUL character (\\u0000)"))
    })
}

/// The readings of one message with their ids: the pure end of the processor.
pub fn unit(
    raw: &RawMessage,
    gateway_id: i32,
    device_code: String,
    payload: Payload,
    resolved: Resolved,
) -> MessageReadings {
    let time: DateTime<Utc> = payload.ts.unwrap_or(raw.received_at);
    MessageReadings {
        raw_seq: None,
        id: identity::readings_id(raw.id, gateway_id, &device_code, &payload),
        gateway_id,
        device_id: resolved.device_id,
        device_code,
        time,
        received_at: raw.received_at,
        readings: payload
            .readings
            .into_iter()
            .zip(resolved.tag_ids)
            .map(|((tag, value), tag_id)| TagReading { tag_id, tag, value })
            .collect(),
    }
}

/// Runs `config.worker_count` consume loops until `shutdown`: on RAW
/// ([`StreamSettings::processor_consumer`]), or with `MQTT_INTAKE=nats` on nats-server's MQTT
/// stream ([`StreamSettings::intake_consumer`]) and one more on RAW for what is re-queued there
/// and for QoS 0 messages, which [`at_most_once`] stores there.
pub async fn run(
    config: ProcessorConfig,
    settings: &StreamSettings,
    js: jetstream::Context,
    pool: deadpool_postgres::Pool,
    progress: Arc<Progress>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let processor = Arc::new(
        Processor::new(pool, js.clone(), config.limits())
            .members_at_once(config.processor_batch_size),
    );
    let workers = usize::from(config.worker_count);
    let flusher = {
        let processor = processor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let stop = tokio::select! {
                    _ = shutdown.cancelled() => true,
                    _ = tick.tick() => false,
                };
                if let Err(e) = processor.registry().flush_last_seen().await {
                    tracing::warn!(error = %e, "device last-seen times not written; retrying");
                }
                if stop {
                    break;
                }
            }
        })
    };
    let loops = match settings.mqtt_intake {
        Intake::Bridge => vec![(streams::RAW_STREAM, settings.processor_consumer()); workers],
        Intake::Nats => {
            let intake = streams::intake_consumer_as_made(&js, settings).await;
            std::iter::repeat_n((streams::MQTT_STREAM, intake), workers)
                .chain([(streams::RAW_STREAM, settings.processor_consumer())])
                .collect()
        }
    };
    let workers = loops.into_iter().map(|(stream, consumer)| {
        let (processor, js, shutdown) = (processor.clone(), js.clone(), shutdown.clone());
        let progress = progress.clone();
        let batch_size = config.processor_batch_size;
        tokio::spawn(async move {
            consume::run(
                &*processor,
                &js,
                stream,
                consumer,
                batch_size,
                &progress,
                &shutdown,
            )
            .await
        })
    });
    let at_most_once = (settings.mqtt_intake == Intake::Nats).then(|| {
        tokio::spawn(at_most_once::run(
            js.clone(),
            progress.clone(),
            shutdown.clone(),
        ))
    });
    for worker in join_all(workers).await {
        worker??;
    }
    if let Some(task) = at_most_once {
        task.await??;
    }
    flusher.await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_names_why_a_message_can_only_go_to_dead() {
        let limits = PayloadLimits::default();
        let raw = |topic: &str, payload: &str| {
            RawMessage::received(topic.into(), bytes::Bytes::from(payload.to_owned()))
        };
        let ok = raw(
            "gateways/7/plc-1",
            r#"{"d": [{"tag": "AI.0", "value": 1}]}"#,
        );
        let readable = classify(&ok, &limits).expect("readable");
        assert_eq!((readable.gateway_id, readable.device_code), (7, "plc-1"));
        assert_eq!(readable.payload.readings.len(), 1);
        for (topic, payload, reason) in [
            ("gateway/7/x", "{}", DeadReason::BadTopic),
            ("gateways/7/x", "{", DeadReason::BadJson),
            (
                "gateways/7/x",
                r#"{"d": [{"tag": "a\u0000", "value": 1}]}"#,
                DeadReason::Unstorable,
            ),
        ] {
            let refused = classify(&raw(topic, payload), &limits).unwrap_err();
            assert_eq!(refused.0, reason, "{topic} {payload}");
        }
    }
    use bytes::Bytes;

    fn payload(json: &str) -> Payload {
        payload::parse(json.as_bytes(), &PayloadLimits::default()).unwrap()
    }

    #[test]
    fn a_unit_takes_the_device_time_or_the_receive_time() {
        let raw = RawMessage::received("gateways/1/d".into(), Bytes::new());
        let resolved = Resolved {
            device_id: 9,
            tag_ids: vec![4, 5],
        };
        let with_ts = payload(
            r#"{"d":[{"tag":"a","value":1},{"tag":"b","value":true}],"ts":"2017-12-22T08:05:20+0000"}"#,
        );
        let b = unit(&raw, 1, "d".into(), with_ts.clone(), resolved.clone());
        assert_eq!(b.time.to_rfc3339(), "2017-12-22T08:05:20+00:00");
        assert_eq!(b.id, identity::readings_id(raw.id, 1, "d", &with_ts));
        assert_eq!(
            b.readings[1],
            TagReading {
                tag_id: 5,
                tag: "b".into(),
                value: Value::Boolean(true)
            }
        );
        let without = payload(r#"{"d":[{"tag":"a","value":1},{"tag":"b","value":true}]}"#);
        let b = unit(&raw, 1, "d".into(), without, resolved);
        assert_eq!((b.time, b.id), (raw.received_at, raw.id));
    }

    /// The bound [`Processor::outcome`] relies on, with the payloads that grow the most in
    /// READINGS: a JSON value of numbers in exponent form, and many minimal readings with the
    /// largest tag ids. Just under a quarter of the server's limit, the message still fits.
    #[test]
    fn readings_take_under_four_times_their_payload() {
        const MAX_PAYLOAD: usize = 1024 * 1024;
        let raw = RawMessage::received("gateways/1/d".into(), Bytes::new());
        let size = MAX_PAYLOAD / 4;
        let exponents = {
            let (head, tail) = (r#"{"d":[{"tag":"a","value":["#, "]}]}");
            let room = size - head.len() - tail.len();
            let numbers = vec!["1E15"; (room + 1) / 5].join(",");
            format!("{head}{numbers}{}{tail}", " ".repeat(room - numbers.len()))
        };
        assert_eq!(exponents.len(), size);
        let minimal = {
            let readings = vec![r#"{"tag":"a","value":0}"#; 1000].join(",");
            format!(r#"{{"d":[{readings}]}}"#)
        };
        for json in [exponents, minimal] {
            let parsed = payload::parse(json.as_bytes(), &PayloadLimits::default()).unwrap();
            let resolved = Resolved {
                device_id: i64::MAX,
                tag_ids: vec![i64::MAX; parsed.readings.len()],
            };
            let unit = unit(&raw, i32::MAX, "d".repeat(255), parsed, resolved);
            let (packed, _) = ReadingsMessage::pack([&unit]);
            let read = packed[0].payload().len();
            assert!(read < 4 * json.len(), "{read} bytes for {}", json.len());
            if json.len() == size {
                assert!(too_large(raw.clone(), &unit, MAX_PAYLOAD).is_none());
            }
        }
    }

    #[test]
    fn nul_characters_are_unstorable() {
        assert!(unstorable(&payload(r#"{"d":[{"tag":"a","value":"x\u0000y"}]}"#)).is_some());
        assert!(unstorable(&payload(r#"{"d":[{"tag":"a","value":{"k":["\u0000"]}}]}"#)).is_some());
        assert!(unstorable(&payload(r#"{"d":[{"tag":"a","value":"fine"}]}"#)).is_none());
    }
}
