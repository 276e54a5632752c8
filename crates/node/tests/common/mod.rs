//! A real node on 127.0.0.1 port 0, driven over real HTTP.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use bunting_node::{serve, NodeConfig, NodeError, StoreBackend};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN: &str = "admin-secret-for-tests-0123456789abcdef";

/// The flags every end-to-end test starts from: one flag of each type, targeting, a disabled one.
pub const FLAGS: &str = r##"{
  "metadata": {"flagSetId": "shop"},
  "flags": {
    "new-banner": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                   "targeting": {"if": [{"ends_with": [{"var": "email"}, "@example.com"]}, "on", null]},
                   "metadata": {"owner": "growth"}},
    "button-color": {"state": "ENABLED", "variants": {"green": "#1B873F", "blue": "#0969DA"}, "defaultVariant": "green"},
    "page-size": {"state": "ENABLED", "variants": {"small": 10, "large": 50}, "defaultVariant": "small",
                  "targeting": {"if": [{"==": [{"var": "plan"}, "enterprise"]}, "large", null]}},
    "ratio": {"state": "ENABLED", "variants": {"half": 0.5}, "defaultVariant": "half"},
    "pricing": {"state": "ENABLED", "variants": {"control": {"monthly": 9.99, "trialDays": 14}}, "defaultVariant": "control"},
    "old-checkout": {"state": "DISABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}
  }
}"##;

pub fn config(dir: &Path) -> NodeConfig {
    let flags = dir.join("flags.json");
    if !flags.exists() {
        std::fs::write(&flags, FLAGS).unwrap();
    }
    let mut c = NodeConfig {
        node_id: "test-node".into(),
        region: "test".into(),
        data_dir: dir.join("data"),
        store: StoreBackend::Redb,
        flags_file: Some(flags),
        admin_token: Some(ADMIN.into()),
        ..NodeConfig::default()
    };
    c.limits.max_evaluation_body_bytes = 16 * 1024;
    c
}

pub struct TestNode {
    pub url: String,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), NodeError>>>,
}

impl TestNode {
    pub async fn start(config: NodeConfig) -> TestNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(serve(listener, config, async {
            let _ = rx.await;
        }));
        let mut node = TestNode {
            url,
            http: reqwest::Client::new(),
            stop: Some(tx),
            task: Some(task),
        };
        for _ in 0..3000 {
            if node.task.as_ref().unwrap().is_finished() {
                let result = node.task.take().unwrap().await.unwrap();
                panic!("node stopped while starting: {result:?}");
            }
            if let Ok(r) = node.http.get(format!("{}/readyz", node.url)).send().await {
                if r.status() == 200 {
                    return node;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("node did not become ready");
    }

    pub async fn wait_ready(&self) {
        for _ in 0..3000 {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("node did not become ready");
    }

    /// Graceful shutdown; returns what `serve` returned.
    pub async fn stop(mut self) -> Result<(), NodeError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }

    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let mut r = self.http.request(method, format!("{}{}", self.url, path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// `(status, JSON body or Null)`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self.request(method, path, token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        status_json(r.send().await.unwrap()).await
    }

    pub async fn evaluate(&self, key: &str, token: &str, context: Value) -> (u16, Value) {
        self.call(
            Method::POST,
            &format!("/ofrep/v1/evaluate/flags/{key}"),
            Some(token),
            Some(json!({"context": context})),
        )
        .await
    }

    /// Creates a token over the admin API and returns `(id, secret)`.
    pub async fn token(&self, scopes: &[&str], flag_sets: &[&str]) -> (String, String) {
        let (status, body) = self
            .call(
                Method::POST,
                "/api/v1/tokens",
                Some(ADMIN),
                Some(json!({"name": "test", "scopes": scopes, "flagSets": flag_sets})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["id"].as_str().unwrap().to_owned(),
            body["token"].as_str().unwrap().to_owned(),
        )
    }

    /// The stored flag set exactly as the admin API downloads it, with its heads.
    pub async fn stored(&self, set: &str) -> (String, String) {
        let r = self
            .request(Method::GET, &format!("/api/v1/flagsets/{set}"), Some(ADMIN))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let etag = r.headers()["etag"].to_str().unwrap().to_owned();
        (r.text().await.unwrap(), etag)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn status_json(r: Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
