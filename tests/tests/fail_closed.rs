//! The agent fails closed where it used to fail open: a restarted agent
//! whose configuration cannot be read keeps its pods captured, reports not
//! ready, and sends nothing in plaintext (a call made meanwhile waits for
//! the configuration, bounded, and then goes over HBONE); an app on a port
//! the node agent uses on the host (15020) is meshed like any other.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use mesh_tests::{
    Testbed, Value,
    mesh::{namespace_yaml, pod_yaml, series_sum, with_netns},
};

const APP_PORT: u16 = 8080;

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn ok(r: &Value) -> bool {
    r["ok"] == Value::Bool(true)
}

/// Polls until `done`, for at most 10 s.
fn converge(what: &str, mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done()? {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "not converged after 10 s: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
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
        Ok(series_sum(
            &tb.agent(1).metrics()?,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "mutual_tls"),
            ],
        ))
    };
    let plaintext_in = |tb: &Testbed| -> anyhow::Result<f64> {
        Ok(series_sum(
            &tb.agent(1).metrics()?,
            "mesh_proxy_connections_total",
            &[("direction", "inbound_plaintext")],
        ))
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
    std::thread::sleep(Duration::from_secs(1));
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
    converge("the refusal is counted", || {
        Ok(tb
            .agent(0)
            .metric("mesh_proxy_connections_total{direction=\"outbound\",result=\"not_synced\"}")?
            == 1.0)
    })?;
    assert_eq!(plaintext_in(&tb)?, 0.0, "no plaintext reached the server");
    assert_eq!(over_hbone(&tb)?, 1.0);
    let log = tb.agent(0).log_text();
    assert!(
        log.contains("cannot read the configuration: not loaded yet")
            && log.contains("configuration not synced"),
        "{log}"
    );

    // A call waiting when the configuration appears goes on, over HBONE.
    std::thread::scope(|s| -> anyhow::Result<()> {
        let call = s.spawn(|| tb.connect(&client, dst, 1000));
        std::thread::sleep(Duration::from_secs(2));
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
        ),
        1.0,
        "{page}"
    );

    let r = tb.connect(&outsider, dst, 1000)?;
    assert!(!ok(&r), "plaintext under STRICT: {r}");
    assert_eq!(
        tb.agent(1).metric(
            "mesh_proxy_connections_total{direction=\"inbound_plaintext\",result=\"denied\"}"
        )?,
        1.0
    );
    Ok(())
}
