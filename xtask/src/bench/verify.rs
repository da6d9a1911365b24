//! What makes a run's figures count: the load tool saw no failed request
//! where none may fail, and a mesh path's traffic went through the agents
//! over HBONE, its destination seeing the client's identity (a path that
//! quietly went direct, or in plaintext, would measure the wrong thing).

use anyhow::ensure;
use mesh_tests::{Testbed, Value, metrics::series_sum};

use super::paths::Path;

/// The benchmark's pods' identities (namespace `bench`).
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
pub const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/bench/sa/waypoint";

/// Fails when the load tool's output `r` counts a failed request.
pub fn no_failures(r: &Value, what: &str) -> anyhow::Result<()> {
    ensure!(
        r["errors"].as_u64() == Some(0),
        "{what}: {} failed request(s) (first: {}); the figures would not be of the path",
        r["errors"],
        r["first_error"]
    );
    Ok(())
}

/// Connections the client's agent opened over mutual TLS for the client.
pub fn mtls_opened_for_client(tb: &Testbed) -> anyhow::Result<f64> {
    opened_for_client(tb, Path::MeshEbpf)
}

/// Connections the client's agent opened for the client the way `path`
/// carries them (mutual TLS, or the same-node shortcut).
pub fn opened_for_client(tb: &Testbed, path: Path) -> anyhow::Result<f64> {
    series_sum(
        &tb.agent(0).metrics()?,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_principal", CLIENT_ID),
            ("connection_security_policy", path.security()),
        ],
    )
}

/// After `conns` connections from the client to the server on its node
/// with `--same-node-plaintext`: the agent admitted each to the server
/// with the client's identity through its shortcut, and took no HBONE.
pub fn carried_same_node(tb: &Testbed, conns: usize) -> anyhow::Result<()> {
    let conns = conns as f64;
    let agent = tb.agent(0);
    let local = agent
        .metric(r#"mesh_proxy_connections_total{direction="same_node",result="forwarded"}"#)?;
    ensure!(
        local >= conns,
        "the agent took its same-node shortcut {local} times, not for the {conns} connections made"
    );
    let hbone = agent.metric_or_absent(
        r#"mesh_proxy_connections_total{direction="hbone",result="forwarded"}"#,
    )?;
    ensure!(hbone == 0.0, "{hbone} connections went over HBONE");
    let seen = series_sum(
        &agent.metrics()?,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", CLIENT_ID),
            ("destination_principal", SERVER_ID),
            ("connection_security_policy", "same_node"),
        ],
    )?;
    ensure!(
        seen >= conns,
        "the server's side saw {seen} same-node connections from the client, not {conns}"
    );
    Ok(())
}

/// After `conns` connections from the client (node 0) to the server (on
/// `server_node`) over `path`: each went out through the client's agent
/// over mutual TLS, and the server's agent took HBONE from the client's
/// identity (from the waypoint's, on the waypoint path, whose own check of
/// the client's identity is made when it starts).
pub fn carried_over_hbone(
    tb: &Testbed,
    path: Path,
    server_node: usize,
    conns: usize,
) -> anyhow::Result<()> {
    let conns = conns as f64;
    let out = tb
        .agent(0)
        .metric(r#"mesh_proxy_connections_total{direction="outbound",result="forwarded"}"#)?;
    ensure!(
        out >= conns,
        "the client's agent forwarded {out} connections, not the {conns} made"
    );
    let mtls = mtls_opened_for_client(tb)?;
    ensure!(
        mtls >= conns,
        "the client's agent opened {mtls} mutual TLS connections, not the {conns} made"
    );
    let hbone = tb
        .agent(server_node)
        .metric(r#"mesh_proxy_connections_total{direction="hbone",result="forwarded"}"#)?;
    ensure!(hbone >= 1.0, "the server's agent took no HBONE connection");
    let caller = if path == Path::MeshWaypoint {
        WAYPOINT_ID
    } else {
        CLIENT_ID
    };
    let page = tb.agent(server_node).metrics()?;
    let seen = series_sum(
        &page,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", caller),
            ("destination_principal", SERVER_ID),
            ("connection_security_policy", "mutual_tls"),
        ],
    )?;
    // Straight from the client, each of its connections is a tunnel; the
    // waypoint pools its own upstream.
    let want = if path == Path::MeshWaypoint {
        1.0
    } else {
        conns
    };
    ensure!(
        seen >= want,
        "the server's agent saw {seen} mutual TLS connections from {caller}, not {want}"
    );
    Ok(())
}
