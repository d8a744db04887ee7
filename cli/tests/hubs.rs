//! `dataviz hub` on its default transport, JetStream, as separate processes: a hub SIGKILLed
//! mid-run loses no update it acknowledged, and several hubs on one stream serve every update
//! to the subscribers of each, once and in order, also behind nginx with the project's
//! `nginx/hubs.conf` (Debian's nginx, installed by scripts/setup). Publishing and subscribing
//! go over HTTP, as any Mercure client does.

mod common;

use common::spawn_role;
use dataviz_mercure::jwt::{Claims, sign};
use dataviz_mercure::subscriber::{EventStream, SseEvent, SubscribeRequest};
use dataviz_mercure::{HUB_PATH, JwtKey, Update};
use dataviz_testkit::{NatsServer, free_port, wait_for_port};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PUBLISHER_KEY: &str = "publisher-key-for-tests-0123456789";
const SUBSCRIBER_KEY: &str = "subscriber-key-for-tests-0123456789";
const BOOKS: &str = "https://example.com/books/{id}";

/// A `dataviz hub` process and its URL.
struct HubProcess {
    role: common::Role,
    port: u16,
    url: String,
}

impl HubProcess {
    fn start(nats: &NatsServer, log_dir: &tempfile::TempDir) -> HubProcess {
        HubProcess::start_with(nats, log_dir, &[])
    }

    fn start_with(
        nats: &NatsServer,
        log_dir: &tempfile::TempDir,
        extra: &[(&str, &str)],
    ) -> HubProcess {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let env = vec![
            ("NATS_URL".to_owned(), nats.url()),
            ("MERCURE_ADDR".to_owned(), addr.clone()),
            ("MERCURE_PUBLISHER_JWT_KEY".to_owned(), PUBLISHER_KEY.into()),
            (
                "MERCURE_SUBSCRIBER_JWT_KEY".to_owned(),
                SUBSCRIBER_KEY.into(),
            ),
            ("HTTP_ADDR".to_owned(), "127.0.0.1:0".into()),
            ("LOG_DIR".to_owned(), log_dir.path().display().to_string()),
            ("LOG_FORMAT".to_owned(), "text".into()),
            ("RUST_LOG".to_owned(), "info".into()),
        ];
        let role = spawn_role("hub", env, extra);
        let hub = HubProcess {
            role,
            port,
            url: format!("http://{addr}{HUB_PATH}"),
        };
        hub.wait_up();
        hub
    }

    fn wait_up(&self) {
        assert!(
            wait_for_port(self.port, Duration::from_secs(30)),
            "the hub did not listen"
        );
    }
}

fn subscriber_token(private: &[&str]) -> String {
    sign(
        &Claims::subscriber(
            private.iter().map(|s| s.to_string()).collect(),
            Some(Duration::from_secs(600)),
        ),
        &JwtKey::new(SUBSCRIBER_KEY),
    )
}

/// Posts an update as any HTTP client would, again until the hub answers 200 (it is down, or
/// its stream is): the publisher of an at-least-once pipeline. Any 4xx fails the test.
async fn post_until_taken(client: &reqwest::Client, url: &str, update: &Update) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match post(client, url, update).send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) if r.status().is_client_error() => {
                panic!("update refused: {} {}", r.status(), r.text().await.unwrap())
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "no hub took the update for 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A subscription to [`BOOKS`] with a JWT that allows no private update.
fn books(last_event_id: Option<&str>) -> SubscribeRequest {
    SubscribeRequest {
        topics: vec![BOOKS.into()],
        token: Some(subscriber_token(&[])),
        last_event_id: last_event_id.map(str::to_owned),
    }
}

/// A publish request, as any HTTP client makes it: a form and a publisher JWT.
fn post(client: &reqwest::Client, url: &str, update: &Update) -> reqwest::RequestBuilder {
    let token = sign(
        &Claims::publisher(vec!["*".into()], Some(Duration::from_secs(600))),
        &JwtKey::new(PUBLISHER_KEY),
    );
    client
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(update.to_form())
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A subscriber that reconnects by itself, as a browser's `EventSource` does: `retry` after
/// its stream broke, with the last id it saw as `Last-Event-ID`, until it has `expected`
/// events or `timeout` passes. Returns the ids it received, in order, and how many times it
/// reconnected.
async fn subscribe_through_outages(
    url: String,
    request: SubscribeRequest,
    connected: Arc<AtomicUsize>,
    (expected, retry): (usize, Duration),
    timeout: Duration,
) -> (Vec<String>, usize) {
    let deadline = Instant::now() + timeout;
    let mut ids: Vec<String> = Vec::new();
    let mut reconnections = 0;
    while ids.len() < expected && Instant::now() < deadline {
        let request = SubscribeRequest {
            last_event_id: ids.last().cloned().or(request.last_event_id.clone()),
            ..request.clone()
        };
        let Ok(mut stream) = EventStream::connect(&url, &request).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if connected.fetch_add(1, Ordering::SeqCst) > 0 {
            reconnections += 1;
        }
        // Until the hub goes away (the stream ends or breaks).
        while ids.len() < expected {
            match tokio::time::timeout(Duration::from_secs(2), stream.next()).await {
                Ok(Ok(Some(SseEvent { id: Some(id), .. }))) => ids.push(id),
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) | Ok(Err(_)) => break,
                Err(_) if Instant::now() >= deadline => break,
                Err(_) => {}
            }
        }
        tokio::time::sleep(retry).await;
    }
    (ids, reconnections)
}

/// The done-when case of a hub that survives: SIGKILLed while a publisher posts over HTTP, the
/// hub restarts from the stream, and a subscriber that reconnects with the last id it saw gets
/// every update exactly once, in the order published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_sigkilled_mid_run_loses_nothing_and_its_subscriber_gets_each_update_once() {
    const UPDATES: usize = 3_000;
    let nats = NatsServer::start();
    let logs = tempfile::tempdir().unwrap();
    let mut hub = HubProcess::start(&nats, &logs);

    let connected = Arc::new(AtomicUsize::new(0));
    let subscriber = tokio::spawn(subscribe_through_outages(
        hub.url.clone(),
        SubscribeRequest {
            topics: vec![BOOKS.into()],
            token: Some(subscriber_token(&[])),
            last_event_id: None,
        },
        connected.clone(),
        // A browser's delay: the hub is back, and has taken updates, before the subscriber.
        (UPDATES, Duration::from_secs(3)),
        Duration::from_secs(120),
    ));
    while connected.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let taken = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn({
        let (url, taken) = (hub.url.clone(), taken.clone());
        async move {
            let client = client();
            for i in 0..UPDATES {
                let update = Update {
                    id: Some(format!("update-{i}")),
                    ..Update::new(
                        vec![format!("https://example.com/books/{}", i % 7)],
                        format!("{{\"n\":{i}}}"),
                    )
                };
                post_until_taken(&client, &url, &update).await;
                taken.fetch_add(1, Ordering::SeqCst);
            }
        }
    });

    // Killed mid-run, with updates acknowledged and others in flight.
    while taken.load(Ordering::SeqCst) < UPDATES / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    hub.role.kill();
    let killed_after = taken.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    hub.role.start_again();
    hub.wait_up();
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("the publisher finished")
        .unwrap();

    let (ids, reconnections) = subscriber.await.unwrap();
    let expected: Vec<String> = (0..UPDATES).map(|i| format!("update-{i}")).collect();
    let first_wrong = ids.iter().zip(&expected).position(|(a, b)| a != b);
    assert!(
        ids == expected,
        "the subscriber got {} events for {UPDATES} updates (killed after {killed_after} were \
         taken; {reconnections} reconnections); first out of place at {first_wrong:?}",
        ids.len()
    );
    assert!(reconnections >= 1, "the kill never reached the subscriber");
}

/// What one subscriber asks for, and what it may see.
struct Expected {
    hub: usize,
    topics: Vec<String>,
    private: Vec<&'static str>,
    ids: Vec<String>,
}

/// Two hubs on one stream, subscribers on each, a publisher posting to the first only: every
/// subscriber receives every update it is entitled to (its topics; private ones only with a
/// JWT allowing them), once, in the order published. Then a subscriber of the second hub
/// resumes from an id the first one gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_serve_each_update_to_the_subscribers_of_both_once_and_in_order() {
    const UPDATES: usize = 600;
    let nats = NatsServer::start();
    let logs = tempfile::tempdir().unwrap();
    let hubs = [
        HubProcess::start(&nats, &logs),
        HubProcess::start(&nats, &logs),
    ];
    let topic = |i: usize| format!("https://example.com/books/{}", i % 3);
    let private = |i: usize| i.is_multiple_of(5);
    let ids_where = |keep: &dyn Fn(usize) -> bool| -> Vec<String> {
        (0..UPDATES)
            .filter(|&i| keep(i))
            .map(|i| format!("u{i}"))
            .collect()
    };
    let mut subscribers = Vec::new();
    for hub in 0..2 {
        // Every public update; those of book 1 only; every one, private ones included.
        subscribers.push(Expected {
            hub,
            topics: vec![BOOKS.into()],
            private: vec![],
            ids: ids_where(&|i| !private(i)),
        });
        subscribers.push(Expected {
            hub,
            topics: vec![topic(1)],
            private: vec![],
            ids: ids_where(&|i| !private(i) && i % 3 == 1),
        });
        subscribers.push(Expected {
            hub,
            topics: vec![BOOKS.into()],
            private: vec![BOOKS],
            ids: ids_where(&|_| true),
        });
    }
    let connected = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = subscribers
        .iter()
        .map(|s| {
            tokio::spawn(subscribe_through_outages(
                hubs[s.hub].url.clone(),
                SubscribeRequest {
                    topics: s.topics.clone(),
                    token: Some(subscriber_token(&s.private)),
                    last_event_id: None,
                },
                connected.clone(),
                (s.ids.len(), Duration::ZERO),
                Duration::from_secs(60),
            ))
        })
        .collect();
    while connected.load(Ordering::SeqCst) < subscribers.len() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let client = client();
    for i in 0..UPDATES {
        let update = Update {
            id: Some(format!("u{i}")),
            private: private(i),
            ..Update::new(vec![topic(i)], format!("{{\"n\":{i}}}"))
        };
        post_until_taken(&client, &hubs[0].url, &update).await;
    }
    for (task, expected) in tasks.into_iter().zip(&subscribers) {
        let (ids, _) = task.await.unwrap();
        assert!(
            ids == expected.ids,
            "a subscriber of hub {} to {:?} (private {:?}) got {} events for {} expected",
            expected.hub,
            expected.topics,
            expected.private,
            ids.len(),
            expected.ids.len()
        );
    }
    // An id given by the first hub is found by the second: the updates after it, in order.
    let (ids, _) = subscribe_through_outages(
        hubs[1].url.clone(),
        SubscribeRequest {
            topics: vec![BOOKS.into()],
            token: Some(subscriber_token(&[BOOKS])),
            last_event_id: Some("u299".into()),
        },
        Arc::new(AtomicUsize::new(0)),
        (UPDATES - 300, Duration::ZERO),
        Duration::from_secs(30),
    )
    .await;
    let after: Vec<String> = (300..UPDATES).map(|i| format!("u{i}")).collect();
    assert_eq!(ids, after, "resumed on the other hub from u299");
}

/// NATS SIGKILLed under a running hub: publishes are refused with 503 while it is away (never
/// answered 200 and lost), the hub follows the stream again when it is back, and a subscriber
/// that stayed connected receives every update that was answered 200, once, in order. An
/// update sent to NATS just as it died is answered 503 saying it may still be dispatched (the
/// client sends it when NATS is back): it may come too, once, in its place, and nothing else
/// that was refused does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_rides_out_a_nats_restart_and_loses_no_acknowledged_update() {
    let mut nats = NatsServer::start();
    let logs = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&nats, &logs);
    let connected = Arc::new(AtomicUsize::new(0));
    let client = client();
    let update = |i: usize| Update {
        id: Some(format!("n{i}")),
        ..Update::new(vec!["https://example.com/books/1".into()], "x")
    };
    let mut taken = Vec::new();
    let mut refused = 0;
    // Refused, but "may still be dispatched": sent to NATS, unacknowledged.
    let mut unconfirmed = Vec::new();
    // 100 updates before, 100 while NATS is away, 100 after.
    // What was answered 200 is known only at the end: the subscriber reads until it has as
    // many events, or for 30 s without one.
    let (answered, mut expected) = tokio::sync::watch::channel(usize::MAX);
    let subscriber = {
        let url = hub.url.clone();
        let connected = connected.clone();
        tokio::spawn(async move {
            let mut stream = EventStream::connect(&url, &books(None)).await.unwrap();
            connected.fetch_add(1, Ordering::SeqCst);
            let mut ids = Vec::new();
            loop {
                tokio::select! {
                    event = stream.next_within(Duration::from_secs(30)) => match event {
                        Some(event) => ids.extend(event.id),
                        None => return ids,
                    },
                    _ = expected.changed() => {}
                }
                if ids.len() >= *expected.borrow() {
                    // Then a moment more: an update sent twice would show now.
                    while let Some(event) = stream.next_within(Duration::from_millis(500)).await {
                        ids.extend(event.id);
                    }
                    return ids;
                }
            }
        })
    };
    while connected.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..300 {
        if i == 100 {
            nats.kill();
        }
        if i == 200 {
            nats.restart();
        }
        if i >= 200 {
            // NATS is back: the hub answers 503 until its client reconnects and it follows the
            // stream again, and takes every update from then on.
            post_until_taken(&client, &hub.url, &update(i)).await;
            taken.push(format!("n{i}"));
            continue;
        }
        let response = post(&client, &hub.url, &update(i)).send().await.unwrap();
        match response.status().as_u16() {
            200 => taken.push(format!("n{i}")),
            503 => {
                refused += 1;
                let body = response.text().await.unwrap();
                if body.contains("may still be dispatched") {
                    assert!(
                        body.contains(&format!("send it again with id n{i}")),
                        "{body}"
                    );
                    unconfirmed.push(format!("n{i}"));
                }
            }
            status => panic!("update n{i}: {status}"),
        }
    }
    answered.send_replace(taken.len());
    let received = subscriber.await.unwrap();
    assert!(refused >= 90, "only {refused} refused while NATS was away");
    assert!(taken.len() >= 200, "{} taken", taken.len());
    // Posts are one at a time: only the one in flight when NATS died can be unconfirmed.
    assert!(unconfirmed.len() <= 1, "unconfirmed: {unconfirmed:?}");
    // Every update answered 200, and any unconfirmed one that came through, once, in the order
    // posted.
    let number = |id: &String| id[1..].parse::<usize>().unwrap();
    let mut wanted: Vec<String> = taken.clone();
    wanted.extend(
        unconfirmed
            .iter()
            .filter(|id| received.contains(id))
            .cloned(),
    );
    wanted.sort_by_key(number);
    assert_eq!(
        received, wanted,
        "the subscriber got every update answered 200 (unconfirmed: {unconfirmed:?}), once, \
         in order"
    );
}

/// NATS hanging (SIGSTOP) while a hub publishes: the update reaches NATS's socket but no
/// acknowledgement comes back, so the hub cannot know whether it was stored. It answers 503
/// saying the update may still be dispatched and under which id to send it again (one it gave,
/// as the update had none). NATS resumes and stores it; sent again with that id, it is answered
/// 200 and the subscriber still receives it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_nats_did_not_acknowledge_is_dispatched_once_when_sent_again_with_its_id() {
    let nats = NatsServer::start();
    let logs = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&nats, &logs);
    let client = client();
    let mut stream = EventStream::connect(&hub.url, &books(None)).await.unwrap();
    let first = Update {
        id: Some("first".into()),
        ..Update::new(vec!["https://example.com/books/1".into()], "1")
    };
    post_until_taken(&client, &hub.url, &first).await;

    nats.pause();
    let unacknowledged = Update::new(vec!["https://example.com/books/1".into()], "2");
    let started = Instant::now();
    let response = post(&client, &hub.url, &unacknowledged).send().await;
    nats.resume();
    let response = response.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body = response.text().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "answered before the publish timeout: {body}"
    );
    assert!(body.contains("may still be dispatched"), "{body}");
    let id = body
        .split("send it again with id ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no id to send it again with: {body}"))
        .to_owned();
    assert!(id.starts_with("urn:uuid:"), "the hub gave the id: {body}");

    let again = Update {
        id: Some(id.clone()),
        ..unacknowledged
    };
    post_until_taken(&client, &hub.url, &again).await;
    let last = Update {
        id: Some("last".into()),
        ..Update::new(vec!["https://example.com/books/1".into()], "3")
    };
    post_until_taken(&client, &hub.url, &last).await;

    let received = ids_until_last(&mut stream).await;
    assert_eq!(received, ["first".to_owned(), id, "last".to_owned()]);
}

/// NATS stops answering for less than the hub's publish timeout (5 s): the publish waits for
/// the acknowledgement instead of giving up, and is answered 200 once NATS is back; the
/// subscriber receives the update once, in its place between the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_nats_acknowledges_late_but_within_the_timeout_is_answered_200() {
    const PAUSE: Duration = Duration::from_secs(3);
    let nats = NatsServer::start();
    let logs = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&nats, &logs);
    let client = client();
    let mut stream = EventStream::connect(&hub.url, &books(None)).await.unwrap();
    let update = |id: &str, data: &str| Update {
        id: Some(id.into()),
        ..Update::new(vec!["https://example.com/books/1".into()], data)
    };
    post_until_taken(&client, &hub.url, &update("first", "1")).await;

    nats.pause();
    let started = Instant::now();
    let resume = async {
        tokio::time::sleep(PAUSE).await;
        nats.resume();
    };
    let (response, ()) = tokio::join!(post(&client, &hub.url, &update("late", "2")).send(), resume);
    let response = response.unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "late");
    assert!(
        started.elapsed() >= PAUSE,
        "answered before NATS acknowledged: {:?}",
        started.elapsed()
    );
    post_until_taken(&client, &hub.url, &update("last", "3")).await;

    let received = ids_until_last(&mut stream).await;
    assert_eq!(received, ["first", "late", "last"]);
}

/// The ids `stream` receives up to the update of id `last`, and for a moment after (a second
/// copy would show then).
async fn ids_until_last(stream: &mut EventStream) -> Vec<String> {
    let mut received = Vec::new();
    while let Some(event) = stream.next_within(Duration::from_secs(10)).await {
        received.extend(event.id);
        if received.last().map(String::as_str) == Some("last") {
            while let Some(event) = stream.next_within(Duration::from_millis(500)).await {
                received.extend(event.id);
            }
            break;
        }
    }
    received
}

/// nginx, run in the foreground with `nginx/hubs.conf` in front of `hubs`, on a port of its own.
struct Nginx {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(hubs: &[&HubProcess]) -> Nginx {
        let binary = std::env::var_os("DATAVIZ_NGINX").unwrap_or_else(|| "/usr/sbin/nginx".into());
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let site =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../nginx/hubs.conf"))
                .unwrap()
                .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
                .replace("hub-1:80", &format!("127.0.0.1:{}", hubs[0].port))
                .replace("hub-2:80", &format!("127.0.0.1:{}", hubs[1].port));
        let path = dir.path().display().to_string();
        std::fs::write(dir.path().join("site.conf"), site).unwrap();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "daemon off;\npid {path}/nginx.pid;\nerror_log {path}/error.log;\nevents {{}}\n\
                 http {{ access_log off; client_body_temp_path {path}; proxy_temp_path {path}; \
                 include {path}/site.conf; }}\n"
            ),
        )
        .unwrap();
        let child = std::process::Command::new(&binary)
            .args(["-c", &format!("{path}/nginx.conf"), "-p", &path])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{binary:?}: {e} (scripts/setup installs nginx-light)"));
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "nginx did not listen: {}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
        Nginx {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}{HUB_PATH}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The compose profile `hubs` without Docker: two hubs behind nginx with `nginx/hubs.conf`,
/// publisher and subscribers on nginx's one address. One hub is SIGKILLed mid-run: nginx sends
/// the publisher's requests to the other, the subscribers it held reconnect through nginx with
/// their last id to the other, and every subscriber receives every update once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_behind_nginx_lose_nothing_when_one_is_killed() {
    const UPDATES: usize = 1_000;
    const SUBSCRIBERS: usize = 4;
    let nats = NatsServer::start();
    let logs = tempfile::tempdir().unwrap();
    let mut first = HubProcess::start(&nats, &logs);
    let second = HubProcess::start(&nats, &logs);
    let nginx = Nginx::start(&[&first, &second]);

    let connected = Arc::new(AtomicUsize::new(0));
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| {
            tokio::spawn(subscribe_through_outages(
                nginx.url(),
                SubscribeRequest {
                    topics: vec![BOOKS.into()],
                    token: Some(subscriber_token(&[])),
                    last_event_id: None,
                },
                connected.clone(),
                (UPDATES, Duration::from_millis(500)),
                Duration::from_secs(90),
            ))
        })
        .collect();
    while connected.load(Ordering::SeqCst) < SUBSCRIBERS {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // least_conn spreads them: both hubs hold some.
    let held_by_first = tcp_connections_to(first.port);
    assert!(
        (1..SUBSCRIBERS).contains(&held_by_first),
        "{held_by_first} of {SUBSCRIBERS} subscribers on the first hub"
    );

    let client = client();
    for i in 0..UPDATES {
        if i == UPDATES / 3 {
            first.role.kill();
        }
        let update = Update {
            id: Some(format!("lb{i}")),
            ..Update::new(vec!["https://example.com/books/2".into()], format!("{i}"))
        };
        post_until_taken(&client, &nginx.url(), &update).await;
    }
    let expected: Vec<String> = (0..UPDATES).map(|i| format!("lb{i}")).collect();
    let mut reconnected = 0;
    for subscriber in subscribers {
        let (ids, reconnections) = subscriber.await.unwrap();
        reconnected += reconnections;
        assert!(
            ids == expected,
            "a subscriber behind nginx got {} events for {UPDATES}",
            ids.len()
        );
    }
    assert!(reconnected >= 1, "no subscriber was on the killed hub");
}

/// Established TCP connections to a local port (from /proc/net/tcp): how many clients a hub
/// holds.
fn tcp_connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, rem_address, st (01: established)
            fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "01"
        })
        .count()
}

/// A hub restarted after every update in its stream went past `MERCURE_HISTORY_MAX_AGE`: the
/// stream is empty but its sequence is not back at zero. The hub starts at once, with an empty
/// history, and serves new updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_starts_on_a_stream_whose_updates_all_expired() {
    let nats = NatsServer::start();
    let logs = tempfile::tempdir().unwrap();
    let short = [("MERCURE_HISTORY_MAX_AGE", "1s")];
    let mut hub = HubProcess::start_with(&nats, &logs, &short);
    let client = client();
    let update = |id: &str| Update {
        id: Some(id.into()),
        ..Update::new(vec!["https://example.com/books/3".into()], "x")
    };
    post_until_taken(&client, &hub.url, &update("gone")).await;
    hub.role.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    hub.role.start_again();
    hub.wait_up();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the hub took {:?} to start",
        started.elapsed()
    );
    let mut stream = EventStream::connect(&hub.url, &books(Some("earliest")))
        .await
        .unwrap();
    post_until_taken(&client, &hub.url, &update("new")).await;
    let event = stream.next_within(Duration::from_secs(5)).await;
    assert_eq!(event.and_then(|e| e.id).as_deref(), Some("new"));
}

/// Updates around NATS's `max_payload` (64 KiB here): one just under it is stored and sent, one
/// just over is refused with a 400 naming the limit (sending it again cannot help), and the
/// hub goes on: the next update is sent, nothing is lost or sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_past_the_stream_s_payload_limit_is_refused_and_its_neighbours_go_through() {
    let nats = NatsServer::start_with_config("max_payload: 65536");
    let logs = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&nats, &logs);
    let mut stream = EventStream::connect(&hub.url, &books(None)).await.unwrap();
    let client = client();
    let update = |id: &str, size: usize| Update {
        id: Some(id.into()),
        ..Update::new(vec!["https://example.com/books/4".into()], "x".repeat(size))
    };
    // The stored message is the form (topic, data, id) and a Nats-Msg-Id header: 65,000 bytes
    // of data leave it a few hundred bytes under the limit.
    let under = post(&client, &hub.url, &update("under", 65_000))
        .send()
        .await
        .unwrap();
    assert_eq!(under.status(), 200);
    let over = post(&client, &hub.url, &update("over", 66_000))
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), 400);
    let reason = over.text().await.unwrap();
    assert!(reason.contains("too large"), "{reason}");
    post_until_taken(&client, &hub.url, &update("after", 10)).await;
    let mut ids = Vec::new();
    while let Some(event) = stream.next_within(Duration::from_secs(2)).await {
        ids.extend(event.id);
    }
    assert_eq!(ids, ["under", "after"]);
}
