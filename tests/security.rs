//! Gossip admission across real processes: a node whose certificate comes from another CA is
//! refused both ways (never connected, its flags never arrive), and garbage datagrams at a
//! node's gossip port do not disturb its other connections.
#![allow(clippy::unwrap_used)] // tests: a failed setup should panic loudly

use std::net::UdpSocket;
use std::time::Duration;

use bunting_e2e::{eventually, init_ca, issue_cert, string_flag, ClusterPlan, Node};
use serde_json::{json, Value};

/// The status entry of `peer` on `node`.
async fn peer_entry(node: &Node, peer: &str) -> Value {
    let status = node.status().await;
    status["cluster"]["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["peer"] == peer).cloned())
        .unwrap_or(Value::Null)
}

/// Panics if either cluster node lists the intruder as connected.
async fn intruder_never_connected(nodes: &[&Node]) {
    for node in nodes {
        let connected = node.connected_peers().await;
        assert!(
            !connected.iter().any(|p| p == "intruder-1"),
            "{} is connected to the intruder",
            node.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_from_another_ca_is_refused_and_garbage_does_not_disturb_the_links() {
    // The intruder is in the region files (so a wrong CA, not an unknown name, must stop it).
    let plan = ClusterPlan::new(
        &[(
            "guarded",
            &[("guard-1", 121), ("guard-2", 122), ("intruder-1", 123)],
        )],
        false,
    )
    .await;
    let intruder_index = plan.index("intruder-1");
    let other_ca = plan.dir.path().join("other-ca");
    init_ca(&other_ca);
    let intruder_tls = plan.node_dir(intruder_index).join("tls");
    std::fs::remove_dir_all(&intruder_tls).unwrap();
    issue_cert(&other_ca, "intruder-1", &intruder_tls);
    // It holds a flag from the start, which must never reach the cluster.
    let flags = plan.dir.path().join("intruder-flags.json");
    let intruder_flags = json!({"flags": {"intruder-flag": string_flag(&["evil"], "evil")}});
    std::fs::write(&flags, intruder_flags.to_string()).unwrap();

    let mut g1 = plan.start(plan.index("guard-1"), &[]);
    let mut g2 = plan.start(plan.index("guard-2"), &[]);
    let mut intruder = plan.start(intruder_index, &["--flags", flags.to_str().unwrap()]);
    g1.wait_ready().await;
    g2.wait_ready().await;
    intruder.wait_ready().await;
    assert_eq!(
        intruder.value("intruder-flag", json!({})).await,
        Some(json!("evil"))
    );

    // Both directions were tried and failed: the intruder's dial is refused by the guards'
    // handshake, and the guards' dials to it fail on its certificate.
    for guard in [&g1, &g2] {
        eventually(
            Duration::from_secs(30),
            "handshakes with the intruder fail",
            async || {
                let status = guard.status().await;
                let refused = status["cluster"]["handshakesFailed"].as_u64().unwrap_or(0);
                let entry = peer_entry(guard, "intruder-1").await;
                let dial_failures = entry["dialFailures"].as_u64().unwrap_or(0);
                if refused >= 1 && dial_failures >= 1 {
                    Ok(())
                } else {
                    Err(format!(
                        "refused {refused}, dial failures {dial_failures}: {entry}"
                    ))
                }
            },
        )
        .await;
        intruder_never_connected(&[&g1, &g2]).await;
    }
    assert!(intruder.connected_peers().await.is_empty());

    // The guards gossip with each other.
    assert_eq!(
        g1.put_flag("guarded-flag", string_flag(&["one"], "one"))
            .await,
        200
    );
    eventually(
        Duration::from_secs(30),
        "guard-2 serves guard-1's write",
        async || match g2.value("guarded-flag", json!({})).await {
            Some(v) if v == "one" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    let before = peer_entry(&g1, "guard-2").await;
    assert_eq!(before["connected"], json!(true), "{before}");

    // Garbage at guard-1's gossip port: random bytes, and a long-header packet with junk.
    let gossip = plan.nodes[plan.index("guard-1")].gossip;
    let socket = UdpSocket::bind("127.0.0.124:0").unwrap();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..200u32 {
        let mut datagram = vec![0u8; 40 + (i as usize * 7) % 1200];
        for byte in &mut datagram {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *byte = seed as u8;
        }
        if i % 2 == 0 {
            // QUIC long header, version 1, Initial.
            datagram[0] = 0xc0;
            datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
        }
        socket.send_to(&datagram, gossip).unwrap();
    }

    // A write still propagates, over the same connection as before.
    assert_eq!(
        g2.put_flag("after-garbage", string_flag(&["two"], "two"))
            .await,
        200
    );
    eventually(
        Duration::from_secs(30),
        "guard-1 serves guard-2's write",
        async || match g1.value("after-garbage", json!({})).await {
            Some(v) if v == "two" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    let after = peer_entry(&g1, "guard-2").await;
    assert_eq!(after["connected"], json!(true), "{after}");
    assert_eq!(
        after["connections"], before["connections"],
        "the link to guard-2 was re-established: {before} → {after}"
    );
    assert!(g1.status().await["ready"] == json!(true));

    // The intruder's flag never arrived anywhere, and it never got in.
    for guard in [&g1, &g2] {
        let (status, body) = guard.evaluate("intruder-flag", json!({})).await;
        assert_eq!(status, 404, "{}: {body}", guard.id);
    }
    intruder_never_connected(&[&g1, &g2]).await;
    assert!(intruder.connected_peers().await.is_empty());
}
