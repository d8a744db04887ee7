//! QoS 0 messages with `MQTT_INTAKE=nats`.
//!
//! nats-server's MQTT listener stores QoS 1 and 2 messages in `$MQTT_msgs` and only delivers
//! a QoS 0 message, on the NATS subject of its topic, to whoever subscribes to it then. So the
//! processor subscribes to [`SUBJECT`] (one member per process of the queue group [`QUEUE`])
//! and stores each QoS 0 message in RAW as the bridge does: a fresh id and receive time, on
//! the gateway's RAW subject, where the processor's consume loop on RAW takes it (and an
//! oversized one in DEAD). Best effort, as MQTT promises for QoS 0, and as the bridge carries
//! them: a message sent while no processor is subscribed is lost, and so are those
//! nats-server drops when this subscriber falls behind.
//!
//! nats-server delivers every MQTT message here, QoS 1 and 2 included (it cannot filter on
//! the header that tells them apart); those are skipped at once.

use async_nats::jetstream;
use dataviz_core::{
    message::RawMessage,
    ops::{Progress, metric},
    retry::Backoff,
    shutdown::Shutdown,
    streams,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::sync::Arc;

/// The NATS subjects of the topics the original system reads, `gateways/<id>/<device>`:
/// devices may publish nowhere else (nats/users.conf).
pub const SUBJECT: &str = "gateways.>";
/// The queue group of the processors' subscriptions: each QoS 0 message is stored once.
pub const QUEUE: &str = "dataviz-processor-qos0";
/// Stores in flight at once; past them the subscription is read no further, and nats-server
/// drops what its buffer for this subscriber cannot hold (QoS 0, best effort).
const IN_FLIGHT: usize = 1024;
/// The stage named on a dead letter of this path.
const STAGE: &str = "processor";

/// The header nats-server puts on each message of its MQTT listener, whose first byte is the
/// message's QoS.
const MQTT_HEADER: &str = "Nmqtt-Pub";

/// Whether a NATS message is a QoS 0 message of nats-server's MQTT listener.
pub fn is_qos0(headers: Option<&async_nats::HeaderMap>) -> bool {
    headers
        .and_then(|h| h.get(MQTT_HEADER))
        .is_some_and(|qos| qos.as_str().as_bytes().first() == Some(&b'0'))
}

/// Subscribes and stores QoS 0 messages in RAW until `shutdown`.
pub async fn run(
    js: jetstream::Context,
    progress: Arc<Progress>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut subscription = js
        .client()
        .queue_subscribe(SUBJECT, QUEUE.into())
        .await
        .map_err(|e| anyhow::anyhow!("subscribing to {SUBJECT} for QoS 0 messages: {e}"))?;
    tracing::info!(
        target: dataviz_core::MQTT_LOG_TARGET,
        subject = SUBJECT,
        "taking QoS 0 messages as they come (nats-server stores none)"
    );
    let stored = metrics::counter!(metric::PROCESSOR_AT_MOST_ONCE);
    // Read once, as the bridge does: a copy of the server's whole description per message
    // would cost more than the check.
    let max_payload = js.client().server_info().max_payload;
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                if done {
                    stored.increment(1);
                    progress.advanced();
                }
            }
            message = subscription.next(), if in_flight.len() < IN_FLIGHT => {
                let Some(message) = message else { break };
                if is_qos0(message.headers.as_ref()) {
                    let raw = RawMessage::received(
                        dataviz_core::message::mqtt_topic(&message.subject),
                        message.payload,
                    );
                    in_flight.push(store(&js, raw, max_payload, &shutdown));
                }
            }
        }
    }
    // What is in flight finishes, or gives up at its next wait now that shutdown fired.
    while in_flight.next().await.is_some() {}
    let _ = subscription.unsubscribe().await;
    Ok(())
}

/// Stores one message in RAW (in DEAD when it can never fit there, a server taking at most
/// `max_payload` bytes), retrying until it is stored or `shutdown` fires. Stored under its id:
/// a retry whose first attempt was stored after all is a duplicate RAW drops.
async fn store(
    js: &jetstream::Context,
    raw: RawMessage,
    max_payload: usize,
    shutdown: &Shutdown,
) -> bool {
    let mut backoff = Backoff::default();
    let letter = dataviz_core::dead::unfit(&raw, STAGE, max_payload);
    loop {
        let attempt = async {
            match &letter {
                Some(letter) => {
                    if letter.whole_size.is_some() {
                        dataviz_core::dead::keep_whole(js, letter, &raw.payload).await?;
                    }
                    letter.store(js).await?;
                }
                None => {
                    let id = raw.id.to_string();
                    streams::publish_stored(
                        js,
                        raw.subject(),
                        raw.headers(Some(&id)),
                        raw.payload.clone(),
                    )
                    .await?;
                }
            }
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => return true,
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = format!("{e:#}"), retry_in = ?wait, "storing a QoS 0 message in RAW failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_mqtt_listener_s_qos_0_messages_are_taken() {
        let with = |value: &str| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(MQTT_HEADER, value);
            headers
        };
        assert!(is_qos0(Some(&with("0"))));
        // A QoS 2 message's header carries its flags after the QoS.
        for other in ["1", "2", "25", ""] {
            assert!(!is_qos0(Some(&with(other))), "{other:?}");
        }
        assert!(!is_qos0(None));
        assert!(!is_qos0(Some(&async_nats::HeaderMap::new())));
    }
}
