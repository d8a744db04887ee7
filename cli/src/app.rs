//! `dataviz app`: the admin site on its own (`dataviz all` serves it beside the other roles).

use anyhow::Context as _;
use dataviz_app::{AppConfig, AppState, LiveConfig, live};
use dataviz_core::config::{DatabaseConfig, NatsConfig};
use dataviz_core::db;
use dataviz_mercure::{JwtKey, MercureKeysConfig};

#[derive(Debug, clap::Args)]
pub struct AppArgs {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    app: AppConfig,
    #[command(flatten)]
    keys: MercureKeysConfig,
    #[command(flatten)]
    ops: dataviz_core::ops::OpsConfig,
    /// Base of the Mercure topics the publisher posts readings to.
    #[arg(
        long,
        env = "MERCURE_TOPIC_BASE",
        value_name = "MERCURE_TOPIC_BASE",
        default_value = live::DEFAULT_TOPIC_BASE
    )]
    mercure_topic_base: String,
}

/// Live values need the hub's public URL and a subscriber key (`MERCURE_SUBSCRIBER_JWT_KEY`, or
/// the publisher key it defaults to); without either, the device page has none.
pub fn live_config(
    app: &AppConfig,
    keys: &MercureKeysConfig,
    topic_base: &str,
) -> anyhow::Result<Option<LiveConfig>> {
    let Some(hub_url) = app.mercure_public_url.clone() else {
        tracing::info!("MERCURE_PUBLIC_URL is not set: device pages show no live values");
        return Ok(None);
    };
    let key = [
        (
            "MERCURE_SUBSCRIBER_JWT_KEY",
            &keys.mercure_subscriber_jwt_key,
        ),
        ("MERCURE_PUBLISHER_JWT_KEY", &keys.mercure_publisher_jwt_key),
        ("MERCURE_JWT_SECRET", &keys.mercure_jwt_secret),
    ]
    .into_iter()
    .find_map(|(name, value)| value.as_ref().map(|v| (name, v)));
    match key {
        Some((name, key)) if key.is_empty() => anyhow::bail!("{name} is set but empty"),
        Some((_, key)) => Ok(Some(LiveConfig {
            hub_url,
            topic_base: topic_base.to_owned(),
            subscriber_key: JwtKey::new(key.as_bytes()),
            token_ttl: app.live_token_ttl,
            // The hub is another process: a token outlives a logout by at most its life.
            hub: None,
        })),
        None => anyhow::bail!(
            "MERCURE_PUBLIC_URL is set but no key to sign subscribers' tokens: set \
             MERCURE_SUBSCRIBER_JWT_KEY (or MERCURE_PUBLISHER_JWT_KEY)"
        ),
    }
}

pub async fn run(args: AppArgs) -> anyhow::Result<()> {
    let live = live_config(&args.app, &args.keys, &args.mercure_topic_base)?;
    let pool = args.database.pool()?;
    {
        let client = pool.get().await.context("connecting to DATABASE_URL")?;
        db::check_migrated(&client).await?;
        tracing::info!("database: {}", db::describe(&client).await?);
    }
    let client = args.nats.connect("app").await?;
    let js = dataviz_core::config::jetstream(client.clone());
    let shutdown = dataviz_core::shutdown::on_signals(args.ops.shutdown_timeout);
    let ops = dataviz_core::ops::Ops::new(&args.ops);
    ops.set_nats(client.clone());
    ops.set_db(pool.clone());
    if let Some(addr) = args.ops.addr(9106)? {
        ops.serve(addr, shutdown.clone()).await?;
    }
    let state = AppState::new(pool, js, &args.app, live);
    ops.started();
    dataviz_app::serve(state, args.app.app_addr, async move {
        shutdown.cancelled().await
    })
    .await?;
    client.flush().await.ok();
    Ok(())
}
