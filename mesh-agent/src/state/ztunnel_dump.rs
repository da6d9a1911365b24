//! The configuration as ztunnel's `/config_dump` shows it (camelCase
//! `workloads`, `services`, `policies`), so that tools written for
//! ztunnel (`istioctl ztunnel-config` and the like) read this agent's.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Binding, Service, Store, TargetPort, Workload, policy};

/// A workload's UID as ztunnel keys it: the Pod's `metadata.uid`, or for
/// a Pod object that has none (a local configuration file) ztunnel's own
/// form, `<cluster>//Pod/<namespace>/<name>`.
pub fn ztunnel_uid(w: &Workload, cluster_id: &str) -> String {
    if w.uid.is_empty() {
        format!("{cluster_id}//Pod/{}/{}", w.namespace, w.name)
    } else {
        w.uid.clone()
    }
}

impl Store {
    /// `workloads`, `services` and `policies` in ztunnel's shape, the
    /// workloads being in cluster `cluster_id`.
    pub fn ztunnel_dump(&self, cluster_id: &str) -> Value {
        let workloads: Vec<Value> = self
            .workloads
            .iter()
            .map(|w| self.workload_entry(w, cluster_id))
            .collect();
        let services: Vec<Value> = self
            .services
            .values()
            .map(|s| self.service_entry(s, cluster_id))
            .collect();
        let policies: Vec<Value> = self
            .policies
            .iter()
            .map(|p| p.ztunnel_dump(&self.root_namespace))
            .collect();
        json!({
            "workloads": workloads,
            "services": services,
            "policies": policies,
        })
    }

    fn workload_entry(&self, w: &Workload, cluster_id: &str) -> Value {
        let mut entry = json!({
            "uid": ztunnel_uid(w, cluster_id),
            "workloadIps": w.ips,
            // HBONE when its traffic is captured (and so accepted on 15008).
            "protocol": if w.captured { "HBONE" } else { "TCP" },
            "name": w.name,
            "namespace": &*w.namespace,
            "trustDomain": self.trust_domain,
            "serviceAccount": &*w.service_account,
            "workloadName": w.workload_name(),
            "workloadType": "pod",
            "canonicalName": w.app(),
            "canonicalRevision": w.version(),
            "node": &*w.node,
            "status": "Healthy",
            "clusterId": cluster_id,
        });
        if let Some(Binding::Bound(wp)) = self.workload_binding(w) {
            entry["waypoint"] = waypoint(&wp.namespace, &wp.name);
        }
        entry
    }

    fn service_entry(&self, s: &Service, cluster_id: &str) -> Value {
        // ztunnel: target ports by Service port; a named target port is 0
        // here (each endpoint resolves it).
        let ports: BTreeMap<String, u16> = s
            .ports
            .iter()
            .map(|p| {
                let target = match p.target_port {
                    TargetPort::Number(n) => n,
                    TargetPort::Name(_) => 0,
                };
                (p.port.to_string(), target)
            })
            .collect();
        let mut endpoints = serde_json::Map::new();
        for p in &s.ports {
            // ztunnel keys endpoints by workload: an address that is not a
            // known pod has none.
            for ep in self.endpoints(s, p) {
                let Some(wl) = &ep.workload else { continue };
                let uid = ztunnel_uid(wl, cluster_id);
                let e = endpoints.entry(uid.clone()).or_insert_with(|| {
                    json!({
                        "workloadUid": uid,
                        "service": format!("{}/{}", s.namespace, s.hostname()),
                        "port": {},
                    })
                });
                e["port"][p.port.to_string()] = json!(ep.addr.port());
            }
        }
        let mut entry = json!({
            "name": s.name,
            "namespace": s.namespace,
            "hostname": s.hostname(),
            // ztunnel's network/address, the network being the default.
            "vips": s.vips.iter().map(|ip| format!("/{ip}")).collect::<Vec<_>>(),
            "ports": ports,
            "endpoints": endpoints,
        });
        if let Some(Binding::Bound(wp)) = self.service_binding(s) {
            entry["waypoint"] = waypoint(&wp.namespace, &wp.name);
        }
        entry
    }
}

/// A waypoint as ztunnel names it: a hostname and its HBONE port.
fn waypoint(namespace: &str, name: &str) -> Value {
    json!({
        "destination": format!("{namespace}/{name}.{namespace}.svc.cluster.local"),
        "hboneMtlsPort": mesh_common::PORT_HBONE,
    })
}

impl policy::AuthzPolicy {
    /// ztunnel's policy entry: its scope (`Global` for the root
    /// namespace's policies without a selector, `Namespace` without one,
    /// `WorkloadSelector` with one) and action.
    pub(super) fn ztunnel_dump(&self, root_namespace: &str) -> Value {
        let d = self.dump();
        let scope = if !d["selector"].is_null() {
            "WorkloadSelector"
        } else if d["namespace"] == root_namespace {
            "Global"
        } else {
            "Namespace"
        };
        let action = match d["action"].as_str() {
            Some("DENY") => "Deny",
            Some("AUDIT") => "Audit",
            _ => "Allow",
        };
        json!({
            "name": d["name"],
            "namespace": d["namespace"],
            "scope": scope,
            "action": action,
            "dryRun": d["dry_run"],
            "ruleCount": d["rules"],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::store;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  uid: "1111"
  labels: {app: web, version: v2}
spec:
  serviceAccountName: web
  nodeName: node-a
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: istio-system}
spec: {action: DENY, rules: [{}]}
"#;

    /// The sections and one entry of each, as ztunnel writes them.
    #[test]
    fn workloads_services_and_policies_in_ztunnels_shape() {
        let dump = store(OBJECTS).ztunnel_dump("east");
        let w = &dump["workloads"][0];
        assert_eq!(
            dump["workloads"].as_array().map(Vec::len),
            Some(1),
            "{dump:#}"
        );
        for (key, want) in [
            ("uid", "1111"),
            ("name", "web-1"),
            ("namespace", "shop"),
            ("serviceAccount", "web"),
            ("workloadName", "web-1"),
            ("canonicalName", "web"),
            ("canonicalRevision", "v2"),
            ("node", "node-a"),
            ("protocol", "HBONE"),
            ("trustDomain", "cluster.local"),
            ("clusterId", "east"),
            ("status", "Healthy"),
        ] {
            assert_eq!(w[key], want, "{key}: {w:#}");
        }
        assert_eq!(w["workloadIps"], serde_json::json!(["10.0.0.10"]), "{w:#}");
        let s = &dump["services"][0];
        assert_eq!(s["hostname"], "web.shop.svc.cluster.local", "{s:#}");
        assert_eq!(s["vips"], serde_json::json!(["/10.96.0.10"]), "{s:#}");
        assert_eq!(s["ports"], serde_json::json!({"80": 0}), "{s:#}");
        assert_eq!(
            s["endpoints"]["1111"],
            serde_json::json!({
                "workloadUid": "1111",
                "service": "shop/web.shop.svc.cluster.local",
                "port": {"80": 8080},
            }),
            "{s:#}"
        );
        let p = &dump["policies"][0];
        assert_eq!(
            (&p["name"], &p["namespace"], &p["scope"], &p["action"]),
            (
                &"deny-all".into(),
                &"istio-system".into(),
                &"Global".into(),
                &"Deny".into()
            ),
            "{p:#}"
        );
    }
}
