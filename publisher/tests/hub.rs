//! The publisher against a real nats-server and our hub on a real port: updates reach
//! authorized subscribers only; a hub outage loses no update; a backlog is coalesced.

use chrono::Utc;
use dataviz_core::message::{MessageReadings, ReadingsMessage, TagReading};
use dataviz_core::ops::{Ops, OpsConfig, Progress};
use dataviz_core::streams::{self, LIVE_STREAM, StreamSettings};
use dataviz_core::value::Value;
use dataviz_mercure::jwt::{self, Claims};
use dataviz_mercure::subscriber::{EventStream, SseEvent, SubscribeRequest};
use dataviz_mercure::{HUB_PATH, Hub, HubConfig, MercurePublisher, UpdateSink};
use dataviz_publisher::PublisherConfig;
use dataviz_testkit::NatsServer;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const BASE: &str = "https://dataviz.local";
const GATEWAY: i32 = 7;

struct Pipeline {
    _nats: NatsServer,
    js: async_nats::jetstream::Context,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

fn progress() -> Arc<Progress> {
    Ops::new(&OpsConfig {
        http_addr: None,
        shutdown_timeout: Duration::from_secs(5),
        ready_stall_after: Duration::from_secs(60),
    })
    .stage("publisher")
}

/// NATS with the streams and the publisher consumer (before any message: READINGS keeps
/// messages for the consumers that exist), and a publisher posting to `hub_url`.
async fn pipeline(hub_url: &str, hub: &HubConfig, config: PublisherConfig) -> Pipeline {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = dataviz_core::config::jetstream(client.clone());
    let settings = StreamSettings::default();
    streams::ensure(&client, &js, &settings).await.unwrap();
    streams::ensure_publisher(&js, &settings).await.unwrap();
    let publisher = UpdateSink::Http(
        MercurePublisher::new(hub_url, hub.keys.keys().unwrap().publisher).unwrap(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (js, stop) = (js.clone(), stop.clone());
        let config = PublisherConfig {
            mercure_url: hub_url.into(),
            ..config
        };
        async move {
            let progress = progress();
            dataviz_publisher::run(
                config,
                settings.publisher_consumer(),
                js,
                publisher,
                &progress,
                stop,
            )
            .await
        }
    });
    Pipeline {
        _nats: nats,
        js,
        stop,
        task,
    }
}

fn unit(device: i64, value: i64) -> MessageReadings {
    MessageReadings {
        raw_seq: None,
        id: Uuid::now_v7(),
        gateway_id: GATEWAY,
        device_id: device,
        device_code: format!("dev-{device}"),
        time: Utc::now(),
        received_at: Utc::now(),
        readings: vec![TagReading {
            tag_id: 1,
            tag: "AI.0".into(),
            value: Value::Integer(value),
        }],
    }
}

/// Stores units in READINGS as the processor does, packed: seven to a message here, so that a
/// fetch holds several messages and a message several devices; waits until LIVE (which the
/// publisher reads) has them too. Returns how many messages.
async fn store(js: &async_nats::jetstream::Context, units: &[MessageReadings]) -> u64 {
    let live = js.get_stream(LIVE_STREAM).await.unwrap();
    let before = live.get_info().await.unwrap().state.last_sequence;
    let mut stored = 0;
    for chunk in units.chunks(7) {
        for m in ReadingsMessage::pack(chunk).0 {
            streams::publish_readings(js, &m).await.unwrap();
            stored += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while live.get_info().await.unwrap().state.last_sequence < before + stored {
        assert!(
            std::time::Instant::now() < deadline,
            "LIVE did not receive the copies"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stored
}

/// A hub served on `port` (0: any); stopped by cancelling the token and awaiting the task.
async fn serve(
    config: &HubConfig,
    port: u16,
) -> (
    Hub,
    String,
    CancellationToken,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let hub = Hub::new(config).unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let url = format!("http://{}{HUB_PATH}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(dataviz_mercure::serve(listener, hub.clone(), stop.clone()));
    (hub, url, stop, task)
}

fn subscriber_token(config: &HubConfig) -> String {
    jwt::sign(
        &Claims::subscriber(vec![format!("{BASE}/gateways/{{+rest}}")], None),
        &config.keys.keys().unwrap().subscriber,
    )
}

async fn subscribe(url: &str, token: Option<String>, last_event_id: Option<&str>) -> EventStream {
    EventStream::connect(
        url,
        &SubscribeRequest {
            topics: vec![format!("{BASE}/gateways/{GATEWAY}/devices/{{device}}")],
            token,
            last_event_id: last_event_id.map(str::to_owned),
        },
    )
    .await
    .unwrap()
}

async fn collect(stream: &mut EventStream, n: usize, within: Duration) -> Vec<SseEvent> {
    let deadline = Instant::now() + within;
    let mut events = Vec::new();
    while events.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match stream.next_within(left).await {
            Some(e) => events.push(e),
            None => break,
        }
    }
    events
}

fn ids(units: &[MessageReadings]) -> Vec<String> {
    units.iter().map(dataviz_publisher::update_id).collect()
}

fn event_ids(events: &[SseEvent]) -> Vec<String> {
    events.iter().filter_map(|e| e.id.clone()).collect()
}

/// Messages the publisher consumer has not acknowledged yet.
async fn unacked(js: &async_nats::jetstream::Context) -> u64 {
    let stream = js.get_stream(LIVE_STREAM).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(dataviz_core::streams::PUBLISHER_CONSUMER)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    info.num_pending + info.num_ack_pending as u64
}

async fn until_acked(js: &async_nats::jetstream::Context) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while unacked(js).await > 0 {
        assert!(Instant::now() < deadline, "messages still unacknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn updates_reach_authorized_subscribers_only() {
    let mut hub_config = HubConfig::development();
    // Let an anonymous subscriber in, to show it receives nothing private.
    hub_config.mercure_anonymous = true;
    let (_hub, url, _stop, _task) = serve(&hub_config, 0).await;
    let mut authorized = subscribe(&url, Some(subscriber_token(&hub_config)), None).await;
    let mut anonymous = subscribe(&url, None, None).await;
    let p = pipeline(&url, &hub_config, PublisherConfig::default()).await;

    let units: Vec<_> = (0..5).map(|i| unit(100 + i % 2, i)).collect();
    store(&p.js, &units).await;

    let got = collect(&mut authorized, 5, Duration::from_secs(20)).await;
    let mut expected = ids(&units);
    let mut seen = event_ids(&got);
    expected.sort();
    seen.sort();
    assert_eq!(seen, expected);
    // Per device, stream order is kept.
    let device_100: Vec<_> = got
        .iter()
        .map(|e| serde_json::from_str::<serde_json::Value>(&e.data).unwrap())
        .filter(|d| d["device"]["id"] == 100)
        .map(|d| d["readings"][0]["value"].as_i64().unwrap())
        .collect();
    assert_eq!(device_100, [0, 2, 4]);
    let first: serde_json::Value = serde_json::from_str(&got[0].data).unwrap();
    assert_eq!(first["gateway"], GATEWAY);
    assert_eq!(first["readings"][0]["tag"], "AI.0");
    assert_eq!(first["readings"][0]["type"], "integer");

    assert!(
        anonymous
            .next_within(Duration::from_millis(500))
            .await
            .is_none(),
        "an anonymous subscriber received a private update"
    );
    until_acked(&p.js).await;
}

#[tokio::test]
async fn a_hub_outage_loses_no_update() {
    let hub_config = HubConfig::development();
    let (_hub, url, stop, task) = serve(&hub_config, 0).await;
    let port = reqwest::Url::parse(&url).unwrap().port().unwrap();
    let token = subscriber_token(&hub_config);
    let mut before = subscribe(&url, Some(token.clone()), None).await;
    let no_coalescing = PublisherConfig {
        publisher_coalesce_backlog: 0,
        ..Default::default()
    };
    let p = pipeline(&url, &hub_config, no_coalescing).await;

    let first: Vec<_> = (0..5).map(|i| unit(1, i)).collect();
    store(&p.js, &first).await;
    let got = collect(&mut before, 5, Duration::from_secs(20)).await;
    assert_eq!(event_ids(&got), ids(&first));
    until_acked(&p.js).await;

    // The hub goes away; readings keep coming.
    stop.cancel();
    task.await.unwrap().unwrap();
    let during: Vec<_> = (0..10).map(|i| unit(1 + i % 3, 100 + i)).collect();
    let held = store(&p.js, &during).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        unacked(&p.js).await,
        held,
        "acknowledged while the hub was down"
    );

    // A new hub on the same port, with an empty history: a subscriber asking for everything
    // gets every update the publisher kept, then the new ones.
    let (_hub, url2, _stop2, _task2) = serve(&hub_config, port).await;
    assert_eq!(url2, url);
    let mut after = subscribe(&url, Some(token), Some("earliest")).await;
    let later: Vec<_> = (0..3).map(|i| unit(2, 200 + i)).collect();
    store(&p.js, &later).await;
    let got = collect(&mut after, 13, Duration::from_secs(30)).await;
    let seen: HashSet<_> = event_ids(&got).into_iter().collect();
    let expected: HashSet<_> = ids(&during).into_iter().chain(ids(&later)).collect();
    assert_eq!(seen.len(), got.len(), "an update was received twice");
    assert_eq!(seen, expected, "updates lost or unexpected");
    until_acked(&p.js).await;
}

#[tokio::test]
async fn a_backlog_is_coalesced_to_the_latest_update_per_device() {
    let hub_config = HubConfig::development();
    let (hub, url, _stop, _task) = serve(&hub_config, 0).await;
    let coalescing = PublisherConfig {
        publisher_coalesce_backlog: 5,
        ..Default::default()
    };
    // The readings are all stored before the publisher starts: a backlog of 40.
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = dataviz_core::config::jetstream(client.clone());
    let settings = StreamSettings::default();
    streams::ensure(&client, &js, &settings).await.unwrap();
    streams::ensure_publisher(&js, &settings).await.unwrap();
    let units: Vec<_> = (0..40).map(|i| unit(1 + i % 2, i)).collect();
    store(&js, &units).await;

    let publisher = UpdateSink::Http(
        MercurePublisher::new(&url, hub_config.keys.keys().unwrap().publisher).unwrap(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (js, stop) = (js.clone(), stop.clone());
        let config = PublisherConfig {
            mercure_url: url.clone(),
            ..coalescing
        };
        async move {
            let progress = progress();
            dataviz_publisher::run(
                config,
                settings.publisher_consumer(),
                js,
                publisher,
                &progress,
                stop,
            )
            .await
        }
    });
    until_acked(&js).await;
    let published = hub.history_len();
    assert!(published < 40, "nothing coalesced: {published} updates");
    // The latest reading of each device was published.
    let mut replay = subscribe(&url, Some(subscriber_token(&hub_config)), Some("earliest")).await;
    let got = collect(&mut replay, published, Duration::from_secs(5)).await;
    let seen: HashSet<_> = event_ids(&got).into_iter().collect();
    for latest in &ids(&units)[38..] {
        assert!(seen.contains(latest), "latest update {latest} missing");
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}
