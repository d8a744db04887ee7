//! Live updates end to end: an MQTT publish becomes an event at a Mercure subscriber holding a
//! valid JWT, through `dataviz all` and its embedded hub; a subscriber without a JWT is refused
//! (MERCURE_ANONYMOUS is off by default). A device page's live token works until its admin logs
//! out: then the hub ends its subscription and refuses it.

mod common;

use common::{Publisher, Stack, add_admin, http_request};
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
    common::wait_for_site(port).await;
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

/// The device page's live token in `dataviz all`: a subscriber holding it receives the device's
/// updates; once the admin logs out, the hub ends that subscription at once and refuses the
/// token, though it has not expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pages_live_token_stops_working_at_logout() {
    let stack = Stack::start().await;
    stack.create_gateway(3).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut env = stack.env();
    env.push(("APP_ADDR".to_owned(), addr.clone()));
    let _all = common::spawn_role("all", env.clone(), &[]);
    common::wait_for_site(port).await;
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    let reading = |v: i32| format!(r#"{{"d": [{{"tag": "AI.0", "value": {v}}}]}}"#);
    mqtt.publish("gateways/3/plc-1", reading(1)).await;
    stack
        .wait_for_count("SELECT count(*) FROM device", 1, Duration::from_secs(20))
        .await;
    let device = stack.count("SELECT max(id) FROM device").await;

    add_admin(&env, "admin@example.com", "the-admin-password-77c1");
    let form = "email=admin%40example.com&password=the-admin-password-77c1&next=%2F";
    let (_, head) = http_request(port, "POST", "/api/login", Some(form), &[]).await;
    let session = common::set_cookie(&head, "dataviz_session").expect("a session cookie");
    let page = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let request = format!(
            "GET /devices/{device} HTTP/1.1\r\nHost: {addr}\r\nCookie: {session}\r\n\
             Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut page = String::new();
        stream.read_to_string(&mut page).await.unwrap();
        page
    };
    let token = page
        .split_once("data-token=\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(token, _)| token.to_owned())
        .unwrap_or_else(|| panic!("no live token on the page: {page}"));
    let topic = format!("https://dataviz.local/gateways/3/devices/{device}");
    let hub = format!("http://{addr}/.well-known/mercure");
    let request = SubscribeRequest {
        topics: vec![topic],
        token: Some(token),
        last_event_id: None,
    };
    let mut live = EventStream::connect(&hub, &request)
        .await
        .expect("the page's token subscribes");
    mqtt.publish("gateways/3/plc-1", reading(2)).await;
    assert!(
        live.next_within(Duration::from_secs(20)).await.is_some(),
        "an update reaches the page's subscription"
    );

    let (status, _) = http_request(
        port,
        "POST",
        "/api/logout",
        Some(""),
        &[("Cookie", &session)],
    )
    .await;
    assert!(status == 302 || status == 303);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = live.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the subscription outlived the logout");
    let again = EventStream::connect(&hub, &request).await;
    assert_eq!(
        again.err().and_then(|e| e.status()).map(|s| s.as_u16()),
        Some(401),
        "the token is refused after logout"
    );
}
