//! Scale-out on a NATS cluster: two instances of every role share the work on a 3-node
//! JetStream cluster with streams of 3 replicas; the node leading RAW dies (SIGKILL) in the
//! middle of the run and comes back later. Every reading is stored exactly once.
//!
//! The two bridges have their own MQTT client ids and share the topics through one shared
//! subscription (`$share/dataviz/...`), as docs/SCALING.md describes; the processors and the
//! writers share their durable consumers. Every process is given all three nodes in `NATS_URL`.

mod common;

use common::{
    Publisher, Role, assert_every_numbered_message_once, count_on, numbered_reading,
    open_mqtt_session, spawn_role,
};
use dataviz_testkit::{Mosquitto, NatsCluster, TestDb};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const MESSAGES: i64 = 10_000;
const BURST: i64 = 1_000;
/// The burst after which a NATS node is killed, and the one after which it is restarted.
const KILL_AFTER: i64 = 3;
const RESTART_AFTER: i64 = 7;

const SHARED_TOPICS: &str = "$share/dataviz/gateways/+/+";
const BRIDGE_IDS: [&str; 2] = ["dataviz-bridge-a", "dataviz-bridge-b"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_each_role_on_a_nats_cluster_lose_nothing_when_a_node_dies() {
    let mut cluster = NatsCluster::start();
    let mosquitto = Mosquitto::start();
    let db = TestDb::create().await;
    dataviz_core::db::migrate(&mut db.connect().await)
        .await
        .expect("migrations apply");
    db.connect()
        .await
        .execute(
            "INSERT INTO gateway (id, name) VALUES (1, 'gateway 1')",
            &[],
        )
        .await
        .expect("gateway inserted");
    // Each bridge's session, subscribed to the shared filter, exists before anything is
    // published: the broker splits the messages between the two sessions from the first one.
    for id in BRIDGE_IDS {
        open_mqtt_session(mosquitto.port(), id, SHARED_TOPICS).await;
    }
    let log_dir = tempfile::tempdir().expect("temp dir");
    let env: Vec<(String, String)> = [
        ("NATS_URL", cluster.urls()),
        ("NATS_REPLICAS", "3".to_owned()),
        ("MQTT_HOST", "127.0.0.1".to_owned()),
        ("MQTT_PORT", mosquitto.port().to_string()),
        ("MQTT_INTAKE", "bridge".to_owned()),
        ("MQTT_TOPICS", SHARED_TOPICS.to_owned()),
        ("DATABASE_URL", db.url().to_owned()),
        // A short ack wait, so that what was delivered through the lost node comes back soon.
        ("ACK_WAIT", "5s".to_owned()),
        ("WORKER_COUNT", "2".to_owned()),
        ("LOG_DIR", log_dir.path().display().to_string()),
        ("RUST_LOG", "info".to_owned()),
        ("APP_ENV", "prod".to_owned()),
        ("LOG_FORMAT", "text".to_owned()),
        // Several instances of a role on one machine: each on a port of its own.
        ("HTTP_ADDR", "127.0.0.1:0".to_owned()),
        // The payloads are dated 2024: older than the default retention.
        ("READINGS_RETENTION", "off".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    let mut roles: Vec<Role> = BRIDGE_IDS
        .iter()
        .map(|id| spawn_role("bridge", env.clone(), &[("MQTT_CLIENT_ID", id)]))
        .chain((0..2).map(|_| spawn_role("processor", env.clone(), &[])))
        .chain((0..2).map(|_| spawn_role("writer", env.clone(), &[])))
        .collect();

    // The roles create the streams (R3) at start; the node to kill is the one leading RAW.
    let js = async_nats::jetstream::new(
        async_nats::connect(
            (0..cluster.len())
                .map(|i| cluster.url(i))
                .collect::<Vec<_>>(),
        )
        .await
        .expect("connect to the cluster"),
    );
    let raw = wait_for_stream(&js, "RAW", &mut roles).await;
    assert_eq!(
        raw.config.num_replicas, 3,
        "NATS_REPLICAS=3 gives RAW 3 replicas"
    );
    let leader = raw
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("RAW has a leader");
    let victim = cluster.index_of(&leader).expect("leader is one of ours");

    let mut mqtt = Publisher::connect(mosquitto.port()).await;
    for burst in 0..MESSAGES / BURST {
        for i in burst * BURST..(burst + 1) * BURST {
            mqtt.publish(&format!("gateways/1/dev-{}", i % 20), numbered_reading(i))
                .await;
        }
        if burst == KILL_AFTER {
            // Mid-run: readings flow end to end, and the roles are past their start-up.
            wait_until_rows(&db, &mut roles).await;
            eprintln!("killing {leader} (RAW's leader) mid-run");
            cluster.kill(victim);
        }
        if burst == RESTART_AFTER {
            eprintln!("restarting {leader}");
            cluster.restart(victim);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    mqtt.wait_acked(Duration::from_secs(60)).await;

    assert_every_numbered_message_once(&db, MESSAGES, Duration::from_secs(240)).await;
    assert_eq!(count_on(&db, "SELECT count(*) FROM device").await, 20);

    // The shared subscription split the messages: each bridge stored part of them in RAW.
    let by_bridge = raw_messages_by_bridge(&cluster.url((victim + 1) % cluster.len())).await;
    eprintln!("RAW messages by bridge: {by_bridge:?}");
    for id in BRIDGE_IDS {
        assert!(
            by_bridge.get(id).copied().unwrap_or(0) > 0,
            "{id} stored nothing: {by_bridge:?}"
        );
    }
    for role in &mut roles {
        assert!(
            role.is_running(),
            "dataviz {} exited during the run (DATAVIZ_TEST_LOGS=1 shows why)",
            role.role
        );
    }
    assert!(cluster.is_running(victim), "{leader} back");
}

/// Waits until `name` exists and has a leader; fails early, naming it, when a role exits.
async fn wait_for_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    roles: &mut [Role],
) -> async_nats::jetstream::stream::Info {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for role in roles.iter_mut() {
            assert!(
                role.is_running(),
                "dataviz {} exited at start (DATAVIZ_TEST_LOGS=1 shows why)",
                role.role
            );
        }
        if let Ok(mut stream) = js.get_stream(name).await
            && let Ok(info) = stream.info().await
            && info.cluster.as_ref().is_some_and(|c| c.leader.is_some())
        {
            return info.clone();
        }
        assert!(
            Instant::now() < deadline,
            "stream {name} not created in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the first readings are in `tag_reading`; fails early when a role exits.
async fn wait_until_rows(db: &TestDb, roles: &mut [Role]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_on(db, "SELECT count(*) FROM tag_reading").await == 0 {
        for role in roles.iter_mut() {
            assert!(role.is_running(), "dataviz {} exited", role.role);
        }
        assert!(Instant::now() < deadline, "no reading stored in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// RAW's raw messages counted by the MQTT client id of the bridge that stored them: the prefix
/// of a message's `Nats-Msg-Id` (`<client id>:<packet id>:<hash>`), a pack's writer for each
/// of its members (`dataviz_core::pack`).
async fn raw_messages_by_bridge(nats_url: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for message in common::stream_messages(nats_url, "RAW").await {
        let headers = message.headers.as_ref();
        let header = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let (bridge, members) = if dataviz_core::pack::is_pack(headers) {
            let members = dataviz_core::pack::decode(headers, &message.payload);
            (
                header(dataviz_bridge::recent::HEADER_CLIENT),
                members.expect("a pack that reads").len(),
            )
        } else {
            let id = header("Nats-Msg-Id");
            (id.split(':').next().unwrap_or_default().to_owned(), 1)
        };
        *counts.entry(bridge).or_default() += members;
    }
    counts
}
