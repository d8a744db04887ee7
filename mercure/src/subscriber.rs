//! A small subscriber client: reads a hub's server-sent events as a browser's `EventSource`
//! does (line breaks CRLF, CR or LF; `data` lines joined with LF; comments ignored). For tests,
//! tools and benchmarks; it does not reconnect by itself (the caller passes the last id it
//! saw when it connects again).

use reqwest::Url;
use std::time::Duration;

/// One received event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    /// `message` when the stream gave no type, as browsers report it.
    pub event_type: String,
    pub data: String,
    pub retry: Option<u64>,
}

/// Turns bytes into events, whatever the chunk boundaries.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    /// The last byte was CR: an LF right after it belongs to the same line break.
    after_cr: bool,
    data: Option<String>,
    event_type: Option<String>,
    id: Option<String>,
    retry: Option<u64>,
}

impl SseParser {
    /// Feeds bytes; returns the events they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.buffer);
                    if let Some(event) = self.line(&String::from_utf8_lossy(&line)) {
                        events.push(event);
                    }
                }
                _ => {
                    self.after_cr = false;
                    self.buffer.push(b);
                }
            }
        }
        events
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let data = self.data.take();
            let event_type = self.event_type.take();
            let retry = self.retry.take();
            // An event with no data is not dispatched (but its id counts, as in browsers).
            return data.map(|data| SseEvent {
                id: self.id.clone(),
                event_type: event_type.unwrap_or_else(|| "message".into()),
                data,
                retry,
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => self.event_type = Some(value.to_owned()),
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            "retry" => self.retry = value.parse().ok(),
            _ => {}
        }
        None
    }
}

/// An open subscription.
#[derive(Debug)]
pub struct EventStream {
    response: reqwest::Response,
    parser: SseParser,
    ready: std::collections::VecDeque<SseEvent>,
}

/// What to subscribe to.
#[derive(Debug, Clone, Default)]
pub struct SubscribeRequest {
    pub topics: Vec<String>,
    /// A JWT, sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// Sent as the `Last-Event-ID` header.
    pub last_event_id: Option<String>,
}

impl EventStream {
    /// Connects to the hub at `hub_url`; fails unless it answers 200.
    pub async fn connect(
        hub_url: &str,
        request: &SubscribeRequest,
    ) -> Result<EventStream, reqwest::Error> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut url = Url::parse(hub_url).expect("a valid hub URL");
        for topic in &request.topics {
            url.query_pairs_mut().append_pair("topic", topic);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let mut builder = client.get(url);
        if let Some(token) = &request.token {
            builder = builder.bearer_auth(token);
        }
        if let Some(id) = &request.last_event_id {
            builder = builder.header("Last-Event-ID", id);
        }
        let response = builder.send().await?.error_for_status()?;
        Ok(EventStream {
            response,
            parser: SseParser::default(),
            ready: Default::default(),
        })
    }

    /// The response's headers (e.g. `Last-Event-ID`).
    pub fn headers(&self) -> &reqwest::header::HeaderMap {
        self.response.headers()
    }

    /// The next event; `Ok(None)` when the hub ended the stream.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, reqwest::Error> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            match self.response.chunk().await? {
                Some(chunk) => self.ready.extend(self.parser.feed(&chunk)),
                None => return Ok(None),
            }
        }
    }

    /// The next event, or `None` when none comes within `timeout` or the stream ended.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<SseEvent> {
        tokio::time::timeout(timeout, self.next())
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_across_chunks_and_line_break_forms() {
        let mut p = SseParser::default();
        let stream =
            b":\n\nid: a\ndata: l1\r\ndata: l2\rdata:l3\n\nevent: t\nretry: 5\nid: b\ndata: x\n\n";
        let mut events = Vec::new();
        for chunk in stream.chunks(3) {
            events.extend(p.feed(chunk));
        }
        assert_eq!(
            events,
            [
                SseEvent {
                    id: Some("a".into()),
                    event_type: "message".into(),
                    data: "l1\nl2\nl3".into(),
                    retry: None
                },
                SseEvent {
                    id: Some("b".into()),
                    event_type: "t".into(),
                    data: "x".into(),
                    retry: Some(5)
                },
            ]
        );
    }

    #[test]
    fn events_without_data_are_not_dispatched_but_keep_their_id() {
        let mut p = SseParser::default();
        assert!(p.feed(b"id: a\n\n").is_empty());
        let events = p.feed(b"data: x\n\n");
        assert_eq!(events[0].id.as_deref(), Some("a"));
    }
}
