//! The pipeline's state as the home page shows it, read from JetStream: when a message was last
//! received, how many received messages the processor has not yet been given, and how many dead
//! letters DEAD holds. Each figure is read on its own with a short timeout, so that a slow
//! or missing NATS leaves the page up, saying what it could not read.

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use dataviz_core::message::chrono_time;
use dataviz_core::streams::{
    DEAD_STREAM, INTAKE_CONSUMER, MQTT_STREAM, PROCESSOR_CONSUMER, RAW_STREAM,
};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

/// One figure, or why it is missing.
pub type Figure<T> = Result<T, String>;

#[derive(Debug, Clone)]
pub struct PipelineState {
    /// When RAW or nats-server's MQTT stream stored its last message (`None`: never).
    pub last_received: Figure<Option<DateTime<Utc>>>,
    /// Received messages not yet delivered to the processor.
    pub raw_pending: Figure<u64>,
    /// Received messages delivered to a processor and not yet acknowledged.
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

/// When stream `name` last stored a message (`None`: never); a stream not there is `absent`.
async fn last_stored(
    js: &jetstream::Context,
    name: &str,
    absent: Result<Option<DateTime<Utc>>, String>,
) -> Result<Option<DateTime<Utc>>, String> {
    let Ok(stream) = js.get_stream(name).await else {
        return absent;
    };
    let state = &stream.cached_info().state;
    Ok((state.last_sequence > 0).then(|| chrono_time(state.last_timestamp)))
}

/// The messages consumer `consumer` of stream `name` has not been given, and those given and not
/// acknowledged; a consumer not there is `absent`.
async fn held(
    js: &jetstream::Context,
    name: &str,
    consumer: &str,
    absent: Result<(u64, u64), String>,
) -> Result<(u64, u64), String> {
    let Ok(stream) = js.get_stream(name).await else {
        return absent;
    };
    match stream.consumer_info(consumer).await {
        Ok(info) => Ok((info.num_pending, info.num_ack_pending as u64)),
        Err(_) => absent,
    }
}

/// Reads the three figures at once. The messages received are in RAW (through the bridge, QoS 0
/// ones) and in nats-server's MQTT stream (`MQTT_INTAKE=nats`), each with the processor's
/// consumer there.
pub async fn state(js: &jetstream::Context) -> PipelineState {
    let raw = async {
        let (raw, mqtt) = tokio::join!(
            last_stored(js, RAW_STREAM, Err(format!("no stream {RAW_STREAM}"))),
            last_stored(js, MQTT_STREAM, Ok(None))
        );
        Ok::<_, String>(raw?.max(mqtt?))
    };
    let consumer = async {
        let (raw, mqtt) = tokio::join!(
            held(
                js,
                RAW_STREAM,
                PROCESSOR_CONSUMER,
                Err(format!("no consumer {PROCESSOR_CONSUMER} on {RAW_STREAM}"))
            ),
            held(js, MQTT_STREAM, INTAKE_CONSUMER, Ok((0, 0)))
        );
        let (raw, mqtt) = (raw?, mqtt?);
        Ok::<_, String>((raw.0 + mqtt.0, raw.1 + mqtt.1))
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
