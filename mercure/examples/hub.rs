//! Runs the embedded hub alone, configured from the environment (`MERCURE_*`, see
//! `--help`), on `MERCURE_ADDR` (default `127.0.0.1:3000`): for the reference conformance
//! suite, for trying clients by hand. `dataviz hub` is the production entry point.
//! `MERCURE_TRANSPORT=local` keeps updates in memory; `jetstream` (the default) needs a
//! nats-server at `NATS_URL`.
//!
//! ```sh
//! MERCURE_TRANSPORT=local MERCURE_PUBLISHER_JWT_KEY='!ChangeThisMercureHubJWTSecretKey!' \
//!   cargo run -p dataviz-mercure --example hub
//! ```

use clap::Parser;
use dataviz_mercure::{Hub, HubConfig, Transport};

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "MERCURE_ADDR", default_value = "127.0.0.1:3000")]
    addr: String,
    /// The NATS server of the `jetstream` transport.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    #[command(flatten)]
    hub: HubConfig,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = Args::parse();
    if args.hub.keys.generate_development_keys() {
        eprintln!("no MERCURE_PUBLISHER_JWT_KEY: using a random key (development only)");
    }
    let hub = match args.hub.mercure_transport {
        Transport::Local => Hub::new(&args.hub)?,
        Transport::Jetstream => {
            let client = async_nats::connect(&args.nats_url).await?;
            Hub::with_jetstream(&args.hub, async_nats::jetstream::new(client)).await?
        }
    };
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    eprintln!(
        "hub on http://{}/.well-known/mercure",
        listener.local_addr()?
    );
    // A page at `/`, so that a browser (the conformance suite) has a same-origin page to run in.
    let router = hub.router().route(
        "/",
        axum::routing::get(|| async {
            axum::response::Html("<!doctype html><title>Mercure hub</title><p>Mercure hub at /.well-known/mercure</p>")
        }),
    );
    axum::serve(dataviz_mercure::without_delay(listener), router)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            hub.close();
        })
        .await?;
    Ok(())
}
