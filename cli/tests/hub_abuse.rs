//! The embedded hub of `dataviz all` under subscribers that ask for as much work as they can:
//! the whole history with a thousand URI templates each. They may cost CPU, but they must not
//! hold up the pipeline, the live updates of other subscribers, nor `/readyz`.

mod common;

use common::{Publisher, Stack, http_get, numbered_reading, wait_for_site};
use dataviz_mercure::jwt::{Claims, sign};
use dataviz_mercure::subscriber::{EventStream, SubscribeRequest};
use dataviz_mercure::{JwtKey, MercurePublisher, Update};
use dataviz_testkit::free_port;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PUBLISHER_KEY: &str = "publisher-key-for-tests-0123456789";
const SUBSCRIBER_KEY: &str = "subscriber-key-for-tests-0123456789";
/// The hub's default history size: the history is full.
const HISTORY: usize = 10_000;
/// Messages a second from the devices, as the issue measured it.
const RATE: u64 = 1_000;
const PHASE: Duration = Duration::from_secs(6);
/// Hostile subscribers and the templates each one names.
const HOSTILE: usize = 4;
const TEMPLATES: usize = 1_000;

fn subscriber_token(selectors: Vec<String>) -> String {
    sign(
        &Claims::subscriber(selectors, Some(Duration::from_secs(600))),
        &JwtKey::new(SUBSCRIBER_KEY),
    )
}

/// Publishes `seq` numbers `range` at [`RATE`] on ten devices of gateway 1, and records when
/// each left.
async fn publish_at_rate(
    mqtt: &mut Publisher,
    range: std::ops::Range<i64>,
    sent: &Mutex<HashMap<i64, Instant>>,
) {
    let per_tick = (RATE / 100) as i64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut i = range.start;
    while i < range.end {
        tick.tick().await;
        for _ in 0..per_tick.min(range.end - i) {
            sent.lock().unwrap().insert(i, Instant::now());
            mqtt.publish(&format!("gateways/1/dev-{}", i % 10), numbered_reading(i))
                .await;
            i += 1;
        }
    }
}

/// `/readyz` every 100 ms until `stop`: the longest answer time, and how many probes got no
/// 200 within 5 s.
async fn probe_readyz(port: u16, stop: tokio_util::sync::CancellationToken) -> (Duration, usize) {
    let mut longest = Duration::ZERO;
    let mut failed = 0;
    while !stop.is_cancelled() {
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), http_get(port, "/readyz")).await;
        longest = longest.max(started.elapsed());
        if !matches!(answer, Ok(Some((200, _)))) {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (longest, failed)
}

/// The 99th percentile of publish-to-event latency over `range`; an update never received
/// counts as infinitely late.
fn p99(
    range: std::ops::Range<i64>,
    sent: &HashMap<i64, Instant>,
    received: &HashMap<i64, Instant>,
) -> Duration {
    let mut latencies: Vec<Duration> = range
        .map(|i| match (sent.get(&i), received.get(&i)) {
            (Some(s), Some(r)) => r.saturating_duration_since(*s),
            _ => Duration::MAX,
        })
        .collect();
    latencies.sort();
    latencies[latencies.len() * 99 / 100]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_replaying_the_history_with_a_thousand_templates_hold_up_nothing() {
    let stack = Stack::start().await;
    stack.create_gateway(1).await;
    let (port, ops) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{port}");
    let _all = stack.spawn(
        "all",
        &[
            ("APP_ADDR", &addr),
            ("HTTP_ADDR", &format!("127.0.0.1:{ops}")),
            ("MERCURE_PUBLISHER_JWT_KEY", PUBLISHER_KEY),
            ("MERCURE_SUBSCRIBER_JWT_KEY", SUBSCRIBER_KEY),
            // Every update posted, none coalesced: on a loaded machine a publisher behind would
            // skip some, and the latency of a skipped update is unknown.
            ("PUBLISHER_COALESCE_BACKLOG", "0"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http_get(ops, "/readyz").await, Some((200, _))) {
        assert!(Instant::now() < deadline, "dataviz all never got ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Readiness is the pipeline's; the site and its hub may bind their port a moment later.
    wait_for_site(port).await;
    let hub = format!("http://{addr}/.well-known/mercure");

    // A full history, each update on a topic of its own.
    let publisher = MercurePublisher::new(&hub, JwtKey::new(PUBLISHER_KEY)).expect("hub URL");
    futures::stream::iter(0..HISTORY)
        .for_each_concurrent(16, |i| {
            let publisher = &publisher;
            async move {
                let update = Update::new(vec![format!("https://filler.example/{i}")], "x");
                publisher.publish(&update).await.expect("filler accepted");
            }
        })
        .await;

    // The admin site's kind of subscriber: one template for every device.
    let devices = "https://dataviz.local/gateways/{gateway}/devices/{device}".to_owned();
    let mut live = EventStream::connect(
        &hub,
        &SubscribeRequest {
            topics: vec![devices.clone()],
            token: Some(subscriber_token(vec![devices])),
            last_event_id: None,
        },
    )
    .await
    .expect("subscribed");
    let received = Arc::new(Mutex::new(HashMap::new()));
    let reader = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok(Some(event)) = live.next().await {
                let data: serde_json::Value = serde_json::from_str(&event.data).expect("JSON");
                for reading in data["readings"].as_array().into_iter().flatten() {
                    if reading["tag"] == "seq" {
                        let seq = reading["value"].as_i64().expect("seq");
                        received.lock().unwrap().insert(seq, Instant::now());
                    }
                }
            }
        })
    };

    let sent = Arc::new(Mutex::new(HashMap::new()));
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    let messages = (RATE * PHASE.as_secs()) as i64;
    let settle = Duration::from_secs(3);

    // Baseline: the pipeline alone.
    let stop = tokio_util::sync::CancellationToken::new();
    let probe = tokio::spawn(probe_readyz(ops, stop.clone()));
    publish_at_rate(&mut mqtt, 0..messages, &sent).await;
    tokio::time::sleep(settle).await;
    stop.cancel();
    let (calm_readyz, calm_failed) = probe.await.unwrap();
    let calm_p99 = p99(
        0..messages,
        &sent.lock().unwrap(),
        &received.lock().unwrap(),
    );

    // The same load while hostile subscribers replay the whole history, each naming a thousand
    // templates that match none of it (every template is tried on every update, past the
    // prefix it shares with the history's topics).
    let templates: Vec<String> = (0..TEMPLATES)
        .map(|i| format!("https://filler.example/{{a}}/{i}"))
        .collect();
    let token = subscriber_token(vec!["*".to_owned()]);
    let replayed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hostile_started = Instant::now();
    let answered_after = Arc::new(Mutex::new(Duration::ZERO));
    let hostile: Vec<_> = (0..HOSTILE)
        .map(|_| {
            let (hub, templates, token) = (hub.clone(), templates.clone(), token.clone());
            let (replayed, answered_after) = (replayed.clone(), answered_after.clone());
            tokio::spawn(async move {
                let request = SubscribeRequest {
                    topics: templates,
                    token: Some(token),
                    last_event_id: Some("earliest".to_owned()),
                };
                if let Ok(mut stream) = EventStream::connect(&hub, &request).await {
                    *answered_after.lock().unwrap() = hostile_started.elapsed();
                    replayed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    while let Ok(Some(_)) = stream.next().await {}
                }
            })
        })
        .collect();
    let stop = tokio_util::sync::CancellationToken::new();
    let probe = tokio::spawn(probe_readyz(ops, stop.clone()));
    publish_at_rate(&mut mqtt, messages..2 * messages, &sent).await;
    tokio::time::sleep(settle).await;
    stop.cancel();
    let (hostile_readyz, hostile_failed) = probe.await.unwrap();
    let hostile_p99 = p99(
        messages..2 * messages,
        &sent.lock().unwrap(),
        &received.lock().unwrap(),
    );
    eprintln!(
        "publish-to-event p99: alone {calm_p99:?}, with {HOSTILE} hostile subscribers \
         {hostile_p99:?}; longest /readyz: alone {calm_readyz:?}, with them {hostile_readyz:?}; \
         hostile subscriptions answered: {}",
        replayed.load(std::sync::atomic::Ordering::SeqCst)
    );
    // Every hostile subscriber gets its answer (else nothing was tested), later than the others
    // if need be: theirs is the work that waits.
    let deadline = Instant::now() + Duration::from_secs(60);
    while replayed.load(std::sync::atomic::Ordering::SeqCst) < HOSTILE {
        assert!(
            Instant::now() < deadline,
            "{} of {HOSTILE} hostile subscribers answered after a minute",
            replayed.load(std::sync::atomic::Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "the last hostile subscriber answered {:?} after they asked",
        answered_after.lock().unwrap()
    );
    for task in hostile {
        task.abort();
    }
    reader.abort();

    // The bound: within what a noisy machine gives, far from the freeze (no answer at all).
    assert_eq!(
        calm_failed, 0,
        "/readyz failed without any hostile subscriber"
    );
    assert_eq!(
        hostile_failed, 0,
        "/readyz did not answer 200 within 5 s while hostile subscribers replayed the history"
    );
    assert!(
        hostile_readyz < Duration::from_secs(2),
        "/readyz took {hostile_readyz:?} with hostile subscribers"
    );
    let bound = (calm_p99 * 3).max(Duration::from_millis(500));
    assert!(
        hostile_p99 < bound,
        "publish-to-event p99 {hostile_p99:?} with hostile subscribers, {calm_p99:?} without"
    );
    common::assert_every_numbered_message_once(&stack.db, 2 * messages, Duration::from_secs(60))
        .await;
}
