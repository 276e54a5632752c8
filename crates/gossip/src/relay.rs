//! Test support: a UDP relay between gossip nodes that can be paused (a partition) and given a
//! one-way delay, so end-to-end tests and benchmarks can cut and slow links between real processes
//! without root privileges or network namespaces.
//!
//! Point a node's peer address at [`Relay::local_addr`]; the relay forwards every datagram to the
//! target and the answers back. QUIC does not mind: the target sees the relay's address as the
//! client's. For a link that both ends may dial, put one relay in front of each end.
//!
//! [`Relay::block`] drops datagrams from and to chosen client addresses only, so one relay in
//! front of each node can cut some of its peers off (a region) while the others still reach it.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::Error;

/// Largest UDP datagram the relay forwards.
const MAX_DATAGRAM: usize = 65_535;

/// A running relay; stops when dropped.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    control: Arc<Control>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

#[derive(Debug, Default)]
struct Control {
    paused: AtomicBool,
    delay_us: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    /// Client IPs whose datagrams (both ways) are dropped.
    blocked: Mutex<BTreeSet<IpAddr>>,
    /// Client IPs whose datagrams (both ways) get their own delay instead of `delay_us`.
    delays_us: Mutex<HashMap<IpAddr, u64>>,
}

impl Control {
    /// Whether to pass a datagram from or to `client` on, counting it either way.
    fn admit(&self, client: IpAddr) -> bool {
        let blocked = || {
            self.blocked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&client)
        };
        if self.paused.load(Ordering::Relaxed) || blocked() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
            true
        }
    }

    fn deadline(&self, client: IpAddr) -> Instant {
        let own = self
            .delays_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&client)
            .copied();
        let us = own.unwrap_or_else(|| self.delay_us.load(Ordering::Relaxed));
        Instant::now() + Duration::from_micros(us)
    }
}

impl Relay {
    /// Listens on `listen` (port 0 for any) and relays to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> Result<Relay, Error> {
        let front = Arc::new(UdpSocket::bind(listen).await.map_err(Error::Socket)?);
        let addr = front.local_addr().map_err(Error::Socket)?;
        let control = Arc::new(Control::default());
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let main = tokio::spawn(front_loop(front, target, control.clone(), tasks.clone()));
        tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(main);
        Ok(Relay {
            addr,
            control,
            tasks,
        })
    }

    /// Where clients send datagrams.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every datagram in both directions until [`Relay::resume`].
    pub fn pause(&self) {
        self.control.paused.store(true, Ordering::Relaxed);
    }

    /// Forwards datagrams again.
    pub fn resume(&self) {
        self.control.paused.store(false, Ordering::Relaxed);
    }

    /// Drops every datagram from and to clients at `ips` (both directions) until
    /// [`Relay::unblock_all`]; other clients still get through.
    pub fn block(&self, ips: impl IntoIterator<Item = IpAddr>) {
        self.control
            .blocked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(ips);
    }

    /// Forwards datagrams of every client again (a pause stays in force).
    pub fn unblock_all(&self) {
        self.control
            .blocked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Delays every datagram by `delay` in each direction (order is kept).
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.control.delay_us.store(us, Ordering::Relaxed);
    }

    /// Delays datagrams from and to clients at `ips` by `delay` in each direction, instead of
    /// the delay of [`Relay::set_delay`]: e.g. only the peers in other regions.
    pub fn set_delay_for(&self, ips: impl IntoIterator<Item = IpAddr>, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.control
            .delays_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(ips.into_iter().map(|ip| (ip, us)));
    }

    /// Datagrams forwarded and dropped (while paused or blocked) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.control.forwarded.load(Ordering::Relaxed),
            self.control.dropped.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }
}

type Delayed = mpsc::UnboundedSender<(Instant, Vec<u8>)>;

/// Sends queued datagrams when their time comes, in order.
fn spawn_sender(
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    tasks: &Mutex<Vec<JoinHandle<()>>>,
) -> Delayed {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let task = tokio::spawn(async move {
        while let Some((at, datagram)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            // UDP may lose datagrams; so may the relay.
            let _ = socket.send_to(&datagram, to).await;
        }
    });
    tasks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(task);
    tx
}

async fn front_loop(
    front: Arc<UdpSocket>,
    target: SocketAddr,
    control: Arc<Control>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    // Per client: the queue towards the target (through that client's own back socket).
    let mut clients: HashMap<SocketAddr, Delayed> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let unspecified: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            continue;
        };
        if !control.admit(client.ip()) {
            continue;
        }
        let queue = match clients.entry(client) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let Some(queue) =
                    open_client(&front, client, unspecified, target, &control, &tasks).await
                else {
                    continue;
                };
                entry.insert(queue)
            }
        };
        let _ = queue.send((control.deadline(client.ip()), buf[..n].to_vec()));
    }
}

/// A new client: its own socket towards the target, and a task relaying the target's answers.
async fn open_client(
    front: &Arc<UdpSocket>,
    client: SocketAddr,
    unspecified: SocketAddr,
    target: SocketAddr,
    control: &Arc<Control>,
    tasks: &Mutex<Vec<JoinHandle<()>>>,
) -> Option<Delayed> {
    let back = Arc::new(UdpSocket::bind(unspecified).await.ok()?);
    let to_target = spawn_sender(back.clone(), target, tasks);
    let to_client = spawn_sender(front.clone(), client, tasks);
    let control = control.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while let Ok((n, _)) = back.recv_from(&mut buf).await {
            let datagram = (control.deadline(client.ip()), buf[..n].to_vec());
            if control.admit(client.ip()) && to_client.send(datagram).is_err() {
                return;
            }
        }
    });
    tasks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(task);
    Some(to_target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relay_forwards_both_ways_and_drops_while_paused() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start("127.0.0.1:0".parse().unwrap(), server.local_addr().unwrap())
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 16];

        client.send_to(b"ping", relay.local_addr()).await.unwrap();
        let (n, from) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        server.send_to(b"pong", from).await.unwrap();
        let (n, _) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"pong");

        relay.pause();
        client.send_to(b"lost", relay.local_addr()).await.unwrap();
        // Wait until the relay has seen (and dropped) it, then resume.
        while relay.counts().1 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        relay.resume();
        client.send_to(b"kept", relay.local_addr()).await.unwrap();
        let (n, _) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(
            &buf[..n],
            b"kept",
            "a datagram sent while paused got through"
        );
        assert_eq!(relay.counts(), (3, 1));
    }

    #[tokio::test]
    async fn a_blocked_client_is_cut_off_while_others_get_through() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start("127.0.0.1:0".parse().unwrap(), server.local_addr().unwrap())
            .await
            .unwrap();
        let cut = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let kept = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 16];
        relay.block(["127.0.0.2".parse().unwrap()]);
        cut.send_to(b"cut", relay.local_addr()).await.unwrap();
        kept.send_to(b"kept", relay.local_addr()).await.unwrap();
        let (n, _) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"kept", "the blocked client got through");
        while relay.counts().1 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        relay.unblock_all();
        cut.send_to(b"healed", relay.local_addr()).await.unwrap();
        let (n, _) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"healed");
        assert_eq!(
            relay.counts(),
            (2, 1),
            "forwarded kept and healed, dropped cut"
        );
    }
}
