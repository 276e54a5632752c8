//! The in-memory backend: tests and the deterministic simulator's "disks".

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::record::{self, split_u64};
use crate::{
    check_batch, check_compaction, check_contiguous, check_name, check_record, AppendReceipt,
    Limits, LoadedFlagSet, RecordId, Snapshot, Store, StoreError, StoredChange,
};

/// A store held in memory, for tests and the simulator.
///
/// Everything a call returned is "durably committed": a simulated crash of a node drops the node's
/// in-memory replica and keeps its `MemoryStore` (or a [`Clone`] taken at the crash instant), and
/// the restarted node loads from it. Anything the node had not yet handed to the store is lost,
/// exactly as on a real disk. A write that returns an error (see [`MemoryStore::set_failing`])
/// changes nothing.
///
/// Records are kept framed and checksummed exactly like the disk backends' (so the conformance
/// suite's corruption checks apply here too) and shared by reference count, so `clone()` copies
/// only the maps, never the bytes: cheap enough to snapshot every node's disk at every step.
///
/// Like every backend, a new `MemoryStore` starts its incarnations at a random value (see
/// [`Store::next_incarnation`]); the simulator fixes it with
/// [`MemoryStore::with_first_incarnation`] to stay deterministic.
#[derive(Debug)]
pub struct MemoryStore {
    /// The "disk". A mutex rather than `&mut self` so the store fits the shared `&self` trait.
    disk: Mutex<Disk>,
}

#[derive(Debug, Clone)]
struct Disk {
    flag_sets: BTreeMap<String, FlagSetDisk>,
    /// Keyed by (peer, flag set).
    sync_states: BTreeMap<(String, String), Arc<[u8]>>,
    tokens: BTreeMap<String, Arc<[u8]>>,
    /// Framed u64; `None` until the first `next_incarnation`.
    incarnation: Option<Arc<[u8]>>,
    /// What the first `next_incarnation` returns.
    first_incarnation: u64,
    /// While set, every write fails with [`StoreError::InjectedFault`].
    failing: bool,
}

#[derive(Debug, Clone, Default)]
struct FlagSetDisk {
    /// Framed (covers_through LE ‖ snapshot bytes).
    snapshot: Option<Arc<[u8]>>,
    /// The sequence number the snapshot covers (0: none). Kept beside the framed snapshot, as the
    /// disk backends keep it in a small info record, so appends need not read the snapshot.
    snapshot_covers: u64,
    /// Framed changes by sequence number.
    changes: BTreeMap<u64, Arc<[u8]>>,
}

impl FlagSetDisk {
    fn last_seq(&self) -> u64 {
        self.changes
            .last_key_value()
            .map_or(self.snapshot_covers, |(seq, _)| *seq)
    }
}

impl Clone for MemoryStore {
    /// A copy of the disk as it is now: what survives a crash at this instant.
    fn clone(&self) -> Self {
        MemoryStore {
            disk: Mutex::new(self.lock().clone()),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store, whose first incarnation is random like a brand-new disk's.
    #[must_use]
    pub fn new() -> Self {
        Self::with_first_incarnation(crate::random_first_incarnation())
    }

    /// An empty store whose first [`Store::next_incarnation`] returns `first` (the simulator
    /// derives it from its seed, so a run replays exactly). `first` must not be one a previous
    /// disk of the same node handed out.
    #[must_use]
    pub fn with_first_incarnation(first: u64) -> Self {
        MemoryStore {
            disk: Mutex::new(Disk {
                flag_sets: BTreeMap::new(),
                sync_states: BTreeMap::new(),
                tokens: BTreeMap::new(),
                incarnation: None,
                first_incarnation: first,
                failing: false,
            }),
        }
    }

    /// While `failing` is true every mutating call fails with [`StoreError::InjectedFault`] and
    /// changes nothing (a full or failing disk in the simulator). Reads keep working.
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        // Every mutation below is computed first and applied without a fallible step, so the
        // state behind a poisoned lock is still consistent.
        self.disk.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_for_write(&self) -> Result<MutexGuard<'_, Disk>, StoreError> {
        let disk = self.lock();
        if disk.failing {
            return Err(StoreError::InjectedFault);
        }
        Ok(disk)
    }

    /// Test hook: overwrites the stored bytes of a change record (to model a bad disk).
    #[cfg(test)]
    pub(crate) fn tamper_change(&self, flag_set: &str, seq: u64, edit: impl FnOnce(&mut Vec<u8>)) {
        let mut disk = self.lock();
        let stored = disk
            .flag_sets
            .get_mut(flag_set)
            .and_then(|f| f.changes.get_mut(&seq))
            .expect("tampered change exists");
        let mut bytes = stored.to_vec();
        edit(&mut bytes);
        *stored = bytes.into();
    }
}

fn snapshot_payload_head(covers_through: u64) -> [u8; 8] {
    covers_through.to_le_bytes()
}

impl Store for MemoryStore {
    fn limits(&self) -> Limits {
        Limits::LOCAL
    }

    fn append_changes(
        &self,
        flag_set: &str,
        changes: &[&[u8]],
    ) -> Result<AppendReceipt, StoreError> {
        check_name("flag set", flag_set)?;
        let mut disk = self.lock_for_write()?;
        let (last, covers) = disk
            .flag_sets
            .get(flag_set)
            .map_or((0, 0), |f| (f.last_seq(), f.snapshot_covers));
        check_batch(&self.limits(), flag_set, last + 1, changes)?;
        if changes.is_empty() {
            return Ok(AppendReceipt {
                last_seq: last,
                changes_since_snapshot: last - covers,
            });
        }
        let mut framed = Vec::with_capacity(changes.len());
        for (seq, change) in (last + 1..).zip(changes) {
            let id = RecordId::Change {
                flag_set: flag_set.to_owned(),
                seq,
            };
            framed.push((seq, Arc::<[u8]>::from(record::encode(&id, change))));
        }
        let entry = disk.flag_sets.entry(flag_set.to_owned()).or_default();
        entry.changes.extend(framed);
        let last_seq = last + changes.len() as u64;
        Ok(AppendReceipt {
            last_seq,
            changes_since_snapshot: last_seq - covers,
        })
    }

    fn load(&self, flag_set: &str) -> Result<LoadedFlagSet, StoreError> {
        check_name("flag set", flag_set)?;
        let disk = self.lock();
        let Some(stored) = disk.flag_sets.get(flag_set) else {
            return Ok(LoadedFlagSet::default());
        };
        let snapshot = match &stored.snapshot {
            None => None,
            Some(framed) => {
                let id = RecordId::Snapshot {
                    flag_set: flag_set.to_owned(),
                };
                let (covers_through, bytes) = split_u64(&id, record::decode(&id, framed)?)?;
                Some(Snapshot {
                    covers_through,
                    bytes: bytes.to_vec(),
                })
            }
        };
        let mut changes = Vec::with_capacity(stored.changes.len());
        for (&seq, framed) in &stored.changes {
            let id = RecordId::Change {
                flag_set: flag_set.to_owned(),
                seq,
            };
            changes.push(StoredChange {
                seq,
                bytes: record::decode(&id, framed)?.to_vec(),
            });
        }
        check_contiguous(flag_set, stored.snapshot_covers, &changes)?;
        Ok(LoadedFlagSet { snapshot, changes })
    }

    fn compact(
        &self,
        flag_set: &str,
        snapshot: &[u8],
        covers_through: u64,
    ) -> Result<(), StoreError> {
        check_name("flag set", flag_set)?;
        let mut disk = self.lock_for_write()?;
        let (last, covers) = disk
            .flag_sets
            .get(flag_set)
            .map_or((0, 0), |f| (f.last_seq(), f.snapshot_covers));
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
        let framed = record::encode_parts(&id, &snapshot_payload_head(covers_through), snapshot);
        let entry = disk.flag_sets.entry(flag_set.to_owned()).or_default();
        entry.snapshot = Some(framed.into());
        entry.snapshot_covers = covers_through;
        entry.changes = entry.changes.split_off(&covers_through.saturating_add(1));
        Ok(())
    }

    fn flag_sets(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock().flag_sets.keys().cloned().collect())
    }

    fn changes_since_snapshot(&self, flag_set: &str) -> Result<u64, StoreError> {
        check_name("flag set", flag_set)?;
        Ok(self
            .lock()
            .flag_sets
            .get(flag_set)
            .map_or(0, |f| f.last_seq() - f.snapshot_covers))
    }

    fn sync_state(&self, peer: &str, flag_set: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_name("peer id", peer)?;
        check_name("flag set", flag_set)?;
        let disk = self.lock();
        let key = (peer.to_owned(), flag_set.to_owned());
        let Some(framed) = disk.sync_states.get(&key) else {
            return Ok(None);
        };
        let id = RecordId::SyncState {
            peer: key.0,
            flag_set: key.1,
        };
        Ok(Some(record::decode(&id, framed)?.to_vec()))
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
        self.lock_for_write()?
            .sync_states
            .insert((peer.to_owned(), flag_set.to_owned()), framed.into());
        Ok(())
    }

    fn delete_sync_state(&self, peer: &str, flag_set: &str) -> Result<bool, StoreError> {
        check_name("peer id", peer)?;
        check_name("flag set", flag_set)?;
        Ok(self
            .lock_for_write()?
            .sync_states
            .remove(&(peer.to_owned(), flag_set.to_owned()))
            .is_some())
    }

    fn put_token(&self, token_id: &str, record: &[u8]) -> Result<(), StoreError> {
        check_name("token id", token_id)?;
        let id = RecordId::Token {
            token_id: token_id.to_owned(),
        };
        check_record(&self.limits(), id.clone(), record.len())?;
        let framed = record::encode(&id, record);
        self.lock_for_write()?
            .tokens
            .insert(token_id.to_owned(), framed.into());
        Ok(())
    }

    fn token(&self, token_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_name("token id", token_id)?;
        let disk = self.lock();
        let Some(framed) = disk.tokens.get(token_id) else {
            return Ok(None);
        };
        let id = RecordId::Token {
            token_id: token_id.to_owned(),
        };
        Ok(Some(record::decode(&id, framed)?.to_vec()))
    }

    fn tokens(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let disk = self.lock();
        let mut out = Vec::with_capacity(disk.tokens.len());
        for (token_id, framed) in &disk.tokens {
            let id = RecordId::Token {
                token_id: token_id.clone(),
            };
            out.push((token_id.clone(), record::decode(&id, framed)?.to_vec()));
        }
        Ok(out)
    }

    fn delete_token(&self, token_id: &str) -> Result<bool, StoreError> {
        check_name("token id", token_id)?;
        Ok(self.lock_for_write()?.tokens.remove(token_id).is_some())
    }

    fn next_incarnation(&self) -> Result<u64, StoreError> {
        let mut disk = self.lock_for_write()?;
        let id = RecordId::Incarnation;
        let next = match &disk.incarnation {
            None => disk.first_incarnation,
            Some(framed) => split_u64(&id, record::decode(&id, framed)?)?
                .0
                .checked_add(1)
                .ok_or_else(|| StoreError::Corrupt {
                    record: RecordId::Incarnation,
                    detail: "counter is at its maximum".into(),
                })?,
        };
        disk.incarnation = Some(record::encode(&id, &next.to_le_bytes()).into());
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::conformance::conformance_suite!(MemoryDisk);

    /// The simulator's view of a node's disk: the store itself survives a "crash"; a reopen is a
    /// clone of what was committed.
    struct MemoryDisk(MemoryStore);

    impl crate::conformance::TestDisk for MemoryDisk {
        type Backend = MemoryStore;

        fn new() -> Option<Self> {
            Some(MemoryDisk(MemoryStore::new()))
        }

        fn open(&mut self) -> MemoryStore {
            self.0.clone()
        }

        fn close(&mut self, store: MemoryStore) {
            self.0 = store;
        }

        fn tamper_change(&mut self, flag_set: &str, seq: u64, edit: &dyn Fn(&mut Vec<u8>)) {
            self.0.tamper_change(flag_set, seq, edit);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { max_shrink_iters: 200, ..proptest::prelude::ProptestConfig::default() })]
        #[test]
        fn random_workloads_match_a_simple_model(
            ops in proptest::collection::vec(crate::conformance::op_strategy(), 1..40)
        ) {
            let disk = <MemoryDisk as crate::conformance::TestDisk>::new().unwrap();
            crate::conformance::matches_a_simple_model(disk, &ops);
        }
    }

    #[test]
    fn a_fixed_first_incarnation_replays_exactly() {
        let disk = MemoryStore::with_first_incarnation(7);
        assert_eq!(disk.next_incarnation().unwrap(), 7);
        let crashed = disk.clone();
        assert_eq!(disk.next_incarnation().unwrap(), 8);
        assert_eq!(crashed.next_incarnation().unwrap(), 8);
    }

    #[test]
    fn a_clone_is_the_disk_at_the_crash_instant() {
        let disk = MemoryStore::new();
        disk.append_changes("production", &[b"one"]).unwrap();
        let crashed = disk.clone();
        disk.append_changes("production", &[b"two"]).unwrap();
        assert_eq!(crashed.load("production").unwrap().changes.len(), 1);
        assert_eq!(disk.load("production").unwrap().changes.len(), 2);
    }

    #[test]
    fn a_failing_disk_refuses_writes_and_changes_nothing() {
        let disk = MemoryStore::new();
        disk.append_changes("production", &[b"one"]).unwrap();
        disk.set_failing(true);
        assert!(matches!(
            disk.append_changes("production", &[b"two"]),
            Err(StoreError::InjectedFault)
        ));
        assert!(matches!(
            disk.next_incarnation(),
            Err(StoreError::InjectedFault)
        ));
        assert_eq!(disk.load("production").unwrap().changes.len(), 1);
        disk.set_failing(false);
        assert_eq!(
            disk.append_changes("production", &[b"two"])
                .unwrap()
                .last_seq,
            2
        );
    }
}
