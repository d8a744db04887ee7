//! The writer: READINGS → `tag_reading`.
//!
//! The units of each fetch of READINGS messages (a unit: one raw message's readings,
//! [`MessageReadings`]) are written in one transaction: their ids (the messages' identities,
//! [`dataviz_core::identity`]) go into `ingested_message` under their keys
//! ([`dataviz_core::ingested`]; ids already there are skipped: a redelivery, a replay, a
//! copy), and the rows of the new ones are streamed with binary COPY,
//! the fastest path PostgreSQL offers. The messages are acknowledged after the commit; a crash
//! before that means a redelivery, which the ids absorb, so a unit stored once or five times,
//! packed alike or not, leaves the same rows.
//!
//! Failures are sorted by kind ([`dataviz_core::db::ErrorKind`], from the SQLSTATE): a write
//! PostgreSQL refuses for its data is split to find the unit at fault, which goes to DEAD;
//! anything else is retried. The writer says what became of each message ([`Writer`] is a
//! [`Stage`]); the consume loop acknowledges.

use async_nats::jetstream;
use dataviz_core::{
    consume::{self, Failure, Settle, Stage},
    db::{self, DbError, ErrorKind},
    ingested::{self, EarlierIds},
    message::{
        DeadLetter, DeadReason, MessageReadings, READINGS_MESSAGE_BYTES, RawMessage,
        ReadingsMessage, Unreadable,
    },
    ops::{Progress, metric},
    shutdown::Shutdown,
    streams,
    value::Value,
};
use deadpool_postgres::Pool;
use std::pin::pin;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// Writer settings.
#[derive(Debug, Clone, clap::Args)]
pub struct WriterConfig {
    /// READINGS messages written per transaction, at most; the message that reaches 256 KiB is
    /// also the last (each holds the readings of up to one processor batch of one gateway,
    /// 256 KiB at most, or one unit larger than that).
    #[arg(
        long,
        env = "WRITER_BATCH_SIZE",
        value_name = "WRITER_BATCH_SIZE",
        default_value_t = 16
    )]
    pub writer_batch_size: usize,
    /// Concurrent consume loops in this process, each writing its own transactions: one at a
    /// time, the writer waits on a single PostgreSQL backend while the others sit idle.
    #[arg(long, env = "WRITER_WORKER_COUNT", value_name = "WRITER_WORKER_COUNT", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub writer_worker_count: u16,
    /// How often old readings (plain PostgreSQL) and old message ids are deleted, the first
    /// time 15 s after start. Ids are kept as long as RAW or DEAD keeps messages, plus a day.
    #[arg(long, env = "RETENTION_CHECK_EVERY", value_name = "RETENTION_CHECK_EVERY", default_value = "1h", value_parser = humantime::parse_duration)]
    pub retention_check_every: std::time::Duration,
}

/// What [`write`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Messages whose rows were written now.
    pub messages: usize,
    /// Messages skipped because their rows were already there.
    pub duplicates: usize,
    pub rows: u64,
}

/// Writes units in one transaction, skipping those already written.
///
/// Nearly every write holds new messages only, and a plain insert of their keys costs about
/// two thirds of one that must skip the keys already there (`ON CONFLICT DO NOTHING
/// RETURNING`). So the plain insert goes first; when a key is already stored (a redelivery, a
/// replay, a unit held twice), the primary key refuses it, the transaction is rolled back and
/// run again keeping the new messages only. While ids stored before the keys may remain
/// (`earlier`), they are looked up first, and a unit stored under its id is skipped alike.
pub async fn write(
    pool: &Pool,
    earlier: &EarlierIds,
    units: &[MessageReadings],
) -> Result<Written, DbError> {
    let mut client = pool.get().await?;
    let keys: Vec<Uuid> = units.iter().map(ingested::key).collect();
    // Inserted in one order whoever writes: two transactions holding some of the same keys
    // (the writer's loops, several writers, a unit and its redelivery) then wait on the first
    // key they share, where in their own orders each could hold a key the other waits for,
    // a deadlock PostgreSQL breaks only after a second (`deadlock_timeout`).
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    let stored_as_ids = ingested::stored_before_keys(&client, earlier, units).await?;
    if stored_as_ids.is_empty() {
        let tx = client.transaction().await?;
        let inserted = tx
            .execute(
                "INSERT INTO ingested_message (id) SELECT unnest($1::uuid[])",
                &[&sorted],
            )
            .await;
        match inserted {
            Ok(_) => {
                let rows = copy_rows(&tx, "tag_reading", units.iter()).await?;
                tx.commit().await?;
                return Ok(Written {
                    messages: units.len(),
                    duplicates: 0,
                    rows,
                });
            }
            // Dropped, the transaction rolls back.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let tx = client.transaction().await?;
    let new: std::collections::HashSet<Uuid> = tx
        .query(
            "INSERT INTO ingested_message (id) SELECT unnest($1::uuid[])
             ON CONFLICT DO NOTHING RETURNING id",
            &[&sorted],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    // Each unit once, even when a fetch holds it twice.
    let mut done = std::collections::HashSet::with_capacity(new.len());
    let fresh: Vec<&MessageReadings> = units
        .iter()
        .zip(&keys)
        .filter(|(unit, key)| {
            new.contains(key) && !stored_as_ids.contains(&unit.id) && done.insert(**key)
        })
        .map(|(unit, _)| unit)
        .collect();
    let mut written = Written {
        messages: fresh.len(),
        duplicates: units.len() - fresh.len(),
        rows: 0,
    };
    if !fresh.is_empty() {
        written.rows = copy_rows(&tx, "tag_reading", fresh.into_iter()).await?;
    }
    tx.commit().await?;
    Ok(written)
}

/// Streams the rows of `units` into `table` (`tag_reading`, or a table of its columns) with
/// binary COPY. Rows written.
pub async fn copy_rows<'a>(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    units: impl Iterator<Item = &'a MessageReadings>,
) -> Result<u64, DbError> {
    let sink = tx.copy_in(&db::copy_readings(table)).await?;
    let mut writer = pin!(BinaryCopyInWriter::new(sink, &db::TAG_READING_TYPES));
    for unit in units {
        for reading in &unit.readings {
            let (num, boolean, text, json) = columns(&reading.value);
            let value_type = reading.value.stored_type().as_str();
            let row: [&(dyn ToSql + Sync); 9] = [
                &unit.time,
                &unit.device_id,
                &reading.tag_id,
                &unit.gateway_id,
                &num,
                &boolean,
                &text,
                &json,
                &value_type,
            ];
            writer.as_mut().write(&row).await?;
        }
    }
    Ok(writer.as_mut().finish().await?)
}

/// A value spread over the typed columns.
fn columns(
    value: &Value,
) -> (
    Option<f64>,
    Option<bool>,
    Option<&str>,
    Option<&serde_json::Value>,
) {
    match value {
        // Integers are stored in the numeric column; they are exact up to 2^53.
        Value::Integer(i) => (Some(*i as f64), None, None, None),
        Value::Double(f) => (Some(*f), None, None, None),
        Value::Boolean(b) => (None, Some(*b), None, None),
        Value::Text(s) => (None, None, Some(s.as_str()), None),
        Value::Json(j) => (None, None, None, Some(j)),
        Value::Null => (None, None, None, None),
    }
}

/// The writer stage: READINGS messages to rows.
#[derive(Debug, Clone)]
pub struct Writer {
    pub pool: Pool,
    /// Where the originals of refused units are read (RAW) and their letters stored.
    pub js: jetstream::Context,
    /// Whether ids stored before the keys may remain.
    pub earlier: EarlierIds,
}

impl Writer {
    pub fn new(pool: Pool, js: jetstream::Context) -> Writer {
        Writer {
            pool,
            js,
            earlier: EarlierIds::default(),
        }
    }
}

impl Stage for Writer {
    const NAME: &'static str = "writer";
    /// One full READINGS message's bytes at a time: decoded, a unit takes several times its
    /// bytes (each reading's tag and value on the heap), and fetches of up to sixteen messages,
    /// decoded whole by each of the writer's loops, were the largest part of `dataviz all`'s
    /// heap under load (16 MB at its peak, in two loops).
    const BATCH_BYTES: usize = READINGS_MESSAGE_BYTES;

    /// Writes the units of a fetch in one transaction. A message is done once each of its
    /// units is written (or was already); what PostgreSQL refuses for its data is found unit
    /// by unit and goes to DEAD alone; anything else is retried.
    async fn handle(&self, messages: &[jetstream::Message]) -> Vec<Settle> {
        let mut settles: Vec<Settle> = Vec::with_capacity(messages.len());
        // The units of every readable message, and for each the index of its message.
        let mut units = Vec::with_capacity(messages.len());
        let mut homes = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            if let Ok(parsed) = ReadingsMessage::parse(&message.payload) {
                homes.extend(std::iter::repeat_n(index, parsed.len()));
                units.extend(parsed);
                settles.push(Settle::Done);
                continue;
            }
            // Not readable whole: unit by unit, so that one unit takes no other with it.
            let mut letters = Vec::new();
            match ReadingsMessage::parse_each(&message.payload) {
                Ok(parts) => {
                    for part in parts {
                        match part {
                            Ok(unit) => {
                                homes.push(index);
                                units.push(unit);
                            }
                            Err(unreadable) => {
                                letters.push(self.unreadable(message, unreadable).await)
                            }
                        }
                    }
                }
                Err(e) => {
                    let raw =
                        RawMessage::received(message.subject.to_string(), message.payload.clone());
                    let error = format!("not a readings message: {e}");
                    letters.push(refused(raw, DeadReason::BadBatch, error));
                }
            }
            settles.push(match letters.is_empty() {
                true => Settle::Done,
                false => Settle::Dead(letters),
            });
        }
        if units.is_empty() {
            return settles;
        }
        match write(&self.pool, &self.earlier, &units).await {
            Ok(written) => {
                tracing::debug!(
                    messages = written.messages,
                    duplicates = written.duplicates,
                    rows = written.rows,
                    "units written"
                );
                count_written(&written, &units);
            }
            Err(e) if e.kind() == ErrorKind::Permanent => {
                if units.len() > 1 {
                    tracing::warn!(error = %e, units = units.len(), "write refused for its data; writing its units one by one");
                }
                for (unit, home) in units.iter().zip(homes) {
                    let one = std::slice::from_ref(unit);
                    let outcome = match write(&self.pool, &self.earlier, one).await {
                        Ok(written) => {
                            count_written(&written, one);
                            continue;
                        }
                        Err(e) if e.kind() == ErrorKind::Permanent => {
                            Settle::dead(self.refused_unit(unit, e).await)
                        }
                        Err(e) => Settle::retry(Failure::Database, e),
                    };
                    let settle = std::mem::replace(&mut settles[home], Settle::Done);
                    settles[home] = merge(settle, outcome);
                }
            }
            Err(e) => {
                for home in homes {
                    settles[home] = Settle::retry(Failure::Database, &e);
                }
            }
        }
        settles
    }
}

/// A message's settle from those of its units: retried if one must be (the units written
/// meanwhile are skipped when it comes back), dead with every refused unit's letter otherwise.
fn merge(message: Settle, unit: Settle) -> Settle {
    match (message, unit) {
        (retry @ Settle::Retry(_), _) | (_, retry @ Settle::Retry(_)) => retry,
        (Settle::Dead(mut letters), Settle::Dead(more)) => {
            letters.extend(more);
            Settle::Dead(letters)
        }
        (Settle::Done, other) | (other, Settle::Done) => other,
    }
}

/// Counts what a committed write did, and how long its messages took from the bridge.
fn count_written(written: &Written, units: &[MessageReadings]) {
    metrics::counter!(metric::WRITER_MESSAGES).increment(written.messages as u64);
    metrics::counter!(metric::WRITER_ROWS).increment(written.rows);
    metrics::counter!(metric::WRITER_DUPLICATES).increment(written.duplicates as u64);
    let now = chrono::Utc::now();
    let latency = metrics::histogram!(metric::END_TO_END_SECONDS);
    for unit in units {
        latency.record((now - unit.received_at).as_seconds_f64().max(0.0));
    }
}

impl Writer {
    /// The dead letter of one unit PostgreSQL refused. It carries the original message, read
    /// back from RAW, so that `dlq requeue` sends it through the processor again; when RAW no
    /// longer holds it, a payload the processor reads back into the same unit.
    async fn refused_unit(&self, unit: &MessageReadings, error: DbError) -> DeadLetter {
        let raw = match unit.raw_seq {
            Some(seq) => streams::raw_original(&self.js, seq, unit.id).await,
            None => None,
        };
        let raw = raw.unwrap_or_else(|| RawMessage {
            id: unit.id,
            topic: format!("gateways/{}/{}", unit.gateway_id, unit.device_code),
            received_at: unit.received_at,
            payload: unit.to_payload(),
        });
        refused(
            raw,
            DeadReason::Unstorable,
            format!("refused by PostgreSQL: {error}"),
        )
    }

    /// The dead letter of a unit that cannot be read: its original from RAW when its id and
    /// sequence can be read, else the unit as it travelled.
    async fn unreadable(&self, message: &jetstream::Message, unit: Unreadable) -> DeadLetter {
        let original = match (unit.raw_seq, unit.id) {
            (Some(seq), Some(id)) => streams::raw_original(&self.js, seq, id).await,
            _ => None,
        };
        let raw = original.unwrap_or_else(|| {
            RawMessage::received(message.subject.to_string(), unit.bytes.into())
        });
        let error = format!(
            "a unit of a readings message cannot be read: {}",
            unit.error
        );
        refused(raw, DeadReason::BadBatch, error)
    }
}

fn refused(raw: RawMessage, reason: DeadReason, error: String) -> DeadLetter {
    DeadLetter {
        raw,
        stage: Writer::NAME.into(),
        reason,
        error,
        source_seq: None,
        whole_size: None,
    }
}

/// Consumes READINGS until `shutdown`, on the durable `consumer`
/// ([`dataviz_core::streams::StreamSettings::writer_consumer`]), in `writer_worker_count`
/// loops. Each message is written by one of them; a unit two of them hold at once (a
/// redelivery racing its first copy) is stored once, as with several writers
/// ([`write`]: the second insert of its key waits for the first transaction, then skips it).
pub async fn run(
    config: WriterConfig,
    consumer: async_nats::jetstream::consumer::pull::Config,
    js: jetstream::Context,
    pool: Pool,
    progress: &Progress,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let writer = Writer::new(pool, js.clone());
    let loops = (0..config.writer_worker_count).map(|_| {
        consume::run(
            &writer,
            &js,
            streams::READINGS_STREAM,
            consumer.clone(),
            config.writer_batch_size,
            progress,
            &shutdown,
        )
    });
    futures::future::try_join_all(loops).await?;
    Ok(())
}
