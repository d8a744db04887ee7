//! The bridge: MQTT → JetStream RAW.
//!
//! # How nothing is lost
//! The bridge holds a persistent MQTT session (fixed client id, clean session off) and acks
//! each message by hand: the MQTT PUBACK is sent only after JetStream has stored the message.
//! Whatever the bridge held when it stopped, the broker delivers again.
//!
//! # How nothing is stored twice
//! A redelivered MQTT message carries the same packet id, topic and payload; the bridge derives
//! the JetStream deduplication id (`Nats-Msg-Id`) from them, so RAW keeps one copy within its
//! duplicate window (`RAW_DUPLICATE_WINDOW`). When JetStream calls a message a duplicate, RAW is
//! read at the sequence the ack names, and the message is taken as stored when what it holds is
//! this message already:
//! - the copy of an attempt of ours that failed for us but reached JetStream (its ack lost while
//!   NATS was away): RAW holds the same raw id;
//! - the same MQTT message received twice: RAW holds the same topic and payload, and either this
//!   copy is a redelivery (DUP flag) or came on an earlier connection (its redelivery on the
//!   next one may be stored first), or RAW's copy was received after this one. The broker does
//!   not reuse a packet id while it waits for its PUBACK, so a later copy under the same id is
//!   this message sent again (past the broker's `ack_wait`), stored first because this copy
//!   waited longer for its turn.
//!
//! Otherwise it is a different message that reused a packet id with the same content after
//! this one's was acknowledged, and it is stored again under a unique id. Copies past the
//! window reach RAW twice; the writer recognises those that carry `ts` by their content
//! (`dataviz_core::identity`).
//!
//! Retained messages delivered on subscribe are old values the bridge saw live (its session
//! persists while it is away); they are acknowledged and skipped.
//!
//! # Layout
//! - [`config`]: `MQTT_*` settings.
//! - [`run`]: the event loop task (reads MQTT, never blocks on JetStream) and the store task
//!   (publishes to RAW with acks in flight, then acks MQTT).

pub mod config;

use anyhow::Context as _;
use async_nats::jetstream::{
    self,
    context::{PublishAckFuture, PublishError},
    publish::PublishAck,
};
use bytes::Bytes;
use config::{BridgeConfig, MqttConnection};
use dataviz_core::message::RawMessage;
use dataviz_core::ops::{Progress, metric};
use dataviz_core::retry::Backoff;
use dataviz_core::{MQTT_LOG_TARGET, shutdown::Shutdown, streams};
use futures::{StreamExt, stream::FuturesUnordered};
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

const STAGE: &str = "bridge";

/// A message taken from MQTT, on its way to RAW.
struct Received {
    /// As received, less its topic and payload (in `raw`): what acking it needs.
    publish: Publish,
    /// The MQTT connection it came on: an ack is only valid on that connection.
    connection: u64,
    raw: RawMessage,
    /// Its place among `BRIDGE_MAX_IN_FLIGHT`, given back when it is dropped (stored).
    _slot: OwnedSemaphorePermit,
    /// Its share of `BRIDGE_MAX_IN_FLIGHT_BYTES`, given back when it is dropped (stored).
    _budget: OwnedSemaphorePermit,
}

/// The in-flight byte budget counts kibibytes: a semaphore holds at most `u32::MAX` permits.
const BUDGET_UNIT: usize = 1024;

/// The budget a payload takes: its kibibytes, at least one, at most the whole budget (a
/// payload larger than the budget travels alone).
fn budget_of(payload: usize, budget: u32) -> u32 {
    u32::try_from(payload.div_ceil(BUDGET_UNIT).max(1))
        .unwrap_or(u32::MAX)
        .min(budget)
}

/// Runs the bridge until `shutdown` fires, then stores or hands back what it holds. `mqtt_up`
/// tells readiness whether the broker connection is up.
pub async fn run(
    config: BridgeConfig,
    js: jetstream::Context,
    max_payload: usize,
    progress: Arc<Progress>,
    mqtt_up: Arc<AtomicBool>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut options = config.mqtt.options(&config.mqtt_client_id)?;
    options.set_clean_session(false);
    options.set_manual_acks(true);
    // Acks queue here; sized past the messages in flight so that acking never waits on it.
    options.set_request_channel_capacity(config.bridge_max_in_flight * 2 + 64);
    let (client, eventloop) = AsyncClient::new(options, config.bridge_max_in_flight * 2 + 64);
    // Messages in flight are counted from their receipt (`Received::_slot`), queued here or
    // being stored alike, so the channel needs no bound of its own.
    let (tx, rx) = mpsc::unbounded_channel::<Received>();
    let slots = Arc::new(Semaphore::new(config.bridge_max_in_flight.max(1)));
    let budget =
        u32::try_from((config.bridge_max_in_flight_bytes / BUDGET_UNIT).max(1)).unwrap_or(u32::MAX);
    let connection = Arc::new(AtomicU64::new(0));

    let raw_store = RawStore {
        js,
        client_id: config.mqtt_client_id.clone(),
        max_payload,
        connection: connection.clone(),
        shutdown: shutdown.clone(),
    };
    let store = tokio::spawn(store_loop(rx, raw_store, client.clone(), progress));
    let events = tokio::spawn(event_loop(
        eventloop,
        client.clone(),
        config,
        (tx, slots, Arc::new(Semaphore::new(budget as usize)), budget),
        connection,
        mqtt_up,
        shutdown,
    ));
    // Once the event loop stops reading and drops its sender, the store task finishes what it
    // holds and ends; the event loop keeps serving the connection until the disconnect is out.
    let stored = store.await?;
    let _ = client.try_disconnect();
    let events = events.await?;
    events.and(stored)
}

/// Makes sure the bridge's persistent session exists on the broker, subscribed to its topics.
///
/// A broker may keep a QoS 1 message only for the sessions that exist when it arrives
/// (nats-server's MQTT listener does: its message stream has interest retention), so what
/// devices publish before the bridge first subscribed would be acknowledged and dropped. This
/// connects as the bridge (a running bridge is disconnected and reconnects at once), subscribes
/// and disconnects without acknowledging anything: a message it is handed stays the bridge's,
/// sent again when the bridge is back. Says whether the session was there already.
pub async fn open_session(config: &BridgeConfig, within: Duration) -> anyhow::Result<bool> {
    let mut options = config.mqtt.options(&config.mqtt_client_id)?;
    options.set_clean_session(false);
    options.set_manual_acks(true);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let broker = format!("{}:{}", config.mqtt.mqtt_host, config.mqtt.mqtt_port);
    let handshake = async {
        let mut present = None;
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Packet::ConnAck(ack)) => {
                    present = Some(ack.session_present);
                    let filters = config
                        .mqtt_topics
                        .0
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), config.qos()));
                    client.try_subscribe_many(filters)?;
                }
                Event::Incoming(Packet::SubAck(ack)) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure));
                    anyhow::ensure!(
                        !refused,
                        "the broker refused the subscription to {:?} (check the bridge user's rights)",
                        config.mqtt_topics.0
                    );
                    return Ok(present.unwrap_or(false));
                }
                _ => {}
            }
        }
    };
    let present = tokio::time::timeout(within, handshake)
        .await
        .map_err(|_| {
            anyhow::anyhow!("no answer from the MQTT broker at {broker} within {within:?}")
        })?
        .map_err(|e: anyhow::Error| {
            e.context(format!(
                "opening the bridge's session on the MQTT broker at {broker}"
            ))
        })?;
    leave(&client, &mut eventloop).await;
    Ok(present)
}

/// Connects to the broker once, with a clean session that leaves nothing behind, and
/// disconnects. On nats-server this makes the MQTT streams of the account (they are made when
/// its first MQTT client connects), which the processor reads with `MQTT_INTAKE=nats`.
pub async fn wake(mqtt: &MqttConnection, within: Duration) -> anyhow::Result<()> {
    // Never a client id in use: a clean session would end that client's session.
    end_session(
        mqtt,
        &format!("dataviz-intake-{}", std::process::id()),
        within,
    )
    .await
}

/// Ends the broker's session of `client_id`, and what it keeps: connects once under that id
/// with a clean session, and disconnects.
pub async fn end_session(
    mqtt: &MqttConnection,
    client_id: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let mut options = mqtt.options(client_id)?;
    options.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    let broker = format!("{}:{}", mqtt.mqtt_host, mqtt.mqtt_port);
    let connected = async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                return Ok::<_, rumqttc::ConnectionError>(());
            }
        }
    };
    tokio::time::timeout(within, connected)
        .await
        .map_err(|_| {
            anyhow::anyhow!("no answer from the MQTT broker at {broker} within {within:?}")
        })?
        .with_context(|| format!("connecting to the MQTT broker at {broker}"))?;
    leave(&client, &mut eventloop).await;
    Ok(())
}

/// Disconnects, driving the event loop until the DISCONNECT is out (2 s at most).
async fn leave(client: &AsyncClient, eventloop: &mut rumqttc::EventLoop) {
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = event {
                break;
            }
        }
    })
    .await;
}

async fn event_loop(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    config: BridgeConfig,
    (tx, slots, bytes, budget): (
        mpsc::UnboundedSender<Received>,
        Arc<Semaphore>,
        Arc<Semaphore>,
        u32,
    ),
    connection: Arc<AtomicU64>,
    up: Arc<AtomicBool>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let qos = config.qos();
    let received_total = metrics::counter!(metric::BRIDGE_RECEIVED);
    let mut backoff = Backoff::default();
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                up.store(true, Ordering::Relaxed);
                let generation = connection.fetch_add(1, Ordering::SeqCst) + 1;
                tracing::info!(
                    target: MQTT_LOG_TARGET,
                    host = %config.mqtt.mqtt_host,
                    port = config.mqtt.mqtt_port,
                    client_id = %config.mqtt_client_id,
                    session_present = ack.session_present,
                    connection = generation,
                    "connected to the MQTT broker"
                );
                let filters = config
                    .mqtt_topics
                    .0
                    .iter()
                    .map(|t| rumqttc::SubscribeFilter::new(t.clone(), qos));
                if let Err(e) = client.try_subscribe_many(filters) {
                    tracing::error!(target: MQTT_LOG_TARGET, error = %e, "could not subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                tracing::info!(target: MQTT_LOG_TARGET, topics = ?config.mqtt_topics.0, codes = ?ack.return_codes, "subscribed");
            }
            Ok(Event::Incoming(Packet::Publish(mut publish))) => {
                if publish.retain {
                    tracing::debug!(target: MQTT_LOG_TARGET, topic = %publish.topic, "retained message skipped");
                    let _ = client.try_ack(&publish);
                    continue;
                }
                tracing::debug!(
                    target: MQTT_LOG_TARGET,
                    topic = %publish.topic,
                    bytes = publish.payload.len(),
                    pkid = publish.pkid,
                    dup = publish.dup,
                    "message received"
                );
                received_total.increment(1);
                // Waits while the messages in flight hold every slot or the byte budget: the
                // broker queues meanwhile.
                let share = budget_of(publish.payload.len(), budget);
                let permits = async {
                    let slot = slots.clone().acquire_owned().await;
                    let budget = bytes.clone().acquire_many_owned(share).await;
                    (slot, budget)
                };
                let (slot, permit) = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    (slot, budget) = permits => (
                        slot.expect("the slots are never closed"),
                        budget.expect("the budget is never closed"),
                    ),
                };
                // The topic and payload move to the raw message; the packet keeps what its ack
                // needs. The payload is a slice of the connection's read buffer, which it would
                // keep whole while the message is held: tens of MB of buffers under a flood
                // (BENCHMARKS.md, "What changed"), and more than `BRIDGE_MAX_IN_FLIGHT_BYTES`
                // counts. A copy of its own frees the buffer.
                let payload = Bytes::copy_from_slice(&std::mem::take(&mut publish.payload));
                let raw = RawMessage::received(std::mem::take(&mut publish.topic), payload);
                let received = Received {
                    publish,
                    connection: connection.load(Ordering::SeqCst),
                    raw,
                    _slot: slot,
                    _budget: permit,
                };
                if tx.send(received).is_err() {
                    anyhow::bail!("the store task ended");
                }
            }
            Ok(_) => {}
            Err(e) => {
                up.store(false, Ordering::Relaxed);
                let wait = backoff.next_delay();
                tracing::warn!(
                    target: MQTT_LOG_TARGET,
                    error = %e,
                    retry_in = ?wait,
                    "MQTT connection lost"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    drop(tx);
    // Keep the connection served while the store task finishes, so that its acks go out.
    let drain = async {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = event {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
    Ok(())
}

/// Where and how the bridge stores messages.
struct RawStore {
    js: jetstream::Context,
    /// Part of every deduplication id: packet ids are per MQTT session.
    client_id: String,
    /// The NATS server's largest message.
    max_payload: usize,
    /// The current MQTT connection ([`Received::connection`]).
    connection: Arc<AtomicU64>,
    shutdown: Shutdown,
}

/// Stores what the event loop hands over, many messages in flight, and acks each on MQTT once
/// JetStream has it.
async fn store_loop(
    mut rx: mpsc::UnboundedReceiver<Received>,
    raw_store: RawStore,
    client: AsyncClient,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    // Acks go out in order from one task of their own: the store loop never waits on the MQTT
    // request queue, which the event loop drains only between the packets it reads. (A task per
    // ack once the queue was full made each blocked send scan all the others: quadratic.)
    let (acks, mut to_ack) = mpsc::unbounded_channel::<Publish>();
    let acker = tokio::spawn(async move {
        while let Some(publish) = to_ack.recv().await {
            if client.ack(&publish).await.is_err() {
                break; // the event loop is gone: the broker sends these again
            }
        }
    });
    let stored_total = metrics::counter!(metric::BRIDGE_STORED);
    // A message in flight is, most of the time, in one of the first two sets, whose futures
    // hold little besides the message: sent to RAW (a step that waits only while the NATS
    // client's queue or its acknowledgements in flight are full), then waiting for RAW's
    // acknowledgement. Whatever else the first answer asks for (a failure, a duplicate to
    // look at, an oversized payload) goes on in `RawStore::store`, boxed: its state takes
    // kilobytes, and thousands of them polled one after another were mostly cache misses.
    let mut sending = FuturesUnordered::new();
    let mut acking = FuturesUnordered::new();
    let mut storing = FuturesUnordered::new();
    let mut open = true;
    loop {
        let in_flight = sending.len() + acking.len() + storing.len();
        if !open && in_flight == 0 {
            break;
        }
        progress.set_waiting(in_flight as u64);
        let stored = tokio::select! {
            received = rx.recv(), if open => {
                match received {
                    Some(received) if dataviz_core::dead::fits(&received.raw, raw_store.max_payload) => {
                        sending.push(raw_store.send(received));
                    }
                    Some(received) => storing.push(Box::pin(raw_store.store(received, None))),
                    None => open = false,
                }
                continue;
            }
            Some((received, sent)) = sending.next() => {
                match sent {
                    Ok(ack) => acking.push(acknowledged(received, ack)),
                    Err(e) => storing.push(Box::pin(raw_store.store(received, Some(Err(e))))),
                }
                continue;
            }
            Some((received, acked)) = acking.next() => match acked {
                Ok(ack) if !ack.duplicate => received,
                acked => {
                    storing.push(Box::pin(raw_store.store(received, Some(acked))));
                    continue;
                }
            },
            // Not stored: shutting down while JetStream was unreachable. Unacked, the message
            // comes back from the broker with the next session.
            Some(stored) = storing.next() => match stored {
                Some(received) => received,
                None => continue,
            },
        };
        stored_total.increment(1);
        progress.advanced();
        if stored.publish.qos != QoS::AtMostOnce {
            if stored.connection == raw_store.connection.load(Ordering::SeqCst) {
                // Acks can queue here by the thousand, each a packet id and flags: the MQTT
                // client sends one between reads of up to ten incoming packets, and the
                // broker's window of unacknowledged messages (`max_ack_pending`,
                // `max_inflight_messages`) is what bounds them.
                let _ = acks.send(stored.publish);
            } else {
                tracing::debug!(target: MQTT_LOG_TARGET, pkid = stored.publish.pkid, "stored a message of an earlier connection; the broker sends it again");
            }
        }
    }
    drop(acks);
    let _ = acker.await;
    Ok(())
}

/// Waits for RAW's answer to a message sent ([`RawStore::send`]).
async fn acknowledged(
    received: Received,
    ack: PublishAckFuture,
) -> (Received, Result<PublishAck, PublishError>) {
    let acked = ack.await;
    (received, acked)
}

impl RawStore {
    /// The deduplication id a message is stored under; none for QoS 0.
    fn dedup_id(&self, received: &Received) -> Option<String> {
        let (publish, raw) = (&received.publish, &received.raw);
        (publish.qos != QoS::AtMostOnce).then(|| {
            let hash =
                xxhash_rust::xxh3::xxh3_64_with_seed(raw.payload.as_ref(), topic_seed(&raw.topic));
            // Written into a string of its final size: `format!` starts this one empty and
            // reallocates as it writes.
            let mut id = String::with_capacity(self.client_id.len() + 24);
            id.push_str(&self.client_id);
            let _ = write!(id, ":{}:{hash:016x}", publish.pkid);
            id
        })
    }

    /// Sends a message that fits in RAW: the first attempt [`RawStore::store`] would make.
    async fn send(&self, received: Received) -> (Received, Result<PublishAckFuture, PublishError>) {
        let raw = &received.raw;
        let headers = raw.headers(self.dedup_id(&received).as_deref());
        let sent = (self.js)
            .publish_with_headers(raw.subject(), headers, raw.payload.clone())
            .await;
        (received, sent)
    }

    /// Stores one message in RAW (or DEAD when it can never fit), retrying until JetStream has
    /// it, and gives it back; `None` when shutting down first. `first` is RAW's answer to a
    /// first attempt already made ([`RawStore::send`]), taken as this one's would be.
    async fn store(
        &self,
        received: Received,
        mut first: Option<Result<PublishAck, PublishError>>,
    ) -> Option<Received> {
        let (js, max_payload, shutdown) = (&self.js, self.max_payload, &self.shutdown);
        let dedup_id = self.dedup_id(&received);
        let mut backoff = Backoff::default();
        let mut salted = None::<String>;
        // A failed attempt may have been stored all the same (its ack lost with the connection):
        // the next one is then a duplicate of our own.
        let mut attempted = false;
        let dead = dataviz_core::dead::unfit(&received.raw, STAGE, max_payload);
        let mut whole_kept = dead.as_ref().is_none_or(|dead| dead.whole_size.is_none());
        loop {
            if let Some(letter) = dead.as_ref().filter(|_| !whole_kept) {
                // Boxed, as `stored_before` below: rare paths, whose state would otherwise
                // make every message's future in flight as large as theirs.
                match Box::pin(dataviz_core::dead::keep_whole(
                    js,
                    letter,
                    &received.raw.payload,
                ))
                .await
                {
                    Ok(()) => whole_kept = true,
                    Err(e) => {
                        let wait = backoff.next_delay();
                        tracing::warn!(error = format!("{e:#}"), retry_in = ?wait, "keeping an oversized payload failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return None,
                            _ = tokio::time::sleep(wait) => continue,
                        }
                    }
                }
            }
            let acked = match first.take() {
                Some(acked) => acked,
                None => {
                    let id = salted.as_deref().or(dedup_id.as_deref());
                    let (subject, headers, payload) = match &dead {
                        Some(dead) => (dead.subject(), dead.headers(), dead.raw.payload.clone()),
                        None => (
                            received.raw.subject(),
                            received.raw.headers(id),
                            received.raw.payload.clone(),
                        ),
                    };
                    streams::publish_stored(js, subject, headers, payload).await
                }
            };
            match acked {
                Ok(ack)
                    if ack.duplicate
                        && salted.is_none()
                        && dedup_id.is_some()
                        && !Box::pin(self.stored_before(&received, attempted, ack.sequence))
                            .await =>
                {
                    // Not this message's own copy: a first delivery (another message reused the
                    // packet id with the same content inside the duplicate window), or a copy
                    // whose content differs from the stored one (a hash collision), or one RAW
                    // cannot show. Store it under its own id: a copy too many is caught
                    // downstream when it has `ts`, a lost message never.
                    salted = Some(format!(
                        "{}:{}",
                        dedup_id.as_deref().unwrap_or_default(),
                        received.raw.id
                    ));
                }
                Ok(_) => {
                    if let Some(dead) = &dead {
                        dead.stored();
                    }
                    return Some(received);
                }
                Err(e) => {
                    attempted = true;
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "storing a message in RAW failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Whether what RAW holds at `seq`, under this message's deduplication id, is this message
    /// already: the copy of an earlier attempt of ours (`attempted`; the same raw id), or the
    /// same MQTT message received twice (the same topic and payload) when one of the two is a
    /// redelivery: this one has the DUP flag, or it came on an earlier connection, whose
    /// redelivery on the current one may have been stored first, or RAW's copy was received
    /// after this one (the broker sent it again while this one waited; it cannot have given
    /// the packet id to another message before our PUBACK).
    async fn stored_before(&self, received: &Received, attempted: bool, seq: u64) -> bool {
        let Some(held) = self.held(seq).await else {
            return false;
        };
        let raw = &received.raw;
        let redelivered = received.publish.dup
            || received.connection != self.connection.load(Ordering::SeqCst)
            || held.received_at > raw.received_at;
        (attempted && held.id == raw.id)
            || (redelivered && held.topic == raw.topic && held.payload == raw.payload)
    }

    /// The raw message RAW holds at `seq`, if it can be read.
    async fn held(&self, seq: u64) -> Option<RawMessage> {
        let stored = match self.js.get_stream_no_info(streams::RAW_STREAM).await {
            Ok(stream) => stream.get_raw_message(seq).await,
            Err(e) => {
                tracing::warn!(error = %e, seq, "could not read RAW to check a duplicate; storing the message again");
                return None;
            }
        };
        match stored {
            Ok(stored) => RawMessage::from_parts(Some(&stored.headers), stored.payload).ok(),
            Err(e) => {
                tracing::warn!(error = %e, seq, "could not read RAW to check a duplicate; storing the message again");
                None
            }
        }
    }
}

fn topic_seed(topic: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(topic.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn messages_in_raw(js: &jetstream::Context) -> u64 {
        let mut raw = js.get_stream(streams::RAW_STREAM).await.unwrap();
        raw.info().await.unwrap().state.messages
    }

    /// RAW's first answer, when it is not "stored", is carried on by the whole store as its own
    /// first attempt's would be, against a real nats-server: a duplicate that is this message
    /// sent again, a duplicate that is another message reusing the packet id with the same
    /// content, and a failure whose message JetStream stored all the same (its ack lost).
    #[tokio::test]
    async fn a_first_answer_other_than_stored_is_carried_on_by_the_whole_store() {
        let nats = dataviz_testkit::NatsServer::start();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = dataviz_core::config::jetstream(client.clone());
        streams::ensure(&client, &js, &streams::StreamSettings::default())
            .await
            .unwrap();
        let store = RawStore {
            js: js.clone(),
            client_id: "dataviz-bridge".into(),
            max_payload: client.server_info().max_payload,
            connection: Arc::new(AtomicU64::new(1)),
            shutdown: Shutdown::new(),
        };
        let permits = Arc::new(Semaphore::new(64));
        let received = |payload: &'static [u8], dup: bool| {
            let mut publish = Publish::new("gateways/1/d", QoS::AtLeastOnce, "");
            (publish.pkid, publish.dup) = (7, dup);
            Received {
                raw: RawMessage::received("gateways/1/d".into(), Bytes::from_static(payload)),
                publish,
                connection: 1,
                _slot: permits.clone().try_acquire_owned().unwrap(),
                _budget: permits.clone().try_acquire_owned().unwrap(),
            }
        };
        let first_answer = |received: Received| async {
            let (received, sent) = store.send(received).await;
            acknowledged(received, sent.unwrap()).await
        };

        let (_, acked) = first_answer(received(b"one", false)).await;
        assert!(
            !acked.unwrap().duplicate,
            "a first delivery is stored at once"
        );

        // The broker sends it again (DUP): RAW holds this message already.
        let (again, acked) = first_answer(received(b"one", true)).await;
        assert!(acked.as_ref().unwrap().duplicate);
        assert!(store.store(again, Some(acked)).await.is_some());
        assert_eq!(
            messages_in_raw(&js).await,
            1,
            "a redelivery is not stored twice"
        );

        // Another message reusing the packet id with the same content, once the first was
        // acknowledged (no DUP, the same connection, received later): stored under its own id.
        let (other, acked) = first_answer(received(b"one", false)).await;
        assert!(acked.as_ref().unwrap().duplicate);
        assert!(store.store(other, Some(acked)).await.is_some());
        assert_eq!(messages_in_raw(&js).await, 2, "another message is not lost");

        // Stored, but the bridge was told the attempt failed: the next attempt meets its own
        // copy (the same raw id) and takes it as stored.
        let (lost, acked) = first_answer(received(b"two", false)).await;
        assert!(!acked.unwrap().duplicate);
        let failed = PublishError::new(jetstream::context::PublishErrorKind::TimedOut);
        assert!(store.store(lost, Some(Err(failed))).await.is_some());
        assert_eq!(
            messages_in_raw(&js).await,
            3,
            "an attempt whose answer was lost is not stored twice"
        );
    }

    /// Every message in flight holds one such future (`BRIDGE_MAX_IN_FLIGHT`, 4,096 by
    /// default): nearly always the one that waits for RAW's acknowledgement, and the whole
    /// store's only after a failure or a duplicate. With the rare paths inline, the store's took
    /// several KiB each, 27 MB in all under load.
    #[tokio::test]
    async fn a_message_in_flight_costs_little_memory() {
        // Never connects: the futures are only made, not run.
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .unwrap();
        let js = jetstream::new(client);
        let store = RawStore {
            js: js.clone(),
            client_id: "dataviz-bridge".into(),
            max_payload: 1 << 20,
            connection: Arc::new(AtomicU64::new(1)),
            shutdown: Shutdown::new(),
        };
        let (slots, budget) = (Arc::new(Semaphore::new(2)), Arc::new(Semaphore::new(2)));
        let received = || Received {
            raw: RawMessage::received("gateways/1/d".into(), Bytes::from_static(b"{}")),
            publish: Publish::new("", QoS::AtLeastOnce, ""),
            connection: 1,
            _slot: slots.clone().try_acquire_owned().unwrap(),
            _budget: budget.clone().try_acquire_owned().unwrap(),
        };
        // The client queues the message until it connects, which it never does.
        let ack = js.publish("gateways.1.d", Bytes::new()).await.unwrap();
        let waiting = acknowledged(received(), ack);
        let size = std::mem::size_of_val(&waiting);
        assert!(
            size < 512,
            "a message waiting for its acknowledgement takes {size} bytes"
        );
        drop(waiting);
        // Past a first answer other than stored (JetStream away: then every message in flight).
        let future = store.store(received(), None);
        let size = std::mem::size_of_val(&future);
        assert!(
            size < 3072,
            "a message's whole store in flight takes {size} bytes"
        );
    }
}
