//! The userspace data path for captured connections: outbound (15001) to a
//! meshed destination over HBONE or to anything else as plain TCP; inbound
//! HBONE (15008) and inbound plaintext (15006) to the pod's own apps.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tracing::{Instrument as _, debug, debug_span, info_span, warn};

use crate::{
    capture::Capture,
    identity::CertManager,
    inpod::{
        netns::Netns,
        pods::PodRef,
        sockets::{self, PodListener, Role, Source, connect_socket},
    },
    limit,
    metrics::Metrics,
    shards::Rehome,
    state::{Store, Workload},
};

mod conn;
mod deliver;
pub mod hbone;
mod inbound;
mod lb;
mod outbound;
mod relay;
mod same_node;
pub(crate) use outbound::resolve;
use relay::Relayed;
pub(crate) use relay::relay;

pub use conn::{ConnRecord, Meters, Outcome, Peer, Security, labels as tcp_labels};
pub use hbone::{Caller, Pool, Tunnel};
pub use lb::Balancer;
pub use same_node::LocalPods;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a captured connection waits for the configuration's first
/// complete read before it is refused.
const SYNC_WAIT: Duration = Duration::from_secs(10);

/// Agent-wide parts every connection needs.
pub struct Shared {
    pub capture: Arc<Capture>,
    pub metrics: Arc<Metrics>,
    pub certs: Arc<CertManager>,
    pub store: watch::Receiver<Arc<Store>>,
    /// Whether a configuration source is set. Without one the agent only
    /// captures and passes traffic through.
    pub configured: bool,
    pub balancer: Balancer,
    /// `--cluster-id`: the cluster HBONE's `baggage` names.
    pub cluster_id: String,
    /// `--same-node-plaintext`: a connection between two pods of this
    /// agent skips TLS (see [`same_node`]).
    pub same_node_plaintext: bool,
    /// The enrolled pods by address, for the same-node shortcut.
    pub local_pods: LocalPods,
}

impl Shared {
    pub fn store(&self) -> Arc<Store> {
        self.store.borrow().clone()
    }

    /// Whether connections may be decided: always without a configuration
    /// source; with one, once it has read everything (generation 1), waiting
    /// up to [`SYNC_WAIT`]. Before that the store is empty, every meshed
    /// destination would look plain and its traffic would leave in
    /// plaintext; inbound would skip STRICT and policy.
    pub async fn synced(&self) -> bool {
        if !self.configured {
            return true;
        }
        let mut store = self.store.clone();
        let first_read = store.wait_for(|s| s.generation > 0);
        matches!(tokio::time::timeout(SYNC_WAIT, first_read).await, Ok(Ok(_)))
    }
}

/// What a listener's connections need: the pod they belong to and the
/// agent-wide parts.
pub struct PodCtx {
    pub name: String,
    pub netns: Netns,
    /// The pod's own addresses: its Pod's, or read from its namespace at
    /// enrolment (by hand).
    pub addresses: Vec<IpAddr>,
    /// The Pod object it was enrolled from; `None` when enrolled by hand.
    pub pod: Option<PodRef>,
    pub shared: Arc<Shared>,
    /// HBONE connections from this pod, reused across its connections.
    pub pool: hbone::Pool,
}

impl PodCtx {
    pub fn new(
        name: String,
        netns: Netns,
        addresses: Vec<IpAddr>,
        pod: Option<PodRef>,
        shared: Arc<Shared>,
    ) -> Self {
        PodCtx {
            name,
            netns,
            addresses,
            pod,
            shared,
            pool: hbone::Pool::default(),
        }
    }

    /// This pod's workload in the store: its own Pod object (same UID),
    /// else, for a pod enrolled by hand, found by its addresses.
    fn workload(&self, store: &Store) -> Option<Arc<Workload>> {
        if let Some(pod) = &self.pod {
            return store
                .workload(&pod.namespace, &pod.name)
                .filter(|w| w.uid == pod.uid)
                .cloned();
        }
        self.addresses
            .iter()
            .find_map(|ip| store.workload_by_ip(*ip).cloned())
    }

    /// The (namespace, name) this pod's connections carry as their workload
    /// label: its Pod's, or for a pod enrolled by hand the workload its
    /// addresses find in the current store.
    pub fn workload_key(&self) -> Option<(String, String)> {
        if let Some(pod) = &self.pod {
            return Some((pod.namespace.clone(), pod.workload.clone()));
        }
        let w = self.workload(&self.shared.store())?;
        Some((w.namespace.to_string(), w.workload_name().to_owned()))
    }

    /// The workload a connection to `ip` in this pod reaches: the pod's own
    /// Pod object; for a pod enrolled by hand, the one with that address,
    /// else the pod's own.
    fn workload_at(&self, store: &Store, ip: IpAddr) -> Option<Arc<Workload>> {
        if self.pod.is_some() {
            return self.workload(store);
        }
        store
            .workload_by_ip(ip)
            .cloned()
            .or_else(|| self.workload(store))
    }
}

impl std::fmt::Debug for PodCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCtx")
            .field("name", &self.name)
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

/// Serves one capture listener until its tasks are aborted: each of its
/// sockets is accepted on a shard of its own (the main runtime for HBONE,
/// see [`Role::copies`]), and what a shard accepts it serves itself
/// unless another shard serves fewer connections (see
/// [`crate::shards::spawn_connection`]): no hand-off between threads.
pub fn spawn_listener(pod: Arc<PodCtx>, listener: PodListener) -> io::Result<Vec<JoinHandle<()>>> {
    let role = listener.role;
    let limits = match role {
        Role::Outbound => limit::OUTBOUND,
        Role::InboundPlaintext => limit::INBOUND_PLAINTEXT,
        Role::Hbone => limit::HBONE,
    };
    // One gate per listener, shared by its sockets: a flood against one
    // pod takes that pod's slots, not another pod's nor the agent's
    // descriptors.
    let gate = Arc::new(limit::Gate::new(
        limits,
        pod.shared.metrics.clone(),
        role.as_str(),
    ));
    // HBONE is accepted on the main runtime.
    let first = (role != Role::Hbone).then(crate::shards::first_accepting);
    let mut tasks = Vec::with_capacity(listener.sockets.len());
    for (i, socket) in listener.sockets.into_iter().enumerate() {
        let shard = first.map(|first| first + i);
        let run = |l| accept_loop(pod.clone(), role, gate.clone(), l);
        match crate::shards::spawn_accepting(shard, socket, run) {
            Ok(t) => tasks.push(t),
            Err(e) => {
                tasks.iter().for_each(JoinHandle::abort);
                return Err(e);
            }
        }
    }
    Ok(tasks)
}

/// Accepts on one socket of a capture listener and serves what it accepts.
async fn accept_loop(pod: Arc<PodCtx>, role: Role, gate: Arc<limit::Gate>, l: TcpListener) {
    let direction = role.as_str();
    let reporter = match role {
        Role::Outbound => "source",
        Role::InboundPlaintext | Role::Hbone => "destination",
    };
    loop {
        // `TCP_NODELAY` already, from the listener.
        let (stream, peer, admitted) = gate.accept(&l).await;
        let pod = pod.clone();
        let socket = pod.shared.metrics.socket_open(reporter);
        // A connection's span is at debug: at the default level its
        // creation, and its entry and exit at every poll, would cost every
        // new connection CPU for lines that are rarely written (README,
        // Performance, "Logging off the connection path"). The few
        // warnings of a connection name its pod themselves.
        let (span, prefer) = match role {
            // `traceparent`: the tunnel's, recorded when HBONE opens one.
            Role::Outbound => (
                debug_span!(
                    "outbound",
                    pod = %pod.name,
                    client = %peer,
                    traceparent = tracing::field::Empty
                ),
                None,
            ),
            Role::InboundPlaintext => (
                debug_span!("inbound_plaintext", pod = %pod.name, client = %peer),
                None,
            ),
            Role::Hbone => {
                // From a pod of this node: served on the shard that
                // dials it (see `crate::shards`).
                let prefer = stream
                    .local_addr()
                    .ok()
                    .and_then(|local| crate::shards::dialled_by(peer, local));
                if let Some(shard) = prefer {
                    debug!(shard, client = %peer, "HBONE connection from this agent: served on the shard that dials it");
                }
                (
                    info_span!("inbound", pod = %pod.name, client = %peer),
                    prefer,
                )
            }
        };
        let admitted = (admitted, socket);
        spawn_synced(
            pod,
            direction,
            span,
            admitted,
            stream,
            prefer,
            move |pod, stream| async move {
                match role {
                    Role::Outbound => outbound::serve(pod, stream, peer).await,
                    Role::InboundPlaintext => inbound::serve(pod, stream, peer).await,
                    Role::Hbone => hbone::serve(pod, stream, peer).await,
                }
            },
        );
    }
}

/// Where HBONE connections are opened from, with which certificates: a
/// pod's namespace (the node agent, for that pod) or the process's own (a
/// waypoint, which runs in its own pod).
#[derive(Clone, Copy)]
pub struct Dialer<'a> {
    pub netns: Option<&'a Netns>,
    pub certs: &'a CertManager,
}

impl PodCtx {
    pub fn dialer(&self) -> Dialer<'_> {
        Dialer {
            netns: Some(&self.netns),
            certs: &self.shared.certs,
        }
    }
}

/// Serves one accepted connection once the configuration has been read
/// (see [`Shared::synced`]); until then it waits, and after [`SYNC_WAIT`]
/// it is closed unserved and counted as `not_synced`: refused, never sent
/// on in plaintext nor let in unchecked. The connection keeps its place in
/// its listener's limits and in `istio_tcp_sockets_open` (`admitted`)
/// until the task ends.
fn spawn_synced<F>(
    pod: Arc<PodCtx>,
    direction: &'static str,
    span: tracing::Span,
    admitted: (crate::limit::Admitted, crate::metrics::SocketGuard),
    stream: TcpStream,
    prefer: Option<usize>,
    serve: impl FnOnce(Arc<PodCtx>, TcpStream) -> F + Send + 'static,
) where
    F: Future<Output = ()> + Send + 'static,
{
    let task = move |stream| async move {
        let _admitted = admitted;
        if !pod.shared.synced().await {
            pod.shared.metrics.connection(direction, "not_synced");
            warn!(
                pod = %pod.name,
                direction,
                waited = ?SYNC_WAIT,
                "configuration not synced: the source has not been read yet; connection refused"
            );
            return;
        }
        serve(pod, stream).await;
    };
    crate::shards::spawn_connection(stream, prefer, move |stream| task(stream).instrument(span));
}

/// Connects from inside the pod's namespace with the agent's mark: out of
/// the pod, or to its own app on a client's behalf.
async fn connect_in_pod(pod: &PodCtx, dst: SocketAddr, source: Source) -> io::Result<TcpStream> {
    match source {
        Source::Pod => connect_from(Some(&pod.netns), dst).await,
        Source::LocalApp { client } => connect_local_app(pod, client, dst).await,
    }
}

/// How many source ports a connection to a local app tries before it gives
/// up (each is in use only while an earlier connection's 4-tuple is).
const LOCAL_APP_PORT_TRIES: usize = 16;

/// The next source port for a connection to a local app, shared by all
/// pods: consecutive connections from one client get different ports.
fn next_local_app_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let range = mesh_common::LOCAL_APP_PORTS;
    let len = u32::from(*range.end() - *range.start()) + 1;
    *range.start() + (NEXT.fetch_add(1, Ordering::Relaxed) % len) as u16
}

/// Connects to the pod's app `dst` from the client's address. The 4-tuple is
/// chosen here and handed to inbound capture before the SYN leaves, so that
/// capture lets exactly this connection through (from the client's address,
/// nothing else in the SYN sets it apart from the client's own).
async fn connect_local_app(pod: &PodCtx, client: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let (ip, transparent) = sockets::local_app_source(client, dst.ip());
    let mut last = None;
    for _ in 0..LOCAL_APP_PORT_TRIES {
        let src = SocketAddr::new(ip, next_local_app_port());
        let std = match pod
            .netns
            .run(|| sockets::local_app_socket(src, transparent))
            .map_err(io::Error::other)?
        {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let _let_through = pod
            .shared
            .capture
            .let_through(src, dst)
            .map_err(io::Error::other)?;
        match connect_std(std, dst).await {
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => last = Some(e),
            r => return r,
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

/// Connects from `netns` (None: where the process runs) with the agent's
/// mark, out of the pod.
pub async fn connect_from(netns: Option<&Netns>, dst: SocketAddr) -> io::Result<TcpStream> {
    let std = socket_in(netns, || connect_socket(dst))?;
    connect_std(std, dst).await
}

/// [`connect_from`], the source port picked (bound) before the SYN and
/// passed to `note` first, with what it returns kept until the connection
/// is set up.
pub async fn connect_from_noting<T>(
    netns: Option<&Netns>,
    dst: SocketAddr,
    note: impl FnOnce(u16) -> T,
) -> io::Result<(TcpStream, T)> {
    let std = socket_in(netns, || {
        let s = connect_socket(dst)?;
        let any: SocketAddr = match dst {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        socket2::SockRef::from(&s).bind(&any.into())?;
        Ok(s)
    })?;
    let noted = note(std.local_addr()?.port());
    Ok((connect_std(std, dst).await?, noted))
}

/// A socket made by `make` inside `netns` (None: where the process runs).
fn socket_in(
    netns: Option<&Netns>,
    make: impl FnOnce() -> io::Result<std::net::TcpStream>,
) -> io::Result<std::net::TcpStream> {
    match netns {
        Some(netns) => netns.run(make).map_err(io::Error::other)?,
        None => make(),
    }
}

/// Connects the non-blocking `std` to `dst`. Over loopback (an app in its
/// pod) the handshake is done by the time `connect` returns, which the peer
/// address shows: then the stream is ready without a round through the
/// reactor; otherwise it waits to be writable, as tokio's connect does.
async fn connect_std(std: std::net::TcpStream, dst: SocketAddr) -> io::Result<TcpStream> {
    match socket2::SockRef::from(&std).connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std)?;
    if stream.peer_addr().is_ok() {
        return Ok(stream);
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, stream.writable()).await {
        Ok(r) => r?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(stream),
    }
}

/// How a splice ended.
#[derive(Debug)]
pub enum SpliceEnd {
    /// Both directions finished (or one failed).
    Done(io::Result<()>),
    /// A policy change no longer allows the connection; it was closed.
    Revoked,
}

/// What a splice does once its connection proves bulk.
#[derive(Clone, Debug)]
pub enum WhenBulk {
    /// Nothing: it stays where it runs.
    Stay,
    /// It moves to the shard its HBONE connection runs on, if that is
    /// another one (the destination's side of a call between two pods of
    /// this node: see `crate::shards`).
    Follow(Arc<crate::shards::Place>),
}

/// Splices both directions until both are closed, passing half-close on, or
/// until `revoked` resolves. Byte counts are read from `client` afterwards:
/// what it yielded went to the server (sent), what it took came back.
async fn splice<A, B>(
    client: &mut Counted<A>,
    server: &mut B,
    revoked: impl Future<Output = ()>,
    when_bulk: WhenBulk,
) -> SpliceEnd
where
    A: AsyncRead + AsyncWrite + Unpin + Rehome,
    B: AsyncRead + AsyncWrite + Unpin + Rehome,
{
    let mut relay = relay::Relay::new(matches!(when_bulk, WhenBulk::Follow(_)));
    let mut revoked = std::pin::pin!(revoked);
    let end = loop {
        let relayed = tokio::select! {
            r = relay.run(client, server) => r,
            () = &mut revoked => break SpliceEnd::Revoked,
        };
        match relayed {
            Relayed::Done(r) => break SpliceEnd::Done(r.map(|_| ())),
            Relayed::Bulk => {
                let WhenBulk::Follow(place) = &when_bulk else {
                    continue;
                };
                let Some(to) = place
                    .get()
                    .filter(|&to| Some(to) != crate::shards::current())
                else {
                    continue;
                };
                if crate::shards::move_to(crate::shards::MoveTo::Shard(to)).await {
                    debug!(
                        shard = crate::shards::current(),
                        "bulk call between two pods of this node: its splice moved to another shard"
                    );
                    if let Err(e) = client.rehome().and_then(|()| server.rehome()) {
                        break SpliceEnd::Done(Err(e));
                    }
                }
            }
        }
    };
    // A relay that ended well has shut both write sides down already; one
    // that failed tells both peers the end it could not pass on.
    if matches!(end, SpliceEnd::Done(Err(_))) {
        let _ = client.shutdown().await;
        let _ = server.shutdown().await;
    }
    end
}

/// A stream that counts the bytes read from and written to it, and adds
/// them to its connection's byte series as they go (the client's side of
/// a splice: what it yields is the request, what it takes the response).
pub struct Counted<S> {
    inner: S,
    pub read: u64,
    pub written: u64,
    meters: Option<Meters>,
}

impl<S> Counted<S> {
    pub fn metered(inner: S, meters: Option<Meters>) -> Self {
        Counted {
            inner,
            read: 0,
            written: 0,
            meters,
        }
    }

    /// Counts `n` bytes read: by [`AsyncRead`], or before the stream was
    /// wrapped (the client's first bytes, sent with its CONNECT).
    pub fn count_read(&mut self, n: usize) {
        let n = n as u64;
        if n > 0 {
            self.read += n;
            if let Some(m) = &self.meters {
                m.request.inc_by(n);
            }
        }
    }
}

impl<S: Rehome> Rehome for Counted<S> {
    fn rehome(&mut self) -> io::Result<()> {
        self.inner.rehome()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.count_read(n);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
            if let Some(m) = &self.meters {
                m.response.inc_by(n as u64);
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves when a new store snapshot denies what `still_allowed` checks.
async fn revoked_by_policy(
    mut store: watch::Receiver<Arc<Store>>,
    still_allowed: impl Fn(&Store) -> bool,
) {
    loop {
        if store.changed().await.is_err() {
            // The store is gone: the agent is shutting down; keep serving.
            return std::future::pending().await;
        }
        let snapshot = store.borrow_and_update().clone();
        if !still_allowed(&snapshot) {
            return;
        }
    }
}

/// Closes the record of a spliced connection; `client` is the side the
/// connection came from.
fn finish<S>(rec: ConnRecord, client: &Counted<S>, end: SpliceEnd, pod: &PodCtx) {
    if matches!(end, SpliceEnd::Revoked) {
        pod.shared.metrics.connection("policy", "revoked");
    }
    let (flags, outcome) = ended(client, &end);
    rec.close(flags, outcome);
}

/// The response flags and outcome of a spliced connection.
fn ended<S>(client: &Counted<S>, end: &SpliceEnd) -> (&'static str, Outcome) {
    let mut outcome = Outcome {
        request_bytes: client.read,
        response_bytes: client.written,
        error: None,
    };
    let flags = match end {
        SpliceEnd::Done(Ok(())) => "-",
        SpliceEnd::Done(Err(e)) => {
            outcome.error = Some(e.to_string());
            "-"
        }
        SpliceEnd::Revoked => {
            outcome.error = Some("closed: a policy change no longer allows this connection".into());
            "DENY"
        }
    };
    (flags, outcome)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    /// Over loopback a connection is ready when `connect` returns; one that
    /// waits for its handshake (a full accept queue drops the SYN until it
    /// is sent again) is ready once the handshake is done; a refusal is an
    /// error, not a stream that fails at its first use.
    #[tokio::test]
    async fn a_connect_is_ready_when_its_handshake_is_done_and_a_refusal_is_an_error() {
        let listener =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        // Backlog 0: one connection waits in the queue; the next SYN is
        // dropped while it does.
        listener.listen(0).unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener.into()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut first = connect_from(None, addr).await.expect("connected");
        assert_eq!(first.peer_addr().unwrap(), addr);

        let mut second = tokio::spawn(connect_from(None, addr));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "connected while the queue was full");
        let (mut accepted, _) = listener.accept().await.unwrap();
        first.write_all(b"one").await.unwrap();
        let mut buf = [0u8; 3];
        accepted.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"one");
        let mut second = tokio::time::timeout(Duration::from_secs(5), &mut second)
            .await
            .expect("connected once the SYN was sent again")
            .unwrap()
            .expect("connected");
        let (mut accepted, _) = listener.accept().await.unwrap();
        second.write_all(b"two").await.unwrap();
        accepted.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"two");

        drop(listener);
        let e = connect_from(None, addr).await.expect_err("nothing listens");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }
}
