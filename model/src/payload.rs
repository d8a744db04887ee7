//! The device payload: `{"d": [{"tag": "AI.0", "value": 12.0}, ...], "ts": "..."}`.
//!
//! Parsing is tolerant where the original was: a payload that is not valid JSON is retried
//! with trailing commas before `}` or `]` removed. `ts` is optional and accepted in the forms
//! seen in the field: RFC 3339 (`Z`, `+00:00`), `+0000` offsets, fractional seconds, a space
//! instead of `T`, and no offset at all (read as UTC).

use crate::reason::DeadReason;
use crate::value::Value;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;
use thiserror::Error;

/// Longest tag code, in bytes (a device code has the same limit, [`crate::topic`]).
pub const MAX_TAG_CODE_LEN: usize = 255;

/// Deepest nesting of a reading's value (arrays and objects within one another). Every later
/// stage wraps a value in a few more levels (READINGS, the hub's updates) and must read it back:
/// a value accepted here must stay far from the 128 levels serde_json reads.
pub const MAX_VALUE_DEPTH: usize = 64;

/// The years a `ts` may fall in: four-digit years, which PostgreSQL, TimescaleDB and RFC 3339
/// (the hub's updates, the site) all hold. PostgreSQL alone would take 4713 BC to 294276 AD.
pub const TS_YEARS: std::ops::RangeInclusive<i32> = 1..=9999;

/// Limits applied to a payload before and while it is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadLimits {
    /// Largest payload accepted, in bytes.
    pub max_bytes: usize,
    /// Most readings (`d` entries) in one payload.
    pub max_readings: usize,
}

impl PayloadLimits {
    /// `MAX_PAYLOAD_BYTES` and `MAX_READINGS_PER_MESSAGE` by default.
    pub const DEFAULT: PayloadLimits = PayloadLimits {
        max_bytes: 256 * 1024,
        max_readings: 1000,
    };
}

impl Default for PayloadLimits {
    fn default() -> Self {
        PayloadLimits::DEFAULT
    }
}

/// A payload, parsed and typed.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    /// `(tag code, value)` in payload order.
    pub readings: Vec<(String, Value)>,
    /// The device's own timestamp, when it sent one.
    pub ts: Option<DateTime<Utc>>,
}

/// Why a payload is refused. Always permanent: the same bytes never parse later.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PayloadError {
    #[error("payload is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not UTF-8 (invalid byte at offset {0})")]
    NotUtf8(usize),
    #[error("payload is not JSON: {0}")]
    Json(String),
    #[error("payload shape: {0}")]
    Shape(String),
    #[error("payload has {count} readings, over the limit of {limit}")]
    TooManyReadings { count: usize, limit: usize },
    #[error("ts {0:?} is not a date and time this system reads (e.g. 2017-12-22T08:05:20+0000)")]
    Ts(String),
    #[error("ts {0:?} is outside the years 1 to 9999 that the database and the live updates hold")]
    TsRange(String),
}

impl PayloadError {
    /// The dead-letter reason of this error.
    pub fn kind(&self) -> DeadReason {
        match self {
            PayloadError::TooLarge { .. } => DeadReason::Oversized,
            PayloadError::NotUtf8(_) => DeadReason::NotUtf8,
            PayloadError::Json(_) => DeadReason::BadJson,
            PayloadError::Shape(_) => DeadReason::BadPayload,
            PayloadError::TooManyReadings { .. } => DeadReason::TooManyReadings,
            PayloadError::Ts(_) | PayloadError::TsRange(_) => DeadReason::BadTs,
        }
    }
}

#[derive(Deserialize)]
struct Wire {
    d: Vec<WireEntry>,
    #[serde(default)]
    ts: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireEntry {
    tag: serde_json::Value,
    #[serde(default)]
    value: serde_json::Value,
}

/// Parses a payload. See the module doc for what is tolerated.
pub fn parse(bytes: &[u8], limits: &PayloadLimits) -> Result<Payload, PayloadError> {
    if bytes.len() > limits.max_bytes {
        return Err(PayloadError::TooLarge {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| PayloadError::NotUtf8(e.valid_up_to()))?;
    let wire: Wire = match serde_json::from_str(text) {
        Ok(wire) => wire,
        Err(first) if first.is_syntax() || first.is_eof() => {
            let stripped = strip_trailing_commas(text);
            serde_json::from_str(&stripped).map_err(|_| json_error(first))?
        }
        Err(e) => return Err(json_error(e)),
    };
    if wire.d.len() > limits.max_readings {
        return Err(PayloadError::TooManyReadings {
            count: wire.d.len(),
            limit: limits.max_readings,
        });
    }
    let readings = wire
        .d
        .into_iter()
        .enumerate()
        .map(|(i, entry)| match entry.tag {
            serde_json::Value::String(tag) if tag.len() > MAX_TAG_CODE_LEN => {
                Err(PayloadError::Shape(format!(
                    "d[{i}].tag is {} bytes long, over the limit of {MAX_TAG_CODE_LEN}",
                    tag.len()
                )))
            }
            serde_json::Value::String(_) if too_deep(&entry.value) => Err(PayloadError::Shape(
                format!("d[{i}].value is nested over {MAX_VALUE_DEPTH} levels deep"),
            )),
            serde_json::Value::String(tag) if !tag.is_empty() => {
                Ok((tag, Value::from_json(entry.value)))
            }
            other => Err(PayloadError::Shape(format!(
                "d[{i}].tag must be a non-empty string, found {other}"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ts = match wire.ts {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(parse_ts(&s)?),
        Some(other) => return Err(PayloadError::Ts(other.to_string())),
    };
    Ok(Payload { readings, ts })
}

fn json_error(e: serde_json::Error) -> PayloadError {
    if e.is_data() {
        PayloadError::Shape(e.to_string())
    } else {
        PayloadError::Json(e.to_string())
    }
}

/// Whether a value nests arrays and objects over [`MAX_VALUE_DEPTH`] levels deep. Walked with a
/// stack of its own, not by recursion: the value may be as deep as serde_json let it be.
fn too_deep(value: &serde_json::Value) -> bool {
    // A number, a string (nearly every value): nothing to walk, so no stack to allocate.
    if !(value.is_array() || value.is_object()) {
        return false;
    }
    let mut stack = vec![(value, 0usize)];
    while let Some((value, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match value {
            serde_json::Value::Array(a) => Box::new(a.iter()),
            serde_json::Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        if depth + 1 > MAX_VALUE_DEPTH {
            return true;
        }
        stack.extend(children.map(|child| (child, depth + 1)));
    }
    false
}

/// Parses a device timestamp in any of the accepted forms, within [`TS_YEARS`].
pub fn parse_ts(s: &str) -> Result<DateTime<Utc>, PayloadError> {
    use chrono::Datelike as _;
    let t = parse_any_ts(s)?;
    if !TS_YEARS.contains(&t.year()) {
        return Err(PayloadError::TsRange(s.trim().to_owned()));
    }
    Ok(t)
}

fn parse_any_ts(s: &str) -> Result<DateTime<Utc>, PayloadError> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let with_offset = ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"];
    for fmt in with_offset {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    let naive = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"];
    for fmt in naive {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(t.and_utc());
        }
    }
    Err(PayloadError::Ts(s.to_owned()))
}

/// Removes commas that stand right before `}` or `]` (after optional white space), outside
/// string literals. A scanner rather than a regex, so that text values keep their commas.
fn strip_trailing_commas(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if c == ',' {
            let next = bytes[i + 1..].iter().find(|b| !b.is_ascii_whitespace());
            if matches!(next, Some(b'}' | b']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn parse_ok(s: &str) -> Payload {
        parse(s.as_bytes(), &PayloadLimits::default()).unwrap()
    }

    #[test]
    fn the_original_example() {
        let p = parse_ok(
            r#"{ "d": [ { "tag": "AI.0", "value": 12.00 }, { "tag": "AI.1", "value": 10 } ],
                 "ts": "2017-12-22T08:05:20+0000" }"#,
        );
        assert_eq!(
            p.readings,
            vec![
                ("AI.0".to_owned(), Value::Double(12.0)),
                ("AI.1".to_owned(), Value::Integer(10)),
            ]
        );
        assert_eq!(
            p.ts,
            Some(Utc.with_ymd_and_hms(2017, 12, 22, 8, 5, 20).unwrap())
        );
    }

    #[test]
    fn a_tag_a_value_or_a_ts_past_what_storage_holds_is_refused() {
        let limits = PayloadLimits::default();
        let refused = |json: String| parse(json.as_bytes(), &limits).unwrap_err();
        let tag = |n: usize| format!(r#"{{"d": [{{"tag": "{}", "value": 1}}]}}"#, "t".repeat(n));
        assert!(parse(tag(MAX_TAG_CODE_LEN).as_bytes(), &limits).is_ok());
        assert_eq!(
            refused(tag(MAX_TAG_CODE_LEN + 1)).kind(),
            DeadReason::BadPayload
        );
        let nested = |depth: usize| {
            format!(
                r#"{{"d": [{{"tag": "t", "value": {}1{}}}]}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        assert!(parse(nested(MAX_VALUE_DEPTH).as_bytes(), &limits).is_ok());
        let deep = refused(nested(MAX_VALUE_DEPTH + 1));
        assert_eq!(deep.kind(), DeadReason::BadPayload, "{deep}");
        let object = format!(
            r#"{{"d": [{{"tag": "t", "value": {}1{}}}]}}"#,
            r#"{"k": "#.repeat(MAX_VALUE_DEPTH + 1),
            "}".repeat(MAX_VALUE_DEPTH + 1)
        );
        assert_eq!(refused(object).kind(), DeadReason::BadPayload);
        for ts in [
            "+200000-01-01T00:00:00+0000",
            "-5000-01-01T00:00:00",
            "0000-12-31 23:59:59",
            "+10000-01-01T00:00:00+00:00",
        ] {
            let e = parse_ts(ts).unwrap_err();
            assert_eq!(e, PayloadError::TsRange(ts.into()), "{ts}");
            assert_eq!(e.kind(), DeadReason::BadTs);
        }
        for ts in ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"] {
            assert!(parse_ts(ts).is_ok(), "{ts}");
        }
    }

    #[test]
    fn ts_is_optional() {
        assert_eq!(parse_ok(r#"{"d": []}"#).ts, None);
        assert_eq!(parse_ok(r#"{"d": [], "ts": null}"#).ts, None);
    }

    #[test]
    fn every_value_type() {
        let p = parse_ok(
            r#"{"d": [{"tag": "i", "value": -3}, {"tag": "f", "value": 1.5},
                      {"tag": "b", "value": false}, {"tag": "s", "value": "NaN"},
                      {"tag": "a", "value": [1, "x"]}, {"tag": "o", "value": {"k": null}},
                      {"tag": "n", "value": null}, {"tag": "missing"}]}"#,
        );
        let values: Vec<_> = p.readings.into_iter().map(|(_, v)| v).collect();
        assert_eq!(
            values,
            vec![
                Value::Integer(-3),
                Value::Double(1.5),
                Value::Boolean(false),
                Value::Text("NaN".into()),
                Value::Json(serde_json::json!([1, "x"])),
                Value::Json(serde_json::json!({"k": null})),
                Value::Null,
                Value::Null,
            ]
        );
    }

    #[test]
    fn trailing_commas_are_tolerated() {
        let p = parse_ok(
            r#"{ "d": [ { "tag": "AI.0", "value": 1, }, { "tag": "AI.1", "value": "a,]" }, ],
                 "ts": "2017-12-22T08:05:20Z", }"#,
        );
        assert_eq!(p.readings.len(), 2);
        assert_eq!(p.readings[1].1, Value::Text("a,]".into()));
        assert!(p.ts.is_some());
    }

    #[test]
    fn every_ts_format_seen_in_the_field() {
        let base = Utc.with_ymd_and_hms(2017, 12, 22, 8, 5, 20).unwrap();
        let ms = base + chrono::Duration::milliseconds(123);
        for (s, want) in [
            ("2017-12-22T08:05:20+0000", base),
            ("2017-12-22T08:05:20+00:00", base),
            ("2017-12-22T08:05:20Z", base),
            ("2017-12-22T09:05:20+0100", base),
            ("2017-12-22T09:05:20+01:00", base),
            ("2017-12-22T08:05:20.123Z", ms),
            ("2017-12-22T08:05:20.123+0000", ms),
            (
                "2017-12-22T08:05:20.123456789+00:00",
                base + chrono::Duration::nanoseconds(123_456_789),
            ),
            ("2017-12-22 08:05:20+0000", base),
            ("2017-12-22T08:05:20", base),
            ("2017-12-22 08:05:20.123", ms),
        ] {
            assert_eq!(parse_ts(s).unwrap(), want, "{s}");
        }
        for bad in ["", "yesterday", "2017-13-22T08:05:20Z", "1513929920"] {
            assert!(parse_ts(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let limits = PayloadLimits {
            max_bytes: 64,
            max_readings: 2,
        };
        let cases: [(&[u8], &str); 9] = [
            (b"", "bad_json"),
            (b"{\"d\": [", "bad_json"),
            (b"\xff\xfe", "not_utf8"),
            (b"[1, 2]", "bad_payload"),
            (b"{\"x\": 1}", "bad_payload"),
            (b"{\"d\": [{\"tag\": 5, \"value\": 1}]}", "bad_payload"),
            (b"{\"d\": [], \"ts\": 1513929920}", "bad_ts"),
            (
                b"{\"d\": [{\"tag\":\"a\"},{\"tag\":\"b\"},{\"tag\":\"c\"}]}",
                "too_many_readings",
            ),
            (&[b' '; 65], "oversized"),
        ];
        for (bytes, kind) in cases {
            let err = parse(bytes, &limits).unwrap_err();
            assert_eq!(
                err.kind().name(),
                kind,
                "{:?}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let deep = format!(
            "{{\"d\": [{{\"tag\": \"x\", \"value\": {}{}}}]}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let limits = PayloadLimits {
            max_bytes: 1 << 20,
            ..Default::default()
        };
        assert_eq!(
            parse(deep.as_bytes(), &limits).unwrap_err().kind(),
            DeadReason::BadJson
        );
    }
}
