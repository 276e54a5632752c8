//! Gossip stories over real QUIC on 127.0.0.1: real replicas, each owned by a small driver task
//! shaped like the node's (events in → replica, transmits → `Gossip::send`), with in-memory
//! persistence that confirms every persist request at once.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use bunting_model::{Flag, FlagState};
use bunting_replica::{
    ChangeHash, Event, Replica, ReplicaConfig, StoredFlagSet, Timestamp, WriteCommand, WriteMeta,
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::cluster::{Cluster, DEFAULT_LINKS_PER_REGION};
use crate::*;

const SET: &str = "production";
/// Generous bound for anything to happen on loopback; tests never assert on durations.
const PATIENCE: Duration = Duration::from_secs(30);

/// A cluster CA in a temporary directory, issuing node identities on demand.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        certs::init_ca(&dir.path().join("ca")).unwrap();
        Pki { dir }
    }

    fn node(&self, name: &str) -> NodeTls {
        let out: PathBuf = self.dir.path().join(name);
        if !out.exists() {
            certs::issue(&self.dir.path().join("ca"), name, &out).unwrap();
        }
        NodeTls::load(&out).unwrap()
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca").join(certs::CA_CERT_FILE)).unwrap()
    }

    fn node_pem(&self, name: &str) -> (String, String) {
        self.node(name);
        let dir = self.dir.path().join(name);
        (
            std::fs::read_to_string(dir.join(certs::NODE_CERT_FILE)).unwrap(),
            std::fs::read_to_string(dir.join(certs::NODE_KEY_FILE)).unwrap(),
        )
    }
}

/// What a node "stored": survives a restart of the test node.
#[derive(Debug, Default)]
struct Disk {
    changes: BTreeMap<String, Vec<Vec<u8>>>,
    sync: BTreeMap<(String, PeerId), Vec<u8>>,
    incarnation: u64,
}

impl Disk {
    fn stored(&self) -> Vec<StoredFlagSet> {
        self.changes
            .iter()
            .map(|(name, changes)| StoredFlagSet {
                name: name.clone(),
                snapshot: None,
                changes: changes.clone(),
                sync_states: self
                    .sync
                    .iter()
                    .filter(|((set, _), _)| set == name)
                    .map(|((_, peer), state)| (peer.clone(), state.clone()))
                    .collect(),
            })
            .collect()
    }
}

enum Cmd {
    Write(Box<WriteCommand>, oneshot::Sender<bool>),
    Heads(oneshot::Sender<Vec<ChangeHash>>),
    Flag(String, oneshot::Sender<Option<Flag>>),
    Stop(oneshot::Sender<Disk>),
}

struct TestNode {
    gossip: Gossip,
    cmds: mpsc::Sender<Cmd>,
}

fn bind() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").unwrap()
}

fn quick(mut config: GossipConfig) -> GossipConfig {
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(500);
    config
}

impl TestNode {
    fn start(
        name: &str,
        tls: &NodeTls,
        socket: UdpSocket,
        peers: Vec<(PeerId, SocketAddr)>,
        disk: Disk,
        anti_entropy_ms: u64,
    ) -> TestNode {
        let config = quick(GossipConfig::new(PeerId(name.into()), peers));
        TestNode::start_with(config, tls, socket, disk, anti_entropy_ms)
    }

    fn start_with(
        config: GossipConfig,
        tls: &NodeTls,
        socket: UdpSocket,
        mut disk: Disk,
        anti_entropy_ms: u64,
    ) -> TestNode {
        disk.incarnation += 1;
        let mut replica_config =
            ReplicaConfig::new(config.node.0.clone(), "test-region", disk.incarnation);
        replica_config.anti_entropy_interval_ms = anti_entropy_ms;
        let replica = Replica::restore(replica_config, disk.stored(), Timestamp(0)).unwrap();
        let (gossip, events) = Gossip::start(config, tls, socket).unwrap();
        let (cmds, cmd_rx) = mpsc::channel(16);
        tokio::spawn(drive(replica, gossip.clone(), events, cmd_rx, disk));
        TestNode { gossip, cmds }
    }

    async fn write(&self, command: WriteCommand) {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Write(Box::new(command), tx)).await;
        assert!(rx.await.unwrap(), "write refused");
    }

    async fn heads(&self) -> Vec<ChangeHash> {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Heads(tx)).await;
        rx.await.unwrap()
    }

    async fn flag(&self, key: &str) -> Option<Flag> {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Flag(key.into(), tx)).await;
        rx.await.unwrap()
    }

    async fn stop(self) -> Disk {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Stop(tx)).await;
        let disk = rx.await.unwrap();
        self.gossip.shutdown().await;
        disk
    }

    fn peer_stats(&self, peer: &str) -> PeerStats {
        self.gossip.stats().peers[&PeerId(peer.into())].clone()
    }
}

/// The driver: the single owner of the replica, as in the node.
async fn drive(
    mut replica: Replica,
    gossip: Gossip,
    mut events: mpsc::Receiver<GossipEvent>,
    mut cmds: mpsc::Receiver<Cmd>,
    mut disk: Disk,
) {
    let start = Instant::now();
    let now = || Timestamp(u64::try_from(start.elapsed().as_millis()).unwrap());
    loop {
        let timer = replica
            .poll_timeout()
            .map(|t| start + Duration::from_millis(t.0))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            event = events.recv() => match event {
                Some(GossipEvent::Connected(peer)) => replica.add_peer(peer, now()),
                Some(GossipEvent::Disconnected(peer)) => replica.remove_peer(&peer),
                Some(GossipEvent::Frame { peer, bytes }) => replica.handle_message(&peer, &bytes, now()),
                None => return,
            },
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Write(command, reply)) => {
                    let meta = WriteMeta { token_id: "test".into(), wall_time_ms: now().0, message: "test".into() };
                    let ok = replica.handle_local_write(SET, (*command).into(), meta, now()).is_ok();
                    let _ = reply.send(ok);
                }
                Some(Cmd::Heads(reply)) => {
                    let _ = reply.send(replica.flag_set(SET).map(|d| d.heads()).unwrap_or_default());
                }
                Some(Cmd::Flag(key, reply)) => {
                    let _ = reply.send(replica.flag_set(SET).and_then(|d| d.flag(&key)));
                }
                Some(Cmd::Stop(reply)) => {
                    let _ = reply.send(disk);
                    return;
                }
                None => return,
            },
            _ = tokio::time::sleep_until(timer) => replica.handle_timeout(now()),
        }
        while let Some(event) = replica.poll_event() {
            match event {
                Event::PersistRequest(p) => {
                    disk.changes
                        .entry(p.flag_set.clone())
                        .or_default()
                        .extend(p.changes);
                    for (peer, state) in p.sync_states {
                        disk.sync.insert((p.flag_set.clone(), peer), state);
                    }
                    replica.persisted(p.id, now()).unwrap();
                }
                Event::ProtocolError { peer, error } => {
                    gossip.reject_peer(&peer, &error.to_string())
                }
                _ => {}
            }
        }
        while let Some((peer, frame)) = replica.poll_transmit() {
            let _ = gossip.send(&peer, frame);
        }
    }
}

fn flag(default: &str) -> Flag {
    Flag::from_value(
        &json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": default}),
        "",
    )
    .unwrap()
}

fn put(key: &str) -> WriteCommand {
    WriteCommand::PutFlag {
        key: key.into(),
        flag: flag("on"),
    }
}

fn disable(key: &str) -> WriteCommand {
    WriteCommand::SetState {
        key: key.into(),
        state: FlagState::Disabled,
    }
}

fn peers(list: &[(&str, SocketAddr)]) -> Vec<(PeerId, SocketAddr)> {
    list.iter()
        .map(|(n, a)| (PeerId((*n).into()), *a))
        .collect()
}

/// Waits until every node has the same non-empty heads; panics after `PATIENCE`.
async fn converge(nodes: &[&TestNode]) -> Vec<ChangeHash> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut all = Vec::new();
        for node in nodes {
            all.push(node.heads().await);
        }
        if !all[0].is_empty() && all.iter().all(|h| *h == all[0]) {
            return all.swap_remove(0);
        }
        assert!(Instant::now() < deadline, "no convergence: {all:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `check` holds; panics with `what` after `PATIENCE`.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `x` and `y` agree on one connection between them and no dial is under way (the
/// simultaneous dials of a start are resolved).
async fn settle(x: &Gossip, x_name: &str, y: &Gossip, y_name: &str) {
    let mut calm = 0;
    let deadline = Instant::now() + PATIENCE;
    while calm < 10 {
        let xy = x.stats().peers[&PeerId(y_name.into())].clone();
        let yx = y.stats().peers[&PeerId(x_name.into())].clone();
        let agreed = xy.connected
            && yx.connected
            && xy.outgoing.map(|o| !o) == yx.outgoing
            && !xy.dialing
            && !yx.dialing;
        calm = if agreed { calm + 1 } else { 0 };
        assert!(Instant::now() < deadline, "{x_name}–{y_name} never settled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_converge_after_writes_on_each() {
    let pki = Pki::new();
    let (sa, sb) = (bind(), bind());
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let a = TestNode::start(
        "a",
        &pki.node("a"),
        sa,
        peers(&[("b", ab)]),
        Disk::default(),
        1_000,
    );
    let b = TestNode::start(
        "b",
        &pki.node("b"),
        sb,
        peers(&[("a", aa)]),
        Disk::default(),
        1_000,
    );

    a.write(put("banner")).await;
    b.write(put("checkout")).await;
    converge(&[&a, &b]).await;
    for node in [&a, &b] {
        assert!(node.flag("banner").await.is_some());
        assert!(node.flag("checkout").await.is_some());
    }
    settle(&a.gossip, "a", &b.gossip, "b").await;
    let (ab, ba) = (a.peer_stats("b"), b.peer_stats("a"));
    assert!(ab.connected && ab.frames_received > 0 && ab.bytes_sent > 0);
    assert_eq!(ab.frames_rejected, 0);
    // One connection per peer: both ends keep the same one, whoever dialed it.
    assert_eq!(ab.outgoing.map(|o| !o), ba.outgoing, "{ab:?} / {ba:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_including_a_conflicting_write() {
    let pki = Pki::new();
    let sockets = [bind(), bind(), bind()];
    let addrs: Vec<SocketAddr> = sockets.iter().map(|s| s.local_addr().unwrap()).collect();
    let names = ["a", "b", "c"];
    let mut nodes = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let others = (0..3)
            .filter(|&j| j != i)
            .map(|j| (PeerId(names[j].into()), addrs[j]))
            .collect();
        nodes.push(TestNode::start(
            names[i],
            &pki.node(names[i]),
            socket,
            others,
            Disk::default(),
            1_000,
        ));
    }
    nodes[0].write(put("shared")).await;
    converge(&[&nodes[0], &nodes[1], &nodes[2]]).await;
    for (i, node) in nodes.iter().enumerate() {
        node.write(put(&format!("only-{i}"))).await;
    }
    // Two regions flip the same field at once.
    nodes[1].write(disable("shared")).await;
    nodes[2]
        .write(WriteCommand::SetDefaultVariant {
            key: "shared".into(),
            default_variant: bunting_model::DefaultVariant::Key("off".into()),
        })
        .await;
    converge(&[&nodes[0], &nodes[1], &nodes[2]]).await;
    let reference = nodes[0].flag("shared").await;
    for node in &nodes {
        assert_eq!(node.flag("shared").await, reference);
        for i in 0..3 {
            assert!(node.flag(&format!("only-{i}")).await.is_some());
        }
    }
    let shared = reference.unwrap();
    assert_eq!(
        shared.state,
        FlagState::Disabled,
        "both field edits survive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let other = Pki::new();
    let (sa, se) = (bind(), bind());
    let (aa, ae) = (sa.local_addr().unwrap(), se.local_addr().unwrap());
    let a = TestNode::start(
        "a",
        &pki.node("a"),
        sa,
        peers(&[("e", ae)]),
        Disk::default(),
        1_000,
    );
    // The intruder trusts the cluster CA (so it would accept `a`), but its own certificate is
    // from another CA with the right node name.
    let (cert, key) = other.node_pem("e");
    let intruder_tls = NodeTls::from_pem(&pki.ca_pem(), &cert, &key).unwrap();
    let (intruder, mut intruder_events) = Gossip::start(
        quick(GossipConfig::new(PeerId("e".into()), peers(&[("a", aa)]))),
        &intruder_tls,
        se,
    )
    .unwrap();
    a.write(put("secret")).await;

    // Both directions are refused by `a`: the intruder dialing in, and `a` dialing the intruder.
    until("a refuses the intruder's dial", || {
        a.gossip.stats().handshakes_failed >= 2
    })
    .await;
    until("a refuses to dial the intruder", || {
        a.peer_stats("e").dial_failures >= 2
    })
    .await;
    assert_eq!(a.peer_stats("e").connections, 0);
    let seen = intruder.stats().peers[&PeerId("a".into())].clone();
    assert_eq!(seen.connections, 0, "{seen:?}");
    assert!(
        intruder_events.try_recv().is_err(),
        "the intruder got an event"
    );
}

/// Waits for a `Connected(peer)` event; panics after `PATIENCE`.
async fn connected_to(events: &mut mpsc::Receiver<GossipEvent>, peer: &PeerId) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(GossipEvent::Connected(p))) if p == *peer => return,
            Ok(Some(_)) => {}
            _ => panic!("never connected to {peer:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_close_only_their_connection() {
    let pki = Pki::new();
    let (sa, sb, sd) = (bind(), bind(), bind());
    let (aa, ab, ad) = (
        sa.local_addr().unwrap(),
        sb.local_addr().unwrap(),
        sd.local_addr().unwrap(),
    );
    let mut config = quick(GossipConfig::new(
        PeerId("a".into()),
        peers(&[("b", ab), ("d", ad)]),
    ));
    config.max_frame_bytes = 64 * 1024;
    let a = TestNode::start_with(config, &pki.node("a"), sa, Disk::default(), 1_000);
    let b = TestNode::start(
        "b",
        &pki.node("b"),
        sb,
        peers(&[("a", aa)]),
        Disk::default(),
        1_000,
    );
    // `d` has a valid certificate but no replica: it sends whatever the test tells it to.
    let (d, mut d_events) = Gossip::start(
        quick(GossipConfig::new(PeerId("d".into()), peers(&[("a", aa)]))),
        &pki.node("d"),
        sd,
    )
    .unwrap();
    let peer_a = PeerId("a".into());

    a.write(put("first")).await;
    converge(&[&a, &b]).await;
    connected_to(&mut d_events, &peer_a).await;
    settle(&a.gossip, "a", &b.gossip, "b").await;
    let ab_connections = a.peer_stats("b").connections;

    // Not a replica frame at all.
    settle(&a.gossip, "a", &d, "d").await;
    d.send(&peer_a, b"\x07garbage".to_vec()).unwrap();
    until("a rejects the garbage", || {
        a.peer_stats("d").frames_rejected >= 1
    })
    .await;

    // A length prefix over a's limit (d comes back first, and is welcome to).
    settle(&a.gossip, "a", &d, "d").await;
    d.send(&peer_a, vec![1u8; 100 * 1024]).unwrap();
    until("a rejects the oversized frame", || {
        a.peer_stats("d").frames_rejected >= 2
    })
    .await;

    // The a–b connection never noticed.
    b.write(put("second")).await;
    converge(&[&a, &b]).await;
    assert!(a.flag("second").await.is_some());
    let ab_link = a.peer_stats("b");
    assert!(ab_link.connected);
    assert_eq!(
        ab_link.connections, ab_connections,
        "a–b was disturbed: {ab_link:?}"
    );
    assert_eq!(ab_link.frames_rejected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_reconnects_and_catches_up() {
    let pki = Pki::new();
    let (sa, sb) = (bind(), bind());
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let a = TestNode::start(
        "a",
        &pki.node("a"),
        sa,
        peers(&[("b", ab)]),
        Disk::default(),
        1_000,
    );
    let b = TestNode::start(
        "b",
        &pki.node("b"),
        sb,
        peers(&[("a", aa)]),
        Disk::default(),
        1_000,
    );
    a.write(put("before")).await;
    converge(&[&a, &b]).await;

    let disk = b.stop().await;
    until("a notices b is gone", || !a.peer_stats("b").connected).await;
    a.write(put("while-down")).await;
    a.write(disable("before")).await;

    // Same address: the socket is free once the old endpoint has shut down.
    let socket = rebind(ab).await;
    let b = TestNode::start(
        "b",
        &pki.node("b"),
        socket,
        peers(&[("a", aa)]),
        disk,
        1_000,
    );
    converge(&[&a, &b]).await;
    assert!(b.flag("while-down").await.is_some());
    assert_eq!(b.flag("before").await.unwrap().state, FlagState::Disabled);
    assert!(a.peer_stats("b").connections >= 2);
}

/// Starts the six nodes of the shipped region files (on port-0 sockets), with their topology.
async fn six_node_cluster(
    pki: &Pki,
    links_per_region: usize,
    anti_entropy_ms: u64,
) -> Vec<(String, TestNode)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../regions");
    let cluster = Cluster::load_dir(&dir).unwrap();
    let mut sockets = BTreeMap::new();
    for (_, node) in cluster.nodes() {
        sockets.insert(node.id.clone(), bind());
    }
    let addrs: BTreeMap<String, SocketAddr> = sockets
        .iter()
        .map(|(id, s)| (id.clone(), s.local_addr().unwrap()))
        .collect();
    let mut nodes = Vec::new();
    for (id, socket) in sockets {
        let peers = cluster
            .peers_of(&id, links_per_region)
            .unwrap()
            .into_iter()
            .map(|p| (p.id.clone(), addrs[&p.id.0]))
            .collect();
        let node = TestNode::start(
            &id,
            &pki.node(&id),
            socket,
            peers,
            Disk::default(),
            anti_entropy_ms,
        );
        nodes.push((id, node));
    }
    nodes
}

fn total_frame_bytes(nodes: &[(String, TestNode)]) -> (u64, u64) {
    let mut frames = 0;
    let mut bytes = 0;
    for (_, node) in nodes {
        for stats in node.gossip.stats().peers.values() {
            frames += stats.frames_sent;
            bytes += stats.bytes_sent;
        }
    }
    (frames, bytes)
}

fn total_udp_bytes(nodes: &[(String, TestNode)]) -> u64 {
    nodes
        .iter()
        .flat_map(|(_, n)| n.gossip.stats().peers.into_values())
        .map(|s| s.udp_bytes_sent)
        .sum()
}

/// Waits until no frame has moved for a while (the sync sessions are idle).
async fn quiet(nodes: &[(String, TestNode)]) {
    let mut last = total_frame_bytes(nodes);
    let mut still = 0;
    while still < 20 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = total_frame_bytes(nodes);
        if now == last {
            still += 1;
        } else {
            still = 0;
            last = now;
        }
    }
}

/// Gossips a one-field change through the six-node cluster; returns (links, frames, frame
/// bytes, UDP bytes) it took.
async fn one_field_change(links_per_region: usize) -> (usize, u64, u64, u64) {
    let pki = Pki::new();
    // Anti-entropy off for the measurement: only the push of the change is counted.
    let nodes = six_node_cluster(&pki, links_per_region, 3_600_000).await;
    let refs: Vec<&TestNode> = nodes.iter().map(|(_, n)| n).collect();
    for i in 0..100 {
        nodes[i % nodes.len()]
            .1
            .write(put(&format!("flag-{i}")))
            .await;
    }
    converge(&refs).await;
    quiet(&nodes).await;

    let (frames_before, bytes_before) = total_frame_bytes(&nodes);
    let udp_before = total_udp_bytes(&nodes);
    nodes[0].1.write(disable("flag-7")).await;
    converge(&refs).await;
    quiet(&nodes).await;
    let (frames_after, bytes_after) = total_frame_bytes(&nodes);
    let udp_after = total_udp_bytes(&nodes);
    for (_, node) in &nodes {
        assert_eq!(
            node.flag("flag-7").await.unwrap().state,
            FlagState::Disabled
        );
    }
    let links: usize = nodes
        .iter()
        .map(|(_, n)| n.gossip.stats().peers.len())
        .sum::<usize>()
        / 2;
    for (_, node) in &nodes {
        node.gossip.shutdown().await;
    }
    (
        links,
        frames_after - frames_before,
        bytes_after - bytes_before,
        udp_after - udp_before,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_node_cluster_gossips_a_one_field_change_in_bytes_proportional_to_its_links() {
    for k in [DEFAULT_LINKS_PER_REGION, 1] {
        let (links, frames, bytes, udp) = one_field_change(k).await;
        eprintln!(
            "one-field change, 6 nodes, k={k} ({links} links, 100 flags): {frames} frames, \
             {bytes} frame bytes, {udp} UDP bytes (QUIC acks and keep-alives in the window included)"
        );
        // Only the author pushes the change (one frame per peer); the other nodes announce heads
        // (~60 bytes per frame) and a node that missed the push asks for it. The whole document
        // (100 flags) would be far larger; the goal is 10 KB across the cluster.
        assert!(bytes > 0, "nothing was gossiped");
        assert!(
            bytes <= 10_000 && bytes <= links as u64 * 2 * 1_000,
            "{bytes} frame bytes over {links} links for one field"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_a_cluster_member_that_is_not_its_peer() {
    let pki = Pki::new();
    let (sa, sx) = (bind(), bind());
    let aa = sa.local_addr().unwrap();
    let ax = sx.local_addr().unwrap();
    // `a` has no peers; `x` (valid certificate) insists on dialing it.
    let a = TestNode::start("a", &pki.node("a"), sa, Vec::new(), Disk::default(), 1_000);
    let (x, _x_events) = Gossip::start(
        quick(GossipConfig::new(PeerId("x".into()), peers(&[("a", aa)]))),
        &pki.node("x"),
        sx,
    )
    .unwrap();
    until("a refuses x", || {
        a.gossip.stats().unknown_peers_refused >= 1
    })
    .await;
    assert!(a.gossip.stats().peers.is_empty());
    assert_eq!(x.stats().peers[&PeerId("a".into())].connections, 0);
    let _ = ax;
}

#[tokio::test]
async fn start_refuses_a_certificate_for_another_node() {
    let pki = Pki::new();
    let result = Gossip::start(
        GossipConfig::new(PeerId("a".into()), Vec::new()),
        &pki.node("b"),
        bind(),
    );
    assert!(matches!(result, Err(Error::Tls(_))));
}

#[tokio::test]
async fn send_to_an_unknown_or_disconnected_peer_is_an_error_not_a_panic() {
    let pki = Pki::new();
    let dead = bind().local_addr().unwrap(); // nothing listens there once dropped
    let (g, _events) = Gossip::start(
        GossipConfig::new(PeerId("a".into()), peers(&[("b", dead)])),
        &pki.node("a"),
        bind(),
    )
    .unwrap();
    assert!(matches!(
        g.send(&PeerId("zz".into()), vec![1]),
        Err(Error::UnknownPeer(_))
    ));
    assert!(matches!(
        g.send(&PeerId("b".into()), vec![1]),
        Err(Error::NotConnected(_))
    ));
    assert!(matches!(
        g.send(&PeerId("b".into()), vec![0; 40 * 1024 * 1024]),
        Err(Error::FrameTooLarge { .. })
    ));
    assert_eq!(g.stats().peers[&PeerId("b".into())].frames_dropped, 1);
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_through_relays_keeps_both_sides_writable_and_heals() {
    use crate::relay::Relay;
    let pki = Pki::new();
    let (sa, sb) = (bind(), bind());
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    // Each node reaches the other only through a relay, so pausing both cuts the link.
    let to_b = Relay::start(any, ab).await.unwrap();
    let to_a = Relay::start(any, aa).await.unwrap();
    let config = |me: &str, peer: &str, via: SocketAddr| {
        let mut c = quick(GossipConfig::new(PeerId(me.into()), peers(&[(peer, via)])));
        c.keep_alive = Duration::from_millis(100);
        c.idle_timeout = Duration::from_millis(600);
        c
    };
    let a = TestNode::start_with(
        config("a", "b", to_b.local_addr()),
        &pki.node("a"),
        sa,
        Disk::default(),
        200,
    );
    let b = TestNode::start_with(
        config("b", "a", to_a.local_addr()),
        &pki.node("b"),
        sb,
        Disk::default(),
        200,
    );
    a.write(put("banner")).await;
    converge(&[&a, &b]).await;

    to_b.pause();
    to_a.pause();
    until("the link drops", || {
        !a.peer_stats("b").connected && !b.peer_stats("a").connected
    })
    .await;
    // Both sides keep accepting writes, including to the same flag.
    a.write(disable("banner")).await;
    b.write(put("checkout")).await;
    b.write(WriteCommand::SetDefaultVariant {
        key: "banner".into(),
        default_variant: bunting_model::DefaultVariant::Key("off".into()),
    })
    .await;
    assert!(
        a.flag("checkout").await.is_none(),
        "a write crossed the partition"
    );
    assert_ne!(a.heads().await, b.heads().await);

    // Heal, with 20 ms of added delay each way.
    to_b.set_delay(Duration::from_millis(20));
    to_a.set_delay(Duration::from_millis(20));
    to_b.resume();
    to_a.resume();
    converge(&[&a, &b]).await;
    let banner = a.flag("banner").await.unwrap();
    assert_eq!(b.flag("banner").await.unwrap(), banner);
    assert_eq!(banner.state, FlagState::Disabled);
    assert!(a.flag("checkout").await.is_some());
    assert!(
        to_b.counts().1 + to_a.counts().1 > 0,
        "the relays dropped nothing"
    );
}

/// Bytes `a` exchanged with `b` (both directions).
fn link_bytes(a: &TestNode, b: &str) -> u64 {
    let stats = a.peer_stats(b);
    stats.bytes_sent + stats.bytes_received
}

/// Waits until `a`'s link to `b` has moved no frame for a while.
async fn link_quiet(a: &TestNode, b: &str) {
    let mut last = link_bytes(a, b);
    let mut still = 0;
    while still < 20 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = link_bytes(a, b);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
}

async fn rebind(addr: SocketAddr) -> UdpSocket {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match UdpSocket::bind(addr) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_stored_sync_state_costs_no_more_than_one_without() {
    let pki = Pki::new();
    let (sa, sb) = (bind(), bind());
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let a = TestNode::start(
        "a",
        &pki.node("a"),
        sa,
        peers(&[("b", ab)]),
        Disk::default(),
        3_600_000,
    );
    let b = TestNode::start(
        "b",
        &pki.node("b"),
        sb,
        peers(&[("a", aa)]),
        Disk::default(),
        3_600_000,
    );
    for i in 0..200 {
        a.write(put(&format!("flag-{i}"))).await;
    }
    converge(&[&a, &b]).await;
    link_quiet(&a, "b").await;

    let mut costs = Vec::new();
    let mut disk = b.stop().await;
    assert!(!disk.sync.is_empty(), "no sync state was stored");
    for keep_sync_state in [true, false] {
        until("a notices b is gone", || !a.peer_stats("b").connected).await;
        if !keep_sync_state {
            disk.sync.clear();
        }
        let before = link_bytes(&a, "b");
        let b = TestNode::start(
            "b",
            &pki.node("b"),
            rebind(ab).await,
            peers(&[("a", aa)]),
            disk,
            3_600_000,
        );
        converge(&[&a, &b]).await;
        link_quiet(&a, "b").await;
        costs.push(link_bytes(&a, "b") - before);
        disk = b.stop().await;
    }
    eprintln!(
        "reconnect of in-sync peers (200 changes): {} bytes with the stored sync state, \
         {} bytes without",
        costs[0], costs[1]
    );
    assert!(costs[0] <= costs[1], "{costs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_peer_that_comes_back_replaces_its_stale_connection() {
    use crate::relay::Relay;
    let pki = Pki::new();
    let (sa, sb) = (bind(), bind());
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let to_b = Relay::start(any, ab).await.unwrap();
    let to_a = Relay::start(any, aa).await.unwrap();
    // `a` would not notice a silent peer for ten minutes: only the new connection's hello (another
    // process instance) can tell it the old connection is dead.
    let mut a_config = quick(GossipConfig::new(
        PeerId("a".into()),
        peers(&[("b", to_b.local_addr())]),
    ));
    a_config.idle_timeout = Duration::from_secs(600);
    let b_config = || {
        quick(GossipConfig::new(
            PeerId("b".into()),
            peers(&[("a", to_a.local_addr())]),
        ))
    };
    let a = TestNode::start_with(a_config, &pki.node("a"), sa, Disk::default(), 1_000);
    let b = TestNode::start_with(b_config(), &pki.node("b"), sb, Disk::default(), 1_000);
    a.write(put("before")).await;
    converge(&[&a, &b]).await;
    let connections = a.peer_stats("b").connections;

    // b dies without a word reaching a.
    to_b.pause();
    to_a.pause();
    let disk = b.stop().await;
    a.write(put("while-down")).await;
    assert!(a.peer_stats("b").connected, "a saw the crash");

    let socket = rebind(ab).await;
    to_b.resume();
    to_a.resume();
    let b = TestNode::start_with(b_config(), &pki.node("b"), socket, disk, 1_000);
    converge(&[&a, &b]).await;
    assert!(b.flag("while-down").await.is_some());
    assert!(a.peer_stats("b").connections > connections);
}
