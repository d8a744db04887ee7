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
use chrono::{DateTime, Utc};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use std::borrow::Cow;
use std::fmt::Write as _;
use thiserror::Error;
use uuid::Uuid;

/// JetStream's deduplication header.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// A raw message's id, receive time and topic, in one header: `<id> <seconds>.<nanoseconds>
/// <topic>`, the time since the Unix epoch, the topic percent-encoded (MQTT topics may hold any
/// UTF-8; NATS headers may not, and NATS trims spaces, which the encoding escapes, so the
/// topic is all that follows the second space). The id is a UUIDv7 given at receipt; it names
/// the RAW message in every stage (its readings' id may be derived from its content:
/// [`crate::identity`]). One header rather than three: on the bridge's path every header is a
/// map entry and two allocations on each side of NATS, for every message.
pub const HEADER_RAW: &str = "Dataviz-Raw";
/// Earlier versions wrote the id, topic and receive time (RFC 3339) as three headers, which
/// RAW and DEAD may still hold: read, never written.
pub const HEADER_ID: &str = "Dataviz-Id";
pub const HEADER_TOPIC: &str = "Dataviz-Topic";
pub const HEADER_RECEIVED_AT: &str = "Dataviz-Received-At";
/// Dead letters: the stage that refused the message.
pub const HEADER_DEAD_STAGE: &str = "Dataviz-Dead-Stage";
/// Dead letters: a short stable kind (`unknown_gateway`, `bad_json`, ...).
pub const HEADER_DEAD_REASON: &str = "Dataviz-Dead-Reason";
/// Dead letters: the full error, for a human.
pub const HEADER_DEAD_ERROR: &str = "Dataviz-Dead-Error";
/// Dead letters holding only the beginning of their payload: the whole payload's size; the
/// whole is in the object store `dead_payloads` ([`DeadLetter::whole_name`]).
pub const HEADER_DEAD_WHOLE_SIZE: &str = "Dataviz-Dead-Whole-Size";
/// Dead letters read from a stream: the refused message's sequence there
/// ([`DeadLetter::source_seq`]).
pub const HEADER_DEAD_SOURCE_SEQ: &str = "Dataviz-Dead-Source-Seq";

/// Characters escaped in header values: controls (CR and LF would end the header), `%` itself,
/// spaces (NATS trims them at both ends of a value), and everything outside ASCII.
const HEADER_ESCAPES: &AsciiSet = &CONTROLS.add(b'%').add(b' ');

/// The bytes `text` takes as a header value, escaped as [`RawMessage::headers`] and
/// [`DeadLetter::headers`] escape it: a byte outside ASCII takes three.
pub fn header_len(text: &str) -> usize {
    utf8_percent_encode(text, HEADER_ESCAPES)
        .map(str::len)
        .sum()
}

/// The most bytes a topic takes in a header, escaped. A topic Dataviz reads takes under 1 KiB
/// (`gateways/<id>/<device>`, device codes of 255 bytes at most), and NATS refuses a message
/// whose headers take over 64 KiB, where MQTT allows 65,535 bytes of topic: the bridge refuses
/// a longer one ([`crate::dead::unfit`]), and a dead letter keeps its beginning ([`DeadLetter::headers`]).
pub const MAX_TOPIC_HEADER: usize = 16 * 1024;

/// The beginning of `topic` whose escaped form takes at most [`MAX_TOPIC_HEADER`] bytes; `None`
/// when the whole does.
fn topic_cut(topic: &str) -> Option<&str> {
    if topic.len() * 3 <= MAX_TOPIC_HEADER || header_len(topic) <= MAX_TOPIC_HEADER {
        return None;
    }
    let mut taken = 0;
    let end = topic
        .char_indices()
        .find(|&(at, c)| {
            taken += header_len(&topic[at..at + c.len_utf8()]);
            taken > MAX_TOPIC_HEADER
        })
        .map_or(topic.len(), |(at, _)| at);
    Some(&topic[..end])
}

/// The most characters of a dead letter's error its header keeps.
const MAX_ERROR_CHARS: usize = 2000;

/// What a dead letter's header keeps of `error`: its first [`MAX_ERROR_CHARS`] characters.
pub(crate) fn error_kept(error: &str) -> &str {
    error
        .char_indices()
        .nth(MAX_ERROR_CHARS)
        .map_or(error, |(at, _)| &error[..at])
}

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

/// The value of an optional header that holds `what` (a number, say), read as `T`.
fn parsed<T: std::str::FromStr>(
    headers: Option<&HeaderMap>,
    header: &'static str,
    what: &str,
) -> Result<Option<T>, HeaderError> {
    let Some(value) = headers.and_then(|h| h.get(header)) else {
        return Ok(None);
    };
    value.as_str().parse().map(Some).map_err(|_| HeaderError {
        header,
        problem: format!("{:?} is not {what}", value.as_str()),
    })
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

    /// Headers carrying the id, receive time and topic ([`HEADER_RAW`]); `dedup_id` becomes
    /// `Nats-Msg-Id`.
    pub fn headers(&self, dedup_id: Option<&str>) -> HeaderMap {
        // Built once per message on the bridge's path: names known at compile time, the value
        // written once into a string of its final size.
        const MSG_ID: HeaderName = HeaderName::from_static(HEADER_MSG_ID);
        const RAW: HeaderName = HeaderName::from_static(HEADER_RAW);
        let mut headers = HeaderMap::new();
        if let Some(dedup_id) = dedup_id {
            headers.insert(MSG_ID, dedup_id);
        }
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let mut raw = String::with_capacity(id.len() + 32 + self.topic.len());
        raw.push_str(self.id.hyphenated().encode_lower(&mut id));
        let (secs, nanos) = (
            self.received_at.timestamp(),
            self.received_at.timestamp_subsec_nanos(),
        );
        let _ = write!(raw, " {secs}.{nanos:09} ");
        raw.extend(utf8_percent_encode(&self.topic, HEADER_ESCAPES));
        headers.insert(RAW, raw);
        headers
    }

    /// Reads a message written by [`RawMessage::headers`], or by an earlier version.
    pub fn from_parts(
        headers: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Result<RawMessage, HeaderError> {
        let problem = |header: &'static str, problem: String| HeaderError { header, problem };
        let get = |header: &'static str| headers.and_then(|h| h.get(header)).map(|v| v.as_str());
        // Each field with the header it came from, for the error.
        let ((id, id_header), (topic, topic_header), received_at) = match get(HEADER_RAW) {
            Some(value) => {
                let mut fields = value.splitn(3, ' ');
                let (Some(id), Some(time), Some(topic)) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    return Err(problem(
                        HEADER_RAW,
                        format!("{value:?} is not `<id> <seconds>.<nanoseconds> <topic>`"),
                    ));
                };
                let received_at = time
                    .split_once('.')
                    .and_then(|(secs, nanos)| {
                        let nanos = (nanos.len() == 9).then(|| nanos.parse().ok()).flatten()?;
                        DateTime::from_timestamp(secs.parse().ok()?, nanos)
                    })
                    .ok_or_else(|| problem(HEADER_RAW, format!("{time:?} is not a time")))?;
                ((id, HEADER_RAW), (topic, HEADER_RAW), received_at)
            }
            // Written by an earlier version; neither header: not a Dataviz message at all.
            None => {
                let missing = |header| problem(header, "missing".into());
                let Some(id) = get(HEADER_ID) else {
                    return Err(missing(HEADER_RAW));
                };
                let topic = get(HEADER_TOPIC).ok_or_else(|| missing(HEADER_TOPIC))?;
                let received_at =
                    get(HEADER_RECEIVED_AT).ok_or_else(|| missing(HEADER_RECEIVED_AT))?;
                let received_at = DateTime::parse_from_rfc3339(received_at)
                    .map_err(|e| problem(HEADER_RECEIVED_AT, e.to_string()))?
                    .with_timezone(&Utc);
                ((id, HEADER_ID), (topic, HEADER_TOPIC), received_at)
            }
        };
        let id = Uuid::parse_str(id).map_err(|e| problem(id_header, e.to_string()))?;
        let topic = percent_decode_str(topic)
            .decode_utf8()
            .map_err(|e| problem(topic_header, e.to_string()))?
            .into_owned();
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
    /// message is refused once, a re-queued copy (a new sequence) is refused again.
    pub source_seq: Option<u64>,
    /// When the payload here is only the beginning of the original (too large for DEAD), the
    /// original's size: the whole is kept in the object store
    /// [`DEAD_PAYLOADS_BUCKET`](crate::streams::DEAD_PAYLOADS_BUCKET), under
    /// [`DeadLetter::whole_name`].
    pub whole_size: Option<u64>,
}

impl DeadLetter {
    /// The name its whole payload is kept under ([`DeadLetter::whole_size`]): the raw id, and
    /// the source sequence when there is one. A message re-queued keeps its raw id, and may be
    /// refused again with its payload cut again while the re-queue removes the first letter's
    /// whole payload: the second letter's, read from another sequence, is another object.
    pub fn whole_name(&self) -> String {
        match self.source_seq {
            None => self.raw.id.to_string(),
            Some(seq) => format!("{}.{seq}", self.raw.id),
        }
    }

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
        // A topic too long for a header (never one Dataviz reads) keeps its beginning, and
        // the error says so.
        let (mut headers, error) = match topic_cut(&self.raw.topic) {
            None => (
                self.raw.headers(Some(&dedup)),
                Cow::Borrowed(self.error.as_str()),
            ),
            Some(kept) => {
                let raw = RawMessage {
                    topic: kept.to_owned(),
                    ..self.raw.clone()
                };
                let error = format!(
                    "the topic takes {} bytes, the first {} kept: {}",
                    self.raw.topic.len(),
                    kept.len(),
                    self.error
                );
                (raw.headers(Some(&dedup)), Cow::Owned(error))
            }
        };
        headers.insert(HEADER_DEAD_STAGE, self.stage.as_str());
        headers.insert(HEADER_DEAD_REASON, self.reason.name());
        if let Some(size) = self.whole_size {
            headers.insert(HEADER_DEAD_WHOLE_SIZE, size.to_string().as_str());
        }
        if let Some(seq) = self.source_seq {
            headers.insert(HEADER_DEAD_SOURCE_SEQ, seq.to_string().as_str());
        }
        headers.insert(
            HEADER_DEAD_ERROR,
            utf8_percent_encode(error_kept(&error), HEADER_ESCAPES)
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
        let whole_size = parsed(headers, HEADER_DEAD_WHOLE_SIZE, "a size")?;
        // Written since whole payloads are kept per letter: without it, a letter's whole payload
        // is under the raw id, as `whole_name` gives it.
        let source_seq = parsed(headers, HEADER_DEAD_SOURCE_SEQ, "a sequence")?;
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
            source_seq,
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
        assert_eq!(headers.len(), 2);
        let value = headers.get(HEADER_RAW).unwrap().as_str();
        assert!(
            !value.contains('\n') && value.ends_with("ice%20%2520%20"),
            "{value}"
        );
        let back = RawMessage::from_parts(Some(&headers), raw.payload.clone()).unwrap();
        assert_eq!(back, raw);
        assert_eq!(raw.subject(), "dataviz.raw.7");
        // Times before the epoch and at its second boundaries come back alike.
        for at in ["1969-12-31T23:59:59.999999999Z", "2026-12-03T09:00:00Z"] {
            let at = DateTime::parse_from_rfc3339(at)
                .unwrap()
                .with_timezone(&Utc);
            let raw = RawMessage {
                received_at: at,
                ..raw.clone()
            };
            let back = RawMessage::from_parts(Some(&raw.headers(None)), raw.payload.clone());
            assert_eq!(back.unwrap(), raw);
        }
    }

    #[test]
    fn raw_messages_of_earlier_versions_still_read() {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_ID, "0193d9a1-2b3c-7d4e-8f00-112233445566");
        headers.insert(HEADER_TOPIC, "gateways/7/%20d%C3%A9v");
        headers.insert(HEADER_RECEIVED_AT, "2026-12-03T09:00:00.123456789Z");
        let raw = RawMessage::from_parts(Some(&headers), Bytes::from_static(b"{}")).unwrap();
        assert_eq!(raw.id.to_string(), "0193d9a1-2b3c-7d4e-8f00-112233445566");
        assert_eq!(raw.topic, "gateways/7/ dév");
        assert_eq!(raw.received_at.timestamp_subsec_nanos(), 123_456_789);
        headers.insert(HEADER_RECEIVED_AT, "yesterday");
        let err = RawMessage::from_parts(Some(&headers), Bytes::new()).unwrap_err();
        assert_eq!(err.header, HEADER_RECEIVED_AT);
    }

    #[test]
    fn a_raw_header_out_of_shape_is_named() {
        for value in [
            "0193d9a1-2b3c-7d4e-8f00-112233445566 1733216400.000000000",
            "0193d9a1-2b3c-7d4e-8f00-112233445566 1733216400.5 gateways/7/a",
            "0193d9a1-2b3c-7d4e-8f00-112233445566 soon.000000000 gateways/7/a",
            "not-an-id 1733216400.000000000 gateways/7/a",
            "0193d9a1-2b3c-7d4e-8f00-112233445566 1733216400.000000000 %FF",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(HEADER_RAW, value);
            let err = RawMessage::from_parts(Some(&headers), Bytes::new()).unwrap_err();
            assert_eq!(err.header, HEADER_RAW, "{value}");
        }
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
        assert_eq!((err.header, err.problem.as_str()), (HEADER_RAW, "missing"));
    }

    #[test]
    fn dead_letters_round_trip() {
        let dead = DeadLetter {
            raw: RawMessage::received("bad topic".into(), Bytes::from_static(b"{}")),
            stage: "processor".into(),
            reason: DeadReason::BadTopic,
            error: "topic \"bad topic\" is not of the form\nx".into(),
            source_seq: Some(42),
            whole_size: Some(5_000_000),
        };
        assert_eq!(dead.subject(), "dataviz.dead.processor.bad_topic");
        let back = DeadLetter::from_parts(Some(&dead.headers()), dead.raw.payload.clone()).unwrap();
        assert_eq!(back, dead);
        // Numbers that do not read are named, with the header they came in.
        for (header, what) in [
            (HEADER_DEAD_WHOLE_SIZE, "a size"),
            (HEADER_DEAD_SOURCE_SEQ, "a sequence"),
        ] {
            let mut headers = dead.headers();
            headers.insert(header, "5 MB");
            let error = DeadLetter::from_parts(Some(&headers), dead.raw.payload.clone());
            assert_eq!(
                error,
                Err(HeaderError {
                    header,
                    problem: format!("\"5 MB\" is not {what}"),
                })
            );
        }
    }
}
