//! Istio's VirtualService and DestinationRule at the waypoint, compiled
//! into the same match entries and rule actions as HTTPRoute. A
//! VirtualService's `http` rules keep their written order (the first match
//! wins, as in Istio). Where a Service has both an HTTPRoute and a
//! VirtualService, the HTTPRoute wins and the VirtualService is reported as
//! not applied: Istio leaves mixing them undefined; here it is decided.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use hyper::http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use serde_yaml::Value;

use super::{
    Abort, Backend, DestinationPolicy, Fault, HeaderModifier, LoadBalancer, Mirror, PathMatch,
    PathModifier, Redirect, Retry, Rewrite, RouteEntry, RouteMatch, Routes, RuleAction, ValueMatch,
    http_route::parse_gateway_duration,
};
use crate::state::{ConfigWarning, Service, yaml::Objects};

#[derive(Debug, Deserialize)]
pub(crate) struct VirtualService {
    #[serde(default)]
    spec: VsSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<VsHttp>,
    tcp: Option<Value>,
    tls: Option<Value>,
    #[serde(rename = "exportTo")]
    _export_to: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsHttp {
    name: Option<String>,
    #[serde(default, rename = "match")]
    matches: Vec<VsMatch>,
    #[serde(default)]
    route: Vec<VsRouteDestination>,
    redirect: Option<VsRedirect>,
    rewrite: Option<VsRewrite>,
    timeout: Option<String>,
    retries: Option<VsRetries>,
    fault: Option<VsFault>,
    mirror: Option<VsDestination>,
    mirror_percentage: Option<Percent>,
    headers: Option<VsHeaders>,
    cors_policy: Option<Value>,
    delegate: Option<Value>,
    direct_response: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsMatch {
    #[serde(rename = "name")]
    _name: Option<serde::de::IgnoredAny>,
    uri: Option<StringMatch>,
    #[serde(default)]
    headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    query_params: BTreeMap<String, StringMatch>,
    method: Option<StringMatch>,
    port: Option<u16>,
    authority: Option<Value>,
    scheme: Option<Value>,
    ignore_uri_case: Option<bool>,
    source_labels: Option<Value>,
    source_namespace: Option<Value>,
    without_headers: Option<Value>,
    gateways: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StringMatch {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsRouteDestination {
    destination: VsDestination,
    weight: Option<u32>,
    headers: Option<VsHeaders>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsDestination {
    host: String,
    subset: Option<String>,
    port: Option<PortSelector>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSelector {
    number: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Percent {
    value: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsRedirect {
    uri: Option<String>,
    authority: Option<String>,
    port: Option<u16>,
    scheme: Option<String>,
    redirect_code: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsRewrite {
    uri: Option<String>,
    authority: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsRetries {
    attempts: Option<u32>,
    per_try_timeout: Option<String>,
    retry_on: Option<String>,
    #[serde(rename = "retryRemoteLocalities")]
    _retry_remote_localities: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsFault {
    delay: Option<VsDelay>,
    abort: Option<VsAbort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsDelay {
    fixed_delay: String,
    percentage: Option<Percent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsAbort {
    http_status: Option<u16>,
    grpc_status: Option<String>,
    percentage: Option<Percent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VsHeaders {
    request: Option<HeaderOps>,
    response: Option<HeaderOps>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HeaderOps {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct DestinationRule {
    spec: DrSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DrSpec {
    host: String,
    traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    subsets: Vec<Subset>,
    #[serde(rename = "exportTo")]
    _export_to: Option<serde::de::IgnoredAny>,
    workload_selector: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Subset {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TrafficPolicy {
    load_balancer: Option<LbSettings>,
    connection_pool: Option<PoolSettings>,
    outlier_detection: Option<OutlierSettings>,
    tls: Option<ClientTls>,
    #[serde(default)]
    port_level_settings: Vec<PortSettings>,
    tunnel: Option<Value>,
    proxy_protocol: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortSettings {
    port: PortSelector,
    load_balancer: Option<LbSettings>,
    connection_pool: Option<PoolSettings>,
    outlier_detection: Option<OutlierSettings>,
    tls: Option<ClientTls>,
}

/// `tls` of a traffic policy (Istio's ClientTLSSettings).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClientTls {
    mode: Option<String>,
    sni: Option<String>,
    ca_certificates: Option<String>,
    credential_name: Option<String>,
    client_certificate: Option<String>,
    private_key: Option<String>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    insecure_skip_verify: Option<bool>,
    ca_crl: Option<String>,
}

/// What `tls` asks of the waypoint: Some(None) for `DISABLE`, None when it
/// cannot be applied (warned).
fn tls_origination(
    tls: &ClientTls,
    at: &str,
    credential: &Credential<'_>,
    warn: &mut impl FnMut(&'static str, String),
) -> Option<Option<super::TlsOrigination>> {
    match tls.mode.as_deref().unwrap_or("DISABLE") {
        "DISABLE" => return Some(None),
        "SIMPLE" => {}
        "MUTUAL" | "ISTIO_MUTUAL" => {
            warn(
                "unsupported",
                format!(
                    "{at}: tls mode {} is not supported (only SIMPLE origination; mesh traffic \
                     is mutual TLS by HBONE already); not applied",
                    tls.mode.as_deref().unwrap_or_default()
                ),
            );
            return None;
        }
        other => {
            warn(
                "parse_error",
                format!("{at}: tls mode {other:?} is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"),
            );
            return None;
        }
    }
    for (field, set) in [
        ("clientCertificate", tls.client_certificate.is_some()),
        ("privateKey", tls.private_key.is_some()),
        ("caCrl", tls.ca_crl.is_some()),
    ] {
        if set {
            warn(
                "unsupported",
                format!("{at}: tls {field} is not supported (no client certificate is sent)"),
            );
            // Origination without the asked-for check would be weaker
            // than what was written: refuse rather than guess.
            return None;
        }
    }
    let ca_certificates = match tls.ca_certificates.as_deref() {
        None | Some("") => None,
        Some(path) if path.starts_with('/') => Some(std::path::PathBuf::from(path)),
        Some(path) => {
            warn(
                "parse_error",
                format!("{at}: tls caCertificates {path:?} is not an absolute path; not applied"),
            );
            return None;
        }
    };
    let credential_name = tls.credential_name.clone().filter(|n| !n.is_empty());
    let mut unusable = None;
    let credential_ca = match &credential_name {
        None => None,
        Some(name) => match credential.ca(name) {
            Ok(pem) => Some(pem),
            Err(why) => {
                if credential.read {
                    warn(
                        "unresolved_ref",
                        format!("{at}: tls credentialName {name:?}: {why}; requests refused"),
                    );
                }
                unusable = Some(format!("credentialName {name:?}: {why}"));
                None
            }
        },
    };
    Some(Some(super::TlsOrigination {
        sni: tls.sni.clone().filter(|s| !s.is_empty()),
        ca_certificates,
        credential_name,
        credential_ca,
        subject_alt_names: tls.subject_alt_names.clone(),
        insecure_skip_verify: tls.insecure_skip_verify.unwrap_or(false),
        unusable,
    }))
}

/// Where a DestinationRule's `credentialName` is looked up: the Secrets of
/// its namespace, when this process reads Secrets at all.
struct Credential<'a> {
    objects: &'a Objects<'a>,
    namespace: &'a str,
    read: bool,
}

impl Credential<'_> {
    /// The CA certificates of Secret `name`: its `ca.crt`, else `cacert`
    /// (Istio's two spellings).
    fn ca(&self, name: &str) -> Result<Vec<u8>, String> {
        if !self.read {
            return Err("this process does not read Secrets".into());
        }
        let secret = self
            .objects
            .secrets
            .get(&(self.namespace.to_owned(), name.to_owned()))
            .ok_or_else(|| format!("no Secret {}/{name} can be read", self.namespace))?;
        ["ca.crt", "cacert"]
            .iter()
            .find_map(|k| crate::state::ingress::secret_field(&secret.object, k))
            .ok_or_else(|| format!("Secret {}/{name} has no ca.crt", self.namespace))
    }
}

/// The origination of a `tls` that could not be read: every connection
/// refused, with the reason.
fn refused_tls(at: &str) -> super::TlsOrigination {
    super::TlsOrigination {
        sni: None,
        ca_certificates: None,
        credential_name: None,
        credential_ca: None,
        subject_alt_names: Vec::new(),
        insecure_skip_verify: false,
        unusable: Some(format!("the DestinationRule's {at} tls cannot be applied")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PoolSettings {
    tcp: Option<TcpPool>,
    http: Option<HttpPool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TcpPool {
    max_connections: Option<usize>,
    connect_timeout: Option<Value>,
    tcp_keepalive: Option<Value>,
    max_connection_duration: Option<Value>,
    idle_timeout: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpPool {
    http1_max_pending_requests: Option<usize>,
    http2_max_requests: Option<usize>,
    max_requests_per_connection: Option<usize>,
    max_retries: Option<Value>,
    idle_timeout: Option<Value>,
    h2_upgrade_policy: Option<Value>,
    use_client_protocol: Option<Value>,
    max_concurrent_streams: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OutlierSettings {
    consecutive_5xx_errors: Option<u32>,
    consecutive_gateway_errors: Option<u32>,
    interval: Option<String>,
    base_ejection_time: Option<String>,
    max_ejection_percent: Option<u32>,
    min_health_percent: Option<Value>,
    split_external_local_origin_errors: Option<Value>,
    consecutive_local_origin_failures: Option<Value>,
    consecutive_errors: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LbSettings {
    simple: Option<String>,
    consistent_hash: Option<ConsistentHash>,
    locality_lb_setting: Option<Value>,
    warmup_duration_secs: Option<Value>,
}

impl LbSettings {
    /// Fields read but not applied.
    fn ignored(&self) -> Option<&'static str> {
        if self.locality_lb_setting.is_some() {
            Some("localityLbSetting")
        } else if self.warmup_duration_secs.is_some() {
            Some("warmupDurationSecs")
        } else {
            None
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConsistentHash {
    http_header_name: Option<String>,
    use_source_ip: Option<bool>,
    #[serde(rename = "httpCookie")]
    _http_cookie: Option<serde::de::IgnoredAny>,
    #[serde(rename = "httpQueryParameterName")]
    _http_query_parameter_name: Option<serde::de::IgnoredAny>,
    #[serde(rename = "minimumRingSize")]
    _minimum_ring_size: Option<serde::de::IgnoredAny>,
}

type Services = BTreeMap<(String, String), Arc<Service>>;

/// The Service a host names, from namespace `ns`: `name`, `name.ns`,
/// `name.ns.svc` or `name.ns.svc.cluster.local`.
fn service_of(host: &str, ns: &str) -> (String, String) {
    let host = host
        .strip_suffix(".cluster.local")
        .unwrap_or(host)
        .trim_end_matches(".svc");
    match host.split_once('.') {
        Some((name, in_ns)) if !in_ns.contains('.') => (in_ns.to_owned(), name.to_owned()),
        _ => (ns.to_owned(), host.to_owned()),
    }
}

/// The service a host names from namespace `ns`: a ServiceEntry's host
/// there (its service's name, dots and all), else a Service's name.
fn host_key(services: &Services, host: &str, ns: &str) -> (String, String) {
    let entry = (ns.to_owned(), host.to_owned());
    match services.get(&entry) {
        Some(s) if s.entry.is_some() => entry,
        _ => service_of(host, ns),
    }
}

/// Compiles DestinationRules and VirtualServices into `routes` (after the
/// HTTPRoutes, which win where both route a Service). `bound` names the
/// waypoint serving a Service, if any.
pub(crate) fn compile_istio(
    objects: &Objects,
    secrets_read: bool,
    services: &Services,
    bound: impl Fn(&str, &str) -> Option<String>,
    routes: &mut Routes,
    warnings: &mut Vec<ConfigWarning>,
) {
    for ((ns, name), parsed) in &objects.destination_rules {
        let object = format!("DestinationRule {ns}/{name}");
        let dr = &parsed.object.spec;
        let mut warn = |kind, message: String| {
            warnings.push(ConfigWarning {
                object: object.clone(),
                kind,
                message,
            })
        };
        let key = host_key(services, &dr.host, ns);
        if key.0 != *ns {
            warn(
                "unsupported",
                format!(
                    "host {:?} is in another namespace: a DestinationRule applies to its own \
                     namespace's Services only; not applied",
                    dr.host
                ),
            );
            continue;
        }
        if !services.contains_key(&key) {
            warn(
                "unsupported",
                format!(
                    "host {:?} is neither a Service in the mesh nor a ServiceEntry host; not applied",
                    dr.host
                ),
            );
            continue;
        }
        if bound(&key.0, &key.1).is_none() {
            warn(
                "missing_waypoint",
                format!(
                    "Service {}/{} has no waypoint: a DestinationRule is applied by one; not applied",
                    key.0, key.1
                ),
            );
            continue;
        }
        let mut policy = DestinationPolicy {
            rule: format!("{ns}/{name}"),
            ..DestinationPolicy::default()
        };
        let credential = Credential {
            objects,
            namespace: ns,
            read: secrets_read,
        };
        if let Some(tp) = &dr.traffic_policy {
            if let Some(lb) = traffic_policy(tp, "trafficPolicy", &mut warn) {
                policy.load_balancer = lb;
            }
            if let Some(cp) = &tp.connection_pool {
                policy.connection_pool = Some(connection_pool(cp, &mut warn));
            }
            if let Some(od) = &tp.outlier_detection {
                policy.outlier_detection = outlier_detection(od, &mut warn);
            }
            if let Some(t) = &tp.tls {
                policy.tls = tls_origination(t, "trafficPolicy", &credential, &mut warn)
                    .unwrap_or_else(|| Some(refused_tls("trafficPolicy")));
            }
            for p in &tp.port_level_settings {
                let at = format!("portLevelSettings {}", p.port.number);
                // A port whose tls cannot be applied is refused (no
                // origination) rather than sent in plaintext.
                let tls = p.tls.as_ref().map(|t| {
                    tls_origination(t, &at, &credential, &mut warn)
                        .unwrap_or_else(|| Some(refused_tls(&at)))
                });
                let port = super::PortPolicy {
                    load_balancer: p
                        .load_balancer
                        .as_ref()
                        .map(|lb| load_balancer(lb, &at, &mut warn)),
                    connection_pool: p
                        .connection_pool
                        .as_ref()
                        .map(|cp| connection_pool(cp, &mut warn)),
                    outlier_detection: p
                        .outlier_detection
                        .as_ref()
                        .and_then(|od| outlier_detection(od, &mut warn)),
                    tls,
                };
                policy.ports.insert(p.port.number, port);
            }
        }
        for s in &dr.subsets {
            policy
                .subsets
                .insert(s.name.clone(), Arc::new(s.labels.clone()));
            if let Some(tp) = &s.traffic_policy {
                let at = format!("subset {}", s.name);
                if let Some(lb) = traffic_policy(tp, &at, &mut warn) {
                    policy.subset_load_balancers.insert(s.name.clone(), lb);
                }
                if let Some(cp) = &tp.connection_pool {
                    let pool = connection_pool(cp, &mut warn);
                    policy.subset_pools.insert(s.name.clone(), pool);
                }
                if let Some(od) = &tp.outlier_detection
                    && let Some(od) = outlier_detection(od, &mut warn)
                {
                    policy.subset_outliers.insert(s.name.clone(), od);
                }
                if !tp.port_level_settings.is_empty() {
                    warn(
                        "unsupported",
                        format!("{at}: portLevelSettings inside a subset are not applied"),
                    );
                }
                if tp.tls.is_some() {
                    warn(
                        "unsupported",
                        format!("{at}: tls inside a subset is not applied (set it on the rule)"),
                    );
                }
            }
        }
        if dr.workload_selector.is_some() {
            warn(
                "unsupported",
                "workloadSelector is not read; the rule applies to every client".into(),
            );
        }
        if routes.3.insert(key.clone(), policy).is_some() {
            warn(
                "conflict",
                format!(
                    "another DestinationRule also names Service {}/{}; this one (later by name) is used",
                    key.0, key.1
                ),
            );
        }
    }

    for ((ns, name), parsed) in &objects.virtual_services {
        let object = format!("VirtualService {ns}/{name}");
        let vs = &parsed.object.spec;
        let mut c = VsCompiler {
            object: &object,
            ns,
            services,
            destinations: &routes.3,
            warnings: &mut *warnings,
        };
        if vs.gateways.iter().any(|g| g != "mesh") {
            c.warn(
                "unsupported",
                "gateways other than `mesh` are ingress, not this waypoint's; not applied to them"
                    .into(),
            );
        }
        if vs.tcp.is_some() || vs.tls.is_some() {
            c.warn("unsupported", "tcp and tls routes are not read".into());
        }
        let rules: Vec<(Vec<RouteMatch>, Arc<RuleAction>)> = vs
            .http
            .iter()
            .enumerate()
            .filter_map(|(i, r)| c.rule(&format!("{ns}/{name}"), i, r))
            .collect();
        for host in &vs.hosts {
            let key = host_key(services, host, ns);
            if key.0 != *ns {
                c.warn(
                    "unsupported",
                    format!(
                        "host {host:?} is in another namespace: a VirtualService routes its own \
                         namespace's Services only; not applied to it"
                    ),
                );
                continue;
            }
            if !services.contains_key(&key) {
                c.warn(
                    "unsupported",
                    format!("host {host:?} is not a Service in the mesh; not applied to it"),
                );
                continue;
            }
            if bound(&key.0, &key.1).is_none() {
                c.warn(
                    "missing_waypoint",
                    format!(
                        "Service {}/{} has no waypoint: a VirtualService is applied by one; not applied to it",
                        key.0, key.1
                    ),
                );
                continue;
            }
            if let Some(by) = routes.0.get(&key).and_then(|l| l.first()) {
                c.warn(
                    "conflict",
                    format!(
                        "Service {}/{} is routed by HTTPRoute {}, which wins over a VirtualService; not applied to it",
                        key.0, key.1, by.action.route
                    ),
                );
                continue;
            }
            let list = routes.2.entry(key).or_default();
            if !list.is_empty() {
                c.warn(
                    "conflict",
                    "another VirtualService also routes this host; its rules come first".into(),
                );
            }
            for (ri, (matches, action)) in rules.iter().enumerate() {
                for (mi, matcher) in matches.iter().enumerate() {
                    list.push(RouteEntry {
                        port: None,
                        matcher: matcher.clone(),
                        action: action.clone(),
                        order: (String::new(), format!("{ns}/{name}"), ri, mi),
                    });
                }
            }
        }
    }
}

/// The load balancer a traffic policy sets, if any; the parts not applied
/// are warned.
fn traffic_policy(
    tp: &TrafficPolicy,
    at: &str,
    warn: &mut impl FnMut(&'static str, String),
) -> Option<LoadBalancer> {
    for (field, set) in [
        ("tunnel", tp.tunnel.is_some()),
        ("proxyProtocol", tp.proxy_protocol.is_some()),
    ] {
        if set {
            warn(
                "unsupported",
                format!("{at}: {field} is not applied by this version"),
            );
        }
    }
    tp.load_balancer
        .as_ref()
        .map(|lb| load_balancer(lb, at, warn))
}

fn load_balancer(
    lb: &LbSettings,
    at: &str,
    warn: &mut impl FnMut(&'static str, String),
) -> LoadBalancer {
    if let Some(field) = lb.ignored() {
        warn(
            "unsupported",
            format!("{at}: loadBalancer {field} is not applied by this version"),
        );
    }
    if let Some(h) = &lb.consistent_hash {
        if let Some(name) = &h.http_header_name {
            return LoadBalancer::HashHeader(name.to_ascii_lowercase());
        }
        if h.use_source_ip == Some(true) {
            return LoadBalancer::HashSourceIp;
        }
        warn(
            "unsupported",
            format!(
                "{at}: consistentHash by cookie or query parameter is not supported; round robin"
            ),
        );
        return LoadBalancer::RoundRobin;
    }
    match lb.simple.as_deref() {
        None | Some("UNSPECIFIED" | "ROUND_ROBIN") => LoadBalancer::RoundRobin,
        Some("LEAST_REQUEST" | "LEAST_CONN") => LoadBalancer::LeastRequest,
        Some("RANDOM") => LoadBalancer::Random,
        Some(other) => {
            warn(
                "unsupported",
                format!("{at}: loadBalancer {other:?} is not supported; round robin"),
            );
            LoadBalancer::RoundRobin
        }
    }
}

/// `connectionPool`: a cap on requests in flight to the Service and on
/// those that may wait for a place; the rest is reported as not applied.
fn connection_pool(
    cp: &PoolSettings,
    warn: &mut impl FnMut(&'static str, String),
) -> super::ConnectionPool {
    let tcp_max = cp.tcp.as_ref().and_then(|t| t.max_connections);
    let h2_max = cp.http.as_ref().and_then(|h| h.http2_max_requests);
    let max_requests = match (tcp_max, h2_max) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let ignored = cp.tcp.as_ref().is_some_and(|t| {
        t.connect_timeout.is_some()
            || t.tcp_keepalive.is_some()
            || t.max_connection_duration.is_some()
            || t.idle_timeout.is_some()
    }) || cp.http.as_ref().is_some_and(|h| {
        h.max_retries.is_some()
            || h.idle_timeout.is_some()
            || h.h2_upgrade_policy.is_some()
            || h.use_client_protocol.is_some()
            || h.max_concurrent_streams.is_some()
    });
    if ignored {
        warn(
            "unsupported",
            "connectionPool: only tcp.maxConnections, http.http2MaxRequests, \
             http.http1MaxPendingRequests (as a cap on requests in flight to the Service and on \
             those waiting) and http.maxRequestsPerConnection are applied"
                .into(),
        );
    }
    super::ConnectionPool {
        max_requests: max_requests.map(|n| n.max(1)),
        max_pending: cp
            .http
            .as_ref()
            .and_then(|h| h.http1_max_pending_requests)
            .unwrap_or(0),
        // Istio's 0 is "no limit".
        max_requests_per_connection: cp
            .http
            .as_ref()
            .and_then(|h| h.max_requests_per_connection)
            .filter(|n| *n > 0),
    }
}

/// `outlierDetection`, with Istio's defaults (10 s interval, 30 s base
/// ejection, at most 10% ejected); None when it ejects on nothing.
fn outlier_detection(
    od: &OutlierSettings,
    warn: &mut impl FnMut(&'static str, String),
) -> Option<super::OutlierDetection> {
    if od.min_health_percent.is_some()
        || od.split_external_local_origin_errors.is_some()
        || od.consecutive_local_origin_failures.is_some()
        || od.consecutive_errors.is_some()
    {
        warn(
            "unsupported",
            "outlierDetection: only consecutive5xxErrors, consecutiveGatewayErrors, interval, \
             baseEjectionTime and maxEjectionPercent are applied"
                .into(),
        );
    }
    let mut duration = |d: &Option<String>, default: u64| {
        d.as_deref()
            .map(|d| {
                parse_gateway_duration(d).unwrap_or_else(|| {
                    warn(
                        "parse_error",
                        format!("outlierDetection: duration {d:?} does not parse; default used"),
                    );
                    Duration::from_secs(default)
                })
            })
            .unwrap_or(Duration::from_secs(default))
    };
    let out = super::OutlierDetection {
        consecutive_5xx: od.consecutive_5xx_errors.filter(|n| *n > 0),
        consecutive_gateway: od.consecutive_gateway_errors.filter(|n| *n > 0),
        interval: duration(&od.interval, 10),
        base_ejection: duration(&od.base_ejection_time, 30),
        max_ejection_percent: od.max_ejection_percent.unwrap_or(10).min(100),
    };
    // Istio's default when neither is given: 5 consecutive 5xx.
    let out = if od.consecutive_5xx_errors.is_none() && od.consecutive_gateway_errors.is_none() {
        super::OutlierDetection {
            consecutive_5xx: Some(5),
            ..out
        }
    } else {
        out
    };
    (out.consecutive_5xx.is_some() || out.consecutive_gateway.is_some()).then_some(out)
}

struct VsCompiler<'a> {
    object: &'a str,
    ns: &'a str,
    services: &'a Services,
    destinations: &'a HashMap<(String, String), DestinationPolicy>,
    warnings: &'a mut Vec<ConfigWarning>,
}

impl VsCompiler<'_> {
    fn warn(&mut self, kind: &'static str, message: String) {
        super::warn_once(self.warnings, self.object, kind, message);
    }

    fn rule(
        &mut self,
        vs: &str,
        index: usize,
        r: &VsHttp,
    ) -> Option<(Vec<RouteMatch>, Arc<RuleAction>)> {
        let label = r.name.clone().unwrap_or_else(|| index.to_string());
        for (field, set) in [
            ("corsPolicy", r.cors_policy.is_some()),
            ("delegate", r.delegate.is_some()),
            ("directResponse", r.direct_response.is_some()),
        ] {
            if set {
                self.warn(
                    "unsupported",
                    format!("http {label}: {field} is not supported; the rule is not applied"),
                );
                return None;
            }
        }
        let mut action = RuleAction {
            route: vs.to_owned(),
            rule: label.clone(),
            ..RuleAction::default()
        };
        let single = r.route.len() == 1;
        for d in &r.route {
            let weight = d.weight.unwrap_or(if single { 100 } else { 0 });
            action
                .backends
                .push(self.backend(&d.destination, weight, &label));
            if d.headers.is_some() {
                self.warn(
                    "unsupported",
                    format!("http {label}: per-destination headers are not applied"),
                );
            }
        }
        if let Some(h) = &r.headers {
            if let Some(ops) = &h.request {
                action.request_headers = self.headers(ops, &label);
            }
            if let Some(ops) = &h.response {
                action.response_headers = self.headers(ops, &label);
            }
        }
        let prefix_match = r
            .matches
            .iter()
            .any(|m| m.uri.as_ref().is_some_and(|u| u.prefix.is_some()));
        if let Some(rw) = &r.rewrite {
            action.rewrite = Some(Rewrite {
                hostname: rw.authority.clone(),
                path: rw.uri.clone().map(|u| {
                    if prefix_match {
                        PathModifier::Prefix(u)
                    } else {
                        PathModifier::Full(u)
                    }
                }),
            });
        }
        if let Some(rd) = &r.redirect {
            action.redirect = Some(Redirect {
                scheme: rd.scheme.clone(),
                hostname: rd.authority.clone(),
                path: rd.uri.clone().map(PathModifier::Full),
                port: rd.port,
                status: rd.redirect_code.unwrap_or(301),
            });
        }
        if let Some(t) = &r.timeout {
            action.timeout = self.duration(t, &label).filter(|d| !d.is_zero());
        }
        if let Some(rt) = &r.retries {
            let mut codes = Vec::new();
            for on in rt
                .retry_on
                .as_deref()
                .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,503")
                .split(',')
            {
                match on.trim() {
                    "5xx" => codes.extend(500..=599),
                    "gateway-error" => codes.extend([502, 503, 504]),
                    "connect-failure"
                    | "refused-stream"
                    | "reset"
                    | "unavailable"
                    | "cancelled"
                    | "retriable-status-codes"
                    | "" => {}
                    code => match code.parse::<u16>() {
                        Ok(c) => codes.push(c),
                        Err(_) => self.warn(
                            "unsupported",
                            format!("http {label}: retryOn {code:?} is not supported"),
                        ),
                    },
                }
            }
            codes.sort_unstable();
            codes.dedup();
            action.retry = Retry {
                attempts: rt.attempts.unwrap_or(2).min(super::MAX_RETRIES),
                codes,
                backoff: Duration::from_millis(25),
            };
            action.backend_timeout = rt
                .per_try_timeout
                .as_deref()
                .and_then(|d| self.duration(d, &label));
        }
        if let Some(m) = &r.mirror {
            let backend = self.backend(m, 1, &label);
            let percent = r.mirror_percentage.as_ref().map_or(100.0, |p| p.value);
            action.mirrors.push(Mirror {
                backend,
                percent: percent.clamp(0.0, 100.0).round() as u32,
            });
        }
        if let Some(f) = &r.fault {
            let share =
                |p: &Option<Percent>| p.as_ref().map_or(100.0, |p| p.value.clamp(0.0, 100.0));
            let mut fault = Fault::default();
            if let Some(d) = &f.delay
                && let Some(dur) = self.duration(&d.fixed_delay, &label)
            {
                fault.delay = Some((dur, share(&d.percentage)));
            }
            if let Some(a) = &f.abort {
                let abort = match (a.http_status, a.grpc_status.as_deref()) {
                    (Some(code), _) => Some(Abort::Http(code)),
                    (None, Some(name)) => grpc_code(name).map(Abort::Grpc),
                    (None, None) => None,
                };
                match abort {
                    Some(abort) => fault.abort = Some((abort, share(&a.percentage))),
                    None => self.warn(
                        "parse_error",
                        format!("http {label}: fault.abort needs httpStatus or a known grpcStatus; ignored"),
                    ),
                }
            }
            action.fault = Some(fault);
        }
        let matches = if r.matches.is_empty() {
            vec![RouteMatch {
                path: PathMatch::StringPrefix("/".into()),
                headers: Vec::new(),
                query: Vec::new(),
                method: None,
            }]
        } else {
            let m: Vec<RouteMatch> = r
                .matches
                .iter()
                .filter_map(|m| self.matcher(m, &label))
                .collect();
            if m.is_empty() {
                return None;
            }
            m
        };
        Some((matches, Arc::new(action)))
    }

    fn matcher(&mut self, m: &VsMatch, rule: &str) -> Option<RouteMatch> {
        for (field, set) in [
            ("authority", m.authority.is_some()),
            ("scheme", m.scheme.is_some()),
            ("sourceLabels", m.source_labels.is_some()),
            ("sourceNamespace", m.source_namespace.is_some()),
            ("withoutHeaders", m.without_headers.is_some()),
            ("gateways", m.gateways.is_some()),
            ("ignoreUriCase", m.ignore_uri_case == Some(true)),
        ] {
            if set {
                self.warn(
                    "unsupported",
                    format!(
                        "http {rule}: match {field} is not supported; that match never applies"
                    ),
                );
                return None;
            }
        }
        if m.port.is_some() {
            self.warn(
                "unsupported",
                format!("http {rule}: match port is not read"),
            );
        }
        let path = match &m.uri {
            None => PathMatch::StringPrefix("/".into()),
            Some(u) => match self.string_match(u, rule)? {
                ValueMatch::Exact(e) => PathMatch::Exact(e),
                ValueMatch::Prefix(p) => PathMatch::StringPrefix(p),
                ValueMatch::Regex(r) => PathMatch::Regex(r),
            },
        };
        let mut headers = Vec::new();
        for (name, v) in &m.headers {
            let Ok(h) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) else {
                self.warn(
                    "parse_error",
                    format!("http {rule}: header name {name:?} is not valid"),
                );
                return None;
            };
            headers.push((h, self.string_match(v, rule)?));
        }
        let mut query = Vec::new();
        for (name, v) in &m.query_params {
            query.push((name.clone(), self.string_match(v, rule)?));
        }
        let method = match &m.method {
            None => None,
            Some(StringMatch { exact: Some(e), .. }) => Method::from_bytes(e.as_bytes()).ok(),
            Some(_) => {
                self.warn(
                    "unsupported",
                    format!("http {rule}: only an exact method match is supported"),
                );
                return None;
            }
        };
        Some(RouteMatch {
            path,
            headers,
            query,
            method,
        })
    }

    fn string_match(&mut self, m: &StringMatch, rule: &str) -> Option<ValueMatch> {
        match (&m.exact, &m.prefix, &m.regex) {
            (Some(e), None, None) => Some(ValueMatch::Exact(e.clone())),
            (None, Some(p), None) => Some(ValueMatch::Prefix(p.clone())),
            (None, None, Some(r)) => match regex_lite::Regex::new(&format!("^(?:{r})$")) {
                Ok(re) => Some(ValueMatch::Regex(re)),
                Err(e) => {
                    self.warn("parse_error", format!("http {rule}: regex {r:?}: {e}"));
                    None
                }
            },
            _ => {
                self.warn(
                    "parse_error",
                    format!(
                        "http {rule}: a string match takes exactly one of exact, prefix, regex"
                    ),
                );
                None
            }
        }
    }

    fn backend(&mut self, d: &VsDestination, weight: u32, rule: &str) -> Backend {
        let key = host_key(self.services, &d.host, self.ns);
        let port = d.port.as_ref().map_or(0, |p| p.number);
        let service = match self.services.get(&key) {
            _ if key.0 != self.ns => Err(format!(
                "destination host {:?} is in another namespace",
                d.host
            )),
            None => Err(format!("destination host {:?} is not a Service", d.host)),
            Some(s) if port != 0 && !s.ports.iter().any(|p| p.port == port) => {
                Err(format!("destination {} has no port {port}", s.hostname()))
            }
            Some(s) => Ok(s.clone()),
        };
        let subset = d.subset.as_ref().map(|name| {
            let labels = self
                .destinations
                .get(&key)
                .and_then(|p| p.subsets.get(name))
                .cloned();
            (name.clone(), labels)
        });
        let (service, subset) = match subset {
            Some((name, None)) => (
                Err(format!(
                    "subset {name:?} of host {:?} is not defined by a DestinationRule",
                    d.host
                )),
                None,
            ),
            Some((name, Some(labels))) => (service, Some((name, labels))),
            None => (service, None),
        };
        if let Err(e) = &service {
            self.warn(
                "unresolved_ref",
                format!("http {rule}: {e}; requests sent to it get 500"),
            );
        }
        Backend {
            service,
            port,
            weight,
            subset,
        }
    }

    fn headers(&mut self, ops: &HeaderOps, rule: &str) -> HeaderModifier {
        let mut out = HeaderModifier::default();
        let pair = |this: &mut Self, k: &str, v: &str| match (
            HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()),
            HeaderValue::from_str(v),
        ) {
            (Ok(k), Ok(v)) => Some((k, v)),
            _ => {
                this.warn(
                    "parse_error",
                    format!("http {rule}: header {k:?}: {v:?} is not valid; ignored"),
                );
                None
            }
        };
        out.set = ops
            .set
            .iter()
            .filter_map(|(k, v)| pair(self, k, v))
            .collect();
        out.add = ops
            .add
            .iter()
            .filter_map(|(k, v)| pair(self, k, v))
            .collect();
        out.remove = ops
            .remove
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).ok())
            .collect();
        out
    }

    fn duration(&mut self, d: &str, rule: &str) -> Option<Duration> {
        // Istio writes protobuf durations (`1.5s` too); whole units here.
        match parse_gateway_duration(d) {
            Some(d) => Some(d),
            None => {
                self.warn(
                    "parse_error",
                    format!("http {rule}: duration {d:?} is not like 10s, 500ms or 1h; ignored"),
                );
                None
            }
        }
    }
}

/// gRPC status codes by name, as Istio's `grpcStatus` takes them.
fn grpc_code(name: &str) -> Option<u8> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u8)
}
