//! OFREP conformance against a real node: every status code and body shape of
//! open-feature/protocol service/openapi.yaml, ETag / 304, and the change stream (ADR 0008).

#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

mod common;

use std::time::Duration;

use common::{TestNode, ADMIN};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn single_flag_evaluation_answers_every_type_with_the_spec_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let (_, sdk) = node.token(&["evaluate"], &["default"]).await;
    let ctx = json!({"targetingKey": "u1"});

    let (s, b) = node.evaluate("button-color", &sdk, ctx.clone()).await;
    assert_eq!(s, 200);
    assert_eq!(
        b,
        json!({"key": "button-color", "value": "#1B873F", "variant": "green", "reason": "STATIC",
               "metadata": {"flagSetId": "shop"}})
    );
    let (s, b) = node.evaluate("ratio", &sdk, ctx.clone()).await;
    assert_eq!((s, b["value"].clone()), (200, json!(0.5)));
    let (s, b) = node.evaluate("pricing", &sdk, ctx.clone()).await;
    assert_eq!(
        (s, b["value"].clone()),
        (200, json!({"monthly": 9.99, "trialDays": 14}))
    );
    // Targeting: a match and a miss (DEFAULT), with flag metadata over set metadata.
    let (s, b) = node
        .evaluate(
            "new-banner",
            &sdk,
            json!({"targetingKey": "u1", "email": "a@example.com"}),
        )
        .await;
    assert_eq!(
        (s, b),
        (
            200,
            json!({"key": "new-banner", "value": true, "variant": "on", "reason": "TARGETING_MATCH",
                   "metadata": {"flagSetId": "shop", "owner": "growth"}})
        )
    );
    let (_, b) = node
        .evaluate(
            "new-banner",
            &sdk,
            json!({"targetingKey": "u1", "email": "a@else.org"}),
        )
        .await;
    assert_eq!(
        (b["value"].clone(), b["reason"].clone()),
        (json!(false), json!("DEFAULT"))
    );
    let (_, b) = node
        .evaluate(
            "page-size",
            &sdk,
            json!({"targetingKey": "u", "plan": "enterprise"}),
        )
        .await;
    assert_eq!(b["value"], 50);
    // Disabled: no value, so the SDK's code default applies.
    let (s, b) = node.evaluate("old-checkout", &sdk, ctx.clone()).await;
    assert_eq!(
        (s, b),
        (
            200,
            json!({"key": "old-checkout", "reason": "DISABLED", "metadata": {"flagSetId": "shop"}})
        )
    );
    // Unknown flag: 404 with the flagNotFound shape.
    let (s, b) = node.evaluate("nope", &sdk, ctx.clone()).await;
    assert_eq!(s, 404);
    assert_eq!(
        (b["key"].clone(), b["errorCode"].clone()),
        (json!("nope"), json!("FLAG_NOT_FOUND"))
    );
    assert!(b["errorDetails"].is_string());
    // X-API-Key works like Authorization: Bearer.
    let r = node
        .http
        .post(format!("{}/ofrep/v1/evaluate/flags/button-color", node.url))
        .header("x-api-key", &sdk)
        .json(&json!({"context": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");

    // Operations: health, and Prometheus metrics by route/status and by flag/variant.
    let r = node
        .http
        .get(format!("{}/healthz", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let metrics = node
        .http
        .get(format!("{}/metrics", node.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(r#"bunting_http_requests_total{route="/ofrep/v1/evaluate/flags/{key}",method="POST",status="404"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"feature_flag_key="button-color",feature_flag_result_variant="green",feature_flag_result_reason=""} 2"#), "{metrics}");
    assert!(metrics.contains(r#"feature_flag_key="old-checkout",feature_flag_result_variant="",feature_flag_result_reason="DISABLED"} 1"#), "{metrics}");
    assert!(
        metrics.contains("bunting_http_request_duration_seconds_bucket"),
        "{metrics}"
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_400_with_error_codes_and_auth_failures_401_403() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let (_, sdk) = node.token(&["evaluate"], &["default"]).await;
    let (_, writer) = node.token(&["write"], &["default"]).await;
    let (_, elsewhere) = node.token(&["evaluate"], &["staging"]).await;
    let path = "/ofrep/v1/evaluate/flags/button-color";

    let (s, b) = node
        .call(
            Method::POST,
            path,
            Some(&sdk),
            Some(json!({"context": [1, 2]})),
        )
        .await;
    assert_eq!(
        (s, b["errorCode"].clone(), b["key"].clone()),
        (400, json!("INVALID_CONTEXT"), json!("button-color"))
    );
    let (s, b) = node
        .call(
            Method::POST,
            path,
            Some(&sdk),
            Some(json!({"context": {"targetingKey": 7}})),
        )
        .await;
    assert_eq!((s, b["errorCode"].clone()), (400, json!("INVALID_CONTEXT")));
    let r = node
        .request(Method::POST, path, Some(&sdk))
        .header("content-type", "application/json")
        .body("{\"context\": ")
        .send()
        .await
        .unwrap();
    let (s, b) = common::status_json(r).await;
    assert_eq!((s, b["errorCode"].clone()), (400, json!("PARSE_ERROR")));
    let (s, b) = node
        .call(
            Method::POST,
            "/ofrep/v1/evaluate/flags",
            Some(&sdk),
            Some(json!({"context": "x"})),
        )
        .await;
    assert_eq!((s, b["errorCode"].clone()), (400, json!("INVALID_CONTEXT")));
    assert!(b.get("key").is_none(), "bulk failures carry no key: {b}");

    let (s, r) = node
        .call(Method::POST, path, None, Some(json!({"context": {}})))
        .await;
    assert_eq!(s, 401, "{r}");
    let (s, _) = node
        .call(
            Method::POST,
            path,
            Some("bnt_not_a_key"),
            Some(json!({"context": {}})),
        )
        .await;
    assert_eq!(s, 401);
    let (s, _) = node
        .call(
            Method::POST,
            path,
            Some(&writer),
            Some(json!({"context": {}})),
        )
        .await;
    assert_eq!(s, 403, "a write token is not an SDK key");
    // A key bound to a flag set this node does not hold: 404 with errorDetails (issue #12).
    let (s, b) = node
        .call(
            Method::POST,
            path,
            Some(&elsewhere),
            Some(json!({"context": {}})),
        )
        .await;
    assert_eq!(s, 404);
    assert!(b["errorDetails"].as_str().unwrap().contains("staging"));
    // Admin tokens evaluate too, and may name the flag set.
    let (s, _) = node
        .call(
            Method::POST,
            path,
            Some(ADMIN),
            Some(json!({"context": {}})),
        )
        .await;
    assert_eq!(s, 200);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn rate_limited_key_gets_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.limits.requests_per_second_per_token = 1;
    config.limits.burst_per_token = 3;
    let node = TestNode::start(config).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..5 {
        let r = node
            .request(Method::POST, "/ofrep/v1/evaluate/flags/ratio", Some(ADMIN))
            .json(&json!({"context": {}}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
        }
    }
    assert_eq!(statuses, vec![200, 200, 200, 429, 429]);
    let secs: u64 = retry_after.unwrap().parse().unwrap();
    assert!(secs >= 1);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn bulk_evaluation_has_etag_304_and_a_change_stream() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let (_, sdk) = node.token(&["evaluate"], &["default"]).await;
    let body = json!({"context": {"targetingKey": "u1", "email": "x@example.com"}});
    let bulk = || {
        node.request(Method::POST, "/ofrep/v1/evaluate/flags", Some(&sdk))
            .json(&body)
    };
    let r = bulk().send().await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let b: serde_json::Value = r.json().await.unwrap();
    let flags = b["flags"].as_array().unwrap();
    assert_eq!(flags.len(), 6);
    let keys: Vec<&str> = flags.iter().map(|f| f["key"].as_str().unwrap()).collect();
    assert!(keys.contains(&"old-checkout") && keys.contains(&"new-banner"));
    let banner = flags.iter().find(|f| f["key"] == "new-banner").unwrap();
    assert_eq!(banner["value"], true);
    assert_eq!(b["metadata"], json!({"flagSetId": "shop"}));
    let stream = &b["eventStreams"][0];
    assert_eq!(stream["type"], "sse");
    let uri = stream["endpoint"]["requestUri"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(uri.starts_with("/api/v1/flagsets/default/stream"));

    // Same context, same flags: 304 without a body.
    let r = bulk().header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
    assert!(r.bytes().await.unwrap().is_empty());
    // Another context is another answer.
    let r = node
        .request(Method::POST, "/ofrep/v1/evaluate/flags", Some(&sdk))
        .header("if-none-match", &etag)
        .json(&json!({"context": {"targetingKey": "u2"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Follow the stream (with the URL exactly as given, key in the query), then change a flag.
    let mut events = node
        .http
        .get(format!("{}{}", node.url, uri))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert!(events.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let (s, _) = node
        .call(
            Method::POST,
            "/api/v1/flagsets/default/flags/button-color/toggle",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let mut seen = String::new();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = events.chunk().await.unwrap() {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("refetchEvaluation") {
                return;
            }
        }
    })
    .await;
    assert!(got.is_ok(), "no refetch event; got {seen:?}");
    assert!(seen.contains("event: message"), "{seen}");
    let data = seen.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let data: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(data["type"], "refetchEvaluation");
    assert!(data["etag"].is_string() && data["lastModified"].is_u64());

    // The old ETag no longer matches: the flags changed.
    let r = bulk().header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let b: serde_json::Value = r.json().await.unwrap();
    let color = b["flags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == "button-color")
        .unwrap()
        .clone();
    assert_eq!(color["reason"], "DISABLED");
    drop(events);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn stream_needs_a_key_bound_to_its_flag_set() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let (_, other) = node.token(&["evaluate"], &["staging"]).await;
    let (s, _) = node
        .call(Method::GET, "/api/v1/flagsets/default/stream", None, None)
        .await;
    assert_eq!(s, 401);
    let (s, _) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/default/stream",
            Some(&other),
            None,
        )
        .await;
    assert_eq!(s, 403);
    node.stop().await.unwrap();
}
