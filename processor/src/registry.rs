//! Gateways, devices and tags: looked up, created on first sight, cached.
//!
//! The cache answers almost every message without a query; the database is asked only for a
//! device or tag not seen yet, or a tag whose type changes. Creation is race-free across
//! processor instances (`INSERT … ON CONFLICT`), and a type change is a compare-and-set, so two
//! instances seeing different types converge on the same rule ([`DataType::merge`]).
//!
//! Devices and tags are cached up to [`CACHE_BYTES`], weighed by their codes: past it the cache
//! starts over, and what it forgot is asked of the database again (the same upserts, which
//! return the same ids and the stored types).

use chrono::{DateTime, Utc};
use dataviz_core::db::DbError;
use dataviz_core::value::{DataType, Value};
use deadpool_postgres::Pool;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
// tokio's clock, so that tests can drive the unknown-gateway expiry with paused time.
use thiserror::Error;
use tokio::time::Instant;

/// How long "this gateway does not exist" is believed before asking again: long enough that a
/// flood from an unknown gateway costs one query a second, short enough that a gateway just
/// created is seen before anyone can re-queue its dead letters.
const UNKNOWN_GATEWAY_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum RegistryError {
    /// Permanent for this message: no gateway has this id.
    #[error("unknown gateway {0}: no gateway has this id (create it, then re-queue the message)")]
    UnknownGateway(i32),
    /// The database failed: transient (unreachable, a conflict) or permanent (it refuses
    /// this message's data), as [`DbError::kind`] says.
    #[error("database: {0}")]
    Database(#[from] DbError),
}

impl From<tokio_postgres::Error> for RegistryError {
    fn from(e: tokio_postgres::Error) -> Self {
        RegistryError::Database(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for RegistryError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        RegistryError::Database(e.into())
    }
}

/// The ids a message's readings are stored under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub device_id: i64,
    /// One per reading, in payload order.
    pub tag_ids: Vec<i64>,
}

/// What the devices and tags kept in the cache may weigh: each entry its code's bytes plus
/// [`ENTRY_BYTES`]. Codes are at most 255 bytes; devices named without end (by a device
/// generating codes, or many thousands of tags) must not take the processor's memory with them.
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The weight of a cached device or tag beside its code: the rest of its key, its value, the
/// map's own share.
const ENTRY_BYTES: usize = 64;

/// The weight of a device's own map of tags, beside its entries: its first table and its
/// place in the map of devices.
const TAG_MAP_BYTES: usize = 256;

#[derive(Default)]
struct Cache {
    /// The most `devices` and `tags` may weigh ([`CACHE_BYTES`] but in tests).
    limit: usize,
    /// What `devices` and `tags` weigh, counted at each insertion (an overwrite counts again:
    /// the cache starts over a little early, never late).
    weight: usize,
    gateways: HashMap<i32, bool>,
    unknown_gateways: HashMap<i32, Instant>,
    /// Devices by gateway, then code; tags by device, then code: nested, so that a lookup by
    /// a borrowed code allocates nothing (ten tags per message, each looked up).
    devices: HashMap<i32, HashMap<String, i64>>,
    tags: HashMap<i64, HashMap<String, (i64, DataType)>>,
    /// Last receive time per device, written to `device.last_seen_at` by [`Registry::flush_last_seen`].
    last_seen: HashMap<i64, DateTime<Utc>>,
}

/// Unknown gateway ids remembered at most: topics name any id, and a flood of made-up ones must
/// not grow the cache without bound.
const UNKNOWN_GATEWAYS_KEPT: usize = 10_000;

impl Cache {
    /// What is known of a gateway without asking: it exists, or it was found missing less than
    /// [`UNKNOWN_GATEWAY_TTL`] ago; `None` when the database must be asked.
    fn gateway(&self, gateway_id: i32) -> Option<Result<(), RegistryError>> {
        if self.gateways.contains_key(&gateway_id) {
            return Some(Ok(()));
        }
        self.unknown_gateways
            .get(&gateway_id)
            .is_some_and(|at| at.elapsed() < UNKNOWN_GATEWAY_TTL)
            .then_some(Err(RegistryError::UnknownGateway(gateway_id)))
    }

    fn device(&self, gateway_id: i32, code: &str) -> Option<i64> {
        self.devices.get(&gateway_id)?.get(code).copied()
    }

    /// Notes a device's sighting, kept until [`Registry::flush_last_seen`] writes it.
    fn seen(&mut self, device_id: i64, at: DateTime<Utc>) {
        let last = self.last_seen.entry(device_id).or_insert(at);
        *last = (*last).max(at);
    }

    /// Makes room for an entry with a code of `code_len` bytes and `more` bytes of its own:
    /// past the limit, the devices and tags are forgotten.
    fn weigh(&mut self, code_len: usize, more: usize) {
        let entry = code_len + ENTRY_BYTES + more;
        if self.weight + entry > self.limit {
            tracing::info!(
                devices = self.devices.values().map(HashMap::len).sum::<usize>(),
                tags = self.tags.values().map(HashMap::len).sum::<usize>(),
                bytes = self.weight,
                "registry cache full: starting over (what it forgets is read again when needed)"
            );
            self.devices.clear();
            self.tags.clear();
            self.weight = 0;
        }
        self.weight += entry;
    }

    fn keep_device(&mut self, gateway_id: i32, code: &str, id: i64) {
        self.weigh(code.len(), 0);
        (self.devices.entry(gateway_id).or_default()).insert(code.to_owned(), id);
    }

    fn keep_tag(&mut self, device_id: i64, code: &str, tag: (i64, DataType)) {
        // A device's first tag brings its map (counted again if the cache starts over here:
        // early, never late).
        self.weigh(code.len(), TAG_MAP_BYTES);
        let tags = self.tags.entry(device_id).or_default();
        if !tags.is_empty() {
            self.weight -= TAG_MAP_BYTES;
        }
        tags.insert(code.to_owned(), tag);
    }

    /// Remembers that `gateway_id` does not exist, for [`UNKNOWN_GATEWAY_TTL`].
    fn unknown_gateway(&mut self, gateway_id: i32) {
        if self.unknown_gateways.len() >= UNKNOWN_GATEWAYS_KEPT {
            self.unknown_gateways
                .retain(|_, at| at.elapsed() < UNKNOWN_GATEWAY_TTL);
            if self.unknown_gateways.len() >= UNKNOWN_GATEWAYS_KEPT {
                // All within the second: forgetting them costs a query each, no more.
                self.unknown_gateways.clear();
            }
        }
        self.unknown_gateways.insert(gateway_id, Instant::now());
    }
}

/// The registry, shared by the workers of one processor.
pub struct Registry {
    pool: Pool,
    cache: Mutex<Cache>,
}

impl Registry {
    pub fn new(pool: Pool) -> Registry {
        Registry::with_cache_bytes(pool, CACHE_BYTES)
    }

    /// A registry whose devices and tags cache weighs at most `limit` bytes.
    pub fn with_cache_bytes(pool: Pool, limit: usize) -> Registry {
        Registry {
            pool,
            cache: Mutex::new(Cache {
                limit,
                ..Cache::default()
            }),
        }
    }

    /// What the cached devices and tags weigh now (see [`CACHE_BYTES`]).
    pub fn cache_bytes(&self) -> usize {
        self.cache().weight
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves plain maps behind; they stay usable.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the cache alone says of a message's device and tags, under one lock, as
    /// [`Registry::resolve`] would: `None` when the database must be asked (a gateway, device
    /// or tag not cached, or a tag whose type the message changes).
    pub fn resolve_cached(
        &self,
        gateway_id: i32,
        device_code: &str,
        readings: &[(String, Value)],
        seen_at: DateTime<Utc>,
    ) -> Option<Result<Resolved, RegistryError>> {
        let mut cache = self.cache();
        if let Err(unknown) = cache.gateway(gateway_id)? {
            return Some(Err(unknown));
        }
        let device_id = cache.device(gateway_id, device_code)?;
        let tags = cache.tags.get(&device_id);
        let mut tag_ids = Vec::with_capacity(readings.len());
        for (code, value) in readings {
            let (id, current) = tags?.get(code.as_str())?;
            if current.merge(value.data_type()) != *current {
                return None;
            }
            tag_ids.push(*id);
        }
        cache.seen(device_id, seen_at);
        Some(Ok(Resolved { device_id, tag_ids }))
    }

    /// Finds or creates the device and its tags, updating tag types as values require.
    pub async fn resolve(
        &self,
        gateway_id: i32,
        device_code: &str,
        readings: &[(String, Value)],
        seen_at: DateTime<Utc>,
    ) -> Result<Resolved, RegistryError> {
        self.check_gateway(gateway_id).await?;
        let device_id = self.device(gateway_id, device_code).await?;
        let tag_ids = match self.tags(device_id, readings).await {
            Ok(ids) => ids,
            // The device was deleted under the cache: forget it and start over once.
            Err(TagsError::DeviceGone) => {
                self.forget_device(gateway_id, device_code, device_id);
                let device_id = self.device(gateway_id, device_code).await?;
                return match self.tags(device_id, readings).await {
                    Ok(tag_ids) => Ok(self.seen(device_id, tag_ids, seen_at)),
                    Err(TagsError::DeviceGone) => Err(RegistryError::Database(DbError::transient(
                        format!("device {device_id} disappeared while its tags were written"),
                    ))),
                    Err(TagsError::Registry(e)) => Err(e),
                };
            }
            Err(TagsError::Registry(e)) => return Err(e),
        };
        Ok(self.seen(device_id, tag_ids, seen_at))
    }

    fn seen(&self, device_id: i64, tag_ids: Vec<i64>, seen_at: DateTime<Utc>) -> Resolved {
        self.cache().seen(device_id, seen_at);
        Resolved { device_id, tag_ids }
    }

    /// How many unknown gateway ids the cache remembers now.
    pub fn unknown_gateways_kept(&self) -> usize {
        self.cache().unknown_gateways.len()
    }

    /// Fails unless the gateway exists (cached; an unknown id is asked again after a few seconds).
    pub async fn check_gateway(&self, gateway_id: i32) -> Result<(), RegistryError> {
        let known = self.cache().gateway(gateway_id);
        if let Some(known) = known {
            return known;
        }
        let client = self.pool.get().await?;
        let exists = client
            .query_opt("SELECT 1 FROM gateway WHERE id = $1", &[&gateway_id])
            .await?
            .is_some();
        let mut cache = self.cache();
        if exists {
            cache.unknown_gateways.remove(&gateway_id);
            cache.gateways.insert(gateway_id, true);
            Ok(())
        } else {
            cache.unknown_gateway(gateway_id);
            Err(RegistryError::UnknownGateway(gateway_id))
        }
    }

    async fn device(&self, gateway_id: i32, code: &str) -> Result<i64, RegistryError> {
        let cached = self.cache().device(gateway_id, code);
        if let Some(id) = cached {
            return Ok(id);
        }
        let client = self.pool.get().await?;
        // Read first, as for tags: an existing device costs no commit.
        if let Some(row) = client
            .query_opt(
                "SELECT id FROM device WHERE gateway_id = $1 AND code = $2",
                &[&gateway_id, &code],
            )
            .await?
        {
            let id = row.get(0);
            self.cache().keep_device(gateway_id, code, id);
            return Ok(id);
        }
        let row = client
            .query_one(
                "INSERT INTO device (gateway_id, code) VALUES ($1, $2)
                 ON CONFLICT (gateway_id, code) DO UPDATE SET code = EXCLUDED.code
                 RETURNING id",
                &[&gateway_id, &code],
            )
            .await;
        let id: i64 = match row {
            Ok(row) => row.get(0),
            Err(e) if is_foreign_key_violation(&e) => {
                // The gateway was deleted since it was cached.
                let mut cache = self.cache();
                cache.gateways.remove(&gateway_id);
                cache.unknown_gateway(gateway_id);
                return Err(RegistryError::UnknownGateway(gateway_id));
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(target: dataviz_core::MQTT_LOG_TARGET, gateway_id, device = code, device_id = id, "device registered");
        self.cache().keep_device(gateway_id, code, id);
        Ok(id)
    }

    fn forget_device(&self, gateway_id: i32, code: &str, device_id: i64) {
        let mut cache = self.cache();
        if let Some(devices) = cache.devices.get_mut(&gateway_id) {
            devices.remove(code);
        }
        cache.tags.remove(&device_id);
        cache.last_seen.remove(&device_id);
    }

    async fn tags(
        &self,
        device_id: i64,
        readings: &[(String, Value)],
    ) -> Result<Vec<i64>, TagsError> {
        // What the cache knows, and what must change.
        let mut ids = vec![0i64; readings.len()];
        let mut missing: Vec<usize> = Vec::new();
        let mut retype: Vec<(i64, DataType, DataType, String)> = Vec::new();
        {
            let mut cache = self.cache();
            let mut tags = cache.tags.get_mut(&device_id);
            for (i, (code, value)) in readings.iter().enumerate() {
                match tags.as_mut().and_then(|tags| tags.get_mut(code)) {
                    Some((id, current)) => {
                        ids[i] = *id;
                        let wanted = current.merge(value.data_type());
                        if wanted != *current {
                            retype.push((*id, *current, wanted, code.clone()));
                            // Later readings of the same tag in this message see the new type.
                            *current = wanted;
                        }
                    }
                    None => missing.push(i),
                }
            }
        }
        if missing.is_empty() && retype.is_empty() {
            return Ok(ids);
        }
        let client = self.pool.get().await.map_err(RegistryError::from)?;
        if !missing.is_empty() {
            let mut codes: Vec<&str> = Vec::new();
            let mut types: Vec<&str> = Vec::new();
            for &i in &missing {
                let (code, value) = &readings[i];
                if !codes.contains(&code.as_str()) {
                    codes.push(code);
                    types.push(value.stored_type().as_str());
                }
            }
            const SELECT: &str =
                "SELECT id, code, data_type FROM tag WHERE device_id = $1 AND code = ANY($2)";
            // Read first: after a start every tag is a miss once, and a read costs no commit
            // (an upsert that finds the row still waits for its WAL flush).
            let mut rows =
                (client.query(SELECT, &[&device_id, &codes]).await).map_err(RegistryError::from)?;
            if rows.len() < codes.len() {
                let inserted = client
                    .execute(
                        "INSERT INTO tag (device_id, code, data_type)
                         SELECT $1, code, data_type FROM unnest($2::text[], $3::text[]) AS t (code, data_type)
                         ON CONFLICT (device_id, code) DO NOTHING",
                        &[&device_id, &codes, &types],
                    )
                    .await;
                if let Err(e) = inserted {
                    return Err(if is_foreign_key_violation(&e) {
                        TagsError::DeviceGone
                    } else {
                        TagsError::Registry(e.into())
                    });
                }
                tracing::info!(target: dataviz_core::MQTT_LOG_TARGET, device_id, tags = ?codes, "tags registered");
                rows = (client.query(SELECT, &[&device_id, &codes]).await)
                    .map_err(RegistryError::from)?;
            }
            let mut found: HashMap<String, (i64, DataType)> = HashMap::new();
            for row in rows {
                let code: String = row.get(1);
                let ty: String = row.get(2);
                let ty = DataType::from_pg_name(&ty).unwrap_or(DataType::Text);
                found.insert(code, (row.get(0), ty));
            }
            let mut cache = self.cache();
            for &i in &missing {
                let (code, value) = &readings[i];
                let Some((id, current)) = found.get_mut(code) else {
                    return Err(TagsError::Registry(RegistryError::Database(
                        DbError::transient(format!(
                            "tag {code:?} of device {device_id} not found after insertion"
                        )),
                    )));
                };
                ids[i] = *id;
                let wanted = current.merge(value.data_type());
                if wanted != *current {
                    retype.push((*id, *current, wanted, code.clone()));
                    *current = wanted;
                }
                cache.keep_tag(device_id, code, (*id, *current));
            }
            drop(cache);
        }
        for (id, from, to, code) in retype {
            self.retype(&client, device_id, id, from, to, &code).await?;
        }
        Ok(ids)
    }

    /// Changes a tag's type from `from` to `to`, unless someone changed it first; then applies
    /// the rule to what they wrote.
    async fn retype(
        &self,
        client: &deadpool_postgres::Client,
        device_id: i64,
        tag_id: i64,
        mut from: DataType,
        mut to: DataType,
        code: &str,
    ) -> Result<(), RegistryError> {
        for _ in 0..5 {
            let changed = client
                .execute(
                    "UPDATE tag SET data_type = $2, updated_at = now() WHERE id = $1 AND data_type = $3",
                    &[&tag_id, &to.as_str(), &from.as_str()],
                )
                .await?;
            if changed == 1 {
                tracing::info!(target: dataviz_core::MQTT_LOG_TARGET, device_id, tag = code, from = %from, to = %to, "tag type changed");
                break;
            }
            let Some(row) = client
                .query_opt("SELECT data_type FROM tag WHERE id = $1", &[&tag_id])
                .await?
            else {
                break;
            };
            let stored: String = row.get(0);
            from = DataType::from_pg_name(&stored).unwrap_or(DataType::Text);
            let merged = from.merge(Some(to));
            if merged == from {
                to = from;
                break;
            }
            to = merged;
        }
        self.cache().keep_tag(device_id, code, (tag_id, to));
        Ok(())
    }

    /// Writes the devices' last receive times gathered since the last call.
    pub async fn flush_last_seen(&self) -> Result<usize, RegistryError> {
        let pending: Vec<(i64, DateTime<Utc>)> = self.cache().last_seen.drain().collect();
        if pending.is_empty() {
            return Ok(0);
        }
        let (ids, times): (Vec<i64>, Vec<DateTime<Utc>>) = pending.iter().cloned().unzip();
        let client = match self.pool.get().await {
            Ok(client) => client,
            Err(e) => {
                self.restore_last_seen(pending);
                return Err(e.into());
            }
        };
        let updated = client
            .execute(
                "UPDATE device SET last_seen_at = v.t
                 FROM unnest($1::bigint[], $2::timestamptz[]) AS v (id, t)
                 WHERE device.id = v.id AND device.last_seen_at < v.t",
                &[&ids, &times],
            )
            .await;
        match updated {
            Ok(n) => Ok(n as usize),
            Err(e) => {
                self.restore_last_seen(pending);
                Err(e.into())
            }
        }
    }

    fn restore_last_seen(&self, pending: Vec<(i64, DateTime<Utc>)>) {
        let mut cache = self.cache();
        for (id, t) in pending {
            let last = cache.last_seen.entry(id).or_insert(t);
            *last = (*last).max(t);
        }
    }
}

enum TagsError {
    DeviceGone,
    Registry(RegistryError),
}

impl From<RegistryError> for TagsError {
    fn from(e: RegistryError) -> Self {
        TagsError::Registry(e)
    }
}

fn is_foreign_key_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION)
}
