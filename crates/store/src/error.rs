//! The crate's one error type and the names of stored records that errors point at.

use std::fmt;

/// Names one stored record, so an error says exactly what was bad (and where to look).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RecordId {
    /// One appended document change of a flag set.
    Change {
        /// The flag set the change belongs to.
        flag_set: String,
        /// The change's sequence number within the flag set (1-based, assigned by the store).
        seq: u64,
    },
    /// The compacted snapshot of a flag set.
    Snapshot {
        /// The flag set the snapshot belongs to.
        flag_set: String,
    },
    /// The small bookkeeping record of a flag set (which changes its snapshot covers).
    FlagSetInfo {
        /// The flag set described.
        flag_set: String,
    },
    /// The Automerge sync state kept for one peer and one flag set.
    SyncState {
        /// The peer's node id.
        peer: String,
        /// The flag set the sync state is for.
        flag_set: String,
    },
    /// One API token record.
    Token {
        /// The token's id (never the secret: callers hash tokens before storing them).
        token_id: String,
    },
    /// The node's incarnation counter.
    Incarnation,
}

impl RecordId {
    /// The flag set this record belongs to, if it belongs to one.
    #[must_use]
    pub fn flag_set(&self) -> Option<&str> {
        match self {
            RecordId::Change { flag_set, .. }
            | RecordId::Snapshot { flag_set }
            | RecordId::FlagSetInfo { flag_set }
            | RecordId::SyncState { flag_set, .. } => Some(flag_set),
            RecordId::Token { .. } | RecordId::Incarnation => None,
        }
    }

    /// Feeds a canonical encoding of this id into a checksum, so a record that ends up under the
    /// wrong key (a misdirected write, a bad copy) fails its check just like a flipped bit.
    pub(crate) fn hash_into(&self, hasher: &mut crc32fast::Hasher) {
        fn field(hasher: &mut crc32fast::Hasher, bytes: &[u8]) {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        match self {
            RecordId::Change { flag_set, seq } => {
                hasher.update(b"C");
                field(hasher, flag_set.as_bytes());
                hasher.update(&seq.to_le_bytes());
            }
            RecordId::Snapshot { flag_set } => {
                hasher.update(b"S");
                field(hasher, flag_set.as_bytes());
            }
            RecordId::FlagSetInfo { flag_set } => {
                hasher.update(b"F");
                field(hasher, flag_set.as_bytes());
            }
            RecordId::SyncState { peer, flag_set } => {
                hasher.update(b"Y");
                field(hasher, peer.as_bytes());
                field(hasher, flag_set.as_bytes());
            }
            RecordId::Token { token_id } => {
                hasher.update(b"T");
                field(hasher, token_id.as_bytes());
            }
            RecordId::Incarnation => hasher.update(b"I"),
        }
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordId::Change { flag_set, seq } => {
                write!(f, "change #{seq} of flag set {flag_set:?}")
            }
            RecordId::Snapshot { flag_set } => write!(f, "snapshot of flag set {flag_set:?}"),
            RecordId::FlagSetInfo { flag_set } => write!(f, "info record of flag set {flag_set:?}"),
            RecordId::SyncState { peer, flag_set } => {
                write!(f, "sync state of peer {peer:?} for flag set {flag_set:?}")
            }
            RecordId::Token { token_id } => write!(f, "token record {token_id:?}"),
            RecordId::Incarnation => f.write_str("incarnation counter"),
        }
    }
}

/// Everything that can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A stored record failed its checksum or framing check and was not used.
    #[error("corrupt {record}: {detail}")]
    Corrupt {
        /// The record that failed the check.
        record: RecordId,
        /// What was wrong with it.
        detail: String,
    },
    /// A record to be written is larger than this backend accepts.
    #[error("{record} is {size} bytes, over the limit of {limit} bytes")]
    RecordTooLarge {
        /// The record that was refused.
        record: RecordId,
        /// Its size in bytes.
        size: usize,
        /// The limit it broke.
        limit: usize,
    },
    /// A batch of changes is larger in total than one commit of this backend accepts.
    #[error(
        "a batch of {size} bytes for flag set {flag_set:?} is over the limit of {limit} bytes"
    )]
    BatchTooLarge {
        /// The flag set the batch was for.
        flag_set: String,
        /// The batch's total size in bytes.
        size: usize,
        /// The limit it broke.
        limit: usize,
    },
    /// A flag set name, peer id or token id is empty or too long.
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        /// Which kind of name it is ("flag set", "peer id", "token id").
        what: &'static str,
        /// The name as given (cut to a readable length).
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A compaction named a change range the store cannot replace (past the last change, or behind the current snapshot).
    #[error(
        "cannot compact flag set {flag_set:?} through change #{covers_through}: \
         the snapshot covers through #{snapshot_covers} and the last change is #{last_seq}"
    )]
    CompactionOutOfRange {
        /// The flag set being compacted.
        flag_set: String,
        /// The sequence number the new snapshot claimed to cover.
        covers_through: u64,
        /// The sequence number the current snapshot covers.
        snapshot_covers: u64,
        /// The last appended sequence number.
        last_seq: u64,
    },
    /// A write was refused by an injected fault (simulator only: [`crate::MemoryStore::set_failing`]).
    #[error("injected storage fault")]
    InjectedFault,
    /// The store file is empty, truncated or damaged, so nothing in it can be trusted; it was not changed.
    #[error(
        "the store file {} is damaged: {detail}. Restore it from a backup, or start with \
         --reset-data to start empty and catch up from peers (the damaged file is kept beside it)",
        path.display()
    )]
    Damaged {
        /// The store file.
        path: std::path::PathBuf,
        /// What was found wrong (redb's own report, or that the file is empty).
        detail: String,
    },
    /// The store file could not be read or created (no permission, a missing directory, …).
    #[error("cannot use the store file {}: {source}", path.display())]
    Io {
        /// The store file.
        path: std::path::PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The redb database reported an error (I/O, a lock held by another process, its own corruption checks).
    #[error("redb: {0}")]
    Redb(#[from] Box<redb::Error>),
    /// FoundationDB reported an error or a transaction could not complete.
    #[cfg(feature = "fdb")]
    #[error("FoundationDB: {0}")]
    Fdb(String),
}

impl StoreError {
    /// The flag set this error is about, if it is about one.
    #[must_use]
    pub fn flag_set(&self) -> Option<&str> {
        match self {
            StoreError::Corrupt { record, .. } | StoreError::RecordTooLarge { record, .. } => {
                record.flag_set()
            }
            StoreError::BatchTooLarge { flag_set, .. }
            | StoreError::CompactionOutOfRange { flag_set, .. } => Some(flag_set),
            _ => None,
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(Box::new(redb::Error::from(e)))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);
