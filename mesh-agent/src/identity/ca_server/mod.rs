//! `mesh-agent ca`: the cluster certificate authority. A node agent sends a
//! CSR for one SPIFFE ID with its ServiceAccount token; the CA asks the API
//! server who the token belongs to and on which node it runs, and signs only
//! for an identity that a pod on that node has.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rustls::{ServerConfig, crypto::CryptoProvider};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use super::{
    CaSource, Identity,
    ca::{CLOCK_SKEW, Ca},
    ca_client::{ErrorBody, SIGN_PATH, SignRequest, SignResponse},
    rfc3339,
};
use crate::config::CaArgs;

pub(crate) mod csr;
mod limit;
mod review;
mod serving;

use csr::Csr;
use limit::ReviewLimiter;
use serving::ServingCert;

/// A CSR is well under 2 KiB; nothing bigger is read.
const MAX_BODY: usize = 64 * 1024;
/// TLS handshake, and reading a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection is served: then it is closed gracefully (the
/// requests in flight are answered), so an idle or trickling connection
/// cannot hold a socket and a task. An agent asks once per certificate.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Streams one h2 connection may have open.
const MAX_STREAMS: u32 = 16;
/// The ConfigMap key node agents mount as their `--ca-root`.
pub const ROOT_KEY: &str = "root-cert.pem";

/// Runs the CA until SIGINT or SIGTERM.
pub async fn run(args: CaArgs) -> anyhow::Result<()> {
    info!(
        listen = %args.listen,
        ready = %args.ready_addr,
        ca_dir = %args.ca_dir.display(),
        trust_domain = %args.trust_domain,
        cert_ttl = ?args.cert_ttl,
        server_names = ?args.server_names,
        audience = %args.audience,
        agent_service_account = %args.agent_service_account,
        root_configmap = %args.root_configmap,
        "starting the cluster CA"
    );
    let kube = kube::Client::try_default().await.context(
        "connecting to the Kubernetes API (in-cluster service account, else KUBECONFIG)",
    )?;
    let server = CaServer::new(&args, kube)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let ready = TcpListener::bind(args.ready_addr)
        .await
        .with_context(|| format!("--ready-addr {}", args.ready_addr))?;
    // Serving does not wait for the ConfigMap: agents that already mount
    // the root keep getting certificates while the API server is away.
    tokio::spawn(server.clone().publish_root());
    tokio::spawn(server.clone().serve_ready(ready));
    tokio::spawn(server.clone().serve(listener));
    info!("cluster CA ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("stopping the cluster CA");
    Ok(())
}

/// `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ObjectRef {
    namespace: String,
    name: String,
}

impl ObjectRef {
    fn parse(flag: &str, value: &str) -> anyhow::Result<ObjectRef> {
        match value.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(ObjectRef {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => anyhow::bail!("{flag} {value:?}: expected namespace/name"),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    /// `issued`, `unauthenticated`, `forbidden`, `bad_request`,
    /// `rate_limited` or `error`.
    result: &'static str,
}

const RESULTS: [&str; 6] = [
    "issued",
    "unauthenticated",
    "forbidden",
    "bad_request",
    "rate_limited",
    "error",
];

/// The cluster CA: its root, the API server it asks, and its own serving
/// certificate.
pub struct CaServer {
    ca: Ca,
    kube: kube::Client,
    trust_domain: String,
    cert_ttl: Duration,
    server_names: Vec<String>,
    audience: String,
    /// The node agents' ServiceAccount, the only caller served.
    agent: ObjectRef,
    root_configmap: ObjectRef,
    provider: Arc<CryptoProvider>,
    serving: Arc<ServingCert>,
    tls: Arc<ServerConfig>,
    requests: Family<ResultLabels, Counter>,
    registry: Registry,
    reviews: ReviewLimiter,
}

impl CaServer {
    /// Loads (or generates) the root in `--ca-dir` and makes a serving
    /// certificate for `--server-names`.
    pub fn new(args: &CaArgs, kube: kube::Client) -> anyhow::Result<Arc<CaServer>> {
        let td = &args.trust_domain;
        if td.is_empty() || td.contains('/') || td.contains(':') {
            anyhow::bail!("--trust-domain {td:?}: must be a non-empty name without '/' or ':'");
        }
        if args.server_names.iter().all(|n| n.trim().is_empty()) {
            anyhow::bail!("--server-names: at least one DNS name is needed");
        }
        let agent = ObjectRef::parse("--agent-service-account", &args.agent_service_account)?;
        let root_configmap = ObjectRef::parse("--root-configmap", &args.root_configmap)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = Ca::from_source(
            &CaSource::Generate {
                dir: args.ca_dir.clone(),
            },
            td,
            &provider,
        )
        .with_context(|| format!("--ca-dir {}", args.ca_dir.display()))?;
        let server_names: Vec<String> = args
            .server_names
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        let serving = Arc::new(ServingCert::new(
            &ca,
            &provider,
            &server_names,
            args.cert_ttl,
        )?);
        let mut tls = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(serving.clone());
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let requests = Family::<ResultLabels, Counter>::default();
        for result in RESULTS {
            // Every result shows from the start, at zero.
            let _ = requests.get_or_create(&ResultLabels { result });
        }
        let mut registry = Registry::default();
        registry.register(
            "mesh_ca_requests",
            "Certificate requests answered by the cluster CA, by result",
            requests.clone(),
        );
        info!(
            root = %ca.root.facts.subject,
            serial = %ca.root.facts.serial,
            not_after = %rfc3339(ca.root.facts.not_after),
            "cluster CA root loaded"
        );
        Ok(Arc::new(CaServer {
            ca,
            kube,
            trust_domain: td.clone(),
            cert_ttl: args.cert_ttl,
            server_names,
            audience: args.audience.clone(),
            agent,
            root_configmap,
            provider,
            serving,
            tls: Arc::new(tls),
            requests,
            registry,
            reviews: ReviewLimiter::new(args.review_burst, args.review_rate),
        }))
    }

    /// The root, PEM: what the ConfigMap carries.
    pub fn root_pem(&self) -> &str {
        &self.ca.root.pem
    }

    /// Serves certificate requests over HTTPS until the listener fails,
    /// renewing the serving certificate at half its lifetime.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let period =
            (self.cert_ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let mut renew = tokio::time::interval(period);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        tokio::spawn(self.clone().connection(stream, peer));
                    }
                    Err(e) => {
                        // Out of file descriptors, most likely: give it a moment.
                        warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = renew.tick() => self.renew_serving_cert(),
            }
        }
    }
    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let accept = TlsAcceptor::from(self.tls.clone()).accept(stream);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let server = self.clone();
        let svc = service_fn(move |req| {
            let server = server.clone();
            async move { Ok::<_, Infallible>(server.answer(req, peer).await) }
        });
        let io = TokioIo::new(tls);
        let served = if h2 {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .keep_alive_interval(HANDSHAKE_TIMEOUT)
                .keep_alive_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(io, svc);
            for_a_while(conn, |c| c.graceful_shutdown()).await
        } else {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(io, svc);
            for_a_while(conn, |c| c.graceful_shutdown()).await
        };
        if let Err(e) = served {
            debug!(%peer, error = %e, "CA connection");
        }
    }

    /// One request: decided, counted and, when refused, logged.
    async fn answer(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let mut caller = Caller::default();
        let outcome = self.decide(req, peer, &mut caller).await;
        let result = match &outcome {
            Ok(_) => "issued",
            Err(refusal) => refusal.result(),
        };
        self.requests.get_or_create(&ResultLabels { result }).inc();
        match outcome {
            Ok(answer) => {
                info!(
                    %peer,
                    user = caller.user.as_deref().unwrap_or("-"),
                    node = caller.node.as_deref().unwrap_or("-"),
                    identity = %shown(&caller.identity),
                    "certificate issued"
                );
                json(StatusCode::OK, &answer)
            }
            Err(refusal) => {
                let (user, node) = (
                    caller.user.as_deref().unwrap_or("-"),
                    caller.node.as_deref().unwrap_or("-"),
                );
                let identity = shown(&caller.identity);
                if refusal.status.is_server_error() {
                    error!(%peer, user, node, %identity, status = %refusal.status, reason = %refusal.reason, "certificate request failed");
                } else {
                    warn!(%peer, user, node, %identity, status = %refusal.status, reason = %refusal.reason, "certificate request refused");
                }
                let mut response = json(
                    refusal.status,
                    &ErrorBody {
                        error: refusal.reason,
                    },
                );
                if refusal.status == StatusCode::METHOD_NOT_ALLOWED {
                    response
                        .headers_mut()
                        .insert(ALLOW, hyper::header::HeaderValue::from_static("POST"));
                }
                response
            }
        }
    }

    async fn decide(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        caller: &mut Caller,
    ) -> Result<SignResponse, Refusal> {
        if req.uri().path() != SIGN_PATH {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no such path {:?}; certificates are requested at POST {SIGN_PATH}",
                    req.uri().path()
                ),
            ));
        }
        if req.method() != Method::POST {
            return Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not allowed; use POST", req.method()),
            ));
        }
        let token = bearer_token(&req).ok_or_else(|| {
            Refusal::new(
                StatusCode::UNAUTHORIZED,
                "no bearer token: send the agent's ServiceAccount token as `Authorization: Bearer <token>`",
            )
        })?;
        let body = read_body(req).await?;

        if !self.reviews.allow(peer.ip()) {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many certificate requests from {}; retry later",
                    peer.ip()
                ),
            ));
        }
        let user = self.review(&token).await?;
        let username = user.username.clone().unwrap_or_default();
        caller.user = Some(username.clone());
        let expected = format!(
            "system:serviceaccount:{}:{}",
            self.agent.namespace, self.agent.name
        );
        // A node agent signs for the pods of its node; anyone else may only
        // be a waypoint asking for its own pod's identity.
        let waypoint = if username == expected {
            None
        } else {
            let Some((ns, sa)) = username
                .strip_prefix("system:serviceaccount:")
                .and_then(|rest| rest.split_once(':'))
            else {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "{username} may not request certificates: only the node agents' \
                         ServiceAccount {} may, or a waypoint pod",
                        self.agent
                    ),
                ));
            };
            Some(
                self.waypoint_identity(&user, ns, sa, &self.trust_domain)
                    .await?,
            )
        };
        let node = match &waypoint {
            None => Some(self.node_of(&user).await?),
            Some(_) => None,
        };
        caller.node = node.clone();

        let request: SignRequest = serde_json::from_slice(&body).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not {{\"csr\": \"<PEM>\"}}: {e}"),
            )
        })?;
        let csr = Csr::parse(&request.csr, &self.trust_domain)
            .map_err(|reason| Refusal::new(StatusCode::BAD_REQUEST, reason))?;
        caller.identity = Some(csr.identity.clone());

        if let Some(own) = &waypoint {
            if *own != csr.identity {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "a waypoint's token gets only its own identity {own}, not {}",
                        csr.identity
                    ),
                ));
            }
        } else if let Some(node) = &node {
            self.check_runs_on(&csr.identity, node).await?;
        }

        let now = SystemTime::now();
        let leaf = self
            .ca
            .sign_workload(
                &csr.identity,
                &csr.public_key,
                now - CLOCK_SKEW,
                now + self.cert_ttl,
            )
            .map_err(|e| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("signing {}: {e}", csr.identity),
                )
            })?;
        Ok(SignResponse {
            certificate_chain: vec![leaf.pem()],
            root: self.ca.root.pem.clone(),
        })
    }

    /// `/healthz/ready` and `/metrics`, plain HTTP.
    pub async fn serve_ready(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let server = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.probe(&req)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(error = %e, "readiness connection");
                }
            });
        }
    }

    fn probe(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz/ready") => reply(StatusCode::OK, "text/plain", "ready\n"),
            (&Method::GET, "/metrics") => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics_text(),
            ),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// What the logs say about a caller, filled in as the request is checked.
#[derive(Debug, Default)]
struct Caller {
    user: Option<String>,
    node: Option<String>,
    identity: Option<Identity>,
}

/// Serves a connection for [`CONNECTION_LIFETIME`], then has it answer the
/// requests in flight and close, within [`HANDSHAKE_TIMEOUT`].
async fn for_a_while<C, E>(conn: C, shutdown: impl FnOnce(Pin<&mut C>)) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    match tokio::time::timeout(CONNECTION_LIFETIME, conn.as_mut()).await {
        Ok(served) => served,
        Err(_) => {
            shutdown(conn.as_mut());
            tokio::time::timeout(HANDSHAKE_TIMEOUT, conn)
                .await
                .unwrap_or(Ok(()))
        }
    }
}

fn shown(id: &Option<Identity>) -> String {
    id.as_ref().map_or_else(|| "-".into(), Identity::to_string)
}

/// A request the CA does not grant, and why.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }

    /// The `result` label.
    fn result(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "unauthenticated",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::TOO_MANY_REQUESTS => "rate_limited",
            s if s.is_server_error() => "error",
            _ => "bad_request",
        }
    }
}

fn bearer_token(req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Refusal> {
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("reading the request body: {e}"),
        )),
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec(value).expect("serializable");
    body.push(b'\n');
    reply(status, "application/json", body)
}
