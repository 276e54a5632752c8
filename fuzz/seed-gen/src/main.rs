//! Writes fuzz/seeds/TARGET/* from the repository's examples and a few engine vectors:
//! `cargo run --manifest-path fuzz/Cargo.toml -p bunting-fuzz-seeds` (from the repository root).
//! The output is checked in; rerun after changing the examples or a target's input format.

// A generator over fixtures of this repository: a broken fixture should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use bunting_model::FlagSet;
use bunting_replica::{
    wire, Event, PeerId, Replica, ReplicaConfig, Timestamp, WriteCommand, WriteMeta,
};
use bunting_store::RecordId;
use serde_json::{json, Value};

/// Rules in the shapes flagd's test kit and the engine's vectors use.
fn vector_rules() -> Vec<Value> {
    vec![
        json!({"fractional": [{"cat": [{"var": "$flagd.flagKey"}, {"var": "user.name"}]},
                              ["on", 25], ["off", 75]]}),
        json!({"fractional": [["on"], ["off", 1]]}),
        json!({"if": [{"sem_ver": [{"var": "version"}, ">=", "1.2.3"]}, "s", "n"]}),
        json!({"if": [{"sem_ver": [{"var": "version"}, "^", "2.0.0"]}, "on", "off"]}),
        json!({"if": [{"starts_with": [{"var": "email"}, "admin"]}, "on", "off"]}),
        json!({"if": [{"in": [{"var": "country"}, ["NZ", "IE", "PT"]]}, "o", "f"]}),
        json!({"if": [{">": [{"var": "$flagd.timestamp"}, 1700000000]}, "on", "off"]}),
        json!({"if": [{"some": [{"var": "tags"}, {"==": [{"var": ""}, "beta"]}]}, "on", "off"]}),
        json!({"if": [{"<": [{"reduce": [{"var": "n"}, {"+": [{"var": "current"}, {"var": "accumulator"}]}, 0]}, 10]}, "on", "off"]}),
        json!({"if": [{"==": [{"substr": [{"var": "targetingKey"}, 0, 3]}, "usr"]}, "on", "off"]}),
        json!({"if": [{"all": [{"map": [{"var": "n"}, {"*": [{"var": ""}, 2]}]}, {">": [{"var": ""}, 1]}]}, "on", "off"]}),
        json!({"if": [{"!!": {"merge": [{"var": "tags"}, ["x"]]}}, {"cat": ["o", "n"]}, null]}),
        json!({"if": [{"$ref": "staff"}, "on", {"missing": ["email"]}]}),
        json!({"%": [{"var": "n"}, 3]}),
    ]
}

fn contexts() -> Vec<Value> {
    vec![
        json!({}),
        json!({"targetingKey": "user-1", "email": "ana@example.com", "country": "NZ"}),
        json!({"targetingKey": "usr-7", "user": {"name": "jon"}, "version": "2.1.0",
               "tags": ["beta", "x"], "n": [1, 2, 3]}),
        json!({"plan": "enterprise", "seats": 120, "screen": {"width": 480}}),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let seeds = root.join("fuzz/seeds");
    // Start clean, so no seed outlives the input format it was written for.
    let _ = fs::remove_dir_all(&seeds);
    let flags = fs::read_to_string(root.join("examples/flags.json")).unwrap();
    let broken = fs::read_to_string(root.join("examples/broken-flags.json")).unwrap();
    let example: Value = serde_json::from_str(&flags).unwrap();
    let set = FlagSet::from_json_str(&flags).unwrap();

    // flagset: the examples as they are, and one document per vector rule.
    let dir = seeds.join("flagset");
    write(&dir, "flags.json", flags.as_bytes());
    write(&dir, "broken-flags.json", broken.as_bytes());
    for (i, rule) in vector_rules().into_iter().enumerate() {
        let doc = json!({"$evaluators": {"staff": {"ends_with": [{"var": "email"}, "@example.com"]}},
            "flags": [{"key": "f", "state": "ENABLED", "defaultVariant": "off",
                       "variants": {"on": "on", "off": "off", "s": "s", "n": "n", "o": "o", "f": "f"},
                       "targeting": rule}]});
        write(&dir, &format!("vector-{i:02}.json"), &bytes(&doc));
    }

    // engine: each rule (examples and vectors) with each context; the examples file whole.
    let dir = seeds.join("engine");
    let mut rules: Vec<Value> = set
        .flags
        .values()
        .filter_map(|f| f.targeting.clone())
        .collect();
    rules.extend(vector_rules());
    for (i, rule) in rules.iter().enumerate() {
        let ctx = &contexts()[i % contexts().len()];
        write(
            &dir,
            &format!("rule-{i:02}"),
            &[bytes(rule), vec![0], bytes(ctx)].concat(),
        );
    }
    for (i, ctx) in contexts().iter().enumerate() {
        write(
            &dir,
            &format!("examples-{i}"),
            &[bytes(&example), vec![0], bytes(ctx)].concat(),
        );
    }

    // bodies: OFREP requests, each example flag as a PUT body, the examples as an upload.
    let dir = seeds.join("bodies");
    for (i, ctx) in contexts().iter().enumerate() {
        write(
            &dir,
            &format!("ofrep-{i}"),
            &bytes(&json!({"context": ctx})),
        );
    }
    for (i, flag) in set.flags.values().enumerate() {
        write(&dir, &format!("flag-{i}"), &bytes(&flag.to_value()));
    }
    write(&dir, "upload", flags.as_bytes());

    // record: [kind selector][name length][name][seq, 8 bytes LE][record as stored].
    let dir = seeds.join("record");
    let ids = [
        RecordId::Change {
            flag_set: "production".into(),
            seq: 7,
        },
        RecordId::Snapshot {
            flag_set: "production".into(),
        },
        RecordId::FlagSetInfo {
            flag_set: "production".into(),
        },
        RecordId::SyncState {
            peer: "peer-7".into(),
            flag_set: "production".into(),
        },
        RecordId::Token {
            token_id: "production".into(),
        },
        RecordId::Incarnation,
    ];
    for (selector, id) in ids.iter().enumerate() {
        let payload: &[u8] = if selector == 5 {
            &3u64.to_le_bytes()
        } else {
            b"\x07\0\0\0\0\0\0\0change"
        };
        let stored = bunting_store::fuzzing::encode(id, payload);
        let input = [
            &[selector as u8, 10][..],
            b"production",
            &7u64.to_le_bytes(),
            &stored,
        ]
        .concat();
        write(&dir, &format!("record-{selector}"), &input);
    }

    // wire: every frame a peer sends the fuzzed replica ("fuzz-node") while it writes the
    // examples and then syncs with it.
    let dir = seeds.join("wire");
    let mut frames = BTreeSet::new();
    let node = PeerId("fuzz-node".into());
    let other = PeerId("peer-a".into());
    let mut a = Replica::new(ReplicaConfig::new("peer-a", "seed-region", 1), Timestamp(0));
    let mut b = Replica::new(
        ReplicaConfig::new("fuzz-node", "seed-region", 1),
        Timestamp(0),
    );
    a.add_peer(node.clone(), Timestamp(0));
    b.add_peer(other.clone(), Timestamp(0));
    let mut now = Timestamp(0);
    let write_cmd = WriteCommand::ReplaceSet { set: set.clone() };
    a.handle_local_write("production", write_cmd.into(), WriteMeta::default(), now)
        .unwrap();
    let mut first = set.flags.values().next().cloned().unwrap();
    first.state = bunting_model::FlagState::Disabled;
    let key = set.flags.keys().next().cloned().unwrap();
    let toggle = WriteCommand::PutFlag { key, flag: first };
    a.handle_local_write("production", toggle.into(), WriteMeta::default(), now)
        .unwrap();
    for _round in 0..20 {
        now = now.plus_millis(700);
        for r in [&mut a, &mut b] {
            while let Some(event) = r.poll_event() {
                if let Event::PersistRequest(p) = event {
                    r.persisted(p.id, now).unwrap();
                }
            }
            r.handle_timeout(now);
        }
        while let Some((_, frame)) = a.poll_transmit() {
            b.handle_message(&other, &frame, now);
            frames.insert(frame);
        }
        while let Some((_, frame)) = b.poll_transmit() {
            a.handle_message(&node, &frame, now);
            // The target's replica is "fuzz-node" itself: frames it sends are useful shapes too.
            frames.insert(frame);
        }
    }
    // A node that connects after the writes catches up through Automerge sync messages.
    let late = PeerId("peer-late".into());
    let mut c = Replica::new(ReplicaConfig::new("peer-late", "seed-region", 1), now);
    a.add_peer(late.clone(), now);
    c.add_peer(other.clone(), now);
    for _round in 0..20 {
        now = now.plus_millis(700);
        for r in [&mut a, &mut c] {
            while let Some(event) = r.poll_event() {
                if let Event::PersistRequest(p) = event {
                    r.persisted(p.id, now).unwrap();
                }
            }
            r.handle_timeout(now);
        }
        while let Some((to, frame)) = a.poll_transmit() {
            if to == late {
                c.handle_message(&other, &frame, now);
                frames.insert(frame);
            }
        }
        while let Some((_, frame)) = c.poll_transmit() {
            a.handle_message(&late, &frame, now);
            frames.insert(frame);
        }
    }
    for (i, frame) in frames.iter().enumerate() {
        let kind = wire::decode(frame, wire::DEFAULT_MAX_FRAME_BYTES)
            .unwrap()
            .kind;
        write(
            &dir,
            &format!("frame-{i:02}-{kind:?}").to_lowercase(),
            frame,
        );
    }
    println!("wrote seeds under {}", seeds.display());
}
