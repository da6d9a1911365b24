//! Node agents as they run in a cluster, as the binary: `--kubernetes`
//! against the API stand-in served on the fabric, certificates from a
//! `mesh-agent ca` process through `--ca-address`. Pods are Pod objects in
//! the API, found from their UID (the kubelet's cgroup naming), enrolled
//! when their namespace is labelled ambient and marked with istio-cni's
//! redirection annotation once captured; policy is created and deleted
//! through the API.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Context as _;
use mesh_tests::{
    Pod, Testbed, Value, converge, delivered_by_agent, ip_of,
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

/// The annotation istio-cni (and the agents) set on a captured pod.
const REDIRECTION: &str = "ambient.istio.io/redirection";

/// The redirection annotation of Pod `shop/name` in the API.
fn redirection(tb: &Testbed, name: &str) -> Option<String> {
    let pod = tb.cluster().get("v1", "Pod", "shop", name)?;
    pod["metadata"]["annotations"][REDIRECTION]
        .as_str()
        .map(str::to_owned)
}

/// Whether node `node`'s agent sends HBONE to pod `shop/name` (its
/// configuration dump says so).
fn agent_sends_hbone(tb: &Testbed, node: usize, name: &str) -> anyhow::Result<bool> {
    let (_, dump) = tb.agent(node).http("GET", "/config_dump", None)?;
    let dump: Value = serde_json::from_str(&dump)?;
    let workloads = dump["config"]["workloads"].as_array().cloned();
    let workloads = workloads.context("no config.workloads in the dump")?;
    Ok(workloads
        .iter()
        .any(|w| w["namespace"] == "shop" && w["name"] == name && w["hbone"] == true))
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
    // In the ambient namespace, but with Istio's sidecar: never captured.
    let sidecar = tb.add_pod(1, "sidecar")?;
    // Labelled for the mesh, but its Pod names a node without an agent: its
    // capture is never installed, so it never carries the annotation.
    let waiting = tb.add_pod(1, "waiting")?;
    // A process in each pod's cgroup, as a sandbox has: how an agent finds
    // the pod's namespace from its UID.
    for p in [&client, &server, &sidecar, &waiting] {
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
        with_uid(&pod_yaml(&waiting, 9, "shop", "waiting", &[]), &waiting),
        with_uid(&pod_yaml(&sidecar, 1, "shop", "sidecar", &[]), &sidecar).replacen(
            "metadata:\n",
            "metadata:\n  annotations:\n    sidecar.istio.io/status: '{\"containers\":[\"istio-proxy\"]}'\n",
            1,
        ),
    ];
    tb.cluster().apply_yaml(&objects.join("---\n"))?;
    for node in 0..2 {
        tb.start_cluster_agent(node, &[])?;
    }
    wait_enrolled(&tb, 0, "shop/client")?;
    wait_enrolled(&tb, 1, "shop/server")?;
    // Captured, so marked as istio-cni marks them; the client's agent then
    // reaches the server over HBONE.
    converge(
        "the agents annotated their pods",
        Duration::from_secs(10),
        || {
            Ok(redirection(&tb, "client").as_deref() == Some("enabled")
                && redirection(&tb, "server").as_deref() == Some("enabled"))
        },
    )?;
    converge(
        "the client's agent read the server's annotation",
        Duration::from_secs(10),
        || agent_sends_hbone(&tb, 0, "server"),
    )?;
    // The sidecar pod: neither enrolled nor pending, nor annotated, and
    // reached in plain TCP.
    assert!(
        !tb.agent(1).pod_names()?.iter().any(|n| n == "shop/sidecar"),
        "a sidecar pod enrolled"
    );
    assert!(
        !tb.agent(1).log_text().contains("pod=shop/sidecar"),
        "the sidecar pod was considered for enrolment"
    );
    assert_eq!(redirection(&tb, "sidecar"), None);

    // The agents hold certificates the cluster CA signed for their pods.
    let root_serial = {
        let pem = std::fs::read_to_string(tb.cluster().root())?;
        mesh_tests::probe::serial_of_pem(&pem)?
    };
    for (node, sa) in [(0, "client"), (1, "server")] {
        let (_, dump) = tb.agent(node).http("GET", "/config_dump", None)?;
        let dump: Value = serde_json::from_str(&dump)?;
        let certs = dump["certificate_summary"]
            .as_array()
            .cloned()
            .unwrap_or_default();
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

    // A destination without the annotation gets plain TCP: the sidecar pod,
    // a labelled pod whose capture is not installed (HBONE to it would find
    // nothing on 15008), and the server once released (it opts out), its
    // annotation removed.
    let plain = |tb: &Testbed, to: &Pod| -> anyhow::Result<()> {
        let forwarded = hbone_counts(tb)?.0;
        let r = connect_ok(tb, &client, to)?;
        assert!(
            !delivered_by_agent(&r),
            "{} reached over HBONE: {r}",
            to.name
        );
        assert_eq!(hbone_counts(tb)?.0, forwarded, "to {}", to.name);
        Ok(())
    };
    plain(&tb, &sidecar)?;
    assert_eq!(redirection(&tb, "waiting"), None);
    plain(&tb, &waiting)?;
    let opted_out = [("app", "echo"), ("istio.io/dataplane-mode", "none")];
    tb.cluster().apply_yaml(&with_uid(
        &pod_yaml(&server, 1, "shop", "server", &opted_out),
        &server,
    ))?;
    converge(
        "the server released and unmarked",
        Duration::from_secs(10),
        || {
            Ok(!tb.agent(1).pod_names()?.iter().any(|n| n == "shop/server")
                && redirection(&tb, "server").is_none())
        },
    )?;
    converge(
        "the client's agent read the removal",
        Duration::from_secs(10),
        || Ok(!agent_sends_hbone(&tb, 0, "server")?),
    )?;
    plain(&tb, &server)?;
    Ok(())
}
