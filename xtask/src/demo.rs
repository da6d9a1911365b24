//! `cargo xtask demo`: the main job on the embedded default. Builds a
//! simulated node with three pods out of network namespaces (namespace `shop`
//! enrolled, namespace `legacy` not), starts the real agent with the real eBPF
//! programs, sends traffic and says in plain words what was captured.
//! Everything is removed on exit and on Ctrl-C.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;
use mesh_tests::{Pod, Testbed, Value};

const PORT: u16 = 8080;

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
    let prefix = tb.prefix.clone();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: cleaning up");
        mesh_tests::cleanup(&prefix);
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    let frontend = tb.add_pod(0, "shop/frontend")?;
    let backend = tb.add_pod(0, "shop/backend")?;
    let batch = tb.add_pod(0, "legacy/batch")?;
    println!();
    println!("Simulated node {} with three pods:", tb.nodes[0].netns);
    println!(
        "  namespace shop   (istio.io/dataplane-mode=ambient): shop/frontend {}, shop/backend {}",
        frontend.ip4, backend.ip4
    );
    println!(
        "  namespace legacy (not enrolled):                     legacy/batch {}",
        batch.ip4
    );
    tb.serve(&backend, SocketAddr::new(backend.ip4, PORT))?;
    tb.serve(&batch, SocketAddr::new(batch.ip4, PORT))?;
    tb.serve(&frontend, "127.0.0.1:7000".parse()?)?;

    tb.start_agent(0, &[])?;
    println!(
        "\nAgent started in the node's network namespace; eBPF programs attached to {}.",
        tb.nodes[0].cgroup.display()
    );
    for pod in [&frontend, &backend] {
        let info = tb.agent(0).enroll(pod)?;
        println!(
            "  enrolled {} (netns cookie {}): listeners 15001/15006/15008 opened inside the pod",
            pod.name, info["netns_cookie"]
        );
    }

    println!("\nTraffic (each connection sends 64 KiB and expects it echoed):");
    let calls: [(&Pod, &str, SocketAddr); 4] = [
        (
            &frontend,
            "shop/backend",
            SocketAddr::new(backend.ip4, PORT),
        ),
        (&batch, "shop/backend", SocketAddr::new(backend.ip4, PORT)),
        (&frontend, "legacy/batch", SocketAddr::new(batch.ip4, PORT)),
        (&frontend, "its own loopback", "127.0.0.1:7000".parse()?),
    ];
    for (i, (from, to, dst)) in calls.iter().enumerate() {
        let r = tb.connect(from, *dst, 64 * 1024)?;
        println!("  {}. {} -> {to} ({dst})", i + 1, from.name);
        describe(&r, from);
    }

    println!("\nKernel capture counters and agent connections (from the agent's :15020/metrics):");
    for line in tb.agent(0).metrics()?.lines() {
        if line.starts_with("mesh_capture_events_total")
            || line.starts_with("mesh_proxy_connections_total")
        {
            println!("  {line}");
        }
    }

    tb.kill_agent(0)?;
    println!("\nAgent killed (programs stay pinned). shop/frontend -> shop/backend again:");
    let r = tb.connect(&frontend, SocketAddr::new(backend.ip4, PORT), 1024)?;
    if r["refused"] == Value::Bool(true) {
        println!(
            "  refused: with no agent listening, enrolled pods fail closed; nothing leaves in plaintext."
        );
    } else {
        println!("  UNEXPECTED: {r}");
    }
    tb.start_agent(0, &[])?;
    let r = tb.connect(&frontend, SocketAddr::new(backend.ip4, PORT), 1024)?;
    println!("Agent restarted: it took its pods back from its state directory.");
    describe(&r, &frontend);

    println!("\nCleaning up the simulated node.");
    drop(tb);
    println!("Done.");
    Ok(())
}

fn describe(r: &Value, from: &Pod) {
    let get = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
    if r["ok"] != Value::Bool(true) {
        println!("     FAILED: {r}");
        return;
    }
    let peer = get("peer");
    if peer.ends_with(":15001") {
        println!(
            "     out: CAPTURED  - the client's socket is connected to {peer}, the agent's outbound listener in its own pod"
        );
    } else {
        println!("     out: direct    - the client's socket is connected to {peer}");
    }
    let seen: IpAddr = mesh_tests::ip_of(&get("server_peer"))
        .parse()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    if seen == IpAddr::from([127, 0, 0, 6]) {
        println!(
            "     in:  CAPTURED  - the server saw the agent (127.0.0.6) deliver it to {}, the address the client dialed",
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
}
