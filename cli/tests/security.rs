//! Security of the transport and of the logs, against real servers and the `dataviz` binary:
//! MQTT (Mosquitto), NATS and PostgreSQL over TLS, certificates made at test time; wrong
//! credentials or certificates refused with a clear log line and nothing ingested; no password or
//! key in any log line, even at `RUST_LOG=debug`.

mod common;

use common::{Stack, add_admin, http_request, spawn_logged};
use dataviz_testkit::{
    NatsServer, PostgresConfig, PostgresServer, TestDb, free_port, wait_for_port,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const MESSAGE: &str = r#"{"d": [{"tag": "AI.0", "value": 1.5}], "ts": "2024-06-01T12:00:00Z"}"#;
const ROWS: &str = "SELECT count(*) FROM tag_reading";
const ADMIN: &str = "admin@example.com";

/// A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, as PEM files
/// in a temp dir.
struct Pki {
    _dir: TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("dataviz-pki-")
            .tempdir()
            .expect("temp dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "dataviz test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");

        let server_key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let cert = params
            .signed_by(&server_key, &ca)
            .expect("server certificate");

        let client_key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "dataviz role");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let client_cert = params
            .signed_by(&client_key, &ca)
            .expect("client certificate");

        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            path
        };
        let ca_path = write("ca.pem", &ca.pem());
        let cert_path = write("server.pem", &cert.pem());
        let key_path = write("server-key.pem", &server_key.serialize_pem());
        let client_cert_path = write("client.pem", &client_cert.pem());
        let client_key_path = write("client-key.pem", &client_key.serialize_pem());
        Pki {
            ca: ca_path,
            cert: cert_path,
            key: key_path,
            client_cert: client_cert_path,
            client_key: client_key_path,
            _dir: dir,
        }
    }

    fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca).expect("CA file")
    }
}

/// Mosquitto with only a TLS listener on 127.0.0.1, anonymous clients refused, and one user
/// from a `mosquitto_passwd` file.
struct TlsMosquitto {
    port: u16,
    dir: TempDir,
    child: Child,
}

impl TlsMosquitto {
    fn start(pki: &Pki, user: &str, password: &str) -> TlsMosquitto {
        let dir = tempfile::Builder::new()
            .prefix("dataviz-mosquitto-tls-")
            .tempdir()
            .expect("temp dir");
        let passwords = dir.path().join("passwords");
        let made = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&passwords)
            .args([user, password])
            .output()
            .expect("mosquitto_passwd runs");
        assert!(made.status.success(), "mosquitto_passwd: {made:?}");
        let mut errors = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let config = dir.path().join("mosquitto.conf");
            std::fs::write(
                &config,
                format!(
                    "listener {port} 127.0.0.1\n\
                     cafile {}\ncertfile {}\nkeyfile {}\n\
                     allow_anonymous false\npassword_file {}\n\
                     persistence false\nuser root\n\
                     log_dest stderr\nlog_type all\nconnection_messages true\n",
                    pki.ca.display(),
                    pki.cert.display(),
                    pki.key.display(),
                    passwords.display()
                ),
            )
            .expect("config written");
            let log = std::fs::File::create(dir.path().join("mosquitto.log")).expect("log file");
            let mut child = Command::new("/usr/sbin/mosquitto")
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("mosquitto starts");
            if wait_for_port(port, Duration::from_secs(10)) {
                return TlsMosquitto { port, dir, child };
            }
            let _ = child.kill();
            let _ = child.wait();
            errors.push(
                std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default(),
            );
        }
        panic!(
            "mosquitto with TLS did not start:\n{}",
            errors.join("\n---\n")
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for TlsMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// MQTT options for a TLS client of `port` trusting `ca`, with credentials.
fn tls_options(client_id: &str, port: u16, ca: Vec<u8>, user: &str, password: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_credentials(user, password);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth: None,
    }));
    options
}

/// Connects with `options`, does `then` (subscribe or publish, QoS 1), and waits for the
/// broker's SUBACK or PUBACK. Panics with the connection error otherwise.
async fn mqtt_exchange(
    options: MqttOptions,
    subscribe: Option<&str>,
    publish: Option<(&str, &str)>,
) {
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    if let Some(filter) = subscribe {
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
    }
    if let Some((topic, payload)) = publish {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish queued");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_) | Packet::PubAck(_)))) => break,
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("MQTT over TLS: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "no SUBACK or PUBACK from the broker"
        );
    }
    client.disconnect().await.ok();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

/// What a device does: publishes one message over TLS with credentials, waits for the PUBACK.
async fn publish_tls(broker: &TlsMosquitto, pki: &Pki, user: &str, password: &str, topic: &str) {
    let id = format!("test-device-{}", uuid::Uuid::now_v7().simple());
    let options = tls_options(&id, broker.port, pki.ca_pem(), user, password);
    mqtt_exchange(options, None, Some((topic, MESSAGE))).await;
}

/// Opens the bridge's persistent session on the TLS broker (as its first run does), so that
/// the broker queues what is published before a bridge is connected.
async fn open_bridge_session_tls(broker: &TlsMosquitto, pki: &Pki, user: &str, password: &str) {
    let mut options = tls_options("dataviz-bridge", broker.port, pki.ca_pem(), user, password);
    options.set_clean_session(false);
    mqtt_exchange(options, Some("gateways/+/+"), None).await;
}

/// A nats-server with TLS (certificate of `pki`) and one user.
fn tls_nats(pki: &Pki, user: &str, password: &str) -> NatsServer {
    NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n}}\n\
         authorization {{\n  user: \"{user}\"\n  password: \"{password}\"\n}}\n",
        pki.cert.display(),
        pki.key.display(),
        pki.ca.display()
    ))
}

/// A PostgreSQL server of the test's own with TLS (certificate of `pki`) and `hostssl` rules
/// only: a connection without TLS is refused, whoever makes it.
fn tls_postgres(pki: &Pki) -> PostgresServer {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    PostgresServer::start_with(
        PostgresConfig::default()
            .file("server.crt", read(&pki.cert))
            .file("server.key", read(&pki.key))
            .setting("ssl", "on")
            .setting("ssl_cert_file", "server.crt")
            .setting("ssl_key_file", "server.key")
            .hba("hostssl all all 127.0.0.1/32 trust\n"),
    )
}

fn tls_url(nats: &NatsServer) -> String {
    format!("tls://127.0.0.1:{}", nats.port())
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// `ADMIN` fails to log in with `wrong`, logs in with `password` over plain HTTP (the site's
/// own Origin), and opens a page with the session; the session cookie's value.
async fn admin_logs_in(port: u16, wrong: &str, password: &str) -> String {
    let form = |password: &str| format!("email=admin%40example.com&password={password}&next=%2F");
    let (status, head) = http_request(port, "POST", "/api/login", Some(&form(wrong)), &[]).await;
    assert!(status == 302 || status == 303, "{head}");
    assert!(head.contains("/login?error"), "{head}");
    let (status, head) = http_request(port, "POST", "/api/login", Some(&form(password)), &[]).await;
    assert!(status == 302 || status == 303, "{head}");
    let cookie = common::set_cookie(&head, "dataviz_session")
        .unwrap_or_else(|| panic!("no session cookie: {head}"));
    let session = cookie["dataviz_session=".len()..].to_owned();
    let (status, head) = http_request(port, "GET", "/devices", None, &[("Cookie", &cookie)]).await;
    assert_eq!(status, 200, "{head}");
    session
}

/// Which of `secrets` appear in `log`, with the first line of each.
fn leaked<'a>(log: &str, secrets: &[&'a str]) -> Vec<(&'a str, String)> {
    secrets
        .iter()
        .filter_map(|secret| {
            log.lines()
                .find(|line| line.contains(secret))
                .map(|line| (*secret, line.to_owned()))
        })
        .collect()
}

/// MQTT over TLS with a user and password: the bridge of `dataviz all` connects with the CA and
/// credentials of MQTT_TLS_CA, MQTT_USERNAME, MQTT_PASSWORD; a device's message becomes a row. A
/// bridge trusting another CA refuses the broker. A bridge with a wrong password is refused by
/// the broker, says so in its log, and ingests nothing; the message waits in the broker for the
/// bridge with the right password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_credentials_ingests_and_a_wrong_password_ingests_nothing() {
    let (user, password) = ("dataviz-bridge-user", "mqtt-pass-4f1c9a");
    let pki = Pki::new();
    let broker = TlsMosquitto::start(&pki, user, password);
    let stack = Stack::start().await;
    stack.create_gateway(11).await;
    open_bridge_session_tls(&broker, &pki, user, password).await;

    let port = broker.port.to_string();
    let ca = path(&pki.ca);
    let tls = [
        ("MQTT_PORT", port.as_str()),
        ("MQTT_TLS", "true"),
        ("MQTT_TLS_CA", ca.as_str()),
        ("MQTT_USERNAME", user),
    ];

    // A CA that did not sign the broker's certificate: the bridge refuses the broker.
    let other = Pki::new();
    let other_ca = path(&other.ca);
    let mut untrusted = spawn_logged(
        "all",
        &stack.env(),
        &[
            &tls[..2],
            &[
                ("MQTT_TLS_CA", other_ca.as_str()),
                ("MQTT_USERNAME", user),
                ("MQTT_PASSWORD", password),
            ],
        ]
        .concat(),
    );
    let line = untrusted
        .expect_line(&["MQTT", "invalid peer certificate"], "refusing the broker")
        .await;
    eprintln!("untrusted broker, logged: {line}");
    untrusted.kill();

    // A wrong password: refused, logged, nothing ingested.
    let mut wrong = spawn_logged(
        "all",
        &stack.env(),
        &[&tls[..], &[("MQTT_PASSWORD", "not-the-password")]].concat(),
    );
    publish_tls(&broker, &pki, user, password, "gateways/11/plc-1").await;
    let line = wrong
        .expect_line(
            &["MQTT", "NotAuthorized"],
            "saying the broker refused the bridge",
        )
        .await;
    eprintln!("wrong MQTT password, logged: {line}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(wrong.is_running(), "dataviz all exited:\n{}", wrong.log());
    assert_eq!(stack.count(ROWS).await, 0, "ingested with a wrong password");
    wrong.kill();

    // The right password: the message queued meanwhile, then a new one, both stored.
    let right = spawn_logged(
        "all",
        &stack.env(),
        &[&tls[..], &[("MQTT_PASSWORD", password)]].concat(),
    );
    stack.wait_for_count(ROWS, 1, Duration::from_secs(20)).await;
    publish_tls(&broker, &pki, user, password, "gateways/11/plc-2").await;
    stack.wait_for_count(ROWS, 2, Duration::from_secs(20)).await;
    assert!(
        right
            .wait_for_line(&["connected to the MQTT broker"], Duration::from_secs(1))
            .await
            .is_some(),
        "{}",
        right.log()
    );
    assert!(
        broker.log().contains("not authorised"),
        "the broker did not refuse the wrong password:\n{}",
        broker.log()
    );
}

/// NATS over TLS with a user and password: the bridge (`nats://` with NATS_TLS=true), the
/// processor and the writer (`tls://`) each connect with NATS_TLS_CA, NATS_USER, NATS_PASSWORD,
/// and a message becomes a row. A role trusting another CA refuses the server; a role with a
/// wrong NATS password logs the server's refusal and never gets going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_with_credentials_carries_messages_and_a_wrong_password_is_refused() {
    let (user, password) = ("dataviz", "nats-pass-93be07");
    let pki = Pki::new();
    let nats = tls_nats(&pki, user, password);
    let stack = Stack::start().await;
    stack.create_gateway(12).await;
    let ca = path(&pki.ca);
    let url = tls_url(&nats);
    let plain_url = nats.url();
    let creds = [
        ("NATS_TLS_CA", ca.as_str()),
        ("NATS_USER", user),
        ("NATS_PASSWORD", password),
    ];

    let _bridge = spawn_logged(
        "bridge",
        &stack.env(),
        &[
            &creds[..],
            &[("NATS_URL", &plain_url), ("NATS_TLS", "true")],
        ]
        .concat(),
    );
    let _processor = spawn_logged(
        "processor",
        &stack.env(),
        &[&creds[..], &[("NATS_URL", &url)]].concat(),
    );
    let _writer = spawn_logged(
        "writer",
        &stack.env(),
        &[&creds[..], &[("NATS_URL", &url)]].concat(),
    );
    let mut mqtt = common::Publisher::connect(stack.mosquitto.port()).await;
    mqtt.publish("gateways/12/plc-1", MESSAGE).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    stack.wait_for_count(ROWS, 1, Duration::from_secs(20)).await;

    // A CA that did not sign the server's certificate: the role refuses the server.
    let other = Pki::new();
    let other_ca = path(&other.ca);
    let untrusted = spawn_logged(
        "writer",
        &stack.env(),
        &[
            ("NATS_URL", url.as_str()),
            ("NATS_TLS_CA", other_ca.as_str()),
            ("NATS_USER", user),
            ("NATS_PASSWORD", password),
        ],
    );
    let line = untrusted
        .expect_line(
            &["NATS connection event", "IO error"],
            "refusing the server",
        )
        .await;
    eprintln!("untrusted NATS server, logged: {line}");
    // The client's log says only "IO error"; the server's says the client refused the handshake.
    assert!(
        nats.log().contains("TLS handshake error: remote error"),
        "{}",
        nats.log()
    );
    drop(untrusted);

    // A wrong password.
    let mut wrong = spawn_logged(
        "writer",
        &stack.env(),
        &[
            ("NATS_URL", url.as_str()),
            ("NATS_TLS_CA", ca.as_str()),
            ("NATS_USER", user),
            ("NATS_PASSWORD", "not-the-password"),
        ],
    );
    let line = wrong
        .expect_line(&["NATS", "authorization violation"], "naming the refusal")
        .await;
    eprintln!("wrong NATS password, logged: {line}");
    // It keeps trying (and saying why) until its 30 s for a first connection are up, then
    // exits with "NATS_URL ...: no connection after 30 s" (not waited for here).
    let refusals = |log: &str| log.matches("authorization violation").count();
    let first = refusals(&wrong.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(wrong.is_running(), "{}", wrong.log());
    assert!(
        refusals(&wrong.log()) > first,
        "no retry after the refusal:\n{}",
        wrong.log()
    );
}

/// PostgreSQL over TLS. The server takes TLS only (`hostssl`), with a certificate for 127.0.0.1
/// from a CA made here. `dataviz all` with `sslmode=verify-full&sslrootcert=<the CA>` stores a
/// message, over connections that are all TLS (`pg_stat_ssl`). `sslmode=disable` is refused by
/// the server, and a CA that did not sign the server's certificate by the client, each with a
/// clear message; `verify-full` checks the host name where `verify-ca` does not, and `require`
/// alone encrypts without checking anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_verifies_the_server_and_refuses_plain_connections_and_unknown_cas() {
    let pki = Pki::new();
    let server = tls_postgres(&pki);
    // The fixtures' own connections: TLS, no certificate checked.
    let db = TestDb::create_on(format!("{}?sslmode=require", server.url())).await;
    let (port, name) = (server.port(), db.name().to_owned());
    let url_on =
        |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/{name}?{query}");
    let url = |query: &str| url_on("127.0.0.1", query);
    let ca = path(&pki.ca);
    // The application name tells the roles' connections from the fixtures'.
    let verified = url(&format!(
        "sslmode=verify-full&sslrootcert={ca}&application_name=dataviz-tls"
    ));

    let stack = Stack::start_with_db(db).await;
    stack.create_gateway(21).await;
    let mut all = spawn_logged("all", &stack.env(), &[("DATABASE_URL", &verified)]);
    let mut mqtt = common::Publisher::connect(stack.mosquitto.port()).await;
    mqtt.publish("gateways/21/plc-1", MESSAGE).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    stack.wait_for_count(ROWS, 1, Duration::from_secs(30)).await;

    // The same code path as the roles: this connection is TLS, and so are the roles' own.
    let client = dataviz_core::db::connect(&verified)
        .await
        .expect("verify-full with the server's CA");
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "not TLS");
    eprintln!("dataviz_core::db::connect: {}", row.get::<_, String>(1));
    let (tls, plain): (i64, i64) = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = 'dataviz-tls' AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(tls > 0, "no connection of the roles");
    assert_eq!(plain, 0);
    assert!(all.is_running(), "{}", all.log());

    // Plain: the server refuses it (hostssl only), and says why.
    let err = dataviz_core::db::connect(&url("sslmode=disable"))
        .await
        .map(|_| ())
        .expect_err("plain connection accepted");
    let message = format!("{err:#}");
    eprintln!("sslmode=disable: {message}");
    assert!(
        message.starts_with("connecting to DATABASE_URL"),
        "{message}"
    );
    assert!(message.contains("no pg_hba.conf entry"), "{message}");
    assert!(message.contains("no encryption"), "{message}");
    let mut plain_role = spawn_logged(
        "migrate",
        &stack.env(),
        &[("DATABASE_URL", &url("sslmode=disable"))],
    );
    let code = plain_role.wait_exit(Duration::from_secs(30)).await;
    assert!(matches!(code, Some(Some(c)) if c != 0), "{code:?}");
    eprintln!(
        "dataviz migrate, sslmode=disable: {}",
        plain_role.log().trim()
    );
    assert!(
        plain_role.log().contains("no encryption"),
        "{}",
        plain_role.log()
    );

    // A CA that did not sign the server's certificate: the client refuses the server, under
    // verify-full and under require with that CA (libpq's verify-ca).
    let other = Pki::new();
    let other_ca = path(&other.ca);
    for query in [
        format!("sslmode=verify-full&sslrootcert={other_ca}"),
        format!("sslmode=require&sslrootcert={other_ca}"),
    ] {
        let err = dataviz_core::db::connect(&url(&query))
            .await
            .map(|_| ())
            .expect_err("server signed by another CA accepted");
        let message = format!("{err:#}");
        eprintln!("{query}: {message}");
        // Both test CAs have the same name: the other CA is taken for the issuer and its
        // signature does not match (BadSignature); a CA of another name says UnknownIssuer.
        assert!(message.contains("invalid peer certificate"), "{message}");
    }
    let mut untrusted = spawn_logged(
        "migrate",
        &stack.env(),
        &[(
            "DATABASE_URL",
            &url(&format!("sslmode=verify-full&sslrootcert={other_ca}")),
        )],
    );
    let code = untrusted.wait_exit(Duration::from_secs(30)).await;
    assert!(matches!(code, Some(Some(c)) if c != 0), "{code:?}");
    assert!(
        untrusted.log().contains("invalid peer certificate"),
        "{}",
        untrusted.log()
    );
    eprintln!("dataviz migrate, another CA: {}", untrusted.log().trim());

    // The certificate is for 127.0.0.1: reached as "localhost", verify-full refuses it and
    // verify-ca (the CA only) accepts it.
    let by_name = |mode: &str| {
        url_on(
            "localhost",
            &format!("hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={ca}"),
        )
    };
    let err = dataviz_core::db::connect(&by_name("verify-full"))
        .await
        .map(|_| ())
        .expect_err("a certificate for another name accepted");
    let message = format!("{err:#}");
    eprintln!("verify-full as localhost: {message}");
    assert!(message.contains("not valid for name"), "{message}");
    dataviz_core::db::connect(&by_name("verify-ca"))
        .await
        .expect("verify-ca checks the CA only");

    // require alone: encrypted, nothing checked (libpq's behaviour).
    let client = dataviz_core::db::connect(&url("sslmode=require"))
        .await
        .expect("require without sslrootcert");
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
}

/// Mutual TLS and a token: the server requires a client certificate signed by its CA
/// (`verify: true`) and a token. The roles present NATS_TLS_CERT / NATS_TLS_KEY and NATS_TOKEN,
/// and a message becomes a row; a role without a client certificate, or with a wrong token, is
/// refused and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_client_certificates_and_a_token_carries_messages_and_refuses_the_rest() {
    let token = "nats-token-5d1c9a";
    let pki = Pki::new();
    let nats = NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\n\
         authorization {{\n  token: \"{token}\"\n}}\n",
        pki.cert.display(),
        pki.key.display(),
        pki.ca.display()
    ));
    let stack = Stack::start().await;
    stack.create_gateway(13).await;
    let (ca, cert, key, url) = (
        path(&pki.ca),
        path(&pki.client_cert),
        path(&pki.client_key),
        tls_url(&nats),
    );
    let settings = [
        ("NATS_URL", url.as_str()),
        ("NATS_TLS_CA", ca.as_str()),
        ("NATS_TLS_CERT", cert.as_str()),
        ("NATS_TLS_KEY", key.as_str()),
        ("NATS_TOKEN", token),
    ];
    let _roles: Vec<_> = ["bridge", "processor", "writer"]
        .into_iter()
        .map(|role| spawn_logged(role, &stack.env(), &settings))
        .collect();
    let mut mqtt = common::Publisher::connect(stack.mosquitto.port()).await;
    mqtt.publish("gateways/13/plc-1", MESSAGE).await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    stack.wait_for_count(ROWS, 1, Duration::from_secs(20)).await;

    // No client certificate: the server ends the handshake.
    let anonymous = spawn_logged(
        "writer",
        &stack.env(),
        &[
            ("NATS_URL", url.as_str()),
            ("NATS_TLS_CA", ca.as_str()),
            ("NATS_TOKEN", token),
        ],
    );
    anonymous.expect_line(&["NATS"], "about NATS").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    // Go's TLS stack names the problem: "tls: client didn't provide a certificate".
    while !nats.log().contains("didn't provide a certificate") {
        assert!(
            Instant::now() < deadline,
            "the server did not refuse a client without a certificate:\n{}",
            nats.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(anonymous);

    // A wrong token.
    let wrong = spawn_logged(
        "writer",
        &stack.env(),
        &[&settings[..4], &[("NATS_TOKEN", "not-the-token")]].concat(),
    );
    let line = wrong
        .expect_line(&["NATS", "authorization violation"], "naming the refusal")
        .await;
    eprintln!("wrong NATS token, logged: {line}");
    assert_eq!(stack.count(ROWS).await, 1, "nothing else was written");
}

/// No secret in any log line: `dataviz all` over MQTT and NATS with TLS and passwords, the
/// Mercure keys and a DATABASE_URL with a password, at RUST_LOG=debug, with traffic and an admin
/// logging in (after a wrong password); then a bridge with a wrong MQTT password and a writer
/// with a wrong NATS password. None of the secrets appears in what they wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_or_key_appears_in_any_log_line_at_debug_level() {
    let mqtt_password = "mqtt-secret-7d1e0c55";
    let nats_password = "nats-secret-b83f21aa";
    let publisher_key = "mercure-publisher-secret-0c9e11f4d2";
    let subscriber_key = "mercure-subscriber-secret-6a0b7e3f91";
    let db_password = "db-secret-51c2e8a0";
    let wrong_mqtt = "wrong-mqtt-secret-99aa";
    let wrong_nats = "wrong-nats-secret-77bb";
    let admin_password = "admin-secret-3e5d90b1";
    let wrong_admin = "wrong-admin-secret-c4d2";
    let pki = Pki::new();
    let broker = TlsMosquitto::start(&pki, "dataviz", mqtt_password);
    let nats = tls_nats(&pki, "dataviz", nats_password);
    let stack = Stack::start().await;
    stack.create_gateway(13).await;
    open_bridge_session_tls(&broker, &pki, "dataviz", mqtt_password).await;

    let db_url = stack
        .db
        .url()
        .replacen("://root@", &format!("://root:{db_password}@"), 1);
    assert_ne!(
        db_url,
        stack.db.url(),
        "a password put in {}",
        stack.db.url()
    );
    let port = broker.port.to_string();
    let ca = path(&pki.ca);
    let url = tls_url(&nats);
    let app_port = free_port();
    let app_addr = format!("127.0.0.1:{app_port}");
    let env = |mqtt: &'static str, nats: &'static str| -> Vec<(String, String)> {
        let mut env = stack.env();
        env.extend(
            [
                ("RUST_LOG", "debug"),
                ("LOG_FORMAT", "json"),
                ("DATABASE_URL", db_url.as_str()),
                ("MQTT_PORT", port.as_str()),
                ("MQTT_TLS", "true"),
                ("MQTT_TLS_CA", ca.as_str()),
                ("MQTT_USERNAME", "dataviz"),
                ("MQTT_PASSWORD", mqtt),
                ("NATS_URL", url.as_str()),
                ("NATS_TLS_CA", ca.as_str()),
                ("NATS_USER", "dataviz"),
                ("NATS_PASSWORD", nats),
                ("MERCURE_PUBLISHER_JWT_KEY", publisher_key),
                ("MERCURE_SUBSCRIBER_JWT_KEY", subscriber_key),
                ("APP_ADDR", app_addr.as_str()),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        env
    };

    let mut all = spawn_logged("all", &env(mqtt_password, nats_password), &[]);
    for device in ["plc-1", "plc-2", "plc-3"] {
        publish_tls(
            &broker,
            &pki,
            "dataviz",
            mqtt_password,
            &format!("gateways/13/{device}"),
        )
        .await;
    }
    stack.wait_for_count(ROWS, 3, Duration::from_secs(20)).await;
    // An admin logs in to the site (after a wrong password), then uses the session.
    add_admin(&env(mqtt_password, nats_password), ADMIN, admin_password);
    let _session = admin_logs_in(app_port, wrong_admin, admin_password).await;
    all.kill();

    let mut bridge = spawn_logged(
        "bridge",
        &env(wrong_mqtt, nats_password),
        &[("HTTP_ADDR", "off")],
    );
    bridge
        .expect_line(
            &["NotAuthorized"],
            "saying the broker refused the wrong password",
        )
        .await;
    bridge.kill();
    let mut writer = spawn_logged(
        "writer",
        &env(mqtt_password, wrong_nats),
        &[("HTTP_ADDR", "off")],
    );
    writer
        .expect_line(
            &["authorization violation"],
            "saying the server refused the wrong password",
        )
        .await;
    writer.kill();

    let secrets = [
        mqtt_password,
        nats_password,
        publisher_key,
        subscriber_key,
        db_password,
        wrong_mqtt,
        wrong_nats,
        admin_password,
        wrong_admin,
    ];
    let mut logs = vec![
        ("all", all.log()),
        ("bridge", bridge.log()),
        ("writer", writer.log()),
    ];
    for entry in std::fs::read_dir(stack.log_dir.path()).expect("LOG_DIR") {
        let entry = entry.expect("LOG_DIR entry");
        logs.push((
            "LOG_DIR",
            std::fs::read_to_string(entry.path()).unwrap_or_default(),
        ));
    }
    let lines: usize = logs.iter().map(|(_, log)| log.lines().count()).sum();
    assert!(
        lines > 50,
        "too little logged at debug to mean anything: {lines} lines"
    );
    for (name, log) in &logs {
        let found = leaked(log, &secrets);
        assert!(found.is_empty(), "{name} logged secrets: {found:#?}");
    }
    eprintln!("{lines} log lines, no secret in them");
}

/// The admin session cookie is a bearer credential: whoever has its value is logged in. The
/// session store passes the session id, and the session data with the user's Argon2 hash, as
/// statement parameters, which tokio_postgres logs at debug: that target is capped at info
/// whatever RUST_LOG says (core/src/telemetry.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_session_appears_in_no_log_line_at_debug_level() {
    let stack = Stack::start().await;
    let app_port = free_port();
    let app_addr = format!("127.0.0.1:{app_port}");
    let mut env = stack.env();
    env.extend([
        ("RUST_LOG".to_owned(), "debug".to_owned()),
        ("APP_ADDR".to_owned(), app_addr.clone()),
    ]);
    let mut all = spawn_logged("all", &env, &[]);
    common::wait_for_site(app_port).await;
    add_admin(&env, ADMIN, "admin-password-0f3b");
    let session = admin_logs_in(app_port, "wrong-password-77aa", "admin-password-0f3b").await;
    all.kill();
    let log = all.log();
    let found = leaked(&log, &[&session, "argon2"]);
    assert!(
        found.is_empty(),
        "the session or the hash logged: {found:#?}"
    );
}

/// Whether the broker let a client in: the CONNACK, or the refusal.
/// Gateway 7 (`seven`) publishes for gateway 8 and then for itself; gateway 8 (`eight`) then
/// publishes for itself: once both their rows are in, the forged one would be too had the
/// broker passed it. The stack's pipeline starts empty.
async fn each_gateway_publishes_for_itself_only(
    stack: &Stack,
    seven: MqttOptions,
    eight: MqttOptions,
) {
    mqtt_exchange(seven.clone(), None, Some(("gateways/8/forged", MESSAGE))).await;
    mqtt_exchange(seven, None, Some(("gateways/7/plc-1", MESSAGE))).await;
    stack.wait_for_count(ROWS, 1, Duration::from_secs(20)).await;
    mqtt_exchange(eight, None, Some(("gateways/8/plc-2", MESSAGE))).await;
    stack.wait_for_count(ROWS, 2, Duration::from_secs(20)).await;
    assert_eq!(
        stack
            .count("SELECT count(*) FROM device WHERE code = 'forged'")
            .await,
        0,
        "gateway 7 published for gateway 8"
    );
}

async fn broker_answer(options: MqttOptions) -> Result<(), String> {
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break Ok(()),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => break Err(e.to_string()),
        }
        assert!(Instant::now() < deadline, "no answer from the broker");
    };
    client.disconnect().await.ok();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    answer
}

/// The broker as the project configures it (mosquitto.conf and mosquitto/acl as they are):
/// an anonymous client is refused; the bridge reads with its own credentials; a gateway's
/// credentials publish under its own id only (a message for another gateway is dropped) and
/// read nothing; and a gateway connecting with the bridge's client id does not take
/// over the bridge's session (the client id is the username).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refuses_anonymous_clients_and_confines_each_gateway() {
    let stack = Stack::start().await;
    stack.create_gateway(7).await;
    stack.create_gateway(8).await;
    let broker = dataviz_testkit::Mosquitto::start_with_users(&[
        ("dataviz-bridge", "bridge-password-1c2d"),
        ("7", "gateway-7-password"),
        ("8", "gateway-8-password"),
    ]);
    let gateway = |id: &str, user: &str, password: &str| {
        let mut options = MqttOptions::new(id, "127.0.0.1", broker.port());
        options.set_credentials(user, password);
        options
    };

    let anonymous = MqttOptions::new("anonymous-device", "127.0.0.1", broker.port());
    let refused = broker_answer(anonymous).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("NotAuthorized")),
        "{refused:?}"
    );
    let wrong = broker_answer(gateway("d", "7", "not-the-password")).await;
    assert!(wrong.is_err(), "{wrong:?}");

    // The bridge's persistent session, as its first run opens it: from then on the broker
    // queues what gateways publish.
    let mut bridge = gateway("dataviz-bridge", "dataviz-bridge", "bridge-password-1c2d");
    bridge.set_clean_session(false);
    mqtt_exchange(bridge, Some("gateways/+/+"), None).await;

    let ops = free_port();
    let ops_addr = format!("127.0.0.1:{ops}");
    let port = broker.port().to_string();
    let all = spawn_logged(
        "all",
        &stack.env(),
        &[
            ("MQTT_PORT", &port),
            ("MQTT_USERNAME", "dataviz-bridge"),
            ("MQTT_PASSWORD", "bridge-password-1c2d"),
            ("HTTP_ADDR", &ops_addr),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(common::http_get(ops, "/readyz").await, Some((200, _))) {
        assert!(Instant::now() < deadline, "not ready:\n{}", all.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let seven = || gateway("plc-line-7", "7", "gateway-7-password");
    let eight = || gateway("plc-line-8", "8", "gateway-8-password");
    each_gateway_publishes_for_itself_only(&stack, seven(), eight()).await;

    // A gateway reads nothing: Mosquitto grants the subscription, and delivers nothing on it.
    let (listener, mut events) = AsyncClient::new(seven(), 10);
    listener
        .subscribe("gateways/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
    mqtt_exchange(eight(), None, Some(("gateways/8/plc-4", MESSAGE))).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok(event) = tokio::time::timeout_at(deadline.into(), events.poll()).await {
        if let Ok(Event::Incoming(Packet::Publish(p))) = event {
            panic!("gateway 7 read {}", p.topic);
        }
    }
    listener.disconnect().await.ok();
    let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
    stack.wait_for_count(ROWS, 3, Duration::from_secs(20)).await;

    // The bridge's client id gives a gateway nothing: the bridge keeps its session.
    let impostor = gateway("dataviz-bridge", "7", "gateway-7-password");
    broker_answer(impostor).await.expect("gateway 7 connects");
    mqtt_exchange(seven(), None, Some(("gateways/7/plc-3", MESSAGE))).await;
    stack.wait_for_count(ROWS, 4, Duration::from_secs(20)).await;
    let log = broker.log();
    assert!(
        !log.contains("Client dataviz-bridge already connected"),
        "a client took over another's session:\n{log}"
    );
    assert!(
        !all.log().contains("MQTT connection lost"),
        "the bridge was disconnected:\n{}",
        all.log()
    );
}

/// The default broker as the project configures it (nats/nats-server.conf, auth.conf and
/// users.conf as they are): an anonymous MQTT client is refused while the roles' anonymous NATS
/// connection works; a gateway publishes under its own id only and reads nothing; and a gateway
/// that connects under the bridge's usual client id, with a clean session, neither disconnects
/// the bridge nor wipes the messages queued for it, the bridge's id being a secret of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_broker_refuses_anonymous_clients_and_confines_each_gateway() {
    use dataviz_testkit::{BRIDGE_PASSWORD, DeviceUser};
    let gateway_user = |id: i32, password| DeviceUser {
        name: if id == 7 { "7" } else { "8" },
        password,
        gateway: Some(id),
    };
    let broker = NatsServer::start_broker(&[
        gateway_user(7, "gateway-7-password"),
        gateway_user(8, "gateway-8-password"),
    ]);
    let stack = Stack::start().await;
    stack.create_gateway(7).await;
    stack.create_gateway(8).await;
    let port = broker.mqtt_port();
    let client = |id: &str, user: &str, password: &str| {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_credentials(user, password);
        options
    };
    let refused = broker_answer(MqttOptions::new("anonymous-device", "127.0.0.1", port)).await;
    assert!(
        refused.is_err(),
        "anonymous MQTT client accepted: {refused:?}"
    );
    let wrong = broker_answer(client("d", "7", "not-the-password")).await;
    assert!(wrong.is_err(), "{wrong:?}");
    let roles_user = async_nats::connect(broker.url()).await;
    assert!(roles_user.is_ok(), "the roles connect without credentials");

    // The roles on this broker (NATS and MQTT), the bridge with its own user and a client id
    // as scripts/services makes it.
    const BRIDGE_ID: &str = "dataviz-bridge-5f0c2a9e41d7b386";
    let mut bridge = client(BRIDGE_ID, "dataviz-bridge", BRIDGE_PASSWORD);
    bridge.set_clean_session(false);
    mqtt_exchange(bridge, Some("gateways/+/+"), None).await;
    let ops = free_port();
    let ops_addr = format!("127.0.0.1:{ops}");
    let (nats_url, mqtt_port) = (broker.url(), port.to_string());
    let role = || {
        spawn_logged(
            "all",
            &stack.env(),
            &[
                ("NATS_URL", &nats_url),
                ("MQTT_PORT", &mqtt_port),
                ("MQTT_USERNAME", "dataviz-bridge"),
                ("MQTT_PASSWORD", BRIDGE_PASSWORD),
                ("MQTT_CLIENT_ID", BRIDGE_ID),
                ("HTTP_ADDR", &ops_addr),
            ],
        )
    };
    let mut all = role();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(common::http_get(ops, "/readyz").await, Some((200, _))) {
        assert!(Instant::now() < deadline, "not ready:\n{}", all.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Another gateway's topic is dropped (acknowledged, never delivered, as with Mosquitto).
    let seven = || client("plc-line-7", "7", "gateway-7-password");
    let eight = client("plc-line-8", "8", "gateway-8-password");
    each_gateway_publishes_for_itself_only(&stack, seven(), eight).await;

    // A gateway reads nothing: the subscription is refused.
    let (listener, mut events) = AsyncClient::new(seven(), 10);
    listener
        .subscribe("gateways/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    let suback = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => break ack,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    };
    assert!(
        suback
            .return_codes
            .iter()
            .all(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure)),
        "gateway 7 may read: {suback:?}"
    );
    listener.disconnect().await.ok();
    let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;

    // The bridge away, a message queued for it; gateway 7 takes the bridge's usual client id
    // with a clean session (had the bridge that id, this would wipe its session and queue).
    all.kill();
    mqtt_exchange(seven(), None, Some(("gateways/7/plc-3", MESSAGE))).await;
    let impostor = client("dataviz-bridge", "7", "gateway-7-password");
    broker_answer(impostor).await.expect("gateway 7 connects");
    let all = role();
    stack.wait_for_count(ROWS, 3, Duration::from_secs(30)).await;
    // And while the bridge is connected: it stays connected.
    let impostor = client("dataviz-bridge", "7", "gateway-7-password");
    broker_answer(impostor).await.expect("gateway 7 connects");
    mqtt_exchange(seven(), None, Some(("gateways/7/plc-4", MESSAGE))).await;
    stack.wait_for_count(ROWS, 4, Duration::from_secs(20)).await;
    assert!(
        !all.log().contains("MQTT connection lost"),
        "the bridge was disconnected:\n{}",
        all.log()
    );
}
