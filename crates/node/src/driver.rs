//! The driver: one task that owns every flag-set document, applies admin writes, persists them
//! before acknowledging, and publishes a recompiled snapshot after every change.
//!
//! HTTP handlers talk to it only through [`DriverHandle`] (commands over an mpsc channel, each
//! with a oneshot for the reply), so the document implementation behind it can change without
//! touching the HTTP layer.
//!
//! The documents are a [`bunting_replica::Replica`]; the driver carries out its effects:
//!
//! - `PersistRequest` → [`Store::append_changes`] on a blocking thread → `Replica::persisted`;
//! - `WriteAcknowledged` → the write's HTTP reply (persist-before-ack);
//! - `FlagSetChanged` → recompile with the engine and swap the snapshot, but only once nothing of
//!   that flag set is waiting to be stored, so evaluations never serve a change this node could
//!   still lose in a crash;
//! - timers (`poll_timeout` / `handle_timeout`) on the wall clock;
//! - with a cluster configured ([`crate::gossip_link`]): transport events in (`add_peer`,
//!   `remove_peer`, `handle_message`), frames out (`poll_transmit` → `Gossip::send`) after every
//!   step, and `ProtocolError` → `Gossip::reject_peer`. Without one, frames are dropped.
//!
//! A client that got a 2xx therefore reads its own write from any later evaluation on this node,
//! and finds it after a crash.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bunting_model::{DefaultVariant, Flag, FlagSet, FlagState, Problems};
use bunting_replica::{
    ChangeHash, ConflictKind, Event, HistoryQuery, PeerId, PersistId, PersistRequest, Replica,
    ReplicaConfig, StoredFlagSet, Timestamp, Write, WriteCommand, WriteId,
};
use bunting_store::{Store, StoreError, COMPACT_AFTER_CHANGES};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::gossip_link::Link;
use crate::idempotency::{self, KeyScope, Lookup};
use crate::snapshot::Snapshots;
use crate::NodeError;

/// The flag set created on first start (and loaded from `--flags`).
pub const DEFAULT_FLAG_SET: &str = "default";

/// One admin write against one flag set.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminWrite {
    /// Creates a flag that must not exist yet.
    CreateFlag {
        key: String,
        flag: Flag,
    },
    /// Creates or replaces a flag (written as a field-level difference).
    PutFlag {
        key: String,
        flag: Flag,
    },
    /// Changes some fields of an existing flag.
    PatchFlag {
        key: String,
        patch: FlagPatch,
    },
    DeleteFlag {
        key: String,
    },
    /// Sets the state; `None` flips it.
    SetState {
        key: String,
        state: Option<FlagState>,
    },
    /// Replaces the whole flag set with a flagd document.
    ReplaceSet {
        set: FlagSet,
    },
}

impl AdminWrite {
    fn flag_key(&self) -> Option<&str> {
        match self {
            AdminWrite::CreateFlag { key, .. }
            | AdminWrite::PutFlag { key, .. }
            | AdminWrite::PatchFlag { key, .. }
            | AdminWrite::DeleteFlag { key }
            | AdminWrite::SetState { key, .. } => Some(key),
            AdminWrite::ReplaceSet { .. } => None,
        }
    }
}

/// Fields of a flag to change; `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlagPatch {
    pub state: Option<FlagState>,
    pub default_variant: Option<DefaultVariant>,
    /// `Some(None)` removes the targeting rule.
    pub targeting: Option<Option<Value>>,
    /// Variant key → new value, or `None` to remove the variant.
    pub variants: Vec<(String, Option<Value>)>,
    /// Metadata entry → new value, or `None` to remove it.
    pub metadata: Vec<(String, Option<Value>)>,
}

impl FlagPatch {
    fn apply(&self, flag: &mut Flag) {
        if let Some(s) = self.state {
            flag.state = s;
        }
        if let Some(d) = &self.default_variant {
            flag.default_variant = d.clone();
        }
        if let Some(t) = &self.targeting {
            flag.targeting = t.clone();
        }
        for (k, v) in &self.variants {
            match v {
                Some(v) => {
                    flag.variants.insert(k.clone(), v.clone());
                }
                None => {
                    flag.variants.shift_remove(k);
                }
            }
        }
        for (k, v) in &self.metadata {
            match v {
                Some(v) => {
                    flag.metadata.insert(k.clone(), v.clone());
                }
                None => {
                    flag.metadata.remove(k);
                }
            }
        }
    }
}

/// Who made a write and why; recorded with the change (the audit log).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WriteMeta {
    /// The id of the token that authorised the write (never the secret).
    pub token_id: String,
    /// The admin's reason, from `X-Change-Message`.
    pub message: String,
    /// Wall-clock time of the write, read by the HTTP layer.
    pub wall_time_ms: u64,
}

/// One entry of a flag set's audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// Identifies the change (a head after it was made).
    pub change: String,
    pub token_id: String,
    pub region: String,
    pub node: String,
    pub wall_time_ms: u64,
    pub message: String,
    /// The flag the change touched; `None` for set-wide changes.
    pub flag: Option<String>,
    /// `create-set`, `create`, `update`, `delete` or `replace-set`.
    pub operation: String,
}

/// A field's value now, returned when an optimistic write is refused.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurrentValue {
    pub pointer: String,
    pub value: Option<Value>,
}

/// Why the driver refused a command. Nothing was stored when it returns one of these.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    UnknownFlagSet(String),
    FlagSetExists(String),
    FlagNotFound(String),
    FlagExists(String),
    /// The result of the write does not validate.
    Invalid(Problems),
    /// `If-Match` named heads that are no longer current.
    Stale {
        current: Vec<CurrentValue>,
        heads: Vec<String>,
    },
    /// The store failed; the write was taken back and is neither served nor stored.
    Store(String),
    /// The change the write made is larger than the store keeps in one record or commit; the
    /// write was taken back.
    TooLarge(String),
    /// The write was applied but not yet stored when its deadline passed. It will be stored (and
    /// served) or taken back; a retry with the same idempotency key answers which.
    Pending {
        idempotency_key: Option<String>,
    },
    /// The idempotency key was used before for a different write.
    KeyReused(String),
    /// The node is shutting down.
    Stopped,
}

/// Which part of a flag set to read.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    Flag(String),
    Document,
    History {
        flag: Option<String>,
        offset: usize,
        limit: usize,
    },
    Conflicts,
}

/// The answer to a [`Query`]; every answer carries the heads it was read at.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Flag(Option<Value>),
    Document(Value),
    History {
        entries: Vec<HistoryEntry>,
        total: usize,
    },
    /// Concurrent values still visible to admins (JSON objects: pointer, kind, values).
    Conflicts(Vec<Value>),
}

/// A flag set as listed by the admin API.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlagSetSummary {
    pub name: String,
    pub flags: usize,
    pub heads: Vec<String>,
}

enum Command {
    Write {
        flag_set: String,
        write: Box<AdminWrite>,
        based_on: Option<Vec<String>>,
        meta: WriteMeta,
        idempotency_key: Option<String>,
        reply: oneshot::Sender<Result<Vec<String>, Refused>>,
    },
    CreateFlagSet {
        name: String,
        meta: WriteMeta,
        reply: oneshot::Sender<Result<Vec<String>, Refused>>,
    },
    Read {
        flag_set: String,
        query: Query,
        reply: oneshot::Sender<Result<(Answer, Vec<String>), Refused>>,
    },
    List {
        reply: oneshot::Sender<Vec<FlagSetSummary>>,
    },
    /// Finish what is queued, then stop.
    Stop,
}

/// How HTTP handlers reach the driver. Cheap to clone.
#[derive(Clone)]
pub struct DriverHandle {
    tx: mpsc::Sender<Command>,
}

impl DriverHandle {
    /// Applies a write; returns the new heads once it is durable and being served. A write
    /// with an idempotency key that this node has seen (same token, flag set and write) gets
    /// the first answer and applies nothing new. A write not answered within `deadline` is
    /// [`Refused::Pending`]: it goes on, and is stored and served, or taken back.
    pub async fn write(
        &self,
        flag_set: &str,
        write: AdminWrite,
        based_on: Option<Vec<String>>,
        meta: WriteMeta,
        idempotency_key: Option<String>,
        deadline: Duration,
    ) -> Result<Vec<String>, Refused> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Write {
            flag_set: flag_set.to_owned(),
            write: Box::new(write),
            based_on,
            meta,
            idempotency_key: idempotency_key.clone(),
            reply,
        })
        .await?;
        match tokio::time::timeout(deadline, rx).await {
            Ok(answer) => answer.map_err(|_| Refused::Stopped)?,
            Err(_) => Err(Refused::Pending { idempotency_key }),
        }
    }

    pub async fn create_flag_set(
        &self,
        name: &str,
        meta: WriteMeta,
    ) -> Result<Vec<String>, Refused> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::CreateFlagSet {
            name: name.to_owned(),
            meta,
            reply,
        })
        .await?;
        rx.await.map_err(|_| Refused::Stopped)?
    }

    pub async fn read(
        &self,
        flag_set: &str,
        query: Query,
    ) -> Result<(Answer, Vec<String>), Refused> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Read {
            flag_set: flag_set.to_owned(),
            query,
            reply,
        })
        .await?;
        rx.await.map_err(|_| Refused::Stopped)?
    }

    pub async fn list(&self) -> Result<Vec<FlagSetSummary>, Refused> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::List { reply }).await?;
        rx.await.map_err(|_| Refused::Stopped)
    }

    /// Asks the driver to stop once every command queued before this one is finished.
    pub async fn stop(&self) {
        let _ = self.tx.send(Command::Stop).await;
    }

    async fn send(&self, command: Command) -> Result<(), Refused> {
        self.tx.send(command).await.map_err(|_| Refused::Stopped)
    }
}

/// Who this node is, recorded in every change it makes.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node: String,
    pub region: String,
    /// Differs on every process start (from the store's incarnation counter).
    pub incarnation: u64,
}

/// A write's answer: the heads after it, or why it was refused.
type WriteAnswer = Result<Vec<String>, Refused>;
type Reply = oneshot::Sender<WriteAnswer>;

/// The outcome of one persist task.
struct Persisted {
    id: PersistId,
    flag_set: String,
    /// The last stored sequence number, or why nothing was stored.
    result: Result<u64, Refused>,
    /// How many changes the request stored.
    changes: u64,
}

struct Driver {
    replica: Replica,
    store: Arc<dyn Store>,
    snapshots: Arc<Snapshots>,
    /// Writes waiting for their acknowledgement.
    waiting: HashMap<WriteId, Reply>,
    /// Acknowledged writes whose flag set is not yet published again (a persist of it is still
    /// queued): answered once it is, so a client reads its own write.
    held_acks: Vec<(WriteId, String)>,
    /// Idempotency keys of recent keyed writes, and the key of each write still waiting.
    keys: idempotency::Index<WriteAnswer, Reply>,
    keyed: HashMap<WriteId, (KeyScope, u64)>,
    /// Persist requests in the order the replica emitted them; the front one is being stored
    /// when `storing`. One at a time: a request may hold changes that depend on an earlier one's,
    /// and the store must never hold a change without its dependencies (the node would refuse
    /// to start), nor a change of a write that was refused.
    persists: VecDeque<PersistRequest>,
    storing: bool,
    /// Why the last persist of a flag set failed: the answer to the writes it takes back.
    failures: HashMap<String, Refused>,
    /// Flag sets changed but not yet published (they wait for their persists).
    dirty: BTreeSet<String>,
    /// Highest stored change sequence number per flag set, and changes since its snapshot.
    stored: HashMap<String, (u64, u64)>,
    done_tx: mpsc::UnboundedSender<Persisted>,
    done_rx: mpsc::UnboundedReceiver<Persisted>,
    /// The gossip transport, when this node is part of a cluster.
    link: Option<Link>,
    /// Set when the store failed and could not be read back: writes are refused with this.
    broken: Option<String>,
}

/// Loads every flag set from the store (creating `default`, from `initial` when given, on first
/// start), publishes their snapshots, marks the node ready and starts the driver task.
pub async fn start(
    store: Arc<dyn Store>,
    snapshots: Arc<Snapshots>,
    identity: Identity,
    initial: Option<FlagSet>,
    ready: Arc<AtomicBool>,
    link: Option<Link>,
) -> Result<(DriverHandle, tokio::task::JoinHandle<()>), NodeError> {
    let peers: Vec<String> = link
        .as_ref()
        .map(|l| l.gossip.stats().peers.into_keys().map(|p| p.0).collect())
        .unwrap_or_default();
    let (stored_sets, seqs) = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || load_all(store.as_ref(), &peers))
            .await
            .map_err(|e| NodeError::Corrupt(format!("load task failed: {e}")))??
    };
    let config = ReplicaConfig::new(
        identity.node.clone(),
        identity.region.clone(),
        identity.incarnation,
    );
    let replica = Replica::restore(config, stored_sets, Timestamp(now_ms()))
        .map_err(|e| NodeError::Corrupt(e.to_string()))?;
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let driver = Driver {
        replica,
        store,
        snapshots,
        waiting: HashMap::new(),
        held_acks: Vec::new(),
        keys: idempotency::Index::default(),
        keyed: HashMap::new(),
        persists: VecDeque::new(),
        storing: false,
        failures: HashMap::new(),
        dirty: BTreeSet::new(),
        stored: seqs,
        done_tx,
        done_rx,
        link,
        broken: None,
    };
    let now = now_ms() / 1000;
    for name in driver.replica.flag_set_names() {
        driver.publish(&name, now);
    }
    let has_default = driver.replica.flag_set(DEFAULT_FLAG_SET).is_some();
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(driver.run(rx));
    let handle = DriverHandle { tx };
    if !has_default {
        let meta = WriteMeta {
            token_id: "node".into(),
            message: "first start".into(),
            wall_time_ms: now_ms(),
        };
        handle
            .create_flag_set(DEFAULT_FLAG_SET, meta.clone())
            .await
            .map_err(|r| {
                NodeError::Config(format!("could not create the default flag set: {r:?}"))
            })?;
        if let Some(set) = initial {
            let meta = WriteMeta {
                message: "loaded with --flags on first start".into(),
                ..meta
            };
            handle
                .write(
                    DEFAULT_FLAG_SET,
                    AdminWrite::ReplaceSet { set },
                    None,
                    meta,
                    None,
                    Duration::from_secs(3600),
                )
                .await
                .map_err(|r| NodeError::Config(format!("could not load --flags: {r:?}")))?;
        }
    }
    ready.store(true, Ordering::Release);
    Ok((handle, task))
}

type Loaded = (Vec<StoredFlagSet>, HashMap<String, (u64, u64)>);

/// Runs CPU-bound work on this task's thread while the runtime hands its other tasks to
/// another worker (on a multi-threaded runtime; a single-threaded one, as in tests, just runs it).
fn off_the_async_workers<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// How long a stopping driver waits for the store to finish what is queued.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Loads every flag set, with the stored sync state of each of `peers`, so a reconnect resumes
/// the sync instead of starting it over.
fn load_all(store: &dyn Store, peers: &[String]) -> Result<Loaded, NodeError> {
    let mut sets = Vec::new();
    let mut seqs = HashMap::new();
    for name in store.flag_sets()? {
        let (mut set, seq) = load_set(store, &name)?;
        for peer in peers {
            if let Some(state) = store.sync_state(peer, &name)? {
                set.sync_states.push((PeerId(peer.clone()), state));
            }
        }
        seqs.insert(name, seq);
        sets.push(set);
    }
    Ok((sets, seqs))
}

/// One flag set as stored (without sync states), with its last sequence number and the number
/// of changes after its snapshot.
fn load_set(store: &dyn Store, name: &str) -> Result<(StoredFlagSet, (u64, u64)), NodeError> {
    let loaded = store.load(name)?;
    let seq = (loaded.last_seq(), loaded.changes.len() as u64);
    let set = StoredFlagSet {
        name: name.to_owned(),
        snapshot: loaded.snapshot.map(|s| s.bytes),
        changes: loaded.changes.into_iter().map(|c| c.bytes).collect(),
        sync_states: Vec::new(),
    };
    Ok((set, seq))
}

/// Stores one persist request: its changes in one commit, then the peers' sync states (which
/// only save bandwidth). A refusal says whether the change was too large.
fn store_request(store: &dyn Store, request: &PersistRequest) -> Result<u64, Refused> {
    let refs: Vec<&[u8]> = request.changes.iter().map(Vec::as_slice).collect();
    let receipt = store
        .append_changes(&request.flag_set, &refs)
        .map_err(|e| match e {
            StoreError::RecordTooLarge { .. } | StoreError::BatchTooLarge { .. } => {
                Refused::TooLarge(e.to_string())
            }
            other => Refused::Store(other.to_string()),
        })?;
    for (PeerId(peer), state) in &request.sync_states {
        if let Err(e) = store.put_sync_state(peer, &request.flag_set, state) {
            // The changes are stored; a lost sync state only costs a fuller sync later.
            tracing::warn!(peer = %peer, error = %e, "storing a sync state failed");
        }
    }
    Ok(receipt.last_seq)
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex_heads(heads: &[ChangeHash]) -> Vec<String> {
    heads.iter().map(ToString::to_string).collect()
}

/// Heads from `If-Match`; `None` when one is not a change hash at all.
fn parse_heads(heads: &[String]) -> Option<Vec<ChangeHash>> {
    heads
        .iter()
        .map(|h| {
            let bytes = hex::decode(h).ok()?;
            ChangeHash::try_from(bytes.as_slice()).ok()
        })
        .collect()
}

impl Driver {
    /// Serves commands until [`DriverHandle::stop`] (or every handle is gone); commands queued
    /// before that are finished, and so are their persists, so a graceful shutdown completes
    /// in-flight writes.
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut stopping = false;
        let mut give_up_at = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        loop {
            if stopping && self.waiting.is_empty() && self.persists.is_empty() {
                break;
            }
            if stopping && tokio::time::Instant::now() >= give_up_at {
                // The store has not answered for the whole grace period: stop anyway. The
                // writes still waiting may or may not be stored; their clients are told so.
                tracing::error!(
                    waiting = self.waiting.len(),
                    "the store did not finish within the shutdown grace period; stopping"
                );
                let ids: Vec<WriteId> = self.waiting.keys().copied().collect();
                for id in ids {
                    self.answer(
                        id,
                        Err(Refused::Pending {
                            idempotency_key: None,
                        }),
                    );
                }
                break;
            }
            let next_timer = self
                .replica
                .poll_timeout()
                .map(|t| Duration::from_millis(t.0.saturating_sub(now_ms())))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                command = rx.recv(), if !stopping => match command {
                    Some(Command::Stop) | None => {
                        stopping = true;
                        give_up_at = tokio::time::Instant::now() + SHUTDOWN_GRACE;
                    }
                    Some(command) => self.handle(command).await,
                },
                Some(done) = self.done_rx.recv() => self.on_persisted(done).await,
                _ = tokio::time::sleep_until(give_up_at), if stopping => {}
                event = Link::next_event(&mut self.link) => self.on_gossip(event),
                _ = tokio::time::sleep(next_timer) => {
                    self.replica.handle_timeout(Timestamp(now_ms()));
                    self.drain();
                }
            }
        }
        if let Some(link) = &self.link {
            link.gossip.shutdown().await;
        }
        tracing::info!("driver stopped: every queued write is stored");
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Write {
                flag_set,
                write,
                based_on,
                meta,
                idempotency_key,
                reply,
            } => {
                let keyed = idempotency_key.map(|key| {
                    let fingerprint = idempotency::fingerprint(&(&write, &based_on));
                    let scope = KeyScope {
                        token_id: meta.token_id.clone(),
                        flag_set: flag_set.clone(),
                        key,
                    };
                    (scope, fingerprint)
                });
                let mut reply = reply;
                if let Some((scope, fingerprint)) = &keyed {
                    match self.keys.lookup(scope, *fingerprint, reply) {
                        (Lookup::New, Some(r)) => reply = r,
                        (Lookup::Answered(answer), Some(r)) => {
                            let _ = r.send(answer);
                            return;
                        }
                        (Lookup::Mismatch, Some(r)) => {
                            let _ = r.send(Err(Refused::KeyReused(scope.key.clone())));
                            return;
                        }
                        // Joined: the retry waits for the first write's answer.
                        _ => return,
                    }
                }
                let result = match self.broken.clone() {
                    Some(why) => Err(Refused::Store(why)),
                    // Validation and the Automerge write are bounded but can take milliseconds
                    // on a large flag set: let the runtime move other tasks off this thread.
                    None => off_the_async_workers(|| {
                        self.local_write(&flag_set, *write, based_on, meta)
                    }),
                };
                match result {
                    Ok(id) => {
                        if let Some((scope, fingerprint)) = keyed {
                            self.keys.start(scope.clone(), fingerprint);
                            self.keyed.insert(id, (scope, fingerprint));
                        }
                        self.waiting.insert(id, reply);
                        self.drain();
                    }
                    Err(refused) => {
                        if let Some((scope, fingerprint)) = keyed {
                            let _ = self.keys.finish(&scope, fingerprint, Err(refused.clone()));
                        }
                        let _ = reply.send(Err(refused));
                    }
                }
            }
            Command::CreateFlagSet { name, meta, reply } => {
                let _ = meta;
                if self.replica.flag_set(&name).is_some() {
                    let _ = reply.send(Err(Refused::FlagSetExists(name)));
                    return;
                }
                if let Err(e) = self.replica.create_flag_set(&name, Timestamp(now_ms())) {
                    let _ = reply.send(Err(Refused::Invalid(Problems(vec![
                        bunting_model::Problem::new("/name", e.to_string()),
                    ]))));
                    return;
                }
                // An empty flag set has only the genesis change, which no write persists: store
                // it so the flag set exists after a restart.
                let genesis = self
                    .replica
                    .flag_set(&name)
                    .map(|d| d.changes_since(&[]))
                    .unwrap_or_default();
                let heads = self
                    .replica
                    .flag_set(&name)
                    .map(|d| hex_heads(&d.heads()))
                    .unwrap_or_default();
                let store = self.store.clone();
                let set = name.clone();
                // Creation is rare and needs no ordering with writes (genesis is the same
                // everywhere), so the loop waits for it here and publishes once it is stored.
                let result = tokio::task::spawn_blocking(move || {
                    let refs: Vec<&[u8]> = genesis.iter().map(Vec::as_slice).collect();
                    store.append_changes(&set, &refs)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
                match result {
                    Ok(receipt) => {
                        self.stored.insert(
                            name.clone(),
                            (receipt.last_seq, receipt.changes_since_snapshot),
                        );
                        self.publish(&name, now_ms() / 1000);
                        let _ = reply.send(Ok(heads));
                    }
                    Err(e) => {
                        tracing::error!(flag_set = %name, error = %e, "storing a new flag set failed");
                        if let Err(e) = self.replica.forget_unstored_flag_set(&name) {
                            tracing::error!(flag_set = %name, error = %e, "could not take the flag set back");
                        }
                        let _ = reply.send(Err(Refused::Store(e)));
                    }
                }
                self.drain();
            }
            Command::Read {
                flag_set,
                query,
                reply,
            } => {
                let _ = reply.send(self.read(&flag_set, query));
            }
            Command::List { reply } => {
                let list = self
                    .replica
                    .flag_set_names()
                    .into_iter()
                    .filter_map(|name| {
                        let doc = self.replica.flag_set(&name)?;
                        Some(FlagSetSummary {
                            flags: doc.to_flagd().flags.len(),
                            heads: hex_heads(&doc.heads()),
                            name,
                        })
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Command::Stop => {}
        }
    }

    /// Turns an admin write into a replica write; refusals change nothing.
    fn local_write(
        &mut self,
        flag_set: &str,
        write: AdminWrite,
        based_on: Option<Vec<String>>,
        meta: WriteMeta,
    ) -> Result<WriteId, Refused> {
        let doc = self
            .replica
            .flag_set(flag_set)
            .ok_or_else(|| Refused::UnknownFlagSet(flag_set.to_owned()))?;
        let flag_key = write.flag_key().map(str::to_owned);
        let stale = |doc: &bunting_replica::FlagSetDoc| Refused::Stale {
            current: match &flag_key {
                Some(key) => vec![CurrentValue {
                    pointer: bunting_model::pointer(["flags", key]),
                    value: doc.flag(key).map(|f| f.to_value()),
                }],
                None => vec![CurrentValue {
                    pointer: String::new(),
                    value: Some(doc.to_flagd().to_value()),
                }],
            },
            heads: hex_heads(&doc.heads()),
        };
        let based_on = match based_on {
            None => None,
            Some(heads) => Some(parse_heads(&heads).ok_or_else(|| stale(doc))?),
        };
        let command = match write {
            AdminWrite::CreateFlag { key, flag } => {
                if doc.flag(&key).is_some() {
                    return Err(Refused::FlagExists(key));
                }
                WriteCommand::PutFlag { key, flag }
            }
            AdminWrite::PutFlag { key, flag } => WriteCommand::PutFlag { key, flag },
            AdminWrite::PatchFlag { key, patch } => {
                let mut flag = doc
                    .flag(&key)
                    .ok_or_else(|| Refused::FlagNotFound(key.clone()))?;
                patch.apply(&mut flag);
                WriteCommand::PutFlag { key, flag }
            }
            AdminWrite::SetState { key, state } => {
                let current = doc
                    .flag(&key)
                    .ok_or_else(|| Refused::FlagNotFound(key.clone()))?;
                let state = state.unwrap_or(match current.state {
                    FlagState::Enabled => FlagState::Disabled,
                    FlagState::Disabled => FlagState::Enabled,
                });
                WriteCommand::SetState { key, state }
            }
            AdminWrite::DeleteFlag { key } => WriteCommand::DeleteFlag { key },
            AdminWrite::ReplaceSet { set } => WriteCommand::ReplaceSet { set },
        };
        let meta = bunting_replica::WriteMeta {
            token_id: meta.token_id,
            wall_time_ms: meta.wall_time_ms,
            message: meta.message,
        };
        let result = self.replica.handle_local_write(
            flag_set,
            Write { command, based_on },
            meta,
            Timestamp(now_ms()),
        );
        result.map_err(|e| match e {
            bunting_replica::Error::Invalid(p) => Refused::Invalid(p),
            bunting_replica::Error::FlagNotFound(k) => Refused::FlagNotFound(k),
            bunting_replica::Error::UnknownFlagSet(s) => Refused::UnknownFlagSet(s),
            bunting_replica::Error::Stale { current } => Refused::Stale {
                current: current
                    .into_iter()
                    .map(|f| CurrentValue {
                        pointer: f.pointer,
                        value: f.value,
                    })
                    .collect(),
                heads: self
                    .replica
                    .flag_set(flag_set)
                    .map(|d| hex_heads(&d.heads()))
                    .unwrap_or_default(),
            },
            bunting_replica::Error::UnknownHeads(_) => match self.replica.flag_set(flag_set) {
                Some(doc) => stale(doc),
                None => Refused::UnknownFlagSet(flag_set.to_owned()),
            },
            other => Refused::Store(other.to_string()),
        })
    }

    fn read(&self, flag_set: &str, query: Query) -> Result<(Answer, Vec<String>), Refused> {
        let doc = self
            .replica
            .flag_set(flag_set)
            .ok_or_else(|| Refused::UnknownFlagSet(flag_set.to_owned()))?;
        let answer = match query {
            Query::Flag(key) => Answer::Flag(doc.flag(&key).map(|f| f.to_value())),
            Query::Document => Answer::Document(doc.to_flagd().to_value()),
            Query::History {
                flag,
                offset,
                limit,
            } => {
                let all = doc.history(&HistoryQuery {
                    flag,
                    offset: 0,
                    limit: usize::MAX,
                });
                let limit = if limit == 0 { 100 } else { limit.min(1000) };
                Answer::History {
                    total: all.len(),
                    entries: all
                        .into_iter()
                        .skip(offset)
                        .take(limit)
                        .map(|e| HistoryEntry {
                            change: e.author.change,
                            token_id: e.author.token_id,
                            region: e.author.region,
                            node: e.author.node,
                            wall_time_ms: e.author.wall_time_ms,
                            message: e.message,
                            flag: e.flag,
                            operation: e.operation,
                        })
                        .collect(),
                }
            }
            Query::Conflicts => Answer::Conflicts(
                doc.conflicts()
                    .into_iter()
                    .map(|c| {
                        json!({
                            "pointer": c.pointer,
                            "kind": match c.kind {
                                ConflictKind::ConcurrentValues => "concurrentValues",
                                ConflictKind::DeletedWhileEdited => "deletedWhileEdited",
                            },
                            "values": c.values.into_iter().map(|v| json!({
                                "value": v.value,
                                "winner": v.winner,
                                "author": v.author.map(|a| json!({
                                    "tokenId": a.token_id,
                                    "region": a.region,
                                    "node": a.node,
                                    "wallTimeMs": a.wall_time_ms,
                                    "change": a.change,
                                })),
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect(),
            ),
        };
        Ok((answer, hex_heads(&doc.heads())))
    }

    /// Feeds one transport event into the replica.
    fn on_gossip(&mut self, event: bunting_gossip::GossipEvent) {
        use bunting_gossip::GossipEvent;
        let now = Timestamp(now_ms());
        if let Some(link) = &self.link {
            link.status.heard(&event, now.0);
        }
        match event {
            GossipEvent::Connected(peer) => {
                tracing::info!(peer = %peer.0, "peer connected");
                self.replica.add_peer(peer, now);
            }
            GossipEvent::Disconnected(peer) => {
                tracing::info!(peer = %peer.0, "peer disconnected");
                self.replica.remove_peer(&peer);
            }
            GossipEvent::Frame { peer, bytes } => self.replica.handle_message(&peer, &bytes, now),
        }
        self.drain();
    }

    /// Carries out everything the replica asked for.
    fn drain(&mut self) {
        let mut acks = Vec::new();
        while let Some(event) = self.replica.poll_event() {
            match event {
                Event::FlagSetChanged { flag_set, .. } => {
                    self.dirty.insert(flag_set);
                }
                Event::PersistRequest(request) => self.persist(request),
                Event::WriteAcknowledged { id, flag_set, .. } => acks.push((id, flag_set)),
                Event::WriteRefused { id, flag_set } => {
                    let why = self.failures.get(&flag_set).cloned().unwrap_or_else(|| {
                        Refused::Store("an earlier change could not be stored".into())
                    });
                    self.answer(id, Err(why));
                }
                Event::PeerSynced { peer, .. } => {
                    if let Some(link) = &self.link {
                        link.status.synced(peer, now_ms());
                    }
                }
                Event::ProtocolError { peer, error } => {
                    tracing::warn!(peer = %peer.0, %error, "peer sent an unusable frame");
                    if let Some(link) = &self.link {
                        link.gossip.reject_peer(&peer, &error.to_string());
                    }
                }
            }
        }
        while let Some((peer, frame)) = self.replica.poll_transmit() {
            if let Some(link) = &self.link {
                // Never waits; a peer without a connection resyncs when it reconnects.
                if let Err(e) = link.gossip.send(&peer, frame) {
                    tracing::debug!(peer = %peer.0, error = %e, "frame not sent");
                }
            }
        }
        let now = now_ms() / 1000;
        let ready: Vec<String> = self
            .dirty
            .iter()
            .filter(|s| !self.persist_pending(s))
            .cloned()
            .collect();
        for name in ready {
            self.dirty.remove(&name);
            self.publish(&name, now);
        }
        // Replies go out after the snapshot swap, so a client reads its own write; a flag set
        // with a persist still queued is published (and its acks sent) once that is stored.
        self.held_acks.extend(acks);
        let (ready, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held_acks)
            .into_iter()
            .partition(|(_, set)| !self.dirty.contains(set));
        self.held_acks = held;
        for (id, flag_set) in ready {
            let heads = self
                .replica
                .flag_set(&flag_set)
                .map(|d| hex_heads(&d.heads()))
                .unwrap_or_default();
            self.answer(id, Ok(heads));
        }
    }

    /// Sends a write's answer to its client, and to the retries that carried its key.
    fn answer(&mut self, id: WriteId, answer: WriteAnswer) {
        if let Some((scope, fingerprint)) = self.keyed.remove(&id) {
            for retry in self.keys.finish(&scope, fingerprint, answer.clone()) {
                let _ = retry.send(answer.clone());
            }
        }
        if let Some(reply) = self.waiting.remove(&id) {
            let _ = reply.send(answer);
        }
    }

    fn publish(&self, name: &str, now_secs: u64) {
        if let Some(doc) = self.replica.flag_set(name) {
            self.snapshots
                .publish(name, &doc.to_flagd(), hex_heads(&doc.heads()), now_secs);
        }
    }

    /// Whether a persist request of `flag_set` waits or is being stored.
    fn persist_pending(&self, flag_set: &str) -> bool {
        self.persists.iter().any(|r| r.flag_set == flag_set)
    }

    /// Queues a persist request; requests are stored one at a time, in order.
    fn persist(&mut self, request: PersistRequest) {
        self.persists.push_back(request);
        self.store_next();
    }

    /// Stores the front request on a blocking thread; the result comes back to the loop.
    fn store_next(&mut self) {
        if self.storing {
            return;
        }
        let Some(request) = self.persists.front().cloned() else {
            return;
        };
        self.storing = true;
        let store = self.store.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let (id, flag_set, changes) = (
                request.id,
                request.flag_set.clone(),
                request.changes.len() as u64,
            );
            let result =
                tokio::task::spawn_blocking(move || store_request(store.as_ref(), &request))
                    .await
                    .unwrap_or_else(|e| Err(Refused::Store(format!("persist task failed: {e}"))));
            let _ = done.send(Persisted {
                id,
                flag_set,
                result,
                changes,
            });
        });
    }

    async fn on_persisted(&mut self, done: Persisted) {
        self.storing = false;
        if self.persists.front().map(|r| r.id) == Some(done.id) {
            self.persists.pop_front();
        }
        match done.result {
            Ok(last_seq) => {
                let entry = self.stored.entry(done.flag_set.clone()).or_default();
                entry.0 = entry.0.max(last_seq);
                entry.1 += done.changes;
                if let Err(e) = self.replica.persisted(done.id, Timestamp(now_ms())) {
                    tracing::error!(error = %e, "replica refused a persist confirmation");
                }
                self.maybe_compact(&done.flag_set);
            }
            Err(refusal) => self.take_back(done.id, &done.flag_set, refusal).await,
        }
        self.drain();
        self.store_next();
    }

    /// A persist request failed: reload the flag set from what the store holds, so the changes
    /// that were not stored (this request's and the later ones queued behind it) are neither
    /// served nor synced, and refuse the writes that made them. Never retried: a change the
    /// store refuses once (too large, disk full) is refused again, and retrying for ever would
    /// keep every later write of the flag set waiting.
    async fn take_back(&mut self, id: PersistId, flag_set: &str, refusal: Refused) {
        tracing::error!(%flag_set, error = ?refusal, "storing a change failed; taking the write back");
        self.failures.insert(flag_set.to_owned(), refusal);
        let store = self.store.clone();
        let name = flag_set.to_owned();
        let reloaded = tokio::task::spawn_blocking(move || load_set(store.as_ref(), &name))
            .await
            .map_err(|e| NodeError::Corrupt(format!("reload task failed: {e}")))
            .and_then(|r| r);
        let outcome = reloaded.and_then(|(stored, seq)| {
            self.stored.insert(flag_set.to_owned(), seq);
            self.replica
                .persist_failed(id, stored, Timestamp(now_ms()))
                .map_err(|e| NodeError::Corrupt(e.to_string()))
        });
        match outcome {
            Ok(dropped) => {
                self.persists.retain(|r| !dropped.contains(&r.id));
                tracing::info!(%flag_set, "flag set reloaded from the store");
            }
            Err(e) => {
                // What is stored cannot be read back, so the node cannot tell what it may serve:
                // stop taking writes (evaluations keep the last published snapshot, which held
                // only stored changes). A restart reports the damage.
                tracing::error!(%flag_set, error = %e, "the store cannot be read back; this node stops taking writes");
                self.broken = Some(format!("the store failed and could not be read back: {e}"));
            }
        }
    }

    /// Compacts a flag set once enough changes piled up and every change it holds is stored.
    fn maybe_compact(&mut self, flag_set: &str) {
        if self.persist_pending(flag_set) {
            return;
        }
        let Some(&(last_seq, since)) = self.stored.get(flag_set) else {
            return;
        };
        if since < COMPACT_AFTER_CHANGES {
            return;
        }
        let Some(doc) = self.replica.flag_set(flag_set) else {
            return;
        };
        let snapshot = doc.save();
        self.stored.insert(flag_set.to_owned(), (last_seq, 0));
        let store = self.store.clone();
        let name = flag_set.to_owned();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.compact(&name, &snapshot, last_seq) {
                tracing::warn!(flag_set = %name, error = %e, "compaction failed; will retry later");
            }
        });
    }
}
