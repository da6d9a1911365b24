//! `mesh-agent gateway`: the listeners of an ingress Gateway. Each
//! listener port is bound while the Gateway has it; an HTTPS port reads the
//! ClientHello first, picks the certificate by SNI from the current
//! configuration (so a rewritten Secret is served from the next handshake
//! on, without a restart) and refuses an unknown name, a missing one or a
//! malformed hello with a TLS alert, counted. The requests are then served
//! as the waypoint serves them (authorization, routing, filters, upstream
//! over HBONE with the gateway's own identity, metrics).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{Client, Ctx, http, serve};
use crate::state::{IngressGateway, ListenerProtocol, TlsRefusal};

/// The ClientHello must arrive in this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest ClientHello read (a TLS record is at most 16 KiB).
const MAX_HELLO: usize = 16 * 1024 + 5;
/// A listener port that could not be bound is tried again after this.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// TLS alert descriptions sent on a refusal.
const ALERT_HANDSHAKE_FAILURE: u8 = 40;
const ALERT_DECODE_ERROR: u8 = 50;
const ALERT_INTERNAL_ERROR: u8 = 80;
const ALERT_UNRECOGNIZED_NAME: u8 = 112;

/// Keeps one accept loop per listener port of this pod's ingress Gateway,
/// on `ip`: ports added are bound, ports removed (or whose protocol
/// changed) closed.
pub async fn supervise(ctx: Arc<Ctx>, ip: IpAddr) {
    let mut store = ctx.store.clone();
    let mut bound: BTreeMap<u16, (ListenerProtocol, JoinHandle<()>)> = BTreeMap::new();
    loop {
        let snapshot = store.borrow_and_update().clone();
        let ports = ctx
            .ingress(&snapshot)
            .map(|g| g.ports())
            .unwrap_or_default();
        drop(snapshot);
        bound.retain(|port, (protocol, task)| {
            let keep = ports.get(port) == Some(protocol);
            if !keep {
                task.abort();
                info!(port, "ingress listener closed");
            }
            keep
        });
        let mut failed = false;
        for (port, protocol) in ports {
            if bound.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(ip, port);
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    info!(%addr, ?protocol, "ingress listener open");
                    let task = tokio::spawn(accept(l, ctx.clone(), protocol));
                    bound.insert(port, (protocol, task));
                }
                Err(e) => {
                    failed = true;
                    ctx.metrics.connection("ingress", "bind_failed");
                    warn!(%addr, error = %e, "cannot bind an ingress listener; retried");
                }
            }
        }
        tokio::select! {
            changed = store.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(BIND_RETRY), if failed => {}
        }
    }
}

async fn accept(l: TcpListener, ctx: Arc<Ctx>, protocol: ListenerProtocol) {
    let gate = crate::limit::Gate::new(crate::limit::HBONE, ctx.metrics.clone(), "ingress");
    loop {
        let (stream, peer, admitted) = gate.accept(&l).await;
        let _ = stream.set_nodelay(true);
        let span = info_span!("ingress", client = %peer);
        let ctx = ctx.clone();
        tokio::spawn(
            async move {
                connection(ctx, stream, peer, protocol).await;
                drop(admitted);
            }
            .instrument(span),
        );
    }
}

async fn connection(
    ctx: Arc<Ctx>,
    stream: TcpStream,
    peer: SocketAddr,
    protocol: ListenerProtocol,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let Some(gw) = ctx.ingress(&ctx.store()) else {
        ctx.metrics.connection("ingress", "no_gateway");
        return;
    };
    let handler = |listener: Option<String>| {
        Arc::new(http::Handler {
            ctx: ctx.clone(),
            client: Client {
                addr: peer,
                identity: None,
            },
            waypoint: gw.anchor.clone(),
            role: http::Role::Ingress(gw.clone(), protocol, listener),
            dst: local,
        })
    };
    match protocol {
        ListenerProtocol::Http => {
            serve::serve_http(handler(None), stream, &ctx.metrics, "ingress").await;
        }
        ListenerProtocol::Https => {
            let Some((listener, cert)) = hello(&ctx, &gw, &stream, local.port()).await else {
                return;
            };
            let mut config = ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("the default provider supports the default versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(cert)));
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let accept = tokio_rustls::TlsAcceptor::from(Arc::new(config)).accept(stream);
            let tls = match tokio::time::timeout(HELLO_TIMEOUT, accept).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    ctx.metrics.connection("ingress", "tls_failed");
                    debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    ctx.metrics.connection("ingress", "tls_timeout");
                    return;
                }
            };
            ctx.metrics.connection("ingress", "tls_accepted");
            // Requests on this connection must be for the listener its SNI
            // chose (421 otherwise): its certificate is the one they saw.
            serve::serve_http(handler(Some(listener)), tls, &ctx.metrics, "ingress").await;
        }
    }
}

/// Reads (without consuming) the ClientHello and picks the listener and
/// certificate for its SNI; on a refusal, sends the alert, counts the
/// reason and gives None.
async fn hello(
    ctx: &Ctx,
    gw: &IngressGateway,
    stream: &TcpStream,
    port: u16,
) -> Option<(String, Arc<CertifiedKey>)> {
    let mut buf = vec![0u8; MAX_HELLO];
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let mut pause = Duration::from_millis(2);
    let parsed = loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => n,
            Err(_) => {
                ctx.metrics.connection("ingress", "tls_timeout");
                return None;
            }
        };
        match sni_of(&buf[..n]) {
            Hello::Partial if n < buf.len() => {
                // More is on its way: wait for it rather than spin (a
                // client trickling bytes costs a peek per pause).
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Hello::Partial | Hello::Malformed => break Err(()),
            Hello::Sni(sni) => break Ok(sni),
        }
    };
    let refusal = match parsed {
        Err(()) => {
            ctx.metrics.connection("ingress", "tls_malformed");
            debug!("not a TLS ClientHello");
            alert(stream, ALERT_DECODE_ERROR).await;
            return None;
        }
        Ok(sni) => match gw.tls_listener(port, sni.as_deref()) {
            Ok((l, c)) => return Some((l.name.clone(), c)),
            Err(r) => {
                debug!(
                    sni = sni.as_deref().unwrap_or("-"),
                    reason = r.reason(),
                    "handshake refused"
                );
                r
            }
        },
    };
    ctx.metrics.connection("ingress", refusal.reason());
    let code = match &refusal {
        TlsRefusal::NoSni => ALERT_HANDSHAKE_FAILURE,
        TlsRefusal::UnknownSni => ALERT_UNRECOGNIZED_NAME,
        TlsRefusal::NoCertificate(why) => {
            warn!(port, %why, "an HTTPS listener has no certificate");
            ALERT_INTERNAL_ERROR
        }
    };
    alert(stream, code).await;
    None
}

/// What the first bytes of a connection say of its ClientHello.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Hello {
    /// Too few bytes yet.
    Partial,
    Malformed,
    /// A complete ClientHello, and its SNI if it has one.
    Sni(Option<String>),
}

pub(super) fn sni_of(bytes: &[u8]) -> Hello {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = bytes;
    while !rd.is_empty() {
        if acceptor.read_tls(&mut rd).is_err() {
            return Hello::Malformed;
        }
    }
    match acceptor.accept() {
        Ok(None) => Hello::Partial,
        Ok(Some(accepted)) => Hello::Sni(accepted.client_hello().server_name().map(str::to_owned)),
        Err(_) => Hello::Malformed,
    }
}

/// Writes a fatal TLS alert record and closes the connection. What the
/// client sent is read away first: closing with unread bytes would reset
/// the connection, and the client could lose the alert.
async fn alert(stream: &TcpStream, description: u8) {
    let record = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description];
    // The stream is only borrowed: write through a duplicate handle.
    let Ok(mut s) = stream_clone(stream) else {
        return;
    };
    let _ = s.write_all(&record).await;
    let _ = s.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

fn stream_clone(stream: &TcpStream) -> std::io::Result<TcpStream> {
    use std::os::fd::{AsFd as _, BorrowedFd};
    let fd: BorrowedFd<'_> = stream.as_fd();
    let owned = fd.try_clone_to_owned()?;
    let std = std::net::TcpStream::from(owned);
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

/// The certificate chosen for this handshake.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::{Hello, sni_of};

    #[test]
    fn the_sni_is_read_from_a_client_hello() {
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let config = std::sync::Arc::new(config);
        let hello = |name: &str| {
            let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
            let mut c = rustls::ClientConnection::new(config.clone(), name).unwrap();
            let mut out = Vec::new();
            c.write_tls(&mut out).unwrap();
            out
        };
        let bytes = hello("shop.example.com");
        assert_eq!(sni_of(&bytes), Hello::Sni(Some("shop.example.com".into())));
        assert_eq!(sni_of(&bytes[..bytes.len() / 2]), Hello::Partial);
        // An IP address is not sent as SNI.
        assert_eq!(sni_of(&hello("10.0.0.1")), Hello::Sni(None));
        assert_eq!(
            sni_of(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Hello::Malformed
        );
    }
}
