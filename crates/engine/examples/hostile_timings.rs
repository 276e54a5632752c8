//! Times the hostile shapes of issue 12 once each (findings 2, 3 and 4): what an evaluation that
//! runs out of budget costs, and what validating and compiling the `$ref` upload costs.
//!
//! `cargo run --release -p bunting-engine --example hostile_timings`
//!
//! Wall-clock figures from one run on whatever machine runs it: for reports, not assertions.

// An example: a broken fixture should stop it loudly.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use bunting_engine::{CompileOptions, CompiledFlagSet, EvaluationContext};
use bunting_model::FlagSet;
use serde_json::{json, Value};

fn flag(targeting: Value) -> Value {
    json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
           "targeting": targeting})
}

fn time_evaluation(name: &str, rule: Value, context: Value) {
    let set = FlagSet::from_value_unvalidated(&json!({"flags": {"f": flag(rule)}})).unwrap();
    let compiled = CompiledFlagSet::compile(&set, &CompileOptions::default());
    let ctx = EvaluationContext::from_value(&context, 0).unwrap();
    let start = Instant::now();
    let r = compiled.evaluate("f", &ctx);
    let took = start.elapsed();
    println!(
        "{name}: {took:?} -> {} {}",
        r.reason.as_str(),
        r.error_details.unwrap_or_default()
    );
}

fn main() {
    let merge: Vec<Value> = (0..1_000).map(|_| json!({"var": "arr"})).collect();
    time_evaluation(
        "finding 2, some over 1,000 merged 100,000-element arrays",
        json!({"some": [{"merge": merge}, {"==": [{"var": ""}, 2]}]}),
        json!({"arr": vec![1; 100_000]}),
    );
    let parts: Vec<Value> = (0..1_000).map(|_| json!({"var": "s"})).collect();
    time_evaluation(
        "finding 2, cat of 1,000 copies of a 200 KB string",
        json!({"if": [{"cat": parts}, "on", "off"]}),
        json!({"s": "x".repeat(200 * 1024)}),
    );
    let mut terms = vec![json!({"var": "accumulator"})];
    terms.extend((1..2_000).map(|_| json!({"var": "current"})));
    time_evaluation(
        "finding 3, reduce over 100,000 elements with a 2,000-term body",
        json!({"if": [{">": [{"reduce": [{"var": "arr"}, {"+": terms}, 0]}, 0]}, "on", "off"]}),
        json!({"arr": vec![1; 100_000]}),
    );
    time_evaluation(
        "within budget: some over 100,000 elements",
        json!({"if": [{"some": [{"var": "arr"}, {"==": [{"var": ""}, 2]}]}, "on", "off"]}),
        json!({"arr": vec![1; 100_000]}),
    );

    let mut evaluators = serde_json::Map::new();
    evaluators.insert("e0".into(), json!({"==": [{"var": "x"}, 1]}));
    for i in 1..=13 {
        let prev = format!("e{}", i - 1);
        evaluators.insert(
            format!("e{i}"),
            json!({"and": [{"$ref": prev}, {"$ref": prev}]}),
        );
    }
    let mut flags = serde_json::Map::new();
    for i in 0..1_000 {
        flags.insert(
            format!("flag-{i}"),
            flag(json!({"if": [{"$ref": "e13"}, "on", "off"]})),
        );
    }
    let doc = json!({"flags": flags, "$evaluators": evaluators});
    println!("finding 4 upload: {} bytes of JSON", doc.to_string().len());
    let start = Instant::now();
    let refused = FlagSet::from_value(&doc).err().map(|p| p.0.len());
    println!(
        "finding 4, validating: {:?} ({refused:?} problems)",
        start.elapsed()
    );
    let set = FlagSet::from_value_unvalidated(&doc).unwrap();
    let start = Instant::now();
    let compiled = CompiledFlagSet::compile(&set, &CompileOptions::default());
    println!(
        "finding 4, compiling as stored: {:?} ({} of {} flags broken)",
        start.elapsed(),
        compiled.broken_flags().len(),
        compiled.len()
    );
}
