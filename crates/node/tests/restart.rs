//! Restarts: everything acknowledged is there afterwards — after a graceful stop, with writes in
//! flight during the stop, and after SIGKILL of a real `bunting serve` process.

#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TestNode, ADMIN};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn graceful_restart_keeps_flags_sets_tokens_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let (_, sdk) = node.token(&["evaluate"], &["default"]).await;
    node.call(
        Method::POST,
        "/api/v1/flagsets",
        Some(ADMIN),
        Some(json!({"name": "empty-set"})),
    )
    .await;
    let (s, _) = node
        .call(
            Method::PATCH,
            "/api/v1/flagsets/default/flags/button-color",
            Some(ADMIN),
            Some(json!({"defaultVariant": "blue"})),
        )
        .await;
    assert_eq!(s, 200);
    let (doc, heads) = node.stored("default").await;
    let (_, history) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/default/history",
            Some(ADMIN),
            None,
        )
        .await;
    let (_, status) = node
        .call(Method::GET, "/api/v1/status", Some(ADMIN), None)
        .await;
    node.stop().await.unwrap();

    // Same data dir; no --flags effect on a second start (the store is not empty).
    let mut config = common::config(dir.path());
    std::fs::write(dir.path().join("flags.json"), r#"{"flags": {}}"#).unwrap();
    config.admin_token = Some(ADMIN.into());
    let node = TestNode::start(config).await;
    assert_eq!(node.stored("default").await, (doc, heads));
    let (_, history2) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/default/history",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(history2["entries"], history["entries"]);
    let (s, b) = node.evaluate("button-color", &sdk, json!({})).await;
    assert_eq!(
        (s, b["value"].clone()),
        (200, json!("#0969DA")),
        "the SDK key survived the restart"
    );
    let (_, sets) = node
        .call(Method::GET, "/api/v1/flagsets", Some(ADMIN), None)
        .await;
    assert!(sets.to_string().contains("empty-set"));
    let (_, status2) = node
        .call(Method::GET, "/api/v1/status", Some(ADMIN), None)
        .await;
    assert!(status2["incarnation"].as_u64() > status["incarnation"].as_u64());
    node.stop().await.unwrap();
}

#[tokio::test]
async fn writes_in_flight_during_shutdown_are_finished_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let mut writes = Vec::new();
    for i in 0..20 {
        let r = node
            .request(
                Method::PUT,
                &format!("/api/v1/flagsets/default/flags/f{i}"),
                Some(ADMIN),
            )
            .json(&json!({"state": "ENABLED", "variants": {"n": i}, "defaultVariant": "n"}));
        writes.push(tokio::spawn(async move {
            r.send().await.map(|r| r.status().as_u16())
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    node.stop().await.unwrap();
    let mut acked = Vec::new();
    for (i, w) in writes.into_iter().enumerate() {
        if let Ok(200) = w.await.unwrap() {
            acked.push(i);
        }
    }
    assert!(!acked.is_empty(), "no write finished at all");
    let node = TestNode::start(common::config(dir.path())).await;
    for i in &acked {
        let (s, b) = node.evaluate(&format!("f{i}"), ADMIN, json!({})).await;
        assert_eq!(
            (s, b["value"].clone()),
            (200, json!(i)),
            "acknowledged write f{i} was lost"
        );
    }
    node.stop().await.unwrap();
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bunting serve` on port 0 and returns it with its URL (read from its stdout).
fn spawn_binary(dir: &std::path::Path) -> (Process, String) {
    let flags = dir.join("flags.json");
    if !flags.exists() {
        std::fs::write(&flags, common::FLAGS).unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_bunting"))
        .args(["serve", "--http", "127.0.0.1:0", "--store", "redb"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--flags")
        .arg(&flags)
        .env("BUNTING_ADMIN_TOKEN", ADMIN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    (Process(child), url)
}

async fn ready(http: &reqwest::Client, url: &str) {
    for _ in 0..3000 {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("bunting serve did not become ready");
}

#[tokio::test]
async fn acknowledged_writes_survive_sigkill_of_a_real_process() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let (mut process, url) = spawn_binary(dir.path());
    ready(&http, &url).await;
    let mut acked = Vec::new();
    for i in 0..15 {
        let r = http
            .put(format!("{url}/api/v1/flagsets/default/flags/k{i}"))
            .bearer_auth(ADMIN)
            .json(&json!({"state": "ENABLED", "variants": {"v": i}, "defaultVariant": "v"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        acked.push(i);
    }
    let r = http
        .post(format!(
            "{url}/api/v1/flagsets/default/flags/button-color/toggle"
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let before = http
        .get(format!("{url}/api/v1/flagsets/default"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // SIGKILL: no shutdown code runs.
    sigkill(&mut process.0);
    drop(process);

    let (_process, url) = spawn_binary(dir.path());
    ready(&http, &url).await;
    let after = http
        .get(format!("{url}/api/v1/flagsets/default"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(after, before);
    for i in acked {
        let r: serde_json::Value = http
            .post(format!("{url}/ofrep/v1/evaluate/flags/k{i}"))
            .bearer_auth(ADMIN)
            .json(&json!({"context": {}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["value"], json!(i));
    }
}

/// `Child::kill` sends SIGKILL on Unix.
fn sigkill(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// More writes than `COMPACT_AFTER_CHANGES`: the node compacts the flag set into a snapshot on its
/// own, and a restart from that snapshot plus the changes after it gives back the same document.
#[tokio::test]
async fn a_compacted_flag_set_restarts_with_every_write() {
    use bunting_store::{RedbStore, Store, COMPACT_AFTER_CHANGES};
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(common::config(dir.path())).await;
    let writes = COMPACT_AFTER_CHANGES + 30;
    for i in 0..writes {
        let variant = if i % 2 == 0 { "blue" } else { "green" };
        let (s, body) = node
            .call(
                Method::PATCH,
                "/api/v1/flagsets/default/flags/button-color",
                Some(ADMIN),
                Some(json!({"defaultVariant": variant})),
            )
            .await;
        assert_eq!(s, 200, "write {i}: {body}");
    }
    let stored = node.stored("default").await;
    node.stop().await.unwrap();

    {
        let store = RedbStore::open(dir.path().join("data").join("bunting.redb")).unwrap();
        let since = store.changes_since_snapshot("default").unwrap();
        assert!(
            since < writes,
            "{since} changes since the snapshot after {writes} writes: the node never compacted"
        );
        assert!(store.load("default").unwrap().snapshot.is_some());
    }

    let node = TestNode::start(common::config(dir.path())).await;
    assert_eq!(node.stored("default").await, stored);
    let (_, b) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/default/flags/button-color",
            Some(ADMIN),
            None,
        )
        .await;
    // The last write (an odd index) set "green".
    assert_eq!(b["defaultVariant"], json!("green"), "{b}");
    node.stop().await.unwrap();
}
