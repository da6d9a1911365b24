//! `mesh-agent ca`: the cluster certificate authority. A node agent sends a
//! CSR for one SPIFFE ID with its ServiceAccount token; the CA asks the API
//! server who the token belongs to and on which node it runs, and signs only
//! for an identity that a pod on that node has.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, PoisonError, RwLock},
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
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    core::v1::{ConfigMap, Pod},
};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateSigningRequestDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};
use x509_parser::{
    certification_request::X509CertificationRequest,
    cri_attributes::ParsedCriAttribute,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME,
    prelude::FromDer,
};

use super::{
    CaSource, Identity,
    ca::{CLOCK_SKEW, Ca},
    ca_client::{ErrorBody, SIGN_PATH, SignRequest, SignResponse},
    rfc3339,
};
use crate::config::CaArgs;

/// A CSR is well under 2 KiB; nothing bigger is read.
const MAX_BODY: usize = 64 * 1024;
/// TLS handshake, and reading a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Publishing the root: the first retry, doubling up to the last.
const PUBLISH_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// The ConfigMap key node agents mount as their `--ca-root`.
pub const ROOT_KEY: &str = "root-cert.pem";
/// Bound ServiceAccount tokens (Kubernetes >= 1.30) name their node here...
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// ... and always their pod.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

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
    /// `issued`, `unauthenticated`, `forbidden`, `bad_request` or `error`.
    result: &'static str,
}

const RESULTS: [&str; 5] = [
    "issued",
    "unauthenticated",
    "forbidden",
    "bad_request",
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
        let serving = Arc::new(ServingCert(RwLock::new(serving_cert(
            &ca,
            &provider,
            &server_names,
            args.cert_ttl,
        )?)));
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

    fn renew_serving_cert(&self) {
        if SystemTime::now() < self.serving.renew_at() {
            return;
        }
        match serving_cert(&self.ca, &self.provider, &self.server_names, self.cert_ttl) {
            Ok(fresh) => {
                info!(serial = %fresh.serial, "serving certificate renewed");
                *self
                    .serving
                    .0
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = fresh;
            }
            // The current one is still valid for half its life.
            Err(e) => warn!(error = %e, "renewing the serving certificate failed"),
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
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, svc)
                .await
        } else {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(io, svc)
                .await
        };
        if let Err(e) = served {
            debug!(%peer, error = %e, "CA connection");
        }
    }

    /// One request: decided, counted and, when refused, logged.
    async fn answer(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let mut caller = Caller::default();
        let outcome = self.decide(req, &mut caller).await;
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

        let user = self.review(&token).await?;
        let username = user.username.clone().unwrap_or_default();
        caller.user = Some(username.clone());
        let expected = format!(
            "system:serviceaccount:{}:{}",
            self.agent.namespace, self.agent.name
        );
        if username != expected {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{username} may not request certificates: only the node agents' ServiceAccount {} may",
                    self.agent
                ),
            ));
        }
        let node = self.node_of(&user).await?;
        caller.node = Some(node.clone());

        let request: SignRequest = serde_json::from_slice(&body).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not {{\"csr\": \"<PEM>\"}}: {e}"),
            )
        })?;
        let csr = Csr::parse(&request.csr, &self.trust_domain)
            .map_err(|reason| Refusal::new(StatusCode::BAD_REQUEST, reason))?;
        caller.identity = Some(csr.identity.clone());

        self.check_runs_on(&csr.identity, &node).await?;

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

    /// Who the token belongs to, by the API server's TokenReview.
    async fn review(&self, token: &str) -> Result<UserInfo, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.kube.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("TokenReview failed: {e}"),
                )
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".into());
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                format!("the token was not accepted: {why}"),
            ));
        }
        // The API server answers with the audiences the token is valid for
        // among those asked; a token for anyone else is no proof to us.
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                format!("the token is not for the audience {:?}", self.audience),
            ));
        }
        status.user.ok_or_else(|| {
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "TokenReview authenticated the token but named no user",
            )
        })
    }

    /// The node the caller runs on: from the token itself when it carries
    /// it, else from the pod it is bound to.
    async fn node_of(&self, user: &UserInfo) -> Result<String, Refusal> {
        let empty = BTreeMap::new();
        let extra = user.extra.as_ref().unwrap_or(&empty);
        let first = |key: &str| {
            extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        if let Some(node) = first(NODE_NAME) {
            return Ok(node);
        }
        let Some(pod_name) = first(POD_NAME) else {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "token is not bound to a pod: use a projected ServiceAccount token",
            ));
        };
        let pod_ref = format!("{}/{pod_name}", self.agent.namespace);
        let pod = Api::<Pod>::namespaced(self.kube.clone(), &self.agent.namespace)
            .get_opt(&pod_name)
            .await
            .map_err(|e| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("looking up the caller's pod {pod_ref}: {e}"),
                )
            })?
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::FORBIDDEN,
                    format!("the token is bound to pod {pod_ref}, which does not exist"),
                )
            })?;
        // A pod of the same name made since the token was issued is not
        // the caller.
        if let Some(uid) = first(POD_UID)
            && pod.metadata.uid.as_deref() != Some(uid.as_str())
        {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!("the token is bound to an earlier pod {pod_ref} (uid {uid})"),
            ));
        }
        pod.spec
            .and_then(|spec| spec.node_name)
            .filter(|node| !node.is_empty())
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::FORBIDDEN,
                    format!("the caller's pod {pod_ref} is not scheduled on a node"),
                )
            })
    }

    /// Some live pod on `node` runs as `id`.
    async fn check_runs_on(&self, id: &Identity, node: &str) -> Result<(), Refusal> {
        let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = Api::<Pod>::namespaced(self.kube.clone(), &id.namespace)
            .list(&on_node)
            .await
            .map_err(|e| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "listing the pods of namespace {} on node {node}: {e}",
                        id.namespace
                    ),
                )
            })?;
        let runs = pods.items.iter().any(|pod| {
            let Some(spec) = &pod.spec else {
                return false;
            };
            let account = spec
                .service_account_name
                .as_deref()
                .filter(|sa| !sa.is_empty())
                .unwrap_or("default");
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            spec.node_name.as_deref() == Some(node)
                && pod
                    .metadata
                    .namespace
                    .as_deref()
                    .is_none_or(|ns| ns == id.namespace)
                && account == id.service_account
                && !matches!(phase, Some("Succeeded" | "Failed"))
        });
        if runs {
            Ok(())
        } else {
            Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!("no pod with identity {id} runs on node {node}"),
            ))
        }
    }

    /// Writes the root into the ConfigMap, retrying with back-off until the
    /// API server takes it.
    pub async fn publish_root(self: Arc<Self>) {
        let mut delay = PUBLISH_RETRY.0;
        loop {
            match self.try_publish_root().await {
                Ok(action) => {
                    info!(configmap = %self.root_configmap, key = ROOT_KEY, action, "root certificate published");
                    return;
                }
                Err(e) => {
                    warn!(configmap = %self.root_configmap, error = %e, retry_in = ?delay, "publishing the root certificate failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(PUBLISH_RETRY.1);
                }
            }
        }
    }

    async fn try_publish_root(&self) -> Result<&'static str, kube::Error> {
        let target = &self.root_configmap;
        let api = Api::<ConfigMap>::namespaced(self.kube.clone(), &target.namespace);
        let pem = self.root_pem().to_owned();
        match api.get_opt(&target.name).await? {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(target.name.clone()),
                        namespace: Some(target.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "mesh-agent-ca".to_owned(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([(ROOT_KEY.to_owned(), pem)])),
                    ..ConfigMap::default()
                };
                api.create(&PostParams::default(), &cm).await?;
                Ok("created")
            }
            Some(mut cm) => {
                let data = cm.data.get_or_insert_with(BTreeMap::new);
                if data.get(ROOT_KEY) == Some(&pem) {
                    return Ok("unchanged");
                }
                data.insert(ROOT_KEY.to_owned(), pem);
                // Carries the resourceVersion read: a concurrent change makes
                // this fail and the next attempt start over.
                api.replace(&target.name, &PostParams::default(), &cm)
                    .await?;
                Ok("updated")
            }
        }
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

/// A certificate request as the CA accepts it: signed by its own key, and
/// naming one workload of our trust domain in its one SAN.
struct Csr {
    identity: Identity,
    public_key: rcgen::SubjectPublicKeyInfo,
}

impl Csr {
    fn parse(pem: &str, trust_domain: &str) -> Result<Csr, String> {
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("csr is not a PEM CERTIFICATE REQUEST: {e}"))?;
        let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| format!("csr is not a PKCS#10 request: {e}"))?;
        if !rest.is_empty() {
            return Err("csr has trailing bytes after the request".into());
        }
        csr.verify_signature()
            .map_err(|e| format!("csr signature does not verify with its own key: {e}"))?;

        let mut names = Vec::new();
        for attr in csr.certification_request_info.iter_attributes() {
            let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
                continue;
            };
            for ext in &req.extensions {
                if ext.oid != OID_X509_EXT_SUBJECT_ALT_NAME {
                    continue;
                }
                match ext.parsed_extension() {
                    ParsedExtension::SubjectAlternativeName(san) => {
                        names.extend(san.general_names.iter())
                    }
                    _ => return Err("csr has a malformed subjectAltName".into()),
                }
            }
        }
        let uri = match names.as_slice() {
            [GeneralName::URI(uri)] => *uri,
            [other] => {
                return Err(format!(
                    "csr subjectAltName {other} is not a URI; it must be the SPIFFE ID"
                ));
            }
            _ => {
                return Err(format!(
                    "csr must name exactly one subjectAltName, the SPIFFE ID; it names {}",
                    names.len()
                ));
            }
        };
        let identity: Identity = uri.parse().map_err(|e| format!("csr: {e}"))?;
        if identity.trust_domain != trust_domain {
            return Err(format!(
                "csr asks for {identity}, outside the trust domain {trust_domain}"
            ));
        }
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| format!("csr public key is not supported: {e}"))?;
        Ok(Csr {
            identity,
            public_key,
        })
    }
}

/// The CA's own certificate and when to renew it.
struct Serving {
    key: Arc<CertifiedKey>,
    serial: String,
    renew_at: SystemTime,
}

#[derive(Debug)]
struct ServingCert(RwLock<Serving>);

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    fn current(&self) -> Arc<CertifiedKey> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .key
            .clone()
    }

    fn renew_at(&self) -> SystemTime {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .renew_at
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn serving_cert(
    ca: &Ca,
    provider: &CryptoProvider,
    names: &[String],
    ttl: Duration,
) -> anyhow::Result<Serving> {
    let now = SystemTime::now();
    let issued = ca
        .issue_server(names, now - CLOCK_SKEW, now + ttl)
        .with_context(|| format!("--server-names {names:?}: making the serving certificate"))?;
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(issued.key))?;
    Ok(Serving {
        key: Arc::new(CertifiedKey::new(vec![issued.cert], key)),
        serial: issued.facts.serial,
        renew_at: now + ttl / 2,
    })
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
