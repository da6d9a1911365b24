//! The waypoint's way to its backends: per request, one endpoint of the
//! chosen Service (round robin, set-aside endpoints skipped), reached over
//! HBONE with the waypoint's own identity (authority `podIP:targetPort`),
//! or as plain TCP when the endpoint is not in the mesh (TLS over it when
//! a DestinationRule originates TLS: `origination.rs`). HTTP connections
//! over those tunnels are pooled per endpoint by hyper's client, so a
//! keep-alive or HTTP/2 client is not pinned to one endpoint.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper::{Uri, body::Bytes, rt};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo},
};
use tracing::debug;

use super::{Ctx, origination::Origination};
use crate::{
    proxy::{Caller, Dialer, Tunnel, connect_from},
    sync::LockExt as _,
};

pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

/// HTTP/1.1 and HTTP/2 clients (the protocol the downstream spoke, so
/// that gRPC and its trailers stay HTTP/2 end to end).
pub struct Clients {
    pub http1: Client<Connector, Body>,
    pub http2: Client<Connector, Body>,
    ctx: std::sync::Weak<Ctx>,
    /// HTTP/1.1 clients that originate TLS, one per setting and name (so
    /// that their pooled connections are only reused for the same).
    originating: std::sync::Mutex<HashMap<Origination, Client<Connector, Body>>>,
}

impl Clients {
    pub fn new(ctx: std::sync::Weak<Ctx>) -> Self {
        let connector = Connector {
            ctx: ctx.clone(),
            origination: None,
        };
        Clients {
            http1: Client::builder(TokioExecutor::new()).build(connector.clone()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
            ctx,
            originating: Default::default(),
        }
    }

    /// The client that speaks TLS to endpoints as `origination` says.
    pub fn originating(&self, origination: &Origination) -> Client<Connector, Body> {
        let mut clients = self.originating.locked();
        // Settings the configuration no longer has would otherwise stay
        // forever: past a few dozen, start afresh (a request in flight
        // keeps its own client).
        if clients.len() >= MAX_ORIGINATING && !clients.contains_key(origination) {
            clients.clear();
        }
        clients
            .entry(origination.clone())
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new()).build(Connector {
                    ctx: self.ctx.clone(),
                    origination: Some(origination.clone()),
                })
            })
            .clone()
    }
}

/// How many TLS origination settings keep a pooling client.
const MAX_ORIGINATING: usize = 64;

/// Opens the transport for `http://podIP:port`: HBONE when the pod at that
/// address is in the mesh, plain TCP otherwise; over plain TCP, TLS when a
/// DestinationRule originates it.
#[derive(Clone)]
pub struct Connector {
    ctx: std::sync::Weak<Ctx>,
    origination: Option<Origination>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = Upstream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Upstream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let ctx = self.ctx.clone();
        let origination = self.origination.clone();
        Box::pin(async move {
            let ctx = ctx
                .upgrade()
                .ok_or_else(|| io::Error::other("waypoint is stopping"))?;
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::other(format!("upstream {uri} is not ip:port")))?;
            stream(&ctx, addr, origination.as_ref()).await
        })
    }
}

async fn open(ctx: &Ctx, addr: SocketAddr) -> io::Result<Upstream> {
    let store = ctx.store();
    let endpoint = store.workload_by_ip(addr.ip()).cloned();
    let Some(me) = ctx.me(&store) else {
        return Err(io::Error::other(
            "the waypoint's own pod is not in the store",
        ));
    };
    // At an ingress gateway, a Service address means the Service's
    // waypoint (`istio.io/ingress-use-waypoint`): HBONE to one of its pods,
    // the Service's address as the CONNECT authority.
    let via_waypoint = match store.service_by_vip(addr) {
        Some((svc, _)) if ctx.mode == super::Mode::Ingress => match store.ingress_waypoint(svc) {
            Some(Ok(wp)) if !wp.pods.is_empty() => {
                let n = ctx.picks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Some(wp.pods[(n % wp.pods.len() as u64) as usize].clone())
            }
            Some(_) => {
                return Err(io::Error::other(format!(
                    "{} asks for its waypoint, which cannot serve it",
                    svc.hostname()
                )));
            }
            None => None,
        },
        _ => None,
    };
    let via = via_waypoint.as_ref().map(|w| w.ips.first().copied());
    let endpoint = match via_waypoint.clone() {
        Some(w) => Some(w),
        None => endpoint,
    };
    match endpoint {
        // A waypoint pod is not captured, and always speaks HBONE.
        Some(wl) if wl.hbone || via_waypoint.is_some() => {
            let td = ctx.certs.trust_domain();
            let mut caller = Caller {
                addr: SocketAddr::new(me.ips.first().copied().unwrap_or(addr.ip()), 0),
                workload: &me,
                service: None,
                cluster: &ctx.cluster_id,
                service_identities: &[],
                // The request is written once the tunnel is open.
                first_bytes: Default::default(),
                app: None,
            };
            let dialer = Dialer {
                netns: None,
                certs: &ctx.certs,
            };
            debug!(%addr, "HBONE to endpoint");
            let tunnel = ctx
                .pool
                .connect(
                    dialer,
                    &me.identity(td),
                    &wl.identity(td),
                    via.flatten().unwrap_or(addr.ip()),
                    addr,
                    &mut caller,
                )
                .await
                .map_err(io::Error::other)?;
            Ok(Upstream::Hbone(Box::new(TokioIo::new(tunnel))))
        }
        // Not in the mesh (or not known): the waypoint is its client, as a
        // sidecar-less client would be.
        _ => Ok(Upstream::Plain(TokioIo::new(
            connect_from(None, addr).await?,
        ))),
    }
}

/// A transport to one endpoint.
pub enum Upstream {
    Hbone(Box<TokioIo<Tunnel>>),
    Plain(TokioIo<tokio::net::TcpStream>),
    /// TLS originated to an endpoint outside the mesh.
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>),
}

/// Requests an upstream connection has carried, shared by the requests
/// that go over it (DestinationRule `maxRequestsPerConnection`).
#[derive(Clone, Debug, Default)]
pub struct Served(Arc<std::sync::atomic::AtomicUsize>);

impl Served {
    /// Counts one more request; true once `max` have gone over it.
    pub fn count(&self, max: usize) -> bool {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 >= max
    }
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        Connected::new().extra(Served::default())
    }
}

impl rt::Read for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl rt::Write for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Hbone(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(t) => Pin::new(t.as_mut()).poll_flush(cx),
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens a stream to an endpoint (for requests, TCP traffic and
/// upgrades), with TLS over it when `origination` asks.
pub async fn stream(
    ctx: &Ctx,
    addr: SocketAddr,
    origination: Option<&Origination>,
) -> io::Result<Upstream> {
    match (origination, open(ctx, addr).await?) {
        (None, up) => Ok(up),
        (Some(o), Upstream::Plain(tcp)) => Ok(Upstream::Tls(Box::new(TokioIo::new(
            o.connect(tcp.into_inner(), addr).await?,
        )))),
        // A meshed endpoint is reached over mutual TLS already; TLS inside
        // the tunnel is not offered.
        (Some(_), _) => Err(io::Error::other(super::origination::TlsFailure {
            reason: "config",
            detail: format!(
                "{addr} is in the mesh: TLS origination applies to endpoints outside it"
            ),
        })),
    }
}
