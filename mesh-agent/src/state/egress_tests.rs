//! Egress through a waypoint: a ServiceEntry bound by its own
//! `istio.io/use-waypoint`, routes and policies attached to it, and the
//! TLS a DestinationRule originates to its host.

use super::{tests::store, *};

const EGRESS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: egress-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: egress}}
spec: {serviceAccountName: egress}
status: {podIP: 10.0.0.9}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: egress, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop, labels: {istio.io/use-waypoint: egress}}
spec:
  hosts: [api.example]
  addresses: [240.0.0.10]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.10}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: direct, namespace: shop}
spec:
  hosts: [direct.example.com]
  addresses: [240.0.0.11]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.11}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: shop}
spec:
  host: api.example
  trafficPolicy:
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: SIMPLE, sni: api.example, caCertificates: /etc/egress/ca.pem}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-mtls, namespace: shop}
spec:
  host: direct.example.com
  trafficPolicy:
    tls: {mode: SIMPLE, credentialName: api-ca}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: api}]
  rules:
  - backendRefs: [{group: networking.istio.io, kind: Hostname, name: api.example, port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-get, namespace: shop}
spec:
  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: api}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: direct-get, namespace: shop}
spec:
  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: direct}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;

fn warned<'a>(s: &'a Store, object: &str) -> Vec<&'a ConfigWarning> {
    s.warnings().iter().filter(|w| w.object == object).collect()
}

/// The entry's own label binds its host to the waypoint; an entry without
/// one is not bound, unless its namespace's label binds it.
#[test]
fn a_service_entry_is_bound_by_its_own_use_waypoint_label() {
    let s = store(EGRESS);
    let (api, _) = s.service_by_vip("240.0.0.10:80".parse().unwrap()).unwrap();
    assert!(
        matches!(s.service_binding(api), Some(Binding::Bound(w)) if w.key() == "shop/egress"),
        "{:?}",
        s.service_binding(api)
    );
    let (direct, _) = s.service_by_vip("240.0.0.11:80".parse().unwrap()).unwrap();
    assert!(s.service_binding(direct).is_none());

    // The namespace's label binds an entry without its own; the entry's
    // own `none` opts out.
    let ns_bound = EGRESS
        .replace(
            "labels: {istio.io/dataplane-mode: ambient}",
            "labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: egress}",
        )
        .replace(
            "labels: {istio.io/use-waypoint: egress}}",
            "labels: {istio.io/use-waypoint: none}}",
        );
    let s = store(&ns_bound);
    let (direct, _) = s.service_by_vip("240.0.0.11:80".parse().unwrap()).unwrap();
    assert!(matches!(s.service_binding(direct), Some(Binding::Bound(_))));
    let (api, _) = s.service_by_vip("240.0.0.10:80".parse().unwrap()).unwrap();
    assert!(s.service_binding(api).is_none());
}

/// A route whose parent is the ServiceEntry is accepted (served by its
/// waypoint), its `Hostname` backend resolves; a policy targeting it
/// applies; one targeting an unbound entry says why it is not applied.
#[test]
fn routes_and_policies_attach_to_a_service_entry() {
    let s = store(EGRESS);
    let status = s.route_statuses().iter().find(|r| r.name == "api").unwrap();
    let parent = &status.parents[0];
    assert!(parent.accepted.status, "{parent:?}");
    assert!(parent.resolved_refs.status, "{parent:?}");
    assert_eq!(parent.waypoint.as_deref(), Some("shop/egress"));
    assert!(warned(&s, "HTTPRoute shop/api").is_empty());
    assert!(warned(&s, "AuthorizationPolicy shop/api-get").is_empty());
    let w = warned(&s, "AuthorizationPolicy shop/direct-get");
    assert!(
        w.iter()
            .any(|w| w.kind == "missing_waypoint" && w.message.contains("has no waypoint")),
        "{w:?}"
    );
}

/// `tls.mode: SIMPLE` on the entry's port: SNI and CA file as written; a
/// `credentialName` takes the CA from the Secret's `ca.crt`, a missing
/// Secret is warned and refuses rather than sending in plaintext, and so
/// does an unsupported client certificate.
#[test]
fn destination_rule_tls_originates_to_a_service_entry_host() {
    let s = store(EGRESS);
    let (api, _) = s.service_by_vip("240.0.0.10:80".parse().unwrap()).unwrap();
    let tls = s.destination_policy(api).unwrap().tls_for(80).unwrap();
    assert_eq!(tls.sni.as_deref(), Some("api.example"));
    assert_eq!(
        tls.ca_certificates.as_deref(),
        Some(std::path::Path::new("/etc/egress/ca.pem"))
    );
    assert!(!tls.insecure_skip_verify && tls.unusable.is_none());
    assert!(s.destination_policy(api).unwrap().tls_for(81).is_none());
    assert!(warned(&s, "DestinationRule shop/api").is_empty());

    // Not bound to a waypoint: nothing applies it, and it says so.
    let w = warned(&s, "DestinationRule shop/api-mtls");
    assert!(w.iter().any(|w| w.kind == "missing_waypoint"), "{w:?}");
    let bound = EGRESS.replace(
        "metadata: {name: direct, namespace: shop}",
        "metadata: {name: direct, namespace: shop, labels: {istio.io/use-waypoint: egress}}",
    );
    let s = store(&bound);
    let (direct, _) = s.service_by_vip("240.0.0.11:80".parse().unwrap()).unwrap();
    let tls = s.destination_policy(direct).unwrap().tls_for(80).unwrap();
    assert!(tls.unusable.is_some(), "{tls:?}");
    let w = warned(&s, "DestinationRule shop/api-mtls");
    assert!(
        w.iter()
            .any(|w| w.kind == "unresolved_ref" && w.message.contains("no Secret shop/api-ca")),
        "{w:?}"
    );

    // With the Secret, its ca.crt is the CA.
    let with_secret = format!(
        "{bound}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: api-ca, namespace: shop}}\n\
         stringData: {{ca.crt: PEM}}\n"
    );
    let s = store(&with_secret);
    let (direct, _) = s.service_by_vip("240.0.0.11:80".parse().unwrap()).unwrap();
    let tls = s.destination_policy(direct).unwrap().tls_for(80).unwrap();
    assert_eq!(tls.credential_ca.as_deref(), Some(&b"PEM"[..]), "{tls:?}");
    assert!(tls.unusable.is_none(), "{tls:?}");
    assert!(warned(&s, "DestinationRule shop/api-mtls").is_empty());

    // A client certificate is not sent: refused rather than half applied.
    let client_cert = bound.replace(
        "credentialName: api-ca",
        "caCertificates: /ca.pem, clientCertificate: /c.pem",
    );
    let s = store(&client_cert);
    let (direct, _) = s.service_by_vip("240.0.0.11:80".parse().unwrap()).unwrap();
    let tls = s.destination_policy(direct).unwrap().tls_for(80).unwrap();
    assert!(tls.unusable.is_some(), "{tls:?}");
}
