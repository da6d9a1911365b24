//! The demo's L7 part: a waypoint in a pod of its own serves Service
//! `reviews` (v1 and v2) of namespace `bookinfo`: a 90/10 split, a header
//! match, GET allowed and POST denied, and a Service bound to a waypoint
//! that does not exist refused. Every claim it prints is checked.

use std::collections::BTreeMap;

use anyhow::{Context as _, ensure};
use mesh_tests::{
    Testbed,
    mesh::{namespace_yaml, pod_yaml, with_netns},
    metrics::series_sum_or_absent,
    waypoint::{gateway_yaml, http_service_yaml},
};

const VIP: &str = "10.96.0.50";

const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{headers: [{name: end-user, value: jason}]}]
    backendRefs: [{name: reviews-v2, port: 80}]
  - backendRefs:
    - {name: reviews-v1, port: 80, weight: 90}
    - {name: reviews-v2, port: 80, weight: 10}
";

const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-read-only, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, group: \"\", name: reviews}]
  rules:
  - from: [{source: {principals: [cluster.local/ns/bookinfo/sa/productpage]}}]
    to: [{operation: {methods: [GET]}}]
";

fn service(name: &str, vip: &str, selector: &str, labels: &str) -> String {
    http_service_yaml(name, "bookinfo", vip, selector, labels)
}

/// Adds the bookinfo pods and objects to `docs` (the configuration so
/// far), starts the waypoint, and runs the L7 part.
/// Returns the configuration with bookinfo in it.
pub fn run(tb: &mut Testbed, mut docs: Vec<String>) -> anyhow::Result<Vec<String>> {
    println!("\n--- L7: a waypoint ---");
    let page = tb.add_pod(0, "productpage")?;
    let v1 = tb.add_pod(0, "reviews-v1")?;
    let v2 = tb.add_pod(0, "reviews-v2")?;
    let wp = tb.add_pod(0, "waypoint")?;
    let pod = |p: &mesh_tests::Pod, sa: &str, labels: &[(&str, &str)]| {
        with_netns(&pod_yaml(p, 0, "bookinfo", sa, labels), p)
    };
    docs.extend([
        namespace_yaml("bookinfo", true),
        pod(&page, "productpage", &[("app", "productpage")]),
        pod(&v1, "reviews", &[("app", "reviews"), ("version", "v1")]),
        pod(&v2, "reviews", &[("app", "reviews"), ("version", "v2")]),
        // Istio's waypoint pods: the Gateway's label, and out of capture.
        pod(
            &wp,
            "waypoint",
            &[
                ("gateway.networking.k8s.io/gateway-name", "waypoint"),
                ("istio.io/dataplane-mode", "none"),
            ],
        ),
        gateway_yaml("waypoint", "bookinfo", None),
        service(
            "reviews",
            VIP,
            "app: reviews",
            "istio.io/use-waypoint: waypoint",
        ),
        service("reviews-v1", "10.96.0.51", "app: reviews, version: v1", ""),
        service("reviews-v2", "10.96.0.52", "app: reviews, version: v2", ""),
        service(
            "ratings",
            "10.96.0.53",
            "app: reviews",
            "istio.io/use-waypoint: missing",
        ),
        ROUTE.to_owned(),
        POLICY.to_owned(),
    ]);
    tb.serve_http(&v1, "[::]:8080".parse()?, "reviews-v1")?;
    tb.serve_http(&v2, "[::]:8080".parse()?, "reviews-v2")?;
    tb.write_config(&docs)?;
    let config = tb.config_path().display().to_string();
    let ca_dir = tb.nodes[0].state_dir.join("ca").display().to_string();
    let args: Vec<String> = ["--config", &config, "--ca-dir", &ca_dir]
        .map(str::to_owned)
        .to_vec();
    let waypoint = tb
        .start_waypoint(&wp, "bookinfo", &args)
        .context("starting the waypoint")?;
    // The agent enrols the labelled pods on its own; wait for them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !["productpage", "reviews-v1", "reviews-v2"].iter().all(|n| {
        tb.agent(0)
            .pod_names()
            .unwrap_or_default()
            .iter()
            .any(|p| p.ends_with(n))
    }) {
        ensure!(
            std::time::Instant::now() < deadline,
            "bookinfo pods not enrolled"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    println!(
        "Namespace bookinfo (ambient): productpage {}, reviews-v1 {}, reviews-v2 {}",
        page.ip4, v1.ip4, v2.ip4
    );
    println!(
        "Waypoint: `mesh-agent waypoint` in its own pod {} (Gateway bookinfo/waypoint, class istio-waypoint, not captured)",
        wp.ip4
    );
    println!(
        "  Service reviews ({VIP}) carries istio.io/use-waypoint=waypoint; its HTTPRoute and policy:"
    );
    for line in ROUTE
        .lines()
        .chain(POLICY.lines())
        .filter(|l| l.starts_with("  "))
    {
        println!("    {line}");
    }

    let url = format!("http://{VIP}/reviews");
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 300).collect();
    let (_, answers) = tb.curl(&page, &urls)?;
    let mut seen = BTreeMap::<String, u32>::new();
    for (status, body) in &answers {
        ensure!(*status == 200, "a request failed: {status} {body}");
        let v: serde_json::Value = serde_json::from_str(body)?;
        *seen
            .entry(v["server"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let v2_share = seen.get("reviews-v2").copied().unwrap_or(0);
    println!("\n  6. 300 GETs productpage -> reviews over one keep-alive connection: {seen:?}");
    ensure!(
        answers.len() == 300 && (15..=45).contains(&v2_share),
        "the 90/10 split did not hold: {seen:?}"
    );
    println!("     each request is routed on its own: the 90/10 split holds");

    let (_, a) = tb.curl(&page, &["-H", "end-user: jason", &url])?;
    let server = a
        .first()
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(b).ok())
        .map(|v| v["server"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    println!("  7. GET with header end-user: jason -> served by {server} (the header match wins)");
    ensure!(
        server == "reviews-v2",
        "the header match did not route to v2"
    );

    let (_, a) = tb.curl(&page, &["-X", "POST", "-d", "{}", &url])?;
    let (status, body) = a.first().cloned().unwrap_or_default();
    println!("  8. POST productpage -> reviews: {status} {body:?}");
    ensure!(
        status == 403 && body == "RBAC: access denied",
        "POST was not denied"
    );
    let log = waypoint.log_text();
    let reason = log
        .lines()
        .rev()
        .find(|l| l.contains("request complete") && l.contains("policy=deny"))
        .and_then(|l| l.split("policy=").nth(1))
        .map(|r| r.split(" flags=").next().unwrap_or(r).to_owned())
        .unwrap_or_default();
    println!("     the waypoint's reason: {reason}");
    ensure!(
        reason.contains("no ALLOW policy matched"),
        "no deny reason in the waypoint's log"
    );

    let (code, _) = tb.curl(&page, &["http://10.96.0.53/"])?;
    let agent = tb.agent(0).metrics()?;
    let refused = series_sum_or_absent(
        &agent,
        "mesh_proxy_connections_total",
        &[("direction", "outbound"), ("result", "no_waypoint")],
    )?;
    println!(
        "  9. productpage -> ratings (bound to waypoint `missing`, which does not exist): curl exit {code}, refused by the agent ({refused} counted as no_waypoint)"
    );
    ensure!(code != 0 && refused >= 1.0, "ratings was not refused");
    println!("     Istio would send it around the missing waypoint; this mesh fails closed.");

    println!("\nThe waypoint's request metrics (from its :15020/metrics, labels shortened):");
    let metrics = waypoint.metrics()?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total"))
    {
        println!(
            "  {}",
            super::shorten_with(
                line,
                &[
                    "destination_service_name",
                    "response_code",
                    "response_flags"
                ]
            )
        );
    }
    Ok(docs)
}
