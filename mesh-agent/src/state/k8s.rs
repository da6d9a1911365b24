//! Pods, Services and Namespaces turned into the store's `Workload` and
//! `Service`: defaults filled in, addresses parsed, ambient capture decided.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::core::v1::{Pod, PodStatus, Service as K8sService},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{ConfigWarning, Service, ServicePort, TargetPort, Workload, yaml::Objects};

/// The label (on a namespace or a pod) that puts workloads in the mesh.
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// The annotation naming a pod's network namespace in a local configuration
/// (`/run/netns/NAME`, `/proc/PID/ns/net`).
pub const NETNS_ANNOTATION: &str = "mesh-agent/netns";

/// A workload and what the store needs to know about its pod besides.
#[derive(Debug)]
pub(super) struct PodWorkload {
    pub workload: Workload,
    /// Shares its node's network namespace and addresses.
    pub host_network: bool,
}

/// Workloads of the pods that may still run (not Succeeded or Failed), in
/// namespace/name order.
pub(super) fn workloads(objects: &Objects, warnings: &mut Vec<ConfigWarning>) -> Vec<PodWorkload> {
    objects
        .pods
        .values()
        .filter_map(|pod| {
            let ns_labels = |ns: &str| {
                let namespace = &objects.namespaces.get(ns)?.object;
                namespace.metadata.labels.as_ref()
            };
            workload(&pod.object, ns_labels, warnings)
        })
        .collect()
}

fn workload<'a>(
    pod: &Pod,
    ns_labels: impl Fn(&str) -> Option<&'a BTreeMap<String, String>>,
    warnings: &mut Vec<ConfigWarning>,
) -> Option<PodWorkload> {
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let meta = &pod.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let object = format!("Pod {namespace}/{name}");
    let spec = pod.spec.as_ref();
    let labels = meta.labels.clone().unwrap_or_default();

    let mut ports = BTreeMap::new();
    let container_ports = spec
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten());
    for p in container_ports {
        let Some(port_name) = &p.name else { continue };
        match port_number(p.container_port) {
            Some(n) => {
                ports.insert(port_name.clone(), n);
            }
            None => warnings.push(ConfigWarning {
                object: object.clone(),
                kind: "parse_error",
                message: format!(
                    "container port {port_name} is {}, not a port number; ignored",
                    p.container_port
                ),
            }),
        }
    }

    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    // Capturing a host-network pod would capture its whole node; Istio's CNI
    // never does, whatever the labels say.
    let captured = !host_network && captured(&labels, ns_labels(&namespace));
    let workload = Workload {
        ips: pod_ips(status, &object, warnings),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        name,
        namespace,
        labels,
        ports,
        captured,
        uid: meta.uid.clone().unwrap_or_default(),
        netns: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(NETNS_ANNOTATION))
            .filter(|path| !path.is_empty())
            .map(std::path::PathBuf::from),
    };
    Some(PodWorkload {
        workload,
        host_network,
    })
}

/// The pod's own `istio.io/dataplane-mode` decides (`none` opts out,
/// `ambient` opts in); otherwise its namespace's label does.
fn captured(pod: &BTreeMap<String, String>, namespace: Option<&BTreeMap<String, String>>) -> bool {
    match pod.get(DATAPLANE_MODE).map(String::as_str) {
        Some("none") => false,
        Some("ambient") => true,
        _ => namespace
            .and_then(|labels| labels.get(DATAPLANE_MODE))
            .is_some_and(|mode| mode == "ambient"),
    }
}

/// `status.podIPs`, else `status.podIP`; none while the pod is pending.
fn pod_ips(
    status: Option<&PodStatus>,
    object: &str,
    warnings: &mut Vec<ConfigWarning>,
) -> Vec<IpAddr> {
    let Some(status) = status else {
        return Vec::new();
    };
    let mut raw: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    if raw.is_empty() {
        raw.extend(status.pod_ip.as_deref());
    }
    let mut ips = Vec::new();
    for text in raw.into_iter().filter(|t| !t.is_empty()) {
        match text.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip.to_canonical()) => ips.push(ip.to_canonical()),
            Ok(_) => {}
            Err(e) => warnings.push(ConfigWarning {
                object: object.to_owned(),
                kind: "parse_error",
                message: format!("pod IP {text:?}: {e}; ignored"),
            }),
        }
    }
    ips
}

pub(super) fn services(objects: &Objects, warnings: &mut Vec<ConfigWarning>) -> Vec<Service> {
    objects
        .services
        .values()
        .map(|svc| service(&svc.object, warnings))
        .collect()
}

fn service(svc: &K8sService, warnings: &mut Vec<ConfigWarning>) -> Service {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let object = format!("Service {namespace}/{name}");
    let mut warn = |message: String| {
        warnings.push(ConfigWarning {
            object: object.clone(),
            kind: "parse_error",
            message,
        });
    };
    let Some(spec) = &svc.spec else {
        return Service {
            name,
            namespace,
            vips: Vec::new(),
            ports: Vec::new(),
            selector: BTreeMap::new(),
        };
    };

    // clusterIPs holds clusterIP first, and the second family when dual-stack.
    let cluster_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let mut vips = Vec::new();
    for text in cluster_ips {
        if text.is_empty() || text == "None" {
            continue;
        }
        match text.parse::<IpAddr>() {
            Ok(ip) if !vips.contains(&ip.to_canonical()) => vips.push(ip.to_canonical()),
            Ok(_) => {}
            Err(e) => warn(format!("clusterIP {text:?}: {e}; ignored")),
        }
    }

    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let port_name = p.name.clone().unwrap_or_default();
        // The data path carries TCP only.
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let Some(port) = port_number(p.port) else {
            warn(format!(
                "port {port_name:?} is {}, not a port number; ignored",
                p.port
            ));
            continue;
        };
        match target_port(port, p.target_port.as_ref()) {
            Some(target_port) => ports.push(ServicePort {
                name: port_name,
                port,
                target_port,
            }),
            None => warn(format!(
                "port {port_name:?}: targetPort {:?} is not a port number or name; ignored",
                p.target_port
            )),
        }
    }

    Service {
        name,
        namespace,
        vips,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
    }
}

/// Kubernetes defaults a missing targetPort to the port itself.
fn target_port(port: u16, target: Option<&IntOrString>) -> Option<TargetPort> {
    match target {
        None | Some(IntOrString::Int(0)) => Some(TargetPort::Number(port)),
        Some(IntOrString::Int(n)) => port_number(*n).map(TargetPort::Number),
        Some(IntOrString::String(s)) if s.is_empty() => Some(TargetPort::Number(port)),
        Some(IntOrString::String(s)) => match s.parse::<u16>() {
            Ok(0) => None,
            Ok(n) => Some(TargetPort::Number(n)),
            Err(_) => Some(TargetPort::Name(s.clone())),
        },
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}
