//! The embedded default backend: one redb file per node.

use std::io;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageError,
    TableDefinition, WriteTransaction,
};

use crate::record::{self, split_u64};
use crate::{
    check_batch, check_compaction, check_contiguous, check_name, check_record, AppendReceipt,
    Limits, LoadedFlagSet, RecordId, Snapshot, Store, StoreError, StoredChange,
};

/// (flag set, seq) → framed change.
const CHANGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("changes");
/// flag set → framed (covers_through u64 LE ‖ snapshot bytes).
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// flag set → framed (snapshot covers_through u64 LE). Small, so appends need not read the
/// snapshot; its keys are the list of flag sets.
const FLAG_SETS: TableDefinition<&str, &[u8]> = TableDefinition::new("flag_sets");
/// (peer, flag set) → framed sync state.
const SYNC_STATES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("sync_states");
/// token id → framed token record.
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// "incarnation" → framed u64.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const INCARNATION_KEY: &str = "incarnation";
/// How many tables [`RedbStore::open`] creates.
const TABLE_COUNT: usize = 6;

/// The embedded default store: one [redb](https://www.redb.org) file per node, no setup.
///
/// Each mutating call is one redb write transaction committed with `Durability::Immediate` in two
/// phases (the pages are fsynced before the header names them), so a call that returned survives
/// a process kill or power loss, and a torn transaction is rolled back by redb on the next open.
/// Each value also carries this crate's CRC-32 framing, checked on every read.
///
/// Damage is never silent: [`RedbStore::open`] verifies every page checksum and refuses an empty,
/// truncated or damaged file with [`StoreError::Damaged`]; a panic inside redb (some damage makes
/// it panic rather than fail) is caught and reported the same way.
///
/// Key layout (redb tables; every value is a framed record):
///
/// | table         | key                  | value                                  |
/// |---------------|----------------------|----------------------------------------|
/// | `changes`     | (flag set, seq u64)  | change bytes                           |
/// | `snapshots`   | flag set             | covers_through u64 LE ‖ snapshot bytes |
/// | `flag_sets`   | flag set             | covers_through u64 LE                  |
/// | `sync_states` | (peer id, flag set)  | Automerge sync state bytes             |
/// | `tokens`      | token id             | token record bytes                     |
/// | `meta`        | `"incarnation"`      | u64 LE                                 |
#[derive(Debug)]
pub struct RedbStore {
    db: Database,
    /// The store file, for error messages.
    path: PathBuf,
}

impl RedbStore {
    /// Opens the store file at `path`. A missing file is a new store: it is built under
    /// `<path>.new` and renamed into place once its tables are committed, so a file at `path` is
    /// always a whole store and an empty one is damage, never a first start. A file left by a
    /// killed process is repaired by redb to its last committed transaction.
    ///
    /// Fails with [`StoreError::Damaged`] (naming the file and what to do) if the file is empty,
    /// truncated or fails redb's integrity check (every page checksum is verified, ≈ one read of
    /// the file), and with [`StoreError::Redb`] if another process has the file open.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        match std::fs::metadata(path) {
            Ok(meta) if meta.len() == 0 => {
                return Err(damaged(path, "the file is empty (0 bytes)".into()));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_new(path)?,
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        let opened = contained(path, "opening the file", || {
            Database::builder()
                .set_check_integrity_on_open(true)
                .open(path)
                .map_err(|e| open_error(path, e))
        })?;
        let store = RedbStore {
            db: opened,
            path: path.to_owned(),
        };
        // A file from an earlier version may lack tables (created on its first write); readers
        // must never meet a missing table. Skip the (fsynced) write when they all exist.
        let tables = store.guarded("listing its tables", || {
            Ok(store.db.begin_read()?.list_tables()?.count())
        })?;
        if tables < TABLE_COUNT {
            store.write(create_tables)?;
        }
        Ok(store)
    }

    /// Runs a read or write of the file, turning a panic inside redb, or its own corruption
    /// report, into [`StoreError::Damaged`] naming the file.
    fn guarded<T>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        contained(&self.path, what, f)
    }

    /// Runs `f` in one durable write transaction: committed if it returns `Ok`, aborted otherwise.
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.guarded("writing", || write_txn(&self.db, f))
    }

    /// Test hook: edits the stored bytes of a change record through the table directly.
    #[cfg(test)]
    pub(crate) fn tamper_change(&self, flag_set: &str, seq: u64, edit: &dyn Fn(&mut Vec<u8>)) {
        self.write(|txn| {
            let mut changes = txn.open_table(CHANGES)?;
            let mut bytes = changes
                .get((flag_set, seq))?
                .expect("tampered change exists")
                .value()
                .to_vec();
            edit(&mut bytes);
            changes.insert((flag_set, seq), bytes.as_slice())?;
            Ok(())
        })
        .expect("tampering commits");
    }
}

/// Runs `f` in one durable, two-phase write transaction of `db`: committed if it returns `Ok`,
/// aborted otherwise.
///
/// Two-phase: with redb's default one-phase commit, a damaged page of the last commit makes the
/// next open fall back to the commit before it (right for a commit torn by a crash, which never
/// returned), silently losing an acknowledged write. Flushing the pages before the header names
/// them means a last commit that fails its checksums can only be damage, which redb then reports.
fn write_txn<T>(
    db: &Database,
    f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.set_two_phase_commit(true);
    match f(&txn) {
        Ok(value) => {
            txn.commit()?;
            Ok(value)
        }
        Err(e) => {
            // The error that matters is `e`; an abort failure only means nothing was written.
            let _ = txn.abort();
            Err(e)
        }
    }
}

fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(CHANGES)?;
    txn.open_table(SNAPSHOTS)?;
    txn.open_table(FLAG_SETS)?;
    txn.open_table(SYNC_STATES)?;
    txn.open_table(TOKENS)?;
    txn.open_table(META)?;
    Ok(())
}

/// Builds a new, empty store at `path` (which does not exist): under `<path>.new` first, renamed
/// into place once complete and durable, so `path` never names a half-made store.
fn create_new(path: &Path) -> Result<(), StoreError> {
    let io_error = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let mut staging = path.as_os_str().to_owned();
    staging.push(".new");
    let staging = PathBuf::from(staging);
    // A leftover from a first start killed before its rename never held data.
    match std::fs::remove_file(&staging) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(e)),
        _ => {}
    }
    let db = Database::create(&staging)?;
    write_txn(&db, create_tables)?;
    db.close()?;
    std::fs::rename(&staging, path).map_err(io_error)?;
    // The rename itself must be durable before anything is stored in the file.
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error)
}

fn damaged(path: &Path, detail: String) -> StoreError {
    StoreError::Damaged {
        path: path.to_owned(),
        detail,
    }
}

/// Sorts an open failure: damage (redb's corruption report, a file too short for its own
/// layout, a garbled format version) or something else (another process has it open, no
/// permission), which is reported as is.
fn open_error(path: &Path, e: DatabaseError) -> StoreError {
    match e {
        DatabaseError::Storage(StorageError::Corrupted(detail)) => damaged(path, detail),
        DatabaseError::Storage(StorageError::Io(io))
            if matches!(
                io.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
            ) =>
        {
            damaged(path, io.to_string())
        }
        e @ (DatabaseError::UpgradeRequired(_) | DatabaseError::RepairAborted) => {
            damaged(path, e.to_string())
        }
        other => other.into(),
    }
}

/// Runs `f`, turning a panic inside redb, or redb's corruption report, into
/// [`StoreError::Damaged`] naming the file. redb panics on some damage ("Malformed allocator
/// state"); a node must refuse to start with a message instead. redb's state behind a caught
/// panic is not trusted further: every later call is guarded the same way.
fn contained<T>(
    path: &Path,
    what: &str,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Err(StoreError::Redb(e))) if matches!(*e, redb::Error::Corrupted(_)) => {
            Err(damaged(path, e.to_string()))
        }
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(damaged(
                path,
                format!("redb panicked while {what}: {message}"),
            ))
        }
    }
}

fn info_id(flag_set: &str) -> RecordId {
    RecordId::FlagSetInfo {
        flag_set: flag_set.to_owned(),
    }
}

/// Reads the snapshot coverage of a flag set (0 when it has no snapshot or does not exist).
fn snapshot_covers(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    flag_set: &str,
) -> Result<Option<u64>, StoreError> {
    match table.get(flag_set)? {
        None => Ok(None),
        Some(guard) => {
            let id = info_id(flag_set);
            Ok(Some(split_u64(&id, record::decode(&id, guard.value())?)?.0))
        }
    }
}

/// The last stored change sequence number of a flag set, or `covers` when no change follows the
/// snapshot.
fn last_seq(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    flag_set: &str,
    covers: u64,
) -> Result<u64, StoreError> {
    let last = table
        .range((flag_set, 0)..=(flag_set, u64::MAX))?
        .next_back()
        .transpose()?;
    Ok(last.map_or(covers, |(key, _)| key.value().1.max(covers)))
}

impl Store for RedbStore {
    fn limits(&self) -> Limits {
        Limits::LOCAL
    }

    fn append_changes(
        &self,
        flag_set: &str,
        changes: &[&[u8]],
    ) -> Result<AppendReceipt, StoreError> {
        check_name("flag set", flag_set)?;
        self.write(|txn| {
            let mut info = txn.open_table(FLAG_SETS)?;
            let covers = snapshot_covers(&info, flag_set)?;
            let mut table = txn.open_table(CHANGES)?;
            let last = last_seq(&table, flag_set, covers.unwrap_or(0))?;
            check_batch(&self.limits(), flag_set, last + 1, changes)?;
            if changes.is_empty() {
                return Ok(AppendReceipt {
                    last_seq: last,
                    changes_since_snapshot: last - covers.unwrap_or(0),
                });
            }
            if covers.is_none() {
                info.insert(
                    flag_set,
                    record::encode(&info_id(flag_set), &0u64.to_le_bytes()).as_slice(),
                )?;
            }
            for (seq, change) in (last + 1..).zip(changes) {
                let id = RecordId::Change {
                    flag_set: flag_set.to_owned(),
                    seq,
                };
                table.insert((flag_set, seq), record::encode(&id, change).as_slice())?;
            }
            let last_seq = last + changes.len() as u64;
            Ok(AppendReceipt {
                last_seq,
                changes_since_snapshot: last_seq - covers.unwrap_or(0),
            })
        })
    }

    fn load(&self, flag_set: &str) -> Result<LoadedFlagSet, StoreError> {
        check_name("flag set", flag_set)?;
        self.guarded(&format!("loading flag set {flag_set:?}"), || {
            let txn = self.db.begin_read()?;
            let Some(covers) = snapshot_covers(&txn.open_table(FLAG_SETS)?, flag_set)? else {
                return Ok(LoadedFlagSet::default());
            };
            let snapshot = match txn.open_table(SNAPSHOTS)?.get(flag_set)? {
                None => None,
                Some(guard) => {
                    let id = RecordId::Snapshot {
                        flag_set: flag_set.to_owned(),
                    };
                    let (covers_through, bytes) = split_u64(&id, record::decode(&id, guard.value())?)?;
                    if covers_through != covers {
                        return Err(StoreError::Corrupt {
                            record: id,
                            detail: format!(
                                "covers change #{covers_through} but the flag set's info says #{covers}"
                            ),
                        });
                    }
                    Some(Snapshot {
                        covers_through,
                        bytes: bytes.to_vec(),
                    })
                }
            };
            let mut changes = Vec::new();
            for entry in txn
                .open_table(CHANGES)?
                .range((flag_set, 0)..=(flag_set, u64::MAX))?
            {
                let (key, value) = entry?;
                let seq = key.value().1;
                let id = RecordId::Change {
                    flag_set: flag_set.to_owned(),
                    seq,
                };
                changes.push(StoredChange {
                    seq,
                    bytes: record::decode(&id, value.value())?.to_vec(),
                });
            }
            check_contiguous(flag_set, covers, &changes)?;
            Ok(LoadedFlagSet { snapshot, changes })
        })
    }

    fn compact(
        &self,
        flag_set: &str,
        snapshot: &[u8],
        covers_through: u64,
    ) -> Result<(), StoreError> {
        check_name("flag set", flag_set)?;
        self.write(|txn| {
            let mut info = txn.open_table(FLAG_SETS)?;
            let covers = snapshot_covers(&info, flag_set)?.unwrap_or(0);
            let mut table = txn.open_table(CHANGES)?;
            let last = last_seq(&table, flag_set, covers)?;
            check_compaction(
                &self.limits(),
                flag_set,
                snapshot.len(),
                covers_through,
                covers,
                last,
            )?;
            let id = RecordId::Snapshot {
                flag_set: flag_set.to_owned(),
            };
            let framed = record::encode_parts(&id, &covers_through.to_le_bytes(), snapshot);
            txn.open_table(SNAPSHOTS)?
                .insert(flag_set, framed.as_slice())?;
            info.insert(
                flag_set,
                record::encode(&info_id(flag_set), &covers_through.to_le_bytes()).as_slice(),
            )?;
            // Deleting the covered prefix in the same transaction makes the swap atomic.
            table.retain_in((flag_set, 0)..=(flag_set, covers_through), |_, _| false)?;
            Ok(())
        })
    }

    fn flag_sets(&self) -> Result<Vec<String>, StoreError> {
        self.guarded("listing flag sets", || {
            let txn = self.db.begin_read()?;
            let mut names = Vec::new();
            for entry in txn.open_table(FLAG_SETS)?.iter()? {
                names.push(entry?.0.value().to_owned());
            }
            Ok(names)
        })
    }

    fn changes_since_snapshot(&self, flag_set: &str) -> Result<u64, StoreError> {
        check_name("flag set", flag_set)?;
        self.guarded(&format!("reading flag set {flag_set:?}"), || {
            let txn = self.db.begin_read()?;
            let covers = snapshot_covers(&txn.open_table(FLAG_SETS)?, flag_set)?.unwrap_or(0);
            Ok(last_seq(&txn.open_table(CHANGES)?, flag_set, covers)? - covers)
        })
    }

    fn sync_state(&self, peer: &str, flag_set: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_name("peer id", peer)?;
        check_name("flag set", flag_set)?;
        self.guarded("reading a sync state", || {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(SYNC_STATES)?;
            let Some(guard) = table.get((peer, flag_set))? else {
                return Ok(None);
            };
            let id = RecordId::SyncState {
                peer: peer.to_owned(),
                flag_set: flag_set.to_owned(),
            };
            Ok(Some(record::decode(&id, guard.value())?.to_vec()))
        })
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
        self.write(|txn| {
            txn.open_table(SYNC_STATES)?
                .insert((peer, flag_set), framed.as_slice())?;
            Ok(())
        })
    }

    fn delete_sync_state(&self, peer: &str, flag_set: &str) -> Result<bool, StoreError> {
        check_name("peer id", peer)?;
        check_name("flag set", flag_set)?;
        self.write(|txn| {
            Ok(txn
                .open_table(SYNC_STATES)?
                .remove((peer, flag_set))?
                .is_some())
        })
    }

    fn put_token(&self, token_id: &str, record: &[u8]) -> Result<(), StoreError> {
        check_name("token id", token_id)?;
        let id = RecordId::Token {
            token_id: token_id.to_owned(),
        };
        check_record(&self.limits(), id.clone(), record.len())?;
        let framed = record::encode(&id, record);
        self.write(|txn| {
            txn.open_table(TOKENS)?
                .insert(token_id, framed.as_slice())?;
            Ok(())
        })
    }

    fn token(&self, token_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_name("token id", token_id)?;
        self.guarded("reading a token", || {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(TOKENS)?;
            let Some(guard) = table.get(token_id)? else {
                return Ok(None);
            };
            let id = RecordId::Token {
                token_id: token_id.to_owned(),
            };
            Ok(Some(record::decode(&id, guard.value())?.to_vec()))
        })
    }

    fn tokens(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.guarded("reading tokens", || {
            let txn = self.db.begin_read()?;
            let mut out = Vec::new();
            for entry in txn.open_table(TOKENS)?.iter()? {
                let (key, value) = entry?;
                let token_id = key.value().to_owned();
                let id = RecordId::Token {
                    token_id: token_id.clone(),
                };
                let bytes = record::decode(&id, value.value())?.to_vec();
                out.push((token_id, bytes));
            }
            Ok(out)
        })
    }

    fn delete_token(&self, token_id: &str) -> Result<bool, StoreError> {
        check_name("token id", token_id)?;
        self.write(|txn| Ok(txn.open_table(TOKENS)?.remove(token_id)?.is_some()))
    }

    fn next_incarnation(&self) -> Result<u64, StoreError> {
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            let id = RecordId::Incarnation;
            let stored = match meta.get(INCARNATION_KEY)? {
                None => None,
                Some(guard) => Some(split_u64(&id, record::decode(&id, guard.value())?)?.0),
            };
            // A brand-new store (a first start, or a reset after damage) must not count from 1.
            let next = match stored {
                None => crate::random_first_incarnation(),
                Some(current) => current.checked_add(1).ok_or_else(|| StoreError::Corrupt {
                    record: RecordId::Incarnation,
                    detail: "counter is at its maximum".into(),
                })?,
            };
            meta.insert(
                INCARNATION_KEY,
                record::encode(&id, &next.to_le_bytes()).as_slice(),
            )?;
            Ok(next)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::conformance::conformance_suite!(RedbDisk);

    /// A temporary directory holding one node's redb file.
    struct RedbDisk {
        dir: tempfile::TempDir,
    }

    impl RedbDisk {
        fn path(&self) -> std::path::PathBuf {
            self.dir.path().join("node.redb")
        }
    }

    impl crate::conformance::TestDisk for RedbDisk {
        type Backend = RedbStore;

        fn new() -> Option<Self> {
            Some(RedbDisk {
                dir: tempfile::tempdir().unwrap(),
            })
        }

        fn open(&mut self) -> RedbStore {
            RedbStore::open(self.path()).unwrap()
        }

        fn close(&mut self, store: RedbStore) {
            drop(store);
        }

        fn tamper_change(&mut self, flag_set: &str, seq: u64, edit: &dyn Fn(&mut Vec<u8>)) {
            RedbStore::open(self.path())
                .unwrap()
                .tamper_change(flag_set, seq, edit);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { max_shrink_iters: 200, ..proptest::prelude::ProptestConfig::with_cases(32) })]
        #[test]
        fn random_workloads_match_a_simple_model(
            ops in proptest::collection::vec(crate::conformance::op_strategy(), 1..40)
        ) {
            let disk = <RedbDisk as crate::conformance::TestDisk>::new().unwrap();
            crate::conformance::matches_a_simple_model(disk, &ops);
        }
    }

    #[test]
    fn a_second_opener_of_the_same_file_is_refused() {
        let disk = tempfile::tempdir().unwrap();
        let path = disk.path().join("node.redb");
        let _first = RedbStore::open(&path).unwrap();
        assert!(matches!(RedbStore::open(&path), Err(StoreError::Redb(_))));
    }

    #[test]
    fn a_snapshot_that_disagrees_with_its_info_record_is_reported() {
        let disk = tempfile::tempdir().unwrap();
        let store = RedbStore::open(disk.path().join("node.redb")).unwrap();
        store.append_changes("production", &[b"a", b"b"]).unwrap();
        store.compact("production", b"snap", 1).unwrap();
        store
            .write(|txn| {
                let id = info_id("production");
                txn.open_table(FLAG_SETS)?.insert(
                    "production",
                    record::encode(&id, &2u64.to_le_bytes()).as_slice(),
                )?;
                Ok(())
            })
            .unwrap();
        let err = store.load("production").unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Corrupt {
                    record: RecordId::Snapshot { .. },
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_missing_change_in_the_middle_is_reported() {
        let disk = tempfile::tempdir().unwrap();
        let store = RedbStore::open(disk.path().join("node.redb")).unwrap();
        store
            .append_changes("production", &[b"a", b"b", b"c"])
            .unwrap();
        store
            .write(|txn| {
                txn.open_table(CHANGES)?.remove(("production", 2))?;
                Ok(())
            })
            .unwrap();
        let err = store.load("production").unwrap_err();
        assert!(err.to_string().contains("change #2"), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
