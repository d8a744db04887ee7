//! What the bridge knows of the MQTT messages it stored or is storing, by packet id: how it
//! tells a redelivery from a new message when the copy it stored is inside a pack.
//!
//! JetStream deduplicates a message stored alone under its own id (`Nats-Msg-Id`, from its
//! packet id and content). A pack ([`dataviz_core::pack`]) has one id for all its members, so
//! the broker's redelivery of a member would be stored again. The bridge therefore keeps, per
//! packet id, the content hash of the last message it took under it and whether RAW has it:
//! a redelivery (DUP flag) of that content is acknowledged at once when RAW has it, and waits
//! for the copy in flight otherwise. Every pack names its writer and its members' packet ids
//! and hashes in headers ([`HEADER_CLIENT`], [`HEADER_KEYS`]); a bridge that starts reads those
//! of the packs of its duplicate window back, so that what it stored before a crash is known
//! to it as what it stored before.

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use dataviz_core::message::RawMessage;
use dataviz_core::streams;
use futures::StreamExt as _;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;
use uuid::Uuid;

/// The pack header naming the MQTT client whose session its members came on.
pub const HEADER_CLIENT: &str = "Dataviz-Bridge-Client";
/// The pack header listing its QoS 1 members' `<packet id>:<content hash>`, comma-separated
/// (the hash as 16 hex digits).
pub const HEADER_KEYS: &str = "Dataviz-Bridge-Keys";

/// The content hash of a message: its topic and payload.
pub fn content_hash(raw: &RawMessage) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(
        raw.payload.as_ref(),
        xxhash_rust::xxh3::xxh3_64(raw.topic.as_bytes()),
    )
}

/// What becomes of a message received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A new message, or one the bridge knows nothing of: to store.
    Store,
    /// A redelivery of a message RAW has: to acknowledge without storing.
    Stored,
    /// A redelivery of a message whose copy is on its way to RAW (that raw id): acknowledged
    /// once that copy is stored.
    Waits(Uuid),
}

/// Per packet id, the last message taken under it. A table of every packet id, of a fixed
/// 1 MiB: a map grown to the 65,536 a busy session uses took 5 MB at its last growth, then
/// and there the largest allocation of `dataviz all` under a flood.
#[derive(Debug)]
pub struct Recent {
    /// Per packet id, the content hash of the last message taken under it.
    hashes: Box<[Option<u64>]>,
    /// The packet ids whose last message is on its way to RAW, with its raw id.
    in_flight: HashMap<u16, Uuid>,
}

impl Default for Recent {
    fn default() -> Recent {
        Recent {
            hashes: vec![None; usize::from(u16::MAX) + 1].into_boxed_slice(),
            in_flight: HashMap::new(),
        }
    }
}

impl Recent {
    /// What becomes of `raw`, received under packet id `pkid` with the DUP flag `dup`. Only
    /// a redelivery (DUP) is compared: a message without the flag is new, whatever its content
    /// (the broker gives a packet id to another message only once it had our PUBACK).
    pub fn admit(&self, pkid: u16, dup: bool, raw: &RawMessage) -> Admit {
        if !dup || self.hashes[usize::from(pkid)] != Some(content_hash(raw)) {
            return Admit::Store;
        }
        match self.in_flight.get(&pkid) {
            None => Admit::Stored,
            Some(id) => Admit::Waits(*id),
        }
    }

    /// `raw`, received under `pkid`, is on its way to RAW.
    pub fn sending(&mut self, pkid: u16, raw: &RawMessage) {
        self.hashes[usize::from(pkid)] = Some(content_hash(raw));
        self.in_flight.insert(pkid, raw.id);
    }

    /// RAW has `raw`, received under `pkid`.
    pub fn stored(&mut self, pkid: u16, raw: &RawMessage) {
        if self.in_flight.get(&pkid) == Some(&raw.id) {
            self.in_flight.remove(&pkid);
        }
    }

    /// How many packet ids it knows.
    pub fn len(&self) -> usize {
        self.hashes.iter().filter(|h| h.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The headers naming the writer and QoS 1 members of a pack ([`HEADER_CLIENT`],
    /// [`HEADER_KEYS`]), added to `headers`. `members` are each member's packet id (`None`
    /// for QoS 0) and raw message.
    pub fn pack_headers<'a>(
        headers: &mut HeaderMap,
        client_id: &str,
        members: impl Iterator<Item = (Option<u16>, &'a RawMessage)>,
    ) {
        let mut keys = String::new();
        for (pkid, raw) in members {
            let Some(pkid) = pkid else { continue };
            if !keys.is_empty() {
                keys.push(',');
            }
            let _ = write!(keys, "{pkid}:{:016x}", content_hash(raw));
        }
        headers.insert(HEADER_CLIENT, client_id);
        headers.insert(HEADER_KEYS, keys);
    }

    /// Takes in the keys of a pack written by `client_id`, as stored ([`Recent::pack_headers`]);
    /// a pack of another writer, or without keys, adds nothing.
    fn read_pack(&mut self, headers: &HeaderMap, client_id: &str) {
        if headers.get(HEADER_CLIENT).map(|v| v.as_str()) != Some(client_id) {
            return;
        }
        let Some(keys) = headers.get(HEADER_KEYS) else {
            return;
        };
        for key in keys.as_str().split(',').filter(|k| !k.is_empty()) {
            let parsed = key.split_once(':').and_then(|(pkid, hash)| {
                Some((
                    pkid.parse::<u16>().ok()?,
                    u64::from_str_radix(hash, 16).ok()?,
                ))
            });
            match parsed {
                Some((pkid, hash)) => self.hashes[usize::from(pkid)] = Some(hash),
                None => tracing::warn!(key, "a pack's key cannot be read; skipped"),
            }
        }
    }

    /// What `client_id` stored in packs within RAW's duplicate window, read from the packs'
    /// headers: a redelivery is recognised as long as it would be had its copy gone alone.
    pub async fn read_back(js: &jetstream::Context, client_id: &str) -> anyhow::Result<Recent> {
        let mut stream = js
            .get_stream(streams::RAW_STREAM)
            .await
            .context("opening RAW")?;
        let window = stream.info().await?.config.duplicate_window;
        let since = time::OffsetDateTime::now_utc() - window;
        let reader: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: streams::RAW_PACK_SUBJECT.to_owned(),
                deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: since },
                ack_policy: consumer::AckPolicy::None,
                headers_only: true,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .context("reading RAW's packs")?;
        let mut reader = reader;
        let mut remaining = reader.info().await?.num_pending;
        let mut recent = Recent::default();
        while remaining > 0 {
            let mut batch = reader
                .fetch()
                .max_messages(remaining.min(1000) as usize)
                .expires(Duration::from_secs(5))
                .messages()
                .await?;
            let mut got = 0;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| anyhow::anyhow!("reading RAW's packs: {e}"))?;
                got += 1;
                if let Some(headers) = &message.headers {
                    recent.read_pack(headers, client_id);
                }
            }
            if got == 0 {
                break;
            }
            remaining = remaining.saturating_sub(got);
        }
        let _ = stream
            .delete_consumer(reader.cached_info().name.as_str())
            .await;
        Ok(recent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn raw(payload: &'static [u8]) -> RawMessage {
        RawMessage::received("gateways/1/d".into(), Bytes::from_static(payload))
    }

    #[test]
    fn only_a_redelivery_of_the_same_content_is_recognised() {
        let mut recent = Recent::default();
        let first = raw(b"one");
        assert_eq!(recent.admit(7, false, &first), Admit::Store);
        recent.sending(7, &first);
        let again = RawMessage {
            id: Uuid::now_v7(),
            ..first.clone()
        };
        assert_eq!(recent.admit(7, true, &again), Admit::Waits(first.id));
        assert_eq!(recent.admit(7, false, &again), Admit::Store, "no DUP: new");
        assert_eq!(recent.admit(7, true, &raw(b"two")), Admit::Store);
        assert_eq!(recent.admit(8, true, &again), Admit::Store);
        recent.stored(7, &first);
        assert_eq!(recent.admit(7, true, &again), Admit::Stored);
        // A later message under the same packet id replaces it; the earlier copy's storing
        // changes nothing then.
        let later = raw(b"three");
        recent.sending(7, &later);
        recent.stored(7, &first);
        assert_eq!(recent.admit(7, true, &later), Admit::Waits(later.id));
        assert_eq!(recent.admit(7, true, &again), Admit::Store);
    }

    #[test]
    fn a_packs_keys_read_back_are_stored_messages_of_their_writer_only() {
        let (one, two) = (raw(b"one"), raw(b"two"));
        let mut headers = HeaderMap::new();
        let members = [(Some(7), &one), (None, &two), (Some(9), &two)];
        Recent::pack_headers(&mut headers, "bridge-a", members.into_iter());
        let mut recent = Recent::default();
        recent.read_pack(&headers, "bridge-b");
        assert!(recent.is_empty(), "another bridge's pack");
        recent.read_pack(&headers, "bridge-a");
        assert_eq!(recent.len(), 2, "the QoS 1 members only");
        assert_eq!(recent.admit(7, true, &one), Admit::Stored);
        assert_eq!(recent.admit(9, true, &two), Admit::Stored);
        assert_eq!(recent.admit(9, true, &one), Admit::Store);
    }
}
