//! Waypoints in the store: Istio's binding rules (and their fail-closed
//! refusals), HTTPRoute precedence and matching, and AuthorizationPolicy
//! with L7 fields at a waypoint.

use hyper::http::{HeaderMap, HeaderValue, Method};

use super::{
    route::{PathMatch, PathModifier},
    tests::store,
    *,
};

pub(super) const BASE: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pods-only, namespace: shop, labels: {istio.io/waypoint-for: workload}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {serviceAccountName: wp}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: pw-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: pods-only}}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, labels: {app: web, istio.io/use-waypoint: none}}
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: other, labels: {app: db, istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: shop}}
status: {podIP: 10.0.1.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.2, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: wrong-kind, namespace: shop, labels: {istio.io/use-waypoint: pods-only}}
spec: {clusterIP: 10.96.0.3, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: gone, namespace: other, labels: {istio.io/use-waypoint: nope}}
spec: {clusterIP: 10.96.0.4, selector: {app: db}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: other}
spec: {clusterIP: 10.96.0.5, selector: {app: db}, ports: [{port: 80}]}
";

fn state(b: Option<&Binding>) -> String {
    match b {
        None => "none".into(),
        Some(Binding::Bound(w)) => format!("bound {}", w.key()),
        Some(Binding::Refused { reason, .. }) => format!("refused: {reason}"),
    }
}

#[test]
fn binding_follows_istios_rules_and_refuses_what_cannot_be_served() {
    let s = store(BASE);
    let svc = |ns: &str, name: &str| {
        state(s.service_binding(&s.services[&(ns.to_owned(), name.to_owned())]))
    };
    let pod = |ns: &str, name: &str| state(s.workload_binding(s.workload(ns, name).unwrap()));
    // The namespace label binds its Services; its pods only to a waypoint
    // that serves pods (this one serves Services).
    assert_eq!(svc("shop", "web"), "bound shop/wp");
    assert_eq!(pod("shop", "web-1"), "none");
    // The object's own `none` beats its namespace's label.
    assert_eq!(svc("shop", "web-v2"), "none");
    assert_eq!(pod("shop", "opted-out"), "none");
    // A waypoint's own pods are never bound: no loop.
    assert_eq!(pod("shop", "wp-0"), "none");
    // waypoint-for: a Service bound to a workload-only waypoint is refused.
    assert_eq!(
        svc("shop", "wrong-kind"),
        "refused: bound to waypoint shop/pods-only, which serves Workload traffic (istio.io/waypoint-for), not Service traffic"
    );
    // use-waypoint-namespace names a waypoint elsewhere.
    assert_eq!(
        pod("other", "db"),
        "refused: bound to waypoint shop/wp, which serves Service traffic (istio.io/waypoint-for), not workload traffic"
    );
    // A waypoint that does not exist: refused, with a warning on the object.
    assert_eq!(
        svc("other", "gone"),
        "refused: bound to waypoint other/nope, but there is no Gateway other/nope of class istio-waypoint"
    );
    assert!(
        s.warnings()
            .iter()
            .any(|w| w.object == "Service other/gone" && w.kind == "missing_waypoint")
    );
    assert_eq!(svc("other", "db"), "none");

    // What the waypoint may be asked for: its Service's VIP, nothing else.
    let t = s.waypoint_target("shop", "wp", "10.96.0.1:80".parse().unwrap());
    assert!(matches!(t, Some(WaypointTarget::Service(ref svc, _)) if svc.name == "web"));
    assert!(
        s.waypoint_target("shop", "wp", "10.96.0.2:80".parse().unwrap())
            .is_none()
    );
    assert!(
        s.waypoint_target("shop", "wp", "10.0.0.10:8080".parse().unwrap())
            .is_none()
    );
    assert!(
        s.waypoint_target("shop", "other", "10.96.0.1:80".parse().unwrap())
            .is_none()
    );

    // Without a pod, a waypoint serves nothing.
    let no_pod = BASE.replace("gateway-name: wp}", "gateway-name: elsewhere}");
    let s = store(&no_pod);
    let web = s.service_by_vip("10.96.0.1:80".parse().unwrap()).unwrap().0;
    assert_eq!(
        state(s.service_binding(web)),
        "refused: bound to waypoint shop/wp, which has no running pod (label gateway.networking.k8s.io/gateway-name: wp)"
    );
}

const ROUTES: &str = "
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-route, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules:
  - name: prefix-short
    matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: web, port: 80}]
  - name: prefix-long
    matches: [{path: {type: PathPrefix, value: /api/v2}}]
    backendRefs: [{name: web, port: 80}]
  - name: exact
    matches: [{path: {type: Exact, value: /api}}]
    backendRefs: [{name: web, port: 80}]
  - name: regex
    matches: [{path: {type: RegularExpression, value: '/items/[0-9]+'}}]
    backendRefs: [{name: missing, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-route, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules:
  - name: method
    matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
  - name: headers
    matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-a, value: '1'}, {name: x-b, type: RegularExpression, value: 'v[0-9]'}]}]
  - name: one-header
    matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-a, value: '1'}]}]
  - name: query
    matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: debug, value: 'on'}]}]
";

#[test]
fn routes_match_with_the_gateway_api_precedence() {
    let s = store(&format!("{BASE}{ROUTES}"));
    let web = s
        .service_by_vip("10.96.0.1:80".parse().unwrap())
        .unwrap()
        .0
        .clone();
    let pick = |method: &str, pq: &str, headers: &[(&str, &str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                hyper::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let (path, query) = pq.split_once('?').map_or((pq, None), |(p, q)| (p, Some(q)));
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let view = RequestView {
            method: &method,
            path,
            query,
            headers: &h,
        };
        s.route(&web, 80, &view)
            .map(|e| format!("{} {}", e.action.route, e.action.rule))
            .unwrap_or_else(|| "none".into())
    };
    assert_eq!(pick("GET", "/api", &[]), "shop/b-route exact");
    assert_eq!(pick("GET", "/api/v2/x", &[]), "shop/b-route prefix-long");
    // Prefixes match whole segments.
    assert_eq!(pick("GET", "/api/v2x", &[]), "shop/b-route prefix-short");
    assert_eq!(pick("GET", "/apix", &[]), "none");
    // Same prefix: method, then more headers, then query parameters.
    assert_eq!(
        pick("POST", "/api/x", &[("x-a", "1"), ("x-b", "v1")]),
        "shop/a-route method"
    );
    assert_eq!(
        pick("GET", "/api/x", &[("x-a", "1"), ("x-b", "v1")]),
        "shop/a-route headers"
    );
    assert_eq!(
        pick("GET", "/api/x", &[("x-a", "1"), ("x-b", "vx")]),
        "shop/a-route one-header"
    );
    assert_eq!(pick("GET", "/api/x?debug=on", &[]), "shop/a-route query");
    assert_eq!(
        pick("GET", "/api/x?debug=off", &[]),
        "shop/b-route prefix-short"
    );
    // Regular expressions match the whole path.
    assert_eq!(pick("GET", "/items/42", &[]), "shop/b-route regex");
    assert_eq!(pick("GET", "/items/42/x", &[]), "none");
    // A backend that does not resolve is reported (ResolvedRefs).
    assert!(
        s.warnings()
            .iter()
            .any(|w| w.object == "HTTPRoute shop/b-route"
                && w.kind == "unresolved_ref"
                && w.message.contains("Service shop/missing does not exist"))
    );
    // A route on a Service without a waypoint says why it does nothing.
    let unbound = ROUTES.replace("name: web}", "name: web-v2}");
    let s = store(&format!("{BASE}{unbound}"));
    assert!(
        s.warnings()
            .iter()
            .any(|w| w.object == "HTTPRoute shop/a-route" && w.kind == "missing_waypoint")
    );
}

#[test]
fn durations_and_path_rewrites() {
    use std::time::Duration;
    assert_eq!(
        route::http_route::parse_gateway_duration("1h30m"),
        Some(Duration::from_secs(5400))
    );
    assert_eq!(
        route::http_route::parse_gateway_duration("500ms"),
        Some(Duration::from_millis(500))
    );
    assert_eq!(route::http_route::parse_gateway_duration("10"), None);
    assert_eq!(route::http_route::parse_gateway_duration(""), None);
    let prefix = PathMatch::Prefix("/v1api".into());
    let new = PathModifier::Prefix("/api".into());
    assert_eq!(
        modify_path("/v1api/items", &new, Some(&prefix)),
        "/api/items"
    );
    assert_eq!(
        modify_path("/v1api", &PathModifier::Prefix("/".into()), Some(&prefix)),
        "/"
    );
    assert_eq!(
        modify_path("/x", &PathModifier::Full("/y".into()), None),
        "/y"
    );
}

const POLICIES: &str = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: web}]
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/front]}}]
    to: [{operation: {methods: [GET, HEAD], paths: [/api/*], notPaths: [/api/admin*], hosts: ['web.shop*']}}]
    when: [{key: 'request.headers[x-tenant]', values: [blue]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-debug, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]
  action: DENY
  rules:
  - to: [{operation: {paths: ['*/debug']}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: watch, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: web}]
  action: AUDIT
  rules: [{to: [{operation: {methods: [GET]}}]}]
";

#[test]
fn l7_policy_at_the_waypoint() {
    let s = store(&format!("{BASE}{POLICIES}"));
    let web = s
        .service_by_vip("10.96.0.1:80".parse().unwrap())
        .unwrap()
        .0
        .clone();
    let wp = s.waypoint("shop", "wp").unwrap().clone();
    let front = Identity::new("cluster.local", "shop", "front");
    let other = Identity::new("cluster.local", "shop", "other");
    let decide = |id: &Identity, method: &str, path: &str, host: &str, tenant: &str| {
        let mut h = HeaderMap::new();
        h.insert("x-tenant", HeaderValue::from_str(tenant).unwrap());
        let req = L7Request {
            method,
            path,
            host,
            headers: &h,
        };
        let attrs = Attrs {
            src_ip: "10.0.0.9".parse().unwrap(),
            src_identity: Some(id),
            dst_ip: "10.96.0.1".parse().unwrap(),
            dst_port: 80,
            request: Some(&req),
        };
        let (d, audit) = s.authorize_at_waypoint(&wp, Some(&web), &attrs);
        (d == Decision::Allow, audit)
    };
    let ok = |id, m, p, h, t| decide(id, m, p, h, t).0;
    assert!(ok(
        &front,
        "GET",
        "/api/items",
        "web.shop.svc.cluster.local",
        "blue"
    ));
    assert!(ok(&front, "HEAD", "/api/items", "WEB.shop:80", "blue"));
    assert!(
        !ok(&front, "POST", "/api/items", "web.shop", "blue"),
        "method"
    );
    assert!(!ok(&front, "GET", "/other", "web.shop", "blue"), "path");
    assert!(
        !ok(&front, "GET", "/api/admin/x", "web.shop", "blue"),
        "notPaths"
    );
    assert!(
        !ok(&front, "GET", "/api/items", "evil.example", "blue"),
        "host"
    );
    assert!(
        !ok(&front, "GET", "/api/items", "web.shop", "red"),
        "header"
    );
    assert!(
        !ok(&other, "GET", "/api/items", "web.shop", "blue"),
        "principal"
    );
    // The Gateway's DENY policy applies to everything through it.
    assert!(
        !ok(&front, "GET", "/api/debug", "web.shop", "blue"),
        "gateway DENY"
    );
    // AUDIT decides nothing and is reported.
    assert_eq!(
        decide(&front, "GET", "/api/items", "web.shop", "blue").1,
        vec!["shop/watch"]
    );
    assert_eq!(
        decide(&front, "POST", "/api/items", "web.shop", "blue").1,
        Vec::<String>::new(),
        "an AUDIT policy whose rules do not match is not reported"
    );
    // Traffic that is not HTTP: an ALLOW rule with request fields never
    // matches, so the Service is closed to TCP.
    let tcp = Attrs {
        src_ip: "10.0.0.9".parse().unwrap(),
        src_identity: Some(&front),
        dst_ip: "10.96.0.1".parse().unwrap(),
        dst_port: 80,
        request: None,
    };
    assert_ne!(
        s.authorize_at_waypoint(&wp, Some(&web), &tcp).0,
        Decision::Allow
    );
    // Waypoint policies never reach the node agent's L4 decisions.
    let web_pod = s.workload("shop", "web-1").unwrap();
    let l4 = s.authorize(&Conn {
        src_ip: "10.0.0.9".parse().unwrap(),
        src_identity: Some(&other),
        dst: web_pod,
        dst_ip: web_pod.ips[0],
        dst_port: 8080,
    });
    assert_eq!(l4, Decision::Allow);
}

#[test]
fn waypoint_for_comes_from_the_gateway_else_its_class() {
    let class = "
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: istio-waypoint, labels: {istio.io/waypoint-for: all}}
spec: {controllerName: istio.io/waypoint-controller}
";
    let s = store(&format!("{BASE}{class}"));
    // wp has no label of its own: its class's `all` serves pods too.
    assert!(matches!(
        s.waypoint("shop", "wp").unwrap().serves,
        waypoint::WaypointFor::All
    ));
    let web = s.workload("shop", "web-1").unwrap();
    assert_eq!(state(s.workload_binding(web)), "bound shop/wp");
    // pods-only says `workload` itself, which wins over the class.
    assert!(matches!(
        s.waypoint("shop", "pods-only").unwrap().serves,
        waypoint::WaypointFor::Workload
    ));
    assert!(
        s.warnings()
            .iter()
            .all(|w| !w.object.starts_with("GatewayClass"))
    );
}

#[test]
fn a_route_on_the_waypoint_gateway_applies_to_every_service_it_serves() {
    let route = "
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: all, namespace: shop}
spec:
  parentRefs: [{name: wp}]
  rules:
  - matches: [{headers: [{name: canary, value: 'yes'}]}]
    backendRefs: [{name: web-v2, port: 80}]
";
    let s = store(&format!("{BASE}{route}"));
    let mut h = HeaderMap::new();
    h.insert("canary", HeaderValue::from_static("yes"));
    let view = RequestView {
        method: &Method::GET,
        path: "/",
        query: None,
        headers: &h,
    };
    let web = s
        .service_by_vip("10.96.0.1:80".parse().unwrap())
        .unwrap()
        .0
        .clone();
    let hit = s.route(&web, 80, &view).map(|e| e.action.route.clone());
    assert_eq!(hit.as_deref(), Some("shop/all"));
    // web-v2 opts out of the waypoint: the route is not its.
    let v2 = s
        .service_by_vip("10.96.0.2:80".parse().unwrap())
        .unwrap()
        .0
        .clone();
    assert!(s.route(&v2, 80, &view).is_none());
    assert!(
        s.warnings()
            .iter()
            .all(|w| w.object != "HTTPRoute shop/all"),
        "{:?}",
        s.warnings()
    );
    let status = &s.route_statuses()[0];
    assert_eq!(status.parents[0].waypoint.as_deref(), Some("shop/wp"));
    assert!(status.parents[0].accepted.status);
}

#[test]
fn nothing_from_another_namespace_governs_a_service() {
    let foreign = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: open-it, namespace: other}
spec:
  targetRefs: [{kind: Service, group: '', namespace: shop, name: web}]
  rules: [{}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: hijack, namespace: other}
spec:
  parentRefs: [{group: '', kind: Service, namespace: shop, name: web}]
  rules: [{backendRefs: [{name: db, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: out, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules: [{backendRefs: [{name: db, namespace: other, port: 80}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs-hijack, namespace: other}
spec:
  hosts: [web.shop.svc.cluster.local]
  http: [{route: [{destination: {host: db}}]}]
";
    let s = store(&format!("{BASE}{foreign}"));
    let has = |object: &str, text: &str| {
        s.warnings()
            .iter()
            .any(|w| w.object == object && w.message.contains(text))
    };
    assert!(
        has("AuthorizationPolicy other/open-it", "in another namespace"),
        "{:?}",
        s.warnings()
    );
    assert!(
        has("VirtualService other/vs-hijack", "in another namespace"),
        "{:?}",
        s.warnings()
    );
    assert!(
        has("HTTPRoute shop/out", "ReferenceGrant is not read"),
        "{:?}",
        s.warnings()
    );
    // The foreign route is not the Service's; the own route sends nowhere.
    let web = s
        .service_by_vip("10.96.0.1:80".parse().unwrap())
        .unwrap()
        .0
        .clone();
    let view = RequestView {
        method: &Method::GET,
        path: "/",
        query: None,
        headers: &HeaderMap::new(),
    };
    let entry = s.route(&web, 80, &view).unwrap();
    assert_eq!(entry.action.route, "shop/out");
    assert!(entry.action.backends[0].service.is_err());
    let hijack = s
        .route_statuses()
        .iter()
        .find(|r| r.name == "hijack")
        .unwrap();
    assert!(!hijack.parents[0].accepted.status);
    assert_eq!(hijack.parents[0].waypoint, None);
}
