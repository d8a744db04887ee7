//! Live updates end to end: an MQTT publish becomes an event at a Mercure subscriber holding a
//! valid JWT, through `dataviz all` and its embedded hub; a subscriber without a JWT is refused
//! (MERCURE_ANONYMOUS is off by default).

mod common;

use common::{Publisher, Stack, http_get};
use dataviz_mercure::JwtKey;
use dataviz_mercure::jwt::{Claims, sign};
use dataviz_mercure::subscriber::{EventStream, SubscribeRequest};
use dataviz_testkit::free_port;
use std::time::Duration;

const SUBSCRIBER_KEY: &str = "subscriber-key-for-tests-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_message_reaches_an_authorized_subscriber_and_anonymous_ones_are_refused() {
    let stack = Stack::start().await;
    stack.create_gateway(3).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _all = stack.spawn(
        "all",
        &[
            ("APP_ADDR", &addr),
            (
                "MERCURE_PUBLISHER_JWT_KEY",
                "publisher-key-for-tests-0123456789",
            ),
            ("MERCURE_SUBSCRIBER_JWT_KEY", SUBSCRIBER_KEY),
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while http_get(port, "/login").await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "dataviz all never listened on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hub = format!("http://{addr}/.well-known/mercure");
    let selector = "https://dataviz.local/gateways/{gateway}/devices/{device}".to_owned();
    let token = sign(
        &Claims::subscriber(vec![selector.clone()], Some(Duration::from_secs(600))),
        &JwtKey::new(SUBSCRIBER_KEY),
    );
    let mut allowed = EventStream::connect(
        &hub,
        &SubscribeRequest {
            topics: vec![selector.clone()],
            token: Some(token),
            last_event_id: None,
        },
    )
    .await
    .expect("subscribed with a JWT");
    let anonymous = EventStream::connect(
        &hub,
        &SubscribeRequest {
            topics: vec![selector],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        anonymous.err().and_then(|e| e.status()).map(|s| s.as_u16()),
        Some(401),
        "a subscriber without a JWT is refused"
    );

    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    mqtt.publish(
        "gateways/3/plc-9",
        r#"{"d": [{"tag": "AI.0", "value": 21.5}, {"tag": "DI.0", "value": true}], "ts": "2024-06-01T12:00:00Z"}"#,
    )
    .await;
    mqtt.wait_acked(Duration::from_secs(10)).await;

    let event = allowed
        .next_within(Duration::from_secs(20))
        .await
        .expect("an update for the authorized subscriber");
    let data: serde_json::Value = serde_json::from_str(&event.data).expect("JSON data");
    assert_eq!(data["device"]["code"], "plc-9");
    assert_eq!(data["time"], "2024-06-01T12:00:00Z");
    assert_eq!(
        data["readings"],
        serde_json::json!([
            {"tag": "AI.0", "type": "double precision", "value": 21.5},
            {"tag": "DI.0", "type": "boolean", "value": true},
        ])
    );
    assert!(
        event
            .id
            .as_deref()
            .is_some_and(|id| id.starts_with("urn:uuid:"))
    );
}
