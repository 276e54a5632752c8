//! Store benchmarks: the persist-before-ack latency of one small change, and the start-up load of
//! a node holding a 10,000-flag document (a ~100 KB snapshot plus 1,000 small changes: five times
//! the most a node replays with `COMPACT_AFTER_CHANGES` = 200, the worst case of the earlier
//! setting of 1,000).
//!
//! Run with `cargo bench -p bunting-store`.
#![allow(clippy::unwrap_used)] // a benchmark has no caller to hand an error to

use std::hint::black_box;
use std::time::Duration;

use bunting_store::{MemoryStore, RedbStore, Store};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const FLAG_SET: &str = "production";
/// About the size of one Automerge change that edits one field of one flag.
const SMALL_CHANGE_BYTES: usize = 300;
/// About the size of `save()` of a 10,000-flag, 5-field document (measured for the replica issue).
const SNAPSHOT_BYTES: usize = 104 * 1024;
/// The replay tail the load benchmark measures (see the crate doc).
const TAIL_CHANGES: u64 = 1_000;

/// Deterministic filler that does not compress to nothing (Automerge saves are compressed).
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A node with a compacted 10,000-flag document and a full replay tail of small changes.
fn fill_node(store: &impl Store) {
    store
        .append_changes(FLAG_SET, &[&bytes(SMALL_CHANGE_BYTES, 0)])
        .unwrap();
    store
        .compact(FLAG_SET, &bytes(SNAPSHOT_BYTES, 1), 1)
        .unwrap();
    for i in 0..TAIL_CHANGES {
        store
            .append_changes(FLAG_SET, &[&bytes(SMALL_CHANGE_BYTES, i + 2)])
            .unwrap();
    }
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_one_small_change");
    group.measurement_time(Duration::from_secs(8));
    let change = bytes(SMALL_CHANGE_BYTES, 7);

    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(dir.path().join("node.redb")).unwrap();
    group.bench_function("redb (fsync per append)", |b| {
        b.iter(|| {
            redb.append_changes(FLAG_SET, &[black_box(&change)])
                .unwrap()
        })
    });

    let memory = MemoryStore::new();
    group.bench_function("memory", |b| {
        b.iter(|| {
            memory
                .append_changes(FLAG_SET, &[black_box(&change)])
                .unwrap()
        })
    });
    group.finish();
}

fn load(c: &mut Criterion) {
    let mut group = c.benchmark_group("load_10k_flag_node");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        fill_node(&store);
        let loaded = store.load(FLAG_SET).unwrap();
        assert_eq!(loaded.changes.len() as u64, TAIL_CHANGES);
        let file = std::fs::metadata(&path).unwrap().len();
        eprintln!("redb file holding the node: {file} bytes");
    }
    group.bench_function("redb open + load (100 KB snapshot + 1,000 changes)", |b| {
        b.iter(|| {
            let store = RedbStore::open(&path).unwrap();
            black_box(store.load(FLAG_SET).unwrap())
        })
    });
    let store = RedbStore::open(&path).unwrap();
    group.bench_function("redb load only", |b| {
        b.iter(|| black_box(store.load(FLAG_SET).unwrap()))
    });
    drop(store);

    let memory = MemoryStore::new();
    fill_node(&memory);
    group.bench_function("memory load", |b| {
        b.iter(|| black_box(memory.load(FLAG_SET).unwrap()))
    });
    group.finish();
}

fn compact(c: &mut Criterion) {
    let mut group = c.benchmark_group("compact");
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("node.redb")).unwrap();
    let snapshot = bytes(SNAPSHOT_BYTES, 3);
    group.bench_function("redb 100 KB snapshot replacing 1,000 changes", |b| {
        b.iter_batched(
            || {
                // Appended as one batch: the setup cost is not what is measured.
                let changes: Vec<Vec<u8>> = (0..TAIL_CHANGES)
                    .map(|i| bytes(SMALL_CHANGE_BYTES, i))
                    .collect();
                let refs: Vec<&[u8]> = changes.iter().map(Vec::as_slice).collect();
                store.append_changes(FLAG_SET, &refs).unwrap().last_seq
            },
            |last| store.compact(FLAG_SET, &snapshot, last).unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = append, load, compact
}
criterion_main!(benches);
