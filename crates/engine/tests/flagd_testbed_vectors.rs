//! Conformance vectors from flagd's own evaluator test kit (open-feature/flagd-testbed,
//! `evaluator/gherkin/*.feature`): the expected resolutions were read from its scenarios and the
//! rules restated here, so Bunting is held to the answers every flagd provider must give.

// An integration test: failing loudly on a broken fixture is the point.
#![allow(clippy::unwrap_used)]

use bunting_engine::{
    CompileOptions, CompiledFlagSet, EvaluationContext, FractionalBucketing, Reason,
};
use bunting_model::FlagSet;
use serde_json::{json, Value};

fn suits(values: [&str; 4]) -> Value {
    json!({"clubs": values[0], "diamonds": values[1], "hearts": values[2], "spades": values[3], "wild": "wild"})
}

fn flag_set() -> FlagSet {
    let quarters = |bucket: Value| json!({"fractional": [bucket, ["clubs", 25], ["diamonds", 25], ["hearts", 25], ["spades", 25]]});
    let ace = suits([
        "ace-of-clubs",
        "ace-of-diamonds",
        "ace-of-hearts",
        "ace-of-spades",
    ]);
    let plain = suits(["clubs", "diamonds", "hearts", "spades"]);
    let tf = json!({"true": "true", "false": "false", "fallback": "fallback"});
    let mm = json!({"match": "match", "no-match": "no-match"});
    let semver_if = |op: &str, target: Value| json!({"if": [{"sem_ver": [{"var": "version"}, op, target]}, "match", "no-match"]});
    let flags = json!({
        "fractional-flag": {"state": "ENABLED", "variants": plain, "defaultVariant": "wild",
            "targeting": quarters(json!({"cat": [{"var": "$flagd.flagKey"}, {"var": "user.name"}]}))},
        "fractional-flag-shorthand": {"state": "ENABLED",
            "variants": {"heads": "heads", "tails": "tails", "draw": "draw"}, "defaultVariant": "draw",
            "targeting": {"fractional": [["heads"], ["tails", 1]]}},
        "fractional-flag-A-shared-seed": {"state": "ENABLED", "variants": plain, "defaultVariant": "wild",
            "targeting": quarters(json!({"cat": ["shared-seed", {"var": "user.name"}]}))},
        "fractional-flag-B-shared-seed": {"state": "ENABLED", "variants": ace, "defaultVariant": "wild",
            "targeting": quarters(json!({"cat": ["shared-seed", {"var": "user.name"}]}))},
        "fractional-hash-edge-flag": {"state": "ENABLED", "variants": {"lower": "lower", "upper": "upper"},
            "defaultVariant": "lower",
            "targeting": {"fractional": [{"var": "targetingKey"}, ["lower", 50], ["upper", 50]]}},
        "fractional-single-entry-flag": {"state": "ENABLED", "variants": {"single": "single", "fallback": "fallback"},
            "defaultVariant": "fallback", "targeting": {"fractional": [["single", 1]]}},
        "fractional-nested-if-flag": {"state": "ENABLED",
            "variants": {"premium": "premium", "standard": "standard", "fallback": "fallback"}, "defaultVariant": "fallback",
            "targeting": {"fractional": [{"var": "targetingKey"},
                [{"if": [{"==": [{"var": "tier"}, "premium"]}, "premium", "standard"]}, 50], ["standard", 50]]}},
        "fractional-nested-var-flag": {"state": "ENABLED",
            "variants": {"red": "red", "green": "green", "blue": "blue", "fallback": "fallback"}, "defaultVariant": "fallback",
            "targeting": {"fractional": [{"var": "targetingKey"}, [{"var": "color"}, 50], ["blue", 50]]}},
        "fractional-nested-weight-flag": {"state": "ENABLED",
            "variants": {"red": "red", "blue": "blue", "fallback": "fallback"}, "defaultVariant": "fallback",
            "targeting": {"fractional": [{"var": "targetingKey"},
                ["red", {"if": [{"==": [{"var": "tier"}, "premium"]}, 100, 0]}], ["blue", 10]]}},
        "fractional-as-condition-flag": {"state": "ENABLED",
            "variants": {"big": "hundreds", "small": "ones", "fallback": "zero"}, "defaultVariant": "fallback",
            "targeting": {"if": [{"fractional": [[false, 0], [true, 100]]}, "big", "small"]}},
        "fractional-as-condition-false-flag": {"state": "ENABLED",
            "variants": {"big": "hundreds", "small": "ones", "fallback": "zero"}, "defaultVariant": "fallback",
            "targeting": {"if": [{"fractional": [[false, 100], [true, 0]]}, "big", "small"]}},
        "fractional-null-bucket-key-flag": {"state": "ENABLED", "variants": {"one": "one", "two": "two", "fallback": "fallback"},
            "defaultVariant": "fallback", "targeting": {"fractional": [{"var": "missing_key"}, ["one", 50], ["two", 50]]}},
        "fractional-zero-weights-flag": {"state": "ENABLED", "variants": {"one": "one", "two": "two", "fallback": "fallback"},
            "defaultVariant": "fallback", "targeting": {"fractional": [{"var": "targetingKey"}, ["one", 0], ["two", 0]]}},
        "fractional-negative-weight-flag": {"state": "ENABLED", "variants": {"one": "one", "two": "two", "fallback": "fallback"},
            "defaultVariant": "fallback", "targeting": {"fractional": [{"var": "targetingKey"}, ["one", -50], ["two", 100]]}},
        "equal-greater-lesser-version-flag": {"state": "ENABLED",
            "variants": {"equal": "equal", "greater": "greater", "lesser": "lesser", "none": "none"}, "defaultVariant": "none",
            "targeting": {"if": [{"sem_ver": [{"var": "version"}, "=", "2.0.0"]}, "equal",
                {"if": [{"sem_ver": [{"var": "version"}, ">", "2.0.0"]}, "greater",
                    {"if": [{"sem_ver": [{"var": "version"}, "<", "2.0.0"]}, "lesser", "none"]}]}]}},
        "major-minor-version-flag": {"state": "ENABLED",
            "variants": {"minor": "minor", "major": "major", "none": "none"}, "defaultVariant": "none",
            "targeting": {"if": [{"sem_ver": [{"var": "version"}, "~", "3.0.0"]}, "minor",
                {"if": [{"sem_ver": [{"var": "version"}, "^", "3.0.0"]}, "major", "none"]}]}},
        "semver-invalid-version-flag": {"state": "ENABLED", "variants": tf, "defaultVariant": "fallback",
            "targeting": {"sem_ver": [{"var": "version"}, "=", "1.0.0"]}},
        "semver-invalid-operator-flag": {"state": "ENABLED", "variants": tf, "defaultVariant": "fallback",
            "targeting": {"sem_ver": [{"var": "version"}, "===", "1.0.0"]}},
        "semver-wrong-args-flag": {"state": "ENABLED", "variants": tf, "defaultVariant": "fallback",
            "targeting": {"sem_ver": [{"var": "version"}, "="]}},
        "semver-v-prefix-flag": {"state": "ENABLED", "variants": mm, "defaultVariant": "no-match",
            "targeting": semver_if("=", json!("v1.0.0"))},
        "semver-partial-version-flag": {"state": "ENABLED", "variants": mm, "defaultVariant": "no-match",
            "targeting": semver_if("^", json!("1"))},
        "semver-build-metadata-flag": {"state": "ENABLED", "variants": mm, "defaultVariant": "no-match",
            "targeting": semver_if("=", json!("1.0.0+build"))},
        "semver-numeric-context-flag": {"state": "ENABLED", "variants": mm, "defaultVariant": "no-match",
            "targeting": semver_if(">", json!("1.1"))},
        "starts-ends-flag": {"state": "ENABLED", "variants": {"prefix": "prefix", "postfix": "postfix", "none": "none"},
            "defaultVariant": "none",
            "targeting": {"if": [{"starts_with": [{"var": "id"}, "abc"]}, "prefix",
                {"if": [{"ends_with": [{"var": "id"}, "xyz"]}, "postfix", "none"]}]}},
        "starts-with-non-string-flag": {"state": "ENABLED", "variants": tf, "defaultVariant": "fallback",
            "targeting": {"starts_with": [{"var": "num"}, "abc"]}},
        "ends-with-non-string-flag": {"state": "ENABLED", "variants": tf, "defaultVariant": "fallback",
            "targeting": {"ends_with": [{"var": "num"}, "xyz"]}},
        "starts-with-wrong-args-flag": {"state": "ENABLED", "variants": tf, "defaultVariant": "fallback",
            "targeting": {"starts_with": ["abc"]}},
        "ends-with-wrong-args-flag": {"state": "ENABLED", "variants": tf, "defaultVariant": "fallback",
            "targeting": {"ends_with": ["xyz"]}}
    });
    FlagSet::from_value(&json!({ "flags": flags })).unwrap()
}

fn compiled(bucketing: FractionalBucketing) -> CompiledFlagSet {
    CompiledFlagSet::compile(
        &flag_set(),
        &CompileOptions {
            fractional: bucketing,
        },
    )
}

/// The served string value, or "fallback" for the caller's default (no value).
fn value(set: &CompiledFlagSet, key: &str, ctx: Value) -> String {
    let ctx = EvaluationContext::from_value(&ctx, 0).unwrap();
    let r = set.evaluate_string(key, &ctx);
    r.value.unwrap_or_else(|| "fallback".to_owned())
}

fn user(name: &str) -> Value {
    json!({"user": {"name": name}})
}

#[test]
fn fractional_v2_matches_the_testbed() {
    let set = compiled(FractionalBucketing::V2);
    for (name, want) in [
        ("jack", "hearts"),
        ("queen", "spades"),
        ("ten", "clubs"),
        ("nine", "diamonds"),
        ("3", "clubs"),
    ] {
        assert_eq!(value(&set, "fractional-flag", user(name)), want, "{name}");
    }
    for (tk, want) in [("jon@company.com", "heads"), ("jane@company.com", "tails")] {
        assert_eq!(
            value(
                &set,
                "fractional-flag-shorthand",
                json!({"targetingKey": tk})
            ),
            want
        );
    }
    for (name, a, b) in [
        ("seven", "hearts", "ace-of-hearts"),
        ("eight", "diamonds", "ace-of-diamonds"),
        ("nine", "clubs", "ace-of-clubs"),
        ("two", "spades", "ace-of-spades"),
    ] {
        assert_eq!(
            value(&set, "fractional-flag-A-shared-seed", user(name)),
            a,
            "{name}"
        );
        assert_eq!(
            value(&set, "fractional-flag-B-shared-seed", user(name)),
            b,
            "{name}"
        );
    }
    assert_eq!(
        value(
            &set,
            "fractional-single-entry-flag",
            json!({"targetingKey": "some-targeting-key"})
        ),
        "single"
    );
    // Keys whose murmur3 hashes sit at the bucket boundaries.
    for (key, want) in [
        ("ejOoVL", "lower"),
        ("bY9fO-", "lower"),
        ("SI7p-", "lower"),
        ("6LvT0", "upper"),
        ("ceQdGm", "upper"),
    ] {
        assert_eq!(
            value(
                &set,
                "fractional-hash-edge-flag",
                json!({"targetingKey": key})
            ),
            want,
            "{key}"
        );
    }
}

#[test]
fn fractional_v1_matches_the_testbed() {
    let set = compiled(FractionalBucketing::V1);
    for (name, want) in [
        ("jack", "spades"),
        ("queen", "clubs"),
        ("ten", "diamonds"),
        ("nine", "hearts"),
        ("3", "diamonds"),
    ] {
        assert_eq!(value(&set, "fractional-flag", user(name)), want, "{name}");
    }
    for (tk, want) in [("jon@company.com", "heads"), ("jane@company.com", "tails")] {
        assert_eq!(
            value(
                &set,
                "fractional-flag-shorthand",
                json!({"targetingKey": tk})
            ),
            want
        );
    }
    for (name, a, b) in [
        ("jack", "hearts", "ace-of-hearts"),
        ("queen", "spades", "ace-of-spades"),
        ("ten", "hearts", "ace-of-hearts"),
        ("nine", "diamonds", "ace-of-diamonds"),
    ] {
        assert_eq!(
            value(&set, "fractional-flag-A-shared-seed", user(name)),
            a,
            "{name}"
        );
        assert_eq!(
            value(&set, "fractional-flag-B-shared-seed", user(name)),
            b,
            "{name}"
        );
    }
}

#[test]
fn fractional_nested_rules_match_the_testbed() {
    let set = compiled(FractionalBucketing::V2);
    for (tk, tier, want) in [
        ("jon@company.com", "premium", "premium"),
        ("jon@company.com", "basic", "standard"),
        ("user1", "premium", "standard"),
        ("user1", "basic", "standard"),
    ] {
        let ctx = json!({"targetingKey": tk, "tier": tier});
        assert_eq!(
            value(&set, "fractional-nested-if-flag", ctx),
            want,
            "{tk} {tier}"
        );
    }
    for (tk, color, want) in [
        ("jon@company.com", "red", "red"),
        ("jon@company.com", "green", "green"),
        ("user1", "red", "blue"),
        ("jon@company.com", "yellow", "fallback"),
        ("jon@company.com", "", "fallback"),
    ] {
        let ctx = json!({"targetingKey": tk, "color": color});
        assert_eq!(
            value(&set, "fractional-nested-var-flag", ctx),
            want,
            "{tk} {color}"
        );
    }
    for (tk, tier, want) in [
        ("jon@company.com", "premium", "red"),
        ("jon@company.com", "basic", "blue"),
        ("user1", "premium", "red"),
        ("user1", "basic", "blue"),
    ] {
        let ctx = json!({"targetingKey": tk, "tier": tier});
        assert_eq!(
            value(&set, "fractional-nested-weight-flag", ctx),
            want,
            "{tk} {tier}"
        );
    }
    let tk = json!({"targetingKey": "some-targeting-key"});
    assert_eq!(
        value(&set, "fractional-as-condition-flag", tk.clone()),
        "hundreds"
    );
    assert_eq!(
        value(&set, "fractional-as-condition-false-flag", tk),
        "ones"
    );
}

#[test]
fn fractional_operator_errors_fall_back_to_the_default_variant() {
    let set = compiled(FractionalBucketing::V2);
    let ctx = |v: Value| EvaluationContext::from_value(&v, 0).unwrap();
    let r = set.evaluate("fractional-null-bucket-key-flag", &ctx(json!({})));
    assert_eq!(
        (r.variant.as_deref(), r.reason),
        (Some("fallback"), Reason::Default)
    );
    let r = set.evaluate(
        "fractional-zero-weights-flag",
        &ctx(json!({"targetingKey": "any-user"})),
    );
    assert_eq!(
        (r.variant.as_deref(), r.reason),
        (Some("fallback"), Reason::Default)
    );
    assert_eq!(
        value(
            &set,
            "fractional-negative-weight-flag",
            json!({"targetingKey": "any-user"})
        ),
        "two"
    );
}

#[test]
fn sem_ver_matches_the_testbed() {
    let set = compiled(FractionalBucketing::V2);
    let v = |key: &str, version: Value| value(&set, key, json!({ "version": version }));
    for (version, want) in [
        ("2.0.0", "equal"),
        ("2.1.0", "greater"),
        ("1.9.0", "lesser"),
        ("2.0.0-alpha", "lesser"),
        ("2.0.0.0", "none"),
    ] {
        assert_eq!(
            v("equal-greater-lesser-version-flag", json!(version)),
            want,
            "{version}"
        );
    }
    for (version, want) in [("3.0.1", "minor"), ("3.1.0", "major"), ("4.0.0", "none")] {
        assert_eq!(
            v("major-minor-version-flag", json!(version)),
            want,
            "{version}"
        );
    }
    for (version, want) in [
        ("1.0.0", "match"),
        ("v1.0.0", "match"),
        ("V1.0.0", "match"),
        ("2.0.0", "no-match"),
    ] {
        assert_eq!(v("semver-v-prefix-flag", json!(version)), want, "{version}");
    }
    for (version, want) in [
        (json!("1.5.0"), "match"),
        (json!("1.0.0"), "match"),
        (json!("1.0"), "match"),
        (json!("1"), "match"),
        (json!(1), "match"),
        (json!(1.0), "match"),
        (json!(1.2), "match"),
        (json!("2.0.0"), "no-match"),
    ] {
        assert_eq!(
            v("semver-partial-version-flag", version.clone()),
            want,
            "{version}"
        );
    }
    for (version, want) in [
        (json!(1.2), "match"),
        (json!(1.1), "no-match"),
        (json!(2), "match"),
        (json!(1), "no-match"),
        (json!("1.2"), "match"),
    ] {
        assert_eq!(
            v("semver-numeric-context-flag", version.clone()),
            want,
            "{version}"
        );
    }
    for (version, want) in [
        ("1.0.0", "match"),
        ("1.0.0+other", "match"),
        ("2.0.0", "no-match"),
    ] {
        assert_eq!(
            v("semver-build-metadata-flag", json!(version)),
            want,
            "{version}"
        );
    }
    let ctx = |v: &str| EvaluationContext::from_value(&json!({ "version": v }), 0).unwrap();
    for (key, version) in [
        ("semver-invalid-version-flag", "not-a-version"),
        ("semver-invalid-operator-flag", "1.0.0"),
        ("semver-wrong-args-flag", "1.0.0"),
    ] {
        let r = set.evaluate(key, &ctx(version));
        assert_eq!(
            (r.variant.as_deref(), r.reason),
            (Some("fallback"), Reason::Default),
            "{key}"
        );
    }
}

#[test]
fn string_operators_match_the_testbed() {
    let set = compiled(FractionalBucketing::V2);
    for (id, want) in [
        ("abcdef", "prefix"),
        ("uvwxyz", "postfix"),
        ("abcxyz", "prefix"),
        ("lmnopq", "none"),
    ] {
        assert_eq!(
            value(&set, "starts-ends-flag", json!({ "id": id })),
            want,
            "{id}"
        );
    }
    for key in ["starts-with-non-string-flag", "ends-with-non-string-flag"] {
        let ctx = EvaluationContext::from_value(&json!({"num": 123}), 0).unwrap();
        let r = set.evaluate(key, &ctx);
        assert_eq!(
            (r.variant.as_deref(), r.reason),
            (Some("fallback"), Reason::Default),
            "{key}"
        );
    }
    for key in ["starts-with-wrong-args-flag", "ends-with-wrong-args-flag"] {
        let r = set.evaluate(key, &EvaluationContext::new(0));
        assert_eq!(
            (r.variant.as_deref(), r.reason),
            (Some("fallback"), Reason::Default),
            "{key}"
        );
    }
}

#[test]
fn resolution_rules_match_the_testbed() {
    let doc = json!({"flags": {
        "null-default-flag": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": null},
        "undefined-default-flag": {"state": "ENABLED", "variants": {"small": 10, "big": 1000}},
        "no-default-flag-null-targeting-variant": {"state": "ENABLED",
            "variants": {"normal": "CFO", "special": "CEO"}, "defaultVariant": null,
            "targeting": {"if": [{"==": ["jobs@orange.com", {"var": ["email"]}]}, "special", null]}},
        "ref-to-nonexistent-evaluator-flag": {"state": "ENABLED", "variants": {"hi": "hi", "bye": "bye"},
            "defaultVariant": "bye", "targeting": {"if": [{"$ref": "does-not-exist"}, "hi", "bye"]}},
        "wrong-flag": {"state": "ENABLED", "variants": {"one": "uno", "two": "dos"}, "defaultVariant": "one"},
        "disabled-float-flag": {"state": "DISABLED", "variants": {"a": 1.5}, "defaultVariant": "a"}
    }});
    let set = FlagSet::from_value_unvalidated(&doc).unwrap();
    let set = CompiledFlagSet::compile(&set, &CompileOptions::default());
    let ctx = |v: Value| EvaluationContext::from_value(&v, 0).unwrap();
    let none = ctx(json!({}));
    let r = set.evaluate_boolean("null-default-flag", &none);
    assert_eq!((r.value, r.reason), (None, Reason::Default));
    let r = set.evaluate_integer("undefined-default-flag", &none);
    assert_eq!((r.value, r.reason), (None, Reason::Default));
    let woz = ctx(json!({"email": "wozniak@orange.com"}));
    let r = set.evaluate_string("no-default-flag-null-targeting-variant", &woz);
    assert_eq!((r.value, r.reason), (None, Reason::Default));
    let jobs = ctx(json!({"email": "jobs@orange.com"}));
    let r = set.evaluate_string("no-default-flag-null-targeting-variant", &jobs);
    assert_eq!(
        (r.value.as_deref(), r.reason),
        (Some("CEO"), Reason::TargetingMatch)
    );
    let r = set.evaluate_string("ref-to-nonexistent-evaluator-flag", &none);
    assert_eq!(
        (r.value, r.error_code),
        (None, Some(bunting_engine::ErrorCode::ParseError))
    );
    let r = set.evaluate_integer("wrong-flag", &none);
    assert_eq!(r.error_code, Some(bunting_engine::ErrorCode::TypeMismatch));
    let r = set.evaluate_string("missing-flag", &none);
    assert_eq!(r.error_code, Some(bunting_engine::ErrorCode::FlagNotFound));
    let r = set.evaluate_float("disabled-float-flag", &none);
    assert_eq!(
        (r.value, r.reason, r.error_code),
        (None, Reason::Disabled, None)
    );
}
