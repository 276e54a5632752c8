//! Staleness across real processes: a node whose peers never come up reports itself stale after
//! `--stale-after-ms` (still ready and serving), on `/readyz`, in node status, on `/metrics` and
//! in OFREP metadata; once a peer connects it is fresh again.
#![allow(clippy::unwrap_used)] // tests: a failed setup should panic loudly

use std::time::Duration;

use bunting_e2e::{eventually, ClusterPlan, Node, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};

/// What the node says about its staleness: (readyz status, readyz header, readyz body,
/// node status, bulk OFREP flag-set metadata, single-flag metadata, metrics line).
async fn observe(node: &Node) -> (u16, bool, String, Value, Value, Value, bool) {
    let r = node
        .http
        .get(format!("{}/readyz", node.url))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let header = r
        .headers()
        .get("bunting-stale")
        .is_some_and(|v| v == "true");
    let body = r.text().await.unwrap();
    let cluster = node.status().await["cluster"].clone();
    let (_, bulk) = node
        .call(
            Method::POST,
            "/ofrep/v1/evaluate/flags",
            Some(json!({"context": {}})),
        )
        .await;
    let (_, single) = node.evaluate("lonely-flag", json!({})).await;
    let metrics = node
        .http
        .get(format!("{}/metrics", node.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (
        status,
        header,
        body,
        cluster,
        bulk["metadata"].clone(),
        single["metadata"].clone(),
        metrics.contains("\nbunting_stale 1\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_hears_from_no_peer_says_it_is_stale_until_one_connects() {
    let plan = ClusterPlan::new(
        &[("lonely", &[("lonely-1", 141), ("lonely-2", 142)])],
        false,
    )
    .await;
    let mut first = plan.start(0, &["--stale-after-ms", "1500"]);
    first.wait_ready().await;
    let flag = json!({"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on",
                      "metadata": {"owner": "ops"}});
    assert_eq!(first.put_flag("lonely-flag", flag).await, 200);

    eventually(
        Duration::from_secs(30),
        "lonely-1 reports stale",
        async || {
            let seen = observe(&first).await;
            let (status, header, body, cluster, bulk_meta, flag_meta, metric) = &seen;
            let stale = *status == 200
                && *header
                && body.starts_with("stale")
                && cluster["stale"] == json!(true)
                && bulk_meta["bunting.stale"] == json!(true)
                && flag_meta["bunting.stale"] == json!(true)
                && flag_meta["owner"] == json!("ops")
                && *metric;
            if stale {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        },
    )
    .await;
    // Still serving while stale.
    assert_eq!(
        first.value("lonely-flag", json!({})).await,
        Some(json!(true))
    );

    let mut second = plan.start(1, &["--stale-after-ms", "1500"]);
    second.wait_ready().await;
    eventually(
        Duration::from_secs(30),
        "lonely-1 is fresh again",
        async || {
            let seen = observe(&first).await;
            let (status, header, body, cluster, bulk_meta, flag_meta, metric) = &seen;
            let fresh = *status == 200
                && !*header
                && body == "ready"
                && cluster["stale"] == json!(false)
                && bulk_meta.get("bunting.stale").is_none()
                && flag_meta.get("bunting.stale").is_none()
                && !*metric;
            if fresh {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        },
    )
    .await;
    // And the write it took while alone reached its peer.
    eventually(
        Duration::from_secs(30),
        "lonely-2 serves lonely-1's write",
        async || match second.value("lonely-flag", json!({})).await {
            Some(Value::Bool(true)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
}
