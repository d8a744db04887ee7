//! Start-up of each role: read settings, connect, check the servers, serve health and
//! metrics, run until a signal.

use anyhow::Context as _;
use dataviz_bridge::config::BridgeConfig;
use dataviz_core::{
    config::{DatabaseConfig, NatsConfig},
    db::{self, RetentionConfig},
    ops::{Ops, OpsConfig},
    shutdown::{self, Shutdown},
    streams::{self, StreamSettings},
};
use dataviz_processor::ProcessorConfig;
use dataviz_writer::WriterConfig;

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

    /// Connects to NATS, refuses an old server, and creates or checks the streams.
    async fn jetstream(
        &self,
        nats: &NatsConfig,
        settings: &StreamSettings,
        name: &str,
    ) -> anyhow::Result<(async_nats::Client, async_nats::jetstream::Context)> {
        let client = nats.connect(name).await?;
        let info = client.server_info();
        tracing::info!(server = %info.server_name, version = %info.version, url = %nats.nats_url, "connected to NATS");
        let js = dataviz_core::config::jetstream(client.clone());
        streams::ensure(&client, &js, settings).await?;
        self.ops.set_nats(client.clone());
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

    fn bridge(
        &self,
        config: BridgeConfig,
        client: &async_nats::Client,
        js: async_nats::jetstream::Context,
    ) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let max_payload = client.server_info().max_payload;
        let progress = self.ops.stage("bridge");
        dataviz_bridge::run(config, js, max_payload, progress, self.shutdown.clone())
    }

    fn processor(
        &self,
        config: ProcessorConfig,
        settings: &StreamSettings,
        js: async_nats::jetstream::Context,
        pool: deadpool_postgres::Pool,
    ) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let progress = self.ops.stage("processor");
        self.ops.watch_consumer(
            js.clone(),
            streams::RAW_STREAM,
            streams::PROCESSOR_CONSUMER.into(),
            progress.clone(),
            self.shutdown.clone(),
        );
        dataviz_processor::run(
            config,
            settings.processor_consumer(),
            js,
            pool,
            progress,
            self.shutdown.clone(),
        )
    }

    fn writer(
        &self,
        config: WriterConfig,
        retention: &RetentionConfig,
        settings: &StreamSettings,
        js: async_nats::jetstream::Context,
        pool: deadpool_postgres::Pool,
    ) -> impl Future<Output = anyhow::Result<()>> + use<> {
        // Message ids outlive RAW by a day: until then a replay could bring a message back.
        let ids = settings.raw_retention + std::time::Duration::from_secs(86_400);
        tokio::spawn(dataviz_writer::prune_loop(
            pool.clone(),
            retention.readings_retention,
            ids,
            config.retention_check_every,
            self.shutdown.clone(),
        ));
        let progress = self.ops.stage("writer");
        self.ops.watch_consumer(
            js.clone(),
            streams::READINGS_STREAM,
            streams::WRITER_CONSUMER.into(),
            progress.clone(),
            self.shutdown.clone(),
        );
        let (consumer, shutdown) = (settings.writer_consumer(), self.shutdown.clone());
        async move { dataviz_writer::run(config, consumer, js, pool, &progress, shutdown).await }
    }
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let mut client = db::connect(&args.database.database_url).await?;
    let report = db::migrate(&mut client).await?;
    let retention = db::apply_retention(&client, &args.retention).await?;
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
    Ok(())
}

pub async fn bridge(args: BridgeArgs) -> anyhow::Result<()> {
    let role = Role::start(&args.ops, 9101).await?;
    let (client, js) = role.jetstream(&args.nats, &args.streams, "bridge").await?;
    role.bridge(args.bridge, &client, js).await?;
    client.flush().await.ok();
    Ok(())
}

pub async fn processor(args: ProcessorArgs) -> anyhow::Result<()> {
    let role = Role::start(&args.ops, 9102).await?;
    let (client, js) = role
        .jetstream(&args.nats, &args.streams, "processor")
        .await?;
    let pool = role.database(&args.database).await?;
    role.processor(args.processor, &args.streams, js, pool)
        .await?;
    client.flush().await.ok();
    Ok(())
}

pub async fn writer(args: WriterArgs) -> anyhow::Result<()> {
    let role = Role::start(&args.ops, 9103).await?;
    let (client, js) = role.jetstream(&args.nats, &args.streams, "writer").await?;
    let pool = role.database(&args.database).await?;
    role.writer(args.writer, &args.retention, &args.streams, js, pool)
        .await?;
    client.flush().await.ok();
    Ok(())
}

/// Every role in one process; the database is migrated first.
pub async fn all(args: AllArgs) -> anyhow::Result<()> {
    migrate(MigrateArgs {
        database: args.database.clone(),
        retention: args.retention.clone(),
    })
    .await?;
    let role = Role::start(&args.ops, 9100).await?;
    let (client, js) = role.jetstream(&args.nats, &args.streams, "all").await?;
    let pool = role.database(&args.database).await?;
    tracing::info!(
        mqtt = format!("{}:{}", args.bridge.mqtt.mqtt_host, args.bridge.mqtt.mqtt_port),
        topics = ?args.bridge.mqtt_topics.0,
        "dataviz all: bridge, processor and writer running"
    );
    let roles = [
        tokio::spawn(role.bridge(args.bridge, &client, js.clone())),
        tokio::spawn(role.processor(args.processor, &args.streams, js.clone(), pool.clone())),
        tokio::spawn(role.writer(args.writer, &args.retention, &args.streams, js, pool)),
    ];
    let mut first_error = None;
    for task in roles {
        let result = task.await.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = result {
            // One role failing stops the others: a half-running pipeline hides the problem.
            role.shutdown.cancel();
            first_error.get_or_insert(e);
        }
    }
    client.flush().await.ok();
    first_error.map_or(Ok(()), Err)
}
