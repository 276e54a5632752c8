//! Writes are all or nothing and in order (issue: hardening, findings 1 and 7): a write the store
//! cannot keep is refused and taken back, nothing is acknowledged on top of it, the node stays up
//! and restarts with every acknowledged write and nothing else; retries with an idempotency key
//! apply nothing new.

#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bunting_node::{serve_with_store, NodeConfig, NodeError};
use bunting_store::{AppendReceipt, Limits, LoadedFlagSet, RedbStore, Store, StoreError};
use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// A redb store whose change appends fail while `failing` is set, as a full or broken disk would;
/// while `hold` is set, an append waits (a slow disk) before it fails or stores.
struct FailingStore {
    inner: RedbStore,
    failing: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
    /// The next this many appends fail (then the disk recovers).
    fail_next: Arc<AtomicUsize>,
}

impl Store for FailingStore {
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    fn append_changes(
        &self,
        flag_set: &str,
        changes: &[&[u8]],
    ) -> Result<AppendReceipt, StoreError> {
        while self.hold.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let fail_once = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail_once || self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::InjectedFault);
        }
        self.inner.append_changes(flag_set, changes)
    }
    fn load(&self, flag_set: &str) -> Result<LoadedFlagSet, StoreError> {
        self.inner.load(flag_set)
    }
    fn compact(
        &self,
        flag_set: &str,
        snapshot: &[u8],
        covers_through: u64,
    ) -> Result<(), StoreError> {
        self.inner.compact(flag_set, snapshot, covers_through)
    }
    fn flag_sets(&self) -> Result<Vec<String>, StoreError> {
        self.inner.flag_sets()
    }
    fn changes_since_snapshot(&self, flag_set: &str) -> Result<u64, StoreError> {
        self.inner.changes_since_snapshot(flag_set)
    }
    fn sync_state(&self, peer: &str, flag_set: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.sync_state(peer, flag_set)
    }
    fn put_sync_state(&self, peer: &str, flag_set: &str, state: &[u8]) -> Result<(), StoreError> {
        self.inner.put_sync_state(peer, flag_set, state)
    }
    fn delete_sync_state(&self, peer: &str, flag_set: &str) -> Result<bool, StoreError> {
        self.inner.delete_sync_state(peer, flag_set)
    }
    fn put_token(&self, token_id: &str, record: &[u8]) -> Result<(), StoreError> {
        self.inner.put_token(token_id, record)
    }
    fn token(&self, token_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.token(token_id)
    }
    fn tokens(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.tokens()
    }
    fn delete_token(&self, token_id: &str) -> Result<bool, StoreError> {
        self.inner.delete_token(token_id)
    }
    fn next_incarnation(&self) -> Result<u64, StoreError> {
        self.inner.next_incarnation()
    }
}

/// A node on a [`FailingStore`]; stopped with the returned sender.
struct FailingNode {
    url: String,
    http: reqwest::Client,
    failing: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
    fail_next: Arc<AtomicUsize>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), NodeError>>,
}

impl FailingNode {
    async fn start(config: NodeConfig) -> FailingNode {
        std::fs::create_dir_all(&config.data_dir).unwrap();
        let inner = RedbStore::open(config.data_dir.join("bunting.redb")).unwrap();
        let failing = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let fail_next = Arc::new(AtomicUsize::new(0));
        let store = Arc::new(FailingStore {
            inner,
            failing: failing.clone(),
            hold: hold.clone(),
            fail_next: fail_next.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(serve_with_store(listener, config, store, async {
            let _ = rx.await;
        }));
        let http = reqwest::Client::new();
        for _ in 0..3000 {
            assert!(!task.is_finished(), "node stopped while starting");
            if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        FailingNode {
            url,
            http,
            failing,
            hold,
            fail_next,
            stop,
            task,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN);
        if let Some(b) = body {
            r = r.json(&b);
        }
        status_json(r.send().await.unwrap()).await
    }

    async fn put(&self, key: &str, variant: &str) -> (u16, Value) {
        let flag = json!({"state": "ENABLED", "variants": {"v": variant}, "defaultVariant": "v"});
        self.call(
            Method::PUT,
            &format!("/api/v1/flagsets/default/flags/{key}"),
            Some(flag),
        )
        .await
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_write_queued_behind_a_failed_one_is_refused_even_though_the_disk_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let node = Arc::new(FailingNode::start(config(dir.path())).await);
    // The first write's append waits on a slow disk, then fails; the disk works after that.
    node.hold.store(true, Ordering::SeqCst);
    node.fail_next.store(1, Ordering::SeqCst);
    let first = tokio::spawn({
        let node = node.clone();
        async move { node.put("first", "a").await }
    });
    let path = "/api/v1/flagsets/default/flags/first";
    eventually_reads(&node, path, |status, _| status == 200).await;
    // The second write is made on top of the first (it patches the first's flag) and queued.
    let second = tokio::spawn({
        let node = node.clone();
        async move {
            node.call(
                Method::POST,
                "/api/v1/flagsets/default/flags/first/toggle",
                Some(json!({"state": "DISABLED"})),
            )
            .await
        }
    });
    eventually_reads(&node, path, |_, flag| flag["state"] == json!("DISABLED")).await;
    // The disk recovers before the second write's turn; it is refused all the same.
    node.hold.store(false, Ordering::SeqCst);
    let (status, body) = first.await.unwrap();
    assert_eq!(status, 503, "{body}");
    let (status, body) = second.await.unwrap();
    assert_eq!(status, 503, "a write on top of an unstored change: {body}");
    let (status, _) = node.call(Method::GET, path, None).await;
    assert_eq!(status, 404);
    assert_eq!(node.put("after", "c").await.0, 200);
    let Ok(node) = Arc::try_unwrap(node) else {
        panic!("node still shared");
    };
    node.stop().await;
    let restarted = TestNode::start(config(dir.path())).await;
    let (_, doc) = restarted
        .call(Method::GET, "/api/v1/flagsets/default", Some(ADMIN), None)
        .await;
    assert!(!served(&doc, "first"));
    assert!(served(&doc, "after"));
    restarted.stop().await.unwrap();
}

/// Finding 7: a write that times out was applied; the answer says so, and a retry with the same
/// key gets the write's real outcome instead of applying it twice.
#[tokio::test]
async fn a_write_not_stored_by_its_deadline_answers_pending_and_its_retry_gets_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.limits.request_timeout_ms = 1_500;
    let node = FailingNode::start(config).await;
    node.hold.store(true, Ordering::SeqCst);
    let toggle = || {
        node.http
            .post(format!(
                "{}/api/v1/flagsets/default/flags/new-banner/toggle",
                node.url
            ))
            .bearer_auth(ADMIN)
            .header("Idempotency-Key", "slow-toggle")
    };
    let (status, body) = status_json(toggle().send().await.unwrap()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["applied"], json!("pending"), "{body}");
    assert_eq!(body["idempotencyKey"], json!("slow-toggle"), "{body}");
    node.hold.store(false, Ordering::SeqCst);
    let (status, body) = status_json(toggle().send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let (_, flag) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/default/flags/new-banner",
            None,
        )
        .await;
    assert_eq!(
        flag["state"],
        json!("DISABLED"),
        "toggled twice or not at all"
    );
    node.stop().await;
}

/// Finding 1: the node must stop (SIGTERM, graceful shutdown) even while its store hangs.
#[tokio::test]
async fn shutdown_finishes_while_the_store_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.limits.request_timeout_ms = 1_500;
    let node = FailingNode::start(config).await;
    node.hold.store(true, Ordering::SeqCst);
    let (status, _) = node.put("stuck", "x").await;
    assert_eq!(status, 503);
    let hold = node.hold.clone();
    // An upper bound far above the node's grace period, so a hang fails instead of blocking CI.
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(120), node.stop()).await;
    hold.store(false, Ordering::SeqCst);
    assert!(
        stopped.is_ok(),
        "the node did not stop while its store hung"
    );
}

/// Waits until an admin GET of `path` answers what `wanted` accepts (status, body): the
/// node's document holds a write, whether or not it is stored yet.
async fn eventually_reads(node: &FailingNode, path: &str, wanted: impl Fn(u16, &Value) -> bool) {
    for _ in 0..3000 {
        let (status, body) = node.call(Method::GET, path, None).await;
        if wanted(status, &body) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("{path} never read as wanted");
}

fn served(document: &Value, key: &str) -> bool {
    document["flags"][key].is_object()
}

#[tokio::test]
async fn a_write_the_store_refuses_is_taken_back_and_nothing_is_acknowledged_on_top_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = FailingNode::start(config(dir.path())).await;
    assert_eq!(node.put("kept-before", "a").await.0, 200);

    node.failing.store(true, Ordering::SeqCst);
    let (status, body) = node.put("refused", "b").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["applied"], json!(false), "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("stored")
            || body.to_string().contains("not applied"),
        "{body}"
    );
    // A toggle of a flag that exists is refused the same way, and changes nothing.
    let (status, _) = node
        .call(
            Method::POST,
            "/api/v1/flagsets/default/flags/kept-before/toggle",
            Some(json!({"state": "DISABLED"})),
        )
        .await;
    assert_eq!(status, 503);

    // Nothing refused is served, and the node still answers.
    let (status, _) = node
        .call(Method::GET, "/api/v1/flagsets/default/flags/refused", None)
        .await;
    assert_eq!(status, 404, "a refused write is served");
    let (status, flag) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/default/flags/kept-before",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(flag["state"], json!("ENABLED"));

    // The disk recovers: the next write is stored and served.
    node.failing.store(false, Ordering::SeqCst);
    assert_eq!(node.put("kept-after", "c").await.0, 200);
    node.stop().await;

    // A restart (on a plain redb store) has every acknowledged write and nothing else.
    let restarted = TestNode::start(config(dir.path())).await;
    let (status, doc) = restarted
        .call(Method::GET, "/api/v1/flagsets/default", Some(ADMIN), None)
        .await;
    assert_eq!(status, 200);
    assert!(served(&doc, "kept-before"));
    assert!(served(&doc, "kept-after"));
    assert!(!served(&doc, "refused"), "a refused write came back");
    assert_eq!(doc["flags"]["kept-before"]["state"], json!("ENABLED"));
    restarted.stop().await.unwrap();
}

/// Finding 1's exact shape: a 1.25 MB rule (and a 1.1 MB object variant) inside every API limit.
#[tokio::test]
async fn one_large_legal_write_is_stored_and_the_node_keeps_serving_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(config(dir.path())).await;
    let (status, body) = node
        .call(
            Method::POST,
            "/api/v1/flagsets",
            Some(ADMIN),
            Some(json!({"name": "big"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let users: Vec<String> = (0..90_000).map(|i| format!("user-{i}")).collect();
    let bigin = json!({"state": "ENABLED", "variants": {"on": "on", "off": "off"},
        "defaultVariant": "off",
        "targeting": {"if": [{"in": [{"var": "u"}, users]}, "on", "off"]}});
    assert!(bigin.to_string().len() > 1_150_000, "about 1.2 MB of JSON");
    let (status, body) = node
        .call(
            Method::PUT,
            "/api/v1/flagsets/big/flags/bigin",
            Some(ADMIN),
            Some(bigin),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let blob: serde_json::Map<String, Value> = (0..40_000)
        .map(|i| (format!("setting-{i}"), json!(format!("value-{i}"))))
        .collect();
    let config_blob =
        json!({"state": "ENABLED", "variants": {"config": blob}, "defaultVariant": "config"});
    assert!(config_blob.to_string().len() > 1_100_000);
    let (status, body) = node
        .call(
            Method::PUT,
            "/api/v1/flagsets/big/flags/blob",
            Some(ADMIN),
            Some(config_blob),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let small = json!({"state": "ENABLED", "variants": {"v": "small"}, "defaultVariant": "v"});
    let (status, _) = node
        .call(
            Method::PUT,
            "/api/v1/flagsets/big/flags/small",
            Some(ADMIN),
            Some(small),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = node.evaluate("new-banner", ADMIN, json!({})).await;
    assert_eq!(status, 200, "{body}");
    // A graceful stop finishes, and a restart serves all three.
    node.stop().await.unwrap();
    let node = TestNode::start(config(dir.path())).await;
    for key in ["bigin", "blob", "small"] {
        let (status, _) = node
            .call(
                Method::GET,
                &format!("/api/v1/flagsets/big/flags/{key}"),
                Some(ADMIN),
                None,
            )
            .await;
        assert_eq!(status, 200, "{key} lost after a restart");
    }
    node.stop().await.unwrap();
}

/// Finding 7: a retried toggle with the same Idempotency-Key applies nothing new.
#[tokio::test]
async fn a_retried_write_with_the_same_idempotency_key_applies_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(config(dir.path())).await;
    let toggle = |key: &'static str| {
        node.request(
            Method::POST,
            "/api/v1/flagsets/default/flags/new-banner/toggle",
            Some(ADMIN),
        )
        .header("Idempotency-Key", key)
    };
    let first = status_json(toggle("flip-1").send().await.unwrap()).await;
    assert_eq!(first.0, 200, "{}", first.1);
    let retry = status_json(toggle("flip-1").send().await.unwrap()).await;
    assert_eq!(retry, first, "a retry got another answer");
    let (_, flag) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/default/flags/new-banner",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(
        flag["state"],
        json!("DISABLED"),
        "the retry flipped it back"
    );
    // Another key is another write.
    let second = status_json(toggle("flip-2").send().await.unwrap()).await;
    assert_eq!(second.0, 200);
    let (_, flag) = node
        .call(
            Method::GET,
            "/api/v1/flagsets/default/flags/new-banner",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(flag["state"], json!("ENABLED"));
    // The same key for a different write is refused, not silently answered.
    let other = node
        .request(
            Method::POST,
            "/api/v1/flagsets/default/flags/old-checkout/toggle",
            Some(ADMIN),
        )
        .header("Idempotency-Key", "flip-1");
    let (status, body) = status_json(other.send().await.unwrap()).await;
    assert_eq!(status, 422, "{body}");
    node.stop().await.unwrap();
}
