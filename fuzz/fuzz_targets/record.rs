//! The store's CRC-checked record framing (`bunting_store::fuzzing::decode`) on any stored bytes,
//! under a record name drawn from the input.
//!
//! Must hold: no panic; the decoder accepts exactly the framing the encoder writes for that name
//! (anything it accepts re-encodes to the same bytes); an encoded record reads back, and any
//! single-byte change or truncation of it is refused.
#![no_main]

use bunting_store::fuzzing::{decode, encode, split_u64};
use bunting_store::RecordId;
use libfuzzer_sys::fuzz_target;

/// Takes a record name from the front of the input: a selector byte, then a short name.
fn record_id(data: &[u8]) -> Option<(RecordId, &[u8])> {
    let (&selector, rest) = data.split_first()?;
    let (&name_len, rest) = rest.split_first()?;
    let name_len = usize::from(name_len % 32);
    if rest.len() < name_len + 8 {
        return None;
    }
    let (name, rest) = rest.split_at(name_len);
    let (seq, rest) = rest.split_at(8);
    let name = String::from_utf8_lossy(name).into_owned();
    let mut word = [0u8; 8];
    word.copy_from_slice(seq);
    let seq = u64::from_le_bytes(word);
    let id = match selector % 6 {
        0 => RecordId::Change {
            flag_set: name,
            seq,
        },
        1 => RecordId::Snapshot { flag_set: name },
        2 => RecordId::FlagSetInfo { flag_set: name },
        3 => RecordId::SyncState {
            peer: format!("peer-{seq}"),
            flag_set: name,
        },
        4 => RecordId::Token { token_id: name },
        _ => RecordId::Incarnation,
    };
    Some((id, rest))
}

fuzz_target!(|data: &[u8]| {
    let Some((id, stored)) = record_id(data) else {
        return;
    };
    // The input as stored bytes: whatever is accepted is exactly what the encoder writes.
    if let Ok(payload) = decode(&id, stored) {
        assert_eq!(
            encode(&id, payload),
            stored,
            "decoder accepted a non-canonical record"
        );
        if let Ok((word, rest)) = split_u64(&id, payload) {
            assert_eq!(payload.len(), rest.len() + 8);
            assert_eq!(&payload[..8], &word.to_le_bytes());
        }
    }
    // The input as a payload: it round trips, and damage to its record never goes unnoticed.
    let framed = encode(&id, stored);
    assert_eq!(
        decode(&id, &framed).ok(),
        Some(stored),
        "a framed record did not read back"
    );
    let at = stored.first().map_or(0, |&b| usize::from(b)) % framed.len();
    let mut flipped = framed.clone();
    flipped[at] ^= stored.last().copied().filter(|&b| b != 0).unwrap_or(0x80);
    assert!(
        decode(&id, &flipped).is_err(),
        "a changed byte at {at} went unnoticed"
    );
    assert!(
        decode(&id, &framed[..at]).is_err(),
        "a record cut at {at} was accepted"
    );
});
