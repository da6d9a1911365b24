//! One HTTP request at the waypoint: authorize (403 `RBAC: access
//! denied`, or `grpc-status: 7` for gRPC), route (HTTPRoute: the first
//! matching entry by precedence; no match means the Service itself),
//! apply the rule's filters, pick a weighted backend and one of its
//! endpoints, send it on (with retries and timeouts), and count it.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{
    HeaderMap, Request, Response, StatusCode, Uri,
    body::{Body as _, Bytes, Frame, Incoming, SizeHint},
    header::{self, HeaderValue},
};
use hyper_util::client::legacy::connect::capture_connection;
use tracing::{debug, info};

use super::{
    Client, Ctx,
    balance::{self, Choice, Keys},
    path,
    resilience::{self, Admit, Outcome},
    telemetry::HttpLabels,
    trace::{Span, TraceContext},
    upstream::{self, Body},
};
use crate::{
    proxy::{Peer, Security, tcp_labels},
    state::{
        Abort, Backend, Decision, IngressGateway, L7Request, ListenerProtocol, RequestView,
        RuleAction, Waypoint, WaypointTarget, Workload, host_only, modify_path,
    },
};

pub struct Handler {
    pub ctx: Arc<Ctx>,
    pub client: Client,
    /// The Gateway whose policies and limits apply (a waypoint, or an
    /// ingress gateway's anchor).
    pub waypoint: Arc<Waypoint>,
    pub role: Role,
    /// The CONNECT authority (the original destination), or the ingress
    /// listener's own address.
    pub dst: std::net::SocketAddr,
}

/// What the request was sent to.
pub enum Role {
    /// At a waypoint: the Service or pod of the CONNECT; routes of that
    /// Service, else the Service itself.
    Waypoint(WaypointTarget),
    /// At an ingress gateway, on a listener port: the routes attached to
    /// the Gateway pick the backend; no route, 404. For HTTPS, the listener
    /// the handshake's SNI chose: a request for another one is 421.
    Ingress(Arc<IngressGateway>, ListenerProtocol, Option<String>),
}

impl Handler {
    /// The `mesh_connections` component and the metrics' reporter.
    fn component(&self) -> &'static str {
        match self.role {
            Role::Waypoint(_) => "waypoint",
            Role::Ingress(..) => "ingress",
        }
    }

    fn target(&self) -> Option<&WaypointTarget> {
        match &self.role {
            Role::Waypoint(t) => Some(t),
            Role::Ingress(..) => None,
        }
    }
}

/// Headers that belong to one hop and are not passed on.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("a status and a text body are valid parts")
}

fn empty_body() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// 16 random bytes as 32 hex digits, for request ids.
fn random_hex() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

/// A pseudo-random number, for ids (trace, span and request ids), shares
/// of requests and random picks; never for keys. SplitMix64 on a state of
/// each thread's own, seeded once from the kernel: a tunnel or a request
/// takes no system call for its ids.
pub fn random_u64() -> u64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(seed());
    }
    STATE.with(|state| {
        let x = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(x);
        let z = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A thread's first state: 8 bytes from the kernel, or the clock's
/// nanoseconds mixed with the thread's stack address if that fails.
fn seed() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: writes at most 8 bytes into an 8-byte buffer.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 8 {
        return u64::from_le_bytes(buf);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    nanos ^ (&buf as *const _ as u64).rotate_left(32)
}

/// True for `percent` percent of calls.
pub fn chance(percent: f64) -> bool {
    percent >= 100.0 || (random_u64() % 1_000_000) as f64 / 10_000.0 < percent
}

/// What one request became, for its metrics and access log line.
struct Done {
    labels: HttpLabels,
    client: std::net::SocketAddr,
    start: Instant,
    method: String,
    authority: String,
    path: String,
    upstream: String,
    route: String,
    policy: String,
    request_bytes: Arc<AtomicU64>,
    /// The trace, when this request is sampled and spans are exported.
    trace: Option<TraceContext>,
    started: SystemTime,
    /// When the upstream call was sent and answered.
    upstream_times: Option<(SystemTime, SystemTime)>,
    request_id: String,
    user_agent: String,
    /// `host:port/*` of what was asked for, Istio's span name.
    span_name: String,
    /// `outbound|port|subset|host` of the backend chosen.
    upstream_cluster: String,
}

impl Handler {
    pub async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let ctx = &self.ctx;
        let store = ctx.store();
        // An HTTP/1.1 Upgrade (WebSocket): the upgraded bytes are passed
        // through once the backend answers 101.
        let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let grpc = is_grpc(&parts.headers);
        let header_host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned);
        let uri_host = parts.uri.authority().map(|a| a.as_str().to_owned());
        // Policy reads one host; the backend must see that same one.
        if let (Some(u), Some(h)) = (&uri_host, &header_host)
            && !u.eq_ignore_ascii_case(h)
        {
            ctx.metrics.connection(self.component(), "host_mismatch");
            return full(
                StatusCode::BAD_REQUEST,
                "the request's authority and Host differ\n",
            );
        }
        let host = uri_host.or(header_host).unwrap_or_default();
        // Authorized, routed and sent on in its normalized form.
        let path = path::normalize(parts.uri.path());
        if path != parts.uri.path() {
            let pq = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            let mut uri = parts.uri.clone().into_parts();
            if let Ok(pq) = pq.parse() {
                uri.path_and_query = Some(pq);
                if let Ok(u) = Uri::from_parts(uri) {
                    parts.uri = u;
                }
            }
        }
        let query = parts.uri.query().map(str::to_owned);
        let service = match self.target() {
            Some(WaypointTarget::Service(s, _)) => Some(s.clone()),
            _ => None,
        };
        let src_workload = store.workload_by_ip(self.client.addr.ip()).cloned();
        let mut done = Done {
            labels: HttpLabels {
                conn: tcp_labels(
                    &ctx.metrics.cluster_id.0,
                    // Istio's gateways report as the source of the call.
                    match self.role {
                        Role::Waypoint(_) => "waypoint",
                        Role::Ingress(..) => "source",
                    },
                    &Peer {
                        addr: Some(self.client.addr),
                        workload: src_workload,
                        identity: self.client.identity.clone(),
                    },
                    &Peer::default(),
                    service.as_deref(),
                    Security::MutualTls,
                ),
                response_code: String::new(),
                grpc_response_status: "-".into(),
            },
            client: self.client.addr,
            start,
            method: parts.method.to_string(),
            authority: host.clone(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".into(), |p| p.as_str().to_owned()),
            upstream: String::new(),
            route: "-".into(),
            policy: "allow".into(),
            request_bytes: Arc::new(AtomicU64::new(0)),
            trace: None,
            started: SystemTime::now(),
            upstream_times: None,
            request_id: String::new(),
            span_name: match self.target() {
                Some(WaypointTarget::Service(s, p)) => format!("{}:{}/*", s.hostname(), p.port),
                Some(WaypointTarget::Workload(_, a)) => format!("{a}/*"),
                None => format!("{host}/*"),
            },
            upstream_cluster: String::new(),
            user_agent: parts
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        };
        // The trace this request joins (or starts), read before any header
        // is changed.
        let trace = TraceContext::from_headers(&parts.headers, ctx.tracer.sampling);
        done.labels.conn.request_protocol = if grpc { "grpc" } else { "http" };

        // Authorization first: a denied request reaches no backend.
        let l7 = L7Request {
            method: parts.method.as_str(),
            path: &path,
            host: &host,
            headers: &parts.headers,
        };
        let attrs = crate::state::Attrs {
            src_ip: self.client.addr.ip(),
            src_identity: self.client.identity.as_ref(),
            dst_ip: self.dst.ip(),
            dst_port: self.dst.port(),
            request: Some(&l7),
        };
        let (decision, audited) =
            store.authorize_at_waypoint(&self.waypoint, service.as_deref(), &attrs);
        if !audited.is_empty() {
            done.policy = format!("audit:{}", audited.join(","));
        }
        if let Decision::Deny { reason, .. } = decision {
            ctx.metrics.connection(self.component(), "request_denied");
            debug!(%reason, "request denied");
            done.policy = format!("deny: {reason}");
            let resp = if grpc {
                grpc_error(7, "RBAC: access denied")
            } else {
                full(StatusCode::FORBIDDEN, "RBAC: access denied")
            };
            return self.finish(done, resp, "RBAC");
        }

        // Rate limits, after authorization: a denied request costs no token.
        let limits = store.rate_limits(&self.waypoint, service.as_deref());
        if let Err(wait) = ctx
            .rate_limiter
            .check(limits, self.client.identity.as_ref())
        {
            done.policy = "rate limited".into();
            let resp = if grpc {
                grpc_error(8, "rate limited")
            } else {
                let mut r = full(StatusCode::TOO_MANY_REQUESTS, "rate limited");
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    r.headers_mut().insert(header::RETRY_AFTER, v);
                }
                r
            };
            return self.finish(done, resp, "RL");
        }

        // Route: the first match by precedence; none means the Service.
        let view = RequestView {
            method: &parts.method,
            path: &path,
            query: query.as_deref(),
            headers: &parts.headers,
        };
        let listener = match &self.role {
            Role::Ingress(gw, protocol, sni_listener) => {
                let listener = gw.listener(self.dst.port(), *protocol, Some(host_only(&host)));
                if listener.is_none() {
                    ctx.metrics.connection("ingress", "no_listener");
                    done.upstream = "no listener for this host".into();
                    return self.finish(done, full(StatusCode::NOT_FOUND, "no route\n"), "NR");
                }
                if let (Some(l), Some(sni)) = (listener, sni_listener)
                    && l.name != *sni
                {
                    ctx.metrics.connection("ingress", "misdirected");
                    done.upstream = format!("host of listener {}, TLS of listener {sni}", l.name);
                    return self.finish(
                        done,
                        full(
                            StatusCode::MISDIRECTED_REQUEST,
                            "the host is not the one the connection's TLS name chose\n",
                        ),
                        "NR",
                    );
                }
                listener
            }
            Role::Waypoint(_) => None,
        };
        let entry = match (&self.role, listener) {
            (Role::Waypoint(WaypointTarget::Service(svc, port)), _) => {
                store.route(svc, port.port, &view)
            }
            (Role::Ingress(gw, ..), Some(l)) => {
                let entry = store.ingress_route(gw, l, host_only(&host), &view);
                if entry.is_none() {
                    ctx.metrics.connection("ingress", "no_route");
                    done.upstream = "no route".into();
                    return self.finish(done, full(StatusCode::NOT_FOUND, "no route\n"), "NR");
                }
                entry
            }
            _ => None,
        };
        let action: Option<Arc<RuleAction>> = entry.map(|e| e.action.clone());
        let matched_path = entry.map(|e| e.matcher.path.clone());
        if let Some(a) = &action {
            done.route = format!("{} rule {}", a.route, a.rule);
        }

        if let Some(r) = action.as_ref().and_then(|a| a.redirect.as_ref()) {
            let scheme = r.scheme.as_deref().unwrap_or("http");
            let hostname = r
                .hostname
                .clone()
                .unwrap_or_else(|| host.split(':').next().unwrap_or_default().to_owned());
            let port = r.port.map(|p| format!(":{p}")).unwrap_or_default();
            let new_path = r.path.as_ref().map_or_else(
                || path.clone(),
                |m| modify_path(&path, m, matched_path.as_ref()),
            );
            let q = query.as_ref().map(|q| format!("?{q}")).unwrap_or_default();
            let location = format!("{scheme}://{hostname}{port}{new_path}{q}");
            let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
            let resp = Response::builder()
                .status(status)
                .header(header::LOCATION, location)
                .body(empty_body())
                .expect("redirect parts are valid");
            return self.finish(done, resp, "-");
        }

        // The request as the backend will see it.
        let mut path_and_query = parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        if let Some(a) = &action {
            a.request_headers.apply(&mut parts.headers);
            if let Some(rw) = &a.rewrite {
                if let Some(h) = &rw.hostname
                    && let Ok(v) = HeaderValue::from_str(h)
                {
                    parts.headers.insert(header::HOST, v);
                }
                if let Some(m) = &rw.path {
                    let p = modify_path(&path, m, matched_path.as_ref());
                    let q = query.as_ref().map(|q| format!("?{q}")).unwrap_or_default();
                    path_and_query = format!("{p}{q}");
                }
            }
        }
        strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
        if !parts.headers.contains_key("x-request-id") {
            let id = random_hex();
            if let Ok(v) = HeaderValue::from_str(&id) {
                parts.headers.insert("x-request-id", v);
            }
        }
        done.request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        // The upstream call carries the waypoint's client span.
        trace.inject(&mut parts.headers);
        if trace.sampled && ctx.tracer.enabled() {
            done.trace = Some(trace);
        }

        // Which Service port serves it: a weighted backend of the rule, or
        // the Service (or pod) it was sent to.
        let request_port = match self.target() {
            Some(WaypointTarget::Service(_, p)) => p.port,
            Some(WaypointTarget::Workload(_, a)) => a.port(),
            None => self.dst.port(),
        };
        let chosen: Result<Choice, String> = match action.as_deref() {
            Some(a) if !a.backends.is_empty() => {
                self.pick(a).and_then(|b| backend_choice(b, request_port))
            }
            _ => match self.target() {
                Some(t) => Ok(Choice::from(t.clone())),
                // The Gateway API: a rule without backends is answered 500.
                None => Err("the rule has no backendRefs".into()),
            },
        };
        let chosen = match chosen {
            Ok(t) => t,
            Err(why) => {
                done.upstream = why;
                return self.finish(
                    done,
                    full(StatusCode::INTERNAL_SERVER_ERROR, "backend not resolved\n"),
                    "NR",
                );
            }
        };
        done.upstream_cluster = match &chosen.target {
            WaypointTarget::Service(s, p) => format!(
                "outbound|{}|{}|{}",
                p.port,
                chosen.subset.as_ref().map_or("", |(n, _)| n.as_str()),
                s.hostname()
            ),
            WaypointTarget::Workload(w, a) => format!("outbound|{}||{}", a.port(), w.name),
        };
        if let WaypointTarget::Service(svc, _) = &chosen.target {
            done.labels.conn.destination_service = svc.hostname();
            done.labels.conn.destination_service_name = svc.name.clone();
            done.labels.conn.destination_service_namespace = svc.namespace.clone();
        }

        // Only a request without a body is copied: its copy is complete.
        if let Some(a) = action.as_ref().filter(|_| body.is_end_stream()) {
            for m in &a.mirrors {
                if chance(f64::from(m.percent))
                    && let Ok(t) = backend_choice(&m.backend, request_port)
                {
                    self.mirror(t, &parts, &path_and_query);
                }
            }
        }

        let retry = action.as_ref().map(|a| a.retry.clone()).unwrap_or_default();
        let try_timeout = action.as_ref().and_then(|a| a.backend_timeout);
        let timeout = action.as_ref().and_then(|a| a.timeout);
        // Only a request without a body can be sent again.
        let replayable = body.is_end_stream() && upgrade.is_none();
        let mut upgrade = upgrade;
        let counter = done.request_bytes.clone();
        let mut body = Some(
            Counting {
                inner: body,
                count: counter,
            }
            .boxed_unsync(),
        );
        // Istio's fault injection: a delay, then an abort, for a share of
        // requests each.
        if let Some(fault) = action.as_ref().and_then(|a| a.fault.as_ref()) {
            if let Some((delay, percent)) = fault.delay
                && chance(percent)
            {
                done.labels.conn.response_flags = "DI";
                tokio::time::sleep(delay).await;
            }
            if let Some((abort, percent)) = fault.abort
                && chance(percent)
            {
                let resp = match (abort, grpc) {
                    (Abort::Grpc(code), _) => grpc_error(code, "fault filter abort"),
                    (Abort::Http(code), true) => {
                        grpc_error(http_to_grpc(code), "fault filter abort")
                    }
                    (Abort::Http(code), false) => {
                        let mut r = full(StatusCode::OK, "fault filter abort");
                        *r.status_mut() =
                            StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                        r
                    }
                };
                done.upstream = "fault injected".into();
                return self.finish(done, resp, "FI");
            }
        }
        let keys = Keys {
            headers: Some(&parts.headers),
            client: Some(self.client.addr.ip()),
        };
        // A Service that asks an ingress gateway for its waypoint and whose
        // waypoint cannot serve it is refused, never sent around it.
        if let (Role::Ingress(..), WaypointTarget::Service(svc, _)) = (&self.role, &chosen.target)
            && let Some(Err(why)) = store.ingress_waypoint(svc)
        {
            ctx.metrics.connection("ingress", "no_waypoint");
            done.upstream = why;
            return self.finish(
                done,
                full(StatusCode::SERVICE_UNAVAILABLE, "no waypoint\n"),
                "NW",
            );
        }
        let endpoints = balance::endpoints(ctx, &store, &chosen, keys);
        let endpoints = balance::or_resolved(&store, &chosen, endpoints).await;
        let origination = super::origination_for(&store, &chosen.target);
        // The DestinationRule's circuit breakers for the chosen Service.
        // Per subset, else per port, else per Service (Istio's precedence).
        let subset = chosen.subset.as_ref().map(|(n, _)| n.as_str());
        let (policy, breaker_key, port) = match &chosen.target {
            WaypointTarget::Service(svc, port) => (
                store.destination_policy(svc),
                format!("{}:{}", svc.hostname(), port.port),
                port.port,
            ),
            WaypointTarget::Workload(..) => (None, String::new(), 0),
        };
        let pool_key = format!("{breaker_key}:{}", subset.unwrap_or(""));
        let per_connection = policy
            .and_then(|p| p.connection_pool_for(subset, port))
            .and_then(|c| c.max_requests_per_connection);
        let admitted = tokio::time::timeout(
            resilience::QUEUE_TIMEOUT,
            ctx.limits.admit(
                &pool_key,
                policy.and_then(|p| p.connection_pool_for(subset, port)),
            ),
        )
        .await;
        let _place = match admitted {
            Ok(Admit::Go(place)) => place,
            Ok(Admit::Overflow) | Err(_) => {
                done.upstream = "connectionPool full".into();
                return self.finish(
                    done,
                    full(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow"),
                    "UO",
                );
            }
        };
        let outlier = policy.and_then(|p| p.outlier_detection_for(subset, port));
        // maxEjectionPercent counts among all the endpoints, ejected ones
        // included (`endpoints` leaves those out).
        let population = match (&chosen.target, outlier) {
            (WaypointTarget::Service(svc, port), Some(_)) => store.endpoints(svc, port),
            _ => Vec::new(),
        };
        let observe = |addr, outcome| {
            if let Some(config) = outlier {
                ctx.outliers
                    .observe(&breaker_key, &population, addr, outcome, config);
            }
        };
        if endpoints.is_empty() {
            done.upstream = "no endpoint".into();
            return self.finish(
                done,
                full(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n"),
                "UH",
            );
        }
        let attempts = if replayable {
            1 + retry.attempts as usize
        } else {
            1
        };
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut last: Option<(Response<Body>, &'static str)> = None;
        for (i, ep) in endpoints.iter().cycle().take(attempts).enumerate() {
            if i > 0 {
                tokio::time::sleep(retry.backoff).await;
            }
            done.upstream = ep.addr.to_string();
            if let Some(wl) = &ep.workload {
                self.set_destination(&mut done, wl);
            }
            let _in_flight = ctx.in_flight.start(ep.addr);
            let uri: Uri = match format!("http://{}{}", ep.addr, path_and_query).parse() {
                Ok(u) => u,
                Err(_) => {
                    return self.finish(done, full(StatusCode::BAD_REQUEST, "bad path\n"), "-");
                }
            };
            let mut up = Request::from_parts(parts.clone(), body.take().unwrap_or_else(empty_body));
            *up.uri_mut() = uri;
            *up.version_mut() = hyper::Version::HTTP_11;
            // Originated TLS carries HTTP/1.1 (no ALPN is offered).
            let originating = origination.as_ref().map(|o| ctx.clients.originating(o));
            let client = match &originating {
                Some(c) => c,
                None if parts.version == hyper::Version::HTTP_2 => {
                    *up.version_mut() = hyper::Version::HTTP_2;
                    &ctx.clients.http2
                }
                None => &ctx.clients.http1,
            };
            let sent_at = SystemTime::now();
            let connection = capture_connection(&mut up);
            let send = client.request(up);
            let limit = match (try_timeout, deadline) {
                (Some(t), Some(d)) => Some(d.min(tokio::time::Instant::now() + t)),
                (Some(t), None) => Some(tokio::time::Instant::now() + t),
                (None, d) => d,
            };
            let result = match limit {
                Some(at) => match tokio::time::timeout_at(at, send).await {
                    Ok(r) => r,
                    Err(_) => {
                        last = Some((
                            full(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
                            "UT",
                        ));
                        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                            break;
                        }
                        continue;
                    }
                },
                None => send.await,
            };
            match &result {
                Ok(resp) => observe(ep.addr, Outcome::Status(resp.status().as_u16())),
                Err(_) => observe(ep.addr, Outcome::Failed),
            }
            // A connection that has carried its share is not used again; it
            // closes once this response is read.
            if let (Some(max), Some(conn)) =
                (per_connection, connection.connection_metadata().as_ref())
            {
                let mut extra = hyper::http::Extensions::new();
                conn.get_extras(&mut extra);
                if extra
                    .get::<upstream::Served>()
                    .is_some_and(|s| s.count(max))
                {
                    conn.poison();
                }
            }
            match result {
                Ok(resp) if retry.codes.contains(&resp.status().as_u16()) && i + 1 < attempts => {
                    debug!(endpoint = %ep.addr, status = %resp.status(), "retrying");
                    last = Some((resp.map(http_body_util::BodyExt::boxed_unsync), "URX"));
                }
                Ok(mut resp) => {
                    done.upstream_times = Some((sent_at, SystemTime::now()));
                    ctx.balancer.mark_up(ep.addr);
                    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                    if switched && let Some(down) = upgrade.take() {
                        let up = hyper::upgrade::on(&mut resp);
                        tokio::spawn(splice_upgrade(down, up));
                    }
                    let (mut rp, rb) = resp.into_parts();
                    strip_hop_by_hop(&mut rp.headers, switched);
                    if let Some(a) = &action {
                        a.response_headers.apply(&mut rp.headers);
                    }
                    return self.finish(done, Response::from_parts(rp, rb.boxed_unsync()), "-");
                }
                Err(e) => {
                    debug!(endpoint = %ep.addr, error = %e, "upstream failed");
                    // A refused certificate is the configuration's (or the
                    // host's) fault, not the endpoint's health: said, counted,
                    // and not retried elsewhere in vain.
                    if let Some(f) = super::origination::TlsFailure::find(&e) {
                        let service = match &chosen.target {
                            WaypointTarget::Service(svc, _) => Some(&**svc),
                            WaypointTarget::Workload(..) => None,
                        };
                        ctx.count_tls_failure(service, f);
                        done.upstream = format!("{}: {f}", ep.addr);
                        let body = format!("upstream connect error: {f}\n");
                        let resp = full(StatusCode::SERVICE_UNAVAILABLE, body);
                        return self.finish(done, resp, "UF");
                    }
                    if e.is_connect() {
                        ctx.balancer.mark_down(ep.addr);
                    }
                    last = Some((
                        full(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n"),
                        "UF",
                    ));
                }
            }
        }
        let (resp, flags) = last.unwrap_or_else(|| {
            (
                full(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n"),
                "UH",
            )
        });
        self.finish(done, resp, flags)
    }

    fn set_destination(&self, done: &mut Done, wl: &Arc<Workload>) {
        let l = &mut done.labels.conn;
        let td = self.ctx.certs.trust_domain();
        l.destination_workload = wl.workload_name().to_owned();
        l.destination_workload_namespace = wl.namespace.to_string();
        l.destination_principal = wl.identity(td).to_string();
        l.destination_app = wl.app().to_owned();
        l.destination_version = wl.version().to_owned();
        l.destination_canonical_service = wl.app().to_owned();
        l.destination_canonical_revision = wl.version().to_owned();
        l.destination_cluster = "Kubernetes".into();
    }

    /// A weighted choice among the rule's backends, spread evenly over
    /// consecutive requests.
    fn pick<'a>(&self, a: &'a RuleAction) -> Result<&'a Backend, String> {
        let total: u64 = a.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return Err("every backend has weight 0".into());
        }
        // A multiplicative hash of a counter: consecutive requests land far
        // apart, so a 90/10 split holds over small windows too.
        let n = self.ctx.picks.fetch_add(1, Ordering::Relaxed);
        let mut at = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % total;
        for b in &a.backends {
            let w = u64::from(b.weight);
            if at < w {
                return Ok(b);
            }
            at -= w;
        }
        Err("no backend".into())
    }

    /// Sends a copy of a request to a mirror; its answer is dropped and it
    /// never delays the original (only requests without a body are copied).
    fn mirror(&self, target: Choice, parts: &hyper::http::request::Parts, pq: &str) {
        let ctx = self.ctx.clone();
        let mut parts = parts.clone();
        let pq = pq.to_owned();
        tokio::spawn(async move {
            let store = ctx.store();
            let Some(ep) = balance::endpoints(&ctx, &store, &target, Keys::default())
                .into_iter()
                .next()
            else {
                return;
            };
            let Ok(uri) = format!("http://{}{}", ep.addr, pq).parse::<Uri>() else {
                return;
            };
            parts.uri = uri;
            // A mirror a DestinationRule originates TLS to gets it too: its
            // copy must not leave in plaintext where the original does not.
            let originating =
                super::origination_for(&store, &target.target).map(|o| ctx.clients.originating(&o));
            let client = match &originating {
                Some(c) => {
                    parts.version = hyper::Version::HTTP_11;
                    c
                }
                None if parts.version == hyper::Version::HTTP_2 => &ctx.clients.http2,
                None => {
                    parts.version = hyper::Version::HTTP_11;
                    &ctx.clients.http1
                }
            };
            if let Some(h) = parts.headers.get(header::HOST).cloned()
                && let Ok(s) = h.to_str()
                && let Ok(v) = HeaderValue::from_str(&format!("{s}-shadow"))
            {
                parts.headers.insert(header::HOST, v);
            }
            let req = Request::from_parts(parts, empty_body());
            let sent = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await;
            if let Ok(Ok(resp)) = sent {
                // Read and drop, so the connection can be reused.
                let _ = resp.into_body().collect().await;
            }
        });
    }

    /// Wraps the response so that the metrics and the access log line are
    /// written when its body ends.
    fn finish(&self, mut done: Done, resp: Response<Body>, flags: &'static str) -> Response<Body> {
        done.labels.response_code = resp.status().as_u16().to_string();
        done.labels.conn.response_flags = flags;
        if let Some(s) = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
        {
            done.labels.grpc_response_status = grpc_status_label(s);
        }
        let ctx = self.ctx.clone();
        let (parts, body) = resp.into_parts();
        let metered = Metered {
            inner: body,
            bytes: 0,
            done: Some(done),
            ctx,
        };
        Response::from_parts(parts, metered.boxed_unsync())
    }
}

/// Removes the headers that belong to one hop; an upgrade keeps its
/// `Connection` and `Upgrade`, which the next hop must see.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    let kept = upgrading.then(|| {
        (
            headers.get(header::CONNECTION).cloned(),
            headers.get(header::UPGRADE).cloned(),
        )
    });
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    if let Some((Some(c), Some(u))) = kept {
        headers.insert(header::CONNECTION, c);
        headers.insert(header::UPGRADE, u);
    }
}

/// `Connection: upgrade` with an `Upgrade` header (HTTP/1.1).
/// Only WebSocket is passed through, as Istio's default allows; other
/// upgrades go on as plain requests without their upgrade headers.
fn is_upgrade(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
        })
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Passes the bytes of an upgraded connection (WebSocket) both ways.
async fn splice_upgrade(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(x) => x,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut down = hyper_util::rt::TokioIo::new(down);
    let mut up = hyper_util::rt::TokioIo::new(up);
    let _ = crate::proxy::relay(&mut down, &mut up).await;
}

/// A gRPC error as a trailers-only response.
fn grpc_error(code: u8, message: &'static str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("grpc-status", code.to_string())
        .header("grpc-message", message)
        .body(empty_body())
        .expect("static response parts are valid")
}

/// The Service port (and subset) a backend names; port 0 means the port
/// the request came on, else the Service's first.
fn backend_choice(b: &Backend, request_port: u16) -> Result<Choice, String> {
    let svc = b.service.as_ref().map_err(Clone::clone)?;
    let port = match b.port {
        0 => svc
            .ports
            .iter()
            .find(|p| p.port == request_port)
            .or(svc.ports.first()),
        n => svc.ports.iter().find(|p| p.port == n),
    }
    .ok_or_else(|| format!("{} has no port {}", svc.hostname(), b.port))?;
    Ok(Choice {
        target: WaypointTarget::Service(svc.clone(), port.clone()),
        subset: b.subset.clone(),
    })
}

/// A gRPC status as a metric label: 0-16, else `unknown` (the upstream
/// writes it; it must not grow the label set).
fn grpc_status_label(s: &str) -> String {
    match s.trim().parse::<u8>() {
        Ok(n) if n <= 16 => n.to_string(),
        _ => "unknown".into(),
    }
}

/// The gRPC status Istio gives an HTTP status it injects into a gRPC call.
fn http_to_grpc(code: u16) -> u8 {
    match code {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// A request body that counts what passes through it.
struct Counting {
    inner: Incoming,
    count: Arc<AtomicU64>,
}

impl hyper::body::Body for Counting {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that records its request when it ends (or is
/// dropped, when the client goes away first).
struct Metered {
    inner: Body,
    bytes: u64,
    done: Option<Done>,
    ctx: Arc<Ctx>,
}

impl Metered {
    fn record(&mut self) {
        let Some(d) = self.done.take() else { return };
        let ms = d.start.elapsed().as_secs_f64() * 1000.0;
        let req = d.request_bytes.load(Ordering::Relaxed);
        self.ctx.requests.record(&d.labels, ms, req, self.bytes);
        if let Some(t) = &d.trace {
            self.spans(&d, t, req);
        }
        info!(
            target: "access",
            direction = d.labels.conn.reporter,
            src.addr = %d.client,
            src.identity = %d.labels.conn.source_principal,
            method = %d.method,
            authority = %d.authority,
            path = %d.path,
            status = %d.labels.response_code,
            grpc_status = %d.labels.grpc_response_status,
            duration_ms = ms as u64,
            upstream = %d.upstream,
            dst.service = %d.labels.conn.destination_service,
            route = %d.route,
            policy = %d.policy,
            flags = d.labels.conn.response_flags,
            request_bytes = req,
            response_bytes = self.bytes,
            "request complete"
        );
    }
}

impl Metered {
    /// The waypoint's server span and, when the request went upstream, its
    /// client span, with Istio's attributes.
    fn spans(&self, d: &Done, t: &TraceContext, request_bytes: u64) {
        let l = &d.labels.conn;
        let mut attrs: BTreeMap<&'static str, String> = BTreeMap::from([
            ("component", "proxy".to_owned()),
            (
                "istio.canonical_service",
                l.destination_canonical_service.clone(),
            ),
            (
                "istio.canonical_revision",
                l.destination_canonical_revision.clone(),
            ),
            ("istio.namespace", l.destination_service_namespace.clone()),
            ("http.method", d.method.clone()),
            ("http.url", format!("http://{}{}", d.authority, d.path)),
            ("http.status_code", d.labels.response_code.clone()),
            ("response_flags", l.response_flags.to_owned()),
            ("request_size", request_bytes.to_string()),
            ("response_size", self.bytes.to_string()),
            ("guid:x-request-id", d.request_id.clone()),
            ("user_agent", d.user_agent.clone()),
            ("peer.address", d.client.ip().to_canonical().to_string()),
            ("downstream_cluster", l.source_principal.clone()),
        ]);
        attrs.insert("upstream_cluster", d.upstream_cluster.clone());
        attrs.insert("upstream_cluster.name", d.upstream_cluster.clone());
        let error = d.labels.response_code.starts_with('5');
        let end = SystemTime::now();
        let name = d.span_name.clone();
        if let Some((start, answered)) = d.upstream_times {
            let mut client_attrs = attrs.clone();
            client_attrs.insert("upstream_host", d.upstream.clone());
            self.ctx.tracer.record(Span {
                trace_id: t.trace_id,
                id: t.client_span,
                parent: Some(t.server_span),
                name: name.clone(),
                kind: "CLIENT",
                start,
                end: answered,
                attributes: client_attrs,
                error,
            });
        }
        self.ctx.tracer.record(Span {
            trace_id: t.trace_id,
            id: t.server_span,
            parent: t.parent,
            name,
            kind: "SERVER",
            start: d.started,
            end,
            attributes: attrs,
            error,
        });
    }
}

impl hyper::body::Body for Metered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if let Some(t) = f.trailers_ref()
                    && let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok())
                    && let Some(done) = self.done.as_mut()
                {
                    done.labels.grpc_response_status = grpc_status_label(s);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.record(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.record();
    }
}

#[cfg(test)]
mod tests {
    use hyper::{HeaderMap, header::HeaderValue};

    use super::{chance, grpc_status_label, is_upgrade, random_hex, random_u64};

    #[test]
    fn ids_differ_between_calls_and_threads_and_shares_hold() {
        let here: std::collections::HashSet<u64> = (0..10_000).map(|_| random_u64()).collect();
        assert_eq!(here.len(), 10_000);
        // Each thread seeds its own state: another thread's numbers are
        // not this one's again.
        let there = std::thread::spawn(|| (0..1_000).map(|_| random_u64()).collect::<Vec<_>>())
            .join()
            .unwrap();
        assert!(there.iter().all(|x| !here.contains(x)));
        let id = random_hex();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, random_hex());
        // A 25% share of 100,000 calls lands near 25,000 (five sigma is
        // about 690).
        let hits = (0..100_000).filter(|_| chance(25.0)).count();
        assert!((24_000..26_000).contains(&hits), "{hits}");
    }

    #[test]
    fn only_websocket_upgrades_and_bounded_grpc_labels() {
        let headers = |upgrade: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(
                "connection",
                HeaderValue::from_static("keep-alive, Upgrade"),
            );
            h.insert("upgrade", HeaderValue::from_static(upgrade));
            h
        };
        assert!(is_upgrade(&headers("websocket")));
        assert!(is_upgrade(&headers("WebSocket")));
        assert!(!is_upgrade(&headers("h2c")));
        assert!(!is_upgrade(&headers("tls/1.3")));
        assert_eq!(grpc_status_label("7"), "7");
        assert_eq!(grpc_status_label("16"), "16");
        assert_eq!(grpc_status_label("17"), "unknown");
        assert_eq!(grpc_status_label("boom"), "unknown");
    }
}
