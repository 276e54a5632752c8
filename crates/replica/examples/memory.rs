//! Resident memory of a loaded 10,000-flag set: the Automerge document plus its compiled snapshot.
//!
//! A measurement, not a test. The first process builds the document (one change per flag) and saves
//! it to a temporary file; a second, fresh process reads the file and reports how much its resident
//! set grows while loading the document and compiling it (from /proc/self/statm, Linux only).
//!
//! Run with `cargo run --release -p bunting-replica --example memory`.

use std::process::Command;

use bunting_model::Flag;
use bunting_replica::{FlagSetDoc, Identity, WriteCommand, WriteMeta};
use serde_json::json;

const FLAGS: usize = 10_000;

fn identity() -> Identity {
    Identity {
        node: "memory".into(),
        region: "bench".into(),
        incarnation: 1,
    }
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn build() -> FlagSetDoc {
    let mut doc = FlagSetDoc::new(identity());
    for i in 0..FLAGS {
        let flag = Flag::from_value(
            &json!({
                "state": "ENABLED",
                "variants": {"on": true, "off": false},
                "defaultVariant": "off",
                "targeting": {"if": [{"in": [{"var": "email"}, [format!("user{i}@example.com")]]}, "on", null]},
                "metadata": {"team": format!("team-{}", i % 50)}
            }),
            "",
        )
        .expect("valid flag");
        doc.apply(
            &WriteCommand::PutFlag {
                key: format!("flag-{i:05}"),
                flag,
            }
            .into(),
            &WriteMeta {
                token_id: "bench".into(),
                wall_time_ms: 1_700_000_000_000,
                message: "bench".into(),
            },
        )
        .expect("write applies");
    }
    doc
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, path] = args.as_slice() {
        if mode == "measure" {
            let bytes = std::fs::read(path).expect("saved document");
            let before = resident_bytes();
            let doc = FlagSetDoc::load(Some(&bytes), &[], identity()).expect("loads");
            let after_load = resident_bytes();
            let compiled = doc.compile(&bunting_engine::CompileOptions::default());
            let after_compile = resident_bytes();
            assert_eq!(compiled.len(), FLAGS);
            println!(
                "document: {:.1} MB, compiled snapshot: {:.1} MB, together: {:.1} MB resident",
                (after_load - before) as f64 / 1e6,
                (after_compile - after_load) as f64 / 1e6,
                (after_compile - before) as f64 / 1e6
            );
            return;
        }
    }
    let doc = build();
    let path =
        std::env::temp_dir().join(format!("bunting-memory-{}.automerge", std::process::id()));
    std::fs::write(&path, doc.save()).expect("write temporary file");
    drop(doc);
    let status = Command::new(std::env::current_exe().expect("own path"))
        .arg("measure")
        .arg(&path)
        .status()
        .expect("run measuring process");
    let _ = std::fs::remove_file(&path);
    assert!(status.success());
}
