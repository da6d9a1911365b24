//! Routing at the waypoint: HTTPRoute (`http_route.rs`) and Istio's
//! VirtualService and DestinationRule (`istio.rs`) compile per Service into
//! match entries, so that a request is matched by walking one list and the
//! first hit wins; what a matched rule does is a `RuleAction` either way.

pub(super) mod http_route;
mod istio;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use hyper::http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::Service;

pub(crate) use http_route::{RuleSpec, compile};
pub(crate) use istio::{DestinationRule, VirtualService, compile_istio};

/// How a request path is matched.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Whole path segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    Regex(regex_lite::Regex),
    /// Istio's `prefix`: any string prefix, segments or not.
    StringPrefix(String),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                let p = p.trim_end_matches('/');
                p.is_empty()
                    || path == p
                    || path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::StringPrefix(p) => path.starts_with(p.as_str()),
        }
    }

    /// Gateway API precedence: Exact, then the longest prefix; regular
    /// expressions (implementation-specific) after both.
    fn rank(&self) -> (u8, usize) {
        match self {
            PathMatch::Exact(p) => (3, p.len()),
            PathMatch::Prefix(p) => (2, p.len()),
            PathMatch::Regex(r) => (1, r.as_str().len()),
            PathMatch::StringPrefix(p) => (2, p.len()),
        }
    }
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(regex_lite::Regex),
    Prefix(String),
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => v == e,
            ValueMatch::Regex(r) => r.is_match(v),
            ValueMatch::Prefix(p) => v.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<Method>,
}

/// What a router needs of a request.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl RouteMatch {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        self.path.matches(req.path)
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, m)| {
                req.headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
            })
            && self.query.iter().all(|(name, m)| {
                req.query.is_some_and(|q| {
                    q.split('&')
                        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                        .find(|(k, _)| k == name)
                        .is_some_and(|(_, v)| m.matches(v))
                })
            })
    }
}

#[derive(Debug, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            headers.append(k.clone(), v.clone());
        }
        for k in &self.remove {
            headers.remove(k);
        }
    }
}

/// A path change (redirect or rewrite).
#[derive(Debug, Clone)]
pub enum PathModifier {
    Full(String),
    /// Replaces the matched prefix (the rule's match must be a prefix).
    Prefix(String),
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// A backend of a rule: a Service port, or a reference that does not
/// resolve (requests that pick it get 500, as the Gateway API says).
#[derive(Debug)]
pub struct Backend {
    pub service: Result<Arc<Service>, String>,
    /// 0: the port the request came on (a VirtualService destination
    /// without one).
    pub port: u16,
    pub weight: u32,
    /// A DestinationRule subset: its name and the pod labels it selects.
    pub subset: Option<(String, Arc<BTreeMap<String, String>>)>,
}

/// Istio's fault injection: a delay and an abort, each for a share of
/// requests.
#[derive(Debug, Default)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    /// HTTP status, or a gRPC status for gRPC requests, and the share.
    pub abort: Option<(Abort, f64)>,
}

#[derive(Debug, Clone, Copy)]
pub enum Abort {
    Http(u16),
    Grpc(u8),
}

/// How a Service's (or subset's) endpoints are chosen (DestinationRule
/// `loadBalancer`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    /// `consistentHash.httpHeaderName`
    HashHeader(String),
    /// `consistentHash.useSourceIp`
    HashSourceIp,
}

/// Adds a warning about `object` unless the same one is there already (a
/// route's rules can repeat a mistake).
fn warn_once(
    warnings: &mut Vec<crate::state::ConfigWarning>,
    object: &str,
    kind: &'static str,
    message: String,
) {
    let w = crate::state::ConfigWarning {
        object: object.to_owned(),
        kind,
        message,
    };
    if !warnings.contains(&w) {
        warnings.push(w);
    }
}

fn subset_labels<S: serde::Serializer>(
    subsets: &BTreeMap<String, Arc<BTreeMap<String, String>>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(subsets.iter().map(|(k, v)| (k, &**v)))
}

/// A DestinationRule, as the waypoint applies it to one Service.
#[derive(Debug, Default, serde::Serialize)]
pub struct DestinationPolicy {
    /// `namespace/name` of the DestinationRule.
    pub rule: String,
    pub load_balancer: LoadBalancer,
    /// Subset name -> pod labels.
    #[serde(serialize_with = "subset_labels")]
    pub subsets: BTreeMap<String, Arc<BTreeMap<String, String>>>,
    pub subset_load_balancers: BTreeMap<String, LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub subset_pools: BTreeMap<String, ConnectionPool>,
    pub subset_outliers: BTreeMap<String, OutlierDetection>,
    /// `portLevelSettings`, by Service port.
    pub ports: BTreeMap<u16, PortPolicy>,
    /// `trafficPolicy.tls`: TLS origination to the endpoints.
    pub tls: Option<TlsOrigination>,
}

/// DestinationRule `tls` with mode `SIMPLE`: the waypoint speaks TLS to
/// the endpoints (an external host) and verifies their certificate, so
/// that the app's plain HTTP leaves the mesh as HTTPS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct TlsOrigination {
    /// The name sent in SNI and checked against the certificate (`sni`,
    /// else the Service's host).
    pub sni: Option<String>,
    /// `caCertificates`: a PEM file the waypoint reads (None: the
    /// system's bundle, [`SYSTEM_CA_BUNDLE`]).
    pub ca_certificates: Option<std::path::PathBuf>,
    /// `credentialName`: the Secret (of the rule's namespace) whose
    /// `ca.crt` (or `cacert`) is the CA, which wins over `caCertificates`.
    pub credential_name: Option<String>,
    /// That Secret's CA certificates (PEM), as read.
    #[serde(skip)]
    pub credential_ca: Option<Vec<u8>>,
    /// `subjectAltNames`: names the certificate may show instead of the
    /// SNI name.
    pub subject_alt_names: Vec<String>,
    /// `insecureSkipVerify`: no certificate check at all.
    pub insecure_skip_verify: bool,
    /// Why the rule's `tls` cannot be applied (an unsupported field): the
    /// waypoint then refuses the connection rather than send in plaintext
    /// what was meant to leave encrypted.
    pub unusable: Option<String>,
}

/// Where the waypoint finds trusted roots when a DestinationRule names no
/// `caCertificates` (Debian's and most distributions' bundle).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What `portLevelSettings` sets for one port (unset parts come from the
/// Service's).
#[derive(Debug, Default, serde::Serialize)]
pub struct PortPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    /// Some(None): `tls.mode: DISABLE` on this port.
    pub tls: Option<Option<TlsOrigination>>,
}

impl DestinationPolicy {
    /// The load balancer for a subset on a port: the subset's, else the
    /// port's, else the Service's (Istio's precedence).
    pub fn load_balancer_for(&self, subset: Option<&str>, port: u16) -> LoadBalancer {
        subset
            .and_then(|s| self.subset_load_balancers.get(s))
            .or_else(|| self.ports.get(&port)?.load_balancer.as_ref())
            .unwrap_or(&self.load_balancer)
            .clone()
    }

    pub fn connection_pool_for(&self, subset: Option<&str>, port: u16) -> Option<&ConnectionPool> {
        subset
            .and_then(|s| self.subset_pools.get(s))
            .or_else(|| self.ports.get(&port)?.connection_pool.as_ref())
            .or(self.connection_pool.as_ref())
    }

    /// TLS origination on a port: the port's setting, else the rule's.
    pub fn tls_for(&self, port: u16) -> Option<&TlsOrigination> {
        match self.ports.get(&port).and_then(|p| p.tls.as_ref()) {
            Some(tls) => tls.as_ref(),
            None => self.tls.as_ref(),
        }
    }

    pub fn outlier_detection_for(
        &self,
        subset: Option<&str>,
        port: u16,
    ) -> Option<&OutlierDetection> {
        subset
            .and_then(|s| self.subset_outliers.get(s))
            .or_else(|| self.ports.get(&port)?.outlier_detection.as_ref())
            .or(self.outlier_detection.as_ref())
    }
}

/// DestinationRule `connectionPool`, as the waypoint applies it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionPool {
    /// Requests in flight to the Service at most (None: no cap).
    pub max_requests: Option<usize>,
    /// Requests that may wait for a place; past them, 503 `UO`.
    pub max_pending: usize,
    /// Requests one upstream connection carries before it is closed (1:
    /// no keep-alive). None: no limit.
    pub max_requests_per_connection: Option<usize>,
}

/// DestinationRule `outlierDetection`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Debug)]
pub struct Mirror {
    pub backend: Backend,
    pub percent: u32,
}

/// At most this many retries of one request, whatever a route asks: each
/// costs the backend a request.
pub const MAX_RETRIES: u32 = 10;

/// Istio's default retry policy for a route that sets none: 2 retries on
/// connect failure, refused stream and 503.
#[derive(Debug, Clone)]
pub struct Retry {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 2,
            codes: vec![503],
            backoff: Duration::from_millis(25),
        }
    }
}

/// What a matched rule does with the request.
#[derive(Debug, Default)]
pub struct RuleAction {
    /// `namespace/name` of the HTTPRoute, and the rule index or name.
    pub route: String,
    pub rule: String,
    pub backends: Vec<Backend>,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    pub mirrors: Vec<Mirror>,
    pub timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Retry,
    pub fault: Option<Fault>,
}

/// One match of one rule, attached to a Service (or one of its ports).
#[derive(Debug)]
pub struct RouteEntry {
    pub port: Option<u16>,
    pub matcher: RouteMatch,
    pub action: Arc<RuleAction>,
    /// Tie-breakers after the match's own precedence: the route's creation
    /// time and name, the rule and the match index.
    order: (String, String, usize, usize),
}

impl RouteEntry {
    fn precedence(&self) -> impl Ord + '_ {
        let (rank, len) = self.matcher.path.rank();
        (
            std::cmp::Reverse(rank),
            std::cmp::Reverse(len),
            std::cmp::Reverse(self.matcher.method.is_some()),
            std::cmp::Reverse(self.matcher.headers.len()),
            std::cmp::Reverse(self.matcher.query.len()),
            &self.order,
        )
    }
}

/// Routes by parent Service (namespace, name), in precedence order, and
/// every HTTPRoute's status per parent.
#[derive(Debug, Default)]
pub struct Routes(
    HashMap<(String, String), Vec<RouteEntry>>,
    Vec<RouteStatus>,
    /// VirtualService entries, in the order written (Istio's rule: the
    /// first match wins); used for a Service with no HTTPRoute.
    HashMap<(String, String), Vec<RouteEntry>>,
    /// DestinationRules by Service.
    HashMap<(String, String), DestinationPolicy>,
    /// HTTPRoutes attached to ingress Gateways, by Gateway, in precedence
    /// order.
    HashMap<(String, String), Vec<IngressEntry>>,
);

/// A route entry of an ingress Gateway: its own hostnames and the listener
/// (`sectionName`, `port`) it is attached to.
#[derive(Debug)]
pub struct IngressEntry {
    pub hostnames: Vec<String>,
    pub section: Option<String>,
    pub port: Option<u16>,
    pub entry: RouteEntry,
}

/// A Gateway API condition (`Accepted`, `ResolvedRefs`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Condition {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// An HTTPRoute's status for one of its parents.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ParentStatus {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    pub accepted: Condition,
    pub resolved_refs: Condition,
    /// The waypoint (`namespace/name`) that serves this parent, which is
    /// the one to write this status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
}

/// What the Gateway API calls an HTTPRoute's status, as computed here.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RouteStatus {
    pub namespace: String,
    pub name: String,
    /// `metadata.generation`, for the conditions' `observedGeneration`.
    pub generation: Option<i64>,
    pub parents: Vec<ParentStatus>,
}

impl Routes {
    /// The first entry of Service `key` that matches the request on `port`.
    pub fn select(
        &self,
        key: &(String, String),
        port: u16,
        req: &RequestView<'_>,
    ) -> Option<&RouteEntry> {
        let list = match self.0.get(key) {
            Some(l) if !l.is_empty() => l,
            _ => self.2.get(key)?,
        };
        list.iter()
            .filter(|e| e.port.is_none_or(|p| p == port))
            .find(|e| e.matcher.matches(req))
    }

    /// The entry of ingress Gateway `key` that a request for `host` (no
    /// port) on `listener` matches: the route must be attached to that
    /// listener (or to every one) and name the host (or no host). The
    /// Gateway API's precedence: the route whose matching hostname is the
    /// most specific (exact before wildcard, longer before shorter, any
    /// before none), then the match's own precedence.
    pub fn select_ingress(
        &self,
        key: &(String, String),
        listener: &crate::state::IngressListener,
        host: &str,
        req: &RequestView<'_>,
    ) -> Option<&RouteEntry> {
        let mut best: Option<((u8, usize), &RouteEntry)> = None;
        let attached = self
            .4
            .get(key)?
            .iter()
            .filter(|e| e.section.as_ref().is_none_or(|s| *s == listener.name))
            .filter(|e| e.port.is_none_or(|p| p == listener.port));
        for e in attached {
            let rank = if e.hostnames.is_empty() {
                Some((0, 0))
            } else {
                e.hostnames
                    .iter()
                    .filter(|h| crate::state::hostname_matches(h, host))
                    .map(|h| (if h.starts_with("*.") { 1 } else { 2 }, h.len()))
                    .max()
            };
            let Some(rank) = rank else { continue };
            // The list is in match precedence: a later entry wins only
            // with a more specific hostname.
            if best.is_none_or(|(r, _)| rank > r) && e.entry.matcher.matches(req) {
                best = Some((rank, &e.entry));
            }
        }
        best.map(|(_, e)| e)
    }

    /// Every DestinationRule applied, by Service, for `/config_dump`.
    pub fn destinations(&self) -> BTreeMap<String, &DestinationPolicy> {
        self.3
            .iter()
            .map(|((ns, name), p)| (format!("{ns}/{name}"), p))
            .collect()
    }

    /// The DestinationRule of Service `key`, if one applies.
    pub fn destination(&self, key: &(String, String)) -> Option<&DestinationPolicy> {
        self.3.get(key)
    }

    pub fn statuses(&self) -> &[RouteStatus] {
        &self.1
    }

    /// Route names per Service, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let mut out = std::collections::BTreeMap::new();
        for ((ns, name), entries) in self.0.iter().chain(&self.2) {
            let names: Vec<String> = entries
                .iter()
                .map(|e| format!("{} rule {}", e.action.route, e.action.rule))
                .collect();
            out.insert(format!("{ns}/{name}"), names);
        }
        for ((ns, name), entries) in &self.4 {
            let names: Vec<String> = entries
                .iter()
                .map(|e| format!("{} rule {}", e.entry.action.route, e.entry.action.rule))
                .collect();
            out.insert(format!("Gateway {ns}/{name}"), names);
        }
        serde_json::json!(out)
    }
}

/// Applies a path modifier; `matched` is the prefix the rule matched.
pub fn modify_path(path: &str, modifier: &PathModifier, matched: Option<&PathMatch>) -> String {
    match modifier {
        PathModifier::Full(p) => p.clone(),
        PathModifier::Prefix(new) => {
            let old = match matched {
                Some(PathMatch::Prefix(p)) => p.trim_end_matches('/'),
                Some(PathMatch::StringPrefix(p)) => p.as_str(),
                _ => "",
            };
            let rest = path.strip_prefix(old).unwrap_or(path);
            let new = new.trim_end_matches('/');
            match (new.is_empty(), rest.is_empty()) {
                (true, true) => "/".into(),
                (true, false) => rest.into(),
                (false, _) => format!("{new}{rest}"),
            }
        }
    }
}
