//! Benchmarks for a 10,000-flag set (5 fields per flag, built with one change per flag): build,
//! save, load, a one-field sync between replicas in sync (time and bytes on the wire), and a full
//! catch-up of an empty replica. Byte counts and sizes are printed once, before the timings.
//!
//! Run with `cargo bench -p bunting-replica`.

use std::hint::black_box;
use std::time::Duration;

use bunting_model::{Flag, FlagState};
use bunting_replica::{
    Event, FlagSetDoc, Identity, PeerId, Replica, ReplicaConfig, Timestamp, WriteCommand, WriteMeta,
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use serde_json::json;

const FLAGS: usize = 10_000;
const SET: &str = "production";

fn flag(i: usize) -> Flag {
    Flag::from_value(
        &json!({
            "state": "ENABLED",
            "variants": {"on": true, "off": false},
            "defaultVariant": "off",
            "targeting": {"if": [{"in": [{"var": "email"}, [format!("user{i}@example.com")]]}, "on", null]},
            "metadata": {"team": format!("team-{}", i % 50)}
        }),
        "",
    )
    .expect("benchmark flag is valid")
}

fn meta() -> WriteMeta {
    WriteMeta {
        token_id: "bench".into(),
        wall_time_ms: 1_700_000_000_000,
        message: "bench".into(),
    }
}

fn identity(node: &str) -> Identity {
    Identity {
        node: node.into(),
        region: "bench".into(),
        incarnation: 1,
    }
}

/// A 10,000-flag document, one change per flag (as a bulk import writes it).
fn build() -> FlagSetDoc {
    let mut doc = FlagSetDoc::new(identity("a"));
    for i in 0..FLAGS {
        doc.apply(
            &WriteCommand::PutFlag {
                key: format!("flag-{i:05}"),
                flag: flag(i),
            }
            .into(),
            &meta(),
        )
        .expect("write applies");
    }
    doc
}

/// Two replicas that talk to each other; the driver persists everything at once.
struct Pair {
    a: Replica,
    b: Replica,
    now: Timestamp,
    bytes: usize,
    frames: usize,
}

impl Pair {
    fn new(a: Replica, b: Replica) -> Pair {
        let mut p = Pair {
            a,
            b,
            now: Timestamp(0),
            bytes: 0,
            frames: 0,
        };
        p.a.add_peer(PeerId("b".into()), p.now);
        p.b.add_peer(PeerId("a".into()), p.now);
        p
    }

    fn drive(r: &mut Replica, now: Timestamp) {
        while let Some(e) = r.poll_event() {
            if let Event::PersistRequest(p) = e {
                r.persisted(p.id, now).expect("known request");
            }
        }
    }

    /// Moves frames both ways until neither side has anything to send.
    fn run(&mut self) {
        loop {
            Self::drive(&mut self.a, self.now);
            Self::drive(&mut self.b, self.now);
            let mut moved = false;
            while let Some((_, frame)) = self.a.poll_transmit() {
                self.bytes += frame.len();
                self.frames += 1;
                self.b.handle_message(&PeerId("a".into()), &frame, self.now);
                moved = true;
            }
            while let Some((_, frame)) = self.b.poll_transmit() {
                self.bytes += frame.len();
                self.frames += 1;
                self.a.handle_message(&PeerId("b".into()), &frame, self.now);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }
}

fn replica_from(doc: &FlagSetDoc, node: &str) -> Replica {
    let stored = bunting_replica::StoredFlagSet {
        name: SET.into(),
        snapshot: Some(doc.save()),
        changes: Vec::new(),
        sync_states: Vec::new(),
    };
    Replica::restore(
        ReplicaConfig::new(node, "bench", 1),
        vec![stored],
        Timestamp(0),
    )
    .expect("restores")
}

fn empty_replica(node: &str) -> Replica {
    Replica::new(ReplicaConfig::new(node, "bench", 1), Timestamp(0))
}

fn one_field_write(pair: &mut Pair, i: usize) {
    // Each pass over the flags flips their state, so every write changes something.
    let state = if (i / FLAGS).is_multiple_of(2) {
        FlagState::Disabled
    } else {
        FlagState::Enabled
    };
    let now = pair.now;
    pair.a
        .handle_local_write(
            SET,
            WriteCommand::SetState {
                key: format!("flag-{:05}", i % FLAGS),
                state,
            }
            .into(),
            meta(),
            now,
        )
        .expect("write applies");
    pair.run();
}

/// User + system CPU time of this process in milliseconds (Linux; assumes 100 clock ticks/s).
fn cpu_millis() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 10)
}

fn benches(c: &mut Criterion) {
    let doc = build();
    let saved = doc.save();
    eprintln!(
        "10,000 flags: {} changes, save() = {} bytes",
        doc.change_count(),
        saved.len()
    );

    // Two replicas in sync, then one field changed: bytes on the wire.
    let mut pair = Pair::new(replica_from(&doc, "a"), replica_from(&doc, "b"));
    pair.run();
    pair.bytes = 0;
    pair.frames = 0;
    one_field_write(&mut pair, 0);
    eprintln!(
        "one-field change between replicas in sync: {} bytes in {} frames",
        pair.bytes, pair.frames
    );
    // CPU time (user + system, from /proc/self/stat) of 300 one-field syncs: on a shared machine
    // the wall-clock timings below include time spent waiting for a core.
    let before = cpu_millis();
    for i in 1..=300 {
        one_field_write(&mut pair, i);
    }
    if let (Some(b), Some(a)) = (before, cpu_millis()) {
        eprintln!(
            "one-field change, write + persist + sync round: {:.2} ms CPU each (300 runs)",
            (a - b) as f64 / 300.0
        );
    }
    let heads_a = pair.a.flag_set(SET).map(FlagSetDoc::heads);
    assert_eq!(heads_a, pair.b.flag_set(SET).map(FlagSetDoc::heads));

    // An empty replica catching up: bytes on the wire.
    let mut fresh = Pair::new(replica_from(&doc, "a"), empty_replica("b"));
    let before = cpu_millis();
    fresh.run();
    let cpu = before.zip(cpu_millis()).map(|(b, a)| a - b).unwrap_or(0);
    eprintln!(
        "empty replica catch-up: {} bytes in {} frames, {cpu} ms CPU (both sides)",
        fresh.bytes, fresh.frames
    );
    assert_eq!(
        fresh.a.flag_set(SET).map(FlagSetDoc::heads),
        fresh.b.flag_set(SET).map(FlagSetDoc::heads)
    );

    let mut g = c.benchmark_group("10k-flags");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("build (one change per flag)", |b| {
        b.iter(|| black_box(build()))
    });
    g.bench_function("save", |b| b.iter(|| black_box(doc.save())));
    g.bench_function("load", |b| {
        b.iter(|| black_box(FlagSetDoc::load(Some(&saved), &[], identity("l")).expect("loads")))
    });
    g.bench_function("compile", |b| {
        b.iter(|| black_box(doc.compile(&bunting_engine::CompileOptions::default())))
    });
    g.bench_function("catch-up of an empty replica", |b| {
        b.iter_batched(
            || Pair::new(replica_from(&doc, "a"), empty_replica("b")),
            |mut p| {
                p.run();
                p
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("10k-flags-sync");
    g.sample_size(50);
    let mut i = 1;
    g.bench_function("one-field change between replicas in sync", |b| {
        b.iter(|| {
            i += 1;
            one_field_write(&mut pair, i);
        })
    });
    g.finish();
}

criterion_group!(replica, benches);
criterion_main!(replica);
