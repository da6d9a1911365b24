//! Gateway API objects (Gateway, HTTPRoute) as written, and what becomes of
//! them: a waypoint Gateway serves the Services and pods bound to it
//! (`waypoint.rs`), a route attached to a Service bound to a waypoint is
//! compiled for that waypoint (`route.rs`). Everything that cannot be
//! applied says why, so that a user never wonders.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::{
    ConfigWarning,
    waypoint::{self, Binding},
    yaml::Objects,
};

/// The GatewayClass of waypoints.
pub(super) const WAYPOINT_CLASS: &str = "istio-waypoint";
/// The GatewayClasses of ingress gateways: this project's, and Istio's
/// name for its own ingress class, so that Istio's examples apply as written.
pub const INGRESS_CLASSES: [&str; 2] = ["mesh-ingress", "istio"];

#[derive(Debug, Deserialize)]
pub(super) struct HttpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<super::route::RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub port: Option<u16>,
    pub section_name: Option<String>,
}

impl ParentRef {
    /// A Service parent (`group: ""`, `kind: Service`): a mesh route.
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), Some("" | "core"))
            && self.kind.as_deref() == Some("Service")
    }

    /// A ServiceEntry parent (`group: networking.istio.io`, `kind:
    /// ServiceEntry`), as Istio attaches routes to egress hosts.
    pub fn is_service_entry(&self) -> bool {
        super::service_entry::is_entry_ref(self.group.as_deref(), self.kind.as_deref())
    }

    /// A Gateway parent (the Gateway API's default kind).
    pub fn is_gateway(&self) -> bool {
        matches!(
            self.group.as_deref(),
            None | Some("gateway.networking.k8s.io")
        ) && matches!(self.kind.as_deref(), None | Some("Gateway"))
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct Gateway {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: GatewaySpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GatewaySpec {
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Listener {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: String,
    pub hostname: Option<String>,
    pub tls: Option<ListenerTls>,
}

/// A listener's `tls`: the mode and the Secrets holding its certificates.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ListenerTls {
    pub mode: Option<String>,
    #[serde(default)]
    pub certificate_refs: Vec<SecretRef>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SecretRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
}

impl Gateway {
    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.labels.as_ref()
    }

    /// Whether this is an ingress gateway (of an ingress class).
    pub fn is_ingress(&self) -> bool {
        INGRESS_CLASSES.contains(&self.spec.gateway_class_name.as_str())
    }
}

/// A GatewayClass: read for its labels (`istio.io/waypoint-for`, which a
/// Gateway of the class inherits unless it sets its own).
#[derive(Debug, Deserialize)]
pub(super) struct GatewayClass {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

/// A warning for every HTTPRoute parent that is not in effect: no
/// waypoint, a waypoint that does not exist, or a parent of a kind this
/// agent does not serve.
pub(super) fn check_routes(
    objects: &Objects,
    services: &std::collections::HashMap<(String, String), Binding>,
    warnings: &mut Vec<ConfigWarning>,
) {
    for ((namespace, name), route) in &objects.http_routes {
        let object = format!("HTTPRoute {namespace}/{name}");
        let mut warn = |kind, message| {
            warnings.push(ConfigWarning {
                object: object.clone(),
                kind,
                message,
            })
        };
        if route.object.spec.parent_refs.is_empty() {
            warn(
                "unsupported",
                "no parentRefs: the route is attached to nothing; not applied".into(),
            );
        }
        for parent in &route.object.spec.parent_refs {
            let ns = parent.namespace.as_deref().unwrap_or(namespace);
            let waypoint = objects
                .gateways
                .get(&(ns.to_owned(), parent.name.clone()))
                .is_some_and(|g| g.object.spec.gateway_class_name == WAYPOINT_CLASS);
            let ingress = objects
                .gateways
                .get(&(ns.to_owned(), parent.name.clone()))
                .is_some_and(|g| g.object.is_ingress());
            if parent.is_gateway() && (waypoint || ingress) {
                // Applies to the Services the waypoint serves, or to what
                // the ingress gateway receives (its status says how).
                continue;
            }
            if parent.is_service_entry() {
                if let Some((kind, message)) =
                    entry_status(objects, services, ns, &parent.name, "route")
                {
                    warn(kind, message);
                }
                continue;
            }
            if !parent.is_service() {
                warn(
                    "unsupported",
                    format!(
                        "parent {} {ns}/{}: only Service parents and waypoint Gateways (the \
                         mesh's routes) are read; Gateways of other classes are not this agent's; not \
                         applied",
                        parent.kind.as_deref().unwrap_or("Gateway"),
                        parent.name
                    ),
                );
                continue;
            }
            if let Some((kind, message)) =
                service_status(objects, services, ns, &parent.name, "route")
            {
                warn(kind, message);
            }
        }
    }
}

/// Why a policy attached with `targetRef(s)` (to a Service or a waypoint
/// Gateway) is not applied by a waypoint; None when a waypoint applies it.
pub(super) fn policy_target_status(
    objects: &Objects,
    services: &std::collections::HashMap<(String, String), Binding>,
    ns: &str,
    target: &serde_yaml::Value,
) -> Option<(&'static str, String)> {
    let field = |k: &str| target.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let (kind, name) = (field("kind"), field("name"));
    // A policy governs its own namespace only: one in another namespace
    // could otherwise allow (or shut) a Service it does not own.
    let target_ns = field("namespace");
    if !target_ns.is_empty() && target_ns != ns {
        return Some((
            "unsupported",
            format!(
                "targetRef {kind} {target_ns}/{name} is in another namespace: a policy applies to \
                 its own namespace's objects only; not applied"
            ),
        ));
    }
    match kind {
        "Service" => service_status(objects, services, ns, name, "policy"),
        "ServiceEntry" if field("group") == "networking.istio.io" => {
            entry_status(objects, services, ns, name, "policy")
        }
        "Gateway" => match objects.gateways.get(&(ns.to_owned(), name.to_owned())) {
            None => Some((
                "missing_waypoint",
                format!("target Gateway {ns}/{name} does not exist; not applied"),
            )),
            Some(gw)
                if gw.object.spec.gateway_class_name == WAYPOINT_CLASS
                    || gw.object.is_ingress() =>
            {
                None
            }
            Some(_) => Some((
                "unsupported",
                format!(
                    "target Gateway {ns}/{name} is neither a waypoint nor an ingress gateway; not \
                     applied"
                ),
            )),
        },
        _ => Some((
            "unsupported",
            format!("targetRef kind {kind:?} is not supported; not applied"),
        )),
    }
}

/// Why a route or policy (`what`) on ServiceEntry `ns/name` is not
/// applied; None when its hosts are bound to a waypoint that serves them.
pub(super) fn entry_status(
    objects: &Objects,
    services: &std::collections::HashMap<(String, String), Binding>,
    ns: &str,
    name: &str,
    what: &str,
) -> Option<(&'static str, String)> {
    let Some(hosts) = super::service_entry::hosts_of(objects, ns, name) else {
        return Some((
            "missing_waypoint",
            format!("ServiceEntry {ns}/{name} does not exist; the {what} is not applied"),
        ));
    };
    hosts
        .iter()
        .find_map(|host| match services.get(&(ns.to_owned(), host.clone())) {
            Some(Binding::Bound(_)) => None,
            Some(Binding::Refused { reason, .. }) => Some((
                "missing_waypoint",
                format!("ServiceEntry {ns}/{name} ({host}): {reason}; the {what} is not applied"),
            )),
            None => Some((
                "missing_waypoint",
                format!(
                    "ServiceEntry {ns}/{name} ({host}) has no waypoint (label {} on the entry or \
                     its namespace); only a waypoint applies what targets it, so this {what} is \
                     not applied",
                    waypoint::USE_WAYPOINT
                ),
            )),
        })
}

/// Why a route or policy (`what`) on Service `ns/name` is not applied;
/// None when the Service is bound to a waypoint that serves it.
fn service_status(
    objects: &Objects,
    services: &std::collections::HashMap<(String, String), Binding>,
    ns: &str,
    name: &str,
    what: &str,
) -> Option<(&'static str, String)> {
    if !objects
        .services
        .contains_key(&(ns.to_owned(), name.to_owned()))
    {
        return Some((
            "missing_waypoint",
            format!("Service {ns}/{name} does not exist; the {what} is not applied"),
        ));
    }
    match services.get(&(ns.to_owned(), name.to_owned())) {
        Some(Binding::Bound(_)) => None,
        Some(Binding::Refused { reason, .. }) => Some((
            "missing_waypoint",
            format!("Service {ns}/{name}: {reason}; the {what} is not applied"),
        )),
        None => Some((
            "missing_waypoint",
            format!(
                "Service {ns}/{name} has no waypoint (label {} on the Service or its \
                 namespace); only a waypoint applies what targets a Service, so this {what} \
                 is not applied",
                waypoint::USE_WAYPOINT
            ),
        )),
    }
}
