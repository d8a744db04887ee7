//! The pipeline's state as the home page shows it, read from JetStream: when RAW last stored a
//! message, how many RAW messages the `processor` consumer has not yet been given, and how many
//! dead letters DEAD holds. Each figure is read on its own with a short timeout, so that a slow
//! or missing NATS leaves the page up, saying what it could not read.

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use dataviz_core::streams::{DEAD_STREAM, PROCESSOR_CONSUMER, RAW_STREAM};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

/// One figure, or why it is missing.
pub type Figure<T> = Result<T, String>;

#[derive(Debug, Clone)]
pub struct PipelineState {
    /// When RAW stored its last message (`None`: never).
    pub last_received: Figure<Option<DateTime<Utc>>>,
    /// RAW messages not yet delivered to the processor.
    pub raw_pending: Figure<u64>,
    /// RAW messages delivered to a processor and not yet acknowledged.
    pub raw_in_progress: Figure<u64>,
    /// Messages in DEAD.
    pub dead_letters: Figure<u64>,
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Figure<T> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: NATS did not answer in {}s",
            TIMEOUT.as_secs()
        )),
    }
}

fn to_chrono(t: time::OffsetDateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.unix_timestamp(), t.nanosecond())
}

/// Reads the three figures at once.
pub async fn state(js: &jetstream::Context) -> PipelineState {
    let raw = async {
        let stream = js.get_stream(RAW_STREAM).await.map_err(|e| e.to_string())?;
        let info = stream.get_info().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(
            (info.state.last_sequence > 0)
                .then(|| to_chrono(info.state.last_timestamp))
                .flatten(),
        )
    };
    let consumer = async {
        let stream = js.get_stream(RAW_STREAM).await.map_err(|e| e.to_string())?;
        let info = stream
            .consumer_info(PROCESSOR_CONSUMER)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((info.num_pending, info.num_ack_pending as u64))
    };
    let dead = async {
        let stream = js
            .get_stream(DEAD_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let info = stream.get_info().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(info.state.messages)
    };
    let (raw, consumer, dead) = tokio::join!(
        timed("RAW", raw),
        timed("processor consumer", consumer),
        timed("DEAD", dead)
    );
    PipelineState {
        last_received: raw,
        raw_pending: consumer.clone().map(|c| c.0),
        raw_in_progress: consumer.map(|c| c.1),
        dead_letters: dead,
    }
}
