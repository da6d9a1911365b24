//! What a listener's peers can hold: a bounded number of accepted
//! connections per listener (back-pressure: when every slot is taken the
//! listener stops accepting and new connections wait in the kernel's
//! backlog), optionally a bounded number per peer address (one noisy pod
//! cannot take every slot: past its share its connections are accepted and
//! closed at once), a back-off on accept errors (EMFILE and friends), and
//! the process's file limit raised to its hard limit at start.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::{info, warn};

use crate::metrics::Metrics;

/// The first pause after a failed accept; it doubles up to
/// [`MAX_BACKOFF`] while accepts keep failing. A listener that spins on
/// EMFILE burns a core and starves the tasks that would free descriptors.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("reading RLIMIT_NOFILE: {0}")]
    Get(io::Error),
    #[error("raising RLIMIT_NOFILE from {soft} to {hard}: {source}")]
    Raise {
        soft: u64,
        hard: u64,
        source: io::Error,
    },
}

/// How many connections a listener holds at once, in all and per peer
/// address (`None`: no per-peer share, for listeners whose peers are one
/// address by nature, such as a pod's own outbound capture).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub total: usize,
    pub per_peer: Option<u32>,
}

/// A pod's outbound capture (15001): every peer is the pod itself.
pub const OUTBOUND: Limits = Limits {
    total: 8192,
    per_peer: None,
};
/// A pod's inbound plaintext capture (15006): many clients may share an
/// address (a NAT, a node), so no per-peer share.
pub const INBOUND_PLAINTEXT: Limits = Limits {
    total: 8192,
    per_peer: None,
};
/// HBONE (15008, and a waypoint's listener): a peer's client pool keeps
/// about one connection per core to a destination, far below its share.
pub const HBONE: Limits = Limits {
    total: 4096,
    per_peer: Some(256),
};
/// Admin, metrics and readiness: a handful of scrapers and probes.
pub const CONTROL: Limits = Limits {
    total: 128,
    per_peer: Some(16),
};

type Peers = Arc<Mutex<HashMap<IpAddr, u32>>>;

/// A listener's gate: slots, per-peer shares, and where refusals are
/// counted (`mesh_proxy_connections_total{direction, result}`).
pub struct Gate {
    slots: Arc<Semaphore>,
    per_peer: Option<u32>,
    peers: Peers,
    metrics: Arc<Metrics>,
    /// The metric's `direction` label: which listener this is.
    direction: &'static str,
    /// Full, not accepting (reported once per pause).
    paused: AtomicBool,
}

/// One accepted connection's place in its listener's limits; dropping it
/// (when the connection's task ends) frees the place.
pub struct Admitted {
    _slot: OwnedSemaphorePermit,
    peer: Option<(IpAddr, Peers)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let Some((ip, peers)) = self.peer.take() else {
            return;
        };
        let mut peers = peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = peers.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&ip);
            }
        }
    }
}

impl Gate {
    pub fn new(limits: Limits, metrics: Arc<Metrics>, direction: &'static str) -> Self {
        Gate {
            slots: Arc::new(Semaphore::new(limits.total)),
            per_peer: limits.per_peer,
            peers: Arc::default(),
            metrics,
            direction,
            paused: AtomicBool::new(false),
        }
    }

    /// Waits for a free slot, then for a connection within its peer's
    /// share. While the listener is full nothing is accepted on any of its
    /// sockets (counted once per pause as `result="limit"`); a peer past
    /// its share has its connection closed at once (`result="peer_limit"`).
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, SocketAddr, Admitted) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    // The listener's other sockets (one per shard) pause
                    // too: the first to find it full reports it.
                    if !self.paused.swap(true, Ordering::Relaxed) {
                        self.metrics.connection(self.direction, "limit");
                        warn!(
                            listener = self.direction,
                            "connection limit reached; not accepting until a connection ends"
                        );
                    }
                    let slot = self
                        .slots
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the gate's semaphore is never closed");
                    self.paused.store(false, Ordering::Relaxed);
                    slot
                }
            };
            match listener.accept().await {
                Ok((stream, peer)) => {
                    backoff = FIRST_BACKOFF;
                    match self.admit(peer.ip()) {
                        Some(share) => {
                            let admitted = Admitted {
                                _slot: slot,
                                peer: share,
                            };
                            return (stream, peer, admitted);
                        }
                        None => {
                            self.metrics.connection(self.direction, "peer_limit");
                            tracing::debug!(listener = self.direction, %peer, "peer over its connection share; closed");
                        }
                    }
                }
                Err(e) => {
                    self.metrics.connection(self.direction, "accept_error");
                    warn!(listener = self.direction, error = %e, pause = ?backoff, "accept failed");
                    drop(slot);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Takes a place in `ip`'s share, if it has one left (`Some(None)`:
    /// this listener has no per-peer shares).
    fn admit(&self, ip: IpAddr) -> Option<Option<(IpAddr, Peers)>> {
        let Some(max) = self.per_peer else {
            return Some(None);
        };
        // An IPv4 peer of a dual-stack listener is the same peer either way.
        let ip = ip.to_canonical();
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let n = peers.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Some((ip, self.peers.clone())))
    }

    /// Connections held now (for tests and logs).
    #[cfg(test)]
    pub fn held(&self, total: usize) -> usize {
        total - self.slots.available_permits()
    }
}

/// Raises the soft file limit to the hard one: every connection the agent
/// holds costs one or two descriptors, and the usual soft default (1024)
/// is reached by a few hundred tunnelled connections. Returns the new limit.
pub fn raise_nofile() -> Result<u64, LimitError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(LimitError::Get(io::Error::last_os_error()));
    }
    if lim.rlim_cur < lim.rlim_max {
        let soft = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(LimitError::Raise {
                soft,
                hard: lim.rlim_max,
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(lim.rlim_cur)
}

/// [`raise_nofile`], logged: a failure leaves the limit as it was, which
/// the agent can live with.
pub fn raise_nofile_logged() {
    match raise_nofile() {
        Ok(n) => info!(nofile = n, "file descriptor limit"),
        Err(e) => warn!(error = %e, "file descriptor limit not raised"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    fn gate(total: usize, per_peer: Option<u32>) -> (Gate, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        (
            Gate::new(Limits { total, per_peer }, metrics.clone(), "test"),
            metrics,
        )
    }

    fn count(metrics: &Metrics, result: &'static str) -> u64 {
        metrics
            .proxy_connections
            .get_or_create(&crate::metrics::ProxyLabels {
                direction: "test",
                result,
            })
            .get()
    }

    #[tokio::test]
    async fn a_full_listener_stops_accepting_until_a_connection_ends() {
        let (gate, metrics) = gate(2, None);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c: Vec<_> = futures::future::join_all((0..3).map(|_| TcpStream::connect(addr))).await;
        let a = gate.accept(&l).await;
        let _b = gate.accept(&l).await;
        assert_eq!(gate.held(2), 2);
        // The third waits in the backlog, not accepted and dropped.
        let third = tokio::time::timeout(Duration::from_millis(200), gate.accept(&l)).await;
        assert!(
            third.is_err(),
            "a third connection was accepted past the limit"
        );
        assert_eq!(count(&metrics, "limit"), 1);
        drop(a);
        let (_s, _, _c3) = tokio::time::timeout(Duration::from_secs(2), gate.accept(&l))
            .await
            .expect("accepting resumes once a slot is free");
        assert_eq!(gate.held(2), 2);
    }

    #[tokio::test]
    async fn sockets_sharing_a_gate_share_its_slots_and_report_a_pause_once() {
        let (gate, metrics) = gate(2, None);
        let gate = Arc::new(gate);
        let (a, b) = (
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        );
        let mut clients = Vec::new();
        for l in [&a, &b] {
            for _ in 0..2 {
                clients.push(TcpStream::connect(l.local_addr().unwrap()).await.unwrap());
            }
        }
        let first = gate.accept(&a).await;
        let _second = gate.accept(&b).await;
        // Both sockets wait: the gate's two slots are taken.
        let (on_a, on_b) = (gate.clone(), gate.clone());
        let (a, b) = (Arc::new(a), Arc::new(b));
        let (la, lb) = (a.clone(), b.clone());
        let wait_a = tokio::spawn(async move { on_a.accept(&la).await });
        let wait_b = tokio::spawn(async move { on_b.accept(&lb).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!wait_a.is_finished() && !wait_b.is_finished());
        assert_eq!(gate.held(2), 2);
        assert_eq!(count(&metrics, "limit"), 1, "one pause, reported once");
        // One slot frees: exactly one of them accepts.
        drop(first);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            usize::from(wait_a.is_finished()) + usize::from(wait_b.is_finished()),
            1
        );
        assert_eq!(gate.held(2), 2);
        wait_a.abort();
        wait_b.abort();
    }

    #[tokio::test]
    async fn a_peer_past_its_share_is_closed_and_counted() {
        let (gate, metrics) = gate(10, Some(1));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        let held = gate.accept(&l).await;
        // The second is accepted and closed: its client reads the end.
        let next = tokio::time::timeout(Duration::from_millis(300), gate.accept(&l)).await;
        assert!(next.is_err());
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(2), second.read(&mut buf))
            .await
            .expect("closed by the agent")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(count(&metrics, "peer_limit"), 1);
        // Its share comes back when its connection ends.
        drop(held);
        let _third = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), gate.accept(&l))
            .await
            .expect("the peer's share is free again");
    }

    #[test]
    fn the_file_limit_is_raised_to_the_hard_limit() {
        let n = raise_nofile().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(n, lim.rlim_max);
    }
}
