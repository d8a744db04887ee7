//! What travels on JetStream between the stages, with its headers.
//!
//! - RAW: the MQTT message as received, payload untouched; topic, receive time and a unique id
//!   in headers ([`RawMessage`]).
//! - READINGS: [`MessageReadings`]es, one per raw message with the registry ids resolved, packed
//!   per gateway and processor fetch into one message, encoded in binary ([`ReadingsMessage`],
//!   from the model crate; [`readings_headers`] gives its headers).
//! - DEAD: the raw message again, with the stage and reason that refused it ([`DeadLetter`]).

pub use dataviz_model::readings::{
    MessageReadings, READINGS_MESSAGE_BYTES, ReadingsMessage, TagReading, Unreadable,
};
pub use dataviz_model::reason::DeadReason;

use async_nats::HeaderMap;
use async_nats::header::HeaderName;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use std::borrow::Cow;
use thiserror::Error;
use uuid::Uuid;

/// JetStream's deduplication header.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// The raw message's id, a UUIDv7 given by the bridge at receipt; it names the RAW message in
/// every stage (its readings' id may be derived from its content: [`crate::identity`]).
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
/// Dead letters holding only the beginning of their payload: the whole payload's size; the
/// whole is in the object store `dead_payloads`, under the raw id.
pub const HEADER_DEAD_WHOLE_SIZE: &str = "Dataviz-Dead-Whole-Size";

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

/// A time as JetStream gives it ([`time`]), as Dataviz keeps it ([`chrono`]).
pub fn chrono_time(t: time::OffsetDateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX))
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

    /// A message nats-server's MQTT listener stored in its stream (`$MQTT_msgs`), read from
    /// that stream: `subject` is the stream's, `seq` and `stored_at` its place and time there.
    /// Its receive time is the time the broker stored it, and its id is made of both (a UUIDv7
    /// of that time whose random bits are the sequence), so that every delivery of the message,
    /// however late, has the same id. `None` for a subject outside that stream.
    pub fn stored_by_broker(
        subject: &str,
        seq: u64,
        stored_at: DateTime<Utc>,
        payload: Bytes,
    ) -> Option<RawMessage> {
        let subject = subject.strip_prefix(crate::streams::MQTT_SUBJECT_PREFIX)?;
        let millis = u64::try_from(stored_at.timestamp_millis()).unwrap_or(0);
        // The version and variant bits overwrite the top bits of each half: the sub-millisecond
        // microseconds (under 1,000) and the sequence (under 2^62) lose nothing.
        let mut random = [0u8; 10];
        let micros = (stored_at.timestamp_subsec_micros() % 1000) as u16;
        random[..2].copy_from_slice(&micros.to_be_bytes());
        random[2..].copy_from_slice(&seq.to_be_bytes());
        Some(RawMessage {
            id: uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid(),
            topic: mqtt_topic(subject),
            received_at: stored_at,
            payload,
        })
    }

    /// The raw message a stream holds at `seq`, stored at `stored_at` under `subject`: one
    /// nats-server's MQTT listener stored ([`RawMessage::stored_by_broker`]), or one a Dataviz
    /// stage stored in RAW with its headers ([`RawMessage::from_parts`]).
    pub fn stored(
        subject: &str,
        seq: u64,
        stored_at: DateTime<Utc>,
        headers: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Result<RawMessage, HeaderError> {
        match RawMessage::stored_by_broker(subject, seq, stored_at, payload.clone()) {
            Some(raw) => Ok(raw),
            None => RawMessage::from_parts(headers, payload),
        }
    }

    /// The id its readings are stored under ([`crate::identity::readings_id`]), when its topic
    /// and payload can be read (whatever their size).
    pub fn readings_id(&self) -> Option<Uuid> {
        let topic = crate::topic::parse(&self.topic).ok()?;
        let limits = crate::payload::PayloadLimits {
            max_bytes: usize::MAX,
            max_readings: usize::MAX,
        };
        let payload = crate::payload::parse(&self.payload, &limits).ok()?;
        Some(crate::identity::readings_id(
            self.id,
            topic.gateway_id,
            topic.device_code,
            &payload,
        ))
    }

    /// The RAW subject: per gateway when the topic names one, so that a replay can read one
    /// gateway alone.
    pub fn subject(&self) -> String {
        crate::streams::raw_subject(crate::topic::gateway_of(&self.topic))
    }

    /// Headers carrying the topic, receive time and id; `dedup_id` becomes `Nats-Msg-Id`.
    pub fn headers(&self, dedup_id: Option<&str>) -> HeaderMap {
        // Built once per message on the bridge's path: names known at compile time, values
        // moved in as they are made rather than formatted and copied again.
        const MSG_ID: HeaderName = HeaderName::from_static(HEADER_MSG_ID);
        const ID: HeaderName = HeaderName::from_static(HEADER_ID);
        const TOPIC: HeaderName = HeaderName::from_static(HEADER_TOPIC);
        const RECEIVED_AT: HeaderName = HeaderName::from_static(HEADER_RECEIVED_AT);
        let mut headers = HeaderMap::new();
        if let Some(dedup_id) = dedup_id {
            headers.insert(MSG_ID, dedup_id);
        }
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        headers.insert(ID, &*self.id.hyphenated().encode_lower(&mut id));
        let topic: Cow<'_, str> = utf8_percent_encode(&self.topic, HEADER_ESCAPES).into();
        headers.insert(TOPIC, topic.into_owned());
        headers.insert(
            RECEIVED_AT,
            self.received_at.to_rfc3339_opts(SecondsFormat::Nanos, true),
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

/// The MQTT topic of a NATS subject, as nats-server's MQTT listener maps one to the other: a
/// topic level separator `/` is `.` in the subject, a `.` in a level is `//`, and an empty level
/// (a leading, trailing or doubled `/`) is marked with a `/` beside its `.`. Byte by byte, as
/// nats-server does it: `.` and `/` are never part of a longer UTF-8 character.
pub fn mqtt_topic(subject: &str) -> String {
    let subject = subject.as_bytes();
    let mut topic = Vec::with_capacity(subject.len());
    let mut i = 0;
    while i < subject.len() {
        match subject[i] {
            b'/' => match subject.get(i + 1) {
                Some(b'.') => {
                    topic.push(b'/');
                    i += 1;
                }
                Some(b'/') => {
                    topic.push(b'.');
                    i += 1;
                }
                _ => {}
            },
            b'.' => topic.push(b'/'),
            byte => topic.push(byte),
        }
        i += 1;
    }
    String::from_utf8(topic).expect("only ASCII bytes replaced")
}

/// The headers of a READINGS message: its deduplication id.
pub fn readings_headers(message: &ReadingsMessage, scope: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_MSG_ID, message.dedup_id_in(scope).as_str());
    headers
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
    /// When the payload here is only the beginning of the original (too large for DEAD), the
    /// original's size: the whole is kept in the object store
    /// [`DEAD_PAYLOADS_BUCKET`](crate::streams::DEAD_PAYLOADS_BUCKET) under the raw id.
    pub whole_size: Option<u64>,
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
        if let Some(size) = self.whole_size {
            headers.insert(HEADER_DEAD_WHOLE_SIZE, size.to_string().as_str());
        }
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
        let whole_size = match headers.and_then(|h| h.get(HEADER_DEAD_WHOLE_SIZE)) {
            None => None,
            Some(size) => Some(size.as_str().parse().map_err(|_| HeaderError {
                header: HEADER_DEAD_WHOLE_SIZE,
                problem: format!("{:?} is not a size", size.as_str()),
            })?),
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
            whole_size,
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
    fn topics_come_back_from_the_subjects_nats_server_made_of_them() {
        // Subjects as nats-server makes them of topics (server/mqtt.go,
        // mqttToNATSSubjectConversion), each read back to its topic.
        for (subject, topic) in [
            ("gateways.7.plc-1", "gateways/7/plc-1"),
            ("gateways.7.plc//1", "gateways/7/plc.1"),
            ("/.gateways.7.x", "/gateways/7/x"),
            ("gateways./.7", "gateways//7"),
            ("gateways.7./", "gateways/7/"),
            ("gateways.7.dév", "gateways/7/dév"),
        ] {
            assert_eq!(mqtt_topic(subject), topic, "{subject}");
        }
    }

    #[test]
    fn a_message_stored_by_the_broker_has_one_id_per_place_in_its_stream() {
        let at = DateTime::parse_from_rfc3339("2026-12-02T07:00:00.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        let read = |seq| {
            RawMessage::stored_by_broker("$MQTT.msgs.gateways.7.a", seq, at, Bytes::new()).unwrap()
        };
        let (first, again, next) = (read(1 << 40), read(1 << 40), read((1 << 40) + 1));
        assert_eq!(first, again);
        assert_ne!(first.id, next.id);
        assert_eq!(first.topic, "gateways/7/a");
        assert_eq!(first.received_at, at);
        assert_eq!(first.id.get_version_num(), 7);
        let (secs, nanos) = first.id.get_timestamp().unwrap().to_unix();
        assert_eq!((secs, nanos / 1_000_000), (at.timestamp() as u64, 123));
        assert!(RawMessage::stored_by_broker("gateways.7.a", 1, at, Bytes::new()).is_none());
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
            whole_size: Some(5_000_000),
        };
        assert_eq!(dead.subject(), "dataviz.dead.processor.bad_topic");
        let back = DeadLetter::from_parts(Some(&dead.headers()), dead.raw.payload.clone()).unwrap();
        assert_eq!(back, dead);
    }
}
