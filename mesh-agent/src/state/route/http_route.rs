//! HTTPRoute: the spec as written (strict about field names), compiled
//! per parent Service into match entries sorted by the Gateway API's
//! precedence, with each route's status per parent.

use std::{sync::Arc, time::Duration};

use hyper::http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;

use super::{
    Backend, Condition, HeaderModifier, Mirror, ParentStatus, PathMatch, PathModifier, Redirect,
    Retry, Rewrite, RouteEntry, RouteMatch, RouteStatus, Routes, RuleAction, ValueMatch,
};
use crate::state::{ConfigWarning, Service, yaml::Objects};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RuleSpec {
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

/// Compiles every HTTPRoute attached to a Service that `bound` says has a
/// waypoint (it names it), or to a waypoint Gateway, which `served` says
/// serves which Services (the rest are warned about by
/// `gateway::check_routes`).
pub(crate) fn compile(
    objects: &Objects,
    services: &std::collections::BTreeMap<(String, String), Arc<Service>>,
    bound: impl Fn(&str, &str) -> Option<String>,
    served: impl Fn(&str, &str) -> Option<Vec<(String, String)>>,
    ingress: impl Fn(&str, &str) -> Option<Vec<String>>,
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
            // An ingress Gateway's listener names.
            let on_ingress = parent
                .is_gateway()
                .then(|| ingress(pns, &parent.name))
                .flatten();
            // A ServiceEntry parent stands for its hosts (the services the
            // store made of it), served by the waypoint they are bound to.
            let on_entry: Option<Vec<(String, String)>> = parent.is_service_entry().then(|| {
                crate::state::service_entry::hosts_of(objects, pns, &parent.name)
                    .into_iter()
                    .flatten()
                    .map(|h| (pns.to_owned(), h.clone()))
                    .collect()
            });
            let waypoint = if pns != ns.as_str() {
                None
            } else if on_ingress.is_some() {
                Some(format!("{pns}/{}", parent.name))
            } else if parent.is_service() {
                bound(pns, &parent.name)
            } else if let Some(hosts) = &on_entry {
                // Every host must be bound to the same waypoint.
                let wps: Vec<Option<String>> = hosts.iter().map(|(n, h)| bound(n, h)).collect();
                match wps.first() {
                    Some(first) if wps.iter().all(|w| w == first) => first.clone(),
                    _ => None,
                }
            } else {
                on_waypoint
                    .as_ref()
                    .map(|_| format!("{pns}/{}", parent.name))
            };
            // A route attaches to its own namespace's Services and
            // waypoints only: a route elsewhere (a consumer route) would
            // otherwise redirect every client of a Service it does not own.
            let foreign = pns != ns.as_str();
            let accepted = if foreign {
                Condition {
                    status: false,
                    reason: "NotAllowedByListeners",
                    message: format!(
                        "parent {pns}/{} is in another namespace; routes from other namespaces \
                         (consumer routes) are not applied",
                        parent.name
                    ),
                }
            } else if let Some(listeners) = &on_ingress {
                match &parent.section_name {
                    Some(section) if !listeners.contains(section) => Condition {
                        status: false,
                        reason: "NoMatchingParent",
                        message: format!(
                            "Gateway {pns}/{} has no listener {section:?}",
                            parent.name
                        ),
                    },
                    _ => Condition {
                        status: true,
                        reason: "Accepted",
                        message: format!("ingress gateway {pns}/{}", parent.name),
                    },
                }
            } else if on_waypoint.is_some() {
                Condition {
                    status: true,
                    reason: "Accepted",
                    message: format!("waypoint {pns}/{}", parent.name),
                }
            } else if !parent.is_service() && on_entry.is_none() {
                Condition {
                    status: false,
                    reason: "NotAllowedByListeners",
                    message: "only Service and ServiceEntry parents (mesh routes) are served by \
                              a waypoint"
                        .into(),
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
                        "{} {pns}/{} has no waypoint that serves it",
                        parent.kind.as_deref().unwrap_or("Service"),
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
            if on_ingress.is_some() {
                let list = routes
                    .4
                    .entry((pns.to_owned(), parent.name.clone()))
                    .or_default();
                for (ri, (matches, action)) in rules.iter().enumerate() {
                    for (mi, matcher) in matches.iter().enumerate() {
                        list.push(super::IngressEntry {
                            hostnames: route.spec.hostnames.clone(),
                            section: parent.section_name.clone(),
                            port: parent.port,
                            entry: RouteEntry {
                                port: None,
                                matcher: matcher.clone(),
                                action: action.clone(),
                                order: (created.clone(), format!("{ns}/{name}"), ri, mi),
                            },
                        });
                    }
                }
                continue;
            }
            let service_like = parent.is_service() || on_entry.is_some();
            let targets: Vec<(String, String)> = match (on_waypoint, on_entry) {
                (Some(services), _) => services,
                (None, Some(hosts)) => hosts,
                (None, None) => vec![(pns.to_owned(), parent.name.clone())],
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
                let port = parent.port.filter(|_| service_like).or_else(|| {
                    let section = parent.section_name.as_deref().filter(|_| service_like)?;
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
    for list in routes.4.values_mut() {
        list.sort_by(|a, b| a.entry.precedence().cmp(&b.entry.precedence()));
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
        super::warn_once(self.warnings, self.object, kind, message);
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
                attempts: retry.attempts.unwrap_or(0).min(super::MAX_RETRIES),
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
        if ns != self.ns {
            // No ReferenceGrant is read: a route sends only to its own
            // namespace's Services.
            let e = format!(
                "backendRef {ns}/{} is in another namespace (ReferenceGrant is not read)",
                b.name
            );
            self.unresolved
                .get_or_insert(("RefNotPermitted", e.clone()));
            self.warn(
                "unresolved_ref",
                format!("rule {rule}: {e}; requests sent to it get 500"),
            );
            return Backend {
                service: Err(e),
                port: b.port.unwrap_or(0),
                weight: b.weight.unwrap_or(1),
                subset: None,
            };
        }
        let weight = b.weight.unwrap_or(1);
        let port = b.port.unwrap_or(0);
        // Istio's `kind: Hostname` (group networking.istio.io) names a
        // ServiceEntry's host, as an egress route sends to one.
        let hostname = b.group.as_deref() == Some("networking.istio.io")
            && b.kind.as_deref() == Some("Hostname");
        let kind_ok = hostname
            || (matches!(b.group.as_deref(), None | Some("" | "core"))
                && matches!(b.kind.as_deref(), None | Some("Service")));
        let service = if !kind_ok {
            Err(format!(
                "backendRef {}/{} of kind {:?} is not a Service",
                ns,
                b.name,
                b.kind.as_deref().unwrap_or("")
            ))
        } else {
            match self.services.get(&(ns.to_owned(), b.name.clone())) {
                Some(s) if hostname && s.entry.is_none() => Err(format!(
                    "backendRef Hostname {} is no ServiceEntry host in {ns}",
                    b.name
                )),
                None if hostname => Err(format!(
                    "backendRef Hostname {} is no ServiceEntry host in {ns}",
                    b.name
                )),
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
            subset: None,
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
