//! The waypoint end to end: two simulated nodes with real eBPF capture, the
//! waypoint in a pod of its own, HBONE from the client's agent to the
//! waypoint and from the waypoint to the backends' agents; HTTPRoute
//! matching, weights and filters, L7 authorization, fail-closed binding
//! and the request metrics.

use std::{collections::BTreeMap, net::IpAddr};

use mesh_tests::{
    Pod, Testbed, Value,
    mesh::{namespace_yaml, parse_openmetrics, pod_yaml, series_sum},
    waypoint::gateway_yaml,
};

const TD: &str = "spiffe://cluster.local";
const VIP: &str = "10.96.0.20";

fn id(ns: &str, sa: &str) -> String {
    format!("{TD}/ns/{ns}/sa/{sa}")
}

fn service(name: &str, vip: &str, selector: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{{labels}}}\n\
         spec:\n  clusterIP: {vip}\n  selector: {{{selector}}}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n"
    )
}

const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{headers: [{name: end-user, value: jason}]}]
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: reviews.example, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /v1api}, method: GET}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /api}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: v1api}], remove: [x-drop]}
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /slow}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: reviews-v1, port: 80}]
  - backendRefs:
    - {name: reviews-v1, port: 80, weight: 90}
    - {name: reviews-v2, port: 80, weight: 10}
";

const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-get-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: reviews}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
    to: [{operation: {methods: [GET], notPaths: [/admin*]}}]
";

struct Setup {
    tb: Testbed,
    frontend: Pod,
    waypoint: mesh_tests::Agent,
}

/// frontend (node 0), reviews-v1 (node 1), reviews-v2 (node 0), the
/// waypoint pod (node 1).
fn setup() -> anyhow::Result<Setup> {
    let mut tb = Testbed::new(2)?;
    let frontend = tb.add_pod(0, "frontend")?;
    let v1 = tb.add_pod(1, "reviews-v1")?;
    let v2 = tb.add_pod(0, "reviews-v2")?;
    let wp = tb.add_pod(1, "waypoint-0")?;
    let mut docs = vec![
        namespace_yaml("shop", true),
        pod_yaml(&frontend, 0, "shop", "frontend", &[("app", "frontend")]),
        pod_yaml(
            &v1,
            1,
            "shop",
            "reviews",
            &[("app", "reviews"), ("version", "v1")],
        ),
        pod_yaml(
            &v2,
            0,
            "shop",
            "reviews",
            &[("app", "reviews"), ("version", "v2")],
        ),
        pod_yaml(
            &wp,
            1,
            "shop",
            "waypoint",
            &[
                ("gateway.networking.k8s.io/gateway-name", "waypoint"),
                ("istio.io/dataplane-mode", "none"),
            ],
        ),
        gateway_yaml("waypoint", "shop", None),
        service(
            "reviews",
            VIP,
            "app: reviews",
            "istio.io/use-waypoint: waypoint",
        ),
        service("reviews-v1", "10.96.0.21", "app: reviews, version: v1", ""),
        service("reviews-v2", "10.96.0.22", "app: reviews, version: v2", ""),
        // Bound to a waypoint that does not exist: refused, never direct.
        service(
            "ratings",
            "10.96.0.30",
            "app: reviews",
            "istio.io/use-waypoint: nope",
        ),
        ROUTE.into(),
        POLICY.into(),
    ];
    docs.iter_mut().for_each(|d| d.push('\n'));
    tb.write_config(&docs)?;
    tb.serve_http(&v1, "[::]:8080".parse()?, "v1")?;
    tb.serve_http(&v2, "[::]:8080".parse()?, "v2")?;
    let args = tb.mesh_args()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_agent(0, &argv)?;
    tb.start_agent(1, &argv)?;
    for p in [&frontend, &v2] {
        tb.agent(0).enroll(p)?;
    }
    tb.agent(1).enroll(&v1)?;
    let waypoint = tb.start_waypoint(&wp, "shop", &args)?;
    Ok(Setup {
        tb,
        frontend,
        waypoint,
    })
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

#[test]
fn waypoint_routes_authorizes_and_counts_requests() -> anyhow::Result<()> {
    let Setup {
        tb,
        frontend,
        waypoint,
    } = setup()?;
    let url = |path: &str| format!("http://{VIP}{path}");

    // 90/10 over 1,000 keep-alive requests on one connection: each request
    // is balanced on its own.
    let urls: Vec<String> = (0..1000).map(|_| url("/split")).collect();
    let mut args: Vec<&str> = Vec::new();
    for u in &urls {
        args.push(u);
    }
    let (code, answers) = tb.curl(&frontend, &args)?;
    assert_eq!(code, 0, "{answers:?}");
    assert_eq!(answers.len(), 1000);
    let mut seen = BTreeMap::<String, u32>::new();
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        *seen
            .entry(json(body)["server"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let v2 = seen.get("v2").copied().unwrap_or(0);
    assert!((70..=130).contains(&v2), "90/10 split off: {seen:?}");
    assert_eq!(seen.get("v1").copied().unwrap_or(0) + v2, 1000, "{seen:?}");

    // A header match wins over the default rule.
    let (_, a) = tb.curl(
        &frontend,
        &["-H", "end-user: jason", &url("/x"), &url("/y")],
    )?;
    assert!(
        a.iter()
            .all(|(s, b)| *s == 200 && json(b)["server"] == "v2"),
        "{a:?}"
    );

    // Rewrite and header modifier, as the backend saw them.
    let (_, a) = tb.curl(&frontend, &["-H", "x-drop: 1", &url("/v1api/items?q=1")])?;
    let seen = json(&a[0].1);
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(seen["server"], "v1");
    assert_eq!(seen["path"], "/api/items?q=1");
    assert_eq!(seen["headers"]["x-route"], "v1api");
    assert!(seen["headers"].get("x-drop").is_none(), "{seen}");
    assert!(seen["headers"].get("x-request-id").is_some(), "{seen}");
    assert!(
        seen["headers"]["traceparent"]
            .as_str()
            .unwrap_or("")
            .starts_with("00-"),
        "{seen}"
    );
    // The backend's agent saw the waypoint's identity, over mTLS: the
    // backend's L4 policy judges the waypoint, as in Istio.
    let page = tb.agent(1).metrics()?;
    let from_waypoint = series_sum(
        &page,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", &id("shop", "waypoint")),
            ("destination_workload", "reviews-v1"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(from_waypoint >= 1.0, "{page}");

    // Redirect.
    let (_, a) = tb.curl(&frontend, &["-D", "-", &url("/old/page")])?;
    assert_eq!(a[0].0, 301, "{a:?}");
    assert!(
        a[0].1
            .to_ascii_lowercase()
            .contains("location: http://reviews.example/old/page"),
        "{a:?}"
    );

    // Method-level authorization: frontend may GET, not POST, nor GET /admin.
    let (_, a) = tb.curl(&frontend, &["-X", "POST", "-d", "x", &url("/split")])?;
    assert_eq!(a[0], (403, "RBAC: access denied".to_owned()));
    let (_, a) = tb.curl(&frontend, &[&url("/admin/users")])?;
    assert_eq!(a[0], (403, "RBAC: access denied".to_owned()));

    // A backend slower than the route's timeout: 504.
    let (_, a) = tb.curl(&frontend, &[&url("/slow")])?;
    assert_eq!(a[0].0, 504, "{a:?}");

    // HTTP/2 cleartext through the waypoint, kept HTTP/2 to the backend.
    let (_, a) = tb.curl(
        &frontend,
        &[
            "--http2-prior-knowledge",
            "-H",
            "end-user: jason",
            &url("/h2"),
        ],
    )?;
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(json(&a[0].1)["version"], "HTTP/2.0", "{a:?}");

    // Bound to a waypoint that does not exist: refused at the client's
    // agent, with its reason, never sent around the waypoint.
    let (code, a) = tb.curl(&frontend, &["http://10.96.0.30/"])?;
    assert_ne!(code, 0, "{a:?}");
    assert_eq!(a[0].0, 0, "{a:?}");
    let agent0 = tb.agent(0).metrics()?;
    assert_eq!(
        series_sum(
            &agent0,
            "mesh_proxy_connections_total",
            &[("direction", "outbound"), ("result", "no_waypoint")]
        ),
        1.0,
        "{agent0}"
    );
    assert_eq!(
        series_sum(
            &agent0,
            "istio_tcp_connections_closed_total",
            &[
                ("response_flags", "NW"),
                ("destination_service_name", "ratings")
            ]
        ),
        1.0,
        "{agent0}"
    );
    let (_, dump) = tb.agent(0).http("GET", "/config_dump", None)?;
    assert!(
        dump.contains("\"Service shop/ratings\"") && dump.contains("waypoint shop/nope"),
        "{dump}"
    );

    // The waypoint's request metrics, exact for this sequence.
    let page = waypoint.metrics()?;
    parse_openmetrics(&page)?;
    let requests = |labels: &[(&str, &str)]| {
        let mut l = vec![("reporter", "waypoint")];
        l.extend_from_slice(labels);
        series_sum(&page, "istio_requests_total", &l)
    };
    assert_eq!(
        requests(&[("response_code", "200")]),
        1000.0 + 2.0 + 1.0 + 1.0,
        "{page}"
    );
    assert_eq!(
        requests(&[("response_code", "403"), ("response_flags", "RBAC")]),
        2.0,
        "{page}"
    );
    assert_eq!(requests(&[("response_code", "301")]), 1.0, "{page}");
    assert_eq!(
        requests(&[("response_code", "504"), ("response_flags", "UT")]),
        1.0,
        "{page}"
    );
    assert_eq!(
        requests(&[
            ("source_principal", &id("shop", "frontend")),
            ("destination_service_name", "reviews-v2"),
            ("request_protocol", "http"),
        ]),
        (v2 + 3) as f64,
        "{page}"
    );
    assert_eq!(
        series_sum(
            &page,
            "istio_request_duration_milliseconds_count",
            &[("reporter", "waypoint")]
        ),
        1000.0 + 2.0 + 1.0 + 1.0 + 2.0 + 1.0 + 1.0,
        "{page}"
    );
    // The access log has a line per request with its route and decision.
    let log = waypoint.log_text();
    assert!(log.contains("route=shop/reviews rule 2"), "{log}");
    assert!(log.contains("policy=deny"), "{log}");
    Ok(())
}

#[test]
fn waypoint_refuses_what_is_not_bound_to_it() -> anyhow::Result<()> {
    let Setup {
        tb,
        frontend,
        waypoint,
    } = setup()?;
    // Pod-addressed traffic to reviews-v1 is not bound (the Service is),
    // so it goes straight to the pod over HBONE, not through the waypoint.
    let v1_ip: IpAddr = tb.nodes[1].pods[0].ip4;
    let (_, a) = tb.curl(&frontend, &[&format!("http://{v1_ip}:8080/direct")])?;
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(json(&a[0].1)["server"], "v1");
    // A CONNECT to the waypoint for an address not bound to it: 400.
    let wp_ip = tb.nodes[1].pods[1].ip4;
    let probe = tb.probe(
        &frontend,
        std::net::SocketAddr::new(wp_ip, 15008),
        &format!("{v1_ip}:8080"),
        &["id=spiffe://cluster.local/ns/shop/sa/frontend"],
    )?;
    assert_eq!(probe["status"], 400, "{probe}");
    let page = waypoint.metrics()?;
    assert_eq!(
        series_sum(
            &page,
            "mesh_proxy_connections_total",
            &[("direction", "waypoint"), ("result", "not_bound")]
        ),
        1.0,
        "{page}"
    );
    Ok(())
}
