//! Propagation through the gossip transport: a one-field write on us-east-1 until ap-south-2 holds
//! it, in the six-node cluster of `regions/` (k = 2) on loopback QUIC, with real replicas driven
//! as the node drives them (persistence confirmed at once). Run twice: plain loopback, and with a
//! relay adding 50 ms one-way delay to every cross-region link. Writes are spaced by an untimed
//! pause, as real writes are rare. Besides criterion's estimates it prints p50/p99 over all
//! iterations.
//!
//! `cargo bench -p bunting-gossip --bench propagation`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark has no caller to hand an error to

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use bunting_gossip::cluster::{Cluster, DEFAULT_LINKS_PER_REGION};
use bunting_gossip::relay::Relay;
use bunting_gossip::{certs, Gossip, GossipConfig, GossipEvent, NodeTls, PeerId};
use bunting_model::{Flag, FlagState};
use bunting_replica::{
    ChangeHash, Event, Replica, ReplicaConfig, Timestamp, WriteCommand, WriteMeta,
};
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

const SET: &str = "production";
const WRITER: &str = "us-east-1";
const READER: &str = "ap-south-2";

type WriteReply = oneshot::Sender<Vec<ChangeHash>>;

struct Node {
    writes: mpsc::Sender<(WriteCommand, WriteReply)>,
    heads: watch::Receiver<Vec<ChangeHash>>,
}

async fn drive(
    mut replica: Replica,
    gossip: Gossip,
    mut events: mpsc::Receiver<GossipEvent>,
    mut writes: mpsc::Receiver<(WriteCommand, WriteReply)>,
    heads: watch::Sender<Vec<ChangeHash>>,
) {
    let start = Instant::now();
    let now = || Timestamp(start.elapsed().as_millis() as u64);
    loop {
        let timer = replica
            .poll_timeout()
            .map(|t| start + Duration::from_millis(t.0))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let mut reply = None;
        tokio::select! {
            event = events.recv() => match event {
                Some(GossipEvent::Connected(peer)) => replica.add_peer(peer, now()),
                Some(GossipEvent::Disconnected(peer)) => replica.remove_peer(&peer),
                Some(GossipEvent::Frame { peer, bytes }) => replica.handle_message(&peer, &bytes, now()),
                None => return,
            },
            write = writes.recv() => match write {
                Some((command, tx)) => {
                    let meta = WriteMeta { token_id: "bench".into(), wall_time_ms: now().0, message: String::new() };
                    let _ = replica.handle_local_write(SET, command.into(), meta, now());
                    reply = Some(tx);
                }
                None => return,
            },
            _ = tokio::time::sleep_until(timer) => replica.handle_timeout(now()),
        }
        while let Some(event) = replica.poll_event() {
            match event {
                Event::PersistRequest(p) => {
                    let _ = replica.persisted(p.id, now());
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
        let current = replica.flag_set(SET).map(|d| d.heads()).unwrap_or_default();
        heads.send_if_modified(|h| {
            let changed = *h != current;
            *h = current.clone();
            changed
        });
        if let Some(tx) = reply {
            let _ = tx.send(current);
        }
    }
}

struct Bench {
    nodes: BTreeMap<String, Node>,
    _relays: Vec<Relay>,
    _pki: tempfile::TempDir,
    state: bool,
}

/// Starts the six nodes; with `delay`, every cross-region connection goes through a relay that
/// adds it in each direction.
async fn cluster(delay: Option<Duration>, anti_entropy_ms: u64) -> Bench {
    let pki = tempfile::tempdir().unwrap();
    certs::init_ca(&pki.path().join("ca")).unwrap();
    let regions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../regions");
    let cluster = Cluster::load_dir(&regions).unwrap();
    let mut sockets = BTreeMap::new();
    for (_, node) in cluster.nodes() {
        sockets.insert(node.id.clone(), UdpSocket::bind("127.0.0.1:0").unwrap());
    }
    let direct: BTreeMap<String, SocketAddr> = sockets
        .iter()
        .map(|(id, s)| (id.clone(), s.local_addr().unwrap()))
        .collect();
    let mut relays = Vec::new();
    let mut relayed = BTreeMap::new();
    if let Some(delay) = delay {
        for (id, addr) in &direct {
            let relay = Relay::start("127.0.0.1:0".parse().unwrap(), *addr)
                .await
                .unwrap();
            relay.set_delay(delay);
            relayed.insert(id.clone(), relay.local_addr());
            relays.push(relay);
        }
    }
    let mut nodes = BTreeMap::new();
    for (id, socket) in sockets {
        let (home, _) = cluster.node(&id).unwrap();
        let peers = cluster
            .peers_of(&id, DEFAULT_LINKS_PER_REGION)
            .unwrap()
            .into_iter()
            .map(|p| {
                let addr = if p.region != home {
                    relayed.get(&p.id.0).copied().unwrap_or(direct[&p.id.0])
                } else {
                    direct[&p.id.0]
                };
                (p.id, addr)
            })
            .collect();
        let out = pki.path().join(&id);
        certs::issue(&pki.path().join("ca"), &id, &out).unwrap();
        let tls = NodeTls::load(&out).unwrap();
        let mut replica_config = ReplicaConfig::new(id.clone(), home, 1);
        replica_config.anti_entropy_interval_ms = anti_entropy_ms;
        let replica = Replica::new(replica_config, Timestamp(0));
        let (gossip, events) =
            Gossip::start(GossipConfig::new(PeerId(id.clone()), peers), &tls, socket).unwrap();
        let (writes, write_rx) = mpsc::channel(4);
        let (heads_tx, heads) = watch::channel(Vec::new());
        tokio::spawn(drive(replica, gossip, events, write_rx, heads_tx));
        nodes.insert(id, Node { writes, heads });
    }
    let mut bench = Bench {
        nodes,
        _relays: relays,
        _pki: pki,
        state: true,
    };
    let flag = Flag::from_value(
        &json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}),
        "",
    )
    .unwrap();
    bench
        .write(WriteCommand::PutFlag {
            key: "bench".into(),
            flag,
        })
        .await;
    bench
}

impl Bench {
    /// Writes on the writer and returns how long until the reader holds the write.
    async fn write(&mut self, command: WriteCommand) -> Duration {
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        self.nodes[WRITER].writes.send((command, tx)).await.unwrap();
        let heads = rx.await.unwrap();
        let mut reader = self.nodes[READER].heads.clone();
        tokio::time::timeout(Duration::from_secs(30), reader.wait_for(|h| *h == heads))
            .await
            .expect("the write never reached the reader")
            .unwrap();
        started.elapsed()
    }

    async fn toggle(&mut self) -> Duration {
        self.state = !self.state;
        let state = if self.state {
            FlagState::Enabled
        } else {
            FlagState::Disabled
        };
        self.write(WriteCommand::SetState {
            key: "bench".into(),
            state,
        })
        .await
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn propagation(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("propagation");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(200));
    let delay = Some(Duration::from_millis(50));
    // (name, added delay, anti-entropy interval, untimed pause before each write, timed budget).
    // The replica's default anti-entropy (5 s) restarts every sync session, and a write in the
    // round trip after that waits one more round trip; the last case shows the cost without it.
    for (name, delay, anti_entropy_ms, pause, budget) in [
        ("loopback", None, 5_000, 50, 400),
        ("cross_region_50ms", delay, 5_000, 200, 3_000),
        (
            "cross_region_50ms_without_anti_entropy",
            delay,
            3_600_000,
            200,
            3_000,
        ),
    ] {
        let pause = Duration::from_millis(pause);
        group.measurement_time(Duration::from_millis(budget));
        let mut bench = runtime.block_on(cluster(delay, anti_entropy_ms));
        let mut all = Vec::new();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Writes are rare (tens a minute): let the previous one's gossip settle first,
                    // outside the timed part.
                    runtime.block_on(async { tokio::time::sleep(pause).await });
                    let took = runtime.block_on(bench.toggle());
                    all.push(took);
                    total += took;
                }
                total
            })
        });
        // Criterion picks few iterations for the fast case; top up so the percentiles rest on
        // enough writes.
        while all.len() < 150 {
            runtime.block_on(async { tokio::time::sleep(pause).await });
            all.push(runtime.block_on(bench.toggle()));
        }
        all.sort();
        if !all.is_empty() {
            println!(
                "propagation/{name}: {} writes, p50 {:?}, p99 {:?}, max {:?}",
                all.len(),
                percentile(&all, 0.50),
                percentile(&all, 0.99),
                all[all.len() - 1]
            );
        }
    }
    group.finish();
}

criterion_group!(benches, propagation);
criterion_main!(benches);
