//! Issue 12, findings 2, 3 and 4, through HTTP against a real node: rules whose evaluation could
//! exhaust a node are refused when written, an evaluation that runs out of budget is an ERROR
//! for that request only, and `$ref` expansion is bounded per flag set.

#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

mod common;

use common::{TestNode, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};

fn flag(targeting: Value) -> Value {
    json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
           "targeting": targeting})
}

/// Finding 2: `some` over 1,000 merged copies of a context array.
fn merge_some() -> Value {
    let merge: Vec<Value> = (0..1_000).map(|_| json!({"var": "arr"})).collect();
    json!({"some": [{"merge": merge}, {"==": [{"var": ""}, 2]}]})
}

/// Finding 2, the `cat` variant: 1,000 copies of a context string.
fn cat_copies() -> Value {
    let parts: Vec<Value> = (0..1_000).map(|_| json!({"var": "s"})).collect();
    json!({"if": [{"cat": parts}, "on", "off"]})
}

/// Finding 3: a reduce whose body has 2,000 terms.
fn big_reduce() -> Value {
    let mut terms = vec![json!({"var": "accumulator"})];
    terms.extend((1..2_000).map(|_| json!({"var": "current"})));
    json!({"if": [{">": [{"reduce": [{"var": "arr"}, {"+": terms}, 0]}, 0]}, "on", "off"]})
}

fn mentions(body: &Value, what: &str) -> bool {
    body.to_string().contains(what)
}

#[tokio::test]
async fn hostile_rules_are_refused_and_a_hostile_context_gets_an_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    // An operator may accept contexts larger than the 256 KiB rules are checked against; the
    // evaluation budget still holds for them.
    config.limits.max_evaluation_body_bytes = 4 * 1024 * 1024;
    let node = TestNode::start(config).await;
    let (_, sdk) = node.token(&["evaluate"], &["default"]).await;

    for (key, rule, at) in [
        (
            "merge-some",
            merge_some(),
            "/flags/merge-some/targeting/some/0/merge",
        ),
        (
            "cat-copies",
            cat_copies(),
            "/flags/cat-copies/targeting/if/0/cat",
        ),
        (
            "big-reduce",
            big_reduce(),
            "/flags/big-reduce/targeting/if/0/>/0/reduce",
        ),
    ] {
        let (s, b) = node
            .call(
                Method::PUT,
                &format!("/api/v1/flagsets/default/flags/{key}"),
                Some(ADMIN),
                Some(flag(rule)),
            )
            .await;
        assert_eq!(s, 400, "{key}: {b}");
        assert!(mentions(&b, at), "{key}: {b}");
        assert!(mentions(&b, "MAX_EVALUATION_"), "{key}: {b}");
    }

    // One pass over a context array is fine, with the finding's own 200 KB context.
    let rule = json!({"if": [{"some": [{"var": "arr"}, {"==": [{"var": ""}, 2]}]}, "on", "off"]});
    let (s, b) = node
        .call(
            Method::PUT,
            "/api/v1/flagsets/default/flags/some-arr",
            Some(ADMIN),
            Some(flag(rule)),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let mut arr = vec![1; 100_000];
    arr[99_999] = 2;
    let (s, b) = node.evaluate("some-arr", &sdk, json!({ "arr": arr })).await;
    assert_eq!((s, b["variant"].clone()), (200, json!("on")), "{b}");

    // The same rule over a context larger than it was checked for: an error for this request.
    let (s, b) = node
        .evaluate("some-arr", &sdk, json!({"arr": vec![1; 1_000_000]}))
        .await;
    assert_eq!((s, b["errorCode"].clone()), (400, json!("GENERAL")), "{b}");
    let details = b["errorDetails"].as_str().unwrap();
    assert!(details.contains("exceeded its budget"), "{details}");
    assert!(
        details.contains("/flags/some-arr/targeting/if/0/some"),
        "{details}"
    );

    // The node is up and answers everyone else.
    let r = node
        .http
        .get(format!("{}/healthz", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, b) = node.evaluate("button-color", &sdk, json!({})).await;
    assert_eq!((s, b["value"].clone()), (200, json!("#1B873F")), "{b}");
}

/// Finding 4: 1,000 flags each using an evaluator that doubles 13 times (~57,000 nodes).
fn doubling_upload() -> Value {
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
    json!({"flags": flags, "$evaluators": evaluators})
}

#[tokio::test]
async fn an_upload_that_expands_past_the_flag_set_limit_is_refused_and_other_sets_still_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.limits.max_admin_body_bytes = 4 * 1024 * 1024;
    let node = TestNode::start(config).await;
    let (s, b) = node
        .call(
            Method::POST,
            "/api/v1/flagsets",
            Some(ADMIN),
            Some(json!({"name": "big"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");

    let (s, b) = node
        .call(
            Method::PUT,
            "/api/v1/flagsets/big",
            Some(ADMIN),
            Some(doubling_upload()),
        )
        .await;
    assert!((400..500).contains(&s), "{s}: {b}");
    assert!(mentions(&b, "MAX_EXPANDED_SET_NODES"), "{b}");

    // Nothing of it was stored, and writes to this and other flag sets go on.
    let (stored, _) = node.stored("big").await;
    let stored: Value = serde_json::from_str(&stored).unwrap();
    assert!(
        stored["flags"].as_object().is_none_or(|f| f.is_empty()),
        "{stored}"
    );
    let (s, b) = node
        .call(
            Method::PUT,
            "/api/v1/flagsets/default/flags/after-big",
            Some(ADMIN),
            Some(flag(
                json!({"if": [{"==": [{"var": "x"}, 1]}, "on", "off"]}),
            )),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = node
        .call(
            Method::PUT,
            "/api/v1/flagsets/big/flags/small",
            Some(ADMIN),
            Some(flag(
                json!({"if": [{"==": [{"var": "x"}, 1]}, "on", "off"]}),
            )),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = node.evaluate("after-big", ADMIN, json!({"x": 1})).await;
    assert_eq!((s, b["variant"].clone()), (200, json!("on")), "{b}");
}
