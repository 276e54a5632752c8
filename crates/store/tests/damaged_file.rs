//! Storage damage is never silent: a real redb store file holding flag sets, changes, a snapshot,
//! tokens, sync states and an incarnation is damaged page by page (bytes flipped at a few offsets
//! of every 4 KiB page) and truncated at many offsets. Every case must be a clear
//! [`StoreError::Damaged`] naming the file, or a good open whose data is exactly what was written
//! (or whose reads report the corruption): never a panic, never silently fewer records.

#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

use std::path::Path;

use bunting_store::{LoadedFlagSet, RedbStore, Store, StoreError};

const PAGE: usize = 4096;
/// Bounds the cases so the test stays at a few seconds in a debug build.
const MAX_FLIP_PAGES: usize = 200;
const SYNC_PAIRS: [(&str, &str); 2] = [("node-b", "production"), ("node-c", "staging")];

/// Everything a node reads from its store at start, in one comparable value.
#[derive(Debug, PartialEq)]
struct Seen {
    flag_sets: Vec<String>,
    loaded: Vec<LoadedFlagSet>,
    since_snapshot: Vec<u64>,
    tokens: Vec<(String, Vec<u8>)>,
    sync_states: Vec<Option<Vec<u8>>>,
}

fn read_everything(store: &RedbStore) -> Result<Seen, StoreError> {
    let flag_sets = store.flag_sets()?;
    let mut loaded = Vec::new();
    let mut since_snapshot = Vec::new();
    for name in &flag_sets {
        loaded.push(store.load(name)?);
        since_snapshot.push(store.changes_since_snapshot(name)?);
    }
    let mut sync_states = Vec::new();
    for (peer, set) in SYNC_PAIRS {
        sync_states.push(store.sync_state(peer, set)?);
    }
    Ok(Seen {
        flag_sets,
        loaded,
        since_snapshot,
        tokens: store.tokens()?,
        sync_states,
    })
}

/// What a read returned, short enough for a failure message.
fn summary(seen: &Seen) -> String {
    let sets: Vec<String> = seen
        .flag_sets
        .iter()
        .zip(&seen.loaded)
        .map(|(name, l)| {
            let snapshot = l.snapshot.as_ref().map(|s| s.covers_through);
            format!(
                "{name}: snapshot {snapshot:?}, changes through #{}",
                l.last_seq()
            )
        })
        .collect();
    format!(
        "{sets:?}, {} token(s), {} sync state(s)",
        seen.tokens.len(),
        seen.sync_states.iter().flatten().count()
    )
}

/// A store as a node leaves it: two flag sets (one compacted), tokens, sync states, incarnations.
/// `killed`: left as by a killed process (not closed), so its last commit is the last write
/// rather than the close's own bookkeeping commit.
fn write_store(path: &Path, killed: bool) -> u64 {
    let store = RedbStore::open(path).unwrap();
    let incarnation = store.next_incarnation().unwrap();
    for i in 0..6u8 {
        store
            .append_changes("production", &[&vec![i; 300 + usize::from(i) * 50]])
            .unwrap();
    }
    store.compact("production", &[7u8; 5000], 4).unwrap();
    store
        .append_changes("staging", &[b"stage-1", b"stage-2", &[9u8; 2000]])
        .unwrap();
    store
        .put_token("tok-admin", b"hashed admin record")
        .unwrap();
    store.put_token("tok-sdk", &[3u8; 700]).unwrap();
    for (peer, set) in SYNC_PAIRS {
        store.put_sync_state(peer, set, peer.as_bytes()).unwrap();
    }
    store
        .append_changes("production", &[b"last write"])
        .unwrap();
    if killed {
        // No close: the file stays exactly as the last commit left it (the open handle and its
        // lock leak until the test ends; the cases open copies).
        std::mem::forget(store);
    }
    incarnation
}

/// Opens a damaged copy; returns what happened, or a description of what went wrong.
fn check_case(path: &Path, expected: &Seen, last_incarnation: u64) -> Result<&'static str, String> {
    let outcome = std::panic::catch_unwind(|| -> Result<&'static str, String> {
        let store = match RedbStore::open(path) {
            Err(e @ StoreError::Damaged { .. }) => {
                let text = e.to_string();
                if !text.contains(&path.display().to_string()) || !text.contains("--reset-data") {
                    return Err(format!(
                        "the error does not name the file and --reset-data: {text}"
                    ));
                }
                return Ok("refused");
            }
            Err(e) => return Err(format!("an error that is not Damaged: {e:?}")),
            Ok(store) => store,
        };
        match read_everything(&store) {
            Err(StoreError::Damaged { .. } | StoreError::Corrupt { .. }) => Ok("read error"),
            Err(e) => Err(format!("a read failed with an unexpected error: {e:?}")),
            Ok(seen) if seen == *expected => match store.next_incarnation() {
                Ok(n) if n > last_incarnation => Ok("intact"),
                Ok(n) => Err(format!("incarnation {n} after {last_incarnation}")),
                Err(StoreError::Damaged { .. } | StoreError::Corrupt { .. }) => Ok("read error"),
                Err(e) => Err(format!("next_incarnation failed unexpectedly: {e:?}")),
            },
            Ok(seen) => Err(format!(
                "opened and read without error, but the data differ: {}",
                summary(&seen)
            )),
        }
    });
    outcome.unwrap_or_else(|_| Err("panicked".into()))
}

#[test]
fn every_flipped_page_and_truncation_is_an_error_or_exactly_the_data_written() {
    damage_every_page_of(false);
}

#[test]
fn damage_to_the_last_write_of_a_killed_process_is_an_error_not_a_rollback() {
    damage_every_page_of(true);
}

fn damage_every_page_of(killed: bool) {
    let dir = tempfile::tempdir().unwrap();
    let written_path = dir.path().join("written.redb");
    let last_incarnation = write_store(&written_path, killed);
    let original = std::fs::read(&written_path).unwrap();
    let expected = {
        let reference = dir.path().join("reference.redb");
        std::fs::write(&reference, &original).unwrap();
        let store = RedbStore::open(&reference).unwrap();
        read_everything(&store).unwrap()
    };
    assert_eq!(
        expected.loaded[0].changes.last().unwrap().bytes,
        b"last write",
        "the reference copy lost the last write"
    );
    assert_eq!(expected.flag_sets, ["production", "staging"]);
    let pages = original.len().div_ceil(PAGE);

    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    let stride = pages.div_ceil(MAX_FLIP_PAGES).max(1);
    for page in (0..pages).step_by(stride) {
        // A few offsets per page: its first bytes (page headers), one inside, its last bytes.
        let inside = 16 + (page * 997) % (PAGE - 32);
        for offset in [0, inside, PAGE - 4] {
            let at = page * PAGE + offset;
            if at + 4 > original.len() {
                continue;
            }
            let mut bytes = original.clone();
            for b in &mut bytes[at..at + 4] {
                *b ^= 0x5A;
            }
            cases.push((format!("4 bytes flipped at {at}"), bytes));
        }
    }
    let mut cuts: Vec<usize> = (0..pages).map(|p| p * PAGE).collect();
    cuts.extend([
        1,
        7,
        100,
        511,
        4097,
        8191,
        original.len() / 2 + 3,
        original.len() - 1,
    ]);
    for cut in cuts {
        if cut < original.len() {
            cases.push((
                format!("truncated to {cut} bytes"),
                original[..cut].to_vec(),
            ));
        }
    }
    cases.push(("empty (0 bytes)".into(), Vec::new()));

    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    let mut failures = Vec::new();
    for (i, (name, bytes)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case-{i}.redb"));
        std::fs::write(&path, bytes).unwrap();
        match check_case(&path, &expected, last_incarnation) {
            Ok(kind) => *counts.entry(kind).or_default() += 1,
            Err(why) => failures.push(format!("{name}: {why}")),
        }
        std::fs::remove_file(&path).unwrap();
    }
    eprintln!(
        "{} cases on a {}-byte file: {counts:?}",
        cases.len(),
        original.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(counts.get("refused").copied().unwrap_or(0) > 0);
}
