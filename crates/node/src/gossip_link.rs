//! The link between this node's driver and the gossip transport ([`bunting_gossip`]).
//!
//! When the node config names a cluster (a regions directory, this node's id in it and a
//! directory with its certificates), [`start`] opens the QUIC transport on the node's gossip
//! address and hands the driver a [`Link`]. The driver stays the single owner of the replica: it
//! feeds the transport's events into it and drains its frames into [`Gossip::send`]. Without a
//! cluster the node runs alone.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bunting_gossip::cluster::{Cluster, DEFAULT_LINKS_PER_REGION};
use bunting_gossip::{Gossip, GossipConfig, GossipEvent, NodeTls, PeerId};
use bunting_replica::wire::DEFAULT_MAX_FRAME_BYTES;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::NodeError;

/// Where this node finds its cluster (`[cluster]` in the node file, or `--regions`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Directory of region files (`regions/*.toml`); this node's id must be in one of them.
    pub regions: PathBuf,
    /// Directory holding `ca.pem`, `node.pem` and `node.key` (from `bunting certs issue`);
    /// `<data_dir>/tls` when absent.
    pub tls_dir: Option<PathBuf>,
    /// Links this node keeps to every other region (full mesh inside its own region).
    pub links_per_region: usize,
    /// A node that has peers but no connection to any of them and no frame from any for this
    /// long is stale: it keeps serving, and says so on `/readyz`, in node status and in OFREP
    /// metadata (`bunting.stale`), because its answers may lag the rest of the cluster.
    pub stale_after_ms: u64,
}

/// Default for [`ClusterConfig::stale_after_ms`]: one minute.
pub const DEFAULT_STALE_AFTER_MS: u64 = 60_000;

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            regions: PathBuf::from("regions"),
            tls_dir: None,
            links_per_region: DEFAULT_LINKS_PER_REGION,
            stale_after_ms: DEFAULT_STALE_AFTER_MS,
        }
    }
}

/// A per-peer metric family: name, help text and how to read it from the transport's stats.
type PeerFamily = (
    &'static str,
    &'static str,
    fn(&bunting_gossip::PeerStats) -> u64,
);

/// What node status shows about the links; shared by the driver and the HTTP layer.
#[derive(Debug)]
pub struct LinkStatus {
    gossip: Gossip,
    /// Wall-clock ms of the last `PeerSynced` per peer (the replica reports it, not the transport).
    last_sync_ms: Mutex<BTreeMap<PeerId, u64>>,
    /// Whether any peer is configured; a node alone is never stale.
    has_peers: bool,
    stale_after_ms: u64,
    /// Peers connected now (the driver counts `Connected` / `Disconnected` events). A connected
    /// peer has been heard from lately: QUIC keep-alives close a silent connection.
    connected: AtomicUsize,
    /// Wall-clock ms this node last heard from any peer (a frame, a connection coming or going);
    /// the start time until then.
    last_heard_ms: AtomicU64,
}

impl LinkStatus {
    pub(crate) fn synced(&self, peer: PeerId, now_ms: u64) {
        let mut map = self.last_sync_ms.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(peer, now_ms);
    }

    /// Notes a transport event for the staleness check.
    pub(crate) fn heard(&self, event: &GossipEvent, now_ms: u64) {
        match event {
            GossipEvent::Connected(_) => {
                self.connected.fetch_add(1, Ordering::AcqRel);
            }
            GossipEvent::Disconnected(_) => {
                let _ = self
                    .connected
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            }
            GossipEvent::Frame { .. } => {}
        }
        self.last_heard_ms.fetch_max(now_ms, Ordering::AcqRel);
    }

    /// `Some(ms since this node last heard from a peer)` when the node is stale (see
    /// [`ClusterConfig::stale_after_ms`]). Cheap while a peer is connected: one atomic load.
    pub fn stale_for_ms(&self) -> Option<u64> {
        if !self.has_peers || self.connected.load(Ordering::Acquire) > 0 {
            return None;
        }
        let silent =
            crate::driver::now_ms().saturating_sub(self.last_heard_ms.load(Ordering::Acquire));
        (silent >= self.stale_after_ms).then_some(silent)
    }

    /// Appends per-peer families to the OpenMetrics text of `/metrics` (peer ids are DNS labels,
    /// so label values need no escaping).
    pub fn render_metrics(&self, text: &mut String, now_ms: u64) {
        use std::fmt::Write;
        let stats = self.gossip.stats();
        let synced = self
            .last_sync_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let gauges: [PeerFamily; 1] = [(
            "bunting_peer_connected",
            "Whether the QUIC connection to the peer is up",
            |s| u64::from(s.connected),
        )];
        let counters: [PeerFamily; 5] = [
            (
                "bunting_peer_bytes_sent",
                "Frame bytes sent to the peer",
                |s| s.bytes_sent,
            ),
            (
                "bunting_peer_bytes_received",
                "Frame bytes received from the peer",
                |s| s.bytes_received,
            ),
            ("bunting_peer_frames_sent", "Frames sent to the peer", |s| {
                s.frames_sent
            }),
            (
                "bunting_peer_frames_received",
                "Frames received from the peer",
                |s| s.frames_received,
            ),
            (
                "bunting_peer_frames_rejected",
                "Malformed frames from the peer",
                |s| s.frames_rejected,
            ),
        ];
        for (name, help, get) in gauges {
            let _ = writeln!(text, "# TYPE {name} gauge\n# HELP {name} {help}.");
            for (peer, s) in &stats.peers {
                let _ = writeln!(text, "{name}{{peer=\"{}\"}} {}", peer.0, get(s));
            }
        }
        for (name, help, get) in counters {
            let _ = writeln!(text, "# TYPE {name} counter\n# HELP {name} {help}.");
            for (peer, s) in &stats.peers {
                let _ = writeln!(text, "{name}_total{{peer=\"{}\"}} {}", peer.0, get(s));
            }
        }
        let name = "bunting_peer_last_sync_age_seconds";
        let _ = writeln!(
            text,
            "# TYPE {name} gauge\n# HELP {name} Seconds since the peer last confirmed it holds our heads."
        );
        for (peer, at) in &synced {
            let age = now_ms.saturating_sub(*at) as f64 / 1000.0;
            let _ = writeln!(text, "{name}{{peer=\"{}\"}} {age}", peer.0);
        }
        let name = "bunting_stale";
        let _ = writeln!(
            text,
            "# TYPE {name} gauge\n# HELP {name} Whether this node has heard from no peer for stale_after_ms.\n{name} {}",
            u8::from(self.stale_for_ms().is_some())
        );
    }

    /// Per-peer state as JSON for `GET /api/v1/status`.
    pub fn to_json(&self) -> Value {
        let stats = self.gossip.stats();
        let synced = self
            .last_sync_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let peers: Vec<Value> = stats
            .peers
            .iter()
            .map(|(peer, s)| {
                json!({
                    "peer": peer.0,
                    "addr": s.addr.map(|a| a.to_string()),
                    "connected": s.connected,
                    "connectedSinceUnixMs": s.connected_since_unix_ms,
                    "lastFrameReceivedUnixMs": s.last_frame_received_unix_ms,
                    "lastSyncUnixMs": synced.get(peer),
                    "framesSent": s.frames_sent,
                    "framesReceived": s.frames_received,
                    "bytesSent": s.bytes_sent,
                    "bytesReceived": s.bytes_received,
                    "framesRejected": s.frames_rejected,
                    "framesDropped": s.frames_dropped,
                    "connections": s.connections,
                    "dialFailures": s.dial_failures,
                    "lastError": s.last_error,
                    "rttMs": s.rtt_ms,
                })
            })
            .collect();
        let stale_for_ms = self.stale_for_ms();
        json!({
            "node": self.gossip.node().0,
            "gossipAddr": self.gossip.local_addr().ok().map(|a| a.to_string()),
            "stale": stale_for_ms.is_some(),
            "staleForMs": stale_for_ms,
            "staleAfterMs": self.stale_after_ms,
            "lastHeardFromPeerUnixMs": self.last_heard_ms.load(Ordering::Acquire),
            "peers": peers,
            "handshakesFailed": stats.handshakes_failed,
            "unknownPeersRefused": stats.unknown_peers_refused,
        })
    }
}

/// The driver's end of the transport.
pub struct Link {
    pub(crate) gossip: Gossip,
    /// `None` once the transport has gone away (the node then keeps serving alone).
    events: Option<mpsc::Receiver<GossipEvent>>,
    pub(crate) status: Arc<LinkStatus>,
}

impl Link {
    /// The next transport event; pends for ever when there is no link or it has closed.
    pub(crate) async fn next_event(link: &mut Option<Link>) -> GossipEvent {
        if let Some(events) = link.as_mut().and_then(|l| l.events.as_mut()) {
            if let Some(event) = events.recv().await {
                return event;
            }
            tracing::warn!("gossip transport stopped; serving without peers");
            if let Some(l) = link.as_mut() {
                l.events = None;
            }
        }
        std::future::pending().await
    }
}

/// This node's region and HTTP address as the region files give them (for `bunting serve
/// --regions DIR --node-id ID` without `--region` / `--http`).
pub fn node_in_cluster(
    cluster: &ClusterConfig,
    node_id: &str,
) -> Result<(String, std::net::SocketAddr), NodeError> {
    let map = Cluster::load_dir(&cluster.regions)
        .map_err(|e| NodeError::Config(format!("cluster: {e}")))?;
    let (region, spec) = map.node(node_id).ok_or_else(|| {
        NodeError::Config(format!(
            "cluster: node {node_id:?} is in no region file under {}",
            cluster.regions.display()
        ))
    })?;
    Ok((region.to_owned(), spec.http))
}

/// Starts the transport for `node_id` when a cluster is configured. Must run inside the runtime.
pub fn start(
    cluster: Option<&ClusterConfig>,
    node_id: &str,
    data_dir: &std::path::Path,
) -> Result<Option<Link>, NodeError> {
    let Some(cluster) = cluster else {
        return Ok(None);
    };
    let err = |e: bunting_gossip::Error| NodeError::Config(format!("cluster: {e}"));
    let map = Cluster::load_dir(&cluster.regions).map_err(err)?;
    let (_, me) = map.node(node_id).ok_or_else(|| {
        NodeError::Config(format!(
            "cluster: node {node_id:?} is in no region file under {}",
            cluster.regions.display()
        ))
    })?;
    let gossip_addr = me.gossip;
    let peers: Vec<(PeerId, std::net::SocketAddr)> = map
        .peers_of(node_id, cluster.links_per_region)
        .map_err(err)?
        .into_iter()
        .map(|p| (p.id, p.gossip))
        .collect();
    let has_peers = !peers.is_empty();
    let tls_dir = cluster
        .tls_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("tls"));
    let tls = NodeTls::load(&tls_dir).map_err(err)?;
    let socket = std::net::UdpSocket::bind(gossip_addr)
        .map_err(|e| NodeError::Config(format!("cluster: gossip address {gossip_addr}: {e}")))?;
    let mut config = GossipConfig::new(PeerId(node_id.to_owned()), peers);
    // Equal to the replica's limit (ReplicaConfig's default), so neither side refuses the other's frames.
    config.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES;
    let (gossip, events) = Gossip::start(config, &tls, socket).map_err(err)?;
    tracing::info!(node = node_id, addr = %gossip_addr, "gossip transport started");
    let status = Arc::new(LinkStatus {
        gossip: gossip.clone(),
        last_sync_ms: Mutex::new(BTreeMap::new()),
        has_peers,
        stale_after_ms: cluster.stale_after_ms,
        connected: AtomicUsize::new(0),
        last_heard_ms: AtomicU64::new(crate::driver::now_ms()),
    });
    Ok(Some(Link {
        gossip,
        events: Some(events),
        status,
    }))
}
