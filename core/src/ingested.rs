//! `ingested_message`: the messages whose readings are stored.
//!
//! The writer records each message there in the same transaction as its rows, under its key
//! ([`key`]: the message's id led by the time of its readings, so that inserts go to the
//! primary key's right edge); a copy of the message finds its key and stores nothing. Ids that
//! versions before the keys stored as they were are found by the id itself, for as long as any
//! may remain ([`EarlierIds`]).

use crate::message::MessageReadings;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The key `unit`'s id is stored under ([`crate::identity::stored_key`]).
pub fn key(unit: &MessageReadings) -> Uuid {
    crate::identity::stored_key(unit.time, unit.id)
}

/// Whether `ingested_message` may still hold ids stored before the keys: asked of the database
/// the first time, then again every ten minutes while it may (the writer's retention forgets
/// them in time), never once none remain. Clones share what they learn.
#[derive(Debug, Clone, Default)]
pub struct EarlierIds(Arc<Mutex<Earlier>>);

#[derive(Debug, Default, Clone, Copy)]
enum Earlier {
    #[default]
    Unknown,
    Held(Instant),
    Gone,
}

/// Rows from before a day after the keys began (`ingested_message_keyed`, migration 5) may be
/// ids stored as they were: the day covers a writer of an earlier version stopped late.
const EARLIER_HELD: &str = "SELECT EXISTS (
    SELECT 1 FROM ingested_message_keyed k
    WHERE EXISTS (SELECT 1 FROM ingested_message
                  WHERE ingested_at < k.since + interval '1 day'))";

impl EarlierIds {
    const RECHECK: Duration = Duration::from_secs(600);

    pub async fn held(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<bool, tokio_postgres::Error> {
        let known = *self.0.lock().expect("earlier ids lock");
        match known {
            Earlier::Gone => return Ok(false),
            Earlier::Held(at) if at.elapsed() < Self::RECHECK => return Ok(true),
            Earlier::Held(_) | Earlier::Unknown => {}
        }
        let held: bool = client.query_one(EARLIER_HELD, &[]).await?.get(0);
        *self.0.lock().expect("earlier ids lock") = match held {
            true => Earlier::Held(Instant::now()),
            false => Earlier::Gone,
        };
        Ok(held)
    }
}

/// The ids of the `units` already stored: found by key, or by the id itself while ids stored
/// before the keys may remain.
pub async fn stored<'a>(
    client: &tokio_postgres::Client,
    earlier: &EarlierIds,
    units: impl IntoIterator<Item = &'a MessageReadings>,
) -> Result<HashSet<Uuid>, tokio_postgres::Error> {
    let with_ids = earlier.held(client).await?;
    let mut owners = HashMap::new();
    for unit in units {
        owners.insert(key(unit), unit.id);
        if with_ids {
            owners.insert(unit.id, unit.id);
        }
    }
    found(client, owners).await
}

/// The ids of the `units` stored as they were, before the keys; none, without a query, once
/// no such id remains.
pub async fn stored_before_keys<'a>(
    client: &tokio_postgres::Client,
    earlier: &EarlierIds,
    units: impl IntoIterator<Item = &'a MessageReadings>,
) -> Result<HashSet<Uuid>, tokio_postgres::Error> {
    if !earlier.held(client).await? {
        return Ok(HashSet::new());
    }
    found(client, units.into_iter().map(|u| (u.id, u.id)).collect()).await
}

/// The keys among `keys` that `ingested_message` holds.
pub async fn stored_keys(
    client: &tokio_postgres::Client,
    keys: &[Uuid],
) -> Result<HashSet<Uuid>, tokio_postgres::Error> {
    found(client, keys.iter().map(|k| (*k, *k)).collect()).await
}

/// The owners of the keys of `owners` (key → id) that `ingested_message` holds.
async fn found(
    client: &tokio_postgres::Client,
    owners: HashMap<Uuid, Uuid>,
) -> Result<HashSet<Uuid>, tokio_postgres::Error> {
    if owners.is_empty() {
        return Ok(HashSet::new());
    }
    let keys: Vec<Uuid> = owners.keys().copied().collect();
    let rows = client
        .query(
            "SELECT id FROM ingested_message WHERE id = ANY($1)",
            &[&keys],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| owners.get(&row.get::<_, Uuid>(0)).copied())
        .collect())
}
