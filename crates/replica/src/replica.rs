//! The sans-IO replication core: many flag sets, one Automerge sync state per (peer, flag set).
//!
//! Methods come in quinn-proto's four kinds: getters; `handle_*` for inputs (a frame from a peer, a
//! timeout, a persistence confirmation); commands (a local write, adding a peer); and `poll_*` for
//! outputs (frames to send, the next timer, events), each `#[must_use]`.
//!
//! Persist before ack, persist before send: a local write's changes go out as a
//! [`Event::PersistRequest`]; only when the driver calls [`Replica::persisted`] is the write
//! acknowledged and is anything about that flag set sent again. Changes received from peers are
//! applied at once (their origin has stored them) and also handed to the driver to store, since a
//! node must keep what it applies.
//!
//! Who sends what: the node that made a change pushes it to every peer (one hop); a node that
//! applied changes from a peer announces its heads only; a peer that lacks an announced head asks
//! for it; a change whose own dependencies are missing starts an Automerge sync session, which
//! fills any gap. Anti-entropy re-announces heads to peers not known to hold exactly ours.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash, ReadDoc};

use crate::command::{Write, WriteMeta};
use crate::doc::{FlagSetDoc, Identity};
use crate::wire::{self, FrameKind};
use crate::Error;

/// A point in time on the driver's clock, in milliseconds. The replica never reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// This time plus `ms` milliseconds (saturating).
    pub fn plus_millis(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
}

/// A peer node, named by its stable node id (sync states are kept per peer across restarts).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub String);

/// Names one local write, so its acknowledgement can be matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteId(pub u64);

/// Names one persist request, confirmed with [`Replica::persisted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PersistId(pub u64);

/// Planted bugs, for the simulator only: it must show that it catches each of them. All off by
/// default; never turn one on outside tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// TEST ONLY. Acknowledge a local write at once, before the driver confirms persistence.
    pub ack_before_persist: bool,
    /// TEST ONLY. Send local changes to peers before they are persisted, and write with the same
    /// actor id (incarnation 0) after every restart: a crash then makes one actor reuse a sequence
    /// number for a different change.
    pub send_before_persist_and_reuse_actor: bool,
    /// TEST ONLY. Drop the first frame that carries changes (a push, an answer to a request or a
    /// sync message) to each (peer, flag set), and send nothing more about that flag set to that
    /// peer (no retry, no anti-entropy).
    pub drop_sync_message_without_retry: bool,
    /// TEST ONLY. Never run anti-entropy rounds.
    pub skip_anti_entropy: bool,
}

/// What a replica needs to know about itself; given by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// This node's stable id.
    pub node: String,
    /// This node's region.
    pub region: String,
    /// A number that differs on every process start (e.g. a counter kept by the store, or the
    /// start time): part of the Automerge actor id.
    pub incarnation: u64,
    /// How often every flag set is re-synced with every connected peer, in milliseconds; this
    /// repairs lost messages.
    pub anti_entropy_interval_ms: u64,
    /// Largest frame sent or accepted.
    pub max_frame_bytes: usize,
    /// Most flag sets this replica holds; a peer cannot make it create more.
    pub max_flag_sets: usize,
    /// Planted bugs for the simulator; [`Faults::default`] (all off) everywhere else.
    pub faults: Faults,
}

impl ReplicaConfig {
    /// A configuration with the defaults: anti-entropy every 5 s, 32 MiB frames, 1,000 flag sets.
    pub fn new(node: impl Into<String>, region: impl Into<String>, incarnation: u64) -> Self {
        ReplicaConfig {
            node: node.into(),
            region: region.into(),
            incarnation,
            anti_entropy_interval_ms: 5_000,
            max_frame_bytes: wire::DEFAULT_MAX_FRAME_BYTES,
            max_flag_sets: 1_000,
            faults: Faults::default(),
        }
    }

    fn identity(&self) -> Identity {
        Identity {
            node: self.node.clone(),
            region: self.region.clone(),
            incarnation: if self.faults.send_before_persist_and_reuse_actor {
                0
            } else {
                self.incarnation
            },
        }
    }
}

/// What a node stored for one flag set, handed back to [`Replica::restore`] on start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredFlagSet {
    pub name: String,
    /// The latest compacted document (`FlagSetDoc::save`), if any.
    pub snapshot: Option<Vec<u8>>,
    /// Changes stored after that snapshot (or all of them), in any order.
    pub changes: Vec<Vec<u8>>,
    /// Encoded sync state per peer, so reconnecting peers catch up without a full transfer.
    pub sync_states: Vec<(PeerId, Vec<u8>)>,
}

/// Something for the driver to store durably, then confirm with [`Replica::persisted`].
///
/// Requests must become durable in the order they are emitted (append them to one log): a later
/// request's changes may depend on an earlier one's, and a node whose stored changes miss a
/// dependency refuses to load rather than silently hide the changes after the gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistRequest {
    pub id: PersistId,
    pub flag_set: String,
    /// Encoded Automerge changes to append.
    pub changes: Vec<Vec<u8>>,
    /// Encoded sync states to overwrite, per peer.
    pub sync_states: Vec<(PeerId, Vec<u8>)>,
}

/// Where replication with one peer stands, for node status and metrics
/// ([`Replica::peer_sync_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSyncStatus {
    pub peer: PeerId,
    /// Whether the driver has a connection to this peer now.
    pub connected: bool,
    /// An estimate of how many changes this node holds (over all flag sets) that the peer is not
    /// known to have: changes after the heads the peer last told us it holds (or, before it has
    /// told us anything in this session, after the heads both sides were last known to share).
    /// 0 when the peer's known heads equal ours; it can over-count until the peer next tells us
    /// its heads.
    pub changes_pending: usize,
}

/// What happened; drained with [`Replica::poll_event`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A flag set's document changed (local write or changes from a peer): recompile it.
    FlagSetChanged {
        flag_set: String,
        heads: Vec<ChangeHash>,
    },
    /// Store this, then call [`Replica::persisted`].
    PersistRequest(PersistRequest),
    /// A local write could not be stored and was taken back (see [`Replica::persist_failed`]):
    /// answer the client with a refusal; nothing of the write is served, synced or stored.
    WriteRefused { id: WriteId, flag_set: String },
    /// A local write is durable: answer the client.
    WriteAcknowledged {
        id: WriteId,
        flag_set: String,
        /// The changes the write made (empty when it changed nothing).
        changes: Vec<ChangeHash>,
    },
    /// This peer has told us it holds exactly our heads of this flag set.
    PeerSynced {
        peer: PeerId,
        flag_set: String,
        heads: Vec<ChangeHash>,
    },
    /// A peer sent something malformed or unusable; nothing was applied from it. The driver may
    /// close that connection.
    ProtocolError { peer: PeerId, error: Error },
}

/// Sync with one peer about one flag set.
#[derive(Debug, Default)]
struct PeerSync {
    state: sync::State,
    /// Whether a `PeerSynced` was reported for the current heads (report each transition once).
    reported_synced: bool,
    /// `shared_heads` as last handed to the driver to persist.
    persisted_shared: Vec<ChangeHash>,
    /// Planted bug only: this peer's first change-carrying message was dropped and is not retried.
    muted: bool,
    /// The heads this peer last told us it holds in this connection (in any frame), when we hold
    /// all of them. A peer's document only grows within a connection, so it holds at least these.
    known: Option<Vec<ChangeHash>>,
    /// The heads we last told this peer in this connection (in any frame).
    told: Option<Vec<ChangeHash>>,
    /// A sync message for this peer was held back while local changes were unpersisted.
    deferred: bool,
}

#[derive(Debug)]
struct FlagSetState {
    doc: FlagSetDoc,
    /// Sync state per known peer (connected or not), kept for reconnects.
    peers: BTreeMap<PeerId, PeerSync>,
    /// Persist requests holding local changes the driver has not yet confirmed; while non-zero
    /// nothing about this flag set is sent.
    unpersisted_local: usize,
    /// Encoded local changes already persisted, waiting to be pushed once nothing local is
    /// unpersisted.
    unsent_local: Vec<Vec<u8>>,
    /// The last [`RECENT_CHANGES`] changes made or applied here, encoded, so a peer that asks for
    /// a change it heard of is answered without Automerge re-encoding it.
    recent: BTreeMap<ChangeHash, Vec<u8>>,
    recent_order: VecDeque<ChangeHash>,
    /// Changes asked of a peer, with the peer and when: asked again (of whoever announces them)
    /// only once that peer is gone or [`REASK_AFTER_MS`] passed, not of every peer that
    /// announces them at once.
    requested: BTreeMap<ChangeHash, (PeerId, Timestamp)>,
    /// Requests from peers that arrived while local changes were unpersisted, answered after.
    deferred_needs: Vec<(PeerId, Vec<ChangeHash>)>,
}

impl FlagSetState {
    fn new(doc: FlagSetDoc, peers: BTreeMap<PeerId, PeerSync>) -> Self {
        FlagSetState {
            doc,
            peers,
            unpersisted_local: 0,
            unsent_local: Vec::new(),
            recent: BTreeMap::new(),
            recent_order: VecDeque::new(),
            requested: BTreeMap::new(),
            deferred_needs: Vec::new(),
        }
    }

    fn remember(&mut self, hash: ChangeHash, bytes: &[u8]) {
        if self.recent.insert(hash, bytes.to_vec()).is_none() {
            self.recent_order.push_back(hash);
        }
        while self.recent_order.len() > RECENT_CHANGES {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }

    /// Remembers encoded changes whose hashes are not at hand (parsed once here).
    fn remember_encoded(&mut self, changes: &[Vec<u8>]) {
        for bytes in changes {
            if let Ok(change) = automerge::Change::from_bytes(bytes.clone()) {
                self.remember(change.hash(), bytes);
            }
        }
    }
}

/// How many recent changes per flag set are kept encoded to answer peers' requests.
const RECENT_CHANGES: usize = 256;

/// A change asked of a peer is asked again (of a peer that announces it) after this long.
const REASK_AFTER_MS: u64 = 1_000;

#[derive(Debug)]
struct Pending {
    flag_set: String,
    writes: Vec<(WriteId, Vec<ChangeHash>)>,
    local: bool,
    /// The local changes this request stores (pushed to peers once stored).
    changes: Vec<Vec<u8>>,
}

/// The replication state machine of one node.
#[derive(Debug)]
pub struct Replica {
    config: ReplicaConfig,
    identity: Identity,
    sets: BTreeMap<String, FlagSetState>,
    /// Peers the driver has a connection to now.
    connected: BTreeSet<PeerId>,
    pending: BTreeMap<PersistId, Pending>,
    transmits: VecDeque<(PeerId, Vec<u8>)>,
    events: VecDeque<Event>,
    next_write: u64,
    next_persist: u64,
    next_anti_entropy: Timestamp,
}

impl Replica {
    /// A replica with no flag sets, e.g. a node's first start.
    pub fn new(config: ReplicaConfig, now: Timestamp) -> Replica {
        let identity = config.identity();
        let next_anti_entropy = now.plus_millis(config.anti_entropy_interval_ms);
        Replica {
            config,
            identity,
            sets: BTreeMap::new(),
            connected: BTreeSet::new(),
            pending: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_write: 0,
            next_persist: 0,
            next_anti_entropy,
        }
    }

    /// A replica loaded from what the node stored. `config.incarnation` must be fresh (never used
    /// before by this node). A snapshot or change that does not decode completely is an error; a
    /// sync state that does not decode is dropped (it only saves bandwidth).
    pub fn restore(
        config: ReplicaConfig,
        stored: Vec<StoredFlagSet>,
        now: Timestamp,
    ) -> Result<Replica, Error> {
        let mut replica = Replica::new(config, now);
        for set in stored {
            if !wire::is_valid_flag_set_name(&set.name) {
                return Err(Error::Load(format!(
                    "flag set name {:?} is not valid",
                    set.name
                )));
            }
            let doc = FlagSetDoc::load(
                set.snapshot.as_deref(),
                &set.changes,
                replica.identity.clone(),
            )?;
            let peers = set
                .sync_states
                .iter()
                .filter_map(|(peer, bytes)| {
                    let state = sync::State::decode(bytes).ok()?;
                    Some((
                        peer.clone(),
                        PeerSync {
                            persisted_shared: state.shared_heads.clone(),
                            state,
                            ..PeerSync::default()
                        },
                    ))
                })
                .collect();
            replica.sets.insert(set.name, FlagSetState::new(doc, peers));
        }
        Ok(replica)
    }

    // ---- getters ----

    /// The configuration this replica runs with.
    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    /// The identity (and so the actor id) this replica writes with.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// One flag set's document.
    pub fn flag_set(&self, name: &str) -> Option<&FlagSetDoc> {
        self.sets.get(name).map(|s| &s.doc)
    }

    /// Names of the flag sets held, sorted.
    pub fn flag_set_names(&self) -> Vec<String> {
        self.sets.keys().cloned().collect()
    }

    /// Peers connected now.
    pub fn peers(&self) -> Vec<PeerId> {
        self.connected.iter().cloned().collect()
    }

    /// Every peer this replica knows (connected now, or synced with before), sorted by id, with
    /// whether it is connected and how many changes it is not known to have.
    pub fn peer_sync_status(&self) -> Vec<PeerSyncStatus> {
        let mut pending: BTreeMap<&PeerId, usize> = self.connected.iter().map(|p| (p, 0)).collect();
        for set in self.sets.values() {
            let doc = set.doc.automerge();
            let heads = set.doc.heads();
            for (peer, ps) in &set.peers {
                let count = pending.entry(peer).or_insert(0);
                let known = match &ps.known {
                    Some(known) if self.connected.contains(peer) => known.clone(),
                    _ => known_heads(doc, &ps.state),
                };
                if known != heads {
                    *count += changes_after(doc, &known);
                }
            }
        }
        pending
            .into_iter()
            .map(|(peer, changes_pending)| PeerSyncStatus {
                peer: peer.clone(),
                connected: self.connected.contains(peer),
                changes_pending,
            })
            .collect()
    }

    /// Persist requests the driver has not confirmed yet.
    pub fn pending_persists(&self) -> usize {
        self.pending.len()
    }

    // ---- commands ----

    /// Creates an empty flag set (also done implicitly by a write or by a peer's sync message).
    pub fn create_flag_set(&mut self, name: &str, now: Timestamp) -> Result<(), Error> {
        self.ensure_set(name)?;
        let _ = now;
        self.sync_set_with_all(name);
        Ok(())
    }

    /// Applies an admin write to a flag set (created if new). The write is acknowledged with
    /// [`Event::WriteAcknowledged`] only after the driver confirms its persist request.
    pub fn handle_local_write(
        &mut self,
        flag_set: &str,
        write: Write,
        meta: WriteMeta,
        now: Timestamp,
    ) -> Result<WriteId, Error> {
        let _ = now;
        let existed = self.sets.contains_key(flag_set);
        self.ensure_set(flag_set)?;
        let set = self
            .sets
            .get_mut(flag_set)
            .ok_or_else(|| Error::UnknownFlagSet(flag_set.to_owned()))?;
        let before = set.doc.heads();
        let result = set.doc.apply(&write, &meta);
        let hashes = match result {
            Ok(h) => h,
            Err(e) => {
                if !existed {
                    // A refused first write leaves no empty flag set behind.
                    self.sets.remove(flag_set);
                }
                return Err(e);
            }
        };
        let id = WriteId(self.next_write);
        self.next_write += 1;
        if hashes.is_empty() {
            self.events.push_back(Event::WriteAcknowledged {
                id,
                flag_set: flag_set.to_owned(),
                changes: hashes,
            });
            return Ok(id);
        }
        let changes = set.doc.changes_since(&before);
        let heads = set.doc.heads();
        set.unpersisted_local += 1;
        set.remember_encoded(&changes);
        let changes_to_store = changes.clone();
        let sync_states = Self::dirty_sync_states(set);
        let persist = self.new_persist_id();
        let ack_now = self.config.faults.ack_before_persist;
        let send_now = self.config.faults.send_before_persist_and_reuse_actor;
        self.pending.insert(
            persist,
            Pending {
                flag_set: flag_set.to_owned(),
                writes: if ack_now {
                    Vec::new()
                } else {
                    vec![(id, hashes.clone())]
                },
                local: true,
                changes: if send_now {
                    Vec::new()
                } else {
                    changes.clone()
                },
            },
        );
        self.events.push_back(Event::FlagSetChanged {
            flag_set: flag_set.to_owned(),
            heads,
        });
        self.events.push_back(Event::PersistRequest(PersistRequest {
            id: persist,
            flag_set: flag_set.to_owned(),
            changes: changes_to_store,
            sync_states,
        }));
        if ack_now {
            self.events.push_back(Event::WriteAcknowledged {
                id,
                flag_set: flag_set.to_owned(),
                changes: hashes,
            });
        }
        if send_now {
            self.push_changes(flag_set, changes);
        }
        Ok(id)
    }

    /// The driver stored persist request `id` durably.
    pub fn persisted(&mut self, id: PersistId, now: Timestamp) -> Result<(), Error> {
        let _ = now;
        let pending = self
            .pending
            .remove(&id)
            .ok_or(Error::UnknownPersist(id.0))?;
        for (write, changes) in pending.writes {
            self.events.push_back(Event::WriteAcknowledged {
                id: write,
                flag_set: pending.flag_set.clone(),
                changes,
            });
        }
        if pending.local {
            if let Some(set) = self.sets.get_mut(&pending.flag_set) {
                set.unpersisted_local = set.unpersisted_local.saturating_sub(1);
                set.unsent_local.extend(pending.changes);
            }
            self.after_local_persisted(&pending.flag_set);
        }
        Ok(())
    }

    /// Storing persist request `id` failed, so nothing of it is durable. The driver stores this
    /// flag set's requests strictly in order and stops at the failed one; it hands back what its
    /// store holds now (`stored`). The flag set is reloaded from that, so every change that is
    /// not stored (this request's and every later one's) leaves what this node serves and syncs:
    /// no write is ever acknowledged on top of an unstored change. Each write waiting on a
    /// dropped request is acknowledged if its changes turn out to be stored after all (a store
    /// can fail after committing), and refused ([`Event::WriteRefused`]) otherwise. Sync with
    /// every peer starts afresh for this flag set, so changes from peers that were dropped come
    /// back. Returns the ids of this flag set's later requests, which the driver drops unstored.
    ///
    /// Reusing the actor's sequence numbers afterwards is safe: a change leaves this node only
    /// once it is stored, so a dropped change exists nowhere else.
    pub fn persist_failed(
        &mut self,
        id: PersistId,
        stored: StoredFlagSet,
        now: Timestamp,
    ) -> Result<Vec<PersistId>, Error> {
        let _ = now;
        let failed = self.pending.get(&id).ok_or(Error::UnknownPersist(id.0))?;
        let name = failed.flag_set.clone();
        if stored.name != name {
            return Err(Error::Load(format!(
                "persist request {} is for flag set {name:?}, not {:?}",
                id.0, stored.name
            )));
        }
        let doc = FlagSetDoc::load(
            stored.snapshot.as_deref(),
            &stored.changes,
            self.identity.clone(),
        )?;
        let dropped: Vec<PersistId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.flag_set == name)
            .map(|(id, _)| *id)
            .collect();
        let mut writes = Vec::new();
        for request in &dropped {
            if let Some(p) = self.pending.remove(request) {
                writes.extend(p.writes);
            }
        }
        let peers = self
            .sets
            .get(&name)
            .map(|s| {
                s.peers
                    .keys()
                    .map(|p| (p.clone(), PeerSync::default()))
                    .collect()
            })
            .unwrap_or_default();
        let heads = doc.heads();
        for (write, changes) in writes {
            let stored_after_all = changes.iter().all(|h| has_change(doc.automerge(), h));
            self.events.push_back(if stored_after_all {
                Event::WriteAcknowledged {
                    id: write,
                    flag_set: name.clone(),
                    changes,
                }
            } else {
                Event::WriteRefused {
                    id: write,
                    flag_set: name.clone(),
                }
            });
        }
        self.sets
            .insert(name.clone(), FlagSetState::new(doc, peers));
        self.events.push_back(Event::FlagSetChanged {
            flag_set: name.clone(),
            heads,
        });
        self.sync_set_with_all(&name);
        Ok(dropped.into_iter().filter(|d| *d != id).collect())
    }

    /// Forgets a flag set that was created here but could not be stored (its genesis is the
    /// same everywhere, so nothing of it is lost; a peer that has the set brings it back).
    /// Refused while the flag set has requests waiting to be stored.
    pub fn forget_unstored_flag_set(&mut self, name: &str) -> Result<(), Error> {
        if self.pending.values().any(|p| p.flag_set == name) {
            return Err(Error::Load(format!(
                "flag set {name:?} has changes waiting to be stored"
            )));
        }
        self.sets.remove(name);
        Ok(())
    }

    /// A connection to `peer` is up: start syncing every flag set with it. Sync states kept from
    /// earlier connections (or restored from storage) make the catch-up incremental.
    pub fn add_peer(&mut self, peer: PeerId, now: Timestamp) {
        let _ = now;
        self.connected.insert(peer.clone());
        let names: Vec<String> = self.sets.keys().cloned().collect();
        for name in names {
            if let Some(set) = self.sets.get_mut(&name) {
                let ps = set.peers.entry(peer.clone()).or_default();
                // A new connection is a new sync session: keep only what survives reconnects.
                ps.state = fresh_session(&ps.state);
                ps.reported_synced = false;
                ps.known = None;
                ps.told = None;
                ps.deferred = false;
            }
            self.sync_set_with(&name, &peer);
        }
    }

    /// The connection to `peer` is gone; its sync states are kept for when it comes back.
    pub fn remove_peer(&mut self, peer: &PeerId) {
        self.connected.remove(peer);
        self.transmits.retain(|(p, _)| p != peer);
        for set in self.sets.values_mut() {
            if let Some(ps) = set.peers.get_mut(peer) {
                ps.known = None;
                ps.told = None;
                ps.deferred = false;
            }
        }
    }

    // ---- inputs ----

    /// A frame from `peer`. Anything malformed, oversized or unusable yields
    /// [`Event::ProtocolError`] and changes no document. Frames from peers not added are ignored.
    pub fn handle_message(&mut self, peer: &PeerId, bytes: &[u8], now: Timestamp) {
        if !self.connected.contains(peer) {
            return;
        }
        if let Err(error) = self.receive(peer, bytes, now) {
            self.events.push_back(Event::ProtocolError {
                peer: peer.clone(),
                error,
            });
        }
    }

    /// Time passed: runs an anti-entropy round when one is due.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if now < self.next_anti_entropy {
            return;
        }
        self.next_anti_entropy = now.plus_millis(self.config.anti_entropy_interval_ms.max(1));
        if self.config.faults.skip_anti_entropy {
            return;
        }
        let names: Vec<String> = self.sets.keys().cloned().collect();
        for name in names {
            let Some(set) = self.sets.get_mut(&name) else {
                continue;
            };
            let heads = set.doc.heads();
            set.requested.clear();
            let mut due = Vec::new();
            for peer in &self.connected {
                let ps = set.peers.entry(peer.clone()).or_default();
                // A peer that told us in this connection that it holds exactly our heads needs
                // nothing from us (what it has that we lack, its own rounds offer), so nothing
                // is sent at all. Every other peer is told our heads again, so anything lost is
                // asked for again.
                let in_sync = ps.known.as_deref() == Some(heads.as_slice());
                if !ps.muted && !in_sync {
                    due.push(peer.clone());
                }
            }
            // Sync states that moved since they were last stored are stored now.
            let sync_states = Self::dirty_sync_states(set);
            if !sync_states.is_empty() {
                let id = self.new_persist_id();
                self.pending.insert(
                    id,
                    Pending {
                        flag_set: name.clone(),
                        writes: Vec::new(),
                        local: false,
                        changes: Vec::new(),
                    },
                );
                self.events.push_back(Event::PersistRequest(PersistRequest {
                    id,
                    flag_set: name.clone(),
                    changes: Vec::new(),
                    sync_states,
                }));
            }
            for peer in due {
                self.tell_heads(&name, &peer);
            }
        }
    }

    // ---- outputs ----

    /// The next frame to send, and to whom.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(PeerId, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// When [`Self::handle_timeout`] should be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        Some(self.next_anti_entropy)
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- internals ----

    fn new_persist_id(&mut self) -> PersistId {
        let id = PersistId(self.next_persist);
        self.next_persist += 1;
        id
    }

    fn ensure_set(&mut self, name: &str) -> Result<(), Error> {
        if self.sets.contains_key(name) {
            return Ok(());
        }
        if !wire::is_valid_flag_set_name(name) {
            return Err(Error::UnknownFlagSet(name.to_owned()));
        }
        if self.sets.len() >= self.config.max_flag_sets {
            return Err(Error::UnknownFlagSet(format!(
                "{name} (the limit of {} flag sets is reached)",
                self.config.max_flag_sets
            )));
        }
        let mut peers = BTreeMap::new();
        for p in &self.connected {
            peers.insert(p.clone(), PeerSync::default());
        }
        self.sets.insert(
            name.to_owned(),
            FlagSetState::new(FlagSetDoc::new(self.identity.clone()), peers),
        );
        Ok(())
    }

    fn dirty_sync_states(set: &mut FlagSetState) -> Vec<(PeerId, Vec<u8>)> {
        let mut out = Vec::new();
        for (peer, ps) in &mut set.peers {
            if ps.state.shared_heads != ps.persisted_shared {
                ps.persisted_shared = ps.state.shared_heads.clone();
                out.push((peer.clone(), ps.state.encode()));
            }
        }
        out
    }

    fn receive(&mut self, peer: &PeerId, bytes: &[u8], now: Timestamp) -> Result<(), Error> {
        let frame = wire::decode(bytes, self.config.max_frame_bytes)?;
        let name = frame.flag_set.to_owned();
        match frame.kind {
            FrameKind::Sync => {
                let message = untrusted("sync message", || sync::Message::decode(frame.payload))?;
                check_message(&message)?;
                self.ensure_set(&name)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                self.receive_sync(peer, &name, message)
            }
            FrameKind::Changes => {
                let (heads, rest) = wire::decode_heads(frame.payload)?;
                if rest.is_empty() {
                    return Err(Error::Protocol("changes frame without changes".into()));
                }
                let changes = parse_changes(rest)?;
                self.ensure_set(&name)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                self.receive_changes(peer, &name, heads, changes)
            }
            FrameKind::Heads => {
                let (heads, rest) = wire::decode_heads(frame.payload)?;
                if !rest.is_empty() {
                    return Err(Error::Protocol("heads frame with trailing bytes".into()));
                }
                self.ensure_set(&name)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                self.receive_heads(peer, &name, heads, now);
                Ok(())
            }
            FrameKind::Need => {
                let (hashes, rest) = wire::decode_heads(frame.payload)?;
                if !rest.is_empty() || hashes.is_empty() {
                    return Err(Error::Protocol(
                        "need frame must list 1 or more hashes only".into(),
                    ));
                }
                self.ensure_set(&name)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                self.receive_need(peer, &name, hashes);
                Ok(())
            }
        }
    }

    /// An Automerge sync message: the catch-up path (reconnects, anti-entropy, pulls).
    fn receive_sync(
        &mut self,
        peer: &PeerId,
        name: &str,
        message: sync::Message,
    ) -> Result<(), Error> {
        let set = self
            .sets
            .get_mut(name)
            .ok_or_else(|| Error::UnknownFlagSet(name.to_owned()))?;
        let before = set.doc.heads();
        let ps = set.peers.entry(peer.clone()).or_default();
        let doc: &mut Automerge = set.doc.automerge_mut();
        if let Err(e) = doc.receive_sync_message(&mut ps.state, message) {
            // Start the session again rather than reason from a state the bad message touched.
            ps.state = fresh_session(&ps.state);
            return Err(Error::Protocol(format!("sync message did not apply: {e}")));
        }
        if !self.config.faults.drop_sync_message_without_retry {
            // The peer asks for changes this session believes it sent: that message was lost.
            // Offer them again now rather than trade empty messages until the next round.
            if let Some(need) = ps.state.their_need.clone() {
                for hash in need {
                    ps.state.sent_hashes.remove(&hash);
                }
            }
        }
        let their_heads = ps.state.their_heads.clone().unwrap_or_default();
        let heads = set.doc.heads();
        if heads != before {
            let changes = set.doc.changes_since(&before);
            set.remember_encoded(&changes);
            self.doc_changed(name, heads, changes);
        }
        self.note_peer_heads(name, peer, their_heads);
        // Answer in the session first (it carries our heads), then tell every other peer.
        self.sync_set_with(name, peer);
        self.announce(name);
        Ok(())
    }

    /// Changes pushed by the node that made them. Applied when every dependency is here;
    /// otherwise the gap is fetched with a sync session with the sender.
    fn receive_changes(
        &mut self,
        peer: &PeerId,
        name: &str,
        their_heads: Vec<ChangeHash>,
        changes: Vec<automerge::Change>,
    ) -> Result<(), Error> {
        let set = self
            .sets
            .get_mut(name)
            .ok_or_else(|| Error::UnknownFlagSet(name.to_owned()))?;
        let doc = set.doc.automerge();
        let mut batch = BTreeSet::new();
        let new: Vec<automerge::Change> = changes
            .into_iter()
            .filter(|c| !has_change(doc, &c.hash()) && batch.insert(c.hash()))
            .collect();
        let gap = new.iter().any(|c| {
            c.deps()
                .iter()
                .any(|d| !batch.contains(d) && !has_change(doc, d))
        });
        if gap {
            self.pull(name, peer, their_heads);
            return Ok(());
        }
        let mut refused = None;
        if !new.is_empty() {
            let before = set.doc.heads();
            // Changes an earlier sync message left waiting for a dependency may apply along
            // with these; then only a diff of the document says what to store.
            let queued = !set.doc.automerge().get_missing_deps(&[]).is_empty();
            let all: Vec<u8> = new.iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
            // Through Automerge's loader, which validates each change against the document
            // (a checksummed change can still be malformed inside).
            set.doc
                .automerge_mut()
                .load_incremental(&all)
                .map_err(|e| Error::Protocol(format!("changes did not apply: {e}")))?;
            let doc = set.doc.automerge();
            let applied: Vec<&automerge::Change> =
                new.iter().filter(|c| has_change(doc, &c.hash())).collect();
            for c in &applied {
                set.remember(c.hash(), c.raw_bytes());
            }
            let applied: Vec<Vec<u8>> = applied.iter().map(|c| c.raw_bytes().to_vec()).collect();
            if applied.len() < new.len() {
                refused = Some(Error::Protocol(format!(
                    "{} of {} changes did not apply",
                    new.len() - applied.len(),
                    new.len()
                )));
            }
            let heads = set.doc.heads();
            if heads != before {
                let stored = if queued {
                    set.doc.changes_since(&before)
                } else {
                    applied
                };
                self.doc_changed(name, heads, stored);
            }
        }
        if let Some(error) = refused {
            return Err(error);
        }
        self.note_peer_heads(name, peer, their_heads);
        // Tells the sender (and, when something was new, every other peer) our heads.
        self.announce(name);
        Ok(())
    }

    /// A peer's heads. If it holds something we lack, fetch it with a sync session.
    fn receive_heads(
        &mut self,
        peer: &PeerId,
        name: &str,
        their_heads: Vec<ChangeHash>,
        now: Timestamp,
    ) {
        let Some(set) = self.sets.get_mut(name) else {
            return;
        };
        let doc = set.doc.automerge();
        if their_heads.iter().all(|h| has_change(doc, h)) {
            let behind = their_heads != set.doc.heads();
            self.note_peer_heads(name, peer, their_heads.clone());
            let noted = self
                .sets
                .get(name)
                .and_then(|s| s.peers.get(peer))
                .is_some_and(|ps| ps.known.as_ref() == Some(&their_heads));
            if behind && noted {
                // The peer lacks some of ours (what we told it was lost, or it was cut off):
                // tell it our heads now rather than at the next anti-entropy round.
                self.tell_heads(name, peer);
            }
            return;
        }
        // Ask this peer for the heads we lack (once, whoever announces them); if their own
        // dependencies are missing too, the answer shows a gap and a sync session fills it.
        let missing: Vec<ChangeHash> = their_heads
            .iter()
            .filter(|h| {
                !has_change(doc, h)
                    && set.requested.get(h).is_none_or(|(asked, at)| {
                        !self.connected.contains(asked)
                            || now.0.saturating_sub(at.0) >= REASK_AFTER_MS
                    })
            })
            .copied()
            .collect();
        if missing.is_empty() {
            return;
        }
        let ps = set.peers.entry(peer.clone()).or_default();
        if ps.muted {
            return;
        }
        let mut payload = Vec::new();
        if wire::encode_heads(&missing, &mut payload).is_err() {
            return;
        }
        if let Ok(frame) =
            wire::encode(FrameKind::Need, name, &payload, self.config.max_frame_bytes)
        {
            for h in missing {
                set.requested.insert(h, (peer.clone(), now));
            }
            self.transmits.push_back((peer.clone(), frame));
        }
    }

    /// A peer asks for changes it heard of: send those we hold, with our heads.
    fn receive_need(&mut self, peer: &PeerId, name: &str, hashes: Vec<ChangeHash>) {
        let faults = self.config.faults;
        let max = self.config.max_frame_bytes;
        let Some(set) = self.sets.get_mut(name) else {
            return;
        };
        if set.unpersisted_local > 0 && !faults.send_before_persist_and_reuse_actor {
            // Our heads name an unstored change now; answer once it is stored.
            set.deferred_needs.push((peer.clone(), hashes));
            return;
        }
        let doc = set.doc.automerge();
        let mut changes = Vec::new();
        for h in &hashes {
            if let Some(bytes) = set.recent.get(h) {
                changes.push(bytes.clone());
            } else if let Some(change) = doc.get_change_by_hash(h) {
                changes.push(change.raw_bytes().to_vec());
            }
        }
        if changes.is_empty() {
            return;
        }
        let heads = set.doc.heads();
        let ps = set.peers.entry(peer.clone()).or_default();
        if ps.muted {
            return;
        }
        if faults.drop_sync_message_without_retry {
            ps.muted = true;
            return;
        }
        let mut payload = Vec::new();
        if wire::encode_heads(&heads, &mut payload).is_err() {
            return;
        }
        for c in &changes {
            payload.extend_from_slice(c);
        }
        match wire::encode(FrameKind::Changes, name, &payload, max) {
            Ok(frame) => {
                self.transmits.push_back((peer.clone(), frame));
                ps.told = Some(heads);
            }
            Err(_) => {
                // Too large for one frame: a sync session sends it in parts.
                ps.state = fresh_session(&ps.state);
                self.sync_set_with(name, peer);
            }
        }
    }

    /// Starts a sync session with `peer`, which holds `their_heads` (some of which we lack): our
    /// message names what we need and carries a bloom filter of what we have since we last
    /// agreed, so the peer sends exactly what is missing.
    fn pull(&mut self, name: &str, peer: &PeerId, their_heads: Vec<ChangeHash>) {
        let Some(set) = self.sets.get_mut(name) else {
            return;
        };
        let ps = set.peers.entry(peer.clone()).or_default();
        if ps.muted {
            return;
        }
        ps.state = fresh_session(&ps.state);
        ps.state.their_heads = Some(their_heads);
        self.sync_set_with(name, peer);
    }

    /// The document of `name` moved to `heads` by changes from a peer: report it and store them.
    fn doc_changed(&mut self, name: &str, heads: Vec<ChangeHash>, changes: Vec<Vec<u8>>) {
        let Some(set) = self.sets.get_mut(name) else {
            return;
        };
        let sync_states = Self::dirty_sync_states(set);
        for ps in set.peers.values_mut() {
            ps.reported_synced = false;
        }
        let id = self.new_persist_id();
        self.pending.insert(
            id,
            Pending {
                flag_set: name.to_owned(),
                writes: Vec::new(),
                local: false,
                changes: Vec::new(),
            },
        );
        self.events.push_back(Event::FlagSetChanged {
            flag_set: name.to_owned(),
            heads,
        });
        self.events.push_back(Event::PersistRequest(PersistRequest {
            id,
            flag_set: name.to_owned(),
            changes,
            sync_states,
        }));
    }

    /// `peer` told us (in any frame of this connection) that it holds `heads`.
    fn note_peer_heads(&mut self, name: &str, peer: &PeerId, heads: Vec<ChangeHash>) {
        let Some(set) = self.sets.get_mut(name) else {
            return;
        };
        let doc = set.doc.automerge();
        if !heads.iter().all(|h| has_change(doc, h)) {
            return;
        }
        let ours = set.doc.heads();
        let ps = set.peers.entry(peer.clone()).or_default();
        if ps.known.as_deref() == Some(ours.as_slice()) && heads != ours {
            // The peer held all of ours already and its document only grows: heads we hold
            // all of yet differ from ours are an older frame overtaken by a newer one.
            return;
        }
        // Both sides hold these heads: the next session's bloom filter starts from them.
        if ps.state.shared_heads != heads {
            ps.state.shared_heads.clone_from(&heads);
        }
        if heads == ours {
            if !ps.reported_synced {
                ps.reported_synced = true;
                self.events.push_back(Event::PeerSynced {
                    peer: peer.clone(),
                    flag_set: name.to_owned(),
                    heads: heads.clone(),
                });
            }
        } else {
            ps.reported_synced = false;
        }
        ps.known = Some(heads);
    }

    /// Local changes of `name` were stored: once none is left unstored, push them to every peer
    /// and resume the sync sessions that were held back.
    fn after_local_persisted(&mut self, name: &str) {
        let send_early = self.config.faults.send_before_persist_and_reuse_actor;
        let Some(set) = self.sets.get_mut(name) else {
            return;
        };
        if set.unpersisted_local > 0 && !send_early {
            return;
        }
        let changes = std::mem::take(&mut set.unsent_local);
        let needs = std::mem::take(&mut set.deferred_needs);
        let deferred: Vec<PeerId> = set
            .peers
            .iter_mut()
            .filter(|(_, ps)| ps.deferred)
            .map(|(p, ps)| {
                ps.deferred = false;
                p.clone()
            })
            .collect();
        if !changes.is_empty() {
            self.push_changes(name, changes);
        }
        for peer in deferred {
            self.sync_set_with(name, &peer);
        }
        for (peer, hashes) in needs {
            if self.connected.contains(&peer) {
                self.receive_need(&peer, name, hashes);
            }
        }
        self.announce(name);
    }

    /// Pushes local changes (stored already, unless a planted bug says otherwise) with our heads
    /// to every connected peer: the change travels one hop from the node that made it.
    fn push_changes(&mut self, name: &str, changes: Vec<Vec<u8>>) {
        let faults = self.config.faults;
        let max = self.config.max_frame_bytes;
        let Some(set) = self.sets.get_mut(name) else {
            return;
        };
        let heads = set.doc.heads();
        let mut payload = Vec::new();
        if wire::encode_heads(&heads, &mut payload).is_err() {
            return;
        }
        for c in &changes {
            payload.extend_from_slice(c);
        }
        let frame = wire::encode(FrameKind::Changes, name, &payload, max).ok();
        let mut too_big = Vec::new();
        for peer in &self.connected {
            let ps = set.peers.entry(peer.clone()).or_default();
            if ps.muted || ps.known.as_deref() == Some(heads.as_slice()) {
                continue;
            }
            if faults.drop_sync_message_without_retry {
                ps.muted = true;
                continue;
            }
            match &frame {
                Some(frame) => {
                    self.transmits.push_back((peer.clone(), frame.clone()));
                    ps.told = Some(heads.clone());
                }
                None => {
                    ps.state = fresh_session(&ps.state);
                    too_big.push(peer.clone());
                }
            }
        }
        for peer in too_big {
            self.sync_set_with(name, &peer);
        }
    }

    /// Tells every connected peer that was not told our current heads what they are (a few dozen
    /// bytes; a peer that lacks something asks for it). Held back while local changes are
    /// unstored: the push after they are stored carries the heads.
    fn announce(&mut self, name: &str) {
        let send_early = self.config.faults.send_before_persist_and_reuse_actor;
        let max = self.config.max_frame_bytes;
        let Some(set) = self.sets.get_mut(name) else {
            return;
        };
        if set.unpersisted_local > 0 && !send_early {
            return;
        }
        let heads = set.doc.heads();
        let mut frame = None;
        for peer in &self.connected {
            let ps = set.peers.entry(peer.clone()).or_default();
            if ps.muted || ps.told.as_deref() == Some(heads.as_slice()) {
                continue;
            }
            if frame.is_none() {
                let mut payload = Vec::new();
                if wire::encode_heads(&heads, &mut payload).is_err() {
                    return;
                }
                frame = wire::encode(FrameKind::Heads, name, &payload, max).ok();
            }
            let Some(frame) = &frame else {
                return;
            };
            self.transmits.push_back((peer.clone(), frame.clone()));
            ps.told = Some(heads.clone());
        }
    }

    /// Tells `peer` our heads of `name` now, even if it was told them before (anti-entropy, a new
    /// connection). Held back while local changes are unstored; the push after they are stored
    /// carries the heads.
    fn tell_heads(&mut self, name: &str, peer: &PeerId) {
        let send_early = self.config.faults.send_before_persist_and_reuse_actor;
        let max = self.config.max_frame_bytes;
        if !self.connected.contains(peer) {
            return;
        }
        let Some(set) = self.sets.get_mut(name) else {
            return;
        };
        let ps = set.peers.entry(peer.clone()).or_default();
        ps.told = None;
        if ps.muted || (set.unpersisted_local > 0 && !send_early) {
            return;
        }
        let heads = set.doc.heads();
        let mut payload = Vec::new();
        if wire::encode_heads(&heads, &mut payload).is_err() {
            return;
        }
        if let Ok(frame) = wire::encode(FrameKind::Heads, name, &payload, max) {
            self.transmits.push_back((peer.clone(), frame));
            ps.told = Some(heads);
        }
    }

    fn sync_set_with_all(&mut self, name: &str) {
        let peers: Vec<PeerId> = self.connected.iter().cloned().collect();
        for peer in peers {
            self.sync_set_with(name, &peer);
        }
    }

    /// Generates the next sync message for (peer, flag set), unless local changes of this flag set
    /// are still waiting to be persisted (then it is generated once they are).
    fn sync_set_with(&mut self, name: &str, peer: &PeerId) {
        if !self.connected.contains(peer) {
            return;
        }
        let faults = self.config.faults;
        let max = self.config.max_frame_bytes;
        let Some(set) = self.sets.get_mut(name) else {
            return;
        };
        let ps = set.peers.entry(peer.clone()).or_default();
        if ps.muted {
            return;
        }
        if set.unpersisted_local > 0 && !faults.send_before_persist_and_reuse_actor {
            ps.deferred = true;
            return;
        }
        let doc: &Automerge = set.doc.automerge();
        let Some(message) = doc.generate_sync_message(&mut ps.state) else {
            return;
        };
        if faults.drop_sync_message_without_retry && !ps.muted && !message.changes.is_empty() {
            ps.muted = true;
            return;
        }
        let heads = message.heads.clone();
        match wire::encode(FrameKind::Sync, name, &message.encode(), max) {
            Ok(frame) => {
                self.transmits.push_back((peer.clone(), frame));
                ps.told = Some(heads);
            }
            Err(error) => {
                ps.state = fresh_session(&ps.state);
                self.events.push_back(Event::ProtocolError {
                    peer: peer.clone(),
                    error,
                });
            }
        }
    }
}

/// The heads `peer` is known to hold, as far as this document can tell: what it last told us, if
/// we hold all of it, else the heads both sides were last known to share.
fn known_heads(doc: &Automerge, state: &sync::State) -> Vec<ChangeHash> {
    match &state.their_heads {
        Some(theirs) if theirs.iter().all(|h| has_change(doc, h)) => theirs.clone(),
        _ => state
            .shared_heads
            .iter()
            .filter(|h| has_change(doc, h))
            .copied()
            .collect(),
    }
}

/// Whether `doc` holds (has applied) this change. Heads frames ask this for every hash, so the
/// usual case is a lookup in the change graph, without building the change or its metadata.
pub(crate) fn has_change(doc: &Automerge, hash: &ChangeHash) -> bool {
    // `get_change_meta_by_hash` builds the change's metadata (a walk of the op columns); the
    // missing-deps walk is a hash lookup when nothing is queued, which is nearly always.
    let missing = doc.get_missing_deps(std::slice::from_ref(hash));
    if missing.is_empty() {
        // Nothing queued (queued changes always miss a dependency) and `hash` is not missing.
        return true;
    }
    if missing.contains(hash) {
        // Neither applied nor queued.
        return false;
    }
    // Applied, or queued behind a missing dependency: only the metadata lookup tells which.
    doc.get_change_meta_by_hash(hash).is_some()
}

/// How many changes of `doc` are not among `known` and their ancestors. With nothing known, the
/// genesis change (which every replica builds identically) is not counted.
fn changes_after(doc: &Automerge, known: &[ChangeHash]) -> usize {
    let count = doc.get_changes_meta(known).len();
    if known.is_empty() {
        count.saturating_sub(1)
    } else {
        count
    }
}

/// A sync state for a new session: only the shared heads survive, as after a reconnect.
fn fresh_session(state: &sync::State) -> sync::State {
    sync::State::decode(&state.encode()).unwrap_or_default()
}

/// Parses the change chunks of a changes frame: each must be a complete, checksummed Automerge
/// change (a whole document is never pushed).
fn parse_changes(mut rest: &[u8]) -> Result<Vec<automerge::Change>, Error> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (chunk_type, chunk, tail) = split_chunk(rest)?;
        rest = tail;
        match chunk_type {
            CHUNK_CHANGE | CHUNK_COMPRESSED_CHANGE => {
                let change = untrusted("change chunk", || automerge::Change::try_from(chunk))?;
                out.push(change);
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected chunk type {other} in a changes frame"
                )))
            }
        }
    }
    Ok(out)
}

/// Decodes bytes from a peer with Automerge. automerge 0.12 panics on some malformed input
/// instead of returning an error (an op id counter over u32 in a change chunk, found by the
/// `wire` fuzz target); such a panic is a malformed frame, never a dead node. Only pure decoding
/// runs here, so nothing is left half-changed by the unwinding.
fn untrusted<T, E: std::fmt::Display>(
    what: &str,
    decode: impl FnOnce() -> Result<T, E>,
) -> Result<T, Error> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Error::Protocol(format!("{what}: {e}"))),
        Err(_) => Err(Error::Protocol(format!(
            "{what}: malformed (Automerge's decoder panicked on it)"
        ))),
    }
}

/// Refuses sync messages no honest peer sends, before any of it reaches the document: more than
/// one bloom filter, or change data that is not a sequence of complete, checksummed changes or
/// documents. (Automerge would otherwise apply the chunks before a bad one and drop the rest.)
fn check_message(message: &sync::Message) -> Result<(), Error> {
    if message.have.len() > 1 {
        return Err(Error::Protocol(format!(
            "sync message with {} bloom filters",
            message.have.len()
        )));
    }
    for have in &message.have {
        check_bloom(&have.bloom.to_bytes())?;
    }
    for data in message.changes.iter() {
        let mut rest = data;
        while !rest.is_empty() {
            let (chunk_type, chunk, tail) = split_chunk(rest)?;
            rest = tail;
            match chunk_type {
                CHUNK_DOCUMENT => {
                    untrusted("document chunk", || {
                        Automerge::load_with_options(
                            chunk,
                            automerge::LoadOptions::new()
                                .on_partial_load(automerge::OnPartialLoad::Error)
                                .verification_mode(automerge::VerificationMode::Check),
                        )
                    })?;
                }
                CHUNK_CHANGE | CHUNK_COMPRESSED_CHANGE => {
                    untrusted("change chunk", || automerge::Change::try_from(chunk))?;
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected chunk type {other} in a sync message"
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Refuses bloom filters Automerge would divide by zero on or allocate without bound for (its
/// parameters are read from the wire): a non-empty filter needs 1–64 bits per entry, 1–64 probes and
/// at least one byte of bits.
fn check_bloom(encoded: &[u8]) -> Result<(), Error> {
    if encoded.is_empty() {
        return Ok(());
    }
    let bad = || Error::Protocol("bloom filter with unusable parameters".into());
    let mut rest = encoded;
    let mut next = || leb128::read::unsigned(&mut rest).map_err(|_| bad());
    let _entries = next()?;
    let bits_per_entry = next()?;
    let probes = next()?;
    if !(1..=64).contains(&bits_per_entry) || !(1..=64).contains(&probes) || rest.is_empty() {
        return Err(bad());
    }
    Ok(())
}

/// Automerge's storage chunk types (automerge's binary format: magic, checksum, type, LEB128
/// length, data).
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED_CHANGE: u8 = 2;
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Splits the first storage chunk off `data`: (type, the whole chunk, the rest).
fn split_chunk(data: &[u8]) -> Result<(u8, &[u8], &[u8]), Error> {
    let bad = |why: &str| Error::Protocol(format!("change data: {why}"));
    if data.len() < 9 || data[..4] != CHUNK_MAGIC {
        return Err(bad("not an Automerge chunk"));
    }
    let chunk_type = data[8];
    let mut len_bytes = &data[9..];
    let before = len_bytes.len();
    let len = leb128::read::unsigned(&mut len_bytes).map_err(|_| bad("bad chunk length"))?;
    let header = 9 + (before - len_bytes.len());
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| header.checked_add(l))
        .filter(|&end| end <= data.len())
        .ok_or_else(|| bad("truncated chunk"))?;
    Ok((chunk_type, &data[..end], &data[end..]))
}
