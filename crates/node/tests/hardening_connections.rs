//! Issue #12, finding 5: thousands of idle, silent or trickling connections from one client used
//! to exhaust the node's descriptors, so `/healthz` and OFREP timed out for everyone. Now one
//! client address holds at most its cap, the rest are closed at once, slow clients are closed after
//! the header-read and idle timeouts, and other clients are served throughout.
#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestNode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Generous upper bound for anything the server should do soon; never the thing asserted.
const PATIENCE: Duration = Duration::from_secs(30);

fn node_addr(node: &TestNode) -> SocketAddr {
    node.url.trim_start_matches("http://").parse().unwrap()
}

async fn connect_from(local: &str, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local.parse::<IpAddr>().unwrap(), 0))?;
    socket.connect(server).await
}

/// Sends one HTTP/1.1 request from `local` on a new connection and returns the status code.
async fn status_from(local: &str, server: SocketAddr, head: &str, body: &str) -> u16 {
    let mut conn = connect_from(local, server).await.unwrap();
    let request = format!(
        "{head}\r\nHost: node\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, conn.read_to_end(&mut response))
        .await
        .expect("no answer")
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    text.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0)
}

/// Waits until the server closes `conn` (a read returns 0 or an error); returns the bytes read
/// before that. Panics after [`PATIENCE`].
async fn wait_closed(conn: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept the connection open");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_idle_connections_cannot_starve_another_address() {
    // Server and client sockets both live in this process.
    let fds = bunting_node::listener::raise_fd_limit().unwrap_or(1024);
    let cap = 100usize;
    let flood = usize::try_from(fds.saturating_sub(400) / 2)
        .unwrap_or(usize::MAX)
        .min(2_000);
    assert!(
        flood > 2 * cap,
        "open-file limit {fds} too low for this test"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.limits.max_connections = 10_000;
    config.limits.max_connections_per_address = cap;
    // Longer than the test: every connection closed here is closed by the cap.
    config.limits.header_read_timeout_ms = 600_000;
    config.limits.idle_timeout_ms = 600_000;
    let node = TestNode::start(config).await;
    let (_, key) = node.token(&["evaluate"], &["default"]).await;
    let server = node_addr(&node);

    // 127.0.0.1 opens `flood` connections and sends nothing; each is watched for a close.
    let closed = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::new();
    for _ in 0..flood {
        let mut conn = connect_from("127.0.0.1", server).await.unwrap();
        let closed = closed.clone();
        held.push(tokio::spawn(async move {
            let mut buf = [0u8; 64];
            if let Ok(0) | Err(_) = conn.read(&mut buf).await {
                closed.fetch_add(1, Ordering::SeqCst);
            }
            conn
        }));
    }
    // All but `cap` are closed at once (the test client's own pooled connection takes a slot or
    // two of 127.0.0.1's cap as well).
    let refused_at_least = flood - cap;
    tokio::time::timeout(PATIENCE, async {
        while closed.load(Ordering::SeqCst) < refused_at_least {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connections beyond the per-address cap were not closed");

    // Meanwhile another client address gets its answers.
    assert_eq!(
        status_from("127.0.0.2", server, "GET /healthz HTTP/1.1", "").await,
        200
    );
    let body = r#"{"context":{"targetingKey":"u-1"}}"#;
    let ofrep = format!(
        "POST /ofrep/v1/evaluate/flags/button-color HTTP/1.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json"
    );
    assert_eq!(status_from("127.0.0.2", server, &ofrep, body).await, 200);

    // The ones within the cap were held open all along.
    let still_open = flood - closed.load(Ordering::SeqCst);
    assert!(
        still_open + 5 >= cap && still_open <= cap,
        "{still_open} of {flood} connections open with a cap of {cap}"
    );
    for h in held {
        h.abort();
    }
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_trickling_and_idle_connections_are_closed_after_their_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.limits.header_read_timeout_ms = 300;
    config.limits.idle_timeout_ms = 500;
    let node = TestNode::start(config).await;
    let server = node_addr(&node);

    // Never sends a byte.
    let mut silent = connect_from("127.0.0.1", server).await.unwrap();

    // Sends a header byte every 50 ms, well inside both timeouts, for as long as it can.
    let mut trickle = connect_from("127.0.0.1", server).await.unwrap();
    trickle
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\nX-Slow: ")
        .await
        .unwrap();
    let (mut trickle_read, mut trickle_write) = trickle.into_split();
    let trickler = tokio::spawn(async move {
        let mut sent = 0u32;
        while trickle_write.write_all(b"a").await.is_ok() {
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent
    });

    // One request answered, then the connection is kept alive and left idle.
    let mut idle = connect_from("127.0.0.1", server).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).ends_with("ok") {
        let n = tokio::time::timeout(PATIENCE, idle.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));

    assert!(wait_closed(&mut silent).await.is_empty());
    let mut trickled = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, trickle_read.read_to_end(&mut trickled)).await;
    assert!(closed.is_ok(), "a trickling head kept its connection open");
    assert!(
        !String::from_utf8_lossy(&trickled).contains(" 200 "),
        "a head that never ended was answered"
    );
    // The writer ends once the server has closed the connection; it had kept sending till then.
    let sent = tokio::time::timeout(PATIENCE, trickler)
        .await
        .expect("the trickling writer was never refused")
        .unwrap();
    assert!(sent > 0);
    assert!(wait_closed(&mut idle).await.is_empty());

    // The node still serves new connections.
    assert_eq!(
        status_from("127.0.0.2", server, "GET /healthz HTTP/1.1", "").await,
        200
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_idle_and_silent_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.limits.header_read_timeout_ms = 600_000;
    config.limits.idle_timeout_ms = 600_000;
    let node = TestNode::start(config).await;
    let server = node_addr(&node);
    let mut silent = connect_from("127.0.0.1", server).await.unwrap();
    let mut idle = connect_from("127.0.0.1", server).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(PATIENCE, idle.read(&mut buf))
        .await
        .expect("no answer")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // `serve` returns only when every connection is closed; the timeouts are far away.
    tokio::time::timeout(PATIENCE, node.stop())
        .await
        .expect("shutdown waited on idle connections")
        .unwrap();
    let mut rest = [0u8; 16];
    assert!(matches!(silent.read(&mut rest).await, Ok(0) | Err(_)));
    assert!(matches!(idle.read(&mut rest).await, Ok(0) | Err(_)));
}
