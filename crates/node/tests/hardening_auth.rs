//! Issue #12, findings 8 and 9: authentication comes first, secrets stay out of URLs and logs,
//! guessing is slowed, and admin JSON is read exactly or refused.

#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

mod common;

use std::time::Duration;

use common::{TestNode, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};

const METRICS_TOKEN: &str = "metrics-token-for-tests-0123456789abcdef";

async fn node() -> (tempfile::TempDir, TestNode) {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    (dir, node)
}

/// Reads the response head from a raw connection (until the blank line).
fn response_head(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn a_4mb_upload_without_a_token_is_refused_before_its_body_is_sent() {
    let (_dir, node) = node().await;
    let addr = node.url.trim_start_matches("http://").to_owned();
    let head = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        // A server that read the body first would never answer; the bound turns that hang into a
        // failure rather than a stuck test.
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let length = 4 * 1024 * 1024;
        let head = format!(
            "POST /api/v1/flagsets HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: {length}\r\n\r\n{{\"name\": \""
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&[b'a'; 1024]).unwrap();
        // Only ~1 KB of 4 MB is sent: an answer now means the body was never waited for.
        response_head(&mut stream)
    })
    .await
    .unwrap();
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    // Other clients are not held up by it.
    let (status, _) = node.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_unknown_flag_set_is_404_and_a_malformed_name_400() {
    let (_dir, node) = node().await;
    let evaluate = |set: &str| {
        node.request(Method::POST, "/ofrep/v1/evaluate/flags", Some(ADMIN))
            .header("x-flag-set", set)
            .json(&json!({"context": {}}))
            .send()
    };
    assert_eq!(evaluate("no-such-set").await.unwrap().status(), 404);
    assert_eq!(evaluate("../default").await.unwrap().status(), 400);
    assert_eq!(evaluate("default").await.unwrap().status(), 200);
}

#[tokio::test]
async fn one_write_spends_one_rate_limit_slot() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.limits.requests_per_second_per_token = 1;
    config.limits.burst_per_token = 6;
    let node = TestNode::start(config).await;
    // A burst of 6 allows 6 writes (it allowed 3 when every write was charged twice).
    for i in 0..6 {
        let (status, body) = node
            .call(
                Method::POST,
                "/api/v1/flagsets/default/flags/button-color/toggle",
                Some(ADMIN),
                None,
            )
            .await;
        assert_eq!(status, 200, "write {i}: {body}");
    }
    // And the limit is in force: the burst runs out.
    let mut limited = false;
    for _ in 0..50 {
        let (status, _) = node
            .call(Method::GET, "/api/v1/status", Some(ADMIN), None)
            .await;
        if status == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "the token's burst never ran out");
}

#[tokio::test]
async fn event_stream_url_carries_a_stream_credential_that_opens_only_the_stream() {
    let (_dir, node) = node().await;
    let (_, sdk) = node.token(&["evaluate"], &["default"]).await;
    let (status, _) = node
        .call(
            Method::POST,
            "/api/v1/flagsets",
            Some(ADMIN),
            Some(json!({"name": "other"})),
        )
        .await;
    assert_eq!(status, 201);
    let bulk = |key: &str| {
        let key = key.to_owned();
        let node = &node;
        async move {
            let (status, body) = node
                .call(
                    Method::POST,
                    "/ofrep/v1/evaluate/flags",
                    Some(&key),
                    Some(json!({"context": {}})),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            body["eventStreams"][0]["endpoint"]["requestUri"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let uri = bulk(&sdk).await;
    assert!(!uri.contains(&sdk), "the caller's key is in the URL: {uri}");
    let credential = uri.split_once("streamToken=").unwrap().1.to_owned();
    // The credential opens the stream, as given, without a header.
    let r = node
        .http
        .get(format!("{}{uri}", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    // ... and nothing else: not another set's stream, not OFREP, not the admin API.
    let other = node
        .http
        .get(format!(
            "{}/api/v1/flagsets/other/stream?streamToken={credential}",
            node.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 401);
    let (status, _) = node.evaluate("button-color", &credential, json!({})).await;
    assert_eq!(status, 401);
    let (status, _) = node
        .call(Method::GET, "/api/v1/status", Some(&credential), None)
        .await;
    assert_eq!(status, 401);
    // The old way, a key in the query, no longer opens anything.
    let r = node
        .http
        .get(format!(
            "{}/api/v1/flagsets/default/stream?apiKey={sdk}",
            node.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A key in a header still opens the stream.
    let r = node
        .request(Method::GET, "/api/v1/flagsets/default/stream", Some(&sdk))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    // An admin token gets no URL credential at all.
    let uri = bulk(ADMIN).await;
    assert!(!uri.contains('?') && !uri.contains(ADMIN), "{uri}");
}

#[tokio::test]
async fn metrics_need_the_metrics_token_and_health_stays_public() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.metrics_token = Some(METRICS_TOKEN.into());
    let node = TestNode::start(config).await;
    let (_, sdk) = node.token(&["evaluate"], &["default"]).await;
    let get = |token: Option<&str>| node.request(Method::GET, "/metrics", token).send();
    assert_eq!(get(None).await.unwrap().status(), 401);
    assert_eq!(get(Some(&sdk)).await.unwrap().status(), 403);
    let r = get(Some(METRICS_TOKEN)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("bunting_http_requests"));
    for open in ["/healthz", "/readyz"] {
        let (status, _) = node.call(Method::GET, open, None, None).await;
        assert_eq!(status, 200, "{open}");
    }
}

#[tokio::test]
async fn a_short_bootstrap_token_stops_the_node_at_start_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.admin_token = Some("x".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = bunting_node::serve(listener, config, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("BUNTING_ADMIN_TOKEN") && err.contains("32"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_guesses_are_throttled_per_address_while_others_get_in() {
    let (_dir, node) = node().await;
    // The guesser comes from 127.0.0.2; the node listens on 127.0.0.1.
    let guesser = reqwest::Client::builder()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .build()
        .unwrap();
    let mut throttled = None;
    for i in 0..300 {
        let r = guesser
            .get(format!("{}/api/v1/status", node.url))
            .bearer_auth(format!("guess-{i}"))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            throttled = Some(r);
            break;
        }
        assert_eq!(r.status(), 401);
    }
    let r = throttled.expect("300 wrong guesses were never throttled");
    assert!(r.headers().contains_key("retry-after"));
    // The throttled address is refused even with the right token...
    let r = guesser
        .get(format!("{}/api/v1/status", node.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    // ...while a client from another address gets in.
    let (status, _) = node
        .call(Method::GET, "/api/v1/status", Some(ADMIN), None)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_token_with_whitespace_around_it_is_refused() {
    let (_dir, node) = node().await;
    let r = node
        .http
        .get(format!("{}/api/v1/status", node.url))
        .header("authorization", format!("Bearer  {ADMIN}"))
        .send()
        .await
        .unwrap();
    let (status, body) = common::status_json(r).await;
    assert_eq!(status, 401);
    assert!(
        body["message"].as_str().unwrap().contains("whitespace"),
        "{body}"
    );
}

#[tokio::test]
async fn inexact_json_is_refused_with_its_path_and_nothing_is_stored() {
    let (_dir, node) = node().await;
    let cases = [
        (
            r#"{"state": "ENABLED", "state": "DISABLED", "variants": {"a": 1}, "defaultVariant": "a"}"#,
            "/state",
        ),
        (
            r#"{"state": "ENABLED", "variants": {"a": 18446744073709551617}, "defaultVariant": "a"}"#,
            "/variants/a",
        ),
        (
            r#"{"state": "ENABLED", "variants": {"a": 1e-400}, "defaultVariant": "a"}"#,
            "/variants/a",
        ),
    ];
    for (body, pointer) in cases {
        let r = node
            .request(
                Method::PUT,
                "/api/v1/flagsets/default/flags/exact",
                Some(ADMIN),
            )
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, answer) = common::status_json(r).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["problems"][0]["pointer"], pointer, "{answer}");
    }
    let (status, _) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/default/flags/exact",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 404, "a refused flag was stored");
}

#[tokio::test]
async fn a_flag_file_with_duplicate_keys_stops_the_node_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let flags = dir.path().join("flags.json");
    std::fs::write(
        &flags,
        r#"{"flags": {"a": {"state": "ENABLED", "variants": {"x": 1}, "defaultVariant": "x"},
                      "a": {"state": "DISABLED", "variants": {"x": 1}, "defaultVariant": "x"}}}"#,
    )
    .unwrap();
    let config = common::config(dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = bunting_node::serve(listener, config, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/flags/a") && err.contains("duplicate"),
        "{err}"
    );
}

#[tokio::test]
async fn token_bindings_refuse_path_tricks_and_nul() {
    let (_dir, node) = node().await;
    for bad in ["../*", "a\u{0}b", ""] {
        let (status, body) = node
            .call(
                Method::POST,
                "/api/v1/tokens",
                Some(ADMIN),
                Some(json!({"name": "t", "scopes": ["read"], "flagSets": [bad]})),
            )
            .await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert_eq!(body["problems"][0]["pointer"], "/flagSets/0", "{body}");
    }
    let (status, body): (u16, Value) = node
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(ADMIN),
            Some(json!({"name": "t", "scopes": ["read"], "flagSets": ["*", "default"]})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}
