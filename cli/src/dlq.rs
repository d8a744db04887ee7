//! `dataviz dlq`: dead letters for an operator: list, show, re-queue, purge.

use dataviz_core::config::NatsConfig;
use dataviz_core::dead::{self, DeadEntry, DeadFilter};
use dataviz_core::message::DeadReason;

#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, clap::Args)]
struct FilterArgs {
    /// Only this reason (unknown_gateway, bad_json, bad_topic, ...).
    #[arg(long, value_parser = parse_reason)]
    reason: Option<DeadReason>,
    /// Only messages whose topic names this gateway.
    #[arg(long)]
    gateway: Option<i32>,
    /// Only this stage (bridge, processor, writer).
    #[arg(long)]
    stage: Option<String>,
}

/// A reason by its name; the error lists every name.
fn parse_reason(name: &str) -> Result<DeadReason, String> {
    DeadReason::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = DeadReason::ALL.iter().map(|r| r.name()).collect();
        format!("no such reason; one of: {}", names.join(", "))
    })
}

impl FilterArgs {
    fn filter(&self) -> DeadFilter {
        DeadFilter {
            stage: self.stage.clone(),
            reason: self.reason,
            gateway: self.gateway,
        }
    }

    fn is_empty(&self) -> bool {
        self.reason.is_none() && self.gateway.is_none() && self.stage.is_none()
    }
}

#[derive(Debug, clap::Subcommand)]
enum DlqCommand {
    /// Lists dead letters, oldest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Shows one dead letter: reason, time, original topic and payload.
    Show {
        /// The dead letter's id (its sequence, first column of `list`).
        id: u64,
    },
    /// Publishes dead letters to RAW again (e.g. once their gateway exists), and removes them.
    Requeue {
        /// Dead letter ids.
        ids: Vec<u64>,
        /// Every dead letter matching the filter instead.
        #[arg(long, conflicts_with = "ids")]
        all_matching: bool,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Deletes dead letters for good.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Confirms: without it, purge only says what it would delete.
        #[arg(long)]
        yes: bool,
    },
}

pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    let client = args.nats.connect("dlq").await?;
    let js = dataviz_core::config::jetstream(client.clone());
    match args.command {
        DlqCommand::List { filter, limit } => {
            let entries = dead::list(&js, &filter.filter(), limit).await?;
            println!(
                "{:>8}  {:<20}  {:<9}  {:<18}  {:<28}  {:>7}  error",
                "id", "stored (UTC)", "stage", "reason", "topic", "bytes"
            );
            for entry in &entries {
                println!("{}", line(entry));
            }
            println!(
                "{} dead letter(s){}",
                entries.len(),
                if entries.len() == limit {
                    " (limit reached: --limit)"
                } else {
                    ""
                }
            );
        }
        DlqCommand::Show { id } => show(&dead::get(&js, id).await?),
        DlqCommand::Requeue {
            ids,
            all_matching,
            filter,
        } => {
            let ids = if all_matching {
                dead::list(&js, &filter.filter(), usize::MAX)
                    .await?
                    .into_iter()
                    .map(|e| e.seq)
                    .collect()
            } else if ids.is_empty() {
                anyhow::bail!("name dead letter ids, or --all-matching with a filter");
            } else {
                ids
            };
            let mut requeued = 0;
            for (i, id) in ids.iter().enumerate() {
                dead::requeue(&js, *id).await?;
                requeued += 1;
                if (i + 1) % 1000 == 0 {
                    eprintln!("re-queued {} of {}", i + 1, ids.len());
                }
            }
            println!("re-queued {requeued} dead letter(s) to RAW");
        }
        DlqCommand::Purge { filter, yes } => {
            if !yes {
                let count = dead::list(&js, &filter.filter(), usize::MAX).await?.len();
                println!(
                    "would delete {count} dead letter(s){}; add --yes to delete them",
                    if filter.is_empty() {
                        " (all of them)"
                    } else {
                        ""
                    }
                );
            } else {
                let purged = dead::purge(&js, &filter.filter()).await?;
                println!("deleted {purged} dead letter(s)");
            }
        }
    }
    client.flush().await.ok();
    Ok(())
}

fn line(entry: &DeadEntry) -> String {
    let stored = entry.stored_at.format("%Y-%m-%d %H:%M:%S");
    match &entry.letter {
        Ok(l) => format!(
            "{:>8}  {:<20}  {:<9}  {:<18}  {:<28}  {:>7}  {}",
            entry.seq,
            stored,
            l.stage,
            l.reason,
            shorten(&l.raw.topic, 28),
            l.whole_size.unwrap_or(l.raw.payload.len() as u64),
            shorten(&l.error, 70)
        ),
        Err(e) => format!(
            "{:>8}  {:<20}  not a Dataviz dead letter: {e}",
            entry.seq, stored
        ),
    }
}

fn show(entry: &DeadEntry) {
    println!("id:           {}", entry.seq);
    println!("stored:       {}", entry.stored_at.to_rfc3339());
    match &entry.letter {
        Ok(l) => {
            println!("stage:        {}", l.stage);
            println!("reason:       {}", l.reason);
            println!("error:        {}", l.error);
            println!("message id:   {}", l.raw.id);
            println!("topic:        {}", l.raw.topic);
            println!("received at:  {}", l.raw.received_at.to_rfc3339());
            match l.whole_size {
                None => println!("payload:      {} bytes", l.raw.payload.len()),
                Some(whole) => println!(
                    "payload:      {whole} bytes, kept whole for re-queueing; the first {} below",
                    l.raw.payload.len()
                ),
            }
            match std::str::from_utf8(&l.raw.payload) {
                Ok(text) => println!("{text}"),
                Err(_) => {
                    let hex: Vec<String> = l
                        .raw
                        .payload
                        .iter()
                        .take(4096)
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    println!("(not UTF-8; hex) {}", hex.join(" "));
                }
            }
        }
        Err(e) => println!("not a Dataviz dead letter: {e}"),
    }
}

fn shorten(s: &str, max: usize) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}
