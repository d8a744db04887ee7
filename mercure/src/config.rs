//! Hub and key settings, read once from the environment, named as the reference hub names them
//! where it has a name.
//!
//! The keys live in their own group, [`MercureKeysConfig`], because two roles need them: the
//! hub (to verify) and the publisher (to sign). A process running both (`dataviz all`) reads
//! them once and gives the same keys to both, which is also how a generated development key
//! works with no setting at all.

use crate::jwt::JwtKey;
use std::time::Duration;
use thiserror::Error;

/// The JWT keys (HS256 secrets).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MercureKeysConfig {
    /// Key of the publishers' JWTs (HS256).
    #[arg(
        long,
        env = "MERCURE_PUBLISHER_JWT_KEY",
        value_name = "MERCURE_PUBLISHER_JWT_KEY",
        hide_env_values = true
    )]
    pub mercure_publisher_jwt_key: Option<String>,
    /// The publisher key under the name Symfony uses; MERCURE_PUBLISHER_JWT_KEY wins.
    #[arg(
        long,
        env = "MERCURE_JWT_SECRET",
        value_name = "MERCURE_JWT_SECRET",
        hide_env_values = true
    )]
    pub mercure_jwt_secret: Option<String>,
    /// Key of the subscribers' JWTs (HS256). Default: the publisher key.
    #[arg(
        long,
        env = "MERCURE_SUBSCRIBER_JWT_KEY",
        value_name = "MERCURE_SUBSCRIBER_JWT_KEY",
        hide_env_values = true
    )]
    pub mercure_subscriber_jwt_key: Option<String>,
}

/// The keys, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MercureKeys {
    pub publisher: JwtKey,
    pub subscriber: JwtKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("MERCURE_PUBLISHER_JWT_KEY (or MERCURE_JWT_SECRET) is not set")]
    MissingPublisherKey,
    #[error("{0} is set but empty")]
    Empty(&'static str),
}

impl MercureKeysConfig {
    /// True when no key at all is set (the development quick start).
    pub fn is_empty(&self) -> bool {
        self.mercure_publisher_jwt_key.is_none()
            && self.mercure_jwt_secret.is_none()
            && self.mercure_subscriber_jwt_key.is_none()
    }

    /// Fills every unset key with one random key and returns true, when no key at all is set:
    /// the caller logs a warning saying so (the key changes at each start, so tokens minted
    /// elsewhere stop working). Does nothing and returns false when any key is set.
    pub fn generate_development_keys(&mut self) -> bool {
        if !self.is_empty() {
            return false;
        }
        let key = JwtKey::random();
        let key = String::from_utf8(key.as_bytes().to_vec()).expect("hex digits");
        self.mercure_publisher_jwt_key = Some(key);
        true
    }

    /// The keys; the subscriber key defaults to the publisher key.
    pub fn keys(&self) -> Result<MercureKeys, KeyError> {
        let publisher = match (&self.mercure_publisher_jwt_key, &self.mercure_jwt_secret) {
            (Some(k), _) if k.is_empty() => {
                return Err(KeyError::Empty("MERCURE_PUBLISHER_JWT_KEY"));
            }
            (Some(k), _) => k,
            (None, Some(k)) if k.is_empty() => return Err(KeyError::Empty("MERCURE_JWT_SECRET")),
            (None, Some(k)) => k,
            (None, None) => return Err(KeyError::MissingPublisherKey),
        };
        let subscriber = match &self.mercure_subscriber_jwt_key {
            Some(k) if k.is_empty() => return Err(KeyError::Empty("MERCURE_SUBSCRIBER_JWT_KEY")),
            Some(k) => k,
            None => publisher,
        };
        Ok(MercureKeys {
            publisher: JwtKey::new(publisher.as_str()),
            subscriber: JwtKey::new(subscriber.as_str()),
        })
    }
}

/// Settings of the embedded hub.
#[derive(Debug, Clone, clap::Args)]
pub struct HubConfig {
    #[command(flatten)]
    pub keys: MercureKeysConfig,
    /// Let subscribers without a JWT in; they receive public updates only (the reference
    /// hub's `anonymous` directive). Off by default, as in the reference hub.
    #[arg(long, env = "MERCURE_ANONYMOUS", value_name = "MERCURE_ANONYMOUS", default_value_t = false, action = clap::ArgAction::Set)]
    pub mercure_anonymous: bool,
    /// Subscribers held at once; one more is answered 503 with Retry-After. Each holds a
    /// connection (a file descriptor: raise `ulimit -n` past this).
    #[arg(
        long,
        env = "MERCURE_MAX_SUBSCRIBERS",
        value_name = "MERCURE_MAX_SUBSCRIBERS",
        default_value_t = HubConfig::DEFAULT_MAX_SUBSCRIBERS
    )]
    pub mercure_max_subscribers: usize,
    /// Topic selectors one subscription may name; more is a 400. Each template a subscription
    /// names is tried on each new topic it sees.
    #[arg(
        long,
        env = "MERCURE_MAX_TOPICS",
        value_name = "MERCURE_MAX_TOPICS",
        default_value_t = HubConfig::DEFAULT_MAX_TOPICS
    )]
    pub mercure_max_topics: usize,
    /// Compiled URI templates kept for new subscriptions (emptied when full; a subscription
    /// keeps its own compiled templates whatever happens to this cache).
    #[arg(
        long,
        env = "MERCURE_TEMPLATE_CACHE_SIZE",
        value_name = "MERCURE_TEMPLATE_CACHE_SIZE",
        default_value_t = crate::selector::DEFAULT_TEMPLATE_CACHE_SIZE
    )]
    pub mercure_template_cache_size: usize,
    /// Origins allowed to use the hub from a browser (CORS), space or comma separated; `*` for
    /// any. Empty: no CORS headers (same-origin use only).
    #[arg(
        long,
        env = "MERCURE_CORS_ORIGINS",
        value_name = "MERCURE_CORS_ORIGINS",
        default_value = ""
    )]
    pub mercure_cors_origins: String,
    /// Origins allowed to publish with the `mercureAuthorization` cookie, space or comma
    /// separated; `*` for any. Empty: publishing with the cookie is refused.
    #[arg(
        long,
        env = "MERCURE_PUBLISH_ORIGINS",
        value_name = "MERCURE_PUBLISH_ORIGINS",
        default_value = ""
    )]
    pub mercure_publish_origins: String,
    /// Updates kept for reconnecting subscribers (`Last-Event-ID`); 0: none. With the
    /// `jetstream` transport they are the stream's limit in messages (a pack of updates is one,
    /// so the stream may keep more), and every hub keeps a copy of that many in memory (read
    /// back at start); with `local`, the history starts empty at each start of the hub.
    #[arg(
        long,
        env = "MERCURE_HISTORY_SIZE",
        value_name = "MERCURE_HISTORY_SIZE",
        default_value_t = HubConfig::DEFAULT_HISTORY_SIZE
    )]
    pub mercure_history_size: usize,
    /// Bytes of updates kept in the history, at most (data, topics and id): past it the oldest
    /// go, so that large updates cannot take the hub's memory with the count alone.
    #[arg(
        long,
        env = "MERCURE_HISTORY_BYTES",
        value_name = "MERCURE_HISTORY_BYTES",
        default_value_t = HubConfig::DEFAULT_HISTORY_BYTES
    )]
    pub mercure_history_bytes: usize,
    /// Interval of the heartbeat comment sent to idle subscribers; 0s: none.
    #[arg(long, env = "MERCURE_HEARTBEAT", value_name = "MERCURE_HEARTBEAT", default_value = HubConfig::DEFAULT_HEARTBEAT, value_parser = humantime::parse_duration)]
    pub mercure_heartbeat: Duration,
    /// How updates travel: `jetstream` (a stream on NATS_URL: the history survives restarts,
    /// and any number of hubs serve the same updates) or `local` (in this process's memory
    /// only: one hub, history lost at each stop).
    #[arg(
        long,
        env = "MERCURE_TRANSPORT",
        value_name = "MERCURE_TRANSPORT",
        value_enum,
        default_value_t = Transport::Jetstream
    )]
    pub mercure_transport: Transport,
    /// The JetStream stream of updates (`jetstream` transport); hubs naming the same stream
    /// serve the same updates.
    #[arg(
        long,
        env = "MERCURE_STREAM",
        value_name = "MERCURE_STREAM",
        default_value = HubConfig::DEFAULT_STREAM
    )]
    pub mercure_stream: String,
    /// Age past which the history drops an update (the stream and each hub's copy), beside
    /// the count and byte limits above; 0s: no age limit.
    #[arg(long, env = "MERCURE_HISTORY_MAX_AGE", value_name = "MERCURE_HISTORY_MAX_AGE", default_value = HubConfig::DEFAULT_HISTORY_MAX_AGE, value_parser = humantime::parse_duration)]
    pub mercure_history_max_age: Duration,
    /// Replicas of the stream on a NATS cluster (1 to 5).
    #[arg(
        long,
        env = "MERCURE_STREAM_REPLICAS",
        value_name = "MERCURE_STREAM_REPLICAS",
        default_value_t = 1
    )]
    pub mercure_stream_replicas: usize,
}

/// How updates travel between publishers, hubs and subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Through a JetStream stream: durable, shared by every hub naming it.
    Jetstream,
    /// In this process's memory.
    Local,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            keys: MercureKeysConfig::default(),
            mercure_anonymous: false,
            mercure_max_subscribers: HubConfig::DEFAULT_MAX_SUBSCRIBERS,
            mercure_max_topics: HubConfig::DEFAULT_MAX_TOPICS,
            mercure_template_cache_size: crate::selector::DEFAULT_TEMPLATE_CACHE_SIZE,
            mercure_cors_origins: String::new(),
            mercure_publish_origins: String::new(),
            mercure_history_size: HubConfig::DEFAULT_HISTORY_SIZE,
            mercure_history_bytes: HubConfig::DEFAULT_HISTORY_BYTES,
            mercure_heartbeat: humantime::parse_duration(HubConfig::DEFAULT_HEARTBEAT)
                .expect("a valid duration"),
            mercure_transport: Transport::Jetstream,
            mercure_stream: HubConfig::DEFAULT_STREAM.to_owned(),
            mercure_history_max_age: humantime::parse_duration(HubConfig::DEFAULT_HISTORY_MAX_AGE)
                .expect("a valid duration"),
            mercure_stream_replicas: 1,
        }
    }
}

impl HubConfig {
    pub const DEFAULT_MAX_SUBSCRIBERS: usize = 10_000;
    pub const DEFAULT_MAX_TOPICS: usize = 1_000;
    pub const DEFAULT_HISTORY_SIZE: usize = 10_000;
    /// 16 MiB: the count still bounds updates of up to about 1.6 KB each; with larger ones, a
    /// history of 64 MiB took `dataviz all` to 189–214 MiB on the default broker at a hundred
    /// readings per message, against 132–174 at 16 MiB (BENCHMARKS.md).
    pub const DEFAULT_HISTORY_BYTES: usize = 16 * 1024 * 1024;
    pub const DEFAULT_HEARTBEAT: &'static str = "40s";
    pub const DEFAULT_STREAM: &'static str = "MERCURE";
    pub const DEFAULT_HISTORY_MAX_AGE: &'static str = "24h";

    /// The defaults with a random key (publisher and subscriber alike): for a quick start with
    /// no setting, and for tests. Whoever calls this logs a warning that the key is generated.
    pub fn development() -> HubConfig {
        let mut config = HubConfig::default();
        config.keys.generate_development_keys();
        config
    }

    pub fn cors_origins(&self) -> Vec<String> {
        split_list(&self.mercure_cors_origins)
    }

    pub fn publish_origins(&self) -> Vec<String> {
        split_list(&self.mercure_publish_origins)
    }

    /// `None` when heartbeats are off.
    pub fn heartbeat(&self) -> Option<Duration> {
        Some(self.mercure_heartbeat).filter(|d| !d.is_zero())
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        hub: HubConfig,
    }

    #[test]
    fn keys_resolve_with_fallbacks() {
        let mut k = MercureKeysConfig::default();
        assert_eq!(k.keys(), Err(KeyError::MissingPublisherKey));
        k.mercure_jwt_secret = Some("s".into());
        assert_eq!(k.keys().unwrap().publisher, JwtKey::new("s"));
        assert_eq!(k.keys().unwrap().subscriber, JwtKey::new("s"));
        k.mercure_publisher_jwt_key = Some("p".into());
        k.mercure_subscriber_jwt_key = Some("sub".into());
        let keys = k.keys().unwrap();
        assert_eq!(keys.publisher, JwtKey::new("p"));
        assert_eq!(keys.subscriber, JwtKey::new("sub"));
        k.mercure_subscriber_jwt_key = Some(String::new());
        assert_eq!(k.keys(), Err(KeyError::Empty("MERCURE_SUBSCRIBER_JWT_KEY")));
        assert!(!k.generate_development_keys(), "set keys are kept");
    }

    #[test]
    fn development_generates_one_random_key() {
        let a = HubConfig::development().keys.keys().unwrap();
        let b = HubConfig::development().keys.keys().unwrap();
        assert_eq!(a.publisher, a.subscriber);
        assert_ne!(a.publisher, b.publisher);
    }

    #[test]
    fn parses_lists_and_durations_from_arguments() {
        let cli = Cli::parse_from([
            "x",
            "--mercure-cors-origins",
            "https://a.example, https://b.example",
            "--mercure-heartbeat",
            "0s",
            "--mercure-anonymous",
            "true",
        ]);
        assert_eq!(
            cli.hub.cors_origins(),
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(cli.hub.heartbeat(), None);
        assert!(cli.hub.mercure_anonymous);
        assert!(cli.hub.publish_origins().is_empty());
        assert!(
            !Cli::parse_from(["x"]).hub.mercure_anonymous,
            "refused by default"
        );
        assert_eq!(cli.hub.mercure_history_size, 10_000);
    }
}
