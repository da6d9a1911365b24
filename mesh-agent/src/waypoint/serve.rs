//! The waypoint's listeners: HBONE on 15008 (TLS with the waypoint's
//! identity, a CONNECT for a destination bound to this waypoint, then the
//! tunnelled bytes as HTTP or TCP), and its admin, metrics and readiness
//! pages.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tracing::{Instrument as _, debug, info_span, warn};

use super::{Client, Ctx, balance, http, origination, upstream};
use crate::{
    proxy::{ConnRecord, Outcome, Peer, Security, hbone},
    state::{Decision, Waypoint, WaypointTarget},
};

/// How long the first bytes of a connection of unknown protocol are
/// waited for before it is taken as TCP (a server-first protocol sends
/// nothing until the server speaks).
const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);
/// A request's head (line and headers) must arrive in this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head the waypoint reads.
const MAX_HEAD: usize = 64 * 1024;

pub async fn connection(ctx: Arc<Ctx>, stream: TcpStream, peer: SocketAddr) {
    // Not held for the connection's life: each CONNECT reads the current one.
    let Some(id) = ctx.identity(&ctx.store()) else {
        ctx.metrics.connection("waypoint", "no_local_identity");
        warn!("the waypoint's own pod is not in the configuration; it has no identity yet");
        return;
    };
    let config = match ctx.certs.server_config(&id) {
        Ok(c) => c,
        Err(e) => {
            ctx.metrics.connection("waypoint", "no_local_identity");
            warn!(identity = %id, error = %e, "no certificate to accept HBONE with");
            return;
        }
    };
    let Some((tls, peer_id)) =
        hbone::accept(stream, config, &ctx.metrics, ctx.certs.trust_domain()).await
    else {
        return;
    };
    let client = Client {
        addr: peer,
        identity: Some(peer_id),
    };
    hbone::serve_connects(tls, move |req| connect(ctx.clone(), client.clone(), req)).await;
}

/// One CONNECT: 405 when it is not one, 400 for an authority that is not
/// `ip:port` or not bound to this waypoint, 503 while the waypoint has no
/// Gateway; else 200 and the tunnel is served.
async fn connect(ctx: Arc<Ctx>, client: Client, req: hbone::Connect) {
    let m = &ctx.metrics;
    if req.head.method != Method::CONNECT {
        m.connection("waypoint", "not_connect");
        return req.refuse(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(dst) = req
        .head
        .uri
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        m.connection("waypoint", "bad_authority");
        return req.refuse(StatusCode::BAD_REQUEST);
    };
    let store = ctx.store();
    let Some(wp) = ctx.waypoint(&store) else {
        m.connection("waypoint", "no_gateway");
        warn!(
            "this pod's Gateway (label gateway.networking.k8s.io/gateway-name) is not a waypoint in the configuration"
        );
        return req.refuse(StatusCode::SERVICE_UNAVAILABLE);
    };
    let Some(target) = store.waypoint_target(&wp.namespace, &wp.name, dst) else {
        m.connection("waypoint", "not_bound");
        debug!(%dst, waypoint = %wp.key(), "CONNECT to a destination not bound to this waypoint");
        return req.refuse(StatusCode::BAD_REQUEST);
    };
    m.connection("waypoint", "accepted");
    let io = match req.open(hbone::answer(StatusCode::OK)) {
        Ok(io) => io,
        Err(e) => return debug!(error = %e, "the HBONE peer left before its answer"),
    };
    let peer = client.identity.as_ref().map(ToString::to_string);
    let span = info_span!("tunnel", %dst, peer = peer.as_deref().unwrap_or("-"));
    tunnel(ctx, client, wp, target, dst, io)
        .instrument(span)
        .await;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http,
    Tcp,
    /// Not declared: look at the first bytes.
    Unknown,
}

/// The Service port's `appProtocol`, else its name's prefix (Istio's
/// protocol selection).
fn declared(target: &WaypointTarget) -> Protocol {
    let WaypointTarget::Service(_, port) = target else {
        return Protocol::Unknown;
    };
    let by_name = |p: &str| {
        let p = p.to_ascii_lowercase();
        if ["http", "http2", "grpc", "grpc-web", "kubernetes.io/h2c"].contains(&p.as_str()) {
            Protocol::Http
        } else if ["tcp", "tls", "mongo", "mysql", "redis"].contains(&p.as_str()) {
            Protocol::Tcp
        } else {
            Protocol::Unknown
        }
    };
    if let Some(app) = &port.app_protocol {
        return by_name(app);
    }
    let prefix = port.name.split('-').next().unwrap_or_default();
    by_name(prefix)
}

/// Whether the first bytes are an HTTP/1.x request line or the HTTP/2
/// preface; None while too few bytes have come to tell.
fn looks_like_http(buf: &[u8]) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    if PREFACE.starts_with(buf) {
        return (buf.len() >= PREFACE.len()).then_some(true).or(None);
    }
    if buf.starts_with(PREFACE) {
        return Some(true);
    }
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() {
        return if method_len > 16 { Some(false) } else { None };
    }
    Some(method_len > 0 && buf[method_len] == b' ')
}

async fn tunnel(
    ctx: Arc<Ctx>,
    client: Client,
    wp: Arc<Waypoint>,
    target: WaypointTarget,
    dst: SocketAddr,
    mut io: hbone::H2Stream,
) {
    let mut seen = Vec::new();
    let protocol = match declared(&target) {
        Protocol::Unknown => {
            let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
            let mut buf = [0u8; 64];
            loop {
                let read = tokio::time::timeout_at(deadline, io.read(&mut buf)).await;
                match read {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                    Err(_) => break Protocol::Tcp,
                }
                match looks_like_http(&seen) {
                    Some(true) => break Protocol::Http,
                    Some(false) => break Protocol::Tcp,
                    None => {}
                }
            }
        }
        p => p,
    };
    let io = Prefixed {
        prefix: Bytes::from(seen),
        inner: io,
    };
    match protocol {
        Protocol::Http => {
            let handler_metrics = ctx.metrics.clone();
            let handler = Arc::new(http::Handler {
                ctx,
                client,
                waypoint: wp,
                role: http::Role::Waypoint(target),
                dst,
            });
            serve_http(handler, io, &handler_metrics, "waypoint").await;
        }
        _ => tcp(ctx, client, wp, target, dst, io).await,
    }
}

/// Serves HTTP/1 and HTTP/2 on one connection with `handler`; a
/// connection that ends in error (malformed HTTP/1 answered 400 or 431 by
/// hyper, an HTTP/2 protocol error, a client gone) is counted under
/// `component`.
pub async fn serve_http<I>(
    handler: Arc<http::Handler>,
    io: I,
    metrics: &crate::metrics::Metrics,
    component: &'static str,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let h = handler.clone();
        async move { Ok::<_, Infallible>(h.handle(req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // Larger request heads are answered 431.
        .max_buf_size(MAX_HEAD);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_HEAD as u32)
        .max_concurrent_streams(1024);
    let served = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
    if let Err(e) = served {
        metrics.connection(component, "http_error");
        debug!(error = %e, "HTTP connection ended with error");
    }
}

/// Traffic that is not HTTP: L4 policy at the waypoint, then a TCP stream
/// to one endpoint.
async fn tcp(
    ctx: Arc<Ctx>,
    client: Client,
    wp: Arc<Waypoint>,
    target: WaypointTarget,
    dst: SocketAddr,
    io: Prefixed<hbone::H2Stream>,
) {
    let store = ctx.store();
    let service = match &target {
        WaypointTarget::Service(s, _) => Some(s.clone()),
        WaypointTarget::Workload(..) => None,
    };
    let src = Peer {
        addr: Some(client.addr),
        workload: store.workload_by_ip(client.addr.ip()).cloned(),
        identity: client.identity.clone(),
    };
    let mut rec = ConnRecord::new(
        ctx.metrics.clone(),
        "waypoint",
        "waypoint",
        src,
        Peer {
            addr: Some(dst),
            ..Peer::default()
        },
        service.as_deref(),
        Security::MutualTls,
    );
    let attrs = crate::state::Attrs {
        src_ip: client.addr.ip(),
        src_identity: client.identity.as_ref(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
        request: None,
    };
    if let (Decision::Deny { reason, .. }, _) =
        store.authorize_at_waypoint(&wp, service.as_deref(), &attrs)
    {
        ctx.metrics.connection("waypoint", "denied");
        rec.close("DENY", Outcome::error(reason));
        return;
    }
    let choice = balance::Choice::from(target.clone());
    let keys = balance::Keys {
        headers: None,
        client: Some(client.addr.ip()),
    };
    let endpoints = balance::endpoints(&ctx, &store, &choice, keys);
    let endpoints = balance::or_resolved(&store, &choice, endpoints).await;
    let origination = super::origination_for(&store, &target);
    // Not held while the stream lasts.
    drop(store);
    let mut last = String::from("no endpoint");
    for ep in endpoints.iter().take(3) {
        match upstream::stream(&ctx, ep.addr, origination.as_ref()).await {
            Ok(up) => {
                rec.set_destination(
                    Peer {
                        addr: Some(ep.addr),
                        identity: ep
                            .workload
                            .as_ref()
                            .map(|w| w.identity(ctx.certs.trust_domain())),
                        workload: ep.workload.clone(),
                    },
                    service.as_deref(),
                    Security::MutualTls,
                );
                let mut client_io = rec.counted(io);
                let mut up = TokioIo::new(up);
                let r = crate::proxy::relay(&mut client_io, &mut up).await;
                let outcome = Outcome {
                    request_bytes: client_io.read,
                    response_bytes: client_io.written,
                    error: r.err().map(|e| e.to_string()),
                };
                rec.close("-", outcome);
                return;
            }
            Err(e) => {
                if let Some(f) = origination::TlsFailure::find(&e) {
                    ctx.count_tls_failure(service.as_deref(), f);
                } else {
                    ctx.balancer.mark_down(ep.addr);
                }
                last = e.to_string();
            }
        }
    }
    let flags = if endpoints.is_empty() { "UH" } else { "UF" };
    rec.close(flags, Outcome::error(last));
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub struct Admin {
    pub ctx: Arc<Ctx>,
    pub registry: Registry,
}

/// `/healthz/ready` (the configuration is read, this pod has its identity
/// and its Gateway is a waypoint), `/metrics`, and on the admin address
/// `/config_dump`.
pub async fn admin(listener: TcpListener, admin: Arc<Admin>, full: bool) {
    let gate = crate::limit::Gate::new(crate::limit::CONTROL, admin.ctx.metrics.clone(), "admin");
    loop {
        let (stream, _, admitted) = gate.accept(&listener).await;
        let admin = admin.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let svc = service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin_page(&admin, full, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(crate::admin::HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(crate::admin::MAX_CONNECTION_AGE, conn).await;
        });
    }
}

fn admin_page(admin: &Admin, full: bool, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let ctx = &admin.ctx;
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    let store = ctx.store();
    match req.uri().path() {
        "/healthz/ready" => {
            let why = if store.generation == 0 {
                Some("configuration not loaded yet")
            } else if ctx.me(&store).is_none() {
                Some("this pod is not in the configuration")
            } else if ctx.mode == super::Mode::Waypoint && ctx.waypoint(&store).is_none() {
                Some("this pod's Gateway is not a waypoint in the configuration")
            } else if ctx.mode == super::Mode::Ingress && ctx.ingress(&store).is_none() {
                Some("this pod's Gateway is not an ingress gateway in the configuration")
            } else if ctx
                .identity(&store)
                .is_some_and(|id| ctx.certs.certificate(&id).is_err())
            {
                Some("no certificate yet for this pod's identity")
            } else {
                None
            };
            match why {
                Some(why) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                None => reply(StatusCode::OK, "ready\n".into()),
            }
        }
        "/metrics" | "/stats/prometheus" => {
            reply(StatusCode::OK, crate::metrics::encode(&admin.registry))
        }
        "/config_dump" if full => {
            let dump = serde_json::json!({
                "pod": format!("{}/{}", ctx.pod.0, ctx.pod.1),
                "identity": ctx.identity(&store).map(|i| i.to_string()),
                "waypoint": ctx.waypoint(&store).map(|w| w.key()),
                "ingress_gateway": ctx.ingress(&store).map(|g| g.key()),
                "config": store.dump(),
                "certificates": ctx.certs.dump(),
                "endpoints_down": ctx.balancer.down(),
                "endpoints_ejected": ctx.outliers.dump(),
            });
            reply(
                StatusCode::OK,
                serde_json::to_string_pretty(&dump).expect("serializable") + "\n",
            )
        }
        path => reply(StatusCode::NOT_FOUND, format!("no page {path}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_http;

    #[test]
    fn sniffing() {
        assert_eq!(looks_like_http(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(looks_like_http(b"POST"), None);
        assert_eq!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(true));
        assert_eq!(looks_like_http(b"PRI * HT"), None);
        assert_eq!(looks_like_http(b"\x16\x03\x01\x02"), Some(false));
        assert_eq!(looks_like_http(b"hello world"), Some(false));
        assert_eq!(looks_like_http(b"SSH-2.0"), Some(false));
    }
}
