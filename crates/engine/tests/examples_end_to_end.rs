//! The flag files under `examples/` compiled and evaluated through the public API, as the node
//! and the README's run command use them.

// An integration test: failing loudly on a broken fixture is the point.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use bunting_engine::{
    CompileOptions, CompiledFlagSet, ErrorCode, EvaluationContext, Reason, Resolution,
};
use bunting_model::FlagSet;
use serde_json::{json, Value};

fn load(name: &str) -> Value {
    let path = format!("{}/../../examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn flags() -> CompiledFlagSet {
    let set = FlagSet::from_value(&load("flags.json")).unwrap();
    CompiledFlagSet::compile(&set, &CompileOptions::default())
}

fn ctx(v: Value) -> EvaluationContext {
    EvaluationContext::from_value(&v, 1_700_000_000).unwrap()
}

fn at(v: Value, timestamp: i64) -> EvaluationContext {
    EvaluationContext::from_value(&v, timestamp).unwrap()
}

fn served(r: &Resolution) -> (Option<Value>, Option<&str>, Reason) {
    (
        r.value.as_ref().map(|v| v.value().clone()),
        r.variant.as_deref(),
        r.reason,
    )
}

/// flagd's v2 bucket, computed here independently of the engine.
fn expected_bucket(bucket_by: &str, weights: &[(&'static str, u64)]) -> &'static str {
    let hash = murmur3::murmur3_32(&mut Cursor::new(bucket_by.as_bytes()), 0).unwrap();
    let total: u64 = weights.iter().map(|w| w.1).sum();
    let bucket = (u64::from(hash) * total) >> 32;
    let mut end = 0;
    for (name, w) in weights {
        end += w;
        if bucket < end {
            return name;
        }
    }
    unreachable!()
}

#[test]
fn example_file_is_valid_and_has_no_broken_flags() {
    let compiled = flags();
    assert!(
        compiled.broken_flags().is_empty(),
        "{:?}",
        compiled.broken_flags()
    );
    assert_eq!(compiled.len(), 11);
}

#[test]
fn staff_see_the_welcome_banner_through_a_shared_evaluator() {
    let f = flags();
    let staff = f.evaluate(
        "new-welcome-banner",
        &ctx(json!({"targetingKey": "u1", "email": "ann@example.com"})),
    );
    assert_eq!(
        served(&staff),
        (Some(json!(true)), Some("on"), Reason::TargetingMatch)
    );
    assert_eq!(staff.metadata.get("owner"), Some(&json!("growth")));
    assert_eq!(
        staff.metadata.get("flagSetId"),
        Some(&json!("shop-production"))
    );
    let customer = f.evaluate(
        "new-welcome-banner",
        &ctx(json!({"targetingKey": "u2", "email": "bob@elsewhere.org"})),
    );
    assert_eq!(
        served(&customer),
        (Some(json!(false)), Some("off"), Reason::Default)
    );
}

#[test]
fn checkout_color_split_puts_users_where_flagd_would() {
    let f = flags();
    let weights = [("green", 50), ("blue", 25), ("orange", 25)];
    let mut counts = std::collections::HashMap::new();
    for i in 0..2000 {
        let user = format!("user-{i}");
        let r = f.evaluate(
            "checkout-button-color",
            &ctx(json!({ "targetingKey": user })),
        );
        let want = expected_bucket(&format!("checkout-button-color{user}"), &weights);
        assert_eq!(r.variant.as_deref(), Some(want), "{user}");
        assert_eq!(r.reason, Reason::TargetingMatch);
        *counts.entry(want).or_insert(0) += 1;
    }
    // Roughly 50/25/25 over 2000 users.
    assert!((900..1100).contains(&counts["green"]), "{counts:?}");
    assert!((400..600).contains(&counts["blue"]), "{counts:?}");
    // Without a targeting key the split answers null: the default variant.
    let anon = f.evaluate("checkout-button-color", &ctx(json!({})));
    assert_eq!(
        served(&anon),
        (Some(json!("#1B873F")), Some("green"), Reason::Default)
    );
}

#[test]
fn pricing_experiment_buckets_on_account_id_and_serves_objects() {
    let f = flags();
    let weights = [("control", 34), ("discount", 33), ("long-trial", 33)];
    for account in ["acct-1", "acct-2", "acct-3", "acct-4", "acct-5"] {
        let r = f.evaluate_object(
            "pricing-experiment",
            &ctx(json!({"targetingKey": "someone", "accountId": account})),
        );
        let want = expected_bucket(&format!("pricing-experiment{account}"), &weights);
        assert_eq!(r.variant.as_deref(), Some(want));
        let value = r.value.unwrap();
        assert!(value.value().get("monthly").is_some());
    }
}

#[test]
fn results_per_page_uses_a_three_condition_rule_and_a_ref() {
    let f = flags();
    let big = json!({"plan": "enterprise", "seats": 120, "country": "NZ"});
    let r = f.evaluate_integer("search-results-per-page", &ctx(big));
    assert_eq!((r.value, r.variant.as_deref()), (Some(50), Some("large")));
    let small_screen =
        json!({"plan": "enterprise", "seats": 50, "country": "NZ", "screen": {"width": 400}});
    let r = f.evaluate_integer("search-results-per-page", &ctx(small_screen));
    assert_eq!((r.value, r.variant.as_deref()), (Some(10), Some("small")));
    let r = f.evaluate_integer("search-results-per-page", &ctx(json!({})));
    assert_eq!((r.value, r.reason), (Some(25), Reason::Default));
}

#[test]
fn mobile_sync_follows_sem_ver_rules() {
    let f = flags();
    let cases = [
        (json!({"platform": "ios", "appVersion": "4.2.0"}), true),
        (json!({"platform": "ios", "appVersion": "v4.10.1"}), true),
        (json!({"platform": "ios", "appVersion": "4.1.9"}), false),
        (
            json!({"platform": "ios", "appVersion": "4.2.0-beta.1"}),
            false,
        ),
        (json!({"platform": "android", "appVersion": "5.9.0"}), true),
        (json!({"platform": "android", "appVersion": "6.0.0"}), false),
        (
            json!({"platform": "android", "appVersion": "garbage"}),
            false,
        ),
    ];
    for (c, want) in cases {
        let r = f.evaluate_boolean("mobile-offline-sync", &ctx(c.clone()));
        assert_eq!(r.value, Some(want), "{c}");
        assert_eq!(r.reason, Reason::TargetingMatch);
    }
}

#[test]
fn support_chat_nests_a_fractional_with_weights_from_expressions() {
    let f = flags();
    for i in 0..50 {
        let staff =
            json!({"locale": "en-GB", "email": "x@example.com", "accountId": format!("a{i}")});
        let r = f.evaluate_string("support-chat-provider", &ctx(staff));
        assert_eq!(
            r.value.as_deref(),
            Some("intercom"),
            "staff always get the new provider"
        );
    }
    let mut new = 0;
    for i in 0..1000 {
        let user = json!({"locale": "en-US", "email": "x@corp.io", "accountId": format!("a{i}")});
        let r = f.evaluate("support-chat-provider", &ctx(user));
        if r.variant.as_deref() == Some("new") {
            new += 1;
        }
    }
    assert!(
        (150..250).contains(&new),
        "about 20% get the new provider, got {new}"
    );
    let r = f.evaluate("support-chat-provider", &ctx(json!({"locale": "de-DE"})));
    assert_eq!(
        served(&r),
        (Some(json!("zendesk")), Some("legacy"), Reason::Default)
    );
}

#[test]
fn holiday_theme_reads_the_callers_timestamp() {
    let f = flags();
    let on = f.evaluate_boolean("holiday-theme", &at(json!({}), 1_796_100_000));
    let off = f.evaluate_boolean("holiday-theme", &at(json!({}), 1_700_000_000));
    assert_eq!((on.value, off.value), (Some(true), Some(false)));
}

#[test]
fn disabled_flags_resolve_with_reason_disabled_and_no_value() {
    let f = flags();
    let r = f.evaluate("legacy-reports", &ctx(json!({"targetingKey": "u"})));
    assert_eq!(served(&r), (None, None, Reason::Disabled));
    assert_eq!(r.error_code, None);
    let typed = f.evaluate_boolean("legacy-reports", &ctx(json!({})));
    assert_eq!((typed.value, typed.reason), (None, Reason::Disabled));
}

#[test]
fn static_and_default_less_flags() {
    let f = flags();
    let r = f.evaluate_string("static-motd", &ctx(json!({})));
    assert_eq!(
        (r.value.as_deref(), r.reason),
        (Some("Welcome back!"), Reason::Static)
    );
    let none = f.evaluate("no-default-experiment", &ctx(json!({})));
    assert_eq!(served(&none), (None, None, Reason::Default));
    let opted = f.evaluate("no-default-experiment", &ctx(json!({"betaOptIn": true})));
    assert_eq!(
        served(&opted),
        (Some(json!("beta")), Some("b"), Reason::TargetingMatch)
    );
}

#[test]
fn typed_accessors_report_type_mismatch() {
    let f = flags();
    let c = ctx(json!({}));
    let r = f.evaluate_boolean("static-motd", &c);
    assert_eq!(
        (r.reason, r.error_code),
        (Reason::Error, Some(ErrorCode::TypeMismatch))
    );
    assert_eq!(
        f.evaluate_string("max-upload-mb", &c).error_code,
        Some(ErrorCode::TypeMismatch)
    );
    let pro = ctx(json!({"plan": "enterprise"}));
    assert_eq!(f.evaluate_float("max-upload-mb", &pro).value, Some(2048.5));
    assert_eq!(
        f.evaluate_integer("max-upload-mb", &pro).error_code,
        Some(ErrorCode::TypeMismatch)
    );
    assert_eq!(f.evaluate_integer("max-upload-mb", &c).value, Some(25));
    assert_eq!(
        f.evaluate_object("static-motd", &c).error_code,
        Some(ErrorCode::TypeMismatch)
    );
    let missing = f.evaluate_boolean("nope", &c);
    assert_eq!(missing.error_code, Some(ErrorCode::FlagNotFound));
}

#[test]
fn bulk_evaluation_answers_every_flag_in_key_order() {
    let f = flags();
    let all = f.evaluate_all(&ctx(json!({"targetingKey": "u1"})));
    let keys: Vec<&str> = all.iter().map(|(k, _)| *k).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(keys, sorted);
    assert_eq!(keys.len(), 11);
    for (key, r) in &all {
        assert_eq!(
            r,
            &f.evaluate(key, &ctx(json!({"targetingKey": "u1"}))),
            "{key}"
        );
    }
}

#[test]
fn merged_invalid_flags_become_deterministic_errors_and_are_listed() {
    let set = FlagSet::from_value_unvalidated(&load("broken-flags.json")).unwrap();
    let f = CompiledFlagSet::compile(&set, &CompileOptions::default());
    let broken: Vec<&str> = f.broken_flags().iter().map(|b| b.key.as_str()).collect();
    assert_eq!(
        broken,
        vec![
            "cyclic-ref",
            "default-removed-concurrently",
            "killed-while-broken",
            "mixed-types",
            "typo-in-operator"
        ]
    );
    let c = ctx(json!({"plan": "pro"}));
    let healthy = f.evaluate("healthy", &c);
    assert_eq!(healthy.reason, Reason::Static);
    let r = f.evaluate("default-removed-concurrently", &c);
    assert_eq!(r.error_code, Some(ErrorCode::General));
    assert!(r
        .error_details
        .as_deref()
        .unwrap()
        .contains("/flags/default-removed-concurrently/defaultVariant"));
    let r = f.evaluate("typo-in-operator", &c);
    assert_eq!(r.error_code, Some(ErrorCode::ParseError));
    assert!(r.error_details.as_deref().unwrap().contains("start_with"));
    assert_eq!(
        f.evaluate("cyclic-ref", &c).error_code,
        Some(ErrorCode::ParseError)
    );
    // A kill switch holds even on a flag a concurrent edit broke.
    let killed = f.evaluate("killed-while-broken", &c);
    assert_eq!((killed.reason, killed.error_code), (Reason::Disabled, None));
    let r = f.evaluate("targets-unknown-variant", &c);
    assert_eq!(
        (r.reason, r.error_code),
        (Reason::Error, Some(ErrorCode::General))
    );
    assert!(r.error_details.as_deref().unwrap().contains("maybe"));
    // Deterministic: a second compile of the same document answers identically.
    let again = CompiledFlagSet::compile(&set, &CompileOptions::default());
    assert_eq!(again.evaluate_all(&c), f.evaluate_all(&c));
}

#[test]
fn compiled_flag_set_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CompiledFlagSet>();
    assert_send_sync::<Resolution>();
}

#[test]
fn ofrep_json_shapes() {
    let f = flags();
    let ok = f
        .evaluate("static-motd", &ctx(json!({})))
        .to_ofrep_json("static-motd");
    assert_eq!(ok["value"], json!("Welcome back!"));
    assert_eq!(ok["reason"], json!("STATIC"));
    assert!(ok.get("errorCode").is_none());
    let err = f.evaluate("nope", &ctx(json!({}))).to_ofrep_json("nope");
    assert_eq!(err["errorCode"], json!("FLAG_NOT_FOUND"));
    assert!(err.get("value").is_none());
}
