//! Ingress gateways in the store: listeners and their certificates from
//! TLS Secrets (SNI picks one; unknown or missing names and broken Secrets
//! are refusals with a reason), HTTPRoutes attached by `parentRefs` and
//! `sectionName` and matched by host and path, and AuthorizationPolicy
//! `targetRefs` to the Gateway.

use hyper::http::{HeaderMap, Method};

use super::{tests::store, *};

/// A self-signed certificate and its key for `host`, in PEM.
fn cert(host: &str) -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
}

fn secret(name: &str, host: &str) -> String {
    let (crt, key) = cert(host);
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: edge}}\n\
         type: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&crt),
        indent(&key)
    )
}

const GATEWAY: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: edge}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 8080, protocol: HTTP}
  - name: shop
    port: 8443
    protocol: HTTPS
    hostname: shop.example.com
    tls: {mode: Terminate, certificateRefs: [{name: shop-cert}]}
  - name: api
    port: 8443
    protocol: HTTPS
    hostname: '*.api.example.com'
    tls: {certificateRefs: [{kind: Secret, name: api-cert}]}
  - name: broken
    port: 9443
    protocol: HTTPS
    hostname: broken.example.com
    tls: {certificateRefs: [{name: missing}]}
---
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: edge}
spec: {clusterIP: 10.96.0.5, selector: {app: shop}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: edge}
spec: {clusterIP: 10.96.0.6, selector: {app: api}, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: edge}
spec:
  parentRefs: [{name: public}]
  hostnames: [shop.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /cart}}]
    backendRefs: [{name: shop, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: edge}
spec:
  parentRefs: [{name: public, sectionName: api}]
  rules:
  - backendRefs: [{name: api, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: lost, namespace: edge}
spec:
  parentRefs: [{name: public, sectionName: nope}]
  rules:
  - backendRefs: [{name: api, port: 80}]
";

fn full() -> Store {
    let yaml = format!(
        "{GATEWAY}---\n{}---\n{}",
        secret("shop-cert", "shop.example.com"),
        secret("api-cert", "v1.api.example.com")
    );
    store(&yaml)
}

fn gateway(s: &Store) -> Arc<IngressGateway> {
    s.ingresses
        .get(&("edge".to_owned(), "public".to_owned()))
        .expect("the ingress gateway is compiled")
        .clone()
}

fn names(ck: &rustls::sign::CertifiedKey) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(ck.end_entity_cert().unwrap()).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn sni_picks_the_listener_certificate_and_refuses_what_it_cannot_serve() {
    let s = full();
    let gw = gateway(&s);
    let shop = gw.certificate(8443, Some("shop.example.com")).unwrap();
    assert!(
        names(&shop).contains("shop.example.com"),
        "{}",
        names(&shop)
    );
    let api = gw.certificate(8443, Some("v1.api.example.com")).unwrap();
    assert!(
        names(&api).contains("v1.api.example.com"),
        "{}",
        names(&api)
    );
    assert_eq!(
        gw.certificate(8443, Some("other.example.com")).unwrap_err(),
        TlsRefusal::UnknownSni
    );
    assert_eq!(gw.certificate(8443, None).unwrap_err(), TlsRefusal::NoSni);
    let Err(TlsRefusal::NoCertificate(why)) = gw.certificate(9443, Some("broken.example.com"))
    else {
        panic!("a listener whose Secret is missing serves no certificate");
    };
    assert!(why.contains("Secret edge/missing does not exist"), "{why}");
    assert!(
        s.warnings()
            .iter()
            .any(|w| w.object == "Gateway edge/public" && w.message.contains("edge/missing")),
        "{:?}",
        s.warnings()
    );
    assert_eq!(
        gw.ports().into_iter().collect::<Vec<_>>(),
        vec![
            (8080, ListenerProtocol::Http),
            (8443, ListenerProtocol::Https),
            (9443, ListenerProtocol::Https)
        ]
    );
}

#[test]
fn a_secret_that_is_not_a_tls_key_pair_is_a_refusal_with_its_reason() {
    let (crt, _) = cert("shop.example.com");
    let (_, other_key) = cert("shop.example.com");
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let mismatched = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: shop-cert, namespace: edge}}\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&crt),
        indent(&other_key)
    );
    let s = store(&format!("{GATEWAY}---\n{mismatched}"));
    let Err(TlsRefusal::NoCertificate(why)) =
        gateway(&s).certificate(8443, Some("shop.example.com"))
    else {
        panic!("a key of another certificate is refused");
    };
    assert!(why.contains("does not belong"), "{why}");
    let opaque = "apiVersion: v1\nkind: Secret\nmetadata: {name: shop-cert, namespace: edge}\n\
                  type: Opaque\ndata: {tls.crt: aGVsbG8=}\n";
    let s = store(&format!("{GATEWAY}---\n{opaque}"));
    let Err(TlsRefusal::NoCertificate(why)) =
        gateway(&s).certificate(8443, Some("shop.example.com"))
    else {
        panic!("an Opaque Secret is refused");
    };
    assert!(why.contains("not kubernetes.io/tls"), "{why}");
}

#[test]
fn routes_attach_by_parent_and_section_and_match_host_and_path() {
    let s = full();
    let gw = gateway(&s);
    let headers = HeaderMap::new();
    let view = |path: &'static str| RequestView {
        method: &Method::GET,
        path,
        query: None,
        headers: &headers,
    };
    let route = |listener: &IngressListener, host: &str, path: &'static str| {
        s.ingress_route(&gw, listener, host, &view(path))
            .map(|e| e.action.route.clone())
    };
    let http = gw
        .listener(8080, ListenerProtocol::Http, Some("shop.example.com"))
        .unwrap();
    assert_eq!(http.name, "http");
    assert_eq!(
        route(http, "shop.example.com", "/cart/1").as_deref(),
        Some("edge/shop")
    );
    // The route names its host, and the path must match.
    assert_eq!(route(http, "other.example.com", "/cart"), None);
    assert_eq!(route(http, "shop.example.com", "/"), None);
    // `api` is attached to the `api` listener only.
    assert_eq!(route(http, "v1.api.example.com", "/"), None);
    let api = gw
        .listener(8443, ListenerProtocol::Https, Some("v1.api.example.com"))
        .unwrap();
    assert_eq!(api.name, "api");
    assert_eq!(
        route(api, "v1.api.example.com", "/x").as_deref(),
        Some("edge/api")
    );
    // The most specific hostname wins over a longer path match.
    let wildcard = "
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: any-shop, namespace: edge}
spec:
  parentRefs: [{name: public}]
  hostnames: ['*.example.com']
  rules:
  - matches: [{path: {type: PathPrefix, value: /cart/items}}]
    backendRefs: [{name: api, port: 80}]
";
    let s2 = store(&format!("{GATEWAY}{wildcard}"));
    let gw2 = gateway(&s2);
    let http2 = gw2.listener(8080, ListenerProtocol::Http, None).unwrap();
    let pick = |host: &str| {
        s2.ingress_route(&gw2, http2, host, &view("/cart/items/1"))
            .map(|e| e.action.route.clone())
    };
    assert_eq!(pick("shop.example.com").as_deref(), Some("edge/shop"));
    assert_eq!(pick("toys.example.com").as_deref(), Some("edge/any-shop"));
    let status = |name: &str| {
        s.route_statuses()
            .iter()
            .find(|r| r.name == name)
            .unwrap()
            .parents[0]
            .clone()
    };
    let shop = status("shop");
    assert!(shop.accepted.status, "{shop:?}");
    assert_eq!(shop.waypoint.as_deref(), Some("edge/public"));
    let lost = status("lost");
    assert!(!lost.accepted.status);
    assert_eq!(lost.accepted.reason, "NoMatchingParent");
    assert!(
        !s.warnings()
            .iter()
            .any(|w| w.object.starts_with("HTTPRoute edge/")
                && w.message.contains("not this agent's")),
        "{:?}",
        s.warnings()
    );
}

#[test]
fn a_service_asks_the_ingress_for_its_waypoint_and_is_refused_without_one() {
    let yaml = |labels: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: edge, labels: \
             {{{labels}}}}}\nspec: {{clusterIP: 10.96.0.7, selector: {{app: web}}, ports: \
             [{{port: 80}}]}}\n"
        )
    };
    let web = |s: &Store| {
        s.service_by_vip("10.96.0.7:80".parse().unwrap())
            .unwrap()
            .0
            .clone()
    };
    // Not labelled: to its pods.
    let s = store(&yaml("istio.io/use-waypoint: wp"));
    assert!(s.ingress_waypoint(&web(&s)).is_none());
    // Labelled, bound to a waypoint that does not exist: refused.
    let s = store(&yaml(
        "istio.io/use-waypoint: wp, istio.io/ingress-use-waypoint: 'true'",
    ));
    let Some(Err(why)) = s.ingress_waypoint(&web(&s)) else {
        panic!("a missing waypoint is a refusal");
    };
    assert!(why.contains("edge/wp"), "{why}");
    // Labelled, with its waypoint: through it.
    let wp = "
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: edge}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-0, namespace: edge, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {serviceAccountName: wp}
status: {podIP: 10.0.0.2}
";
    let s = store(&format!(
        "{}{wp}",
        yaml("istio.io/use-waypoint: wp, istio.io/ingress-use-waypoint: 'true'")
    ));
    let Some(Ok(through)) = s.ingress_waypoint(&web(&s)) else {
        panic!("the Service's waypoint is used");
    };
    assert_eq!(through.key(), "edge/wp");
}

#[test]
fn authorization_policies_target_the_ingress_gateway() {
    let policy = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: edge}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: public}]
  action: DENY
  rules: [{to: [{operation: {paths: [/admin*]}}]}]
";
    let s = store(&format!("{GATEWAY}{policy}"));
    let gw = gateway(&s);
    let headers = HeaderMap::new();
    let decide = |path: &str| {
        let l7 = L7Request {
            method: "GET",
            path,
            host: "shop.example.com",
            headers: &headers,
        };
        let attrs = Attrs {
            src_ip: "192.0.2.7".parse().unwrap(),
            src_identity: None,
            dst_ip: "10.0.0.9".parse().unwrap(),
            dst_port: 8080,
            request: Some(&l7),
        };
        s.authorize_at_waypoint(&gw.anchor, None, &attrs).0
    };
    assert!(matches!(decide("/admin/x"), Decision::Deny { .. }));
    assert!(matches!(decide("/cart"), Decision::Allow));
    assert!(
        !s.warnings()
            .iter()
            .any(|w| w.object == "AuthorizationPolicy edge/no-admin"),
        "{:?}",
        s.warnings()
    );
}

#[test]
fn a_process_that_reads_no_secrets_says_nothing_of_them() {
    // From the API, node agents and waypoints do not read Secrets: a
    // listener's Secret is not "missing" for them.
    let opts = StoreOptions {
        skip_ingress_secrets: true,
        ..super::tests::opts()
    };
    let s = Store::from_yaml(&[("t.yaml".into(), GATEWAY.into())], &opts);
    assert!(
        !s.warnings()
            .iter()
            .any(|w| w.object == "Gateway edge/public"),
        "{:?}",
        s.warnings()
    );
    // The gateway, which reads them, does say.
    let s = store(GATEWAY);
    assert!(
        s.warnings()
            .iter()
            .any(|w| w.object == "Gateway edge/public" && w.message.contains("edge/shop-cert")),
        "{:?}",
        s.warnings()
    );
}
