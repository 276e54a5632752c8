//! The framing every backend puts around a stored value: a format byte and a CRC-32 over the
//! record's name and payload, checked on every read.
//!
//! ```text
//! +---------+-------------------+-----------------+
//! | 0x01    | crc32 (LE, 4 B)   | payload ...     |
//! +---------+-------------------+-----------------+
//! crc32 = CRC-32 (IEEE) of: format byte, canonical RecordId encoding, payload length, payload
//! ```
//!
//! Databases (redb, FoundationDB) already protect their own pages and commits; this check catches
//! what they cannot see: a bit flipped by the disk or a bad copy after the database's own check, a
//! value written under the wrong key, or a value cut short by a bug in chunking.

use crate::{RecordId, StoreError};

/// The only framing version so far.
const FORMAT_V1: u8 = 1;

/// Bytes before the payload: format byte + CRC-32.
pub(crate) const HEADER_LEN: usize = 5;

fn checksum(id: &RecordId, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[FORMAT_V1]);
    id.hash_into(&mut hasher);
    hasher.update(&(payload.len() as u64).to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Frames `payload` for storage under `id`.
pub fn encode(id: &RecordId, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&checksum(id, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Frames a payload made of two parts (a fixed header and the caller's bytes) without first
/// concatenating them.
pub(crate) fn encode_parts(id: &RecordId, head: &[u8], body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(head.len() + body.len());
    payload.extend_from_slice(head);
    payload.extend_from_slice(body);
    encode(id, &payload)
}

/// Checks and unframes a stored value; any mismatch is a [`StoreError::Corrupt`] naming `id`.
pub fn decode<'a>(id: &RecordId, stored: &'a [u8]) -> Result<&'a [u8], StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        record: id.clone(),
        detail,
    };
    if stored.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "record is {} bytes, shorter than its {HEADER_LEN}-byte header (torn write?)",
            stored.len()
        )));
    }
    let (header, payload) = stored.split_at(HEADER_LEN);
    if header[0] != FORMAT_V1 {
        return Err(corrupt(format!("unknown record format {}", header[0])));
    }
    let expected = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let actual = checksum(id, payload);
    if expected != actual {
        return Err(corrupt(format!(
            "checksum mismatch (stored {expected:08x}, computed {actual:08x})"
        )));
    }
    Ok(payload)
}

/// Reads the little-endian u64 a payload starts with, and returns it with the rest.
pub fn split_u64<'a>(id: &RecordId, payload: &'a [u8]) -> Result<(u64, &'a [u8]), StoreError> {
    if payload.len() < 8 {
        return Err(StoreError::Corrupt {
            record: id.clone(),
            detail: format!("payload is {} bytes, expected at least 8", payload.len()),
        });
    }
    let (head, rest) = payload.split_at(8);
    let mut word = [0u8; 8];
    word.copy_from_slice(head);
    Ok((u64::from_le_bytes(word), rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn change(seq: u64) -> RecordId {
        RecordId::Change {
            flag_set: "production".into(),
            seq,
        }
    }

    #[test]
    fn a_record_reads_back_under_its_own_name() {
        let stored = encode(&change(3), b"payload");
        assert_eq!(decode(&change(3), &stored).unwrap(), b"payload");
    }

    #[test]
    fn a_record_under_another_name_is_reported_corrupt() {
        let stored = encode(&change(3), b"payload");
        let err = decode(&change(4), &stored).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { ref record, .. } if *record == change(4)));
        assert!(err
            .to_string()
            .contains("change #4 of flag set \"production\""));
    }

    #[test]
    fn a_record_shorter_than_its_header_is_reported_torn() {
        let err = decode(&change(1), &[1, 2]).unwrap_err();
        assert!(err.to_string().contains("torn"), "{err}");
    }

    proptest! {
        #[test]
        fn any_single_byte_change_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            pos in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut stored = encode(&change(9), &payload);
            let i = pos.index(stored.len());
            stored[i] ^= flip;
            prop_assert!(decode(&change(9), &stored).is_err());
        }

        #[test]
        fn any_truncation_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 1..200),
            cut in any::<prop::sample::Index>(),
        ) {
            let stored = encode(&change(9), &payload);
            let keep = cut.index(stored.len());
            prop_assert!(decode(&change(9), &stored[..keep]).is_err());
        }
    }
}
