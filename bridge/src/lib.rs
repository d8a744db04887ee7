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
//! # Packs
//! When messages queue (a flood, a backlog after an outage), the bridge stores up to
//! [`PACK_MEMBERS`] of them as one RAW message, a pack ([`dataviz_core::pack`]): JetStream's
//! cost is per message. A pack's `Nats-Msg-Id` is its own (its first member's raw id), so that
//! a retry of the same pack is deduplicated; a redelivery of one of its members is recognised
//! by the bridge itself ([`recent`]), from the packet id and content of what it took last
//! under that packet id, read back from RAW's packs when it starts. A redelivery the bridge
//! does not know is stored alone, and JetStream's deduplication of messages stored alone
//! applies as above.
//!
//! Retained messages delivered on subscribe are old values the bridge saw live (its session
//! persists while it is away); they are acknowledged and skipped.
//!
//! # Layout
//! - [`config`]: `MQTT_*` settings.
//! - [`recent`]: the packet ids and content of the messages taken last, to recognise
//!   redeliveries.
//! - [`run`]: the event loop task (reads MQTT, never blocks on JetStream) and the store task
//!   (publishes to RAW with acks in flight, then acks MQTT).

pub mod config;
pub mod recent;

use anyhow::Context as _;
use async_nats::jetstream::{
    self,
    context::{PublishAckFuture, PublishError},
    publish::PublishAck,
};
use bytes::Bytes;
use config::{BridgeConfig, MqttConnection};
use dataviz_core::message::{HEADER_MSG_ID, RawMessage};
use dataviz_core::ops::{Progress, metric};
use dataviz_core::retry::Backoff;
use dataviz_core::{MQTT_LOG_TARGET, pack, shutdown::Shutdown, streams};
use futures::{StreamExt, stream::FuturesUnordered};
use recent::{Admit, Recent};
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

const STAGE: &str = "bridge";

/// The most messages a pack takes: past a few dozen, JetStream's cost per member hardly falls
/// (BENCHMARKS.md, "Packing in the pipeline") while a pack to retry grows.
pub const PACK_MEMBERS: usize = 50;

/// The bytes of a pack's members, at most: what the NATS server takes less its headers (its
/// own, and two keys per member, [`recent::HEADER_KEYS`]).
fn pack_capacity(max_payload: usize, client_id: &str) -> usize {
    max_payload.saturating_sub(1024 + client_id.len() + PACK_MEMBERS * 24)
}

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
    let Some(recent) = read_back(&js, &config.mqtt_client_id, &shutdown).await else {
        return Ok(());
    };

    let raw_store = RawStore {
        js,
        client_id: config.mqtt_client_id.clone(),
        max_payload,
        connection: connection.clone(),
        shutdown: shutdown.clone(),
    };
    // Acks go out in order from one task of their own: the store loop never waits on the MQTT
    // request queue, which the event loop drains only between the packets it reads. (A task per
    // ack once the queue was full made each blocked send scan all the others: quadratic.)
    let (acks, mut to_ack) = mpsc::unbounded_channel::<Publish>();
    let acking = client.clone();
    let acker = tokio::spawn(async move {
        while let Some(publish) = to_ack.recv().await {
            if acking.ack(&publish).await.is_err() {
                break; // the event loop is gone: the broker sends these again
            }
        }
    });
    let store = tokio::spawn(async move {
        let stored = store_loop(rx, raw_store, recent, acks, progress).await;
        let _ = acker.await;
        stored
    });
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

/// What this bridge stored in packs lately ([`Recent::read_back`]), read again until RAW
/// answers; `None` when shutting down first. Read before the bridge takes a message: a
/// redelivery of a member would otherwise be stored again.
async fn read_back(
    js: &jetstream::Context,
    client_id: &str,
    shutdown: &Shutdown,
) -> Option<Recent> {
    let mut backoff = Backoff::default();
    loop {
        match Recent::read_back(js, client_id).await {
            Ok(recent) => {
                tracing::info!(
                    packet_ids = recent.len(),
                    "read back the packet ids of the messages this bridge stored in packs lately"
                );
                return Some(recent);
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = format!("{e:#}"), retry_in = ?wait, "reading RAW's packs back failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
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
/// JetStream has it (through `acks`): alone, or packed with those queued behind it
/// ([`PACK_MEMBERS`]). A redelivery of a message RAW has or is being given ([`Recent`]) is
/// acked without storing.
async fn store_loop(
    mut rx: mpsc::UnboundedReceiver<Received>,
    raw_store: RawStore,
    mut recent: Recent,
    acks: mpsc::UnboundedSender<Publish>,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    let stored_total = metrics::counter!(metric::BRIDGE_STORED);
    let capacity = pack_capacity(raw_store.max_payload, &raw_store.client_id);
    // A message stored alone is, most of the time, in one of the first two sets, whose futures
    // hold little besides the message: sent to RAW (a step that waits only while the NATS
    // client's queue or its acknowledgements in flight are full), then waiting for RAW's
    // acknowledgement. Whatever else the first answer asks for (a failure, a duplicate to
    // look at, an oversized payload) goes on in `RawStore::store`, boxed: its state takes
    // kilobytes, and thousands of them polled one after another were mostly cache misses.
    let mut sending = FuturesUnordered::new();
    let mut acking = FuturesUnordered::new();
    let mut storing = FuturesUnordered::new();
    // Packs, each stored whole by one future ([`RawStore::store_pack`]), and their members.
    let mut packs = FuturesUnordered::new();
    let mut packed = 0;
    // Redeliveries waiting for the copy of their message on its way to RAW, by its raw id.
    let mut waiting: HashMap<uuid::Uuid, Vec<Received>> = HashMap::new();
    let mut open = true;
    loop {
        let in_flight = sending.len() + acking.len() + storing.len() + packed;
        // Redeliveries left waiting once nothing is in flight are those of copies not stored
        // (shutting down): unacked, the broker sends them again.
        if !open && in_flight == 0 {
            break;
        }
        progress.set_waiting((in_flight + waiting.values().map(Vec::len).sum::<usize>()) as u64);
        let stored: Vec<Received> = tokio::select! {
            received = rx.recv(), if open => {
                let Some(first) = received else {
                    open = false;
                    continue;
                };
                // What queued behind it, up to a pack.
                let mut taken = vec![first];
                while taken.len() < PACK_MEMBERS
                    && let Ok(more) = rx.try_recv()
                {
                    taken.push(more);
                }
                let mut known = Vec::new();
                let mut groups: Vec<Vec<Received>> = vec![Vec::new()];
                let mut group_bytes = 0;
                for received in taken {
                    let pkid = (received.publish.qos != QoS::AtMostOnce)
                        .then_some(received.publish.pkid);
                    if let Some(pkid) = pkid {
                        match recent.admit(pkid, received.publish.dup, &received.raw) {
                            Admit::Stored => {
                                known.push(received);
                                continue;
                            }
                            Admit::Waits(id) => {
                                waiting.entry(id).or_default().push(received);
                                continue;
                            }
                            Admit::Store => recent.sending(pkid, &received.raw),
                        }
                    }
                    let fits = dataviz_core::dead::fits(&received.raw, raw_store.max_payload);
                    let len = pack::member_len(&received.raw);
                    // A redelivery the bridge does not know goes alone, where JetStream's
                    // deduplication finds a copy stored alone.
                    if !fits || received.publish.dup || len > capacity {
                        if fits {
                            sending.push(raw_store.send(received));
                        } else {
                            storing.push(Box::pin(raw_store.store(received, None)));
                        }
                        continue;
                    }
                    if group_bytes + len > capacity {
                        groups.push(Vec::new());
                        group_bytes = 0;
                    }
                    group_bytes += len;
                    groups.last_mut().expect("never empty").push(received);
                }
                for mut group in groups {
                    match group.len() {
                        0 => {}
                        1 => sending.push(raw_store.send(group.pop().expect("one"))),
                        n => {
                            packed += n;
                            packs.push(Box::pin(raw_store.store_pack(group)));
                        }
                    }
                }
                if known.is_empty() {
                    continue;
                }
                known
            }
            Some((received, sent)) = sending.next() => {
                match sent {
                    Ok(ack) => acking.push(acknowledged(received, ack)),
                    Err(e) => storing.push(Box::pin(raw_store.store(received, Some(Err(e))))),
                }
                continue;
            }
            Some((received, acked)) = acking.next() => match acked {
                Ok(ack) if !ack.duplicate => vec![received],
                acked => {
                    storing.push(Box::pin(raw_store.store(received, Some(acked))));
                    continue;
                }
            },
            // Not stored: shutting down while JetStream was unreachable. Unacked, the message
            // comes back from the broker with the next session.
            Some(stored) = storing.next() => match stored {
                Some(received) => vec![received],
                None => continue,
            },
            Some((members, stored)) = packs.next() => {
                packed -= members.len();
                if !stored {
                    continue;
                }
                members
            }
        };
        let waiters = stored
            .iter()
            .filter_map(|received| waiting.remove(&received.raw.id))
            .flatten()
            .collect::<Vec<_>>();
        for stored in stored.into_iter().chain(waiters) {
            stored_total.increment(1);
            progress.advanced();
            if stored.publish.qos == QoS::AtMostOnce {
                continue;
            }
            recent.stored(stored.publish.pkid, &stored.raw);
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
            let hash = recent::content_hash(raw);
            // Written into a string of its final size: `format!` starts this one empty and
            // reallocates as it writes.
            let mut id = String::with_capacity(self.client_id.len() + 24);
            id.push_str(&self.client_id);
            let _ = write!(id, ":{}:{hash:016x}", publish.pkid);
            id
        })
    }

    /// Stores `members` in RAW as one pack, retrying until JetStream has it; gives them back,
    /// and whether it did (not when shutting down first). Every attempt is the same message
    /// under the same id: JetStream takes a retry whose first attempt reached it as a
    /// duplicate, stored.
    async fn store_pack(&self, members: Vec<Received>) -> (Vec<Received>, bool) {
        let payload = pack::encode(members.iter().map(|m| &m.raw));
        let mut headers = pack::headers();
        let id = format!("{}:pack:{}", self.client_id, members[0].raw.id);
        headers.insert(HEADER_MSG_ID, id);
        let keys = members.iter().map(|m| {
            let pkid = (m.publish.qos != QoS::AtMostOnce).then_some(m.publish.pkid);
            (pkid, &m.raw)
        });
        Recent::pack_headers(&mut headers, &self.client_id, keys);
        let mut backoff = Backoff::default();
        loop {
            let subject = streams::RAW_PACK_SUBJECT.to_owned();
            match streams::publish_stored(&self.js, subject, headers.clone(), payload.clone()).await
            {
                Ok(_) => return (members, true),
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, members = members.len(), retry_in = ?wait, "storing a pack in RAW failed; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return (members, false),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A nats-server of its own, a client, and the streams made.
    async fn with_streams() -> (
        dataviz_testkit::NatsServer,
        async_nats::Client,
        jetstream::Context,
    ) {
        let nats = dataviz_testkit::NatsServer::start();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = dataviz_core::config::jetstream(client.clone());
        streams::ensure(&client, &js, &streams::StreamSettings::default())
            .await
            .unwrap();
        (nats, client, js)
    }

    /// The store of the bridge `dataviz-bridge`, on its first MQTT connection.
    fn test_store(js: &jetstream::Context, max_payload: usize) -> RawStore {
        RawStore {
            js: js.clone(),
            client_id: "dataviz-bridge".into(),
            max_payload,
            connection: Arc::new(AtomicU64::new(1)),
            shutdown: Shutdown::new(),
        }
    }

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
        let (_nats, client, js) = with_streams().await;
        let store = test_store(&js, client.server_info().max_payload);
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

    /// Runs the store loop on a real nats-server, as the bridge `dataviz-bridge` would: what
    /// is sent on the first channel is what the event loop hands over, what comes out of the
    /// second is acked on MQTT.
    struct Harness {
        tx: mpsc::UnboundedSender<Received>,
        acks: mpsc::UnboundedReceiver<Publish>,
        permits: Arc<Semaphore>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl Harness {
        /// Starts the loop once `queued` are queued: those queued together go as packs.
        fn start(js: &jetstream::Context, recent: Recent, queued: &[(u16, bool, &str)]) -> Harness {
            let store = test_store(js, 1 << 20);
            let (tx, rx) = mpsc::unbounded_channel();
            let (acks_tx, acks) = mpsc::unbounded_channel();
            let permits = Arc::new(Semaphore::new(10_000));
            for &(pkid, dup, payload) in queued {
                tx.send(Self::received(&permits, pkid, dup, payload))
                    .unwrap();
            }
            let progress = Arc::new(Progress::new(STAGE));
            let task = tokio::spawn(store_loop(rx, store, recent, acks_tx, progress));
            Harness {
                tx,
                acks,
                permits,
                task,
            }
        }

        fn received(permits: &Arc<Semaphore>, pkid: u16, dup: bool, payload: &str) -> Received {
            let mut publish = Publish::new("gateways/1/d", QoS::AtLeastOnce, "");
            (publish.pkid, publish.dup) = (pkid, dup);
            Received {
                raw: RawMessage::received("gateways/1/d".into(), Bytes::from(payload.to_owned())),
                publish,
                connection: 1,
                _slot: permits.clone().try_acquire_owned().unwrap(),
                _budget: permits.clone().try_acquire_owned().unwrap(),
            }
        }

        fn send(&self, pkid: u16, dup: bool, payload: &str) {
            let received = Self::received(&self.permits, pkid, dup, payload);
            self.tx.send(received).unwrap();
        }

        /// The packet ids of the next `n` acks, in order, waiting 10 s at most.
        async fn acked(&mut self, n: usize) -> Vec<u16> {
            let mut pkids = Vec::new();
            while pkids.len() < n {
                let next = tokio::time::timeout(Duration::from_secs(10), self.acks.recv());
                let publish = next
                    .await
                    .expect("acked within 10 s")
                    .expect("loop running");
                pkids.push(publish.pkid);
            }
            pkids.sort();
            pkids
        }

        async fn stop(self) {
            drop(self.tx);
            self.task.await.unwrap().unwrap();
        }
    }

    /// RAW's messages, and the raw messages they hold.
    async fn raw_and_members(js: &jetstream::Context) -> (u64, usize) {
        let stream = js.get_stream(streams::RAW_STREAM).await.unwrap();
        let messages = messages_in_raw(js).await;
        let mut members = 0;
        for seq in 1..=stream.get_info().await.unwrap().state.last_sequence {
            let Ok(stored) = stream.get_raw_message(seq).await else {
                continue;
            };
            members += match pack::decode(Some(&stored.headers), &stored.payload) {
                Ok(packed) => packed.len(),
                Err(_) => 1,
            };
        }
        (messages, members)
    }

    #[tokio::test]
    async fn queued_messages_go_as_one_pack_and_redeliveries_of_its_members_are_not_stored() {
        let (_nats, _client, js) = with_streams().await;
        let payloads: Vec<String> = (0..=10).map(|i| format!("{{\"n\": {i}}}")).collect();
        let queued: Vec<_> = (1..=10u16)
            .map(|pkid| (pkid, false, payloads[pkid as usize].as_str()))
            .collect();
        let mut bridge = Harness::start(&js, Recent::default(), &queued);
        assert_eq!(bridge.acked(10).await, (1..=10).collect::<Vec<_>>());
        assert_eq!(raw_and_members(&js).await, (1, 10), "one pack of ten");

        // The broker sends two of them again (DUP): acked, not stored.
        bridge.send(3, true, &payloads[3]);
        bridge.send(7, true, &payloads[7]);
        assert_eq!(bridge.acked(2).await, vec![3, 7]);
        // A new message under a packet id given back, with the same content: stored.
        bridge.send(3, false, &payloads[3]);
        assert_eq!(bridge.acked(1).await, vec![3]);
        assert_eq!(raw_and_members(&js).await, (2, 11));
        bridge.stop().await;

        // A bridge that starts again knows its packs from RAW: a redelivery of a member is not
        // stored; one of another content under that packet id is, alone.
        let recent = Recent::read_back(&js, "dataviz-bridge").await.unwrap();
        assert_eq!(recent.len(), 10);
        let mut bridge = Harness::start(&js, recent, &[(5, true, &payloads[5])]);
        assert_eq!(bridge.acked(1).await, vec![5]);
        assert_eq!(raw_and_members(&js).await, (2, 11));
        bridge.send(5, true, "another");
        assert_eq!(bridge.acked(1).await, vec![5]);
        assert_eq!(raw_and_members(&js).await, (3, 12));
        bridge.stop().await;
        let other = Recent::read_back(&js, "another-bridge").await.unwrap();
        assert!(other.is_empty(), "a bridge reads back its own packs only");
    }

    #[tokio::test]
    async fn a_redelivery_of_a_member_in_flight_is_acked_once_its_pack_is_stored() {
        let (nats, _client, js) = with_streams().await;
        nats.pause();
        let queued = [(1, false, "a"), (2, false, "b"), (3, false, "c")];
        let mut bridge = Harness::start(&js, Recent::default(), &queued);
        tokio::time::sleep(Duration::from_millis(300)).await;
        bridge.send(2, true, "b");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(bridge.acks.try_recv().is_err(), "acked before RAW had it");
        nats.resume();
        assert_eq!(bridge.acked(4).await, vec![1, 2, 2, 3]);
        assert_eq!(raw_and_members(&js).await, (1, 3), "the redelivery waited");
        bridge.stop().await;
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
        let store = test_store(&js, 1 << 20);
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
