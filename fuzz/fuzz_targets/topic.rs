//! `topic::parse` and `topic::gateway_of` on any UTF-8 text (MQTT topics are UTF-8).
//!
//! Asserts, beyond "does not panic":
//! - the outcome, accepted or the exact error, is the one an independent reading of the rule
//!   gives: `gateways/<gateway_id>/<device_code>`, the id a decimal integer in 1..=i32::MAX
//!   (leading zeros allowed, no sign), the device code non-empty and at most
//!   `MAX_DEVICE_CODE_LEN` bytes;
//! - an accepted topic round-trips: its gateway level and device code, put back together, are
//!   the input, and the canonical topic `gateways/<id>/<device>` parses to the same;
//! - `gateway_of` agrees with `parse`.
#![no_main]

use dataviz_model::topic::{self, DeviceTopic, MAX_DEVICE_CODE_LEN, TopicError};
use libfuzzer_sys::fuzz_target;

/// The gateway id a topic level names, read digit by digit rather than with `str::parse`.
fn gateway_id(level: &str) -> Option<i32> {
    if level.is_empty() || !level.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = level.trim_start_matches('0');
    if digits.is_empty() || digits.len() > 10 {
        return None; // zero, or past i32::MAX (10 digits)
    }
    let value = digits
        .bytes()
        .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0'));
    i32::try_from(value).ok()
}

/// What `topic::parse` must answer, computed independently of it.
fn expected(topic: &str) -> Result<DeviceTopic<'_>, TopicError> {
    let levels: Vec<&str> = topic.split('/').collect();
    let [first, gateway, device] = levels[..] else {
        return Err(TopicError::Shape(topic.to_owned()));
    };
    if first != "gateways" {
        return Err(TopicError::Shape(topic.to_owned()));
    }
    let gateway_id =
        gateway_id(gateway).ok_or_else(|| TopicError::GatewayId(gateway.to_owned()))?;
    if device.is_empty() {
        return Err(TopicError::EmptyDevice);
    }
    if device.len() > MAX_DEVICE_CODE_LEN {
        return Err(TopicError::DeviceTooLong);
    }
    Ok(DeviceTopic {
        gateway_id,
        device_code: device,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = topic::parse(input);
    assert_eq!(parsed, expected(input), "topic {input:?}");
    assert_eq!(
        topic::gateway_of(input),
        parsed.as_ref().ok().map(|t| t.gateway_id),
        "gateway_of disagrees with parse on {input:?}"
    );
    match parsed {
        Ok(t) => {
            assert!(t.gateway_id > 0);
            assert!(!t.device_code.is_empty() && t.device_code.len() <= MAX_DEVICE_CODE_LEN);
            assert!(!t.device_code.contains('/'));
            // Round trip: the gateway level as written (leading zeros and all) and the device
            // code give back the input; the device code is the input's own last level.
            let gateway_level = input
                .strip_prefix("gateways/")
                .and_then(|rest| rest.strip_suffix(t.device_code))
                .and_then(|rest| rest.strip_suffix('/'))
                .unwrap_or_else(|| panic!("{input:?} does not end with /{}", t.device_code));
            assert_eq!(format!("gateways/{gateway_level}/{}", t.device_code), input);
            assert_eq!(
                gateway_level.parse::<i64>().ok(),
                Some(i64::from(t.gateway_id))
            );
            assert!(std::ptr::eq(
                t.device_code.as_ptr(),
                input[input.len() - t.device_code.len()..].as_ptr()
            ));
            // The canonical spelling names the same gateway and device, and is the input
            // unless the input wrote the id with leading zeros.
            let canonical = format!("gateways/{}/{}", t.gateway_id, t.device_code);
            assert_eq!(topic::parse(&canonical), Ok(t.clone()));
            assert_eq!(topic::gateway_of(&canonical), Some(t.gateway_id));
            assert!(canonical == input || gateway_level.starts_with('0'));
        }
        Err(e) => {
            // Every refusal can be told (it goes into a dead letter's error).
            assert!(!e.to_string().is_empty());
        }
    }
});
