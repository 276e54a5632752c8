//! QUIC connections to peers: dialing with backoff, accepting, deduplication, framing, statistics.
//!
//! Per connection: the dialer opens one bidirectional stream; each side first sends a hello
//! (magic, version, the sender's process instance), then frames, each a `u32` big-endian length
//! followed by one replica frame ([`bunting_replica::wire`]). A frame over the size limit, or one
//! the replica's header check refuses, closes that connection (logged and counted), nothing else.
//!
//! One connection per peer: both ends dial a peer they have no connection to. When a second
//! connection to the same peer comes up, the hello's instance decides: a different instance means
//! the peer restarted and the old connection is dead, so the new one replaces it; the same instance
//! means two simultaneous dials, and both ends keep the one dialed by the lower node id.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bunting_replica::{wire, PeerId};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::certs::{self, NodeTls};
use crate::Error;

/// Application close codes, so both ends' logs say why a connection ended.
mod code {
    pub const SHUTDOWN: u32 = 0;
    pub const DUPLICATE: u32 = 1;
    pub const REPLACED: u32 = 2;
    pub const MALFORMED: u32 = 3;
    pub const UNKNOWN_PEER: u32 = 4;
    pub const SLOW_PEER: u32 = 5;
    pub const ENDED: u32 = 6;
}

const HELLO_MAGIC: &[u8; 4] = b"BGSP";
const HELLO_VERSION: u8 = 1;
const HELLO_BYTES: usize = 4 + 1 + 8;

/// What the transport reports to the driver, in order per peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipEvent {
    /// A connection to this peer is up: call `Replica::add_peer` (sync resumes from the stored
    /// sync state).
    Connected(PeerId),
    /// The connection to this peer is gone: call `Replica::remove_peer`.
    Disconnected(PeerId),
    /// A frame from this peer (its header already checked): call `Replica::handle_message`.
    Frame { peer: PeerId, bytes: Vec<u8> },
}

/// How the transport behaves; [`GossipConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipConfig {
    /// This node's id; must be the name in its certificate.
    pub node: PeerId,
    /// The peers to keep a connection to, with their gossip addresses (see
    /// [`crate::cluster::Cluster::peers_of`]). Connections from other nodes are refused.
    pub peers: Vec<(PeerId, SocketAddr)>,
    /// Largest frame sent or accepted; larger ones close the connection.
    pub max_frame_bytes: usize,
    /// Bytes queued for one peer beyond which it is treated as stuck and disconnected, so a slow
    /// peer never blocks the driver or grows memory without bound.
    pub max_queued_bytes: usize,
    /// Capacity of the event channel; a full channel slows the readers down (QUIC flow control
    /// then slows the peers).
    pub event_capacity: usize,
    /// First reconnect delay; doubled after every failed dial up to `backoff_max`, with jitter.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// QUIC keep-alive interval; must be well under `idle_timeout`.
    pub keep_alive: Duration,
    /// A connection that hears nothing for this long is closed (this is how a crashed peer is noticed).
    pub idle_timeout: Duration,
    /// Longest time for the hello exchange after the TLS handshake.
    pub hello_timeout: Duration,
}

impl GossipConfig {
    /// Defaults: 32 MiB frames, 64 MiB queue per peer, reconnect from 100 ms up to 10 s, keep-alive
    /// 1 s, idle timeout 5 s.
    pub fn new(node: PeerId, peers: Vec<(PeerId, SocketAddr)>) -> Self {
        GossipConfig {
            node,
            peers,
            max_frame_bytes: wire::DEFAULT_MAX_FRAME_BYTES,
            max_queued_bytes: 64 * 1024 * 1024,
            event_capacity: 1024,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(5),
        }
    }
}

/// What the transport knows about one peer, for node status and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerStats {
    /// The peer's configured gossip address.
    pub addr: Option<SocketAddr>,
    /// Whether a connection is up now.
    pub connected: bool,
    /// Whether this node dialed the current connection (both ends agree on which one they keep).
    pub outgoing: Option<bool>,
    /// Whether a dial to this peer is under way.
    pub dialing: bool,
    /// When the current connection came up (Unix milliseconds).
    pub connected_since_unix_ms: Option<u64>,
    /// When the last frame arrived from this peer (Unix milliseconds); the node's staleness check.
    pub last_frame_received_unix_ms: Option<u64>,
    /// Frames and bytes (4-byte length prefixes included) over all connections.
    pub frames_sent: u64,
    pub frames_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Frames refused (oversized, malformed, or reported unusable by the replica); each closed
    /// its connection.
    pub frames_rejected: u64,
    /// Frames the driver sent while the peer had no connection (dropped; resynced on reconnect).
    pub frames_dropped: u64,
    /// Connections established with this peer.
    pub connections: u64,
    /// Dials that failed (unreachable, handshake refused, hello timed out).
    pub dial_failures: u64,
    /// The last failure or close reason, for status pages.
    pub last_error: Option<String>,
    /// QUIC's round-trip estimate on the current connection.
    pub rtt_ms: Option<u64>,
    /// UDP bytes on the current connection (QUIC and TLS overhead, acks and keep-alives included).
    pub udp_bytes_sent: u64,
    pub udp_bytes_received: u64,
}

/// Transport-wide statistics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GossipStats {
    pub peers: BTreeMap<PeerId, PeerStats>,
    /// Incoming connections whose TLS handshake failed (e.g. a certificate not from the cluster CA).
    pub handshakes_failed: u64,
    /// Incoming connections from nodes with a valid certificate that are not configured peers.
    pub unknown_peers_refused: u64,
}

/// The running transport; cheap to clone. Start it with [`Gossip::start`].
#[derive(Debug, Clone)]
pub struct Gossip {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: GossipConfig,
    /// Random per process start: tells a restarted peer's new connection from a duplicate dial.
    instance: u64,
    endpoint: Endpoint,
    peers: Mutex<BTreeMap<PeerId, Slot>>,
    events: mpsc::Sender<GossipEvent>,
    handshakes_failed: AtomicU64,
    unknown_peers_refused: AtomicU64,
    next_connection: AtomicU64,
    shutdown: watch::Sender<bool>,
}

#[derive(Debug)]
struct Slot {
    live: Option<Live>,
    stats: PeerStats,
    /// Wakes this peer's dialer when its connection goes away.
    wake: Arc<Notify>,
}

#[derive(Debug)]
struct Live {
    id: u64,
    instance: u64,
    dialed_by_lower: bool,
    dialed_by_me: bool,
    connection: Connection,
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

/// Why a connection's task ended.
enum End {
    Malformed(String),
    Lost(String),
    Superseded,
    EventsClosed,
}

impl Gossip {
    /// Starts the transport on `socket` (bind it to port 0 in tests): accepts connections from
    /// the configured peers and dials each of them. Must be called inside a Tokio runtime.
    /// Returns the handle and the events the driver must consume.
    pub fn start(
        config: GossipConfig,
        tls: &NodeTls,
        socket: UdpSocket,
    ) -> Result<(Gossip, mpsc::Receiver<GossipEvent>), Error> {
        if tls.node_id() != config.node.0 {
            return Err(Error::Tls(format!(
                "the certificate names {:?}, but this node is {:?}",
                tls.node_id(),
                config.node.0
            )));
        }
        let transport = Arc::new(transport_config(&config)?);
        let mut server = tls.server_config()?;
        server.transport_config(transport.clone());
        let mut client = tls.client_config()?;
        client.transport_config(transport);
        let runtime = quinn::default_runtime()
            .ok_or_else(|| Error::Socket(std::io::Error::other("no async runtime")))?;
        let mut endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(Error::Socket)?;
        endpoint.set_default_client_config(client);

        let (events, receiver) = mpsc::channel(config.event_capacity.max(2));
        let peers = config
            .peers
            .iter()
            .filter(|(id, _)| *id != config.node)
            .map(|(id, addr)| {
                let stats = PeerStats {
                    addr: Some(*addr),
                    ..PeerStats::default()
                };
                let slot = Slot {
                    live: None,
                    stats,
                    wake: Arc::new(Notify::new()),
                };
                (id.clone(), slot)
            })
            .collect();
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            instance: fastrand::u64(..),
            endpoint,
            peers: Mutex::new(peers),
            events,
            handshakes_failed: AtomicU64::new(0),
            unknown_peers_refused: AtomicU64::new(0),
            next_connection: AtomicU64::new(0),
            shutdown,
        });
        tokio::spawn(accept_loop(shared.clone()));
        // One dialer per peer, even if the list names a peer twice (the last address given wins).
        let dialers: Vec<(PeerId, SocketAddr)> = shared
            .lock_peers()
            .iter()
            .filter_map(|(peer, slot)| Some((peer.clone(), slot.stats.addr?)))
            .collect();
        for (peer, addr) in dialers {
            tokio::spawn(dial_loop(shared.clone(), peer, addr));
        }
        Ok((Gossip { shared }, receiver))
    }

    /// The address the transport listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.shared.endpoint.local_addr().map_err(Error::Socket)
    }

    /// This node's id.
    pub fn node(&self) -> &PeerId {
        &self.shared.config.node
    }

    /// Queues a frame for `peer`. Never waits. Without a connection the frame is dropped and
    /// counted (the replica resyncs when the peer reconnects); a peer whose queue is over the limit
    /// is disconnected.
    pub fn send(&self, peer: &PeerId, frame: Vec<u8>) -> Result<(), Error> {
        let max = self.shared.config.max_frame_bytes;
        if frame.len() > max {
            return Err(Error::FrameTooLarge {
                len: frame.len(),
                max,
            });
        }
        let mut peers = self.shared.lock_peers();
        let slot = peers
            .get_mut(peer)
            .ok_or_else(|| Error::UnknownPeer(peer.0.clone()))?;
        let Some(live) = &slot.live else {
            slot.stats.frames_dropped += 1;
            return Err(Error::NotConnected(peer.0.clone()));
        };
        let queued = live.queued.fetch_add(frame.len(), Ordering::Relaxed) + frame.len();
        if queued > self.shared.config.max_queued_bytes {
            warn!(peer = %peer.0, queued, "send queue over its limit; disconnecting the peer");
            live.connection
                .close(VarInt::from_u32(code::SLOW_PEER), b"send queue full");
            slot.stats.frames_dropped += 1;
            slot.stats.last_error = Some("send queue full".into());
            return Err(Error::SlowPeer(peer.0.clone()));
        }
        if live.outbox.send(frame).is_err() {
            slot.stats.frames_dropped += 1;
            return Err(Error::NotConnected(peer.0.clone()));
        }
        Ok(())
    }

    /// Closes the connection to `peer` because it sent something unusable (e.g. the replica
    /// reported a protocol error for its frame); counted as a rejected frame. The peer may
    /// reconnect and start a fresh sync session.
    pub fn reject_peer(&self, peer: &PeerId, reason: &str) {
        let mut peers = self.shared.lock_peers();
        if let Some(slot) = peers.get_mut(peer) {
            slot.stats.frames_rejected += 1;
            slot.stats.last_error = Some(reason.to_owned());
            if let Some(live) = &slot.live {
                warn!(peer = %peer.0, reason, "closing the connection: unusable frame");
                live.connection
                    .close(VarInt::from_u32(code::MALFORMED), b"malformed frame");
            }
        }
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> GossipStats {
        let peers = self.shared.lock_peers();
        let peers = peers
            .iter()
            .map(|(id, slot)| {
                let mut stats = slot.stats.clone();
                if let Some(live) = &slot.live {
                    stats.outgoing = Some(live.dialed_by_me);
                    let quic = live.connection.stats();
                    stats.rtt_ms =
                        Some(u64::try_from(quic.path.rtt.as_millis()).unwrap_or(u64::MAX));
                    stats.udp_bytes_sent = quic.udp_tx.bytes;
                    stats.udp_bytes_received = quic.udp_rx.bytes;
                }
                (id.clone(), stats)
            })
            .collect();
        GossipStats {
            peers,
            handshakes_failed: self.shared.handshakes_failed.load(Ordering::Relaxed),
            unknown_peers_refused: self.shared.unknown_peers_refused.load(Ordering::Relaxed),
        }
    }

    /// Closes every connection, stops dialing and waits (at most a second) for the peers to be
    /// told. The socket is released once the closed connections have drained (QUIC's draining
    /// period, a few seconds at most) and every clone of this handle is dropped.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        self.shared
            .endpoint
            .close(VarInt::from_u32(code::SHUTDOWN), b"shutdown");
        let wait = self.shared.config.idle_timeout.min(Duration::from_secs(1));
        let _ = tokio::time::timeout(wait, self.shared.endpoint.wait_idle()).await;
    }
}

impl Shared {
    fn lock_peers(&self) -> MutexGuard<'_, BTreeMap<PeerId, Slot>> {
        // A panic elsewhere must not take the transport down with it; the map stays consistent
        // because every update is a single assignment.
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_connected(&self, peer: &PeerId) -> bool {
        self.lock_peers()
            .get(peer)
            .is_some_and(|slot| slot.live.is_some())
    }

    fn set_dialing(&self, peer: &PeerId, dialing: bool) {
        if let Some(slot) = self.lock_peers().get_mut(peer) {
            slot.stats.dialing = dialing;
        }
    }

    fn is_shut_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn record_failure(&self, peer: &PeerId, dial: bool, why: String) {
        let mut peers = self.lock_peers();
        if let Some(slot) = peers.get_mut(peer) {
            if dial {
                slot.stats.dial_failures += 1;
            }
            slot.stats.last_error = Some(why);
        }
    }
}

fn transport_config(config: &GossipConfig) -> Result<quinn::TransportConfig, Error> {
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|e| Error::Tls(format!("idle timeout: {e}")))?;
    transport.max_idle_timeout(Some(idle));
    transport.keep_alive_interval(Some(config.keep_alive));
    // One bidirectional stream per connection, opened by the dialer.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(1));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    Ok(transport)
}

fn unix_ms() -> Option<u64> {
    let elapsed = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(elapsed.as_millis()).ok()
}

/// Full jitter over the upper half: a delay in `[d/2, d]`, so peers that lost a connection at the
/// same moment do not redial in lockstep.
fn jittered(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(fastrand::f64())
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => accepted(shared, connection).await,
                Err(e) => {
                    shared.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                    warn!(%remote, error = %e, "incoming gossip handshake failed");
                }
            }
        });
    }
}

/// An incoming connection whose TLS handshake (client certificate from the cluster CA) passed.
async fn accepted(shared: Arc<Shared>, connection: Connection) {
    let remote = connection.remote_address();
    let peer = match peer_of(&connection) {
        Ok(peer) => peer,
        Err(e) => {
            shared.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            warn!(%remote, error = %e, "incoming gossip connection without a usable certificate");
            connection.close(VarInt::from_u32(code::UNKNOWN_PEER), b"no node identity");
            return;
        }
    };
    if !shared.lock_peers().contains_key(&peer) {
        shared.unknown_peers_refused.fetch_add(1, Ordering::Relaxed);
        warn!(%remote, peer = %peer.0, "refusing a node that is not a configured peer");
        connection.close(VarInt::from_u32(code::UNKNOWN_PEER), b"not a peer");
        return;
    }
    let hello = tokio::time::timeout(shared.config.hello_timeout, async {
        let (mut send, mut recv) = connection.accept_bi().await.map_err(|e| e.to_string())?;
        let instance = read_hello(&mut recv).await?;
        write_hello(&mut send, shared.instance).await?;
        Ok::<_, String>((send, recv, instance))
    })
    .await
    .map_err(|_| "hello timed out".to_owned())
    .and_then(|r| r);
    match hello {
        Ok((send, recv, instance)) => {
            run_connection(shared, peer, connection, send, recv, instance, false).await;
        }
        Err(why) => {
            debug!(peer = %peer.0, %why, "incoming gossip connection failed its hello");
            shared.record_failure(&peer, false, why);
            connection.close(VarInt::from_u32(code::MALFORMED), b"bad hello");
        }
    }
}

/// The node id in the peer's (already verified) certificate.
fn peer_of(connection: &Connection) -> Result<PeerId, Error> {
    let identity = connection
        .peer_identity()
        .ok_or_else(|| Error::Certificate("no peer certificate".into()))?;
    let chain = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| Error::Certificate("unexpected peer identity".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| Error::Certificate("empty peer certificate chain".into()))?;
    Ok(PeerId(certs::node_id_of(leaf)?))
}

/// Keeps a connection to `peer`: dials whenever there is none, with backoff and jitter.
async fn dial_loop(shared: Arc<Shared>, peer: PeerId, addr: SocketAddr) {
    let mut shutdown = shared.shutdown.subscribe();
    let Some(wake) = shared.lock_peers().get(&peer).map(|s| s.wake.clone()) else {
        return;
    };
    let initial = shared.config.backoff_initial.max(Duration::from_millis(1));
    let mut backoff = initial;
    loop {
        while shared.is_connected(&peer) {
            tokio::select! {
                _ = wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
        if shared.is_shut_down() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(jittered(backoff)) => {}
            _ = shutdown.changed() => return,
        }
        if shared.is_connected(&peer) {
            continue; // the peer dialed us meanwhile
        }
        shared.set_dialing(&peer, true);
        let dialed = dial(&shared, &peer, addr).await;
        shared.set_dialing(&peer, false);
        match dialed {
            Ok((connection, send, recv, instance)) => {
                backoff = initial;
                run_connection(
                    shared.clone(),
                    peer.clone(),
                    connection,
                    send,
                    recv,
                    instance,
                    true,
                )
                .await;
            }
            Err(why) => {
                debug!(peer = %peer.0, %addr, %why, "gossip dial failed");
                shared.record_failure(&peer, true, why);
                backoff = (backoff * 2).min(shared.config.backoff_max.max(initial));
            }
        }
    }
}

async fn dial(
    shared: &Shared,
    peer: &PeerId,
    addr: SocketAddr,
) -> Result<(Connection, SendStream, RecvStream, u64), String> {
    // The server name is the peer's id: the handshake fails unless its certificate names it.
    let connecting = shared
        .endpoint
        .connect(addr, &peer.0)
        .map_err(|e| e.to_string())?;
    let connection = connecting.await.map_err(|e| e.to_string())?;
    let hello = tokio::time::timeout(shared.config.hello_timeout, async {
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        write_hello(&mut send, shared.instance).await?;
        let instance = read_hello(&mut recv).await?;
        Ok::<_, String>((send, recv, instance))
    })
    .await
    .map_err(|_| "hello timed out".to_owned())
    .and_then(|r| r);
    match hello {
        Ok((send, recv, instance)) => Ok((connection, send, recv, instance)),
        Err(why) => {
            connection.close(VarInt::from_u32(code::MALFORMED), b"bad hello");
            Err(why)
        }
    }
}

async fn write_hello(send: &mut SendStream, instance: u64) -> Result<(), String> {
    let mut hello = Vec::with_capacity(4 + HELLO_BYTES);
    hello.extend_from_slice(&(HELLO_BYTES as u32).to_be_bytes());
    hello.extend_from_slice(HELLO_MAGIC);
    hello.push(HELLO_VERSION);
    hello.extend_from_slice(&instance.to_be_bytes());
    send.write_all(&hello).await.map_err(|e| e.to_string())
}

async fn read_hello(recv: &mut RecvStream) -> Result<u64, String> {
    let mut bytes = [0u8; 4 + HELLO_BYTES];
    recv.read_exact(&mut bytes)
        .await
        .map_err(|e| format!("hello: {e}"))?;
    parse_hello(&bytes)
}

fn parse_hello(bytes: &[u8; 4 + HELLO_BYTES]) -> Result<u64, String> {
    let (len, rest) = bytes.split_at(4);
    if len != (HELLO_BYTES as u32).to_be_bytes() || &rest[..4] != HELLO_MAGIC {
        return Err("not a gossip hello".into());
    }
    if rest[4] != HELLO_VERSION {
        return Err(format!("gossip version {} is not supported", rest[4]));
    }
    let mut instance = [0u8; 8];
    instance.copy_from_slice(&rest[5..]);
    Ok(u64::from_be_bytes(instance))
}

/// Registers a connection that passed its hello (or refuses it as a duplicate), then moves frames
/// until it ends, then unregisters it.
async fn run_connection(
    shared: Arc<Shared>,
    peer: PeerId,
    connection: Connection,
    send: SendStream,
    recv: RecvStream,
    instance: u64,
    dialed_by_me: bool,
) {
    let Some((id, outbox, queued)) =
        install(&shared, &peer, &connection, instance, dialed_by_me).await
    else {
        return;
    };
    let end = tokio::select! {
        end = read_loop(&shared, &peer, id, recv) => end,
        end = write_loop(&shared, &peer, send, outbox, queued) => end,
        e = connection.closed() => End::Lost(e.to_string()),
    };
    // Closed by this node (a rejection, a replacement, a slow peer): that reason is already noted.
    let closed_here = matches!(
        connection.close_reason(),
        Some(quinn::ConnectionError::LocallyClosed)
    );
    match &end {
        End::Malformed(why) => {
            warn!(peer = %peer.0, %why, "closing the connection: malformed frame");
            connection.close(VarInt::from_u32(code::MALFORMED), b"malformed frame");
        }
        End::Lost(why) => {
            info!(peer = %peer.0, %why, "gossip connection lost");
            connection.close(VarInt::from_u32(code::ENDED), b"ended");
        }
        End::Superseded | End::EventsClosed => {}
    }
    let permit = shared.events.reserve().await.ok();
    let mut peers = shared.lock_peers();
    if let Some(slot) = peers.get_mut(&peer) {
        match end {
            End::Malformed(why) => {
                slot.stats.frames_rejected += 1;
                slot.stats.last_error = Some(why);
            }
            End::Lost(why) if !closed_here => slot.stats.last_error = Some(why),
            End::Lost(_) => {}
            End::Superseded | End::EventsClosed => {}
        }
        if slot.live.as_ref().is_some_and(|live| live.id == id) {
            slot.live = None;
            slot.stats.connected = false;
            slot.stats.connected_since_unix_ms = None;
            if let Some(permit) = permit {
                permit.send(GossipEvent::Disconnected(peer.clone()));
            }
            slot.wake.notify_one();
        }
    }
}

type Installed = (u64, mpsc::UnboundedReceiver<Vec<u8>>, Arc<AtomicUsize>);

async fn install(
    shared: &Shared,
    peer: &PeerId,
    connection: &Connection,
    instance: u64,
    dialed_by_me: bool,
) -> Option<Installed> {
    // Permits first: the Disconnected/Connected pair must go out under the lock, in order.
    let mut permits = shared.events.reserve_many(2).await.ok()?;
    let mut peers = shared.lock_peers();
    let slot = peers.get_mut(peer)?;
    let dialed_by_lower = dialed_by_me == (shared.config.node < *peer);
    if let Some(current) = &slot.live {
        let duplicate_of_better =
            current.instance == instance && current.dialed_by_lower && !dialed_by_lower;
        if duplicate_of_better || shared.is_shut_down() {
            debug!(peer = %peer.0, "keeping the existing connection; closing the duplicate");
            connection.close(VarInt::from_u32(code::DUPLICATE), b"duplicate connection");
            return None;
        }
        debug!(peer = %peer.0, "a newer connection replaces the existing one");
        current
            .connection
            .close(VarInt::from_u32(code::REPLACED), b"replaced");
        slot.live = None;
        if let Some(permit) = permits.next() {
            permit.send(GossipEvent::Disconnected(peer.clone()));
        }
    }
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let (outbox, receiver) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    slot.live = Some(Live {
        id,
        instance,
        dialed_by_lower,
        dialed_by_me,
        connection: connection.clone(),
        outbox,
        queued: queued.clone(),
    });
    slot.stats.connected = true;
    slot.stats.connected_since_unix_ms = unix_ms();
    slot.stats.connections += 1;
    slot.stats.last_error = None;
    info!(peer = %peer.0, remote = %connection.remote_address(), "gossip connection up");
    if let Some(permit) = permits.next() {
        permit.send(GossipEvent::Connected(peer.clone()));
    }
    Some((id, receiver, queued))
}

async fn read_loop(shared: &Shared, peer: &PeerId, id: u64, mut recv: RecvStream) -> End {
    let max = shared.config.max_frame_bytes;
    loop {
        let mut len = [0u8; 4];
        match recv.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => {
                return End::Lost("the peer finished its stream".into())
            }
            Err(e) => return End::Lost(e.to_string()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > max {
            return End::Malformed(format!("frame of {len} bytes exceeds the limit of {max}"));
        }
        let mut frame = vec![0u8; len];
        if let Err(e) = recv.read_exact(&mut frame).await {
            return End::Lost(e.to_string());
        }
        if let Err(e) = wire::decode(&frame, max) {
            return End::Malformed(e.to_string());
        }
        let Ok(permit) = shared.events.reserve().await else {
            return End::EventsClosed;
        };
        let mut peers = shared.lock_peers();
        let Some(slot) = peers.get_mut(peer) else {
            return End::Superseded;
        };
        if slot.live.as_ref().is_none_or(|live| live.id != id) {
            return End::Superseded;
        }
        slot.stats.frames_received += 1;
        slot.stats.bytes_received += 4 + len as u64;
        slot.stats.last_frame_received_unix_ms = unix_ms();
        permit.send(GossipEvent::Frame {
            peer: peer.clone(),
            bytes: frame,
        });
    }
}

async fn write_loop(
    shared: &Shared,
    peer: &PeerId,
    mut send: SendStream,
    mut outbox: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
) -> End {
    while let Some(frame) = outbox.recv().await {
        queued.fetch_sub(frame.len(), Ordering::Relaxed);
        // Lengths are bounded by max_frame_bytes in `send`, so they fit in a u32.
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        if let Err(e) = send.write_all(&len.to_be_bytes()).await {
            return End::Lost(e.to_string());
        }
        if let Err(e) = send.write_all(&frame).await {
            return End::Lost(e.to_string());
        }
        if let Some(slot) = shared.lock_peers().get_mut(peer) {
            slot.stats.frames_sent += 1;
            slot.stats.bytes_sent += 4 + frame.len() as u64;
        }
    }
    // The outbox's sender lives in the registry: it is gone once this connection was replaced.
    End::Superseded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_refuses_other_protocols() {
        let mut bytes = [0u8; 4 + HELLO_BYTES];
        bytes[..4].copy_from_slice(&(HELLO_BYTES as u32).to_be_bytes());
        bytes[4..8].copy_from_slice(HELLO_MAGIC);
        bytes[8] = HELLO_VERSION;
        bytes[9..].copy_from_slice(&42u64.to_be_bytes());
        assert_eq!(parse_hello(&bytes), Ok(42));
        let mut other_version = bytes;
        other_version[8] = 9;
        assert!(parse_hello(&other_version).is_err());
        let mut other_magic = bytes;
        other_magic[4] = b'X';
        assert!(parse_hello(&other_magic).is_err());
    }

    #[test]
    fn jitter_stays_within_the_upper_half_of_the_backoff() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_millis(800));
            assert!(d >= Duration::from_millis(400) && d <= Duration::from_millis(800));
        }
    }
}
