//! ServiceEntries as services, and the outbound traffic policy.

use std::net::SocketAddr;

use super::{tests::store, *};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const ENTRIES: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations: {mesh-agent/outbound-traffic-policy: REGISTRY_ONLY}
---
apiVersion: v1
kind: Namespace
metadata:
  name: typo
  annotations: {mesh-agent/outbound-traffic-policy: registry-only}
---
apiVersion: v1
kind: Pod
metadata: {name: vm-agent, namespace: shop, labels: {app: legacy-vm}}
status: {podIP: 10.0.0.30}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [api.payments.example]
  addresses: [240.0.0.10]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {number: 443, name: https, protocol: TLS, targetPort: 8443}
  - {number: 53, name: dns, protocol: UDP}
  endpoints:
  - address: 192.0.2.10
  - address: 192.0.2.11
    ports: {https: 9443}
  - address: payments.example
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: passthrough, namespace: shop}
spec:
  hosts: [db.example]
  addresses: [240.0.0.11/32]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: vm, namespace: shop}
spec:
  hosts: [vm.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, targetPort: 8080}]
  workloadSelector: {labels: {app: legacy-vm}}
  exportTo: ["."]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns-names, namespace: shop}
spec:
  hosts: [names.example]
  resolution: DNS
  ports: [{number: 443, name: https}]
  endpoints: [{address: 198.51.100.7}, {address: name.example}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns-hosts, namespace: shop}
spec:
  hosts: [a.example, "*.b.example"]
  resolution: DNS
  ports: [{number: 443, name: https, targetPort: 8443}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bad-location, namespace: shop}
spec:
  hosts: [x.example]
  location: OUTSIDE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bad-field, namespace: shop}
spec:
  hosts: [y.example]
  resolutoin: STATIC
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cidr, namespace: shop}
spec:
  hosts: [z.example]
  addresses: [240.1.0.0/16]
  ports: [{number: 80, name: http}]
"#;

fn warned<'a>(s: &'a Store, object: &str) -> Vec<&'a ConfigWarning> {
    s.warnings().iter().filter(|w| w.object == object).collect()
}

/// A ServiceEntry's hosts join the store as services named by the host:
/// VIPs from `addresses`, TCP ports with `targetPort`, STATIC endpoints
/// with per-endpoint ports, a workloadSelector's pods, DNS entries' IP
/// literals; what is not supported is reported, never a crash.
#[test]
fn service_entries_are_services_named_by_their_hosts() {
    let s = store(ENTRIES);
    let (svc, port) = s.service_by_vip(addr("240.0.0.10:443")).unwrap();
    assert_eq!(svc.hostname(), "api.payments.example");
    assert_eq!(svc.entry, Some(Location::MeshExternal));
    assert_eq!(svc.ports.len(), 1, "UDP is not carried: {:?}", svc.ports);
    let eps: Vec<(SocketAddr, bool)> = s
        .endpoints(svc, port)
        .iter()
        .map(|e| (e.addr, e.workload.is_some()))
        .collect();
    assert_eq!(
        eps,
        vec![
            (addr("192.0.2.10:8443"), false),
            (addr("192.0.2.11:9443"), false)
        ]
    );
    assert!(
        warned(&s, "ServiceEntry shop/payments")
            .iter()
            .any(|w| w.kind == "parse_error" && w.message.contains("\"payments.example\"")),
        "{:?}",
        s.warnings()
    );
    // Straight to an endpoint: the entry names it.
    assert_eq!(
        s.entry_by_endpoint(addr("192.0.2.11:9443"))
            .map(|s| s.hostname()),
        Some("api.payments.example".into())
    );
    assert!(s.entry_by_endpoint(addr("192.0.2.11:22")).is_none());

    // NONE: no endpoints, the connection goes to the address it was made to.
    let (db, _) = s.service_by_vip(addr("240.0.0.11:5432")).unwrap();
    assert!(!s.has_endpoints_source(db));

    // workloadSelector: the pods of its namespace with those labels.
    let vm = s
        .services
        .get(&("shop".into(), "vm.internal".into()))
        .unwrap();
    assert_eq!(vm.entry, Some(Location::MeshInternal));
    let eps = s.endpoints(vm, &vm.ports[0]);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].addr, addr("10.0.0.30:8080"));
    assert_eq!(eps[0].workload.as_ref().unwrap().name, "vm-agent");
    assert!(
        warned(&s, "ServiceEntry shop/vm")
            .iter()
            .any(|w| w.kind == "unsupported" && w.message.contains("exportTo"))
    );

    // DNS: IP literals are endpoints; names are resolved per connection.
    let names = s
        .services
        .get(&("shop".into(), "names.example".into()))
        .unwrap();
    let eps = s.endpoints(names, &names.ports[0]);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].addr, addr("198.51.100.7:443"));
    assert_eq!(
        s.dns_targets(names, &names.ports[0]),
        vec![("name.example".to_owned(), 443)]
    );
    assert!(warned(&s, "ServiceEntry shop/dns-names").is_empty());
    // DNS without endpoints: each host resolves for itself, on the port's
    // target.
    let hosts = s
        .services
        .get(&("shop".into(), "a.example".into()))
        .unwrap();
    assert!(s.endpoints(hosts, &hosts.ports[0]).is_empty());
    assert_eq!(
        s.dns_targets(hosts, &hosts.ports[0]),
        vec![("a.example".to_owned(), 8443)]
    );
    let wildcard = s
        .services
        .get(&("shop".into(), "*.b.example".into()))
        .unwrap();
    assert!(s.dns_targets(wildcard, &wildcard.ports[0]).is_empty());
    assert!(
        warned(&s, "ServiceEntry shop/dns-hosts")
            .iter()
            .any(|w| w.kind == "unsupported" && w.message.contains("wildcard"))
    );

    assert!(
        !s.services
            .contains_key(&("shop".into(), "x.example".into()))
    );
    assert_eq!(
        warned(&s, "ServiceEntry shop/bad-location")[0].kind,
        "parse_error"
    );
    assert!(
        s.warnings()
            .iter()
            .any(|w| w.kind == "unknown_field" && w.object.contains("ServiceEntry shop/bad-field")),
        "{:?}",
        s.warnings()
    );
    assert!(
        warned(&s, "ServiceEntry shop/cidr")
            .iter()
            .any(|w| w.kind == "unsupported" && w.message.contains("240.1.0.0/16"))
    );
}

/// The mesh-wide policy applies unless a namespace's annotation says
/// otherwise; a value that is neither mode is reported and ignored.
#[test]
fn outbound_policy_per_namespace_over_the_mesh_wide_one() {
    use OutboundTrafficPolicy::*;
    let allow = store(ENTRIES);
    assert_eq!(allow.outbound_policy(Some("shop")), RegistryOnly);
    assert_eq!(allow.outbound_policy(Some("typo")), AllowAny);
    assert_eq!(allow.outbound_policy(Some("other")), AllowAny);
    assert_eq!(allow.outbound_policy(None), AllowAny);
    let typo = warned(&allow, "Namespace typo");
    assert_eq!(typo.len(), 1);
    assert_eq!(typo[0].kind, "parse_error");

    let docs = ENTRIES.replace("REGISTRY_ONLY}", "ALLOW_ANY}");
    let strict = Store::from_yaml(
        &[("t.yaml".into(), docs)],
        &StoreOptions {
            outbound_traffic_policy: RegistryOnly,
            ..super::tests::opts()
        },
    );
    assert_eq!(strict.outbound_policy(Some("shop")), AllowAny);
    assert_eq!(strict.outbound_policy(Some("other")), RegistryOnly);
    assert_eq!(strict.outbound_policy(None), RegistryOnly);
}
