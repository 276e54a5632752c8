//! The rule compiler and evaluator: compiles a flag set from fuzzed JSON and evaluates every flag
//! with a fuzzed context.
//!
//! Input: `SET_OR_RULE \0 CONTEXT`. A JSON object with `flags` is a whole flag set (read for its
//! structure only, as the replica reads a merged document, so invalid rules reach the compiler
//! too); any other JSON is the targeting rule of one flag in a fixed set whose variants have
//! every type. CONTEXT is the OFREP context object.
//!
//! Must hold: no panic; compiling never fails; evaluation is deterministic and the owned and
//! borrowed entry points agree; an unknown key is FLAG_NOT_FOUND.
#![no_main]

use bunting_engine::{CompileOptions, CompiledFlagSet, ErrorCode, EvaluationContext};
use bunting_model::FlagSet;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// A fixed timestamp: `$flagd.timestamp` is an input like any other.
const NOW: i64 = 1_764_806_400;

fn flag_set(head: &[u8]) -> Option<FlagSet> {
    let value: Value = serde_json::from_slice(head).ok()?;
    let doc = if value.get("flags").is_some() {
        value
    } else {
        json!({
            "$evaluators": {"staff": {"ends_with": [{"var": "email"}, "@example.com"]}},
            "flags": {
                "fuzzed": {
                    "state": "ENABLED",
                    "variants": {"on": true, "off": false, "s": "text", "n": 7, "f": 0.5,
                                 "o": {"nested": [1, 2]}},
                    "defaultVariant": "off",
                    "targeting": value,
                },
                "other": {"state": "ENABLED", "variants": {"a": "a", "b": "b"},
                          "defaultVariant": "a",
                          "targeting": {"if": [{"$ref": "staff"}, "b", null]}},
            },
        })
    };
    FlagSet::from_value_unvalidated(&doc).ok()
}

fuzz_target!(|data: &[u8]| {
    let (head, tail) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Some(set) = flag_set(head) else {
        return;
    };
    let context = serde_json::from_slice::<Value>(tail).unwrap_or(Value::Null);
    let ctx = match EvaluationContext::from_value(&context, NOW) {
        Ok(ctx) => ctx,
        Err(_) => EvaluationContext::new(NOW),
    };
    let compiled = CompiledFlagSet::compile(&set, &CompileOptions::default());
    let keys: Vec<String> = compiled.keys().map(str::to_owned).collect();
    assert_eq!(keys.len(), compiled.len());
    for key in &keys {
        let first = compiled.evaluate(key, &ctx);
        let again = compiled.evaluate_ref(key, &ctx).into_owned();
        assert_eq!(first, again, "evaluating {key:?} twice gave two answers");
        let _ = first.to_ofrep_json(key);
        let _ = compiled.evaluate_boolean(key, &ctx);
        let _ = compiled.evaluate_string(key, &ctx);
        let _ = compiled.evaluate_integer(key, &ctx);
        let _ = compiled.evaluate_float(key, &ctx);
        let _ = compiled.evaluate_object(key, &ctx);
    }
    let all = compiled.evaluate_all_ref(&ctx);
    assert_eq!(
        all.len(),
        keys.len(),
        "bulk evaluation skipped or added flags"
    );
    let missing = compiled.evaluate("\u{0}no such flag", &ctx);
    assert_eq!(missing.error_code, Some(ErrorCode::FlagNotFound));
});
