//! HBONE: TCP carried as an HTTP/2 `CONNECT` stream over mutual TLS 1.3 on
//! port 15008, as Istio's ambient mesh speaks it. The client side pools one
//! HTTP/2 connection per (source identity, destination identity, address);
//! the server side terminates TLS in the destination pod, checks who the
//! peer is and what it asks for, authorizes, and splices to the app.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::Empty;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    service::service_fn,
    upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_common::{AGENT_PORTS, PORT_HBONE};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tracing::{Instrument as _, debug, info_span, warn};

use super::{
    Counted, PodCtx, SpliceEnd,
    conn::{ConnRecord, Outcome, Peer},
    connect_in_pod, revoked_by_policy, splice,
};
use crate::{
    identity::{Identity, IdentityError, peer_identity},
    state::{Conn, Decision, Store, Workload},
};

/// A TLS handshake must finish in this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control windows: large, so that one stream can fill a fast
/// link without waiting for WINDOW_UPDATEs.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONN_WINDOW: u32 = 16 * 1024 * 1024;
/// Streams one HTTP/2 connection carries at once (each is one tunnelled
/// TCP connection); the server advertises it, a client past it waits.
const MAX_STREAMS: u32 = 1024;
/// A CONNECT must be answered in this time (a pooled connection to a peer
/// that vanished would otherwise hold the call until TCP gives up).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings find dead peers on idle pooled connections.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A pooled connection takes no new streams after this age: new calls
/// handshake again (fresh certificates, fresh policy checks of the peer),
/// old streams finish on the old connection.
const POOL_MAX_AGE: Duration = Duration::from_secs(300);

type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

struct Pooled {
    sender: Sender,
    since: std::time::Instant,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct PoolKey {
    src: Identity,
    dst: Identity,
    addr: SocketAddr,
}

/// Pooled HBONE connections of one pod (they are opened from its network
/// namespace, so they carry its address and cannot be shared across pods).
#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Pooled>>,
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
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("{addr} answered {status} to CONNECT {authority}")]
    Status {
        addr: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
    #[error("{addr} did not answer CONNECT {authority} in {REQUEST_TIMEOUT:?}")]
    Timeout {
        addr: SocketAddr,
        authority: SocketAddr,
    },
    #[error("building the CONNECT request: {0}")]
    Request(#[from] hyper::http::Error),
}

impl HboneError {
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
}

impl Pool {
    /// Opens a tunnelled stream to `target` (the destination pod's address
    /// and the app's port) through the destination's HBONE port.
    pub async fn connect(
        &self,
        pod: &PodCtx,
        src: &Identity,
        dst: &Identity,
        target: SocketAddr,
        caller: &Caller<'_>,
    ) -> Result<Upgraded, HboneError> {
        let key = PoolKey {
            src: src.clone(),
            dst: dst.clone(),
            addr: SocketAddr::new(target.ip(), PORT_HBONE),
        };
        let pooled = {
            let conns = self.conns.lock().expect("pool lock");
            conns
                .get(&key)
                .filter(|p| !p.sender.is_closed() && p.since.elapsed() < POOL_MAX_AGE)
                .map(|p| p.sender.clone())
        };
        if let Some(sender) = pooled {
            match request(sender, &key, target, caller).await {
                Err(HboneError::Http { .. }) => {
                    // The pooled connection died under us: one fresh try.
                    debug!(addr = %key.addr, "pooled HBONE connection failed; reconnecting");
                }
                r => return r,
            }
        }
        let sender = self.dial(pod, &key).await?;
        request(sender, &key, target, caller).await
    }

    async fn dial(&self, pod: &PodCtx, key: &PoolKey) -> Result<Sender, HboneError> {
        let addr = key.addr;
        let tcp = connect_in_pod(pod, addr, false)
            .await
            .map_err(|source| HboneError::Connect { addr, source })?;
        let config = pod
            .shared
            .certs
            .client_config(&key.src, &key.dst)
            .map_err(|source| HboneError::Identity {
                id: key.src.clone(),
                source,
            })?;
        // The name is not checked: the verifier checks the SPIFFE ID.
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| HboneError::Tls {
            addr,
            source: io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"),
        })?
        .map_err(|source| HboneError::Tls { addr, source })?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| HboneError::Http { addr, source })?;
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "HBONE connection ended");
                }
            }
            .in_current_span(),
        );
        let mut conns = self.conns.lock().expect("pool lock");
        // Closed connections leave the map here; replaced ones stay open
        // only for the streams they still carry.
        conns.retain(|_, p| !p.sender.is_closed());
        let since = std::time::Instant::now();
        conns.insert(
            key.clone(),
            Pooled {
                sender: sender.clone(),
                since,
            },
        );
        Ok(sender)
    }

    /// Number of live pooled connections, for `/config_dump`.
    pub fn len(&self) -> usize {
        let conns = self.conns.lock().expect("pool lock");
        conns.values().filter(|p| !p.sender.is_closed()).count()
    }
}

/// A W3C baggage value: anything outside a safe set is percent-encoded, so
/// a label can neither break the header nor add members.
fn baggage_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn request(
    sender: Sender,
    key: &PoolKey,
    target: SocketAddr,
    caller: &Caller<'_>,
) -> Result<Upgraded, HboneError> {
    let addr = key.addr;
    let wl = caller.workload;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", format!("for=\"{}\"", caller.addr.ip()))
        .header(
            "baggage",
            format!(
                "k8s.namespace.name={},k8s.pod.name={},service.name={},service.version={}",
                baggage_value(&wl.namespace),
                baggage_value(&wl.name),
                baggage_value(wl.app()),
                baggage_value(wl.version())
            ),
        )
        .body(Empty::new())?;
    tokio::time::timeout(REQUEST_TIMEOUT, send(sender, req, addr, target))
        .await
        .map_err(|_| HboneError::Timeout {
            addr,
            authority: target,
        })?
}

async fn send(
    mut sender: Sender,
    req: Request<Empty<Bytes>>,
    addr: SocketAddr,
    target: SocketAddr,
) -> Result<Upgraded, HboneError> {
    let http = |source| HboneError::Http { addr, source };
    sender.ready().await.map_err(http)?;
    let resp = sender.send_request(req).await.map_err(http)?;
    if resp.status() != StatusCode::OK {
        return Err(HboneError::Status {
            addr,
            authority: target,
            status: resp.status(),
        });
    }
    hyper::upgrade::on(resp).await.map_err(http)
}

/// Why an inbound TLS handshake failed, as a short metric label.
fn tls_failure(e: &io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return "tls_eof";
    }
    match e.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(Error::NoCertificatesPresented) => "no_client_certificate",
        Some(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => "expired_certificate",
        Some(Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => "untrusted_certificate",
        Some(Error::InvalidCertificate(_)) => "bad_certificate",
        Some(Error::InvalidMessage(_)) => "not_tls",
        Some(Error::PeerIncompatible(_) | Error::NoApplicationProtocol) => "tls_incompatible",
        _ => "tls_error",
    }
}

/// Serves one connection accepted on the pod's 15008 listener.
pub async fn serve(pod: Arc<PodCtx>, stream: TcpStream, peer: SocketAddr) {
    let metrics = &pod.shared.metrics;
    let store = pod.shared.store();
    let Some(local) = pod.workload(&store) else {
        metrics.connection("hbone", "no_local_identity");
        warn!("pod is not in the state store, so it has no identity to accept HBONE with");
        return;
    };
    let id = local.identity(pod.shared.certs.trust_domain());
    let config = match pod.shared.certs.server_config(&id) {
        Ok(c) => c,
        Err(e) => {
            metrics.connection("hbone", "no_local_identity");
            warn!(identity = %id, error = %e, "no certificate to accept HBONE with");
            return;
        }
    };
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = tls_failure(&e);
            metrics.connection("hbone", reason);
            debug!(reason, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            metrics.connection("hbone", "handshake_timeout");
            debug!("TLS handshake timed out");
            return;
        }
    };
    let Some(peer_id) = peer_identity(tls.get_ref().1) else {
        // The verifier already requires a SPIFFE ID; this is belt and braces.
        metrics.connection("hbone", "bad_certificate");
        return;
    };
    debug!(peer = %peer_id, "HBONE peer verified");
    let inbound = Arc::new(Inbound {
        pod: pod.clone(),
        local,
        local_id: id,
        peer,
        peer_id,
    });
    let svc = service_fn(move |req| {
        let inbound = inbound.clone();
        async move { Ok::<_, Infallible>(inbound.handle(req).await) }
    });
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .serve_connection(TokioIo::new(tls), svc)
        .await;
    if let Err(e) = served {
        debug!(error = %e, "HBONE connection ended with error");
    }
}

/// One verified HBONE connection into a local pod.
struct Inbound {
    pod: Arc<PodCtx>,
    local: Arc<Workload>,
    local_id: Identity,
    peer: SocketAddr,
    peer_id: Identity,
}

fn answer(status: StatusCode) -> Response<Empty<Bytes>> {
    Response::builder()
        .status(status)
        .body(Empty::new())
        .expect("static response parts are valid")
}

impl Inbound {
    fn authorize(&self, store: &Store, dst: SocketAddr) -> Decision {
        let local = store.workload_by_ip(dst.ip()).unwrap_or(&self.local);
        store.authorize(&Conn {
            src_ip: self.peer.ip(),
            src_identity: Some(&self.peer_id),
            dst: local,
            dst_ip: dst.ip(),
            dst_port: dst.port(),
        })
    }

    /// One CONNECT stream. Answers as Istio's HBONE does: 400 for a request
    /// that cannot be served here, 401 when policy denies, 503 when the app
    /// does not accept, 200 and the tunnel otherwise. Not CONNECT: 405.
    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Empty<Bytes>> {
        let pod = &self.pod;
        let metrics = &pod.shared.metrics;
        if req.method() != Method::CONNECT {
            metrics.connection("hbone", "not_connect");
            debug!(method = %req.method(), "HBONE request is not CONNECT");
            return answer(StatusCode::METHOD_NOT_ALLOWED);
        }
        let Some(dst) = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        else {
            metrics.connection("hbone", "bad_authority");
            debug!(uri = %req.uri(), "CONNECT authority is not ip:port");
            return answer(StatusCode::BAD_REQUEST);
        };
        if !pod.addresses.contains(&dst.ip()) || AGENT_PORTS.contains(&dst.port()) {
            metrics.connection("hbone", "wrong_destination");
            debug!(%dst, "CONNECT to an address that is not this pod's app");
            return answer(StatusCode::BAD_REQUEST);
        }
        let store = pod.shared.store();
        let src = Peer {
            addr: Some(self.peer),
            workload: store.workload_by_ip(self.peer.ip()).cloned(),
            identity: Some(self.peer_id.clone()),
        };
        let dst_peer = Peer {
            addr: Some(dst),
            workload: Some(self.local.clone()),
            identity: Some(self.local_id.clone()),
        };
        let rec = ConnRecord::new(
            metrics.clone(),
            "inbound",
            "destination",
            src,
            dst_peer,
            None,
            true,
        );
        if let Decision::Deny { reason, .. } = self.authorize(&store, dst) {
            metrics.connection("hbone", "denied");
            rec.close("DENY", Outcome::error(reason));
            return answer(StatusCode::UNAUTHORIZED);
        }
        let app = match connect_in_pod(pod, dst, true).await {
            Ok(s) => s,
            Err(e) => {
                metrics.connection("hbone", "connect_failed");
                rec.close("UF", Outcome::error(format!("connect to app: {e}")));
                return answer(StatusCode::SERVICE_UNAVAILABLE);
            }
        };
        metrics.connection("hbone", "forwarded");
        let on_upgrade = hyper::upgrade::on(&mut req);
        let this = self.clone();
        let span = info_span!("tunnel", %dst, peer = %self.peer_id);
        tokio::spawn(
            async move {
                let mut rec = rec;
                rec.open();
                let upgraded = match on_upgrade.await {
                    Ok(u) => u,
                    Err(e) => {
                        rec.close("-", Outcome::error(format!("upgrade: {e}")));
                        return;
                    }
                };
                let mut client = Counted::new(TokioIo::new(upgraded));
                let mut app = app;
                let store_rx = this.pod.shared.store.clone();
                let check = this.clone();
                let revoked = revoked_by_policy(store_rx, move |s| {
                    check.authorize(s, dst) == Decision::Allow
                });
                let end = splice(&mut client, &mut app, revoked).await;
                finish(rec, &client, end, &this.pod);
            }
            .instrument(span),
        );
        answer(StatusCode::OK)
    }
}

/// Closes the record of a spliced connection; `client` is the side the
/// connection came from.
pub(super) fn finish<S>(rec: ConnRecord, client: &Counted<S>, end: SpliceEnd, pod: &PodCtx) {
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
            pod.shared.metrics.connection("policy", "revoked");
            outcome.error = Some("closed: a policy change no longer allows this connection".into());
            "DENY"
        }
    };
    rec.close(flags, outcome);
}
