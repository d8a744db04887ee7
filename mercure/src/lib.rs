//! The Mercure protocol as the reference hub's 0.x releases speak it (dunglas/mercure v0.24:
//! `topic` selectors, the `mercure` JWT claim, `lastEventID`, the `mercureAuthorization`
//! cookie), which every client library speaks today.
//!
//! # Layout
//! - [`jwt`]: HS256 tokens and the `mercure` claim (`publish`, `subscribe`).
//! - [`selector`]: topic selectors (exact, `*`, URI templates) and their compiled cache.
//! - [`update`]: an update, its form encoding (publish) and SSE encoding (subscribe),
//!   validation.
//! - [`config`]: hub settings and JWT keys from the environment.
//! - [`hub`]: the embeddable hub, an `axum::Router` at `/.well-known/mercure`.
//! - [`client`]: [`MercurePublisher`], which posts updates to any hub, and [`UpdateSink`]:
//!   that or the hub of this process.
//! - [`subscriber`]: a small SSE client, for tests, tools and benchmarks.
//!
//! # Error policy
//! Typed errors only: each failure a caller may act on is a variant ([`PublishError`] says
//! retry or not; [`KeyError`] names the variable). The hub answers the reference hub's status
//! codes: 401 for any authorization problem, 400 for a malformed request, 403 for a reserved
//! topic.

mod background;
pub mod client;
pub mod config;
mod dispatch;
pub mod hub;
pub mod jwt;
pub mod selector;
pub mod subscriber;
mod transport;
pub mod update;

pub use client::{MercurePublisher, PublishError, UpdateSink};
pub use config::{HubConfig, KeyError, MercureKeys, MercureKeysConfig, Transport};
pub use hub::{HUB_PATH, Hub, PublishRefused, StartError, serve, without_delay};
pub use jwt::{Claims, JwtKey};
pub use update::Update;
