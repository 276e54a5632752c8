//! A driver for counting instructions per evaluation with valgrind, which the machine's load does
//! not distort (criterion's times on a shared machine do): runs one scenario N times.
//!
//! `cargo build --release -p bunting-engine --example instructions`, then for each scenario
//! `valgrind --tool=callgrind target/release/examples/instructions SCENARIO ENGINE N` with N = 0
//! and N = 10000: the difference in instructions, divided by 10000, is the cost of one evaluation.
//! SCENARIO: static, targeting, fractional, semver, bulk; ENGINE: bunting (`evaluate_ref`),
//! bunting_all (`evaluate_all_ref` over a set of just the scenario's flags), datalogic (finds the
//! flag, evaluates its rule, maps the result to the variant, as the benchmark's `datalogic` rows),
//! datalogic_rule_only.

// A measuring tool: a broken fixture should stop it loudly.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use bunting_engine::{CompileOptions, CompiledFlagSet, EvaluationContext};
use bunting_model::FlagSet;
use serde_json::{json, Value};

#[path = "../benches/fixtures/mod.rs"]
mod fixtures;
use fixtures::{context_json, DlFlag, FRACTIONAL, SEMVER, TARGETING};

const KINDS: [&str; 4] = ["static", "targeting", "fractional", "semver"];

fn rule(kind: usize) -> Option<&'static str> {
    [None, Some(TARGETING), Some(FRACTIONAL), Some(SEMVER)][kind]
}

fn flag_json(kind: usize) -> Value {
    let bool_variants = json!({"on": true, "off": false});
    let mut flag = match kind {
        2 => {
            json!({"state": "ENABLED", "variants": {"a": "A", "b": "B", "c": "C"}, "defaultVariant": "a"})
        }
        0 => json!({"state": "ENABLED", "variants": bool_variants, "defaultVariant": "on"}),
        _ => json!({"state": "ENABLED", "variants": bool_variants, "defaultVariant": "off"}),
    };
    if let Some(r) = rule(kind) {
        flag["targeting"] = serde_json::from_str(r).unwrap();
    }
    flag
}

/// The four single flags and 100 bulk flags, as the benchmark's set.
fn keys_and_kinds() -> Vec<(String, usize)> {
    let mut keys: Vec<(String, usize)> = (0..4).map(|k| (KINDS[k].to_owned(), k)).collect();
    keys.extend((0..100).map(|i| (format!("bulk-{}-{i:03}", KINDS[i % 4]), i % 4)));
    keys
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (scenario, engine) = (args[0].as_str(), args[1].as_str());
    let n: usize = args[2].parse().unwrap();
    let keys = keys_and_kinds();
    let wanted: Vec<&(String, usize)> = match scenario {
        "bulk" => keys
            .iter()
            .filter(|(k, _)| k.starts_with("bulk-"))
            .collect(),
        s => keys.iter().filter(|(k, _)| k == s).collect(),
    };
    assert!(!wanted.is_empty(), "unknown scenario {scenario}");
    let mut found = 0usize;
    match engine {
        "bunting" => {
            let (set, ctx) = compiled(keys.iter());
            for _ in 0..n {
                for (key, _) in &wanted {
                    let r = set.evaluate_ref(black_box(key), black_box(&ctx));
                    found += usize::from(r.variant.is_some());
                }
            }
        }
        // Every flag of a set of the 100 bulk flags, as OFREP bulk evaluation answers.
        "bunting_all" => {
            let (set, ctx) = compiled(wanted.iter().copied());
            for _ in 0..n {
                found += set.evaluate_all_ref(black_box(&ctx)).len();
            }
        }
        "datalogic" | "datalogic_rule_only" => {
            let dl = datalogic_rs::Engine::new();
            let mut session = dl.session();
            let mut by_key =
                std::collections::HashMap::with_hasher(foldhash::fast::FixedState::default());
            for (key, kind) in &keys {
                let flag = DlFlag::new(&dl, key, *kind);
                by_key.insert(key.clone(), flag);
            }
            if engine == "datalogic_rule_only" {
                let rules: Vec<(&datalogic_rs::Logic, &datalogic_rs::ParsedData)> = wanted
                    .iter()
                    .filter_map(|(k, _)| {
                        by_key[k.as_str()]
                            .rule
                            .as_ref()
                            .map(|r| (r, &by_key[k.as_str()].data))
                    })
                    .collect();
                for _ in 0..n {
                    for (rule, data) in &rules {
                        found += usize::from(
                            session
                                .eval_borrowed(black_box(*rule), black_box(*data))
                                .is_ok(),
                        );
                        session.reset();
                    }
                }
            } else {
                for _ in 0..n {
                    for (key, _) in &wanted {
                        let f = by_key.get(black_box(key.as_str()));
                        found += usize::from(f.and_then(|f| f.resolve(&mut session)).is_some());
                    }
                }
            }
        }
        other => panic!("unknown engine {other}"),
    }
    println!("{found}");
}

/// The given fixture flags compiled into one set, and the fixture context.
fn compiled<'a>(
    flags: impl Iterator<Item = &'a (String, usize)>,
) -> (CompiledFlagSet, EvaluationContext) {
    let flags: serde_json::Map<String, Value> = flags
        .map(|(k, kind)| (k.clone(), flag_json(*kind)))
        .collect();
    let set = FlagSet::from_value(&json!({ "flags": flags })).unwrap();
    let set = CompiledFlagSet::compile(&set, &CompileOptions::default());
    let ctx = EvaluationContext::from_value(&context_json(), 1_700_000_000).unwrap();
    (set, ctx)
}
