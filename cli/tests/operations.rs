//! Operations: replay, dead letters, readiness and metrics, graceful shutdown; against real
//! servers, with the `dataviz` binary.

mod common;

use common::{Publisher, Stack, http_get, wait_drained};
use dataviz_testkit::free_port;
use std::time::{Duration, Instant};

fn dataviz(stack: &Stack, args: &[&str]) -> (bool, String) {
    common::run_dataviz(stack.env(), args)
}

/// `dataviz dlq list <filter>`, again until its output contains `expected` (20 s at most);
/// the last output. Until `all` has created the streams, the command says DEAD does not exist.
async fn dlq_list_until(stack: &Stack, filter: &[&str], expected: &str) -> String {
    let args: Vec<&str> = ["dlq", "list"].iter().chain(filter).copied().collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out) = dataviz(stack, &args);
        if ok && out.contains(expected) || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn reading(i: i64) -> String {
    format!(
        r#"{{"d": [{{"tag": "seq", "value": {i}}}, {{"tag": "AI.0", "value": 1.5}}], "ts": "2024-01-01T00:00:{:02}.{:03}Z"}}"#,
        i / 1000 % 60,
        i % 1000
    )
}

/// Waits until `tag_reading` holds `rows` rows, within 30 s.
async fn wait_for_rows(stack: &Stack, rows: i64) {
    stack
        .wait_for_count(
            "SELECT count(*) FROM tag_reading",
            rows,
            Duration::from_secs(30),
        )
        .await;
}

/// A reading without `ts`: its time is when it was received, so identical ones are distinct.
fn untimed(i: i64) -> String {
    format!(r#"{{"d": [{{"tag": "untimed", "value": {}}}]}}"#, i % 3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_replayed_twice_a_day_apart_writes_nothing_new() {
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    // Pruning at once: the ids a day old must survive it.
    let mut all = stack.spawn("all", &[("RETENTION_CHECK_EVERY", "1s")]);
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    for i in 0..500 {
        mqtt.publish(&format!("gateways/1/dev-{}", i % 5), reading(i))
            .await;
        if i % 5 == 0 {
            mqtt.publish("gateways/1/untimed", untimed(i)).await;
        }
    }
    mqtt.wait_acked(Duration::from_secs(20)).await;
    let rows = 1000 + 100;
    stack
        .wait_for_count(
            "SELECT count(*) FROM tag_reading",
            rows,
            Duration::from_secs(60),
        )
        .await;

    for day in 0..2 {
        let (ok, out) = dataviz(&stack, &["replay", "--since", "1h"]);
        assert!(ok, "day {day}: {out}");
        assert!(
            out.contains("replayed 600 raw messages"),
            "day {day}: {out}"
        );
        assert!(
            out.contains("600 already stored, 0 new (0 rows)"),
            "day {day}: {out}"
        );
        wait_drained(&stack.nats.url()).await;
        assert_eq!(stack.count("SELECT count(*) FROM tag_reading").await, rows);
        // A day passes for the database (RAW's own clock cannot be moved), and the writer
        // starts again, pruning what it no longer needs within its first second.
        stack
            .db
            .connect()
            .await
            .execute(
                "UPDATE ingested_message SET ingested_at = ingested_at - interval '1 day'",
                &[],
            )
            .await
            .unwrap();
        all.kill();
        all = stack.spawn("all", &[("RETENTION_CHECK_EVERY", "1s")]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            stack.count("SELECT count(*) FROM ingested_message").await,
            600,
            "day {day}: ids kept"
        );
    }

    // The devices send the messages with `ts` again (new packets, new raw messages): their
    // content names them, nothing new is stored.
    for i in 0..500 {
        mqtt.publish(&format!("gateways/1/dev-{}", i % 5), reading(i))
            .await;
    }
    mqtt.wait_acked(Duration::from_secs(20)).await;
    wait_drained(&stack.nats.url()).await;
    assert_eq!(stack.count("SELECT count(*) FROM tag_reading").await, rows);

    // One device, dry run: reads, creates and publishes nothing.
    let (ok, out) = dataviz(
        &stack,
        &["replay", "--since", "1h", "--device", "dev-1", "--dry-run"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("dry run: 1100 raw messages read, 900 skipped"),
        "{out}"
    );
    // The device's first messages and their copies: a dry run does not look at storage.
    assert!(out.contains("200  would be processed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_requeued_once_its_gateway_exists_is_ingested_once() {
    let stack = Stack::start().await;
    let _all = stack.spawn("all", &[]);
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    for i in 0..4 {
        mqtt.publish("gateways/5/early-device", reading(i)).await;
    }
    mqtt.publish("gateways/6/other", reading(9)).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;

    let listed = dlq_list_until(&stack, &["--gateway", "5"], "4 dead letter(s)").await;
    assert!(
        listed.contains("unknown_gateway") && listed.contains("gateways/5/early-device"),
        "{listed}"
    );
    let first_id = listed
        .lines()
        .find(|l| l.contains("early-device"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let (ok, shown) = dataviz(&stack, &["dlq", "show", &first_id]);
    assert!(
        ok && shown.contains("reason:       unknown_gateway") && shown.contains(r#""tag": "seq""#),
        "{shown}"
    );

    stack.create_gateway(5).await;
    // The processor believes "unknown gateway" for a second before asking again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The device sends its last message again, and this copy is stored: the letter's readings
    // are stored after all, and its re-queue must add nothing.
    mqtt.publish("gateways/5/early-device", reading(3)).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    wait_for_rows(&stack, 2).await;
    let (ok, out) = dataviz(
        &stack,
        &[
            "dlq",
            "requeue",
            "--all-matching",
            "--reason",
            "unknown_gateway",
            "--gateway",
            "5",
        ],
    );
    assert!(ok && out.contains("re-queued 4 dead letter(s)"), "{out}");
    wait_for_rows(&stack, 8).await;
    wait_drained(&stack.nats.url()).await;
    assert_eq!(
        stack.count("SELECT count(*) FROM tag_reading").await,
        8,
        "four messages of two readings, each once"
    );
    let (ok, out) = dataviz(&stack, &["dlq", "list"]);
    assert!(
        ok && out.contains("1 dead letter(s)") && out.contains("gateways/6/other"),
        "{out}"
    );
    let (ok, out) = dataviz(&stack, &["dlq", "purge", "--reason", "unknown_gateway"]);
    assert!(ok && out.contains("would delete 1"), "{out}");
    let (ok, out) = dataviz(
        &stack,
        &["dlq", "purge", "--reason", "unknown_gateway", "--yes"],
    );
    assert!(ok && out.contains("deleted 1"), "{out}");
    let (_, out) = dataviz(&stack, &["dlq", "list"]);
    assert!(out.contains("0 dead letter(s)"), "{out}");
}

async fn wait_status(port: u16, path: &str, want: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let got = http_get(port, path).await;
        if let Some((status, body)) = &got
            && *status == want
        {
            return body.clone();
        }
        assert!(
            Instant::now() < deadline,
            "GET {path}: wanted {want}, got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_is_not_ready_while_the_broker_is_down() {
    let mut stack = Stack::start().await;
    stack.create_gateway(1).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _bridge = stack.spawn("bridge", &[("HTTP_ADDR", &addr)]);
    wait_status(port, "/readyz", 200, Duration::from_secs(20)).await;

    stack.mosquitto.kill();
    let why = wait_status(port, "/readyz", 503, Duration::from_secs(20)).await;
    assert!(why.contains("mqtt: not connected"), "{why}");
    stack.mosquitto.restart();
    wait_status(port, "/readyz", 200, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_nats_is_down_and_recovers() {
    let mut stack = Stack::start().await;
    stack.create_gateway(1).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _all = stack.spawn("all", &[("HTTP_ADDR", &addr)]);
    wait_status(port, "/readyz", 200, Duration::from_secs(20)).await;
    assert_eq!(http_get(port, "/healthz").await.unwrap().0, 200);

    stack.nats.kill();
    let why = wait_status(port, "/readyz", 503, Duration::from_secs(20)).await;
    assert!(why.contains("nats"), "{why}");
    assert_eq!(
        http_get(port, "/healthz").await.unwrap().0,
        200,
        "alive all the same"
    );
    stack.nats.restart();
    wait_status(port, "/readyz", 200, Duration::from_secs(30)).await;

    // And the pipeline works again, its metrics counting.
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    mqtt.publish("gateways/1/d", reading(1)).await;
    mqtt.publish("gateways/404/d", reading(2)).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    wait_for_rows(&stack, 2).await;
    let metrics = wait_status(port, "/metrics", 200, Duration::from_secs(5)).await;
    for line in [
        "dataviz_bridge_messages_received_total 2",
        "dataviz_processor_messages_total{outcome=\"readings\"} 1",
        "dataviz_dead_letters_total{stage=\"processor\",reason=\"unknown_gateway\"} 1",
        "dataviz_writer_rows_total 2",
        "dataviz_end_to_end_latency_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

/// NATS hanging (SIGSTOP) for the first 12 s of `dataviz all`: its connection and its
/// requests go unanswered past the client's timeouts (5 s to connect, 10 s a request). It
/// answers /healthz, says it is not ready while it starts, waits instead of stopping, and once
/// NATS answers it is ready and carries readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_hanging_while_dataviz_starts_stops_nothing() {
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    stack.nats.pause();
    let paused = Instant::now();
    let mut all = stack.spawn("all", &[("HTTP_ADDR", &addr)]);
    wait_status(port, "/healthz", 200, Duration::from_secs(20)).await;
    let (status, why) = http_get(port, "/readyz").await.expect("/readyz answers");
    assert!(status == 503 && why.contains("starting"), "{status} {why}");
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(paused.elapsed())).await;
    stack.nats.resume();
    wait_status(port, "/readyz", 200, Duration::from_secs(60)).await;
    assert!(all.is_running(), "dataviz all stopped");
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    mqtt.publish("gateways/1/d", reading(1)).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    wait_for_rows(&stack, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_loses_nothing() {
    const MESSAGES: i64 = 5_000;
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let mut all = stack.spawn("all", &[("SHUTDOWN_TIMEOUT", "20s")]);
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    for i in 0..MESSAGES {
        mqtt.publish(&format!("gateways/1/dev-{}", i % 10), reading(i))
            .await;
        if i == MESSAGES / 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let started = Instant::now();
            let code = all.terminate(Duration::from_secs(25));
            assert_eq!(code, Some(0), "clean exit on SIGTERM");
            assert!(started.elapsed() < Duration::from_secs(20));
            all.start_again();
        }
    }
    mqtt.wait_acked(Duration::from_secs(30)).await;
    stack
        .wait_for_count(
            "SELECT count(*) FROM tag_reading",
            2 * MESSAGES,
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(
        stack
            .count("SELECT count(DISTINCT value_num)::bigint FROM tag_reading r JOIN tag t ON t.id = r.tag_id WHERE t.code = 'seq'")
            .await,
        MESSAGES
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_past_retention_are_deleted_on_plain_postgresql() {
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let _all = stack.spawn(
        "all",
        &[
            ("READINGS_RETENTION", "30d"),
            ("RETENTION_CHECK_EVERY", "1s"),
        ],
    );
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    let old = (chrono::Utc::now() - chrono::Duration::days(60)).to_rfc3339();
    let recent = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    for ts in [&old, &recent] {
        let payload = format!(r#"{{"d": [{{"tag": "AI.0", "value": 1.5}}], "ts": "{ts}"}}"#);
        mqtt.publish("gateways/1/d", payload).await;
    }
    mqtt.wait_acked(Duration::from_secs(10)).await;
    stack
        .wait_for_count(
            "SELECT count(*) FROM ingested_message",
            2,
            Duration::from_secs(30),
        )
        .await;
    stack
        .wait_for_count(
            "SELECT count(*) FROM tag_reading WHERE time > now() - interval '30 days'",
            1,
            Duration::from_secs(10),
        )
        .await;
    // The old row goes (rows decrease here: wait_for_count expects them to grow).
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.count("SELECT count(*) FROM tag_reading").await != 1 {
        assert!(
            Instant::now() < deadline,
            "the 60-day-old reading is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        stack.count("SELECT count(*) FROM ingested_message").await,
        2,
        "ids kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_publisher_cannot_reach_its_hub() {
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let nowhere = format!("http://127.0.0.1:{}/.well-known/mercure", free_port());
    let _bridge = stack.spawn("bridge", &[]);
    let _processor = stack.spawn("processor", &[]);
    let _publisher = stack.spawn(
        "publisher",
        &[
            ("HTTP_ADDR", &addr),
            // Longer than the first redelivery delays (0.1 s doubling): a batch handed back
            // again and again must not count as progress.
            ("READY_STALL_AFTER", "8s"),
            ("MERCURE_URL", &nowhere),
            (
                "MERCURE_PUBLISHER_JWT_KEY",
                "a-key-for-a-hub-that-is-not-there",
            ),
        ],
    );
    wait_status(port, "/readyz", 200, Duration::from_secs(20)).await;
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    mqtt.publish("gateways/1/d", reading(1)).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    let why = wait_status(port, "/readyz", 503, Duration::from_secs(20)).await;
    assert!(
        why.contains("publisher: 1 messages waiting and no progress"),
        "{why}"
    );
}

/// A letter the bridge makes (a payload larger than the NATS server takes) holds only the
/// payload's beginning, and the whole is kept beside it: once the operator raises the server's
/// `max_payload`, `dlq requeue` sends the original whole, and its readings are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_the_bridge_makes_keeps_the_original_whole_and_requeues_into_rows() {
    let mut stack = Stack::start().await;
    stack.create_gateway(8).await;
    stack.nats.restart_with_config("max_payload: 512KB");
    let processor_limit = [("MAX_PAYLOAD_BYTES", "1048576")];
    let mut all = stack.spawn("all", &processor_limit);
    // 700 KB: over what NATS takes, under Mosquitto's packet limit and the processor's.
    let long: String = "0123456789".repeat(35_000);
    let payload = format!(
        r#"{{"d": [{{"tag": "big.0", "value": "{long}"}}, {{"tag": "big.1", "value": "{long}"}}], "ts": "2024-01-01T00:00:00Z"}}"#
    );
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    mqtt.publish("gateways/8/large", payload.as_str()).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;

    let listed = dlq_list_until(&stack, &["--reason", "oversized"], "1 dead letter(s)").await;
    assert!(
        listed.contains("bridge") && listed.contains(&payload.len().to_string()),
        "the letter, with the whole payload's size: {listed}"
    );
    let id = listed
        .lines()
        .find(|l| l.contains("gateways/8/large"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let (ok, shown) = dataviz(&stack, &["dlq", "show", &id]);
    assert!(
        ok && shown.contains(&format!(
            "payload:      {} bytes, kept whole",
            payload.len()
        )),
        "{shown}"
    );
    let message_id = shown
        .lines()
        .find_map(|l| l.strip_prefix("message id:"))
        .map(str::trim)
        .unwrap()
        .to_owned();
    let client = async_nats::connect(stack.nats.url()).await.unwrap();
    let kept = async_nats::jetstream::new(client)
        .get_object_store(dataviz_core::streams::DEAD_PAYLOADS_BUCKET)
        .await
        .unwrap()
        .info(&message_id)
        .await
        .unwrap();
    assert_eq!(kept.size, payload.len(), "the whole payload is kept");

    // Still too large for the server: refused with the reason, the letter stays.
    let (ok, out) = dataviz(&stack, &["dlq", "requeue", &id]);
    assert!(
        !ok && out.contains("raise the server's max_payload"),
        "{out}"
    );

    all.kill();
    stack.nats.restart_with_config("");
    let _all = stack.spawn("all", &processor_limit);
    let (ok, out) = dataviz(&stack, &["dlq", "requeue", &id]);
    assert!(ok && out.contains("re-queued 1 dead letter(s)"), "{out}");
    stack
        .wait_for_count(
            "SELECT count(*) FROM tag_reading WHERE length(value_text) = 350000",
            2,
            Duration::from_secs(30),
        )
        .await;
    let (ok, out) = dataviz(&stack, &["dlq", "list"]);
    assert!(ok && out.contains("0 dead letter(s)"), "{out}");
    let client = async_nats::connect(stack.nats.url()).await.unwrap();
    let whole = async_nats::jetstream::new(client)
        .get_object_store(dataviz_core::streams::DEAD_PAYLOADS_BUCKET)
        .await
        .unwrap()
        .get(message_id)
        .await;
    assert!(
        whole.is_err(),
        "the whole payload is removed with its letter"
    );
}

/// The topic travels in RAW's header, escaped, and NATS takes headers of 64 KiB at most, where
/// MQTT allows 65,535 bytes of topic. At the bridge: a payload that would fit beside a short
/// topic but not beside its own long one is a dead letter `oversized`, whole; a topic too long
/// for a header is one `bad_topic`, keeping the topic's beginning. Neither is a store retried
/// for ever, and the message after them is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_whose_long_topics_do_not_fit_in_raw_are_dead_letters_of_the_bridge() {
    let mut stack = Stack::start().await;
    stack.create_gateway(8).await;
    stack.nats.restart_with_config("max_payload: 512KB");
    let _all = stack.spawn("all", &[("MAX_PAYLOAD_BYTES", "1048576")]);
    // 8 KiB under the server's limit; its topic, 5,000 bytes of `é`, takes 15,000 escaped.
    let payload = format!(
        r#"{{"d": [{{"tag": "v", "value": "{}"}}]}}"#,
        "0".repeat(512 * 1024 - 8 * 1024)
    );
    let long = format!("gateways/8/{}", "é".repeat(2_500));
    // 40,000 bytes of `é`: 120,000 escaped.
    let too_long = format!("gateways/8/{}", "é".repeat(20_000));
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    mqtt.publish(&long, payload.as_str()).await;
    mqtt.publish(&too_long, reading(1)).await;
    mqtt.publish("gateways/8/after", reading(2)).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;

    let listed = dlq_list_until(&stack, &[], "2 dead letter(s)").await;
    assert!(listed.contains("2 dead letter(s)"), "{listed}");
    let line = |reason: &str| {
        listed
            .lines()
            .find(|l| l.contains(reason))
            .unwrap_or_else(|| panic!("a letter {reason}: {listed}"))
            .to_owned()
    };
    let oversized = line("oversized");
    assert!(
        oversized.contains("bridge") && oversized.contains(&payload.len().to_string()),
        "the letter, with the whole payload's size: {oversized}"
    );
    let id = oversized.split_whitespace().next().unwrap();
    let (ok, shown) = dataviz(&stack, &["dlq", "show", id]);
    assert!(
        ok && shown.contains(&format!(
            "payload:      {} bytes, kept whole",
            payload.len()
        )) && shown.contains(&long),
        "{shown}"
    );
    let bad_topic = line("bad_topic");
    assert!(bad_topic.contains("bridge"), "{bad_topic}");
    let id = bad_topic.split_whitespace().next().unwrap();
    let (ok, shown) = dataviz(&stack, &["dlq", "show", id]);
    assert!(
        ok && shown.contains("the topic takes 40011 bytes, the first ")
            && shown.contains(&reading(1)),
        "{shown}"
    );
    wait_for_rows(&stack, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_are_kept_while_a_copy_can_come_back_and_pruned_from_the_first_minute() {
    let stack = Stack::start().await;
    let db = stack.db.connect().await;
    // A busy table, and two ids on either side of the horizon: RAW keeps 2 days, DEAD 3, so
    // ids are kept 4 days (the longer of the two, plus a day).
    db.batch_execute(
        "INSERT INTO ingested_message (id) SELECT gen_random_uuid() FROM generate_series(1, 100000);
         INSERT INTO ingested_message (id, ingested_at) VALUES
             (gen_random_uuid(), now() - interval '4 days' + interval '1 hour'),
             (gen_random_uuid(), now() - interval '4 days' - interval '1 hour');
         ANALYZE ingested_message",
    )
    .await
    .unwrap();
    let plan: Vec<String> = db
        .query(
            "EXPLAIN SELECT id FROM ingested_message
             WHERE ingested_at < now() - '4 days'::text::interval LIMIT 10000",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        plan.iter()
            .any(|line| line.contains("ingested_message_ingested_at_idx")),
        "the prune finds old ids by index: {plan:#?}"
    );

    // The default RETENTION_CHECK_EVERY (an hour): the first pass comes within the first minute.
    let started = Instant::now();
    let _all = stack.spawn("all", &[("RAW_RETENTION", "2d"), ("DEAD_RETENTION", "3d")]);
    while stack.count("SELECT count(*) FROM ingested_message").await != 100_001 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the id past the horizon is still there after a minute"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        stack
            .count("SELECT count(*) FROM ingested_message WHERE ingested_at < now() - interval '3 days'")
            .await,
        1,
        "the id inside the horizon is kept"
    );
}

/// A pack in RAW (`dataviz_core::pack`): each member is processed as the same message stored
/// alone would be. The good ones are stored; each refused one is a dead letter of its own,
/// holding that member, re-queued alone; a pack that cannot be read is one letter, whole.
/// Replay reads members, by gateway and device. The processor takes two members at a time
/// (`PROCESSOR_BATCH_SIZE`), so a pack's are handled in several steps and settled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_in_raw_is_processed_refused_and_replayed_member_by_member() {
    use dataviz_core::{message::RawMessage, pack, streams};
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let all = stack.spawn("all", &[("PROCESSOR_BATCH_SIZE", "2")]);
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let members = [
        RawMessage::received("gateways/1/dev-a".into(), reading(1).into()),
        RawMessage::received("gateways/1/dev-b".into(), reading(2).into()),
        RawMessage::received("gateways/77/dev-a".into(), reading(3).into()),
        RawMessage::received("gateways/1/dev-a".into(), "not json".into()),
        RawMessage::received("gateways/1/dev-b".into(), reading(4).into()),
    ];
    let cut_short = pack::encode(&members[..1]);
    let cut_short = cut_short.slice(..cut_short.len() - 1);
    // RAW exists once `all` is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while js.get_stream(streams::RAW_STREAM).await.is_err() {
        assert!(Instant::now() < deadline, "RAW made by `all`");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for payload in [pack::encode(&members), cut_short] {
        streams::publish_stored(
            &js,
            streams::RAW_PACK_SUBJECT.into(),
            pack::headers(),
            payload,
        )
        .await
        .unwrap();
    }

    wait_for_rows(&stack, 6).await;
    let listed = dlq_list_until(&stack, &[], "3 dead letter(s)").await;
    for reason in ["unknown_gateway", "bad_json", "foreign_message"] {
        assert!(listed.contains(reason), "{reason} in {listed}");
    }
    let letter = |reason: &str| {
        listed
            .lines()
            .find(|l| l.contains(reason))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_owned()
    };
    let (ok, shown) = dataviz(&stack, &["dlq", "show", &letter("bad_json")]);
    assert!(
        ok && shown.contains("gateways/1/dev-a") && shown.contains("not json"),
        "{shown}"
    );
    let (ok, shown) = dataviz(&stack, &["dlq", "show", &letter("foreign_message")]);
    assert!(ok && shown.contains("is cut short or malformed"), "{shown}");

    stack.create_gateway(77).await;
    // The processor believes "unknown gateway" for a second before asking again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (ok, out) = dataviz(&stack, &["dlq", "requeue", &letter("unknown_gateway")]);
    assert!(ok && out.contains("re-queued 1 dead letter(s)"), "{out}");
    wait_for_rows(&stack, 8).await;
    wait_drained(&stack.nats.url()).await;

    // Gateway 1's device dev-b: two members of the pack. The pack cut short and the members of
    // other devices or gateways are skipped; the re-queued message, on gateway 77's subject, is
    // not read.
    let (ok, out) = dataviz(
        &stack,
        &[
            "replay",
            "--since",
            "1h",
            "--gateway",
            "1",
            "--device",
            "dev-b",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("replayed 6 raw messages"), "{out}");
    assert!(
        out.contains("2 already stored, 0 new (0 rows), 0 to DEAD, 4 skipped"),
        "{out}"
    );
    let (ok, out) = dataviz(
        &stack,
        &["replay", "--since", "1h", "--gateway", "77", "--dry-run"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("dry run: 7 raw messages read, 5 skipped"),
        "{out}"
    );
    assert!(out.contains("2  would be processed"), "{out}");
    wait_drained(&stack.nats.url()).await;
    assert_eq!(stack.count("SELECT count(*) FROM tag_reading").await, 8);
    drop(all);
}
