//! Retention: how long readings and message ids are kept, as TimescaleDB policies
//! ([`apply_retention`], at migration) or by deleting old rows ([`prune_loop`], in the writer
//! role). Message ids are kept as long as RAW and DEAD keep messages ([`ids_horizon`]).

use anyhow::Context as _;
use deadpool_postgres::Pool;
use std::time::Duration;

/// How long readings are kept, and when TimescaleDB compresses them.
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionConfig {
    /// Readings older than this are deleted (`off`: kept for ever). TimescaleDB drops whole
    /// chunks by policy; plain PostgreSQL deletes rows, from the writer, every
    /// `RETENTION_CHECK_EVERY`.
    #[arg(long, env = "READINGS_RETENTION", value_name = "READINGS_RETENTION", default_value = "365d", value_parser = parse_optional_duration)]
    pub readings_retention: Period,
    /// TimescaleDB only: chunks older than this are compressed (`off`: never). Readings arriving
    /// later than this for a compressed range are slow to insert: keep it above the lateness of
    /// your devices.
    #[arg(long, env = "READINGS_COMPRESS_AFTER", value_name = "READINGS_COMPRESS_AFTER", default_value = "7d", value_parser = parse_optional_duration)]
    pub readings_compress_after: Period,
}

impl Default for RetentionConfig {
    /// The defaults `--help` shows.
    fn default() -> Self {
        crate::config::defaults()
    }
}

/// A duration, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period(pub Option<Duration>);

/// Reads a [`Period`]: a duration such as `90d`, or `off`.
pub fn parse_optional_duration(s: &str) -> Result<Period, String> {
    match s {
        "off" | "none" | "0" => Ok(Period(None)),
        _ => humantime::parse_duration(s)
            .map(|d| Period(Some(d)))
            .map_err(|e| format!("{e} (a duration such as 90d, or off)")),
    }
}

/// A PostgreSQL interval; whole days stay days (so policies read `30 days`, not `720:00:00`).
fn interval(d: Duration) -> String {
    match d.as_secs() {
        s if s % 86_400 == 0 => format!("{} days", s / 86_400),
        s => format!("{s} seconds"),
    }
}

/// Applies the retention and compression settings: as TimescaleDB policies when the database
/// has it (replacing those in place), else nothing here (the writer deletes old rows).
/// Describes what is in force.
pub async fn apply_retention(
    client: &tokio_postgres::Client,
    config: &RetentionConfig,
) -> anyhow::Result<String> {
    let timescale = client
        .query_opt(
            "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'",
            &[],
        )
        .await?
        .is_some();
    // Whole days as days: humantime would say "11months 30days 3h 50m 24s" for 365d.
    let describe = |d: Period| match d.0 {
        None => "off".to_owned(),
        Some(d) if d.as_secs() % 86_400 == 0 => format!("{} days", d.as_secs() / 86_400),
        Some(d) => humantime::format_duration(d).to_string(),
    };
    if !timescale {
        return Ok(format!(
            "readings kept {} (deleted by the writer; no TimescaleDB, so no compression)",
            describe(config.readings_retention)
        ));
    }
    // TimescaleDB has no "alter policy": each is removed, then added as configured.
    for (kind, argument, period) in [
        ("retention", "drop_after", config.readings_retention),
        (
            "compression",
            "compress_after",
            config.readings_compress_after,
        ),
    ] {
        client
            .execute(
                &format!("SELECT remove_{kind}_policy('tag_reading', if_exists => true)"),
                &[],
            )
            .await
            .with_context(|| format!("removing the {kind} policy"))?;
        if let Some(period) = period.0 {
            client
                .execute(
                    &format!(
                        "SELECT add_{kind}_policy('tag_reading', {argument} => $1::text::interval)"
                    ),
                    &[&interval(period)],
                )
                .await
                .with_context(|| format!("adding the {kind} policy"))?;
        }
    }
    Ok(format!(
        "readings kept {}, compressed after {} (TimescaleDB policies)",
        describe(config.readings_retention),
        describe(config.readings_compress_after)
    ))
}

/// Deletes what retention no longer keeps, in slices so that no transaction runs long: readings
/// older than `readings` on plain PostgreSQL (TimescaleDB drops chunks itself), and the ids of
/// messages ingested longer than `ids` ago (past it, no copy can come back; `None`: kept).
/// Rows deleted.
///
/// Old readings are found through the BRIN index on `time`, which reads only the page ranges
/// that may hold them: its summaries are brought up to date first (new ranges are summarized
/// only by VACUUM, which may not have run, and an unsummarized range must be read whole), and
/// the planner is kept from a sequential scan, which it picks when the table has no statistics
/// and which reads the whole table to find nothing in the common case. The ranges it deleted
/// from are summarized again after, so that the next pass skips them. Old ids are found through
/// the index on `ingested_at`, the planner kept from a sequential scan alike.
///
/// Summarizing a range keeps every row a running transaction may still see, deleted ones
/// included, and a transaction of any database begun before a deletion holds that horizon
/// back (a writer's always does under load): a range summarized then keeps the deleted times,
/// and every later pass would read it. So the ranges deleted from are recorded in the table
/// `retention_range`, and the next pass summarizes them once more first, when no transaction
/// of the time is left: whichever writer takes it, and after a restart.
pub async fn prune(
    client: &mut tokio_postgres::Client,
    readings: Period,
    ids: Option<Duration>,
) -> anyhow::Result<u64> {
    let timescale = client
        .query_opt(
            "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'",
            &[],
        )
        .await?
        .is_some();
    let mut deleted = 0;
    if let (false, Some(keep)) = (timescale, readings.0) {
        let mut summaries = true;
        summarize_time_index(client, Ranges::Recorded, &mut summaries).await;
        loop {
            let tx = client.transaction().await?;
            tx.batch_execute("SET LOCAL enable_seqscan = off").await?;
            let gone = tx
                .query(
                    "WITH gone AS (
                         DELETE FROM tag_reading WHERE ctid = ANY (ARRAY(
                             SELECT ctid FROM tag_reading WHERE time < now() - $1::text::interval LIMIT $3))
                         RETURNING ctid)
                     SELECT (ctid::text::point)[0]::bigint / $2 * $2, count(*) FROM gone GROUP BY 1",
                    &[&interval(keep), &BRIN_PAGES_PER_RANGE, &SLICE],
                )
                .await
                .context("deleting old readings")?;
            let ranges: Vec<i64> = gone.iter().map(|row| row.get(0)).collect();
            // Recorded with the deletion itself, so that a pass stopped right after it (a crash,
            // a restart) still leaves them to the next one. Only where summaries can be made:
            // the record is the index owner's, as they are.
            if summaries && !ranges.is_empty() {
                tx.execute(
                    "INSERT INTO retention_range (first_page) SELECT unnest($1::bigint[])
                     ON CONFLICT DO NOTHING",
                    &[&ranges],
                )
                .await
                .context("recording the ranges deleted from")?;
            }
            tx.commit().await?;
            let n: i64 = gone.iter().map(|row| row.get::<_, i64>(1)).sum();
            deleted += n as u64;
            // The ranges deleted from still hold the deleted times in their summaries: summarized
            // again from what they hold now, the next slice skips them; the next pass summarizes
            // them once more (they are recorded), in case a running transaction kept those times.
            summarize_time_index(client, Ranges::DeletedFrom(&ranges), &mut summaries).await;
            if n < SLICE {
                break;
            }
        }
    }
    while let Some(ids) = ids {
        // The index on ingested_at finds the old ids; the primary key deletes them. Without
        // statistics the planner guesses that a third of the ids are old and reads the table
        // from its start until it has a slice: all of it, a month of ids, when none is.
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL enable_seqscan = off").await?;
        let n = tx
            .execute(
                "DELETE FROM ingested_message WHERE id = ANY (ARRAY(
                     SELECT id FROM ingested_message WHERE ingested_at < now() - $1::text::interval LIMIT $2))",
                &[&interval(ids), &SLICE],
            )
            .await
            .context("deleting old ingested-message ids")?;
        tx.commit().await?;
        deleted += n;
        if n < SLICE as u64 {
            break;
        }
    }
    Ok(deleted)
}

/// Which ranges of `tag_reading_time_brin` [`summarize_time_index`] summarizes again.
enum Ranges<'a> {
    /// Those an earlier pass deleted from (recorded in `retention_range`), which it forgets once
    /// summarized.
    Recorded,
    /// Those starting at these pages, which this pass deleted from (and recorded for the next).
    DeletedFrom(&'a [i64]),
}

/// Summarizes the page ranges of `tag_reading`'s BRIN index on `time` that have none, after
/// dropping the summaries of the ranges `again`. Best effort: it needs the index's owner (the
/// role that ran the migrations), and without it a pass is still correct, only slower; said once
/// per pass (`summaries` turns false).
async fn summarize_time_index(
    client: &mut tokio_postgres::Client,
    again: Ranges<'_>,
    summaries: &mut bool,
) {
    if !*summaries {
        return;
    }
    let summarized = async {
        // One transaction: recorded ranges are forgotten only once summarized again.
        let tx = client.transaction().await?;
        let recorded: Vec<i64>;
        let pages = match again {
            Ranges::Recorded => {
                recorded = tx
                    .query("DELETE FROM retention_range RETURNING first_page", &[])
                    .await?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                &recorded
            }
            Ranges::DeletedFrom(pages) => pages,
        };
        if !pages.is_empty() {
            tx.execute(
                "SELECT brin_desummarize_range('tag_reading_time_brin', page)
                   FROM unnest($1::bigint[]) page",
                &[&pages],
            )
            .await?;
        }
        tx.execute(
            "SELECT brin_summarize_new_values('tag_reading_time_brin')",
            &[],
        )
        .await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = summarized {
        tracing::warn!(
            error = %e,
            "retention: cannot summarize tag_reading's time index (run the writer as the role that \
             owns the tables): this pass reads more of the table than it needs"
        );
        *summaries = false;
    }
}

/// Rows deleted per transaction, at most.
const SLICE: i64 = 10_000;

/// Pages per range of `tag_reading_time_brin`: the default, which the migration keeps.
const BRIN_PAGES_PER_RANGE: i64 = 128;

/// An arbitrary constant naming the retention lock: one writer prunes at a time.
const PRUNE_LOCK: i64 = 0x6461_7461_7669_7a01;

/// How soon after a writer starts it prunes first: a writer restarted often still prunes, and
/// the index on `ingested_at` keeps a pass cheap however often it runs.
pub const FIRST_PRUNE_AFTER: Duration = Duration::from_secs(15);

/// A copy on its way when its original leaves RAW or DEAD: ids are kept this much longer.
const IDS_MARGIN: Duration = Duration::from_secs(86_400);

/// How long message ids are kept: as long as a copy of a message can come back, that is as long
/// as RAW (a replay) and DEAD (a re-queue) keep messages, plus [`IDS_MARGIN`]. Read from the
/// streams as they are, so that every writer uses the one setting the streams were made with,
/// whatever its own environment says. `None`: for ever (a stream without an age limit).
pub async fn ids_horizon(js: &async_nats::jetstream::Context) -> anyhow::Result<Option<Duration>> {
    let mut longest = Duration::ZERO;
    for name in [crate::streams::RAW_STREAM, crate::streams::DEAD_STREAM] {
        let mut stream = js
            .get_stream(name)
            .await
            .with_context(|| format!("reading the settings of stream {name}"))?;
        let max_age = stream.info().await?.config.max_age;
        if max_age.is_zero() {
            return Ok(None);
        }
        longest = longest.max(max_age);
    }
    Ok(Some(longest + IDS_MARGIN))
}

/// Deletes what retention no longer keeps ([`prune`]) [`FIRST_PRUNE_AFTER`] after start, then
/// every `every`, until `shutdown`; one process at a time, under an advisory lock. Message ids
/// are kept for [`ids_horizon`].
pub async fn prune_loop(
    pool: Pool,
    js: async_nats::jetstream::Context,
    readings: Period,
    every: Duration,
    shutdown: crate::shutdown::Shutdown,
) {
    let start = tokio::time::Instant::now() + FIRST_PRUNE_AFTER.min(every);
    let mut tick = tokio::time::interval_at(start, every);
    let mut told = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let pruned = async {
            let ids = ids_horizon(&js).await?;
            if told != Some(ids) {
                let kept = ids.map_or("for ever".to_owned(), |d| match d.as_secs() {
                    s if s % 86_400 == 0 => format!("{} days", s / 86_400),
                    _ => humantime::format_duration(d).to_string(),
                });
                tracing::info!(kept = %kept, "retention: message ids kept as long as RAW or DEAD keeps a message, plus a day");
                told = Some(ids);
            }
            let mut client = pool.get().await?;
            let locked: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&PRUNE_LOCK])
                .await?
                .get(0);
            if !locked {
                return Ok(0);
            }
            let result = prune(&mut client, readings, ids).await;
            client
                .execute("SELECT pg_advisory_unlock($1)", &[&PRUNE_LOCK])
                .await?;
            result
        }
        .await;
        match pruned {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "retention: old rows deleted"),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "retention: pruning failed; retrying later"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_reads_durations_or_off() {
        assert_eq!(parse_optional_duration("off"), Ok(Period(None)));
        assert_eq!(
            parse_optional_duration("90d"),
            Ok(Period(Some(Duration::from_secs(90 * 86_400))))
        );
        assert!(parse_optional_duration("soon").is_err());
        assert_eq!(interval(Duration::from_secs(86_400)), "1 days");
        assert_eq!(interval(Duration::from_secs(90)), "90 seconds");
    }
}
