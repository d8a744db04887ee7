//! Which copies are the same message: the id a message's readings are stored under.
//!
//! A message can reach the writer more than once, by paths that know nothing of each other: the
//! broker's redelivery after the bridge was away (however long), a device's resend after a
//! broker crash (a new MQTT packet, a new RAW message), a replay of RAW, `dlq requeue`. The
//! writer stores each id once ([`readings_id`]), so every copy of a message must have the same
//! id, and two different messages different ids.
//!
//! The rule:
//! - **A message with `ts`** is what it says: its gateway, its device, its `ts` and its readings
//!   (tag codes and typed values, in payload order). Two messages alike in all four are one
//!   message, whenever and however they come: they would store the same rows (same device,
//!   tags, time and values). A device that means two events must give them different `ts` (or
//!   different values); a counter of identical events at one instant is not expressible as
//!   readings anyway, since a tag has one value at a time.
//! - **A message without `ts`** takes its time from when the bridge received it, so two
//!   identical payloads are two readings taken at different times: the same content says
//!   nothing. Its id is the raw message's id, given by the bridge at receipt: a replay or a
//!   re-queue of that RAW message is recognised at any horizon, and a redelivery by the broker
//!   only within RAW's duplicate window (`RAW_DUPLICATE_WINDOW`), where the bridge's
//!   deduplication id (the MQTT packet id and content) finds it.
//!
//! The writer stores each id under a key that leads with the time of the message's readings
//! ([`stored_key`]).

use crate::payload::Payload;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Versions the derivation: a change of rule must not make old ids match new messages.
const DOMAIN: &[u8] = b"dataviz/readings/v1\0";

/// The id a message's readings are stored under: derived from the message when it has `ts`,
/// the raw message's id (`raw_id`) when it has none. See the module docs for the rule.
pub fn readings_id(raw_id: Uuid, gateway_id: i32, device_code: &str, payload: &Payload) -> Uuid {
    let Some(ts) = payload.ts else {
        return raw_id;
    };
    // SHA-256 rather than a fast hash: a gateway must not be able to craft a message whose id
    // is another's, and so have the other's readings skipped as duplicates.
    let mut hash = Sha256::new();
    hash.update(DOMAIN);
    hash.update(gateway_id.to_be_bytes());
    field(&mut hash, device_code.as_bytes());
    hash.update(ts.timestamp().to_be_bytes());
    hash.update(ts.timestamp_subsec_nanos().to_be_bytes());
    hash.update((payload.readings.len() as u64).to_be_bytes());
    let mut json = Vec::new();
    for (tag, value) in &payload.readings {
        field(&mut hash, tag.as_bytes());
        json.clear();
        serde_json::to_writer(&mut json, value).expect("a value serializes to JSON");
        field(&mut hash, &json);
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // A version 8 (custom) UUID: never equal to the bridge's version 7 ids.
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// The key the writer stores the id `id` of a message whose readings are of `time` under: the
/// id with its first 48 bits replaced by `time` in Unix milliseconds (clamped to what 48 bits
/// hold).
///
/// Content ids are hashes: stored as they are, each lands at a random place in the primary key
/// of `ingested_message`, so every insert dirties a page of its own, and the month of ids the
/// writer keeps outgrows memory. Readings arrive nearly in time order, so keys led by their
/// time go to the index's right edge. Every copy of a message has the same time (its `ts`, or
/// when it has none its raw message's receive time, which a replay or a re-queue keeps, and
/// with which that raw message's id, a UUIDv7, already leads), hence the same key. Two
/// messages share a key only if they share the millisecond and the id's last 80 bits (74 of
/// them hash bits for a content id): crafting a message with another's key takes a second
/// preimage of 74 bits of SHA-256.
pub fn stored_key(time: DateTime<Utc>, id: Uuid) -> Uuid {
    let millis = time.timestamp_millis().clamp(0, (1 << 48) - 1) as u64;
    let mut bytes = *id.as_bytes();
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    Uuid::from_bytes(bytes)
}

/// A length-prefixed field, so that no two sequences of fields hash alike.
fn field(hash: &mut Sha256, bytes: &[u8]) {
    hash.update((bytes.len() as u64).to_be_bytes());
    hash.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{PayloadLimits, parse};

    fn id(gateway: i32, device: &str, json: &str) -> Uuid {
        let payload = parse(json.as_bytes(), &PayloadLimits::default()).unwrap();
        readings_id(Uuid::now_v7(), gateway, device, &payload)
    }

    const READING: &str = r#"{"d": [{"tag": "AI.0", "value": 1.5}, {"tag": "DI.0", "value": true}],
                             "ts": "2024-01-01T00:00:00.250Z"}"#;

    #[test]
    fn every_copy_of_a_message_with_ts_has_one_id() {
        let first = id(1, "dev", READING);
        assert_eq!(first.get_version_num(), 8);
        assert_eq!(id(1, "dev", READING), first, "a copy, received again");
        // The same message written otherwise: spacing, a trailing comma, another ts form.
        let rewritten = r#"{"ts":"2024-01-01T00:00:00.250+0000","d":[{"tag":"AI.0","value":1.5},{"tag":"DI.0","value":true},]}"#;
        assert_eq!(id(1, "dev", rewritten), first);
    }

    #[test]
    fn messages_differing_in_anything_they_say_have_different_ids() {
        let first = id(1, "dev", READING);
        let others = [
            id(2, "dev", READING),
            id(1, "dev2", READING),
            id(1, "dev", &READING.replace("00.250Z", "00.251Z")),
            id(1, "dev", &READING.replace("1.5", "1.6")),
            id(1, "dev", &READING.replace("1.5", "\"1.5\"")),
            id(1, "dev", &READING.replace("AI.0", "AI.1")),
            id(
                1,
                "dev",
                &READING.replace(r#", {"tag": "DI.0", "value": true}"#, ""),
            ),
        ];
        for other in others {
            assert_ne!(other, first);
        }
        // Fields cannot slide into one another.
        assert_ne!(
            id(
                1,
                "ab",
                r#"{"d":[{"tag":"c","value":1}],"ts":"2024-01-01T00:00:00Z"}"#
            ),
            id(
                1,
                "a",
                r#"{"d":[{"tag":"bc","value":1}],"ts":"2024-01-01T00:00:00Z"}"#
            )
        );
    }

    #[test]
    fn keys_follow_the_time_of_the_readings_and_keep_the_rest_of_the_id() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let first = id(1, "dev", READING);
        let key = stored_key(at("2024-01-01T00:00:00.250Z"), first);
        assert_eq!(key, stored_key(at("2024-01-01T00:00:00.250Z"), first));
        assert_eq!(key.as_bytes()[6..], first.as_bytes()[6..]);
        // The time leads, so keys sort as their messages' times do, whatever the ids.
        let later = id(1, "dev", &READING.replace("00.250Z", "00.251Z"));
        let later_key = stored_key(at("2024-01-01T00:00:00.251Z"), later);
        assert!(later_key > key);
        assert!(
            stored_key(at("2024-01-01T00:00:01Z"), Uuid::from_bytes([0; 16]))
                > stored_key(at("2024-01-01T00:00:00.999Z"), Uuid::from_bytes([0xff; 16]))
        );
        // Other messages of the same millisecond keep other keys.
        let other = id(2, "dev", READING);
        assert_ne!(stored_key(at("2024-01-01T00:00:00.250Z"), other), key);
        // Times out of 48 bits' range are clamped, never wrapped.
        assert_eq!(
            stored_key(at("1900-01-01T00:00:00Z"), first).as_bytes()[..6],
            [0; 6]
        );
        assert_eq!(
            stored_key(DateTime::<Utc>::MAX_UTC, first).as_bytes()[..6],
            [0xff; 6]
        );
    }

    #[test]
    fn a_raw_message_s_id_of_its_receive_time_is_its_own_key() {
        let received = Utc::now();
        let raw =
            uuid::Builder::from_unix_timestamp_millis(received.timestamp_millis() as u64, &[7; 10])
                .into_uuid();
        assert_eq!(stored_key(received, raw), raw);
    }

    #[test]
    fn a_message_without_ts_keeps_its_raw_id() {
        let payload = parse(
            br#"{"d":[{"tag":"a","value":1}]}"#,
            &PayloadLimits::default(),
        )
        .unwrap();
        let raw = Uuid::now_v7();
        assert_eq!(readings_id(raw, 1, "dev", &payload), raw);
        let again = Uuid::now_v7();
        assert_ne!(readings_id(again, 1, "dev", &payload), raw);
    }
}
