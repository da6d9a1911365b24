//! The agent fails closed where it used to fail open: a restarted agent
//! whose configuration cannot be read keeps its pods captured, reports not
//! ready, and sends nothing in plaintext (a call made meanwhile waits for
//! the configuration, bounded, and then goes over HBONE); a fresh agent is
//! not ready until its configuration reads whole; an app on a port the
//! node agent uses on the host (15020) is meshed like any other.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_tests::{
    Testbed, Value, delivered_by_agent, ip_of,
    mesh::{namespace_yaml, pod_yaml, with_netns},
    metrics::{series_sum, series_sum_or_absent},
};

const APP_PORT: u16 = 8080;

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn ok(r: &Value) -> bool {
    r["ok"] == Value::Bool(true)
}

/// Polls until `done`, for at most 10 s.
fn converge(what: &str, done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    mesh_tests::converge(what, Duration::from_secs(10), done).map(drop)
}

#[test]
fn an_agent_restarted_without_its_configuration_keeps_pods_captured_and_sends_no_plaintext()
-> anyhow::Result<()> {
    let mut tb = Testbed::new(2)?;
    let client = tb.add_pod(0, "client")?;
    let server = tb.add_pod(1, "server")?;
    tb.serve(&server, sa(IpAddr::from([0u8; 16]), APP_PORT))?;
    let docs = vec![
        namespace_yaml("shop", true),
        with_netns(&pod_yaml(&client, 0, "shop", "client", &[]), &client),
        with_netns(&pod_yaml(&server, 1, "shop", "server", &[]), &server),
    ];
    tb.write_config(&docs)?;
    let args = tb.mesh_args()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    for node in 0..2 {
        tb.start_agent(node, &argv)?;
    }
    converge("both pods enrolled by their labels", || {
        Ok(tb.agent(0).pod_names()? == ["shop/client"]
            && tb.agent(1).pod_names()? == ["shop/server"])
    })?;
    let dst = sa(server.ip4, APP_PORT);
    let over_hbone = |tb: &Testbed| -> anyhow::Result<f64> {
        series_sum(
            &tb.agent(1).metrics()?,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    let plaintext_in = |tb: &Testbed| -> anyhow::Result<f64> {
        series_sum_or_absent(
            &tb.agent(1).metrics()?,
            "mesh_proxy_connections_total",
            &[("direction", "inbound_plaintext")],
        )
    };
    let r = tb.connect(&client, dst, 1000)?;
    assert!(ok(&r), "{r}");
    assert_eq!(over_hbone(&tb)?, 1.0);

    // The client's agent restarts, and its configuration cannot be read.
    tb.kill_agent(0)?;
    let later = tb.workdir().join("config-node0.yaml");
    let mut args0 = args.clone();
    let at = args0
        .iter()
        .position(|a| a == "--config")
        .expect("--config")
        + 1;
    args0[at] = later.display().to_string();
    let argv0: Vec<&str> = args0.iter().map(String::as_str).collect();
    tb.start_agent_unready(0, &argv0)?;
    // Once it has tried to read the configuration and failed, it says so
    // and stays not ready.
    converge("the failed read logged", || {
        Ok(tb
            .agent(0)
            .log_text()
            .contains("cannot read the configuration: not loaded yet"))
    })?;
    let (status, body) = tb.agent(0).http("GET", "/healthz/ready", None)?;
    assert_eq!(
        (status, body.trim()),
        (503, "configuration not loaded yet"),
        "an agent without its configuration is not ready"
    );
    assert_eq!(
        tb.agent(0).pod_names()?,
        ["shop/client"],
        "the restored pod stays captured"
    );

    // A call now waits for the configuration, then is refused: nothing
    // reached the server, in plaintext or otherwise.
    let started = Instant::now();
    let r = tb.connect(&client, dst, 1000)?;
    assert!(!ok(&r), "{r}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "refused after a bounded wait, not at once: {:?}",
        started.elapsed()
    );
    tb.agent(0).wait_metric(
        "mesh_proxy_connections_total{direction=\"outbound\",result=\"not_synced\"}",
        1.0,
    )?;
    assert_eq!(plaintext_in(&tb)?, 0.0, "no plaintext reached the server");
    assert_eq!(over_hbone(&tb)?, 1.0);
    let log = tb.agent(0).log_text();
    assert!(
        log.contains("cannot read the configuration: not loaded yet")
            && log.contains("configuration not synced"),
        "{log}"
    );

    // A call waiting when the configuration appears goes on, over HBONE.
    let redirected = tb.agent(0).capture_counter("outbound_redirected")?;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let call = s.spawn(|| tb.connect(&client, dst, 1000));
        // The call has reached the agent (the kernel sent it to 15001).
        converge("the call captured", || {
            Ok(tb.agent(0).capture_counter("outbound_redirected")? > redirected)
        })?;
        std::fs::write(&later, docs.join("---\n"))?;
        let r = call.join().expect("connect thread")?;
        assert!(ok(&r), "{r}");
        Ok(())
    })?;
    assert_eq!(over_hbone(&tb)?, 2.0, "the waiting call went over HBONE");
    assert_eq!(plaintext_in(&tb)?, 0.0);
    assert_eq!(tb.agent(0).http("GET", "/healthz/ready", None)?.0, 200);
    assert_eq!(tb.agent(0).pod_names()?, ["shop/client"]);
    Ok(())
}

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: shop
spec:
  mtls:
    mode: STRICT
";

/// Only the agent's in-pod listeners are exempt from capture: an app on
/// 15020 in an enrolled pod is reached over HBONE by meshed callers and
/// refused in plaintext under STRICT, like any app port.
#[test]
fn an_app_on_port_15020_is_meshed_and_held_to_strict() -> anyhow::Result<()> {
    const PORT: u16 = 15020;
    let mut tb = Testbed::new(2)?;
    let client = tb.add_pod(0, "client")?;
    let outsider = tb.add_pod(0, "outsider")?;
    let server = tb.add_pod(1, "server")?;
    tb.serve(&server, sa(IpAddr::from([0u8; 16]), PORT))?;
    tb.write_config(&[
        namespace_yaml("shop", true),
        namespace_yaml("legacy", false),
        with_netns(&pod_yaml(&client, 0, "shop", "client", &[]), &client),
        pod_yaml(&outsider, 0, "legacy", "outsider", &[]),
        with_netns(&pod_yaml(&server, 1, "shop", "server", &[]), &server),
        STRICT.to_owned(),
    ])?;
    let args = tb.mesh_args()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    for node in 0..2 {
        tb.start_agent(node, &argv)?;
    }
    converge("both pods enrolled by their labels", || {
        Ok(tb.agent(0).pod_names()? == ["shop/client"]
            && tb.agent(1).pod_names()? == ["shop/server"])
    })?;
    let dst = sa(server.ip4, PORT);

    let r = tb.connect(&client, dst, 1000)?;
    assert!(ok(&r), "meshed caller: {r}");
    let page = tb.agent(1).metrics()?;
    assert_eq!(
        series_sum(
            &page,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )?,
        1.0,
        "{page}"
    );

    let r = tb.connect(&outsider, dst, 1000)?;
    assert!(!ok(&r), "plaintext under STRICT: {r}");
    tb.agent(1).wait_metric(
        "mesh_proxy_connections_total{direction=\"inbound_plaintext\",result=\"denied\"}",
        1.0,
    )?;
    converge("the STRICT refusal logged with its reason", || {
        Ok(tb.agent(1).log_text().lines().any(|l| {
            l.contains("connection complete")
                && l.contains("PeerAuthentication STRICT: plaintext is refused")
                && l.contains(&outsider.ip4.to_string())
        }))
    })?;
    Ok(())
}

/// The kubelet's probes (plaintext from the node itself) reach a pod under
/// STRICT, as istio-cni arranges it: the node SNATs its own connections to
/// enrolled pods to 169.254.7.127 (IPv6: fd16:9254:7127:1337:ffff:ffff:ffff:ffff),
/// which capture in the pod leaves to the app. Plaintext from a pod is
/// still refused, and with `--no-probe-snat` the node's own connection is
/// refused too. Both capture modes.
#[test]
fn the_nodes_probes_reach_a_pod_under_strict_and_nothing_else_does() -> anyhow::Result<()> {
    for mode in ["ebpf", "iptables"] {
        probes_under_strict(mode).with_context(|| format!("--capture {mode}"))?;
    }
    Ok(())
}

fn probes_under_strict(mode: &str) -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let outsider = tb.add_pod(0, "outsider")?;
    let server = tb.add_pod(0, "server")?;
    tb.serve(&server, sa(IpAddr::from([0u8; 16]), APP_PORT))?;
    tb.write_config(&[
        namespace_yaml("shop", true),
        namespace_yaml("legacy", false),
        pod_yaml(&outsider, 0, "legacy", "outsider", &[]),
        with_netns(&pod_yaml(&server, 0, "shop", "server", &[]), &server),
        STRICT.to_owned(),
    ])?;
    let args = tb.mesh_args()?;
    let mut argv: Vec<&str> = args.iter().map(String::as_str).collect();
    argv.extend(["--capture", mode]);
    tb.start_agent(0, &argv)?;
    converge("the server enrolled", || {
        Ok(tb.agent(0).pod_names()? == ["shop/server"])
    })?;
    converge("the node's probe SNAT covers the server", || {
        let (_, body) = tb.agent(0).http("GET", "/capture", None)?;
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["probe_snat"]["addresses"].as_u64() >= Some(2))
    })?;
    for (dst, source) in [
        (sa(server.ip4, APP_PORT), "169.254.7.127"),
        (
            sa(server.ip6, APP_PORT),
            "fd16:9254:7127:1337:ffff:ffff:ffff:ffff",
        ),
    ] {
        let r = tb.connect_from_node(0, dst, 1000)?;
        assert!(ok(&r), "the node's probe of {dst}: {r}");
        assert_eq!(
            ip_of(r["server_peer"].as_str().unwrap_or_default()),
            source,
            "{r}"
        );
        // The app answered it itself, not through the agent.
        assert!(!delivered_by_agent(&r), "{r}");
    }
    if mode == "ebpf" {
        assert!(tb.agent(0).capture_counter("inbound_probe")? >= 2.0);
    }
    // A pod's plaintext is refused as before, for STRICT's reason.
    let r = tb.connect(&outsider, sa(server.ip4, APP_PORT), 1000)?;
    assert!(!ok(&r), "plaintext from a pod under STRICT: {r}");
    tb.agent(0).wait_metric(
        "mesh_proxy_connections_total{direction=\"inbound_plaintext\",result=\"denied\"}",
        1.0,
    )?;

    // Turned off (and what the first agent left removed), the node's own
    // connection is plaintext like any other, and refused.
    tb.kill_agent(0)?;
    argv.push("--no-probe-snat");
    tb.start_agent(0, &argv)?;
    converge("the server enrolled again", || {
        Ok(tb.agent(0).pod_names()? == ["shop/server"])
    })?;
    let r = tb.connect_from_node(0, sa(server.ip4, APP_PORT), 1000)?;
    assert!(!ok(&r), "the node's connection without probe SNAT: {r}");
    tb.agent(0).wait_metric(
        "mesh_proxy_connections_total{direction=\"inbound_plaintext\",result=\"denied\"}",
        1.0,
    )?;
    Ok(())
}

/// With a configuration, a pod it does not list has no identity. Enrolled
/// by hand, its calls to a meshed pod are refused (`NR`), never sent in
/// plaintext, while its calls outside the mesh go on as plain TCP; and
/// plaintext into it is refused, since mesh-wide policy could apply to it.
#[test]
fn a_pod_the_configuration_does_not_list_is_refused_both_ways() -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let stray = tb.add_pod(0, "stray")?;
    let server = tb.add_pod(0, "server")?;
    let legacy = tb.add_pod(0, "legacy")?;
    for p in [&stray, &server, &legacy] {
        tb.serve(p, sa(IpAddr::from([0u8; 16]), APP_PORT))?;
    }
    tb.write_config(&[
        namespace_yaml("shop", true),
        namespace_yaml("legacy", false),
        with_netns(&pod_yaml(&server, 0, "shop", "server", &[]), &server),
        pod_yaml(&legacy, 0, "legacy", "legacy", &[]),
    ])?;
    let args = tb.mesh_args()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_agent(0, &argv)?;
    converge("the server enrolled by its label", || {
        Ok(tb.agent(0).pod_names()? == ["shop/server"])
    })?;
    tb.agent(0).enroll(&stray)?;
    let a = tb.agent(0);
    let counted = |direction: &str, result: &str| {
        format!("mesh_proxy_connections_total{{direction=\"{direction}\",result=\"{result}\"}}")
    };

    // Out of the unlisted pod: to a meshed pod, refused for want of an
    // identity; nothing reached the server, over HBONE or in plaintext.
    let r = tb.connect(&stray, sa(server.ip4, APP_PORT), 1000)?;
    assert!(!ok(&r), "an unlisted pod reached a meshed one: {r}");
    a.wait_metric(&counted("outbound", "no_identity"), 1.0)?;
    // As ztunnel refuses a workload it does not know: a WARN access log
    // line, and no istio_tcp_* series.
    let page = a.metrics()?;
    assert_eq!(
        series_sum_or_absent(
            &page,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_workload", "server")],
        )?,
        0.0,
        "{page}"
    );
    converge("the refusal logged as a failed connection", || {
        Ok(a.log_text().lines().any(|l| {
            l.contains("WARN")
                && l.contains("connection failed")
                && l.contains(&format!("dst.addr={}:{APP_PORT}", server.ip4))
                && l.contains("not in the configuration")
        }))
    })?;
    for direction in ["hbone", "inbound_plaintext"] {
        assert_eq!(
            a.metric_or_absent(&counted(direction, "forwarded"))?,
            0.0,
            "{direction}"
        );
    }
    // To a pod outside the mesh: plain TCP, from the pod's own address.
    let r = tb.connect(&stray, sa(legacy.ip4, APP_PORT), 1000)?;
    assert!(ok(&r), "{r}");
    assert!(
        r["peer"].as_str().is_some_and(|p| p.ends_with(":15001")),
        "captured: {r}"
    );
    assert_eq!(
        mesh_tests::ip_of(r["server_peer"].as_str().unwrap_or_default()),
        stray.ip4.to_string(),
        "{r}"
    );

    // Plaintext in: into the listed meshed pod, let in (PERMISSIVE); into
    // the unlisted one, refused with the reason.
    let r = tb.connect(&legacy, sa(server.ip4, APP_PORT), 1000)?;
    assert!(ok(&r), "{r}");
    let r = tb.connect(&legacy, sa(stray.ip4, APP_PORT), 1000)?;
    assert!(!ok(&r), "plaintext into an unlisted pod: {r}");
    a.wait_metric(&counted("inbound_plaintext", "denied"), 1.0)?;
    converge("the refusal logged with its reason", || {
        Ok(a.log_text().lines().any(|l| {
            l.contains("connection complete")
                && l.contains("this pod is not in the configuration; plaintext refused")
        }))
    })?;
    assert_eq!(a.metric(&counted("inbound_plaintext", "forwarded"))?, 1.0);
    Ok(())
}

/// A fresh agent whose configuration has never been read whole (here a
/// directory with a file holding a YAML syntax error) answers 503 on
/// `/healthz/ready` and enrols nothing; once the file reads, it is ready
/// and enrols the pod the configuration puts in the mesh.
#[test]
fn a_fresh_agent_is_not_ready_until_its_configuration_is_read() -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let app = tb.add_pod(0, "app")?;
    let dir = tb.workdir().join("config.d");
    std::fs::create_dir_all(&dir)?;
    let docs = [
        namespace_yaml("shop", true),
        with_netns(&pod_yaml(&app, 0, "shop", "app", &[]), &app),
    ]
    .join("---\n");
    let file = dir.join("shop.yaml");
    std::fs::write(&file, format!("{docs}---\nkind: [Service\n"))?;
    let mut args = tb.mesh_args()?;
    let at = args.iter().position(|a| a == "--config").expect("--config") + 1;
    args[at] = dir.display().to_string();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_agent_unready(0, &argv)?;
    let agent = tb.agent(0);
    converge("the unreadable file reported", || {
        Ok(agent.log_text().contains("configuration not loaded yet")
            && agent.log_text().contains("not read whole"))
    })?;
    let (status, body) = agent.http("GET", "/healthz/ready", None)?;
    assert_eq!(
        (status, body.trim()),
        (503, "configuration not loaded yet"),
        "a fresh agent that has not read its configuration is not ready"
    );
    assert!(agent.pod_names()?.is_empty(), "enrolled before the read");

    std::fs::write(&file, &docs)?;
    converge("ready once the file reads", || {
        Ok(agent.http("GET", "/healthz/ready", None)?.0 == 200)
    })?;
    converge("the pod enrolled by its labels", || {
        Ok(agent.pod_names()? == ["shop/app"])
    })?;
    Ok(())
}
