//! Crash across real processes: a node is SIGKILLed while a client keeps writing to it. After a
//! restart on the same data directory every write it acknowledged is there, and it catches up
//! on what the other nodes accepted while it was down.
#![allow(clippy::unwrap_used)] // tests: a failed setup should panic loudly

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bunting_e2e::{eventually, string_flag, wait_all_ready, ClusterPlan, Node, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};

/// The keys of every flag `node` evaluates (bulk OFREP, status 0 when it does not answer).
async fn served_keys(node: &Node) -> Result<BTreeSet<String>, String> {
    let (status, body) = node
        .call(
            Method::POST,
            "/ofrep/v1/evaluate/flags",
            Some(json!({"context": {}})),
        )
        .await;
    if status != 200 {
        return Err(format!("{}: bulk evaluation answered {status}", node.id));
    }
    Ok(body["flags"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f.get("value").is_some())
        .filter_map(|f| f["key"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_write_keeps_every_acknowledged_write_and_catches_up() {
    let plan = ClusterPlan::new(
        &[
            ("east", &[("victim-1", 111)]),
            ("west", &[("west-1", 112), ("west-2", 113)]),
        ],
        false,
    )
    .await;
    let mut nodes = plan.start_all();
    wait_all_ready(&mut nodes).await;
    let victim = plan.index("victim-1");

    // A client writes one new flag after another to the victim and records every 2xx.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        let url = nodes[victim].url.clone();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        tokio::spawn(async move {
            let mut failures = 0;
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    return failures;
                }
                let key = format!("acked-{i}");
                let sent = http
                    .put(format!("{url}/api/v1/flagsets/default/flags/{key}"))
                    .bearer_auth(ADMIN)
                    .json(&string_flag(&["v"], "v"))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => acknowledged.lock().unwrap().push(key),
                    _ => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            failures
        })
    };
    eventually(
        Duration::from_secs(30),
        "20 acknowledged writes",
        async || match acknowledged.lock().unwrap().len() {
            n if n >= 20 => Ok(()),
            n => Err(format!("{n} so far")),
        },
    )
    .await;
    nodes[victim].kill();
    // The client keeps trying against the dead node for a moment; nothing more is acknowledged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let failures = writer.await.unwrap();
    assert!(
        failures > 0,
        "no write failed after the kill: was the node killed?"
    );
    let acknowledged: Vec<String> = acknowledged.lock().unwrap().clone();
    println!("{} writes acknowledged before the kill", acknowledged.len());

    // While it is down, the others accept writes.
    let west = plan.index("west-1");
    let status = nodes[west]
        .put_flag("while-down", string_flag(&["missed"], "missed"))
        .await;
    assert_eq!(status, 200);
    // acked-0 reached west-1 by replication, maybe only now: wait for it before patching it.
    eventually(
        Duration::from_secs(30),
        "west-1 holds acked-0",
        async || match nodes[west].value("acked-0", json!({})).await {
            Some(_) => Ok(()),
            None => Err("not yet".to_owned()),
        },
    )
    .await;
    let patch = json!({"defaultVariant": "v", "variants": {"v": "patched-while-down"}});
    assert_eq!(nodes[west].patch_flag("acked-0", patch).await, 200);

    nodes[victim] = plan.start(victim, &[]);
    nodes[victim].wait_ready().await;
    // Everything it acknowledged is there as soon as it is ready (from its own disk).
    let served = served_keys(&nodes[victim]).await.unwrap();
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|k| !served.contains(*k))
        .collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");

    // And it catches up on what it missed; the three nodes converge.
    eventually(
        Duration::from_secs(30),
        "the victim catches up",
        async || {
            let node = &nodes[victim];
            let patched = node.value("acked-0", json!({})).await;
            let missed = node.value("while-down", json!({})).await;
            if patched == Some(json!("patched-while-down")) && missed == Some(json!("missed")) {
                Ok(())
            } else {
                Err(format!("acked-0={patched:?} while-down={missed:?}"))
            }
        },
    )
    .await;
    eventually(Duration::from_secs(30), "identical heads", async || {
        let mut heads: Vec<Option<Value>> = Vec::new();
        for node in &nodes {
            heads.push(node.heads("default").await);
        }
        if heads[0].is_some() && heads.iter().all(|h| *h == heads[0]) {
            Ok(())
        } else {
            Err(format!("{heads:?}"))
        }
    })
    .await;
    for node in &nodes {
        let served = served_keys(node).await.unwrap();
        for key in &acknowledged {
            assert!(served.contains(key), "{} lacks {key}", node.id);
        }
    }
}
