//! Crash safety of the redb store: a writer process is killed with SIGKILL at random moments;
//! after every kill, the store opens and loads cleanly and holds every change the writer had
//! acknowledged (printed after `append_changes` returned), with no gap.
//!
//! One binary plays both parts (`harness = false`): run normally it is the parent; with
//! `BUNTING_CRASH_CHILD=<file>` set it is the writer. `BUNTING_CRASH_SEED=<n>` replays the kill
//! schedule of a reported seed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bunting_store::{RedbStore, Store};

const CHILD_ENV: &str = "BUNTING_CRASH_CHILD";
const SEED_ENV: &str = "BUNTING_CRASH_SEED";
const FLAG_SET: &str = "production";
/// The writer compacts every this many appends, so kills also land inside compactions.
const COMPACT_EVERY: u64 = 50;
/// Total time spent killing writers; each round adds one writer's life (≤ 700 ms).
const BUDGET: Duration = Duration::from_secs(8);
const MAX_ROUNDS: usize = 15;

fn record(n: u64) -> Vec<u8> {
    format!("record-{n}").into_bytes()
}

/// A snapshot as the writer makes one: every record it covers, one per line (as an Automerge
/// `save()` contains every change it covers).
fn snapshot_through(n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for k in 1..=n {
        out.extend_from_slice(&record(k));
        out.push(b'\n');
    }
    out
}

fn main() {
    match std::env::var_os(CHILD_ENV) {
        Some(path) => writer(Path::new(&path)),
        None => parent(),
    }
}

/// The child: append numbered records for ever, printing each number once it is acknowledged.
fn writer(path: &Path) {
    let store = RedbStore::open(path).expect("writer opens the store");
    let incarnation = store.next_incarnation().expect("incarnation");
    println!("incarnation {incarnation}");
    let mut n = store.load(FLAG_SET).expect("writer loads").last_seq() + 1;
    loop {
        let receipt = store
            .append_changes(FLAG_SET, &[&record(n)])
            .expect("append");
        assert_eq!(receipt.last_seq, n, "record numbers are sequence numbers");
        println!("{n}");
        if n.is_multiple_of(COMPACT_EVERY) {
            store
                .compact(FLAG_SET, &snapshot_through(n), n)
                .expect("compact");
        }
        n += 1;
    }
}

/// xorshift64*: enough randomness for kill times, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn parent() {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    println!("crash_safety: seed {seed} (replay with {SEED_ENV}={seed})");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.redb");
    let exe = std::env::current_exe().expect("own path");

    let started = Instant::now();
    let mut rounds = 0;
    let mut acknowledged_total = 0u64;
    let mut last_incarnation = 0u64;
    let mut snapshots_seen = 0;
    let mut previous_last = 0u64;
    while rounds < MAX_ROUNDS && started.elapsed() < BUDGET {
        rounds += 1;
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn writer");
        let stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        let life = Duration::from_millis(50 + rng.next() % 650);
        std::thread::sleep(life);
        child.kill().expect("SIGKILL the writer");
        let status = child.wait().expect("reap the writer");
        assert!(!status.success(), "the writer only ends by being killed");
        let lines = reader.join().expect("reader thread");

        let mut acknowledged = Vec::new();
        for line in &lines {
            if let Some(inc) = line.strip_prefix("incarnation ") {
                let inc: u64 = inc.parse().expect("incarnation number");
                assert!(
                    inc > last_incarnation,
                    "incarnation {inc} after {last_incarnation}: a restart reused an incarnation"
                );
                last_incarnation = inc;
            } else {
                acknowledged.push(line.parse::<u64>().expect("acknowledged number"));
            }
        }

        let store = RedbStore::open(&path).expect("store reopens after SIGKILL");
        let loaded = store
            .load(FLAG_SET)
            .expect("store loads cleanly after SIGKILL");
        let mut present = Vec::new();
        if let Some(snapshot) = &loaded.snapshot {
            snapshots_seen += 1;
            assert_eq!(
                snapshot.bytes,
                snapshot_through(snapshot.covers_through),
                "the snapshot holds exactly the records it covers"
            );
            present.extend(1..=snapshot.covers_through);
        }
        for change in &loaded.changes {
            assert_eq!(change.bytes, record(change.seq), "change #{}", change.seq);
            present.push(change.seq);
        }
        let last = loaded.last_seq();
        assert!(
            last >= previous_last,
            "the store shrank from {previous_last} to {last} (seed {seed})"
        );
        previous_last = last;
        assert_eq!(
            present,
            (1..=last).collect::<Vec<_>>(),
            "the log has no gap (seed {seed})"
        );
        if let Some(&max_acked) = acknowledged.last() {
            assert!(
                max_acked <= last,
                "acknowledged record {max_acked} lost: store ends at {last} (seed {seed})"
            );
        }
        assert_eq!(store.changes_since_snapshot(FLAG_SET).expect("count"), {
            last - loaded.snapshot.as_ref().map_or(0, |s| s.covers_through)
        });
        println!(
            "round {rounds}: writer lived {life:?}, acknowledged {} (up to {:?}), store holds 1..={last}",
            acknowledged.len(),
            acknowledged.last()
        );
        acknowledged_total += acknowledged.len() as u64;
        drop(store);
    }
    assert!(
        acknowledged_total > 0,
        "the writers acknowledged nothing in {rounds} rounds"
    );
    if acknowledged_total > 2 * COMPACT_EVERY {
        assert!(snapshots_seen > 0, "no compaction ever survived a kill");
    }
    println!(
        "crash_safety: ok — {rounds} SIGKILLs, {acknowledged_total} acknowledged appends, none lost"
    );
}
