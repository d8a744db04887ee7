//! Start-up of each role: read settings, connect, check the servers, run until a signal.

use anyhow::Context as _;
use dataviz_bridge::config::BridgeConfig;
use dataviz_core::{
    config::{DatabaseConfig, NatsConfig},
    db,
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
}

#[derive(Debug, clap::Args)]
pub struct BridgeArgs {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(flatten)]
    streams: StreamSettings,
    #[command(flatten)]
    bridge: BridgeConfig,
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
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseConfig,
}

/// Connects to NATS, refuses an old server, and creates or checks the streams.
async fn jetstream(
    nats: &NatsConfig,
    settings: &StreamSettings,
    role: &str,
) -> anyhow::Result<(async_nats::Client, async_nats::jetstream::Context)> {
    let client = nats.connect(role).await?;
    let info = client.server_info();
    tracing::info!(server = %info.server_name, version = %info.version, url = %nats.nats_url, "connected to NATS");
    let js = dataviz_core::config::jetstream(client.clone());
    streams::ensure(&client, &js, settings).await?;
    Ok((client, js))
}

/// A pool on a migrated database; says which flavour it is.
async fn database(config: &DatabaseConfig) -> anyhow::Result<deadpool_postgres::Pool> {
    let pool = config.pool()?;
    let client = pool.get().await.context("connecting to DATABASE_URL")?;
    db::check_migrated(&client).await?;
    tracing::info!("database: {}", db::describe(&client).await?);
    Ok(pool)
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let mut client = db::connect(&args.database.database_url).await?;
    let report = db::migrate(&mut client).await?;
    let described = db::describe(&client).await?;
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
    let shutdown = shutdown::on_signals();
    let (client, js) = jetstream(&args.nats, &args.streams, "bridge").await?;
    run_bridge(args.bridge, client, js, shutdown).await
}

async fn run_bridge(
    config: BridgeConfig,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let max_payload = client.server_info().max_payload;
    dataviz_bridge::run(config, js, max_payload, shutdown).await?;
    client.flush().await.ok();
    Ok(())
}

pub async fn processor(args: ProcessorArgs) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals();
    let (client, js) = jetstream(&args.nats, &args.streams, "processor").await?;
    let pool = database(&args.database).await?;
    dataviz_processor::run(
        args.processor,
        args.streams.processor_consumer(),
        js,
        pool,
        shutdown,
    )
    .await?;
    client.flush().await.ok();
    Ok(())
}

pub async fn writer(args: WriterArgs) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals();
    let (client, js) = jetstream(&args.nats, &args.streams, "writer").await?;
    let pool = database(&args.database).await?;
    dataviz_writer::run(
        args.writer,
        args.streams.writer_consumer(),
        js,
        pool,
        shutdown,
    )
    .await?;
    client.flush().await.ok();
    Ok(())
}

/// Every role in one process; the database is migrated first.
pub async fn all(args: AllArgs) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals();
    migrate(MigrateArgs {
        database: args.database.clone(),
    })
    .await?;
    let (client, js) = jetstream(&args.nats, &args.streams, "all").await?;
    let pool = database(&args.database).await?;
    tracing::info!(
        mqtt = format!("{}:{}", args.bridge.mqtt.mqtt_host, args.bridge.mqtt.mqtt_port),
        topics = ?args.bridge.mqtt_topics.0,
        "dataviz all: bridge, processor and writer running"
    );
    let roles = [
        tokio::spawn(run_bridge(
            args.bridge,
            client.clone(),
            js.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(dataviz_processor::run(
            args.processor,
            args.streams.processor_consumer(),
            js.clone(),
            pool.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(dataviz_writer::run(
            args.writer,
            args.streams.writer_consumer(),
            js,
            pool,
            shutdown.clone(),
        )),
    ];
    let mut first_error = None;
    for role in roles {
        let result = role.await.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = result {
            // One role failing stops the others: a half-running pipeline hides the problem.
            shutdown.cancel();
            first_error.get_or_insert(e);
        }
    }
    client.flush().await.ok();
    first_error.map_or(Ok(()), Err)
}
