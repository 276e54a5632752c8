//! Bunting's gossip transport: QUIC connections between nodes that carry the replica's frames.
//!
//! Owns: the cluster CA and node certificates ([`certs`]), mutual TLS that admits only peers whose
//! certificate comes from the cluster CA, one QUIC connection per peer with length-prefixed frames
//! and size limits, reconnects with exponential backoff and jitter, per-peer statistics
//! ([`PeerStats`]), the region files and the topology computed from them ([`cluster`]), and a
//! delaying, pausable UDP relay for tests ([`relay`]).
//!
//! Never does: flag logic. It does not look inside a frame beyond the replica's header check
//! ([`bunting_replica::wire::decode`]) and never touches a [`bunting_replica::Replica`]: the node's
//! driver task stays the single owner of its replica. The driver feeds [`GossipEvent`]s into the
//! replica (`Connected` → `add_peer`, `Disconnected` → `remove_peer`, `Frame` → `handle_message`)
//! and drains `poll_transmit` into [`Gossip::send`].
//!
//! Crypto: one provider for the whole process, ring, passed explicitly to every rustls builder
//! (no process-wide default is needed or installed).

pub mod certs;
pub mod cluster;
pub mod relay;
mod transport;

pub use bunting_replica::PeerId;
pub use certs::NodeTls;
pub use transport::{Gossip, GossipConfig, GossipEvent, GossipStats, PeerStats};

use std::path::PathBuf;

/// Everything that can go wrong in the gossip crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A socket could not be bound or used.
    #[error("socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A file that must not be overwritten (a CA key, a node key) already exists.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// A certificate or key could not be generated, parsed or used.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The TLS or QUIC configuration could not be built from the certificates.
    #[error("tls: {0}")]
    Tls(String),
    /// A region file, or the cluster the region files form, is not valid.
    #[error("cluster config: {0}")]
    Config(String),
    /// A node or region name is not a DNS label (1-63 of a-z, 0-9 and '-', not starting or ending with '-').
    #[error("{0:?} is not a valid node or region name")]
    InvalidName(String),
    /// The peer is not in this node's peer list.
    #[error("{0:?} is not a configured peer")]
    UnknownPeer(String),
    /// The peer has no connection now; the frame was dropped (the replica resyncs on reconnect).
    #[error("no connection to {0:?}")]
    NotConnected(String),
    /// The frame is larger than the configured limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    /// The peer's send queue is over its limit; its connection was closed.
    #[error("send queue to {0:?} is full; connection closed")]
    SlowPeer(String),
}

/// Whether `name` can be a node or region name: a DNS label, so a node id is also the DNS name in
/// its certificate and the TLS server name peers dial it by.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests;
