//! What the pipeline tests share: a stack of real servers, the `dataviz` binary started as
//! processes, an MQTT publisher, and waiting on the database.

#![allow(dead_code)]

use dataviz_testkit::{BRIDGE_PASSWORD, DeviceUser, Mosquitto, NatsServer, TestDb};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// NATS, Mosquitto and a migrated database, each the test's own.
pub struct Stack {
    pub nats: NatsServer,
    pub mosquitto: Mosquitto,
    pub db: TestDb,
    pub log_dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Stack {
        Self::start_with_db(TestDb::create().await).await
    }

    /// Like [`start`](Self::start), with `db` (e.g. on a test's own
    /// [`PostgresServer`](dataviz_testkit::PostgresServer)) instead of a new database on the
    /// shared server; it is migrated here. Keep the server alive longer than the stack.
    pub async fn start_with_db(db: TestDb) -> Stack {
        let nats = NatsServer::start();
        let mosquitto = Mosquitto::start();
        let mut client = db.connect().await;
        dataviz_core::db::migrate(&mut client)
            .await
            .expect("migrations apply");
        let stack = Stack {
            nats,
            mosquitto,
            db,
            log_dir: tempfile::tempdir().expect("temp dir"),
        };
        stack.open_bridge_session().await;
        stack
    }

    /// Opens the bridge's persistent MQTT session, as its first run does, so that the broker
    /// queues what the test publishes before the bridge process is up.
    pub async fn open_bridge_session(&self) {
        let mut options = MqttOptions::new("dataviz-bridge", "127.0.0.1", self.mosquitto.port());
        options.set_clean_session(false);
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        client
            .subscribe("gateways/+/+", QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                _ => assert!(Instant::now() < deadline, "no SUBACK from the broker"),
            }
        }
        client.disconnect().await.ok();
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    }

    /// The environment of a `dataviz` process pointed at this stack: Mosquitto, so the bridge.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = role_env(&self.nats, self.mosquitto.port(), &self.db, &self.log_dir);
        env.push(("MQTT_INTAKE".into(), "bridge".into()));
        env
    }

    /// Starts `dataviz <role>` with this stack's environment plus `extra`.
    pub fn spawn(&self, role: &str, extra: &[(&str, &str)]) -> Role {
        Role::spawn(role, self.env(), extra)
    }

    pub async fn create_gateway(&self, id: i32) {
        self.db
            .connect()
            .await
            .execute(
                "INSERT INTO gateway (id, name) VALUES ($1, 'gateway ' || $1::int)",
                &[&id],
            )
            .await
            .expect("gateway inserted");
    }

    pub async fn count(&self, sql: &str) -> i64 {
        count_on(&self.db, sql).await
    }

    /// Waits until `sql` (a single bigint) returns `expected`; see [`wait_for_count_on`].
    pub async fn wait_for_count(&self, sql: &str, expected: i64, timeout: Duration) {
        wait_for_count_on(&self.db, sql, expected, timeout).await
    }
}

/// The environment of a `dataviz` process on these servers, the broker's MQTT listener on
/// `mqtt_port`.
pub fn role_env(
    nats: &NatsServer,
    mqtt_port: u16,
    db: &TestDb,
    log_dir: &tempfile::TempDir,
) -> Vec<(String, String)> {
    [
        ("NATS_URL", nats.url()),
        ("MQTT_HOST", "127.0.0.1".to_owned()),
        ("MQTT_PORT", mqtt_port.to_string()),
        ("DATABASE_URL", db.url().to_owned()),
        ("LOG_DIR", log_dir.path().display().to_string()),
        ("RUST_LOG", "info".to_owned()),
        ("APP_ENV", "prod".to_owned()),
        ("LOG_FORMAT", "text".to_owned()),
        // Several roles per test: each serves /healthz and /metrics on a port of its own.
        ("HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("APP_ADDR", "127.0.0.1:0".to_owned()),
        // Tests replay dated payloads (the original's example is from 2017): retention is
        // tested on its own, with this set.
        ("READINGS_RETENTION", "off".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The device user of a [`BrokerStack`]: it publishes for gateway 1.
pub const DEVICE: DeviceUser = DeviceUser {
    name: "gateway-1",
    password: "device-password",
    gateway: Some(1),
};

/// The project's broker, a migrated database with gateway 1, and the roles' environment (the
/// bridge's MQTT user and password).
pub struct BrokerStack {
    pub nats: NatsServer,
    pub db: TestDb,
    log_dir: tempfile::TempDir,
    /// MQTT_INTAKE: `bridge` or `nats`.
    pub intake: &'static str,
}

impl BrokerStack {
    pub async fn start() -> BrokerStack {
        Self::start_with_intake("bridge").await
    }

    /// With `intake` as MQTT_INTAKE (`nats`: the processor reads nats-server's MQTT stream, no
    /// bridge); `dataviz migrate` made what keeps messages for Dataviz before it runs.
    pub async fn start_with_intake(intake: &'static str) -> BrokerStack {
        let nats = NatsServer::start_broker(&[DEVICE]);
        let db = TestDb::create().await;
        let stack = BrokerStack {
            nats,
            db,
            log_dir: tempfile::tempdir().expect("temp dir"),
            intake,
        };
        let (ok, out) = stack.dataviz(&["migrate"]);
        assert!(ok, "{out}");
        let made = match intake {
            "nats" => "consumer processor-mqtt, made",
            _ => "MQTT: the bridge's session (dataviz-bridge)",
        };
        assert!(out.contains(made) && out.contains("made"), "{out}");
        let (ok, out) = stack.dataviz(&["migrate"]);
        assert!(
            ok && out.contains("exists"),
            "a second migrate finds it: {out}"
        );
        stack
            .db
            .connect()
            .await
            .execute("INSERT INTO gateway (id, name) VALUES (1, 'one')", &[])
            .await
            .expect("gateway inserted");
        stack
    }

    /// A JetStream context on the stack's nats-server.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(async_nats::connect(self.nats.url()).await.expect("NATS"))
    }

    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = role_env(&self.nats, self.nats.mqtt_port(), &self.db, &self.log_dir);
        env.push(("MQTT_USERNAME".into(), "dataviz-bridge".into()));
        env.push(("MQTT_PASSWORD".into(), BRIDGE_PASSWORD.into()));
        env.push(("MQTT_INTAKE".into(), self.intake.into()));
        env
    }

    pub fn spawn(&self, role: &str, extra: &[(&str, &str)]) -> Role {
        spawn_role(role, self.env(), extra)
    }

    /// A device publishing for gateway 1 (testkit's, on rumqttc).
    pub fn publisher(&self) -> Publisher {
        let id = format!("test-publisher-{}", uuid::Uuid::now_v7().simple());
        Publisher(dataviz_testkit::Publisher::connect_as(
            self.nats.mqtt_port(),
            &id,
            DEVICE.name,
            DEVICE.password,
        ))
    }

    /// Runs `dataviz ARGS` to its end: success, and what it printed.
    pub fn dataviz(&self, args: &[&str]) -> (bool, String) {
        run_dataviz(self.env(), args)
    }
}

/// Runs `dataviz ARGS` to its end with exactly `env` (and `PATH`): success, and what it printed.
pub fn run_dataviz(env: Vec<(String, String)>, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dataviz"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .output()
        .expect("dataviz runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A `dataviz` process; killed when dropped.
pub struct Role {
    pub role: String,
    env: Vec<(String, String)>,
    extra: Vec<(String, String)>,
    child: Child,
}

impl Role {
    fn spawn(role: &str, env: Vec<(String, String)>, extra: &[(&str, &str)]) -> Role {
        let extra: Vec<(String, String)> = extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let child = launch(role, &env, &extra);
        Role {
            role: role.to_owned(),
            env,
            extra,
            child,
        }
    }

    /// SIGKILL: a crash, nothing flushed.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL, then start the same role again.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.child = launch(&self.role, &self.env, &self.extra);
    }

    /// SIGTERM, then waits up to `timeout` for the process to exit; its exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the role again (after it exited).
    pub fn start_again(&mut self) {
        self.child = launch(&self.role, &self.env, &self.extra);
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        self.kill();
    }
}

fn launch(role: &str, env: &[(String, String)], extra: &[(String, String)]) -> Child {
    let quiet = std::env::var_os("DATAVIZ_TEST_LOGS").is_none();
    let mut command = dataviz_command(role, env, extra);
    if quiet {
        command.stdout(Stdio::null()).stderr(Stdio::null());
    }
    command
        .spawn()
        .unwrap_or_else(|e| panic!("starting dataviz {role}: {e}"))
}

/// `dataviz <role>` with only `PATH`, `env` and `extra` in its environment, stdin closed.
fn dataviz_command<K: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(
    role: &str,
    env: &[(String, String)],
    extra: &[(K, V)],
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dataviz"));
    command
        .arg(role)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .envs(extra.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    command
}

/// An MQTT client publishing at QoS 1, counting the broker's acks; failures fail the test.
pub struct Publisher(dataviz_testkit::Publisher);

impl Publisher {
    pub async fn connect(port: u16) -> Publisher {
        let id = format!("test-publisher-{}", uuid::Uuid::now_v7().simple());
        Publisher(dataviz_testkit::Publisher::connect(port, &id))
    }

    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.0
            .publish(topic, payload)
            .await
            .expect("queued for publishing");
    }

    /// Queues one message at `qos` (0, 1 or 2).
    pub async fn publish_at(
        &mut self,
        qos: rumqttc::QoS,
        topic: &str,
        payload: impl Into<Vec<u8>>,
    ) {
        self.0
            .publish_at(qos, topic, payload)
            .await
            .expect("queued for publishing");
    }

    /// Waits until the broker acknowledged everything published.
    pub async fn wait_acked(&self, timeout: Duration) {
        if let Err(e) = self.0.wait_acked(timeout).await {
            panic!("{e}");
        }
    }
}

/// The messages in a stream, read from the start with an ephemeral consumer.
pub async fn stream_messages(nats_url: &str, stream: &str) -> Vec<async_nats::jetstream::Message> {
    use futures::StreamExt;
    let client = async_nats::connect(nats_url).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(stream).await.expect("stream exists");
    let pending = stream.get_info().await.expect("stream info").state.messages as usize;
    if pending == 0 {
        return Vec::new();
    }
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("ephemeral consumer");
    let mut messages = consumer
        .fetch()
        .max_messages(pending)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .expect("fetch");
    let mut out = Vec::new();
    while let Some(message) = messages.next().await {
        out.push(message.expect("message"));
        if out.len() == pending {
            break;
        }
    }
    out
}

/// How many messages a stream holds.
pub async fn stream_count(nats_url: &str, stream: &str) -> u64 {
    let client = async_nats::connect(nats_url).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(stream).await.expect("stream exists");
    stream.info().await.expect("stream info").state.messages
}

/// What RAW holds: its packs (`dataviz_core::pack`), and its raw messages, each message stored
/// alone and each member of a pack.
pub struct RawCounts {
    pub packs: u64,
    pub members: u64,
}

pub async fn raw_counts(nats_url: &str) -> RawCounts {
    let mut counts = RawCounts {
        packs: 0,
        members: 0,
    };
    for message in stream_messages(nats_url, dataviz_core::streams::RAW_STREAM).await {
        let headers = message.headers.as_ref();
        if !dataviz_core::pack::is_pack(headers) {
            counts.members += 1;
            continue;
        }
        let members = dataviz_core::pack::decode(headers, &message.payload);
        counts.packs += 1;
        counts.members += members.expect("a pack that reads").len() as u64;
    }
    counts
}

/// The raw messages RAW holds ([`raw_counts`]).
pub async fn raw_member_count(nats_url: &str) -> u64 {
    raw_counts(nats_url).await.members
}

/// Waits (60 s at most) until the processor and the writer have settled everything RAW and
/// READINGS hold: what was published before is written, or refused, for good.
pub async fn wait_drained(nats_url: &str) {
    let client = async_nats::connect(nats_url).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut settled_twice = 0;
    loop {
        let mut busy = false;
        for (stream, consumer) in [
            (
                dataviz_core::streams::RAW_STREAM,
                dataviz_core::streams::PROCESSOR_CONSUMER,
            ),
            (
                dataviz_core::streams::READINGS_STREAM,
                dataviz_core::streams::WRITER_CONSUMER,
            ),
        ] {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
                .get_stream(stream)
                .await
                .expect("stream exists")
                .get_consumer(consumer)
                .await
                .expect("consumer exists");
            let info = consumer.info().await.expect("consumer info");
            busy |= info.num_pending > 0 || info.num_ack_pending > 0;
        }
        // Twice in a row: the processor may be between acking RAW and READINGS storing.
        settled_twice = if busy { 0 } else { settled_twice + 1 };
        if settled_twice == 2 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pipeline did not settle within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Starts `dataviz <role>` with exactly `env` plus `extra`: for tests that build their own
/// environment (e.g. against a NATS cluster instead of a [`Stack`]).
pub fn spawn_role(role: &str, env: Vec<(String, String)>, extra: &[(&str, &str)]) -> Role {
    Role::spawn(role, env, extra)
}

/// Opens a persistent MQTT session for `client_id` subscribed to `filter` (e.g. a shared
/// subscription `$share/group/...`), as a bridge's first run does, so that the broker queues
/// what the test publishes before the bridge process is up.
pub async fn open_mqtt_session(port: u16, client_id: &str, filter: &str) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                assert!(
                    ack.return_codes
                        .iter()
                        .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
                    "{client_id}: {filter} refused: {:?}",
                    ack.return_codes
                );
                break;
            }
            _ => assert!(Instant::now() < deadline, "no SUBACK from the broker"),
        }
    }
    client.disconnect().await.ok();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

/// A single bigint from `sql` on `db`.
pub async fn count_on(db: &TestDb, sql: &str) -> i64 {
    db.connect()
        .await
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Waits until `sql` (a single bigint) returns `expected`; panics with the last value, when it
/// passes the mark (rows are never removed: past it is a duplicate), or when it is stuck.
pub async fn wait_for_count_on(db: &TestDb, sql: &str, expected: i64, timeout: Duration) {
    let client = db.connect().await;
    let deadline = Instant::now() + timeout;
    let (mut last, mut last_change) = (-1, Instant::now());
    loop {
        let value: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
        if value != last {
            (last, last_change) = (value, Instant::now());
        }
        assert!(
            last_change.elapsed() < Duration::from_secs(30),
            "{sql}: stuck at {value} for 30 s, expected {expected}"
        );
        if value == expected {
            return;
        }
        assert!(
            value < expected,
            "{sql}: {value}, more than the {expected} expected"
        );
        assert!(
            Instant::now() < deadline,
            "{sql}: {value} after {timeout:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1: the status code and the body.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .ok()?
    .ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Waits up to 30 s until the admin site of `dataviz all` (or `app`) answers on `port`.
pub async fn wait_for_site(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(port, "/login").await.is_none() {
        assert!(
            Instant::now() < deadline,
            "nothing answered on 127.0.0.1:{port} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last cookie `name` a response head sets, as `name=value`.
pub fn set_cookie(head: &str, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    head.lines()
        .filter_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .filter_map(|c| c.split(';').next())
        .rfind(|c| c.starts_with(&prefix))
        .map(str::to_owned)
}

/// A [`Publisher`] with a persistent session (clean session off, fixed random client id): what
/// it had in flight when the connection dropped is sent again on reconnection, as a device
/// that must not lose readings does. For tests that stop the broker under it.
pub async fn persistent_publisher(port: u16) -> Publisher {
    let id = format!("test-device-{}", uuid::Uuid::now_v7().simple());
    Publisher(dataviz_testkit::Publisher::connect_persistent(port, &id))
}

/// A `dataviz` process whose stderr and stdout are kept (and echoed with `DATAVIZ_TEST_LOGS`),
/// for tests that assert on what it logs; killed when dropped.
pub struct LoggedRole {
    pub role: String,
    child: Child,
    output: Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl LoggedRole {
    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        self.output.lock().expect("log lock").clone()
    }

    /// Waits up to `timeout` for a line containing every one of `needles`; that line.
    pub async fn wait_for_line(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .log()
                .lines()
                .find(|line| needles.iter().all(|n| line.contains(n)))
                .map(str::to_owned);
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits up to 15 s for a line containing every one of `needles`, and returns it; fails the
    /// test otherwise, saying which line (`what`) was missing and showing the whole log.
    pub async fn expect_line(&self, needles: &[&str], what: &str) -> String {
        self.wait_for_line(needles, Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("no log line {what}:\n{}", self.log()))
    }

    /// Waits up to `timeout` for the process to exit; its exit code (`Some(None)`: by a signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code());
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process's peak resident memory so far (`VmHWM`), in KiB.
    pub fn peak_memory_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status of the process");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc status")
    }

    /// SIGKILL, then waits until everything it wrote has been read.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for LoggedRole {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `dataviz <role>` with exactly `env` plus `extra`, its output captured (see
/// [`LoggedRole`]).
pub fn spawn_logged(role: &str, env: &[(String, String)], extra: &[(&str, &str)]) -> LoggedRole {
    use std::io::BufRead;
    let mut command = dataviz_command(role, env, extra);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("starting dataviz {role}: {e}"));
    let output = Arc::new(std::sync::Mutex::new(String::new()));
    let echo = std::env::var_os("DATAVIZ_TEST_LOGS").is_some();
    let pipes: [Box<dyn std::io::Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("stdout piped")),
        Box::new(child.stderr.take().expect("stderr piped")),
    ];
    let mut readers = Vec::new();
    for pipe in pipes {
        let output = output.clone();
        let role = role.to_owned();
        readers.push(std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[{role}] {line}");
                }
                let mut output = output.lock().expect("log lock");
                output.push_str(&line);
                output.push('\n');
            }
        }));
    }
    LoggedRole {
        role: role.to_owned(),
        child,
        output,
        readers,
    }
}

/// Readings in each [`numbered_reading`].
pub const NUMBERED_TAGS: i64 = 3;

/// Message `i` of a run: its number in a `seq` tag (so that each can be found once stored), two
/// more readings, and a timestamp of its own.
pub fn numbered_reading(i: i64) -> String {
    use chrono::TimeZone;
    let ts = chrono::Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap()
        + chrono::Duration::milliseconds(i);
    format!(
        r#"{{"d": [{{"tag": "seq", "value": {i}}}, {{"tag": "AI.0", "value": {}.5}},
                  {{"tag": "DI.0", "value": {}}}], "ts": "{}"}}"#,
        i % 97,
        i % 2 == 0,
        ts.to_rfc3339()
    )
}

/// Publishes [`numbered_reading`]s `burst * size .. (burst + 1) * size` over 20 devices of
/// gateway 1: one burst of a sustained run.
pub async fn publish_numbered_burst(mqtt: &mut Publisher, burst: i64, size: i64) {
    for i in burst * size..(burst + 1) * size {
        mqtt.publish(&format!("gateways/1/dev-{}", i % 20), numbered_reading(i))
            .await;
    }
}

/// How many dead letters the stack's DEAD stream holds.
pub async fn dead_letters(stack: &Stack) -> usize {
    stream_messages(&stack.nats.url(), "DEAD").await.len()
}

/// Every one of `messages` [`numbered_reading`]s is stored, each reading exactly once.
pub async fn assert_every_numbered_message_once(db: &TestDb, messages: i64, timeout: Duration) {
    wait_for_count_on(
        db,
        "SELECT count(*) FROM tag_reading",
        messages * NUMBERED_TAGS,
        timeout,
    )
    .await;
    assert_eq!(
        count_on(
            db,
            "SELECT count(DISTINCT r.value_num)::bigint FROM tag_reading r
             JOIN tag t ON t.id = r.tag_id WHERE t.code = 'seq'"
        )
        .await,
        messages,
        "every message's sequence number is there"
    );
    assert_eq!(
        count_on(
            db,
            "SELECT count(*) FROM (SELECT tag_id, time FROM tag_reading
             GROUP BY tag_id, time HAVING count(*) > 1) AS twice"
        )
        .await,
        0,
        "no reading stored twice"
    );
}

/// A raw HTTP/1.1 request on 127.0.0.1:`port` (an urlencoded form when `form` is given, with
/// the site's own Origin), with `headers` besides; the status code and the response head.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    form: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the site listens");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\n\
         Accept: text/html\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = form.unwrap_or("");
    if form.is_some() {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("response within 10 s")
        .expect("response read");
    let response = String::from_utf8_lossy(&response).into_owned();
    let head = response
        .split_once("\r\n\r\n")
        .map_or(response.as_str(), |(head, _)| head)
        .to_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head)
}

/// Creates an admin user with `dataviz user add EMAIL --admin`, the password on stdin.
pub fn add_admin(env: &[(String, String)], email: &str, password: &str) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dataviz"))
        .args(["user", "add", email, "--admin"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dataviz user add starts");
    writeln!(child.stdin.take().expect("stdin"), "{password}").expect("password written");
    let output = child.wait_with_output().expect("dataviz user add ends");
    assert!(output.status.success(), "dataviz user add: {output:?}");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        !printed.contains(password),
        "dataviz user add printed the password: {printed}"
    );
}
