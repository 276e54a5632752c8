//! The admin REST API end to end: a flag's whole life, the audit log with token ids, optimistic
//! concurrency, whole-set upload and download, tokens, and the CLI over it.

#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

mod common;

use common::{TestNode, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test]
async fn flag_round_trip_records_every_change_with_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let (writer_id, writer) = node.token(&["write"], &["staging"]).await;
    let (_, reader) = node.token(&["read"], &["staging"]).await;
    let (_, sdk) = node.token(&["evaluate"], &["staging"]).await;

    let (s, b) = node
        .call(
            Method::POST,
            "/api/v1/flagsets",
            Some(ADMIN),
            Some(json!({"name": "staging"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, _) = node
        .call(
            Method::POST,
            "/api/v1/flagsets",
            Some(ADMIN),
            Some(json!({"name": "staging"})),
        )
        .await;
    assert_eq!(s, 409);
    let (s, b) = node
        .call(Method::GET, "/api/v1/flagsets", Some(ADMIN), None)
        .await;
    assert_eq!(s, 200);
    let names: Vec<&str> = b["flagSets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["default", "staging"]);

    let flag = json!({"key": "dark-mode", "state": "ENABLED", "variants": {"on": true, "off": false},
                      "defaultVariant": "off"});
    let (s, b) = node
        .call(
            Method::POST,
            "/api/v1/flagsets/staging/flags",
            Some(&writer),
            Some(flag.clone()),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["heads"].as_array().unwrap().len(), 1);
    let (s, _) = node
        .call(
            Method::POST,
            "/api/v1/flagsets/staging/flags",
            Some(&writer),
            Some(flag),
        )
        .await;
    assert_eq!(s, 409, "creating an existing flag is a conflict");
    // The write is served at once (read-your-writes on this node).
    let (s, b) = node.evaluate("dark-mode", &sdk, json!({})).await;
    assert_eq!((s, b["value"].clone()), (200, json!(false)));

    let (s, b) = node
        .call(
            Method::PATCH,
            "/api/v1/flagsets/staging/flags/dark-mode",
            Some(&writer),
            Some(json!({"defaultVariant": "on", "metadata": {"owner": "web"}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/staging/flags/dark-mode",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(b["defaultVariant"], "on");
    assert_eq!(b["metadata"], json!({"owner": "web"}));
    let (_, b) = node.evaluate("dark-mode", &sdk, json!({})).await;
    assert_eq!(b["value"], true);

    let r = node
        .request(
            Method::POST,
            "/api/v1/flagsets/staging/flags/dark-mode/toggle",
            Some(ADMIN),
        )
        .header("x-change-message", "incident 42: kill switch")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, b) = node.evaluate("dark-mode", &sdk, json!({})).await;
    assert_eq!(b["reason"], "DISABLED");

    let (s, _) = node
        .call(Method::PUT, "/api/v1/flagsets/staging/flags/dark-mode", Some(&writer),
              Some(json!({"state": "ENABLED", "variants": {"a": "x", "b": "y"}, "defaultVariant": "b"})))
        .await;
    assert_eq!(s, 200);
    let (_, b) = node.evaluate("dark-mode", &sdk, json!({})).await;
    assert_eq!(b["value"], "y");

    let (s, _) = node
        .call(
            Method::DELETE,
            "/api/v1/flagsets/staging/flags/dark-mode",
            Some(&writer),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = node.evaluate("dark-mode", &sdk, json!({})).await;
    assert_eq!(s, 404);
    let (s, _) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/staging/flags/dark-mode",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(s, 404);

    // History: newest first, each entry with the token that made it.
    let (s, b) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/staging/flags/dark-mode/history",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let entries = b["entries"].as_array().unwrap();
    let who: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["operation"].as_str().unwrap(),
                e["tokenId"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(who.len(), 5, "{b}");
    assert_eq!(who[0], ("delete", writer_id.as_str()));
    assert_eq!(who[4], ("create", writer_id.as_str()));
    let toggle = entries
        .iter()
        .find(|e| e["message"] == "incident 42: kill switch")
        .unwrap();
    assert_eq!(toggle["tokenId"], "bootstrap-admin");
    assert_eq!(toggle["region"], "test");
    assert_eq!(toggle["node"], "test-node");
    // Paged.
    let (_, b) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/staging/history?flag=dark-mode&offset=1&limit=2",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(b["entries"].as_array().unwrap().len(), 2);
    assert_eq!(b["total"], 5);
    assert_eq!(b["entries"][0]["change"], entries[1]["change"]);

    // Scopes: a reader cannot write, a writer cannot manage tokens.
    let (s, _) = node
        .call(
            Method::POST,
            "/api/v1/flagsets/staging/flags/x/toggle",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = node
        .call(Method::GET, "/api/v1/tokens", Some(&writer), None)
        .await;
    assert_eq!(s, 403);
    let (s, b) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/staging/conflicts",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!((s, b["conflicts"].clone()), (200, json!([])));
    let (s, b) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/staging/broken",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!((s, b["broken"].clone()), (200, json!([])));
    let (s, b) = node
        .call(Method::GET, "/api/v1/status", Some(&reader), None)
        .await;
    assert_eq!(
        (s, b["node"].clone(), b["region"].clone()),
        (200, json!("test-node"), json!("test"))
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn if_match_with_old_heads_gets_412_with_the_current_values() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let r = node
        .request(
            Method::GET,
            "/api/v1/flagsets/default/flags/button-color",
            Some(ADMIN),
        )
        .send()
        .await
        .unwrap();
    let read_at = r.headers()["etag"].to_str().unwrap().to_owned();
    // Someone else changes the flag.
    let (s, b) = node
        .call(
            Method::PATCH,
            "/api/v1/flagsets/default/flags/button-color",
            Some(ADMIN),
            Some(json!({"defaultVariant": "blue"})),
        )
        .await;
    assert_eq!(s, 200);
    let new_heads = b["heads"].clone();
    // Our write, based on what we read, is refused and shows what is there now.
    let r = node
        .request(
            Method::PATCH,
            "/api/v1/flagsets/default/flags/button-color",
            Some(ADMIN),
        )
        .header("if-match", &read_at)
        .json(&json!({"defaultVariant": "green", "variants": {"red": "#f00"}}))
        .send()
        .await
        .unwrap();
    let (s, b) = common::status_json(r).await;
    assert_eq!(s, 412, "{b}");
    assert_eq!(b["heads"], new_heads);
    let current = b["current"].as_array().unwrap();
    assert!(
        current
            .iter()
            .any(|c| c["pointer"] == "/flags/button-color/defaultVariant" && c["value"] == "blue"),
        "{b}"
    );
    // With the current heads the same write goes through.
    let tag = format!(
        "\"{}\"",
        new_heads
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect::<Vec<_>>()
            .join(".")
    );
    let r = node
        .request(
            Method::PATCH,
            "/api/v1/flagsets/default/flags/button-color",
            Some(ADMIN),
        )
        .header("if-match", &tag)
        .json(&json!({"defaultVariant": "green"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Unknown heads are stale too.
    let r = node
        .request(
            Method::PATCH,
            "/api/v1/flagsets/default/flags/button-color",
            Some(ADMIN),
        )
        .header("if-match", "\"00ff\"")
        .json(&json!({"defaultVariant": "blue"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn whole_set_upload_is_a_field_level_diff_and_download_gives_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let (before, _) = node.stored("default").await;
    let mut doc: Value = serde_json::from_str(&before).unwrap();
    doc["flags"]["ratio"]["variants"]["quarter"] = json!(0.25);
    doc["flags"]["ratio"]["defaultVariant"] = json!("quarter");
    doc["flags"].as_object_mut().unwrap().remove("old-checkout");
    let (s, b) = node
        .call(
            Method::PUT,
            "/api/v1/flagsets/default",
            Some(ADMIN),
            Some(doc.clone()),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (after, _) = node.stored("default").await;
    let after: Value = serde_json::from_str(&after).unwrap();
    assert_eq!(after, doc);
    let (_, b) = node.evaluate("ratio", ADMIN, json!({})).await;
    assert_eq!(b["value"], 0.25);
    // Only the flags that changed are in the history, one change each.
    let (_, h) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/default/history?limit=2",
            Some(ADMIN),
            None,
        )
        .await;
    let mut flags: Vec<&str> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["flag"].as_str().unwrap_or(""))
        .collect();
    flags.sort();
    assert_eq!(flags, vec!["old-checkout", "ratio"]);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn tokens_are_listed_without_secrets_and_revoked_tokens_stop_working() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let (id, secret) = node.token(&["read"], &["*"]).await;
    let (s, b) = node
        .call(Method::GET, "/api/v1/tokens", Some(ADMIN), None)
        .await;
    assert_eq!(s, 200);
    let text = b.to_string();
    assert!(text.contains(&id) && !text.contains(&secret) && !text.contains("sha256"));
    let (s, _) = node
        .call(Method::GET, "/api/v1/status", Some(&secret), None)
        .await;
    assert_eq!(s, 200);
    let (s, b) = node
        .call(
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert!(b["revokedMs"].is_u64());
    let (s, _) = node
        .call(Method::GET, "/api/v1/status", Some(&secret), None)
        .await;
    assert_eq!(s, 401);
    let (s, _) = node
        .call(
            Method::DELETE,
            "/api/v1/tokens/tok_missing",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 404);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn cli_lists_toggles_and_shows_history_over_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let url = node.url.clone();
    let run = move |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bunting"))
            .args(args)
            .env("BUNTING_URL", &url)
            .env("BUNTING_TOKEN", ADMIN)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(&["flags", "list"])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("button-color"));
    let (ok, _, err) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(&["flags", "toggle", "ratio", "--off", "-m", "from the cli"])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let (_, b) = node.evaluate("ratio", ADMIN, json!({})).await;
    assert_eq!(b["reason"], "DISABLED");
    let (ok, out, _) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(&["flags", "history", "ratio"])
    })
    .await
    .unwrap();
    assert!(
        ok && out.contains("from the cli") && out.contains("bootstrap-admin"),
        "{out}"
    );
    let (ok, out, _) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || {
            run(&[
                "tokens",
                "create",
                "--name",
                "ci",
                "--scope",
                "write",
                "--flag-set",
                "default",
            ])
        }
    })
    .await
    .unwrap();
    assert!(ok && out.contains("bnt_"), "{out}");
    let (ok, _, err) = tokio::task::spawn_blocking(move || run(&["flags", "get", "no-such-flag"]))
        .await
        .unwrap();
    assert!(!ok && err.contains("404"), "{err}");
    node.stop().await.unwrap();
}
