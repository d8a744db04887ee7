//! The default broker: nats-server's own MQTT listener, running the project's config
//! (`nats/`), as `scripts/start` and compose.yaml run it. A device independent of Dataviz
//! (paho-mqtt, `tests/devices/resending_device.py`) publishes; the broker is SIGKILLed under it;
//! what it acknowledged is stored, each reading once, through the bridge and with
//! `MQTT_INTAKE=nats`. And its catch: it keeps a message only for the sessions and consumers that
//! exist, so `dataviz migrate` makes the bridge's session (or the processor's consumer).

mod common;

use async_nats::jetstream::stream::RetentionPolicy as Retention;
use common::{BrokerStack, DEVICE, assert_every_numbered_message_once, count_on, spawn_logged};
use dataviz_core::message::{RawMessage, chrono_time};
use dataviz_core::streams;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts the paho device: `messages` numbered readings at `rate` a second for gateway 1, at
/// QoS 1.
fn resending_device(
    port: u16,
    messages: i64,
    rate: u32,
    acked: &std::path::Path,
) -> std::process::Child {
    resending_device_at(1, port, messages, rate, acked)
}

/// [`resending_device`] at `qos` (1 or 2).
fn resending_device_at(
    qos: u8,
    port: u16,
    messages: i64,
    rate: u32,
    acked: &std::path::Path,
) -> std::process::Child {
    let python = dataviz_testkit::workspace_root().join(".local/venv/bin/python");
    assert!(
        python.is_file(),
        "{} not found: run scripts/setup (it installs paho-mqtt there)",
        python.display()
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/devices/resending_device.py"
    );
    Command::new(python)
        .arg(script)
        .args(["--port", &port.to_string()])
        .args(["--user", DEVICE.name, "--password", DEVICE.password])
        .args(["--gateway", "1"])
        .args(["--messages", &messages.to_string()])
        .args(["--rate", &rate.to_string()])
        .arg("--acked")
        .arg(acked)
        .args(["--qos", &qos.to_string()])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python runs")
}

/// Waits for the device to end (within `timeout`); the numbers the broker acknowledged.
async fn acknowledged(
    device: &mut std::process::Child,
    acked: &std::path::Path,
    timeout: Duration,
) -> Vec<i64> {
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = device.try_wait().expect("device status") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = device.kill();
            panic!("the device did not finish within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let numbers: Vec<i64> = std::fs::read_to_string(acked)
        .expect("the device wrote what was acknowledged")
        .lines()
        .map(|line| line.parse().expect("a number"))
        .collect();
    assert!(
        status.success(),
        "the device: {status}, {} acknowledged",
        numbers.len()
    );
    numbers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_broker_sigkilled_twice_through_the_bridge_loses_nothing_and_stores_none_twice()
{
    broker_sigkilled_twice("bridge").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_broker_sigkilled_twice_loses_no_acknowledged_message_and_stores_none_twice() {
    broker_sigkilled_twice("nats").await;
}

async fn broker_sigkilled_twice(intake: &'static str) {
    const MESSAGES: i64 = 20_000;
    let mut stack = BrokerStack::start_with_intake(intake).await;
    let mut all = stack.spawn("all", &[]);
    let dir = tempfile::tempdir().unwrap();
    let acked = dir.path().join("acked");
    // 1,000 a second for 20 s. The broker (JetStream too) dies at 5 s and at 12 s, 1 s each
    // time; Dataviz is away from 4 s to 14 s, so what the device sends meanwhile must be kept
    // for it across both crashes.
    let mut device = resending_device(stack.nats.mqtt_port(), MESSAGES, 1_000, &acked);
    tokio::time::sleep(Duration::from_secs(4)).await;
    all.kill();
    for wait in [1, 6] {
        tokio::time::sleep(Duration::from_secs(wait)).await;
        stack.nats.kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stack.nats.restart();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    all.start_again();
    let numbers = acknowledged(&mut device, &acked, Duration::from_secs(240)).await;
    assert_eq!(
        numbers.len() as i64,
        MESSAGES,
        "the device got every PUBACK"
    );
    assert_every_numbered_message_once(&stack.db, MESSAGES, Duration::from_secs(180)).await;
    let log = stack.nats.log();
    assert!(
        log.matches("Starting nats-server").count() >= 3,
        "the broker started three times: {}",
        &log[log.len().saturating_sub(2000)..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_devices_publish_before_the_bridge_first_runs_is_kept_for_it() {
    published_before_dataviz_first_runs("bridge").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_devices_publish_before_the_processor_first_runs_is_kept_for_it() {
    published_before_dataviz_first_runs("nats").await;
}

async fn published_before_dataviz_first_runs(intake: &'static str) {
    let stack = BrokerStack::start_with_intake(intake).await;
    // `migrate` made the session (or the processor's consumer); nothing of Dataviz ran yet.
    let dir = tempfile::tempdir().unwrap();
    let acked = dir.path().join("acked");
    let mut device = resending_device(stack.nats.mqtt_port(), 500, 500, &acked);
    let numbers = acknowledged(&mut device, &acked, Duration::from_secs(60)).await;
    assert_eq!(numbers.len(), 500);
    let _bridge = stack.spawn("all", &[]);
    assert_every_numbered_message_once(&stack.db, 500, Duration::from_secs(60)).await;
    assert_eq!(count_on(&stack.db, "SELECT count(*) FROM device").await, 20);
}

/// Readings without `ts` are told apart only by the bridge's deduplication id (client id, packet
/// id, content) within RAW's duplicate window. nats-server sends what the bridge had not
/// acknowledged again after its `ack_wait` (20 s in nats/nats-server.conf), under the same packet
/// id, so a bridge killed mid-stream and back at once stores each reading once. Two orders are
/// met here when the machine is loaded: a redelivery stored before the first copy, which waited
/// its turn in the new bridge (RAW's copy was received later: the same message), and a
/// redelivery that reaches the bridge behind thousands of queued messages, past the default
/// window (30 s) on a loaded test machine; the window is 2 minutes here, so that the test checks
/// the recognition, not the machine's speed (README: where the guarantee stops). Under this
/// flood the bridge stores most messages in packs, whose members' redeliveries it recognises
/// itself, the new bridge from the packs it reads back when it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_without_ts_held_by_a_killed_bridge_are_stored_once() {
    const MESSAGES: i64 = 20_000;
    let stack = BrokerStack::start().await;
    const WINDOW: (&str, &str) = ("RAW_DUPLICATE_WINDOW", "2m");
    // The mqtt channel at debug: each message received, with its DUP flag.
    let bridge_env = [
        ("RUST_LOG", "info,mqtt=debug"),
        ("LOG_FORMAT", "text"),
        WINDOW,
    ];
    let mut bridge = spawn_logged("bridge", &stack.env(), &bridge_env);
    let _processor = stack.spawn("processor", &[WINDOW]);
    let _writer = stack.spawn("writer", &[WINDOW]);
    let device = publish_untimed(&stack, MESSAGES).await;
    // Mid-stream: the bridge holds messages received, some stored in RAW, not yet acknowledged.
    while common::raw_member_count(&stack.nats.url()).await < MESSAGES as u64 / 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bridge.kill();
    bridge = spawn_logged("bridge", &stack.env(), &bridge_env);
    device
        .wait_acked(Duration::from_secs(30))
        .await
        .expect("acknowledged");
    common::wait_for_count_on(&stack.db, UNTIMED_ROWS, MESSAGES, Duration::from_secs(120)).await;
    // What the broker sends again comes after its ack_wait: give it the time, then count.
    tokio::time::sleep(Duration::from_secs(25)).await;
    common::wait_drained(&stack.nats.url()).await;
    let resent = without_ansi(&bridge.log())
        .lines()
        .filter(|line| line.contains("message received") && line.contains("dup=true"))
        .count();
    eprintln!("the broker sent {resent} messages again to the new bridge");
    assert!(
        resent > 0,
        "nothing was sent again: the test did not exercise the case"
    );
    let raw = common::raw_counts(&stack.nats.url()).await;
    eprintln!(
        "RAW holds {} packs, {} raw messages",
        raw.packs, raw.members
    );
    assert!(raw.packs > 0, "no pack: the test did not exercise packs");
    assert_each_untimed_reading_once(&stack, MESSAGES).await;
    assert_eq!(raw.members, MESSAGES as u64, "RAW holds each message once");
}

/// With the nats intake a message's id is its place in nats-server's MQTT stream, whatever
/// delivery brings it: a processor killed while it holds messages without `ts`, and away longer
/// than the consumer's ack wait and RAW's duplicate window (2 s each here), stores each reading
/// once when it is back. The bridge recognises such a redelivery only within that window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_without_ts_held_by_a_processor_away_past_the_window_are_stored_once() {
    const MESSAGES: i64 = 10_000;
    let stack = BrokerStack::start_with_intake("nats").await;
    let env = [
        ("RAW_DUPLICATE_WINDOW", "2s"),
        ("ACK_WAIT", "2s"),
        ("WORKER_COUNT", "2"),
    ];
    let mut processor = stack.spawn("processor", &env);
    let _writer = stack.spawn("writer", &env);
    let device = publish_untimed(&stack, MESSAGES).await;
    // Mid-stream: the processor holds messages it has not acknowledged.
    while intake_consumer(&stack).await.delivered.stream_sequence < MESSAGES as u64 / 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    processor.kill();
    let held = intake_consumer(&stack).await.num_ack_pending;
    device
        .wait_acked(Duration::from_secs(30))
        .await
        .expect("acknowledged");
    let before = count_on(&stack.db, UNTIMED_ROWS).await;
    // Past the duplicate window and the ack wait: what it held comes again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    processor.start_again();
    common::wait_for_count_on(&stack.db, UNTIMED_ROWS, MESSAGES, Duration::from_secs(120)).await;
    common::wait_drained(&stack.nats.url()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_each_untimed_reading_once(&stack, MESSAGES).await;
    eprintln!("{before} readings before the kill; the killed processor held {held} messages");
    assert!(
        before < MESSAGES && held > 0,
        "the killed processor held messages that came again ({before} stored before, {held} \
         held): the test did not exercise the case"
    );
}

/// The processor's consumer of nats-server's MQTT stream, as the server has it.
async fn intake_consumer(stack: &BrokerStack) -> async_nats::jetstream::consumer::Info {
    let js = stack.jetstream().await;
    js.get_stream(streams::MQTT_STREAM)
        .await
        .unwrap()
        .consumer_info(streams::INTAKE_CONSUMER)
        .await
        .unwrap()
}

/// The readings [`publish_untimed`] stored.
const UNTIMED_ROWS: &str =
    "SELECT count(*) FROM tag_reading r JOIN tag t ON t.id = r.tag_id WHERE t.code = 'seq'";

/// A device publishing `messages` readings without `ts` (tag `seq`, values 0 to messages - 1)
/// for gateway 1, over ten devices; returned with the PUBACKs still coming.
async fn publish_untimed(stack: &BrokerStack, messages: i64) -> dataviz_testkit::Publisher {
    let mut device = UntimedDevice::connect(stack);
    device.send(messages).await;
    device.publisher
}

/// The device of [`publish_untimed`], numbering its readings on from one call to the next.
struct UntimedDevice {
    publisher: dataviz_testkit::Publisher,
    sent: i64,
}

impl UntimedDevice {
    fn connect(stack: &BrokerStack) -> UntimedDevice {
        let publisher = dataviz_testkit::Publisher::connect_as(
            stack.nats.mqtt_port(),
            "untimed-device",
            DEVICE.name,
            DEVICE.password,
        );
        UntimedDevice { publisher, sent: 0 }
    }

    /// Queues the next `count` readings.
    async fn send(&mut self, count: i64) {
        for i in self.sent..self.sent + count {
            let untimed = format!(r#"{{"d": [{{"tag": "seq", "value": {i}}}]}}"#);
            self.publisher
                .publish(format!("gateways/1/dev-{}", i % 10), untimed)
                .await
                .expect("published");
        }
        self.sent += count;
    }

    /// Publishes the next `count` readings, and waits until the broker acknowledged them.
    async fn publish(&mut self, count: i64) {
        self.send(count).await;
        self.publisher
            .wait_acked(Duration::from_secs(30))
            .await
            .expect("acknowledged");
    }
}

/// Every reading of [`publish_untimed`] is stored, once.
async fn assert_each_untimed_reading_once(stack: &BrokerStack, messages: i64) {
    assert_eq!(
        count_on(&stack.db, UNTIMED_ROWS).await,
        messages,
        "each reading once"
    );
    let distinct = "SELECT count(DISTINCT value_num)::bigint FROM tag_reading";
    assert_eq!(count_on(&stack.db, distinct).await, messages);
}

/// A log without its terminal colours.
fn without_ansi(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// With the nats intake, nats-server's MQTT stream is the replay store, and RAW serves re-queue.
/// A letter re-queued (its gateway made since) goes through the processor's consumer of RAW and
/// is stored once. A replay of the last hour reads the re-queued messages in RAW and every
/// message in the broker's stream, and finds each stored already, those without `ts` included.
/// The broker's stream gives a refused unit's original back. With a device's rows and the ids
/// gone, a replay of that device makes the same rows again, those without `ts` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_nats_intake_requeue_goes_through_raw_and_a_replay_reads_the_broker_s_stream() {
    let stack = BrokerStack::start_with_intake("nats").await;
    let db = stack.db.connect().await;
    db.execute("DELETE FROM gateway WHERE id = 1", &[])
        .await
        .unwrap();
    let _all = stack.spawn("all", &[]);
    let mut device = stack.publisher();
    let untimed = |i: i64| format!(r#"{{"d": [{{"tag": "untimed", "value": {i}}}]}}"#);
    for i in 0..4 {
        device.publish("gateways/1/early", timed_reading(i)).await;
    }
    device.wait_acked(Duration::from_secs(10)).await;
    dlq_list_until(&stack, 4).await;
    db.execute("INSERT INTO gateway (id, name) VALUES (1, 'one')", &[])
        .await
        .unwrap();
    // The processor believes "unknown gateway" for a second before asking again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (ok, out) = stack.dataviz(&["dlq", "requeue", "--all-matching", "--gateway", "1"]);
    assert!(ok && out.contains("re-queued 4 dead letter(s)"), "{out}");
    for i in 0..50 {
        device.publish("gateways/1/timed", timed_reading(i)).await;
        device.publish("gateways/1/untimed", untimed(i)).await;
    }
    device.wait_acked(Duration::from_secs(10)).await;
    let rows = 4 + 100;
    let all_rows = "SELECT count(*) FROM tag_reading";
    common::wait_for_count_on(&stack.db, all_rows, rows, Duration::from_secs(60)).await;
    let stored = Instant::now();

    // 4 re-queued in RAW, 104 in the broker's stream.
    let (ok, out) = stack.dataviz(&["replay", "--since", "1h"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("replayed 108 raw messages")
            && out.contains("108 already stored, 0 new (0 rows)"),
        "{out}"
    );
    common::wait_drained(&stack.nats.url()).await;
    assert_eq!(count_on(&stack.db, all_rows).await, rows, "{out}");
    let (ok, out) = stack.dataviz(&["dlq", "list"]);
    assert!(ok && out.contains("0 dead letter(s)"), "{out}");

    let js = stack.jetstream().await;
    let kept = js
        .get_stream(streams::MQTT_STREAM)
        .await
        .unwrap()
        .get_last_raw_message_by_subject("$MQTT.msgs.gateways.1.untimed")
        .await
        .unwrap();
    let raw = RawMessage::stored(
        &kept.subject,
        kept.sequence,
        chrono_time(kept.time),
        Some(&kept.headers),
        kept.payload.clone(),
    )
    .unwrap();
    assert_eq!(
        (raw.topic.as_str(), &raw.payload[..]),
        ("gateways/1/untimed", untimed(49).as_bytes())
    );
    assert_eq!(
        streams::raw_original(&js, kept.sequence, raw.id).await,
        Some(raw),
        "a refused unit's original, from the broker's stream"
    );
    assert_eq!(
        streams::raw_original(&js, kept.sequence, uuid::Uuid::now_v7()).await,
        None,
        "another message's id finds nothing"
    );

    let snapshot = "SELECT string_agg(d.code || ' ' || t.code || ' ' || r.value_num || ' ' || \
                    r.time, ',' ORDER BY d.code, t.code, r.value_num, r.time) \
                    FROM tag_reading r JOIN tag t ON t.id = r.tag_id \
                    JOIN device d ON d.id = r.device_id";
    let before: String = db.query_one(snapshot, &[]).await.unwrap().get(0);
    db.batch_execute(
        "DELETE FROM tag_reading WHERE device_id = (SELECT id FROM device WHERE code = 'untimed'); \
         DELETE FROM ingested_message",
    )
    .await
    .unwrap();
    // Within READINGS' duplicate window of the live path's messages, which may have packed
    // these fifty alone (its two loops take the device's alternate messages in turn): the
    // replay's messages are its own.
    assert!(stored.elapsed() < Duration::from_secs(120));
    let (ok, out) = stack.dataviz(&["replay", "--since", "1h", "--device", "untimed"]);
    assert!(
        ok && out.contains("replayed 108 raw messages")
            && out.contains("50 new (50 rows)")
            && out.contains("58 skipped"),
        "{out}"
    );
    common::wait_for_count_on(&stack.db, all_rows, rows, Duration::from_secs(60)).await;
    common::wait_drained(&stack.nats.url()).await;
    let after: String = db.query_one(snapshot, &[]).await.unwrap().get(0);
    assert_eq!(after, before, "the same rows again");
    assert_eq!(count_on(&stack.db, all_rows).await, rows);
}

/// What a change of intake leaves behind is named at start: the side no longer in use makes
/// nats-server keep every message for it. Both ways: the bridge's session after a change to
/// `nats`, the processor's consumer after a change back to `bridge`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_side_a_change_of_intake_leaves_behind_is_named_at_start() {
    for (made, now, holder) in [
        ("bridge", "nats", "nats-server keeps these messages"),
        ("nats", "bridge", "processor-mqtt"),
    ] {
        let stack = BrokerStack::start_with_intake(made).await;
        // Nothing of Dataviz runs: what the device sends is kept for what `migrate` made.
        let mut device = stack.publisher();
        for i in 0..10 {
            device.publish("gateways/1/left", timed_reading(i)).await;
        }
        device.wait_acked(Duration::from_secs(10)).await;
        let processor = spawn_logged("processor", &stack.env(), &[("MQTT_INTAKE", now)]);
        let intake = format!("MQTT_INTAKE={now} nothing of Dataviz reads it");
        let line = processor
            .expect_line(&[holder, &intake], "naming the holder")
            .await;
        let line = without_ansi(&line);
        assert!(line.contains("WARN") && line.contains("held=10"), "{line}");
    }
}

/// A change from the bridge to the nats intake, as a user makes it: the bridge stopped, devices
/// still publishing, `dataviz migrate` with `MQTT_INTAKE=nats`. The processor takes over where the
/// bridge's session stopped (what it held, and what came after), the session is ended so that
/// nats-server keeps nothing more for it, and each reading is stored once, those without `ts`
/// included. While a client holds the session (the bridge runs), `migrate` refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_to_the_nats_intake_takes_over_from_the_bridge_s_session() {
    const EACH: i64 = 1_000;
    let stack = BrokerStack::start_with_intake("bridge").await;
    let nats = [("MQTT_INTAKE", "nats")];
    let mut device = UntimedDevice::connect(&stack);
    let mut bridge = stack.spawn("all", &[]);
    device.publish(EACH).await;
    common::wait_for_count_on(&stack.db, UNTIMED_ROWS, EACH, Duration::from_secs(60)).await;
    let refused = common::run_dataviz(with(&stack.env(), &nats), &["migrate"]);
    assert!(
        !refused.0 && refused.1.contains("stop the bridge first"),
        "{refused:?}"
    );
    bridge.terminate(Duration::from_secs(30));
    // Kept for the stopped bridge's session.
    device.publish(EACH).await;
    let (ok, out) = common::run_dataviz(with(&stack.env(), &nats), &["migrate"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "the bridge's session (dataviz-bridge) ended; the processor takes the {EACH} \
             message(s) it held"
        )),
        "{out}"
    );
    // Kept for the processor's consumer.
    device.publish(EACH).await;
    let _all = stack.spawn("all", &nats);
    common::wait_for_count_on(&stack.db, UNTIMED_ROWS, 3 * EACH, Duration::from_secs(60)).await;
    common::wait_drained(&stack.nats.url()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_each_untimed_reading_once(&stack, 3 * EACH).await;
    // The session is gone: nats-server keeps nothing more for it.
    let (ok, out) = common::run_dataviz(with(&stack.env(), &nats), &["migrate"]);
    assert!(ok && !out.contains("the bridge's session"), "{out}");
}

/// The change back, from the nats intake to the bridge, as README's "MQTT intake" says: `dataviz
/// migrate` with `MQTT_INTAKE=bridge` while the processors still run makes the bridge's session
/// and keeps their consumer (read, saying so); once they stopped, a second `migrate` removes it,
/// drained, so that nats-server keeps nothing more for it. Each reading is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_back_to_the_bridge_removes_the_processor_s_consumer_once_drained() {
    const EACH: i64 = 500;
    let stack = BrokerStack::start_with_intake("nats").await;
    let bridge = with(&stack.env(), &[("MQTT_INTAKE", "bridge")]);
    let mut device = UntimedDevice::connect(&stack);
    let mut nats = stack.spawn("all", &[]);
    device.publish(EACH).await;
    common::wait_for_count_on(&stack.db, UNTIMED_ROWS, EACH, Duration::from_secs(60)).await;
    let kept = mqtt_stream_config(&stack).await;
    assert_eq!(
        (kept.retention, kept.max_age),
        (Retention::Limits, Duration::from_secs(7 * 86_400)),
        "the broker's stream keeps messages for RAW_RETENTION while the processor reads it"
    );
    let (ok, out) = common::run_dataviz(bridge.clone(), &["migrate"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("the bridge's session (dataviz-bridge)")
            && out.contains("processor-mqtt of nats-server's stream $MQTT_msgs is kept")
            && out.contains("a processor reads it"),
        "{out}"
    );
    nats.terminate(Duration::from_secs(30));
    let (ok, out) = common::run_dataviz(bridge.clone(), &["migrate"]);
    assert!(
        ok && out.contains(
            "processor-mqtt of nats-server's stream $MQTT_msgs held nothing and is removed"
        ),
        "{out}"
    );
    let kept = mqtt_stream_config(&stack).await;
    assert_eq!(
        (kept.retention, kept.max_age),
        (Retention::Interest, Duration::ZERO),
        "nats-server's own settings back"
    );
    // Kept for the bridge's session only.
    device.publish(EACH).await;
    let _bridged = common::spawn_role("all", bridge.clone(), &[]);
    common::wait_for_count_on(&stack.db, UNTIMED_ROWS, 2 * EACH, Duration::from_secs(60)).await;
    common::wait_drained(&stack.nats.url()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_each_untimed_reading_once(&stack, 2 * EACH).await;
    let (ok, out) = common::run_dataviz(bridge, &["migrate"]);
    assert!(ok && !out.contains("processor-mqtt"), "{out}");
}

/// With the nats intake, QoS 0 messages, which nats-server does not store, are taken as they
/// come (best effort, as the bridge takes them), and QoS 2 messages, which it stores once the
/// device released them, as QoS 1 ones are: each reading stored once, with `ts` or without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_nats_intake_qos_0_and_qos_2_messages_are_stored_once() {
    use rumqttc::QoS;
    let stack = BrokerStack::start_with_intake("nats").await;
    let all = spawn_logged("all", &stack.env(), &[("LOG_FORMAT", "text")]);
    all.expect_line(
        &["taking QoS 0 messages as they come"],
        "the QoS 0 subscription",
    )
    .await;
    let mut device = stack.publisher();
    for (qos, device_code) in [(QoS::AtMostOnce, "qos0"), (QoS::ExactlyOnce, "qos2")] {
        let topic = format!("gateways/1/{device_code}");
        for i in 0..50 {
            device.publish_at(qos, &topic, timed_reading(i)).await;
            let untimed = format!(r#"{{"d": [{{"tag": "untimed", "value": {i}}}]}}"#);
            device.publish_at(qos, &topic, untimed).await;
        }
    }
    device.wait_acked(Duration::from_secs(10)).await;
    let all_rows = "SELECT count(*) FROM tag_reading";
    common::wait_for_count_on(&stack.db, all_rows, 200, Duration::from_secs(60)).await;
    common::wait_drained(&stack.nats.url()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for code in ["qos0", "qos2"] {
        let per_device = format!(
            "SELECT count(DISTINCT (t.code, r.value_num))::bigint FROM tag_reading r \
             JOIN tag t ON t.id = r.tag_id JOIN device d ON d.id = r.device_id \
             WHERE d.code = '{code}'"
        );
        assert_eq!(count_on(&stack.db, &per_device).await, 100, "{code}");
    }
    assert_eq!(
        count_on(&stack.db, all_rows).await,
        200,
        "each reading once"
    );
}

/// The nats intake's size limits. The server takes 4 MB (`max_payload` in
/// nats/nats-server.conf); the READINGS message of a payload's readings must fit in that less
/// 1 KiB, and a dead letter in DEAD keeps its first bytes when the whole would not fit there
/// with its headers. With the processor's own limit raised over them (`MAX_PAYLOAD_BYTES`): a
/// payload 2 KiB under the server's limit whose readings fit is stored; one of the same size
/// whose value takes more room in READINGS (an array of `1E9`, each written out as
/// `1000000000.0`), and one unreadable nearly as large as the server takes, go to DEAD, whole
/// (beside their letters); the message after them is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_nats_intake_payloads_at_the_size_limits_are_stored_or_dead_whole() {
    const MAX_PAYLOAD: usize = 4 * 1024 * 1024;
    const LIMIT: usize = MAX_PAYLOAD - 2048;
    let stack = BrokerStack::start_with_intake("nats").await;
    let _all = stack.spawn("all", &[("MAX_PAYLOAD_BYTES", "8388608")]);
    // One text reading; the payload `size` bytes long.
    let text = |size: usize, second: u32| {
        let head = r#"{"d": [{"tag": "big", "value": ""#;
        let tail = format!(r#""}}], "ts": "2024-01-01T00:00:{second:02}Z"}}"#);
        format!("{head}{}{tail}", "x".repeat(size - head.len() - tail.len()))
    };
    // A JSON value of numbers in exponent form: READINGS holds each written out, four times
    // its bytes in the payload.
    let wide = {
        let head = r#"{"d": [{"tag": "big", "value": ["#;
        let tail = r#"]}], "ts": "2024-01-01T00:00:02Z"}"#;
        let room = LIMIT - head.len() - tail.len();
        let numbers = vec!["1E9"; (room + 1) / 4].join(",");
        format!("{head}{numbers}{}{tail}", " ".repeat(room - numbers.len()))
    };
    assert_eq!(wide.len(), LIMIT);
    // The MQTT message's header in the broker's stream takes some 30 bytes.
    let unreadable = "{".repeat(MAX_PAYLOAD - 512);
    let mut device = stack.publisher();
    device.publish("gateways/1/fits", text(LIMIT, 1)).await;
    device.publish("gateways/1/readings-over", wide).await;
    device.publish("gateways/1/unreadable", unreadable).await;
    device.publish("gateways/1/after", timed_reading(4)).await;
    device.wait_acked(Duration::from_secs(30)).await;

    let rows = "SELECT count(*) FROM tag_reading";
    common::wait_for_count_on(&stack.db, rows, 2, Duration::from_secs(60)).await;
    let stored = format!(
        "SELECT count(*) FROM tag_reading r JOIN device d ON d.id = r.device_id \
         WHERE (d.code = 'fits' AND length(r.value_text) = {}) OR d.code = 'after'",
        LIMIT - 66
    );
    let listed = dlq_list_until(&stack, 2).await;
    let id_of = |topic: &str| {
        listed
            .lines()
            .find(|l| l.contains(topic))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("{topic} in {listed}"))
            .to_owned()
    };
    let (ok, shown) = stack.dataviz(&["dlq", "show", &id_of("gateways/1/readings-over")]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains(&format!("payload:      {LIMIT} bytes, kept whole"))
            && shown.contains("in READINGS, over what the NATS server accepts"),
        "{shown}"
    );
    let (ok, shown) = stack.dataviz(&["dlq", "show", &id_of("gateways/1/unreadable")]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains(&format!(
            "payload:      {} bytes, kept whole",
            MAX_PAYLOAD - 512
        )) && shown.contains("bad_json"),
        "{shown}"
    );
    common::wait_drained(&stack.nats.url()).await;
    assert_eq!(count_on(&stack.db, &stored).await, 2);
    assert_eq!(count_on(&stack.db, rows).await, 2, "nothing else stored");
}

/// A topic too long for a header through the nats intake: NATS takes headers of 64 KiB at most,
/// where MQTT allows 65,535 bytes of topic, and a dead letter holds its topic in one. The
/// processor's letter (`bad_topic`: its device code is over 255 bytes) keeps the topic's
/// beginning and says so, rather than being refused by DEAD again and again; the message after
/// it is stored. At QoS 0 (not stored by nats-server, the processor stores it in RAW) the same
/// topic is a letter too, one that could never go to RAW.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_nats_intake_a_topic_too_long_for_a_header_is_a_dead_letter() {
    use rumqttc::QoS;
    let stack = BrokerStack::start_with_intake("nats").await;
    let _all = stack.spawn("all", &[]);
    // 40,000 bytes of `é`: 120,000 escaped in a header.
    let too_long = format!("gateways/1/{}", "é".repeat(20_000));
    let mut device = stack.publisher();
    device.publish(&too_long, timed_reading(1)).await;
    device.publish("gateways/1/after", timed_reading(2)).await;
    device.wait_acked(Duration::from_secs(30)).await;

    let rows = "SELECT count(*) FROM tag_reading";
    common::wait_for_count_on(&stack.db, rows, 1, Duration::from_secs(60)).await;
    let listed = dlq_list_until(&stack, 1).await;
    let show = |listed: &str, error: &str| {
        let shown = listed
            .lines()
            .filter(|l| l.contains("bad_topic"))
            .filter_map(|l| l.split_whitespace().next())
            .map(|id| stack.dataviz(&["dlq", "show", id]).1)
            .find(|shown| shown.contains(error));
        let shown = shown.unwrap_or_else(|| panic!("a bad_topic letter \"{error}\" in {listed}"));
        assert!(
            shown.contains("the topic takes 40011 bytes, the first "),
            "{shown}"
        );
    };
    show(&listed, "longer than 255 bytes");

    // Published once `all` stored a message: its subscription to QoS 0 messages is up.
    device
        .publish_at(QoS::AtMostOnce, &too_long, timed_reading(3))
        .await;
    let listed = dlq_list_until(&stack, 2).await;
    show(&listed, "longer than any topic Dataviz reads");
    common::wait_drained(&stack.nats.url()).await;
    assert_eq!(count_on(&stack.db, rows).await, 1, "nothing else stored");
}

/// A QoS 2 device that is not ours (paho-mqtt, persistent session) through the nats intake,
/// `dataviz all` SIGKILLed mid-run and back a second later: nats-server stores a QoS 2 message
/// in its stream once the device released it, and each reading the device got a PUBCOMP for is
/// stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_2_device_not_ours_loses_nothing_through_the_nats_intake_when_dataviz_dies() {
    const MESSAGES: i64 = 3_000;
    let stack = BrokerStack::start_with_intake("nats").await;
    let mut all = stack.spawn("all", &[]);
    let dir = tempfile::tempdir().unwrap();
    let acked = dir.path().join("acked");
    let mut device = resending_device_at(2, stack.nats.mqtt_port(), MESSAGES, 1_000, &acked);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    all.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    all.start_again();
    let numbers = acknowledged(&mut device, &acked, Duration::from_secs(60)).await;
    assert_eq!(
        numbers.len() as i64,
        MESSAGES,
        "the device got every PUBCOMP"
    );
    assert_every_numbered_message_once(&stack.db, MESSAGES, Duration::from_secs(60)).await;
}

/// `env` with `extra` set over it.
fn with(env: &[(String, String)], extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<_> = env
        .iter()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .cloned()
        .collect();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// The settings of nats-server's MQTT stream, as the server has them.
async fn mqtt_stream_config(stack: &BrokerStack) -> async_nats::jetstream::stream::Config {
    let js = stack.jetstream().await;
    let mut stream = js.get_stream(streams::MQTT_STREAM).await.unwrap();
    stream.info().await.unwrap().config.clone()
}

fn timed_reading(i: i64) -> String {
    format!(r#"{{"d": [{{"tag": "seq", "value": {i}}}], "ts": "2024-01-01T00:00:{i:02}Z"}}"#)
}

/// `dataviz dlq list`, again until it lists `letters` dead letters (30 s at most); its output.
/// DEAD is made by `all` as it starts.
async fn dlq_list_until(stack: &BrokerStack, letters: usize) -> String {
    let expected = format!("{letters} dead letter(s)");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = stack.dataviz(&["dlq", "list"]);
        if ok && out.contains(&expected) {
            return out;
        }
        assert!(Instant::now() < deadline, "{expected}: {out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// nats-server's MQTT stream at its size limit (`RAW_MAX_BYTES`), its messages aging out fast
/// (`RAW_RETENTION`): the broker refuses what does not fit, with no PUBACK, and the device (paho,
/// persistent session) sends it again; each reading it got a PUBACK for is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_nats_intake_a_full_broker_stream_refuses_and_the_device_sends_again() {
    const MESSAGES: i64 = 1_500;
    let stack = BrokerStack::start_with_intake("nats").await;
    let limits = [
        ("RAW_MAX_BYTES", "131072"),
        ("RAW_RETENTION", "1s"),
        ("RAW_DUPLICATE_WINDOW", "1s"),
    ];
    let (ok, out) = common::run_dataviz(with(&stack.env(), &limits), &["migrate"]);
    assert!(ok, "{out}");
    let config = mqtt_stream_config(&stack).await;
    assert_eq!(
        (config.max_bytes, config.max_age),
        (131_072, Duration::from_secs(1))
    );
    let _all = stack.spawn("all", &limits);
    let dir = tempfile::tempdir().unwrap();
    let acked = dir.path().join("acked");
    let mut device = resending_device(stack.nats.mqtt_port(), MESSAGES, 1_000, &acked);
    let numbers = acknowledged(&mut device, &acked, Duration::from_secs(170)).await;
    assert_eq!(
        numbers.len() as i64,
        MESSAGES,
        "the device got every PUBACK"
    );
    assert_every_numbered_message_once(&stack.db, MESSAGES, Duration::from_secs(60)).await;
    let log = stack.nats.log();
    let refused = log
        .lines()
        .filter(|l| l.contains("maximum bytes exceeded") && l.contains("closing the connection"))
        .count();
    assert!(refused > 0, "the broker refused no message:\n{log}");
    eprintln!("the broker refused {refused} time(s)");
    // And past RAW_RETENTION, nothing is left in the stream.
    let js = stack.jetstream().await;
    let mut stream = js.get_stream(streams::MQTT_STREAM).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = stream.info().await.unwrap().state.clone();
        if state.messages == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still in the stream: {state:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
