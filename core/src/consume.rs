//! The consume loop every JetStream stage shares, and the settle contract between them.
//!
//! A stage ([`Stage`]) is handed the messages of one fetch and says what became of each one
//! ([`Settle`]): done, dead (refused for good, with the letters for DEAD) or retry (failed for
//! now, with what failed). The loop does the rest, in one place and one order: it stores the
//! letters in DEAD, acknowledges what is done or dead, hands back what must be retried (with a
//! delay growing with the message's deliveries), writes one log line per kind of failure and
//! counts it. No stage acknowledges a JetStream message itself.
//!
//! Batching is natural: a batch is whatever has arrived, up to `batch_size`, so an idle
//! pipeline handles single messages at once and a loaded one amortizes round trips.

use crate::message::DeadLetter;
use crate::ops::{Progress, metric};
use crate::retry::Backoff;
use crate::shutdown::Shutdown;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use std::future::Future;
use std::time::{Duration, Instant};

/// What becomes of one message a stage was handed.
#[derive(Debug)]
pub enum Settle {
    /// Handled: acknowledged.
    Done,
    /// Refused for good: each letter is stored in DEAD, then the message is acknowledged (handed
    /// back instead while DEAD does not store them). One letter per part the stage refused:
    /// the writer refuses a READINGS message batch by batch.
    Dead(Vec<DeadLetter>),
    /// Failed for now, through no fault of the message: handed back, and delivered again after
    /// a delay growing with its deliveries ([`crate::retry::delay`]).
    Retry(Transient),
}

impl Settle {
    /// One letter for DEAD.
    pub fn dead(letter: DeadLetter) -> Settle {
        Settle::Dead(vec![letter])
    }

    pub fn retry(failure: Failure, error: impl std::fmt::Display) -> Settle {
        Settle::Retry(Transient {
            failure,
            error: error.to_string(),
        })
    }
}

/// A failure that retrying can cure, and what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transient {
    pub failure: Failure,
    pub error: String,
}

/// What failed, when a message is retried: the `kind` label of `dataviz_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// PostgreSQL unreachable, or an error that is not the data's fault.
    Database,
    /// NATS or JetStream: a publish not acknowledged, a full stream.
    Nats,
    /// The Mercure hub did not answer, or answered with a server error.
    HubUnavailable,
    /// The Mercure hub refused the update (a key or claim mismatch: a configuration error).
    HubRefused,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Database => "database",
            Failure::Nats => "nats",
            Failure::HubUnavailable => "hub_unavailable",
            Failure::HubRefused => "hub_refused",
        }
    }
}

/// A stage of the pipeline: from the messages of one fetch to one [`Settle`] each, in order.
pub trait Stage: Send + Sync {
    /// The stage's name, in logs and metrics (and in the dead letters it makes).
    const NAME: &'static str;

    /// Payload bytes handed to [`Stage::handle`] at once, beside the batch size, for a stage
    /// that holds what it is handed in a larger form while it works: the message that reaches
    /// them is the last of its batch, so one larger than this still goes through. By default
    /// only the pull's bound ([`fetch_bytes`]).
    const BATCH_BYTES: usize = usize::MAX;

    fn handle<'a>(
        &'a self,
        messages: &'a [jetstream::Message],
    ) -> impl Future<Output = Vec<Settle>> + Send + 'a;
}

/// What [`settle`] did with one fetch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Acknowledged as handled.
    pub done: usize,
    /// Acknowledged once DEAD stored their letters.
    pub dead: usize,
    /// Handed back.
    pub retried: usize,
}

impl Settled {
    /// Whether any message left the stage: a fetch handed back whole is no progress, so
    /// readiness sees the stall.
    pub fn progressed(&self) -> bool {
        self.done + self.dead > 0
    }
}

/// Settles `messages` as `stage` decided (`settles`, one per message, in order): stores the
/// dead letters, acknowledges or hands back each message, logs and counts the failures.
pub async fn settle(
    js: &jetstream::Context,
    stage: &str,
    messages: &[jetstream::Message],
    settles: Vec<Settle>,
) -> Settled {
    assert_eq!(
        messages.len(),
        settles.len(),
        "stage {stage} settles each message once"
    );
    // Letters first: a message is acknowledged only once DEAD has its letters.
    let settles = join_all(
        messages
            .iter()
            .zip(settles)
            .map(|(message, settle)| async move {
                let Settle::Dead(mut letters) = settle else {
                    return settle;
                };
                let seq = message.info().ok().map(|i| i.stream_sequence);
                for letter in &mut letters {
                    letter.source_seq = letter.source_seq.or(seq);
                }
                let stored = join_all(
                    letters
                        .iter_mut()
                        .map(|letter| crate::dead::store(js, letter)),
                )
                .await;
                match stored.into_iter().find_map(Result::err) {
                    None => Settle::Dead(letters),
                    Some(e) => {
                        Settle::retry(Failure::Nats, format_args!("dead letter not stored: {e:#}"))
                    }
                }
            }),
    )
    .await;
    let mut settled = Settled::default();
    // Per kind of failure: how many messages, and the first error (one log line each).
    let mut failures: std::collections::BTreeMap<Failure, (u64, &str)> = Default::default();
    for settle in &settles {
        match settle {
            Settle::Done => settled.done += 1,
            Settle::Dead(_) => settled.dead += 1,
            Settle::Retry(t) => {
                settled.retried += 1;
                failures.entry(t.failure).or_insert((0, &t.error)).0 += 1;
            }
        }
    }
    for (failure, (messages, error)) in failures {
        metrics::counter!(metric::FAILURES, "stage" => stage.to_owned(), "kind" => failure.name())
            .increment(messages);
        match failure {
            Failure::HubRefused => tracing::error!(
                stage,
                kind = failure.name(),
                messages,
                error,
                "the hub refused our update: check MERCURE_PUBLISHER_JWT_KEY, the JWT's mercure.publish claim and MERCURE_TOPIC_BASE; messages handed back and retried"
            ),
            _ => tracing::warn!(
                stage,
                kind = failure.name(),
                messages,
                error,
                "messages handed back; they will be retried"
            ),
        }
    }
    join_all(
        messages
            .iter()
            .zip(&settles)
            .map(|(message, settle)| async move {
                match settle {
                    Settle::Done | Settle::Dead(_) => ack(message).await,
                    Settle::Retry(_) => nak_later(message).await,
                }
            }),
    )
    .await;
    settled
}

/// Hands `messages` to `stage` and settles what it decided: one turn of the loop, for a
/// caller that fetched the messages itself.
pub async fn handle<S: Stage>(
    stage: &S,
    js: &jetstream::Context,
    messages: &[jetstream::Message],
) -> Settled {
    let settles = stage.handle(messages).await;
    settle(js, S::NAME, messages, settles).await
}

/// The longest pause of a stage whose whole fetch was handed back, before the next fetch: a
/// dependency that is back is found within this.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// The payload bytes one pull asks for, and one batch holds, at most, beside `batch_size`
/// messages: what bounds a stage's memory when messages are large (500 messages of 250 KiB are
/// 122 MiB, and a stage holds each in several forms while it works). Never below the largest
/// message the server takes (`max_payload`), with room for its subject: the server refuses a
/// pull whose limit is under the size of the next message, so a smaller limit would stop the
/// consumer at the first large one.
pub fn fetch_bytes(max_payload: usize) -> usize {
    (max_payload + 64 * 1024).max(1024 * 1024)
}

/// The next batch of `messages`: waits for one, then takes what has arrived, without waiting,
/// up to `batch_size` messages and `max_bytes` of payload (the message that reaches it is the
/// last).
async fn next_batch<S, E>(
    messages: &mut S,
    batch_size: usize,
    max_bytes: usize,
) -> Option<Vec<Result<jetstream::Message, E>>>
where
    S: futures::Stream<Item = Result<jetstream::Message, E>> + Unpin,
{
    let size = |item: &Result<jetstream::Message, E>| item.as_ref().map_or(0, |m| m.payload.len());
    let first = messages.next().await?;
    let mut bytes = size(&first);
    let mut batch = vec![first];
    while batch.len() < batch_size && bytes < max_bytes {
        match messages.next().now_or_never() {
            Some(Some(item)) => {
                bytes += size(&item);
                batch.push(item);
            }
            _ => break,
        }
    }
    Some(batch)
}

/// Pulls from `consumer` on `stream` and hands each batch to `stage` until `shutdown`, settling
/// what it decided ([`settle`]). A fetch handed back whole (a dependency is down) makes the
/// loop pause before the next one, growing to [`MAX_PAUSE`], and is no progress. A pull asks
/// for `batch_size` messages and [`fetch_bytes`] bytes at most, whichever comes first. Each batch's
/// size and duration are recorded under the consumer's name. On shutdown, messages already
/// pulled but not handled are handed back at once (nak), for another instance to take.
pub async fn run<S: Stage>(
    stage: &S,
    js: &jetstream::Context,
    stream: &str,
    consumer: pull::Config,
    batch_size: usize,
    progress: &Progress,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let name = consumer.durable_name.clone().unwrap_or_default();
    let mut backoff = Backoff::default();
    let mut pause = Backoff::default();
    while !shutdown.is_cancelled() {
        let messages = async {
            let stream = js.get_stream(stream).await?;
            let consumer = stream.create_consumer(consumer.clone()).await?;
            // Read once connected: the server's limit, not a default.
            let max_bytes = fetch_bytes(js.client().server_info().max_payload);
            let messages = consumer
                .stream()
                .max_messages_per_batch(batch_size)
                .max_bytes_per_batch(max_bytes)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(10))
                .messages()
                .await?;
            Ok::<_, async_nats::Error>((messages, max_bytes))
        };
        let messages = tokio::select! {
            _ = shutdown.cancelled() => break,
            messages = messages => messages,
        };
        let (mut messages, max_bytes) = match messages {
            Ok(opened) => opened,
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
                chunk = next_batch(&mut messages, batch_size, max_bytes.min(S::BATCH_BYTES)) => chunk,
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
                let settled = handle(stage, js, &batch).await;
                metrics::histogram!(metric::BATCH_SIZE, "stage" => name.clone())
                    .record(size as f64);
                metrics::histogram!(metric::BATCH_SECONDS, "stage" => name.clone())
                    .record(started.elapsed().as_secs_f64());
                if settled.progressed() {
                    progress.advanced();
                    pause.reset();
                } else if settled.retried > 0 {
                    let wait = pause.next_delay().min(MAX_PAUSE);
                    tokio::select! {
                        _ = shutdown.cancelled() => {},
                        _ = tokio::time::sleep(wait) => {},
                    }
                }
            }
            if broken {
                break;
            }
        }
        if shutdown.is_cancelled() {
            let mut handed_back = 0;
            while let Some(Some(message)) = messages.next().now_or_never() {
                if let Ok(message) = message {
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
async fn nak_later(message: &jetstream::Message) {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    let delay = crate::retry::delay(u32::try_from(delivered).unwrap_or(u32::MAX));
    if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::debug!(error = %e, "nak not sent; the message comes back after ack_wait");
    }
}

/// Acknowledges a message; a lost ack only means a redelivery, which every stage absorbs.
async fn ack(message: &jetstream::Message) {
    if let Err(e) = message.ack().await {
        tracing::debug!(error = %e, "ack not sent; the message comes back after ack_wait");
    }
}
