//! Property tests of topic and payload parsing: whatever the input, parsing returns (never
//! panics), stays within the limits, and gives back what a well-formed message said.

use chrono::{DateTime, TimeZone, Utc};
use dataviz_model::payload::{self, PayloadLimits};
use dataviz_model::topic::{self, MAX_DEVICE_CODE_LEN};
use dataviz_model::value::Value;
use proptest::prelude::*;

fn limits() -> PayloadLimits {
    PayloadLimits::default()
}

fn reads_back(f: f64) -> bool {
    f.is_finite()
        && serde_json::from_str::<f64>(&serde_json::to_string(&f).unwrap()).ok() == Some(f)
}

/// A JSON value as devices send them: scalars, and small arrays and objects of them.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(serde_json::Value::from),
        // Past i64: typed as double precision, so the same exactness filter as floats.
        any::<u64>()
            .prop_filter("read back exactly as a double", |u| reads_back(*u as f64))
            .prop_map(serde_json::Value::from),
        any::<f64>()
            // Finite (JSON has no other), and read back exactly by serde_json's default float
            // parser, which is not correctly rounded: it may read a value a unit in the last
            // place off (its `float_roundtrip` feature fixes it; see docs/FAULTS.md).
            .prop_filter("finite, read back exactly", |f| reads_back(*f))
            .prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z]{1,5}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
    // 1970 to 2100, to the millisecond.
    (0i64..4_102_444_800, 0u32..1000)
        .prop_map(|(s, ms)| Utc.timestamp_opt(s, ms * 1_000_000).unwrap())
}

/// `ts` in each of the forms seen in the field.
fn ts_text(t: DateTime<Utc>, form: u8) -> String {
    match form % 6 {
        0 => t.format("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string(),
        1 => t.format("%Y-%m-%dT%H:%M:%S%.3f+00:00").to_string(),
        2 => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        3 => t.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
        4 => t.format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
        _ => (t + chrono::Duration::hours(2))
            .format("%Y-%m-%dT%H:%M:%S%.3f+0200")
            .to_string(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn topic_parse_never_panics_and_accepts_only_the_device_shape(topic in "\\PC{0,40}|gateways/[-+0-9a-z ./#]{0,12}/[^/]{0,8}(/.{0,4})?") {
        if let Ok(parsed) = topic::parse(&topic) {
            let levels: Vec<&str> = topic.split('/').collect();
            prop_assert_eq!(levels.len(), 3);
            prop_assert_eq!(levels[0], "gateways");
            prop_assert!(parsed.gateway_id > 0);
            prop_assert!(!parsed.device_code.is_empty());
            prop_assert!(parsed.device_code.len() <= MAX_DEVICE_CODE_LEN);
            prop_assert_eq!(parsed.device_code, levels[2]);
            // Reformatted, it names the same gateway and device.
            let canonical = format!("gateways/{}/{}", parsed.gateway_id, parsed.device_code);
            prop_assert_eq!(topic::parse(&canonical), Ok(parsed));
        }
    }

    #[test]
    fn every_device_topic_round_trips(id in 1..=i32::MAX, device in "[^/]{1,40}") {
        let topic = format!("gateways/{id}/{device}");
        let parsed = topic::parse(&topic).expect("a device topic");
        prop_assert_eq!(parsed.gateway_id, id);
        prop_assert_eq!(parsed.device_code, device.as_str());
        prop_assert_eq!(topic::gateway_of(&topic), Some(id));
    }

    #[test]
    fn payload_parse_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = payload::parse(&bytes, &limits());
    }

    #[test]
    fn payload_parse_never_panics_on_json_like_text(text in "[{}\\[\\],:\" dtagvluesx0-9.eE+-]{0,80}") {
        let _ = payload::parse(text.as_bytes(), &limits());
    }

    #[test]
    fn payload_parse_never_panics_on_json_of_any_shape(json in json_value(), wrap in 0u8..4) {
        let text = match wrap {
            0 => json.to_string(),
            1 => serde_json::json!({ "d": json }).to_string(),
            2 => serde_json::json!({ "d": [json] }).to_string(),
            _ => serde_json::json!({ "d": [{ "tag": "t", "value": 1 }], "ts": json }).to_string(),
        };
        let _ = payload::parse(text.as_bytes(), &limits());
    }

    #[test]
    fn a_well_formed_payload_round_trips(
        readings in prop::collection::vec((".{1,12}", json_value()), 0..20),
        ts in prop::option::of((timestamp(), any::<u8>())),
        trailing_commas in any::<bool>(),
    ) {
        let d: Vec<serde_json::Value> = readings
            .iter()
            .map(|(tag, value)| serde_json::json!({ "tag": tag, "value": value }))
            .collect();
        let mut object = serde_json::json!({ "d": d });
        if let Some((t, form)) = ts {
            object["ts"] = ts_text(t, form).into();
        }
        let mut text = serde_json::to_string_pretty(&object).unwrap();
        if trailing_commas {
            // The original's devices: a comma before every closing bracket outside strings
            // of the pretty form (those stand alone at the end of a line).
            text = text.replace("\n}", ",\n}").replace("\n  }", ",\n  }")
                .replace("\n  ]", ",\n  ]").replace("\n    }", ",\n    }");
        }
        let parsed = payload::parse(text.as_bytes(), &limits())
            .unwrap_or_else(|e| panic!("{text}: {e}"));
        let expected: Vec<(String, Value)> = readings
            .into_iter()
            .map(|(tag, value)| (tag, Value::from_json(value)))
            .collect();
        prop_assert_eq!(&parsed.readings, &expected);
        prop_assert_eq!(parsed.ts, ts.map(|(t, _)| t));

        // What was parsed, written out again, parses to the same.
        let again = serde_json::json!({
            "d": parsed.readings.iter()
                .map(|(tag, value)| serde_json::json!({ "tag": tag, "value": value.to_json() }))
                .collect::<Vec<_>>(),
            "ts": parsed.ts.map(|t| t.to_rfc3339()),
        });
        let reparsed = payload::parse(again.to_string().as_bytes(), &limits()).unwrap();
        prop_assert_eq!(reparsed, parsed);
    }

    #[test]
    fn limits_hold_for_whatever_is_accepted(
        count in 0usize..40,
        max_readings in 0usize..30,
        max_bytes in 0usize..2000,
    ) {
        let d: Vec<serde_json::Value> =
            (0..count).map(|i| serde_json::json!({ "tag": format!("t{i}"), "value": i })).collect();
        let text = serde_json::json!({ "d": d }).to_string();
        let limits = PayloadLimits { max_bytes, max_readings };
        match payload::parse(text.as_bytes(), &limits) {
            Ok(parsed) => {
                prop_assert!(text.len() <= max_bytes);
                prop_assert!(parsed.readings.len() <= max_readings);
                prop_assert_eq!(parsed.readings.len(), count);
            }
            Err(e) => prop_assert!(
                text.len() > max_bytes || count > max_readings,
                "{text} refused within the limits: {e}"
            ),
        }
    }

    #[test]
    fn deep_nesting_is_refused_or_accepted_never_overflowed(depth in 0usize..5000) {
        let value = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let text = format!(r#"{{"d": [{{"tag": "deep", "value": {value}}}]}}"#);
        let _ = payload::parse(text.as_bytes(), &limits());
    }
}
