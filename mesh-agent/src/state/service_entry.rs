//! Istio's ServiceEntry: services outside Kubernetes' registry (an external
//! API, a VM) added to the store as services, so that routing, policy,
//! telemetry and registry-only egress see them like any other.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize;

use super::{
    ConfigWarning, Service, ServicePort, TargetPort,
    k8s::Slice,
    yaml::{Objects, WorkloadSelector},
};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ServiceEntry {
    #[serde(default)]
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    #[serde(default)]
    pub spec: Spec,
}

/// The hosts of ServiceEntry `ns/name` (the store's service names for
/// it), for a route's `parentRef` or a policy's `targetRef` of kind
/// ServiceEntry; None when there is no such entry.
pub(super) fn hosts_of<'a>(objects: &'a Objects, ns: &str, name: &str) -> Option<&'a [String]> {
    objects
        .service_entries
        .get(&(ns.to_owned(), name.to_owned()))
        .map(|e| e.object.spec.hosts.as_slice())
}

/// The labels of the ServiceEntry in `ns` that lists `host` (the last by
/// name, whose service the store keeps), for its `istio.io/use-waypoint`.
pub(super) fn labels_of<'a>(
    objects: &'a Objects,
    ns: &str,
    host: &str,
) -> Option<&'a BTreeMap<String, String>> {
    objects
        .service_entries
        .range((ns.to_owned(), String::new())..)
        .take_while(|((n, _), _)| n == ns)
        .filter(|(_, e)| e.object.spec.hosts.iter().any(|h| h == host))
        .last()
        .and_then(|(_, e)| e.object.metadata.labels.as_ref())
}

/// `group: networking.istio.io, kind: ServiceEntry` of a reference.
pub(super) fn is_entry_ref(group: Option<&str>, kind: Option<&str>) -> bool {
    group == Some("networking.istio.io") && kind == Some("ServiceEntry")
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Spec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<Port>,
    location: Option<String>,
    resolution: Option<String>,
    #[serde(default)]
    endpoints: Vec<WorkloadEntry>,
    workload_selector: Option<WorkloadSelectorSpec>,
    export_to: Option<Vec<String>>,
    subject_alt_names: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Port {
    number: u32,
    protocol: Option<String>,
    #[serde(default)]
    name: String,
    target_port: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(
    dead_code,
    reason = "accepted as Istio writes them; a node agent uses the address and ports"
)]
struct WorkloadEntry {
    #[serde(default)]
    address: String,
    #[serde(default)]
    ports: BTreeMap<String, u32>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    network: Option<String>,
    locality: Option<String>,
    weight: Option<u32>,
    service_account: Option<String>,
}

/// ServiceEntry's `workloadSelector: {labels: ...}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadSelectorSpec {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// `location`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

/// What the store keeps of a ServiceEntry, per host.
#[derive(Debug)]
pub(super) struct Entry {
    pub service: Service,
    /// Resolution DNS: names the agent resolves when a connection needs
    /// them (the endpoints' names, or without endpoints the host itself).
    pub dns: Vec<DnsName>,
    /// Its endpoints (STATIC, DNS with IP literals, workloadSelector); None
    /// for resolution NONE: a connection goes where it was addressed.
    pub endpoints: Option<Vec<Slice>>,
}

/// A name to resolve, with the port (by the entry's port name) to reach on
/// what it resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DnsName {
    pub host: String,
    pub ports: Vec<(String, u16)>,
}

fn port(n: u32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// Every host of every ServiceEntry as a service of the entry's
/// namespace, named by the host.
pub(super) fn compile(
    objects: &Objects,
    workloads: &super::Workloads,
    warnings: &mut Vec<ConfigWarning>,
) -> Vec<Entry> {
    let mut out = Vec::new();
    for ((namespace, name), parsed) in &objects.service_entries {
        let spec = &parsed.object.spec;
        let object = format!("ServiceEntry {namespace}/{name}");
        let mut warn = |kind, message: String| {
            warnings.push(ConfigWarning {
                object: object.clone(),
                kind,
                message,
            })
        };
        if spec.hosts.is_empty() {
            warn("parse_error", "hosts is empty; ignored".into());
            continue;
        }
        if let Some(to) = &spec.export_to
            && to.iter().any(|t| t != "*")
        {
            warn(
                "unsupported",
                format!("exportTo {to:?} is not applied: the entry is visible to every namespace"),
            );
        }
        // The identities an endpoint of the entry may show besides its own
        // (as ztunnel accepts a Service's SANs). Only SPIFFE IDs can be
        // checked here; dropping another only narrows what is accepted.
        let mut subject_alt_names = Vec::new();
        for san in spec.subject_alt_names.iter().flatten() {
            match san.parse::<crate::identity::Identity>() {
                Ok(id) => subject_alt_names.push(id.to_string()),
                Err(e) => warn(
                    "parse_error",
                    format!("subjectAltNames entry {san:?} is not a SPIFFE ID ({e}); ignored"),
                ),
            }
        }
        let location = match spec.location.as_deref() {
            None | Some("MESH_EXTERNAL") => Location::MeshExternal,
            Some("MESH_INTERNAL") => Location::MeshInternal,
            Some(other) => {
                warn(
                    "parse_error",
                    format!(
                        "location {other:?} is neither MESH_EXTERNAL nor MESH_INTERNAL; ignored"
                    ),
                );
                continue;
            }
        };
        let resolution = spec.resolution.as_deref().unwrap_or("NONE");
        if !matches!(resolution, "NONE" | "STATIC" | "DNS" | "DNS_ROUND_ROBIN") {
            warn(
                "parse_error",
                format!("resolution {resolution:?} is not NONE, STATIC or DNS; ignored"),
            );
            continue;
        }
        let mut ports = Vec::new();
        for p in &spec.ports {
            // The data path carries TCP: UDP and friends are not served.
            if p.protocol
                .as_deref()
                .is_some_and(|proto| matches!(proto.to_ascii_uppercase().as_str(), "UDP" | "SCTP"))
            {
                continue;
            }
            let (Some(number), Some(target)) =
                (port(p.number), port(p.target_port.unwrap_or(p.number)))
            else {
                warn(
                    "parse_error",
                    format!(
                        "port {:?}: {} is not a port number; ignored",
                        p.name, p.number
                    ),
                );
                continue;
            };
            ports.push(ServicePort {
                name: p.name.clone(),
                port: number,
                target_port: TargetPort::Number(target),
                app_protocol: p.protocol.as_ref().map(|s| s.to_ascii_lowercase()),
            });
        }
        let mut vips = Vec::new();
        for text in &spec.addresses {
            // A single address may be written as a /32 or /128.
            let bare = text
                .strip_suffix("/32")
                .or_else(|| text.strip_suffix("/128"))
                .unwrap_or(text);
            match bare.parse::<IpAddr>() {
                Ok(ip) if !vips.contains(&ip.to_canonical()) => vips.push(ip.to_canonical()),
                Ok(_) => {}
                Err(_) => warn(
                    "unsupported",
                    format!(
                        "address {text:?} is not a single IP address (CIDR ranges are not supported); ignored"
                    ),
                ),
            }
        }
        let mut names = Vec::new();
        let endpoints = match resolution {
            "NONE" => {
                if !spec.endpoints.is_empty() {
                    warn(
                        "parse_error",
                        "endpoints are not used with resolution NONE; ignored".into(),
                    );
                }
                None
            }
            _ if spec.workload_selector.is_some() => {
                if !spec.endpoints.is_empty() {
                    warn(
                        "parse_error",
                        "endpoints and workloadSelector are exclusive; the selector is used".into(),
                    );
                }
                let labels = spec
                    .workload_selector
                    .as_ref()
                    .map(|s| s.labels.clone())
                    .unwrap_or_default();
                let selector = WorkloadSelector {
                    match_labels: Some(labels),
                };
                let labels = WorkloadSelector::labels(Some(&selector)).unwrap_or_default();
                let slices = workloads
                    .in_namespace(namespace)
                    .iter()
                    .filter(|wl| wl.has_labels(&labels))
                    .map(|wl| Slice {
                        addresses: wl.ips.clone(),
                        ports: ports
                            .iter()
                            .map(|p| (p.name.clone(), target_of(p)))
                            .collect(),
                    })
                    .collect();
                Some(slices)
            }
            _ => {
                let mut slices = Vec::new();
                for ep in &spec.endpoints {
                    let ip = match ep.address.parse::<IpAddr>() {
                        Ok(ip) => ip.to_canonical(),
                        Err(_) if resolution == "STATIC" => {
                            warn(
                                "parse_error",
                                format!(
                                    "endpoint address {:?} is not an IP address, as resolution \
                                     STATIC needs; ignored",
                                    ep.address
                                ),
                            );
                            continue;
                        }
                        Err(_) if ep.address.is_empty() || ep.address.starts_with("unix://") => {
                            warn(
                                "unsupported",
                                format!(
                                    "endpoint address {:?} is neither an IP address nor a name; \
                                     ignored",
                                    ep.address
                                ),
                            );
                            continue;
                        }
                        Err(_) => {
                            names.push(DnsName {
                                host: ep.address.clone(),
                                ports: endpoint_ports(&ports, &ep.ports),
                            });
                            continue;
                        }
                    };
                    let mut slice_ports = Vec::new();
                    for p in &ports {
                        match ep.ports.get(&p.name) {
                            Some(&n) => match port(n) {
                                Some(n) => slice_ports.push((p.name.clone(), n)),
                                None => warn(
                                    "parse_error",
                                    format!(
                                        "endpoint {ip}: port {n} is not a port number; ignored"
                                    ),
                                ),
                            },
                            None => slice_ports.push((p.name.clone(), target_of(p))),
                        }
                    }
                    slices.push(Slice {
                        addresses: vec![ip],
                        ports: slice_ports,
                    });
                }
                Some(slices)
            }
        };
        for host in &spec.hosts {
            // DNS without endpoints: each host is resolved for itself (a
            // wildcard cannot be).
            let dns = if resolution != "STATIC"
                && resolution != "NONE"
                && spec.endpoints.is_empty()
                && spec.workload_selector.is_none()
            {
                if host.starts_with('*') {
                    warn(
                        "unsupported",
                        format!("host {host:?}: a wildcard cannot be resolved; no endpoints"),
                    );
                    Vec::new()
                } else {
                    vec![DnsName {
                        host: host.clone(),
                        ports: endpoint_ports(&ports, &BTreeMap::new()),
                    }]
                }
            } else {
                names.clone()
            };
            out.push(Entry {
                dns,
                service: Service {
                    name: host.clone(),
                    namespace: namespace.clone(),
                    vips: vips.clone(),
                    ports: ports.clone(),
                    selector: BTreeMap::new(),
                    entry: Some(location),
                    subject_alt_names: subject_alt_names.clone(),
                },
                endpoints: endpoints.as_ref().map(|s| {
                    s.iter()
                        .map(|s| Slice {
                            addresses: s.addresses.clone(),
                            ports: s.ports.clone(),
                        })
                        .collect()
                }),
            });
        }
    }
    out
}

/// An endpoint's port per entry port: its own by the port's name, else the
/// entry port's target (a number that is no port falls back too).
fn endpoint_ports(ports: &[ServicePort], own: &BTreeMap<String, u32>) -> Vec<(String, u16)> {
    ports
        .iter()
        .map(|p| {
            let n = own.get(&p.name).and_then(|&n| port(n));
            (p.name.clone(), n.unwrap_or_else(|| target_of(p)))
        })
        .collect()
}

fn target_of(p: &ServicePort) -> u16 {
    match p.target_port {
        TargetPort::Number(n) => n,
        TargetPort::Name(_) => p.port,
    }
}
