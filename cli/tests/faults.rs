//! Faults of the servers around the roles, each during a sustained run of 10,000 messages
//! published in bursts: SIGKILL of Mosquitto and of NATS, PostgreSQL unreachable, the Mercure
//! hub down, READINGS at its size limit. Each ends with every reading stored exactly once.
//! docs/FAULTS.md lists them with the other fault tests.
//!
//! The tests of this file run one at a time (`SERIAL`): each starts a whole stack and several
//! roles, which is all two cores can carry at once.

mod common;

use common::{NUMBERED_TAGS, Publisher, Stack, assert_every_numbered_message_once};
use dataviz_core::message::READINGS_MESSAGE_BYTES;
use dataviz_mercure::JwtKey;
use dataviz_mercure::jwt::{Claims, sign};
use dataviz_mercure::subscriber::{EventStream, SubscribeRequest};
use dataviz_testkit::free_port;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const MESSAGES: i64 = 10_000;
const BURST: i64 = 1_000;
/// Readings per message: `seq` (the message's number) and `AI.0`.
/// How long PostgreSQL and the hub stay away.
const OUTAGE: Duration = Duration::from_secs(30);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every message's readings are stored, each exactly once.
async fn assert_every_row_once(stack: &Stack, timeout: Duration) {
    assert_every_numbered_message_once(&stack.db, MESSAGES, timeout).await;
    assert_eq!(stack.count("SELECT count(*) FROM device").await, 20);
}

/// The roles every test runs, with a short ack wait so that what a role held at a fault comes
/// back within the test.
const ENV: [(&str, &str); 2] = [("ACK_WAIT", "2s"), ("WORKER_COUNT", "2")];

/// Fails today, both ways: Mosquitto 2.0 acknowledges a QoS 1 message before it saves it and
/// saves only every `autosave_interval` (1 s), so a SIGKILL loses what it had acknowledged but
/// neither saved nor sent to the bridge; and a device sends again what it had in flight when the
/// broker died, which the broker forwards under a new packet id: the bridge cannot tell it from
/// a new message when the first copy had reached it. Seen in three runs: 52 and 2,622 messages
/// lost, then 99 stored twice. Ignored until fixed (docs/FAULTS.md).
#[ignore = "bug: SIGKILL of Mosquitto loses acknowledged messages and duplicates re-sent ones"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_mosquitto_mid_run_loses_no_acknowledged_message() {
    let _serial = SERIAL.lock().await;
    let mut stack = Stack::start().await;
    stack.create_gateway(1).await;
    let _bridge = stack.spawn("bridge", &ENV);
    let _processor = stack.spawn("processor", &ENV);
    let _writer = stack.spawn("writer", &ENV);
    // The device keeps its session: what it had in flight at the crash is sent again.
    let mut mqtt = common::persistent_publisher(stack.mosquitto.port()).await;
    // Mosquitto saves sessions every `autosave_interval` (1 s): let it save the device's and
    // the bridge's. A broker that crashes before it ever saved a session comes back without it,
    // and a client then learns (`session_present` false) that what it had in flight is gone.
    tokio::time::sleep(Duration::from_secs(3)).await;

    for burst in 0..MESSAGES / BURST {
        common::publish_numbered_burst(&mut mqtt, burst, BURST).await;
        if burst == 3 || burst == 6 {
            // Mid-burst for the bridge: part of it is still queued in the broker, part in
            // flight between the broker, the bridge and JetStream.
            tokio::time::sleep(Duration::from_millis(40)).await;
            stack.mosquitto.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            stack.mosquitto.restart();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    mqtt.wait_acked(Duration::from_secs(60)).await;
    assert_every_row_once(&stack, Duration::from_secs(120)).await;
    assert_eq!(common::dead_letters(&stack).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_nats_mid_run_loses_nothing_and_stores_nothing_twice() {
    let _serial = SERIAL.lock().await;
    let mut stack = Stack::start().await;
    stack.create_gateway(1).await;
    let mut roles = vec![
        stack.spawn("bridge", &ENV),
        stack.spawn("processor", &ENV),
        stack.spawn("writer", &ENV),
    ];
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;

    for burst in 0..MESSAGES / BURST {
        common::publish_numbered_burst(&mut mqtt, burst, BURST).await;
        if burst == 3 || burst == 6 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            stack.nats.kill();
            tokio::time::sleep(Duration::from_secs(2)).await;
            stack.nats.restart();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    mqtt.wait_acked(Duration::from_secs(60)).await;
    assert_every_row_once(&stack, Duration::from_secs(120)).await;
    assert_eq!(common::dead_letters(&stack).await, 0);
    for role in &mut roles {
        assert!(role.is_running(), "{} survived NATS restarts", role.role);
    }
}

/// A TCP forwarder to PostgreSQL that the test can cut: [`stop`](Self::stop) closes the
/// listener and every forwarded connection, so clients see their connections drop and new
/// ones refused, as when the server or the network goes away.
struct TcpProxy {
    port: u16,
    target: std::net::SocketAddr,
    stop: Option<CancellationToken>,
}

impl TcpProxy {
    async fn start(target: std::net::SocketAddr) -> TcpProxy {
        let mut proxy = TcpProxy {
            port: free_port(),
            target,
            stop: None,
        };
        proxy.resume().await;
        proxy
    }

    async fn resume(&mut self) {
        assert!(self.stop.is_none(), "proxy already running");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("proxy port");
        let stop = CancellationToken::new();
        let (target, token) = (self.target, stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        self.stop = Some(stop);
    }

    fn cut(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// While NATS is away, the bridge takes no more than `BRIDGE_MAX_IN_FLIGHT` messages from the
/// broker, counted from their receipt (waiting for JetStream or queued before it, alike), plus
/// the one it holds while it waits for a place; the rest wait in the broker. Once NATS is back,
/// every message is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_nats_is_away_the_bridge_holds_no_more_than_its_in_flight_limit() {
    const LIMIT: u64 = 10;
    const SENT: i64 = 200;
    let _serial = SERIAL.lock().await;
    let mut stack = Stack::start().await;
    stack.create_gateway(1).await;
    let ops = free_port();
    let (limit, addr) = (LIMIT.to_string(), format!("127.0.0.1:{ops}"));
    let _bridge = stack.spawn(
        "bridge",
        &[("BRIDGE_MAX_IN_FLIGHT", &limit), ("HTTP_ADDR", &addr)],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::http_get(ops, "/readyz")
        .await
        .map(|(status, _)| status)
        != Some(200)
    {
        assert!(Instant::now() < deadline, "the bridge never got ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    stack.nats.kill();
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    common::publish_numbered_burst(&mut mqtt, 0, SENT).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    // Time for the broker to push everything it may, and for the bridge to take what it will.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, metrics) = common::http_get(ops, "/metrics")
        .await
        .expect("the bridge serves /metrics");
    let received: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("dataviz_bridge_messages_received_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no received count in:\n{metrics}"));
    assert!(
        (LIMIT..=LIMIT + 1).contains(&received),
        "the bridge took {received} messages from the broker while it could store none \
         (BRIDGE_MAX_IN_FLIGHT={LIMIT})"
    );

    stack.nats.restart();
    let _roles = [stack.spawn("processor", &ENV), stack.spawn("writer", &ENV)];
    assert_every_numbered_message_once(&stack.db, SENT, Duration::from_secs(60)).await;
    // Not only the writer's doing (it knows these readings by their `ts`).
    let raw = common::raw_member_count(&stack.nats.url()).await;
    assert_eq!(raw, SENT as u64, "RAW holds each message once");
}

/// While NATS is away long enough, the bridge, its places full, stops reading MQTT and sends no
/// keep-alive: past 1.5 × `MQTT_KEEP_ALIVE` the broker drops it. The messages it held come back
/// on its next connection (DUP), while it still stores them from the first; and its attempts,
/// timed out for it after 5 s, reach JetStream once NATS is back, ahead of their retries. Each
/// is taken once, by RAW's deduplication (not only by the writer, which knows these by their
/// `ts`): 210 in RAW for 200 sent before the bridge knew its own attempts by their raw id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_away_past_the_mqtt_keep_alive_stores_each_message_once() {
    const SENT: i64 = 200;
    let _serial = SERIAL.lock().await;
    let mut stack = Stack::start().await;
    stack.create_gateway(1).await;
    let bridge = common::spawn_logged(
        "bridge",
        &stack.env(),
        // The shortest keep-alive the bridge takes: the broker gives up after 7.5 s of silence.
        &[
            ("BRIDGE_MAX_IN_FLIGHT", "10"),
            ("MQTT_KEEP_ALIVE", "5s"),
            ("LOG_FORMAT", "text"),
        ],
    );
    bridge
        .expect_line(&["subscribed"], "of the bridge's subscription")
        .await;

    stack.nats.kill();
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    common::publish_numbered_burst(&mut mqtt, 0, SENT).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    // The broker drops the silent bridge after 7.5 s; the bridge notices once NATS is back and
    // it reads MQTT again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    stack.nats.restart();
    bridge
        .expect_line(
            &["MQTT connection lost"],
            "saying the broker dropped the bridge",
        )
        .await;
    let _roles = [stack.spawn("processor", &ENV), stack.spawn("writer", &ENV)];
    assert_every_numbered_message_once(&stack.db, SENT, Duration::from_secs(60)).await;
    let raw = common::raw_member_count(&stack.nats.url()).await;
    assert_eq!(raw, SENT as u64, "RAW holds each message once");
    assert_eq!(common::dead_letters(&stack).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_unreachable_for_a_while_is_waited_for_not_dead_lettered() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let mut proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = stack
        .db
        .url()
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(
        url,
        stack.db.url(),
        "the database URL goes through the proxy"
    );
    let env = [ENV[0], ENV[1], ("DATABASE_URL", &url)];
    let mut roles = vec![
        stack.spawn("bridge", &env),
        stack.spawn("processor", &env),
        stack.spawn("writer", &env),
    ];
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;

    let mut cut_at = None;
    for burst in 0..MESSAGES / BURST {
        common::publish_numbered_burst(&mut mqtt, burst, BURST).await;
        if burst == 3 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            proxy.cut();
            cut_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The rest of the run happened during the outage; it lasts OUTAGE in all.
    let cut_at = cut_at.unwrap();
    tokio::time::sleep(OUTAGE.saturating_sub(cut_at.elapsed())).await;
    let stored_during = stack.count("SELECT count(*) FROM tag_reading").await;
    assert!(
        stored_during < MESSAGES * NUMBERED_TAGS,
        "the outage held readings back"
    );
    proxy.resume().await;
    mqtt.wait_acked(Duration::from_secs(60)).await;
    assert_every_row_once(&stack, Duration::from_secs(120)).await;
    assert_eq!(
        common::dead_letters(&stack).await,
        0,
        "a database outage is not the messages' fault"
    );
    for role in &mut roles {
        assert!(role.is_running(), "{} waited for the database", role.role);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mercure_hub_down_for_a_while_loses_no_update() {
    const PUBLISHER_KEY: &str = "publisher-key-for-tests-0123456789";
    const SUBSCRIBER_KEY: &str = "subscriber-key-for-tests-0123456789";
    let _serial = SERIAL.lock().await;
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let hub_port = free_port();
    let hub_addr = format!("127.0.0.1:{hub_port}");
    let hub_url = format!("http://{hub_addr}/.well-known/mercure");
    let keys = [
        ("MERCURE_PUBLISHER_JWT_KEY", PUBLISHER_KEY),
        ("MERCURE_SUBSCRIBER_JWT_KEY", SUBSCRIBER_KEY),
    ];
    let mut hub = stack.spawn(
        "hub",
        &[
            keys[0],
            keys[1],
            ("MERCURE_ADDR", &hub_addr),
            // The whole run fits in the history, for the subscriber that comes last.
            ("MERCURE_HISTORY_SIZE", "100000"),
        ],
    );
    let _publisher = stack.spawn(
        "publisher",
        &[
            ENV[0],
            keys[0],
            ("MERCURE_URL", &hub_url),
            // Every update posted, none coalesced: the test counts them.
            ("PUBLISHER_COALESCE_BACKLOG", "0"),
        ],
    );
    let _bridge = stack.spawn("bridge", &ENV);
    let _processor = stack.spawn("processor", &ENV);
    let _writer = stack.spawn("writer", &ENV);

    let nats = async_nats::connect(stack.nats.url()).await.expect("NATS");
    let js = async_nats::jetstream::new(nats);
    let publisher_consumer = || async {
        js.get_stream("LIVE")
            .await
            .ok()?
            .consumer_info("publisher")
            .await
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while publisher_consumer().await.is_none()
        || !dataviz_testkit::wait_for_port(hub_port, Duration::ZERO)
    {
        assert!(
            Instant::now() < deadline,
            "publisher consumer and hub not up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let selector = "https://dataviz.local/gateways/{gateway}/devices/{device}".to_owned();
    let request = |last_event_id: Option<&str>| SubscribeRequest {
        topics: vec![selector.clone()],
        token: Some(sign(
            &Claims::subscriber(vec![selector.clone()], Some(Duration::from_secs(600))),
            &JwtKey::new(SUBSCRIBER_KEY),
        )),
        last_event_id: last_event_id.map(str::to_owned),
    };
    // Seen live before the hub goes down.
    let before: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let mut early = EventStream::connect(&hub_url, &request(None))
        .await
        .expect("subscribed");
    let listening = CancellationToken::new();
    let early_task = tokio::spawn({
        let (before, listening) = (before.clone(), listening.clone());
        async move {
            while !listening.is_cancelled() {
                if let Some(event) = early.next_within(Duration::from_millis(500)).await {
                    before.lock().unwrap().extend(seq_of(&event.data));
                }
            }
        }
    });

    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    let mut killed_at = None;
    let mut published_after_kill = HashSet::new();
    for burst in 0..MESSAGES / BURST {
        if killed_at.is_some() {
            published_after_kill.extend(burst * BURST..(burst + 1) * BURST);
        }
        common::publish_numbered_burst(&mut mqtt, burst, BURST).await;
        if burst == 3 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            hub.kill();
            killed_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(OUTAGE.saturating_sub(killed_at.unwrap().elapsed())).await;
    listening.cancel();
    early_task.await.unwrap();
    hub.start_again();
    mqtt.wait_acked(Duration::from_secs(60)).await;
    assert_every_row_once(&stack, Duration::from_secs(120)).await;

    // The publisher catches up: nothing pending, nothing waiting for an ack. It may first sleep
    // out a backoff of up to 30 s from the outage, then post the 6,000 updates it held back.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = publisher_consumer().await;
        if let Some(info) = &info
            && info.num_pending == 0
            && info.num_ack_pending == 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the publisher did not catch up: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A subscriber from the start of the new hub's history gets every update posted since it
    // restarted: all those published while it was down, and whatever it missed before.
    let mut late = EventStream::connect(&hub_url, &request(Some("earliest")))
        .await
        .expect("subscribed after the restart");
    let mut after = HashSet::new();
    while let Some(event) = late.next_within(Duration::from_secs(3)).await {
        after.extend(seq_of(&event.data));
    }
    let missing: Vec<i64> = published_after_kill.difference(&after).copied().collect();
    assert!(
        missing.is_empty(),
        "{} updates published during the outage never reached the restarted hub, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // Updates the hub had accepted but not yet sent when it was SIGKILLed are in its stream:
    // the restarted hub read them back, and the subscriber from the start of the history gets
    // them.
    let before = before.lock().unwrap();
    let lost: Vec<i64> = (0..MESSAGES)
        .filter(|i| !before.contains(i) && !after.contains(i))
        .collect();
    assert!(
        lost.is_empty(),
        "hub SIGKILL: {} updates reached no subscriber ({} seen live before the kill, {} after \
         the restart), e.g. {:?}",
        lost.len(),
        before.len(),
        after.len(),
        &lost[..lost.len().min(10)]
    );
}

/// The `seq` reading of an update's data.
fn seq_of(data: &str) -> Option<i64> {
    let data: serde_json::Value = serde_json::from_str(data).ok()?;
    data["readings"]
        .as_array()?
        .iter()
        .find(|r| r["tag"] == "seq")?["value"]
        .as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_stream_at_its_size_limit_pushes_back_and_loses_nothing() {
    // Several READINGS messages, and far less than the 10,000 batches need (about 860 KB).
    const LIMIT: i64 = 512 * 1024;
    let _serial = SERIAL.lock().await;
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let limit = LIMIT.to_string();
    let env = [ENV[0], ENV[1], ("READINGS_MAX_BYTES", &limit)];
    let _bridge = stack.spawn("bridge", &env);
    let mut processor = stack.spawn("processor", &env);
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;

    // No writer yet: READINGS (interest retention) keeps every batch for the writer's
    // consumer, and fills up.
    for burst in 0..MESSAGES / BURST {
        common::publish_numbered_burst(&mut mqtt, burst, BURST).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    mqtt.wait_acked(Duration::from_secs(60)).await;
    let nats = async_nats::connect(stack.nats.url()).await.expect("NATS");
    let js = async_nats::jetstream::new(nats);
    let deadline = Instant::now() + Duration::from_secs(30);
    let full = loop {
        let readings = js
            .get_stream("READINGS")
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap();
        let raw = common::raw_member_count(&stack.nats.url()).await;
        // Full: the next READINGS message would not fit.
        let room = LIMIT as u64 - readings.state.bytes.min(LIMIT as u64);
        if raw == MESSAGES as u64 && room < READINGS_MESSAGE_BYTES as u64 + 4096 {
            break readings;
        }
        assert!(
            Instant::now() < deadline,
            "RAW {raw} messages, READINGS {} bytes of {LIMIT}",
            readings.state.bytes
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(full.state.bytes <= LIMIT as u64, "{:?}", full.state);
    let mut processor_consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("RAW")
        .await
        .unwrap()
        .get_consumer("processor")
        .await
        .unwrap();
    let info = processor_consumer.info().await.unwrap();
    assert!(
        info.num_pending + info.num_ack_pending as u64 > 0,
        "every raw message acknowledged, yet READINGS is full: {:?}",
        full.state
    );
    // Held there for a while: the processor keeps retrying, dead-letters nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        common::dead_letters(&stack).await,
        0,
        "a full stream is not the messages' fault"
    );
    assert!(processor.is_running());
    assert_eq!(stack.count("SELECT count(*) FROM tag_reading").await, 0);

    let _writer = stack.spawn("writer", &env);
    assert_every_row_once(&stack, Duration::from_secs(120)).await;
    assert_eq!(common::dead_letters(&stack).await, 0);
}

/// The state of a stream: (messages, bytes).
/// Waits (10 s at most) until READINGS holds nothing: it keeps only what the writer has not
/// taken.
async fn readings_emptied(stack: &Stack) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream_state(stack, "READINGS").await.0 > 0 {
        assert!(
            Instant::now() < deadline,
            "READINGS kept what the writer took"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stream_state(stack: &Stack, stream: &str) -> (u64, u64) {
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let state = js
        .get_stream(stream)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state;
    (state.messages, state.bytes)
}

/// Live updates never hold storage back: with the hub down for the whole run and READINGS
/// capped at 1 MiB (the run's READINGS messages take about 1.7 MB), every reading is stored,
/// and LIVE, capped at 512 KiB, drops its oldest. (When the publisher read READINGS itself,
/// the stream kept each message for it and filled up: 47,890 of 200,000 readings stored, then
/// none.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_down_the_whole_run_holds_no_reading_back() {
    const RUN: i64 = 20_000;
    let _serial = SERIAL.lock().await;
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let nowhere = format!("http://127.0.0.1:{}/.well-known/mercure", free_port());
    let capped = ("READINGS_MAX_BYTES", "1048576");
    let live = ("LIVE_MAX_BYTES", "524288");
    let _publisher = stack.spawn(
        "publisher",
        &[
            ENV[0],
            capped,
            live,
            ("MERCURE_URL", &nowhere),
            (
                "MERCURE_PUBLISHER_JWT_KEY",
                "publisher-key-for-tests-0123456789",
            ),
        ],
    );
    let _bridge = stack.spawn("bridge", &[ENV[0], ENV[1], capped, live]);
    let _processor = stack.spawn("processor", &[ENV[0], ENV[1], capped, live]);
    let _writer = stack.spawn("writer", &[ENV[0], ENV[1], capped, live]);
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    for burst in 0..RUN / BURST {
        common::publish_numbered_burst(&mut mqtt, burst, BURST).await;
    }
    mqtt.wait_acked(Duration::from_secs(120)).await;
    assert_every_numbered_message_once(&stack.db, RUN, Duration::from_secs(180)).await;
    // READINGS keeps only what the writer has not taken; LIVE stays within its limit.
    readings_emptied(&stack).await;
    let (messages, bytes) = stream_state(&stack, "LIVE").await;
    assert!(
        messages > 0,
        "LIVE holds the newest updates for when the hub is back"
    );
    assert!(
        bytes <= 512 * 1024,
        "LIVE within LIVE_MAX_BYTES: {bytes} bytes"
    );
}

/// With no publisher at all, READINGS stays bounded, even where a publisher once ran (its
/// former consumer on READINGS, which kept every message, is removed at start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_publisher_readings_stays_bounded() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    // A publisher's consumer on READINGS, as an earlier version made it.
    {
        let client = async_nats::connect(stack.nats.url()).await.unwrap();
        let js = dataviz_core::config::jetstream(client.clone());
        let settings = dataviz_core::streams::StreamSettings::default();
        dataviz_core::streams::ensure(&client, &js, &settings)
            .await
            .unwrap();
        js.get_stream("READINGS")
            .await
            .unwrap()
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("publisher".into()),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Under what the run's READINGS messages take (about 860 KB): LIVE drops its oldest.
    let live = ("LIVE_MAX_BYTES", "524288");
    let _bridge = stack.spawn("bridge", &[ENV[0], ENV[1], live]);
    let _processor = stack.spawn("processor", &[ENV[0], ENV[1], live]);
    let _writer = stack.spawn("writer", &[ENV[0], ENV[1], live]);
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    for burst in 0..MESSAGES / BURST {
        common::publish_numbered_burst(&mut mqtt, burst, BURST).await;
    }
    mqtt.wait_acked(Duration::from_secs(60)).await;
    assert_every_row_once(&stack, Duration::from_secs(120)).await;
    readings_emptied(&stack).await;
    let (_, bytes) = stream_state(&stack, "LIVE").await;
    assert!(
        bytes <= 512 * 1024,
        "LIVE within LIVE_MAX_BYTES: {bytes} bytes"
    );
}
