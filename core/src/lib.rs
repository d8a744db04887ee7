//! Dataviz core: the runtime every pipeline stage shares.
//!
//! The model (topics, payloads, values, readings, dead-letter reasons: no I/O) is the
//! `dataviz-model` crate, re-exported here as [`topic`], [`payload`] and [`value`], and in
//! [`message`].
//!
//! # Layout
//! - [`message`]: what travels on JetStream: the raw MQTT message (RAW), the typed batch of
//!   readings (READINGS) and dead letters (DEAD), with their headers.
//! - [`consume`]: the settle contract and the consume loop every JetStream stage runs.
//! - [`ops`]: health, readiness and Prometheus metrics over HTTP.
//! - [`streams`]: stream and consumer names, subjects and settings, created and checked at start.
//! - [`dead`]: dead letters as an operator sees them: list, show, re-queue, purge.
//! - [`db`]: the PostgreSQL pool, the migrations, and errors by kind.
//! - [`ingested`]: which messages' readings are stored, by the keys the writer records.
//! - [`retention`]: how long readings and message ids are kept, and the pruning that keeps it.
//! - [`config`]: connection settings read from the environment, shared by every role.
//! - [`telemetry`]: logging setup, including the `mqtt` channel.
//! - [`retry`]: backoff delays for transient failures.
//! - [`shutdown`]: the signal every long-running loop takes as an input.

pub use dataviz_model::{identity, payload, topic, value};

pub mod config;
pub mod consume;
pub mod db;
pub mod dead;
pub mod ingested;
pub mod message;
pub mod ops;
pub mod pack;
pub mod retention;
pub mod retry;
pub mod shutdown;
pub mod streams;
pub mod telemetry;

/// The `tracing` target of the `mqtt` log channel (the original's Monolog channel).
pub const MQTT_LOG_TARGET: &str = "mqtt";
