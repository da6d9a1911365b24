//! Kernel capture, end to end: real eBPF programs, real namespaces, the real
//! agent binary. Each test builds its own testbed and removes it afterwards.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::Context as _;
use mesh_tests::{Pod, Testbed, Value, delivered_by_agent, ip_of, port_of};

const APP_PORT: u16 = 8080;
const OUTBOUND: &str = "15001";

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

fn assert_intact(r: &Value, what: &str) {
    assert_eq!(r["ok"], Value::Bool(true), "{what}: {r}");
}

#[test]
fn outbound_is_captured_and_reaches_the_original_destination() -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let client = tb.add_pod(0, "default/client")?;
    let server = tb.add_pod(0, "plain/server")?;
    tb.serve(&server, sa(server.ip4, APP_PORT))?;
    tb.serve(&server, sa(server.ip6, APP_PORT))?;
    tb.start_agent(0, &[])?;
    tb.agent(0).enroll(&client)?;

    let cases = [
        (sa(server.ip4, APP_PORT), server.ip4.to_string(), 1 << 20),
        (sa(server.ip6, APP_PORT), server.ip6.to_string(), 1 << 20),
        // A v4-mapped destination from an IPv6 socket goes through connect6.
        (
            format!("[::ffff:{}]:{APP_PORT}", server.ip4).parse()?,
            server.ip4.to_string(),
            100,
        ),
    ];
    for (i, (dst, want_server_ip, bytes)) in cases.iter().enumerate() {
        let r = tb.connect(&client, *dst, *bytes)?;
        assert_intact(&r, &format!("to {dst}"));
        // The client's socket is connected to the agent's 15001 listener...
        assert_eq!(
            port_of(&s(&r, "peer")),
            OUTBOUND,
            "client {dst} not redirected: {r}"
        );
        // ...and the server was reached at exactly the address dialed, from the
        // client pod's own address (the agent connects from inside the pod).
        assert_eq!(ip_of(&s(&r, "server_local")), *want_server_ip, "{r}");
        assert_eq!(port_of(&s(&r, "server_local")), APP_PORT.to_string(), "{r}");
        // The agent reaches an IPv4 destination (v4-mapped included) from the
        // client's IPv4 address, an IPv6 one from its IPv6 address.
        let client_ip = if want_server_ip.contains(':') {
            client.ip6
        } else {
            client.ip4
        };
        assert_eq!(ip_of(&s(&r, "server_peer")), client_ip.to_string(), "{r}");
        let forwarded = tb
            .agent(0)
            .metric(r#"mesh_proxy_connections_total{direction="outbound",result="forwarded"}"#)?;
        assert_eq!(
            forwarded,
            (i + 1) as f64,
            "one forwarded connection per client connection"
        );
    }
    // Every agent socket was left alone by the connect programs (no loop):
    // its connects are counted as skipped, exactly once per forwarded one.
    let a = tb.agent(0);
    assert_eq!(a.capture_counter("outbound_redirected")?, 3.0);
    assert_eq!(a.capture_counter("outbound_skipped")?, 3.0);
    assert_eq!(a.capture_counter("outbound_errors")?, 0.0);
    Ok(())
}

#[test]
fn inbound_is_captured_on_15006_and_delivered_to_the_app() -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let client = tb.add_pod(0, "plain/client")?;
    let server = tb.add_pod(0, "default/server")?;
    tb.serve(&server, sa(IpAddr::from([0u8; 16]), APP_PORT))?;
    tb.start_agent(0, &[])?;
    tb.agent(0).enroll(&server)?;

    let r = tb.connect(&client, sa(server.ip4, APP_PORT), 1 << 20)?;
    assert_intact(&r, "v4 inbound");
    // Not captured on the client side (not enrolled)...
    assert_eq!(s(&r, "peer"), sa(server.ip4, APP_PORT).to_string());
    // ...but delivered by the agent, to the original address and from the
    // client's own address (the app sees who calls, not a loopback peer).
    assert!(delivered_by_agent(&r), "{r}");
    assert_eq!(ip_of(&s(&r, "server_peer")), client.ip4.to_string(), "{r}");
    assert_eq!(
        s(&r, "server_local"),
        format!("[::ffff:{}]:{APP_PORT}", server.ip4),
        "{r}"
    );

    let r = tb.connect(&client, sa(server.ip6, APP_PORT), 1000)?;
    assert_intact(&r, "v6 inbound");
    assert!(delivered_by_agent(&r), "{r}");
    assert_eq!(ip_of(&s(&r, "server_peer")), client.ip6.to_string(), "{r}");
    assert_eq!(
        s(&r, "server_local"),
        sa(server.ip6, APP_PORT).to_string(),
        "{r}"
    );

    let a = tb.agent(0);
    assert_eq!(
        a.metric(
            r#"mesh_proxy_connections_total{direction="inbound_plaintext",result="forwarded"}"#
        )?,
        2.0
    );
    assert_eq!(a.capture_counter("inbound_assigned")?, 2.0);

    // The agent's own two connections to the app were skipped, not looped.
    assert_eq!(a.capture_counter("inbound_skipped")?, 2.0);
    // No app on the port: the kernel's RST to the client's address comes
    // back to the agent at once (not out of the pod, which would leave the
    // agent to time out), and the client's connection is closed.
    let r = tb.connect(&client, sa(server.ip4, 9999), 10)?;
    assert_eq!(r["ok"], Value::Bool(false), "{r}");
    // Its record is written as the connection closes (the agent's connect
    // would give up after 10 s, so a refusal seen within 5 s is the RST).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !a
        .log_text()
        .contains("error=\"connect to app: Connection refused")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent saw no refusal from the app's port:\n{}",
            a.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// The link-local IPv6 address of a pod's `eth0`, scoped for a client on
/// the same bridge (`client`'s own `eth0` index).
fn link_local(pod: &Pod, client: &Pod) -> anyhow::Result<SocketAddr> {
    let show = |ns: &str, what: &[&str]| -> anyhow::Result<Value> {
        let mut args = vec!["-j", "-n", ns];
        args.extend_from_slice(what);
        Ok(serde_json::from_str(&mesh_tests::sh("ip", &args)?)?)
    };
    // Usable once duplicate address detection is over.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let ip: std::net::Ipv6Addr = loop {
        let addrs = show(
            &pod.netns,
            &["-6", "addr", "show", "dev", "eth0", "scope", "link"],
        )?;
        let usable = addrs[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["local"].is_string() && a["tentative"] != Value::Bool(true));
        if let Some(a) = usable {
            break a["local"].as_str().unwrap_or_default().parse()?;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the pod's eth0 has no usable link-local address: {addrs}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let link = show(&client.netns, &["link", "show", "dev", "eth0"])?;
    let ifindex = link[0]["ifindex"].as_u64().context("eth0's index")? as u32;
    Ok(SocketAddr::V6(std::net::SocketAddrV6::new(
        ip, APP_PORT, 0, ifindex,
    )))
}

/// No address of an enrolled pod reaches its app uncaptured: not its IPv6
/// link-local address, which is not one of the pod's, nor an address added
/// inside the pod after enrolment. With the eBPF programs such SYNs have no
/// listener to go to and are dropped (and counted); with iptables they are
/// redirected to the agent, which refuses them.
#[test]
fn addresses_an_enrolled_pod_was_not_enrolled_with_never_reach_its_app() -> anyhow::Result<()> {
    for mode in ["ebpf", "iptables"] {
        let mut tb = Testbed::new(1)?;
        let client = tb.add_pod(0, "plain/client")?;
        let server = tb.add_pod(0, "default/server")?;
        tb.serve(&server, sa(IpAddr::from([0u8; 16]), APP_PORT))?;
        tb.start_agent(0, &["--capture", mode])?;
        tb.agent(0).enroll(&server)?;
        let late: IpAddr = "10.1.0.200".parse()?;
        mesh_tests::sh(
            "ip",
            &[
                "-n",
                &server.netns,
                "addr",
                "add",
                "10.1.0.200/24",
                "dev",
                "eth0",
            ],
        )?;
        // The pod's own address is captured and delivered by the agent...
        let r = tb.connect(&client, sa(server.ip4, APP_PORT), 1000)?;
        assert_intact(&r, &format!("{mode}: to the pod's address"));
        assert!(delivered_by_agent(&r), "{mode}: {r}");
        // ...the others never reach the app.
        for dst in [sa(late, APP_PORT), link_local(&server, &client)?] {
            let r = tb.connect(&client, dst, 1000)?;
            assert_eq!(
                r["ok"],
                Value::Bool(false),
                "{mode}: {dst} reached the app: {r}"
            );
            assert!(
                r.get("server_peer").is_none(),
                "{mode}: {dst}: the app answered: {r}"
            );
        }
        let a = tb.agent(0);
        match mode {
            "ebpf" => assert!(
                a.capture_counter("inbound_unknown_address")? >= 2.0,
                "both SYNs dropped by sk_lookup, and counted"
            ),
            _ => assert_eq!(
                a.metric(
                    r#"mesh_proxy_connections_total{direction="inbound_plaintext",result="refused"}"#
                )?,
                2.0,
                "both redirected to the agent and refused"
            ),
        }
    }
    Ok(())
}

#[test]
fn unenrolled_pods_loopback_and_excluded_ports_are_not_captured() -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let enrolled = tb.add_pod(0, "default/a")?;
    let plain = tb.add_pod(0, "plain/b")?;
    let server = tb.add_pod(0, "plain/server")?;
    for port in [APP_PORT, 9901, 9902] {
        tb.serve(&server, sa(server.ip4, port))?;
    }
    tb.serve(&enrolled, "127.0.0.1:7000".parse()?)?;
    tb.serve(&enrolled, sa(enrolled.ip4, 9902))?;
    tb.start_agent(
        0,
        &[
            "--exclude-outbound-ports",
            "9901",
            "--exclude-inbound-ports",
            "9902",
        ],
    )?;
    tb.agent(0).enroll(&enrolled)?;

    // A pod that is not enrolled talks directly.
    let r = tb.connect(&plain, sa(server.ip4, APP_PORT), 1000)?;
    assert_intact(&r, "unenrolled");
    assert_eq!(s(&r, "peer"), sa(server.ip4, APP_PORT).to_string());
    assert_eq!(ip_of(&s(&r, "server_peer")), plain.ip4.to_string());

    // Loopback inside an enrolled pod is its own business.
    let r = tb.connect(&enrolled, "127.0.0.1:7000".parse()?, 1000)?;
    assert_intact(&r, "loopback");
    assert_eq!(s(&r, "peer"), "127.0.0.1:7000");

    // An excluded outbound port goes direct from the enrolled pod.
    let r = tb.connect(&enrolled, sa(server.ip4, 9901), 1000)?;
    assert_intact(&r, "excluded outbound");
    assert_eq!(s(&r, "peer"), sa(server.ip4, 9901).to_string());
    assert_eq!(ip_of(&s(&r, "server_peer")), enrolled.ip4.to_string());

    // An excluded inbound port of an enrolled pod is reached directly.
    let r = tb.connect(&plain, sa(enrolled.ip4, 9902), 1000)?;
    assert_intact(&r, "excluded inbound");
    assert_eq!(ip_of(&s(&r, "server_peer")), plain.ip4.to_string(), "{r}");

    let a = tb.agent(0);
    assert_eq!(a.capture_counter("outbound_redirected")?, 0.0);
    assert_eq!(a.capture_counter("inbound_assigned")?, 0.0);
    assert_eq!(
        a.metric_or_absent(
            r#"mesh_proxy_connections_total{direction="outbound",result="forwarded"}"#
        )?,
        0.0
    );
    Ok(())
}

#[test]
fn a_running_pod_is_enrolled_and_released_without_restart() -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let client = tb.add_pod(0, "default/client")?;
    let server = tb.add_pod(0, "default/server")?;
    tb.serve(&server, sa(server.ip4, APP_PORT))?;
    tb.start_agent(0, &[])?;
    let dst = sa(server.ip4, APP_PORT);
    // One client process for the whole test: it is never restarted.
    let mut app = tb.repl(&client)?;

    let r = app.connect(dst, 1000)?;
    assert_intact(&r, "before enrolment");
    assert_eq!(s(&r, "peer"), dst.to_string(), "direct before enrolment");

    tb.agent(0).enroll(&client)?;
    tb.agent(0).enroll(&server)?;
    let r = app.connect(dst, 1000)?;
    assert_intact(&r, "after enrolment");
    assert_eq!(
        port_of(&s(&r, "peer")),
        OUTBOUND,
        "captured after enrolment: {r}"
    );
    // Both ends enrolled: out through the client's 15001, in through the
    // server's 15006, which delivers it from the client's address.
    assert!(delivered_by_agent(&r), "{r}");
    assert_eq!(ip_of(&s(&r, "server_peer")), client.ip4.to_string(), "{r}");

    tb.agent(0).unenroll(&client)?;
    tb.agent(0).unenroll(&server)?;
    let r = app.connect(dst, 1000)?;
    assert_intact(&r, "after release");
    assert_eq!(s(&r, "peer"), dst.to_string(), "direct again after release");
    assert_eq!(ip_of(&s(&r, "server_peer")), client.ip4.to_string(), "{r}");

    // Nothing of the pods is left in the kernel maps or pins.
    let (_, capture) = tb.agent(0).http("GET", "/capture", None)?;
    let capture: Value = serde_json::from_str(&capture)?;
    assert_eq!(
        capture["enrolled_netns_cookies"],
        serde_json::json!([]),
        "{capture}"
    );
    let links: Vec<String> = std::fs::read_dir(tb.nodes[0].bpf_dir.join("links"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert!(
        !links.iter().any(|l| l.starts_with("sk_lookup-")),
        "{links:?}"
    );
    Ok(())
}

/// The root the embedded CA of node 0's agent generated: its certificate
/// file, checked to be a CA whose key file only root reads, and to be the
/// root the agent reports using.
fn generated_root(tb: &Testbed) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tb.nodes[0].state_dir.join("ca");
    let pem = std::fs::read_to_string(dir.join("root-cert.pem"))?;
    let key = std::fs::metadata(dir.join("root-key.pem"))?;
    assert_eq!(key.permissions().mode() & 0o777, 0o600, "root-key.pem");
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes())?;
    let cert = der.parse_x509()?;
    assert!(cert.is_ca(), "the generated root is not a CA");
    let serial: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (_, dump) = tb.agent(0).http("GET", "/config_dump", None)?;
    let dump: Value = serde_json::from_str(&dump)?;
    let used = dump["certificate_summary"]
        .as_array()
        .and_then(|certs| certs.iter().find(|c| c["role"] == "root"))
        .map(|c| c["serial"].clone());
    assert_eq!(used, Some(Value::from(serial)), "{dump}");
    Ok(pem)
}

#[test]
fn restart_keeps_capture_attached_and_fails_closed_meanwhile() -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let client = tb.add_pod(0, "default/client")?;
    let server = tb.add_pod(0, "default/server")?;
    let outside = tb.add_pod(0, "plain/outside")?;
    tb.serve(&server, sa(server.ip4, APP_PORT))?;
    tb.serve(&outside, sa(outside.ip4, APP_PORT))?;
    tb.start_agent(0, &[])?;
    // Without CA flags the agent made its own root, in STATE_DIR/ca.
    let root = generated_root(&tb)?;
    tb.agent(0).enroll(&client)?;
    tb.agent(0).enroll(&server)?;
    let r = tb.connect(&client, sa(outside.ip4, APP_PORT), 1000)?;
    assert_intact(&r, "before restart");
    assert_eq!(port_of(&s(&r, "peer")), OUTBOUND);

    tb.kill_agent(0)?;
    let links = tb.nodes[0].bpf_dir.join("links");
    for pin in ["mesh_connect4", "mesh_connect6", "mesh_sockops"] {
        assert!(links.join(pin).exists(), "{pin} link is still pinned");
    }

    // No agent: the enrolled client's connection is refused, not sent around
    // the agent in plaintext...
    let r = tb.connect(&client, sa(outside.ip4, APP_PORT), 1000)?;
    assert_eq!(r["ok"], Value::Bool(false), "{r}");
    assert_eq!(r["refused"], Value::Bool(true), "{r}");
    // ...and so is a connection into the enrolled server.
    let r = tb.connect(&outside, sa(server.ip4, APP_PORT), 1000)?;
    assert_eq!(
        r["refused"],
        Value::Bool(true),
        "inbound while no agent: {r}"
    );

    // A new agent takes the pods back from its state, with the pinned
    // programs, and keeps the root it made.
    tb.start_agent(0, &[])?;
    assert_eq!(generated_root(&tb)?, root, "a new root after a restart");
    let (_, pods) = tb.agent(0).http("GET", "/pods", None)?;
    let pods: Value = serde_json::from_str(&pods)?;
    assert_eq!(pods.as_array().map(Vec::len), Some(2), "{pods}");
    let r = tb.connect(&client, sa(outside.ip4, APP_PORT), 1000)?;
    assert_intact(&r, "after restart");
    assert_eq!(port_of(&s(&r, "peer")), OUTBOUND);
    let r = tb.connect(&outside, sa(server.ip4, APP_PORT), 1000)?;
    assert_intact(&r, "inbound after restart");
    assert!(delivered_by_agent(&r), "{r}");
    assert_eq!(ip_of(&s(&r, "server_peer")), outside.ip4.to_string(), "{r}");
    Ok(())
}

#[test]
fn bad_enrolment_requests_get_clear_errors_and_leave_maps_consistent() -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let pod = tb.add_pod(0, "default/a")?;
    let other = tb.add_pod(0, "default/b")?;
    tb.start_agent(0, &[])?;
    let a = tb.agent(0);
    let info = a.enroll(&pod)?;

    let (ok, _, err) = a.try_enroll("x/missing", Path::new("/run/netns/does-not-exist"))?;
    assert!(!ok);
    assert!(
        err.contains("/run/netns/does-not-exist") && err.contains("No such file"),
        "{err}"
    );

    let not_ns = tb.workdir.join("not-a-netns");
    std::fs::write(&not_ns, "")?;
    let (ok, _, err) = a.try_enroll("x/file", &not_ns)?;
    assert!(!ok);
    assert!(err.contains("is not a network namespace"), "{err}");

    let netns = pod.netns_path();
    let (ok, _, err) = a.try_enroll(&pod.name, &netns)?;
    assert!(!ok);
    assert!(
        err.contains("already enrolled") && err.contains("409"),
        "{err}"
    );

    let (ok, _, err) = a.try_enroll("default/alias", &netns)?;
    assert!(!ok);
    assert!(err.contains("already enrolled as pod default/a"), "{err}");

    let (ok, _, err) = a.cli(&["pods", "unenroll", "--name", &other.name])?;
    assert!(!ok);
    assert!(err.contains("not enrolled") && err.contains("404"), "{err}");

    let (status, body) = a.control(
        "POST",
        "/pods/enroll",
        Some(r#"{"name": "x", "netns": "/x", "colour": "red"}"#),
    )?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown field"), "{body}");

    // Only the one good pod is in the kernel maps, and it still works.
    let (_, capture) = a.http("GET", "/capture", None)?;
    let capture: Value = serde_json::from_str(&capture)?;
    assert_eq!(
        capture["enrolled_netns_cookies"],
        serde_json::json!([info["netns_cookie"]]),
        "{capture}"
    );
    let (_, pods) = a.http("GET", "/pods", None)?;
    assert_eq!(
        serde_json::from_str::<Value>(&pods)?
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        a.metric(r#"mesh_enrolment_total{op="enroll",result="bad_netns"}"#)?,
        2.0
    );
    assert_eq!(
        a.metric(r#"mesh_enrolment_total{op="enroll",result="conflict"}"#)?,
        2.0
    );
    Ok(())
}

#[test]
fn two_nodes_two_agents_capture_cross_node_traffic() -> anyhow::Result<()> {
    let mut tb = Testbed::new(2)?;
    let client = tb.add_pod(0, "default/client")?;
    let server = tb.add_pod(1, "default/server")?;
    tb.serve(&server, sa(IpAddr::from([0u8; 16]), APP_PORT))?;
    tb.start_agent(0, &[])?;
    tb.start_agent(1, &[])?;
    tb.agent(0).enroll(&client)?;
    tb.agent(1).enroll(&server)?;

    for dst in [sa(server.ip4, APP_PORT), sa(server.ip6, APP_PORT)] {
        let r = tb.connect(&client, dst, 4 << 20)?;
        assert_intact(&r, &format!("cross-node to {dst}"));
        assert_eq!(port_of(&s(&r, "peer")), OUTBOUND, "{r}");
        assert_eq!(ip_of(&s(&r, "server_local")), dst.ip().to_string(), "{r}");
    }
    // Each node's agent handled its own side only.
    assert_eq!(
        tb.agent(0)
            .metric(r#"mesh_proxy_connections_total{direction="outbound",result="forwarded"}"#)?,
        2.0
    );
    assert_eq!(tb.agent(0).capture_counter("inbound_assigned")?, 0.0);
    assert_eq!(
        tb.agent(1).metric(
            r#"mesh_proxy_connections_total{direction="inbound_plaintext",result="forwarded"}"#
        )?,
        2.0
    );
    assert_eq!(tb.agent(1).capture_counter("outbound_redirected")?, 0.0);
    Ok(())
}

/// The nat rules of one family inside a pod, as `iptables-save` prints them.
fn nat_rules(tb: &Testbed, pod: &mesh_tests::Pod, save: &str) -> anyhow::Result<Vec<String>> {
    let out = tb.run_in_pod(pod, Path::new(&format!("/usr/sbin/{save}")), &["-t", "nat"])?;
    Ok(out
        .lines()
        .filter(|l| l.starts_with("-A") || l.starts_with(':'))
        .map(str::to_owned)
        .collect())
}

fn count_of(rules: &[String], line: &str) -> usize {
    rules.iter().filter(|l| l.as_str() == line).count()
}

#[test]
fn iptables_capture_steers_both_ways_fails_closed_and_is_removed() -> anyhow::Result<()> {
    let mut tb = Testbed::new(2)?;
    let client = tb.add_pod(0, "default/client")?;
    let outside = tb.add_pod(0, "plain/outside")?;
    let server = tb.add_pod(1, "default/server")?;
    for port in [APP_PORT, 9901, 9902] {
        tb.serve(&server, sa(IpAddr::from([0u8; 16]), port))?;
    }
    tb.serve(&client, "127.0.0.1:7000".parse()?)?;
    let args = [
        "--capture",
        "iptables",
        "--exclude-outbound-ports",
        "9901",
        "--exclude-inbound-ports",
        "9902",
    ];
    tb.start_agent(0, &args)?;
    tb.start_agent(1, &args)?;
    tb.agent(0).enroll(&client)?;
    tb.agent(1).enroll(&server)?;
    let (status, body) = tb.agent(0).http("GET", "/capture", None)?;
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(
        (status, body["mode"].as_str()),
        (200, Some("iptables")),
        "{body}"
    );
    let forwarded = |tb: &Testbed, node: usize, direction: &str| {
        tb.agent(node).metric(&format!(
            r#"mesh_proxy_connections_total{{direction="{direction}",result="forwarded"}}"#
        ))
    };

    // Out through the client's agent, in through the server's: the app is
    // reached at the address dialed, by the inbound agent (its socket's
    // mark), from the client's own address.
    let cases = [
        (sa(server.ip4, APP_PORT), server.ip4, client.ip4, 1 << 20),
        (sa(server.ip6, APP_PORT), server.ip6, client.ip6, 1 << 20),
        // IPv4 packets from an IPv6 socket meet the IPv4 rules.
        (
            format!("[::ffff:{}]:{APP_PORT}", server.ip4).parse()?,
            server.ip4,
            client.ip4,
            1000,
        ),
    ];
    for (i, (dst, server_ip, client_ip, bytes)) in cases.iter().enumerate() {
        let r = tb.connect(&client, *dst, *bytes)?;
        assert_intact(&r, &format!("to {dst}"));
        assert_eq!(ip_of(&s(&r, "server_local")), server_ip.to_string(), "{r}");
        assert_eq!(port_of(&s(&r, "server_local")), APP_PORT.to_string(), "{r}");
        assert!(delivered_by_agent(&r), "{r}");
        assert_eq!(ip_of(&s(&r, "server_peer")), client_ip.to_string(), "{r}");
        assert_eq!(forwarded(&tb, 0, "outbound")?, (i + 1) as f64, "{r}");
        assert_eq!(
            forwarded(&tb, 1, "inbound_plaintext")?,
            (i + 1) as f64,
            "{r}"
        );
    }

    // Loopback in the pod and an excluded outbound port are not captured;
    // an excluded inbound port is captured on the way out only.
    let r = tb.connect(&client, "127.0.0.1:7000".parse()?, 1000)?;
    assert_intact(&r, "loopback");
    let r = tb.connect(&client, sa(server.ip4, 9901), 1000)?;
    assert_intact(&r, "excluded outbound");
    assert_eq!(forwarded(&tb, 0, "outbound")?, 3.0, "9901 went direct");
    assert_eq!(
        forwarded(&tb, 1, "inbound_plaintext")?,
        4.0,
        "9901 captured inbound"
    );
    let r = tb.connect(&client, sa(server.ip4, 9902), 1000)?;
    assert_intact(&r, "excluded inbound");
    assert_eq!(ip_of(&s(&r, "server_peer")), client.ip4.to_string(), "{r}");
    assert_eq!(forwarded(&tb, 0, "outbound")?, 4.0);
    assert_eq!(forwarded(&tb, 1, "inbound_plaintext")?, 4.0);

    // A connection to the inbound listener itself is not forwarded, nor is
    // one to the outbound listener (conntrack gives it an "original"
    // destination too: the listener, which would loop).
    let r = tb.connect(&client, sa(server.ip4, 15006), 10)?;
    assert_eq!(r["ok"], Value::Bool(false), "{r}");
    assert_eq!(forwarded(&tb, 1, "inbound_plaintext")?, 4.0);
    for dst in ["127.0.0.1:15001", "[::1]:15001"] {
        let r = tb.connect(&client, dst.parse()?, 10)?;
        assert_eq!(r["ok"], Value::Bool(false), "{dst}: {r}");
    }
    let refused =
        r#"mesh_proxy_connections_total{direction="outbound",result="no_original_destination"}"#;
    assert_eq!(tb.agent(0).metric(refused)?, 2.0);
    assert_eq!(forwarded(&tb, 0, "outbound")?, 4.0);

    // With the client's agent gone, the rules stay and its pod fails closed.
    tb.kill_agent(0)?;
    let r = tb.connect(&client, sa(server.ip4, APP_PORT), 10)?;
    assert_eq!(
        r["refused"],
        Value::Bool(true),
        "not refused without an agent: {r}"
    );
    // A restarted agent takes the pod back with one copy of the rules.
    tb.start_agent(0, &args)?;
    let r = tb.connect(&client, sa(server.ip4, APP_PORT), 1000)?;
    assert_intact(&r, "after restart");
    assert_eq!(forwarded(&tb, 0, "outbound")?, 1.0);
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = nat_rules(&tb, &client, save)?;
        assert_eq!(
            count_of(&rules, "-A OUTPUT -p tcp -j MESH_OUTBOUND"),
            1,
            "{rules:?}"
        );
        assert_eq!(
            count_of(&rules, "-A PREROUTING -p tcp -j MESH_INBOUND"),
            1,
            "{rules:?}"
        );
    }

    // With the server's agent gone, its pod fails closed inbound too: the
    // rules stay, nothing listens where they lead, and a plaintext
    // connection from outside the mesh is refused (it was delivered before).
    let r = tb.connect(&outside, sa(server.ip4, APP_PORT), 1000)?;
    assert_intact(&r, "from outside the mesh");
    assert!(delivered_by_agent(&r), "{r}");
    tb.kill_agent(1)?;
    let r = tb.connect(&outside, sa(server.ip4, APP_PORT), 10)?;
    assert_eq!(
        r["refused"],
        Value::Bool(true),
        "inbound not refused without an agent: {r}"
    );

    // Changing the capture mode over enrolled pods is refused until uninstall.
    let err = tb.start_agent(1, &[]).expect_err("mode change refused");
    assert!(
        format!("{err:#}").contains("run `mesh-agent uninstall`"),
        "{err:#}"
    );
    tb.start_agent(1, &args)?;

    // Released: no rule of ours is left, and the app sees the client itself.
    tb.agent(1).unenroll(&server)?;
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = nat_rules(&tb, &server, save)?;
        assert!(
            !rules.iter().any(|l| l.contains("MESH_")),
            "{save}: {rules:?}"
        );
    }
    let r = tb.connect(&client, sa(server.ip4, APP_PORT), 1000)?;
    assert_intact(&r, "after release");
    assert_eq!(ip_of(&s(&r, "server_peer")), client.ip4.to_string(), "{r}");
    Ok(())
}

/// Only the agent's in-pod listeners (15001, 15006, 15008) are exempt from
/// inbound capture: an app of an enrolled pod on a port the node agent
/// happens to use on the host (15000, 15020, 15021) is captured like any
/// other, in both capture modes, so STRICT and policy apply to it.
#[test]
fn an_app_on_an_agent_host_port_in_an_enrolled_pod_is_captured() -> anyhow::Result<()> {
    for mode in ["ebpf", "iptables"] {
        let mut tb = Testbed::new(1)?;
        let client = tb.add_pod(0, "plain/client")?;
        let server = tb.add_pod(0, "default/server")?;
        for port in [15000, 15020, 15021] {
            tb.serve(&server, sa(IpAddr::from([0u8; 16]), port))?;
        }
        tb.start_agent(0, &["--capture", mode])?;
        tb.agent(0).enroll(&server)?;
        for (i, port) in [15000u16, 15020, 15021].into_iter().enumerate() {
            let r = tb.connect(&client, sa(server.ip4, port), 1000)?;
            assert_intact(&r, &format!("{mode}: to {port}"));
            // Delivered by the agent (its mark), from the client's address.
            assert!(
                delivered_by_agent(&r),
                "{mode}: port {port} reached the app uncaptured: {r}"
            );
            assert_eq!(ip_of(&s(&r, "server_peer")), client.ip4.to_string(), "{r}");
            assert_eq!(
                tb.agent(0).metric(
                    r#"mesh_proxy_connections_total{direction="inbound_plaintext",result="forwarded"}"#
                )?,
                (i + 1) as f64,
                "{mode}: port {port}"
            );
        }
    }
    Ok(())
}

/// `mesh-agent uninstall` after the agent is gone: nothing of the capture
/// is left pinned or installed, the state is forgotten, and the pods that
/// failed closed while no agent ran talk directly again, in both capture
/// modes.
#[test]
fn uninstall_leaves_nothing_pinned_and_the_pods_talk_directly() -> anyhow::Result<()> {
    for mode in ["ebpf", "iptables"] {
        let mut tb = Testbed::new(1)?;
        let client = tb.add_pod(0, "default/client")?;
        let server = tb.add_pod(0, "default/server")?;
        tb.serve(&server, sa(IpAddr::from([0u8; 16]), APP_PORT))?;
        tb.start_agent(0, &["--capture", mode])?;
        tb.agent(0).enroll(&client)?;
        tb.agent(0).enroll(&server)?;
        let dst = sa(server.ip4, APP_PORT);
        let r = tb.connect(&client, dst, 1000)?;
        assert_intact(&r, &format!("{mode}: captured"));
        // Delivered by the server's agent (iptables keeps the dialed peer
        // on the client's socket, eBPF shows the agent's 15001).
        assert!(delivered_by_agent(&r), "{mode}: {r}");
        tb.kill_agent(0)?;
        let r = tb.connect(&client, dst, 1000)?;
        // Refused at connect, or (rarely, as the killed agent's sockets are
        // torn down) reset: either way nothing is delivered.
        let reset = r["error"].as_str().is_some_and(|e| e.contains("reset"));
        assert!(
            r["ok"] == Value::Bool(false) && (r["refused"] == Value::Bool(true) || reset),
            "{mode}: no agent: {r}"
        );

        let node = &tb.nodes[0];
        let node_nat = || -> anyhow::Result<String> {
            mesh_tests::sh(
                "nsenter",
                &[
                    &format!("--net=/run/netns/{}", node.netns),
                    "iptables-save",
                    "-t",
                    "nat",
                ],
            )
        };
        mesh_tests::converge(
            "the node's probe SNAT written",
            std::time::Duration::from_secs(10),
            || Ok(node_nat()?.contains("-A POSTROUTING -p tcp -j MESH_PROBES")),
        )?;
        // On the node, as the DaemonSet's host network runs it.
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.netns))
            .arg(mesh_tests::agent_bin())
            .arg("uninstall")
            .arg("--bpf-dir")
            .arg(&node.bpf_dir)
            .arg("--state-dir")
            .arg(&node.state_dir)
            .output()?;
        assert!(
            out.status.success(),
            "{mode}: mesh-agent uninstall: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !node.bpf_dir.exists(),
            "{mode}: pins left: {:?}",
            std::fs::read_dir(&node.bpf_dir)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<Vec<_>, _>>()?
        );
        for file in ["pods.json", "capture-mode"] {
            assert!(
                !node.state_dir.join(file).exists(),
                "{mode}: {file} left in the state directory"
            );
        }
        assert!(
            !node_nat()?.contains("MESH_"),
            "{mode}: the node's probe SNAT left: {}",
            node_nat()?
        );
        for pod in [&client, &server] {
            for save in ["iptables-save", "ip6tables-save"] {
                let rules = nat_rules(&tb, pod, save)?;
                assert!(
                    !rules.iter().any(|l| l.contains("MESH_")),
                    "{mode}: {save} in {}: {rules:?}",
                    pod.name
                );
            }
        }
        // Neither side is captured any more: the client reaches the
        // server's address itself, and the server sees the client's.
        let r = tb.connect(&client, dst, 1000)?;
        assert_intact(&r, &format!("{mode}: after uninstall"));
        assert_eq!(s(&r, "peer"), dst.to_string(), "{mode}: {r}");
        assert!(!delivered_by_agent(&r), "{mode}: {r}");
        assert_eq!(
            ip_of(&s(&r, "server_peer")),
            client.ip4.to_string(),
            "{mode}: {r}"
        );
    }
    Ok(())
}
