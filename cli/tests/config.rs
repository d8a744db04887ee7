//! Start-up checks: settings are validated before anything runs, and the message names the
//! variable; a NATS server too old for the stream settings is refused.

use dataviz_testkit::{free_port, wait_for_port};
use std::process::{Command, Output};
use std::time::Duration;

fn dataviz(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dataviz"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOG_DIR", std::env::temp_dir().join("dataviz-config-test"))
        .envs(env.iter().copied())
        .output()
        .expect("dataviz runs")
}

#[test]
fn help_names_every_variable_and_its_default() {
    let out = dataviz(&["all", "--help"], &[]);
    assert!(out.status.success());
    // Help is wrapped; read it as one line.
    let help = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for var in [
        "MQTT_HOST",
        "MQTT_PORT",
        "MQTT_USERNAME",
        "MQTT_PASSWORD",
        "MQTT_TOPICS",
        "MQTT_QOS",
        "MQTT_TLS",
        "MQTT_CLIENT_ID",
        "DATABASE_URL",
        "WORKER_COUNT",
        "NATS_URL",
        "RAW_RETENTION",
        "APP_ENV",
        "LOG_FORMAT",
        "RUST_LOG",
    ] {
        assert!(
            help.contains(&format!("[env: {var}")),
            "{var} missing from --help:\n{help}"
        );
    }
    assert!(help.contains("[default: gateways/+/+]"), "{help}");
    assert!(help.contains("[default: 1883]"), "{help}");
}

#[test]
fn an_invalid_setting_stops_the_start_naming_the_variable() {
    for (var, value) in [
        ("MQTT_PORT", "not-a-port"),
        ("MQTT_QOS", "3"),
        ("MQTT_TOPICS", "a/#/b"),
        ("WORKER_COUNT", "0"),
        ("RAW_RETENTION", "forever"),
        ("APP_ENV", "staging"),
    ] {
        let out = dataviz(&["all"], &[(var, value)]);
        assert_eq!(out.status.code(), Some(2), "{var}={value} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(var),
            "{var}={value}: error does not name it: {stderr}"
        );
    }
}

#[test]
fn an_unreachable_database_is_named() {
    let port = free_port().to_string();
    let url = format!("postgres://nobody@127.0.0.1:{port}/none");
    let out = dataviz(&["migrate"], &[("DATABASE_URL", &url)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
}

/// A duplicate window longer than the retention JetStream refuses with a message naming
/// neither: `migrate` refuses it first, naming both settings (before it touches anything).
#[test]
fn a_duplicate_window_longer_than_the_retention_is_named() {
    let out = dataviz(&["migrate"], &[("RAW_RETENTION", "10s")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("RAW_DUPLICATE_WINDOW (30s) is longer than RAW_RETENTION (10s)"),
        "{stderr}"
    );
}

/// Servers before 2.12 accept stream settings they then ignore: refused at start.
#[test]
fn a_nats_server_older_than_2_12_is_refused() {
    let old = std::env::var("DATAVIZ_OLD_NATS_SERVER").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../.local/nats-old/bin/nats-server"
        )
        .to_owned()
    });
    assert!(
        std::path::Path::new(&old).exists(),
        "{old} missing: scripts/setup installs nats-server 2.11 there"
    );
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(&old)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for_port(port, Duration::from_secs(10)));
    let url = format!("nats://127.0.0.1:{port}");
    let out = dataviz(&["writer"], &[("NATS_URL", &url)]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("too old"), "{stderr}");
}
