//! Parse → serialise → parse is exact, for the map and the array form, and for random documents.

use bunting_model::{DefaultVariant, FlagSet, FlagsForm};
use proptest::prelude::*;
use serde_json::{json, Value};

fn round_trip(doc: &Value) {
    let set = FlagSet::from_value(doc).expect("valid document");
    assert_eq!(&set.to_value(), doc, "serialised form differs from input");
    let again = FlagSet::from_value(&set.to_value()).expect("re-parse");
    assert_eq!(again, set);
}

#[test]
fn map_form_round_trips_exactly() {
    round_trip(&json!({
        "$schema": "https://flagd.dev/schema/v0/flags.json",
        "flags": {
            "b": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                  "targeting": {}},
            "a": {"state": "DISABLED", "variants": {"x": {"deep": [1, 2]}}, "defaultVariant": null,
                  "metadata": {"team": "web", "v": 2}, "x-custom": 1},
            "c": {"state": "ENABLED", "variants": {"one": 1, "half": 0.5}}
        },
        "$evaluators": {"emails": {"in": ["@x.com", {"var": "email"}]}},
        "metadata": {"flagSetId": "prod"},
        "x-extra": [1]
    }));
}

#[test]
fn array_form_round_trips_exactly() {
    let doc = json!({"flags": [
        {"key": "a", "state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"},
        {"key": "b", "state": "ENABLED", "variants": {"s": "x"}}
    ]});
    round_trip(&doc);
    let set = FlagSet::from_value(&doc).unwrap();
    assert_eq!(set.flags_form, FlagsForm::Array);
    assert_eq!(
        set.flags["a"].default_variant,
        DefaultVariant::Key("on".into())
    );
    assert_eq!(set.flags["b"].default_variant, DefaultVariant::Absent);
}

#[test]
fn duplicate_keys_in_array_form_are_reported() {
    let doc = json!({"flags": [
        {"key": "a", "state": "ENABLED", "variants": {"on": true}},
        {"key": "a", "state": "ENABLED", "variants": {"on": true}}
    ]});
    let err = FlagSet::from_value(&doc).unwrap_err();
    assert_eq!(err.0[0].pointer, "/flags/1/key");
}

#[test]
fn structural_problems_carry_paths() {
    let err =
        FlagSet::from_json_str(r#"{"flags": {"a": {"state": 3, "variants": []}}}"#).unwrap_err();
    let ptrs: Vec<_> = err.0.iter().map(|p| p.pointer.as_str()).collect();
    assert_eq!(ptrs, vec!["/flags/a/state", "/flags/a/variants"]);
    let err = FlagSet::from_json_str("[1]").unwrap_err();
    assert_eq!(err.0[0].pointer, "");
    let err = FlagSet::from_json_str("{\"flags\": ").unwrap_err();
    assert!(err.0[0].message.starts_with("invalid JSON"));
}

#[test]
fn oversized_and_overdeep_documents_are_refused() {
    let big = format!(
        "{{\"flags\":{{}},\"x\":\"{}\"}}",
        "a".repeat(bunting_model::limits::MAX_DOCUMENT_BYTES)
    );
    assert!(FlagSet::from_json_str(&big).unwrap_err().0[0]
        .message
        .contains("limit"));
    let deep = format!(
        "{{\"flags\":{{}},\"x\":{}{}}}",
        "[".repeat(100),
        "]".repeat(100)
    );
    assert!(FlagSet::from_json_str(&deep).unwrap_err().0[0]
        .message
        .contains("nesting"));
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|i| json!(i)),
        "[a-z]{0,6}".prop_map(Value::String),
    ]
}

prop_compose! {
    fn flag()(kind in 0..3u8, n in 1..4usize, state in any::<bool>(), with_default in 0..3u8,
               meta in proptest::collection::btree_map("[a-z]{1,4}", scalar(), 0..3))
               -> Value {
        let mut variants = serde_json::Map::new();
        for i in 0..n {
            let v = match kind { 0 => json!(i % 2 == 0), 1 => json!(format!("v{i}")), _ => json!(i) };
            variants.insert(format!("var{i}"), v);
        }
        let mut f = json!({"state": if state {"ENABLED"} else {"DISABLED"}, "variants": variants});
        match with_default { 0 => {}, 1 => { f["defaultVariant"] = Value::Null }, _ => { f["defaultVariant"] = json!("var0") } }
        if !meta.is_empty() { f["metadata"] = json!(meta); }
        f
    }
}

proptest! {
    #[test]
    fn random_valid_documents_round_trip(flags in proptest::collection::btree_map("[a-z][a-z0-9-]{0,8}", flag(), 0..6)) {
        let doc = json!({"flags": flags});
        let set = FlagSet::from_value(&doc).expect("generated documents are valid");
        prop_assert_eq!(set.to_value(), doc);
    }

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = FlagSet::from_json_str(&text);
    }
}
