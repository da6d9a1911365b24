//! Which waypoint serves a destination, with Istio's binding rules: a
//! waypoint is a `Gateway` of class `istio-waypoint` with an HBONE
//! listener on 15008; its pods carry the label
//! `gateway.networking.k8s.io/gateway-name`; `istio.io/waypoint-for` on the
//! Gateway (else on its GatewayClass) says what it serves; `istio.io/use-waypoint` on a Service, a
//! ServiceEntry or a pod (else on its namespace) binds it, `none` opts out, and
//! `istio.io/use-waypoint-namespace` names a waypoint in another
//! namespace. Unlike Istio, a binding that cannot be served (no such
//! waypoint, no ready pod, the wrong kind of traffic) is kept as a refusal,
//! so that the node agent fails closed instead of sending traffic around
//! the waypoint.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use mesh_common::PORT_HBONE;

use super::{ConfigWarning, Service, Workload, gateway::WAYPOINT_CLASS, yaml::Objects};

pub(super) const USE_WAYPOINT: &str = "istio.io/use-waypoint";
const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// On a Service (else its namespace): an ingress gateway sends the
/// Service's traffic through its waypoint rather than to its pods.
pub const INGRESS_USE_WAYPOINT: &str = "istio.io/ingress-use-waypoint";
/// The label Kubernetes' Gateway controllers put on a Gateway's pods.
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";

/// What traffic a waypoint serves (`istio.io/waypoint-for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    fn parse(v: &str) -> Option<Self> {
        Some(match v {
            "service" => WaypointFor::Service,
            "workload" => WaypointFor::Workload,
            "all" => WaypointFor::All,
            "none" => WaypointFor::None,
            _ => return None,
        })
    }

    fn serves_services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    fn serves_workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// A waypoint Gateway and its pods.
#[derive(Debug, serde::Serialize)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub serves: WaypointFor,
    /// Its pods that have an address, in name order.
    #[serde(serialize_with = "pod_names")]
    pub pods: Vec<Arc<Workload>>,
}

fn pod_names<S: serde::Serializer>(pods: &[Arc<Workload>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(pods.iter().map(|p| &p.name))
}

impl Waypoint {
    /// `namespace/name`
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether `wl` is one of this waypoint's own pods.
    pub fn has_pod(&self, wl: &Workload) -> bool {
        *wl.namespace == *self.namespace
            && wl.labels.get(GATEWAY_NAME).is_some_and(|n| *n == self.name)
    }
}

/// Where traffic to a bound destination must go.
#[derive(Clone, Debug)]
pub enum Binding {
    /// Through this waypoint.
    Bound(Arc<Waypoint>),
    /// Bound to a waypoint that cannot serve it: refused, never sent around.
    Refused { waypoint: String, reason: String },
}

/// `{"state": "bound", "waypoint": "ns/name"}`, or `refused` with the reason.
impl serde::Serialize for Binding {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = match self {
            Binding::Bound(w) => serde_json::json!({"state": "bound", "waypoint": w.key()}),
            Binding::Refused { waypoint, reason } => serde_json::json!({
                "state": "refused", "waypoint": waypoint, "reason": reason,
            }),
        };
        v.serialize(s)
    }
}

/// The waypoints, and the bindings of Services and pods (only those that
/// name a waypoint; the rest are absent).
#[derive(Debug, Default)]
pub(super) struct Bindings {
    pub waypoints: BTreeMap<(String, String), Arc<Waypoint>>,
    pub services: HashMap<(String, String), Binding>,
    pub workloads: HashMap<(String, String), Binding>,
    /// Services labelled (or in a namespace labelled)
    /// `istio.io/ingress-use-waypoint: "true"`.
    pub ingress_use_waypoint: std::collections::HashSet<(String, String)>,
}

pub(super) fn bind<'a>(
    objects: &Objects,
    workloads: impl Iterator<Item = &'a Arc<Workload>> + Clone,
    services: impl Iterator<Item = &'a Arc<Service>>,
    warnings: &mut Vec<ConfigWarning>,
) -> Bindings {
    let mut out = Bindings::default();
    for ((ns, name), gw) in &objects.gateways {
        let gw = &gw.object;
        if gw.spec.gateway_class_name != WAYPOINT_CLASS {
            continue;
        }
        let object = format!("Gateway {ns}/{name}");
        let hbone = gw
            .spec
            .listeners
            .iter()
            .any(|l| l.port == PORT_HBONE && l.protocol == "HBONE");
        if !hbone {
            warnings.push(ConfigWarning {
                object: object.clone(),
                kind: "unsupported",
                message: format!(
                    "a waypoint needs a listener {{name: mesh, port: {PORT_HBONE}, protocol: \
                     HBONE}}; this Gateway serves nothing"
                ),
            });
        }
        // The Gateway's own label wins over its class's.
        let class = objects
            .gateway_classes
            .get(&gw.spec.gateway_class_name)
            .and_then(|c| c.object.metadata.labels.as_ref());
        let label = gw
            .labels()
            .and_then(|l| l.get(WAYPOINT_FOR))
            .or_else(|| class.and_then(|l| l.get(WAYPOINT_FOR)));
        let serves = match label.map(|v| (v, WaypointFor::parse(v))) {
            None => WaypointFor::Service,
            Some((_, Some(f))) => f,
            Some((v, None)) => {
                warnings.push(ConfigWarning {
                    object: object.clone(),
                    kind: "parse_error",
                    message: format!(
                        "{WAYPOINT_FOR}: {v:?} is not service, workload, all or none; the \
                         waypoint serves nothing until it is"
                    ),
                });
                WaypointFor::None
            }
        };
        let serves = if hbone { serves } else { WaypointFor::None };
        let mut wp = Waypoint {
            namespace: ns.clone(),
            name: name.clone(),
            serves,
            pods: Vec::new(),
        };
        wp.pods = workloads
            .clone()
            .filter(|w| wp.has_pod(w) && !w.ips.is_empty())
            .cloned()
            .collect();
        out.waypoints
            .insert((ns.clone(), name.clone()), Arc::new(wp));
    }

    let ns_labels = |ns: &str| {
        objects
            .namespaces
            .get(ns)
            .and_then(|n| n.object.metadata.labels.as_ref())
    };
    for svc in services {
        // A ServiceEntry binds by its own labels, as a Service does.
        let own = match svc.entry {
            Some(_) => super::service_entry::labels_of(objects, &svc.namespace, &svc.name),
            None => objects
                .services
                .get(&(svc.namespace.clone(), svc.name.clone()))
                .and_then(|s| s.object.metadata.labels.as_ref()),
        };
        let ingress_label = own
            .and_then(|l| l.get(INGRESS_USE_WAYPOINT))
            .or_else(|| ns_labels(&svc.namespace).and_then(|l| l.get(INGRESS_USE_WAYPOINT)));
        if ingress_label.is_some_and(|v| v == "true") {
            out.ingress_use_waypoint
                .insert((svc.namespace.clone(), svc.name.clone()));
        }
        if let Some(b) = out.binding(
            own,
            ns_labels(&svc.namespace),
            &svc.namespace,
            Kind::Service,
        ) {
            out.services
                .insert((svc.namespace.clone(), svc.name.clone()), b);
        }
    }
    for wl in workloads {
        // A waypoint's own pods are never sent to a waypoint: no loop.
        if wl.labels.contains_key(GATEWAY_NAME) {
            continue;
        }
        if let Some(b) = out.binding(
            Some(&wl.labels),
            ns_labels(&wl.namespace),
            &wl.namespace,
            Kind::Workload,
        ) {
            out.workloads
                .insert((wl.namespace.to_string(), wl.name.clone()), b);
        }
    }
    for (kind, map) in [("Service", &out.services), ("Pod", &out.workloads)] {
        let mut refused: Vec<_> = map
            .iter()
            .filter_map(|((ns, name), b)| match b {
                Binding::Refused { reason, .. } => Some(ConfigWarning {
                    object: format!("{kind} {ns}/{name}"),
                    kind: "missing_waypoint",
                    message: format!("{reason}; its traffic is refused until it can"),
                }),
                Binding::Bound(_) => None,
            })
            .collect();
        refused.sort_by(|a, b| a.object.cmp(&b.object));
        warnings.extend(refused);
    }
    out
}

#[derive(Clone, Copy)]
enum Kind {
    Service,
    Workload,
}

impl Bindings {
    /// The object's own `use-waypoint` label wins over its namespace's; the
    /// waypoint's namespace comes from the label beside it. A namespace's
    /// label binds only what its waypoint serves (as in Istio, a Service
    /// waypoint leaves the namespace's pod-addressed traffic alone); an
    /// object's own label naming a waypoint that cannot serve it is refused.
    fn binding(
        &self,
        own: Option<&BTreeMap<String, String>>,
        namespace: Option<&BTreeMap<String, String>>,
        ns: &str,
        kind: Kind,
    ) -> Option<Binding> {
        let (labels, inherited) = match own.filter(|l| l.contains_key(USE_WAYPOINT)) {
            Some(l) => (l, false),
            None => (namespace.filter(|l| l.contains_key(USE_WAYPOINT))?, true),
        };
        let name = &labels[USE_WAYPOINT];
        if name == "none" || name.is_empty() {
            return None;
        }
        let wp_ns = labels
            .get(USE_WAYPOINT_NAMESPACE)
            .map_or(ns, String::as_str);
        let key = format!("{wp_ns}/{name}");
        let refuse = |reason: String| {
            Some(Binding::Refused {
                waypoint: key.clone(),
                reason,
            })
        };
        let Some(wp) = self.waypoints.get(&(wp_ns.to_owned(), name.clone())) else {
            return refuse(format!(
                "bound to waypoint {key}, but there is no Gateway {key} of class {WAYPOINT_CLASS}"
            ));
        };
        let (serves, what) = match kind {
            Kind::Service => (wp.serves.serves_services(), "Service"),
            Kind::Workload => (wp.serves.serves_workloads(), "workload"),
        };
        if !serves && inherited {
            return None;
        }
        if !serves {
            return refuse(format!(
                "bound to waypoint {key}, which serves {:?} traffic ({WAYPOINT_FOR}), not {what} \
                 traffic",
                wp.serves
            ));
        }
        if wp.pods.is_empty() {
            return refuse(format!(
                "bound to waypoint {key}, which has no running pod (label {GATEWAY_NAME}: {name})"
            ));
        }
        Some(Binding::Bound(wp.clone()))
    }
}
