//! HTTPRoute rules for waypoints: the spec as written (strict about field
//! names), compiled per parent Service into match entries sorted by the
//! Gateway API's precedence, so that a request is matched by walking one
//! list and the first hit wins.

use std::{collections::HashMap, sync::Arc, time::Duration};

use hyper::http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::Deserialize;

use super::{ConfigWarning, Service, yaml::Objects};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RuleSpec {
    name: Option<String>,
    #[serde(default)]
    matches: Vec<MatchSpec>,
    #[serde(default)]
    filters: Vec<FilterSpec>,
    #[serde(default)]
    backend_refs: Vec<BackendRefSpec>,
    timeouts: Option<TimeoutsSpec>,
    retry: Option<RetrySpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MatchSpec {
    path: Option<PathSpec>,
    #[serde(default)]
    headers: Vec<ValueMatchSpec>,
    #[serde(default)]
    query_params: Vec<ValueMatchSpec>,
    method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PathSpec {
    #[serde(rename = "type", default = "path_prefix")]
    kind: String,
    #[serde(default = "slash")]
    value: String,
}

fn path_prefix() -> String {
    "PathPrefix".into()
}

fn slash() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ValueMatchSpec {
    #[serde(rename = "type", default = "exact")]
    kind: String,
    name: String,
    value: String,
}

fn exact() -> String {
    "Exact".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FilterSpec {
    #[serde(rename = "type")]
    kind: String,
    request_header_modifier: Option<HeaderModifierSpec>,
    response_header_modifier: Option<HeaderModifierSpec>,
    request_redirect: Option<RedirectSpec>,
    url_rewrite: Option<RewriteSpec>,
    request_mirror: Option<MirrorSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HeaderModifierSpec {
    #[serde(default)]
    set: Vec<HeaderSpec>,
    #[serde(default)]
    add: Vec<HeaderSpec>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderSpec {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RedirectSpec {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathModifierSpec>,
    port: Option<u16>,
    status_code: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RewriteSpec {
    hostname: Option<String>,
    path: Option<PathModifierSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PathModifierSpec {
    #[serde(rename = "type")]
    kind: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MirrorSpec {
    backend_ref: BackendRefSpec,
    percent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BackendRefSpec {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u16>,
    weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TimeoutsSpec {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetrySpec {
    attempts: Option<u32>,
    #[serde(default)]
    codes: Vec<u16>,
    backoff: Option<String>,
}

/// How a request path is matched.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Whole path segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    Regex(regex_lite::Regex),
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
        }
    }

    /// Gateway API precedence: Exact, then the longest prefix; regular
    /// expressions (implementation-specific) after both.
    fn rank(&self) -> (u8, usize) {
        match self {
            PathMatch::Exact(p) => (3, p.len()),
            PathMatch::Prefix(p) => (2, p.len()),
            PathMatch::Regex(r) => (1, r.as_str().len()),
        }
    }
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(regex_lite::Regex),
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => v == e,
            ValueMatch::Regex(r) => r.is_match(v),
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
    pub port: u16,
    pub weight: u32,
}

#[derive(Debug)]
pub struct Mirror {
    pub backend: Backend,
    pub percent: u32,
}

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
pub struct Routes(HashMap<(String, String), Vec<RouteEntry>>, Vec<RouteStatus>);

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
        self.0
            .get(key)?
            .iter()
            .filter(|e| e.port.is_none_or(|p| p == port))
            .find(|e| e.matcher.matches(req))
    }

    pub fn statuses(&self) -> &[RouteStatus] {
        &self.1
    }

    /// Route names per Service, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let mut out = std::collections::BTreeMap::new();
        for ((ns, name), entries) in &self.0 {
            let names: Vec<String> = entries
                .iter()
                .map(|e| format!("{} rule {}", e.action.route, e.action.rule))
                .collect();
            out.insert(format!("{ns}/{name}"), names);
        }
        serde_json::json!(out)
    }
}

/// Compiles every HTTPRoute attached to a Service that `bound` says has a
/// waypoint (it names it), or to a waypoint Gateway, which `served` says
/// serves which Services (the rest are warned about by
/// `gateway::check_routes`).
pub(super) fn compile(
    objects: &Objects,
    services: &std::collections::BTreeMap<(String, String), Arc<Service>>,
    bound: impl Fn(&str, &str) -> Option<String>,
    served: impl Fn(&str, &str) -> Option<Vec<(String, String)>>,
    warnings: &mut Vec<ConfigWarning>,
) -> Routes {
    let mut routes = Routes::default();
    for ((ns, name), parsed) in &objects.http_routes {
        let route = &parsed.object;
        let object = format!("HTTPRoute {ns}/{name}");
        let mut c = RouteCompiler {
            object: &object,
            ns,
            services,
            warnings: &mut *warnings,
            unresolved: None,
        };
        let created = route
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        let rules: Vec<(Vec<RouteMatch>, Arc<RuleAction>)> = route
            .spec
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| c.rule(&format!("{ns}/{name}"), i, r))
            .collect();
        let resolved_refs = match c.unresolved.take() {
            None => Condition {
                status: true,
                reason: "ResolvedRefs",
                message: "every backendRef resolves".into(),
            },
            Some((reason, message)) => Condition {
                status: false,
                reason,
                message,
            },
        };
        let mut status = RouteStatus {
            namespace: ns.clone(),
            name: name.clone(),
            generation: route.metadata.generation,
            parents: Vec::new(),
        };
        for parent in &route.spec.parent_refs {
            let pns = parent.namespace.as_deref().unwrap_or(ns);
            // A route on a waypoint Gateway applies to every Service it
            // serves.
            let on_waypoint = parent
                .is_gateway()
                .then(|| served(pns, &parent.name))
                .flatten();
            let waypoint = if parent.is_service() {
                bound(pns, &parent.name)
            } else {
                on_waypoint
                    .as_ref()
                    .map(|_| format!("{pns}/{}", parent.name))
            };
            let accepted = if on_waypoint.is_some() {
                Condition {
                    status: true,
                    reason: "Accepted",
                    message: format!("waypoint {pns}/{}", parent.name),
                }
            } else if !parent.is_service() {
                Condition {
                    status: false,
                    reason: "NotAllowedByListeners",
                    message: "only Service parents (mesh routes) are served by a waypoint".into(),
                }
            } else if let Some(wp) = &waypoint {
                Condition {
                    status: true,
                    reason: "Accepted",
                    message: format!("served by waypoint {wp}"),
                }
            } else {
                Condition {
                    status: false,
                    reason: "NoMatchingParent",
                    message: format!(
                        "Service {pns}/{} has no waypoint that serves it",
                        parent.name
                    ),
                }
            };
            let serving = accepted.status;
            status.parents.push(ParentStatus {
                group: parent
                    .group
                    .clone()
                    .unwrap_or_else(|| "gateway.networking.k8s.io".into()),
                kind: parent.kind.clone().unwrap_or_else(|| "Gateway".into()),
                namespace: pns.to_owned(),
                name: parent.name.clone(),
                port: parent.port,
                section_name: parent.section_name.clone(),
                accepted,
                resolved_refs: resolved_refs.clone(),
                waypoint,
            });
            if !serving {
                continue;
            }
            let targets: Vec<(String, String)> = match on_waypoint {
                Some(services) => services,
                None => vec![(pns.to_owned(), parent.name.clone())],
            };
            if !route.spec.hostnames.is_empty() {
                c.warn(
                    "unsupported",
                    "hostnames are ignored for a Service parent (the Service is the host)".into(),
                );
            }
            for target in targets {
                // A Service parent's sectionName names one of its ports (a
                // Gateway's names a listener: the waypoint has one).
                let port = parent.port.filter(|_| parent.is_service()).or_else(|| {
                    let section = parent
                        .section_name
                        .as_deref()
                        .filter(|_| parent.is_service())?;
                    let svc = services.get(&target)?;
                    // A name that is no port matches nothing rather than all.
                    Some(
                        svc.ports
                            .iter()
                            .find(|p| p.name == section)
                            .map_or(0, |p| p.port),
                    )
                });
                let list = routes.0.entry(target).or_default();
                for (ri, (matches, action)) in rules.iter().enumerate() {
                    for (mi, matcher) in matches.iter().enumerate() {
                        list.push(RouteEntry {
                            port,
                            matcher: matcher.clone(),
                            action: action.clone(),
                            order: (created.clone(), format!("{ns}/{name}"), ri, mi),
                        });
                    }
                }
            }
        }
        routes.1.push(status);
    }
    for list in routes.0.values_mut() {
        list.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
    }
    routes
}

struct RouteCompiler<'a> {
    object: &'a str,
    ns: &'a str,
    services: &'a std::collections::BTreeMap<(String, String), Arc<Service>>,
    warnings: &'a mut Vec<ConfigWarning>,
    /// The first backendRef that does not resolve: ResolvedRefs' reason.
    unresolved: Option<(&'static str, String)>,
}

impl RouteCompiler<'_> {
    fn warn(&mut self, kind: &'static str, message: String) {
        let w = ConfigWarning {
            object: self.object.to_owned(),
            kind,
            message,
        };
        if !self.warnings.contains(&w) {
            self.warnings.push(w);
        }
    }

    /// A rule whose matches all fail to compile is dropped (requests then
    /// fall through to other rules or the Service itself).
    fn rule(
        &mut self,
        route: &str,
        index: usize,
        r: &RuleSpec,
    ) -> Option<(Vec<RouteMatch>, Arc<RuleAction>)> {
        let label = r.name.clone().unwrap_or_else(|| index.to_string());
        let mut action = RuleAction {
            route: route.to_owned(),
            rule: label.clone(),
            ..RuleAction::default()
        };
        for b in &r.backend_refs {
            action.backends.push(self.backend(b, &label));
        }
        for f in &r.filters {
            self.filter(f, &label, &mut action);
        }
        if let Some(t) = &r.timeouts {
            action.timeout = t.request.as_deref().and_then(|d| self.duration(d, &label));
            action.backend_timeout = t
                .backend_request
                .as_deref()
                .and_then(|d| self.duration(d, &label));
        }
        if let Some(retry) = &r.retry {
            action.retry = Retry {
                attempts: retry.attempts.unwrap_or(0),
                codes: retry.codes.clone(),
                backoff: retry
                    .backoff
                    .as_deref()
                    .and_then(|d| self.duration(d, &label))
                    .unwrap_or(Duration::from_millis(25)),
            };
        }
        if r.matches.is_empty() {
            // No match means every request (a `/` prefix).
            let all = RouteMatch {
                path: PathMatch::Prefix("/".into()),
                headers: Vec::new(),
                query: Vec::new(),
                method: None,
            };
            return Some((vec![all], Arc::new(action)));
        }
        let matches: Vec<RouteMatch> = r.matches.iter().filter_map(|m| self.matcher(m)).collect();
        if matches.is_empty() {
            self.warn(
                "parse_error",
                format!("rule {label}: no match compiles; the rule is not applied"),
            );
            return None;
        }
        Some((matches, Arc::new(action)))
    }

    fn matcher(&mut self, m: &MatchSpec) -> Option<RouteMatch> {
        let path = match &m.path {
            None => PathMatch::Prefix("/".into()),
            Some(p) => match p.kind.as_str() {
                "Exact" => PathMatch::Exact(p.value.clone()),
                "PathPrefix" => PathMatch::Prefix(p.value.clone()),
                "RegularExpression" => PathMatch::Regex(self.regex(&p.value)?),
                other => {
                    self.warn(
                        "parse_error",
                        format!("path match type {other:?} is not Exact, PathPrefix or RegularExpression"),
                    );
                    return None;
                }
            },
        };
        let mut headers = Vec::new();
        for h in &m.headers {
            let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
                self.warn(
                    "parse_error",
                    format!("header name {:?} is not valid", h.name),
                );
                return None;
            };
            headers.push((name, self.value_match(h)?));
        }
        let mut query = Vec::new();
        for q in &m.query_params {
            query.push((q.name.clone(), self.value_match(q)?));
        }
        let method = match &m.method {
            None => None,
            Some(s) => match Method::from_bytes(s.as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    self.warn("parse_error", format!("method {s:?} is not valid"));
                    return None;
                }
            },
        };
        Some(RouteMatch {
            path,
            headers,
            query,
            method,
        })
    }

    fn value_match(&mut self, v: &ValueMatchSpec) -> Option<ValueMatch> {
        match v.kind.as_str() {
            "Exact" => Some(ValueMatch::Exact(v.value.clone())),
            "RegularExpression" => self.regex(&v.value).map(ValueMatch::Regex),
            other => {
                self.warn(
                    "parse_error",
                    format!(
                        "match type {other:?} for {:?} is not Exact or RegularExpression",
                        v.name
                    ),
                );
                None
            }
        }
    }

    /// Regular expressions match the whole value, as Istio's do.
    fn regex(&mut self, re: &str) -> Option<regex_lite::Regex> {
        match regex_lite::Regex::new(&format!("^(?:{re})$")) {
            Ok(r) => Some(r),
            Err(e) => {
                self.warn("parse_error", format!("regular expression {re:?}: {e}"));
                None
            }
        }
    }

    fn backend(&mut self, b: &BackendRefSpec, rule: &str) -> Backend {
        let ns = b.namespace.as_deref().unwrap_or(self.ns);
        let weight = b.weight.unwrap_or(1);
        let port = b.port.unwrap_or(0);
        let kind_ok = matches!(b.group.as_deref(), None | Some("" | "core"))
            && matches!(b.kind.as_deref(), None | Some("Service"));
        let service = if !kind_ok {
            Err(format!(
                "backendRef {}/{} of kind {:?} is not a Service",
                ns,
                b.name,
                b.kind.as_deref().unwrap_or("")
            ))
        } else {
            match self.services.get(&(ns.to_owned(), b.name.clone())) {
                None => Err(format!("backendRef Service {ns}/{} does not exist", b.name)),
                Some(s) if !s.ports.iter().any(|p| p.port == port) => Err(format!(
                    "backendRef Service {ns}/{} has no port {port}",
                    b.name
                )),
                Some(s) => Ok(s.clone()),
            }
        };
        if let Err(e) = &service {
            let reason = if kind_ok {
                "BackendNotFound"
            } else {
                "InvalidKind"
            };
            self.unresolved.get_or_insert((reason, e.clone()));
            self.warn(
                "unresolved_ref",
                format!("rule {rule}: {e} (ResolvedRefs: False); requests sent to it get 500"),
            );
        }
        Backend {
            service,
            port,
            weight,
        }
    }

    fn filter(&mut self, f: &FilterSpec, rule: &str, action: &mut RuleAction) {
        let missing = |this: &mut Self, field: &str| {
            this.warn(
                "parse_error",
                format!("rule {rule}: filter {} without {field}; ignored", f.kind),
            )
        };
        match f.kind.as_str() {
            "RequestHeaderModifier" => match &f.request_header_modifier {
                Some(m) => action.request_headers = self.headers(m, rule),
                None => missing(self, "requestHeaderModifier"),
            },
            "ResponseHeaderModifier" => match &f.response_header_modifier {
                Some(m) => action.response_headers = self.headers(m, rule),
                None => missing(self, "responseHeaderModifier"),
            },
            "RequestRedirect" => match &f.request_redirect {
                Some(r) => {
                    action.redirect = Some(Redirect {
                        scheme: r.scheme.clone(),
                        hostname: r.hostname.clone(),
                        path: r.path.as_ref().and_then(|p| self.path_modifier(p, rule)),
                        port: r.port,
                        status: r.status_code.unwrap_or(302),
                    })
                }
                None => missing(self, "requestRedirect"),
            },
            "URLRewrite" => match &f.url_rewrite {
                Some(r) => {
                    action.rewrite = Some(Rewrite {
                        hostname: r.hostname.clone(),
                        path: r.path.as_ref().and_then(|p| self.path_modifier(p, rule)),
                    })
                }
                None => missing(self, "urlRewrite"),
            },
            "RequestMirror" => match &f.request_mirror {
                Some(m) => {
                    let backend = self.backend(&m.backend_ref, rule);
                    action.mirrors.push(Mirror {
                        backend,
                        percent: m.percent.unwrap_or(100).min(100),
                    });
                }
                None => missing(self, "requestMirror"),
            },
            other => self.warn(
                "unsupported",
                format!("rule {rule}: filter type {other:?} is not supported; ignored"),
            ),
        }
    }

    fn headers(&mut self, m: &HeaderModifierSpec, rule: &str) -> HeaderModifier {
        let mut out = HeaderModifier::default();
        let pair = |this: &mut Self, h: &HeaderSpec| match (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            (Ok(k), Ok(v)) => Some((k, v)),
            _ => {
                this.warn(
                    "parse_error",
                    format!(
                        "rule {rule}: header {:?}: {:?} is not valid; ignored",
                        h.name, h.value
                    ),
                );
                None
            }
        };
        out.set = m.set.iter().filter_map(|h| pair(self, h)).collect();
        out.add = m.add.iter().filter_map(|h| pair(self, h)).collect();
        out.remove = m
            .remove
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        out
    }

    fn path_modifier(&mut self, p: &PathModifierSpec, rule: &str) -> Option<PathModifier> {
        match (
            p.kind.as_str(),
            &p.replace_full_path,
            &p.replace_prefix_match,
        ) {
            ("ReplaceFullPath", Some(full), _) => Some(PathModifier::Full(full.clone())),
            ("ReplacePrefixMatch", _, Some(prefix)) => Some(PathModifier::Prefix(prefix.clone())),
            (kind, _, _) => {
                self.warn(
                    "parse_error",
                    format!("rule {rule}: path modifier {kind:?} without its value; ignored"),
                );
                None
            }
        }
    }

    fn duration(&mut self, d: &str, rule: &str) -> Option<Duration> {
        match parse_gateway_duration(d) {
            Some(d) => Some(d),
            None => {
                self.warn(
                    "parse_error",
                    format!("rule {rule}: duration {d:?} is not like 10s, 500ms or 1h30m; ignored"),
                );
                None
            }
        }
    }
}

/// The Gateway API's duration format (GEP-2257): `1h`, `30s`, `500ms`,
/// `1h30m`; `0s` means none.
pub fn parse_gateway_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return None;
        };
        total += unit.checked_mul(u32::try_from(n).ok()?)?;
        rest = &rest[len..];
    }
    Some(total)
}

/// Applies a path modifier; `matched` is the prefix the rule matched.
pub fn modify_path(path: &str, modifier: &PathModifier, matched: Option<&PathMatch>) -> String {
    match modifier {
        PathModifier::Full(p) => p.clone(),
        PathModifier::Prefix(new) => {
            let old = match matched {
                Some(PathMatch::Prefix(p)) => p.trim_end_matches('/'),
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
