//! `dataviz`: every role of the pipeline, the migrations and the device simulator, in one
//! binary. Configuration comes from the environment (see `dataviz <command> --help`); errors
//! are printed with their whole chain.

mod app;
#[cfg(feature = "bench")]
mod bench;
#[cfg(feature = "bench")]
mod bench_hub;
#[cfg(feature = "bench")]
mod bench_site;
mod dlq;
mod replay;
mod roles;
mod simulate;
mod user;

use clap::{Parser, Subcommand};
use dataviz_core::telemetry::{self, LogConfig};
use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: allocation and freeing were a quarter of `dataviz all`'s
/// time under load (many small, short-lived buffers per message across threads), where glibc
/// spends it consolidating and unlinking chunks. BENCHMARKS.md has the A/B figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "dataviz",
    version,
    about = "IoT telemetry pipeline: MQTT → NATS JetStream → PostgreSQL/TimescaleDB",
    long_about = "IoT telemetry pipeline: MQTT → NATS JetStream → PostgreSQL/TimescaleDB.\n\n\
        Every setting is read from the environment (the variable is named in each option's help) \
        or given as an option. A missing or invalid setting stops the command at start."
)]
struct Cli {
    #[command(flatten)]
    log: LogConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every role, the Mercure hub and the admin site in one process (the local default).
    All(Box<roles::AllArgs>),
    /// MQTT → JetStream RAW.
    Bridge(roles::BridgeArgs),
    /// RAW → gateways, devices, tags → READINGS.
    Processor(roles::ProcessorArgs),
    /// READINGS → tag_reading.
    Writer(roles::WriterArgs),
    /// READINGS → Mercure hub (live updates).
    Publisher(roles::PublisherArgs),
    /// The embedded Mercure hub on its own.
    Hub(roles::HubArgs),
    /// Applies the database migrations (safe to run twice, or from several processes).
    Migrate(roles::MigrateArgs),
    /// Simulated devices publishing realistic readings over MQTT.
    Simulate(simulate::SimulateArgs),
    /// Runs the processor again over a time range of RAW (no duplicates; resumable).
    Replay(replay::ReplayArgs),
    /// Dead letters: list, show, re-queue, purge.
    Dlq(dlq::DlqArgs),
    /// The admin site (Leptos SSR): gateways, devices, their data, dead letters.
    App(app::AppArgs),
    /// Users of the admin site: add, list, passwd.
    User(user::UserArgs),
    /// Throughput, latency and memory beside the machine's limits, on servers of its own.
    #[cfg(feature = "bench")]
    Bench(bench::BenchArgs),
    /// The admin site's page timings (p50, p99) on 10,000 devices and a million readings.
    #[cfg(feature = "bench")]
    BenchSite(bench_site::BenchSiteArgs),
    /// The Mercure hub under 40,000 subscribers: memory, latency, CPU.
    #[cfg(feature = "bench")]
    BenchHub(bench_hub::BenchHubArgs),
}

fn main() -> ExitCode {
    // No transparent huge pages for this process: mimalloc's arenas are aligned on 2 MiB, so
    // the kernel backs them with huge pages, each wholly resident however little of it is in
    // use. They were 57 to 86 MB of `dataviz all`'s peak under load (BENCHMARKS.md).
    // Best effort: a kernel that refuses leaves the default.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = Cli::parse();
    // async-nats and rumqttc both use rustls; one crypto provider for the whole process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _log = match telemetry::init(&cli.log) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("dataviz: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dataviz: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::All(args) => roles::all(*args).await,
            Command::Bridge(args) => roles::bridge(args).await,
            Command::Processor(args) => roles::processor(args).await,
            Command::Writer(args) => roles::writer(args).await,
            Command::Publisher(args) => roles::publisher(args).await,
            Command::Hub(args) => roles::hub(args).await,
            Command::Migrate(args) => roles::migrate(args).await,
            Command::Simulate(args) => simulate::run(args).await,
            Command::Dlq(args) => dlq::run(args).await,
            Command::App(args) => app::run(args).await,
            Command::User(args) => user::run(args).await,
            Command::Replay(args) => replay::run(args).await,
            #[cfg(feature = "bench")]
            Command::Bench(args) => bench::run(args).await,
            #[cfg(feature = "bench")]
            Command::BenchSite(args) => bench_site::run(args).await,
            #[cfg(feature = "bench")]
            Command::BenchHub(args) => bench_hub::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "dataviz stopped");
            eprintln!("dataviz: {e:#}");
            ExitCode::FAILURE
        }
    }
}
