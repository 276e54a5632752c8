//! Bunting's durable storage: everything a node must keep across a crash, behind one synchronous
//! trait, [`Store`].
//!
//! Owns: the [`Store`] trait and its backends — [`MemoryStore`] (tests and the deterministic
//! simulator), [`RedbStore`] (the embedded default, one file per node) and `FdbStore`
//! (FoundationDB, behind the cargo feature `fdb`) — and the checksummed framing of every stored
//! record. What it stores, per node:
//!
//! - per flag set: an append-only log of document changes, and one compacted snapshot that replaces
//!   the changes it covers (append, then compact, as automerge-repo's `Storage`);
//! - per (peer, flag set): the Automerge sync state, so a reconnect does not resend bloom filters;
//! - API token records, keyed by token id;
//! - the node's incarnation counter, which makes every process start a fresh Automerge actor.
//!   A brand-new store starts it at a random value ≥ 2^52 (see [`Store::next_incarnation`]).
//!
//! Never does: interpret what it stores. Changes, snapshots, sync states and tokens are opaque
//! bytes; this crate knows nothing of Automerge, flags or token hashing. It never spawns threads or
//! reads the clock (its one source of randomness is a brand-new store's first incarnation), and it
//! never returns a record that failed its checksum.
//!
//! # Damage
//!
//! [`RedbStore::open`] refuses a store file that is empty, truncated or damaged with
//! [`StoreError::Damaged`], naming the file and what to do, and never panics on one: it verifies
//! every page checksum on open (redb's integrity check), commits in two phases so a damaged last
//! commit is an error rather than a silent fall-back to the one before, and turns a panic inside
//! redb into an error. Only a missing file is a new store.
//!
//! # Durability guarantee
//!
//! Every mutating method returns only after its effect is durable: on disk with `fsync` for redb
//! (one write transaction per call, `Durability::Immediate`), committed for FoundationDB, and for
//! [`MemoryStore`] simply "done" (a simulated crash keeps everything a call returned). A call that
//! returns an error has changed nothing. This is what the node's persist-before-ack path relies on:
//! it acknowledges a write only after [`Store::append_changes`] returned `Ok`.
//!
//! # Compaction
//!
//! Each append adds records; loading replays them on top of the snapshot. The node should compact
//! (Automerge `save()`, then [`Store::compact`]) once [`Store::changes_since_snapshot`] reaches
//! [`COMPACT_AFTER_CHANGES`]. Compaction is atomic: a crash leaves either the old snapshot and all
//! its changes or the new snapshot and the changes after it — never a gap.
//!
//! # Key layouts
//!
//! - redb, one file per node: tables `changes` (flag set, seq) → change, `snapshots` flag set →
//!   snapshot, `flag_sets` flag set → snapshot coverage, `sync_states` (peer, flag set) → state,
//!   `tokens` token id → record, `meta` `"incarnation"` → counter (details on [`RedbStore`]).
//! - FoundationDB: tuple keys under (`"bunting"`, region, node), then `"c"`/`"s"`/`"f"` + flag
//!   set for changes, snapshot and coverage, `"y"` + peer + flag set, `"t"` + token id, `"i"`;
//!   values split into 90,000-byte chunks (details on `FdbStore`).
//!
//! Every value, in every backend, is framed with a format byte and a CRC-32 over the record's
//! name and payload; a record that fails the check is reported as [`StoreError::Corrupt`] naming
//! the flag set and record, never used.
//!
//! # FoundationDB
//!
//! `FdbStore` is behind the cargo feature `fdb` (crate `foundationdb` with `embedded-fdb-include`
//! and `fdb-7_3`). `cargo check -p bunting-store --features fdb` needs only Debian's
//! `libclang-dev`, and CI type-checks it. Linking needs `libfdb_c`, which is not available where
//! Bunting is built today, so its conformance tests run only where `libfdb_c` is installed and
//! `FDB_CLUSTER_FILE` names a cluster; without `FDB_CLUSTER_FILE` they print that they skipped.
#![cfg_attr(not(feature = "fdb"), forbid(unsafe_code))]

mod error;
mod memory;
mod record;
mod redb_store;

#[cfg(feature = "fdb")]
mod fdb;

#[cfg(test)]
mod conformance;

pub use error::{RecordId, StoreError};
#[cfg(feature = "fdb")]
pub use fdb::FdbStore;
pub use memory::MemoryStore;
pub use redb_store::RedbStore;

/// The record framing, for the fuzz targets in fuzz/ only; not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::record::{decode, encode, split_u64};
}

/// The number of changes since the last snapshot at which the node should compact a flag set.
///
/// Why 200: a start replays every change after the snapshot through Automerge, ≈ 50–150 µs per
/// small change whatever the document's size, while loading a snapshot is one columnar decode
/// (a 3,000-change flag set loads in ≈ 10 ms, where replaying those changes one by one takes
/// ≈ 0.3 s). At 200 a start replays at most ≈ 30 ms of changes; a save costs ≈ 1 ms for a
/// small flag set and tens of milliseconds for 10,000 flags, once per 200 writes to that flag
/// set, which is little next to the writes themselves (each one is persisted and replicated).
/// It was 1,000; crash-heavy simulator seeds spent over a third of their time replaying.
pub const COMPACT_AFTER_CHANGES: u64 = 200;

/// The longest flag set name, peer id or token id a store accepts, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// Size limits of a backend. Every backend refuses larger writes with a typed error
/// ([`StoreError::RecordTooLarge`], [`StoreError::BatchTooLarge`]) before touching storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest single change, sync state or token record, in bytes.
    pub max_record_bytes: usize,
    /// The largest batch of changes appended in one call, in bytes (sum of the changes).
    pub max_batch_bytes: usize,
    /// The largest snapshot, in bytes.
    pub max_snapshot_bytes: usize,
}

impl Limits {
    /// Limits of the memory and redb backends: a record holds the largest change a valid write
    /// can make ([`bunting_model::limits::MAX_CHANGE_BYTES`]); a single flag set of 10,000 flags
    /// saves to about 100 KB, so the batch and snapshot limits leave two orders of magnitude of
    /// headroom while keeping a runaway writer from filling the disk in one call.
    pub const LOCAL: Limits = Limits {
        max_record_bytes: bunting_model::limits::MAX_CHANGE_BYTES,
        max_batch_bytes: 16 << 20,
        max_snapshot_bytes: 64 << 20,
    };
}

/// One change as stored: its sequence number and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChange {
    /// Position in the flag set's log; 1 for the first change ever appended, never reused.
    pub seq: u64,
    /// The change exactly as appended.
    pub bytes: Vec<u8>,
}

/// A compacted snapshot as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The last change sequence number this snapshot replaces.
    pub covers_through: u64,
    /// The snapshot exactly as given to [`Store::compact`].
    pub bytes: Vec<u8>,
}

/// Everything stored for one flag set: the latest snapshot and every change appended after it,
/// in append order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadedFlagSet {
    /// The latest snapshot, if the flag set was ever compacted.
    pub snapshot: Option<Snapshot>,
    /// Changes with `seq > snapshot.covers_through`, in increasing `seq` order.
    pub changes: Vec<StoredChange>,
}

impl LoadedFlagSet {
    /// The highest sequence number stored (0 for an empty flag set): what a snapshot of the
    /// loaded document may cover.
    #[must_use]
    pub fn last_seq(&self) -> u64 {
        self.changes.last().map(|c| c.seq).unwrap_or_else(|| {
            self.snapshot
                .as_ref()
                .map(|s| s.covers_through)
                .unwrap_or(0)
        })
    }

    /// True when nothing at all is stored for the flag set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.changes.is_empty()
    }
}

/// What a successful append tells the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReceipt {
    /// The sequence number of the last change of the batch (the first is
    /// `last_seq + 1 - batch length`). For an empty batch: the current last sequence number.
    pub last_seq: u64,
    /// Changes stored after the snapshot, including this batch: compare with
    /// [`COMPACT_AFTER_CHANGES`].
    pub changes_since_snapshot: u64,
}

/// What a node keeps durably. Synchronous by design: the node calls it from tokio's
/// `spawn_blocking`, the simulator calls it directly.
///
/// Every method takes `&self` so one store can be shared (`Arc<dyn Store>`) across blocking tasks;
/// backends serialise writers internally. Mutations are durable when they return `Ok` and change
/// nothing when they return `Err` (see the crate doc). Names (flag sets, peer ids, token ids) are
/// 1..=[`MAX_NAME_BYTES`] bytes.
pub trait Store: Send + Sync {
    /// This backend's size limits.
    fn limits(&self) -> Limits;

    /// Appends a batch of document changes to a flag set's log in one atomic, durable commit and
    /// returns their sequence numbers. This is the persist-before-ack path.
    fn append_changes(
        &self,
        flag_set: &str,
        changes: &[&[u8]],
    ) -> Result<AppendReceipt, StoreError>;

    /// The latest snapshot of a flag set and every change appended after it, each record checked.
    /// An unknown flag set loads as empty.
    fn load(&self, flag_set: &str) -> Result<LoadedFlagSet, StoreError>;

    /// Atomically stores `snapshot` as the flag set's snapshot and deletes every change with
    /// `seq <= covers_through`. `covers_through` must lie between the current snapshot's coverage
    /// and the last appended change ([`StoreError::CompactionOutOfRange`] otherwise); the snapshot
    /// must contain every change it claims to cover.
    fn compact(
        &self,
        flag_set: &str,
        snapshot: &[u8],
        covers_through: u64,
    ) -> Result<(), StoreError>;

    /// The names of every flag set that was ever appended to or compacted, sorted.
    fn flag_sets(&self) -> Result<Vec<String>, StoreError>;

    /// How many changes are stored after the snapshot (what a load would replay).
    fn changes_since_snapshot(&self, flag_set: &str) -> Result<u64, StoreError>;

    /// The stored Automerge sync state for `peer` and `flag_set`, if any.
    fn sync_state(&self, peer: &str, flag_set: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores (replaces) the sync state for `peer` and `flag_set`.
    fn put_sync_state(&self, peer: &str, flag_set: &str, state: &[u8]) -> Result<(), StoreError>;

    /// Forgets the sync state for `peer` and `flag_set`; returns whether one existed.
    fn delete_sync_state(&self, peer: &str, flag_set: &str) -> Result<bool, StoreError>;

    /// Stores (replaces) the record of token `token_id`.
    fn put_token(&self, token_id: &str, record: &[u8]) -> Result<(), StoreError>;

    /// The record of token `token_id`, if any.
    fn token(&self, token_id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Every token record, sorted by token id.
    fn tokens(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Deletes the record of token `token_id`; returns whether one existed.
    fn delete_token(&self, token_id: &str) -> Result<bool, StoreError>;

    /// Durably increments and returns the node's incarnation counter. Call once per process start
    /// and derive the Automerge actor id from (node id, incarnation), so a restarted node never
    /// reuses an actor's sequence numbers.
    ///
    /// A brand-new store hands out a random first value in
    /// [[`FIRST_INCARNATION_MIN`], [`FIRST_INCARNATION_MIN`] + 2^51) rather than 1: a node that
    /// restarts on an empty or reset disk under the same node id must not reuse an actor id that
    /// already made different changes (replicas holding two different changes under one actor id
    /// and sequence number diverge for ever). [`MemoryStore::with_first_incarnation`] fixes the
    /// value for the deterministic simulator.
    fn next_incarnation(&self) -> Result<u64, StoreError>;
}

/// The lowest first incarnation of a brand-new store (2^52). Values stay below 2^53 for ≈ 2^51
/// restarts, so they remain exact as JSON numbers (the node reports its incarnation).
pub const FIRST_INCARNATION_MIN: u64 = 1 << 52;

/// A random first incarnation for a brand-new store: 51 random bits above
/// [`FIRST_INCARNATION_MIN`], so two fresh stores (a reset disk and the one it replaced) collide
/// with a probability of about (restarts of the old store) / 2^51.
///
/// The bits come from std's `RandomState`, whose keys the OS seeds: infallible, no dependency.
pub(crate) fn random_first_incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(FIRST_INCARNATION_MIN);
    FIRST_INCARNATION_MIN + (hasher.finish() >> 13)
}

/// Checks a name against the rules in [`Store`]'s doc.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > MAX_NAME_BYTES {
        "longer than 256 bytes"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidName {
        what,
        name: name.chars().take(64).collect(),
        reason,
    })
}

/// Checks a batch against `limits`, before any backend touches storage.
pub(crate) fn check_batch(
    limits: &Limits,
    flag_set: &str,
    first_seq: u64,
    changes: &[&[u8]],
) -> Result<(), StoreError> {
    check_name("flag set", flag_set)?;
    let mut total = 0usize;
    for (seq, change) in (first_seq..).zip(changes) {
        if change.len() > limits.max_record_bytes {
            return Err(StoreError::RecordTooLarge {
                record: RecordId::Change {
                    flag_set: flag_set.to_owned(),
                    seq,
                },
                size: change.len(),
                limit: limits.max_record_bytes,
            });
        }
        total = total.saturating_add(change.len());
    }
    if total > limits.max_batch_bytes {
        return Err(StoreError::BatchTooLarge {
            flag_set: flag_set.to_owned(),
            size: total,
            limit: limits.max_batch_bytes,
        });
    }
    Ok(())
}

/// Checks one non-change record (sync state, token) against `limits`.
pub(crate) fn check_record(
    limits: &Limits,
    record: RecordId,
    len: usize,
) -> Result<(), StoreError> {
    if len > limits.max_record_bytes {
        return Err(StoreError::RecordTooLarge {
            record,
            size: len,
            limit: limits.max_record_bytes,
        });
    }
    Ok(())
}

/// Checks that loaded changes follow the snapshot without a gap: the store assigns sequence
/// numbers consecutively and compaction deletes a prefix, so a hole means a lost record.
pub(crate) fn check_contiguous(
    flag_set: &str,
    snapshot_covers: u64,
    changes: &[StoredChange],
) -> Result<(), StoreError> {
    for (expected, change) in (snapshot_covers + 1..).zip(changes) {
        if change.seq > expected {
            return Err(StoreError::Corrupt {
                record: RecordId::Change {
                    flag_set: flag_set.to_owned(),
                    seq: expected,
                },
                detail: format!("missing: the log jumps to change #{}", change.seq),
            });
        }
        if change.seq < expected {
            return Err(StoreError::Corrupt {
                record: RecordId::Change {
                    flag_set: flag_set.to_owned(),
                    seq: change.seq,
                },
                detail: format!("still stored although the snapshot covers #{snapshot_covers}"),
            });
        }
    }
    Ok(())
}

/// Checks a compaction request against the flag set's current state.
pub(crate) fn check_compaction(
    limits: &Limits,
    flag_set: &str,
    snapshot_len: usize,
    covers_through: u64,
    snapshot_covers: u64,
    last_seq: u64,
) -> Result<(), StoreError> {
    if snapshot_len > limits.max_snapshot_bytes {
        return Err(StoreError::RecordTooLarge {
            record: RecordId::Snapshot {
                flag_set: flag_set.to_owned(),
            },
            size: snapshot_len,
            limit: limits.max_snapshot_bytes,
        });
    }
    if covers_through < snapshot_covers || covers_through > last_seq {
        return Err(StoreError::CompactionOutOfRange {
            flag_set: flag_set.to_owned(),
            covers_through,
            snapshot_covers,
            last_seq,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stores_and_their_errors_can_be_shared_across_blocking_tasks() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<StoreError>();
        shareable::<Arc<dyn Store>>();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let worker = Arc::clone(&store);
        let receipt = std::thread::spawn(move || worker.append_changes("production", &[b"x"]))
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(receipt.last_seq, 1);
        assert_eq!(store.changes_since_snapshot("production").unwrap(), 1);
    }
}
