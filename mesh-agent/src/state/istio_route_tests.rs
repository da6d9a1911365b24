//! VirtualService and DestinationRule at a waypoint: hosts, rule order,
//! matches, subsets, faults, retries, the HTTPRoute conflict, and what is
//! reported as not applied.

use hyper::http::{HeaderMap, HeaderValue, Method};

use super::{route::PathModifier, tests::store, *};

const BASE: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/use-waypoint: wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: r1, namespace: shop, labels: {app: reviews, version: v1}}
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: r2, namespace: shop, labels: {app: reviews, version: v2}}
status: {podIP: 10.0.0.12}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: reviews}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop}
spec: {clusterIP: 10.96.0.2, selector: {app: reviews}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.3, selector: {app: reviews}, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: X-User}}}
";

const VS: &str = "
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: api
    match: [{uri: {prefix: /api}, method: {exact: GET}}]
    rewrite: {uri: /v2/api}
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 'gateway-error,connect-failure'}
    route: [{destination: {host: reviews, subset: v1, port: {number: 80}}}]
  - name: broken
    match: [{uri: {exact: /fault}}]
    fault:
      abort: {httpStatus: 503, percentage: {value: 50}}
      delay: {fixedDelay: 1s, percentage: {value: 10}}
    route: [{destination: {host: reviews}}]
  - name: moved
    match: [{uri: {regex: '/old/[a-z]+'}}]
    redirect: {uri: /new, authority: example.org}
  - name: split
    timeout: 3s
    mirror: {host: other}
    mirrorPercentage: {value: 25}
    headers: {request: {set: {x-canary: 'yes'}}, response: {remove: [server]}}
    route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
";

fn pick<'s>(
    s: &'s Store,
    vip: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<&'s RouteEntry> {
    let svc = s.service_by_vip(vip.parse().unwrap()).unwrap().0;
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(
            hyper::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let view = RequestView {
        method: &method,
        path,
        query: None,
        headers: &h,
    };
    s.route(svc, 80, &view)
}

fn rule(e: Option<&RouteEntry>) -> String {
    e.map(|e| format!("{} {}", e.action.route, e.action.rule))
        .unwrap_or_else(|| "none".into())
}

#[test]
fn rules_apply_in_written_order_with_istios_matches() {
    let s = store(&format!("{BASE}{VS}"));
    let r = |m, p, h: &[(&str, &str)]| rule(pick(&s, "10.96.0.1:80", m, p, h));
    // The first rule that matches wins, even over a more specific path.
    assert_eq!(
        r("GET", "/api/x", &[("end-user", "jason")]),
        "shop/reviews jason"
    );
    // Istio's prefix is a string prefix.
    assert_eq!(r("GET", "/apix", &[]), "shop/reviews api");
    assert_eq!(r("POST", "/api", &[]), "shop/reviews split");
    assert_eq!(r("GET", "/fault", &[]), "shop/reviews broken");
    assert_eq!(r("GET", "/old/page", &[]), "shop/reviews moved");
    assert_eq!(r("GET", "/old/Page", &[]), "shop/reviews split");
    // A Service the VirtualService does not name has no route.
    assert_eq!(rule(pick(&s, "10.96.0.2:80", "GET", "/", &[])), "none");
}

#[test]
fn actions_carry_subsets_faults_retries_and_filters() {
    let s = store(&format!("{BASE}{VS}"));
    let action = |p: &str| {
        pick(&s, "10.96.0.1:80", "GET", p, &[])
            .unwrap()
            .action
            .clone()
    };
    let api = action("/api");
    let b = &api.backends[0];
    assert_eq!(
        b.subset
            .as_ref()
            .map(|(n, l)| (n.as_str(), l.get("version").cloned())),
        Some(("v1", Some("v1".into())))
    );
    assert_eq!((b.port, b.weight), (80, 100));
    assert_eq!(api.retry.attempts, 3);
    assert_eq!(api.retry.codes, vec![502, 503, 504]);
    assert_eq!(api.backend_timeout, Some(std::time::Duration::from_secs(2)));
    assert!(
        matches!(api.rewrite.as_ref().and_then(|r| r.path.clone()), Some(PathModifier::Prefix(p)) if p == "/v2/api")
    );

    let fault = action("/fault");
    let f = fault.fault.as_ref().unwrap();
    assert!(matches!(f.abort, Some((Abort::Http(503), p)) if p == 50.0));
    assert_eq!(f.delay.map(|(d, p)| (d.as_secs(), p)), Some((1, 10.0)));
    // No port: the one the request came on.
    assert_eq!(fault.backends[0].port, 0);

    let split = action("/x");
    let weights: Vec<(String, u32)> = split
        .backends
        .iter()
        .map(|b| (b.subset.as_ref().unwrap().0.clone(), b.weight))
        .collect();
    assert_eq!(weights, [("v1".into(), 80), ("v2".into(), 20)]);
    assert_eq!(split.timeout, Some(std::time::Duration::from_secs(3)));
    assert_eq!(split.mirrors[0].percent, 25);
    assert_eq!(split.request_headers.set.len(), 1);
    assert_eq!(split.response_headers.remove.len(), 1);

    let moved = action("/old/a");
    let r = moved.redirect.as_ref().unwrap();
    assert_eq!(
        (r.hostname.as_deref(), r.status),
        (Some("example.org"), 301)
    );

    // The DestinationRule: load balancers per Service and subset.
    let svc = s.service_by_vip("10.96.0.1:80".parse().unwrap()).unwrap().0;
    let dr = s.destination_policy(svc).unwrap();
    assert_eq!(dr.load_balancer, LoadBalancer::LeastRequest);
    assert_eq!(
        dr.subset_load_balancers.get("v2"),
        Some(&LoadBalancer::HashHeader("x-user".into()))
    );
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
}

#[test]
fn what_is_not_applied_says_why() {
    let route = "
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: reviews, port: 80}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: odd, namespace: shop}
spec:
  hosts: [plain, other.shop.svc.cluster.local, api.example.com]
  http:
  - route: [{destination: {host: other, subset: missing}}]
  - match: [{sourceLabels: {app: x}}]
    route: [{destination: {host: other}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pool, namespace: shop}
spec:
  host: other
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 4, connectTimeout: 1s}, http: {http1MaxPendingRequests: 2, maxRequestsPerConnection: 3}}
    outlierDetection: {consecutiveGatewayErrors: 3, baseEjectionTime: 5s, maxEjectionPercent: 50}
";
    let s = store(&format!("{BASE}{VS}{route}"));
    let got: Vec<(&str, &str, &str)> = s
        .warnings()
        .iter()
        .map(|w| (w.object.as_str(), w.kind, w.message.as_str()))
        .collect();
    let has = |object: &str, kind: &str, text: &str| {
        got.iter()
            .any(|(o, k, m)| *o == object && *k == kind && m.contains(text))
    };
    assert!(
        has(
            "VirtualService shop/reviews",
            "conflict",
            "routed by HTTPRoute shop/r, which wins"
        ),
        "{got:?}"
    );
    assert!(
        has(
            "VirtualService shop/odd",
            "missing_waypoint",
            "Service shop/plain has no waypoint"
        ),
        "{got:?}"
    );
    assert!(
        has(
            "VirtualService shop/odd",
            "unsupported",
            "host \"api.example.com\" is not a Service"
        ),
        "{got:?}"
    );
    assert!(
        has(
            "VirtualService shop/odd",
            "unresolved_ref",
            "subset \"missing\""
        ),
        "{got:?}"
    );
    assert!(
        has(
            "VirtualService shop/odd",
            "unsupported",
            "match sourceLabels is not supported"
        ),
        "{got:?}"
    );
    assert!(
        has(
            "DestinationRule shop/pool",
            "unsupported",
            "only tcp.maxConnections"
        ),
        "{got:?}"
    );
    let other = s.service_by_vip("10.96.0.2:80".parse().unwrap()).unwrap().0;
    let dr = s.destination_policy(other).unwrap();
    assert_eq!(
        dr.connection_pool,
        Some(ConnectionPool {
            max_requests: Some(4),
            max_pending: 2,
            max_requests_per_connection: Some(3),
        })
    );
    let od = dr.outlier_detection.as_ref().unwrap();
    assert_eq!(
        (
            od.consecutive_5xx,
            od.consecutive_gateway,
            od.max_ejection_percent
        ),
        (None, Some(3), 50)
    );
    assert_eq!((od.base_ejection.as_secs(), od.interval.as_secs()), (5, 10));
    // The HTTPRoute routes reviews; the VirtualService still routes other.
    assert_eq!(
        rule(pick(&s, "10.96.0.1:80", "GET", "/api", &[])),
        "shop/r 0"
    );
    assert_eq!(
        rule(pick(&s, "10.96.0.2:80", "GET", "/", &[])),
        "shop/odd 0"
    );
}

#[test]
fn rate_limit_policies_target_waypoint_services() {
    let limits = "
---
apiVersion: policy.mesh-agent.dev/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: reviews, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: reviews}, {kind: Service, group: '', name: plain}]
  total: {requestsPerSecond: 100}
  identity: {requestsPerSecond: 10}
  overrides:
  - requestsPerSecond: 50
    clientRefs: [{kind: ServiceAccount, name: frontend}, {kind: Group, name: x}]
";
    let s = store(&format!("{BASE}{limits}"));
    let wp = s.waypoint("shop", "wp").unwrap().clone();
    let reviews = s
        .service_by_vip("10.96.0.1:80".parse().unwrap())
        .unwrap()
        .0
        .clone();
    let other = s
        .service_by_vip("10.96.0.2:80".parse().unwrap())
        .unwrap()
        .0
        .clone();
    let found: Vec<&RateLimit> = s.rate_limits(&wp, Some(&reviews)).collect();
    assert_eq!(found.len(), 1);
    let r = found[0];
    assert_eq!((r.total, r.per_identity), (Some(100), Some(10)));
    let frontend = crate::identity::Identity::new("cluster.local", "shop", "frontend");
    let batch = crate::identity::Identity::new("cluster.local", "shop", "batch");
    assert_eq!(r.client_rate(&frontend), Some(50));
    assert_eq!(r.client_rate(&batch), Some(10));
    assert_eq!(s.rate_limits(&wp, Some(&other)).count(), 0);
    let w: Vec<(&str, &str)> = s
        .warnings()
        .iter()
        .filter(|w| w.object == "LocalRateLimitPolicy shop/reviews")
        .map(|w| (w.kind, w.message.as_str()))
        .collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w.iter()
            .any(|(k, m)| *k == "missing_waypoint" && m.contains("shop/plain")),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|(k, m)| *k == "unsupported" && m.contains("\"Group\"")),
        "{w:?}"
    );
}

#[test]
fn subset_then_port_then_service_policies() {
    let dr = "
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: layered, namespace: shop}
spec:
  host: other
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool: {http: {http2MaxRequests: 10}}
    portLevelSettings:
    - port: {number: 80}
      loadBalancer: {simple: LEAST_REQUEST}
      outlierDetection: {consecutiveGatewayErrors: 2}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: x-user}}
      connectionPool: {http: {http2MaxRequests: 1}}
";
    let s = store(&format!("{BASE}{dr}"));
    let other = s.service_by_vip("10.96.0.2:80".parse().unwrap()).unwrap().0;
    let p = s.destination_policy(other).unwrap();
    assert_eq!(p.load_balancer_for(None, 80), LoadBalancer::LeastRequest);
    assert_eq!(p.load_balancer_for(None, 81), LoadBalancer::Random);
    assert_eq!(
        p.load_balancer_for(Some("v1"), 80),
        LoadBalancer::LeastRequest
    );
    assert_eq!(
        p.load_balancer_for(Some("v2"), 80),
        LoadBalancer::HashHeader("x-user".into())
    );
    let pool = |subset, port| {
        p.connection_pool_for(subset, port)
            .and_then(|c| c.max_requests)
    };
    assert_eq!(pool(Some("v2"), 80), Some(1));
    assert_eq!(pool(Some("v1"), 80), Some(10));
    assert_eq!(
        p.outlier_detection_for(Some("v1"), 80)
            .and_then(|o| o.consecutive_gateway),
        Some(2)
    );
    assert!(p.outlier_detection_for(None, 81).is_none());
    assert!(
        s.warnings()
            .iter()
            .all(|w| w.object != "DestinationRule shop/layered"),
        "{:?}",
        s.warnings()
    );
}
