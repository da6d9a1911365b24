//! HTTPRoute status from the waypoint that serves it: for each route
//! parent bound to this waypoint, the `Accepted` and `ResolvedRefs`
//! conditions, written to the route's `status` in a cluster and logged on
//! one machine (where `/config_dump` also shows every route's status).

use std::{collections::HashMap, sync::Arc, time::Duration};

use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::state::{Condition, IngressGateway, RouteStatus, Store};

/// The `controllerName` of the parents this waypoint writes.
pub const CONTROLLER: &str = "mesh-agent/waypoint";
/// A write that failed is tried again after this long at most.
const RETRY: Duration = Duration::from_secs(30);

/// Writes (or logs) the status of this waypoint's routes whenever it
/// changes; `pod` is the waypoint's own pod.
pub fn spawn(
    client: Option<kube::Client>,
    mut store: watch::Receiver<Arc<Store>>,
    pod: (String, String),
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut written: HashMap<(String, String), Value> = HashMap::new();
        loop {
            let snapshot = store.borrow_and_update().clone();
            // A waypoint's pod writes what concerns its waypoint, an
            // ingress gateway's what concerns its Gateway.
            let gateway = snapshot
                .waypoint_of_pod(&pod.0, &pod.1)
                .map(|w| w.key())
                .or_else(|| snapshot.ingress_of_pod(&pod.0, &pod.1).map(|g| g.key()));
            if let Some(key) = gateway {
                for route in snapshot.route_statuses() {
                    let Some(status) = ours(route, &key) else {
                        continue;
                    };
                    let id = (route.namespace.clone(), route.name.clone());
                    if written.get(&id) == Some(&status) {
                        continue;
                    }
                    let ok = match &client {
                        Some(client) => write(client, route, &status).await,
                        None => {
                            log(route, &key);
                            true
                        }
                    };
                    if ok {
                        written.insert(id, status);
                    }
                }
            }
            // An ingress gateway's pods also write their Gateway's status.
            if let Some(gw) = snapshot.ingress_of_pod(&pod.0, &pod.1) {
                let status = gateway_status(&snapshot, gw);
                let id = (format!("Gateway {}", gw.namespace), gw.name.clone());
                if written.get(&id) != Some(&status) {
                    let ok = match &client {
                        Some(client) => write_gateway(client, gw, &status).await,
                        None => {
                            info!(gateway = %gw.key(), status = %status, "Gateway status");
                            true
                        }
                    };
                    if ok {
                        written.insert(id, status);
                    }
                }
            }
            tokio::select! {
                changed = store.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    })
}

/// The route's `status` as this waypoint writes it: its parents served by
/// `waypoint`, None when it serves none. The times are added when written,
/// so that an unchanged status compares equal.
fn ours(route: &RouteStatus, waypoint: &str) -> Option<Value> {
    let parents: Vec<Value> = route
        .parents
        .iter()
        .filter(|p| p.waypoint.as_deref() == Some(waypoint))
        .map(|p| {
            let mut parent_ref = json!({
                "group": p.group, "kind": p.kind, "namespace": p.namespace, "name": p.name,
            });
            if let Some(port) = p.port {
                parent_ref["port"] = json!(port);
            }
            if let Some(section) = &p.section_name {
                parent_ref["sectionName"] = json!(section);
            }
            let condition = |kind: &str, c: &Condition| {
                json!({
                    "type": kind,
                    "status": if c.status { "True" } else { "False" },
                    "reason": c.reason,
                    "message": c.message,
                    "observedGeneration": route.generation.unwrap_or(0),
                })
            };
            json!({
                "parentRef": parent_ref,
                "controllerName": CONTROLLER,
                "conditions": [
                    condition("Accepted", &p.accepted),
                    condition("ResolvedRefs", &p.resolved_refs),
                ],
            })
        })
        .collect();
    (!parents.is_empty()).then(|| json!({ "parents": parents }))
}

/// An ingress Gateway's status: `Accepted` and `Programmed`, and per
/// listener its conditions (`ResolvedRefs` false with the reason when its
/// certificate does not load; not `Accepted` when it is not served) and
/// the routes attached to it.
pub(super) fn gateway_status(store: &Store, gw: &IngressGateway) -> Value {
    let generation = gw.generation.unwrap_or(0);
    let cond = |kind: &str, ok: bool, reason: &str, message: &str| {
        json!({
            "type": kind,
            "status": if ok { "True" } else { "False" },
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
        })
    };
    let key = gw.key();
    let mut listeners = Vec::new();
    for l in &gw.listeners {
        let attached = store
            .route_statuses()
            .iter()
            .filter(|r| {
                r.parents.iter().any(|p| {
                    p.waypoint.as_deref() == Some(key.as_str())
                        && p.accepted.status
                        && p.section_name.as_ref().is_none_or(|s| *s == l.name)
                        && p.port.is_none_or(|port| port == l.port)
                })
            })
            .count();
        let (resolved, programmed) = match &l.certificate {
            Some(Err(e)) => (
                cond("ResolvedRefs", false, "InvalidCertificateRef", e),
                cond("Programmed", false, "Invalid", e),
            ),
            _ => (
                cond(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "every reference resolves",
                ),
                cond("Programmed", true, "Programmed", "listening"),
            ),
        };
        listeners.push(json!({
            "name": l.name,
            "attachedRoutes": attached,
            "supportedKinds": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}],
            "conditions": [cond("Accepted", true, "Accepted", "served"), programmed, resolved],
        }));
    }
    for (name, reason, message) in &gw.refused {
        listeners.push(json!({
            "name": name,
            "attachedRoutes": 0,
            "supportedKinds": [],
            "conditions": [
                cond("Accepted", false, reason, message),
                cond("Programmed", false, "Invalid", message),
            ],
        }));
    }
    let broken = gw.refused.len()
        + gw.listeners
            .iter()
            .filter(|l| matches!(l.certificate, Some(Err(_))))
            .count();
    let programmed = if broken == 0 {
        cond("Programmed", true, "Programmed", "every listener is served")
    } else {
        let message = format!("{broken} listener(s) not served; see the listeners' conditions");
        cond("Programmed", false, "Invalid", &message)
    };
    json!({
        "conditions": [cond("Accepted", true, "Accepted", "ingress gateway"), programmed],
        "listeners": listeners,
    })
}

async fn write_gateway(client: &kube::Client, gw: &IngressGateway, status: &Value) -> bool {
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway");
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &gw.namespace, &ApiResource::from_gvk(&gvk));
    let mut status = status.clone();
    let now = k8s_openapi::chrono::Utc::now()
        .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true);
    let stamp = |conditions: &mut Value| {
        for c in conditions.as_array_mut().into_iter().flatten() {
            c["lastTransitionTime"] = json!(now);
        }
    };
    stamp(&mut status["conditions"]);
    for l in status["listeners"].as_array_mut().into_iter().flatten() {
        stamp(&mut l["conditions"]);
    }
    let patch = json!({ "status": status });
    match api
        .patch_status(&gw.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            info!(gateway = %gw.key(), "Gateway status written");
            true
        }
        Err(e) => {
            warn!(gateway = %gw.key(), error = %e, "writing Gateway status failed");
            false
        }
    }
}

fn with_times(mut status: Value) -> Value {
    let now = k8s_openapi::chrono::Utc::now()
        .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true);
    for parent in status["parents"].as_array_mut().into_iter().flatten() {
        for c in parent["conditions"].as_array_mut().into_iter().flatten() {
            c["lastTransitionTime"] = json!(now);
        }
    }
    status
}

async fn write(client: &kube::Client, route: &RouteStatus, status: &Value) -> bool {
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute");
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &route.namespace,
        &ApiResource::from_gvk(&gvk),
    );
    let patch = json!({ "status": with_times(status.clone()) });
    match api
        .patch_status(&route.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            info!(route = %format!("{}/{}", route.namespace, route.name), "HTTPRoute status written");
            true
        }
        Err(e) => {
            warn!(route = %format!("{}/{}", route.namespace, route.name), error = %e, "writing HTTPRoute status failed");
            false
        }
    }
}

fn log(route: &RouteStatus, waypoint: &str) {
    for p in route
        .parents
        .iter()
        .filter(|p| p.waypoint.as_deref() == Some(waypoint))
    {
        info!(
            route = %format!("{}/{}", route.namespace, route.name),
            parent = %format!("{} {}/{}", p.kind, p.namespace, p.name),
            accepted = p.accepted.status,
            resolved_refs = p.resolved_refs.status,
            reason = %p.resolved_refs.reason,
            message = %p.resolved_refs.message,
            "HTTPRoute status"
        );
    }
}
