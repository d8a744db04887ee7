//! READINGS: [`MessageReadings`]es, one per raw message with the registry ids resolved,
//! packed per gateway and processor fetch into JSON arrays ([`ReadingsMessage`]).

use crate::value::{DataType, Value};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The readings of one raw message, with the registry ids resolved: what the writer stores and
/// the publisher sends. Serialized as JSON on READINGS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageReadings {
    /// The message's id ([`crate::identity::readings_id`]): the writer stores each id once,
    /// whatever the copies.
    pub id: Uuid,
    pub gateway_id: i32,
    pub device_id: i64,
    pub device_code: String,
    /// The device's `ts`, or the bridge's receive time when the device sent none.
    pub time: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub readings: Vec<TagReading>,
    /// The raw message's sequence in RAW, when it was read from there: a later stage that
    /// refuses the unit finds the original topic and payload by it, for its dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_seq: Option<u64>,
}

/// One tag's value in a unit: `{"tag_id": 4, "tag": "AI.0", "type": "integer", "value": 7}`.
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

impl MessageReadings {
    pub fn to_json(&self) -> Bytes {
        // Serializing plain data with string keys cannot fail.
        Bytes::from(serde_json::to_vec(self).expect("MessageReadings serializes"))
    }

    /// A device payload that the processor reads back into this unit (the same tags, values
    /// and time): what a dead letter carries when the original payload is gone.
    pub fn to_payload(&self) -> Bytes {
        let d: Vec<serde_json::Value> = self
            .readings
            .iter()
            .map(|r| serde_json::json!({"tag": r.tag, "value": r.value.to_json()}))
            .collect();
        let payload = serde_json::json!({"d": d, "ts": self.time.to_rfc3339()});
        Bytes::from(serde_json::to_vec(&payload).expect("a payload serializes"))
    }
}

/// A unit of a READINGS message that cannot be read, with what could be read of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    /// Its JSON, as it travelled.
    pub json: String,
    /// Why it cannot be read.
    pub error: String,
    /// Its id and RAW sequence, when they can be read: where its original is.
    pub id: Option<Uuid>,
    pub raw_seq: Option<u64>,
}

/// Most bytes of units packed into one READINGS message; a larger unit travels alone. A
/// quarter of NATS's default `max_payload` (1 MiB), so that a message always fits.
pub const READINGS_MESSAGE_BYTES: usize = 256 * 1024;

/// One READINGS message: units of one gateway from one processor fetch, a JSON array.
///
/// One message per processor fetch rather than per raw message divides the READINGS work of
/// the stream and of its consumers (a store, two deliveries and two acks per message) by the
/// fetch size; the writer still stores each unit once by its id, whatever the packing.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingsMessage {
    pub gateway_id: i32,
    /// The ids of the units, in order.
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

    /// The deduplication id (JetStream's `Nats-Msg-Id`) names the units it holds: a
    /// processor that dies before its ack and packs the same units again publishes them once.
    pub fn dedup_id(&self) -> String {
        self.dedup_id_in(None)
    }

    /// [`dedup_id`](Self::dedup_id) within `scope`, the name of who publishes: a replay
    /// publishes units again on purpose, so its messages are told from the live path's and
    /// from another replay's (READINGS would otherwise drop, within its window, a message of
    /// the same units as one it stored: rows deleted by hand would not come back), and a replay
    /// resumed publishes its own once.
    pub fn dedup_id_in(&self, scope: Option<&str>) -> String {
        let mut ids = Vec::with_capacity(16 * self.ids.len());
        for id in &self.ids {
            ids.extend_from_slice(id.as_bytes());
        }
        let hash = xxhash_rust::xxh3::xxh3_128(&ids);
        match scope {
            None => format!("readings:{hash:032x}"),
            Some(scope) => format!("readings:{scope}:{hash:032x}"),
        }
    }

    pub fn payload(&self) -> Bytes {
        let mut json = self.json.clone();
        json.push(b']');
        Bytes::from(json)
    }

    /// Packs units into READINGS messages, per gateway, in order, each holding up to
    /// [`READINGS_MESSAGE_BYTES`] of JSON. Returns the messages and, for each unit, the index
    /// of the message holding it.
    pub fn pack<'a>(
        units: impl IntoIterator<Item = &'a MessageReadings>,
    ) -> (Vec<ReadingsMessage>, Vec<usize>) {
        let mut messages: Vec<ReadingsMessage> = Vec::new();
        let mut homes = Vec::new();
        // The message still open for each gateway.
        let mut open: std::collections::HashMap<i32, usize> = Default::default();
        let mut scratch = Vec::new();
        for unit in units {
            scratch.clear();
            serde_json::to_writer(&mut scratch, unit).expect("MessageReadings serializes");
            let fits =
                |m: &ReadingsMessage| m.json.len() + 1 + scratch.len() < READINGS_MESSAGE_BYTES;
            let home = match open.get(&unit.gateway_id) {
                Some(&i) if messages[i].ids.is_empty() || fits(&messages[i]) => i,
                _ => {
                    messages.push(ReadingsMessage::open(unit.gateway_id));
                    open.insert(unit.gateway_id, messages.len() - 1);
                    messages.len() - 1
                }
            };
            let message = &mut messages[home];
            if !message.ids.is_empty() {
                message.json.push(b',');
            }
            message.json.extend_from_slice(&scratch);
            message.ids.push(unit.id);
            homes.push(home);
        }
        (messages, homes)
    }

    /// Reads a READINGS message: an array of units, or a single unit (one per message, as
    /// READINGS carried them before they were packed).
    pub fn parse(payload: &[u8]) -> Result<Vec<MessageReadings>, serde_json::Error> {
        // Checked as UTF-8 once, then read as text: from bytes, serde_json checks each string
        // on its own, a fifth of the reading (4.97 against 4.04 µs per unit of ten readings).
        let Ok(text) = std::str::from_utf8(payload) else {
            // Its error says where.
            return serde_json::from_slice(payload);
        };
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Ok(vec![serde_json::from_str(text)?]),
            _ => serde_json::from_str(text),
        }
    }

    /// Reads a READINGS message unit by unit, for when [`parse`](Self::parse) fails: a unit
    /// that cannot be read does not take its neighbours with it. `Err` only when the message
    /// is not a JSON array (or a single unit) at all. Reading a unit's bounds has no depth
    /// limit (serde_json skips a raw value without recursion), so any unit is found.
    pub fn parse_each(
        payload: &[u8],
    ) -> Result<Vec<Result<MessageReadings, Unreadable>>, serde_json::Error> {
        let parts: Vec<&serde_json::value::RawValue> =
            match payload.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b'{') => vec![serde_json::from_slice(payload)?],
                _ => serde_json::from_slice(payload)?,
            };
        /// What can be read of a unit: its id and RAW sequence, skipping the rest.
        #[derive(Deserialize)]
        struct Ids {
            id: Option<Uuid>,
            raw_seq: Option<u64>,
        }
        Ok(parts
            .into_iter()
            .map(|part| {
                serde_json::from_str(part.get()).map_err(|e| {
                    let ids: Option<Ids> = serde_json::from_str(part.get()).ok();
                    Unreadable {
                        json: part.get().to_owned(),
                        error: e.to_string(),
                        id: ids.as_ref().and_then(|i| i.id),
                        raw_seq: ids.and_then(|i| i.raw_seq),
                    }
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_serialize_every_value_type() {
        let unit = MessageReadings {
            raw_seq: None,
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
        let json: serde_json::Value = serde_json::from_slice(&unit.to_json()).unwrap();
        assert_eq!(
            json["readings"][1],
            serde_json::json!({"tag_id": 2, "tag": "f", "type": "double precision", "value": 1.5})
        );
        let back: MessageReadings = serde_json::from_slice(&unit.to_json()).unwrap();
        assert_eq!(back, unit);
    }

    fn small_unit(gateway_id: i32, readings: usize) -> MessageReadings {
        MessageReadings {
            raw_seq: None,
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
    fn units_are_packed_per_gateway_in_order_and_read_back() {
        let units: Vec<_> = [1, 2, 1, 1, 2].map(|g| small_unit(g, 3)).into();
        let (messages, homes) = ReadingsMessage::pack(&units);
        assert_eq!(homes, [0, 1, 0, 0, 1]);
        assert_eq!(messages[0].gateway_id, 1);
        assert_eq!(messages[1].gateway_id, 2);
        let back = ReadingsMessage::parse(&messages[0].payload()).unwrap();
        assert_eq!(back, [0, 2, 3].map(|i| units[i].clone()));
        assert_eq!(messages[0].ids, [0, 2, 3].map(|i| units[i].id));
        // The deduplication id names the units: the same ones give the same id.
        let again = ReadingsMessage::pack([&units[0], &units[2], &units[3]]).0;
        assert_eq!(again[0].dedup_id(), messages[0].dedup_id());
        let fewer = ReadingsMessage::pack([&units[0], &units[2]]).0;
        assert_ne!(fewer[0].dedup_id(), messages[0].dedup_id());
        // A replay's messages are its own.
        let replay = messages[0].dedup_id_in(Some("replay_1"));
        assert_ne!(replay, messages[0].dedup_id());
        assert_eq!(replay, again[0].dedup_id_in(Some("replay_1")));
        assert_ne!(replay, messages[0].dedup_id_in(Some("replay_2")));
        // A single unit, as READINGS carried them before packing, still reads.
        assert_eq!(
            ReadingsMessage::parse(&units[1].to_json()).unwrap(),
            [units[1].clone()]
        );
        assert_eq!(ReadingsMessage::parse(b"[]").unwrap(), []);
        assert!(ReadingsMessage::parse(b"{\"id\": 1}").is_err());
        assert!(ReadingsMessage::parse(b"not json").is_err());
        // Bytes that are not UTF-8 (no processor writes them): refused, not misread.
        let mut payload = messages[0].payload().to_vec();
        let at = payload.windows(6).position(|w| w == b"tag-0\"").unwrap();
        payload[at] = 0xff;
        let error = ReadingsMessage::parse(&payload).unwrap_err();
        assert!(error.to_string().contains("unicode"), "{error}");
    }

    #[test]
    fn packed_messages_stay_within_their_size_and_a_big_unit_travels_alone() {
        // About 30 KiB each: eight fit in 256 KiB, not nine.
        let units: Vec<_> = (0..20).map(|_| small_unit(1, 1000)).collect();
        let big = small_unit(1, 20_000);
        let all: Vec<_> = units.iter().chain([&big]).chain(&units[..1]).collect();
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
