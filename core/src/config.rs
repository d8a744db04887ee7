//! Connection settings every role shares, read once from the environment at start.
//!
//! Each field names its variable and default; `dataviz <role> --help` lists them all. A missing
//! or invalid value stops the process at start with a message naming the variable.

use anyhow::Context as _;
use async_nats::jetstream;
use std::path::PathBuf;
use std::time::Duration;

/// How to reach NATS.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsConfig {
    /// NATS server URL(s), comma separated (`tls://` for TLS).
    #[arg(
        long,
        env = "NATS_URL",
        value_name = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, env = "NATS_CREDS", value_name = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// NATS user (with NATS_PASSWORD).
    #[arg(long, env = "NATS_USER", value_name = "NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(
        long,
        env = "NATS_PASSWORD",
        value_name = "NATS_PASSWORD",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(
        long,
        env = "NATS_TOKEN",
        value_name = "NATS_TOKEN",
        hide_env_values = true
    )]
    pub nats_token: Option<String>,
    /// Require TLS to NATS.
    #[arg(long, env = "NATS_TLS", value_name = "NATS_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub nats_tls: bool,
    /// CA certificate (PEM) to verify the NATS server.
    #[arg(long, env = "NATS_TLS_CA", value_name = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS mutual TLS (with NATS_TLS_KEY).
    #[arg(
        long,
        env = "NATS_TLS_CERT",
        value_name = "NATS_TLS_CERT",
        requires = "nats_tls_key"
    )]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for NATS mutual TLS.
    #[arg(
        long,
        env = "NATS_TLS_KEY",
        value_name = "NATS_TLS_KEY",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<PathBuf>,
}

impl NatsConfig {
    /// The servers of `NATS_URL`, split on commas.
    pub fn servers(&self) -> Vec<&str> {
        self.nats_url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Connects; retries the first connection, reconnects forever afterwards.
    pub async fn connect(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        let mut options = match &self.nats_creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .with_context(|| format!("reading NATS_CREDS {}", path.display()))?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.nats_token {
            options = options.token(token.clone());
        }
        if let Some(ca) = &self.nats_tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.nats_tls_cert, &self.nats_tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let client = options
            .name(format!("dataviz-{name}"))
            .require_tls(self.nats_tls)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                tracing::info!(%event, "NATS connection event");
            })
            .connect(self.servers())
            .await
            .with_context(|| format!("connecting to NATS_URL {}", self.nats_url))?;
        // With retry_on_initial_connect, connect() returns at once; wait for the real handshake
        // so that the version check below sees the server.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("NATS_URL {}: no connection after 30 s", self.nats_url);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(client)
    }
}

/// The defaults of a group of settings as its `clap` attributes declare them, without reading
/// the environment: what `Default` returns for every group of settings, so that each default is
/// written once, in the attribute `--help` shows.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults"))
        .mut_args(|arg| arg.env(None::<&'static str>));
    let matches = command
        .try_get_matches_from(["defaults"])
        .expect("every setting of the group has a default");
    T::from_arg_matches(&matches).expect("the declared defaults are valid settings")
}

/// A JetStream context with acks in flight bounded, waiting (not failing) at the bound.
pub fn jetstream(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(4096)
        .backpressure_on_inflight(true)
        .build(client)
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseConfig {
    /// PostgreSQL URL (Symfony's `serverVersion` and `charset` parameters are accepted and ignored).
    /// TLS: `sslmode` (disable, prefer: the default, require, verify-ca, verify-full) and
    /// `sslrootcert` (the CA certificates, PEM; `system` for the system's) in its query.
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/dataviz",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Connections in each process's pool.
    #[arg(
        long,
        env = "DATABASE_POOL_SIZE",
        value_name = "DATABASE_POOL_SIZE",
        default_value_t = 8
    )]
    pub database_pool_size: usize,
}

impl DatabaseConfig {
    pub fn pool(&self) -> anyhow::Result<deadpool_postgres::Pool> {
        crate::db::pool(&self.database_url, self.database_pool_size)
    }
}

#[cfg(test)]
mod tests {
    use crate::retention::{Period, RetentionConfig};
    use crate::streams::StreamSettings;
    use std::time::Duration;

    #[test]
    fn defaults_are_the_ones_help_shows() {
        let streams = StreamSettings::default();
        assert_eq!(streams.ack_wait, Duration::from_secs(30));
        assert_eq!(streams.raw_retention, Duration::from_secs(7 * 86_400));
        assert_eq!((streams.raw_max_bytes, streams.replicas), (-1, 1));
        let retention = RetentionConfig::default();
        assert_eq!(
            retention.readings_retention,
            Period(Some(Duration::from_secs(365 * 86_400)))
        );
    }
}
