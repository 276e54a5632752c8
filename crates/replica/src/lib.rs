//! Bunting's replica: each flag set as an Automerge document, and the sans-IO state machine that
//! replicates those documents between nodes.
//!
//! Owns: the document layout of a flag set ([`FlagSetDoc`]), typed and validated admin writes
//! ([`WriteCommand`]), conflicts and the audit log read from the document, the wire frames nodes
//! exchange ([`wire`]), and the replication core ([`Replica`]): local writes, sync messages in and
//! out, anti-entropy timers and persistence requests, all as values.
//!
//! Never does: I/O, clock reads, threads, or randomness it did not receive. Time comes in as
//! [`Timestamp`] arguments; storage and network are effects the driver carries out (events and
//! transmits), in the style of quinn-proto.

mod command;
mod doc;
mod replica;
pub mod wire;

pub use automerge::ChangeHash;
pub use command::{Write, WriteCommand, WriteMeta};
pub use doc::{
    AuditEntry, Author, BrokenFlag, Conflict, ConflictKind, ConflictValue, Field, FieldValue,
    FlagSetDoc, HistoryQuery, Identity,
};
pub use replica::{
    Event, Faults, PeerId, PeerSyncStatus, PersistId, PersistRequest, Replica, ReplicaConfig,
    StoredFlagSet, Timestamp, WriteId,
};

use bunting_model::Problems;

/// Everything that can go wrong in the replica.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The write's result does not validate; nothing was changed.
    #[error("invalid write: {0}")]
    Invalid(Problems),
    /// The flag a write names does not exist.
    #[error("flag {0:?} does not exist")]
    FlagNotFound(String),
    /// The flag set a call names does not exist on this replica.
    #[error("flag set {0:?} does not exist")]
    UnknownFlagSet(String),
    /// A field the write touches changed after the heads it was based on; the current values.
    #[error("stale write: {} field(s) changed since the heads it was based on", current.len())]
    Stale { current: Vec<FieldValue> },
    /// The heads a write was based on are not in this replica's document.
    #[error("unknown heads: {0:?}")]
    UnknownHeads(Vec<String>),
    /// Automerge refused an operation.
    #[error("automerge: {0}")]
    Automerge(String),
    /// Stored data (a snapshot, a change or a sync state) did not decode completely.
    #[error("stored data could not be loaded: {0}")]
    Load(String),
    /// A frame from a peer was malformed, too large, or did not apply; the document is unchanged.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The driver confirmed a persist request this replica never made (or confirmed it twice).
    #[error("unknown persist request {0}")]
    UnknownPersist(u64),
}

#[cfg(test)]
mod tests;
