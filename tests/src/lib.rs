//! The end-to-end harness: real `bunting serve` processes on 127.0.0.x loopback addresses,
//! gossiping over QUIC with certificates made by `bunting certs`, optionally behind a UDP
//! [`Relay`] each so a test can cut regions off and heal them.
//!
//! Owns: finding (or building once) the `bunting` binary, the CA and node certificates, region
//! files for a test's own cluster, starting nodes (killed when dropped, on every path), waiting
//! for readiness, and small HTTP helpers for the admin API, node status and OFREP.
//!
//! Never does: anything inside a node. Tests see nodes only through their processes and HTTP,
//! as an operator would.
//!
//! Each test file uses its own block of 127.0.0.x addresses (ports are picked free on them), so
//! test binaries and tests may run in parallel: propagation .131-.133, partition .101-.106,
//! crash .111-.113, security .121-.124, stale .141, flood .161-.163, the benchmark .151-.156.
#![allow(clippy::unwrap_used)] // test harness: a failed setup should panic loudly

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use bunting_gossip::relay::Relay;
use reqwest::Method;
use serde_json::{json, Value};

/// The bootstrap admin token every test node gets.
pub const ADMIN: &str = "e2e-admin-token-0123456789abcdef0123";

/// How long a node may take to become ready on a loaded machine.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// The `bunting` binary next to the running test executable (`target/<profile>/bunting`); when
/// it is missing, `cargo build -p bunting-node --bin bunting` runs once first.
pub fn bunting() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test> or target/<profile>/examples/<example>
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
        let bin = profile_dir.join(format!("bunting{}", std::env::consts::EXE_SUFFIX));
        if !bin.exists() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "-p", "bunting-node", "--bin", "bunting"]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            let status = build.status().unwrap();
            assert!(status.success(), "building the bunting binary failed");
        }
        assert!(bin.exists(), "{} is missing", bin.display());
        bin
    })
}

/// Runs `bunting ARGS` to completion and panics with its stderr when it fails.
pub fn run_bunting(args: &[&str]) -> String {
    let out = Command::new(bunting()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "bunting {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `bunting certs init --dir DIR`: a new cluster CA.
pub fn init_ca(dir: &Path) {
    run_bunting(&["certs", "init", "--dir", dir.to_str().unwrap()]);
}

/// `bunting certs issue`: a certificate for `node` signed by the CA in `ca`, written to `out`.
pub fn issue_cert(ca: &Path, node: &str, out: &Path) {
    run_bunting(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--node",
        node,
        "--out",
        out.to_str().unwrap(),
    ]);
}

/// 127.0.0.`last`.
pub fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A free TCP port and a free UDP port on `ip` (Linux routes all of 127/8 to loopback).
pub fn free_ports(ip: IpAddr) -> (SocketAddr, SocketAddr) {
    let tcp = TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
    let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
    (tcp.local_addr().unwrap(), udp.local_addr().unwrap())
}

/// One node of a test cluster.
#[derive(Debug, Clone)]
pub struct NodePlan {
    pub id: String,
    pub region: String,
    pub ip: IpAddr,
    pub http: SocketAddr,
    /// Where the node listens for gossip.
    pub gossip: SocketAddr,
    /// Where peers dial it: its relay when it has one.
    pub dial: Option<SocketAddr>,
}

/// A test cluster's files: a temp dir with the CA, the region files and one dir per node.
pub struct ClusterPlan {
    pub dir: tempfile::TempDir,
    pub regions: PathBuf,
    pub ca: PathBuf,
    pub nodes: Vec<NodePlan>,
    /// One relay per node (same order as `nodes`) when planned with relays.
    pub relays: Vec<Relay>,
}

impl ClusterPlan {
    /// Plans `layout` (region name → node ids and the last byte of their 127.0.0.x address),
    /// creates a CA, node certificates and the region files. With `relays`, a UDP relay on
    /// each node's address fronts its gossip port and the region files make peers dial it.
    pub async fn new(layout: &[(&str, &[(&str, u8)])], relays: bool) -> ClusterPlan {
        let dir = tempfile::tempdir().unwrap();
        let regions = dir.path().join("regions");
        std::fs::create_dir_all(&regions).unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca);
        let mut nodes = Vec::new();
        let mut relay_list = Vec::new();
        for (region, members) in layout {
            let mut text = format!("region = \"{region}\"\n");
            for (id, last) in *members {
                let ip = loopback(*last);
                let (http, gossip) = free_ports(ip);
                let dial = if relays {
                    let relay = Relay::start(SocketAddr::new(ip, 0), gossip).await.unwrap();
                    let addr = relay.local_addr();
                    relay_list.push(relay);
                    Some(addr)
                } else {
                    None
                };
                text.push_str(&format!(
                    "\n[[node]]\nid = \"{id}\"\nhttp = \"{http}\"\ngossip = \"{gossip}\"\n"
                ));
                if let Some(dial) = dial {
                    text.push_str(&format!("dial = \"{dial}\"\n"));
                }
                issue_cert(&ca, id, &dir.path().join(id).join("tls"));
                nodes.push(NodePlan {
                    id: (*id).to_owned(),
                    region: (*region).to_owned(),
                    ip,
                    http,
                    gossip,
                    dial,
                });
            }
            std::fs::write(regions.join(format!("{region}.toml")), text).unwrap();
        }
        ClusterPlan {
            dir,
            regions,
            ca,
            nodes,
            relays: relay_list,
        }
    }

    /// The node planned as `id`.
    pub fn index(&self, id: &str) -> usize {
        self.nodes.iter().position(|n| n.id == id).unwrap()
    }

    /// Node `i`'s directory (data, certificates, log).
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.nodes[i].id)
    }

    /// Starts node `i` (redb store in its directory) with `extra` arguments to `bunting serve`.
    pub fn start(&self, i: usize, extra: &[&str]) -> Node {
        let plan = &self.nodes[i];
        let dir = self.node_dir(i);
        Node::start(
            &plan.id,
            plan.http,
            &dir,
            &[
                "--regions",
                self.regions.to_str().unwrap(),
                "--tls-dir",
                dir.join("tls").to_str().unwrap(),
            ],
            extra,
        )
    }

    /// Starts every node.
    pub fn start_all(&self) -> Vec<Node> {
        (0..self.nodes.len()).map(|i| self.start(i, &[])).collect()
    }

    /// Cuts the nodes of `region` off from every other node (both directions), through the
    /// relays; links inside the region stay up.
    pub fn cut_off(&self, region: &str) {
        let inside: Vec<IpAddr> = self
            .nodes
            .iter()
            .filter(|n| n.region == region)
            .map(|n| n.ip)
            .collect();
        let outside: Vec<IpAddr> = self
            .nodes
            .iter()
            .filter(|n| n.region != region)
            .map(|n| n.ip)
            .collect();
        for (node, relay) in self.nodes.iter().zip(&self.relays) {
            if node.region == region {
                relay.block(outside.iter().copied());
            } else {
                relay.block(inside.iter().copied());
            }
        }
    }

    /// Adds `delay` each way to every link between nodes of different regions (through the
    /// relays); links inside a region stay as fast as loopback.
    pub fn delay_between_regions(&self, delay: Duration) {
        for (node, relay) in self.nodes.iter().zip(&self.relays) {
            let others = self
                .nodes
                .iter()
                .filter(|n| n.region != node.region)
                .map(|n| n.ip);
            relay.set_delay_for(others, delay);
        }
    }

    /// Undoes every cut.
    pub fn heal(&self) {
        for relay in &self.relays {
            relay.unblock_all();
        }
    }
}

/// A running `bunting serve` process; SIGKILLed when dropped.
pub struct Node {
    pub id: String,
    pub url: String,
    pub dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    pub http: reqwest::Client,
}

impl Node {
    /// `bunting serve --node-id ID --http HTTP --data-dir DIR/data --store redb ARGS EXTRA`, with
    /// the bootstrap admin token, logging (warnings and up) to `DIR/bunting.log`.
    pub fn start(id: &str, http: SocketAddr, dir: &Path, args: &[&str], extra: &[&str]) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.join("bunting.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(bunting())
            .args(["serve", "--node-id", id, "--http", &http.to_string()])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--store", "redb"])
            .args(args)
            .args(extra)
            .env("BUNTING_ADMIN_TOKEN", ADMIN)
            .env("RUST_LOG", "warn")
            .env_remove("BUNTING_CONFIG")
            .env_remove("BUNTING_FLAGS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Node {
            id: id.to_owned(),
            url: format!("http://{http}"),
            dir: dir.to_owned(),
            child: Some(child),
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    /// SIGKILL, no goodbye: what a crash or an OOM kill looks like to the cluster.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until `/readyz` answers 200; panics (with the log) after [`READY_WITHIN`] or when
    /// the process exits.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "{} exited ({status}) while starting:\n{}",
                        self.id,
                        self.log()
                    );
                }
            }
            if let Ok(r) = self.http.get(format!("{}/readyz", self.url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {READY_WITHIN:?}:\n{}",
                self.id,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node's log so far (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `(status, JSON body or Null)` of an admin-token request; status 0 when the request failed.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(ADMIN, method, path, body).await
    }

    /// Like [`Node::call`] with another token.
    pub async fn call_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        match request.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    /// `PUT /api/v1/flagsets/default/flags/{key}`; returns the status (0 when the request failed).
    pub async fn put_flag(&self, key: &str, flag: Value) -> u16 {
        let path = format!("/api/v1/flagsets/default/flags/{key}");
        self.call(Method::PUT, &path, Some(flag)).await.0
    }

    /// `PATCH /api/v1/flagsets/default/flags/{key}`; returns the status.
    pub async fn patch_flag(&self, key: &str, patch: Value) -> u16 {
        let path = format!("/api/v1/flagsets/default/flags/{key}");
        self.call(Method::PATCH, &path, Some(patch)).await.0
    }

    /// OFREP single-flag evaluation with the admin token: `(status, body)`.
    pub async fn evaluate(&self, key: &str, context: Value) -> (u16, Value) {
        let path = format!("/ofrep/v1/evaluate/flags/{key}");
        self.call(Method::POST, &path, Some(json!({ "context": context })))
            .await
    }

    /// The value OFREP serves for `key` in `context`, if it serves one.
    pub async fn value(&self, key: &str, context: Value) -> Option<Value> {
        let (status, body) = self.evaluate(key, context).await;
        (status == 200)
            .then(|| body.get("value").cloned())
            .flatten()
    }

    /// `GET /api/v1/status`.
    pub async fn status(&self) -> Value {
        self.call(Method::GET, "/api/v1/status", None).await.1
    }

    /// The heads of flag set `set` as node status reports them.
    pub async fn heads(&self, set: &str) -> Option<Value> {
        let status = self.status().await;
        status["flagSets"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == set)
            .map(|s| s["heads"].clone())
    }

    /// The ids of the peers node status lists as connected.
    pub async fn connected_peers(&self) -> Vec<String> {
        let status = self.status().await;
        status["cluster"]["peers"]
            .as_array()
            .map(|peers| {
                peers
                    .iter()
                    .filter(|p| p["connected"] == json!(true))
                    .filter_map(|p| p["peer"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            if !tail.is_empty() {
                eprintln!("--- last log lines of {} ---", self.id);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// Waits until every node is ready.
pub async fn wait_all_ready(nodes: &mut [Node]) {
    for node in nodes {
        node.wait_ready().await;
    }
}

/// Retries `check` every 50 ms until it returns `Ok`; panics with `what` and the last error after
/// `within`.
pub async fn eventually<T>(
    within: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) => {
                assert!(
                    Instant::now() < deadline,
                    "{what}: not within {within:?}; last: {last}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A flag with string variants, serving `default`.
pub fn string_flag(variants: &[&str], default: &str) -> Value {
    let variants: serde_json::Map<String, Value> = variants
        .iter()
        .map(|v| ((*v).to_owned(), json!(v)))
        .collect();
    json!({"state": "ENABLED", "variants": variants, "defaultVariant": default})
}
