//! Operations: health, readiness and Prometheus metrics, served over HTTP by every role.
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 when every check passes, else 503 with the failing checks. A role is
//!   not ready while it starts (until it has made its streams, consumers and hub), when NATS
//!   is disconnected, when its database does not answer, when another link
//!   it needs is down (the bridge's MQTT connection), or when it has work waiting and has made
//!   no progress for `READY_STALL_AFTER`.
//! - `GET /metrics`: Prometheus text format; the names are the constants of [`metric`].
//!
//! Stages report progress through a [`Progress`] and register their consumer with
//! [`Ops::watch_consumer`], which polls its lag every few seconds.

use crate::shutdown::Shutdown;
use anyhow::Context as _;
use async_nats::jetstream;
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Metric names, one place for all of them.
pub mod metric {
    /// Messages received from MQTT.
    pub const BRIDGE_RECEIVED: &str = "dataviz_bridge_messages_received_total";
    /// Messages stored in RAW (or DEAD when oversized) and acknowledged on MQTT.
    pub const BRIDGE_STORED: &str = "dataviz_bridge_messages_stored_total";
    /// QoS 0 messages the processor stored in RAW with `MQTT_INTAKE=nats` (nats-server keeps
    /// none of them).
    pub const PROCESSOR_AT_MOST_ONCE: &str = "dataviz_processor_qos0_stored_total";
    /// Raw messages handled by the processor, by `outcome` (`readings`, `dead`, `retry`).
    pub const PROCESSOR_MESSAGES: &str = "dataviz_processor_messages_total";
    /// Readings published to READINGS.
    pub const PROCESSOR_READINGS: &str = "dataviz_processor_readings_total";
    /// READINGS messages whose rows were written.
    pub const WRITER_MESSAGES: &str = "dataviz_writer_messages_total";
    /// Rows written to `tag_reading`.
    pub const WRITER_ROWS: &str = "dataviz_writer_rows_total";
    /// Updates the Mercure hub accepted.
    pub const PUBLISHER_UPDATES: &str = "dataviz_publisher_updates_total";
    /// READINGS messages acknowledged without their own update, coalesced into a later one.
    pub const PUBLISHER_COALESCED: &str = "dataviz_publisher_coalesced_total";
    /// READINGS messages skipped because their rows were already there.
    pub const WRITER_DUPLICATES: &str = "dataviz_writer_duplicates_total";
    /// Dead letters, by `stage` and `reason`.
    pub const DEAD_LETTERS: &str = "dataviz_dead_letters_total";
    /// Failures that will be retried, by `stage` and `kind`.
    pub const FAILURES: &str = "dataviz_failures_total";
    /// Messages per handled batch, by `stage` (histogram).
    pub const BATCH_SIZE: &str = "dataviz_batch_size";
    /// Time to handle a batch, by `stage` (histogram, seconds).
    pub const BATCH_SECONDS: &str = "dataviz_batch_duration_seconds";
    /// From the bridge's receive time to the commit of the rows (histogram, seconds).
    pub const END_TO_END_SECONDS: &str = "dataviz_end_to_end_latency_seconds";
    /// Messages not yet delivered to a consumer, by `stream` and `consumer` (gauge).
    pub const CONSUMER_PENDING: &str = "dataviz_consumer_pending_messages";
    /// Messages delivered and not yet acknowledged, by `stream` and `consumer` (gauge).
    pub const CONSUMER_ACK_PENDING: &str = "dataviz_consumer_ack_pending_messages";
}

/// Operations settings.
#[derive(Debug, Clone, clap::Args)]
pub struct OpsConfig {
    /// Address of /healthz, /readyz and /metrics (`off` to serve none); each role has its own
    /// default port: all 9100, bridge 9101, processor 9102, writer 9103, publisher 9104, hub
    /// 9105, app 9106.
    #[arg(long, env = "HTTP_ADDR", value_name = "HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// On SIGTERM or Ctrl-C, time given to the work in hand before the process exits anyway.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", value_name = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// A role with work waiting and no progress for this long is not ready.
    #[arg(long, env = "READY_STALL_AFTER", value_name = "READY_STALL_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ready_stall_after: Duration,
}

impl OpsConfig {
    /// The address to listen on, `None` for `off`.
    pub fn addr(&self, default_port: u16) -> anyhow::Result<Option<SocketAddr>> {
        match self.http_addr.as_deref() {
            Some("off") => Ok(None),
            Some(addr) => addr.parse().map(Some).map_err(|e| {
                anyhow::anyhow!("HTTP_ADDR {addr:?}: {e} (expected e.g. 0.0.0.0:9100 or off)")
            }),
            None => Ok(Some(SocketAddr::from(([127, 0, 0, 1], default_port)))),
        }
    }
}

/// A stage's progress: when it last finished work, and how much waits for it.
#[derive(Debug)]
pub struct Progress {
    pub name: String,
    /// tokio's clock, so that tests can drive a stall with paused time.
    born: tokio::time::Instant,
    /// When work was last done, in milliseconds after `born`.
    last_progress_ms: AtomicU64,
    waiting: AtomicU64,
}

impl Progress {
    pub fn new(name: &str) -> Progress {
        Progress {
            name: name.to_owned(),
            born: tokio::time::Instant::now(),
            last_progress_ms: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Work was done just now.
    pub fn advanced(&self) {
        self.last_progress_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// How many messages wait for this stage.
    pub fn set_waiting(&self, waiting: u64) {
        self.waiting.store(waiting, Ordering::Relaxed);
    }

    fn stalled(&self, after: Duration) -> Option<String> {
        let waiting = self.waiting.load(Ordering::Relaxed);
        let idle = Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_progress_ms.load(Ordering::Relaxed)),
        );
        (waiting > 0 && idle > after).then(|| {
            format!(
                "{}: {waiting} messages waiting and no progress for {}s",
                self.name,
                idle.as_secs()
            )
        })
    }
}

/// Health state of one process.
#[derive(Clone)]
pub struct Ops {
    inner: Arc<Inner>,
}

struct Inner {
    metrics: PrometheusHandle,
    nats: Mutex<Option<async_nats::Client>>,
    db: Mutex<Option<deadpool_postgres::Pool>>,
    stages: Mutex<Vec<Arc<Progress>>>,
    links: Mutex<Vec<(&'static str, Arc<AtomicBool>)>>,
    /// Until [`Ops::started`]: the role is still making its streams, consumers and hub, and a
    /// fault then can still stop it.
    starting: AtomicBool,
    stall_after: Duration,
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's metrics recorder, installed on first use.
pub fn recorder() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // A recorder installed by someone else (tests) is fine: ours then renders nothing.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

impl Ops {
    pub fn new(config: &OpsConfig) -> Ops {
        Ops {
            inner: Arc::new(Inner {
                metrics: recorder(),
                nats: Mutex::new(None),
                db: Mutex::new(None),
                stages: Mutex::new(Vec::new()),
                links: Mutex::new(Vec::new()),
                starting: AtomicBool::new(true),
                stall_after: config.ready_stall_after,
            }),
        }
    }

    /// The role has started every part it runs: until then it is not ready.
    pub fn started(&self) {
        self.inner.starting.store(false, Ordering::Relaxed);
    }

    /// Readiness requires this NATS connection.
    pub fn set_nats(&self, client: async_nats::Client) {
        *self.inner.nats.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
    }

    /// Readiness requires this database.
    pub fn set_db(&self, pool: deadpool_postgres::Pool) {
        *self.inner.db.lock().unwrap_or_else(|p| p.into_inner()) = Some(pool);
    }

    /// A connection readiness requires, named; down until its owner says it is up.
    pub fn link(&self, name: &'static str) -> Arc<AtomicBool> {
        let up = Arc::new(AtomicBool::new(false));
        self.inner
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, up.clone()));
        up
    }

    /// A stage whose progress readiness watches.
    pub fn stage(&self, name: &str) -> Arc<Progress> {
        let progress = Arc::new(Progress::new(name));
        self.inner
            .stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(progress.clone());
        progress
    }

    /// Polls a durable consumer's lag every 5 s into the metrics and `progress`.
    pub fn watch_consumer(
        &self,
        js: jetstream::Context,
        stream: &'static str,
        consumer: String,
        progress: Arc<Progress>,
        shutdown: Shutdown,
    ) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let info = async {
                    let stream = js.get_stream(stream).await?;
                    let mut consumer: jetstream::consumer::PullConsumer =
                        stream.get_consumer(&consumer).await?;
                    Ok::<_, async_nats::Error>(consumer.info().await?.clone())
                }
                .await;
                match info {
                    Ok(info) => {
                        let labels = [
                            ("stream", stream.to_owned()),
                            ("consumer", consumer.clone()),
                        ];
                        metrics::gauge!(metric::CONSUMER_PENDING, &labels)
                            .set(info.num_pending as f64);
                        metrics::gauge!(metric::CONSUMER_ACK_PENDING, &labels)
                            .set(info.num_ack_pending as f64);
                        progress.set_waiting(info.num_pending + info.num_ack_pending as u64);
                    }
                    Err(e) => {
                        tracing::debug!(stream, consumer = %consumer, error = %e, "consumer lag not read")
                    }
                }
            }
        });
    }

    /// The failing readiness checks; empty when ready.
    pub async fn not_ready(&self) -> Vec<String> {
        let mut failing = Vec::new();
        if self.inner.starting.load(Ordering::Relaxed) {
            failing.push("starting".to_owned());
        }
        let nats = self
            .inner
            .nats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(nats) = nats
            && nats.connection_state() != async_nats::connection::State::Connected
        {
            failing.push(format!("nats: {}", nats.connection_state()));
        }
        let db = self
            .inner
            .db
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(pool) = db {
            let check = async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            };
            match tokio::time::timeout(Duration::from_secs(2), check).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failing.push(format!("database: {e}")),
                Err(_) => failing.push("database: no answer within 2s".into()),
            }
        }
        failing.extend(
            self.inner
                .links
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, up)| !up.load(Ordering::Relaxed))
                .map(|(name, _)| format!("{name}: not connected")),
        );
        let stages = self
            .inner
            .stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        failing.extend(
            stages
                .iter()
                .filter_map(|s| s.stalled(self.inner.stall_after)),
        );
        failing
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route(
                "/metrics",
                get(|State(ops): State<Ops>| async move { ops.inner.metrics.render() }),
            )
            .with_state(self.clone())
    }

    /// Serves the routes on `addr` until `shutdown`; returns the bound address.
    pub async fn serve(&self, addr: SocketAddr, shutdown: Shutdown) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("HTTP_ADDR {addr}: cannot listen"))?;
        let bound = listener.local_addr()?;
        let router = self.router();
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "health and metrics server stopped");
            }
        });
        tracing::info!(addr = %bound, "serving /healthz, /readyz and /metrics");
        Ok(bound)
    }
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    let failing = ops.not_ready().await;
    if failing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", failing.join("\n")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stage_with_work_and_no_progress_is_stalled() {
        let after = Duration::from_secs(60);
        let p = Progress::new("writer");
        tokio::time::advance(Duration::from_secs(120)).await;
        assert!(p.stalled(after).is_none(), "nothing waiting");
        p.set_waiting(5);
        p.advanced();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(p.stalled(after).is_none(), "not past READY_STALL_AFTER yet");
        tokio::time::advance(Duration::from_millis(1)).await;
        let why = p.stalled(after).expect("stalled just past the limit");
        assert!(why.contains("writer: 5 messages waiting"), "{why}");
        p.advanced();
        assert!(p.stalled(after).is_none(), "progress clears it");
    }

    #[test]
    fn http_addr_defaults_per_role_and_can_be_off() {
        let config = |v: Option<&str>| OpsConfig {
            http_addr: v.map(Into::into),
            shutdown_timeout: Duration::from_secs(30),
            ready_stall_after: Duration::from_secs(60),
        };
        assert_eq!(
            config(None).addr(9101).unwrap(),
            Some("127.0.0.1:9101".parse().unwrap())
        );
        assert_eq!(config(Some("off")).addr(9101).unwrap(), None);
        assert!(config(Some("nowhere")).addr(9101).is_err());
    }
}
