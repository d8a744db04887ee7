//! What travels on JetStream between the stages.
//!
//! - RAW: the MQTT message as received, payload untouched; topic, receive time and a unique id
//!   in headers ([`RawMessage`]).
//! - READINGS: one [`TagReadingsBatch`] per raw message, JSON, the registry ids resolved.
//! - DEAD: the raw message again, with the stage and reason that refused it ([`DeadLetter`]).

use crate::value::Value;
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

/// The `type` of a reading, as [`Value`] writes it.
#[derive(Debug, Clone, Copy, Deserialize)]
enum ValueKind {
    #[serde(rename = "integer")]
    Integer,
    #[serde(rename = "double precision")]
    Double,
    #[serde(rename = "boolean")]
    Boolean,
    #[serde(rename = "text")]
    Text,
    #[serde(rename = "jsonb")]
    Json,
    #[serde(rename = "null")]
    Null,
}

impl ValueKind {
    /// A value read before its type was known.
    fn read_json<E: serde::de::Error>(self, json: serde_json::Value) -> Result<Value, E> {
        let wrong = |json: &serde_json::Value| E::custom(format!("{json} is not of type {self:?}"));
        Ok(match self {
            ValueKind::Integer => Value::Integer(json.as_i64().ok_or_else(|| wrong(&json))?),
            ValueKind::Double => Value::Double(json.as_f64().ok_or_else(|| wrong(&json))?),
            ValueKind::Boolean => Value::Boolean(json.as_bool().ok_or_else(|| wrong(&json))?),
            ValueKind::Text => match json {
                serde_json::Value::String(s) => Value::Text(s),
                other => return Err(wrong(&other)),
            },
            ValueKind::Json => Value::Json(json),
            ValueKind::Null => Value::Null,
        })
    }
}

/// Reads a reading's `value` straight into its type, once `type` is known.
struct TypedValue(ValueKind);

impl<'de> serde::de::DeserializeSeed<'de> for TypedValue {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Ok(match self.0 {
            ValueKind::Integer => Value::Integer(i64::deserialize(d)?),
            ValueKind::Double => Value::Double(f64::deserialize(d)?),
            ValueKind::Boolean => Value::Boolean(bool::deserialize(d)?),
            ValueKind::Text => Value::Text(String::deserialize(d)?),
            ValueKind::Json => Value::Json(serde_json::Value::deserialize(d)?),
            ValueKind::Null => {
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
                TagReadingField::Type => kind = Some(map.next_value::<ValueKind>()?),
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
            (None, Some(json), kind) => kind.read_json(json)?,
            (None, None, ValueKind::Null) => Value::Null,
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
    /// The READINGS subject: per gateway and device.
    pub fn subject(&self) -> String {
        crate::streams::readings_subject(self.gateway_id, self.device_id)
    }

    /// Headers of the READINGS message: its id doubles as the deduplication id.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_MSG_ID, self.id.to_string().as_str());
        headers
    }

    pub fn to_json(&self) -> Bytes {
        // Serializing plain data with string keys cannot fail.
        Bytes::from(serde_json::to_vec(self).expect("TagReadingsBatch serializes"))
    }
}

/// A message a stage refused for good, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub raw: RawMessage,
    /// `bridge`, `processor`, ...
    pub stage: String,
    /// A short stable kind, also the last subject token.
    pub reason: String,
    /// The whole error, for a human.
    pub error: String,
    /// The sequence of the refused message in the stream it was read from, when it was read
    /// from one. With the raw id it makes the deduplication id: a redelivery of the same stored
    /// message is refused once, a re-queued copy (a new sequence) is refused again. Not stored.
    pub source_seq: Option<u64>,
}

impl DeadLetter {
    pub fn subject(&self) -> String {
        crate::streams::dead_subject(&self.stage, &self.reason)
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
        headers.insert(HEADER_DEAD_REASON, self.reason.as_str());
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
        Ok(DeadLetter {
            raw,
            stage: get(HEADER_DEAD_STAGE)?,
            reason: get(HEADER_DEAD_REASON)?,
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
            reason: "bad_topic".into(),
            error: "topic \"bad topic\" is not of the form\nx".into(),
            source_seq: None,
        };
        assert_eq!(dead.subject(), "dataviz.dead.processor.bad_topic");
        let back = DeadLetter::from_parts(Some(&dead.headers()), dead.raw.payload.clone()).unwrap();
        assert_eq!(back, dead);
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
