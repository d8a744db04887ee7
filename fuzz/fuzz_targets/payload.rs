//! `payload::parse` on any bytes, with the default limits and with limits set right at, and
//! just under, what an accepted payload needs.
//!
//! Asserts, beyond "does not panic":
//! - an accepted payload is UTF-8, within the limits (size, readings), and every tag is a
//!   non-empty string;
//! - the limits are exact: an accepted payload is still accepted, the same, with `max_bytes`
//!   its size and `max_readings` its number of readings, and refused as `TooLarge` or
//!   `TooManyReadings` one byte or one reading under;
//! - a refused payload stays refused under tighter limits, and its error says the truth
//!   (`NotUtf8` at the first invalid byte, counts over the limit);
//! - what was accepted, written out again (tags, values as published, `ts` in RFC 3339),
//!   parses to the same;
//! - the READINGS message the processor would make of it is read back the same by the writer
//!   and the publisher (packed in binary and read; and in the JSON form of earlier versions).
#![no_main]

use chrono::{DateTime, Utc};
use dataviz_model::readings::{MessageReadings, ReadingsMessage, TagReading};
use dataviz_model::payload::{self, Payload, PayloadError, PayloadLimits};
use libfuzzer_sys::fuzz_target;

fn accepted(data: &[u8], limits: &PayloadLimits, p: &Payload) {
    let text = std::str::from_utf8(data).expect("an accepted payload is UTF-8");
    assert!(data.len() <= limits.max_bytes);
    assert!(p.readings.len() <= limits.max_readings);
    assert!(p.readings.iter().all(|(tag, _)| !tag.is_empty()));

    // Exact limits: at the payload's own size and count it passes, one under it does not.
    let exact = PayloadLimits {
        max_bytes: data.len(),
        max_readings: p.readings.len(),
    };
    assert_eq!(payload::parse(data, &exact).as_ref(), Ok(p), "{text:?}");
    if let Some(limit) = data.len().checked_sub(1) {
        let under = PayloadLimits {
            max_bytes: limit,
            ..exact
        };
        assert_eq!(
            payload::parse(data, &under),
            Err(PayloadError::TooLarge {
                size: data.len(),
                limit
            })
        );
    }
    if let Some(limit) = p.readings.len().checked_sub(1) {
        let under = PayloadLimits {
            max_readings: limit,
            ..exact
        };
        assert_eq!(
            payload::parse(data, &under),
            Err(PayloadError::TooManyReadings {
                count: p.readings.len(),
                limit
            })
        );
    }

    // Written out again, it parses to the same.
    let again = serde_json::json!({
        "d": p.readings.iter()
            .map(|(tag, value)| serde_json::json!({ "tag": tag, "value": value.to_json() }))
            .collect::<Vec<_>>(),
        "ts": p.ts.map(|t| t.to_rfc3339()),
    })
    .to_string();
    let unlimited = PayloadLimits {
        max_bytes: usize::MAX,
        max_readings: usize::MAX,
    };
    assert_eq!(
        payload::parse(again.as_bytes(), &unlimited).as_ref(),
        Ok(p),
        "{text:?} written out again as {again:?}"
    );

    // The READINGS batch made of it reads back the same.
    let time = p.ts.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    let batch = MessageReadings {
        raw_seq: None,
        id: uuid::Uuid::nil(),
        gateway_id: 1,
        device_id: 1,
        device_code: "dev-1".into(),
        time,
        received_at: time,
        readings: p
            .readings
            .iter()
            .zip(1..)
            .map(|((tag, value), tag_id)| TagReading {
                tag_id,
                tag: tag.clone(),
                value: value.clone(),
            })
            .collect(),
    };
    let json = batch.to_json();
    let back = serde_json::from_slice::<MessageReadings>(&json).unwrap_or_else(|e| {
        panic!(
            "{text:?}: READINGS batch {:?} not read back: {e}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(back, batch, "{text:?}");
    let (packed, _) = ReadingsMessage::pack([&batch]);
    let back = ReadingsMessage::parse(&packed[0].payload())
        .unwrap_or_else(|e| panic!("{text:?}: READINGS message not read back: {e}"));
    assert_eq!(back, [batch], "{text:?}");
}

fn refused(data: &[u8], limits: &PayloadLimits, e: &PayloadError) {
    assert!(!e.kind().name().is_empty() && !e.to_string().is_empty());
    match *e {
        PayloadError::TooLarge { size, limit } => {
            assert_eq!((size, limit), (data.len(), limits.max_bytes));
            assert!(size > limit);
        }
        PayloadError::NotUtf8(offset) => {
            let utf8 = std::str::from_utf8(data).expect_err("refused as not UTF-8, but it is");
            assert_eq!(offset, utf8.valid_up_to());
        }
        PayloadError::TooManyReadings { count, limit } => {
            assert_eq!(limit, limits.max_readings);
            assert!(count > limit);
        }
        PayloadError::Json(_)
        | PayloadError::Shape(_)
        | PayloadError::Ts(_)
        | PayloadError::TsRange(_) => {}
    }
    if !matches!(e, PayloadError::NotUtf8(_) | PayloadError::TooLarge { .. }) {
        assert!(std::str::from_utf8(data).is_ok());
    }
    // Tighter limits only add reasons to refuse.
    let tighter = PayloadLimits {
        max_bytes: limits.max_bytes.min(data.len()),
        max_readings: 0,
    };
    assert!(payload::parse(data, &tighter).is_err());
}

fuzz_target!(|data: &[u8]| {
    let limits = PayloadLimits::default();
    match payload::parse(data, &limits) {
        Ok(p) => accepted(data, &limits, &p),
        Err(e) => refused(data, &limits, &e),
    }
});
