//! SIGKILL of every role in the middle of a run: nothing lost, nothing stored twice.

mod common;

use chrono::{TimeZone, Utc};
use common::{Publisher, Stack};
use std::time::Duration;

const MESSAGES: i64 = 10_000;
const TAGS: i64 = 3;
const BURST: i64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_every_role_mid_run_loses_nothing_and_stores_nothing_twice() {
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    // A short ack wait, so that what a killed role held comes back within the test.
    let env = [("ACK_WAIT", "2s"), ("WORKER_COUNT", "2")];
    let mut bridge = stack.spawn("bridge", &env);
    let mut processor = stack.spawn("processor", &env);
    let mut writer = stack.spawn("writer", &env);
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;

    // Bursts of messages; after each of the first six, one role is killed while it holds
    // part of the burst, and started again: bridge, processor, writer, twice over.
    let base = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
    let roles = [&mut bridge, &mut processor, &mut writer];
    for burst in 0..MESSAGES / BURST {
        for i in burst * BURST..(burst + 1) * BURST {
            let ts = base + chrono::Duration::milliseconds(i);
            let payload = format!(
                r#"{{"d": [{{"tag": "seq", "value": {i}}}, {{"tag": "AI.0", "value": {}.5}},
                          {{"tag": "DI.0", "value": {}}}], "ts": "{}"}}"#,
                i % 97,
                i % 2 == 0,
                ts.to_rfc3339()
            );
            mqtt.publish(&format!("gateways/1/dev-{}", i % 20), payload)
                .await;
        }
        if burst < 6 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            roles[burst as usize % 3].crash_and_restart();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    mqtt.wait_acked(Duration::from_secs(60)).await;

    stack
        .wait_for_count(
            "SELECT count(*) FROM tag_reading",
            MESSAGES * TAGS,
            Duration::from_secs(180),
        )
        .await;
    assert_eq!(
        stack
            .count(
                "SELECT count(DISTINCT r.value_num)::bigint FROM tag_reading r
                 JOIN tag t ON t.id = r.tag_id WHERE t.code = 'seq'"
            )
            .await,
        MESSAGES,
        "every message's sequence number is there"
    );
    assert_eq!(
        stack
            .count(
                "SELECT count(*) FROM (SELECT tag_id, time FROM tag_reading
                 GROUP BY tag_id, time HAVING count(*) > 1) AS twice"
            )
            .await,
        0,
        "no reading stored twice"
    );
    assert_eq!(stack.count("SELECT count(*) FROM device").await, 20);
    for role in roles {
        assert!(role.is_running(), "{} still running", role.role);
    }
}
