//! The consume loop every JetStream stage shares: pull batches from a durable consumer, hand
//! each batch to the stage, start again after errors, stop on shutdown between batches.
//!
//! Batching is natural: a batch is whatever has arrived, up to `batch_size`, so an idle
//! pipeline handles single messages at once and a loaded one amortizes round trips.

use crate::ops::{Progress, metric};
use crate::shutdown::Shutdown;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::{FutureExt, StreamExt};
use std::future::Future;
use std::time::{Duration, Instant};

/// Pulls from `consumer` on `stream` and calls `handle` with each batch until `shutdown`.
/// `handle` acknowledges the messages itself and says whether it did any work: a batch handed
/// back whole (a dependency is down) is not progress, so readiness sees the stall. Each batch's
/// size and duration are recorded under the consumer's name. On shutdown, messages already
/// pulled but not handled are handed back at once (nak), for another instance to take.
pub async fn consume_batches<F, Fut>(
    js: &jetstream::Context,
    stream: &str,
    consumer: pull::Config,
    batch_size: usize,
    progress: &Progress,
    shutdown: &Shutdown,
    mut handle: F,
) -> anyhow::Result<()>
where
    F: FnMut(Vec<jetstream::Message>) -> Fut,
    Fut: Future<Output = bool>,
{
    let name = consumer.durable_name.clone().unwrap_or_default();
    let mut backoff = crate::retry::Backoff::default();
    while !shutdown.is_cancelled() {
        let messages = async {
            let stream = js.get_stream(stream).await?;
            let consumer = stream.create_consumer(consumer.clone()).await?;
            let messages = consumer
                .stream()
                .max_messages_per_batch(batch_size)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(10))
                .messages()
                .await?;
            Ok::<_, async_nats::Error>(messages)
        };
        let messages = tokio::select! {
            _ = shutdown.cancelled() => break,
            messages = messages => messages,
        };
        let mut chunks = match messages {
            Ok(messages) => messages.ready_chunks(batch_size),
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(stream, consumer = %name, error = %e, retry_in = ?wait, "cannot consume; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        loop {
            let chunk = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                chunk = chunks.next() => chunk,
            };
            let Some(chunk) = chunk else { break };
            let mut batch = Vec::with_capacity(chunk.len());
            let mut broken = false;
            for item in chunk {
                match item {
                    Ok(message) => batch.push(message),
                    Err(e) => {
                        tracing::warn!(stream, consumer = %name, error = %e, "consumer stream error; reopening");
                        broken = true;
                    }
                }
            }
            if !batch.is_empty() {
                backoff.reset();
                let started = Instant::now();
                let size = batch.len();
                let progressed = handle(batch).await;
                metrics::histogram!(metric::BATCH_SIZE, "stage" => name.clone())
                    .record(size as f64);
                metrics::histogram!(metric::BATCH_SECONDS, "stage" => name.clone())
                    .record(started.elapsed().as_secs_f64());
                if progressed {
                    progress.advanced();
                }
            }
            if broken {
                break;
            }
        }
        if shutdown.is_cancelled() {
            let mut handed_back = 0;
            while let Some(Some(chunk)) = chunks.next().now_or_never() {
                for message in chunk.into_iter().flatten() {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    handed_back += 1;
                }
            }
            if handed_back > 0 {
                tracing::info!(stream, consumer = %name, handed_back, "unhandled messages handed back");
            }
        }
    }
    Ok(())
}

/// Hands a message back for redelivery after a delay growing with its delivery count.
pub async fn nak_later(message: &jetstream::Message) {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    let delay = crate::retry::delay(u32::try_from(delivered).unwrap_or(u32::MAX));
    if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::debug!(error = %e, "nak not sent; the message comes back after ack_wait");
    }
}

/// Acknowledges a message; a lost ack only means a redelivery, which every stage absorbs.
pub async fn ack(message: &jetstream::Message) {
    if let Err(e) = message.ack().await {
        tracing::debug!(error = %e, "ack not sent; the message comes back after ack_wait");
    }
}
