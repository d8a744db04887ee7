//! Packs: several raw messages in one RAW message.
//!
//! JetStream's cost is per message it stores, delivers and takes an acknowledgement for, however
//! small (BENCHMARKS.md, "What the RAW copies cost": 12.5–13.7 µs of nats-server per message
//! stored one by one, 0.9–1.0 µs as one of a pack of 50). A pack carries its members whole
//! (id, receive time, topic, payload), so every reader of RAW reads a member as it would the
//! same message stored alone: the processor handles each member and settles the pack once
//! (the worst of its members' outcomes: a member to retry hands the whole pack back, and the
//! members done already are absorbed downstream as any redelivery is), replay and a letter's
//! original read members.
//!
//! A pack is a RAW message on [`RAW_PACK_SUBJECT`](crate::streams::RAW_PACK_SUBJECT) with the
//! header [`HEADER_PACK`] naming its format, [`FORMAT`]. Its payload is its members one after
//! the other, each: the raw id (16 bytes), the receive time (seconds as a signed 64-bit integer,
//! nanoseconds as an unsigned 32-bit one), the topic and the payload (each an unsigned 32-bit
//! length, then its bytes), integers little-endian. Written by hand: a fixed layout read without
//! copying a payload (each member's is a slice of the pack's), where a serde format would add a
//! dependency for four fields.

use crate::message::RawMessage;
use async_nats::HeaderMap;
use bytes::{BufMut as _, Bytes};
use chrono::DateTime;
use thiserror::Error;
use uuid::Uuid;

/// The header marking a pack, whose value is its format.
pub const HEADER_PACK: &str = "Dataviz-Pack";
/// The format this version writes and reads.
pub const FORMAT: &str = "1";

/// The bytes a member takes in a pack besides its topic and payload.
const MEMBER_OVERHEAD: usize = 16 + 8 + 4 + 4 + 4;

/// Why a pack cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PackError {
    #[error("pack format {0:?} is not one this version reads (it reads {FORMAT:?})")]
    Format(String),
    #[error("pack member {member} is cut short or malformed at byte {at}")]
    Malformed { member: usize, at: usize },
}

/// Whether a message with `headers` is a pack.
pub fn is_pack(headers: Option<&HeaderMap>) -> bool {
    headers.is_some_and(|h| h.get(HEADER_PACK).is_some())
}

/// The bytes `raw` takes in a pack.
pub fn member_len(raw: &RawMessage) -> usize {
    MEMBER_OVERHEAD + raw.topic.len() + raw.payload.len()
}

/// The headers of a pack.
pub fn headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_PACK, FORMAT);
    headers
}

/// The payload of a pack of `members`, in order.
pub fn encode<'a>(members: impl IntoIterator<Item = &'a RawMessage> + Clone) -> Bytes {
    let size = members.clone().into_iter().map(member_len).sum();
    let mut out = Vec::with_capacity(size);
    for member in members {
        out.put_slice(member.id.as_bytes());
        out.put_i64_le(member.received_at.timestamp());
        out.put_u32_le(member.received_at.timestamp_subsec_nanos());
        put_field(&mut out, member.topic.as_bytes());
        put_field(&mut out, &member.payload);
    }
    out.into()
}

fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    let len = u32::try_from(field.len()).expect("a NATS message is far under 4 GiB");
    out.put_u32_le(len);
    out.put_slice(field);
}

/// The members of a pack with `headers` and `payload`, in order.
pub fn decode(headers: Option<&HeaderMap>, payload: &Bytes) -> Result<Vec<RawMessage>, PackError> {
    let format = headers
        .and_then(|h| h.get(HEADER_PACK))
        .map(|v| v.as_str())
        .unwrap_or_default();
    if format != FORMAT {
        return Err(PackError::Format(format.to_owned()));
    }
    let mut members = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let start = at;
        let malformed = || PackError::Malformed {
            member: members.len(),
            at: start,
        };
        let member = read_member(payload, &mut at).ok_or_else(malformed)?;
        members.push(member);
    }
    Ok(members)
}

/// The member at `*at`, moving `*at` past it; `None` when it is cut short or malformed.
fn read_member(payload: &Bytes, at: &mut usize) -> Option<RawMessage> {
    let mut take = |len: usize| {
        let range = *at..at.checked_add(len)?;
        let bytes = payload.get(range.clone())?;
        *at = range.end;
        Some((bytes, range))
    };
    let id = Uuid::from_slice(take(16)?.0).ok()?;
    let secs = i64::from_le_bytes(take(8)?.0.try_into().ok()?);
    let nanos = u32::from_le_bytes(take(4)?.0.try_into().ok()?);
    let topic_len = u32::from_le_bytes(take(4)?.0.try_into().ok()?);
    let topic = std::str::from_utf8(take(usize::try_from(topic_len).ok()?)?.0)
        .ok()?
        .to_owned();
    let payload_len = u32::from_le_bytes(take(4)?.0.try_into().ok()?);
    let (_, range) = take(usize::try_from(payload_len).ok()?)?;
    Some(RawMessage {
        id,
        topic,
        received_at: DateTime::from_timestamp(secs, nanos)?,
        payload: payload.slice(range),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members() -> Vec<RawMessage> {
        vec![
            RawMessage::received("gateways/1/d".into(), Bytes::from_static(br#"{"t": 1}"#)),
            RawMessage::received("gateways/2/dé v".into(), Bytes::new()),
            RawMessage::received("".into(), Bytes::from(vec![0xff; 70_000])),
        ]
    }

    #[test]
    fn members_round_trip_in_order() {
        let members = members();
        let payload = encode(&members);
        assert_eq!(payload.len(), members.iter().map(member_len).sum::<usize>());
        assert!(is_pack(Some(&headers())));
        assert!(!is_pack(Some(&members[0].headers(None))));
        assert_eq!(decode(Some(&headers()), &payload).unwrap(), members);
        assert_eq!(decode(Some(&headers()), &Bytes::new()).unwrap(), vec![]);
    }

    #[test]
    fn a_pack_cut_short_or_of_another_format_is_refused() {
        let members = members();
        let payload = encode(&members);
        let (first, second) = (member_len(&members[0]), member_len(&members[1]));
        for (cut, member, at) in [
            (1, 0, 0),
            (first + 10, 1, first),
            (payload.len() - 1, 2, first + second),
        ] {
            let err = decode(Some(&headers()), &payload.slice(..cut)).unwrap_err();
            assert_eq!(err, PackError::Malformed { member, at }, "cut at {cut}");
        }
        let mut later = HeaderMap::new();
        later.insert(HEADER_PACK, "2");
        assert_eq!(
            decode(Some(&later), &payload).unwrap_err().to_string(),
            "pack format \"2\" is not one this version reads (it reads \"1\")"
        );
        // A topic that is not UTF-8.
        let mut bad = encode(&members[..1]).to_vec();
        bad[16 + 8 + 4 + 4] = 0xff;
        assert!(decode(Some(&headers()), &Bytes::from(bad)).is_err());
    }
}
