//! SIGKILL of PostgreSQL during a sustained run of 10,000 messages published in bursts, on a
//! PostgreSQL server of the test's own ([`PostgresServer`]: the machine's shared server, where
//! the other tests' databases live, is never killed). Ends with every reading stored exactly
//! once. docs/FAULTS.md lists it with the other fault tests.
//!
//! A file of its own, so a binary of its own, with its own server: it shares nothing with
//! faults.rs, whose tests take turns on the shared server (cargo runs test binaries one after
//! the other, so the two do not compete for the cores either).

mod common;

use common::{Publisher, Stack, assert_every_numbered_message_once};
use dataviz_testkit::{PostgresServer, TestDb};
use std::time::Duration;

const MESSAGES: i64 = 10_000;
const BURST: i64 = 1_000;
/// How long PostgreSQL stays down after each SIGKILL.
const DOWN: Duration = Duration::from_secs(2);

/// The roles run with a short ack wait, so that what a role held at a fault comes back within
/// the test (as in cli/tests/faults.rs).
const ENV: [(&str, &str); 2] = [("ACK_WAIT", "2s"), ("WORKER_COUNT", "2")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_postgresql_mid_run_loses_nothing_and_stores_nothing_twice() {
    // Declared first, dropped last: the stack's database is dropped on this server.
    let mut postgres = PostgresServer::start();
    let stack = Stack::start_with_db(TestDb::create_on(postgres.url()).await).await;
    stack.create_gateway(1).await;
    let mut roles = vec![
        stack.spawn("bridge", &ENV),
        stack.spawn("processor", &ENV),
        stack.spawn("writer", &ENV),
    ];
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;

    let mut crashes = 0;
    for burst in 0..MESSAGES / BURST {
        common::publish_numbered_burst(&mut mqtt, burst, BURST).await;
        if burst == 3 || burst == 6 {
            // Mid-burst for the processor and the writer: transactions in flight, commits
            // whose answer never comes back, pooled connections that are dead.
            tokio::time::sleep(Duration::from_millis(40)).await;
            postgres.kill();
            crashes += 1;
            tokio::time::sleep(DOWN).await;
            // restart() blocks (crash recovery): not on a worker the publisher needs.
            tokio::task::block_in_place(|| postgres.restart());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    mqtt.wait_acked(Duration::from_secs(60)).await;
    assert_every_numbered_message_once(&stack.db, MESSAGES, Duration::from_secs(120)).await;
    assert_eq!(stack.count("SELECT count(*) FROM device").await, 20);
    assert_eq!(
        common::dead_letters(&stack).await,
        0,
        "a database crash is not the messages' fault"
    );
    for role in &mut roles {
        assert!(
            role.is_running(),
            "{} survived PostgreSQL crashes",
            role.role
        );
    }
    // Both crashes were crashes: the server recovered from its WAL each time.
    let recoveries = postgres
        .log()
        .matches("database system was not properly shut down; automatic recovery in progress")
        .count();
    assert_eq!(recoveries, crashes, "{}", postgres.log());
}
