//! Propagation across real processes: six `bunting serve` nodes (three regions of two) on
//! 127.0.0.151-156, each behind a UDP relay. A flag is written on region A's first node N times;
//! after each write, region C's first node is polled over OFREP until it serves the new value.
//! Prints p50/p99/max of the delay (from sending the write, and from its acknowledgement) and the
//! gossip bytes per write summed over the whole cluster.
//!
//! ```text
//! cargo build --release -p bunting-node --bin bunting
//! cargo run --release -p bunting-e2e --example propagation                   # loopback
//! cargo run --release -p bunting-e2e --example propagation -- --delay-ms 50  # 50 ms one way between regions
//! ```
#![allow(clippy::unwrap_used)] // a benchmark: a failed setup should panic loudly

use std::time::{Duration, Instant};

use bunting_e2e::{eventually, string_flag, wait_all_ready, ClusterPlan, Node};
use serde_json::{json, Value};

/// Options: `--delay-ms N` (one-way, between regions), `--writes N`, `--gap-ms N` between writes.
struct Options {
    delay_ms: u64,
    writes: usize,
    gap_ms: u64,
}

fn options() -> Options {
    let mut o = Options {
        delay_ms: 0,
        writes: 100,
        gap_ms: 100,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).and_then(|v| v.parse::<u64>().ok());
        match (pair[0].as_str(), value) {
            ("--delay-ms", Some(v)) => o.delay_ms = v,
            ("--writes", Some(v)) => o.writes = v.try_into().unwrap(),
            ("--gap-ms", Some(v)) => o.gap_ms = v,
            _ => panic!("usage: propagation [--delay-ms N] [--writes N] [--gap-ms N]"),
        }
    }
    o
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name}: n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        samples.len(),
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 99.0)),
        ms(*samples.last().unwrap())
    );
}

/// Gossip frame bytes sent by every node to every peer, summed.
async fn cluster_bytes_sent(nodes: &[Node]) -> u64 {
    let mut total = 0;
    for node in nodes {
        let status = node.status().await;
        for peer in status["cluster"]["peers"].as_array().into_iter().flatten() {
            total += peer["bytesSent"].as_u64().unwrap_or(0);
        }
    }
    total
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = options();
    let plan = ClusterPlan::new(
        &[
            ("region-a", &[("a-1", 151), ("a-2", 152)]),
            ("region-b", &[("b-1", 153), ("b-2", 154)]),
            ("region-c", &[("c-1", 155), ("c-2", 156)]),
        ],
        true,
    )
    .await;
    plan.delay_between_regions(Duration::from_millis(o.delay_ms));
    let mut nodes = plan.start_all();
    wait_all_ready(&mut nodes).await;
    let (a, c) = (&nodes[0], &nodes[4]);
    let context = json!({"targetingKey": "bench"});

    // Warm up: every node serves the flag and every link is up.
    assert_eq!(a.put_flag("bench", string_flag(&["v0"], "v0")).await, 200);
    for node in &nodes {
        eventually(Duration::from_secs(60), &node.id, async || {
            let peers = node.connected_peers().await.len();
            match node.value("bench", context.clone()).await {
                Some(v) if v == "v0" && peers == 5 => Ok(()),
                other => Err(format!("{other:?}, {peers} peers connected")),
            }
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let bytes_before = cluster_bytes_sent(&nodes).await;
    let mut from_send = Vec::with_capacity(o.writes);
    let mut from_ack = Vec::with_capacity(o.writes);
    for i in 1..=o.writes {
        let value = format!("v{i}");
        let flag: Value =
            json!({"state": "ENABLED", "variants": {"v": value}, "defaultVariant": "v"});
        let sent = Instant::now();
        assert_eq!(a.put_flag("bench", flag).await, 200);
        let acked = Instant::now();
        let deadline = sent + Duration::from_secs(10);
        loop {
            if c.value("bench", context.clone()).await == Some(json!(value)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "write {i} not served in region C within 10 s"
            );
            // Poll every millisecond, not flat out: on 2 cores a busy poller would take the CPU
            // the six nodes need and measure itself.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let seen = Instant::now();
        from_send.push(seen - sent);
        from_ack.push(seen - acked);
        tokio::time::sleep(Duration::from_millis(o.gap_ms)).await;
    }
    // Let the last exchanges (acknowledging sync messages) finish before counting bytes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bytes_after = cluster_bytes_sent(&nodes).await;

    println!(
        "propagation a-1 -> c-1, 6 nodes, {} ms one-way delay between regions, {} writes {} ms apart",
        o.delay_ms, o.writes, o.gap_ms
    );
    summary("from write sent", from_send);
    summary("from write acknowledged", from_ack);
    println!(
        "gossip frame bytes per one-field write, whole cluster: {}",
        (bytes_after - bytes_before) / o.writes as u64
    );
}
