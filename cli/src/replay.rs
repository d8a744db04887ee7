//! `dataviz replay`: the processor run again over a range of RAW
//! ([`dataviz_processor::replay`]), with a progress bar and a summary.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use dataviz_core::{
    config::{DatabaseConfig, NatsConfig},
    payload::parse_ts,
    shutdown::Shutdown,
};
use dataviz_processor::replay::{Observer, Options, Range, replay};
use dataviz_processor::{Processor, ProcessorConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    processor: ProcessorConfig,
    /// Start of the range: a date and time (2024-05-01T00:00:00Z) or how long ago (2h, 3d).
    #[arg(long, value_parser = parse_when)]
    since: DateTime<Utc>,
    /// End of the range (same forms); default: the last message stored when the replay starts.
    #[arg(long, value_parser = parse_when)]
    until: Option<DateTime<Utc>>,
    /// Only this gateway's messages.
    #[arg(long)]
    gateway: Option<i32>,
    /// Only this device's messages (its code, as in the topic).
    #[arg(long)]
    device: Option<String>,
    /// Say what would happen; publish and create nothing.
    #[arg(long)]
    dry_run: bool,
    /// Start over instead of resuming an interrupted replay of the same range.
    #[arg(long)]
    restart: bool,
    /// How long to wait, at the end, for the writer to store the replayed readings.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    wait: Duration,
}

fn parse_when(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(ago) = humantime::parse_duration(s) {
        return chrono::Duration::from_std(ago)
            .map(|d| Utc::now() - d)
            .map_err(|e| e.to_string());
    }
    parse_ts(s).map_err(|_| {
        format!("{s:?} is neither a date and time (2024-05-01T00:00:00Z) nor a duration (2h)")
    })
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let client = args.nats.connect("replay").await?;
    let js = dataviz_core::config::jetstream(client.clone());
    let pool = args.database.pool()?;
    {
        let db = pool.get().await.context("connecting to DATABASE_URL")?;
        dataviz_core::db::check_migrated(&db).await?;
    }
    let processor = Processor::new(pool.clone(), js, args.processor.limits());
    let range = Range {
        since: args.since,
        until: args.until,
        gateway: args.gateway,
        device: args.device,
    };
    let options = Options {
        dry_run: args.dry_run,
        restart: args.restart,
        wait: args.wait,
    };
    // Ctrl-C stops the replay between two fetches; the next run resumes there.
    let stop = Shutdown::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.cancel();
            }
        }
    });
    let mut progress = Progress::new(options.dry_run);
    let summary = replay(&processor, &pool, &range, options, &mut progress, &stop).await;
    progress.finish();
    let summary = summary?;
    client.flush().await.ok();
    if summary.interrupted {
        println!(
            "interrupted after {} messages: run the same command again to resume",
            summary.read
        );
        return Ok(());
    }
    if options.dry_run {
        println!(
            "dry run: {} raw messages read, {} skipped (other gateways or devices); nothing published",
            summary.read, summary.skipped
        );
        for (label, n) in &summary.would {
            println!("  {n:>8}  {label}");
        }
        return Ok(());
    }
    let elapsed = summary.elapsed.as_secs_f64().max(0.001);
    println!(
        "replayed {} raw messages in {elapsed:.1} s ({:.0} msg/s): {} already stored, {} new ({} rows), {} to DEAD, {} skipped (other gateways or devices)",
        summary.read,
        summary.read as f64 / elapsed,
        summary.already_stored,
        summary.new_messages,
        summary.new_rows,
        summary.dead,
        summary.skipped,
    );
    if summary.written < summary.new_messages {
        println!(
            "the writer has stored {} of the {} new messages so far (is `dataviz writer` running?); the rest are in READINGS",
            summary.written, summary.new_messages
        );
    } else if summary.new_messages > 0 {
        println!("rows written: {}", summary.new_rows);
    }
    Ok(())
}

/// A progress bar on a terminal, a line every few seconds otherwise.
struct Progress {
    dry_run: bool,
    bar: Option<ProgressBar>,
    total: u64,
    last_line: Instant,
}

impl Progress {
    fn new(dry_run: bool) -> Progress {
        Progress {
            dry_run,
            bar: None,
            total: 0,
            last_line: Instant::now(),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Progress {
    fn start(&mut self, total: u64) {
        let dry_run = self.dry_run;
        self.total = total;
        self.bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:40}] {pos}/{len} messages, {per_sec}, {eta} left",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_prefix(if dry_run { "dry run" } else { "replay" });
            bar
        });
        eprintln!(
            "{} raw messages to {}",
            total,
            if dry_run { "examine" } else { "replay" }
        );
    }

    fn read(&mut self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                self.last_line = Instant::now();
                eprintln!("replay: {done} of {} messages", self.total);
            }
            None => {}
        }
    }
}
