//! Test fixtures: real servers started as processes, never mocks.
//!
//! Every fixture owns what it starts. Dropping it kills the process and deletes its data, so a
//! test that panics halfway leaves nothing running or on disk (except a database when the test
//! process itself is killed: those are named `dataviz_test_<uuid v7>` and safe to drop by hand).
//!
//! - [`NatsServer`]: a `nats-server` (2.12 or newer, JetStream on) on a free loopback port with
//!   its own temporary store directory. The binary comes from `DATAVIZ_NATS_SERVER`, else the
//!   workspace's `.local/venv/bin/nats-server` (installed by `scripts/setup`), else `PATH`.
//!   Debian's 2.9 is refused: it silently ignores stream and consumer settings we rely on.
//!   [`NatsServer::start_broker`] runs the project's own config instead (`nats/`): JetStream,
//!   the MQTT listener the devices publish to, and its users.
//! - [`NatsCluster`]: three such servers routed into one JetStream cluster on loopback, each
//!   node killable and restartable on its own: for replicated (R3) streams and node failures.
//! - [`Mosquitto`]: Debian's `/usr/sbin/mosquitto` running the project's own
//!   `mosquitto/mosquitto.conf` (persistence, queue limits), with only the listener, the data
//!   directory and the log destination rewritten for the test.
//! - [`TestDb`]: a fresh, uniquely named database on the PostgreSQL server named by
//!   `DATAVIZ_TEST_DATABASE_URL` (default `postgres://root@127.0.0.1:5432/postgres`), dropped
//!   again (`WITH (FORCE)`) when the fixture is dropped. It is empty: callers run the migrations.
//! - [`PostgresServer`]: a PostgreSQL server of the test's own (`initdb` into a temporary
//!   directory, a free loopback port, trust authentication, `fsync` on), for tests that crash
//!   it: `kill()` SIGKILLs the postmaster, `restart()` recovers from the WAL. Its `url()` is an
//!   admin URL for [`TestDb::create_on`]. Run as the `postgres` user when the tests run as root.
//!   [`PostgresServer::start_with`] adds settings, files and a `pg_hba.conf` ([`PostgresConfig`]),
//!   e.g. TLS only.
//! - [`free_port`] and [`wait_for_port`]: the helpers the fixtures use, for tests that start
//!   something of their own.
//!
//! The server fixtures are synchronous: `start()` blocks until the port accepts connections
//! (usually well under a second), which is fine inside `#[tokio::test]` and keeps them usable
//! from plain `#[test]`s. `kill()` is a crash (SIGKILL); `stop()` is a clean shutdown (SIGTERM);
//! `restart()` stops the server cleanly if it still runs, then starts it again on the same port
//! with the same data, so `kill()` then `restart()` is how a test simulates a crash and recovery.
//! Mosquitto only writes its persistence file on a clean shutdown and every `autosave_interval`
//! seconds: after `kill()` it loses what changed since its last autosave, as it would in
//! production.

mod cluster;
mod db;
mod mosquitto;
mod mqtt;
mod nats;
mod net;
mod postgres;
mod process;

pub use cluster::{CLUSTER_SIZE, NatsCluster};
pub use db::TestDb;
pub use mosquitto::Mosquitto;
pub use mqtt::Publisher;
pub use nats::{BRIDGE_PASSWORD, DeviceUser, NatsServer};
pub use net::{free_port, wait_for_port};
pub use postgres::{PostgresConfig, PostgresServer};

/// The workspace root (where `Cargo.toml`, `mosquitto/` and `.local/` live).
pub fn workspace_root() -> std::path::PathBuf {
    let root = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    root.canonicalize().unwrap_or(root)
}
