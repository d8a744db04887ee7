//! An update: what a publisher posts and a subscriber receives, its form encoding (the publish
//! request body), the binary encoding the `jetstream` transport stores, and its server-sent-event
//! encoding.
//!
//! Validation follows the reference hub: at least one topic and at most [`MAX_TOPICS`]; `retry`
//! an unsigned integer; no CR, LF or NUL in `id` or `type` (they would let a publisher inject
//! SSE fields); no topic inside `/.well-known/mercure` (reserved for the hub's own events).

use bytes::Bytes;
use thiserror::Error;

/// The most topics one update may name (a subscription's limit is `MERCURE_MAX_TOPICS`).
pub const MAX_TOPICS: usize = 1000;

/// Topics containing this are the hub's own; publishers may not forge them.
pub const RESERVED_TOPIC_PART: &str = "/.well-known/mercure";

/// One update.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Update {
    /// Every topic the update belongs to (the first is its canonical topic, the others
    /// alternates). A subscriber receives it when any of them matches its selectors.
    pub topics: Vec<String>,
    pub data: String,
    /// Private updates go only to subscribers whose JWT allows one of their topics.
    pub private: bool,
    /// The event id; the hub generates a `urn:uuid:` one when the publisher gives none.
    pub id: Option<String>,
    /// The SSE event type.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// The SSE reconnection delay, in milliseconds.
    pub retry: Option<u64>,
}

/// Why an update was refused; [`UpdateError::forbidden`] tells 403 from 400.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UpdateError {
    #[error("Missing \"topic\" parameter")]
    MissingTopic,
    #[error("too many topics in update (more than {MAX_TOPICS})")]
    TooManyTopics,
    #[error("Invalid \"retry\" parameter")]
    InvalidRetry,
    #[error("\"id\" field contains a forbidden control character")]
    InvalidId,
    #[error("\"type\" field contains a forbidden control character")]
    InvalidType,
    #[error("{0:?}: topic value references the reserved \"/.well-known/mercure\" namespace")]
    ReservedTopic(String),
    /// Larger than the stream of updates takes (NATS `max_payload`).
    #[error("update too large: {0}")]
    TooLarge(String),
}

impl UpdateError {
    /// A forbidden topic (403) rather than a malformed request (400).
    pub fn forbidden(&self) -> bool {
        matches!(self, UpdateError::ReservedTopic(_))
    }
}

fn has_control(s: &str) -> bool {
    s.contains(['\r', '\n', '\0'])
}

impl Update {
    /// What the update weighs in memory, near enough: its data, topics and id.
    pub fn weight(&self) -> usize {
        self.data.len()
            + self.topics.iter().map(String::len).sum::<usize>()
            + self.id.as_ref().map_or(0, String::len)
            + self.event_type.as_ref().map_or(0, String::len)
            + std::mem::size_of::<Update>()
    }
    /// A public update on `topics`.
    pub fn new(topics: Vec<String>, data: impl Into<String>) -> Update {
        Update {
            topics,
            data: data.into(),
            ..Default::default()
        }
    }

    /// Reads a publish request body (`application/x-www-form-urlencoded`): `topic` (repeated),
    /// `data`, `private` (present means private, whatever its value), `id`, `type`, `retry`.
    /// Only the form is checked here; see [`Update::validate`] for the rest.
    pub fn from_form(body: &[u8]) -> Result<Update, UpdateError> {
        let mut update = Update::default();
        let (mut data, mut retry) = (None, None);
        for (key, value) in form_urlencoded::parse(body) {
            // Go's `PostForm.Get` takes the first value of a field; so do we.
            match &*key {
                "topic" => update.topics.push(value.into_owned()),
                "data" if data.is_none() => data = Some(value.into_owned()),
                "private" => update.private = true,
                "id" if update.id.is_none() => update.id = Some(value.into_owned()),
                "type" if update.event_type.is_none() => {
                    update.event_type = Some(value.into_owned())
                }
                "retry" if retry.is_none() => retry = Some(value.into_owned()),
                _ => {}
            }
        }
        if update.topics.is_empty() {
            return Err(UpdateError::MissingTopic);
        }
        if update.topics.len() > MAX_TOPICS {
            return Err(UpdateError::TooManyTopics);
        }
        update.data = data.unwrap_or_default();
        update.id = update.id.filter(|id| !id.is_empty());
        update.event_type = update.event_type.filter(|t| !t.is_empty());
        update.retry = match retry.as_deref() {
            None | Some("") => None,
            Some(r) => Some(r.parse::<u64>().map_err(|_| UpdateError::InvalidRetry)?),
        };
        Ok(update)
    }

    /// The publish request body for this update.
    pub fn to_form(&self) -> String {
        let mut form = form_urlencoded::Serializer::new(String::new());
        for topic in &self.topics {
            form.append_pair("topic", topic);
        }
        form.append_pair("data", &self.data);
        if self.private {
            form.append_pair("private", "on");
        }
        if let Some(id) = &self.id {
            form.append_pair("id", id);
        }
        if let Some(t) = &self.event_type {
            form.append_pair("type", t);
        }
        if let Some(retry) = self.retry {
            form.append_pair("retry", &retry.to_string());
        }
        form.finish()
    }

    /// The update as the `jetstream` transport stores it: its postcard encoding, its data as
    /// it is. The line of JSON that earlier versions stored ([`Update::from_json_line`])
    /// escaped every quote of JSON data and was read back character by character. (The
    /// encoding is its fields in order: none may be skipped when serialized.)
    pub fn to_stored(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("an update encodes")
    }

    /// An update as [`Update::to_stored`] stores it, all of it.
    pub fn from_stored(bytes: &[u8]) -> Result<Update, String> {
        match postcard::take_from_bytes(bytes) {
            Ok((update, [])) => Ok(update),
            Ok((_, rest)) => Err(format!("{} bytes past the update's end", rest.len())),
            Err(e) => Err(format!("not an update: {e}")),
        }
    }

    /// An update as earlier versions stored it: one line of JSON (serde_json escapes every
    /// newline inside a string).
    pub fn from_json_line(line: &[u8]) -> Result<Update, serde_json::Error> {
        // Checked as UTF-8 once, then read as text, as `ReadingsMessage::parse` does.
        match std::str::from_utf8(line) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(line),
        }
    }

    /// Checks what would let a publisher forge events or inject SSE fields.
    pub fn validate(&self) -> Result<(), UpdateError> {
        if self.topics.is_empty() {
            return Err(UpdateError::MissingTopic);
        }
        if self.topics.len() > MAX_TOPICS {
            return Err(UpdateError::TooManyTopics);
        }
        if let Some(t) = self.topics.iter().find(|t| t.contains(RESERVED_TOPIC_PART)) {
            return Err(UpdateError::ReservedTopic(t.clone()));
        }
        if self.id.as_deref().is_some_and(has_control) {
            return Err(UpdateError::InvalidId);
        }
        if self.event_type.as_deref().is_some_and(has_control) {
            return Err(UpdateError::InvalidType);
        }
        Ok(())
    }

    /// The server-sent event subscribers receive, as the reference hub writes it (`event`,
    /// `retry`, `id`, then one `data` line per line of the data, whatever its line breaks).
    /// Encoded once per update: every subscriber gets the same bytes.
    pub fn to_frame(&self) -> Bytes {
        let mut frame = Vec::with_capacity(self.data.len() + 64);
        let mut field = |name: &[u8], value: &[u8]| {
            frame.extend_from_slice(name);
            frame.extend_from_slice(b": ");
            frame.extend_from_slice(value);
            frame.push(b'\n');
        };
        if let Some(t) = &self.event_type {
            field(b"event", t.as_bytes());
        }
        if let Some(retry) = self.retry {
            field(b"retry", retry.to_string().as_bytes());
        }
        field(b"id", self.id.as_deref().unwrap_or_default().as_bytes());
        // A line ends at CRLF, CR or LF. Searched for with memchr: every update is framed once,
        // subscribers or not, and a search char by char was a tenth of the hub's time.
        let mut rest = self.data.as_bytes();
        while let Some(end) = memchr::memchr2(b'\r', b'\n', rest) {
            field(b"data", &rest[..end]);
            let crlf = rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n');
            rest = &rest[end + if crlf { 2 } else { 1 }..];
        }
        field(b"data", rest);
        frame.push(b'\n');
        Bytes::from(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Update, UpdateError> {
        Update::from_form(body.as_bytes())
    }

    #[test]
    fn the_stored_encoding_reads_back_alike_and_earlier_json_lines_still_read() {
        let update = Update {
            topics: vec!["https://e.com/1".into(), "b".into()],
            data: "{\"a\": \"x\\ny\"}\r\nsecond line\u{2028}é".into(),
            private: true,
            id: Some("urn:uuid:1".into()),
            event_type: Some("t".into()),
            retry: Some(5),
        };
        let stored = update.to_stored();
        assert_eq!(Update::from_stored(&stored).unwrap(), update);
        let bare = Update::new(vec!["a".into()], "");
        assert_eq!(Update::from_stored(&bare.to_stored()).unwrap(), bare);
        assert!(Update::from_stored(b"topic=a&data=x").is_err());
        let longer = [&stored[..], b"x"].concat();
        assert!(
            Update::from_stored(&longer)
                .unwrap_err()
                .contains("1 bytes past")
        );
        assert!(Update::from_stored(&stored[..stored.len() - 1]).is_err());
        // What earlier versions stored.
        let line = serde_json::to_string(&update).unwrap();
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(Update::from_json_line(line.as_bytes()).unwrap(), update);
        assert!(Update::from_json_line(b"topic=a&data=x").is_err());
    }

    #[test]
    fn reads_repeated_topics_and_every_field() {
        let u =
            parse("topic=a&topic=https%3A%2F%2Fe.com%2F1&data=x%0Ay&private=&id=i&type=t&retry=5")
                .unwrap();
        assert_eq!(u.topics, ["a", "https://e.com/1"]);
        assert_eq!(u.data, "x\ny");
        assert!(u.private, "private counts by presence alone");
        assert_eq!(u.id.as_deref(), Some("i"));
        assert_eq!(u.event_type.as_deref(), Some("t"));
        assert_eq!(u.retry, Some(5));
        assert_eq!(Update::from_form(u.to_form().as_bytes()).unwrap(), u);
    }

    #[test]
    fn refuses_bad_forms() {
        assert_eq!(parse("data=x"), Err(UpdateError::MissingTopic));
        assert_eq!(parse(""), Err(UpdateError::MissingTopic));
        for retry in ["-1", "1.5", "abc", "18446744073709551616"] {
            assert_eq!(
                parse(&format!("topic=a&retry={retry}")),
                Err(UpdateError::InvalidRetry),
                "{retry}"
            );
        }
        let many = vec!["topic=a"; MAX_TOPICS + 1].join("&");
        assert_eq!(parse(&many), Err(UpdateError::TooManyTopics));
        assert!(parse("topic=a&retry=").unwrap().retry.is_none());
    }

    #[test]
    fn validation_blocks_injection_and_reserved_topics() {
        let ok = Update::new(vec!["a".into()], "d");
        assert_eq!(ok.validate(), Ok(()));
        for bad in ["a\nb", "a\rb", "a\0b"] {
            let u = Update {
                id: Some(bad.into()),
                ..ok.clone()
            };
            assert_eq!(u.validate(), Err(UpdateError::InvalidId));
            let u = Update {
                event_type: Some(bad.into()),
                ..ok.clone()
            };
            assert_eq!(u.validate(), Err(UpdateError::InvalidType));
        }
        let u = Update::new(
            vec![
                "a".into(),
                "https://e.com/.well-known/mercure/subscriptions".into(),
            ],
            "",
        );
        let err = u.validate().unwrap_err();
        assert!(err.forbidden());
        assert!(!UpdateError::InvalidId.forbidden());
    }

    fn frame(u: &Update) -> String {
        String::from_utf8(u.to_frame().to_vec()).unwrap()
    }

    #[test]
    fn renders_events_as_the_reference_hub() {
        let u = Update {
            id: Some("id-1".into()),
            event_type: Some("reading".into()),
            retry: Some(1500),
            ..Update::new(vec!["a".into()], "l1\r\nl2\rl3\nl4")
        };
        assert_eq!(
            frame(&u),
            "event: reading\nretry: 1500\nid: id-1\ndata: l1\ndata: l2\ndata: l3\ndata: l4\n\n"
        );
        // Empty data is one empty data line; a line break at the end, an empty last line.
        let u = Update {
            id: Some("i".into()),
            ..Update::new(vec!["a".into()], "")
        };
        assert_eq!(frame(&u), "id: i\ndata: \n\n");
        let u = Update {
            id: Some("i".into()),
            retry: Some(5),
            ..Update::new(vec!["a".into()], "x\r\n")
        };
        assert_eq!(frame(&u), "retry: 5\nid: i\ndata: x\ndata: \n\n");
        // CR before CRLF, LF before CR: each break its own; multi-byte text kept whole.
        let u = Update {
            id: Some("i".into()),
            ..Update::new(vec!["a".into()], "é\r\r\nà\n\rü")
        };
        assert_eq!(
            frame(&u),
            "id: i\ndata: é\ndata: \ndata: à\ndata: \ndata: ü\n\n"
        );
    }
}
