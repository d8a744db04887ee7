//! Start-up of each role: read settings, connect, check the servers, serve health and
//! metrics, run until a signal.

use anyhow::Context as _;
use dataviz_app::{AppConfig, AppState, LiveConfig};
use dataviz_bridge::config::{BridgeConfig, MqttConnection};
use dataviz_core::{
    config::{DatabaseConfig, NatsConfig},
    db,
    ops::{Ops, OpsConfig},
    retention::{self, RetentionConfig},
    shutdown::{self, Shutdown},
    streams::{self, Intake, IntakeConsumer, IntakeRetired, StreamSettings},
};
use dataviz_mercure::{Hub, HubConfig, MercureKeysConfig, MercurePublisher, Transport, UpdateSink};
use dataviz_processor::ProcessorConfig;
use dataviz_publisher::PublisherConfig;
use dataviz_writer::WriterConfig;
use std::net::SocketAddr;

#[derive(Debug, clap::Args)]
pub struct AllArgs {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(flatten)]
    streams: StreamSettings,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    bridge: BridgeConfig,
    #[command(flatten)]
    processor: ProcessorConfig,
    #[command(flatten)]
    writer: WriterConfig,
    #[command(flatten)]
    retention: RetentionConfig,
    #[command(flatten)]
    hub: HubConfig,
    #[command(flatten)]
    publisher: PublisherConfig,
    #[command(flatten)]
    app: AppConfig,
    #[command(flatten)]
    ops: OpsConfig,
}

#[derive(Debug, clap::Args)]
pub struct PublisherArgs {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(flatten)]
    streams: StreamSettings,
    #[command(flatten)]
    publisher: PublisherConfig,
    #[command(flatten)]
    keys: MercureKeysConfig,
    #[command(flatten)]
    ops: OpsConfig,
}

#[derive(Debug, clap::Args)]
pub struct HubArgs {
    #[command(flatten)]
    hub: HubConfig,
    /// The NATS server of the `jetstream` transport (MERCURE_TRANSPORT).
    #[command(flatten)]
    nats: NatsConfig,
    /// Address the hub listens on (it serves /.well-known/mercure).
    #[arg(
        long,
        env = "MERCURE_ADDR",
        value_name = "MERCURE_ADDR",
        default_value = "127.0.0.1:3000"
    )]
    mercure_addr: SocketAddr,
    #[command(flatten)]
    ops: OpsConfig,
}

#[derive(Debug, clap::Args)]
pub struct BridgeArgs {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(flatten)]
    streams: StreamSettings,
    #[command(flatten)]
    bridge: BridgeConfig,
    #[command(flatten)]
    ops: OpsConfig,
}

#[derive(Debug, clap::Args)]
pub struct ProcessorArgs {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(flatten)]
    streams: StreamSettings,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    processor: ProcessorConfig,
    /// The broker, with `MQTT_INTAKE=nats`: nats-server's MQTT listener, woken once if its
    /// streams are not there yet.
    #[command(flatten)]
    mqtt: MqttConnection,
    #[command(flatten)]
    ops: OpsConfig,
}

#[derive(Debug, clap::Args)]
pub struct WriterArgs {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(flatten)]
    streams: StreamSettings,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    writer: WriterConfig,
    #[command(flatten)]
    retention: RetentionConfig,
    #[command(flatten)]
    ops: OpsConfig,
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub retention: RetentionConfig,
    /// The bridge's broker and session, which `migrate` makes sure of.
    #[command(flatten)]
    pub bridge: BridgeConfig,
    /// With `MQTT_INTAKE=nats`, the NATS server whose MQTT stream the processor reads.
    #[command(flatten)]
    pub nats: NatsConfig,
    #[command(flatten)]
    pub streams: StreamSettings,
    /// Do not make the bridge's MQTT session (the bridge makes it when it first connects; a
    /// broker that keeps messages only for existing sessions drops what comes before).
    #[arg(long)]
    pub no_mqtt_session: bool,
}

/// What every long-running role starts with: the shutdown signal and the health server.
struct Role {
    ops: Ops,
    shutdown: Shutdown,
}

impl Role {
    async fn start(config: &OpsConfig, default_port: u16) -> anyhow::Result<Role> {
        let shutdown = shutdown::on_signals(config.shutdown_timeout);
        let ops = Ops::new(config);
        if let Some(addr) = config.addr(default_port)? {
            ops.serve(addr, shutdown.clone()).await?;
        }
        Ok(Role { ops, shutdown })
    }

    /// Connects to NATS and refuses an old server; readiness then watches the connection.
    async fn nats(&self, nats: &NatsConfig, name: &str) -> anyhow::Result<async_nats::Client> {
        let client = nats.connect(name).await?;
        let info = client.server_info();
        tracing::info!(server = %info.server_name, version = %info.version, url = %nats.nats_url, "connected to NATS");
        streams::check_server_version(&info.version)?;
        self.ops.set_nats(client.clone());
        Ok(client)
    }

    /// Connects to NATS ([`Role::nats`]) and creates or checks the streams.
    async fn jetstream(
        &self,
        nats: &NatsConfig,
        settings: &StreamSettings,
        name: &str,
    ) -> anyhow::Result<(async_nats::Client, async_nats::jetstream::Context)> {
        let client = self.nats(nats, name).await?;
        let js = dataviz_core::config::jetstream(client.clone());
        streams::ensure(&client, &js, settings).await?;
        Ok((client, js))
    }

    /// A pool on a migrated database; says which flavour it is.
    async fn database(&self, config: &DatabaseConfig) -> anyhow::Result<deadpool_postgres::Pool> {
        let pool = config.pool()?;
        let client = pool.get().await.context("connecting to DATABASE_URL")?;
        db::check_migrated(&client).await?;
        tracing::info!("database: {}", db::describe(&client).await?);
        self.ops.set_db(pool.clone());
        Ok(pool)
    }

    /// A stage whose progress readiness watches, with its consumer's lag polled.
    fn watched_stage(
        &self,
        js: &async_nats::jetstream::Context,
        name: &str,
        stream: &'static str,
        consumer: &str,
    ) -> std::sync::Arc<dataviz_core::ops::Progress> {
        let progress = self.ops.stage(name);
        self.ops.watch_consumer(
            js.clone(),
            stream,
            consumer.to_owned(),
            progress.clone(),
            self.shutdown.clone(),
        );
        progress
    }

    fn bridge(
        &self,
        config: BridgeConfig,
        client: &async_nats::Client,
        js: async_nats::jetstream::Context,
    ) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let max_payload = client.server_info().max_payload;
        let progress = self.ops.stage("bridge");
        let mqtt = self.ops.link("mqtt");
        dataviz_bridge::run(
            config,
            js,
            max_payload,
            progress,
            mqtt,
            self.shutdown.clone(),
        )
    }

    fn processor(
        &self,
        config: ProcessorConfig,
        settings: &StreamSettings,
        js: async_nats::jetstream::Context,
        pool: deadpool_postgres::Pool,
    ) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let (stream, consumer) = match settings.mqtt_intake {
            Intake::Bridge => (streams::RAW_STREAM, streams::PROCESSOR_CONSUMER),
            Intake::Nats => (streams::MQTT_STREAM, streams::INTAKE_CONSUMER),
        };
        let progress = self.watched_stage(&js, "processor", stream, consumer);
        let (settings, shutdown) = (settings.clone(), self.shutdown.clone());
        async move { dataviz_processor::run(config, &settings, js, pool, progress, shutdown).await }
    }

    fn writer(
        &self,
        config: WriterConfig,
        retention: &RetentionConfig,
        settings: &StreamSettings,
        js: async_nats::jetstream::Context,
        pool: deadpool_postgres::Pool,
    ) -> impl Future<Output = anyhow::Result<()>> + use<> {
        tokio::spawn(retention::prune_loop(
            pool.clone(),
            js.clone(),
            retention.readings_retention,
            config.retention_check_every,
            self.shutdown.clone(),
        ));
        let progress = self.watched_stage(
            &js,
            "writer",
            streams::READINGS_STREAM,
            streams::WRITER_CONSUMER,
        );
        let (consumer, shutdown) = (settings.writer_consumer(), self.shutdown.clone());
        async move { dataviz_writer::run(config, consumer, js, pool, &progress, shutdown).await }
    }

    fn publisher(
        &self,
        config: PublisherConfig,
        settings: &StreamSettings,
        js: async_nats::jetstream::Context,
        client: UpdateSink,
    ) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let progress = self.watched_stage(
            &js,
            "publisher",
            streams::LIVE_STREAM,
            streams::PUBLISHER_CONSUMER,
        );
        let (consumer, shutdown) = (settings.publisher_consumer(), self.shutdown.clone());
        async move { dataviz_publisher::run(config, consumer, js, client, &progress, shutdown).await }
    }
}

/// The hub of a role: keys (generated for development when none is set), and on the
/// `jetstream` transport its stream on `js`, the history read back.
async fn start_hub(
    mut config: HubConfig,
    js: Option<async_nats::jetstream::Context>,
) -> anyhow::Result<(Hub, dataviz_mercure::MercureKeys)> {
    if config.keys.generate_development_keys() {
        tracing::warn!(
            "no MERCURE_PUBLISHER_JWT_KEY (or MERCURE_JWT_SECRET): the hub uses a random key made \
             at start, fine for development only; set the keys in production"
        );
    }
    let keys = config.keys.keys()?;
    let hub = match (config.mercure_transport, js) {
        (Transport::Local, _) => Hub::new(&config)?,
        (Transport::Jetstream, Some(js)) => Hub::with_jetstream(&config, js).await?,
        (Transport::Jetstream, None) => {
            anyhow::bail!("MERCURE_TRANSPORT=jetstream needs a NATS connection")
        }
    };
    tracing::info!(
        transport = ?config.mercure_transport,
        stream = config.mercure_stream,
        "Mercure hub ready"
    );
    Ok((hub, keys))
}

/// With `MQTT_INTAKE=nats`, makes sure the processor's consumer of nats-server's MQTT stream
/// exists, so that the stream keeps what devices publish from now on (it keeps a message only
/// for the consumers and sessions there when it arrives). nats-server makes that stream when
/// the first MQTT client of the account connects: if it is not there, this connects once.
///
/// `bridge`, the bridge's client id where it is known (`migrate`, `all`), hands over a session
/// the bridge left on nats-server (a change from `MQTT_INTAKE=bridge`): a consumer made now
/// starts after the last message the session took, so the processor takes what the bridge had
/// not, and the session, which would keep every later message for nobody, is ended. Refused
/// while a client holds that session (the bridge still runs). A consumer there already takes
/// over only an empty session; otherwise both stay, and the start's warning names the session.
async fn ensure_intake(
    js: &async_nats::jetstream::Context,
    settings: &StreamSettings,
    mqtt: &MqttConnection,
    bridge: Option<&str>,
) -> anyhow::Result<IntakeStart> {
    let left = match bridge {
        Some(client_id) => streams::mqtt_session(js, client_id)
            .await?
            .map(|session| (client_id, session)),
        None => None,
    };
    if let Some((client_id, session)) = left {
        anyhow::ensure!(
            !session.connected,
            "MQTT_INTAKE=nats, but the bridge's MQTT session (MQTT_CLIENT_ID {client_id}) is \
             held by a client: stop the bridge first; the processor then takes over from the \
             last message it took"
        );
    }
    let after = left.map(|(_, session)| session.taken_up_to);
    let mut made = match streams::ensure_intake(js, settings, after).await? {
        IntakeConsumer::Existed => Some(false),
        IntakeConsumer::Made => Some(true),
        IntakeConsumer::NoStream => None,
    };
    if made.is_none() {
        let broker = format!("{}:{}", mqtt.mqtt_host, mqtt.mqtt_port);
        dataviz_bridge::wake(mqtt, std::time::Duration::from_secs(15))
            .await
            .with_context(|| {
                format!(
                    "MQTT_INTAKE=nats: nats-server has no MQTT stream yet, and its MQTT listener \
                     at {broker} (MQTT_HOST, MQTT_PORT) did not answer to make it"
                )
            })?;
        for _ in 0..50 {
            if streams::ensure_intake(js, settings, None).await? != IntakeConsumer::NoStream {
                made = Some(true);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::ensure!(
            made.is_some(),
            "MQTT_INTAKE=nats: the MQTT broker at {broker} answered, but NATS has no stream {} \
             in this account: is that broker nats-server's MQTT listener, in the same account \
             as the NATS user of this role?",
            streams::MQTT_STREAM
        );
    }
    let made = made == Some(true);
    let mut handed_over = None;
    if let Some((client_id, session)) = left
        && (made || session.held == 0)
    {
        dataviz_bridge::end_session(mqtt, client_id, std::time::Duration::from_secs(15))
            .await
            .with_context(|| {
                format!("ending the bridge's MQTT session (MQTT_CLIENT_ID {client_id})")
            })?;
        tracing::info!(
            target: dataviz_core::MQTT_LOG_TARGET,
            client_id,
            after = session.taken_up_to,
            held = session.held,
            "the bridge's session ended: the processor takes over after the last message it took"
        );
        handed_over = Some(session);
    }
    Ok(IntakeStart { made, handed_over })
}

/// What [`ensure_intake`] did.
struct IntakeStart {
    /// The processor's consumer was made now (else it was there).
    made: bool,
    /// The bridge's session it took over, ended.
    handed_over: Option<streams::MqttSession>,
}

/// Warns of the consumers of nats-server's MQTT stream that make it keep messages nobody may
/// read ([`streams::mqtt_stream_holders`]): what a change of `MQTT_INTAKE` leaves behind.
async fn warn_of_stream_holders(js: &async_nats::jetstream::Context, settings: &StreamSettings) {
    match streams::mqtt_stream_holders(js, settings).await {
        Ok(holders) => {
            for (consumer, held) in holders {
                tracing::warn!(
                    stream = streams::MQTT_STREAM,
                    consumer,
                    held,
                    "nats-server keeps these messages until this consumer takes them; with \
                     MQTT_INTAKE={} nothing of Dataviz reads it: once it is drained, remove it \
                     (README, \"MQTT intake\")",
                    settings.mqtt_intake.name()
                );
            }
        }
        Err(e) => tracing::debug!(
            error = format!("{e:#}"),
            "MQTT stream's consumers not listed"
        ),
    }
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    args.streams.check()?;
    let mut client = db::connect(&args.database.database_url).await?;
    let report = db::migrate(&mut client).await?;
    let retention = retention::apply_retention(&client, &args.retention).await?;
    let described = format!("{}; {retention}", db::describe(&client).await?);
    if report.applied.is_empty() {
        println!(
            "Database up to date ({} migrations). {described}.",
            report.already
        );
    } else {
        println!(
            "Applied {} migration(s): {}. {described}.",
            report.applied.len(),
            report.applied.join(", ")
        );
    }
    if args.streams.mqtt_intake == Intake::Nats {
        let client = args.nats.connect("migrate").await?;
        streams::check_server_version(&client.server_info().version)?;
        let js = dataviz_core::config::jetstream(client.clone());
        let start = ensure_intake(
            &js,
            &args.streams,
            &args.bridge.mqtt,
            Some(&args.bridge.mqtt_client_id),
        )
        .await?;
        client.flush().await.ok();
        println!(
            "MQTT: nats-server's stream {} read by the processor (consumer {}, {}): it keeps \
             what devices publish from now on, for {} (RAW_RETENTION, the replay window).",
            streams::MQTT_STREAM,
            streams::INTAKE_CONSUMER,
            if start.made { "made" } else { "exists" },
            humantime::format_duration(args.streams.raw_retention),
        );
        if let Some(session) = start.handed_over {
            println!(
                "MQTT: the bridge's session ({}) ended; the processor takes the {} message(s) \
                 it held, from sequence {}.",
                args.bridge.mqtt_client_id,
                session.held,
                session.taken_up_to + 1
            );
        }
        return Ok(());
    }
    if args.no_mqtt_session {
        return Ok(());
    }
    let broker = format!(
        "{}:{}",
        args.bridge.mqtt.mqtt_host, args.bridge.mqtt.mqtt_port
    );
    let present = dataviz_bridge::open_session(&args.bridge, std::time::Duration::from_secs(15))
        .await
        .with_context(|| {
            format!(
                "making the bridge's MQTT session on {broker}, so that the broker keeps what \
                 devices publish before the bridge runs (start the broker, or pass \
                 --no-mqtt-session)"
            )
        })?;
    println!(
        "MQTT: the bridge's session ({}) on {broker} {}, subscribed to {}.",
        args.bridge.mqtt_client_id,
        if present { "exists" } else { "made" },
        args.bridge.mqtt_topics.0.join(", ")
    );
    retire_intake(&args.nats).await;
    Ok(())
}

/// With `MQTT_INTAKE=bridge` and the bridge's session there: removes the processor's consumer
/// an earlier `MQTT_INTAKE=nats` left on nats-server's MQTT stream, once it is drained
/// ([`streams::retire_intake`]), and says what it did. NATS out of reach is no failure here
/// (the broker may be any other): the roles warn of a leftover at start.
async fn retire_intake(nats: &dataviz_core::config::NatsConfig) {
    let connect = tokio::time::timeout(std::time::Duration::from_secs(10), nats.connect("migrate"));
    let Ok(Ok(client)) = connect.await else {
        println!(
            "MQTT: NATS not reached within 10 s: a consumer {} left on nats-server's MQTT \
             stream by MQTT_INTAKE=nats is not checked.",
            streams::INTAKE_CONSUMER
        );
        return;
    };
    let js = dataviz_core::config::jetstream(client.clone());
    match streams::retire_intake(&js).await {
        Ok(IntakeRetired::Absent) => {}
        Ok(IntakeRetired::Removed) => println!(
            "MQTT: the consumer {} of nats-server's stream {} held nothing and is removed: \
             nats-server keeps nothing more for it, and the stream keeps each message only \
             until every session took it, as nats-server makes it.",
            streams::INTAKE_CONSUMER,
            streams::MQTT_STREAM
        ),
        Ok(IntakeRetired::Kept { held, read }) => println!(
            "MQTT: the consumer {} of nats-server's stream {} is kept: it holds {held} \
             message(s){}. Run the processors with MQTT_INTAKE=nats until it holds none, stop \
             them, then run `dataviz migrate` again.",
            streams::INTAKE_CONSUMER,
            streams::MQTT_STREAM,
            if read {
                " and a processor reads it"
            } else {
                ""
            }
        ),
        Err(e) => println!("MQTT: {e:#}"),
    }
    client.flush().await.ok();
}

pub async fn bridge(args: BridgeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.streams.mqtt_intake == Intake::Bridge,
        "MQTT_INTAKE=nats: the processor reads nats-server's MQTT stream itself, there is no \
         bridge to run (MQTT_INTAKE=bridge runs one, for any broker)"
    );
    let role = Role::start(&args.ops, 9101).await?;
    let (client, js) = role.jetstream(&args.nats, &args.streams, "bridge").await?;
    let bridge = role.bridge(args.bridge, &client, js);
    role.ops.started();
    bridge.await?;
    client.flush().await.ok();
    Ok(())
}

pub async fn processor(args: ProcessorArgs) -> anyhow::Result<()> {
    let role = Role::start(&args.ops, 9102).await?;
    let (client, js) = role
        .jetstream(&args.nats, &args.streams, "processor")
        .await?;
    let pool = role.database(&args.database).await?;
    if args.streams.mqtt_intake == Intake::Nats {
        ensure_intake(&js, &args.streams, &args.mqtt, None).await?;
    }
    warn_of_stream_holders(&js, &args.streams).await;
    let processor = role.processor(args.processor, &args.streams, js, pool);
    role.ops.started();
    processor.await?;
    client.flush().await.ok();
    Ok(())
}

pub async fn writer(args: WriterArgs) -> anyhow::Result<()> {
    let role = Role::start(&args.ops, 9103).await?;
    let (client, js) = role.jetstream(&args.nats, &args.streams, "writer").await?;
    let pool = role.database(&args.database).await?;
    let writer = role.writer(args.writer, &args.retention, &args.streams, js, pool);
    role.ops.started();
    writer.await?;
    client.flush().await.ok();
    Ok(())
}

pub async fn publisher(args: PublisherArgs) -> anyhow::Result<()> {
    let role = Role::start(&args.ops, 9104).await?;
    let (client, js) = role
        .jetstream(&args.nats, &args.streams, "publisher")
        .await?;
    streams::ensure_publisher(&js, &args.streams).await?;
    let key = args.keys.keys()?.publisher;
    let hub = MercurePublisher::new(&args.publisher.mercure_url, key)?;
    tracing::info!(hub = %args.publisher.mercure_url, "publishing readings to the Mercure hub");
    let publisher = role.publisher(args.publisher, &args.streams, js, UpdateSink::Http(hub));
    role.ops.started();
    publisher.await?;
    client.flush().await.ok();
    Ok(())
}

pub async fn hub(args: HubArgs) -> anyhow::Result<()> {
    let role = Role::start(&args.ops, 9105).await?;
    let js = match args.hub.mercure_transport {
        Transport::Local => None,
        Transport::Jetstream => Some(dataviz_core::config::jetstream(
            role.nats(&args.nats, "hub").await?,
        )),
    };
    let (hub, _) = start_hub(args.hub, js).await?;
    let listener = tokio::net::TcpListener::bind(args.mercure_addr)
        .await
        .with_context(|| format!("MERCURE_ADDR {}: cannot listen", args.mercure_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "Mercure hub at /.well-known/mercure");
    role.ops.started();
    dataviz_mercure::serve(listener, hub, role.shutdown.clone()).await?;
    Ok(())
}

/// Every role in one process; the database is migrated first.
pub async fn all(args: AllArgs) -> anyhow::Result<()> {
    // The bridge of this process makes its session as soon as the broker answers: `all` starts
    // with the broker down, and waits for it, as the bridge role does.
    migrate(MigrateArgs {
        database: args.database.clone(),
        retention: args.retention.clone(),
        bridge: args.bridge.clone(),
        nats: args.nats.clone(),
        streams: StreamSettings {
            // The consumer is made below, once connected, as the bridge makes its session.
            mqtt_intake: Intake::Bridge,
            ..args.streams.clone()
        },
        no_mqtt_session: true,
    })
    .await?;
    // Bound before the ops server answers: once /readyz says ready, the site takes connections.
    let listener = tokio::net::TcpListener::bind(args.app.app_addr)
        .await
        .with_context(|| format!("APP_ADDR {}: cannot listen", args.app.app_addr))?;
    let role = Role::start(&args.ops, 9100).await?;
    let (client, js) = role.jetstream(&args.nats, &args.streams, "all").await?;
    streams::ensure_publisher(&js, &args.streams).await?;
    let intake = args.streams.mqtt_intake;
    if intake == Intake::Nats {
        ensure_intake(
            &js,
            &args.streams,
            &args.bridge.mqtt,
            Some(&args.bridge.mqtt_client_id),
        )
        .await?;
    }
    warn_of_stream_holders(&js, &args.streams).await;
    let pool = role.database(&args.database).await?;

    // The admin site and the embedded Mercure hub share one listener, so that the site's
    // subscriber cookie reaches the hub; the publisher hands its updates to that hub.
    let (hub, keys) = start_hub(args.hub, Some(js.clone())).await?;
    let live = LiveConfig {
        hub_url: args
            .app
            .mercure_public_url
            .clone()
            .unwrap_or_else(|| dataviz_mercure::HUB_PATH.to_owned()),
        topic_base: args.publisher.mercure_topic_base.clone(),
        subscriber_key: keys.subscriber.clone(),
        token_ttl: args.app.live_token_ttl,
        hub: Some(hub.clone()),
    };
    let site = dataviz_app::router(AppState::new(
        pool.clone(),
        js.clone(),
        &args.app,
        Some(live),
    ))
    .merge(hub.router());
    let bound = listener.local_addr()?;
    let local = match bound.ip() {
        ip if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], bound.port())),
        _ => bound,
    };
    let served = {
        let shutdown = role.shutdown.clone();
        let hub = hub.clone();
        async move {
            axum::serve(
                dataviz_mercure::without_delay(listener),
                site.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                shutdown.cancelled().await;
                hub.close();
            })
            .await
            .context("serving the admin site and hub")
        }
    };
    // The publisher hands its updates to this process's hub directly (no HTTP round trip).
    let mercure = UpdateSink::Embedded(hub.clone());
    let mqtt = format!(
        "{}:{}",
        args.bridge.mqtt.mqtt_host, args.bridge.mqtt.mqtt_port
    );
    let (site, hub_url) = (
        format!("http://{local}/"),
        format!("http://{local}{}", dataviz_mercure::HUB_PATH),
    );
    match intake {
        Intake::Bridge => tracing::info!(
            mqtt,
            topics = ?args.bridge.mqtt_topics.0,
            site,
            hub = hub_url,
            "dataviz all: bridge, processor, writer, publisher, Mercure hub and admin site running"
        ),
        Intake::Nats => tracing::info!(
            mqtt,
            stream = streams::MQTT_STREAM,
            site,
            hub = hub_url,
            "dataviz all: processor (reading nats-server's MQTT stream), writer, publisher, \
             Mercure hub and admin site running"
        ),
    }
    let mut roles: Vec<SupervisedRole> = vec![(
        "publisher",
        Box::pin(role.publisher(args.publisher, &args.streams, js.clone(), mercure)),
    )];
    if intake == Intake::Bridge {
        roles.push((
            "bridge",
            Box::pin(role.bridge(args.bridge, &client, js.clone())),
        ));
    }
    roles.extend::<[SupervisedRole; 3]>([
        (
            "processor",
            Box::pin(role.processor(args.processor, &args.streams, js.clone(), pool.clone())),
        ),
        (
            "writer",
            Box::pin(role.writer(args.writer, &args.retention, &args.streams, js, pool)),
        ),
        ("site", Box::pin(served)),
    ]);
    role.ops.started();
    let result = supervise(roles, &role.shutdown).await;
    client.flush().await.ok();
    result
}

/// A role of `dataviz all`, named, as [`supervise`] runs it.
type SupervisedRole = (
    &'static str,
    std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>,
);

/// Runs `roles`, each on a task of its own, until every one has ended. The first to fail (an
/// error or a panic), or to end before a shutdown was asked, stops the others through
/// `shutdown`: a half-running pipeline would hide the problem. The error names that role.
async fn supervise(roles: Vec<SupervisedRole>, shutdown: &Shutdown) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let mut running: futures::stream::FuturesUnordered<_> = roles
        .into_iter()
        .map(|(name, role)| async move {
            let result = match tokio::spawn(role).await {
                Ok(result) => result,
                Err(e) => Err(anyhow::anyhow!("{e}")),
            };
            (name, result)
        })
        .collect();
    let mut first_error: Option<anyhow::Error> = None;
    while let Some((name, result)) = running.next().await {
        let failure = match result {
            Err(e) => Some(e.context(format!("{name} failed"))),
            Ok(()) if !shutdown.is_cancelled() => Some(anyhow::anyhow!(
                "{name} stopped though no shutdown was asked"
            )),
            Ok(()) => None,
        };
        if let Some(e) = failure {
            if first_error.is_none() {
                tracing::error!(role = name, error = format!("{e:#}"), "stopping every role");
                shutdown.cancel();
            }
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A role that runs until shutdown, then says it stopped.
    fn until_shutdown(
        shutdown: &Shutdown,
        stopped: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> {
        let (shutdown, stopped) = (shutdown.clone(), stopped.clone());
        Box::pin(async move {
            shutdown.cancelled().await;
            stopped.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
    }

    #[tokio::test]
    async fn a_failing_role_stops_the_others_and_is_named() {
        let shutdown = Shutdown::new();
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failing: std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> =
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                anyhow::bail!("lost its consumer")
            });
        let roles = vec![
            ("publisher", until_shutdown(&shutdown, &stopped)),
            ("bridge", until_shutdown(&shutdown, &stopped)),
            ("processor", failing),
            ("writer", until_shutdown(&shutdown, &stopped)),
        ];
        let result = tokio::time::timeout(Duration::from_secs(5), supervise(roles, &shutdown))
            .await
            .expect("the other roles were stopped");
        let message = format!("{:#}", result.unwrap_err());
        assert_eq!(message, "processor failed: lost its consumer");
        assert_eq!(stopped.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_panicking_role_or_one_ending_early_stops_the_others() {
        let shutdown = Shutdown::new();
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let roles: Vec<SupervisedRole> = vec![
            ("writer", until_shutdown(&shutdown, &stopped)),
            ("bridge", Box::pin(async { panic!("a bug") })),
        ];
        let result = tokio::time::timeout(Duration::from_secs(5), supervise(roles, &shutdown))
            .await
            .expect("stopped");
        assert!(format!("{:#}", result.unwrap_err()).starts_with("bridge failed: "));

        let shutdown = Shutdown::new();
        let roles: Vec<SupervisedRole> = vec![
            ("writer", until_shutdown(&shutdown, &stopped)),
            ("site", Box::pin(async { Ok(()) })),
        ];
        let result = tokio::time::timeout(Duration::from_secs(5), supervise(roles, &shutdown))
            .await
            .expect("stopped");
        assert_eq!(
            format!("{:#}", result.unwrap_err()),
            "site stopped though no shutdown was asked"
        );

        // A shutdown asked from outside: every role ends well, no error.
        let shutdown = Shutdown::new();
        let roles = vec![("writer", until_shutdown(&shutdown, &stopped))];
        shutdown.cancel();
        assert!(supervise(roles, &shutdown).await.is_ok());
    }
}
