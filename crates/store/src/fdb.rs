//! The FoundationDB backend (cargo feature `fdb`): the nodes of a region share one FDB cluster.

use std::sync::Arc;

use foundationdb::options::DatabaseOption;
use foundationdb::tuple::Subspace;
use foundationdb::{Database, FdbBindingError, RangeOption, RetryableTransaction, Transaction};
use futures::TryStreamExt;

use crate::record::{self, split_u64};
use crate::{
    check_batch, check_compaction, check_contiguous, check_name, check_record, AppendReceipt,
    Limits, LoadedFlagSet, RecordId, Snapshot, Store, StoreError, StoredChange,
};

/// FoundationDB refuses values over 100,000 bytes; records are split into chunks of this size.
const CHUNK_BYTES: usize = 90_000;

/// Transactions give up after this long instead of retrying for ever when the cluster is away.
const TRANSACTION_TIMEOUT_MS: i32 = 10_000;

/// A store in a FoundationDB cluster shared by the nodes of a region.
///
/// Each mutating call is one FDB transaction (retried by the client on conflicts), so a call that
/// returned is committed to the cluster's replicated log: a node can be replaced by one with an
/// empty disk that takes over its node id and loads everything from FDB, incarnation included.
///
/// Key layout (tuple layer; every value is a framed record, split into chunks of 90,000 bytes
/// because FDB values are limited to 100,000 bytes):
///
/// | key                                                        | value                   |
/// |------------------------------------------------------------|-------------------------|
/// | (`"bunting"`, region, node, `"f"`, flag set)               | covers_through u64 LE   |
/// | (`"bunting"`, region, node, `"c"`, flag set, seq, chunk)   | change bytes            |
/// | (`"bunting"`, region, node, `"s"`, flag set, chunk)        | covers_through ‖ snapshot |
/// | (`"bunting"`, region, node, `"y"`, peer, flag set, chunk)  | sync state bytes        |
/// | (`"bunting"`, region, node, `"t"`, token id, chunk)        | token record bytes      |
/// | (`"bunting"`, region, node, `"i"`)                         | incarnation u64 LE      |
///
/// Each node writes only under its own (region, node) prefix: every log has one writer, so a
/// compaction can never delete a change that another node appended and this node's snapshot
/// does not contain. Changes of other nodes arrive through replication as usual.
///
/// When a commit's outcome is unknown (`commit_unknown_result`) the client retries, so a batch
/// may then be stored twice under new sequence numbers (and an incarnation skipped): harmless,
/// since Automerge applies a change it already has as a no-op.
///
/// The FDB client is asynchronous; this store drives it with a blocking executor, which fits the
/// synchronous [`Store`] trait (called from `spawn_blocking`). The FDB network thread must have
/// been started (`foundationdb::boot`, once per process) before [`FdbStore::open`].
pub struct FdbStore {
    db: Arc<Database>,
    /// (`"bunting"`, region, node): everything this node keeps.
    root: Subspace,
}

impl std::fmt::Debug for FdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbStore")
            .field("prefix", &self.root.bytes())
            .finish_non_exhaustive()
    }
}

impl FdbStore {
    /// Limits of this backend: FDB transactions are limited to 10 MB, so a batch or a snapshot
    /// must fit well inside one.
    pub const LIMITS: Limits = Limits {
        max_record_bytes: bunting_model::limits::MAX_CHANGE_BYTES,
        max_batch_bytes: 8 << 20,
        max_snapshot_bytes: 8 << 20,
    };

    /// Connects to the cluster named by `cluster_file` (the default cluster file when `None`)
    /// and keeps this node's data under (`"bunting"`, `region`, `node`).
    pub fn open(cluster_file: Option<&str>, region: &str, node: &str) -> Result<Self, StoreError> {
        let db = Database::new(cluster_file).map_err(fdb_error)?;
        db.set_option(DatabaseOption::TransactionTimeout(TRANSACTION_TIMEOUT_MS))
            .map_err(fdb_error)?;
        Self::with_database(Arc::new(db), region, node)
    }

    /// Like [`FdbStore::open`] on a database handle the caller already holds.
    pub fn with_database(db: Arc<Database>, region: &str, node: &str) -> Result<Self, StoreError> {
        check_name("region", region)?;
        check_name("node id", node)?;
        Ok(FdbStore {
            db,
            root: Subspace::all().subspace(&("bunting", region, node)),
        })
    }

    fn info_key(&self, flag_set: &str) -> Vec<u8> {
        self.root.pack(&("f", flag_set))
    }

    fn changes(&self, flag_set: &str) -> Subspace {
        self.root.subspace(&("c", flag_set))
    }

    fn snapshot(&self, flag_set: &str) -> Subspace {
        self.root.subspace(&("s", flag_set))
    }

    fn sync_state_space(&self, peer: &str, flag_set: &str) -> Subspace {
        self.root.subspace(&("y", peer, flag_set))
    }

    fn token_space(&self, token_id: &str) -> Subspace {
        self.root.subspace(&("t", token_id))
    }

    /// Runs `body` as one FDB transaction and blocks until it is committed. `body` returns
    /// `Ok(Err(e))` for a refusal decided before it wrote anything (the empty commit is harmless).
    fn run<T, F, Fut>(&self, body: F) -> Result<T, StoreError>
    where
        F: Fn(RetryableTransaction) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, StoreError>, FdbBindingError>>,
    {
        futures::executor::block_on(self.db.run(|trx, _maybe_committed| body(trx)))
            .map_err(fdb_error)?
    }
}

fn fdb_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Fdb(e.to_string())
}

/// Reads every key-value pair of a subspace, in key order.
async fn read_range(
    trx: &Transaction,
    space: &Subspace,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, FdbBindingError> {
    let mut out = Vec::new();
    let mut stream = trx.get_ranges_keyvalues(RangeOption::from(space.range()), false);
    while let Some(kv) = stream.try_next().await? {
        out.push((kv.key().to_vec(), kv.value().to_vec()));
    }
    Ok(out)
}

/// Reads a chunked record (the concatenation of its chunks), or `None` if it has none.
async fn read_record(
    trx: &Transaction,
    space: &Subspace,
) -> Result<Option<Vec<u8>>, FdbBindingError> {
    let chunks = read_range(trx, space).await?;
    if chunks.is_empty() {
        return Ok(None);
    }
    Ok(Some(chunks.into_iter().flat_map(|(_, v)| v).collect()))
}

/// Replaces a chunked record.
fn write_record(trx: &Transaction, space: &Subspace, framed: &[u8]) {
    let (begin, end) = space.range();
    trx.clear_range(&begin, &end);
    for (i, chunk) in framed.chunks(CHUNK_BYTES).enumerate() {
        trx.set(&space.pack(&(i as u32)), chunk);
    }
}

fn info_id(flag_set: &str) -> RecordId {
    RecordId::FlagSetInfo {
        flag_set: flag_set.to_owned(),
    }
}

/// Decodes a flag set's info record into the snapshot coverage.
fn decode_covers(flag_set: &str, stored: Option<&[u8]>) -> Result<Option<u64>, StoreError> {
    let Some(stored) = stored else {
        return Ok(None);
    };
    let id = info_id(flag_set);
    Ok(Some(split_u64(&id, record::decode(&id, stored)?)?.0))
}

/// The highest change sequence number stored for a flag set, if any.
async fn last_change_seq(
    trx: &Transaction,
    space: &Subspace,
    flag_set: &str,
) -> Result<Result<Option<u64>, StoreError>, FdbBindingError> {
    let opt = RangeOption {
        limit: Some(1),
        reverse: true,
        ..RangeOption::from(space.range())
    };
    let values = trx.get_range(&opt, 1, false).await?;
    let Some(kv) = values.iter().next() else {
        return Ok(Ok(None));
    };
    Ok(match space.unpack::<(u64, u32)>(kv.key()) {
        Ok((seq, _chunk)) => Ok(Some(seq)),
        Err(e) => Err(StoreError::Corrupt {
            record: RecordId::Change {
                flag_set: flag_set.to_owned(),
                seq: 0,
            },
            detail: format!("unreadable change key: {e:?}"),
        }),
    })
}

/// (snapshot covers or None, last seq) of a flag set inside a transaction.
async fn flag_set_position(
    store: &FdbStore,
    trx: &Transaction,
    flag_set: &str,
) -> Result<Result<(Option<u64>, u64), StoreError>, FdbBindingError> {
    let info = trx.get(&store.info_key(flag_set), false).await?;
    let covers = match decode_covers(flag_set, info.as_deref()) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    let last = match last_change_seq(trx, &store.changes(flag_set), flag_set).await? {
        Ok(l) => l,
        Err(e) => return Ok(Err(e)),
    };
    let base = covers.unwrap_or(0);
    Ok(Ok((covers, last.map_or(base, |l| l.max(base)))))
}

impl Store for FdbStore {
    fn limits(&self) -> Limits {
        Self::LIMITS
    }

    fn append_changes(
        &self,
        flag_set: &str,
        changes: &[&[u8]],
    ) -> Result<AppendReceipt, StoreError> {
        check_name("flag set", flag_set)?;
        self.run(|trx| async move {
            let (covers, last) = match flag_set_position(self, &trx, flag_set).await? {
                Ok(p) => p,
                Err(e) => return Ok(Err(e)),
            };
            let base = covers.unwrap_or(0);
            if let Err(e) = check_batch(&self.limits(), flag_set, last + 1, changes) {
                return Ok(Err(e));
            }
            if changes.is_empty() {
                return Ok(Ok(AppendReceipt {
                    last_seq: last,
                    changes_since_snapshot: last - base,
                }));
            }
            if covers.is_none() {
                trx.set(
                    &self.info_key(flag_set),
                    &record::encode(&info_id(flag_set), &0u64.to_le_bytes()),
                );
            }
            let space = self.changes(flag_set);
            for (seq, change) in (last + 1..).zip(changes) {
                let id = RecordId::Change {
                    flag_set: flag_set.to_owned(),
                    seq,
                };
                write_record(&trx, &space.subspace(&(seq,)), &record::encode(&id, change));
            }
            let last_seq = last + changes.len() as u64;
            Ok(Ok(AppendReceipt {
                last_seq,
                changes_since_snapshot: last_seq - base,
            }))
        })
    }

    fn load(&self, flag_set: &str) -> Result<LoadedFlagSet, StoreError> {
        check_name("flag set", flag_set)?;
        self.run(|trx| async move {
            let info = trx.get(&self.info_key(flag_set), false).await?;
            let covers = match decode_covers(flag_set, info.as_deref()) {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(Ok(LoadedFlagSet::default())),
                Err(e) => return Ok(Err(e)),
            };
            let snapshot = match read_record(&trx, &self.snapshot(flag_set)).await? {
                None => None,
                Some(framed) => {
                    let id = RecordId::Snapshot {
                        flag_set: flag_set.to_owned(),
                    };
                    let decoded = record::decode(&id, &framed).and_then(|p| split_u64(&id, p));
                    match decoded {
                        Ok((covers_through, _)) if covers_through != covers => {
                            return Ok(Err(StoreError::Corrupt {
                                record: id,
                                detail: format!(
                                    "covers change #{covers_through} but the flag set's info says #{covers}"
                                ),
                            }))
                        }
                        Ok((covers_through, bytes)) => Some(Snapshot {
                            covers_through,
                            bytes: bytes.to_vec(),
                        }),
                        Err(e) => return Ok(Err(e)),
                    }
                }
            };
            let space = self.changes(flag_set);
            let mut changes: Vec<StoredChange> = Vec::new();
            let mut pending: Option<(u64, Vec<u8>)> = None;
            let mut finished = Vec::new();
            for (key, value) in read_range(&trx, &space).await? {
                let seq = match space.unpack::<(u64, u32)>(&key) {
                    Ok((seq, _chunk)) => seq,
                    Err(e) => {
                        return Ok(Err(StoreError::Corrupt {
                            record: RecordId::Change {
                                flag_set: flag_set.to_owned(),
                                seq: pending.as_ref().map_or(0, |p| p.0 + 1),
                            },
                            detail: format!("unreadable change key: {e:?}"),
                        }))
                    }
                };
                match &mut pending {
                    Some((s, bytes)) if *s == seq => bytes.extend_from_slice(&value),
                    _ => {
                        if let Some(done) = pending.replace((seq, value)) {
                            finished.push(done);
                        }
                    }
                }
            }
            finished.extend(pending);
            for (seq, framed) in finished {
                let id = RecordId::Change {
                    flag_set: flag_set.to_owned(),
                    seq,
                };
                match record::decode(&id, &framed) {
                    Ok(bytes) => changes.push(StoredChange {
                        seq,
                        bytes: bytes.to_vec(),
                    }),
                    Err(e) => return Ok(Err(e)),
                }
            }
            if let Err(e) = check_contiguous(flag_set, covers, &changes) {
                return Ok(Err(e));
            }
            Ok(Ok(LoadedFlagSet { snapshot, changes }))
        })
    }

    fn compact(
        &self,
        flag_set: &str,
        snapshot: &[u8],
        covers_through: u64,
    ) -> Result<(), StoreError> {
        check_name("flag set", flag_set)?;
        let id = RecordId::Snapshot {
            flag_set: flag_set.to_owned(),
        };
        let framed = record::encode_parts(&id, &covers_through.to_le_bytes(), snapshot);
        self.run(|trx| {
            let framed = &framed;
            async move {
                let (covers, last) = match flag_set_position(self, &trx, flag_set).await? {
                    Ok(p) => p,
                    Err(e) => return Ok(Err(e)),
                };
                if let Err(e) = check_compaction(
                    &self.limits(),
                    flag_set,
                    snapshot.len(),
                    covers_through,
                    covers.unwrap_or(0),
                    last,
                ) {
                    return Ok(Err(e));
                }
                write_record(&trx, &self.snapshot(flag_set), framed);
                trx.set(
                    &self.info_key(flag_set),
                    &record::encode(&info_id(flag_set), &covers_through.to_le_bytes()),
                );
                // Same transaction: the new snapshot and the deletion commit together.
                let space = self.changes(flag_set);
                let begin = space.range().0;
                let end = space.subspace(&(covers_through,)).range().1;
                trx.clear_range(&begin, &end);
                Ok(Ok(()))
            }
        })
    }

    fn flag_sets(&self) -> Result<Vec<String>, StoreError> {
        self.run(|trx| async move {
            let space = self.root.subspace(&("f",));
            let mut names = Vec::new();
            for (key, _) in read_range(&trx, &space).await? {
                match space.unpack::<(String,)>(&key) {
                    Ok((name,)) => names.push(name),
                    Err(e) => {
                        return Ok(Err(StoreError::Fdb(format!(
                            "unreadable flag set key under {:?}: {e:?}",
                            space.bytes()
                        ))))
                    }
                }
            }
            Ok(Ok(names))
        })
    }

    fn changes_since_snapshot(&self, flag_set: &str) -> Result<u64, StoreError> {
        check_name("flag set", flag_set)?;
        self.run(|trx| async move {
            Ok(flag_set_position(self, &trx, flag_set)
                .await?
                .map(|(covers, last)| last - covers.unwrap_or(0)))
        })
    }

    fn sync_state(&self, peer: &str, flag_set: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_name("peer id", peer)?;
        check_name("flag set", flag_set)?;
        let id = RecordId::SyncState {
            peer: peer.to_owned(),
            flag_set: flag_set.to_owned(),
        };
        let framed = self.run(|trx| async move {
            Ok(Ok(read_record(
                &trx,
                &self.sync_state_space(peer, flag_set),
            )
            .await?))
        })?;
        framed
            .map(|f| record::decode(&id, &f).map(<[u8]>::to_vec))
            .transpose()
    }

    fn put_sync_state(&self, peer: &str, flag_set: &str, state: &[u8]) -> Result<(), StoreError> {
        check_name("peer id", peer)?;
        check_name("flag set", flag_set)?;
        let id = RecordId::SyncState {
            peer: peer.to_owned(),
            flag_set: flag_set.to_owned(),
        };
        check_record(&self.limits(), id.clone(), state.len())?;
        let framed = record::encode(&id, state);
        let space = self.sync_state_space(peer, flag_set);
        self.run(|trx| {
            let (framed, space) = (&framed, &space);
            async move {
                write_record(&trx, space, framed);
                Ok(Ok(()))
            }
        })
    }

    fn delete_sync_state(&self, peer: &str, flag_set: &str) -> Result<bool, StoreError> {
        check_name("peer id", peer)?;
        check_name("flag set", flag_set)?;
        let space = self.sync_state_space(peer, flag_set);
        self.run(|trx| {
            let space = &space;
            async move { Ok(Ok(delete_record(&trx, space).await?)) }
        })
    }

    fn put_token(&self, token_id: &str, record: &[u8]) -> Result<(), StoreError> {
        check_name("token id", token_id)?;
        let id = RecordId::Token {
            token_id: token_id.to_owned(),
        };
        check_record(&self.limits(), id.clone(), record.len())?;
        let framed = record::encode(&id, record);
        let space = self.token_space(token_id);
        self.run(|trx| {
            let (framed, space) = (&framed, &space);
            async move {
                write_record(&trx, space, framed);
                Ok(Ok(()))
            }
        })
    }

    fn token(&self, token_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_name("token id", token_id)?;
        let id = RecordId::Token {
            token_id: token_id.to_owned(),
        };
        let framed = self.run(|trx| async move {
            Ok(Ok(read_record(&trx, &self.token_space(token_id)).await?))
        })?;
        framed
            .map(|f| record::decode(&id, &f).map(<[u8]>::to_vec))
            .transpose()
    }

    fn tokens(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let space = self.root.subspace(&("t",));
        let pairs = self.run(|trx| {
            let space = &space;
            async move { Ok(Ok(read_range(&trx, space).await?)) }
        })?;
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        for (key, chunk) in pairs {
            let (token_id, _chunk) = space.unpack::<(String, u32)>(&key).map_err(|e| {
                StoreError::Fdb(format!(
                    "unreadable token key under {:?}: {e:?}",
                    space.bytes()
                ))
            })?;
            match out.last_mut() {
                Some((last, bytes)) if *last == token_id => bytes.extend_from_slice(&chunk),
                _ => out.push((token_id, chunk)),
            }
        }
        out.into_iter()
            .map(|(token_id, framed)| {
                let id = RecordId::Token {
                    token_id: token_id.clone(),
                };
                let bytes = record::decode(&id, &framed)?.to_vec();
                Ok((token_id, bytes))
            })
            .collect()
    }

    fn delete_token(&self, token_id: &str) -> Result<bool, StoreError> {
        check_name("token id", token_id)?;
        let space = self.token_space(token_id);
        self.run(|trx| {
            let space = &space;
            async move { Ok(Ok(delete_record(&trx, space).await?)) }
        })
    }

    fn next_incarnation(&self) -> Result<u64, StoreError> {
        let key = self.root.pack(&("i",));
        // Drawn once, outside the retried transaction: a fresh prefix starts here, never at 1.
        let first = crate::random_first_incarnation();
        self.run(|trx| {
            let key = &key;
            async move {
                let id = RecordId::Incarnation;
                let next = match trx.get(key, false).await? {
                    None => first,
                    Some(stored) => {
                        let current =
                            match record::decode(&id, &stored).and_then(|p| split_u64(&id, p)) {
                                Ok((n, _)) => n,
                                Err(e) => return Ok(Err(e)),
                            };
                        let Some(next) = current.checked_add(1) else {
                            return Ok(Err(StoreError::Corrupt {
                                record: id,
                                detail: "counter is at its maximum".into(),
                            }));
                        };
                        next
                    }
                };
                trx.set(key, &record::encode(&id, &next.to_le_bytes()));
                Ok(Ok(next))
            }
        })
    }
}

/// Clears a chunked record; returns whether it existed.
async fn delete_record(trx: &Transaction, space: &Subspace) -> Result<bool, FdbBindingError> {
    let opt = RangeOption {
        limit: Some(1),
        ..RangeOption::from(space.range())
    };
    let existed = !trx.get_range(&opt, 1, false).await?.is_empty();
    let (begin, end) = space.range();
    trx.clear_range(&begin, &end);
    Ok(existed)
}

#[cfg(test)]
mod tests {
    //! These run only where `FDB_CLUSTER_FILE` names a reachable cluster (and libfdb_c is
    //! installed to link them); elsewhere each test prints that it was skipped.
    use super::*;
    use crate::conformance::TestDisk;
    use std::sync::OnceLock;

    crate::conformance::conformance_suite!(FdbDisk);

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]
        #[test]
        fn random_workloads_match_a_simple_model(
            ops in proptest::collection::vec(crate::conformance::op_strategy(), 1..40)
        ) {
            if let Some(disk) = FdbDisk::new() {
                crate::conformance::matches_a_simple_model(disk, &ops);
            }
        }
    }

    /// The FDB network thread, started once for the whole test process.
    fn network() -> &'static Arc<Database> {
        static DB: OnceLock<Arc<Database>> = OnceLock::new();
        DB.get_or_init(|| {
            // SAFETY: the network guard is leaked on purpose so the network runs until the test
            // process exits; foundationdb only requires the guard to be dropped before a normal
            // exit to flush, which tests do not need.
            #[allow(unsafe_code)]
            let guard = unsafe { foundationdb::boot() };
            std::mem::forget(guard);
            let path = std::env::var("FDB_CLUSTER_FILE").expect("checked by FdbDisk::new");
            Arc::new(Database::new(Some(&path)).expect("cluster file opens"))
        })
    }

    /// A fresh (region, node) prefix per test; the "disk" is the cluster.
    struct FdbDisk {
        region: String,
    }

    impl TestDisk for FdbDisk {
        type Backend = FdbStore;

        fn new() -> Option<Self> {
            std::env::var_os("FDB_CLUSTER_FILE")?;
            use std::sync::atomic::{AtomicU64, Ordering};
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            Some(FdbDisk {
                region: format!(
                    "test-{}-{nanos}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ),
            })
        }

        fn open(&mut self) -> FdbStore {
            FdbStore::with_database(network().clone(), &self.region, "node-a").unwrap()
        }

        fn close(&mut self, store: FdbStore) {
            drop(store);
        }

        fn tamper_change(&mut self, flag_set: &str, seq: u64, edit: &dyn Fn(&mut Vec<u8>)) {
            let store = self.open();
            let space = store.changes(flag_set).subspace(&(seq,));
            store
                .run(|trx| {
                    let space = &space;
                    async move {
                        let mut framed = read_record(&trx, space).await?.expect("change exists");
                        edit(&mut framed);
                        write_record(&trx, space, &framed);
                        Ok(Ok(()))
                    }
                })
                .unwrap();
        }
    }

    impl Drop for FdbDisk {
        fn drop(&mut self) {
            let store = self.open();
            let (begin, end) = store.root.range();
            let _ = store.run(|trx| {
                let (begin, end) = (&begin, &end);
                async move {
                    trx.clear_range(begin, end);
                    Ok(Ok(()))
                }
            });
        }
    }
}
