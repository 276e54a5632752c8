//! Evaluation benchmarks, with baselines measured in the same run: the same JsonLogic rules
//! through datalogic-rs (with its flagd operators), and equivalent Unleash strategies (a
//! constraint set, a gradual rollout, a semver constraint) through unleash-yggdrasil.
//! One criterion group per scenario, so the engines being compared run back to back.
//!
//! Like for like: every engine gets the request's context already in its own form, built once
//! outside the timed loop (Bunting's `EvaluationContext`, datalogic's `ParsedData` with flagd's
//! `$flagd` enrichment, yggdrasil's `Context`), and per iteration finds the flag by its key and
//! answers it. For datalogic, which evaluates rules and knows nothing of flags, the `datalogic`
//! rows do what a flag server built on it must do besides the rule: find the flag by key (the
//! same fixed-seed hash map Bunting uses), evaluate its rule, and map the result to the variant's
//! value (or the default variant on null). The `datalogic_rule_only` rows time the rule alone.
//!
//! `cargo bench -p bunting-engine`

// A benchmark: a broken fixture should stop it loudly.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::hint::black_box;

use bunting_engine::{CompileOptions, CompiledFlagSet, EvaluationContext};
use bunting_model::FlagSet;
use criterion::{criterion_group, criterion_main, Criterion};
use foldhash::fast::FixedState;
use serde_json::{json, Value};

mod fixtures;
use fixtures::{context_json, datalogic_data, DlFlag, FRACTIONAL, SEMVER, TARGETING};

fn rule(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// The four single flags and 100 bulk flags; only the bulk flags when `bulk_only`.
fn flag_set(bulk_only: bool) -> CompiledFlagSet {
    let bool_variants = json!({"on": true, "off": false});
    let mut flags = serde_json::Map::new();
    flags.insert(
        "static".into(),
        json!({"state": "ENABLED", "variants": bool_variants, "defaultVariant": "on"}),
    );
    flags.insert("targeting".into(), json!({"state": "ENABLED", "variants": bool_variants, "defaultVariant": "off", "targeting": rule(TARGETING)}));
    flags.insert("fractional".into(), json!({"state": "ENABLED", "variants": {"a": "A", "b": "B", "c": "C"}, "defaultVariant": "a", "targeting": rule(FRACTIONAL)}));
    flags.insert("semver".into(), json!({"state": "ENABLED", "variants": bool_variants, "defaultVariant": "off", "targeting": rule(SEMVER)}));
    if bulk_only {
        flags.clear();
    }
    // 100 more for bulk evaluation: a quarter of each kind.
    for i in 0..100 {
        let (kind, flag) = match i % 4 {
            0 => (
                "static",
                json!({"state": "ENABLED", "variants": bool_variants, "defaultVariant": "on"}),
            ),
            1 => (
                "targeting",
                json!({"state": "ENABLED", "variants": bool_variants, "defaultVariant": "off", "targeting": rule(TARGETING)}),
            ),
            2 => (
                "fractional",
                json!({"state": "ENABLED", "variants": {"a": "A", "b": "B", "c": "C"}, "defaultVariant": "a", "targeting": rule(FRACTIONAL)}),
            ),
            _ => (
                "semver",
                json!({"state": "ENABLED", "variants": bool_variants, "defaultVariant": "off", "targeting": rule(SEMVER)}),
            ),
        };
        flags.insert(format!("bulk-{kind}-{i:03}"), flag);
    }
    let set = FlagSet::from_value(&json!({ "flags": flags })).unwrap_or_default();
    let compiled = CompiledFlagSet::compile(&set, &CompileOptions::default());
    assert!(compiled.broken_flags().is_empty());
    compiled
}

struct Datalogic {
    engine: datalogic_rs::Engine,
    data: datalogic_rs::ParsedData,
    rules: Vec<datalogic_rs::Logic>,
    /// The same flags as Bunting's set, by key.
    flags: HashMap<String, DlFlag, FixedState>,
    /// The 100 bulk flags, in key order.
    bulk: Vec<(String, DlFlag)>,
}

fn datalogic_setup() -> Datalogic {
    let engine = datalogic_rs::Engine::new();
    let data = datalogic_data("fractional");
    let rules: Vec<_> = [TARGETING, FRACTIONAL, SEMVER]
        .iter()
        .map(|r| engine.compile(*r).unwrap())
        .collect();
    {
        let mut session = engine.session();
        for (rule, want) in rules.iter().zip([Some("on"), None, Some("on")]) {
            let out = session
                .eval_borrowed(rule, &data)
                .map(|v| v.as_str().map(str::to_owned));
            let out = out.ok().flatten();
            assert!(out.is_some(), "datalogic answered null");
            if let Some(w) = want {
                assert_eq!(out.as_deref(), Some(w));
            }
            session.reset();
        }
    }
    let mut flags = HashMap::with_hasher(FixedState::default());
    for (kind, key) in ["static", "targeting", "fractional", "semver"]
        .iter()
        .enumerate()
    {
        flags.insert((*key).to_owned(), DlFlag::new(&engine, key, kind));
    }
    let kinds = ["static", "targeting", "fractional", "semver"];
    let mut bulk: Vec<(String, DlFlag)> = (0..100)
        .map(|i| {
            let key = format!("bulk-{}-{i:03}", kinds[i % 4]);
            let flag = DlFlag::new(&engine, &key, i % 4);
            (key, flag)
        })
        .collect();
    bulk.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, _) in &bulk {
        let kind = kinds.iter().position(|k| key.contains(k)).unwrap();
        flags.insert(key.clone(), DlFlag::new(&engine, key, kind));
    }
    Datalogic {
        engine,
        data,
        rules,
        flags,
        bulk,
    }
}

fn yggdrasil_setup() -> (
    unleash_yggdrasil::EngineState,
    unleash_yggdrasil::Context,
    Vec<String>,
) {
    use unleash_yggdrasil::{ClientFeatures, Context, EngineState, UpdateMessage};
    let constraint = json!({"name": "default", "parameters": {}, "constraints": [
        {"contextName": "plan", "operator": "IN", "values": ["enterprise"]},
        {"contextName": "seats", "operator": "NUM_GTE", "value": "100"},
        {"contextName": "country", "operator": "IN", "values": ["NZ", "IE", "PT"]}
    ]});
    let rollout = json!({"name": "flexibleRollout",
        "parameters": {"rollout": "50", "stickiness": "userId", "groupId": "rollout"}, "constraints": []});
    let semver = json!({"name": "default", "parameters": {}, "constraints": [
        {"contextName": "appVersion", "operator": "SEMVER_GT", "value": "4.1.999"}
    ]});
    let mut features = vec![
        json!({"name": "constraints", "enabled": true, "strategies": [constraint]}),
        json!({"name": "rollout", "enabled": true, "strategies": [rollout]}),
        json!({"name": "semver", "enabled": true, "strategies": [semver]}),
    ];
    let mut bulk_names = Vec::new();
    for i in 0..100 {
        let name = format!("bulk-{i:03}");
        let strategies = match i % 4 {
            0 => json!([{"name": "default", "parameters": {}}]),
            1 => json!([constraint]),
            2 => json!([rollout]),
            _ => json!([semver]),
        };
        features.push(json!({"name": name, "enabled": true, "strategies": strategies}));
        bulk_names.push(name);
    }
    let client_features: ClientFeatures =
        serde_json::from_value(json!({"version": 2, "features": features})).unwrap();
    let engine = EngineState::default();
    let warnings = engine.take_state(UpdateMessage::FullResponse(client_features));
    assert!(warnings.unwrap_or_default().is_empty());
    let ctx: Context = serde_json::from_value(json!({"userId": "user-12345",
        "properties": {"plan": "enterprise", "seats": "150", "country": "PT", "appVersion": "4.10.2"}}))
    .unwrap();
    assert!(engine.is_enabled("constraints", &ctx, &None));
    assert!(engine.is_enabled("semver", &ctx, &None));
    (engine, ctx, bulk_names)
}

fn scenarios(c: &mut Criterion) {
    let set = flag_set(false);
    let bulk_set = flag_set(true);
    assert_eq!(bulk_set.len(), 100);
    let ctx = EvaluationContext::from_value(&context_json(), 1_700_000_000).unwrap_or_default();
    // The benchmarks must measure real matches, not errors or defaults.
    for (key, variant) in [("static", "on"), ("targeting", "on"), ("semver", "on")] {
        assert_eq!(
            set.evaluate(key, &ctx).variant.as_deref(),
            Some(variant),
            "{key}"
        );
    }
    assert!(set.evaluate("fractional", &ctx).variant.is_some());
    let bulk: Vec<String> = bulk_set.keys().map(str::to_owned).collect();
    let dl = datalogic_setup();
    let mut session = dl.engine.session();
    // Both engines give the same answers.
    for key in ["static", "targeting", "fractional", "semver"]
        .into_iter()
        .chain(bulk.iter().map(String::as_str))
    {
        let want = set.evaluate(key, &ctx).value.map(|v| v.value().clone());
        let got = dl.flags[key].resolve(&mut session).cloned();
        assert_eq!(got, want, "{key}");
    }
    let (ygg, ygg_ctx, ygg_bulk) = yggdrasil_setup();

    // Bunting's rows use evaluate_ref, the serving path (the resolution is borrowed from the
    // compiled set); `_owned` rows use evaluate (three reference counts more).
    let mut g = c.benchmark_group("static");
    g.bench_function("bunting", |b| {
        b.iter(|| {
            set.evaluate_ref(black_box("static"), black_box(&ctx))
                .reason
        })
    });
    g.bench_function("bunting_owned", |b| {
        b.iter(|| set.evaluate(black_box("static"), black_box(&ctx)))
    });
    g.bench_function("datalogic", |b| {
        b.iter(|| {
            dl.flags
                .get(black_box("static"))
                .and_then(|f| f.resolve(&mut session))
                .is_some()
        })
    });
    g.finish();

    let single = [
        ("targeting_3_conditions", "targeting", 0, "constraints"),
        ("fractional", "fractional", 1, "rollout"),
        ("sem_ver", "semver", 2, "semver"),
    ];
    for (group, key, dl_rule, ygg_flag) in single {
        let mut g = c.benchmark_group(group);
        g.bench_function("bunting", |b| {
            b.iter(|| set.evaluate_ref(black_box(key), black_box(&ctx)).reason)
        });
        g.bench_function("bunting_owned", |b| {
            b.iter(|| set.evaluate(black_box(key), black_box(&ctx)))
        });
        g.bench_function("datalogic", |b| {
            b.iter(|| {
                dl.flags
                    .get(black_box(key))
                    .and_then(|f| f.resolve(&mut session))
                    .is_some()
            })
        });
        g.bench_function("datalogic_rule_only", |b| {
            b.iter(|| {
                let r = session
                    .eval_borrowed(black_box(&dl.rules[dl_rule]), black_box(&dl.data))
                    .is_ok();
                session.reset();
                r
            })
        });
        g.bench_function("yggdrasil", |b| {
            b.iter(|| ygg.is_enabled(black_box(ygg_flag), black_box(&ygg_ctx), &None))
        });
        g.finish();
    }

    // 100 flags, 25 of each kind. `bunting`/`datalogic`: every flag of a 100-flag set, in key
    // order, collected (OFREP bulk evaluation); `_by_key` rows: the 100 flags found by key.
    let mut g = c.benchmark_group("bulk_100_flags");
    g.bench_function("bunting", |b| {
        b.iter(|| bulk_set.evaluate_all_ref(black_box(&ctx)))
    });
    g.bench_function("bunting_owned", |b| {
        b.iter(|| bulk_set.evaluate_all(black_box(&ctx)))
    });
    g.bench_function("datalogic", |b| {
        b.iter(|| {
            dl.bulk
                .iter()
                .map(|(k, f)| (k.as_str(), f.resolve(&mut session)))
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("bunting_by_key", |b| {
        b.iter(|| {
            bulk.iter()
                .filter(|k| {
                    set.evaluate_ref(black_box(k), black_box(&ctx))
                        .variant
                        .is_some()
                })
                .count()
        })
    });
    g.bench_function("datalogic_by_key", |b| {
        b.iter(|| {
            bulk.iter()
                .filter(|k| {
                    dl.flags
                        .get(black_box(k.as_str()))
                        .and_then(|f| f.resolve(&mut session))
                        .is_some()
                })
                .count()
        })
    });
    // The 75 rules alone, no flags.
    let dl_rules: Vec<_> = (0..100)
        .filter(|i| i % 4 != 0)
        .map(|i| &dl.rules[(i % 4) - 1])
        .collect();
    g.bench_function("datalogic_rules_only", |b| {
        b.iter(|| {
            let mut n = 0;
            for rule in &dl_rules {
                n += usize::from(
                    session
                        .eval_borrowed(black_box(rule), black_box(&dl.data))
                        .is_ok(),
                );
                session.reset();
            }
            n
        })
    });
    g.bench_function("yggdrasil", |b| {
        b.iter(|| {
            ygg_bulk
                .iter()
                .filter(|n| ygg.is_enabled(black_box(n), black_box(&ygg_ctx), &None))
                .count()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = scenarios
}
criterion_main!(benches);
