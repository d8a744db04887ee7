//! `ReadingsMessage::parse` and `parse_each` on any bytes after the binary encoding's tag (what
//! the writer and the publisher read from READINGS and LIVE).
//!
//! Asserts, beyond "does not panic" (nor allocate without bound):
//! - `parse` and `parse_each` agree: when `parse` reads the message, `parse_each` reads every
//!   unit the same; when it does not, `parse_each` finds at least one unreadable part;
//! - the units read, packed again, read back as the same units (compared by their encoding:
//!   a double read from any bytes may be NaN, which equals nothing).
#![no_main]

use dataviz_model::readings::{BINARY_TAG, MessageReadings, ReadingsMessage};
use libfuzzer_sys::fuzz_target;

/// The encoding of `units`, in order: how two lists of units are compared.
fn encoded(units: &[MessageReadings]) -> Vec<Vec<u8>> {
    ReadingsMessage::pack(units).0.iter().map(|m| m.payload().to_vec()).collect()
}

fuzz_target!(|body: &[u8]| {
    let payload = [BINARY_TAG, body].concat();
    let whole = ReadingsMessage::parse(&payload);
    let parts = ReadingsMessage::parse_each(&payload).expect("a tagged message is always framed");
    let read: Vec<MessageReadings> = parts.iter().filter_map(|p| p.as_ref().ok().cloned()).collect();
    match &whole {
        Ok(units) => {
            assert!(parts.iter().all(Result::is_ok), "{parts:?}");
            assert_eq!(encoded(units), encoded(&read));
        }
        Err(_) => assert!(parts.iter().any(Result::is_err), "{parts:?}"),
    }
    for message in ReadingsMessage::pack(&read).0 {
        let back = ReadingsMessage::parse(&message.payload()).expect("packed units read back");
        let ids: Vec<_> = back.iter().map(|u| u.id).collect();
        assert_eq!(ids, message.ids);
        assert_eq!(encoded(&back), [message.payload().to_vec()]);
    }
});
