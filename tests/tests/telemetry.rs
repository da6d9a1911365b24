//! Telemetry as Istio's tools read it, end to end: the byte counters of a
//! connection that is still open, the cluster labels, the open-socket
//! gauge, the access log line at its close, and `/config_dump` in
//! ztunnel's shape.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    Testbed, Value, converge,
    mesh::{namespace_yaml, pod_yaml, service_yaml},
    metrics::{series_sum, series_sum_or_absent},
};

const APP_PORT: u16 = 8080;
const CLUSTER: &str = "east";

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn any6(port: u16) -> SocketAddr {
    sa(IpAddr::from([0u8; 16]), port)
}

/// A DENY policy that matches nobody: something for `policies` to list.
const DENY_NOBODY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-nowhere
  namespace: shop
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: [nowhere]
";

/// A client on node 0 and an echo server on node 1, both meshed, with
/// agents started with `--cluster-id east`.
fn shop() -> anyhow::Result<(Testbed, mesh_tests::Pod, mesh_tests::Pod)> {
    let mut tb = Testbed::new(2)?;
    let client = tb.add_pod(0, "client")?;
    let server = tb.add_pod(1, "server")?;
    tb.write_config(&[
        namespace_yaml("shop", true),
        pod_yaml(&client, 0, "shop", "client", &[]),
        pod_yaml(&server, 1, "shop", "server", &[("app", "echo")]),
        service_yaml("echo", "shop", "10.96.0.40", 80, "8080", "echo"),
        DENY_NOBODY.to_owned(),
    ])?;
    tb.serve(&server, any6(APP_PORT))?;
    let mut args = tb.mesh_args()?;
    args.extend(["--cluster-id".to_owned(), CLUSTER.to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for node in 0..2 {
        tb.start_agent(node, &args)?;
    }
    tb.agent(0).enroll(&client)?;
    tb.agent(1).enroll(&server)?;
    Ok((tb, client, server))
}

#[test]
fn bytes_of_a_live_connection_are_counted_before_it_closes() -> anyhow::Result<()> {
    let (mut tb, client, server) = shop()?;
    let mut session = tb.hold(&client, sa(server.ip4, APP_PORT))?;
    assert_eq!(session.hello["ok"], true, "{}", session.hello);
    let hello = session.hello["hello"].as_str().unwrap_or_default().len() + 1;
    let line = "x".repeat(20_000);
    for _ in 0..3 {
        assert_eq!(session.send(&line)?["echo"], line.as_str());
    }
    // Every byte was copied before the client had its echo: the series
    // are exact while the connection is still open.
    let request = 3 * (line.len() + 1);
    let response = hello + request;
    let ends = |reporter| {
        [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("destination_workload", "server"),
            ("source_cluster", CLUSTER),
            ("destination_cluster", CLUSTER),
        ]
    };
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let page = tb.agent(node).metrics()?;
        let labels = ends(reporter);
        assert_eq!(
            series_sum(&page, "istio_tcp_received_bytes_total", &labels)?,
            request as f64,
            "{reporter}: {page}"
        );
        assert_eq!(
            series_sum(&page, "istio_tcp_sent_bytes_total", &labels)?,
            response as f64,
            "{reporter}: {page}"
        );
        assert_eq!(
            series_sum_or_absent(&page, "istio_tcp_connections_closed_total", &labels)?,
            0.0,
            "{reporter}: still open: {page}"
        );
    }
    // One socket open on each side: the client's at the source agent, the
    // HBONE connection at the destination's.
    let open = |node: usize, reporter: &str| {
        tb.agent(node).metric(&format!(
            "istio_tcp_sockets_open{{reporter=\"{reporter}\"}}"
        ))
    };
    assert_eq!(open(0, "source")?, 1.0);
    assert_eq!(open(1, "destination")?, 1.0);

    // The client goes: the close is counted, nothing failed, the source's
    // socket is released (the pooled HBONE connection stays open).
    drop(session);
    let source = ends("source");
    converge("the close counted", Duration::from_secs(10), || {
        let page = tb.agent(0).metrics()?;
        Ok(series_sum_or_absent(&page, "istio_tcp_connections_closed_total", &source)? == 1.0)
    })?;
    tb.agent(0)
        .wait_metric("istio_tcp_sockets_open{reporter=\"source\"}", 0.0)?;
    let page = tb.agent(0).metrics()?;
    assert_eq!(
        series_sum_or_absent(&page, "istio_tcp_connections_failed_total", &source)?,
        0.0,
        "{page}"
    );
    assert_eq!(
        series_sum(&page, "istio_tcp_received_bytes_total", &source)?,
        request as f64,
        "counted once, not again at the close"
    );
    // The access log line, with ztunnel's field names.
    let want = [
        format!("src.addr={}:", client.ip4),
        "src.workload=client".to_owned(),
        "src.namespace=shop".to_owned(),
        "src.identity=spiffe://cluster.local/ns/shop/sa/client".to_owned(),
        format!("src.cluster={CLUSTER}"),
        format!("dst.addr={}:15008", server.ip4),
        format!("dst.hbone_addr={}:{APP_PORT}", server.ip4),
        "dst.workload=server".to_owned(),
        "dst.identity=spiffe://cluster.local/ns/shop/sa/server".to_owned(),
        "direction=\"outbound\"".to_owned(),
        format!("bytes_sent={request} bytes_recv={response}"),
    ];
    let log = tb.agent(0).log_text();
    let line = log
        .lines()
        .find(|l| l.contains("access: connection complete"))
        .unwrap_or_default();
    for field in &want {
        assert!(line.contains(field.as_str()), "{field} not in {line:?}");
    }
    Ok(())
}

/// An app that speaks first (an HTTP client) has what it sent before its
/// tunnel opened carried with the CONNECT: every request is answered, and
/// its bytes are counted once on each side.
#[test]
fn first_bytes_sent_with_the_connect_arrive_and_are_counted_once() -> anyhow::Result<()> {
    let (mut tb, client, server) = shop()?;
    const HTTP_PORT: u16 = 8081;
    // `mesh-load`'s request, always these 36 bytes.
    const REQUEST: usize = 36;
    tb.serve_http(&server, any6(HTTP_PORT), "server")?;
    let target = sa(server.ip4, HTTP_PORT).to_string();
    // One connection per request, 20 a second for a second.
    let out = tb.run_in_pod(
        &client,
        &mesh_tests::sibling_bin("mesh-load"),
        &["load", &target, "1", "20", "1", "new-conn"],
    )?;
    let r: Value = serde_json::from_str(out.trim())?;
    assert_eq!(r["errors"], 0, "{r}");
    let requests = r["requests"].as_f64().unwrap_or_default();
    assert!(requests >= 10.0, "{r}");
    let labels = |reporter| {
        [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("destination_workload", "server"),
        ]
    };
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        converge("every close counted", Duration::from_secs(10), || {
            let page = tb.agent(node).metrics()?;
            let closed = series_sum_or_absent(
                &page,
                "istio_tcp_connections_closed_total",
                &labels(reporter),
            )?;
            Ok(closed == requests)
        })?;
        let page = tb.agent(node).metrics()?;
        assert_eq!(
            series_sum(&page, "istio_tcp_received_bytes_total", &labels(reporter))?,
            requests * REQUEST as f64,
            "{reporter}: {page}"
        );
    }
    // The client's agent says how much went with each CONNECT: the whole
    // request, for connections whose request was in before it asked (not
    // every one need be).
    let log = tb.agent(0).log_text();
    let with_request = log
        .lines()
        .filter(|l| {
            l.contains("HBONE tunnel open") && l.contains(&format!("first_bytes={REQUEST}"))
        })
        .count();
    assert!(with_request >= 1, "no CONNECT carried the request:\n{log}");
    Ok(())
}

#[test]
fn config_dump_has_ztunnels_sections() -> anyhow::Result<()> {
    let (tb, client, server) = shop()?;
    // A call, so that the server's agent holds its certificate.
    let r = tb.connect(&client, sa(server.ip4, APP_PORT), 10)?;
    assert_eq!(r["ok"], true, "{r}");
    let (status, body) = tb.agent(1).http("GET", "/config_dump", None)?;
    assert_eq!(status, 200, "{body}");
    let dump: Value = serde_json::from_str(&body)?;
    for key in [
        "workloads",
        "services",
        "policies",
        "certificates",
        "workloadState",
        // This agent's own, beside them.
        "config",
        "pods",
        "certificate_summary",
    ] {
        assert!(!dump[key].is_null(), "no {key}: {dump:#}");
    }
    let entry = |section: &str, key: &str, value: &str| -> anyhow::Result<Value> {
        dump[section]
            .as_array()
            .and_then(|a| a.iter().find(|e| e[key] == value))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no {section} entry with {key}={value}: {dump:#}"))
    };
    let uid = "east//Pod/shop/server";
    let w = entry("workloads", "name", "server")?;
    assert_eq!(w["uid"], uid, "{w:#}");
    assert_eq!(w["namespace"], "shop", "{w:#}");
    assert_eq!(w["serviceAccount"], "server", "{w:#}");
    assert_eq!(w["protocol"], "HBONE", "{w:#}");
    assert_eq!(w["clusterId"], CLUSTER, "{w:#}");
    assert_eq!(w["node"], "node1", "{w:#}");
    assert!(
        w["workloadIps"]
            .as_array()
            .is_some_and(|ips| ips.contains(&Value::from(server.ip4.to_string()))),
        "{w:#}"
    );
    let s = entry("services", "name", "echo")?;
    assert_eq!(s["hostname"], "echo.shop.svc.cluster.local", "{s:#}");
    assert_eq!(s["vips"], serde_json::json!(["/10.96.0.40"]), "{s:#}");
    assert_eq!(s["ports"], serde_json::json!({"80": 8080}), "{s:#}");
    assert_eq!(s["endpoints"][uid]["port"]["80"], 8080, "{s:#}");
    let p = entry("policies", "name", "deny-nowhere")?;
    assert_eq!(
        (&p["namespace"], &p["action"], &p["scope"]),
        (&"shop".into(), &"Deny".into(), &"Namespace".into()),
        "{p:#}"
    );
    // The certificate the server's agent accepted the call with.
    let c = entry(
        "certificates",
        "identity",
        "spiffe://cluster.local/ns/shop/sa/server",
    )?;
    assert_eq!(c["state"], "Available", "{c:#}");
    for part in ["pem", "serialNumber", "validFrom", "expirationTime"] {
        assert!(c["certChain"][0][part].is_string(), "{part}: {c:#}");
        assert!(c["rootCerts"][0][part].is_string(), "{part}: {c:#}");
    }
    let state = &dump["workloadState"][uid];
    assert_eq!(state["state"], "Up", "{dump:#}");
    assert_eq!(
        state["info"],
        serde_json::json!({"name": "server", "namespace": "shop", "serviceAccount": "server"}),
        "{dump:#}"
    );
    Ok(())
}
