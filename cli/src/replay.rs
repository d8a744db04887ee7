//! `dataviz replay`: runs the processor again over a range of RAW.
//!
//! The raw messages keep their ids, so what was stored before is not stored again: a replay of
//! a range already ingested writes no row, and one over messages that were refused (say, for a
//! gateway that exists now) ingests them. Progress is kept in a durable consumer named after
//! the range: an interrupted replay resumes where it stopped when run again with the same
//! arguments (`--restart` starts over). It ends with a summary.

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use dataviz_core::{
    config::{DatabaseConfig, NatsConfig},
    message::RawMessage,
    payload::parse_ts,
    streams::{self, RAW_STREAM},
    topic,
};
use dataviz_processor::{Outcome, Processor, ProcessorConfig};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use uuid::Uuid;

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

#[derive(Debug, Default)]
struct Summary {
    read: u64,
    skipped: u64,
    batches: u64,
    already_stored: u64,
    new_messages: u64,
    new_rows: u64,
    dead: u64,
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    if let Some(until) = args.until {
        anyhow::ensure!(until > args.since, "--until must be after --since");
    }
    let client = args.nats.connect("replay").await?;
    let js = dataviz_core::config::jetstream(client.clone());
    let pool = args.database.pool()?;
    {
        let db = pool.get().await.context("connecting to DATABASE_URL")?;
        dataviz_core::db::check_migrated(&db).await?;
    }
    let stream = js
        .get_stream(RAW_STREAM)
        .await
        .context("opening RAW (has the bridge run?)")?;
    let end_seq = stream.get_info().await?.state.last_sequence;
    let name = consumer_name(&args);
    if args.restart || args.dry_run {
        let _ = stream.delete_consumer(&name).await;
    }
    let start = time::OffsetDateTime::from_unix_timestamp_nanos(
        args.since
            .timestamp_nanos_opt()
            .context("--since out of range")?
            .into(),
    )?;
    let mut reader: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: (!args.dry_run).then(|| name.clone()),
            description: Some(format!("dataviz replay since {}", args.since.to_rfc3339())),
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
            filter_subject: match args.gateway {
                Some(id) => streams::raw_subject(Some(id)),
                None => streams::RAW_SUBJECTS.into(),
            },
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: 10_000,
            // An abandoned replay's position is kept a week, then the server forgets it.
            inactive_threshold: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        })
        .await
        .context("creating the replay consumer (an interrupted replay of this range with other settings? use --restart)")?;
    let total = reader.info().await?.num_pending;
    let processor = Processor::new(pool.clone(), args.processor.limits());
    let progress = Progress::new(total, args.dry_run);
    let mut summary = Summary::default();
    let mut new_ids: Vec<Uuid> = Vec::new();
    let mut dry_outcomes: std::collections::BTreeMap<String, u64> = Default::default();
    let started = Instant::now();
    let mut interrupted = Box::pin(tokio::signal::ctrl_c());
    'replay: loop {
        let mut batch = reader
            .fetch()
            .max_messages(500)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("reading RAW: {e}"))?;
        let mut messages = Vec::new();
        let mut done = false;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("reading RAW: {e}"))?;
            let info = message
                .info()
                .map_err(|e| anyhow::anyhow!("reading RAW: {e}"))?;
            let published =
                DateTime::from_timestamp_nanos(info.published.unix_timestamp_nanos() as i64);
            if info.stream_sequence > end_seq || args.until.is_some_and(|u| published > u) {
                done = true;
                break;
            }
            messages.push(message);
        }
        if messages.is_empty() {
            if done || reader.info().await?.num_pending == 0 {
                break;
            }
            continue;
        }
        summary.batches += 1;
        let mut wanted = Vec::with_capacity(messages.len());
        for message in messages {
            summary.read += 1;
            let raw =
                RawMessage::from_parts(message.headers.as_ref(), message.payload.clone()).ok();
            let keep = match (&args.device, &raw) {
                (Some(device), Some(raw)) => {
                    topic::parse(&raw.topic).is_ok_and(|t| t.device_code == device)
                }
                (Some(_), None) => false,
                (None, _) => true,
            };
            if keep {
                wanted.push((message, raw));
            } else {
                summary.skipped += 1;
                ack(&message, args.dry_run).await;
            }
        }
        if args.dry_run {
            for (message, raw) in &wanted {
                let label = match raw {
                    Some(raw) => match processor.dry_run(raw).await? {
                        Ok(_) => "would be processed".to_owned(),
                        Err((reason, _)) => format!("would go to DEAD: {reason}"),
                    },
                    None => "would go to DEAD: foreign_message".to_owned(),
                };
                *dry_outcomes.entry(label).or_default() += 1;
                ack(message, true).await;
            }
        } else {
            let messages: Vec<jetstream::Message> = wanted.into_iter().map(|(m, _)| m).collect();
            let outcomes = processor.outcomes(&messages).await;
            let ids: Vec<Uuid> = outcomes
                .iter()
                .filter_map(|o| match o {
                    Outcome::Readings(b) => Some(b.id),
                    _ => None,
                })
                .collect();
            let known = already_stored(&pool, &ids).await?;
            let stored = processor.store_all(&js, &outcomes).await;
            for ((outcome, stored), message) in outcomes.iter().zip(&stored).zip(&messages) {
                if let Err(e) = stored {
                    anyhow::bail!("replay stopped: {e} (run the same command again to resume)");
                }
                match outcome {
                    Outcome::Readings(batch) if known.contains(&batch.id) => {
                        summary.already_stored += 1
                    }
                    Outcome::Readings(batch) => {
                        summary.new_messages += 1;
                        summary.new_rows += batch.readings.len() as u64;
                        new_ids.push(batch.id);
                    }
                    Outcome::Dead(_) => summary.dead += 1,
                    Outcome::Retry(e) => {
                        anyhow::bail!("replay stopped: {e} (run the same command again to resume)")
                    }
                }
                ack(message, false).await;
            }
        }
        progress.set(summary.read);
        if done {
            break;
        }
        if (&mut interrupted).now_or_never().is_some() {
            progress.finish();
            println!(
                "interrupted after {} messages: run the same command again to resume",
                summary.read
            );
            client.flush().await.ok();
            return Ok(());
        }
        continue 'replay;
    }
    progress.finish();
    if !args.dry_run {
        let _ = stream.delete_consumer(&name).await;
    }
    let elapsed = started.elapsed().as_secs_f64().max(0.001);
    if args.dry_run {
        println!(
            "dry run: {} raw messages read, {} skipped (other devices); nothing published",
            summary.read, summary.skipped
        );
        for (label, n) in dry_outcomes {
            println!("  {n:>8}  {label}");
        }
        return Ok(());
    }
    let written = wait_for_writer(&pool, &new_ids, args.wait).await?;
    println!(
        "replayed {} raw messages in {elapsed:.1} s ({:.0} msg/s): {} already stored, {} new ({} rows), {} to DEAD, {} skipped (other devices)",
        summary.read,
        summary.read as f64 / elapsed,
        summary.already_stored,
        summary.new_messages,
        summary.new_rows,
        summary.dead,
        summary.skipped,
    );
    if written < new_ids.len() {
        println!(
            "the writer has stored {written} of the {} new messages so far (is `dataviz writer` running?); the rest are in READINGS",
            new_ids.len()
        );
    } else if !new_ids.is_empty() {
        println!("rows written: {}", summary.new_rows);
    }
    client.flush().await.ok();
    Ok(())
}

use futures::FutureExt as _;

/// The durable consumer keeping an interrupted replay's position: one per range and filter.
fn consumer_name(args: &ReplayArgs) -> String {
    let key = format!(
        "{}|{:?}|{:?}|{:?}",
        args.since.timestamp_micros(),
        args.until.map(|u| u.timestamp_micros()),
        args.gateway,
        args.device
    );
    format!("replay_{:016x}", xxhash(&key))
}

fn xxhash(s: &str) -> u64 {
    // FNV-1a: a stable name, no need for a cryptographic hash.
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn ack(message: &jetstream::Message, dry_run: bool) {
    if !dry_run {
        dataviz_core::consume::ack(message).await;
    }
}

/// The ids among `ids` whose rows are already stored.
async fn already_stored(
    pool: &deadpool_postgres::Pool,
    ids: &[Uuid],
) -> anyhow::Result<std::collections::HashSet<Uuid>> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let db = pool.get().await?;
    let rows = db
        .query(
            "SELECT id FROM ingested_message WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Waits until the writer stored the messages `ids`; returns how many it has.
async fn wait_for_writer(
    pool: &deadpool_postgres::Pool,
    ids: &[Uuid],
    wait: Duration,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + wait;
    loop {
        let mut stored = 0;
        for chunk in ids.chunks(10_000) {
            stored += already_stored(pool, chunk).await?.len();
        }
        if stored == ids.len() || Instant::now() >= deadline {
            return Ok(stored);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A progress bar on a terminal, a line every few seconds otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    fn new(total: u64, dry_run: bool) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
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
        Progress {
            bar,
            total,
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    fn set(&self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.last_line.get().elapsed() >= Duration::from_secs(5) => {
                self.last_line.set(Instant::now());
                eprintln!("replay: {done} of {} messages", self.total);
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
