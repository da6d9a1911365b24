//! Node agents as they run in a cluster, as the binary: `--kubernetes`
//! against the API stand-in served on the fabric, certificates from a
//! `mesh-agent ca` process through `--ca-address`. Pods are Pod objects in
//! the API, found from their UID (the kubelet's cgroup naming), enrolled
//! when their namespace is labelled ambient; policy is created and deleted
//! through the API.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    Pod, Testbed, Value, converge, ip_of,
    mesh::{namespace_yaml, pod_yaml, with_uid},
    metrics::{series_sum, series_sum_or_absent},
};

const APP_PORT: u16 = 8080;

fn any6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::from([0u8; 16]), port)
}

fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

const DENY_CLIENT: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-client
  namespace: shop
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/shop/sa/client\"]
";

/// Waits until node `node`'s agent has enrolled the pod named `name`.
fn wait_enrolled(tb: &Testbed, node: usize, name: &str) -> anyhow::Result<()> {
    converge(
        &format!("node {node}'s agent enrolled {name}"),
        Duration::from_secs(15),
        || Ok(tb.agent(node).pod_names()?.iter().any(|n| n == name)),
    )
    .map(drop)
    .map_err(|e| e.context(tb.agent(node).log_text()))
}

/// Waits until node `node`'s agent's configuration dump satisfies `applied`.
fn wait_dump(tb: &Testbed, node: usize, applied: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let mut last = String::new();
    converge(
        &format!("node {node}'s agent applied the change"),
        Duration::from_secs(10),
        || {
            last = tb.agent(node).http("GET", "/config_dump", None)?.1;
            Ok(applied(&last))
        },
    )
    .map(drop)
    .map_err(|e| e.context(last))
}

/// The cluster's HBONE connections as each side counts them: forwarded by
/// the destination's agent, and opened by the source's agent over mutual
/// TLS for the client's identity.
fn hbone_counts(tb: &Testbed) -> anyhow::Result<(f64, f64)> {
    let forwarded = tb.agent(1).metric_or_absent(
        "mesh_proxy_connections_total{direction=\"hbone\",result=\"forwarded\"}",
    )?;
    // Absent before the first connection.
    let opened = series_sum_or_absent(
        &tb.agent(0).metrics()?,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_principal", &id("shop", "client")),
            ("destination_principal", &id("shop", "server")),
            ("connection_security_policy", "mutual_tls"),
        ],
    )?;
    Ok((forwarded, opened))
}

fn connect_ok(tb: &Testbed, from: &Pod, to: &Pod) -> anyhow::Result<Value> {
    let r = tb.connect(from, SocketAddr::new(to.ip4, APP_PORT), 64 << 10)?;
    assert_eq!(r["ok"], true, "{} to {}: {r}", from.name, to.name);
    assert_eq!(
        ip_of(r["server_local"].as_str().unwrap_or_default()),
        to.ip4.to_string(),
        "{r}"
    );
    Ok(r)
}

#[test]
fn node_agents_run_against_the_api_with_certificates_from_the_cluster_ca() -> anyhow::Result<()> {
    let mut tb = Testbed::new(2)?;
    tb.start_cluster()?;
    let client = tb.add_pod(0, "client")?;
    let server = tb.add_pod(1, "server")?;
    // Not in the API, so not in the mesh: where the HBONE probe runs from.
    let outsider = tb.add_pod(0, "outsider")?;
    // A process in each pod's cgroup, as a sandbox has: how an agent finds
    // the pod's namespace from its UID.
    for p in [&client, &server] {
        tb.serve(p, any6(APP_PORT))?;
    }
    let objects = [
        namespace_yaml("shop", true),
        with_uid(
            &pod_yaml(&client, 0, "shop", "client", &[("app", "client")]),
            &client,
        ),
        with_uid(
            &pod_yaml(&server, 1, "shop", "server", &[("app", "echo")]),
            &server,
        ),
    ];
    tb.cluster().apply_yaml(&objects.join("---\n"))?;
    for node in 0..2 {
        tb.start_cluster_agent(node, &[])?;
    }
    wait_enrolled(&tb, 0, "shop/client")?;
    wait_enrolled(&tb, 1, "shop/server")?;

    // The agents hold certificates the cluster CA signed for their pods.
    let root_serial = {
        let pem = std::fs::read_to_string(tb.cluster().root())?;
        mesh_tests::probe::serial_of_pem(&pem)?
    };
    for (node, sa) in [(0, "client"), (1, "server")] {
        let (_, dump) = tb.agent(node).http("GET", "/config_dump", None)?;
        let dump: Value = serde_json::from_str(&dump)?;
        let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
        assert!(
            certs
                .iter()
                .any(|c| c["identity"] == id("shop", sa) && c["role"] == "workload"),
            "node {node}: {dump:#}"
        );
        let roots: Vec<&Value> = certs.iter().filter(|c| c["role"] == "root").collect();
        assert!(
            !roots.is_empty() && roots.iter().all(|c| c["serial"] == root_serial.as_str()),
            "node {node} trusts another root than the cluster CA's {root_serial}: {dump:#}"
        );
    }

    // Across nodes over HBONE: the bytes arrive, the destination's agent
    // saw the client's identity.
    let before = hbone_counts(&tb)?;
    connect_ok(&tb, &client, &server)?;
    converge(
        "HBONE counted on both sides",
        Duration::from_secs(5),
        || Ok(hbone_counts(&tb)? == (before.0 + 1.0, before.1 + 1.0)),
    )?;
    let seen = format!("src.identity={}", id("shop", "client"));
    assert!(
        tb.agent(1).log_text().contains(&seen),
        "the server's agent logged no {seen}"
    );
    let page = tb.agent(1).metrics()?;
    let by_client = [
        ("reporter", "destination"),
        ("source_principal", &id("shop", "client") as &str),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        series_sum(&page, "istio_tcp_connections_opened_total", &by_client)?,
        1.0,
        "{page}"
    );

    // A DENY created through the API: refused by the server's agent for
    // that policy, answered with HBONE 401, which the client's agent counts.
    let denied = |node: usize, direction: &str| {
        tb.agent(node).metric_or_absent(&format!(
            "mesh_proxy_connections_total{{direction=\"{direction}\",result=\"denied\"}}"
        ))
    };
    tb.cluster().apply_yaml(DENY_CLIENT)?;
    wait_dump(&tb, 1, |d| d.contains("no-client"))?;
    let (hbone_denied, outbound_denied) = (denied(1, "hbone")?, denied(0, "outbound")?);
    let r = tb.connect(&client, SocketAddr::new(server.ip4, APP_PORT), 1000)?;
    assert_ne!(r["ok"], true, "denied by policy, yet: {r}");
    converge(
        "the deny counted on both sides",
        Duration::from_secs(5),
        || {
            Ok(denied(1, "hbone")? == hbone_denied + 1.0
                && denied(0, "outbound")? == outbound_denied + 1.0)
        },
    )?;
    let reason = "denied by DENY policy shop/no-client";
    assert!(
        tb.agent(1)
            .log_text()
            .lines()
            .any(|l| l.contains("connection complete") && l.contains(reason)),
        "no access log line for {reason:?}"
    );
    let page = tb.agent(1).metrics()?;
    let flagged = [
        ("reporter", "destination"),
        ("response_flags", "DENY"),
        ("source_principal", &id("shop", "client") as &str),
    ];
    assert_eq!(
        series_sum(&page, "istio_tcp_connections_closed_total", &flagged)?,
        1.0,
        "{page}"
    );
    // What the client's agent was told: a hand-held HBONE client with the
    // client's identity (signed by the same root) gets the 401.
    let ca_dir = tb.cluster().root().parent().expect("the CA's directory");
    let probe = tb.run_app(
        &outsider,
        &[
            "hbone",
            &SocketAddr::new(server.ip4, 15008).to_string(),
            &SocketAddr::new(server.ip4, APP_PORT).to_string(),
            &format!("ca={}", ca_dir.display()),
            &format!("id={}", id("shop", "client")),
        ],
    )?;
    assert_eq!(probe["status"], 401, "{probe}");

    // Deleted through the API: allowed again.
    assert!(tb.cluster().delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "shop",
        "no-client"
    ));
    wait_dump(&tb, 1, |d| !d.contains("no-client"))?;
    connect_ok(&tb, &client, &server)?;
    Ok(())
}
