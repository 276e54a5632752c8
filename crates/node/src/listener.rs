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
///
/// Connections are accepted on a thread of their own (the *front*), which looks at the first
/// bytes of each: a health probe (`GET /healthz`, `GET /readyz` on a fresh connection, as
/// orchestrators and load balancers send them) is answered there by `probes` and the connection
/// closed; every other connection goes to the runtime `serve` is called on. A probe so never
/// waits behind the request work of thousands of busy connections (issue #12, item 10).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    probes: Router,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let gate = Gate::new(limits.max_connections, limits.max_per_address);
    let _ = stats.gate.set(gate.clone());
    // Each connection task holds a receiver: `closed()` resolves when the last has ended.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (front_stop_tx, front_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (front_done_tx, front_done_rx) = tokio::sync::oneshot::channel::<()>();
    let front = Front {
        gate,
        app,
        probes,
        limits,
        stats,
        stop: stop_rx,
        main: tokio::runtime::Handle::current(),
    };
    let spawned = match listener.into_std() {
        Ok(listener) => std::thread::Builder::new()
            .name("bunting-front".into())
            .spawn(move || {
                front.run(listener, front_stop_rx);
                let _ = front_done_tx.send(());
            })
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the accepting thread; not serving");
    } else {
        shutdown.await;
        let _ = front_stop_tx.send(());
        // The front drops the listener and its receiver when it ends (or if it panicked).
        let _ = front_done_rx.await;
    }
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
}

/// The accepting thread's share of [`serve`].
struct Front {
    gate: Arc<Gate>,
    app: Router,
    probes: Router,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    stop: watch::Receiver<bool>,
    /// The runtime ordinary connections are served on.
    main: tokio::runtime::Handle,
}

/// How many bytes of a connection's start the front looks at: enough for `GET /healthz `.
const PROBE_PEEK: usize = 16;

/// Whether a connection's first bytes are a health probe the front answers itself.
fn is_probe(start: &[u8]) -> bool {
    [&b"GET /healthz"[..], &b"GET /readyz"[..]].iter().any(|p| {
        start.len() > p.len() && start.starts_with(p) && matches!(start[p.len()], b' ' | b'?')
    })
}

impl Front {
    fn run(self, listener: std::net::TcpListener, stop: tokio::sync::oneshot::Receiver<()>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the accepting thread's runtime");
                return;
            }
        };
        runtime.block_on(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot register the listener");
                    return;
                }
            };
            let this = Arc::new(self);
            let mut stop = std::pin::pin!(stop);
            let mut last_refusal_log: Option<Instant> = None;
            loop {
                let (stream, remote) = tokio::select! {
                    _ = &mut stop => break,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            accept_error(e).await;
                            continue;
                        }
                    },
                };
                match this.gate.admit(remote.ip()) {
                    Ok(slot) => {
                        tokio::spawn(this.clone().sort(stream, remote, slot, Instant::now()));
                    }
                    Err(why) => {
                        // Closed before a byte is read: no descriptor or memory is held past this line.
                        drop(stream);
                        let counter = match why {
                            Refusal::Full => &this.stats.refused_full,
                            Refusal::Address => &this.stats.refused_address,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        let now = Instant::now();
                        if last_refusal_log
                            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
                        {
                            last_refusal_log = Some(now);
                            tracing::warn!(client = %remote.ip(), reason = ?why, open = this.gate.open(), "connection refused by a cap");
                        }
                    }
                }
            }
        });
        // Dropping the runtime closes the listener and cuts any probe still being answered.
    }

    /// Waits for a new connection's first bytes (within the header-read timeout), answers a
    /// probe here and hands anything else to the main runtime.
    async fn sort(
        self: Arc<Self>,
        stream: TcpStream,
        remote: SocketAddr,
        slot: Slot,
        accepted: Instant,
    ) {
        let mut start = [0u8; PROBE_PEEK];
        let n = match tokio::time::timeout_at(
            accepted + self.limits.header_read_timeout,
            stream.peek(&mut start),
        )
        .await
        {
            Err(_) => {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Err(_)) | Ok(Ok(0)) => return,
            Ok(Ok(n)) => n,
        };
        if is_probe(&start[..n]) {
            self.answer_probe(stream, remote, accepted).await;
            drop(slot);
            return;
        }
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, client = %remote, "cannot hand a connection over");
                return;
            }
        };
        let conn = Conn {
            app: self.app.clone(),
            limits: self.limits.clone(),
            stats: self.stats.clone(),
            remote,
            stop: self.stop.clone(),
        };
        self.main.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => conn.run(stream, slot, accepted).await,
                Err(e) => {
                    tracing::debug!(error = %e, client = %remote, "cannot register a connection")
                }
            }
        });
    }

    /// One request, then the connection closes: the next request of this client is sorted
    /// again, so nothing but probes is ever served on this thread.
    async fn answer_probe(&self, stream: TcpStream, remote: SocketAddr, accepted: Instant) {
        let probes = self.probes.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(remote));
            probes.clone().call(req.map(Body::new))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .header_read_timeout(None)
            .serve_connection(TokioIo::new(stream), service);
        // A probe whose client stops reading the answer is cut like a slow header.
        let deadline = accepted + self.limits.header_read_timeout;
        match tokio::time::timeout_at(deadline, conn).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, client = %remote, "probe connection ended with an error")
            }
            Err(_) => {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
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
    async fn run(mut self, stream: TcpStream, slot: Slot, accepted: Instant) {
        let shared = Arc::new(Shared::default());
        let io = TokioIo::new(Guarded::new(
            stream,
            shared.clone(),
            self.limits.clone(),
            self.stats.clone(),
            accepted,
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
        accepted: Instant,
    ) -> Guarded {
        let now = accepted;
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
        // The timer moves only to an earlier deadline: one armed earlier than needed fires, finds
        // the deadline not reached and moves then. A busy keep-alive connection so resets its
        // timer about once per idle timeout, not once per request (each reset takes the timer
        // wheel's lock).
        if self.armed.is_none_or(|armed| deadline < armed) {
            self.sleep.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        loop {
            match self.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if Instant::now() >= deadline => {
                    self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client too slow: header-read or idle timeout",
                    )));
                }
                Poll::Ready(()) => {
                    self.sleep.as_mut().reset(deadline);
                    self.armed = Some(deadline);
                }
            }
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
    fn only_a_complete_health_request_line_is_a_probe() {
        assert!(is_probe(b"GET /healthz HTTP/1.1\r\n"));
        assert!(is_probe(b"GET /readyz?x=1 HTTP"));
        assert!(!is_probe(b"GET /healthz"), "cut before the path ends");
        assert!(!is_probe(b"GET /healthzz HTTP/1.1"));
        assert!(!is_probe(b"POST /healthz HTTP/1.1"));
        assert!(!is_probe(b"GET /ofrep/v1/evaluate"));
        assert!(!is_probe(b"PRI * HTTP/2.0\r\n"));
    }

    /// Sends one HTTP/1.1 request on a fresh connection and returns the whole answer.
    async fn request(addr: SocketAddr, line: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("{line} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The node's promise for orchestrators: while every worker of the serving runtime is busy
    /// (here its only worker is blocked by a handler until the test lets it go), a health probe
    /// on a fresh connection is still answered; ordinary requests wait for the workers.
    #[test]
    fn a_probe_is_answered_while_every_serving_worker_is_blocked() {
        use axum::routing::get;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let app = Router::new()
            .route(
                "/block",
                get(move || {
                    let release = release_rx.clone();
                    let entered = entered_tx.clone();
                    async move {
                        let _ = entered.send(());
                        // Blocks the runtime's only worker thread on purpose.
                        let _ = release.lock().unwrap().recv();
                        "released"
                    }
                }),
            )
            .route("/healthz", get(|| async { "main" }));
        let probes = Router::new().route("/healthz", get(|| async { "front" }));
        let limits = ConnectionLimits::from_config(&LimitsConfig::default());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                serve(
                    listener,
                    app,
                    probes,
                    limits,
                    Default::default(),
                    std::future::pending(),
                )
                .await;
            })
        });
        let addr = addr_rx.recv().unwrap();
        // A separate client runtime (with its own worker, so the spawned request runs while
        // this thread waits): the server's is the one being blocked.
        let client = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let blocked = client.spawn(request(addr, "GET /block"));
        entered_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the blocking handler started");
        let probe = client.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), request(addr, "GET /healthz")).await
        });
        let probe = probe.expect("the probe was answered while the worker was blocked");
        assert!(probe.starts_with("HTTP/1.1 200"), "{probe}");
        assert!(probe.ends_with("front"), "answered by the front: {probe}");
        assert!(
            probe.to_ascii_lowercase().contains("connection: close"),
            "{probe}"
        );
        release_tx.send(()).unwrap();
        let blocked = client.block_on(blocked).unwrap();
        assert!(blocked.ends_with("released"), "{blocked}");
        // A probe on a connection that already carried another request is the main runtime's.
        let main = client.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /nothing HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        });
        assert!(main.ends_with("main"), "{main}");
        drop(server);
    }

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
