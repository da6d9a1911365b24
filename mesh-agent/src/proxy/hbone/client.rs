//! The client side of HBONE: pooled HTTP/2 connections over mTLS, one
//! CONNECT stream per tunnelled connection.

use std::{
    collections::HashMap,
    future::Future as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::{Method, Request, StatusCode};
use mesh_common::PORT_HBONE;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{Instrument as _, debug};

use super::{
    Buffered, CLIENT_MAX_STREAMS, CONN_WINDOW, H2Stream, HANDSHAKE_TIMEOUT, MAX_FRAME,
    STREAM_WINDOW, Timers, keepalive,
};
use crate::proxy::{Dialer, connect_from, connect_from_noting};
use crate::sync::LockExt as _;
use crate::waypoint::trace::TraceParent;
use crate::{
    identity::{Identity, IdentityError, instant_of, peer_valid_until},
    state::Workload,
};

/// A pooled connection's handle: it opens streams, and says whether the
/// connection takes no more: its task has ended, or a request on it failed
/// at the HTTP/2 layer (the peer's GOAWAY: it is draining).
#[derive(Clone)]
struct Sender {
    h2: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Sender {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

struct Pooled {
    sender: Sender,
    /// New streams go on it until then: its age limit, or sooner the
    /// expiry of the certificate the peer proved itself with.
    until: tokio::time::Instant,
    /// Streams open on this connection now.
    active: Arc<AtomicUsize>,
    /// Streams the peer allows at once (its SETTINGS_MAX_CONCURRENT_STREAMS,
    /// as the connection task last saw it).
    peer_max: Arc<AtomicUsize>,
}

impl Pooled {
    fn usable(&self) -> bool {
        !self.sender.is_closed() && tokio::time::Instant::now() < self.until
    }

    /// Whether one more stream may open now: under our cap and the peer's.
    /// A full connection is passed over for another, never queued behind.
    fn has_room(&self) -> bool {
        let limit = CLIENT_MAX_STREAMS.min(self.peer_max.load(Ordering::Relaxed));
        self.active.load(Ordering::Relaxed) < limit
    }
}

/// Connections to one peer (same identities, same address) the pool keeps
/// at most: one per core, so that the TLS work of parallel streams, which
/// runs in each connection's own task, can use every core.
pub(super) fn conns_per_peer() -> usize {
    if crate::shards::current().is_some() {
        // A shard is one thread: its streams spread over the shards.
        return 1;
    }
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)))
}

/// Drops the pool's handle on connections that are closed, or expired with
/// no stream left.
fn forget_idle_expired(peer: &mut Vec<Pooled>) {
    peer.retain(|p| !p.sender.is_closed() && (p.usable() || p.active.load(Ordering::Relaxed) > 0));
}

/// A tunnelled connection: the CONNECT stream, and its count on the
/// pooled connection that carries it (released when this is dropped).
pub struct Tunnel {
    io: H2Stream,
    active: ActiveStream,
}

impl Tunnel {
    /// The stream, and the count to keep until the stream is done with.
    pub fn into_parts(self) -> (H2Stream, ActiveStream) {
        (self.io, self.active)
    }
}

/// The tunnel read and written as its stream.
impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// One stream's count on its pooled connection.
pub struct ActiveStream(Arc<AtomicUsize>);

impl ActiveStream {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        ActiveStream(count.clone())
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct PoolKey {
    src: Identity,
    dst: Identity,
    /// Other identities the peer may prove (a Service's): a connection
    /// that proved one of them serves only calls that accept them too.
    also: Vec<Identity>,
    addr: SocketAddr,
    /// The connection shard the streams run on (see `crate::shards`): each
    /// shard pools its own connections, so that a stream and the
    /// connection carrying it run on one thread.
    shard: Option<usize>,
}

/// Pooled HBONE connections of one pod (they are opened from its network
/// namespace, so they carry its address and cannot be shared across pods).
/// A new stream takes an idle connection to its peer, or opens another one
/// while there are fewer than [`conns_per_peer`], or else shares the
/// least busy one that has room for it (under 100 streams and under the
/// peer's limit); when every connection is full, it opens another.
#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    timers: Timers,
}

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with {addr}: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("no certificate for {id}: {source}")]
    Identity { id: Identity, source: IdentityError },
    #[error("HTTP/2 with {addr}: {source}")]
    Http { addr: SocketAddr, source: h2::Error },
    #[error("{addr} answered {status} to CONNECT {authority}")]
    Status {
        addr: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
    #[error("{addr} did not answer CONNECT {authority} in {after:?}")]
    Timeout {
        addr: SocketAddr,
        authority: SocketAddr,
        after: Duration,
    },
    #[error("building the CONNECT request: {0}")]
    Request(#[from] hyper::http::Error),
}

impl HboneError {
    /// ztunnel's `response_flags` for a tunnel that could not be opened.
    pub fn response_flags(&self) -> &'static str {
        match self {
            HboneError::Tls { .. } => "TLS_FAILURE",
            HboneError::Http { .. } => "H2_HANDSHAKE_FAILURE",
            HboneError::Identity { .. } => "IDENTITY_ERROR",
            HboneError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED => "DENY",
            HboneError::Connect { .. }
            | HboneError::Status { .. }
            | HboneError::Timeout { .. }
            | HboneError::Request(_) => "CONNECT",
        }
    }

    /// Whether the destination itself refused by policy (not a failure of
    /// the endpoint, so another endpoint is not tried).
    pub fn is_denied(&self) -> bool {
        matches!(self, HboneError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED)
    }

    /// Whether the endpoint itself failed (unreachable, TLS refused, its
    /// app not accepting), so that it is set aside for new connections.
    pub fn is_endpoint_fault(&self) -> bool {
        match self {
            HboneError::Connect { .. }
            | HboneError::Tls { .. }
            | HboneError::Http { .. }
            | HboneError::Timeout { .. } => true,
            HboneError::Status { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE,
            HboneError::Identity { .. } | HboneError::Request(_) => false,
        }
    }
}

/// Who is calling, for the request headers the server may log.
pub struct Caller<'a> {
    pub addr: SocketAddr,
    pub workload: &'a Workload,
    /// The Service the client addressed (its cluster hostname), if any:
    /// sent as `forwarded` `host`, so that the destination reports it.
    pub service: Option<String>,
    /// The cluster the caller is in (`--cluster-id`), for `baggage`.
    pub cluster: &'a str,
    /// The identities of the workloads behind the Service the call
    /// addressed: a destination proving one of them is accepted as well as
    /// one proving the expected identity (ztunnel accepts a Service's SANs).
    pub service_identities: &'a [Identity],
    /// What the caller's app had already sent when the tunnel was asked
    /// for: written on the stream right behind the CONNECT, so that both
    /// leave in one flush and the peer has the bytes as soon as it opens
    /// the tunnel, a round trip sooner than after the 200. Only the
    /// authenticated peer agent sees them before it answers; a refusal
    /// drops them there, and the next endpoint tried gets them again.
    /// What [`Caller::app`] sends while the answer is awaited joins them.
    pub first_bytes: Bytes,
    /// The caller's app, when it is ours to read: what it sends while the
    /// CONNECT awaits its answer goes on the stream at once, up to
    /// [`FIRST_BYTES`] with the first bytes (more waits for the answer),
    /// and joins [`Caller::first_bytes`], so that another attempt sends it
    /// again. An app that writes just after it connects thus does not wait
    /// a round trip between the agents for its first request to leave.
    pub app: Option<&'a TcpStream>,
}

/// At most this much of what the app sent goes on a stream before the
/// CONNECT is answered.
pub const FIRST_BYTES: usize = 4096;

impl Pool {
    /// A pool on shorter clocks, for tests.
    #[cfg(test)]
    pub(super) fn with_timers(timers: Timers) -> Pool {
        Pool {
            conns: Mutex::default(),
            timers,
        }
    }

    /// Opens a tunnelled stream to `target` (the CONNECT authority: the
    /// destination pod's address and the app's port, or for a waypoint the
    /// original destination) through the HBONE port of `via` (the
    /// destination pod, or the waypoint pod), which must prove `dst`.
    pub async fn connect(
        &self,
        dialer: Dialer<'_>,
        src: &Identity,
        dst: &Identity,
        via: std::net::IpAddr,
        target: SocketAddr,
        caller: &mut Caller<'_>,
    ) -> Result<Tunnel, HboneError> {
        let key = PoolKey {
            src: src.clone(),
            dst: dst.clone(),
            also: caller.service_identities.to_vec(),
            addr: SocketAddr::new(via, PORT_HBONE),
            shard: crate::shards::current(),
        };
        // The stream is counted on its connection as soon as it is chosen,
        // so that concurrent calls spread instead of all picking it.
        let pooled = {
            let mut conns = self.conns.locked();
            let peer: &[Pooled] = match conns.get_mut(&key) {
                Some(v) => {
                    forget_idle_expired(v);
                    v
                }
                None => &[],
            };
            let usable = peer.iter().filter(|p| p.usable()).count();
            let least = peer
                .iter()
                .filter(|p| p.usable() && p.has_room())
                .min_by_key(|p| p.active.load(Ordering::Relaxed));
            match least {
                Some(p) if p.active.load(Ordering::Relaxed) == 0 || usable >= conns_per_peer() => {
                    Some((p.sender.clone(), ActiveStream::new(&p.active)))
                }
                _ => None,
            }
        };
        let timeout = self.timers.request_timeout;
        if let Some((sender, active)) = pooled {
            let closed = sender.closed.clone();
            match request(sender, &key, target, caller, timeout).await {
                Err(HboneError::Http { .. }) => {
                    // The pooled connection died under us, or its peer is
                    // draining it (GOAWAY): it takes no new streams (those
                    // open on it go on), and this call gets one fresh try.
                    closed.store(true, Ordering::Relaxed);
                    debug!(addr = %key.addr, "pooled HBONE connection failed; reconnecting");
                }
                r => return r.map(|io| Tunnel { io, active }),
            }
        }
        let (sender, active) = self.dial(dialer, &key).await?;
        let io = request(sender, &key, target, caller, timeout).await?;
        Ok(Tunnel { io, active })
    }

    async fn dial(
        &self,
        dialer: Dialer<'_>,
        key: &PoolKey,
    ) -> Result<(Sender, ActiveStream), HboneError> {
        let addr = key.addr;
        let (tcp, _dialling) = if crate::shards::current().is_some() {
            connect_from_noting(dialer.netns, addr, |port| {
                crate::shards::dialling(port, addr)
            })
            .await
        } else {
            connect_from(dialer.netns, addr)
                .await
                .map(|tcp| (tcp, None))
        }
        .map_err(|source| HboneError::Connect { addr, source })?;
        let config = dialer
            .certs
            .client_config_for(&key.src, &key.dst, &key.also)
            .map_err(|source| HboneError::Identity {
                id: key.src.clone(),
                source,
            })?;
        // The name is not checked: the verifier checks the SPIFFE ID.
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config).connect(name, Buffered::new(tcp)),
        )
        .await
        .map_err(|_| HboneError::Tls {
            addr,
            source: io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"),
        })?
        .map_err(|source| HboneError::Tls { addr, source })?;
        let (tcp, conn) = tls.get_mut();
        super::io::verified(tcp, conn);
        let mut until = tokio::time::Instant::now() + self.timers.max_age;
        if let Some(t) = peer_valid_until(tls.get_ref().1) {
            until = until.min(instant_of(t));
        }
        let (h2, mut conn) = h2::client::Builder::new()
            .enable_push(false)
            // Until the peer's SETTINGS say otherwise.
            .initial_max_send_streams(CLIENT_MAX_STREAMS)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::Http { addr, source })?;
        let peer_max = Arc::new(AtomicUsize::new(conn.max_concurrent_send_streams()));
        let closed = Arc::new(AtomicBool::new(false));
        let sender = Sender {
            h2,
            closed: closed.clone(),
        };
        // Pings find a peer that vanished, on an idle pooled connection
        // too (that is when it must be found): one unanswered in time
        // closes the connection.
        let pings = conn
            .ping_pong()
            .expect("a new connection's pings are not taken yet");
        let alive = keepalive(
            pings,
            self.timers.keepalive_interval,
            self.timers.keepalive_timeout,
        );
        let seen = peer_max.clone();
        // The connection task notes the peer's stream limit each time it
        // runs (a SETTINGS frame may change it at any time).
        let conn = std::future::poll_fn(move |cx| {
            let polled = std::pin::Pin::new(&mut conn).poll(cx);
            seen.store(conn.max_concurrent_send_streams(), Ordering::Relaxed);
            polled
        });
        tokio::spawn(
            async move {
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        debug!(error = %e, "HBONE connection ended");
                    },
                    () = alive => debug!("HBONE peer did not answer a ping in time: connection closed"),
                }
                closed.store(true, Ordering::Relaxed);
            }
            .in_current_span(),
        );
        let mut conns = self.conns.locked();
        // Closed connections leave the map here, and expired ones once
        // their last stream is done (the pool's handle is what keeps an
        // idle connection open).
        conns.retain(|_, v| {
            forget_idle_expired(v);
            !v.is_empty()
        });
        let count = Arc::new(AtomicUsize::new(0));
        let active = ActiveStream::new(&count);
        let peer = conns.entry(key.clone()).or_default();
        // Calls that dialled at once may find the pool full by now: the
        // extra connection then carries this one stream and closes with it,
        // unless every pooled connection is at its stream limit.
        let usable = peer.iter().filter(|p| p.usable());
        let full = usable.clone().all(|p| !p.has_room());
        if usable.count() < conns_per_peer() || full {
            peer.push(Pooled {
                sender: sender.clone(),
                until,
                active: count,
                peer_max,
            });
        }
        Ok((sender, active))
    }

    /// Number of live pooled connections, for `/config_dump`.
    pub fn len(&self) -> usize {
        let conns = self.conns.locked();
        conns
            .values()
            .flatten()
            .filter(|p| !p.sender.is_closed())
            .count()
    }
}

/// `for="ip:port"`, and `;host=<service hostname>` when a Service was
/// addressed (RFC 7239, as ztunnel sends it).
fn forwarded(caller: &Caller<'_>) -> String {
    let mut v = format!("for=\"{}\"", caller.addr);
    if let Some(host) = &caller.service {
        v.push_str(";host=");
        v.push_str(host);
    }
    v
}

async fn request(
    sender: Sender,
    key: &PoolKey,
    target: SocketAddr,
    caller: &mut Caller<'_>,
    timeout: Duration,
) -> Result<H2Stream, HboneError> {
    let addr = key.addr;
    let wl = caller.workload;
    // A fresh trace per tunnel, on both ends' log spans (the outbound
    // connection's here, the tunnel's at the server), so they join up.
    let trace = TraceParent::fresh().to_string();
    tracing::Span::current().record("traceparent", tracing::field::display(&trace));
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", forwarded(caller))
        .header("baggage", super::headers::baggage(caller.cluster, wl))
        .header("traceparent", &trace)
        .body(())?;
    let app = caller.app;
    let sent = send(sender, req, &mut caller.first_bytes, app, addr, target);
    let stream = tokio::time::timeout(timeout, sent)
        .await
        .map_err(|_| HboneError::Timeout {
            addr,
            authority: target,
            after: timeout,
        })??;
    // On the connection's span, with its traceparent (the access log line
    // stands apart from spans, as ztunnel's).
    let first_bytes = caller.first_bytes.len();
    debug!(%addr, authority = %target, first_bytes, "HBONE tunnel open");
    Ok(stream)
}

async fn send(
    sender: Sender,
    req: Request<()>,
    first: &mut Bytes,
    app: Option<&TcpStream>,
    addr: SocketAddr,
    target: SocketAddr,
) -> Result<H2Stream, HboneError> {
    let http = |source| HboneError::Http { addr, source };
    // Waits while the connection has as many streams open as the peer allows.
    let mut h2 = sender.h2.ready().await.map_err(http)?;
    let (response, mut send) = h2.send_request(req, false).map_err(http)?;
    if !first.is_empty() {
        // Within the stream's initial window: h2 queues it behind the
        // HEADERS, and the connection's task writes both at once.
        send.send_data(first.clone(), false).map_err(http)?;
    }
    let resp = match app {
        Some(app) => answer_meanwhile(response, &mut send, first, app).await,
        None => response.await,
    }
    .map_err(http)?;
    if resp.status() != StatusCode::OK {
        return Err(HboneError::Status {
            addr,
            authority: target,
            status: resp.status(),
        });
    }
    Ok(H2Stream::new(send, resp.into_body()))
}

/// Awaits the answer to a CONNECT; meanwhile what `app` sends goes on the
/// stream as it comes, until `first` (what went before it, which each read
/// joins) holds [`FIRST_BYTES`]. The app's end or a failed read stops the
/// reading and is left for the splice to meet.
async fn answer_meanwhile(
    response: h2::client::ResponseFuture,
    send: &mut h2::SendStream<Bytes>,
    first: &mut Bytes,
    app: &TcpStream,
) -> Result<hyper::Response<h2::RecvStream>, h2::Error> {
    tokio::pin!(response);
    while first.len() < FIRST_BYTES {
        tokio::select! {
            biased;
            r = &mut response => return r,
            ready = app.readable() => {
                if ready.is_err() {
                    break;
                }
                let room = FIRST_BYTES - first.len();
                let mut more = bytes::BytesMut::with_capacity(room);
                match app.try_read_buf(&mut bytes::BufMut::limit(&mut more, room)) {
                    Ok(0) => break,
                    Ok(_) => {
                        // Kept before it is sent: if the stream fails, the
                        // next attempt has it.
                        let more = more.freeze();
                        *first = if first.is_empty() {
                            more.clone()
                        } else {
                            [&first[..], &more[..]].concat().into()
                        };
                        send.send_data(more, false)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        }
    }
    response.await
}
