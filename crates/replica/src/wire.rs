//! Frames nodes exchange: a version byte, a frame kind, the flag set's name, then the payload.
//!
//! ```text
//! +---------+------+----------+-----------------+----------------------+---------+
//! | version | kind | name len | name (UTF-8)    | payload len (u32 BE) | payload |
//! |   u8=2  |  u8  |    u8    | 1..=128 bytes   |                      |         |
//! +---------+------+----------+-----------------+----------------------+---------+
//! ```
//!
//! Kinds: `1` an Automerge sync message; `2` changes (the sender's heads, then complete Automerge
//! change chunks), pushed by the node that made them or sent on request; `3` the sender's heads
//! only; `4` hashes of changes the sender asks for. Heads and hash lists are encoded as a u16 BE
//! count followed by that many 32-byte change hashes.
//!
//! The payload length is explicit so that a truncated or padded frame is detected here, before any
//! of it reaches Automerge. The transport (crates/gossip) adds its own length prefix per frame.

use crate::Error;

/// The only frame version this build speaks (2: sync, changes and heads frames; 1 had sync only).
pub const VERSION: u8 = 2;

/// Most heads a frame may list (a document has one head per concurrent branch; honest peers
/// list a handful).
pub const MAX_HEADS: usize = 1_024;

const HASH_BYTES: usize = 32;

/// Longest flag-set name, in bytes.
pub const MAX_FLAG_SET_NAME_BYTES: usize = 128;

/// Default largest frame accepted or sent: a whole 20,000-flag document fits with room to spare.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

const HEADER_BYTES: usize = 3;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// An Automerge sync message for one flag set.
    Sync,
    /// Changes pushed by the node that made them: the sender's heads, then change chunks.
    Changes,
    /// The sender's heads of one flag set, and nothing else.
    Heads,
    /// Hashes of changes the sender heard of and asks for (answered with a changes frame).
    Need,
}

impl FrameKind {
    fn code(self) -> u8 {
        match self {
            FrameKind::Sync => 1,
            FrameKind::Changes => 2,
            FrameKind::Heads => 3,
            FrameKind::Need => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(FrameKind::Sync),
            2 => Some(FrameKind::Changes),
            3 => Some(FrameKind::Heads),
            4 => Some(FrameKind::Need),
            _ => None,
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: FrameKind,
    pub flag_set: &'a str,
    pub payload: &'a [u8],
}

/// Flag-set names follow the flag-key syntax, so they are safe in URLs, logs and storage keys.
pub fn is_valid_flag_set_name(name: &str) -> bool {
    name.len() <= MAX_FLAG_SET_NAME_BYTES && bunting_model::is_valid_flag_key(name)
}

/// Encodes a frame; fails only for a name that is not valid or a payload over `max_frame_bytes`.
pub fn encode(
    kind: FrameKind,
    flag_set: &str,
    payload: &[u8],
    max_frame_bytes: usize,
) -> Result<Vec<u8>, Error> {
    if !is_valid_flag_set_name(flag_set) {
        return Err(Error::Protocol(format!(
            "flag set name {flag_set:?} is not valid"
        )));
    }
    let total = HEADER_BYTES + flag_set.len() + 4 + payload.len();
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|_| total <= max_frame_bytes);
    let Some(len) = len else {
        return Err(Error::Protocol(format!(
            "frame of {total} bytes exceeds the limit of {max_frame_bytes}"
        )));
    };
    let mut out = Vec::with_capacity(total);
    out.push(VERSION);
    out.push(kind.code());
    // The name is at most 128 bytes, checked above.
    out.push(flag_set.len() as u8);
    out.extend_from_slice(flag_set.as_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decodes a frame, refusing anything malformed, truncated, padded or over `max_frame_bytes`.
pub fn decode(bytes: &[u8], max_frame_bytes: usize) -> Result<Frame<'_>, Error> {
    let bad = |why: String| Err(Error::Protocol(why));
    if bytes.len() > max_frame_bytes {
        return bad(format!(
            "frame of {} bytes exceeds the limit of {max_frame_bytes}",
            bytes.len()
        ));
    }
    let [version, kind, name_len, rest @ ..] = bytes else {
        return bad("frame shorter than its header".into());
    };
    if *version != VERSION {
        return bad(format!("frame version {version} is not supported"));
    }
    let Some(kind) = FrameKind::from_code(*kind) else {
        return bad(format!("unknown frame kind {kind}"));
    };
    let name_len = usize::from(*name_len);
    if rest.len() < name_len + 4 {
        return bad("frame truncated in its name or length".into());
    }
    let (name, rest) = rest.split_at(name_len);
    let Ok(flag_set) = std::str::from_utf8(name) else {
        return bad("flag set name is not UTF-8".into());
    };
    if !is_valid_flag_set_name(flag_set) {
        return bad(format!("flag set name {flag_set:?} is not valid"));
    }
    let (len, payload) = rest.split_at(4);
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(len);
    let len = u32::from_be_bytes(len_bytes) as usize;
    if payload.len() != len {
        return bad(format!(
            "payload is {} bytes but the frame says {len}",
            payload.len()
        ));
    }
    Ok(Frame {
        kind,
        flag_set,
        payload,
    })
}

/// Appends `heads` as a u16 BE count and the 32-byte hashes; fails over [`MAX_HEADS`].
pub fn encode_heads(heads: &[automerge::ChangeHash], out: &mut Vec<u8>) -> Result<(), Error> {
    let count = u16::try_from(heads.len())
        .ok()
        .filter(|&n| usize::from(n) <= MAX_HEADS)
        .ok_or_else(|| Error::Protocol(format!("{} heads are too many", heads.len())))?;
    out.extend_from_slice(&count.to_be_bytes());
    for h in heads {
        out.extend_from_slice(&h.0);
    }
    Ok(())
}

/// Reads a heads list from the start of `payload`: (heads, the rest). Refuses a truncated list
/// or a count over [`MAX_HEADS`].
pub fn decode_heads(payload: &[u8]) -> Result<(Vec<automerge::ChangeHash>, &[u8]), Error> {
    let bad = |why: &str| Error::Protocol(format!("heads list: {why}"));
    let [hi, lo, rest @ ..] = payload else {
        return Err(bad("shorter than its count"));
    };
    let count = usize::from(u16::from_be_bytes([*hi, *lo]));
    if count > MAX_HEADS {
        return Err(bad("too many heads"));
    }
    let len = count * HASH_BYTES;
    if rest.len() < len {
        return Err(bad("truncated"));
    }
    let (list, rest) = rest.split_at(len);
    let heads = list
        .chunks_exact(HASH_BYTES)
        .map(|c| {
            let mut h = [0u8; HASH_BYTES];
            h.copy_from_slice(c);
            automerge::ChangeHash(h)
        })
        .collect();
    Ok((heads, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_frame_round_trips() {
        let bytes = encode(FrameKind::Sync, "production", b"hello", 1024).unwrap();
        let frame = decode(&bytes, 1024).unwrap();
        assert_eq!(frame.flag_set, "production");
        assert_eq!(frame.payload, b"hello");
        assert_eq!(frame.kind, FrameKind::Sync);
    }

    #[test]
    fn every_truncation_and_padding_is_refused() {
        let bytes = encode(FrameKind::Sync, "staging", b"payload", 1024).unwrap();
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut], 1024).is_err(),
                "cut at {cut} accepted"
            );
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(decode(&padded, 1024).is_err());
    }

    #[test]
    fn oversized_frames_and_bad_names_are_refused() {
        assert!(encode(FrameKind::Sync, "p", &[0; 100], 50).is_err());
        assert!(encode(FrameKind::Sync, "bad name", b"", 50).is_err());
        let bytes = encode(FrameKind::Sync, "p", &[0; 100], 1000).unwrap();
        assert!(decode(&bytes, 50).is_err());
        let mut wrong_version = bytes.clone();
        wrong_version[0] = VERSION + 1;
        assert!(decode(&wrong_version, 1000).is_err());
    }

    #[test]
    fn heads_round_trip_and_truncations_are_refused() {
        let heads = vec![
            automerge::ChangeHash([7; 32]),
            automerge::ChangeHash([9; 32]),
        ];
        let mut bytes = Vec::new();
        encode_heads(&heads, &mut bytes).unwrap();
        bytes.extend_from_slice(b"tail");
        let (got, rest) = decode_heads(&bytes).unwrap();
        assert_eq!(got, heads);
        assert_eq!(rest, b"tail");
        for cut in 0..2 + 64 {
            assert!(
                decode_heads(&bytes[..cut]).is_err(),
                "cut at {cut} accepted"
            );
        }
        let too_many = [0xff, 0xff];
        assert!(decode_heads(&too_many).is_err());
    }

    #[test]
    fn every_kind_round_trips_and_unknown_kinds_are_refused() {
        for kind in [
            FrameKind::Sync,
            FrameKind::Changes,
            FrameKind::Heads,
            FrameKind::Need,
        ] {
            let bytes = encode(kind, "p", b"x", 100).unwrap();
            assert_eq!(decode(&bytes, 100).unwrap().kind, kind);
        }
        let mut bytes = encode(FrameKind::Heads, "p", b"x", 100).unwrap();
        bytes[1] = 5;
        assert!(decode(&bytes, 100).is_err());
        bytes[1] = 3;
        bytes[0] = 1;
        assert!(decode(&bytes, 100).is_err(), "a version 1 frame is refused");
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes, 200);
            let _ = decode_heads(&bytes);
        }
    }
}
