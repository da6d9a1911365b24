//! The HBONE client pool against the real HBONE server code over loopback
//! TCP and TLS: a pooled connection's age limit, no new stream past the
//! peer's certificate (either end), the CONNECT timeout, pings
//! on idle connections, the server's cap on streams per connection, the
//! client's (100, or fewer if the peer says so), a connection its peer
//! drains (GOAWAY), the CONNECT's metadata headers, and a verified
//! connection taking a whole DATA frame in one write.
//! The clocks are shortened (`Timers`); what they bound is the same code.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::Empty;
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use super::*;
use crate::{
    identity::{CaConfig, CaSource, CertManager, Identity},
    metrics::Metrics,
    proxy::Dialer,
    state::Workload,
};

const TD: &str = "cluster.local";

/// Every test is over well before this, or it has hung.
async fn within<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), test)
        .await
        .expect("the test did not finish within 30 s")
}

/// A directory for the embedded CA's root, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mesh-hbone-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn certs(dir: &TempDir) -> Arc<CertManager> {
    CertManager::new(CaConfig {
        trust_domain: TD.into(),
        cert_ttl: Duration::from_secs(3600),
        source: CaSource::Generate { dir: dir.0.clone() },
        trust_bundle: None,
    })
    .unwrap()
}

fn workload(name: &str, ip: IpAddr) -> Workload {
    Workload {
        service_account: name.into(),
        node: "n".into(),
        ips: vec![ip],
        ..Workload::for_tests("shop", name)
    }
}

/// How the test server answers a CONNECT.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    /// 200, then echoes the tunnel.
    Echo,
    /// Never.
    Silent,
    /// 503, as an agent whose app refused the connection.
    Refuse,
    /// As `Echo`, but the first connection sends GOAWAY as soon as its
    /// first stream is open (as a draining agent does) and goes on
    /// carrying that stream.
    DrainFirst,
    /// As `Echo`, once this many bytes have come on the stream.
    EchoAfter(usize),
    /// As `Refuse`, once this many bytes have come on the stream.
    RefuseAfter(usize),
}

/// An HBONE server on `ip:15008` running the agent's TLS accept and HTTP/2
/// CONNECT server, counting the TLS connections it accepted.
struct Server {
    accepted: Arc<AtomicUsize>,
    /// The most streams any one connection had open at once.
    most_streams: Arc<AtomicUsize>,
    /// The request heads it received.
    heads: Arc<std::sync::Mutex<Vec<hyper::HeaderMap>>>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hbone_server(ip: IpAddr, certs: &CertManager, answer: Answer) -> Server {
    limited_server(ip, certs, answer, SERVER_MAX_STREAMS).await
}

/// [`hbone_server`] allowing `max_streams` streams per connection.
async fn limited_server(
    ip: IpAddr,
    certs: &CertManager,
    answer: Answer,
    max_streams: u32,
) -> Server {
    let config = certs
        .server_config(&Identity::new(TD, "shop", "server"))
        .unwrap();
    server_with(ip, config, answer, max_streams).await
}

/// [`limited_server`] presenting what `config` holds.
async fn server_with(
    ip: IpAddr,
    config: Arc<rustls::ServerConfig>,
    answer: Answer,
    max_streams: u32,
) -> Server {
    let listener = TcpListener::bind(SocketAddr::new(ip, mesh_common::PORT_HBONE))
        .await
        .unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let most_streams = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (count, most, seen) = (accepted.clone(), most_streams.clone(), heads.clone());
    let task = tokio::spawn(async move {
        let metrics = Arc::new(Metrics::default());
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (config, metrics, count) = (config.clone(), metrics.clone(), count.clone());
            let (most, seen) = (most.clone(), seen.clone());
            tokio::spawn(async move {
                let Some((tls, _peer)) = accept(stream, config, &metrics, TD).await else {
                    return;
                };
                let first = count.fetch_add(1, Ordering::SeqCst) == 0;
                if answer == Answer::DrainFirst && first {
                    return drain_after_first_stream(tls).await;
                }
                // Streams open on this connection now.
                let open = Arc::new(AtomicUsize::new(0));
                serve_streams(tls, max_streams, move |req: Connect| {
                    seen.lock().unwrap().push(req.head.headers.clone());
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    respond(req, answer, open.clone())
                })
                .await;
            });
        }
    });
    Server {
        accepted,
        most_streams,
        heads,
        task,
    }
}

/// Answers the first stream, sends GOAWAY, and echoes that stream.
async fn drain_after_first_stream(tls: server::TlsStream) {
    let mut conn = h2::server::handshake(tls).await.unwrap();
    let Some(Ok((req, mut reply))) = conn.accept().await else {
        return;
    };
    let send = reply
        .send_response(server::answer(StatusCode::OK), false)
        .unwrap();
    conn.graceful_shutdown();
    tokio::spawn(echo(H2Stream::new(send, req.into_body())));
    // Accepting drives the connection until its stream ends.
    while conn.accept().await.is_some() {}
}

/// Echoes what `io` reads until either side ends.
async fn echo(mut io: H2Stream) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = io.read(&mut buf).await {
        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

async fn respond(mut req: Connect, answer: Answer, open: Arc<AtomicUsize>) {
    let early = match answer {
        Answer::EchoAfter(n) | Answer::RefuseAfter(n) => req.read_unanswered(n).await,
        _ => Bytes::new(),
    };
    match answer {
        Answer::Silent => std::future::pending::<()>().await,
        Answer::Refuse | Answer::RefuseAfter(_) => {
            return req.refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
        Answer::Echo | Answer::DrainFirst | Answer::EchoAfter(_) => {}
    }
    struct Closed(Arc<AtomicUsize>);
    impl Drop for Closed {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _closed = Closed(open);
    if let Ok(mut io) = req.open(server::answer(StatusCode::OK))
        && io.write_all(&early).await.is_ok()
    {
        echo(io).await;
    }
}

/// One client pod's side: its pool, identity and certificates.
struct Client {
    pool: Pool,
    certs: Arc<CertManager>,
    workload: Workload,
    /// Sent as the addressed Service's identities.
    also: Vec<Identity>,
}

impl Client {
    fn new(certs: Arc<CertManager>, timers: Timers) -> Client {
        Client {
            pool: Pool::with_timers(timers),
            certs,
            workload: workload("client", IpAddr::from([127, 0, 0, 1])),
            also: Vec::new(),
        }
    }

    async fn call(&self, via: IpAddr) -> Result<Tunnel, HboneError> {
        self.call_with(via, Bytes::new()).await
    }

    /// [`Client::call`] for an app that has already sent `first_bytes`.
    async fn call_with(&self, via: IpAddr, first_bytes: Bytes) -> Result<Tunnel, HboneError> {
        let mut caller = self.caller(first_bytes, None);
        self.call_as(via, &mut caller).await
    }

    /// The caller of this client's calls; `app`: the app's connection, as
    /// the agent accepted it.
    fn caller<'a>(&'a self, first_bytes: Bytes, app: Option<&'a TcpStream>) -> Caller<'a> {
        Caller {
            addr: SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 40000),
            workload: &self.workload,
            service: None,
            cluster: "Kubernetes",
            service_identities: &self.also,
            first_bytes,
            app,
        }
    }

    async fn call_as(&self, via: IpAddr, caller: &mut Caller<'_>) -> Result<Tunnel, HboneError> {
        let dialer = Dialer {
            netns: None,
            certs: &self.certs,
        };
        self.pool
            .connect(
                dialer,
                &Identity::new(TD, "shop", "client"),
                &Identity::new(TD, "shop", "server"),
                via,
                SocketAddr::new(via, 8080),
                caller,
            )
            .await
    }
}

/// A tunnel carries bytes both ways.
async fn echoes(tunnel: &mut Tunnel, text: &[u8]) {
    echoes_on(tunnel, text).await;
}

/// [`echoes`], on any stream (a CONNECT stream opened without the pool).
async fn echoes_on<S>(io: &mut S, text: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    io.write_all(text).await.unwrap();
    let mut back = vec![0u8; text.len()];
    io.read_exact(&mut back).await.unwrap();
    assert_eq!(back, text);
}

fn quick() -> Timers {
    Timers {
        max_age: Duration::from_secs(1),
        request_timeout: Duration::from_millis(300),
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(100),
    }
}

/// Each test its own loopback address, so they can bind 15008 side by side.
fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 15, last])
}

#[tokio::test]
async fn a_pooled_connection_takes_no_new_stream_past_its_age() {
    within(async {
        let dir = TempDir::new("age");
        let certs = certs(&dir);
        let ip = loopback(1);
        let server = hbone_server(ip, &certs, Answer::Echo).await;
        // Pings slow enough that a busy machine never loses the connection
        // to them (that would also make a second handshake), and an age
        // that leaves room for three handshakes on a debug build.
        let timers = Timers {
            max_age: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(30),
            ..quick()
        };
        let client = Client::new(certs, timers);

        // Calls one after another share one connection while it is young.
        let born = Instant::now();
        for text in [&b"first"[..], b"second"] {
            let mut t = client.call(ip).await.unwrap();
            echoes(&mut t, text).await;
        }
        let mut held = client.call(ip).await.unwrap();
        echoes(&mut held, b"held").await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
        assert!(born.elapsed() < timers.max_age, "the calls took too long");

        // Past its age, the next call handshakes again...
        // (The connection was made after `born`: a full age from now.)
        tokio::time::sleep(timers.max_age).await;
        let mut fresh = client.call(ip).await.unwrap();
        echoes(&mut fresh, b"fresh").await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
        // ...while the stream opened before goes on, on the old connection,
        // which leaves the pool once that stream is done.
        echoes(&mut held, b"still").await;
        assert_eq!(client.pool.len(), 2);
        drop(held);
        drop(fresh);
        let mut t = client.call(ip).await.unwrap();
        echoes(&mut t, b"last").await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(client.pool.len(), 1, "the expired connection was let go");
        assert_eq!(
            POOL_MAX_AGE,
            Duration::from_secs(300),
            "the README's 5 minutes"
        );
    })
    .await
}

#[tokio::test]
async fn a_connection_its_peer_drains_takes_no_new_streams() {
    within(async {
        let dir = TempDir::new("goaway");
        let certs = certs(&dir);
        let ip = loopback(20);
        let server = hbone_server(ip, &certs, Answer::DrainFirst).await;
        let client = Client::new(certs, Timers::default());
        let mut first = client.call(ip).await.unwrap();
        // The echo comes after the GOAWAY, so the client has read it.
        echoes(&mut first, b"first").await;

        // Tunnels held open, so that the draining connection is as little
        // busy as any (the pool would pick it): each new stream goes on a
        // connection that takes it, after at most one try on the draining
        // one, and no more connections are made than the pool keeps.
        let keeps = client::conns_per_peer();
        let mut held = Vec::new();
        for _ in 0..keeps + 4 {
            let mut t = client.call(ip).await.unwrap();
            echoes(&mut t, b"next").await;
            held.push(t);
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1 + keeps);
        // The stream open before the GOAWAY goes on.
        echoes(&mut first, b"still").await;
    })
    .await
}

type RawSender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An HTTP/2 connection made by hand (no pool) to the HBONE server at
/// `ip`, with `config`.
async fn raw_connection(ip: IpAddr, config: Arc<rustls::ClientConfig>) -> RawSender {
    let tcp = TcpStream::connect(SocketAddr::new(ip, mesh_common::PORT_HBONE))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::IpAddress(ip.into()), tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// A CONNECT to `ip:8080` on `sender`'s connection: the tunnel, or the
/// error that refused it.
async fn open_raw(
    mut sender: RawSender,
    ip: IpAddr,
) -> hyper::Result<TokioIo<hyper::upgrade::Upgraded>> {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{ip}:8080"))
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    hyper::upgrade::on(resp).await.map(TokioIo::new)
}

/// A certificate for `id` that expires in `secs` seconds (and its expiry).
fn short_lived(certs: &CertManager, id: &Identity, secs: u64) -> crate::identity::WorkloadCert {
    let now = std::time::SystemTime::now();
    certs
        .issue(
            id,
            now - Duration::from_secs(60),
            now + Duration::from_secs(secs),
        )
        .unwrap()
}

/// Sleeps until past `t` as the verifiers see it (to the second: a
/// certificate is still valid in its `notAfter` second).
async fn sleep_past(t: std::time::SystemTime) {
    let left = t
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(1200)).await;
}

/// The handshake proved the peer's certificate valid then: once it has
/// expired, the pool opens no stream on that connection, young as it is,
/// and handshakes again (refused here: the server still presents it).
#[tokio::test]
async fn a_pooled_connection_takes_no_new_stream_past_the_peers_certificate() {
    within(async {
        let dir = TempDir::new("peer-cert");
        let certs = certs(&dir);
        let ip = loopback(9);
        let cert = short_lived(&certs, &Identity::new(TD, "shop", "server"), 3);
        let config = certs.server_config_with(&cert).unwrap();
        let server = server_with(ip, config, Answer::Echo, SERVER_MAX_STREAMS).await;
        let timers = Timers {
            max_age: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(30),
            ..quick()
        };
        let client = Client::new(certs, timers);
        // One after another (none open when the next starts, so that the
        // pool would reuse the idle connection): one connection.
        for text in [&b"first"[..], b"pooled"] {
            let mut t = client.call(ip).await.unwrap();
            echoes(&mut t, text).await;
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(client.pool.len(), 1);

        sleep_past(cert.not_after).await;
        let Err(e) = client.call(ip).await else {
            panic!("a stream went on a connection past the peer's certificate");
        };
        assert!(matches!(e, HboneError::Tls { .. }), "{e}");
        assert!(e.to_string().contains("xpired"), "{e}");
    })
    .await
}

/// The server's side of the same: a peer keeps its connection past its
/// certificate's expiry; the server takes no new stream on it (GOAWAY),
/// and the stream opened before still carries bytes.
#[tokio::test]
async fn the_server_takes_no_new_stream_once_the_peers_certificate_expires() {
    within(async {
        let dir = TempDir::new("client-cert");
        let certs = certs(&dir);
        let ip = loopback(10);
        let _server = hbone_server(ip, &certs, Answer::Echo).await;
        let server_id = Identity::new(TD, "shop", "server");
        let cert = short_lived(&certs, &Identity::new(TD, "shop", "client"), 3);
        let config = certs.client_config_with(&cert, &server_id).unwrap();
        let sender = raw_connection(ip, config).await;
        let mut held = open_raw(sender.clone(), ip).await.unwrap();
        echoes_on(&mut held, b"before").await;

        sleep_past(cert.not_after).await;
        let refused = open_raw(sender, ip).await;
        assert!(
            refused.is_err(),
            "a stream opened on a connection whose peer's certificate expired"
        );
        echoes_on(&mut held, b"after").await;
    })
    .await
}

#[tokio::test]
async fn a_connect_that_is_not_answered_fails_after_the_request_timeout() {
    within(async {
        let dir = TempDir::new("timeout");
        let certs = certs(&dir);
        let ip = loopback(2);
        let _server = hbone_server(ip, &certs, Answer::Silent).await;
        let client = Client::new(certs, quick());
        let start = Instant::now();
        let Err(e) = client.call(ip).await else {
            panic!("a CONNECT nobody answers succeeded");
        };
        let took = start.elapsed();
        assert!(matches!(e, HboneError::Timeout { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("did not answer CONNECT {ip}:8080 in 300ms")),
            "{e}"
        );
        assert!(e.is_endpoint_fault(), "a silent endpoint is set aside");
        assert!(
            took >= quick().request_timeout && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(
            REQUEST_TIMEOUT,
            Duration::from_secs(10),
            "the README's 10 s"
        );
    })
    .await
}

/// A TCP relay between the client and the server that can stop carrying
/// bytes while keeping both sockets open: a peer that vanished.
async fn relay(listen: IpAddr, to: SocketAddr, frozen: Arc<AtomicBool>) -> JoinHandle<()> {
    let listener = TcpListener::bind(SocketAddr::new(listen, mesh_common::PORT_HBONE))
        .await
        .unwrap();
    tokio::spawn(async move {
        loop {
            let (a, _) = listener.accept().await.unwrap();
            let b = TcpStream::connect(to).await.unwrap();
            let (ar, aw) = a.into_split();
            let (br, bw) = b.into_split();
            tokio::spawn(pipe(ar, bw, frozen.clone()));
            tokio::spawn(pipe(br, aw, frozen.clone()));
        }
    })
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if frozen.load(Ordering::SeqCst) {
            // Holds both sockets, carries nothing.
            std::future::pending::<()>().await;
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn pings_close_an_idle_pooled_connection_whose_peer_went_silent() {
    within(async {
        let dir = TempDir::new("ping");
        let certs = certs(&dir);
        let server_ip = loopback(3);
        let via = loopback(4);
        let _server = hbone_server(server_ip, &certs, Answer::Echo).await;
        let frozen = Arc::new(AtomicBool::new(false));
        let relay = relay(
            via,
            SocketAddr::new(server_ip, mesh_common::PORT_HBONE),
            frozen.clone(),
        )
        .await;
        let timers = Timers {
            max_age: Duration::from_secs(60),
            ..quick()
        };
        let client = Client::new(certs, timers);
        let mut t = client.call(via).await.unwrap();
        echoes(&mut t, b"hello").await;
        drop(t);

        // Idle, with the peer answering: the pings keep it open.
        let idle_until = Instant::now() + 8 * timers.keepalive_interval;
        while Instant::now() < idle_until {
            assert_eq!(client.pool.len(), 1, "an idle, healthy connection closed");
            tokio::time::sleep(timers.keepalive_interval / 2).await;
        }

        // The peer goes silent: an unanswered ping closes the connection.
        frozen.store(true, Ordering::SeqCst);
        let silent = Instant::now();
        while client.pool.len() != 0 {
            assert!(
                silent.elapsed() < Duration::from_secs(5),
                "an idle connection to a silent peer stayed in the pool"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        relay.abort();
        assert_eq!(
            (KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT),
            (Duration::from_secs(10), Duration::from_secs(20)),
            "the README's pings, ztunnel's clocks"
        );
    })
    .await
}

#[tokio::test]
async fn the_server_takes_200_streams_per_connection_and_holds_the_next() {
    within(async {
        let dir = TempDir::new("streams");
        let certs = certs(&dir);
        let ip = loopback(5);
        let _server = hbone_server(ip, &certs, Answer::Echo).await;
        let config = certs
            .client_config(
                &Identity::new(TD, "shop", "client"),
                &Identity::new(TD, "shop", "server"),
            )
            .unwrap();
        let sender = raw_connection(ip, config).await;
        let open = |sender: &RawSender| {
            let sender = sender.clone();
            async move { open_raw(sender, ip).await.unwrap() }
        };
        let cap = SERVER_MAX_STREAMS as usize;
        assert_eq!(cap, 200, "ztunnel's server limit");
        let mut tunnels = futures::future::join_all((0..cap).map(|_| open(&sender))).await;

        // One more waits for a stream to end, then gets it.
        let mut next = tokio::spawn(open(&sender));
        let waited = tokio::time::timeout(Duration::from_millis(500), &mut next).await;
        assert!(
            waited.is_err(),
            "stream {} was opened past the cap",
            cap + 1
        );
        drop(tunnels.pop());
        let up = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the waiting stream opened once one ended")
            .unwrap();
        tunnels.push(up);
        assert_eq!(tunnels.len(), cap);
    })
    .await
}

/// A peer that allows 2 streams per connection: each connection takes 2,
/// then the pool opens another rather than queue a third behind them (a
/// queued CONNECT would wait for one of the held tunnels to end, which
/// none does here, and time out).
#[tokio::test]
async fn streams_past_the_peer_s_limit_go_to_another_connection() {
    within(async {
        let dir = TempDir::new("peer-limit");
        let certs = certs(&dir);
        let ip = loopback(6);
        let server = limited_server(ip, &certs, Answer::Echo, 2).await;
        let client = Client::new(
            certs,
            Timers {
                max_age: Duration::from_secs(60),
                ..quick()
            },
        );
        // The first connection learns the peer's limit from its SETTINGS.
        let mut first = client.call(ip).await.unwrap();
        echoes(&mut first, b"first").await;
        let mut held = vec![first];
        for i in 0..5 {
            let mut t = client
                .call(ip)
                .await
                .unwrap_or_else(|e| panic!("call {} of 6 failed: {e}", i + 2));
            echoes(&mut t, b"held").await;
            held.push(t);
        }
        // And six at once on top.
        let more = futures::future::join_all((0..6).map(|_| client.call(ip))).await;
        for t in more {
            let mut t = t.expect("a concurrent call failed");
            echoes(&mut t, b"more").await;
            held.push(t);
        }
        assert_eq!(held.len(), 12);
        assert!(
            server.most_streams.load(Ordering::SeqCst) <= 2,
            "a connection carried more streams than the peer allows"
        );
        assert!(
            server.accepted.load(Ordering::SeqCst) >= 6,
            "12 streams at 2 a connection need 6 connections, got {}",
            server.accepted.load(Ordering::SeqCst)
        );
        for t in &mut held {
            echoes(t, b"all still carry bytes").await;
        }
    })
    .await
}

/// Against a peer that allows more, a connection carries at most 100 of
/// our streams (ztunnel's client limit); the 101st goes elsewhere.
#[tokio::test]
async fn the_client_opens_at_most_100_streams_per_connection() {
    within(async {
        let dir = TempDir::new("client-cap");
        let certs = certs(&dir);
        let ip = loopback(7);
        let server = limited_server(ip, &certs, Answer::Echo, 1000).await;
        let client = Client::new(
            certs,
            Timers {
                max_age: Duration::from_secs(60),
                request_timeout: Duration::from_secs(5),
                ..quick()
            },
        );
        // More than the pool's connections carry at 100 each.
        let n = 100 * client::conns_per_peer() + 50;
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(client.call(ip).await.unwrap());
        }
        assert_eq!(CLIENT_MAX_STREAMS, 100);
        let most = server.most_streams.load(Ordering::SeqCst);
        assert_eq!(most, 100, "the busiest connection carried {most} streams");
        assert!(server.accepted.load(Ordering::SeqCst) > client::conns_per_peer());
        echoes(held.last_mut().unwrap(), b"the last").await;
    })
    .await
}

/// Each CONNECT names its caller in ztunnel's `baggage` keys and starts a
/// fresh W3C trace.
#[tokio::test]
async fn a_connect_carries_baggage_and_a_fresh_traceparent() {
    within(async {
        let dir = TempDir::new("heads");
        let certs = certs(&dir);
        let ip = loopback(8);
        let server = hbone_server(ip, &certs, Answer::Echo).await;
        let mut client = Client::new(certs, quick());
        client.workload.owner = Some("client-app".into());
        client.workload.owner_kind = Some("deployment".into());
        client.workload.labels = Arc::new([("app".into(), "frontend".into())].into());
        let _a = client.call(ip).await.unwrap();
        let _b = client.call(ip).await.unwrap();
        let heads = server.heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 2);
        for h in &heads {
            assert_eq!(
                h["baggage"],
                "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,\
                 k8s.deployment.name=client-app,service.name=frontend,service.version=latest"
            );
            assert_eq!(h["forwarded"], "for=\"127.0.0.1:40000\"");
        }
        let trace = |h: &hyper::HeaderMap| {
            crate::waypoint::trace::TraceParent::parse(h["traceparent"].to_str().unwrap())
                .expect("a valid traceparent")
        };
        let (a, b) = (trace(&heads[0]), trace(&heads[1]));
        assert_ne!(a.trace_id, b.trace_id, "one trace per tunnel");
    })
    .await
}

/// A tunnel whose far end stops reading holds at most its stream's window
/// of the connection's: the connection window is larger than one stream
/// window, so other tunnels on the same pooled connection go on.
#[tokio::test]
async fn a_tunnel_that_is_not_read_leaves_room_for_the_others() {
    within(async {
        let dir = TempDir::new("stalled");
        let certs = certs(&dir);
        let ip = loopback(11);
        let server = hbone_server(ip, &certs, Answer::Echo).await;
        let client = Client::new(certs, Timers::default());

        // As many tunnels as the pool keeps connections to one peer, all
        // held: one on each connection. The echo of everything written on
        // them comes back to a client that never reads it: their windows
        // fill both ways and stay full.
        let conns = client::conns_per_peer();
        let mut stalled = Vec::new();
        for _ in 0..conns {
            stalled.push(client.call(ip).await.unwrap());
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), conns);
        let sent: Vec<_> = (0..conns).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let writers: Vec<_> = stalled
            .into_iter()
            .zip(sent.clone())
            .map(|(mut tunnel, count)| {
                tokio::spawn(async move {
                    let io = &mut tunnel;
                    let chunk = vec![7u8; 64 * 1024];
                    while io.write_all(&chunk).await.is_ok() {
                        count.fetch_add(chunk.len(), Ordering::SeqCst);
                    }
                })
            })
            .collect();
        // Until they stop: more than a stream window has left each, and
        // none moves any more.
        let total = || {
            sent.iter()
                .map(|s| s.load(Ordering::SeqCst))
                .collect::<Vec<_>>()
        };
        let mut last = total();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = total();
            if now == last && now.iter().all(|&n| n > STREAM_WINDOW as usize) {
                break;
            }
            last = now;
        }

        // Another tunnel, on a connection that carries a stalled one (the
        // pool opens no more), still carries bytes both ways.
        let mut other = client.call(ip).await.unwrap();
        assert_eq!(server.accepted.load(Ordering::SeqCst), conns);
        tokio::time::timeout(
            Duration::from_secs(5),
            echoes(&mut other, &vec![3u8; 256 * 1024]),
        )
        .await
        .expect("a tunnel waited behind one that is not read");
        for w in writers {
            w.abort();
        }
    })
    .await
}

/// What the app had sent before its tunnel was asked for goes with the
/// CONNECT: it arrives first and once, ahead of what is written on the
/// tunnel after; a refusing endpoint drops it, and the next endpoint
/// tried is sent it again.
#[tokio::test]
async fn the_first_bytes_go_with_the_connect_and_again_after_a_refusal() {
    within(async {
        let dir = TempDir::new("first-bytes");
        let certs = certs(&dir);
        let (refusing, echoing) = (loopback(40), loopback(41));
        let _refuser = hbone_server(refusing, &certs, Answer::Refuse).await;
        let _echo = hbone_server(echoing, &certs, Answer::Echo).await;
        let client = Client::new(certs, quick());
        let first = Bytes::from_static(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n");
        match client.call_with(refusing, first.clone()).await {
            Err(HboneError::Status { status, .. }) => {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE)
            }
            Err(e) => panic!("refused with {e}"),
            Ok(_) => panic!("the refusing endpoint opened a tunnel"),
        }
        let mut tunnel = client.call_with(echoing, first.clone()).await.unwrap();
        tunnel.write_all(b"and the rest").await.unwrap();
        let mut want = first.to_vec();
        want.extend_from_slice(b"and the rest");
        echoed_once(&mut tunnel, &want).await;
    })
    .await;
}

/// The echoing server sends back `want`, and once the tunnel is shut
/// down, nothing more: what went before the answer came back once.
async fn echoed_once(tunnel: &mut Tunnel, want: &[u8]) {
    let mut back = vec![0u8; want.len()];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(back, want);
    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

/// What the app sends while its CONNECT awaits the answer goes on the
/// stream at once, behind the first bytes (these servers answer only once
/// they have both); a refusal keeps it with them, and the next endpoint
/// tried is sent all of it again, and the app's connection reads on from
/// there.
#[tokio::test]
async fn what_the_app_sends_before_the_answer_leaves_at_once_and_again_after_a_refusal() {
    within(async {
        let dir = TempDir::new("early-bytes");
        let certs = certs(&dir);
        let (first, meanwhile) = (&b"GET / HTTP/1.1\r\n"[..], &b"host: web\r\n\r\n"[..]);
        let n = first.len() + meanwhile.len();
        let (refusing, echoing) = (loopback(42), loopback(43));
        let _refuser = hbone_server(refusing, &certs, Answer::RefuseAfter(n)).await;
        let _echo = hbone_server(echoing, &certs, Answer::EchoAfter(n)).await;
        let client = Client::new(certs, quick());
        // The app's connection, and its end as the agent accepted it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut caller = client.caller(Bytes::from_static(first), Some(&accepted));
        // The app writes the rest of its request once the CONNECT is out.
        let call = client.call_as(refusing, &mut caller);
        let write = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            app.write_all(meanwhile).await.unwrap();
        };
        let (refused, ()) = tokio::join!(call, write);
        match refused {
            Err(HboneError::Status { status, .. }) => {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE)
            }
            Err(e) => panic!("refused with {e}"),
            Ok(_) => panic!("the refusing endpoint opened a tunnel"),
        }
        assert_eq!(caller.first_bytes, [first, meanwhile].concat());
        let mut tunnel = client.call_as(echoing, &mut caller).await.unwrap();
        drop(caller);
        // After the answer the app's connection is the splice's to read.
        app.write_all(b"and the rest").await.unwrap();
        let mut rest = [0u8; 12];
        let mut from_app = accepted;
        from_app.read_exact(&mut rest).await.unwrap();
        tunnel.write_all(&rest).await.unwrap();
        echoed_once(&mut tunnel, &[first, meanwhile, b"and the rest"].concat()).await;
    })
    .await;
}

/// A verified connection takes a 64 KiB DATA frame and its 9-byte header
/// (as HTTP/2 hands them over, together) in one write: rustls's default
/// took 64 KiB, and the header's last 9 bytes went in a second write, a
/// TLS record and a TCP segment of their own. On both ends, as
/// `io::verified` readies them.
#[tokio::test]
async fn a_verified_connection_takes_a_whole_data_frame_in_one_write() {
    within(async {
        let dir = TempDir::new("write-limit");
        let certs = certs(&dir);
        let ip = loopback(44);
        let listener = TcpListener::bind(SocketAddr::new(ip, mesh_common::PORT_HBONE))
            .await
            .unwrap();
        let client_config = certs
            .client_config(
                &Identity::new(TD, "shop", "client"),
                &Identity::new(TD, "shop", "server"),
            )
            .unwrap();
        let server_config = certs
            .server_config(&Identity::new(TD, "shop", "server"))
            .unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(SocketAddr::new(ip, mesh_common::PORT_HBONE))
                .await
                .unwrap();
            tokio_rustls::TlsConnector::from(client_config)
                .connect(ServerName::IpAddress(ip.into()), Buffered::new(tcp))
                .await
                .unwrap()
        });
        let (stream, _) = listener.accept().await.unwrap();
        let (mut server, peer) = accept(stream, server_config, &Metrics::default(), TD)
            .await
            .expect("the handshake succeeds");
        assert_eq!(peer, Identity::new(TD, "shop", "client"));
        let mut client = client.await.unwrap();
        let frame = vec![7u8; 9 + 64 * 1024];
        use std::io::Write as _;
        let (_, conn) = server.get_mut();
        assert_eq!(conn.writer().write(&frame).unwrap(), frame.len());
        // The client's end (`Pool::dial` readies it the same way): rustls's
        // default first, its records then dropped unsent, then readied.
        let (tcp, conn) = client.get_mut();
        assert_eq!(conn.writer().write(&frame).unwrap(), 64 * 1024);
        while conn.wants_write() {
            conn.write_tls(&mut std::io::sink()).unwrap();
        }
        io::verified(tcp, conn);
        assert_eq!(conn.writer().write(&frame).unwrap(), frame.len());
    })
    .await;
}
