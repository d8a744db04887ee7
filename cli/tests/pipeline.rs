//! The ingestion path end to end, against real Mosquitto, NATS and PostgreSQL, with the
//! `dataviz` binary started as processes.

mod common;

use chrono::{DateTime, TimeZone, Utc};
use common::{Publisher, Stack, stream_messages};
use dataviz_core::message::DeadLetter;
use std::collections::BTreeSet;
use std::time::Duration;

/// The rows of `tag_reading`, readable: (device, tag, time, num, bool, text, json, type, gateway).
type Row = (
    String,
    String,
    DateTime<Utc>,
    Option<f64>,
    Option<bool>,
    Option<String>,
    Option<String>,
    String,
    Option<i32>,
);

async fn rows(stack: &Stack) -> Vec<Row> {
    stack
        .db
        .connect()
        .await
        .query(
            "SELECT d.code, t.code, r.time, r.value_num, r.value_bool, r.value_text,
                    r.value_json::text, r.value_type, r.gateway_id
             FROM tag_reading r JOIN tag t ON t.id = r.tag_id JOIN device d ON d.id = r.device_id
             ORDER BY r.time, d.code, t.code",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
                r.get(8),
            )
        })
        .collect()
}

fn ts(s: u32, ms: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2017, 12, 22, 8, 5, s).unwrap() + chrono::Duration::milliseconds(ms.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_become_exactly_the_expected_rows_devices_and_tags() {
    let stack = Stack::start().await;
    stack.create_gateway(7).await;
    let _all = stack.spawn("all", &[]);
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;

    // The original's example, verbatim.
    mqtt.publish(
        "gateways/7/plc-1",
        r#"{ "d": [ { "tag": "AI.0", "value": 12.00 }, { "tag": "AI.1", "value": 10 } ],
             "ts": "2017-12-22T08:05:20+0000" }"#,
    )
    .await;
    // Trailing commas, `Z`, every other value type, and AI.1 turning into a float.
    mqtt.publish(
        "gateways/7/plc-1",
        r#"{ "d": [ { "tag": "AI.1", "value": 10.5, }, { "tag": "DI.0", "value": true },
                    { "tag": "ST.0", "value": "RUN" }, { "tag": "J.0", "value": {"a": [1, 2]} },
                    { "tag": "N.0", "value": null }, ], "ts": "2017-12-22T08:05:21Z", }"#,
    )
    .await;
    // Fractional seconds with a `+00:00` offset, on a second device.
    mqtt.publish(
        "gateways/7/plc-2",
        r#"{"d": [{"tag": "AI.0", "value": -1.5}], "ts": "2017-12-22T08:05:22.250+00:00"}"#,
    )
    .await;
    // No ts: the time is when the bridge received it.
    let before = Utc::now();
    mqtt.publish(
        "gateways/7/plc-2",
        r#"{"d": [{"tag": "CNT.0", "value": 42}]}"#,
    )
    .await;
    mqtt.wait_acked(Duration::from_secs(10)).await;

    stack
        .wait_for_count(
            "SELECT count(*) FROM tag_reading",
            9,
            Duration::from_secs(30),
        )
        .await;
    let after = Utc::now();
    let got = rows(&stack).await;
    let row = |device: &str,
               tag: &str,
               time,
               num,
               boolean,
               text: Option<&str>,
               json: Option<&str>,
               ty: &str|
     -> Row {
        (
            device.into(),
            tag.into(),
            time,
            num,
            boolean,
            text.map(Into::into),
            json.map(Into::into),
            ty.into(),
            Some(7),
        )
    };
    let expected = [
        row(
            "plc-1",
            "AI.0",
            ts(20, 0),
            Some(12.0),
            None,
            None,
            None,
            "double precision",
        ),
        row(
            "plc-1",
            "AI.1",
            ts(20, 0),
            Some(10.0),
            None,
            None,
            None,
            "integer",
        ),
        row(
            "plc-1",
            "AI.1",
            ts(21, 0),
            Some(10.5),
            None,
            None,
            None,
            "double precision",
        ),
        row(
            "plc-1",
            "DI.0",
            ts(21, 0),
            None,
            Some(true),
            None,
            None,
            "boolean",
        ),
        row(
            "plc-1",
            "J.0",
            ts(21, 0),
            None,
            None,
            None,
            Some(r#"{"a": [1, 2]}"#),
            "jsonb",
        ),
        row("plc-1", "N.0", ts(21, 0), None, None, None, None, "text"),
        row(
            "plc-1",
            "ST.0",
            ts(21, 0),
            None,
            None,
            Some("RUN"),
            None,
            "text",
        ),
        row(
            "plc-2",
            "AI.0",
            ts(22, 250),
            Some(-1.5),
            None,
            None,
            None,
            "double precision",
        ),
    ];
    assert_eq!(got[..8], expected[..]);
    let last = &got[8];
    assert_eq!(
        (last.0.as_str(), last.1.as_str(), last.3, last.7.as_str()),
        ("plc-2", "CNT.0", Some(42.0), "integer")
    );
    assert!(
        last.2 >= before && last.2 <= after,
        "receive time {} not between {before} and {after}",
        last.2
    );

    let client = stack.db.connect().await;
    let tags: Vec<(String, String, String)> = client
        .query(
            "SELECT d.code, t.code, t.data_type FROM tag t JOIN device d ON d.id = t.device_id
             WHERE d.gateway_id = 7 ORDER BY d.code, t.code",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let tag = |d: &str, t: &str, ty: &str| (d.to_owned(), t.to_owned(), ty.to_owned());
    assert_eq!(
        tags,
        vec![
            tag("plc-1", "AI.0", "double precision"),
            // Widened on the float, and stays so.
            tag("plc-1", "AI.1", "double precision"),
            tag("plc-1", "DI.0", "boolean"),
            tag("plc-1", "J.0", "jsonb"),
            tag("plc-1", "N.0", "text"),
            tag("plc-1", "ST.0", "text"),
            tag("plc-2", "AI.0", "double precision"),
            tag("plc-2", "CNT.0", "integer"),
        ]
    );
    assert_eq!(stack.count("SELECT count(*) FROM device").await, 2);
    // Every message stored once: no dead letter, nothing left behind.
    assert!(stream_messages(&stack.nats.url(), "DEAD").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_goes_to_dead_with_the_reason_and_the_pipeline_goes_on() {
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let _all = stack.spawn(
        "all",
        &[
            ("MAX_PAYLOAD_BYTES", "1024"),
            ("MAX_READINGS_PER_MESSAGE", "3"),
        ],
    );
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    let good = r#"{"d": [{"tag": "AI.0", "value": 1.5}], "ts": "2020-01-01T00:00:00Z"}"#;
    let many = r#"{"d": [{"tag": "a"}, {"tag": "b"}, {"tag": "c"}, {"tag": "d"}]}"#;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("gateways/999/dev", good.into(), "unknown_gateway"),
        ("gateways/x/dev", good.into(), "bad_topic"),
        ("gateways/1/dev", b"{\"d\": [".to_vec(), "bad_json"),
        ("gateways/1/dev", b"".to_vec(), "bad_json"),
        ("gateways/1/dev", b"\xff\xfe{}".to_vec(), "not_utf8"),
        ("gateways/1/dev", vec![b' '; 2000], "oversized"),
        (
            "gateways/1/dev",
            br#"{"d": [{"tag": 5, "value": 1}]}"#.to_vec(),
            "bad_payload",
        ),
        (
            "gateways/1/dev",
            br#"{"d": [], "ts": "yesterday"}"#.to_vec(),
            "bad_ts",
        ),
        ("gateways/1/dev", many.into(), "too_many_readings"),
        (
            "gateways/1/dev",
            br#"{"d": [{"tag": "s", "value": "a\u0000b"}]}"#.to_vec(),
            "unstorable",
        ),
    ];
    for (topic, payload, _) in &cases {
        mqtt.publish(topic, payload.clone()).await;
    }
    mqtt.publish("gateways/1/dev", good).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;

    // The good message after the bad ones is stored: the pipeline went on.
    stack
        .wait_for_count(
            "SELECT count(*) FROM tag_reading",
            1,
            Duration::from_secs(30),
        )
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let dead = loop {
        let dead = stream_messages(&stack.nats.url(), "DEAD").await;
        if dead.len() >= cases.len() || std::time::Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead.len(), cases.len(), "one dead letter per bad message");
    let letters: Vec<DeadLetter> = dead
        .iter()
        .map(|m| {
            DeadLetter::from_parts(m.headers.as_ref(), m.payload.clone()).expect("a dead letter")
        })
        .collect();
    for (topic, payload, reason) in &cases {
        let letter = letters
            .iter()
            .find(|l| {
                l.reason.name() == *reason
                    && l.raw.topic == *topic
                    && l.raw.payload.as_ref() == payload.as_slice()
            })
            .unwrap_or_else(|| panic!("no dead letter {reason} for {topic}: {letters:#?}"));
        assert_eq!(letter.stage, "processor");
        assert!(!letter.error.is_empty());
    }
    let reasons: BTreeSet<&str> = letters.iter().map(|l| l.reason.name()).collect();
    assert_eq!(
        reasons.len(),
        cases.len() - 1,
        "every reason but bad_json's two cases is distinct"
    );
    // Nothing half-created for the refused messages.
    assert_eq!(stack.count("SELECT count(*) FROM device").await, 1);
}
