//! HTTP servers of the agent's control side: the control socket (a Unix
//! socket in the state directory, root or the agent's own user only: the
//! requests that change anything), admin on localhost (read-only pages:
//! pods, capture state, configuration, metrics), metrics and readiness for
//! the kubelet and Prometheus. Plain HTTP/1.1, one small router.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};
use tracing::{debug, warn};

use crate::{
    capture::Capture,
    inpod::pods::{EnrolError, PodSpec, Pods},
    limit, metrics,
    proxy::Shared,
};

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

/// Changes the log filter of the running agent.
pub type LogFilter =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

pub struct Admin {
    pub pods: Arc<Pods>,
    pub capture: Arc<Capture>,
    pub registry: Registry,
    pub shared: Arc<Shared>,
    pub log_filter: LogFilter,
}

/// What a server on a given address answers.
#[derive(Clone, Copy, Debug)]
pub enum Surface {
    /// Everything, changes included: the control socket, for a caller the
    /// socket's peer credentials show as root or the agent's own user.
    Control,
    /// The control socket, for any other caller: refused.
    Refused { uid: u32 },
    /// The read-only pages: localhost TCP, which every host-network process
    /// reaches.
    Admin,
    /// `/metrics`.
    Metrics,
    /// `/healthz/ready`.
    Ready,
}

/// Accept queue of the HTTP listeners: a flood that outruns the accept
/// loop for a moment is queued rather than left to the client's
/// retransmissions (seconds each). The kernel caps it at `somaxconn`.
const BACKLOG: u32 = 4096;

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let ctx = |e: std::io::Error| std::io::Error::new(e.kind(), format!("bind {addr}: {e}"));
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(ctx)?;
    // As std's bind does: a restarted agent rebinds over TIME_WAIT.
    socket.set_reuseaddr(true).map_err(ctx)?;
    // A next agent binds beside a draining one (an upgrade).
    socket.set_reuseport(true).map_err(ctx)?;
    socket.bind(addr).map_err(ctx)?;
    socket.listen(BACKLOG).map_err(ctx)
}

/// Binds the control socket at `path` (replacing one a previous agent
/// left), readable and writable by its owner only.
pub fn bind_control(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let ctx = |e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(ctx(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(ctx)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(ctx)?;
    Ok(listener)
}

/// The control socket in a state directory.
pub fn control_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.sock")
}

/// Pause after a failed accept (EMFILE and friends) rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// A request's head must arrive in this time, counted from when the
/// server starts waiting for it (a new or an idle kept-alive connection):
/// a connection that sends nothing, or a byte at a time, is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer, whatever it does (a client that reads its
/// answer a byte at a time); scrapers and probes reconnect.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Serves a TCP listener within [`limit::CONTROL`]: every host-network
/// process and, on 15020/15021 (all addresses, for the kubelet and
/// Prometheus), every pod reaches it.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, surface: Surface) {
    let direction = match surface {
        Surface::Metrics => "metrics",
        Surface::Ready => "ready",
        Surface::Admin | Surface::Control | Surface::Refused { .. } => "admin",
    };
    let gate = limit::Gate::new(limit::CONTROL, admin.shared.metrics.clone(), direction);
    loop {
        let (stream, _, admitted) = gate.accept(&listener).await;
        serve_conn(stream, admin.clone(), surface, Some((admitted, direction)));
    }
}

/// Serves the control socket. The file mode already keeps other users
/// out; the peer's credentials are checked as well, so that a socket
/// made reachable by mistake still answers only root and the agent's user.
pub async fn serve_control(listener: UnixListener, admin: Arc<Admin>) {
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let surface = match stream.peer_cred() {
                    Ok(c) if c.uid() == 0 || c.uid() == own => Surface::Control,
                    Ok(c) => Surface::Refused { uid: c.uid() },
                    Err(e) => {
                        warn!(error = %e, "control socket: no peer credentials; closing");
                        continue;
                    }
                };
                serve_conn(stream, admin.clone(), surface, None);
            }
            Err(e) => {
                debug!(error = %e, "control accept");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves one connection; a TCP one holds its place in the listener's
/// limits (`admitted`) until it ends, and its timeouts are counted under
/// the listener's name.
fn serve_conn<S>(
    stream: S,
    admin: Arc<Admin>,
    surface: Surface,
    admitted: Option<(limit::Admitted, &'static str)>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let metrics = admin.shared.metrics.clone();
        let svc = service_fn(move |req| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(route(&admin, surface, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), svc);
        // A scrape or probe served is not counted: only what was cut off.
        let cut = match tokio::time::timeout(MAX_CONNECTION_AGE, conn).await {
            Ok(Err(e)) if e.is_timeout() => Some("header_timeout"),
            Ok(Err(e)) => {
                debug!(error = %e, "admin connection");
                None
            }
            Err(_) => Some("max_age"),
            Ok(Ok(())) => None,
        };
        if let (Some((_admitted, direction)), Some(cut)) = (admitted, cut) {
            metrics.connection(direction, cut);
        }
    });
}

/// ztunnel's sections (`workloads`, `services`, `policies`,
/// `certificates`, `workloadState`), then this agent's own.
fn config_dump(admin: &Admin) -> serde_json::Value {
    let shared = &admin.shared;
    let store = shared.store();
    let mut dump = store.ztunnel_dump(&shared.metrics.cluster_id.0);
    dump["certificates"] = serde_json::json!(shared.certs.ztunnel_dump());
    dump["workloadState"] = workload_state(admin, &store);
    dump["trust_domain"] = serde_json::json!(shared.certs.trust_domain());
    dump["config"] = store.dump();
    dump["certificate_summary"] = serde_json::json!(shared.certs.dump());
    dump["pods"] = serde_json::json!(admin.pods.list());
    dump["pods_pending"] = serde_json::json!(admin.pods.pending());
    dump["endpoints_down"] = serde_json::json!(shared.balancer.down());
    dump
}

/// ztunnel's `workloadState`: each pod this agent serves (`Up`) or is
/// waiting to serve (`Pending`), by the UID its workload has in
/// `workloads` (by its name when the configuration does not list it),
/// with its name, namespace and ServiceAccount.
fn workload_state(admin: &Admin, store: &crate::state::Store) -> serde_json::Value {
    use crate::state::Workload;
    let cluster = &admin.shared.metrics.cluster_id.0;
    let entry = |name: &str, wl: Option<&Workload>, state: &str| {
        let (key, info) = match wl {
            Some(w) => (
                crate::state::ztunnel_uid(w, cluster),
                serde_json::json!({
                    "name": w.name,
                    "namespace": &*w.namespace,
                    "serviceAccount": &*w.service_account,
                }),
            ),
            None => {
                let (namespace, pod) = name.split_once('/').unwrap_or(("", name));
                (
                    name.to_owned(),
                    serde_json::json!({ "name": pod, "namespace": namespace, "serviceAccount": "" }),
                )
            }
        };
        (key, serde_json::json!({ "state": state, "info": info }))
    };
    let by_name = |name: &str| {
        let (namespace, pod) = name.split_once('/')?;
        store.workload(namespace, pod).map(|w| &**w)
    };
    let mut out = serde_json::Map::new();
    for pod in admin.pods.list() {
        // A pod enrolled by hand is found by its addresses.
        let wl = by_name(&pod.name).or_else(|| {
            pod.addresses
                .iter()
                .find_map(|ip| store.workload_by_ip(*ip).map(|w| &**w))
        });
        let (key, v) = entry(&pod.name, wl, "Up");
        out.insert(key, v);
    }
    for (name, reason) in admin.pods.pending() {
        let (key, mut v) = entry(&name, by_name(&name), "Pending");
        v["reason"] = serde_json::json!(reason);
        // A pod served already (enrolled by hand) is up.
        out.entry(key).or_insert(v);
    }
    serde_json::Value::Object(out)
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).expect("serializable");
    body.push(b'\n');
    reply(status, "application/json", body)
}

fn error(status: StatusCode, msg: String) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": msg }))
}

fn enrol_status(e: &EnrolError) -> StatusCode {
    match e.kind() {
        "conflict" => StatusCode::CONFLICT,
        "not_found" => StatusCode::NOT_FOUND,
        "bad_netns" => StatusCode::BAD_REQUEST,
        "draining" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A pod enrolled by hand: the configuration never releases it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    name: String,
    netns: std::path::PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnenrollRequest {
    name: String,
}

async fn body_json<T: serde::de::DeserializeOwned>(
    req: Request<hyper::body::Incoming>,
) -> Result<T, String> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading request body: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("invalid request body: {e}"))
}

async fn route(
    admin: &Admin,
    surface: Surface,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if let Surface::Refused { uid } = surface {
        warn!(uid, %method, %path, "control socket: caller refused");
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "the agent's control socket answers only root and the agent's own user; caller uid {uid} refused"
            ),
        );
    }
    if matches!(surface, Surface::Admin)
        && method == Method::POST
        && matches!(
            path.as_str(),
            "/pods/enroll" | "/pods/unenroll" | "/logging"
        )
    {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "POST {path} is served only on the agent's control socket (STATE_DIR/admin.sock, root or the agent's user); use `mesh-agent pods ...`"
            ),
        );
    }
    let full = matches!(surface, Surface::Control | Surface::Admin);
    match (surface, &method, path.as_str()) {
        (_, &Method::GET, "/healthz/ready") => {
            // Until the configuration is read once, the agent cannot tell a
            // meshed destination from a plain one.
            if crate::drain::is_draining() {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else if admin.shared.configured && admin.shared.store().generation == 0 {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "configuration not loaded yet\n",
                )
            } else {
                reply(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        (
            Surface::Control | Surface::Admin | Surface::Metrics,
            &Method::GET,
            "/metrics" | "/stats/prometheus",
        ) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics::encode(&admin.registry),
        ),
        (_, &Method::GET, "/pods") if full => json(StatusCode::OK, &admin.pods.list()),
        (Surface::Control, &Method::POST, "/pods/enroll") => {
            let spec = match body_json::<EnrollRequest>(req).await {
                Ok(r) => PodSpec {
                    name: r.name,
                    netns: r.netns,
                    uid: None,
                    addresses: Vec::new(),
                    managed: false,
                    workload: None,
                },
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            };
            let pods = admin.pods.clone();
            match tokio::task::spawn_blocking(move || pods.enroll(&spec)).await {
                Ok(Ok(info)) => json(StatusCode::OK, &info),
                Ok(Err(e)) => {
                    warn!(error = %e, "enrolment refused");
                    error(enrol_status(&e), e.to_string())
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (Surface::Control, &Method::POST, "/pods/unenroll") => {
            let r: UnenrollRequest = match body_json(req).await {
                Ok(s) => s,
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            };
            let pods = admin.pods.clone();
            match tokio::task::spawn_blocking(move || pods.unenroll(&r.name)).await {
                Ok(Ok(info)) => json(StatusCode::OK, &info),
                Ok(Err(e)) => error(enrol_status(&e), e.to_string()),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (_, &Method::GET, "/config_dump") if full => json(StatusCode::OK, &config_dump(admin)),
        (_, &Method::GET, "/logging") if full => {
            let current = admin
                .log_filter
                .with_current(|f| f.to_string())
                .unwrap_or_default();
            json(StatusCode::OK, &serde_json::json!({ "level": current }))
        }
        (Surface::Control, &Method::POST, "/logging") => {
            let level = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="))
                .unwrap_or("");
            match tracing_subscriber::EnvFilter::try_new(level) {
                Ok(f) if !level.is_empty() => match admin.log_filter.reload(f) {
                    Ok(()) => {
                        tracing::info!(level, "log level changed");
                        json(StatusCode::OK, &serde_json::json!({ "level": level }))
                    }
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                },
                Ok(_) => error(
                    StatusCode::BAD_REQUEST,
                    "give the filter as ?level=, e.g. ?level=info,access=off".into(),
                ),
                Err(e) => error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid log filter {level:?}: {e}"),
                ),
            }
        }
        (_, &Method::GET, "/capture") if full => {
            let mut status = admin.capture.status();
            status["probe_snat"] = serde_json::json!(admin.pods.probe_status());
            json(StatusCode::OK, &status)
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route for {method} {path}"),
        ),
    }
}
