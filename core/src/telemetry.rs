//! Logging, set up once per process.
//!
//! As in the original, events of the `mqtt` channel (target [`crate::MQTT_LOG_TARGET`]: what
//! the bridge receives and what the processor makes of it) are kept apart in development, in
//! their own file `<LOG_DIR>/mqtt.log`, while everything else goes to stderr as text. In
//! production every event is a JSON line on stderr, the channel named by its `target` field.

use std::path::PathBuf;
use tracing_subscriber::{
    EnvFilter, Layer, filter::filter_fn, layer::SubscriberExt, util::SubscriberInitExt,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AppEnv {
    Dev,
    Prod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, clap::Args)]
pub struct LogConfig {
    /// Environment: `dev` (text logs, the mqtt channel in its own file) or `prod` (JSON lines on stderr).
    #[arg(
        long,
        env = "APP_ENV",
        value_name = "APP_ENV",
        default_value = "dev",
        global = true,
        display_order = 900
    )]
    pub app_env: AppEnv,
    /// Log format on stderr; defaults to `text` in dev and `json` in prod.
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_name = "LOG_FORMAT",
        global = true,
        display_order = 900
    )]
    pub log_format: Option<LogFormat>,
    /// Directory of the development log files (`mqtt.log`).
    #[arg(
        long,
        env = "LOG_DIR",
        value_name = "LOG_DIR",
        default_value = "var/log",
        global = true,
        display_order = 900
    )]
    pub log_dir: PathBuf,
    /// Which events to log, as `RUST_LOG` filters (e.g. `info,dataviz_processor=debug`).
    #[arg(
        long,
        env = "RUST_LOG",
        value_name = "RUST_LOG",
        default_value = "info",
        global = true,
        display_order = 900
    )]
    pub rust_log: String,
}

/// Targets that log secrets below info, capped there whatever `RUST_LOG` says.
const NO_SECRETS: &str = "tokio_postgres=info";

/// Keeps the file writer flushing; drop it at exit.
pub struct LogGuard(#[allow(dead_code)] Option<tracing_appender::non_blocking::WorkerGuard>);

/// Installs the global subscriber.
pub fn init(config: &LogConfig) -> anyhow::Result<LogGuard> {
    // tokio_postgres logs every statement's parameters at debug: session ids, password hashes.
    // No RUST_LOG may turn that on.
    let filter = || {
        EnvFilter::try_new(&config.rust_log)
            .map(|f| f.add_directive(NO_SECRETS.parse().expect("a valid directive")))
    };
    filter().map_err(|e| anyhow::anyhow!("RUST_LOG {:?}: {e}", config.rust_log))?;
    let format = config.log_format.unwrap_or(match config.app_env {
        AppEnv::Dev => LogFormat::Text,
        AppEnv::Prod => LogFormat::Json,
    });
    let is_mqtt = |meta: &tracing::Metadata<'_>| meta.target() == crate::MQTT_LOG_TARGET;
    let separate_mqtt = config.app_env == AppEnv::Dev;

    let stderr = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter_fn(move |meta| !(separate_mqtt && is_mqtt(meta))))
    .with_filter(filter()?);

    let (mqtt_file, guard) = if separate_mqtt {
        std::fs::create_dir_all(&config.log_dir).map_err(|e| {
            anyhow::anyhow!(
                "LOG_DIR {}: cannot create it: {e}",
                config.log_dir.display()
            )
        })?;
        let appender = tracing_appender::rolling::never(&config.log_dir, "mqtt.log");
        let (writer, guard) = tracing_appender::non_blocking(appender);
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(writer)
            .with_filter(filter_fn(is_mqtt))
            .with_filter(filter()?);
        (Some(layer), Some(guard))
    } else {
        (None, None)
    };

    tracing_subscriber::registry()
        .with(stderr)
        .with(mqtt_file)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the logger: {e}"))?;
    Ok(LogGuard(guard))
}
