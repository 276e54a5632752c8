//! The conformance suite every backend runs: one generic function per behaviour of [`Store`], and
//! a macro that instantiates all of them as tests for one backend's [`TestDisk`].

use crate::{RecordId, Store, StoreError};

/// What the suite needs from a backend: somewhere to keep data across "reopens", and a way to
/// damage a stored change behind the store's back.
pub(crate) trait TestDisk: Sized {
    type Backend: Store;

    /// A fresh, empty disk; `None` skips the suite (FoundationDB without a cluster file).
    fn new() -> Option<Self>;

    /// Opens a store on this disk (the previous one was handed back with [`TestDisk::close`]).
    fn open(&mut self) -> Self::Backend;

    /// Closes a store (a clean shutdown or a crash: everything returned must survive either).
    fn close(&mut self, store: Self::Backend);

    /// Edits the stored bytes of a change record directly in the backend's storage, while no
    /// store is open.
    fn tamper_change(&mut self, flag_set: &str, seq: u64, edit: &dyn Fn(&mut Vec<u8>));
}

/// Instantiates every conformance test for a [`TestDisk`] type, in the calling test module.
macro_rules! conformance_suite {
    ($disk:ty) => {
        $crate::conformance::conformance_suite!(@tests $disk;
            appended_changes_load_back_in_append_order,
            an_unknown_flag_set_loads_empty,
            compaction_replaces_exactly_the_changes_it_covers,
            sequence_numbers_are_never_reused_after_a_full_compaction,
            a_compaction_out_of_range_is_refused_and_changes_nothing,
            a_reopened_store_keeps_everything,
            flag_sets_are_listed_once_and_sorted,
            sync_states_are_kept_per_peer_and_flag_set,
            token_records_can_be_put_listed_and_deleted,
            incarnation_strictly_increases_across_reopens,
            a_brand_new_store_does_not_start_its_incarnations_at_one,
            oversized_records_are_refused_with_a_typed_error,
            invalid_names_are_refused,
            a_flipped_byte_in_a_change_is_reported_naming_the_record,
            a_torn_change_is_reported_naming_the_record,
        );
    };
    (@tests $disk:ty; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                match <$disk as $crate::conformance::TestDisk>::new() {
                    Some(disk) => $crate::conformance::$name(disk),
                    None => eprintln!("skipped {}: backend not available here", stringify!($name)),
                }
            }
        )*
    };
}
pub(crate) use conformance_suite;

const FS: &str = "production";

fn change(i: u64) -> Vec<u8> {
    format!("change-{i}").into_bytes()
}

fn append_numbered(store: &impl Store, flag_set: &str, from: u64, to: u64) {
    for i in from..=to {
        let receipt = store.append_changes(flag_set, &[&change(i)]).unwrap();
        assert_eq!(receipt.last_seq, i);
    }
}

pub(crate) fn appended_changes_load_back_in_append_order<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    let first = store.append_changes(FS, &[b"a", b"bb"]).unwrap();
    assert_eq!(first.last_seq, 2);
    assert_eq!(first.changes_since_snapshot, 2);
    let second = store.append_changes(FS, &[b"ccc"]).unwrap();
    assert_eq!(second.last_seq, 3);
    assert_eq!(second.changes_since_snapshot, 3);
    let empty = store.append_changes(FS, &[]).unwrap();
    assert_eq!(empty.last_seq, 3, "an empty batch changes nothing");

    let loaded = store.load(FS).unwrap();
    assert_eq!(loaded.snapshot, None);
    let got: Vec<(u64, &[u8])> = loaded
        .changes
        .iter()
        .map(|c| (c.seq, c.bytes.as_slice()))
        .collect();
    assert_eq!(got, vec![(1, &b"a"[..]), (2, b"bb"), (3, b"ccc")]);
    assert_eq!(loaded.last_seq(), 3);
    assert_eq!(store.changes_since_snapshot(FS).unwrap(), 3);
    disk.close(store);
}

pub(crate) fn an_unknown_flag_set_loads_empty<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    store.append_changes("staging", &[b"x"]).unwrap();
    let loaded = store.load(FS).unwrap();
    assert!(loaded.is_empty());
    assert_eq!(loaded.last_seq(), 0);
    assert_eq!(store.changes_since_snapshot(FS).unwrap(), 0);
    disk.close(store);
}

pub(crate) fn compaction_replaces_exactly_the_changes_it_covers<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    append_numbered(&store, FS, 1, 5);
    append_numbered(&store, "staging", 1, 2);
    store.compact(FS, b"snapshot through 3", 3).unwrap();

    let loaded = store.load(FS).unwrap();
    let snapshot = loaded.snapshot.unwrap();
    assert_eq!(snapshot.covers_through, 3);
    assert_eq!(snapshot.bytes, b"snapshot through 3");
    let seqs: Vec<u64> = loaded.changes.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, vec![4, 5]);
    assert_eq!(loaded.changes[0].bytes, change(4));
    assert_eq!(store.changes_since_snapshot(FS).unwrap(), 2);
    assert_eq!(
        store.load("staging").unwrap().changes.len(),
        2,
        "other flag sets are untouched"
    );

    // A newer snapshot replaces the old one, and a repeated compaction at the same point is allowed.
    store.compact(FS, b"snapshot through 5", 5).unwrap();
    store.compact(FS, b"re-saved through 5", 5).unwrap();
    let loaded = store.load(FS).unwrap();
    assert_eq!(loaded.snapshot.unwrap().bytes, b"re-saved through 5");
    assert!(loaded.changes.is_empty());
    assert_eq!(store.changes_since_snapshot(FS).unwrap(), 0);
    disk.close(store);
}

pub(crate) fn sequence_numbers_are_never_reused_after_a_full_compaction<D: TestDisk>(mut disk: D) {
    let mut store = disk.open();
    append_numbered(&store, FS, 1, 3);
    store.compact(FS, b"all three", 3).unwrap();
    disk.close(store);
    store = disk.open();
    let receipt = store.append_changes(FS, &[b"fourth"]).unwrap();
    assert_eq!(receipt.last_seq, 4);
    assert_eq!(receipt.changes_since_snapshot, 1);
    // A flag set may also start from a snapshot alone (a bulk import saved whole).
    store.compact("imported", b"whole document", 0).unwrap();
    assert_eq!(
        store.append_changes("imported", &[b"x"]).unwrap().last_seq,
        1
    );
    disk.close(store);
}

pub(crate) fn a_compaction_out_of_range_is_refused_and_changes_nothing<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    append_numbered(&store, FS, 1, 4);
    store.compact(FS, b"through 2", 2).unwrap();
    let before = store.load(FS).unwrap();

    let ahead = store.compact(FS, b"claims too much", 5).unwrap_err();
    assert!(
        matches!(
            ahead,
            StoreError::CompactionOutOfRange {
                covers_through: 5,
                snapshot_covers: 2,
                last_seq: 4,
                ..
            }
        ),
        "{ahead}"
    );
    let behind = store.compact(FS, b"stale", 1).unwrap_err();
    assert!(
        matches!(behind, StoreError::CompactionOutOfRange { .. }),
        "{behind}"
    );
    assert_eq!(behind.flag_set(), Some(FS));
    assert_eq!(store.load(FS).unwrap(), before);
    disk.close(store);
}

pub(crate) fn a_reopened_store_keeps_everything<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    append_numbered(&store, FS, 1, 6);
    store.compact(FS, b"snap", 4).unwrap();
    append_numbered(&store, "staging", 1, 1);
    store.put_sync_state("node-b", FS, b"sync").unwrap();
    store.put_token("tok-1", b"hashed record").unwrap();
    let incarnation = store.next_incarnation().unwrap();
    let production = store.load(FS).unwrap();
    let staging = store.load("staging").unwrap();
    disk.close(store);

    let store = disk.open();
    assert_eq!(store.load(FS).unwrap(), production);
    assert_eq!(store.load("staging").unwrap(), staging);
    assert_eq!(
        store.flag_sets().unwrap(),
        vec![FS.to_owned(), "staging".to_owned()]
    );
    assert_eq!(store.changes_since_snapshot(FS).unwrap(), 2);
    assert_eq!(
        store.sync_state("node-b", FS).unwrap().as_deref(),
        Some(&b"sync"[..])
    );
    assert_eq!(
        store.token("tok-1").unwrap().as_deref(),
        Some(&b"hashed record"[..])
    );
    assert_eq!(store.next_incarnation().unwrap(), incarnation + 1);
    assert_eq!(store.append_changes(FS, &[b"seven"]).unwrap().last_seq, 7);
    disk.close(store);
}

pub(crate) fn flag_sets_are_listed_once_and_sorted<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    assert!(store.flag_sets().unwrap().is_empty());
    assert_eq!(store.append_changes("ghost", &[]).unwrap().last_seq, 0);
    append_numbered(&store, "staging", 1, 3);
    store.compact("canary", b"imported", 0).unwrap();
    append_numbered(&store, FS, 1, 1);
    assert_eq!(
        store.flag_sets().unwrap(),
        vec!["canary".to_owned(), FS.to_owned(), "staging".to_owned()]
    );
    disk.close(store);
}

pub(crate) fn sync_states_are_kept_per_peer_and_flag_set<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    assert_eq!(store.sync_state("node-b", FS).unwrap(), None);
    store.put_sync_state("node-b", FS, b"b-prod").unwrap();
    store
        .put_sync_state("node-b", "staging", b"b-staging")
        .unwrap();
    store.put_sync_state("node-c", FS, b"c-prod").unwrap();
    store.put_sync_state("node-b", FS, b"b-prod-2").unwrap();
    assert_eq!(
        store.sync_state("node-b", FS).unwrap().unwrap(),
        b"b-prod-2"
    );
    assert_eq!(
        store.sync_state("node-b", "staging").unwrap().unwrap(),
        b"b-staging"
    );
    assert_eq!(store.sync_state("node-c", FS).unwrap().unwrap(), b"c-prod");
    assert!(store.delete_sync_state("node-c", FS).unwrap());
    assert!(!store.delete_sync_state("node-c", FS).unwrap());
    disk.close(store);

    let store = disk.open();
    assert_eq!(store.sync_state("node-c", FS).unwrap(), None);
    assert_eq!(
        store.sync_state("node-b", FS).unwrap().unwrap(),
        b"b-prod-2"
    );
    assert!(
        store.flag_sets().unwrap().is_empty(),
        "sync states do not create flag sets"
    );
    disk.close(store);
}

pub(crate) fn token_records_can_be_put_listed_and_deleted<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    assert!(store.tokens().unwrap().is_empty());
    store.put_token("tok-b", b"record b").unwrap();
    store.put_token("tok-a", b"record a").unwrap();
    store.put_token("tok-b", b"record b2").unwrap();
    assert_eq!(
        store.tokens().unwrap(),
        vec![
            ("tok-a".to_owned(), b"record a".to_vec()),
            ("tok-b".to_owned(), b"record b2".to_vec())
        ]
    );
    assert!(store.delete_token("tok-a").unwrap());
    assert!(!store.delete_token("tok-a").unwrap());
    assert_eq!(store.token("tok-a").unwrap(), None);
    disk.close(store);
    let store = disk.open();
    assert_eq!(store.tokens().unwrap().len(), 1);
    assert_eq!(store.token("tok-b").unwrap().unwrap(), b"record b2");
    disk.close(store);
}

pub(crate) fn incarnation_strictly_increases_across_reopens<D: TestDisk>(mut disk: D) {
    let mut seen = Vec::new();
    for _ in 0..3 {
        let store = disk.open();
        seen.push(store.next_incarnation().unwrap());
        seen.push(store.next_incarnation().unwrap());
        disk.close(store);
    }
    let first = seen[0];
    assert_eq!(seen, (first..first + 6).collect::<Vec<_>>());
}

pub(crate) fn a_brand_new_store_does_not_start_its_incarnations_at_one<D: TestDisk>(mut disk: D) {
    // A node restarted on an empty disk under its old node id must not reuse an actor id.
    let Some(mut other) = D::new() else { return };
    let (a, b) = (disk.open(), other.open());
    let (first_a, first_b) = (a.next_incarnation().unwrap(), b.next_incarnation().unwrap());
    for first in [first_a, first_b] {
        assert!(
            (crate::FIRST_INCARNATION_MIN..crate::FIRST_INCARNATION_MIN + (1 << 51))
                .contains(&first),
            "first incarnation {first}"
        );
    }
    assert_ne!(
        first_a, first_b,
        "two fresh disks drew the same incarnation"
    );
    disk.close(a);
    other.close(b);
}

pub(crate) fn oversized_records_are_refused_with_a_typed_error<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    let limits = store.limits();
    append_numbered(&store, FS, 1, 1);

    let big = vec![7u8; limits.max_record_bytes + 1];
    let err = store.append_changes(FS, &[b"fits", &big]).unwrap_err();
    match &err {
        StoreError::RecordTooLarge {
            record,
            size,
            limit,
        } => {
            assert_eq!(
                *record,
                RecordId::Change {
                    flag_set: FS.into(),
                    seq: 3
                }
            );
            assert_eq!(*size, limits.max_record_bytes + 1);
            assert_eq!(*limit, limits.max_record_bytes);
        }
        other => panic!("expected RecordTooLarge, got {other}"),
    }
    assert_eq!(err.flag_set(), Some(FS));

    let piece = vec![1u8; limits.max_record_bytes];
    let count = limits.max_batch_bytes / limits.max_record_bytes + 1;
    let batch: Vec<&[u8]> = (0..count).map(|_| piece.as_slice()).collect();
    assert!(matches!(
        store.append_changes(FS, &batch),
        Err(StoreError::BatchTooLarge { .. })
    ));

    let huge = vec![0u8; limits.max_snapshot_bytes + 1];
    assert!(matches!(
        store.compact(FS, &huge, 1),
        Err(StoreError::RecordTooLarge {
            record: RecordId::Snapshot { .. },
            ..
        })
    ));
    assert!(matches!(
        store.put_sync_state("node-b", FS, &big),
        Err(StoreError::RecordTooLarge { .. })
    ));
    assert!(matches!(
        store.put_token("tok", &big),
        Err(StoreError::RecordTooLarge { .. })
    ));

    // Nothing of the refused writes was stored.
    let loaded = store.load(FS).unwrap();
    assert_eq!(loaded.changes.len(), 1);
    assert_eq!(loaded.snapshot, None);
    assert_eq!(store.sync_state("node-b", FS).unwrap(), None);
    assert_eq!(store.token("tok").unwrap(), None);
    disk.close(store);
}

pub(crate) fn invalid_names_are_refused<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    let long = "x".repeat(crate::MAX_NAME_BYTES + 1);
    assert!(matches!(
        store.append_changes("", &[b"x"]),
        Err(StoreError::InvalidName {
            what: "flag set",
            ..
        })
    ));
    assert!(matches!(
        store.append_changes(&long, &[b"x"]),
        Err(StoreError::InvalidName {
            what: "flag set",
            ..
        })
    ));
    assert!(matches!(
        store.put_sync_state("", FS, b"x"),
        Err(StoreError::InvalidName {
            what: "peer id",
            ..
        })
    ));
    assert!(matches!(
        store.put_token(&long, b"x"),
        Err(StoreError::InvalidName {
            what: "token id",
            ..
        })
    ));
    assert!(store.flag_sets().unwrap().is_empty());
    disk.close(store);
}

fn assert_corrupt_change(err: StoreError, seq: u64) {
    match &err {
        StoreError::Corrupt { record, .. } => assert_eq!(
            *record,
            RecordId::Change {
                flag_set: FS.into(),
                seq
            }
        ),
        other => panic!("expected Corrupt, got {other}"),
    }
    assert_eq!(err.flag_set(), Some(FS));
    assert!(err
        .to_string()
        .contains(&format!("change #{seq} of flag set \"production\"")));
}

pub(crate) fn a_flipped_byte_in_a_change_is_reported_naming_the_record<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    append_numbered(&store, FS, 1, 3);
    append_numbered(&store, "staging", 1, 1);
    disk.close(store);
    disk.tamper_change(FS, 2, &|bytes| {
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
    });
    let store = disk.open();
    assert_corrupt_change(store.load(FS).unwrap_err(), 2);
    assert_eq!(
        store.load("staging").unwrap().changes.len(),
        1,
        "other flag sets still load"
    );
    disk.close(store);
}

pub(crate) fn a_torn_change_is_reported_naming_the_record<D: TestDisk>(mut disk: D) {
    let store = disk.open();
    append_numbered(&store, FS, 1, 3);
    disk.close(store);
    disk.tamper_change(FS, 3, &|bytes| bytes.truncate(3));
    let store = disk.open();
    let err = store.load(FS).unwrap_err();
    assert!(err.to_string().contains("torn"), "{err}");
    assert_corrupt_change(err, 3);
    disk.close(store);
}

/// One step of a random workload for [`matches_a_simple_model`].
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Append {
        set: u8,
        count: u8,
        len: u8,
    },
    /// Compacts at `snapshot covers + pick % (uncovered + 2)`: sometimes one past the end.
    Compact {
        set: u8,
        pick: u8,
    },
    Reopen,
    PutSyncState {
        peer: u8,
        set: u8,
        len: u8,
    },
    DeleteSyncState {
        peer: u8,
        set: u8,
    },
    PutToken {
        id: u8,
        len: u8,
    },
    DeleteToken {
        id: u8,
    },
    NextIncarnation,
}

pub(crate) fn op_strategy() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0u8..3, 0u8..4, 0u8..40).prop_map(|(set, count, len)| Op::Append { set, count, len }),
        2 => (0u8..3, any::<u8>()).prop_map(|(set, pick)| Op::Compact { set, pick }),
        1 => Just(Op::Reopen),
        1 => (0u8..2, 0u8..3, 0u8..40).prop_map(|(peer, set, len)| Op::PutSyncState { peer, set, len }),
        1 => (0u8..2, 0u8..3).prop_map(|(peer, set)| Op::DeleteSyncState { peer, set }),
        1 => (0u8..3, 0u8..40).prop_map(|(id, len)| Op::PutToken { id, len }),
        1 => (0u8..3).prop_map(|id| Op::DeleteToken { id }),
        1 => Just(Op::NextIncarnation),
    ]
}

#[derive(Default)]
struct ModelFlagSet {
    covers: u64,
    last: u64,
    snapshot: Option<Vec<u8>>,
    changes: std::collections::BTreeMap<u64, Vec<u8>>,
}

/// Runs a random workload against a backend and a few plain maps side by side; after every step
/// the backend must answer exactly as the maps do.
pub(crate) fn matches_a_simple_model<D: TestDisk>(mut disk: D, ops: &[Op]) {
    use std::collections::BTreeMap;
    let set_name = |i: u8| format!("set-{i}");
    let mut sets: BTreeMap<String, ModelFlagSet> = BTreeMap::new();
    let mut sync: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
    let mut tokens: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut incarnation: Option<u64> = None;
    let mut store = disk.open();
    for (step, op) in ops.iter().enumerate() {
        let filler = |len: u8| vec![step as u8; usize::from(len)];
        match *op {
            Op::Append { set, count, len } => {
                let name = set_name(set);
                let batch: Vec<Vec<u8>> = (0..count).map(|i| filler(len.wrapping_add(i))).collect();
                let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                let receipt = store.append_changes(&name, &refs).unwrap();
                if !batch.is_empty() {
                    let model = sets.entry(name).or_default();
                    for change in batch {
                        model.last += 1;
                        model.changes.insert(model.last, change);
                    }
                    assert_eq!(receipt.last_seq, model.last);
                    assert_eq!(receipt.changes_since_snapshot, model.last - model.covers);
                }
            }
            Op::Compact { set, pick } => {
                let name = set_name(set);
                let (covers, last) = sets.get(&name).map_or((0, 0), |m| (m.covers, m.last));
                let target = covers + u64::from(pick) % (last - covers + 2);
                let snapshot = filler(pick);
                let result = store.compact(&name, &snapshot, target);
                if target > last {
                    assert!(matches!(
                        result,
                        Err(StoreError::CompactionOutOfRange { .. })
                    ));
                } else {
                    result.unwrap();
                    let model = sets.entry(name).or_default();
                    model.covers = target;
                    model.snapshot = Some(snapshot);
                    model.changes = model.changes.split_off(&(target + 1));
                }
            }
            Op::Reopen => {
                disk.close(store);
                store = disk.open();
            }
            Op::PutSyncState { peer, set, len } => {
                let key = (format!("peer-{peer}"), set_name(set));
                store.put_sync_state(&key.0, &key.1, &filler(len)).unwrap();
                sync.insert(key, filler(len));
            }
            Op::DeleteSyncState { peer, set } => {
                let key = (format!("peer-{peer}"), set_name(set));
                assert_eq!(
                    store.delete_sync_state(&key.0, &key.1).unwrap(),
                    sync.remove(&key).is_some()
                );
            }
            Op::PutToken { id, len } => {
                let id = format!("tok-{id}");
                store.put_token(&id, &filler(len)).unwrap();
                tokens.insert(id, filler(len));
            }
            Op::DeleteToken { id } => {
                let id = format!("tok-{id}");
                assert_eq!(
                    store.delete_token(&id).unwrap(),
                    tokens.remove(&id).is_some()
                );
            }
            Op::NextIncarnation => {
                let next = store.next_incarnation().unwrap();
                if let Some(last) = incarnation {
                    assert_eq!(next, last + 1);
                }
                incarnation = Some(next);
            }
        }
    }
    disk.close(store);
    let store = disk.open();
    assert_eq!(
        store.flag_sets().unwrap(),
        sets.keys().cloned().collect::<Vec<_>>()
    );
    for (name, model) in &sets {
        let loaded = store.load(name).unwrap();
        assert_eq!(
            loaded.snapshot.as_ref().map(|s| s.covers_through),
            model.snapshot.as_ref().map(|_| model.covers)
        );
        assert_eq!(loaded.snapshot.map(|s| s.bytes), model.snapshot);
        let changes: BTreeMap<u64, Vec<u8>> = loaded
            .changes
            .into_iter()
            .map(|c| (c.seq, c.bytes))
            .collect();
        assert_eq!(&changes, &model.changes);
        assert_eq!(
            store.changes_since_snapshot(name).unwrap(),
            model.last - model.covers
        );
    }
    for ((peer, set), state) in &sync {
        assert_eq!(store.sync_state(peer, set).unwrap().as_ref(), Some(state));
    }
    assert_eq!(
        store.tokens().unwrap(),
        tokens.into_iter().collect::<Vec<_>>()
    );
    disk.close(store);
}
