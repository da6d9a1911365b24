//! Gateway API objects (HTTPRoute, Gateway). The node agent applies no L7
//! route itself: routes belong to a waypoint. What it does is say, for every
//! route, why it is not applied here, so that a user never wonders.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ConfigWarning, yaml::Objects};

/// The label naming the waypoint of a Service or namespace.
pub(super) const USE_WAYPOINT: &str = "istio.io/use-waypoint";

/// The GatewayClass of waypoints.
const WAYPOINT_CLASS: &str = "istio-waypoint";

/// The parts of an HTTPRoute the node agent reads (where it attaches); its
/// rules are the waypoint's to check.
#[derive(Debug, Deserialize)]
pub(super) struct HttpRoute {
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct Gateway {
    pub spec: GatewaySpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GatewaySpec {
    pub gateway_class_name: String,
}

/// A warning for every HTTPRoute parent, saying why the route is not in
/// effect on this node: no waypoint, a waypoint that does not exist, or a
/// waypoint (which this version does not run yet).
pub(super) fn check_routes(objects: &Objects, warnings: &mut Vec<ConfigWarning>) {
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
            let service = matches!(parent.group.as_deref(), Some("" | "core"))
                && parent.kind.as_deref() == Some("Service");
            if !service {
                warn(
                    "unsupported",
                    format!(
                        "parent {} {ns}/{}: only Service parents (the mesh's routes) are \
                         read; ingress Gateways are not this agent's; not applied",
                        parent.kind.as_deref().unwrap_or("Gateway"),
                        parent.name
                    ),
                );
                continue;
            }
            let (kind, message) = service_status(objects, ns, &parent.name, "route");
            warn(kind, message);
        }
    }
}

/// Why a policy attached with `targetRef(s)` (to a Service or a waypoint
/// Gateway) is not applied by the node agent.
pub(super) fn policy_target_status(
    objects: &Objects,
    ns: &str,
    target: &serde_yaml::Value,
) -> (&'static str, String) {
    let field = |k: &str| target.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let (kind, name) = (field("kind"), field("name"));
    let ns = Some(field("namespace"))
        .filter(|n| !n.is_empty())
        .unwrap_or(ns);
    match kind {
        "Service" => service_status(objects, ns, name, "policy"),
        "Gateway" => match objects.gateways.get(&(ns.to_owned(), name.to_owned())) {
            None => (
                "missing_waypoint",
                format!("target Gateway {ns}/{name} does not exist; not applied"),
            ),
            Some(gw) if gw.object.spec.gateway_class_name == WAYPOINT_CLASS => (
                "unsupported",
                format!(
                    "target waypoint {ns}/{name}: waypoints are not part of this version, so \
                     the policy is not applied"
                ),
            ),
            Some(_) => (
                "unsupported",
                format!("target Gateway {ns}/{name} is not a waypoint; not applied"),
            ),
        },
        _ => (
            "unsupported",
            format!("targetRef kind {kind:?} is not supported; not applied"),
        ),
    }
}

/// Why a route or policy (`what`) on Service `ns/name` is not applied.
fn service_status(objects: &Objects, ns: &str, name: &str, what: &str) -> (&'static str, String) {
    let Some(svc) = objects.services.get(&(ns.to_owned(), name.to_owned())) else {
        return (
            "missing_waypoint",
            format!("Service {ns}/{name} does not exist; the {what} is not applied"),
        );
    };
    let label = |labels: Option<&BTreeMap<String, String>>| {
        labels.and_then(|l| l.get(USE_WAYPOINT)).cloned()
    };
    let waypoint = label(svc.object.metadata.labels.as_ref()).or_else(|| {
        let namespace = objects.namespaces.get(ns)?;
        label(namespace.object.metadata.labels.as_ref())
    });
    let Some(waypoint) = waypoint.filter(|w| w != "none") else {
        return (
            "missing_waypoint",
            format!(
                "Service {ns}/{name} has no waypoint (label {USE_WAYPOINT} on the Service or \
                 its namespace); only a waypoint applies what targets a Service, so this \
                 {what} is not applied"
            ),
        );
    };
    let exists = objects
        .gateways
        .get(&(ns.to_owned(), waypoint.clone()))
        .is_some_and(|gw| gw.object.spec.gateway_class_name == WAYPOINT_CLASS);
    if !exists {
        return (
            "missing_waypoint",
            format!(
                "Service {ns}/{name} names waypoint {waypoint}, but there is no Gateway \
                 {ns}/{waypoint} of class {WAYPOINT_CLASS}; not applied"
            ),
        );
    }
    (
        "unsupported",
        format!(
            "Service {ns}/{name} uses waypoint {ns}/{waypoint}; waypoints are not part of this \
             version, so the {what} is not applied"
        ),
    )
}
