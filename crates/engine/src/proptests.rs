//! Property tests: the compiled evaluator agrees with a direct interpretation of the same
//! JsonLogic, and no rule or context makes the engine panic.
//!
//! The reference interpreter below walks the rule's JSON on every call and reads `var` paths from
//! the whole data object flagd would build (`$flagd`, `targetingKey`, attributes), so it checks
//! what compiling does: `$flagd`/`targetingKey` shortcuts, pre-split paths, literal folding,
//! pre-parsed `sem_ver` literals, the constant `fractional` path and scoping in `map`/`reduce`.
//! It shares only the scalar coercions (ToNumber, String(), `==`, `<`), which have unit tests of
//! their own.

use std::io::Cursor;

use indexmap::IndexMap;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use crate::compiled::{CompileOptions, FractionalBucketing};
use crate::context::EvaluationContext;
use crate::rule::{Env, Rule};
use crate::semver::{version_text, SemverOp, Version};
use crate::val::{number_value, Val};
use crate::CompiledFlagSet;

const FLAG: &str = "flag";

thread_local! {
    /// Set when the reference met NaN or an infinity, which JSON (its value type) cannot hold.
    static NON_FINITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn num(f: f64) -> Value {
    if !f.is_finite() {
        NON_FINITE.with(|c| c.set(true));
    }
    number_value(f)
}
const TIMESTAMP: i64 = 1_700_000_000;

/// Direct interpretation of `rule` against `data` (the current scope); `root` is the whole data
/// object, which `fractional` reads its default bucketing key from.
fn reference(rule: &Value, data: &Value, root: &Value) -> Value {
    match rule {
        Value::Array(items) => {
            Value::Array(items.iter().map(|i| reference(i, data, root)).collect())
        }
        Value::Object(m) if m.len() == 1 => {
            let (op, raw) = m.iter().next().unwrap();
            let raw_args: Vec<Value> = match raw {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            let lazy = |i: usize| raw_args.get(i).cloned().unwrap_or(Value::Null);
            let ev = |i: usize| reference(&lazy(i), data, root);
            let all =
                || -> Vec<Value> { raw_args.iter().map(|a| reference(a, data, root)).collect() };
            let v = |x: &Value| Val::from_owned_json(x.clone());
            let b = Value::Bool;
            let n = num;
            match op.as_str() {
                "var" => {
                    let args = all();
                    let path = match args.first() {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => v(other).to_js_string(),
                    };
                    ref_lookup(data, &path)
                        .unwrap_or_else(|| args.get(1).cloned().unwrap_or(Value::Null))
                }
                "if" | "?:" => {
                    let mut i = 0;
                    while i + 1 < raw_args.len() {
                        if v(&ev(i)).truthy() {
                            return ev(i + 1);
                        }
                        i += 2;
                    }
                    if i < raw_args.len() {
                        ev(i)
                    } else {
                        Value::Null
                    }
                }
                "and" | "or" => {
                    let want = op == "or";
                    let mut last = Value::Null;
                    for i in 0..raw_args.len() {
                        last = ev(i);
                        if v(&last).truthy() == want {
                            return last;
                        }
                    }
                    last
                }
                "==" => b(v(&ev(0)).loose_eq(&v(&ev(1)))),
                "!=" => b(!v(&ev(0)).loose_eq(&v(&ev(1)))),
                "===" => b(v(&ev(0)).strict_eq(&v(&ev(1)))),
                "!==" => b(!v(&ev(0)).strict_eq(&v(&ev(1)))),
                "!" => b(!v(&ev(0)).truthy()),
                "!!" => b(v(&ev(0)).truthy()),
                "<" | "<=" | ">" | ">=" => {
                    let args = all();
                    if args.len() < 2 {
                        return b(false);
                    }
                    let lt = |x: &Value, y: &Value| v(x).less_than(&v(y));
                    let pair = |x: &Value, y: &Value| match op.as_str() {
                        "<" => lt(x, y) == Some(true),
                        "<=" => lt(y, x) == Some(false),
                        ">" => lt(y, x) == Some(true),
                        _ => lt(x, y) == Some(false),
                    };
                    if args.len() >= 3 && (op == "<" || op == "<=") {
                        b(pair(&args[0], &args[1]) && pair(&args[1], &args[2]))
                    } else {
                        b(pair(&args[0], &args[1]))
                    }
                }
                "+" => n(all().iter().map(|a| v(a).parse_float()).sum::<f64>() + 0.0),
                "*" => {
                    let args = all();
                    match args.len() {
                        0 => Value::Null,
                        1 => args[0].clone(),
                        _ => n(args[1..]
                            .iter()
                            .fold(v(&args[0]).parse_float(), |acc, a| acc * v(a).parse_float())),
                    }
                }
                "-" => {
                    let args = all();
                    match args.len() {
                        0 => num(f64::NAN),
                        1 => n(-v(&args[0]).to_number()),
                        _ => n(v(&args[0]).to_number() - v(&args[1]).to_number()),
                    }
                }
                "/" | "%" => {
                    let args = all();
                    let x = args.first().map_or(f64::NAN, |a| v(a).to_number());
                    let y = args.get(1).map_or(f64::NAN, |a| v(a).to_number());
                    n(if op == "/" { x / y } else { x % y })
                }
                "min" | "max" => {
                    let xs: Vec<f64> = all().iter().map(|a| v(a).to_number()).collect();
                    if xs.iter().any(|x| x.is_nan()) {
                        return num(f64::NAN);
                    }
                    let r = if op == "min" {
                        xs.iter().copied().fold(f64::INFINITY, f64::min)
                    } else {
                        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                    };
                    n(r)
                }
                "in" => {
                    let (needle, hay) = (ev(0), ev(1));
                    match &hay {
                        Value::String(s) if !s.is_empty() => {
                            b(s.contains(&v(&needle).to_js_string()))
                        }
                        Value::Array(items) => b(items.iter().any(|i| v(i).strict_eq(&v(&needle)))),
                        _ => b(false),
                    }
                }
                "cat" => Value::String(all().iter().map(|a| v(a).to_js_string()).collect()),
                "substr" => {
                    let args = all();
                    let s: Vec<char> = args
                        .first()
                        .map_or("null".into(), |a| v(a).to_js_string())
                        .chars()
                        .collect();
                    let len = s.len() as i64;
                    let start = args.get(1).map_or(0.0, |a| v(a).to_number());
                    let start = if start.is_nan() {
                        0
                    } else {
                        start.trunc().clamp(-1e12, 1e12) as i64
                    };
                    let from = if start < 0 {
                        (len + start).max(0)
                    } else {
                        start.min(len)
                    };
                    let take = match args.get(2) {
                        None => len - from,
                        Some(l) => {
                            let l = v(l).to_number();
                            let l = if l.is_nan() {
                                0
                            } else {
                                l.trunc().clamp(-1e12, 1e12) as i64
                            };
                            if l < 0 {
                                (len - from + l).max(0)
                            } else {
                                l.min(len - from)
                            }
                        }
                    };
                    Value::String(s[from as usize..(from + take) as usize].iter().collect())
                }
                "merge" => {
                    let mut out = Vec::new();
                    for a in all() {
                        match a {
                            Value::Array(items) => out.extend(items),
                            other => out.push(other),
                        }
                    }
                    Value::Array(out)
                }
                "missing" => Value::Array(ref_missing(&all(), data)),
                "missing_some" => {
                    let (need, options) = (ev(0), ev(1));
                    match &options {
                        Value::Array(items) => {
                            let missing = ref_missing(std::slice::from_ref(&options), data);
                            if (items.len() - missing.len()) as f64 >= v(&need).to_number() {
                                json!([])
                            } else {
                                Value::Array(missing)
                            }
                        }
                        other => Value::Array(ref_missing(std::slice::from_ref(other), data)),
                    }
                }
                "map" | "filter" | "all" | "none" | "some" => {
                    let items = match ev(0) {
                        Value::Array(items) => items,
                        _ => {
                            return match op.as_str() {
                                "map" | "filter" => json!([]),
                                "none" => b(true),
                                _ => b(false),
                            }
                        }
                    };
                    let logic = lazy(1);
                    let test = |i: &Value| v(&reference(&logic, i, root)).truthy();
                    match op.as_str() {
                        "map" => {
                            Value::Array(items.iter().map(|i| reference(&logic, i, root)).collect())
                        }
                        "filter" => Value::Array(items.into_iter().filter(|i| test(i)).collect()),
                        "all" => b(!items.is_empty() && items.iter().all(test)),
                        "none" => b(!items.iter().any(test)),
                        _ => b(items.iter().any(test)),
                    }
                }
                "reduce" => {
                    let initial = if raw_args.len() >= 3 {
                        ev(2)
                    } else {
                        Value::Null
                    };
                    let Value::Array(items) = ev(0) else {
                        return initial;
                    };
                    let logic = lazy(1);
                    items.into_iter().fold(initial, |acc, cur| {
                        reference(&logic, &json!({"current": cur, "accumulator": acc}), root)
                    })
                }
                "starts_with" | "ends_with" => {
                    let args = all();
                    match args.as_slice() {
                        [Value::String(a), Value::String(t)] => b(if op == "starts_with" {
                            a.starts_with(t.as_str())
                        } else {
                            a.ends_with(t.as_str())
                        }),
                        _ => Value::Null,
                    }
                }
                "sem_ver" => {
                    let args = all();
                    if args.len() != 3 {
                        return Value::Null;
                    }
                    let (a, t) = (v(&args[0]), v(&args[2]));
                    let (a, t) = (version_text(&a), version_text(&t));
                    let parsed = (
                        a.as_deref().and_then(Version::normalize_and_parse),
                        args[1].as_str().and_then(SemverOp::parse),
                        t.as_deref().and_then(Version::normalize_and_parse),
                    );
                    match parsed {
                        (Some(a), Some(o), Some(t)) => b(o.apply(&a, &t)),
                        _ => Value::Null,
                    }
                }
                "fractional" => ref_fractional(&all(), root),
                other => panic!("generator made unknown op {other}"),
            }
        }
        other => other.clone(),
    }
}

fn ref_lookup(data: &Value, path: &str) -> Option<Value> {
    if path.is_empty() {
        return Some(data.clone());
    }
    let mut cur = data;
    for seg in path.split('.') {
        cur = match cur {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => {
                let i: usize = seg.parse().ok()?;
                if seg.len() > 1 && seg.starts_with('0') {
                    return None;
                }
                a.get(i)?
            }
            _ => return None,
        };
    }
    Some(cur.clone())
}

fn ref_missing(args: &[Value], data: &Value) -> Vec<Value> {
    let keys: Vec<Value> = match args.first() {
        Some(Value::Array(items)) => items.clone(),
        _ => args.to_vec(),
    };
    keys.into_iter()
        .filter(|k| {
            let path = match k {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => Val::from_owned_json(other.clone()).to_js_string(),
            };
            matches!(ref_lookup(data, &path), None | Some(Value::Null))
                || ref_lookup(data, &path) == Some(json!(""))
        })
        .collect()
}

/// flagd's fractional, restated: bucketing key, distributions, v2 bucket.
fn ref_fractional(args: &[Value], root: &Value) -> Value {
    let Some(first) = args.first() else {
        return Value::Null;
    };
    let (key, rest) = match first {
        Value::String(s) => (Some(s.clone()), &args[1..]),
        other => {
            let rest = if other.is_null() { &args[1..] } else { args };
            let key = match root.get("targetingKey") {
                Some(Value::String(t)) if !t.is_empty() => Some(format!("{FLAG}{t}")),
                _ => None,
            };
            (key, rest)
        }
    };
    let Some(key) = key else {
        return Value::Null;
    };
    if rest.is_empty() {
        return Value::Null;
    }
    let mut dist = Vec::new();
    for d in rest {
        let Some(items) = d.as_array() else {
            return Value::Null;
        };
        let variant = match items.first() {
            Some(x @ (Value::String(_) | Value::Bool(_) | Value::Number(_) | Value::Null)) => {
                x.clone()
            }
            _ => return Value::Null,
        };
        let w: i64 = match items.get(1) {
            None | Some(Value::Null) => 1,
            Some(Value::Number(num)) => {
                let f = num.as_f64().unwrap();
                if f.fract() != 0.0 || f > f64::from(i32::MAX) {
                    return Value::Null;
                }
                (f as i64).max(0)
            }
            Some(_) => return Value::Null,
        };
        dist.push((variant, w as u64));
    }
    let total: u64 = dist.iter().map(|d| d.1).sum();
    if total > i32::MAX as u64 {
        return Value::Null;
    }
    if total == 0 {
        return Value::Null;
    }
    let hash = murmur3::murmur3_32(&mut Cursor::new(key.as_bytes()), 0).unwrap();
    let bucket = (u64::from(hash) * total) >> 32;
    let mut end = 0;
    for (variant, w) in dist {
        end += w;
        if bucket < end {
            return variant;
        }
    }
    Value::Null
}

fn compiled_eval(rule: &Value, ctx: &EvaluationContext) -> Value {
    let compiled = Rule::compile(rule, &IndexMap::new(), &CompileOptions::default()).unwrap();
    compiled.evaluate(&Env::new(FLAG, ctx)).to_value()
}

// ---- generators ----

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..12).prop_map(|n| json!(n)),
        prop_oneof![Just(0.5), Just(-1.5), Just(2.25)].prop_map(|f: f64| json!(f)),
        prop::sample::select(vec![
            "", "a", "b", "1", "10", "2", " 3 ", "x.y", "1.2.3", "v2.0", "ab"
        ])
        .prop_map(|s| json!(s)),
        prop::sample::select(vec![
            "a",
            "b",
            "b.c",
            "xs",
            "xs.0",
            "xs.1",
            "targetingKey",
            "$flagd.flagKey",
            "$flagd.timestamp",
            "$flagd",
            "",
            "current",
            "accumulator",
            "nope",
            "ver",
            "b.c.d",
        ])
        .prop_map(|p| json!({"var": p})),
        (prop::sample::select(vec!["a", "nope", "b.c"]), -2i64..3)
            .prop_map(|(p, d)| json!({"var": [p, d]})),
    ]
}

const OPS: &[&str] = &[
    "if",
    "?:",
    "==",
    "===",
    "!=",
    "!==",
    "!",
    "!!",
    "or",
    "and",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "*",
    "/",
    "%",
    "min",
    "max",
    "in",
    "cat",
    "substr",
    "merge",
    "missing",
    "missing_some",
    "starts_with",
    "ends_with",
    "var",
];

fn rule() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 48, 4, |inner| {
        prop_oneof![
            6 => (prop::sample::select(OPS), prop::collection::vec(inner.clone(), 0..4))
                .prop_map(|(op, args)| json!({ op: args })),
            1 => (prop::sample::select(OPS), inner.clone()).prop_map(|(op, arg)| json!({ op: arg })),
            1 => prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            2 => (
                prop::sample::select(vec!["map", "filter", "all", "none", "some"]),
                prop_oneof![Just(json!({"var": "xs"})), inner.clone()],
                inner.clone(),
            )
                .prop_map(|(op, data, logic)| json!({ op: [data, logic] })),
            1 => (prop_oneof![Just(json!({"var": "xs"})), inner.clone()], inner.clone(), inner.clone())
                .prop_map(|(data, logic, init)| json!({"reduce": [data, logic, init]})),
            2 => (
                prop_oneof![Just(None), Just(Some(json!({"var": "a"}))), Just(Some(json!("seed"))),
                    Just(Some(json!(null))), inner.clone().prop_map(Some)],
                prop::collection::vec(
                    (prop::sample::select(vec!["x", "y", "z"]),
                     prop_oneof![Just(None), (-5i64..40).prop_map(|w| Some(json!(w))), inner.clone().prop_map(Some)]),
                    1..4,
                ),
            )
                .prop_map(|(bucket, dist)| {
                    let mut args: Vec<Value> = bucket.into_iter().collect();
                    for (name, w) in dist {
                        args.push(match w {
                            None => json!([name]),
                            Some(w) => json!([name, w]),
                        });
                    }
                    json!({"fractional": args})
                }),
            1 => (
                prop_oneof![Just(json!({"var": "ver"})), inner.clone()],
                prop::sample::select(vec!["=", "!=", "<", "<=", ">", ">=", "^", "~", "=>"]),
                prop::sample::select(vec!["1.2.3", "v2", "1.2", "2.0.0-rc.1", "bad"]),
            )
                .prop_map(|(a, op, t)| json!({"sem_ver": [a, op, t]})),
        ]
    })
}

/// Conditions in the shapes compiled into specialised nodes (an attribute against a literal, in a
/// literal list, as a version), combined with `and`, `or` and `!`.
fn condition() -> impl Strategy<Value = Value> {
    let attr = prop::sample::select(vec!["a", "b", "ver", "xs", "nope", "targetingKey"]);
    let lit = leaf().prop_filter("a literal", |v| v.get("var").is_none());
    let cmp = prop::sample::select(vec!["==", "===", "!=", "!==", "<", "<=", ">", ">="]);
    let leaf_cond = prop_oneof![
        (attr.clone(), cmp, lit, any::<bool>()).prop_map(|(a, op, lit, var_first)| {
            if var_first {
                json!({ op: [{"var": a}, lit] })
            } else {
                json!({ op: [lit, {"var": a}] })
            }
        }),
        (
            attr.clone(),
            prop::collection::vec(
                prop::sample::select(vec!["", "a", "1", "x.y", "1.2.3", "v2.0", "ab"]),
                0..4
            )
        )
            .prop_map(|(a, list)| json!({"in": [{"var": a}, list]})),
        (
            attr,
            prop::sample::select(vec!["=", "!=", "<", "<=", ">", ">=", "^", "~", "=>"]),
            prop::sample::select(vec!["1.2.3", "v2", "1.2", "2.0.0-rc.1", "bad", "1.10.0"]),
        )
            .prop_map(|(a, op, t)| json!({"sem_ver": [{"var": a}, op, t]})),
    ];
    leaf_cond.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(|cs| json!({ "and": cs })),
            prop::collection::vec(inner.clone(), 0..3).prop_map(|cs| json!({ "or": cs })),
            inner.clone().prop_map(|c| json!({ "!": [c] })),
        ]
    })
}

/// Targeting rules in the shapes whose results are matched to variants when compiled: literals,
/// chained `if`s ending in literals or rules, constant `fractional`s; and any rule.
fn result_shape() -> impl Strategy<Value = Value> {
    let end = prop_oneof![leaf(), rule()];
    let dist = prop::collection::vec(
        (
            prop_oneof![
                leaf().prop_filter("a literal", |v| v.get("var").is_none()),
                Just(json!("z"))
            ],
            prop_oneof![Just(None), (-2i64..30).prop_map(|w| Some(json!(w)))],
        ),
        1..4,
    );
    prop_oneof![
        (rule(), end.clone(), end.clone()).prop_map(|(c, a, b)| json!({"if": [c, a, b]})),
        (rule(), end.clone(), rule(), end.clone())
            .prop_map(|(c, a, c2, b)| json!({"if": [c, a, c2, b]})),
        (rule(), end.clone(), rule(), end.clone(), end.clone())
            .prop_map(|(c, a, c2, b, e)| json!({"?:": [c, a, c2, b, e]})),
        (
            prop_oneof![
                Just(None),
                Just(Some(json!({"var": "a"}))),
                Just(Some(json!(null))),
                Just(Some(json!("seed")))
            ],
            dist,
        )
            .prop_map(|(bucket, dist)| {
                let mut args: Vec<Value> = bucket.into_iter().collect();
                for (name, w) in dist {
                    args.push(match w {
                        None => json!([name]),
                        Some(w) => json!([name, w]),
                    });
                }
                json!({"fractional": args})
            }),
        (rule(), end.clone())
            .prop_map(|(c, a)| json!({"if": [c, {"fractional": [[a, 1], ["y", 1]]}, "z"]})),
        end.prop_map(|e| json!({"if": [true, e]})),
    ]
}

fn context() -> impl Strategy<Value = Value> {
    (
        leaf(),
        prop_oneof![
            Just(json!({"c": 1})),
            Just(json!({"c": "1", "d": [true]})),
            Just(json!(5))
        ],
        prop::collection::vec(leaf(), 0..4),
        prop_oneof![
            Just(None),
            Just(Some("u1")),
            Just(Some("")),
            Just(Some("user-42"))
        ],
        prop::sample::select(vec!["1.2.3", "2.0.0", "1.10.0-beta", "v1", "junk"]),
    )
        .prop_map(|(a, b, xs, tk, ver)| {
            // Variables in the context are plain data, not logic.
            let a = if a.get("var").is_some() {
                json!("a-var")
            } else {
                a
            };
            let xs: Vec<Value> = xs
                .into_iter()
                .map(|x| if x.get("var").is_some() { json!(7) } else { x })
                .collect();
            let mut m = Map::new();
            m.insert("a".into(), a);
            m.insert("b".into(), b);
            m.insert("xs".into(), Value::Array(xs));
            m.insert("ver".into(), json!(ver));
            if let Some(tk) = tk {
                m.insert("targetingKey".into(), json!(tk));
            }
            Value::Object(m)
        })
}

/// Arbitrary JSON, including objects with any keys and deep nesting.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(8, 64, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    prop::sample::select(bunting_model::OPERATORS).prop_map(str::to_owned),
                    ".{0,4}"
                ],
                inner,
                0..3
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        // CI sets PROPTEST_CASES (scripts/test); 512 otherwise.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        max_global_rejects: 1_000_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn compiled_rules_agree_with_direct_interpretation(rule in rule(), data in context()) {
        let ctx = EvaluationContext::from_value(&data, TIMESTAMP).unwrap();
        let root = ctx.to_data(FLAG);
        NON_FINITE.with(|c| c.set(false));
        let want = reference(&rule, &root, &root);
        // NaN and infinities become null in the reference's JSON values mid-rule, where the
        // engine keeps them; such cases say nothing about compilation.
        prop_assume!(!NON_FINITE.with(|c| c.get()));
        let got = compiled_eval(&rule, &ctx);
        prop_assert_eq!(got, want, "rule {} data {}", rule, data);
    }

    #[test]
    fn no_rule_or_context_panics(rule in any_json(), data in any_json()) {
        let ctx = EvaluationContext::from_value(&data, TIMESTAMP)
            .unwrap_or_else(|_| EvaluationContext::new(TIMESTAMP));
        if let Ok(compiled) = Rule::compile(&rule, &IndexMap::new(), &CompileOptions::default()) {
            let _ = compiled.evaluate(&Env::new(FLAG, &ctx)).to_value();
        }
        let set_doc = json!({"flags": {"f": {"state": "ENABLED", "variants": {"a": 1, "b": 2},
            "defaultVariant": "a", "targeting": rule}}});
        if let Ok(set) = bunting_model::FlagSet::from_value_unvalidated(&set_doc) {
            let compiled = CompiledFlagSet::compile(&set, &CompileOptions {
                fractional: FractionalBucketing::V1,
            });
            let r = compiled.evaluate("f", &ctx);
            prop_assert!(r.is_error() == r.error_code.is_some());
        }
    }

    #[test]
    fn specialised_conditions_agree_with_direct_interpretation(
        cond in condition(),
        data in context(),
    ) {
        let ctx = EvaluationContext::from_value(&data, TIMESTAMP).unwrap();
        let root = ctx.to_data(FLAG);
        let rule = json!({"if": [cond, "yes", "no"]});
        let want = reference(&rule, &root, &root);
        prop_assert_eq!(compiled_eval(&rule, &ctx), want, "rule {} data {}", rule, data);
    }

    #[test]
    fn variants_found_at_compile_time_match_the_lookup_by_name(
        targeting in result_shape(),
        data in context(),
        v1 in any::<bool>(),
    ) {
        // Variant keys that the generator's literals name, and some they do not.
        let set_doc = json!({"flags": {"f": {"state": "ENABLED",
            "variants": {"x": 1, "y": 2, "z": 3, "true": 4, "false": 5, "1": 6, "a": 7, "": 8,
                         "10": 9, "2": 10, "0.5": 11},
            "defaultVariant": "x", "targeting": targeting}}});
        if let Ok(set) = bunting_model::FlagSet::from_value_unvalidated(&set_doc) {
            let options = CompileOptions {
                fractional: if v1 { FractionalBucketing::V1 } else { FractionalBucketing::V2 },
            };
            let compiled = CompiledFlagSet::compile(&set, &options);
            let ctx = EvaluationContext::from_value(&data, TIMESTAMP).unwrap();
            prop_assert_eq!(
                compiled.evaluate("f", &ctx),
                compiled.evaluate_by_name("f", &ctx),
                "targeting {} data {}", targeting, data
            );
        }
    }

    #[test]
    fn generated_rules_never_panic_through_the_public_api(rule in rule(), data in context()) {
        let set_doc = json!({"flags": {"f": {"state": "ENABLED",
            "variants": {"x": "X", "y": "Y", "z": "Z", "true": "T", "1": "one"},
            "defaultVariant": "x", "targeting": rule}}});
        // Targeting must be an object; other generated rules are refused by the model.
        if let Ok(set) = bunting_model::FlagSet::from_value_unvalidated(&set_doc) {
            let compiled = CompiledFlagSet::compile(&set, &CompileOptions::default());
            let ctx = EvaluationContext::from_value(&data, TIMESTAMP).unwrap();
            let r = compiled.evaluate("f", &ctx);
            prop_assert_eq!(r.value.is_some(), r.variant.is_some());
        }
    }
}

#[test]
fn deeply_nested_rules_are_refused_not_overflowed() {
    let mut rule = json!({"var": "x"});
    for _ in 0..200 {
        rule = json!({"!": [rule]});
    }
    assert!(Rule::compile(&rule, &IndexMap::new(), &CompileOptions::default()).is_err());
    let set = bunting_model::FlagSet {
        flags: [(
            "f".to_owned(),
            bunting_model::Flag {
                variants: [("a".to_owned(), json!(true))].into_iter().collect(),
                targeting: Some(rule),
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let compiled = CompiledFlagSet::compile(&set, &CompileOptions::default());
    assert_eq!(compiled.broken_flags().len(), 1);
    let r = compiled.evaluate("f", &EvaluationContext::new(0));
    assert_eq!(r.error_code, Some(crate::ErrorCode::ParseError));
}

#[test]
fn shared_refs_cannot_expand_exponentially() {
    let mut evaluators = IndexMap::new();
    evaluators.insert("e0".to_owned(), json!({"var": "x"}));
    for i in 1..30 {
        evaluators.insert(
            format!("e{i}"),
            json!({"and": [{"$ref": format!("e{}", i - 1)}, {"$ref": format!("e{}", i - 1)}]}),
        );
    }
    let err = Rule::compile(
        &json!({"$ref": "e29"}),
        &evaluators,
        &CompileOptions::default(),
    )
    .unwrap_err();
    assert!(err.contains("more than"), "{err}");
}
