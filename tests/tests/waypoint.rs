//! The waypoint end to end: two simulated nodes with real eBPF capture, the
//! waypoint in a pod of its own, HBONE from the client's agent to the
//! waypoint and from the waypoint to the backends' agents; HTTPRoute
//! matching, weights and filters, L7 authorization, fail-closed binding
//! and the request metrics.

use std::{collections::BTreeMap, net::IpAddr};

use mesh_tests::{
    Pod, Testbed, Value,
    mesh::{namespace_yaml, pod_yaml},
    metrics::{parse_openmetrics, series_sum, series_sum_or_absent},
    waypoint::{GRPC_CLIENT, GRPC_SERVER, gateway_yaml, http_service_yaml},
};

const TD: &str = "spiffe://cluster.local";
const VIP: &str = "10.96.0.20";

fn id(ns: &str, sa: &str) -> String {
    format!("{TD}/ns/{ns}/sa/{sa}")
}

fn service(name: &str, vip: &str, selector: &str, labels: &str) -> String {
    http_service_yaml(name, "shop", vip, selector, labels)
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
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: reviews-v2, port: 80}}
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

const GRPC_POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: grpc-say-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: grpc-echo}]
  rules: [{to: [{operation: {paths: [/test.Echo/Say]}}]}]
";

struct Setup {
    tb: Testbed,
    /// The configuration as written.
    docs: Vec<String>,
    frontend: Pod,
    waypoint: mesh_tests::Agent,
    /// The second waypoint, when the variant has one.
    all_waypoint: Option<mesh_tests::Agent>,
}

/// frontend (node 0), reviews-v1 (node 1), reviews-v2 (node 0, also a gRPC
/// server on 9090), the waypoint pod (node 1). With `second`, a waypoint
/// for all traffic (pod on node 0) bound by the namespace label, and
/// reviews-v2 labelled with the Service-only waypoint.
fn setup(second: bool) -> anyhow::Result<Setup> {
    setup_with(second, None, &[])
}

/// [`setup`], with the waypoint exporting spans to a collector at
/// `tracing` (OTLP on 4318, Zipkin on 9411) when given, and `agent_args`
/// after the node agents' usual arguments.
fn setup_with(second: bool, tracing: Option<IpAddr>, agent_args: &[&str]) -> anyhow::Result<Setup> {
    let mut tb = Testbed::new(2)?;
    let frontend = tb.add_pod(0, "frontend")?;
    let v1 = tb.add_pod(1, "reviews-v1")?;
    let v2 = tb.add_pod(0, "reviews-v2")?;
    let wp = tb.add_pod(1, "waypoint-0")?;
    // An endpoint of Service flaky whose app never listens.
    let dead = tb.add_pod(1, "reviews-dead")?;
    let waypoint_labels = |gw: &'static str| {
        [
            ("gateway.networking.k8s.io/gateway-name", gw),
            ("istio.io/dataplane-mode", "none"),
        ]
    };
    let mut v2_labels = vec![("app", "reviews"), ("version", "v2")];
    let mut ns = namespace_yaml("shop", true);
    if second {
        v2_labels.push(("istio.io/use-waypoint", "waypoint"));
        ns = ns.replace("labels:\n", "labels:\n    istio.io/use-waypoint: all-wp\n");
    }
    let mut docs = vec![
        ns,
        pod_yaml(&frontend, 0, "shop", "frontend", &[("app", "frontend")]),
        pod_yaml(
            &v1,
            1,
            "shop",
            "reviews",
            &[("app", "reviews"), ("version", "v1"), ("tier", "flaky")],
        ),
        pod_yaml(&v2, 0, "shop", "reviews", &v2_labels),
        pod_yaml(&wp, 1, "shop", "waypoint", &waypoint_labels("waypoint")),
        pod_yaml(&dead, 1, "shop", "reviews", &[("tier", "flaky")]),
        gateway_yaml("waypoint", "shop", None),
        service(
            "reviews",
            VIP,
            "app: reviews",
            "istio.io/use-waypoint: waypoint",
        ),
        service("reviews-v1", "10.96.0.21", "app: reviews, version: v1", ""),
        service("reviews-v2", "10.96.0.22", "app: reviews, version: v2", ""),
        service(
            "upload",
            "10.96.0.24",
            "app: reviews, version: v1",
            "istio.io/use-waypoint: waypoint",
        ),
        service(
            "grpc-echo",
            "10.96.0.25",
            "app: reviews, version: v2",
            "istio.io/use-waypoint: waypoint",
        )
        .replace(
            "name: http\n    port: 80\n    targetPort: 8080",
            "name: grpc\n    port: 9090\n    targetPort: 9090",
        ),
        service(
            "flaky",
            "10.96.0.26",
            "tier: flaky",
            "istio.io/use-waypoint: waypoint",
        ),
        // Bound to a waypoint that does not exist: refused, never direct.
        service(
            "ratings",
            "10.96.0.30",
            "app: reviews",
            "istio.io/use-waypoint: nope",
        ),
        ROUTE.into(),
        POLICY.into(),
        GRPC_POLICY.into(),
    ];
    let wp_all = if second {
        let p = tb.add_pod(0, "waypoint-all")?;
        docs.push(pod_yaml(
            &p,
            0,
            "shop",
            "all-wp",
            &waypoint_labels("all-wp"),
        ));
        docs.push(gateway_yaml("all-wp", "shop", Some("all")));
        Some(p)
    } else {
        None
    };
    docs.iter_mut().for_each(|d| d.push('\n'));
    tb.write_config(&docs)?;
    tb.serve_http(&v1, "[::]:8080".parse()?, "v1")?;
    tb.serve_http(&v2, "[::]:8080".parse()?, "v2")?;
    let grpc_server = tb.workdir().join("grpc_server.py");
    std::fs::write(&grpc_server, GRPC_SERVER)?;
    std::fs::write(tb.workdir().join("grpc_client.py"), GRPC_CLIENT)?;
    tb.serve_program(
        &v2,
        std::path::Path::new("/usr/bin/python3"),
        &[grpc_server.to_str().unwrap_or_default(), "[::]:9090"],
    )?;
    let args = tb.mesh_args()?;
    let mut argv: Vec<&str> = args.iter().map(String::as_str).collect();
    argv.extend_from_slice(agent_args);
    tb.start_agent(0, &argv)?;
    tb.start_agent(1, &argv)?;
    for p in [&frontend, &v2] {
        tb.agent(0).enroll(p)?;
    }
    tb.agent(1).enroll(&v1)?;
    tb.agent(1).enroll(&dead)?;
    let mut wp_args = args.clone();
    if let Some(c) = tracing {
        wp_args.extend([
            format!("--tracing-otlp=http://{c}:4318/v1/traces"),
            format!("--tracing-zipkin=http://{c}:9411/api/v2/spans"),
            "--tracing-sampling=100".to_owned(),
        ]);
    }
    let waypoint = tb.start_waypoint(&wp, "shop", &wp_args)?;
    let all_waypoint = match wp_all {
        Some(p) => Some(tb.start_waypoint(&p, "shop", &args)?),
        None => None,
    };
    Ok(Setup {
        tb,
        docs,
        frontend,
        waypoint,
        all_waypoint,
    })
}

/// Writes the configuration and waits until every agent's dump and the
/// waypoint's hold every one of `needles`; returns the waypoint's dump.
fn apply_at_waypoint(
    tb: &Testbed,
    waypoint: &mesh_tests::Agent,
    docs: &[String],
    needles: &[&str],
) -> anyhow::Result<String> {
    // The agents first: a Service they do not know yet is not sent to the
    // waypoint at all.
    tb.apply_config(docs, |dump| needles.iter().all(|n| dump.contains(n)))?;
    let mut applied = String::new();
    wait_until(
        10,
        &format!("the waypoint did not apply {needles:?}"),
        || {
            let (_, dump) = waypoint.http("GET", "/config_dump", None)?;
            if needles.iter().all(|n| dump.contains(n)) {
                applied = dump;
                return Ok(None);
            }
            Ok(Some(dump))
        },
    )?;
    Ok(applied)
}

/// Polls `pending` (None once done, else what it still sees) every 50 ms
/// for at most `secs` seconds; fails with `what` and the last sight.
fn wait_until(
    secs: u64,
    what: &str,
    mut pending: impl FnMut() -> anyhow::Result<Option<String>>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let Some(seen) = pending()? else {
            return Ok(());
        };
        anyhow::ensure!(std::time::Instant::now() < deadline, "{what}: {seen}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `n` requests from `pod`, to `url(i)`, over one keep-alive connection,
/// after the curl arguments `first`.
fn requests(
    tb: &Testbed,
    pod: &Pod,
    first: &[&str],
    n: usize,
    url: impl Fn(usize) -> String,
) -> anyhow::Result<Vec<(u16, String)>> {
    let urls: Vec<String> = (0..n).map(url).collect();
    let mut args: Vec<&str> = first.to_vec();
    args.extend(urls.iter().map(String::as_str));
    Ok(tb.curl(pod, &args)?.1)
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
        ..
    } = setup(false)?;
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
    )?;
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
    // The ways around a path rule are the same path to the waypoint.
    for p in [
        "/./admin/users",
        "//admin/users",
        "/%61dmin/users",
        "/x/../admin/users",
    ] {
        let (_, a) = tb.curl(&frontend, &["--path-as-is", &url(p)])?;
        assert_eq!(a[0], (403, "RBAC: access denied".to_owned()), "{p}");
    }
    // The host policy reads is the host the backend gets.
    let (_, a) = tb.curl(
        &frontend,
        &[
            "--request-target",
            "http://admin.internal/x",
            "-H",
            "Host: reviews",
            &url("/x"),
        ],
    )?;
    assert_eq!(a[0].0, 400, "{a:?}");

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
        )?,
        1.0,
        "{agent0}"
    );
    // Refused before it was routed, as ztunnel does: a WARN access log
    // line with the reason, and no istio_tcp_* series.
    assert_eq!(
        series_sum_or_absent(
            &agent0,
            "istio_tcp_connections_opened_total",
            &[("destination_service_name", "ratings")]
        )?,
        0.0,
        "{agent0}"
    );
    assert!(
        tb.agent(0).log_text().lines().any(|l| l.contains("WARN")
            && l.contains("connection failed")
            && l.contains("its waypoint cannot serve it")),
        "{}",
        tb.agent(0).log_text()
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
        requests(&[("response_code", "200")])?,
        1000.0 + 2.0 + 1.0 + 1.0,
        "{page}"
    );
    assert_eq!(
        requests(&[("response_code", "403"), ("response_flags", "RBAC")])?,
        2.0 + 4.0,
        "{page}"
    );
    assert_eq!(requests(&[("response_code", "301")])?, 1.0, "{page}");
    assert_eq!(
        requests(&[("response_code", "504"), ("response_flags", "UT")])?,
        1.0,
        "{page}"
    );
    assert_eq!(
        requests(&[
            ("source_principal", &id("shop", "frontend")),
            ("destination_service_name", "reviews-v2"),
            ("request_protocol", "http"),
        ])?,
        (v2 + 3) as f64,
        "{page}"
    );
    assert_eq!(
        series_sum(
            &page,
            "istio_request_duration_milliseconds_count",
            &[("reporter", "waypoint")]
        )?,
        1000.0 + 2.0 + 1.0 + 1.0 + 2.0 + 4.0 + 1.0 + 1.0,
        "{page}"
    );
    // The route's status: in the dump, and logged by the waypoint.
    let (_, dump) = waypoint.http("GET", "/config_dump", None)?;
    let dump: Value = serde_json::from_str(&dump)?;
    let status = &dump["config"]["route_status"][0];
    assert_eq!(status["name"], "reviews", "{status}");
    assert_eq!(status["parents"][0]["accepted"]["status"], true, "{status}");
    assert_eq!(
        status["parents"][0]["resolved_refs"]["reason"], "ResolvedRefs",
        "{status}"
    );
    // The access log has a line per request with its route and decision.
    let log = waypoint.log_text();
    assert!(
        log.contains("HTTPRoute status route=shop/reviews parent=Service shop/reviews accepted=true resolved_refs=true"),
        "{log}"
    );
    assert!(log.contains("route=shop/reviews rule 2"), "{log}");
    assert!(log.contains("policy=deny"), "{log}");
    Ok(())
}

#[test]
fn binding_rules_for_services_and_pods_fail_closed() -> anyhow::Result<()> {
    let Setup {
        tb,
        frontend,
        waypoint,
        all_waypoint,
        ..
    } = setup(true)?;
    let all_waypoint = all_waypoint.expect("second waypoint");
    let v1_ip: IpAddr = tb.nodes[1].pods[0].ip4;
    let v2_ip: IpAddr = tb.nodes[0].pods[1].ip4;
    // Pod-addressed: reviews-v1 is bound by its namespace's label to the
    // waypoint for all traffic, which serves it.
    let (_, a) = tb.curl(&frontend, &[&format!("http://{v1_ip}:8080/direct")])?;
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(json(&a[0].1)["server"], "v1");
    // Absent reads 0: a waypoint that served no request for it.
    let through_all = |page: &str, service: &str| {
        series_sum_or_absent(
            page,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("destination_service_name", service),
            ],
        )
    };
    let page = all_waypoint.metrics()?;
    assert_eq!(
        series_sum(
            &page,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("destination_workload", "reviews-v1")
            ]
        )?,
        1.0,
        "{page}"
    );
    // Service-addressed: reviews-v1's Service carries no label of its own,
    // so its namespace's waypoint serves it too.
    let (_, a) = tb.curl(&frontend, &["http://10.96.0.21/svc"])?;
    assert_eq!(a[0].0, 200, "{a:?}");
    let page = all_waypoint.metrics()?;
    assert_eq!(through_all(&page, "reviews-v1")?, 1.0, "{page}");
    // The Service's own label beats the namespace's: reviews goes through
    // the Service waypoint, not the namespace's.
    let (_, a) = tb.curl(&frontend, &[&format!("http://{VIP}/own-label")])?;
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(through_all(&all_waypoint.metrics()?, "reviews")?, 0.0);
    assert_eq!(
        through_all(&waypoint.metrics()?, "reviews-v1")?
            + through_all(&waypoint.metrics()?, "reviews-v2")?,
        1.0
    );
    // reviews-v2's own label names the Service-only waypoint: pod traffic
    // to it is refused at the client's agent, never sent direct.
    let (code, a) = tb.curl(&frontend, &[&format!("http://{v2_ip}:8080/")])?;
    assert_ne!(code, 0, "{a:?}");
    let agent0 = tb.agent(0).metrics()?;
    assert_eq!(
        series_sum(
            &agent0,
            "mesh_proxy_connections_total",
            &[("direction", "outbound"), ("result", "no_waypoint")]
        )?,
        1.0,
        "{agent0}"
    );
    let log = tb.agent(0).log_text();
    assert!(
        log.lines().any(|l| l.contains("connection failed")
            && l.contains(&format!("dst.addr={v2_ip}:8080"))
            && l.contains("not workload traffic")),
        "{log}"
    );
    let (_, dump) = tb.agent(0).http("GET", "/config_dump", None)?;
    assert!(
        dump.contains("serves Service traffic (istio.io/waypoint-for), not workload traffic"),
        "{dump}"
    );
    // A CONNECT to a waypoint for an address not bound to it: 400.
    let wp_ip = tb.nodes[1].pods[1].ip4;
    let probe = tb.probe(
        &frontend,
        std::net::SocketAddr::new(wp_ip, 15008),
        &format!("{v1_ip}:8080"),
        &["id=spiffe://cluster.local/ns/shop/sa/frontend"],
    )?;
    assert_eq!(probe["status"], 400, "{probe}");
    assert_eq!(
        series_sum(
            &waypoint.metrics()?,
            "mesh_proxy_connections_total",
            &[("direction", "waypoint"), ("result", "not_bound")]
        )?,
        1.0
    );
    Ok(())
}

/// `--same-node-plaintext` never goes around a waypoint: frontend and
/// reviews-v2 share node 0, and with v2 bound by its own label to the
/// waypoint (node 1, here for all traffic), a connection to v2's address
/// goes through the waypoint and reaches v2 over HBONE; through its own
/// Service (no waypoint) the shortcut carries it.
#[test]
fn the_same_node_shortcut_is_never_taken_past_a_waypoint() -> anyhow::Result<()> {
    let Setup {
        tb,
        mut docs,
        frontend,
        waypoint,
        ..
    } = setup_with(false, None, &["--same-node-plaintext"])?;
    let v2 = tb.nodes[0].pods[1].clone();
    let v2_labels = [
        ("app", "reviews"),
        ("version", "v2"),
        ("istio.io/use-waypoint", "waypoint"),
    ];
    for d in &mut docs {
        if d.contains("kind: Gateway") && d.contains("name: waypoint") {
            *d = format!("{}\n", gateway_yaml("waypoint", "shop", Some("all")));
        } else if d.contains("kind: Pod") && d.contains(&v2.ip4.to_string()) {
            *d = format!("{}\n", pod_yaml(&v2, 0, "shop", "reviews", &v2_labels));
        }
    }
    apply_at_waypoint(&tb, &waypoint, &docs, &["istio.io/use-waypoint"])?;
    let same_node = || {
        tb.agent(0).metric_or_absent(
            "mesh_proxy_connections_total{direction=\"same_node\",result=\"forwarded\"}",
        )
    };
    // The control: reviews-v2's own Service has no waypoint, so the
    // shortcut carries it.
    let (_, a) = tb.curl(&frontend, &["http://10.96.0.22/own-service"])?;
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(json(&a[0].1)["server"], "v2");
    tb.agent(0).wait_metric(
        "mesh_proxy_connections_total{direction=\"same_node\",result=\"forwarded\"}",
        1.0,
    )?;
    // To v2's own address: through the waypoint.
    let (_, a) = tb.curl(&frontend, &[&format!("http://{}:8080/pod", v2.ip4)])?;
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(json(&a[0].1)["server"], "v2");
    let page = waypoint.metrics()?;
    assert_eq!(
        series_sum(
            &page,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("destination_workload", "reviews-v2"),
                ("source_principal", &id("shop", "frontend")),
            ]
        )?,
        1.0,
        "{page}"
    );
    // v2's agent took it from the waypoint, over mutual TLS.
    let agent0 = tb.agent(0).metrics()?;
    assert_eq!(
        series_sum_or_absent(
            &agent0,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", "reviews-v2"),
                ("source_principal", &id("shop", "waypoint")),
                ("connection_security_policy", "mutual_tls"),
            ],
        )?,
        1.0,
        "{agent0}"
    );
    assert_eq!(
        same_node()?,
        1.0,
        "the shortcut was taken past the waypoint"
    );
    Ok(())
}

/// HTTP/2 frames of a byte string (given as hex): their types.
fn frame_types(hex: &str) -> Vec<u8> {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = usize::from(bytes[at]) << 16
            | usize::from(bytes[at + 1]) << 8
            | usize::from(bytes[at + 2]);
        types.push(bytes[at + 3]);
        at += 9 + len;
    }
    types
}

fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{pid}/status"))
}

#[test]
fn waypoint_carries_upgrades_streams_and_grpc_and_answers_bad_input() -> anyhow::Result<()> {
    let Setup {
        tb,
        frontend,
        waypoint,
        ..
    } = setup(false)?;
    // A WebSocket upgrade through the waypoint: switched, then bytes echo.
    let r = tb.run_app(&frontend, &["upgrade", &format!("{VIP}:80"), "/ws"])?;
    assert_eq!(r["ok"], true, "{r}");

    // 100 MiB each way, streamed: the waypoint's peak memory barely moves.
    let before = peak_rss_kib(waypoint.pid())?;
    let file = tb.workdir().join("upload.bin");
    std::fs::write(&file, vec![7u8; 100 << 20])?;
    let (_, a) = tb.curl(
        &frontend,
        &[
            "-X",
            "PUT",
            "--data-binary",
            &format!("@{}", file.display()),
            "http://10.96.0.24/upload",
        ],
    )?;
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(json(&a[0].1)["body_bytes"], 100 << 20, "{a:?}");
    let (_, a) = tb.curl(
        &frontend,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}\\n%{http_code}\\n",
            &format!("http://10.96.0.24/bytes/{}", 100 << 20),
        ],
    )?;
    assert_eq!(a[0], (200, (100u64 << 20).to_string()), "{a:?}");
    let grew = peak_rss_kib(waypoint.pid())?.saturating_sub(before);
    assert!(
        grew < 32 * 1024,
        "the waypoint's peak RSS grew by {grew} KiB for 2 x 100 MiB"
    );
    std::fs::remove_file(&file)?;

    // gRPC through the waypoint: Say allowed, Secret denied with status 7.
    let client = tb.workdir().join("grpc_client.py");
    let call = |method: &str| -> anyhow::Result<Value> {
        let out = tb.run_in_pod(
            &frontend,
            std::path::Path::new("/usr/bin/python3"),
            &[
                client.to_str().unwrap_or_default(),
                "10.96.0.25:9090",
                method,
            ],
        )?;
        Ok(serde_json::from_str(out.trim())?)
    };
    let ok = call("Say")?;
    assert_eq!(ok["reply"], "echo:hello", "{ok}");
    let denied = call("Secret")?;
    assert_eq!(denied["code"], 7, "{denied}");
    assert_eq!(denied["details"], "RBAC: access denied", "{denied}");

    // Bad input: answered clearly, counted, and the waypoint keeps serving.
    let raw = |name: &str, bytes: &[u8]| -> anyhow::Result<Value> {
        let f = tb.workdir().join(name);
        std::fs::write(&f, bytes)?;
        tb.run_app(
            &frontend,
            &["raw", &format!("{VIP}:80"), f.to_str().unwrap_or_default()],
        )
    };
    let r = raw("garbage", b"GET\x01 nonsense\r\n\r\n")?;
    assert!(
        r["text"].as_str().unwrap_or("").starts_with("HTTP/1.1 400"),
        "{r}"
    );
    let mut big = b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 80 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let r = raw("big", &big)?;
    assert!(
        r["text"].as_str().unwrap_or("").starts_with("HTTP/1.1 431"),
        "{r}"
    );
    // The HTTP/2 preface, then a SETTINGS frame of an impossible length.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 5, 4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]);
    let r = raw("h2", &h2)?;
    assert!(
        frame_types(r["hex"].as_str().unwrap_or("")).contains(&7),
        "no GOAWAY: {r}"
    );
    // Counted when the waypoint ends the connection, which the client may
    // see a moment before: wait for it.
    wait_until(5, "fewer than 3 HTTP errors counted", || {
        let page = waypoint.metrics()?;
        let errors = series_sum_or_absent(
            &page,
            "mesh_proxy_connections_total",
            &[("direction", "waypoint"), ("result", "http_error")],
        )?;
        Ok((errors < 3.0).then_some(page))
    })?;
    let (_, a) = tb.curl(&frontend, &[&format!("http://{VIP}/after")])?;
    assert_eq!(a[0].0, 200, "{a:?}");

    let page = waypoint.metrics()?;
    parse_openmetrics(&page)?;
    let grpc = |status: &str| {
        series_sum(
            &page,
            "istio_requests_total",
            &[
                ("request_protocol", "grpc"),
                ("grpc_response_status", status),
            ],
        )
    };
    assert_eq!((grpc("0")?, grpc("7")?), (1.0, 1.0), "{page}");
    Ok(())
}

#[test]
fn retries_move_off_a_dead_endpoint_and_mirrors_get_a_copy() -> anyhow::Result<()> {
    let Setup {
        tb,
        frontend,
        waypoint,
        ..
    } = setup(false)?;
    // Service flaky has two endpoints, one with no app: Istio's default
    // retry (connect failure) turns each request that picks it into a
    // success on the other, and the dead one is set aside.
    let urls: Vec<String> = (0..10)
        .map(|i| format!("http://10.96.0.26/try/{i}"))
        .collect();
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (_, a) = tb.curl(&frontend, &args)?;
    assert_eq!(a.len(), 10, "{a:?}");
    assert!(
        a.iter()
            .all(|(s, b)| *s == 200 && json(b)["server"] == "v1"),
        "{a:?}"
    );
    let dead = tb.nodes[1].pods[2].ip4;
    let (_, dump) = waypoint.http("GET", "/config_dump", None)?;
    let dump: Value = serde_json::from_str(&dump)?;
    assert_eq!(
        dump["endpoints_down"],
        serde_json::json!([format!("{dead}:8080")]),
        "{dump}"
    );
    // The retried request is one request: it counts once, as a 200.
    let page = waypoint.metrics()?;
    assert_eq!(
        series_sum(
            &page,
            "istio_requests_total",
            &[
                ("destination_service_name", "flaky"),
                ("response_code", "200")
            ]
        )?,
        10.0,
        "{page}"
    );

    // A mirrored request: v1 answers; v2 receives a copy, whose answer is
    // dropped.
    let (_, a) = tb.curl(&frontend, &[&format!("http://{VIP}/mirror/me")])?;
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(json(&a[0].1)["server"], "v1", "{a:?}");
    let v2 = tb.nodes[0].pods[1].ip4;
    let seen_by_v2 = || -> anyhow::Result<String> {
        let (_, a) = tb.curl(&frontend, &[&format!("http://{v2}:8080/seen/mirror/me")])?;
        Ok(a.first()
            .map(|(_, b)| b.trim().to_owned())
            .unwrap_or_default())
    };
    wait_until(5, "the mirror never reached v2", || {
        let seen = seen_by_v2()?;
        Ok((seen != "1").then_some(seen))
    })?;
    Ok(())
}

/// The policy the README gives to forbid going around the waypoint: the
/// backend's agent allows only the waypoint's identity.
const ONLY_THROUGH_WAYPOINT: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-through-waypoint, namespace: shop}
spec:
  selector: {matchLabels: {version: v1}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/waypoint]}}]}]
";

#[test]
fn an_l4_policy_on_the_backend_forbids_going_around_the_waypoint() -> anyhow::Result<()> {
    // The waypoint runs as long as its handle lives.
    let Setup {
        tb,
        mut docs,
        frontend,
        waypoint: _waypoint,
        ..
    } = setup(false)?;
    docs.push(format!("{ONLY_THROUGH_WAYPOINT}\n"));
    tb.apply_config(&docs, |dump| dump.contains("only-through-waypoint"))?;
    // Through the waypoint (the rewrite rule goes to v1): allowed.
    let (_, a) = tb.curl(&frontend, &[&format!("http://{VIP}/v1api/x")])?;
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(json(&a[0].1)["server"], "v1");
    // Straight to the pod, with the frontend's own identity: denied by the
    // backend's agent (HBONE 401), which says why.
    let v1_ip = tb.nodes[1].pods[0].ip4;
    let (code, a) = tb.curl(&frontend, &[&format!("http://{v1_ip}:8080/around")])?;
    assert_ne!(code, 0, "{a:?}");
    let agent1 = tb.agent(1).metrics()?;
    assert_eq!(
        series_sum(
            &agent1,
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("response_flags", "DENY"),
                ("source_principal", &id("shop", "frontend")),
                ("destination_workload", "reviews-v1"),
            ]
        )?,
        1.0,
        "{agent1}"
    );
    let agent0 = tb.agent(0).metrics()?;
    assert_eq!(
        series_sum(
            &agent0,
            "mesh_proxy_connections_total",
            &[("direction", "outbound"), ("result", "denied")]
        )?,
        1.0,
        "{agent0}"
    );
    Ok(())
}

const ISTIO_ROUTING: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: shop}
spec:
  host: ratings-vs.shop.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings-vs]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: ratings-vs, subset: v2}}]
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
    route: [{destination: {host: ratings-vs, subset: v1}}]
  - match: [{uri: {exact: /delay}}]
    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}
    route: [{destination: {host: ratings-vs, subset: v1}}]
  - route:
    - {destination: {host: ratings-vs, subset: v1}, weight: 80}
    - {destination: {host: ratings-vs, subset: v2}, weight: 20}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: sticky, namespace: shop}
spec:
  host: sticky
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dice, namespace: shop}
spec:
  host: dice
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-too, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews-v2}}]}]
";

#[test]
fn virtual_service_and_destination_rule_route_through_the_waypoint() -> anyhow::Result<()> {
    let Setup {
        tb,
        mut docs,
        frontend,
        waypoint,
        ..
    } = setup(false)?;
    docs.push(
        service(
            "ratings-vs",
            "10.96.0.27",
            "app: reviews",
            "istio.io/use-waypoint: waypoint",
        ) + "\n",
    );
    for (name, vip) in [("sticky", "10.96.0.28"), ("dice", "10.96.0.29")] {
        docs.push(service(name, vip, "app: reviews", "istio.io/use-waypoint: waypoint") + "\n");
    }
    docs.push(format!("{ISTIO_ROUTING}\n"));
    let dump = apply_at_waypoint(
        &tb,
        &waypoint,
        &docs,
        &["shop/ratings-vs", "reviews-too", "shop/dice"],
    )?;
    // HTTPRoute wins where both route a Service; the VirtualService says so.
    assert!(
        dump.contains("routed by HTTPRoute shop/reviews, which wins over a VirtualService"),
        "{dump}"
    );
    let url = |p: &str| format!("http://10.96.0.27{p}");

    // Weighted subsets: 80/20 over 500 requests.
    let a = requests(&tb, &frontend, &[], 500, |_| url("/split"))?;
    let v2 = a
        .iter()
        .filter(|(s, b)| *s == 200 && json(b)["server"] == "v2")
        .count();
    let v1 = a
        .iter()
        .filter(|(s, b)| *s == 200 && json(b)["server"] == "v1")
        .count();
    assert_eq!(v1 + v2, 500, "{a:?}");
    assert!(
        (70..=130).contains(&v2),
        "80/20 split off: v1 {v1}, v2 {v2}"
    );

    // A header match to a subset.
    let (_, a) = tb.curl(
        &frontend,
        &["-H", "end-user: jason", &url("/j"), &url("/k")],
    )?;
    assert!(
        a.iter()
            .all(|(s, b)| *s == 200 && json(b)["server"] == "v2"),
        "{a:?}"
    );

    // Abort for half the requests, within tolerance; counted as FI.
    let a = requests(&tb, &frontend, &[], 200, |i| url(&format!("/abort/{i}")))?;
    let aborted = a.iter().filter(|(s, _)| *s == 503).count();
    let served = a
        .iter()
        .filter(|(s, b)| *s == 200 && json(b)["server"] == "v1")
        .count();
    assert_eq!(aborted + served, 200, "{a:?}");
    assert!(
        (70..=130).contains(&aborted),
        "50% abort off: {aborted} of 200"
    );
    let page = waypoint.metrics()?;
    assert_eq!(
        series_sum(
            &page,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "FI")]
        )?,
        aborted as f64,
        "{page}"
    );

    // consistentHash by header: a user always lands on the same pod, and
    // users spread over both.
    let server_for = |user: &str, n: usize| -> anyhow::Result<Vec<String>> {
        let urls: Vec<String> = (0..n).map(|i| format!("http://10.96.0.28/u/{i}")).collect();
        let header = format!("x-user: {user}");
        let mut args = vec!["-H", header.as_str()];
        args.extend(urls.iter().map(String::as_str));
        let (_, a) = tb.curl(&frontend, &args)?;
        Ok(a.iter()
            .map(|(_, b)| json(b)["server"].as_str().unwrap_or("?").to_owned())
            .collect())
    };
    let mut seen = std::collections::BTreeSet::new();
    for user in [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ] {
        let servers = server_for(user, 5)?;
        assert!(
            servers.iter().all(|s| *s == servers[0]),
            "{user}: {servers:?}"
        );
        seen.insert(servers[0].clone());
    }
    assert_eq!(seen.len(), 2, "eight users all hashed to {seen:?}");
    // RANDOM: both pods serve, neither nearly all.
    let urls: Vec<String> = (0..100)
        .map(|i| format!("http://10.96.0.29/r/{i}"))
        .collect();
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (_, a) = tb.curl(&frontend, &args)?;
    let v1 = a.iter().filter(|(_, b)| json(b)["server"] == "v1").count();
    assert!(
        (15..=85).contains(&v1),
        "random picked v1 {v1} times of 100"
    );

    // A fixed delay on every request of a path.
    let (_, a) = tb.curl(
        &frontend,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{time_total}\\n%{http_code}\\n",
            &url("/delay"),
        ],
    )?;
    assert_eq!(a[0].0, 200, "{a:?}");
    let took: f64 = a[0].1.trim().parse()?;
    assert!(took >= 0.3, "the delay was not applied: {took} s");
    Ok(())
}

const BREAKERS: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: breaker, namespace: shop}
spec:
  host: breaker
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pool, namespace: shop}
spec:
  host: pool
  trafficPolicy:
    connectionPool: {http: {http2MaxRequests: 1, http1MaxPendingRequests: 1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: oneshot, namespace: shop}
spec:
  host: oneshot
  trafficPolicy:
    connectionPool: {http: {maxRequestsPerConnection: 1}}
";

#[test]
fn circuit_breakers_eject_outliers_and_refuse_overflow() -> anyhow::Result<()> {
    let Setup {
        tb,
        mut docs,
        frontend,
        waypoint,
        ..
    } = setup(false)?;
    docs.push(
        service(
            "breaker",
            "10.96.0.31",
            "app: reviews",
            "istio.io/use-waypoint: waypoint",
        ) + "\n",
    );
    docs.push(
        service(
            "pool",
            "10.96.0.32",
            "app: reviews, version: v1",
            "istio.io/use-waypoint: waypoint",
        ) + "\n",
    );
    docs.push(
        service(
            "oneshot",
            "10.96.0.33",
            "app: reviews, version: v1",
            "istio.io/use-waypoint: waypoint",
        ) + "\n",
    );
    docs.push(format!("{BREAKERS}\n"));
    apply_at_waypoint(
        &tb,
        &waypoint,
        &docs,
        &["shop/breaker", "shop/pool\"", "shop/oneshot\""],
    )?;

    // maxRequestsPerConnection 1: each request on a connection of its own
    // to the backend (the app sees a new peer port each time); without it
    // the waypoint keeps one connection alive for consecutive requests.
    let peers = |vip: &str| -> anyhow::Result<Vec<String>> {
        let urls: Vec<String> = (0..3).map(|i| format!("http://{vip}/peer/{i}")).collect();
        let args: Vec<&str> = urls.iter().map(String::as_str).collect();
        let (_, a) = tb.curl(&frontend, &args)?;
        anyhow::ensure!(a.iter().all(|(s, _)| *s == 200), "{a:?}");
        Ok(a.iter()
            .map(|(_, b)| json(b)["peer"].as_str().unwrap_or_default().to_owned())
            .collect())
    };
    let mut oneshot = peers("10.96.0.33")?;
    oneshot.dedup();
    assert_eq!(oneshot.len(), 3, "one connection per request: {oneshot:?}");
    let mut pooled = peers("10.96.0.32")?;
    pooled.dedup();
    assert_eq!(pooled.len(), 1, "kept alive without the limit: {pooled:?}");

    // v1 answers /fail-if/v1 with 503 (Istio's default retry then serves
    // the request from v2): after two in a row v1 is ejected and gets no
    // request until its time is up.
    let run = |n: usize| -> anyhow::Result<Vec<(u16, String)>> {
        let urls: Vec<String> = (0..n)
            .map(|_| "http://10.96.0.31/fail-if/v1".to_owned())
            .collect();
        let args: Vec<&str> = urls.iter().map(String::as_str).collect();
        Ok(tb.curl(&frontend, &args)?.1)
    };
    let v1 = tb.nodes[1].pods[0].ip4;
    let seen_by_v1 = || -> anyhow::Result<u64> {
        let (_, a) = tb.curl(&frontend, &[&format!("http://{v1}:8080/seen/fail-if/v1")])?;
        Ok(a.first()
            .and_then(|(_, b)| b.trim().parse().ok())
            .unwrap_or(u64::MAX))
    };
    let first = run(8)?;
    assert!(
        first
            .iter()
            .all(|(s, b)| *s == 200 && json(b)["server"] == "v2"),
        "{first:?}"
    );
    assert_eq!(
        seen_by_v1()?,
        2,
        "v1 should have had exactly its two failures"
    );
    let (_, dump) = waypoint.http("GET", "/config_dump", None)?;
    let dump: Value = serde_json::from_str(&dump)?;
    assert_eq!(
        dump["endpoints_ejected"][0]["endpoint"],
        format!("{v1}:8080"),
        "{dump}"
    );
    assert_eq!(
        series_sum(
            &waypoint.metrics()?,
            "mesh_waypoint_outlier_ejections_total",
            &[("service", "breaker.shop.svc.cluster.local:80")]
        )?,
        1.0
    );
    let more = run(6)?;
    assert!(more.iter().all(|(s, _)| *s == 200), "{more:?}");
    assert_eq!(seen_by_v1()?, 2, "an ejected endpoint got requests");
    // Its ejection (2 s) over, v1 is tried again.
    wait_until(10, "v1 did not come back after its ejection", || {
        run(2)?;
        let seen = seen_by_v1()?;
        Ok((seen <= 2).then(|| format!("v1 served {seen}")))
    })?;

    // One request in flight and one waiting at most: of three at once, one
    // is refused with 503 UO and counted.
    let url = "http://10.96.0.32/sleep/700";
    let (_, a) = tb.curl(
        &frontend,
        &["--parallel", "--parallel-immediate", url, url, url],
    )?;
    let codes: Vec<u16> = a.iter().map(|(s, _)| *s).collect();
    assert_eq!(codes.iter().filter(|c| **c == 503).count(), 1, "{a:?}");
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 2, "{a:?}");
    assert_eq!(
        series_sum(
            &waypoint.metrics()?,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UO")]
        )?,
        1.0
    );
    Ok(())
}

const RATE_LIMITS: &str = "apiVersion: policy.mesh-agent.dev/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: limited, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: limited}]
  total: {requestsPerSecond: 40}
  identity: {requestsPerSecond: 5}
  overrides: [{requestsPerSecond: 8, clientRefs: [{kind: ServiceAccount, name: frontend}]}]
---
apiVersion: policy.mesh-agent.dev/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: total, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: limited-total}]
  total: {requestsPerSecond: 6}
---
apiVersion: policy.mesh-agent.dev/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: grpc, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: grpc-echo}]
  total: {requestsPerSecond: 1}
";

#[test]
fn local_rate_limits_refuse_past_the_rate_with_429_and_retry_after() -> anyhow::Result<()> {
    let Setup {
        tb,
        mut docs,
        frontend,
        waypoint,
        ..
    } = setup(false)?;
    for (name, vip) in [("limited", "10.96.0.33"), ("limited-total", "10.96.0.34")] {
        docs.push(
            service(
                name,
                vip,
                "app: reviews, version: v1",
                "istio.io/use-waypoint: waypoint",
            ) + "\n",
        );
    }
    docs.push(format!("{RATE_LIMITS}\n"));
    apply_at_waypoint(&tb, &waypoint, &docs, &["shop/limited", "shop/grpc"])?;
    let burst = |pod: &Pod, vip: &str, n: usize| -> anyhow::Result<(usize, Vec<(u16, String)>)> {
        let urls: Vec<String> = (0..n).map(|i| format!("http://{vip}/b/{i}")).collect();
        let mut args = vec!["-D", "-"];
        args.extend(urls.iter().map(String::as_str));
        let (_, a) = tb.curl(pod, &args)?;
        Ok((a.iter().filter(|(s, _)| *s == 200).count(), a))
    };
    // The frontend's override: 8 per second.
    let (passed, a) = burst(&frontend, "10.96.0.33", 20)?;
    assert!((8..=9).contains(&passed), "override: {passed} of 20 passed");
    let refused: Vec<&(u16, String)> = a.iter().filter(|(s, _)| *s == 429).collect();
    assert_eq!(refused.len(), 20 - passed, "{a:?}");
    assert!(
        refused[0].1.to_ascii_lowercase().contains("retry-after: 1"),
        "{:?}",
        refused[0]
    );
    // A second later the bucket is full again.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let (passed, _) = burst(&frontend, "10.96.0.33", 20)?;
    assert!(
        (8..=9).contains(&passed),
        "override, a second later: {passed} of 20"
    );
    // Another identity (reviews-v2's pod, ServiceAccount reviews): 5 per second.
    let v2 = tb.nodes[0].pods[1].clone();
    let (passed, _) = burst(&v2, "10.96.0.33", 20)?;
    assert!((5..=6).contains(&passed), "identity: {passed} of 20");
    // A total rate alone.
    let (passed, _) = burst(&frontend, "10.96.0.34", 20)?;
    assert!((6..=7).contains(&passed), "total: {passed} of 20");
    // gRPC past the rate: status 8.
    let client = tb.workdir().join("grpc_client.py");
    let call = || -> anyhow::Result<Value> {
        let out = tb.run_in_pod(
            &frontend,
            std::path::Path::new("/usr/bin/python3"),
            &[
                client.to_str().unwrap_or_default(),
                "10.96.0.25:9090",
                "Say",
            ],
        )?;
        Ok(serde_json::from_str(out.trim())?)
    };
    let (first, second) = (call()?, call()?);
    assert_eq!(first["code"], 0, "{first}");
    assert_eq!(second["code"], 8, "{second}");
    let page = waypoint.metrics()?;
    for (policy, scope) in [
        ("shop/limited", "override"),
        ("shop/limited", "identity"),
        ("shop/total", "total"),
        ("shop/grpc", "total"),
    ] {
        assert!(
            series_sum(
                &page,
                "mesh_waypoint_rate_limited_total",
                &[("policy", policy), ("scope", scope)]
            )? >= 1.0,
            "{policy} {scope}: {page}"
        );
    }
    Ok(())
}

/// A PromQL query against the Prometheus running in node 0's namespace.
fn prom_query(tb: &Testbed, expr: &str) -> anyhow::Result<Value> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", tb.nodes[0].netns))
        .args(["curl", "-s", "--max-time", "5", "--get", "--data-urlencode"])
        .arg(format!("query={expr}"))
        .arg("http://127.0.0.1:19090/api/v1/query")
        .output()?;
    Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

#[test]
fn every_dashboard_query_returns_series_from_a_real_prometheus() -> anyhow::Result<()> {
    let Setup {
        mut tb,
        frontend,
        waypoint: _waypoint,
        ..
    } = setup(false)?;
    // Prometheus in node 0's namespace scrapes both agents and the waypoint.
    let dir = tb.workdir().join("prometheus");
    std::fs::create_dir_all(&dir)?;
    let wp_ip = tb.nodes[1].pods[1].ip4;
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         scrape_configs:\n\
         - job_name: mesh-agent\n  static_configs: [{{targets: ['127.0.0.1:15020', '10.250.0.2:15020']}}]\n\
         - job_name: waypoint\n  static_configs: [{{targets: ['{wp_ip}:15020']}}]\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config)?;
    let (netns, cgroup) = (tb.nodes[0].netns.clone(), tb.nodes[0].cgroup.clone());
    tb.spawn_in(
        &netns,
        &cgroup,
        std::path::Path::new("/usr/bin/prometheus"),
        &[
            &format!("--config.file={}", dir.join("prometheus.yml").display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            "--web.listen-address=127.0.0.1:19090",
            "--log.level=error",
        ],
    )?;
    wait_until(30, "targets not up", || {
        let up = prom_query(&tb, "sum(up)")?;
        Ok((up["data"]["result"][0]["value"][1] != "3").then(|| up.to_string()))
    })?;
    // Known traffic while it scrapes: successes, errors, denials, a refusal.
    let url = |p: &str| format!("http://{VIP}{p}");
    requests(&tb, &frontend, &[], 40, |i| url(&format!("/ok/{i}")))?;
    tb.curl(&frontend, &[&url("/status/500"), &url("/status/500")])?;
    tb.curl(&frontend, &["-X", "POST", "-d", "x", &url("/denied")])?;
    tb.curl(&frontend, &["http://10.96.0.30/"])?;
    // A direct call that ends, and one to a port nothing listens on: the
    // server's agent answers 503, both agents count it as failed
    // (`CONNECT`).
    let v1 = tb.nodes[1].pods[0].ip4;
    tb.curl(&frontend, &[&format!("http://{v1}:8080/direct")])?;
    tb.curl(&frontend, &[&format!("http://{v1}:8099/")])?;

    let dashboards = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/dashboards");
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(&dashboards)? {
        let path = entry?.path();
        let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        for panel in dash["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_default().to_owned();
                let name = format!("{}: {}", path.display(), panel["title"]);
                queries.push((name, expr));
            }
        }
    }
    assert!(
        queries.len() >= 20,
        "only {} queries in {}",
        queries.len(),
        dashboards.display()
    );
    // Rates need two scrapes of a series (one a second): traffic goes on
    // until every query has returned series.
    wait_until(60, "queries with no series", || {
        requests(&tb, &frontend, &[], 10, |i| url(&format!("/ok/{i}")))?;
        let mut empty = Vec::new();
        for (name, expr) in &queries {
            let r = prom_query(&tb, expr)?;
            assert_eq!(r["status"], "success", "{expr}: {r}");
            if r["data"]["result"].as_array().is_none_or(Vec::is_empty) {
                empty.push(format!("{name} / {expr}"));
            }
        }
        Ok((!empty.is_empty()).then(|| empty.join("\n")))
    })?;
    Ok(())
}

/// A trace collector: OTLP/HTTP on 4318 and Zipkin on 9411, each request
/// body appended as one line to `otlp.jsonl` / `zipkin.jsonl` in DIR.
const COLLECTOR: &str = r#"
import sys, threading, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
out = sys.argv[1]
def handler(name):
    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with open(os.path.join(out, name), "ab") as f:
                f.write(body.replace(b"\n", b" ") + b"\n")
            self.send_response(200); self.end_headers()
        def log_message(self, *a): pass
    return H
servers = [ThreadingHTTPServer(("0.0.0.0", p), handler(n)) for p, n in [(4318, "otlp.jsonl"), (9411, "zipkin.jsonl")]]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("listening", flush=True)
servers[0].serve_forever()
"#;

/// Decodes each OTLP/HTTP JSON body with the OpenTelemetry protobuf
/// definitions (ids are hex in OTLP/JSON, base64 in protobuf's JSON
/// mapping) and prints one line per span.
const DECODE_OTLP: &str = r#"
import sys, json, base64
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
for line in open(sys.argv[1]):
    doc = json.loads(line)
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for sp in ss["spans"]:
                for k in ("traceId", "spanId", "parentSpanId"):
                    if k in sp:
                        sp[k] = base64.b64encode(bytes.fromhex(sp[k])).decode()
    req = json_format.Parse(json.dumps(doc), ExportTraceServiceRequest())
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for sp in ss.spans:
                print(json.dumps({
                    "trace": sp.trace_id.hex(), "id": sp.span_id.hex(), "parent": sp.parent_span_id.hex(),
                    "kind": sp.kind, "name": sp.name,
                    "attrs": {a.key: a.value.string_value for a in sp.attributes},
                }))
"#;

#[test]
fn traces_join_the_callers_and_export_to_otlp_and_zipkin() -> anyhow::Result<()> {
    // The collector's pod is added on node 1 after the others: its address
    // is the next there, known before the waypoint starts.
    let collector_ip: IpAddr = "10.2.0.13".parse()?;
    let Setup {
        mut tb,
        frontend,
        waypoint,
        ..
    } = setup_with(false, Some(collector_ip), &[])?;
    let collector = tb.add_pod(1, "collector")?;
    assert_eq!(collector.ip4, collector_ip, "the collector's address moved");
    let dir = tb.workdir().join("collector");
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("collector.py");
    std::fs::write(&script, COLLECTOR)?;
    let collector_proc = tb.serve_program(
        &collector,
        std::path::Path::new("/usr/bin/python3"),
        &[
            script.to_str().unwrap_or_default(),
            dir.to_str().unwrap_or_default(),
        ],
    )?;

    // W3C: the caller's trace goes on, through the waypoint's two spans.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let (_, a) = tb.curl(
        &frontend,
        &[
            "-H",
            &format!("traceparent: 00-{trace}-{caller}-01"),
            &format!("http://{VIP}/traced"),
        ],
    )?;
    assert_eq!(a[0].0, 200, "{a:?}");
    let seen = json(&a[0].1)["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        seen.starts_with(&format!("00-{trace}-")) && seen.ends_with("-01"),
        "{seen}"
    );
    let client_span = seen[36..52].to_owned();
    // B3 in, B3 out.
    let (_, a) = tb.curl(
        &frontend,
        &[
            "-H",
            "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7",
            "-H",
            "x-b3-spanid: e457b5a2e4d86bd1",
            "-H",
            "x-b3-sampled: 1",
            &format!("http://{VIP}/b3"),
        ],
    )?;
    let h = &json(&a[0].1)["headers"];
    assert_eq!(h["x-b3-traceid"], "80f198ee56343ba864fe8b2a57d3eff7", "{h}");
    assert!(
        h["x-b3-parentspanid"]
            .as_str()
            .is_some_and(|p| p.len() == 16),
        "{h}"
    );

    // Spans reach both collectors within the batch interval.
    let otlp = dir.join("otlp.jsonl");
    let zipkin = dir.join("zipkin.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let spans: Vec<Value> = loop {
        if otlp.exists() && zipkin.exists() {
            let decode = dir.join("decode.py");
            std::fs::write(&decode, DECODE_OTLP)?;
            let out = std::process::Command::new("python3")
                .arg(&decode)
                .arg(&otlp)
                .output()?;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let spans: Vec<Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            if spans.iter().filter(|s| s["trace"] == trace).count() >= 2 {
                break spans;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no spans exported");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let ours: Vec<&Value> = spans.iter().filter(|s| s["trace"] == trace).collect();
    let server = ours.iter().find(|s| s["kind"] == 2).expect("a server span");
    let client = ours.iter().find(|s| s["kind"] == 3).expect("a client span");
    assert_eq!(server["parent"], caller, "{server}");
    assert_eq!(client["parent"], server["id"], "{client}");
    assert_eq!(client["id"], client_span.as_str(), "{client}");
    assert_eq!(
        server["name"], "reviews.shop.svc.cluster.local:80/*",
        "{server}"
    );
    assert_eq!(server["attrs"]["http.status_code"], "200", "{server}");
    assert_eq!(server["attrs"]["istio.namespace"], "shop", "{server}");
    assert!(
        server["attrs"]["upstream_cluster"]
            .as_str()
            .is_some_and(|c| c.starts_with("outbound|80|")),
        "{server}"
    );
    let z: Vec<Value> = std::fs::read_to_string(&zipkin)?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .flat_map(|v| v.as_array().cloned().unwrap_or_default())
        .filter(|s| s["traceId"] == trace)
        .collect();
    assert!(
        z.iter()
            .any(|s| s["kind"] == "SERVER" && s["parentId"] == caller && s["id"] == server["id"]),
        "{z:?}"
    );

    // The collector gone: requests are unaffected, the spans dropped and
    // counted.
    tb.stop(collector_proc)?;
    let a = requests(&tb, &frontend, &[], 20, |i| {
        format!("http://{VIP}/down/{i}")
    })?;
    assert!(a.iter().all(|(s, _)| *s == 200), "{a:?}");
    wait_until(10, "dropped spans not counted", || {
        let dropped = series_sum_or_absent(
            &waypoint.metrics()?,
            "mesh_waypoint_spans_dropped_total",
            &[("reason", "export_failed")],
        )?;
        Ok((dropped < 40.0).then(|| dropped.to_string()))
    })?;
    Ok(())
}

const VS_FEATURES: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings2, namespace: shop}
spec:
  host: ratings-vs2
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: least, namespace: shop}
spec:
  host: least
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: byip, namespace: shop}
spec:
  host: byip
  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc-fault, namespace: shop}
spec:
  hosts: [grpc-echo]
  http:
  - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: grpc-echo}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings2, namespace: shop}
spec:
  hosts: [ratings-vs2.shop.svc.cluster.local]
  http:
  - match: [{uri: {regex: '/items/[0-9]+'}}, {queryParams: {debug: {exact: '1'}}}, {method: {exact: DELETE}}]
    route: [{destination: {host: ratings-vs2, subset: v2}}]
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: moved.example}
  - match: [{uri: {prefix: /svc}}]
    rewrite: {uri: /api}
    headers:
      request: {set: {x-vs: 'yes'}, remove: [x-drop]}
      response: {add: {x-served-by: waypoint}}
    route: [{destination: {host: ratings-vs2, subset: v1}}]
  - match: [{uri: {exact: /slow}}]
    timeout: 300ms
    route: [{destination: {host: ratings-vs2, subset: v1}}]
  - match: [{uri: {prefix: /fail-if}}]
    retries: {attempts: 2, retryOn: 5xx}
    route: [{destination: {host: ratings-vs2}}]
  - match: [{uri: {prefix: /mirror}}]
    mirror: {host: ratings-vs2, subset: v2}
    mirrorPercentage: {value: 50}
    route: [{destination: {host: ratings-vs2, subset: v1}}]
";

#[test]
fn virtual_service_matches_filters_timeouts_retries_and_mirror_share() -> anyhow::Result<()> {
    let Setup {
        mut tb,
        mut docs,
        frontend,
        waypoint,
        ..
    } = setup(false)?;
    for (name, vip) in [
        ("ratings-vs2", "10.96.0.35"),
        ("least", "10.96.0.36"),
        ("byip", "10.96.0.37"),
    ] {
        docs.push(service(name, vip, "app: reviews", "istio.io/use-waypoint: waypoint") + "\n");
    }
    docs.push(format!("{VS_FEATURES}\n"));
    apply_at_waypoint(
        &tb,
        &waypoint,
        &docs,
        &["shop/ratings2", "shop/least", "shop/byip", "grpc-fault"],
    )?;
    let url = |p: &str| format!("http://10.96.0.35{p}");
    let server = |a: &[(u16, String)]| json(&a[0].1)["server"].as_str().unwrap_or("?").to_owned();
    // Regex, query parameter and method matches, each to v2.
    for args in [
        vec![url("/items/42")],
        vec![url("/x?debug=1")],
        vec!["-X".into(), "DELETE".into(), url("/x")],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, a) = tb.curl(&frontend, &args)?;
        assert_eq!((a[0].0, server(&a)), (200, "v2".into()), "{args:?}: {a:?}");
    }
    // Redirect.
    let (_, a) = tb.curl(&frontend, &["-D", "-", &url("/old/page")])?;
    assert_eq!(a[0].0, 301, "{a:?}");
    assert!(
        a[0].1
            .to_ascii_lowercase()
            .contains("location: http://moved.example/new"),
        "{a:?}"
    );
    // Rewrite and header edits, as the backend saw them and as returned.
    let (_, a) = tb.curl(
        &frontend,
        &["-D", "-", "-H", "x-drop: 1", &url("/svc/list")],
    )?;
    let text = &a[0].1;
    assert!(
        text.to_ascii_lowercase().contains("x-served-by: waypoint"),
        "{text}"
    );
    let body: Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])?;
    assert_eq!(body["path"], "/api/list", "{body}");
    assert_eq!(body["headers"]["x-vs"], "yes", "{body}");
    assert!(body["headers"].get("x-drop").is_none(), "{body}");
    // Timeout: 504.
    let (_, a) = tb.curl(&frontend, &[&url("/slow")])?;
    assert_eq!(a[0].0, 504, "{a:?}");
    // Retries on 5xx: v1 fails every /fail-if/v1, each request still ends 200.
    let a = requests(&tb, &frontend, &[], 10, |_| url("/fail-if/v1"))?;
    assert!(
        a.iter()
            .all(|(s, b)| *s == 200 && json(b)["server"] == "v2"),
        "{a:?}"
    );
    // The mirror gets about half of the requests.
    requests(&tb, &frontend, &[], 100, |_| url("/mirror/half"))?;
    let v2 = tb.nodes[0].pods[1].ip4;
    let seen_by_v2 = |path: &str| -> anyhow::Result<u32> {
        let (_, a) = tb.curl(&frontend, &[&format!("http://{v2}:8080/seen{path}")])?;
        Ok(a.first()
            .and_then(|(_, b)| b.trim().parse().ok())
            .unwrap_or(0))
    };
    // Copies go out in the waypoint's order: once a copy of a later request
    // (the HTTPRoute mirror of Service reviews, every request, to v2 too)
    // has arrived, the earlier ones have.
    let (_, a) = tb.curl(&frontend, &[&format!("http://{VIP}/mirror/end-of-half")])?;
    assert_eq!(a[0].0, 200, "{a:?}");
    wait_until(5, "the last mirror copy never reached v2", || {
        let seen = seen_by_v2("/mirror/end-of-half")?;
        Ok((seen != 1).then(|| seen.to_string()))
    })?;
    let mirrored = seen_by_v2("/mirror/half")?;
    assert!(
        (30..=70).contains(&mirrored),
        "mirrored {mirrored} of 100 at 50%"
    );

    // LEAST_REQUEST: while one request holds a pod, the others go to the
    // other pod.
    tb.spawn_in(
        &frontend.netns,
        &frontend.cgroup,
        std::path::Path::new("/usr/bin/curl"),
        &["-s", "-o", "/dev/null", "http://10.96.0.36/sleep/2000"],
    )?;
    // Held once a pod has it (a pod counts a request as it starts it).
    let v1 = tb.nodes[1].pods[0].ip4;
    let holding = |ip: IpAddr| -> anyhow::Result<u32> {
        let (_, a) = tb.curl(&frontend, &[&format!("http://{ip}:8080/seen/sleep/2000")])?;
        Ok(a.first()
            .and_then(|(_, b)| b.trim().parse().ok())
            .unwrap_or(0))
    };
    wait_until(5, "the slow request reached no pod", || {
        let held = holding(v1)? + holding(v2)?;
        Ok((held != 1).then(|| held.to_string()))
    })?;
    let urls: Vec<String> = (0..6)
        .map(|i| format!("http://10.96.0.36/quick/{i}"))
        .collect();
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (_, a) = tb.curl(&frontend, &args)?;
    let servers: std::collections::BTreeSet<String> = a
        .iter()
        .map(|(_, b)| json(b)["server"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(
        servers.len(),
        1,
        "least request spread over the busy pod: {a:?}"
    );
    Ok(())
}
