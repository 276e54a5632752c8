//! Issue #12, finding 5, with its exact shape against a real `bunting serve`: one client opens
//! ~20,400 idle TCP connections (it used to exhaust the node's descriptors: "accept error: Too
//! many open files", and `/healthz` and OFREP timed out for everyone). Now the node holds at most
//! its per-address cap of that client's connections, closes the rest at once, and another client
//! gets its health and OFREP answers throughout.
#![allow(clippy::unwrap_used)] // tests: a failed setup should panic loudly

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bunting_e2e::{eventually, free_ports, loopback, string_flag, Node, ADMIN};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// The finding's count of idle connections.
const FLOOD: usize = 20_400;
/// Connections opened before waiting for the node to close those past the cap: keeps this
/// process's own descriptors far below its limit.
const BATCH: usize = 1_000;
/// The node's default `max_connections_per_address`.
const PER_ADDRESS_CAP: usize = 1_024;

async fn connect_from(local: IpAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(server).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_idle_connections_from_one_client_do_not_starve_another() {
    let fds = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    assert!(
        fds >= (PER_ADDRESS_CAP + BATCH + 256) as u64,
        "open-file limit {fds} too low for this test"
    );
    let dir = tempfile::tempdir().unwrap();
    let (http, _) = free_ports(loopback(161));
    let mut node = Node::start("flood-1", http, dir.path(), &[], &[]);
    node.wait_ready().await;
    assert_eq!(
        node.put_flag("greeting", string_flag(&["hi", "yo"], "hi"))
            .await,
        200
    );
    let flooder = loopback(163);
    let other = reqwest::Client::builder()
        .local_address(loopback(162))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // Every connection is watched: a read that ends means the node closed it.
    let closed = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::new();
    let mut opened = 0;
    while opened < FLOOD {
        for _ in 0..BATCH.min(FLOOD - opened) {
            let mut conn = connect_from(flooder, http).await.unwrap();
            opened += 1;
            let closed = closed.clone();
            held.push(tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if let Ok(0) | Err(_) = conn.read(&mut buf).await {
                    closed.fetch_add(1, Ordering::SeqCst);
                    return None;
                }
                Some(conn)
            }));
        }
        // Everything past the cap is closed at once.
        let must_be_closed = opened.saturating_sub(PER_ADDRESS_CAP);
        eventually(
            Duration::from_secs(60),
            "the node closes connections past the per-address cap",
            async || {
                let n = closed.load(Ordering::SeqCst);
                if n >= must_be_closed {
                    Ok(())
                } else {
                    Err(format!("{n} of {opened} closed"))
                }
            },
        )
        .await;
        // Meanwhile another client is answered.
        let health = other
            .get(format!("{}/healthz", node.url))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
    }
    let still_open = FLOOD - closed.load(Ordering::SeqCst);
    assert!(
        still_open <= PER_ADDRESS_CAP && still_open + 5 >= PER_ADDRESS_CAP,
        "{still_open} of {FLOOD} idle connections open with a per-address cap of {PER_ADDRESS_CAP}"
    );

    // With the flooder's connections held, another client evaluates and writes.
    let answer = other
        .post(format!("{}/ofrep/v1/evaluate/flags/greeting", node.url))
        .bearer_auth(ADMIN)
        .json(&json!({"context": {"targetingKey": "u-1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<serde_json::Value>().await.unwrap()["value"],
        "hi"
    );
    assert_eq!(
        node.put_flag("greeting", string_flag(&["hi", "yo"], "yo"))
            .await,
        200
    );
    assert!(
        !node.log().contains("Too many open files"),
        "the node ran out of descriptors:\n{}",
        node.log()
    );
    for h in held {
        h.abort();
    }
}
