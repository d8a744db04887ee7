//! The publisher: READINGS → Mercure hub.
//!
//! Each [`MessageReadings`] becomes one private update posted to the hub at `MERCURE_URL` (in
//! `dataviz all`, handed to the embedded hub in-process: [`UpdateSink`]), on two topics under
//! `MERCURE_TOPIC_BASE` (default `https://dataviz.local`):
//!
//! | topic                                                | who subscribes                     |
//! |------------------------------------------------------|------------------------------------|
//! | `{base}/gateways/{gateway_id}/devices/{device_id}`   | a view of one device               |
//! | `{base}/gateways/{gateway_id}`                       | a view of every device of a gateway|
//!
//! A subscriber selects them exactly or with templates (`{base}/gateways/{g}/devices/{d}`,
//! `{base}/gateways/{+rest}` for everything); a private update reaches only subscribers whose
//! JWT `mercure.subscribe` claim matches one of the two topics. The ids are the registry's
//! integer ids (as in the admin site's URLs), not the device codes.
//!
//! The update's id is `urn:uuid:<raw message id>`: a redelivered unit carries the same id, so a
//! subscriber (and our hub, which does not dispatch an id twice) sees it once. Its data is JSON:
//!
//! ```json
//! {"id": "0190…", "gateway": 7, "device": {"id": 12, "code": "dev-1"},
//!  "time": "2017-12-22T08:05:20Z",
//!  "readings": [{"tag": "AI.0", "type": "double precision", "value": 12.0}]}
//! ```
//!
//! # Acknowledgements and failures
//! A READINGS message is acknowledged only after the hub accepted the update of each of its
//! units (`200`): a hub that is down loses nothing, the messages wait in READINGS. When only
//! some were accepted, the message comes again whole, and its updates keep their ids. Failures
//! are sorted by [`PublishError`]:
//! - unavailable (no connection, timeout, 5xx, 429): warning, every message not yet published
//!   is handed back with a delay growing with its deliveries, and the consume loop pauses
//!   before its next batch ([`dataviz_core::consume`]);
//! - refused (401, 403, 400...): **also retried, logged at ERROR**. A refusal of our own update
//!   is a configuration problem (wrong key, a `mercure.publish` claim or a hub ACL not covering
//!   the topic base), not a bad message: dead-lettering would throw away every update until an
//!   operator fixes it, while retrying resumes by itself once the configuration is right.
//! - a unit that cannot be read is skipped with an error log (the others of its message are
//!   published), and a message that cannot be read at all is acknowledged with one: the
//!   writer, which reads the same stream, sends it to DEAD; there is nothing to publish.
//!
//! # Ordering and coalescing
//! Updates of one device are posted in stream order, one at a time; devices are posted
//! concurrently (at most `PUBLISHER_CONCURRENCY` requests in flight). The hub embedded in
//! `dataviz all` takes a fetch's updates at once instead, in that order, in as few messages of
//! its stream as they fit ([`dataviz_mercure::Hub::publish_many`]). When the backlog of the
//! consumer reaches `PUBLISHER_COALESCE_BACKLOG` updates (a burst, or catching up after the
//! hub was down), a fetched batch is **coalesced**: only the latest update of each device
//! (by reading time, then stream order) is posted, and the older ones are acknowledged with it.
//! Subscribers then see fewer intermediate values but the current state at once, and the hub
//! is not flooded; nothing is lost for storage (the writer has its own consumer). Below the
//! threshold every update is posted. After an outage, redelivered updates may arrive after
//! newer ones: a live view should order by `time`.

use async_nats::jetstream::{self, consumer::pull};
use dataviz_core::{
    consume::{self, Failure, Settle, Stage, Transient},
    message::{MessageReadings, ReadingsMessage},
    ops::{Progress, metric},
    shutdown::Shutdown,
    streams,
};
use dataviz_mercure::{PublishError, Update, UpdateSink};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Publisher settings. The JWT key is [`dataviz_mercure::MercureKeysConfig`], shared with the
/// embedded hub when both run in one process.
#[derive(Debug, Clone, clap::Args)]
pub struct PublisherConfig {
    /// The hub's publish URL.
    #[arg(
        long,
        env = "MERCURE_URL",
        value_name = "MERCURE_URL",
        default_value = "http://127.0.0.1:3000/.well-known/mercure"
    )]
    pub mercure_url: String,
    /// Base IRI of the topics (`{base}/gateways/{id}` and `{base}/gateways/{id}/devices/{id}`).
    #[arg(
        long,
        env = "MERCURE_TOPIC_BASE",
        value_name = "MERCURE_TOPIC_BASE",
        default_value = "https://dataviz.local"
    )]
    pub mercure_topic_base: String,
    /// READINGS messages fetched at once, at most (each holds the readings of up to one
    /// processor batch of one gateway).
    #[arg(
        long,
        env = "PUBLISHER_BATCH_SIZE",
        value_name = "PUBLISHER_BATCH_SIZE",
        default_value_t = 16
    )]
    pub publisher_batch_size: usize,
    /// Updates posted at once, at most (one device at a time each).
    #[arg(
        long,
        env = "PUBLISHER_CONCURRENCY",
        value_name = "PUBLISHER_CONCURRENCY",
        default_value_t = 16
    )]
    pub publisher_concurrency: usize,
    /// Backlog (updates waiting for the publisher, estimated from the READINGS messages
    /// pending) from which a fetch is coalesced to the latest update per device; 0: never.
    #[arg(
        long,
        env = "PUBLISHER_COALESCE_BACKLOG",
        value_name = "PUBLISHER_COALESCE_BACKLOG",
        default_value_t = 1000
    )]
    pub publisher_coalesce_backlog: u64,
}

impl Default for PublisherConfig {
    /// The defaults `--help` shows.
    fn default() -> Self {
        dataviz_core::config::defaults()
    }
}

/// The device topic and the gateway topic of a unit (one raw message's readings).
pub fn topics(base: &str, unit: &MessageReadings) -> [String; 2] {
    let base = base.trim_end_matches('/');
    let gateway = format!("{base}/gateways/{}", unit.gateway_id);
    [format!("{gateway}/devices/{}", unit.device_id), gateway]
}

/// The update id of a unit.
pub fn update_id(unit: &MessageReadings) -> String {
    format!("urn:uuid:{}", unit.id)
}

/// The update's data (see the crate doc).
pub fn update_data(unit: &MessageReadings) -> serde_json::Value {
    serde_json::to_value(UpdateData::of(unit)).expect("update data serializes")
}

/// The private update of a unit.
pub fn to_update(base: &str, unit: &MessageReadings) -> Update {
    Update {
        topics: topics(base, unit).into(),
        // Written straight to text: no intermediate JSON tree per reading.
        data: serde_json::to_string(&UpdateData::of(unit)).expect("update data serializes"),
        private: true,
        id: Some(update_id(unit)),
        event_type: None,
        retry: None,
    }
}

/// The update's data, as [`update_data`] documents it.
#[derive(serde::Serialize)]
struct UpdateData<'a> {
    id: uuid::Uuid,
    gateway: i32,
    device: DeviceData<'a>,
    time: chrono::DateTime<chrono::Utc>,
    readings: Vec<ReadingData<'a>>,
}

#[derive(serde::Serialize)]
struct DeviceData<'a> {
    id: i64,
    code: &'a str,
}

#[derive(serde::Serialize)]
struct ReadingData<'a> {
    tag: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    value: JsonValue<'a>,
}

/// A reading's value written as plain JSON (`Value::to_json`, without building it).
struct JsonValue<'a>(&'a dataviz_core::value::Value);

impl serde::Serialize for JsonValue<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use dataviz_core::value::Value;
        match self.0 {
            Value::Integer(i) => s.serialize_i64(*i),
            // Stored doubles are finite (JSON has no other); `to_json` writes others as null.
            Value::Double(f) if f.is_finite() => s.serialize_f64(*f),
            Value::Double(_) | Value::Null => s.serialize_unit(),
            Value::Boolean(b) => s.serialize_bool(*b),
            Value::Text(t) => s.serialize_str(t),
            Value::Json(j) => j.serialize(s),
        }
    }
}

impl<'a> UpdateData<'a> {
    fn of(unit: &'a MessageReadings) -> Self {
        UpdateData {
            id: unit.id,
            gateway: unit.gateway_id,
            device: DeviceData {
                id: unit.device_id,
                code: &unit.device_code,
            },
            time: unit.time,
            readings: unit
                .readings
                .iter()
                .map(|r| ReadingData {
                    tag: &r.tag,
                    kind: r.value.stored_type().as_str(),
                    value: JsonValue(&r.value),
                })
                .collect(),
        }
    }
}

/// What to post for a fetch: per device, the indexes of the messages in order, and for
/// each, the indexes of older messages it stands for (coalesced).
fn plan(units: &[(usize, MessageReadings)], coalesce: bool) -> Vec<Vec<(usize, Vec<usize>)>> {
    let mut devices: HashMap<i64, Vec<usize>> = HashMap::new();
    let mut order = Vec::new();
    for (position, (_, unit)) in units.iter().enumerate() {
        devices
            .entry(unit.device_id)
            .or_insert_with(|| {
                order.push(unit.device_id);
                Vec::new()
            })
            .push(position);
    }
    order
        .into_iter()
        .map(|device| {
            let positions = devices.remove(&device).unwrap_or_default();
            if !coalesce || positions.len() < 2 {
                return positions.into_iter().map(|p| (p, Vec::new())).collect();
            }
            // Latest by reading time, then by stream order (later position wins ties).
            let latest = positions
                .iter()
                .copied()
                .max_by_key(|p| (units[*p].1.time, *p))
                .expect("non-empty");
            let rest = positions.into_iter().filter(|p| *p != latest).collect();
            vec![(latest, rest)]
        })
        .collect()
}

/// The publisher stage: READINGS messages to hub updates.
#[derive(Debug)]
pub struct Publisher {
    pub config: PublisherConfig,
    pub sink: UpdateSink,
}

impl Stage for Publisher {
    const NAME: &'static str = "publisher";

    /// Posts the updates of the fetched messages' units: a message is done once the hub
    /// accepted each of its updates, retried otherwise.
    async fn handle(&self, messages: &[jetstream::Message]) -> Vec<Settle> {
        let config = &self.config;
        // Every unit, with the index of its message.
        let mut units = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            if let Ok(parsed) = ReadingsMessage::parse(&message.payload) {
                units.extend(parsed.into_iter().map(|unit| (index, unit)));
                continue;
            }
            // Unit by unit: what can be read is published, the writer dead-letters the rest.
            match ReadingsMessage::parse_each(&message.payload) {
                Ok(parts) => {
                    for part in parts {
                        match part {
                            Ok(unit) => units.push((index, unit)),
                            Err(unreadable) => {
                                tracing::error!(subject = %message.subject, error = %unreadable.error, "a unit of a readings message cannot be read: not published (the writer dead-letters it)");
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(subject = %message.subject, error = %e, "not a readings message: nothing to publish (the writer dead-letters it)");
                }
            }
        }
        // The backlog in units, estimated from the messages pending after these.
        let pending = messages
            .iter()
            .filter_map(|m| m.info().ok().map(|i| i.pending))
            .min()
            .unwrap_or(0);
        let backlog = pending
            .saturating_mul(units.len() as u64)
            .checked_div(messages.len() as u64)
            .unwrap_or(0)
            .saturating_add(units.len() as u64);
        let coalesce =
            config.publisher_coalesce_backlog > 0 && backlog >= config.publisher_coalesce_backlog;
        let plan = plan(&units, coalesce);
        let base = config.mercure_topic_base.as_str();
        let (failed, unsettled) = match &self.sink {
            UpdateSink::Embedded(hub) => {
                self.publish_together(hub, base, &units, plan, messages.len())
                    .await
            }
            UpdateSink::Http(_) => self.publish_each(base, &units, plan, messages.len()).await,
        };
        unsettled
            .into_iter()
            .map(|unsettled| match (&failed, unsettled) {
                (Some(failure), true) => Settle::Retry(failure.clone()),
                _ => Settle::Done,
            })
            .collect()
    }
}

/// A plan of updates ([`plan`]): per device, the position of each unit to publish and of the
/// older ones it stands for.
type Plan = Vec<Vec<(usize, Vec<usize>)>>;

/// What became of a fetch's updates: the first failure, and per message whether one of its
/// updates was not accepted.
type Outcome = (Option<Transient>, Vec<bool>);

impl Publisher {
    /// The embedded hub takes a fetch's updates at once, in as few stream messages as they fit
    /// ([`dataviz_mercure::Hub::publish_many`]): each device's in order, as planned.
    async fn publish_together(
        &self,
        hub: &dataviz_mercure::Hub,
        base: &str,
        units: &[(usize, MessageReadings)],
        plan: Plan,
        messages: usize,
    ) -> Outcome {
        let planned: Vec<(usize, Vec<usize>)> = plan.into_iter().flatten().collect();
        let updates = planned
            .iter()
            .map(|(position, _)| to_update(base, &units[*position].1))
            .collect();
        let results = hub.publish_many(updates).await;
        let mut failed = None;
        let mut unsettled = vec![false; messages];
        let (mut published, mut coalesced) = (0, 0);
        for ((position, older), result) in planned.iter().zip(results) {
            match result {
                Ok(_) => {
                    published += 1;
                    coalesced += older.len() as u64;
                }
                Err(e) => {
                    failed.get_or_insert_with(|| transient(&e.into(), &self.sink));
                    for p in std::iter::once(position).chain(older) {
                        unsettled[units[*p].0] = true;
                    }
                }
            }
        }
        metrics::counter!(metric::PUBLISHER_UPDATES).increment(published);
        metrics::counter!(metric::PUBLISHER_COALESCED).increment(coalesced);
        (failed, unsettled)
    }

    /// A hub over HTTP takes one request per update: each device's in order, one at a time,
    /// devices concurrently (`PUBLISHER_CONCURRENCY`). After the first failure the rest of the
    /// fetch is handed back without trying.
    async fn publish_each(
        &self,
        base: &str,
        units: &[(usize, MessageReadings)],
        plan: Plan,
        messages: usize,
    ) -> Outcome {
        let failed: Mutex<Option<Transient>> = Mutex::new(None);
        let failed_yet = || failed.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        let unsettled: Vec<AtomicBool> = (0..messages).map(|_| AtomicBool::new(false)).collect();
        let devices = futures::stream::iter(plan.into_iter().map(|device| {
            let (failed, unsettled) = (&failed, &unsettled);
            async move {
                for (position, coalesced) in device {
                    let (index, unit) = &units[position];
                    let covered =
                        || std::iter::once(*index).chain(coalesced.iter().map(|p| units[*p].0));
                    if !failed_yet() {
                        match self.sink.publish(to_update(base, unit)).await {
                            Ok(_) => {
                                metrics::counter!(metric::PUBLISHER_UPDATES).increment(1);
                                metrics::counter!(metric::PUBLISHER_COALESCED)
                                    .increment(coalesced.len() as u64);
                                continue;
                            }
                            Err(e) => {
                                let mut first = failed.lock().unwrap_or_else(|e| e.into_inner());
                                first.get_or_insert_with(|| transient(&e, &self.sink));
                            }
                        }
                    }
                    covered().for_each(|i| unsettled[i].store(true, Ordering::Relaxed));
                }
            }
        }))
        .buffer_unordered(self.config.publisher_concurrency.max(1))
        .collect::<Vec<()>>();
        devices.await;
        let failed = failed.into_inner().unwrap_or_else(|e| e.into_inner());
        (
            failed,
            unsettled.into_iter().map(AtomicBool::into_inner).collect(),
        )
    }
}

/// What failed when the hub did not take an update.
fn transient(error: &PublishError, sink: &UpdateSink) -> Transient {
    let failure = match error {
        PublishError::Unavailable(_) => Failure::HubUnavailable,
        PublishError::Refused { .. } => Failure::HubRefused,
    };
    Transient {
        failure,
        error: format!("{}: {error}", sink.describe()),
    }
}

/// Consumes LIVE (READINGS for the live path) until `shutdown`, on the durable `consumer`
/// ([`dataviz_core::streams::StreamSettings::publisher_consumer`]),
/// posting to the hub through `sink`.
pub async fn run(
    config: PublisherConfig,
    consumer: pull::Config,
    js: jetstream::Context,
    sink: UpdateSink,
    progress: &Progress,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let batch_size = config.publisher_batch_size;
    consume::run(
        &Publisher { config, sink },
        &js,
        streams::LIVE_STREAM,
        consumer,
        batch_size,
        progress,
        &shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use dataviz_core::message::TagReading;
    use dataviz_core::value::Value;
    use uuid::Uuid;

    fn unit(device: i64, second: u32) -> MessageReadings {
        MessageReadings {
            raw_seq: None,
            id: Uuid::now_v7(),
            gateway_id: 7,
            device_id: device,
            device_code: format!("dev-{device}"),
            time: Utc.with_ymd_and_hms(2017, 12, 22, 8, 5, second).unwrap(),
            received_at: Utc::now(),
            readings: vec![
                TagReading {
                    tag_id: 1,
                    tag: "AI.0".into(),
                    value: Value::Double(12.0),
                },
                TagReading {
                    tag_id: 2,
                    tag: "flag".into(),
                    value: Value::Null,
                },
            ],
        }
    }

    #[test]
    fn topics_under_the_base() {
        let b = unit(12, 0);
        assert_eq!(
            topics("https://dataviz.local/", &b),
            [
                "https://dataviz.local/gateways/7/devices/12",
                "https://dataviz.local/gateways/7"
            ]
        );
        let update = to_update("https://x.example", &b);
        assert!(update.private);
        assert_eq!(update.id, Some(format!("urn:uuid:{}", b.id)));
        assert_eq!(update.validate(), Ok(()));
    }

    #[test]
    fn data_holds_gateway_device_time_and_typed_readings() {
        let b = unit(12, 20);
        let data = update_data(&b);
        assert_eq!(
            data,
            serde_json::json!({
                "id": b.id,
                "gateway": 7,
                "device": {"id": 12, "code": "dev-12"},
                "time": "2017-12-22T08:05:20Z",
                "readings": [
                    {"tag": "AI.0", "type": "double precision", "value": 12.0},
                    {"tag": "flag", "type": "text", "value": null},
                ],
            })
        );
    }

    #[test]
    fn plans_keep_device_order_and_coalesce_to_the_latest() {
        let units: Vec<_> = [(1, 3), (2, 1), (1, 5), (1, 4), (2, 2)]
            .into_iter()
            .enumerate()
            .map(|(i, (d, s))| (i, unit(d, s)))
            .collect();
        assert_eq!(
            plan(&units, false),
            vec![
                vec![(0, vec![]), (2, vec![]), (3, vec![])],
                vec![(1, vec![]), (4, vec![])]
            ]
        );
        // Device 1: the reading at :05 (position 2) is the latest, even though :04 came after.
        assert_eq!(
            plan(&units, true),
            vec![vec![(2, vec![0, 3])], vec![(4, vec![1])]]
        );
    }
}
