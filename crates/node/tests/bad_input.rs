//! Hostile and mistaken input: each request gets the right status and a body that names what was
//! wrong, and the stored flag set is byte-identical afterwards.

#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

mod common;

use common::{TestNode, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};

fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

fn deep_rule(depth: usize) -> Value {
    let mut v = json!({"var": "x"});
    for _ in 0..depth {
        v = json!({"!": v});
    }
    v
}

struct Case {
    name: &'static str,
    method: Method,
    path: String,
    token: Option<String>,
    body: Option<Vec<u8>>,
    status: u16,
    /// Every string here must appear in the response body.
    mentions: Vec<String>,
}

fn case(
    name: &'static str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
    status: u16,
    mentions: &[&str],
) -> Case {
    Case {
        name,
        method,
        path: path.into(),
        token: token.map(str::to_owned),
        body: body.map(|b| serde_json::to_vec(&b).unwrap()),
        status,
        mentions: mentions.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn every_bad_request_is_refused_by_name_and_changes_nothing_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.limits.max_admin_body_bytes = 2 * 1024 * 1024;
    config.limits.requests_per_second_per_token = 1;
    config.limits.burst_per_token = 40;
    let node = TestNode::start(config).await;
    let (_, reader) = node.token(&["read"], &["default"]).await;
    let (_, staging_writer) = node.token(&["write"], &["staging"]).await;
    let (revoked_id, revoked) = node.token(&["write"], &["default"]).await;
    let (s, _) = node
        .call(
            Method::DELETE,
            &format!("/api/v1/tokens/{revoked_id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let (before, before_heads) = node.stored("default").await;

    let flag = "/api/v1/flagsets/default/flags/button-color";
    let valid_flag = json!({"state": "ENABLED", "variants": {"a": true}, "defaultVariant": "a"});
    let too_many: serde_json::Map<String, Value> = (0..=bunting_model::limits::MAX_FLAGS)
        .map(|i| (format!("f{i}"), valid_flag.clone()))
        .collect();
    let mut cases = vec![
        Case {
            name: "oversized admin body",
            method: Method::PUT,
            path: "/api/v1/flagsets/default".into(),
            token: Some(ADMIN.into()),
            body: Some(vec![b' '; 3 * 1024 * 1024]),
            status: 413,
            mentions: vec!["max_admin_body_bytes".into()],
        },
        Case {
            name: "oversized evaluation body",
            method: Method::POST,
            path: "/ofrep/v1/evaluate/flags/ratio".into(),
            token: Some(ADMIN.into()),
            body: Some(
                format!("{{\"context\":{{\"a\":\"{}\"}}}}", "x".repeat(32 * 1024)).into_bytes(),
            ),
            status: 413,
            mentions: vec!["limit".into()],
        },
        Case {
            name: "JSON nested past serde's own limit",
            method: Method::PUT,
            path: flag.into(),
            token: Some(ADMIN.into()),
            body: Some(format!("{}1{}", "[".repeat(5000), "]".repeat(5000)).into_bytes()),
            status: 400,
            mentions: vec!["MAX_JSON_DEPTH".into()],
        },
        Case {
            name: "not JSON at all",
            method: Method::PUT,
            path: flag.into(),
            token: Some(ADMIN.into()),
            body: Some(b"{\"state\": ENABLED}".to_vec()),
            status: 400,
            mentions: vec!["invalid_json".into()],
        },
        case(
            "JSON deeper than MAX_JSON_DEPTH",
            Method::PUT,
            flag,
            Some(ADMIN),
            Some(json!({"state": "ENABLED", "variants": {"a": nested(70)}})),
            400,
            &["MAX_JSON_DEPTH"],
        ),
        case(
            "rule deeper than MAX_RULE_DEPTH",
            Method::PATCH,
            flag,
            Some(ADMIN),
            Some(json!({"targeting": deep_rule(40)})),
            400,
            &["/flags/button-color/targeting", "limit of 32"],
        ),
        case(
            "too many flags",
            Method::PUT,
            "/api/v1/flagsets/default",
            Some(ADMIN),
            Some(json!({"flags": too_many})),
            400,
            &["\"/flags\"", "limit is 20000"],
        ),
        case(
            "structurally invalid flag: every problem with its path",
            Method::PUT,
            flag,
            Some(ADMIN),
            Some(json!({"state": "MAYBE", "variants": [1], "defaultVariant": 3})),
            400,
            &[
                "/flags/button-color/state",
                "/flags/button-color/variants",
                "/flags/button-color/defaultVariant",
            ],
        ),
        case(
            "semantically invalid flag: every problem with its path",
            Method::PUT,
            flag,
            Some(ADMIN),
            Some(
                json!({"state": "ENABLED", "variants": {"a": true, "b": "x", "c": null}, "defaultVariant": "z",
                         "targeting": {"no_such_op": [1]}, "metadata": {"m": {"x": 1}}}),
            ),
            400,
            &[
                "/flags/button-color/variants/b",
                "/flags/button-color/variants/c",
                "/flags/button-color/defaultVariant",
                "/flags/button-color/targeting",
                "/flags/button-color/metadata/m",
            ],
        ),
        case(
            "invalid flag key",
            Method::POST,
            "/api/v1/flagsets/default/flags",
            Some(ADMIN),
            Some(json!({"key": "bad key!", "state": "ENABLED", "variants": {"a": 1}})),
            400,
            &["/flags/bad key!", "not valid"],
        ),
        case(
            "patch with an unknown field",
            Method::PATCH,
            flag,
            Some(ADMIN),
            Some(json!({"colour": "red"})),
            400,
            &["/flags/button-color/colour"],
        ),
        case(
            "patch of an unknown flag",
            Method::PATCH,
            "/api/v1/flagsets/default/flags/nope",
            Some(ADMIN),
            Some(json!({"state": "DISABLED"})),
            404,
            &["/flags/nope"],
        ),
        case(
            "toggle of an unknown flag",
            Method::POST,
            "/api/v1/flagsets/default/flags/nope/toggle",
            Some(ADMIN),
            None,
            404,
            &["nope"],
        ),
        case(
            "write to an unknown flag set",
            Method::PUT,
            "/api/v1/flagsets/nowhere/flags/x",
            Some(ADMIN),
            Some(valid_flag.clone()),
            404,
            &["nowhere"],
        ),
        case(
            "missing token",
            Method::PUT,
            flag,
            None,
            Some(valid_flag.clone()),
            401,
            &["API key"],
        ),
        case(
            "invalid token",
            Method::PUT,
            flag,
            Some("bnt_0000"),
            Some(valid_flag.clone()),
            401,
            &["not valid"],
        ),
        case(
            "revoked token",
            Method::PUT,
            flag,
            Some(&revoked),
            Some(valid_flag.clone()),
            401,
            &["revoked"],
        ),
        case(
            "wrong scope",
            Method::PUT,
            flag,
            Some(&reader),
            Some(valid_flag.clone()),
            403,
            &["write scope"],
        ),
        case(
            "wrong flag set",
            Method::PUT,
            flag,
            Some(&staging_writer),
            Some(valid_flag.clone()),
            403,
            &["\\\"default\\\""],
        ),
        case(
            "unknown endpoint",
            Method::GET,
            "/api/v2/nothing",
            Some(ADMIN),
            None,
            404,
            &["no such endpoint"],
        ),
    ];
    for c in cases.drain(..) {
        let mut r = node.request(c.method.clone(), &c.path, c.token.as_deref());
        if let Some(b) = c.body {
            r = r.header("content-type", "application/json").body(b);
        }
        let (status, body) = common::status_json(r.send().await.unwrap()).await;
        assert_eq!(status, c.status, "{}: {body}", c.name);
        let text = body.to_string();
        for m in &c.mentions {
            assert!(
                text.contains(m.as_str()),
                "{}: body does not mention {m:?}: {text}",
                c.name
            );
        }
    }

    // Rate limit: a token that sends faster than its quota gets 429 with Retry-After.
    let (_, hasty) = node.token(&["write"], &["default"]).await;
    let mut limited = None;
    for _ in 0..60 {
        let r = node
            .request(Method::PUT, flag, Some(&hasty))
            .json(&json!({"state": "NOPE"}))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 400);
    }
    let r = limited.expect("never rate limited");
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let (_, body) = common::status_json(r).await;
    assert_eq!(body["error"], "rate_limited");

    let (after, after_heads) = node.stored("default").await;
    assert_eq!(after, before, "the stored flag set changed");
    assert_eq!(after_heads, before_heads);
    node.stop().await.unwrap();
}
