//! The driver: one task that owns every flag-set document, applies admin writes, persists them
//! before acknowledging, and publishes a recompiled snapshot after every change.
//!
//! HTTP handlers talk to it only through [`DriverHandle`] (commands over an mpsc channel, each
//! with a oneshot for the reply), so the document implementation behind it can change without
//! touching the HTTP layer.
//!
//! Persist-before-ack: a write's reply is sent only after its change record was appended to the
//! store (on a blocking thread) and the new snapshot was swapped in, so a client that got a 2xx
//! reads its own write from any later evaluation on this node, and finds it after a crash.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bunting_model::{DefaultVariant, Flag, FlagSet, FlagState, Problem, Problems};
use bunting_store::Store;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

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
    /// The store failed; the write was not applied.
    Store(String),
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
    /// Applies a write; returns the new heads once it is durable and being served.
    pub async fn write(
        &self,
        flag_set: &str,
        write: AdminWrite,
        based_on: Option<Vec<String>>,
        meta: WriteMeta,
    ) -> Result<Vec<String>, Refused> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Write {
            flag_set: flag_set.to_owned(),
            write: Box::new(write),
            based_on,
            meta,
            reply,
        })
        .await?;
        rx.await.map_err(|_| Refused::Stopped)?
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

/// The record appended to the store for one change.
#[derive(Serialize, Deserialize)]
struct ChangeRecord {
    /// The whole flagd document after the change.
    document: Value,
    entry: HistoryEntry,
}

struct Doc {
    set: FlagSet,
    history: Vec<HistoryEntry>,
    heads: Vec<String>,
}

struct Driver {
    store: Arc<dyn Store>,
    snapshots: Arc<Snapshots>,
    identity: Identity,
    docs: BTreeMap<String, Doc>,
}

/// Loads every flag set from the store (creating `default`, from `initial` when given, on first
/// start), publishes their snapshots, marks the node ready and starts the driver task.
pub async fn start(
    store: Arc<dyn Store>,
    snapshots: Arc<Snapshots>,
    identity: Identity,
    initial: Option<FlagSet>,
    ready: Arc<AtomicBool>,
) -> Result<(DriverHandle, tokio::task::JoinHandle<()>), NodeError> {
    let loaded = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || load_all(store.as_ref()))
            .await
            .map_err(|e| NodeError::Corrupt(format!("load task failed: {e}")))??
    };
    let mut driver = Driver {
        store,
        snapshots,
        identity,
        docs: loaded,
    };
    if !driver.docs.contains_key(DEFAULT_FLAG_SET) {
        let meta = WriteMeta {
            token_id: "node".into(),
            message: "first start".into(),
            wall_time_ms: now_ms(),
        };
        let set = initial.unwrap_or_else(|| {
            FlagSet::from_value(&serde_json::json!({"flags": {}})).unwrap_or_default()
        });
        driver
            .commit(DEFAULT_FLAG_SET, set, None, "create-set", &meta)
            .await
            .map_err(|r| {
                NodeError::Config(format!("could not create the default flag set: {r:?}"))
            })?;
    }
    let now = now_ms() / 1000;
    for (name, doc) in &driver.docs {
        driver
            .snapshots
            .publish(name, &doc.set, doc.heads.clone(), now);
    }
    ready.store(true, Ordering::Release);
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(driver.run(rx));
    Ok((DriverHandle { tx }, task))
}

fn load_all(store: &dyn Store) -> Result<BTreeMap<String, Doc>, NodeError> {
    let mut docs = BTreeMap::new();
    for name in store.flag_sets()? {
        let loaded = store.load(&name)?;
        let mut doc: Option<Doc> = None;
        for change in &loaded.changes {
            let record: ChangeRecord = serde_json::from_slice(&change.bytes).map_err(|e| {
                NodeError::Corrupt(format!("flag set {name}, change {}: {e}", change.seq))
            })?;
            let set = FlagSet::from_value_unvalidated(&record.document).map_err(|p| {
                NodeError::Corrupt(format!("flag set {name}, change {}: {p}", change.seq))
            })?;
            let d = doc.get_or_insert_with(|| Doc {
                set: FlagSet::default(),
                history: Vec::new(),
                heads: Vec::new(),
            });
            d.set = set;
            d.heads = vec![record.entry.change.clone()];
            d.history.push(record.entry);
        }
        if let Some(d) = doc {
            docs.insert(name, d);
        }
    }
    Ok(docs)
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Driver {
    /// Serves commands until every handle is dropped; commands already queued are finished, so a
    /// graceful shutdown completes in-flight writes.
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(command) = rx.recv().await {
            match command {
                Command::Write {
                    flag_set,
                    write,
                    based_on,
                    meta,
                    reply,
                } => {
                    let result = self.write(&flag_set, *write, based_on, &meta).await;
                    let _ = reply.send(result);
                }
                Command::CreateFlagSet { name, meta, reply } => {
                    let result = if self.docs.contains_key(&name) {
                        Err(Refused::FlagSetExists(name))
                    } else {
                        let empty = FlagSet::from_value(&serde_json::json!({"flags": {}}))
                            .unwrap_or_default();
                        self.commit(&name, empty, None, "create-set", &meta).await
                    };
                    let _ = reply.send(result);
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
                        .docs
                        .iter()
                        .map(|(name, d)| FlagSetSummary {
                            name: name.clone(),
                            flags: d.set.flags.len(),
                            heads: d.heads.clone(),
                        })
                        .collect();
                    let _ = reply.send(list);
                }
                Command::Stop => break,
            }
        }
        tracing::info!("driver stopped: every queued write finished");
    }

    fn read(&self, flag_set: &str, query: Query) -> Result<(Answer, Vec<String>), Refused> {
        let doc = self
            .docs
            .get(flag_set)
            .ok_or_else(|| Refused::UnknownFlagSet(flag_set.to_owned()))?;
        let answer = match query {
            Query::Flag(key) => Answer::Flag(doc.set.flags.get(&key).map(Flag::to_value)),
            Query::Document => Answer::Document(doc.set.to_value()),
            Query::History {
                flag,
                offset,
                limit,
            } => {
                let matching: Vec<&HistoryEntry> = doc
                    .history
                    .iter()
                    .rev()
                    .filter(|e| flag.is_none() || e.flag == flag)
                    .collect();
                let limit = if limit == 0 { 100 } else { limit.min(1000) };
                Answer::History {
                    total: matching.len(),
                    entries: matching
                        .into_iter()
                        .skip(offset)
                        .take(limit)
                        .cloned()
                        .collect(),
                }
            }
            // One writer per document here: no concurrent values until replication lands.
            Query::Conflicts => Answer::Conflicts(Vec::new()),
        };
        Ok((answer, doc.heads.clone()))
    }

    async fn write(
        &mut self,
        flag_set: &str,
        write: AdminWrite,
        based_on: Option<Vec<String>>,
        meta: &WriteMeta,
    ) -> Result<Vec<String>, Refused> {
        let doc = self
            .docs
            .get(flag_set)
            .ok_or_else(|| Refused::UnknownFlagSet(flag_set.to_owned()))?;
        if let Some(based_on) = &based_on {
            if !same_heads(based_on, &doc.heads) {
                let current = match write.flag_key() {
                    Some(key) => vec![CurrentValue {
                        pointer: bunting_model::pointer(["flags", key]),
                        value: doc.set.flags.get(key).map(Flag::to_value),
                    }],
                    None => vec![CurrentValue {
                        pointer: String::new(),
                        value: Some(doc.set.to_value()),
                    }],
                };
                return Err(Refused::Stale {
                    current,
                    heads: doc.heads.clone(),
                });
            }
        }
        let mut set = doc.set.clone();
        let operation = match write {
            AdminWrite::CreateFlag { key, flag } => {
                if set.flags.contains_key(&key) {
                    return Err(Refused::FlagExists(key));
                }
                set.flags.insert(key, flag);
                "create"
            }
            AdminWrite::PutFlag { key, flag } => {
                let op = if set.flags.contains_key(&key) {
                    "update"
                } else {
                    "create"
                };
                set.flags.insert(key, flag);
                op
            }
            AdminWrite::PatchFlag { key, patch } => {
                let flag = set
                    .flags
                    .get_mut(&key)
                    .ok_or_else(|| Refused::FlagNotFound(key.clone()))?;
                patch.apply(flag);
                "update"
            }
            AdminWrite::SetState { key, state } => {
                let flag = set
                    .flags
                    .get_mut(&key)
                    .ok_or_else(|| Refused::FlagNotFound(key.clone()))?;
                flag.state = state.unwrap_or(match flag.state {
                    FlagState::Enabled => FlagState::Disabled,
                    FlagState::Disabled => FlagState::Enabled,
                });
                "update"
            }
            AdminWrite::DeleteFlag { key } => {
                if set.flags.shift_remove(&key).is_none() {
                    return Err(Refused::FlagNotFound(key));
                }
                "delete"
            }
            AdminWrite::ReplaceSet { set: new } => {
                set = new;
                "replace-set"
            }
        };
        // The result must validate as a whole: a write never makes a valid flag set invalid.
        let checked = FlagSet::from_value(&set.to_value()).map_err(Refused::Invalid)?;
        let flag = match operation {
            "replace-set" => None,
            _ => self.pending_flag_key(&checked, doc),
        };
        self.commit(flag_set, checked, flag, operation, meta).await
    }

    /// The key a flag-level write touched (the one whose value differs).
    fn pending_flag_key(&self, new: &FlagSet, doc: &Doc) -> Option<String> {
        new.flags
            .keys()
            .chain(doc.set.flags.keys())
            .find(|k| new.flags.get(*k) != doc.set.flags.get(*k))
            .cloned()
    }

    /// Persists the new document, then swaps it in and publishes its snapshot.
    async fn commit(
        &mut self,
        flag_set: &str,
        set: FlagSet,
        flag: Option<String>,
        operation: &str,
        meta: &WriteMeta,
    ) -> Result<Vec<String>, Refused> {
        let document = set.to_value();
        let previous = self
            .docs
            .get(flag_set)
            .map(|d| d.heads.clone())
            .unwrap_or_default();
        let mut hasher = Sha256::new();
        hasher.update(serde_json::to_vec(&document).unwrap_or_default());
        for h in &previous {
            hasher.update(h.as_bytes());
        }
        hasher.update(self.identity.node.as_bytes());
        hasher.update(self.identity.incarnation.to_be_bytes());
        hasher.update(meta.wall_time_ms.to_be_bytes());
        let change = hex::encode(&hasher.finalize()[..16]);
        let entry = HistoryEntry {
            change: change.clone(),
            token_id: meta.token_id.clone(),
            region: self.identity.region.clone(),
            node: self.identity.node.clone(),
            wall_time_ms: meta.wall_time_ms,
            message: meta.message.clone(),
            flag,
            operation: operation.to_owned(),
        };
        let bytes = serde_json::to_vec(&ChangeRecord {
            document,
            entry: entry.clone(),
        })
        .map_err(|e| Refused::Store(e.to_string()))?;
        let store = self.store.clone();
        let name = flag_set.to_owned();
        tokio::task::spawn_blocking(move || store.append_changes(&name, &[bytes.as_slice()]))
            .await
            .map_err(|e| Refused::Store(format!("persist task failed: {e}")))?
            .map_err(|e| Refused::Store(e.to_string()))?;
        let heads = vec![change];
        self.snapshots
            .publish(flag_set, &set, heads.clone(), now_ms() / 1000);
        let doc = self.docs.entry(flag_set.to_owned()).or_insert_with(|| Doc {
            set: FlagSet::default(),
            history: Vec::new(),
            heads: Vec::new(),
        });
        doc.set = set;
        doc.heads = heads.clone();
        doc.history.push(entry);
        Ok(heads)
    }
}

fn same_heads(a: &[String], b: &[String]) -> bool {
    let mut a: Vec<&String> = a.iter().collect();
    let mut b: Vec<&String> = b.iter().collect();
    a.sort();
    b.sort();
    a == b
}

/// Problems for a value that is not the JSON object a flag must be.
pub fn not_an_object(at: &str) -> Problems {
    Problems(vec![Problem::new(at, "must be a JSON object")])
}
