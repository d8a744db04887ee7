//! Hostile input through the real pipeline (Mosquitto, `dataviz all`, NATS, PostgreSQL): a
//! corpus of malformed topics and payloads, each with its expected outcome, a row or a dead
//! letter with its reason, and the pipeline going on. Topics the MQTT protocol forbids in a
//! PUBLISH (`+`, `#`, invalid UTF-8, NUL) are refused by Mosquitto itself: it closes the
//! connection without a PUBACK, so they never reach the bridge. docs/FAULTS.md lists the cases.

mod common;

use common::{Publisher, Stack, stream_messages};
use dataviz_core::message::DeadLetter;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What should become of a message.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// This many rows in `tag_reading` for the message's device.
    Rows(i64),
    /// A dead letter with this reason.
    Dead(&'static str),
}
use Outcome::{Dead, Rows};

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// The corpus: (topic, payload, outcome). The topics of row cases name a device of their own,
/// so that their rows can be counted apart.
fn corpus() -> Vec<(String, Vec<u8>, Outcome)> {
    let ok = |v: &str| format!(r#"{{"d": [{{"tag": "v", "value": {v}}}]}}"#).into_bytes();
    // Compact (10,000 readings stay under the size limit), each tag distinct.
    let many = |n: usize| {
        let d: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"tag":"{i}","value":1}}"#))
            .collect();
        format!(r#"{{"d": [{}]}}"#, d.join(",")).into_bytes()
    };
    let t = |device: &str| format!("gateways/1/{device}");
    let mut cases: Vec<(String, Vec<u8>, Outcome)> = vec![
        // Payloads.
        (
            t("truncated"),
            br#"{"d": [{"tag": "a", "value": 1"#.to_vec(),
            Dead("bad_json"),
        ),
        (
            t("truncated-2"),
            br#"{"d": [{"tag": "a", "va"#.to_vec(),
            Dead("bad_json"),
        ),
        (t("empty"), Vec::new(), Dead("bad_json")),
        (t("whitespace"), b"  \n ".to_vec(), Dead("bad_json")),
        (t("null"), b"null".to_vec(), Dead("bad_payload")),
        (t("array"), b"[1, 2]".to_vec(), Dead("bad_payload")),
        (t("string"), br#""d""#.to_vec(), Dead("bad_payload")),
        (
            t("d-object"),
            br#"{"d": {"tag": "a", "value": 1}}"#.to_vec(),
            Dead("bad_payload"),
        ),
        (
            t("d-missing"),
            br#"{"ts": "2024-01-01T00:00:00Z"}"#.to_vec(),
            Dead("bad_payload"),
        ),
        (
            t("tag-missing"),
            br#"{"d": [{"value": 1}]}"#.to_vec(),
            Dead("bad_payload"),
        ),
        (
            t("tag-number"),
            br#"{"d": [{"tag": 7, "value": 1}]}"#.to_vec(),
            Dead("bad_payload"),
        ),
        (
            t("tag-empty"),
            br#"{"d": [{"tag": "", "value": 1}]}"#.to_vec(),
            Dead("bad_payload"),
        ),
        (
            t("ts-number"),
            br#"{"d": [], "ts": 1514000000}"#.to_vec(),
            Dead("bad_ts"),
        ),
        (
            t("ts-month-13"),
            br#"{"d": [], "ts": "2024-13-01T00:00:00Z"}"#.to_vec(),
            Dead("bad_ts"),
        ),
        (t("nan-bare"), ok("NaN"), Dead("bad_json")),
        (t("infinity-bare"), ok("Infinity"), Dead("bad_json")),
        (t("huge-1e400"), ok("1e400"), Dead("bad_json")),
        (
            t("bom"),
            [b"\xef\xbb\xbf".as_slice(), &ok("1")].concat(),
            Dead("bad_json"),
        ),
        (
            t("not-utf8"),
            b"{\"d\": [{\"tag\": \"\xc3\x28\", \"value\": 1}]}".to_vec(),
            Dead("not_utf8"),
        ),
        (
            // UTF-16 of ASCII is valid UTF-8 (with NULs), and not JSON.
            t("utf16"),
            "{\"d\": []}"
                .encode_utf16()
                .flat_map(u16::to_le_bytes)
                .collect(),
            Dead("bad_json"),
        ),
        (t("tags-10000"), many(10_000), Dead("too_many_readings")),
        (
            t("oversized"),
            [ok("1"), vec![b' '; 300 * 1024]].concat(),
            Dead("oversized"),
        ),
        (t("nested-200"), ok(&nested(200)), Dead("bad_json")),
        (t("nested-10000"), ok(&nested(10_000)), Dead("bad_json")),
        (
            t("nul-in-text"),
            br#"{"d": [{"tag": "s", "value": "a\u0000b"}]}"#.to_vec(),
            Dead("unstorable"),
        ),
        (
            t("nul-in-tag"),
            br#"{"d": [{"tag": "a\u0000b", "value": 1}]}"#.to_vec(),
            Dead("unstorable"),
        ),
        // Accepted, with the type the value has.
        (t("nan-string"), ok(r#""NaN""#), Rows(1)),
        (t("big-1e308"), ok("1e308"), Rows(1)),
        (
            t("big-integer"),
            ok("123456789012345678901234567890"),
            Rows(1),
        ),
        (t("u64-max"), ok("18446744073709551615"), Rows(1)),
        (t("tiny-5e-324"), ok("5e-324"), Rows(1)),
        (t("nested-64"), ok(&nested(64)), Rows(1)),
        // Storage needs limits: a value at most 64 levels deep (every later stage nests it a
        // few levels more), a tag code at most 255 bytes, a ts of a four-digit year.
        (t("nested-65"), ok(&nested(65)), Dead("bad_payload")),
        (t("nested-100"), ok(&nested(100)), Dead("bad_payload")),
        (
            t("nested-object-65"),
            ok(&format!("{}1{}", r#"{"k": "#.repeat(65), "}".repeat(65))),
            Dead("bad_payload"),
        ),
        (
            t("tag-255"),
            format!(r#"{{"d": [{{"tag": "{}", "value": 1}}]}}"#, "t".repeat(255)).into_bytes(),
            Rows(1),
        ),
        (
            t("tag-8k"),
            format!(
                r#"{{"d": [{{"tag": "{}", "value": 1}}]}}"#,
                "t".repeat(8192)
            )
            .into_bytes(),
            Dead("bad_payload"),
        ),
        (
            t("ts-year-200000"),
            br#"{"d": [{"tag": "v", "value": 1}], "ts": "+200000-01-01T00:00:00Z"}"#.to_vec(),
            Dead("bad_ts"),
        ),
        (
            t("ts-year-minus-5000"),
            br#"{"d": [{"tag": "v", "value": 1}], "ts": "-5000-01-01T00:00:00"}"#.to_vec(),
            Dead("bad_ts"),
        ),
        (
            t("ts-year-9999"),
            br#"{"d": [{"tag": "v", "value": 1}], "ts": "9999-12-31T23:59:59Z"}"#.to_vec(),
            Rows(1),
        ),
        (
            t("value-missing"),
            br#"{"d": [{"tag": "v"}]}"#.to_vec(),
            Rows(1),
        ),
        (
            t("extra-fields"),
            br#"{"d": [{"tag": "v", "value": 1, "unit": "V"}], "x": 1}"#.to_vec(),
            Rows(1),
        ),
        (t("no-readings"), br#"{"d": []}"#.to_vec(), Rows(0)),
        (t("tags-1000"), many(1000), Rows(1000)),
        (t("emoji-😀"), ok(r#""😀""#), Rows(1)),
        // Topics.
        ("gateways/x/dev".into(), ok("1"), Dead("bad_topic")),
        ("gateways/0/dev".into(), ok("1"), Dead("bad_topic")),
        ("gateways/-1/dev".into(), ok("1"), Dead("bad_topic")),
        ("gateways/1.0/dev".into(), ok("1"), Dead("bad_topic")),
        ("gateways/ 1/dev".into(), ok("1"), Dead("bad_topic")),
        ("gateways/2147483648/dev".into(), ok("1"), Dead("bad_topic")),
        ("gateways//dev".into(), ok("1"), Dead("bad_topic")),
        ("gateways/1/".into(), ok("1"), Dead("bad_topic")),
        (
            format!("gateways/1/{}", "x".repeat(256)),
            ok("1"),
            Dead("bad_topic"),
        ),
        ("gateways/2/dev".into(), ok("1"), Dead("unknown_gateway")),
        (t("dots.in.the.code"), ok("1"), Rows(1)),
        (t("spaces in the code"), ok("1"), Rows(1)),
        (t(" leading-space"), ok("1"), Rows(1)),
        (t(&"y".repeat(255)), ok("1"), Rows(1)),
    ];
    // A message the bridge subscription does not match never reaches Dataviz: no outcome.
    cases.retain(|(topic, _, _)| topic.split('/').count() == 3);
    cases
}

/// An MQTT 3.1.1 PUBLISH at QoS 1 of `topic` (raw bytes: rumqttc refuses to send what the
/// protocol forbids) on a fresh connection. Returns whether the broker acknowledged it; the
/// broker refusing a topic closes the connection instead.
async fn raw_publish(port: u16, topic: &[u8], payload: &[u8]) -> bool {
    fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if n == 0 {
                break;
            }
        }
    }
    fn string(s: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("broker");
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.extend_from_slice(&[4, 0x02, 0, 30]);
    string(
        format!("hostile-{}", uuid::Uuid::now_v7().simple()).as_bytes(),
        &mut body,
    );
    let mut connect = vec![0x10];
    remaining_length(body.len(), &mut connect);
    connect.extend(body);
    stream.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await.expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "connection accepted");

    let mut body = Vec::new();
    string(topic, &mut body);
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(payload);
    let mut publish = vec![0x32];
    remaining_length(body.len(), &mut publish);
    publish.extend(body);
    if stream.write_all(&publish).await.is_err() {
        return false;
    }
    let mut puback = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut puback)).await,
        Ok(Ok(_))
    ) && puback[0] == 0x40
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_of_hostile_messages_each_gets_its_expected_outcome() {
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let _all = stack.spawn("all", &[]);
    let port = stack.mosquitto.port();

    // Refused by the broker: never acknowledged, never forwarded.
    let forbidden: [&[u8]; 7] = [
        b"gateways/1/+",
        b"gateways/+/dev",
        b"gateways/1/#",
        b"gateways/1/dev+1",
        b"gateways/1/dev#",
        b"gateways/1/\xff\xfe",
        b"gateways/1/a\0b",
    ];
    for topic in forbidden {
        assert!(
            !raw_publish(port, topic, b"{\"d\": []}").await,
            "the broker acknowledged the topic {:?}",
            String::from_utf8_lossy(topic)
        );
    }
    // Larger than Mosquitto's max_packet_size (mosquitto/mosquitto.conf): refused the same way.
    assert!(
        !raw_publish(port, b"gateways/1/too-big", &vec![b' '; 2 << 20]).await,
        "the broker acknowledged a 2 MiB message"
    );
    // The raw client works: a valid topic is acknowledged.
    assert!(
        raw_publish(
            port,
            b"gateways/1/raw-client",
            br#"{"d": [{"tag": "v", "value": 1}]}"#
        )
        .await
    );

    let cases = corpus();
    let mut mqtt = Publisher::connect(port).await;
    for (topic, payload, _) in &cases {
        mqtt.publish(topic, payload.clone()).await;
    }
    // And the pipeline goes on.
    mqtt.publish("gateways/1/last", r#"{"d": [{"tag": "v", "value": 1}]}"#)
        .await;
    mqtt.wait_acked(Duration::from_secs(30)).await;

    // The message published last is stored: everything before it was handled (the processor
    // takes RAW in order; a second is left for the other worker's last batch).
    stack
        .wait_for_count(
            "SELECT count(*) FROM tag_reading r JOIN device d ON d.id = r.device_id
             WHERE d.code = 'last'",
            1,
            Duration::from_secs(60),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead_expected = cases
        .iter()
        .filter(|(_, _, o)| matches!(o, Dead(_)))
        .count();
    let deadline = Instant::now() + Duration::from_secs(20);
    let letters: Vec<DeadLetter> = loop {
        let dead = stream_messages(&stack.nats.url(), "DEAD").await;
        if dead.len() >= dead_expected || Instant::now() > deadline {
            break dead
                .iter()
                .map(|m| DeadLetter::from_parts(m.headers.as_ref(), m.payload.clone()).unwrap())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let client = stack.db.connect().await;
    let mut wrong = Vec::new();
    for (topic, payload, expected) in &cases {
        let got = match letters
            .iter()
            .find(|l| l.raw.topic == *topic && l.raw.payload.as_ref() == payload.as_slice())
        {
            Some(letter) => Dead(letter.reason.name()),
            None => {
                let device = topic.split('/').nth(2).unwrap();
                Rows(
                    client
                        .query_one(
                            "SELECT count(*) FROM tag_reading r JOIN device d ON d.id = r.device_id
                             WHERE d.code = $1",
                            &[&device],
                        )
                        .await
                        .unwrap()
                        .get(0),
                )
            }
        };
        if got != *expected {
            let payload: String = String::from_utf8_lossy(payload).chars().take(60).collect();
            wrong.push(format!(
                "{:?} {payload:?}: expected {expected:?}, got {got:?}",
                topic.chars().take(60).collect::<String>()
            ));
        }
    }
    let devices: Vec<String> = client
        .query("SELECT code FROM device ORDER BY code", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        wrong.is_empty(),
        "unexpected outcomes:\n{}\ndevices: {devices:?}",
        wrong.join("\n")
    );
    assert_eq!(letters.len(), dead_expected, "no other dead letter");
}

/// A device code ending in a space keeps it: the bridge carries the topic in a NATS header,
/// whose values NATS trims, so spaces are percent-encoded there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_code_ending_in_a_space_keeps_it() {
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let _all = stack.spawn("all", &[]);
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    for topic in ["gateways/1/trailing-space ", "gateways/1/ "] {
        mqtt.publish(topic, r#"{"d": [{"tag": "v", "value": 1}]}"#)
            .await;
    }
    mqtt.wait_acked(Duration::from_secs(10)).await;
    stack
        .wait_for_count(
            "SELECT count(*) FROM tag_reading r JOIN device d ON d.id = r.device_id
             WHERE d.code IN ('trailing-space ', ' ')",
            2,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(stack.count("SELECT count(*) FROM device").await, 2);
}

/// One accepted payload takes no other message's readings with it: good messages around a value
/// nested at every depth from 120 to 130, one device, one burst. Every good reading is stored;
/// each nested one is a dead letter with its original topic and payload, which can be re-queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_value_takes_no_neighbour_with_it() {
    const AROUND: usize = 50;
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let _all = stack.spawn("all", &[]);
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    let topic = "gateways/1/burst";
    let mut seq = 0;
    let mut deep = Vec::new();
    for depth in 120..=130 {
        for position in 0..2 * AROUND {
            if position == AROUND {
                let payload = format!(
                    r#"{{"d": [{{"tag": "deep", "value": {}}}]}}"#,
                    nested(depth)
                );
                mqtt.publish(topic, payload.clone()).await;
                deep.push(payload);
            }
            seq += 1;
            let payload = format!(r#"{{"d": [{{"tag": "seq", "value": {seq}}}]}}"#);
            mqtt.publish(topic, payload).await;
        }
    }
    mqtt.wait_acked(Duration::from_secs(60)).await;
    let stored = "SELECT count(DISTINCT value_num)::bigint FROM tag_reading r
                  JOIN tag t ON t.id = r.tag_id WHERE t.code = 'seq'";
    stack
        .wait_for_count(
            stored,
            (deep.len() * 2 * AROUND) as i64,
            Duration::from_secs(90),
        )
        .await;
    assert_eq!(
        stack.count("SELECT count(*) FROM tag_reading").await,
        (deep.len() * 2 * AROUND) as i64,
        "every good reading once, no nested one"
    );

    let client = async_nats::connect(stack.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let letters = |messages: Vec<async_nats::jetstream::Message>| {
        messages
            .iter()
            .map(|m| {
                let seq = m.info().unwrap().stream_sequence;
                (
                    seq,
                    DeadLetter::from_parts(m.headers.as_ref(), m.payload.clone()).unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let dead = letters(stream_messages(&stack.nats.url(), "DEAD").await);
    assert_eq!(
        dead.len(),
        deep.len(),
        "one letter per nested value: {dead:?}"
    );
    for (_, letter) in &dead {
        assert_eq!(letter.raw.topic, topic);
        assert!(
            deep.iter()
                .any(|p| p.as_bytes() == letter.raw.payload.as_ref()),
            "a letter carries its original payload"
        );
        assert!(
            ["bad_payload", "bad_json"].contains(&letter.reason.name()),
            "{}",
            letter.reason
        );
    }
    // Re-queued, a letter goes through the pipeline again: refused again, alone, and back in
    // DEAD with the same payload.
    let (seq, letter) = &dead[0];
    let last = dead.iter().map(|(s, _)| *s).max().unwrap();
    dataviz_core::dead::requeue(&js, *seq).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let again = letters(stream_messages(&stack.nats.url(), "DEAD").await);
        if let Some((_, back)) = again.iter().find(|(s, _)| *s > last) {
            assert_eq!(
                (&back.raw.topic, &back.raw.payload),
                (&letter.raw.topic, &letter.raw.payload)
            );
            assert_eq!(
                again.len(),
                deep.len(),
                "the re-queued letter replaced, not added"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the re-queued message did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
