//! Dataviz's model: what a device sends and what the stages make of it, with no I/O.
//!
//! - [`topic`]: the MQTT topic `gateways/<gateway_id>/<device_code>`, parsed.
//! - [`payload`]: the device payload `{"d": [{"tag", "value"}], "ts"}`, parsed tolerantly.
//! - [`value`]: reading values, the PostgreSQL data types they map to, and how a tag's type
//!   changes when its values do.
//! - [`readings`]: the typed readings of a message and their packing on READINGS.
//! - [`identity`]: which copies are the same message, the id its readings are stored under.
//! - [`reason`]: why a message goes to DEAD, one name each.
//!
//! The fuzz targets and the parsers need this and nothing else; `dataviz-core` adds the
//! runtime (NATS, PostgreSQL, the ops server) and re-exports it.

pub mod identity;
pub mod payload;
pub mod readings;
pub mod reason;
pub mod topic;
pub mod value;
