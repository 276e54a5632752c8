//! A flag written in one region is served by the other regions' OFREP endpoints: three regions
//! of one real node each, gossiping over QUIC. Prints the measured delay.
#![allow(clippy::unwrap_used)] // tests: a failed setup should panic loudly

use std::time::{Duration, Instant};

use bunting_e2e::{eventually, wait_all_ready, ClusterPlan, ADMIN};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_written_in_one_region_is_served_in_the_others() {
    let plan = ClusterPlan::new(
        &[
            ("east", &[("east-1", 131)]),
            ("west", &[("west-1", 132)]),
            ("south", &[("south-1", 133)]),
        ],
        false,
    )
    .await;
    let mut nodes = plan.start_all();
    wait_all_ready(&mut nodes).await;

    let flag = json!({
        "state": "ENABLED",
        "variants": {"on": "from-east", "off": "nothing"},
        "defaultVariant": "on"
    });
    let started = Instant::now();
    assert_eq!(nodes[0].put_flag("cross-region", flag).await, 200);
    for node in &nodes[1..] {
        eventually(Duration::from_secs(20), &node.id, async || {
            match node
                .value("cross-region", json!({"targetingKey": "u"}))
                .await
            {
                Some(v) if v == "from-east" => Ok(()),
                other => Err(format!("serves {other:?}")),
            }
        })
        .await;
        println!(
            "{} serves the write made on {} after {:?}",
            node.id,
            nodes[0].id,
            started.elapsed()
        );
    }

    // Node status lists every configured peer: connected, with bytes both ways and a last
    // successful sync (links may still be coming up under load, hence the wait).
    eventually(
        Duration::from_secs(20),
        "all peers connected and synced",
        async || {
            let status = nodes[1].status().await;
            let peers = status["cluster"]["peers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let healthy = |p: &Value| {
                p["connected"] == json!(true)
                    && p["bytesSent"].as_u64() > Some(0)
                    && p["bytesReceived"].as_u64() > Some(0)
                    && p["lastSyncUnixMs"].as_u64().is_some()
            };
            if peers.len() == 2 && peers.iter().all(healthy) {
                Ok(())
            } else {
                Err(status.to_string())
            }
        },
    )
    .await;
    let metrics = nodes[1]
        .http
        .get(format!("{}/metrics", nodes[1].url))
        .bearer_auth(ADMIN)
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
