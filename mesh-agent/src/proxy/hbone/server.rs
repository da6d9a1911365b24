//! The server side of HBONE on a pod's 15008: TLS termination, the peer's
//! identity, the CONNECT checks, authorization and the splice to the app.

use std::{io, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use hyper::{Method, Response, StatusCode, http::request::Parts};
use mesh_common::AGENT_PORTS;
use tokio::net::TcpStream;
use tracing::{Instrument as _, debug, debug_span, info, warn};

use super::headers::{Baggage, baggage, traceparent};
use super::{
    ACCEPT_HANDSHAKE_TIMEOUT, ANSWER_HOLD, Buffered, CONN_WINDOW, H2Stream, KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT, MAX_FRAME, MAX_HEADER_LIST, SERVER_MAX_STREAMS, STREAM_WINDOW, keepalive,
};
use crate::metrics::HeaderLabels;
use crate::proxy::{
    PodCtx, WhenBulk,
    conn::{Outcome, Security},
    deliver::{self, Authenticated, Refused},
    finish, revoked_by_policy, splice,
};
use crate::waypoint::trace::TraceParent;
use crate::{
    identity::{Identity, instant_of, peer_identity, peer_valid_until},
    shards::Place,
    state::{Decision, Store},
};

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
    // Not held for the connection's life: each CONNECT reads the current one.
    let Some(local) = pod.workload(&pod.shared.store()) else {
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
    let local_addr = stream.local_addr().ok();
    let trust_domain = pod.shared.certs.trust_domain();
    let Some((mut tls, peer_id)) = accept(stream, config, metrics, trust_domain).await else {
        return;
    };
    // From a pod of this node: this side runs on the shard of the client's
    // side until the connection proves bulk (see `crate::shards`).
    let place = pod.shared.local_pods.contains(peer.ip()).then(|| {
        let place = Arc::new(Place::new(crate::shards::current()));
        tls.get_mut().0.move_when_bulk(place.clone());
        place
    });
    let inbound = Arc::new(Inbound {
        auth: Authenticated {
            pod: pod.clone(),
            local,
            local_id: id,
            peer,
            peer_id,
        },
        local_addr,
        place,
    });
    serve_connects(tls, move |connect| inbound.clone().handle(connect)).await;
}

/// The TLS side of an accepted HBONE connection, read through a buffer.
pub type TlsStream = tokio_rustls::server::TlsStream<Buffered>;

/// Terminates TLS on an accepted connection and returns the peer's
/// verified identity; a failure is counted by its reason.
pub async fn accept(
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
    metrics: &crate::metrics::Metrics,
    trust_domain: &str,
) -> Option<(TlsStream, Identity)> {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(Buffered::new(stream));
    let mut tls = match tokio::time::timeout(ACCEPT_HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = tls_failure(&e);
            metrics.connection("hbone", reason);
            debug!(reason, error = %e, "TLS handshake refused");
            return None;
        }
        Err(_) => {
            metrics.connection("hbone", "handshake_timeout");
            debug!("TLS handshake timed out");
            return None;
        }
    };
    let Some(peer_id) = peer_identity(tls.get_ref().1, trust_domain) else {
        // The verifier already requires a SPIFFE ID; this is belt and braces.
        metrics.connection("hbone", "bad_certificate");
        return None;
    };
    debug!(peer = %peer_id, "HBONE peer verified");
    let (tcp, conn) = tls.get_mut();
    super::io::verified(tcp, conn);
    Some((tls, peer_id))
}

/// One request on a verified HBONE connection (a CONNECT, or whatever
/// else a peer sends), to be answered once.
pub struct Connect {
    pub head: Parts,
    body: RecvStream,
    respond: SendResponse<Bytes>,
}

impl Connect {
    /// Answers with `status` and nothing more: a refusal.
    pub fn refuse(mut self, status: StatusCode) {
        if let Err(e) = self.respond.send_response(answer(status), true) {
            debug!(error = %e, "the HBONE peer left before its answer");
        }
    }

    /// What the peer sends before it is answered, until `n` bytes or the
    /// stream's end (tests play a server that waits for it).
    #[cfg(test)]
    pub(super) async fn read_unanswered(&mut self, n: usize) -> Bytes {
        let mut got = Vec::new();
        while got.len() < n {
            let Some(Ok(chunk)) = self.body.data().await else {
                break;
            };
            let _ = self.body.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        got.into()
    }

    /// Answers with `resp` (a 200) and returns the tunnel it opens.
    pub fn open(mut self, resp: Response<()>) -> Result<H2Stream, h2::Error> {
        let send = self.respond.send_response(resp, false)?;
        Ok(H2Stream::new(send, self.body))
    }

    /// As [`Connect::open`]; when the caller's first bytes came with the
    /// CONNECT, the 200 is held to leave with the first bytes written back
    /// ([`H2Stream::answer_held`], at most [`ANSWER_HOLD`]). A caller that
    /// sent nothing yet may be waiting for the answer to send: answered now.
    pub fn open_held(mut self, resp: Response<()>) -> Result<H2Stream, h2::Error> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match self.body.poll_data(&mut cx) {
            std::task::Poll::Ready(Some(Ok(first))) => Ok(H2Stream::answer_held(
                self.respond,
                resp,
                self.body,
                first,
                ANSWER_HOLD,
            )),
            std::task::Poll::Ready(Some(Err(e))) => Err(e),
            _ => self.open(resp),
        }
    }
}

/// Serves HTTP/2 on a verified HBONE connection; `handle` runs in its own
/// task for each request, and answers it.
pub async fn serve_connects<F, Fut>(tls: TlsStream, handle: F)
where
    F: Fn(Connect) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    serve_streams(tls, SERVER_MAX_STREAMS, handle).await;
}

/// [`serve_connects`] allowing `max_streams` at once on the connection
/// (tests play peers with other limits).
pub(super) async fn serve_streams<F, Fut>(tls: TlsStream, max_streams: u32, handle: F)
where
    F: Fn(Connect) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let peer_expiry = peer_valid_until(tls.get_ref().1).map(instant_of);
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(max_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(ACCEPT_HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!(error = %e, "HBONE peer did not start HTTP/2");
            return;
        }
        Err(_) => {
            debug!("HBONE peer did not start HTTP/2 in time");
            return;
        }
    };
    let pings = conn
        .ping_pong()
        .expect("a new connection's pings are not taken yet");
    let alive = keepalive(pings, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT);
    tokio::pin!(alive);
    let drain = crate::drain::started();
    tokio::pin!(drain);
    let expiry = at_most_until(peer_expiry);
    tokio::pin!(expiry);
    let mut closing = false;
    loop {
        // Draining: GOAWAY, so that the peer opens its next streams
        // elsewhere (the next agent), and the connection closes once its
        // streams end. The same once the peer's certificate expires: the
        // handshake proved it valid then, not for the connection's whole
        // life, so no stream opens on it after that (the streams already
        // open go on). Accepting goes on meanwhile: it is what drives the
        // connection, until it has closed.
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let (head, body) = req.into_parts();
                    let connect = Connect { head, body, respond };
                    crate::shards::spawn_task(handle(connect).in_current_span());
                }
                Some(Err(e)) => {
                    debug!(error = %e, "HBONE connection ended with error");
                    return;
                }
                None => return,
            },
            () = &mut drain, if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            () = &mut expiry, if !closing => {
                info!("the HBONE peer's certificate has expired: no new streams on its connection");
                closing = true;
                conn.graceful_shutdown();
            }
            () = &mut alive => {
                debug!("HBONE peer did not answer a ping in time: connection closed");
                return;
            }
        }
    }
}

/// Waits until `t`, or forever when there is none.
async fn at_most_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One verified HBONE connection into a local pod.
struct Inbound {
    /// The pod, and the peer as its certificate proves it.
    auth: Authenticated,
    /// The address the HBONE connection reached (port 15008).
    local_addr: Option<SocketAddr>,
    /// Where the connection runs, if it may move (from a pod of this node):
    /// the splices of its bulk streams follow it.
    place: Option<Arc<Place>>,
}

impl std::ops::Deref for Inbound {
    type Target = Authenticated;

    fn deref(&self) -> &Authenticated {
        &self.auth
    }
}

/// Where a CONNECT asks to go: its authority, which must be `ip:port`
/// (Istio's HBONE names no host names).
pub fn connect_destination(uri: &hyper::Uri) -> Option<SocketAddr> {
    uri.authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
}

/// The `host` parameter of a `forwarded` header (RFC 7239), lower case.
pub fn forwarded_host(headers: &hyper::HeaderMap) -> Option<String> {
    let v = headers.get("forwarded")?.to_str().ok()?;
    v.split([';', ','])
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
        .map(|(_, host)| host.trim().trim_matches('"').to_ascii_lowercase())
        .filter(|h| !h.is_empty())
}

/// What a CONNECT asks for: an address, or (as ztunnel accepts) a Service
/// hostname and its port, which the server resolves to itself.
#[derive(Debug, PartialEq, Eq)]
pub enum Authority {
    Addr(SocketAddr),
    Host(String, u16),
}

pub fn connect_authority(uri: &hyper::Uri) -> Option<Authority> {
    if let Some(addr) = connect_destination(uri) {
        return Some(Authority::Addr(addr));
    }
    let a = uri.authority()?;
    let port = a.port_u16()?;
    let host = a.host();
    // A DNS name: letters, digits, '-' and '.', not an address in brackets.
    let dns = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    dns.then(|| Authority::Host(host.to_ascii_lowercase(), port))
}

/// The metadata a CONNECT carries about its caller; a header that does
/// not parse is counted and ignored.
#[derive(Debug, Default)]
struct CallerMeta {
    baggage: Baggage,
    traceparent: Option<TraceParent>,
}

fn caller_meta(headers: &hyper::HeaderMap, metrics: &crate::metrics::Metrics) -> CallerMeta {
    let bad = |header| {
        metrics
            .hbone_bad_headers
            .get_or_create(&HeaderLabels { header })
            .inc();
        debug!(header, "ignoring a CONNECT header that does not parse");
    };
    let mut meta = CallerMeta::default();
    // W3C allows baggage in several headers; each is read on its own.
    for value in headers.get_all("baggage") {
        match Baggage::parse(value.as_bytes()) {
            Some(b) => {
                let m = &mut meta.baggage;
                m.cluster = b.cluster.or(m.cluster.take());
                m.namespace = b.namespace.or(m.namespace.take());
                m.workload = b.workload.or(m.workload.take());
                m.service = b.service.or(m.service.take());
                m.version = b.version.or(m.version.take());
            }
            None => bad("baggage"),
        }
    }
    if let Some(value) = headers.get("traceparent") {
        meta.traceparent = traceparent(value.as_bytes());
        if meta.traceparent.is_none() {
            bad("traceparent");
        }
    }
    meta
}

pub fn answer(status: StatusCode) -> Response<()> {
    Response::builder()
        .status(status)
        .body(())
        .expect("static response parts are valid")
}

impl Inbound {
    /// The pod address and app port a CONNECT authority names here: an
    /// address as given, a Service hostname through the Service's port to
    /// this pod's target port. None: not this pod.
    fn resolve(&self, store: &Store, authority: Authority) -> Option<SocketAddr> {
        match authority {
            Authority::Addr(addr) => Some(addr),
            Authority::Host(host, port) => {
                let svc = store.service_by_hostname(&host)?;
                let sp = svc.ports.iter().find(|p| p.port == port)?;
                store
                    .endpoints(svc, sp)
                    .into_iter()
                    .find(|ep| {
                        ep.workload.as_ref().is_some_and(|w| {
                            w.namespace == self.local.namespace && w.name == self.local.name
                        })
                    })
                    .map(|ep| ep.addr)
            }
        }
    }

    /// One CONNECT stream. Answers as Istio's HBONE does: 400 for a request
    /// that cannot be served here (not CONNECT, an authority that is not
    /// this pod), 503 for an agent port, 401 when policy denies, 503 when
    /// the app does not accept, 200 and the tunnel otherwise.
    async fn handle(self: Arc<Self>, connect: Connect) {
        let req = &connect.head;
        let pod = &self.pod;
        let metrics = &pod.shared.metrics;
        if req.method != Method::CONNECT {
            metrics.connection("hbone", "not_connect");
            debug!(method = %req.method, "HBONE request is not CONNECT");
            return connect.refuse(StatusCode::BAD_REQUEST);
        }
        let Some(authority) = connect_authority(&req.uri) else {
            metrics.connection("hbone", "bad_authority");
            debug!(uri = %&req.uri, "CONNECT authority is neither ip:port nor host:port");
            return connect.refuse(StatusCode::BAD_REQUEST);
        };
        let store = pod.shared.store();
        let Some(dst) = self
            .resolve(&store, authority)
            .filter(|d| pod.addresses.contains(&d.ip()))
        else {
            metrics.connection("hbone", "wrong_destination");
            debug!(uri = %&req.uri, "CONNECT to something that is not this pod");
            return connect.refuse(StatusCode::BAD_REQUEST);
        };
        if AGENT_PORTS.contains(&dst.port()) {
            metrics.connection("hbone", "wrong_destination");
            debug!(%dst, "CONNECT to one of the agent's own ports");
            return connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
        let meta = caller_meta(&req.headers, metrics);
        // The Service the client addressed, as its agent tells it (only one
        // that selects this pod: the header does not relabel other traffic).
        let service = forwarded_host(&req.headers)
            .and_then(|h| store.service_by_hostname(&h))
            .filter(|s| store.serves(s, &self.local))
            .cloned();
        let admitted = self
            .admit(
                store,
                deliver::Request {
                    dst,
                    service: service.as_deref(),
                    tunnel: self.local_addr,
                    security: Security::MutualTls,
                    counter: "hbone",
                },
            )
            .await;
        let (rec, app) = match admitted {
            Ok(a) => a,
            Err(Refused::Denied(_)) => return connect.refuse(StatusCode::UNAUTHORIZED),
            Err(Refused::ConnectFailed(_)) => {
                return connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
            }
        };
        // The caller's cluster and trace join this tunnel's log lines to
        // the caller's (its debug lines: see `proxy::accept_loop`).
        let span = debug_span!(
            "tunnel",
            %dst,
            peer = %self.peer_id,
            peer_cluster = meta.baggage.cluster.as_deref().unwrap_or("-"),
            traceparent = %meta.traceparent.map_or_else(|| "-".to_owned(), |t| t.to_string()),
        );
        let when_bulk = match &self.place {
            Some(place) => WhenBulk::Follow(place.clone()),
            None => WhenBulk::Stay,
        };
        let mut ok = answer(StatusCode::OK);
        // As ztunnel answers: who the caller reached.
        if let Ok(v) = baggage(&pod.shared.cluster_id, &self.local).parse() {
            ok.headers_mut().insert("baggage", v);
        }
        let mut rec = rec;
        rec.open();
        let tunnel = match connect.open_held(ok) {
            Ok(t) => t,
            Err(e) => {
                rec.close("-", Outcome::error(format!("answering CONNECT: {e}")));
                return;
            }
        };
        async move {
            // On the tunnel's span, with the caller's traceparent (the
            // access log line stands apart from spans, as ztunnel's).
            debug!("HBONE tunnel open");
            let mut client = rec.counted(tunnel);
            let mut app = app;
            let store_rx = self.pod.shared.store.clone();
            let check = self.clone();
            let revoked = revoked_by_policy(store_rx, move |s| {
                check.authorize(s, dst) == Decision::Allow
            });
            let end = splice(&mut client, &mut app, revoked, when_bulk).await;
            finish(rec, &client, end, &self.pod);
        }
        .instrument(span)
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(s: &str) -> Option<Authority> {
        connect_authority(&s.parse::<hyper::Uri>().ok()?)
    }

    #[test]
    fn authorities_are_an_address_or_a_hostname_with_a_port() {
        assert_eq!(
            authority("10.0.0.1:8080"),
            Some(Authority::Addr("10.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!(
            authority("[fd00::1]:80"),
            Some(Authority::Addr("[fd00::1]:80".parse().unwrap()))
        );
        assert_eq!(
            authority("Reviews.Shop.svc.cluster.local:9080"),
            Some(Authority::Host(
                "reviews.shop.svc.cluster.local".into(),
                9080
            ))
        );
        for bad in ["reviews.shop.svc.cluster.local", "nonsense", "a_b.svc:80"] {
            assert_eq!(authority(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_forwarded_host_is_read_whatever_the_order_and_quoting() {
        let host = |v: &str| {
            let mut h = hyper::HeaderMap::new();
            h.insert("forwarded", v.parse().unwrap());
            forwarded_host(&h)
        };
        assert_eq!(
            host("for=\"10.0.0.1:5000\";host=Reviews.shop.svc.cluster.local"),
            Some("reviews.shop.svc.cluster.local".into())
        );
        assert_eq!(
            host("host=\"a.b.svc.cluster.local\"; for=\"[fd00::1]:1\""),
            Some("a.b.svc.cluster.local".into())
        );
        assert_eq!(host("for=\"10.0.0.1:5000\""), None);
        assert_eq!(forwarded_host(&hyper::HeaderMap::new()), None);
    }
}
