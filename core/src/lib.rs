//! Dataviz core: everything the pipeline stages share.
//!
//! # Layout
//! - [`topic`]: the MQTT topic `gateways/<gateway_id>/<device_code>`, parsed.
//! - [`payload`]: the device payload `{"d": [{"tag", "value"}], "ts"}`, parsed tolerantly.
//! - [`value`]: reading values, the PostgreSQL data types they map to, and how a tag's type
//!   changes when its values do.
//! - [`message`]: what travels on JetStream: the raw MQTT message (RAW), the typed batch of
//!   readings (READINGS) and dead letters (DEAD).
//! - [`consume`]: the pull-and-handle loop every JetStream stage runs.
//! - [`ops`]: health, readiness and Prometheus metrics over HTTP.
//! - [`streams`]: stream and consumer names, subjects and settings, created and checked at start.
//! - [`dead`]: dead letters as an operator sees them: list, show, re-queue, purge.
//! - [`db`]: the PostgreSQL pool and the migrations.
//! - [`config`]: connection settings read from the environment, shared by every role.
//! - [`telemetry`]: logging setup, including the `mqtt` channel.
//! - [`retry`]: backoff delays for transient failures.
//! - [`shutdown`]: the signal every long-running loop takes as an input.

pub mod config;
pub mod consume;
pub mod db;
pub mod dead;
pub mod message;
pub mod ops;
pub mod payload;
pub mod retry;
pub mod shutdown;
pub mod streams;
pub mod telemetry;
pub mod topic;
pub mod value;

/// The `tracing` target of the `mqtt` log channel (the original's Monolog channel).
pub const MQTT_LOG_TARGET: &str = "mqtt";
