//! `payload::parse_ts`, the device timestamp, on any UTF-8 text.
//!
//! Asserts, beyond "does not panic":
//! - an accepted timestamp, written out in RFC 3339 (as READINGS carries it), reads back as
//!   the same instant, and so does the input with white space around it;
//! - a payload with that text as its `ts` gets the same instant, or the same refusal;
//! - a refusal is `PayloadError::Ts` or `TsRange` naming the (trimmed) text; `TsRange` only for
//!   an instant outside the years `TS_YEARS`.
#![no_main]

use dataviz_model::payload::{self, PayloadError, PayloadLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = payload::parse_ts(text);
    match &parsed {
        Ok(t) => {
            assert_eq!(
                payload::parse_ts(&t.to_rfc3339()).as_ref(),
                Ok(t),
                "{text:?} read as {t:?}, written {}",
                t.to_rfc3339()
            );
            assert_eq!(payload::parse_ts(&format!(" \t{text}\n ")).as_ref(), Ok(t));
        }
        Err(PayloadError::TsRange(named)) => assert_eq!(named, text.trim()),
        Err(e) => assert_eq!(e, &PayloadError::Ts(text.trim().to_owned())),
    }
    let json = serde_json::json!({ "d": [], "ts": text }).to_string();
    let unlimited = PayloadLimits {
        max_bytes: usize::MAX,
        max_readings: usize::MAX,
    };
    assert_eq!(
        payload::parse(json.as_bytes(), &unlimited).map(|p| p.ts),
        parsed.map(Some),
        "{json}"
    );
});
