//! End to end across real processes: a small cluster of `bunting serve` on 127.0.0.x loopback
//! addresses, gossiping over QUIC with certificates from `bunting certs`. A flag written in one
//! region is served by another region's OFREP endpoint.
#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_bunting");
const ADMIN: &str = "cluster-test-admin";

/// Kills the child processes even when an assertion fails.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free TCP port and a free UDP port on `ip` (Linux routes all of 127/8 to loopback).
fn free_ports(ip: [u8; 4]) -> (SocketAddr, SocketAddr) {
    let tcp = TcpListener::bind(SocketAddr::from((ip, 0))).unwrap();
    let udp = UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap();
    (tcp.local_addr().unwrap(), udp.local_addr().unwrap())
}

fn run(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "bunting {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_region(dir: &Path, region: &str, nodes: &[(&str, SocketAddr, SocketAddr)]) {
    let mut text = format!("region = \"{region}\"\n");
    for (id, http, gossip) in nodes {
        text.push_str(&format!(
            "\n[[node]]\nid = \"{id}\"\nhttp = \"{http}\"\ngossip = \"{gossip}\"\n"
        ));
    }
    std::fs::write(dir.join(format!("{region}.toml")), text).unwrap();
}

async fn wait_ready(http: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn evaluate(http: &reqwest::Client, url: &str, key: &str) -> Option<Value> {
    let r = http
        .post(format!("{url}/ofrep/v1/evaluate/flags/{key}"))
        .bearer_auth(ADMIN)
        .json(&json!({"context": {"targetingKey": "user-1"}}))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let body: Value = r.json().await.ok()?;
    body.get("value").cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_written_in_one_region_is_served_in_another() {
    let dir = tempfile::tempdir().unwrap();
    let regions = dir.path().join("regions");
    std::fs::create_dir_all(&regions).unwrap();
    let nodes = [
        ("east", "east-1", [127, 0, 0, 61]),
        ("west", "west-1", [127, 0, 0, 71]),
        ("south", "south-1", [127, 0, 0, 81]),
    ];
    let ca = dir.path().join("ca");
    run(&["certs", "init", "--dir", ca.to_str().unwrap()]);
    let mut urls = Vec::new();
    let mut specs = Vec::new();
    for (region, id, ip) in nodes {
        let (http, gossip) = free_ports(ip);
        write_region(&regions, region, &[(id, http, gossip)]);
        let out = dir.path().join(id).join("tls");
        run(&[
            "certs",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--node",
            id,
            "--out",
            out.to_str().unwrap(),
        ]);
        specs.push((region, id, http, out));
        urls.push(format!("http://{http}"));
    }
    let mut children = Processes(Vec::new());
    for (region, id, http, tls) in &specs {
        let child = Command::new(BIN)
            .args(["serve", "--http", &http.to_string(), "--node-id", id])
            .args(["--region", region, "--store", "memory"])
            .arg("--data-dir")
            .arg(dir.path().join(id))
            .arg("--regions")
            .arg(&regions)
            .arg("--tls-dir")
            .arg(tls)
            .env("BUNTING_ADMIN_TOKEN", ADMIN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        children.0.push(child);
    }
    let http = reqwest::Client::new();
    for url in &urls {
        wait_ready(&http, url).await;
    }

    let flag = json!({
        "state": "ENABLED",
        "variants": {"on": "from-east", "off": "nothing"},
        "defaultVariant": "on"
    });
    let started = Instant::now();
    let r = http
        .put(format!(
            "{}/api/v1/flagsets/default/flags/cross-region",
            urls[0]
        ))
        .bearer_auth(ADMIN)
        .json(&flag)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "write refused: {}", r.status());

    for (i, url) in urls.iter().enumerate().skip(1) {
        let deadline = started + Duration::from_secs(20);
        loop {
            if evaluate(&http, url, "cross-region").await == Some(json!("from-east")) {
                println!(
                    "{} serves the write made on {} after {:?}",
                    specs[i].1,
                    specs[0].1,
                    started.elapsed()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not serve the flag within 20 s",
                specs[i].1
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // Node status lists every configured peer, and each is connected (links may still be
    // coming up under load, hence the wait).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status: Value = http
            .get(format!("{}/api/v1/status", urls[1]))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let peers = status["cluster"]["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 2, "{status}");
        if peers.iter().all(|p| p["connected"] == json!(true)) {
            break;
        }
        assert!(Instant::now() < deadline, "peers not connected: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = http
        .get(format!("{}/metrics", urls[1]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("bunting_peer_connected{peer=\"east-1\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("bunting_peer_bytes_received_total{peer=\"east-1\"}"));
}
