//! Partition across real processes: three regions of two nodes, each node behind a UDP relay the
//! test controls. Region C is cut off; both sides keep answering OFREP and accepting writes,
//! including conflicting writes to one field; after the heal all six nodes hold identical heads,
//! give identical answers, and every node's admin API lists the conflict.
#![allow(clippy::unwrap_used)] // tests: a failed setup should panic loudly

use std::time::Duration;

use bunting_e2e::{eventually, string_flag, wait_all_ready, ClusterPlan, Node};
use reqwest::Method;
use serde_json::{json, Value};

fn is_2xx(status: u16) -> bool {
    (200..300).contains(&status)
}

/// Waits until `node` serves `value` for `key`.
async fn serves(node: &Node, key: &str, value: &str) {
    eventually(
        Duration::from_secs(30),
        &format!("{} serves {key}={value}", node.id),
        async || match node.value(key, json!({"targetingKey": "probe"})).await {
            Some(v) if v == value => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
}

/// The bulk OFREP answer's flags for `context`.
async fn bulk(node: &Node, context: &Value) -> Value {
    let (status, body) = node
        .call(
            Method::POST,
            "/ofrep/v1/evaluate/flags",
            Some(json!({ "context": context })),
        )
        .await;
    assert_eq!(status, 200, "{}: {body}", node.id);
    body["flags"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_cut_off_keeps_serving_and_accepting_writes_and_converges_after_the_heal() {
    let plan = ClusterPlan::new(
        &[
            ("region-a", &[("a-1", 101), ("a-2", 102)]),
            ("region-b", &[("b-1", 103), ("b-2", 104)]),
            ("region-c", &[("c-1", 105), ("c-2", 106)]),
        ],
        true,
    )
    .await;
    let mut nodes = plan.start_all();
    wait_all_ready(&mut nodes).await;
    let (ab, c): (Vec<&Node>, Vec<&Node>) = nodes.iter().partition(|n| !n.id.starts_with("c-"));
    let [a1, _a2, _b1, b2, c1, c2] = [0, 1, 2, 3, 4, 5].map(|i| &nodes[i]);

    let color = string_flag(&["red", "blue", "green"], "red");
    assert!(is_2xx(a1.put_flag("color", color).await));
    for node in &nodes {
        serves(node, "color", "red").await;
    }

    plan.cut_off("region-c");
    // Conflicting writes to one field, one on each side, and one write per side elsewhere.
    assert!(is_2xx(
        a1.patch_flag("color", json!({"defaultVariant": "blue"}))
            .await
    ));
    assert!(is_2xx(
        c1.patch_flag("color", json!({"defaultVariant": "green"}))
            .await
    ));
    assert!(is_2xx(
        b2.put_flag("only-ab", string_flag(&["ab"], "ab")).await
    ));
    assert!(is_2xx(
        c2.put_flag("only-c", string_flag(&["c"], "c")).await
    ));
    // Each side spreads its writes within itself and keeps answering.
    for node in &ab {
        serves(node, "color", "blue").await;
        serves(node, "only-ab", "ab").await;
    }
    for node in &c {
        serves(node, "color", "green").await;
        serves(node, "only-c", "c").await;
    }
    // Nothing crossed the cut: each side still answers with its own writes only.
    for node in &ab {
        let (status, body) = node.evaluate("only-c", json!({})).await;
        assert_eq!(status, 404, "{} sees region C's write: {body}", node.id);
        assert_eq!(node.value("color", json!({})).await, Some(json!("blue")));
    }
    for node in &c {
        let (status, body) = node.evaluate("only-ab", json!({})).await;
        assert_eq!(status, 404, "{} sees region A/B's write: {body}", node.id);
        assert_eq!(node.value("color", json!({})).await, Some(json!("green")));
    }
    let (_, dropped) = plan.relays[plan.index("c-1")].counts();
    assert!(dropped > 0, "the relay in front of c-1 dropped nothing");

    plan.heal();
    let heads = eventually(
        Duration::from_secs(40),
        "identical heads on six nodes",
        async || {
            let mut all = Vec::new();
            for node in &nodes {
                all.push(node.heads("default").await);
            }
            match all.first() {
                Some(Some(first)) if all.iter().all(|h| h.as_ref() == Some(first)) => {
                    Ok(first.clone())
                }
                _ => Err(format!("{all:?}")),
            }
        },
    )
    .await;
    // The two sides wrote concurrently: the merged document has more than one head.
    assert!(heads.as_array().map_or(0, Vec::len) >= 2, "{heads}");

    for context in [
        json!({}),
        json!({"targetingKey": "user-1"}),
        json!({"targetingKey": "user-2", "email": "x@example.com", "plan": "enterprise"}),
    ] {
        let reference = bulk(&nodes[0], &context).await;
        let keys: Vec<&str> = reference
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["key"].as_str())
            .collect();
        assert!(
            keys.contains(&"only-ab") && keys.contains(&"only-c") && keys.contains(&"color"),
            "{reference}"
        );
        for node in &nodes[1..] {
            assert_eq!(
                bulk(node, &context).await,
                reference,
                "{} answers differently",
                node.id
            );
        }
    }
    let winner = nodes[0].value("color", json!({})).await.unwrap();
    assert!(winner == "blue" || winner == "green", "{winner}");

    for node in &nodes {
        let (status, body) = node
            .call(Method::GET, "/api/v1/flagsets/default/conflicts", None)
            .await;
        assert_eq!(status, 200);
        let conflicts = body["conflicts"].as_array().unwrap();
        let color = conflicts
            .iter()
            .find(|c| c["pointer"].as_str().is_some_and(|p| p.contains("color")))
            .unwrap_or_else(|| panic!("{} lists no conflict on color: {body}", node.id));
        let text = color.to_string();
        assert!(text.contains("blue") && text.contains("green"), "{text}");
        assert_eq!(color["values"].as_array().map(Vec::len), Some(2), "{text}");
    }
}
