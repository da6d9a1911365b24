//! HTTP servers of the agent's control side: admin on localhost (pods,
//! capture state, metrics), metrics and readiness for the kubelet and
//! Prometheus. Plain HTTP/1.1, one small router.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{
    capture::Capture,
    inpod::pods::{EnrolError, PodSpec, Pods},
    metrics,
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
    /// Everything: localhost only.
    Admin,
    /// `/metrics`.
    Metrics,
    /// `/healthz/ready`.
    Ready,
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("bind {addr}: {e}")))
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>, surface: Surface) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, surface, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "admin connection");
            }
        });
    }
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
    match (surface, &method, path.as_str()) {
        (_, &Method::GET, "/healthz/ready") => {
            // Until the configuration is read once, the agent cannot tell a
            // meshed destination from a plain one.
            if admin.shared.configured && admin.shared.store().generation == 0 {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "configuration not loaded yet\n",
                )
            } else {
                reply(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        (Surface::Admin | Surface::Metrics, &Method::GET, "/metrics" | "/stats/prometheus") => {
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics::encode(&admin.registry),
            )
        }
        (Surface::Admin, &Method::GET, "/pods") => json(StatusCode::OK, &admin.pods.list()),
        (Surface::Admin, &Method::POST, "/pods/enroll") => {
            let spec = match body_json::<EnrollRequest>(req).await {
                Ok(r) => PodSpec {
                    name: r.name,
                    netns: r.netns,
                    uid: None,
                    addresses: Vec::new(),
                    managed: false,
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
        (Surface::Admin, &Method::POST, "/pods/unenroll") => {
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
        (Surface::Admin, &Method::GET, "/config_dump") => {
            let shared = &admin.shared;
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "trust_domain": shared.certs.trust_domain(),
                    "config": shared.store().dump(),
                    "certificates": shared.certs.dump(),
                    "pods": admin.pods.list(),
                    "pods_pending": admin.pods.pending(),
                    "endpoints_down": shared.balancer.down(),
                }),
            )
        }
        (Surface::Admin, &Method::GET, "/logging") => {
            let current = admin
                .log_filter
                .with_current(|f| f.to_string())
                .unwrap_or_default();
            json(StatusCode::OK, &serde_json::json!({ "level": current }))
        }
        (Surface::Admin, &Method::POST, "/logging") => {
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
        (Surface::Admin, &Method::GET, "/capture") => json(StatusCode::OK, &admin.capture.status()),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route for {method} {path}"),
        ),
    }
}
