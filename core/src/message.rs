//! What travels on JetStream between the stages.
//!
//! - RAW: the MQTT message as received, payload untouched; topic, receive time and a unique id
//!   in headers ([`RawMessage`]).
//! - READINGS: [`TagReadingsBatch`]es, one per raw message with the registry ids resolved, packed
//!   per gateway and processor batch into JSON arrays ([`ReadingsMessage`]).
//! - DEAD: the raw message again, with the stage and reason that refused it ([`DeadLetter`]).

use crate::value::{DataType, Value};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

/// JetStream's deduplication header.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// The raw message's id, a UUIDv7 given by the bridge; it names the message in every stage.
pub const HEADER_ID: &str = "Dataviz-Id";
/// The MQTT topic, percent-encoded (MQTT topics may hold any UTF-8; NATS headers may not).
pub const HEADER_TOPIC: &str = "Dataviz-Topic";
/// When the bridge received the message, RFC 3339 with nanoseconds.
pub const HEADER_RECEIVED_AT: &str = "Dataviz-Received-At";
/// Dead letters: the stage that refused the message.
pub const HEADER_DEAD_STAGE: &str = "Dataviz-Dead-Stage";
/// Dead letters: a short stable kind (`unknown_gateway`, `bad_json`, ...).
pub const HEADER_DEAD_REASON: &str = "Dataviz-Dead-Reason";
/// Dead letters: the full error, for a human.
pub const HEADER_DEAD_ERROR: &str = "Dataviz-Dead-Error";

/// Characters escaped in header values: controls (CR and LF would end the header), `%` itself,
/// spaces (NATS trims them at both ends of a value), and everything outside ASCII.
const HEADER_ESCAPES: &AsciiSet = &CONTROLS.add(b'%').add(b' ');

/// A message as the bridge received it from MQTT.
#[derive(Debug, Clone, PartialEq)]
pub struct RawMessage {
    pub id: Uuid,
    pub topic: String,
    pub received_at: DateTime<Utc>,
    pub payload: Bytes,
}

/// A RAW or DEAD message whose headers are missing or unreadable: it was not written by a
/// Dataviz stage.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("message header {header}: {problem}")]
pub struct HeaderError {
    pub header: &'static str,
    pub problem: String,
}

impl RawMessage {
    /// A message received now, with a fresh id.
    pub fn received(topic: String, payload: Bytes) -> RawMessage {
        RawMessage {
            id: Uuid::now_v7(),
            topic,
            received_at: Utc::now(),
            payload,
        }
    }

    /// The RAW subject: per gateway when the topic names one, so that a replay can read one
    /// gateway alone.
    pub fn subject(&self) -> String {
        crate::streams::raw_subject(crate::topic::gateway_of(&self.topic))
    }

    /// Headers carrying the topic, receive time and id; `dedup_id` becomes `Nats-Msg-Id`.
    pub fn headers(&self, dedup_id: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(dedup_id) = dedup_id {
            headers.insert(HEADER_MSG_ID, dedup_id);
        }
        headers.insert(HEADER_ID, self.id.to_string().as_str());
        headers.insert(
            HEADER_TOPIC,
            utf8_percent_encode(&self.topic, HEADER_ESCAPES)
                .to_string()
                .as_str(),
        );
        headers.insert(
            HEADER_RECEIVED_AT,
            self.received_at
                .to_rfc3339_opts(SecondsFormat::Nanos, true)
                .as_str(),
        );
        headers
    }

    /// Reads a message written by [`RawMessage::headers`].
    pub fn from_parts(
        headers: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Result<RawMessage, HeaderError> {
        let get = |header: &'static str| {
            headers
                .and_then(|h| h.get(header))
                .map(|v| v.as_str())
                .ok_or(HeaderError {
                    header,
                    problem: "missing".into(),
                })
        };
        let id = get(HEADER_ID)?;
        let id = Uuid::parse_str(id).map_err(|e| HeaderError {
            header: HEADER_ID,
            problem: e.to_string(),
        })?;
        let topic = percent_decode_str(get(HEADER_TOPIC)?)
            .decode_utf8()
            .map_err(|e| HeaderError {
                header: HEADER_TOPIC,
                problem: e.to_string(),
            })?
            .into_owned();
        let received_at = DateTime::parse_from_rfc3339(get(HEADER_RECEIVED_AT)?)
            .map_err(|e| HeaderError {
                header: HEADER_RECEIVED_AT,
                problem: e.to_string(),
            })?
            .with_timezone(&Utc);
        Ok(RawMessage {
            id,
            topic,
            received_at,
            payload,
        })
    }
}

/// The readings of one raw message, with the registry ids resolved: what the writer stores and
/// the publisher sends. Serialized as JSON on READINGS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagReadingsBatch {
    /// The raw message's id: the writer stores each id once, whatever the redeliveries.
    pub id: Uuid,
    pub gateway_id: i32,
    pub device_id: i64,
    pub device_code: String,
    /// The device's `ts`, or the bridge's receive time when the device sent none.
    pub time: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub readings: Vec<TagReading>,
}

/// One tag's value in a batch: `{"tag_id": 4, "tag": "AI.0", "type": "integer", "value": 7}`.
///
/// Read by hand rather than with `#[serde(flatten)]`, which buffers every reading into an
/// intermediate tree before typing it: the writer and the publisher read every reading of
/// every message, and this is the bulk of their parsing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TagReading {
    pub tag_id: i64,
    pub tag: String,
    #[serde(flatten)]
    pub value: Value,
}

impl<'de> Deserialize<'de> for TagReading {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TagReadingVisitor)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum TagReadingField {
    TagId,
    Tag,
    Type,
    Value,
    #[serde(other)]
    Other,
}

/// Reads a reading's `type`: a [`DataType`] name, or `null` for a null value (`None`, as
/// [`Value::data_type`] gives it).
struct ReadingType;

impl<'de> serde::de::DeserializeSeed<'de> for ReadingType {
    type Value = Option<DataType>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for ReadingType {
    type Value = Option<DataType>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a data type name or \"null\"")
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
        match name {
            "null" => Ok(None),
            name => DataType::from_pg_name(name)
                .map(Some)
                .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(name), &self)),
        }
    }
}

/// A value read before its type was known.
fn read_json<E: serde::de::Error>(
    kind: Option<DataType>,
    json: serde_json::Value,
) -> Result<Value, E> {
    let name = kind.map_or("null", DataType::as_str);
    let wrong = |json: &serde_json::Value| E::custom(format!("{json} is not of type {name}"));
    Ok(match kind {
        Some(DataType::Integer) => Value::Integer(json.as_i64().ok_or_else(|| wrong(&json))?),
        Some(DataType::Double) => Value::Double(json.as_f64().ok_or_else(|| wrong(&json))?),
        Some(DataType::Boolean) => Value::Boolean(json.as_bool().ok_or_else(|| wrong(&json))?),
        Some(DataType::Text) => match json {
            serde_json::Value::String(s) => Value::Text(s),
            other => return Err(wrong(&other)),
        },
        Some(DataType::Jsonb) => Value::Json(json),
        None => Value::Null,
    })
}

/// Reads a reading's `value` straight into its type, once `type` is known.
struct TypedValue(Option<DataType>);

impl<'de> serde::de::DeserializeSeed<'de> for TypedValue {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Ok(match self.0 {
            Some(DataType::Integer) => Value::Integer(i64::deserialize(d)?),
            Some(DataType::Double) => Value::Double(f64::deserialize(d)?),
            Some(DataType::Boolean) => Value::Boolean(bool::deserialize(d)?),
            Some(DataType::Text) => Value::Text(String::deserialize(d)?),
            Some(DataType::Jsonb) => Value::Json(serde_json::Value::deserialize(d)?),
            None => {
                serde::de::IgnoredAny::deserialize(d)?;
                Value::Null
            }
        })
    }
}

struct TagReadingVisitor;

impl<'de> serde::de::Visitor<'de> for TagReadingVisitor {
    type Value = TagReading;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a tag reading")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TagReading, A::Error> {
        use serde::de::Error;
        let (mut tag_id, mut tag, mut kind, mut value) = (None, None, None, None);
        // A `value` before its `type` (not how we write them) is held as JSON until the end.
        let mut untyped = None;
        while let Some(field) = map.next_key()? {
            match field {
                TagReadingField::TagId => tag_id = Some(map.next_value()?),
                TagReadingField::Tag => tag = Some(map.next_value()?),
                TagReadingField::Type => kind = Some(map.next_value_seed(ReadingType)?),
                TagReadingField::Value => match kind {
                    Some(kind) => value = Some(map.next_value_seed(TypedValue(kind))?),
                    None => untyped = Some(map.next_value::<serde_json::Value>()?),
                },
                TagReadingField::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        let kind = kind.ok_or_else(|| A::Error::missing_field("type"))?;
        let value = match (value, untyped, kind) {
            (Some(value), _, _) => value,
            (None, Some(json), kind) => read_json(kind, json)?,
            (None, None, None) => Value::Null,
            (None, None, _) => return Err(A::Error::missing_field("value")),
        };
        Ok(TagReading {
            tag_id: tag_id.ok_or_else(|| A::Error::missing_field("tag_id"))?,
            tag: tag.ok_or_else(|| A::Error::missing_field("tag"))?,
            value,
        })
    }
}

impl TagReadingsBatch {
    pub fn to_json(&self) -> Bytes {
        // Serializing plain data with string keys cannot fail.
        Bytes::from(serde_json::to_vec(self).expect("TagReadingsBatch serializes"))
    }
}

/// Most bytes of batches packed into one READINGS message; a larger batch travels alone. A
/// quarter of NATS's default `max_payload` (1 MiB), so that a message always fits.
pub const READINGS_MESSAGE_BYTES: usize = 256 * 1024;

/// One READINGS message: batches of one gateway from one processor batch, a JSON array.
///
/// One message per processor batch rather than per raw message divides the READINGS work of
/// the stream and of its consumers (a store, two deliveries and two acks per message) by the
/// batch size; the writer still stores each batch once by its id, whatever the packing.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingsMessage {
    pub gateway_id: i32,
    /// The ids of the batches, in order.
    pub ids: Vec<Uuid>,
    json: Vec<u8>,
}

impl ReadingsMessage {
    fn open(gateway_id: i32) -> ReadingsMessage {
        ReadingsMessage {
            gateway_id,
            ids: Vec::new(),
            json: vec![b'['],
        }
    }

    /// The READINGS subject: per gateway.
    pub fn subject(&self) -> String {
        crate::streams::readings_subject(self.gateway_id)
    }

    /// The deduplication id names the batches it holds: a processor that dies before its ack
    /// and packs the same batches again publishes them once.
    pub fn headers(&self) -> HeaderMap {
        let mut ids = Vec::with_capacity(16 * self.ids.len());
        for id in &self.ids {
            ids.extend_from_slice(id.as_bytes());
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            HEADER_MSG_ID,
            format!("readings:{:032x}", xxhash_rust::xxh3::xxh3_128(&ids)).as_str(),
        );
        headers
    }

    pub fn payload(&self) -> Bytes {
        let mut json = self.json.clone();
        json.push(b']');
        Bytes::from(json)
    }

    /// Packs batches into READINGS messages, per gateway, in order, each holding up to
    /// [`READINGS_MESSAGE_BYTES`] of JSON. Returns the messages and, for each batch, the index
    /// of the message holding it.
    pub fn pack<'a>(
        batches: impl IntoIterator<Item = &'a TagReadingsBatch>,
    ) -> (Vec<ReadingsMessage>, Vec<usize>) {
        let mut messages: Vec<ReadingsMessage> = Vec::new();
        let mut homes = Vec::new();
        // The message still open for each gateway.
        let mut open: std::collections::HashMap<i32, usize> = Default::default();
        let mut scratch = Vec::new();
        for batch in batches {
            scratch.clear();
            serde_json::to_writer(&mut scratch, batch).expect("TagReadingsBatch serializes");
            let fits =
                |m: &ReadingsMessage| m.json.len() + 1 + scratch.len() < READINGS_MESSAGE_BYTES;
            let home = match open.get(&batch.gateway_id) {
                Some(&i) if messages[i].ids.is_empty() || fits(&messages[i]) => i,
                _ => {
                    messages.push(ReadingsMessage::open(batch.gateway_id));
                    open.insert(batch.gateway_id, messages.len() - 1);
                    messages.len() - 1
                }
            };
            let message = &mut messages[home];
            if !message.ids.is_empty() {
                message.json.push(b',');
            }
            message.json.extend_from_slice(&scratch);
            message.ids.push(batch.id);
            homes.push(home);
        }
        (messages, homes)
    }

    /// Reads a READINGS message: an array of batches, or a single batch (one per message, as
    /// READINGS carried them before they were packed).
    pub fn parse(payload: &[u8]) -> Result<Vec<TagReadingsBatch>, serde_json::Error> {
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Ok(vec![serde_json::from_slice(payload)?]),
            _ => serde_json::from_slice(payload),
        }
    }
}

/// Why a message went to DEAD. The one table of names: DEAD's subjects and headers, the
/// `dataviz_dead_letters_total` metric, `dataviz dlq --reason`, the dead-letters page and the
/// README all use [`DeadReason::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// The topic is not `gateways/<gateway id>/<device code>`.
    BadTopic,
    /// Over `MAX_PAYLOAD_BYTES`, or over what the NATS server accepts.
    Oversized,
    /// The payload is not UTF-8.
    NotUtf8,
    /// The payload is not JSON.
    BadJson,
    /// JSON, but not the shape of a readings payload.
    BadPayload,
    /// Over `MAX_READINGS_PER_MESSAGE` readings.
    TooManyReadings,
    /// A `ts` this system cannot read.
    BadTs,
    /// A value PostgreSQL cannot store (a NUL character).
    Unstorable,
    /// No gateway with the topic's id.
    UnknownGateway,
    /// A message in RAW that Dataviz did not write.
    ForeignMessage,
    /// A READINGS message the writer cannot read, or a batch PostgreSQL refused.
    BadBatch,
}

impl DeadReason {
    /// Every reason, in the order the README lists them.
    pub const ALL: [DeadReason; 11] = [
        DeadReason::BadTopic,
        DeadReason::BadJson,
        DeadReason::BadPayload,
        DeadReason::BadTs,
        DeadReason::NotUtf8,
        DeadReason::Oversized,
        DeadReason::TooManyReadings,
        DeadReason::UnknownGateway,
        DeadReason::Unstorable,
        DeadReason::ForeignMessage,
        DeadReason::BadBatch,
    ];

    /// The stable name: a subject token, a header value, a metric label.
    pub fn name(self) -> &'static str {
        match self {
            DeadReason::BadTopic => "bad_topic",
            DeadReason::Oversized => "oversized",
            DeadReason::NotUtf8 => "not_utf8",
            DeadReason::BadJson => "bad_json",
            DeadReason::BadPayload => "bad_payload",
            DeadReason::TooManyReadings => "too_many_readings",
            DeadReason::BadTs => "bad_ts",
            DeadReason::Unstorable => "unstorable",
            DeadReason::UnknownGateway => "unknown_gateway",
            DeadReason::ForeignMessage => "foreign_message",
            DeadReason::BadBatch => "bad_batch",
        }
    }

    /// The reason named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<DeadReason> {
        DeadReason::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A message a stage refused for good, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub raw: RawMessage,
    /// `bridge`, `processor`, ...
    pub stage: String,
    /// Why: also the last subject token.
    pub reason: DeadReason,
    /// The whole error, for a human.
    pub error: String,
    /// The sequence of the refused message in the stream it was read from, when it was read
    /// from one. With the raw id it makes the deduplication id: a redelivery of the same stored
    /// message is refused once, a re-queued copy (a new sequence) is refused again. Not stored.
    pub source_seq: Option<u64>,
}

impl DeadLetter {
    pub fn subject(&self) -> String {
        crate::streams::dead_subject(&self.stage, self.reason.name())
    }

    /// Stores the letter in DEAD and, once stored, says so ([`DeadLetter::stored`]).
    pub async fn store(
        &self,
        js: &async_nats::jetstream::Context,
    ) -> Result<(), async_nats::jetstream::context::PublishError> {
        crate::streams::publish_stored(
            js,
            self.subject(),
            self.headers(),
            self.raw.payload.clone(),
        )
        .await?;
        self.stored();
        Ok(())
    }

    /// Says that DEAD stored this letter: the one log line (in the `mqtt` channel) and the one
    /// count (`dataviz_dead_letters_total{stage, reason}`) of a dead letter, whichever stage
    /// made it. Call it once DEAD acknowledged the letter.
    pub fn stored(&self) {
        tracing::error!(
            target: crate::MQTT_LOG_TARGET,
            stage = %self.stage,
            reason = %self.reason,
            topic = %self.raw.topic,
            id = %self.raw.id,
            error = %self.error,
            "message refused: stored in DEAD"
        );
        metrics::counter!(
            crate::ops::metric::DEAD_LETTERS,
            "stage" => self.stage.clone(),
            "reason" => self.reason.name()
        )
        .increment(1);
    }

    /// The raw message's headers plus the stage and reason. The deduplication id is derived
    /// from the raw id, so a redelivered refusal is stored once.
    pub fn headers(&self) -> HeaderMap {
        let dedup = format!(
            "dead:{}:{}:{}",
            self.stage,
            self.raw.id,
            self.source_seq.unwrap_or_default()
        );
        let mut headers = self.raw.headers(Some(&dedup));
        headers.insert(HEADER_DEAD_STAGE, self.stage.as_str());
        headers.insert(HEADER_DEAD_REASON, self.reason.name());
        let error: String = self.error.chars().take(2000).collect();
        headers.insert(
            HEADER_DEAD_ERROR,
            utf8_percent_encode(&error, HEADER_ESCAPES)
                .to_string()
                .as_str(),
        );
        headers
    }

    /// Reads a dead letter back from its stored headers and payload.
    pub fn from_parts(
        headers: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Result<DeadLetter, HeaderError> {
        let raw = RawMessage::from_parts(headers, payload)?;
        let get = |header: &'static str| {
            headers
                .and_then(|h| h.get(header))
                .map(|v| v.as_str().to_owned())
                .ok_or(HeaderError {
                    header,
                    problem: "missing".into(),
                })
        };
        let reason = get(HEADER_DEAD_REASON)?;
        let reason = DeadReason::from_name(&reason).ok_or(HeaderError {
            header: HEADER_DEAD_REASON,
            problem: format!("{reason:?} is not a reason Dataviz writes"),
        })?;
        Ok(DeadLetter {
            raw,
            stage: get(HEADER_DEAD_STAGE)?,
            reason,
            error: percent_decode_str(&get(HEADER_DEAD_ERROR)?)
                .decode_utf8_lossy()
                .into_owned(),
            source_seq: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_messages_round_trip_through_headers() {
        let raw = RawMessage::received(
            "gateways/7/ dév\r\nice %20 ".into(),
            Bytes::from_static(b"\xff not json"),
        );
        let headers = raw.headers(Some("abc"));
        assert_eq!(headers.get(HEADER_MSG_ID).unwrap().as_str(), "abc");
        assert!(!headers.get(HEADER_TOPIC).unwrap().as_str().contains('\n'));
        let back = RawMessage::from_parts(Some(&headers), raw.payload.clone()).unwrap();
        assert_eq!(back, raw);
        assert_eq!(raw.subject(), "dataviz.raw.7");
    }

    #[test]
    fn foreign_messages_are_named_as_such() {
        let err = RawMessage::from_parts(None, Bytes::new()).unwrap_err();
        assert_eq!(err.header, HEADER_ID);
    }

    #[test]
    fn dead_letters_round_trip() {
        let dead = DeadLetter {
            raw: RawMessage::received("bad topic".into(), Bytes::from_static(b"{}")),
            stage: "processor".into(),
            reason: DeadReason::BadTopic,
            error: "topic \"bad topic\" is not of the form\nx".into(),
            source_seq: None,
        };
        assert_eq!(dead.subject(), "dataviz.dead.processor.bad_topic");
        let back = DeadLetter::from_parts(Some(&dead.headers()), dead.raw.payload.clone()).unwrap();
        assert_eq!(back, dead);
    }

    #[test]
    fn every_reason_has_one_name() {
        let names: std::collections::HashSet<_> =
            DeadReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), DeadReason::ALL.len());
        for reason in DeadReason::ALL {
            assert_eq!(DeadReason::from_name(reason.name()), Some(reason));
        }
        assert_eq!(DeadReason::from_name("bad"), None);
    }

    #[test]
    fn the_readme_lists_every_reason() {
        let readme = include_str!("../../README.md");
        let listed = readme
            .split_once("Dead-letter reasons:")
            .expect("the README's list of reasons")
            .1
            .split("\n\n")
            .next()
            .unwrap();
        let names: Vec<&str> = listed.split('`').skip(1).step_by(2).collect();
        let expected: Vec<&str> = DeadReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn batches_serialize_every_value_type() {
        let batch = TagReadingsBatch {
            id: Uuid::now_v7(),
            gateway_id: 1,
            device_id: 2,
            device_code: "d".into(),
            time: Utc::now(),
            received_at: Utc::now(),
            readings: vec![
                TagReading {
                    tag_id: 1,
                    tag: "i".into(),
                    value: Value::Integer(3),
                },
                TagReading {
                    tag_id: 2,
                    tag: "f".into(),
                    value: Value::Double(1.5),
                },
                TagReading {
                    tag_id: 3,
                    tag: "j".into(),
                    value: Value::Json(serde_json::json!({"a": [1]})),
                },
                TagReading {
                    tag_id: 4,
                    tag: "n".into(),
                    value: Value::Null,
                },
            ],
        };
        let json: serde_json::Value = serde_json::from_slice(&batch.to_json()).unwrap();
        assert_eq!(
            json["readings"][1],
            serde_json::json!({"tag_id": 2, "tag": "f", "type": "double precision", "value": 1.5})
        );
        let back: TagReadingsBatch = serde_json::from_slice(&batch.to_json()).unwrap();
        assert_eq!(back, batch);
    }

    fn small_batch(gateway_id: i32, readings: usize) -> TagReadingsBatch {
        TagReadingsBatch {
            id: Uuid::now_v7(),
            gateway_id,
            device_id: 2,
            device_code: "d".into(),
            time: Utc::now(),
            received_at: Utc::now(),
            readings: (0..readings)
                .map(|i| TagReading {
                    tag_id: i as i64,
                    tag: format!("tag-{i}"),
                    value: Value::Integer(i as i64),
                })
                .collect(),
        }
    }

    #[test]
    fn batches_are_packed_per_gateway_in_order_and_read_back() {
        let batches: Vec<_> = [1, 2, 1, 1, 2].map(|g| small_batch(g, 3)).into();
        let (messages, homes) = ReadingsMessage::pack(&batches);
        assert_eq!(homes, [0, 1, 0, 0, 1]);
        assert_eq!(messages[0].subject(), "dataviz.readings.1");
        assert_eq!(messages[1].subject(), "dataviz.readings.2");
        let back = ReadingsMessage::parse(&messages[0].payload()).unwrap();
        assert_eq!(back, [0, 2, 3].map(|i| batches[i].clone()));
        assert_eq!(messages[0].ids, [0, 2, 3].map(|i| batches[i].id));
        // The deduplication id names the batches: the same ones give the same id.
        let again = ReadingsMessage::pack([&batches[0], &batches[2], &batches[3]]).0;
        assert_eq!(
            again[0].headers().get(HEADER_MSG_ID),
            messages[0].headers().get(HEADER_MSG_ID)
        );
        let fewer = ReadingsMessage::pack([&batches[0], &batches[2]]).0;
        assert_ne!(
            fewer[0].headers().get(HEADER_MSG_ID),
            messages[0].headers().get(HEADER_MSG_ID)
        );
        // A single batch, as READINGS carried them before packing, still reads.
        assert_eq!(
            ReadingsMessage::parse(&batches[1].to_json()).unwrap(),
            [batches[1].clone()]
        );
        assert_eq!(ReadingsMessage::parse(b"[]").unwrap(), []);
        assert!(ReadingsMessage::parse(b"{\"id\": 1}").is_err());
        assert!(ReadingsMessage::parse(b"not json").is_err());
    }

    #[test]
    fn packed_messages_stay_within_their_size_and_a_big_batch_travels_alone() {
        // About 30 KiB each: eight fit in 256 KiB, not nine.
        let batches: Vec<_> = (0..20).map(|_| small_batch(1, 1000)).collect();
        let big = small_batch(1, 20_000);
        let all: Vec<_> = batches.iter().chain([&big]).chain(&batches[..1]).collect();
        let (messages, homes) = ReadingsMessage::pack(all.iter().copied());
        for m in &messages {
            assert!(m.payload().len() <= READINGS_MESSAGE_BYTES || m.ids.len() == 1);
        }
        assert!(messages.len() >= 4, "{} messages", messages.len());
        let big_home = homes[20];
        assert_eq!(messages[big_home].ids, [big.id]);
        assert!(messages[big_home].payload().len() > READINGS_MESSAGE_BYTES);
        let read: usize = messages
            .iter()
            .map(|m| ReadingsMessage::parse(&m.payload()).unwrap().len())
            .sum();
        assert_eq!(read, 22);
    }

    #[test]
    fn readings_read_in_any_field_order_and_refuse_a_value_of_another_type() {
        let read = |json: &str| serde_json::from_str::<TagReading>(json);
        let reading = |value| TagReading {
            tag_id: 1,
            tag: "t".into(),
            value,
        };
        assert_eq!(
            read(r#"{"value": 2.5, "extra": [1], "type": "double precision", "tag": "t", "tag_id": 1}"#)
                .unwrap(),
            reading(Value::Double(2.5))
        );
        assert_eq!(
            read(r#"{"tag_id": 1, "tag": "t", "type": "null"}"#).unwrap(),
            reading(Value::Null)
        );
        assert_eq!(
            read(r#"{"tag_id": 1, "tag": "t", "value": {"a": 1}, "type": "jsonb"}"#).unwrap(),
            reading(Value::Json(serde_json::json!({"a": 1})))
        );
        assert!(read(r#"{"tag_id": 1, "tag": "t", "type": "integer", "value": "7"}"#).is_err());
        assert!(read(r#"{"tag_id": 1, "tag": "t", "value": "7", "type": "integer"}"#).is_err());
        assert!(read(r#"{"tag_id": 1, "tag": "t", "type": "integer"}"#).is_err());
        assert!(read(r#"{"tag_id": 1, "type": "integer", "value": 7}"#).is_err());
    }
}
