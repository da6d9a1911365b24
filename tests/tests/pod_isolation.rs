//! One pod cannot take another pod's place: a pod that adds a neighbour's
//! address to its own interfaces (it only needs NET_ADMIN in its own
//! namespace) still speaks with its own identity, and releasing it leaves
//! the neighbour's inbound capture in place, whether the agent enrolled it
//! from its Pod object or by hand.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    Pod, Testbed, Value, delivered_by_agent, ip_of,
    mesh::{namespace_yaml, pod_yaml, with_netns},
    metrics::series_sum_or_absent,
    sh,
};

const APP_PORT: u16 = 8080;
const TD: &str = "spiffe://cluster.local";

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

/// Puts `ip` on the loopback interface of `pod`, as a pod with NET_ADMIN
/// in its own namespace can. The pod does not answer ARP for it
/// (`arp_ignore=1`), so the neighbour keeps receiving its own traffic and
/// the test stays deterministic; the agent still sees the address.
fn steal_address(pod: &Pod, ip: IpAddr) -> anyhow::Result<()> {
    let prefix = if ip.is_ipv4() { "32" } else { "128" };
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &pod.netns,
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.arp_ignore=1",
        ],
    )?;
    sh(
        "ip",
        &[
            "-n",
            &pod.netns,
            "addr",
            "add",
            &format!("{ip}/{prefix}"),
            "dev",
            "lo",
        ],
    )?;
    Ok(())
}

/// Connections the destination's agent accepted over HBONE from `principal`.
/// Absent reads 0: bravo never calls.
fn opened_from(tb: &Testbed, node: usize, principal: &str) -> anyhow::Result<f64> {
    series_sum_or_absent(
        &tb.agent(node).metrics()?,
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination"), ("source_principal", principal)],
    )
}

/// A plaintext call to `dst` from `client` lands on the agent's inbound
/// listener of `dst`'s pod (the app's socket carries the agent's mark, and
/// its peer is the client's address), and the agent counts it.
fn assert_captured_inbound(
    tb: &Testbed,
    client: &Pod,
    dst: SocketAddr,
    forwarded_before: f64,
    when: &str,
) -> anyhow::Result<f64> {
    let r = tb.connect(client, dst, 1000)?;
    assert!(ok(&r), "{when}: {r}");
    assert!(
        delivered_by_agent(&r),
        "{when}: the call reached the app through the agent: {r}"
    );
    assert_eq!(
        ip_of(r["server_peer"].as_str().unwrap_or_default()),
        client.ip4.to_string(),
        "{when}: from the client's address: {r}"
    );
    let forwarded = tb.agent(0).metric(
        r#"mesh_proxy_connections_total{direction="inbound_plaintext",result="forwarded"}"#,
    )?;
    assert_eq!(forwarded, forwarded_before + 1.0, "{when}: counted");
    Ok(forwarded)
}

#[test]
fn a_pod_with_a_neighbours_address_keeps_its_identity_and_cannot_release_the_neighbours_capture()
-> anyhow::Result<()> {
    let mut tb = Testbed::new(2)?;
    let alpha = tb.add_pod(0, "alpha")?;
    let bravo = tb.add_pod(0, "bravo")?;
    let outsider = tb.add_pod(0, "outsider")?;
    let sink = tb.add_pod(1, "sink")?;
    for p in [&bravo, &sink] {
        tb.serve(p, sa(IpAddr::from([0u8; 16]), APP_PORT))?;
    }
    // Before enrolment: bravo's IPv4 address.
    steal_address(&alpha, bravo.ip4)?;
    let docs = |alpha_labels: &[(&str, &str)]| {
        vec![
            namespace_yaml("shop", true),
            namespace_yaml("legacy", false),
            with_netns(&pod_yaml(&alpha, 0, "shop", "alpha", alpha_labels), &alpha),
            with_netns(&pod_yaml(&bravo, 0, "shop", "bravo", &[]), &bravo),
            pod_yaml(&outsider, 0, "legacy", "outsider", &[]),
            with_netns(&pod_yaml(&sink, 1, "shop", "sink", &[]), &sink),
        ]
    };
    tb.write_config(&docs(&[]))?;
    let args = tb.mesh_args()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    for node in 0..2 {
        tb.start_agent(node, &argv)?;
    }
    converge("alpha, bravo and sink enrolled by their labels", || {
        Ok(tb.agent(0).pod_names()? == ["shop/alpha", "shop/bravo"]
            && tb.agent(1).pod_names()? == ["shop/sink"])
    })?;
    // After enrolment: bravo's IPv6 address too.
    steal_address(&alpha, bravo.ip6)?;

    let alpha_id = format!("{TD}/ns/shop/sa/alpha");
    let bravo_id = format!("{TD}/ns/shop/sa/bravo");
    for dst in [sa(sink.ip4, APP_PORT), sa(sink.ip6, APP_PORT)] {
        let r = tb.connect(&alpha, dst, 1000)?;
        assert!(ok(&r), "alpha -> sink {dst}: {r}");
    }
    assert_eq!(
        (
            opened_from(&tb, 1, &alpha_id)?,
            opened_from(&tb, 1, &bravo_id)?
        ),
        (2.0, 0.0),
        "the sink's agent saw alpha's identity on both calls, never bravo's:\n{}",
        tb.agent(1).metrics()?
    );

    let dst = sa(bravo.ip4, APP_PORT);
    let mut forwarded = assert_captured_inbound(&tb, &outsider, dst, 0.0, "bravo captured")?;

    // alpha leaves the mesh: its release must not touch bravo's capture.
    tb.write_config(&docs(&[("istio.io/dataplane-mode", "none")]))?;
    converge("alpha released", || {
        Ok(tb.agent(0).pod_names()? == ["shop/bravo"])
    })?;
    forwarded = assert_captured_inbound(&tb, &outsider, dst, forwarded, "after alpha's release")?;

    // Enrolled by hand (no Pod object), alpha's addresses come from its
    // namespace, but bravo's stay bravo's.
    let info = tb.agent(0).enroll(&alpha)?;
    let addresses: Vec<&str> = info["addresses"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        addresses.contains(&alpha.ip4.to_string().as_str())
            && !addresses.contains(&bravo.ip4.to_string().as_str())
            && !addresses.contains(&bravo.ip6.to_string().as_str()),
        "a hand-enrolled pod does not claim an address another pod owns: {info}"
    );
    let r = tb.connect(&alpha, sa(sink.ip4, APP_PORT), 1000)?;
    assert!(ok(&r), "hand-enrolled alpha -> sink: {r}");
    assert_eq!(opened_from(&tb, 1, &alpha_id)?, 3.0, "still alpha");
    assert_eq!(opened_from(&tb, 1, &bravo_id)?, 0.0, "never bravo");
    tb.agent(0).unenroll(&alpha)?;
    assert_captured_inbound(&tb, &outsider, dst, forwarded, "after alpha's hand release")?;
    Ok(())
}
