//! Replication stories and property tests: several replicas wired by a test network that can lose,
//! duplicate and reorder frames, with a driver that stores what the replicas ask it to.

use std::collections::BTreeMap;

use bunting_model::{DefaultVariant, Flag, FlagSet, FlagState};
use proptest::prelude::*;
use serde_json::json;

use automerge::ReadDoc;

use crate::*;

const SET: &str = "production";

/// One node: the replica and what its "disk" holds.
struct Node {
    replica: Replica,
    config: ReplicaConfig,
    /// Changes per flag set, in the order stored.
    disk: BTreeMap<String, Vec<Vec<u8>>>,
    sync_disk: BTreeMap<(String, PeerId), Vec<u8>>,
    /// Persist requests not yet stored (a crash loses them).
    unstored: Vec<PersistRequest>,
    acked: Vec<WriteId>,
    /// Changes of acknowledged writes: they must survive anything.
    acked_changes: Vec<ChangeHash>,
    /// Writes taken back because their persist request failed.
    refused: Vec<WriteId>,
    protocol_errors: Vec<Error>,
    /// Whether the driver stores persist requests as soon as they appear.
    auto_persist: bool,
}

impl Node {
    fn new(name: &str, faults: Faults) -> Node {
        let mut config = ReplicaConfig::new(name, format!("r-{name}"), 1);
        config.anti_entropy_interval_ms = 1_000;
        config.faults = faults;
        Node {
            replica: Replica::new(config.clone(), Timestamp(0)),
            config,
            disk: BTreeMap::new(),
            sync_disk: BTreeMap::new(),
            unstored: Vec::new(),
            acked: Vec::new(),
            acked_changes: Vec::new(),
            refused: Vec::new(),
            protocol_errors: Vec::new(),
            auto_persist: true,
        }
    }

    /// Handles events; stores persist requests when `auto_persist`.
    fn drain_events(&mut self, now: Timestamp) {
        loop {
            self.drain_once();
            if !self.auto_persist || self.unstored.is_empty() {
                return;
            }
            self.store_all(now);
        }
    }

    fn drain_once(&mut self) {
        while let Some(event) = self.replica.poll_event() {
            match event {
                Event::PersistRequest(p) => self.unstored.push(p),
                Event::WriteAcknowledged { id, changes, .. } => {
                    self.acked.push(id);
                    self.acked_changes.extend(changes);
                }
                Event::ProtocolError { error, .. } => self.protocol_errors.push(error),
                Event::WriteRefused { id, .. } => self.refused.push(id),
                Event::FlagSetChanged { .. } | Event::PeerSynced { .. } => {}
            }
        }
    }

    fn store_all(&mut self, now: Timestamp) {
        for p in std::mem::take(&mut self.unstored) {
            self.disk
                .entry(p.flag_set.clone())
                .or_default()
                .extend(p.changes);
            for (peer, state) in p.sync_states {
                self.sync_disk.insert((p.flag_set.clone(), peer), state);
            }
            self.replica.persisted(p.id, now).unwrap();
        }
    }

    /// What the disk holds for `SET`, as handed back after a failed persist.
    fn stored(&self) -> StoredFlagSet {
        StoredFlagSet {
            name: SET.into(),
            snapshot: None,
            changes: self.disk.get(SET).cloned().unwrap_or_default(),
            sync_states: Vec::new(),
        }
    }

    fn heads(&self) -> Vec<ChangeHash> {
        self.replica
            .flag_set(SET)
            .map(FlagSetDoc::heads)
            .unwrap_or_default()
    }

    /// Restarts from the disk with the next incarnation; unstored requests are lost.
    fn restart(&mut self, now: Timestamp) {
        self.unstored.clear();
        self.config.incarnation += 1;
        let stored = self
            .disk
            .iter()
            .map(|(name, changes)| StoredFlagSet {
                name: name.clone(),
                snapshot: None,
                changes: changes.clone(),
                sync_states: self
                    .sync_disk
                    .iter()
                    .filter(|((set, _), _)| set == name)
                    .map(|((_, peer), s)| (peer.clone(), s.clone()))
                    .collect(),
            })
            .collect();
        self.replica = Replica::restore(self.config.clone(), stored, now).unwrap();
    }
}

/// A full mesh of nodes and the frames in flight between them.
struct Cluster {
    nodes: Vec<Node>,
    /// (from, to, frame)
    in_flight: Vec<(usize, usize, Vec<u8>)>,
    now: Timestamp,
    wire_bytes: usize,
}

impl Cluster {
    fn new(n: usize) -> Cluster {
        Cluster::with_faults(n, Faults::default())
    }

    fn with_faults(n: usize, faults: Faults) -> Cluster {
        let nodes = (0..n).map(|i| Node::new(&name(i), faults)).collect();
        let mut c = Cluster {
            nodes,
            in_flight: Vec::new(),
            now: Timestamp(0),
            wire_bytes: 0,
        };
        c.connect_all();
        c
    }

    fn connect_all(&mut self) {
        let n = self.nodes.len();
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    self.nodes[i].replica.add_peer(PeerId(name(j)), self.now);
                }
            }
        }
        self.collect();
    }

    fn write(&mut self, node: usize, command: WriteCommand) -> Result<WriteId, Error> {
        let meta = WriteMeta {
            token_id: format!("token-{node}"),
            wall_time_ms: self.now.0,
            message: "test".into(),
        };
        let now = self.now;
        let r = self.nodes[node]
            .replica
            .handle_local_write(SET, command.into(), meta, now);
        self.collect();
        r
    }

    /// Moves events and transmits out of every replica.
    fn collect(&mut self) {
        let now = self.now;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.drain_events(now);
            while let Some((peer, frame)) = node.replica.poll_transmit() {
                let j = index_of(&peer);
                self.wire_bytes += frame.len();
                self.in_flight.push((i, j, frame));
            }
        }
    }

    /// Node `i` crashes (losing what it had not stored) and comes back; its connections reopen.
    fn crash(&mut self, i: usize) {
        let now = self.now;
        self.in_flight
            .retain(|(from, to, _)| *from != i && *to != i);
        self.nodes[i].restart(now);
        for j in 0..self.nodes.len() {
            if j != i {
                self.nodes[j].replica.remove_peer(&PeerId(name(i)));
                self.nodes[j].replica.add_peer(PeerId(name(i)), now);
                self.nodes[i].replica.add_peer(PeerId(name(j)), now);
            }
        }
        self.collect();
    }

    fn deliver(&mut self, k: usize) {
        if self.in_flight.is_empty() {
            return;
        }
        let (from, to, frame) = self.in_flight.remove(k % self.in_flight.len());
        let now = self.now;
        self.nodes[to]
            .replica
            .handle_message(&PeerId(name(from)), &frame, now);
        self.collect();
    }

    fn tick(&mut self, ms: u64) {
        self.now = self.now.plus_millis(ms);
        let now = self.now;
        for node in &mut self.nodes {
            node.replica.handle_timeout(now);
        }
        self.collect();
    }

    /// Delivers everything in order, with anti-entropy rounds, until nothing moves.
    fn settle(&mut self) {
        for _ in 0..20 {
            let mut steps = 0;
            while !self.in_flight.is_empty() && steps < 10_000 {
                self.deliver(0);
                steps += 1;
            }
            if self.converged() {
                return;
            }
            self.tick(1_000);
        }
    }

    fn converged(&self) -> bool {
        let first = self.nodes[0].heads();
        self.nodes.iter().all(|n| n.heads() == first)
    }
}

fn name(i: usize) -> String {
    format!("node-{i}")
}

fn index_of(peer: &PeerId) -> usize {
    peer.0
        .strip_prefix("node-")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn flag(default: &str) -> Flag {
    Flag::from_value(
        &json!({"state": "ENABLED", "variants": {"on": true, "off": false},
                "defaultVariant": default}),
        "",
    )
    .unwrap()
}

fn put_flag(key: &str) -> WriteCommand {
    WriteCommand::PutFlag {
        key: key.into(),
        flag: flag("on"),
    }
}

#[test]
fn a_write_is_acknowledged_only_after_it_is_persisted() {
    let mut c = Cluster::new(1);
    c.nodes[0].auto_persist = false;
    let id = c.write(0, put_flag("f")).unwrap();
    assert!(c.nodes[0].acked.is_empty());
    assert_eq!(c.nodes[0].unstored.len(), 1);
    assert!(!c.nodes[0].unstored[0].changes.is_empty());
    c.nodes[0].store_all(Timestamp(0));
    c.collect();
    assert_eq!(c.nodes[0].acked, vec![id]);
}

#[test]
fn a_write_whose_persist_fails_is_taken_back_with_every_write_on_top_of_it() {
    let mut c = Cluster::new(2);
    c.write(0, put_flag("stored")).unwrap();
    c.settle();
    c.in_flight.clear();
    c.nodes[0].auto_persist = false;
    let failing = c.write(0, put_flag("lost")).unwrap();
    let on_top = c
        .write(
            0,
            WriteCommand::SetState {
                key: "lost".into(),
                state: FlagState::Disabled,
            },
        )
        .unwrap();
    assert_eq!(c.nodes[0].unstored.len(), 2);
    // The disk refuses the first request: the driver stops there and hands back what is stored.
    let first = c.nodes[0].unstored[0].id;
    let second = c.nodes[0].unstored[1].id;
    let stored = c.nodes[0].stored();
    let dropped = c.nodes[0]
        .replica
        .persist_failed(first, stored, c.now)
        .unwrap();
    assert_eq!(dropped, vec![second]);
    c.nodes[0].unstored.clear();
    c.collect();
    assert_eq!(c.nodes[0].refused, vec![failing, on_top]);
    assert!(
        c.nodes[0].acked.len() == 1,
        "only the stored write is acked"
    );
    let doc = c.nodes[0].replica.flag_set(SET).unwrap();
    assert!(
        doc.flag("lost").is_none(),
        "a refused write is still served"
    );
    assert!(doc.flag("stored").is_some());
    // Nothing of the refused writes ever reaches a peer, and the next write works and syncs.
    c.nodes[0].auto_persist = true;
    c.write(0, put_flag("next")).unwrap();
    c.settle();
    assert!(c.converged());
    let peer = c.nodes[1].replica.flag_set(SET).unwrap();
    assert!(peer.flag("lost").is_none());
    assert!(peer.flag("next").is_some());
    // A restart from the disk gives the same document: nothing stored depends on a lost change.
    let heads = c.nodes[0].heads();
    c.crash(0);
    assert_eq!(c.nodes[0].heads(), heads);
}

#[test]
fn a_write_stored_despite_a_reported_failure_is_acknowledged() {
    let mut c = Cluster::new(1);
    c.nodes[0].auto_persist = false;
    let id = c.write(0, put_flag("f")).unwrap();
    // The store committed, then reported an error (say, on fsync): the reload finds the change.
    let request = c.nodes[0].unstored.remove(0);
    c.nodes[0]
        .disk
        .entry(SET.into())
        .or_default()
        .extend(request.changes.clone());
    let stored = c.nodes[0].stored();
    let dropped = c.nodes[0]
        .replica
        .persist_failed(request.id, stored, c.now)
        .unwrap();
    assert!(dropped.is_empty());
    c.collect();
    assert_eq!(c.nodes[0].acked, vec![id]);
    assert!(c.nodes[0].refused.is_empty());
}

#[test]
fn a_change_leaves_the_node_only_after_it_is_persisted() {
    let mut c = Cluster::new(2);
    c.settle();
    c.in_flight.clear();
    c.nodes[0].auto_persist = false;
    c.write(0, put_flag("f")).unwrap();
    assert!(c.in_flight.is_empty(), "sent before persisted");
    c.nodes[0].store_all(c.now);
    c.collect();
    assert!(!c.in_flight.is_empty(), "not pushed after persisted");
    c.settle();
    assert!(c.nodes[1]
        .replica
        .flag_set(SET)
        .unwrap()
        .flag("f")
        .is_some());
}

#[test]
fn the_planted_ack_before_persist_bug_acks_at_once() {
    let mut c = Cluster::with_faults(
        1,
        Faults {
            ack_before_persist: true,
            ..Faults::default()
        },
    );
    c.nodes[0].auto_persist = false;
    let id = c.write(0, put_flag("f")).unwrap();
    assert_eq!(c.nodes[0].acked, vec![id]);
}

#[test]
fn the_planted_send_before_persist_bug_sends_unstored_changes_and_reuses_the_actor() {
    let faults = Faults {
        send_before_persist_and_reuse_actor: true,
        ..Faults::default()
    };
    let mut c = Cluster::with_faults(2, faults);
    c.settle();
    c.in_flight.clear();
    c.nodes[0].auto_persist = false;
    c.write(0, put_flag("f")).unwrap();
    assert!(!c.in_flight.is_empty());
    let actor = c.nodes[0].replica.identity().actor_id();
    c.nodes[0].restart(c.now);
    assert_eq!(c.nodes[0].replica.identity().actor_id(), actor);
}

#[test]
fn a_lost_push_is_repaired_by_anti_entropy_unless_the_planted_bug_skips_it() {
    for skip in [false, true] {
        let mut c = Cluster::with_faults(
            2,
            Faults {
                skip_anti_entropy: skip,
                ..Faults::default()
            },
        );
        c.settle();
        c.write(0, put_flag("f")).unwrap();
        assert!(!c.in_flight.is_empty());
        c.in_flight.clear();
        c.settle();
        assert_eq!(c.converged(), !skip, "skip_anti_entropy = {skip}");
    }
}

#[test]
fn a_lost_change_is_resent_as_soon_as_the_peer_asks_for_it() {
    let mut c = Cluster::new(2);
    c.settle();
    c.write(0, put_flag("lost")).unwrap();
    c.in_flight.clear();
    // Node 1's next push shows node 0's heads to node 1, which then asks for what it lacks.
    c.write(1, put_flag("other")).unwrap();
    let mut delivered = 0;
    while !c.in_flight.is_empty() && delivered < 50 {
        c.deliver(0);
        delivered += 1;
    }
    assert!(c.converged(), "not repaired without an anti-entropy round");
    assert!(delivered < 20, "{delivered} frames exchanged");
}

/// Frame kind byte (after the version byte).
fn kind(frame: &[u8]) -> wire::FrameKind {
    wire::decode(frame, 1 << 20).unwrap().kind
}

#[test]
fn only_the_author_pushes_a_change_and_the_others_announce_heads() {
    let mut c = Cluster::new(4);
    c.write(0, put_flag("f")).unwrap();
    c.settle();
    c.in_flight.clear();
    c.write(
        0,
        WriteCommand::SetDefaultVariant {
            key: "f".into(),
            default_variant: DefaultVariant::Key("off".into()),
        },
    )
    .unwrap();
    let mut carrying = Vec::new();
    let mut frames = 0;
    while !c.in_flight.is_empty() && frames < 200 {
        let (from, _, frame) = &c.in_flight[0];
        if kind(frame) != wire::FrameKind::Heads {
            carrying.push((*from, kind(frame)));
        }
        c.deliver(0);
        frames += 1;
    }
    assert!(c.converged());
    // One push per peer from the author; everything else is heads (3 receivers × 3 peers).
    assert_eq!(
        carrying,
        vec![(0, wire::FrameKind::Changes); 3],
        "{carrying:?}"
    );
    assert_eq!(frames, 3 + 9, "{frames} frames");
}

#[test]
fn anti_entropy_between_peers_in_sync_sends_nothing() {
    let mut c = Cluster::new(3);
    c.write(0, put_flag("f")).unwrap();
    c.settle();
    assert!(c.converged());
    c.in_flight.clear();
    for _ in 0..5 {
        c.tick(1_000);
    }
    assert!(c.in_flight.is_empty(), "{} frames", c.in_flight.len());
}

#[test]
fn a_node_that_missed_the_push_asks_a_peer_that_announced_it() {
    let mut c = Cluster::new(3);
    c.write(0, put_flag("f")).unwrap();
    c.settle();
    c.write(0, put_flag("g")).unwrap();
    // The push to node 2 is lost; node 1's heads announcement reaches node 2, which asks node 1.
    c.in_flight
        .retain(|(from, to, _)| !(*from == 0 && *to == 2));
    let mut kinds = Vec::new();
    while !c.in_flight.is_empty() {
        let (from, to, frame) = &c.in_flight[0];
        if *to == 2 || *from == 2 {
            kinds.push(kind(frame));
        }
        c.deliver(0);
    }
    assert!(c.converged(), "not repaired without anti-entropy");
    assert!(kinds.contains(&wire::FrameKind::Need), "{kinds:?}");
    assert!(!kinds.contains(&wire::FrameKind::Sync), "{kinds:?}");
}

#[test]
fn the_planted_drop_without_retry_bug_leaves_a_peer_behind() {
    let mut c = Cluster::with_faults(
        2,
        Faults {
            drop_sync_message_without_retry: true,
            ..Faults::default()
        },
    );
    c.settle();
    c.write(0, put_flag("f")).unwrap();
    c.settle();
    assert!(!c.converged());
}

#[test]
fn peer_sync_status_counts_the_changes_a_peer_is_not_known_to_have() {
    let mut c = Cluster::new(2);
    c.settle();
    let status = c.nodes[0].replica.peer_sync_status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].peer, PeerId(name(1)));
    assert!(status[0].connected);
    assert_eq!(status[0].changes_pending, 0);
    // Two writes that never arrive: node 0 knows node 1 lacks both.
    c.write(0, put_flag("a")).unwrap();
    c.write(0, put_flag("b")).unwrap();
    c.in_flight.clear();
    let status = c.nodes[0].replica.peer_sync_status();
    assert_eq!(status[0].changes_pending, 2);
    c.nodes[0].replica.remove_peer(&PeerId(name(1)));
    let status = c.nodes[0].replica.peer_sync_status();
    assert!(!status[0].connected, "a known peer stays listed while away");
    c.nodes[0].replica.add_peer(PeerId(name(1)), c.now);
    c.collect();
    c.settle();
    assert!(c.converged());
    for node in &c.nodes {
        let status = node.replica.peer_sync_status();
        assert_eq!(status[0].changes_pending, 0, "{status:?}");
    }
}

#[test]
fn a_restart_takes_a_fresh_actor_and_keeps_persisted_writes() {
    let mut c = Cluster::new(1);
    c.write(0, put_flag("f")).unwrap();
    let heads = c.nodes[0].heads();
    let actor = c.nodes[0].replica.identity().actor_id();
    c.nodes[0].restart(c.now);
    assert_eq!(c.nodes[0].heads(), heads);
    assert_ne!(c.nodes[0].replica.identity().actor_id(), actor);
    c.write(0, put_flag("g")).unwrap();
    assert_eq!(c.nodes[0].acked.len(), 2);
}

#[test]
fn partitioned_nodes_keep_accepting_writes_and_converge_after_heal() {
    let mut c = Cluster::new(3);
    c.write(0, put_flag("shared")).unwrap();
    c.settle();
    // Partition: nothing is delivered while all three write.
    c.write(0, put_flag("from-0")).unwrap();
    c.write(
        1,
        WriteCommand::SetState {
            key: "shared".into(),
            state: FlagState::Disabled,
        },
    )
    .unwrap();
    c.write(
        2,
        WriteCommand::SetState {
            key: "shared".into(),
            state: FlagState::Enabled,
        },
    )
    .unwrap();
    c.in_flight.clear();
    c.settle();
    assert!(c.converged());
    let a = c.nodes[0].replica.flag_set(SET).unwrap();
    for node in &c.nodes {
        assert_eq!(node.replica.flag_set(SET).unwrap().to_flagd(), a.to_flagd());
    }
    assert!(a.flag("from-0").is_some());
}

#[test]
fn a_reconnecting_peer_catches_up_without_a_full_transfer() {
    let mut c = Cluster::new(2);
    for i in 0..60 {
        c.write(0, put_flag(&format!("f{i}"))).unwrap();
    }
    c.settle();
    assert!(c.converged());
    c.nodes[1].replica.remove_peer(&PeerId(name(0)));
    c.nodes[0].replica.remove_peer(&PeerId(name(1)));
    c.nodes[1].restart(c.now);
    c.write(
        0,
        WriteCommand::SetState {
            key: "f1".into(),
            state: FlagState::Disabled,
        },
    )
    .unwrap();
    c.in_flight.clear();
    c.wire_bytes = 0;
    c.connect_all();
    c.settle();
    assert!(c.converged());
    assert!(
        c.wire_bytes < 4_000,
        "catch-up sent {} bytes for one change",
        c.wire_bytes
    );
}

#[test]
fn hostile_frames_never_change_the_document() {
    let mut c = Cluster::new(2);
    c.write(0, put_flag("f")).unwrap();
    c.settle();
    let heads = c.nodes[1].heads();
    let peer = PeerId(name(0));
    // A real frame, truncated at every length and with flipped bytes.
    c.write(
        0,
        WriteCommand::SetDefaultVariant {
            key: "f".into(),
            default_variant: DefaultVariant::Key("off".into()),
        },
    )
    .unwrap();
    let frames: Vec<Vec<u8>> = c.in_flight.drain(..).map(|(_, _, f)| f).collect();
    assert!(!frames.is_empty());
    for frame in &frames {
        for cut in 0..frame.len() {
            c.nodes[1]
                .replica
                .handle_message(&peer, &frame[..cut], c.now);
        }
    }
    c.collect();
    assert_eq!(c.nodes[1].heads(), heads);
    // With a byte flipped, a frame may still carry the intact, checksummed change (the flip hit a
    // head or a bloom filter): the document then moves exactly as the genuine frame moves it, and
    // never anywhere else.
    let genuine = {
        let mut doc = c.nodes[1].replica.flag_set(SET).unwrap().clone();
        let mut changes = c.nodes[0]
            .replica
            .flag_set(SET)
            .unwrap()
            .automerge()
            .clone();
        doc.automerge_mut().merge(&mut changes).unwrap();
        doc.heads()
    };
    for frame in &frames {
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x5a;
            c.nodes[1].replica.handle_message(&peer, &bad, c.now);
            let now = c.nodes[1].heads();
            assert!(
                now == heads || now == genuine,
                "flipped byte {i} made up a document"
            );
        }
    }
    assert!(!c.nodes[1].protocol_errors.is_empty());
}

#[test]
fn a_bloom_filter_with_hostile_parameters_is_refused_without_a_panic() {
    let mut c = Cluster::new(2);
    c.write(0, put_flag("f")).unwrap();
    c.settle();
    let heads = c.nodes[1].heads();
    // entries=1, bits per entry=0 (Automerge would divide by zero), then probes=2^32-1.
    for bloom in [
        vec![1u8, 0, 7, 0xff],
        vec![1, 10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0xff, 0xff],
    ] {
        let message = automerge::sync::Message {
            heads: heads.clone(),
            need: Vec::new(),
            have: vec![automerge::sync::Have {
                last_sync: Vec::new(),
                bloom: automerge::sync::BloomFilter::try_from(bloom.as_slice()).unwrap(),
            }],
            changes: Vec::<Vec<u8>>::new().into(),
            flags: None,
            version: automerge::sync::MessageVersion::V1,
        };
        let frame = wire::encode(wire::FrameKind::Sync, SET, &message.encode(), 1 << 20).unwrap();
        c.nodes[1]
            .replica
            .handle_message(&PeerId(name(0)), &frame, c.now);
        c.collect();
    }
    assert_eq!(c.nodes[1].protocol_errors.len(), 2);
    assert_eq!(c.nodes[1].heads(), heads);
}

proptest! {
    #[test]
    fn random_frames_never_panic_or_change_the_document(
        frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20),
        prefix in any::<bool>(),
    ) {
        let mut c = Cluster::new(2);
        c.write(0, put_flag("f")).unwrap();
        c.settle();
        let heads = c.nodes[1].heads();
        for mut frame in frames {
            if prefix {
                // A valid header so the payload reaches the sync-message decoder.
                let mut f = wire::encode(wire::FrameKind::Sync, SET, &[], 1 << 20).unwrap();
                f.truncate(f.len() - 4);
                f.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                f.append(&mut frame);
                frame = f;
            }
            c.nodes[1].replica.handle_message(&PeerId(name(0)), &frame, c.now);
        }
        c.collect();
        prop_assert_eq!(c.nodes[1].heads(), heads);
    }
}

/// Evaluates every flag the random runs use on a few probe contexts.
fn probe(doc: &FlagSetDoc) -> Vec<bunting_engine::Resolution> {
    let compiled = doc.compile(&bunting_engine::CompileOptions::default());
    let mut out = Vec::new();
    for n in 0..3 {
        let ctx = bunting_engine::EvaluationContext::new(1_700_000_000)
            .with_targeting_key(format!("user-{n}"))
            .with_attribute("n", json!(n));
        for flag in 0..4 {
            out.push(compiled.evaluate(&format!("flag-{flag}"), &ctx));
        }
    }
    out
}

#[test]
fn a_merged_flag_that_breaks_evaluates_to_the_same_error_everywhere() {
    let mut c = Cluster::new(2);
    c.write(0, put_flag("f")).unwrap();
    c.settle();
    c.write(
        0,
        WriteCommand::SetDefaultVariant {
            key: "f".into(),
            default_variant: DefaultVariant::Key("off".into()),
        },
    )
    .unwrap();
    c.write(
        1,
        WriteCommand::SetVariant {
            key: "f".into(),
            variant: "off".into(),
            value: None,
        },
    )
    .unwrap();
    c.settle();
    let ctx = bunting_engine::EvaluationContext::new(0);
    let mut answers = Vec::new();
    for node in &c.nodes {
        let doc = node.replica.flag_set(SET).unwrap();
        let compiled = doc.compile(&bunting_engine::CompileOptions::default());
        assert_eq!(compiled.broken_flags().len(), 1);
        answers.push(compiled.evaluate("f", &ctx));
    }
    assert_eq!(answers[0].reason, bunting_engine::Reason::Error);
    assert_eq!(answers[0], answers[1]);
}

/// One step of a random run.
#[derive(Debug, Clone)]
enum Step {
    Write { node: usize, flag: usize, op: u8 },
    Deliver(usize),
    Drop(usize),
    Duplicate(usize),
    Tick,
    Persist(usize),
    Crash(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..5usize, 0..4usize, 0..6u8).prop_map(|(node, flag, op)| Step::Write { node, flag, op }),
        4 => any::<usize>().prop_map(Step::Deliver),
        1 => any::<usize>().prop_map(Step::Drop),
        1 => any::<usize>().prop_map(Step::Duplicate),
        1 => Just(Step::Tick),
        2 => (0..5usize).prop_map(Step::Persist),
        1 => (0..5usize).prop_map(Step::Crash),
    ]
}

fn command(flag: usize, op: u8) -> WriteCommand {
    let key = format!("flag-{flag}");
    match op {
        0 => put_flag(&key),
        1 => WriteCommand::SetState {
            key,
            state: FlagState::Disabled,
        },
        2 => WriteCommand::SetDefaultVariant {
            key,
            default_variant: DefaultVariant::Key("off".into()),
        },
        3 => WriteCommand::SetTargeting {
            key,
            targeting: Some(json!({"if": [{"==": [{"var": "n"}, flag]}, "off", null]})),
        },
        4 => WriteCommand::SetVariant {
            key,
            variant: "off".into(),
            value: Some(json!(false)),
        },
        _ => WriteCommand::DeleteFlag { key },
    }
}

proptest! {
    #[test]
    fn replicas_converge_after_any_interleaving_and_message_faults(
        n in 2..=5usize,
        steps in proptest::collection::vec(step(), 1..100),
    ) {
        let mut c = Cluster::new(n);
        for node in &mut c.nodes {
            node.auto_persist = false;
        }
        for s in steps {
            match s {
                Step::Write { node, flag, op } => {
                    // Refused writes (a patch of a flag not there yet) are fine: they change nothing.
                    let _ = c.write(node % n, command(flag, op));
                }
                Step::Deliver(k) => c.deliver(k),
                Step::Drop(k) => {
                    if !c.in_flight.is_empty() {
                        let len = c.in_flight.len();
                        c.in_flight.remove(k % len);
                    }
                }
                Step::Duplicate(k) => {
                    if !c.in_flight.is_empty() {
                        let len = c.in_flight.len();
                        let copy = c.in_flight[k % len].clone();
                        c.in_flight.push(copy);
                    }
                }
                Step::Tick => c.tick(1_000),
                Step::Persist(i) => {
                    let now = c.now;
                    c.nodes[i % n].store_all(now);
                    c.collect();
                }
                Step::Crash(i) => c.crash(i % n),
            }
        }
        for node in &mut c.nodes {
            node.auto_persist = true;
        }
        c.collect();
        c.settle();
        // No acknowledged write is lost, on any node.
        for node in &c.nodes {
            for hash in &node.acked_changes {
                for other in &c.nodes {
                    let doc = other.replica.flag_set(SET);
                    prop_assert!(
                        doc.is_some_and(|d| d.automerge().get_change_by_hash(hash).is_some()),
                        "acknowledged change {} missing", hash
                    );
                }
            }
        }
        prop_assert!(c.converged(), "heads differ after a full exchange");
        let first = c.nodes[0].replica.flag_set(SET).map(|d| (d.to_flagd(), d.conflicts(), d.broken_flags(), probe(d)));
        for node in &c.nodes {
            let got = node.replica.flag_set(SET).map(|d| (d.to_flagd(), d.conflicts(), d.broken_flags(), probe(d)));
            prop_assert_eq!(&got, &first);
            prop_assert!(node.protocol_errors.is_empty(), "{:?}", node.protocol_errors);
        }
    }
}

/// Two changes written one after the other on a replica (the second depends on the first), and
/// the identity of another node to apply them to.
fn two_dependent_changes() -> (automerge::Change, automerge::Change, Identity) {
    let mut c = Cluster::new(2);
    c.write(0, put_flag("a")).unwrap();
    c.write(0, put_flag("b")).unwrap();
    let doc0 = c.nodes[0].replica.flag_set(SET).unwrap().clone();
    let changes = doc0.automerge().get_changes(&[]);
    let [.., first, last] = changes.as_slice() else {
        panic!("two writes give at least two changes");
    };
    let id = Identity {
        node: "x".into(),
        region: "r".into(),
        incarnation: 1,
    };
    (first.clone(), last.clone(), id)
}

#[test]
fn a_snapshot_leaves_out_a_change_held_back_for_a_missing_dependency() {
    let (_, last, id) = two_dependent_changes();
    // A document that got only the last change: Automerge holds it back (its dependency is
    // missing), and a snapshot must not contain it, or the snapshot would not load.
    let mut doc = FlagSetDoc::new(id.clone());
    doc.automerge_mut().apply_changes([last]).unwrap();
    assert!(!doc.automerge().get_missing_deps(&[]).is_empty());
    let loaded = FlagSetDoc::load(Some(&doc.save()), &[], id).unwrap();
    assert_eq!(loaded.heads(), doc.heads());
}

#[test]
fn has_change_tells_applied_from_queued_and_unknown_changes() {
    use crate::replica::has_change;
    let (first, last, id) = two_dependent_changes();
    let mut doc = FlagSetDoc::new(id);
    let genesis = doc.heads()[0];
    // Nothing queued: the fast path answers.
    assert!(has_change(doc.automerge(), &genesis));
    assert!(!has_change(doc.automerge(), &last.hash()));
    // `last` waits for `first`: queued is not applied, and applied stays applied.
    doc.automerge_mut().apply_changes([last.clone()]).unwrap();
    assert!(!has_change(doc.automerge(), &last.hash()));
    assert!(!has_change(doc.automerge(), &first.hash()));
    assert!(has_change(doc.automerge(), &genesis));
    doc.automerge_mut().apply_changes([first.clone()]).unwrap();
    assert!(has_change(doc.automerge(), &first.hash()));
    assert!(has_change(doc.automerge(), &last.hash()));
}

#[test]
fn the_largest_flag_a_document_can_hold_makes_a_change_the_store_keeps() {
    use bunting_model::limits::{MAX_CHANGE_BYTES, MAX_DOCUMENT_BYTES};
    // One variant as large as a whole document allows, and a rule of many short strings: the
    // two shapes of finding 1 of the hardening issue (a config blob, a long `in` list).
    let blob = "x".repeat(MAX_DOCUMENT_BYTES - 1024);
    let users: Vec<String> = (0..90_000).map(|i| format!("user-{i}")).collect();
    for flag in [
        json!({"state": "ENABLED", "variants": {"on": blob, "off": ""}, "defaultVariant": "off"}),
        json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
               "targeting": {"if": [{"in": [{"var": "u"}, users]}, "on", "off"]}}),
    ] {
        let mut c = Cluster::new(1);
        c.nodes[0].auto_persist = false;
        let flag = Flag::from_value(&flag, "").unwrap();
        c.write(
            0,
            WriteCommand::PutFlag {
                key: "big".into(),
                flag,
            },
        )
        .unwrap();
        let request = &c.nodes[0].unstored[0];
        let largest = request.changes.iter().map(Vec::len).max().unwrap();
        assert!(
            largest <= MAX_CHANGE_BYTES,
            "a change of {largest} bytes is over MAX_CHANGE_BYTES ({MAX_CHANGE_BYTES})"
        );
    }
}

/// Found by fuzz/ (`wire`): a change chunk whose op id counter does not fit in a u32 made
/// automerge 0.12 panic while decoding it, so one frame from a peer aborted the node.
#[test]
fn a_change_chunk_that_panics_automerge_is_refused_as_a_protocol_error() {
    let chunk = include_bytes!("../fuzz-regressions/change-chunk-op-id-counter-over-u32.bin");
    let mut payload = Vec::new();
    wire::encode_heads(&[], &mut payload).unwrap();
    payload.extend_from_slice(chunk);
    let frame = wire::encode(wire::FrameKind::Changes, SET, &payload, 1 << 20).unwrap();
    let peer = PeerId("peer-a".into());
    let mut replica = Replica::new(ReplicaConfig::new("n1", "r1", 1), Timestamp(0));
    replica.add_peer(peer.clone(), Timestamp(0));
    replica.handle_message(&peer, &frame, Timestamp(1));
    let events: Vec<Event> = std::iter::from_fn(|| replica.poll_event()).collect();
    assert!(
        matches!(&events[..], [Event::ProtocolError { error: Error::Protocol(why), .. }]
            if why.contains("change chunk")),
        "{events:?}"
    );
    assert!(
        replica.flag_set(SET).is_none(),
        "a refused frame created its flag set"
    );
}

/// A set filled one flag at a time is held to the same MAX_FLAGS as an upload: the flag past
/// the limit is refused naming it, nothing is written, and existing flags still take writes.
#[test]
fn single_flag_writes_cannot_grow_a_set_past_max_flags() {
    use bunting_model::limits::MAX_FLAGS;
    let mut flags = serde_json::Map::new();
    for i in 0..MAX_FLAGS {
        flags.insert(
            format!("f{i}"),
            json!({"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"}),
        );
    }
    let set = FlagSet::from_value(&json!({ "flags": flags })).unwrap();
    let mut c = Cluster::new(1);
    c.write(0, WriteCommand::ReplaceSet { set }).unwrap();
    let one = Flag::from_value(
        &json!({"state": "DISABLED", "variants": {"on": true}, "defaultVariant": "on"}),
        "",
    )
    .unwrap();
    let refused = c
        .write(
            0,
            WriteCommand::PutFlag {
                key: "one-more".into(),
                flag: one.clone(),
            },
        )
        .unwrap_err();
    match refused {
        Error::Invalid(p) => {
            assert_eq!(p.0[0].pointer, "/flags/one-more");
            assert!(p.0[0].message.contains("MAX_FLAGS"), "{}", p.0[0].message);
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let doc = c.nodes[0].replica.flag_set(SET).unwrap();
    assert!(doc.flag("one-more").is_none());
    c.write(
        0,
        WriteCommand::PutFlag {
            key: "f7".into(),
            flag: one,
        },
    )
    .unwrap();
}
