//! Accepting and serving connections: a cap on open connections (in all and per client address),
//! a header-read timeout, an idle keep-alive timeout and graceful shutdown.
//!
//! Replaces `axum::serve`, which has none of the caps or timeouts: thousands of idle, silent or
//! trickling connections from one client used to exhaust the descriptor limit and starve everyone
//! else (issue #12, finding 5). A connection beyond a cap is closed at once, before any byte is
//! read; timeouts are enforced in the socket wrapper ([`Guarded`]), so they cost nothing while a
//! request is being handled.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::config::LimitsConfig;

/// Descriptors kept free for everything that is not a client connection (store, gossip, logs).
const FD_HEADROOM_PERCENT: u64 = 10;

/// The connection limits in force, after [`ConnectionLimits::from_config`] fitted them to the
/// descriptor limit.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_per_address: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// Raises the soft open-file limit to the hard one when allowed and keeps `max_connections`
    /// below what is then available.
    pub fn from_config(limits: &LimitsConfig) -> ConnectionLimits {
        let descriptors = raise_fd_limit();
        let mut max_connections = limits.max_connections.max(1);
        if let Some(n) = descriptors {
            let usable = n.saturating_sub(n * FD_HEADROOM_PERCENT / 100).max(1);
            let usable = usize::try_from(usable).unwrap_or(usize::MAX);
            if usable < max_connections {
                tracing::warn!(
                    configured = max_connections,
                    open_file_limit = n,
                    max_connections = usable,
                    "max_connections lowered to fit the open-file limit"
                );
                max_connections = usable;
            }
        }
        let mut max_per_address = limits.max_connections_per_address.max(1);
        if max_per_address >= max_connections && max_connections > 1 {
            // One client must never be able to hold every slot.
            max_per_address = max_connections / 2;
            tracing::warn!(
                max_connections_per_address = max_per_address,
                "max_connections_per_address lowered to half of max_connections"
            );
        }
        ConnectionLimits {
            max_connections,
            max_per_address,
            header_read_timeout: Duration::from_millis(limits.header_read_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms.max(1)),
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (where the system allows) and returns the
/// soft limit in force afterwards; `None` where it cannot be read.
pub fn raise_fd_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

/// Counts of open connections, in all and per client address.
#[derive(Debug)]
struct Gate {
    max_total: usize,
    max_per_address: usize,
    total: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection's place; given back when dropped.
#[derive(Debug)]
struct Slot {
    gate: Arc<Gate>,
    key: IpAddr,
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `max_connections` are open.
    Full,
    /// `max_connections_per_address` are open from this client.
    Address,
}

impl Gate {
    fn new(max_total: usize, max_per_address: usize) -> Arc<Gate> {
        Arc::new(Gate {
            max_total,
            max_per_address,
            total: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
        })
    }

    fn admit(self: &Arc<Gate>, ip: IpAddr) -> Result<Slot, Refusal> {
        let key = address_key(ip);
        let mut per = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err(Refusal::Full);
        }
        let n = per.entry(key).or_insert(0);
        if *n >= self.max_per_address {
            return Err(Refusal::Address);
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            gate: self.clone(),
            key,
        })
    }

    fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per = self
            .gate
            .per_address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.key);
            }
        }
        self.gate.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client a connection is counted against: its IPv4 address, or the /64 of an IPv6 one
/// (one host usually holds a whole /64).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Connection counts for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    refused_full: AtomicU64,
    refused_address: AtomicU64,
    timed_out: AtomicU64,
    gate: std::sync::OnceLock<Arc<Gate>>,
}

impl ConnectionStats {
    /// Appends the connection metrics in OpenMetrics text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let open = self.gate.get().map(|g| g.open()).unwrap_or(0);
        let _ = write!(
            out,
            "# TYPE bunting_http_connections_open gauge\n\
             # HELP bunting_http_connections_open TCP connections open now\n\
             bunting_http_connections_open {open}\n\
             # TYPE bunting_http_connections_refused counter\n\
             # HELP bunting_http_connections_refused Connections closed at once by a cap\n\
             bunting_http_connections_refused_total{{reason=\"max_connections\"}} {}\n\
             bunting_http_connections_refused_total{{reason=\"max_connections_per_address\"}} {}\n\
             # TYPE bunting_http_connections_timed_out counter\n\
             # HELP bunting_http_connections_timed_out Connections closed by the header-read or idle timeout\n\
             bunting_http_connections_timed_out_total {}\n",
            self.refused_full.load(Ordering::Relaxed),
            self.refused_address.load(Ordering::Relaxed),
            self.timed_out.load(Ordering::Relaxed),
        );
    }
}

/// Serves `app` on `listener` until `shutdown` completes; then stops accepting, lets every open
/// connection finish its request in progress (idle ones close at once) and returns when all are
/// closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let gate = Gate::new(limits.max_connections, limits.max_per_address);
    let _ = stats.gate.set(gate.clone());
    // Each connection task holds a receiver: `closed()` resolves when the last has ended.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_refusal_log: Option<Instant> = None;
    loop {
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        match gate.admit(remote.ip()) {
            Ok(slot) => {
                let conn = Conn {
                    app: app.clone(),
                    limits: limits.clone(),
                    stats: stats.clone(),
                    remote,
                    stop: stop_rx.clone(),
                };
                tokio::spawn(conn.run(stream, slot));
            }
            Err(why) => {
                // Closed before a byte is read: no descriptor or memory is held past this line.
                drop(stream);
                let counter = match why {
                    Refusal::Full => &stats.refused_full,
                    Refusal::Address => &stats.refused_address,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                if last_refusal_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
                {
                    last_refusal_log = Some(now);
                    tracing::warn!(client = %remote.ip(), reason = ?why, open = gate.open(), "connection refused by a cap");
                }
            }
        }
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
}

/// Errors of one connection (reset before accept) are skipped; running out of descriptors or
/// memory waits a little so the loop does not spin.
async fn accept_error(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) {
        return;
    }
    tracing::error!(error = %e, "accept error");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

struct Conn {
    app: Router,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    remote: SocketAddr,
    stop: watch::Receiver<bool>,
}

impl Conn {
    async fn run(mut self, stream: TcpStream, slot: Slot) {
        let shared = Arc::new(Shared::default());
        let io = TokioIo::new(Guarded::new(
            stream,
            shared.clone(),
            self.limits.clone(),
            self.stats.clone(),
        ));
        let (app, remote, stats) = (self.app.clone(), self.remote, self.stats.clone());
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            let busy = Busy::start(shared.clone());
            // The same extension `into_make_service_with_connect_info` would add.
            req.extensions_mut().insert(ConnectInfo(remote));
            // For `/metrics`.
            req.extensions_mut().insert(stats.clone());
            let mut app = app.clone();
            let call = app.call(req.map(Body::new));
            async move {
                let response = call.await?;
                // The request counts as in progress until its body is written out (event streams).
                Ok::<_, std::convert::Infallible>(response.map(|body| Tracked { body, busy }))
            }
        });
        let builder = auto::Builder::new(TokioExecutor::new());
        let conn = builder.serve_connection_with_upgrades(io, service);
        let mut conn = std::pin::pin!(conn);
        let mut stopping = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, client = %self.remote, "connection ended with an error");
                    }
                    break;
                }
                changed = self.stop.wait_for(|s| *s), if !stopping => {
                    let _ = changed;
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
        drop(slot);
    }
}

/// What a connection's socket wrapper and its requests share.
#[derive(Debug, Default)]
struct Shared {
    /// Requests whose response has not been written out yet.
    in_flight: AtomicUsize,
    /// Bumped each time `in_flight` drops to zero: a new wait for the next head begins.
    finished: AtomicU64,
    /// The socket's reader, woken when `in_flight` drops to zero so it arms its deadline (it may
    /// have gone to sleep without one while the response was still being written).
    reader: futures_util::task::AtomicWaker,
}

/// Marks one request in progress on its connection until dropped.
struct Busy(Arc<Shared>);

impl Busy {
    fn start(shared: Arc<Shared>) -> Busy {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(shared)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.finished.fetch_add(1, Ordering::AcqRel);
            self.0.reader.wake();
        }
    }
}

/// A response body that keeps its request marked in progress until it is written out or dropped.
struct Tracked {
    body: Body,
    #[allow(dead_code)] // held for its Drop
    busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A client socket that fails its reads with `TimedOut` when the client is too slow: no complete
/// head within the header-read timeout (from the connection's start, or from a head's first byte),
/// or nothing at all within the idle timeout after a response. No deadline applies while a request
/// is in progress (the request timeout covers handlers).
struct Guarded {
    inner: TcpStream,
    shared: Arc<Shared>,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    /// `shared.finished` when this wait began.
    seen: u64,
    /// When the current wait for a head began, and whether it is the connection's first.
    wait_start: Instant,
    first: bool,
    /// When the first byte of the head being read arrived.
    head_start: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl Guarded {
    fn new(
        inner: TcpStream,
        shared: Arc<Shared>,
        limits: ConnectionLimits,
        stats: Arc<ConnectionStats>,
    ) -> Guarded {
        let now = Instant::now();
        Guarded {
            inner,
            shared,
            limits,
            stats,
            seen: 0,
            wait_start: now,
            first: true,
            head_start: None,
            sleep: Box::pin(tokio::time::sleep_until(now)),
            armed: None,
        }
    }

    /// Starts a new wait when a request finished since the last look.
    fn sync(&mut self) {
        let finished = self.shared.finished.load(Ordering::Acquire);
        if finished != self.seen {
            self.seen = finished;
            self.first = false;
            self.head_start = None;
            self.wait_start = Instant::now();
        }
    }

    fn idle(&self) -> bool {
        self.shared.in_flight.load(Ordering::Acquire) == 0
    }

    fn deadline(&mut self) -> Option<Instant> {
        if !self.idle() {
            return None;
        }
        self.sync();
        Some(match self.head_start {
            Some(t) => t + self.limits.header_read_timeout,
            None if self.first => self.wait_start + self.limits.header_read_timeout,
            None => self.wait_start + self.limits.idle_timeout,
        })
    }

    fn on_bytes(&mut self) {
        if self.idle() {
            self.sync();
            if self.head_start.is_none() {
                self.head_start = Some(Instant::now());
            }
        }
    }

    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let deadline = match self.deadline() {
            Some(d) => d,
            None => {
                self.shared.reader.register(cx.waker());
                // The request may have finished between the look and the registration.
                match self.deadline() {
                    Some(d) => d,
                    None => return Poll::Pending,
                }
            }
        };
        if self.armed != Some(deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client too slow: header-read or idle timeout",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.on_bytes();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.poll_deadline(cx),
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_refuses_past_either_cap_and_frees_slots_on_drop() {
        let gate = Gate::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), Refusal::Address);
        let _b1 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).unwrap_err(), Refusal::Full);
        drop(a1);
        assert_eq!(gate.open(), 2);
        assert!(gate.admit(b).is_ok());
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_and_mapped_ipv4_as_ipv4() {
        let gate = Gate::new(10, 1);
        let _x = gate.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            gate.admit("2001:db8::ffff:2".parse().unwrap()).unwrap_err(),
            Refusal::Address
        );
        let _y = gate.admit("10.1.2.3".parse().unwrap()).unwrap();
        assert_eq!(
            gate.admit("::ffff:10.1.2.3".parse().unwrap()).unwrap_err(),
            Refusal::Address
        );
    }

    #[test]
    fn connection_cap_stays_below_the_descriptor_limit_and_one_client_below_the_cap() {
        let config = LimitsConfig {
            max_connections: usize::MAX,
            max_connections_per_address: usize::MAX,
            ..LimitsConfig::default()
        };
        let limits = ConnectionLimits::from_config(&config);
        if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
            assert!((limits.max_connections as u64) < soft);
        }
        assert!(limits.max_per_address < limits.max_connections);
    }
}
