//! `cargo xtask demo`: the main job on the embedded default. Builds a
//! simulated node with three pods out of network namespaces (namespace `shop`
//! enrolled, namespace `legacy` not), starts the real agent with the real eBPF
//! programs, sends traffic and says in plain words what was captured.
//! Every claim it prints is checked: the demo fails when one does not hold,
//! and CI runs it. Everything is removed on exit and on Ctrl-C.

use std::net::{IpAddr, SocketAddr};

mod egress;
mod ingress;
mod waypoint;

use anyhow::{Context as _, ensure};
use mesh_tests::{
    Pod, Testbed, Value,
    mesh::{has_app_plaintext, namespace_yaml, pod_yaml, tshark, with_netns},
};

const PORT: u16 = 8080;

/// Only the frontend may call the backend, on its app port.
const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: backend-from-frontend
  namespace: shop
spec:
  selector:
    matchLabels:
      app: backend
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/shop/sa/frontend\"]
    to:
    - operation:
        ports: [\"8080\"]
";

fn yes_no(b: bool) -> &'static str {
    if b { "YES" } else { "no" }
}

/// Where the agent's log ends now: access lines written after this mark are
/// the ones the next call produces.
fn log_mark(tb: &Testbed) -> usize {
    tb.agent(0).log_text().len()
}

/// The value of `field` (e.g. `src.identity=`) in the first access log line
/// written after `mark` that has it and also contains `filter`. The agent
/// writes a connection's line when the connection ends, which may be a moment
/// after the client has seen the end, so this waits for it (up to 5 s).
fn access_since(tb: &Testbed, mark: usize, field: &str, filter: &str) -> Option<String> {
    let started = std::time::Instant::now();
    loop {
        let log = tb.agent(0).log_text();
        let line = log
            .get(mark..)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("access:") && l.contains(field) && l.contains(filter));
        if let Some(line) = line {
            let rest = &line[line.find(field)? + field.len()..];
            let value = if let Some(quoted) = rest.strip_prefix('"') {
                quoted.split('"').next().unwrap_or_default()
            } else {
                rest.split(' ').next().unwrap_or_default()
            };
            return Some(value.to_owned());
        }
        if started.elapsed() > std::time::Duration::from_secs(5) {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A metric line with only the labels a reader needs here.
fn shorten(line: &str) -> String {
    shorten_with(
        line,
        &[
            "source_principal",
            "destination_workload",
            "response_flags",
            "connection_security_policy",
        ],
    )
}

/// A metric line with only the labels in `keep`.
fn shorten_with(line: &str, keep: &[&str]) -> String {
    let (Some(open), Some(close)) = (line.find('{'), line.rfind('}')) else {
        return line.to_owned();
    };
    let labels: Vec<&str> = line[open + 1..close]
        .split("\",")
        .filter(|kv| keep.iter().any(|k| kv.starts_with(&format!("{k}="))))
        .collect();
    let mut labels = labels.join("\",");
    if !labels.ends_with('"') {
        labels.push('"');
    }
    format!("{}{{{labels}}}{}", &line[..open], &line[close + 1..])
}

pub fn run() -> anyhow::Result<()> {
    crate::setup::ensure()?;
    println!("==> building the agent (and its eBPF programs) and the demo app");
    // Built into the same target directory as this xtask binary, where the
    // harness looks for them.
    crate::exec::run(
        std::process::Command::new("cargo")
            .args(["build", "-p", "mesh-agent", "-p", "mesh-tests", "--bins"])
            .current_dir(crate::workspace_root()),
    )?;
    let mut tb = Testbed::new(1).context("building the simulated node")?;
    crate::interrupt::clean_up_on_interrupt(&tb.prefix)?;

    let frontend = tb.add_pod(0, "frontend")?;
    let backend = tb.add_pod(0, "backend")?;
    let intruder = tb.add_pod(0, "intruder")?;
    let batch = tb.add_pod(0, "batch")?;
    println!();
    println!("Simulated node {} with four pods:", tb.nodes[0].netns);
    println!(
        "  namespace shop   (istio.io/dataplane-mode=ambient): frontend {}, backend {}, intruder {}",
        frontend.ip4, backend.ip4, intruder.ip4
    );
    println!(
        "  namespace legacy (not in the mesh):                 batch {}",
        batch.ip4
    );
    tb.serve(&backend, SocketAddr::new(backend.ip4, PORT))?;
    tb.serve(&batch, SocketAddr::new(batch.ip4, PORT))?;
    tb.serve(&frontend, "127.0.0.1:7000".parse()?)?;

    // Each Pod names its network namespace (annotation mesh-agent/netns):
    // on a single machine that is how the agent finds it.
    let docs = |shop_ambient: bool| {
        let pod = |p: &Pod, ns: &str, sa: &str, app: &str| {
            with_netns(&pod_yaml(p, 0, ns, sa, &[("app", app)]), p)
        };
        vec![
            namespace_yaml("shop", shop_ambient),
            namespace_yaml("legacy", false),
            pod(&frontend, "shop", "frontend", "frontend"),
            pod(&backend, "shop", "backend", "backend"),
            pod(&intruder, "shop", "intruder", "intruder"),
            pod(&batch, "legacy", "default", "batch"),
            POLICY.to_owned(),
        ]
    };
    tb.write_config(&docs(false))?;
    let config = tb.config_path().display().to_string();
    tb.start_agent(0, &["--config", &config])?;
    println!(
        "\nAgent started in the node's network namespace; eBPF programs attached to {}.",
        tb.nodes[0].cgroup.display()
    );
    println!("  configuration: {config} (Namespaces, Pods and this AuthorizationPolicy):");
    for line in POLICY.lines().filter(|l| !l.starts_with("apiVersion")) {
        println!("    {line}");
    }
    println!(
        "  embedded CA: a root generated once under {}",
        tb.nodes[0].state_dir.join("ca").display()
    );
    println!(
        "  enrolled pods: {} (no namespace is labelled yet)",
        tb.agent(0).pods()?.len()
    );

    println!(
        "\nLabelling namespace shop istio.io/dataplane-mode=ambient in {config} (the agent keeps running):"
    );
    let labelled = std::time::Instant::now();
    tb.write_config(&docs(true))?;
    let pods = loop {
        let pods = tb.agent(0).pods()?;
        if pods.len() == 3 {
            break pods;
        }
        anyhow::ensure!(
            labelled.elapsed() < std::time::Duration::from_secs(10),
            "the shop pods were not enrolled; agent log:\n{}",
            tb.agent(0).log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    println!(
        "  the agent enrolled the three running shop pods within {} ms:",
        labelled.elapsed().as_millis()
    );
    for info in &pods {
        println!(
            "    {} (netns cookie {}): listeners 15001/15006/15008 opened inside the pod",
            info["name"].as_str().unwrap_or_default(),
            info["netns_cookie"]
        );
    }

    println!("\nTraffic (each connection sends 64 KiB of a known pattern and expects it echoed):");
    let to_backend = SocketAddr::new(backend.ip4, PORT);
    let wire = tb.capture_packets(&frontend, "demo-mesh")?;
    let mark = log_mark(&tb);
    let r = tb.connect(&frontend, to_backend, 64 * 1024)?;
    let pcap = wire.stop()?;
    println!("  1. shop/frontend -> shop/backend ({to_backend}): allowed by the policy");
    expect(describe(&r, &frontend), Path::Captured, "1")?;
    let caller = access_since(&tb, mark, "src.identity=", "")
        .unwrap_or_else(|| "(no access log line)".into());
    println!("     the backend's agent saw the caller as {caller}");
    ensure!(
        caller == "spiffe://cluster.local/ns/shop/sa/frontend",
        "1: the backend's agent saw {caller}"
    );
    let tls13 = tshark(
        &pcap,
        "tls.handshake.type == 2",
        &["tls.handshake.extensions.supported_version"],
    )?;
    let records = tshark(&pcap, "tls.app_data", &["tcp.port"])?;
    let app_port = tshark(&pcap, &format!("tcp.port == {PORT}"), &["frame.number"])?;
    println!(
        "     on frontend's eth0 (dumpcap): {} TLS records to :15008, ServerHello version {}, {} packets to :{PORT}, app plaintext seen: {}",
        records.len(),
        tls13.first().map_or("none", |v| if v == "0x0304" {
            "TLS 1.3"
        } else {
            v.as_str()
        }),
        app_port.len(),
        yes_no(has_app_plaintext(&pcap)?)
    );
    ensure!(
        !records.is_empty()
            && tls13.first().map(String::as_str) == Some("0x0304")
            && app_port.is_empty()
            && !has_app_plaintext(&pcap)?,
        "1: the wire did not show TLS 1.3 only"
    );

    let mark = log_mark(&tb);
    let r = tb.connect(&intruder, to_backend, 64 * 1024)?;
    println!("  2. shop/intruder -> shop/backend: not in the policy");
    expect(describe(&r, &intruder), Path::Refused, "2")?;
    let why = access_since(&tb, mark, "error=", "direction=\"inbound").unwrap_or_default();
    println!("     the backend's agent refused it: {why}");
    ensure!(
        why.contains("no ALLOW policy matched"),
        "2: the refusal's reason is {why:?}"
    );

    let mark = log_mark(&tb);
    let r = tb.connect(&batch, to_backend, 64 * 1024)?;
    println!("  3. legacy/batch -> shop/backend: plaintext, so no identity to allow");
    expect(describe(&r, &batch), Path::Refused, "3")?;
    let why = access_since(&tb, mark, "error=", "direction=\"inbound").unwrap_or_default();
    println!("     the backend's agent refused it: {why}");
    ensure!(
        why.contains("no ALLOW policy matched"),
        "3: the refusal's reason is {why:?}"
    );

    let to_batch = SocketAddr::new(batch.ip4, PORT);
    let wire = tb.capture_packets(&frontend, "demo-plain")?;
    let r = tb.connect(&frontend, to_batch, 64 * 1024)?;
    let pcap = wire.stop()?;
    println!("  4. shop/frontend -> legacy/batch ({to_batch}): outside the mesh, plain TCP");
    expect(describe(&r, &frontend), Path::OutOnly, "4")?;
    let plain = has_app_plaintext(&pcap)?;
    println!(
        "     on frontend's eth0: app plaintext seen: {} (the same check as in 1)",
        yes_no(plain)
    );
    ensure!(
        plain,
        "4: the plaintext control saw no plaintext: the check in 1 proves nothing"
    );
    let r = tb.connect(&frontend, "127.0.0.1:7000".parse()?, 64 * 1024)?;
    println!("  5. shop/frontend -> its own loopback: never captured");
    expect(describe(&r, &frontend), Path::Direct, "5")?;

    println!(
        "\nIstio metrics reported by the destination (from :15020/metrics, labels shortened):"
    );
    let page = tb.agent(0).metrics()?;
    for line in page.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_closed_total")
            && l.contains("reporter=\"destination\"")
    }) {
        println!("  {}", shorten(line));
    }
    println!("Kernel capture counters:");
    for line in page
        .lines()
        .filter(|l| l.starts_with("mesh_capture_events_total"))
    {
        println!("  {line}");
    }

    egress::run(&mut tb, docs(true), &frontend)?;
    let with_bookinfo = waypoint::run(&mut tb, docs(true))?;
    ingress::run(&mut tb, with_bookinfo)?;

    tb.kill_agent(0)?;
    println!("\nAgent killed (programs stay pinned). shop/frontend -> shop/backend again:");
    let r = tb.connect(&frontend, SocketAddr::new(backend.ip4, PORT), 1024)?;
    ensure!(
        r["refused"] == Value::Bool(true),
        "with the agent down, the call was not refused: {r}"
    );
    println!(
        "  refused: with no agent listening, enrolled pods fail closed; nothing leaves in plaintext."
    );
    tb.start_agent(0, &["--config", &config])?;
    let r = tb.connect(&frontend, SocketAddr::new(backend.ip4, PORT), 1024)?;
    println!("Agent restarted: it took its pods back from its state directory.");
    expect(describe(&r, &frontend), Path::Captured, "after the restart")?;

    println!("\nCleaning up the simulated node.");
    drop(tb);
    println!("Done.");
    Ok(())
}

/// What a call went through, as `describe` saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Captured out of the client and into the server.
    Captured,
    /// Captured out (to a destination outside the mesh), direct in.
    OutOnly,
    Direct,
    Refused,
}

fn expect(seen: Path, want: Path, step: &str) -> anyhow::Result<()> {
    ensure!(seen == want, "{step}: the call was {seen:?}, not {want:?}");
    Ok(())
}

fn describe(r: &Value, from: &Pod) -> Path {
    let get = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
    if r["ok"] != Value::Bool(true) {
        println!(
            "     REFUSED: the client's connection was closed ({})",
            get("error")
        );
        return Path::Refused;
    }
    let peer = get("peer");
    let out = peer.ends_with(":15001");
    if out {
        println!(
            "     out: CAPTURED  - the client's socket is connected to {peer}, the agent's outbound listener in its own pod"
        );
    } else {
        println!("     out: direct    - the client's socket is connected to {peer}");
    }
    let seen: IpAddr = mesh_tests::ip_of(&get("server_peer"))
        .parse()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let captured_in = mesh_tests::delivered_by_agent(r);
    if captured_in {
        println!(
            "     in:  CAPTURED  - the agent delivered it to {}, the address the client dialed, from the client's own address {seen} (the server's socket carries the agent's mark)",
            get("server_local")
        );
    } else if seen == from.ip4 {
        println!("     in:  direct    - the server saw the client pod's own address {seen}");
    } else {
        println!("     in:  direct    - the server saw {seen}");
    }
    println!(
        "     {} bytes sent, {} echoed back intact",
        r["sent"], r["received"]
    );
    match (out, captured_in, r["sent"] == r["received"]) {
        (_, _, false) => Path::Refused,
        (true, true, true) => Path::Captured,
        (true, false, true) => Path::OutOnly,
        _ => Path::Direct,
    }
}
