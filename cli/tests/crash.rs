//! SIGKILL of every role in the middle of a run, on the default broker (with the default intake
//! and through the bridge) and on Mosquitto: nothing lost, nothing stored twice. And a bridge
//! away longer than RAW's duplicate window.

mod common;

use common::{
    BrokerStack, Publisher, Role, Stack, assert_every_numbered_message_once, count_on,
    numbered_reading, publish_numbered_burst,
};
use std::time::Duration;

const MESSAGES: i64 = 10_000;
const BURST: i64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_every_role_mid_run_through_the_bridge_loses_nothing_and_stores_nothing_twice() {
    let stack = BrokerStack::start().await;
    let mqtt = stack.publisher();
    every_role_killed_twice(BRIDGED, |role, env| stack.spawn(role, env), mqtt, &stack.db).await;
}

/// The processor reads nats-server's MQTT stream: no bridge, so each of the two roles dies
/// three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_every_role_mid_run_loses_nothing_and_stores_nothing_twice() {
    let stack = BrokerStack::start_with_intake("nats").await;
    let mqtt = stack.publisher();
    let roles = ["processor", "writer"];
    every_role_killed_twice(&roles, |role, env| stack.spawn(role, env), mqtt, &stack.db).await;
}

const BRIDGED: &[&str] = &["bridge", "processor", "writer"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_every_role_mid_run_on_mosquitto_loses_nothing_and_stores_nothing_twice() {
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let mqtt = Publisher::connect(stack.mosquitto.port()).await;
    every_role_killed_twice(BRIDGED, |role, env| stack.spawn(role, env), mqtt, &stack.db).await;
}

/// Bursts of messages; after each of the first six, one of `roles` is killed while it holds
/// part of the burst, and started again, in turn (bridge, processor, writer, twice over; without
/// a bridge, processor and writer three times). Every message is then stored, each reading
/// once, and every role runs.
async fn every_role_killed_twice(
    roles: &[&str],
    spawn: impl Fn(&str, &[(&str, &str)]) -> Role,
    mut mqtt: Publisher,
    db: &dataviz_testkit::TestDb,
) {
    // A short ack wait, so that what a killed role held comes back within the test.
    let env = [("ACK_WAIT", "2s"), ("WORKER_COUNT", "2")];
    let mut roles: Vec<Role> = roles.iter().map(|role| spawn(role, &env)).collect();
    let count = roles.len();
    for burst in 0..MESSAGES / BURST {
        for i in burst * BURST..(burst + 1) * BURST {
            mqtt.publish(&format!("gateways/1/dev-{}", i % 20), numbered_reading(i))
                .await;
        }
        if burst < 6 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            roles[burst as usize % count].crash_and_restart();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    mqtt.wait_acked(Duration::from_secs(60)).await;

    assert_every_numbered_message_once(db, MESSAGES, Duration::from_secs(180)).await;
    assert_eq!(count_on(db, "SELECT count(*) FROM device").await, 20);
    for role in &mut roles {
        assert!(role.is_running(), "{} still running", role.role);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_away_longer_than_the_duplicate_window_stores_every_reading_once() {
    const MESSAGES: i64 = 20_000;
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    // RAW forgets a packet after 2 s; the bridge stays away 3 s, twice. What it had stored but
    // not yet acknowledged comes back from the broker as a new RAW message each time: only the
    // readings' identity (their `ts` and content) can tell the copies.
    let env = [("RAW_DUPLICATE_WINDOW", "2s"), ("ACK_WAIT", "2s")];
    let mut bridge = stack.spawn("bridge", &env);
    let _processor = stack.spawn("processor", &env);
    let _writer = stack.spawn("writer", &env);
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    for burst in 0..MESSAGES / BURST {
        publish_numbered_burst(&mut mqtt, burst, BURST).await;
        if burst == 5 || burst == 12 {
            // Mid-burst: the bridge holds messages stored in RAW but not yet acknowledged.
            tokio::time::sleep(Duration::from_millis(30)).await;
            bridge.kill();
            tokio::time::sleep(Duration::from_secs(3)).await;
            bridge.start_again();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mqtt.wait_acked(Duration::from_secs(60)).await;

    assert_every_numbered_message_once(&stack.db, MESSAGES, Duration::from_secs(180)).await;
    let raw = common::raw_member_count(&stack.nats.url()).await;
    eprintln!("RAW holds {raw} messages for {MESSAGES} sent");
    assert!(
        raw > MESSAGES as u64,
        "no copy reached RAW past its window: the test did not exercise the case"
    );
}
