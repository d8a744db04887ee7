//! Interoperability: our publisher client against a hub no one here wrote, PyPI's
//! `flask-mercure-sse` (legacy protocol; exact topics only, first `topic` field only).
//!
//! Needs a Python with `flask-mercure-sse==0.4.1` and `gevent`: `DATAVIZ_FLASK_MERCURE_PYTHON`,
//! else the workspace's `.local/venv/bin/python` (`scripts/setup` installs them there).

use dataviz_mercure::jwt::{self, Claims, JwtKey};
use dataviz_mercure::subscriber::{EventStream, SubscribeRequest};
use dataviz_mercure::{MercurePublisher, PublishError, Update};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PUBLISHER_SECRET: &str = "interop-publisher-secret-0123456789abcdef";
const SUBSCRIBER_SECRET: &str = "interop-subscriber-secret-0123456789abcdef";

struct FlaskHub(Child);

impl Drop for FlaskHub {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> std::path::PathBuf {
    std::env::var_os("DATAVIZ_FLASK_MERCURE_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.local/venv/bin/python")
        })
}

fn start_flask_hub(port: u16) -> FlaskHub {
    let child = Command::new(python())
        .args(["-m", "flask_mercure_sse.server", "--host", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .args(["--publisher-secret", PUBLISHER_SECRET])
        .args(["--subscriber-secret", SUBSCRIBER_SECRET])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("a Python with flask-mercure-sse and gevent (see the module doc)");
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "flask-mercure-sse did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    FlaskHub(child)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn our_publisher_works_against_flask_mercure_sse() {
    let port = free_port();
    let hub = start_flask_hub(port);
    let url = format!("http://127.0.0.1:{port}/.well-known/mercure");
    let topic = "https://dataviz.local/gateways/7/devices/12";
    let token = jwt::sign(
        &Claims::subscriber(vec![topic.into()], None),
        &JwtKey::new(SUBSCRIBER_SECRET),
    );
    let mut subscriber = EventStream::connect(
        &url,
        &SubscribeRequest {
            topics: vec![topic.into()],
            token: Some(token),
            last_event_id: None,
        },
    )
    .await
    .unwrap();

    let publisher = MercurePublisher::new(&url, JwtKey::new(PUBLISHER_SECRET)).unwrap();
    let update = Update {
        private: true,
        id: Some("urn:uuid:0190a0a0-0000-7000-8000-000000000001".into()),
        ..Update::new(vec![topic.into()], "{\"v\":1}\nsecond line")
    };
    let id = publisher.publish(&update).await.unwrap();
    assert_eq!(id, "urn:uuid:0190a0a0-0000-7000-8000-000000000001");
    let event = subscriber
        .next_within(Duration::from_secs(5))
        .await
        .expect("event from flask-mercure-sse");
    assert_eq!(event.id.as_deref(), Some(id.as_str()));
    assert_eq!(event.data, "{\"v\":1}\nsecond line");

    // A wrong key is a refusal (this hub answers 403), not something to retry.
    let wrong =
        MercurePublisher::new(&url, JwtKey::new("wrong-key-wrong-key-wrong-key-xx")).unwrap();
    let err = wrong.publish(&update).await.unwrap_err();
    assert!(matches!(err, PublishError::Refused { .. }), "{err}");

    // The hub gone: retryable.
    drop(hub);
    let err = publisher.publish(&update).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
}
