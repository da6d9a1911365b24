//! A restarted agent takes back only the namespaces it saved: a netns
//! replaced under the same path, or a saved path that now names another
//! namespace (a reused PID, the host's own), is not enrolled; and a state
//! file it cannot read stops it rather than release every pod; an upgrade
//! replaces the kernel programs in place and never lets a call out in
//! plaintext.

use std::{fs, net::SocketAddr, path::Path};

use mesh_tests::{Testbed, Value, sh};

const APP_PORT: u16 = 8080;

fn links(bpf_dir: &Path) -> anyhow::Result<Vec<String>> {
    Ok(fs::read_dir(bpf_dir.join("links"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?)
}

#[test]
fn a_restart_does_not_enrol_a_namespace_that_replaced_the_saved_one() -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let replaced = tb.add_pod(0, "default/replaced")?;
    let reused = tb.add_pod(0, "default/reused")?;
    tb.start_agent(0, &[])?;
    let old_cookies: Vec<u64> = [&replaced, &reused]
        .iter()
        .map(|p| Ok(tb.agent(0).enroll(p)?["netns_cookie"].as_u64().unwrap_or(0)))
        .collect::<anyhow::Result<_>>()?;
    tb.kill_agent(0)?;

    // The pod's namespace is replaced under the same path...
    sh("ip", &["netns", "del", &replaced.netns])?;
    sh("ip", &["netns", "add", &replaced.netns])?;
    // ...and the other saved path now names the node's own namespace (a
    // `/proc/PID/ns/net` whose PID went to a host process).
    let state = tb.nodes[0].state_dir.join("pods.json");
    let node_ns = format!("/run/netns/{}", tb.nodes[0].netns);
    let saved =
        fs::read_to_string(&state)?.replace(&reused.netns_path().display().to_string(), &node_ns);
    fs::write(&state, saved)?;

    tb.start_agent(0, &[])?;
    let a = tb.agent(0);
    assert_eq!(
        a.pod_names()?,
        Vec::<String>::new(),
        "neither namespace is the one that was saved"
    );
    let (_, capture) = a.http("GET", "/capture", None)?;
    let capture: Value = serde_json::from_str(&capture)?;
    assert_eq!(
        capture["enrolled_netns_cookies"],
        serde_json::json!([]),
        "{capture}"
    );
    let pins = links(&tb.nodes[0].bpf_dir)?;
    assert!(
        !pins.iter().any(|l| l.starts_with("sk_lookup-")),
        "the old namespaces' inbound links are gone, none attached to the new ones: {pins:?}"
    );
    let log = a.log_text();
    for (pod, cookie) in [&replaced, &reused].iter().zip(&old_cookies) {
        assert!(
            log.lines().any(
                |l| l.contains("not the network namespace that was enrolled")
                    && l.contains(&pod.name)
                    && l.contains(&cookie.to_string())
            ),
            "a warning names {} and its saved cookie {cookie}:\n{log}",
            pod.name
        );
    }
    let saved: Value = serde_json::from_str(&fs::read_to_string(&state)?)?;
    assert_eq!(saved, serde_json::json!([]), "the state file forgot them");
    Ok(())
}

#[test]
fn an_unreadable_state_file_stops_the_agent_and_keeps_the_pods_captured() -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let client = tb.add_pod(0, "default/client")?;
    let server = tb.add_pod(0, "plain/server")?;
    tb.serve(&server, SocketAddr::new(server.ip4, APP_PORT))?;
    tb.start_agent(0, &[])?;
    tb.agent(0).enroll(&client)?;
    tb.kill_agent(0)?;

    let state = tb.nodes[0].state_dir.join("pods.json");
    let good = fs::read_to_string(&state)?;
    fs::write(&state, &good[..good.len() / 2])?;
    let err = tb
        .start_agent_unready(0, &[])
        .expect_err("an agent that cannot read its enrolled pods does not start");
    let err = format!("{err:#}");
    assert!(
        err.contains("exited") && err.contains(&state.display().to_string()),
        "the agent stops and names the file: {err}"
    );
    let pins = links(&tb.nodes[0].bpf_dir)?;
    assert!(
        pins.iter().any(|l| l.starts_with("sk_lookup-")),
        "the pod's pinned capture is untouched: {pins:?}"
    );
    let r = tb.connect(&client, SocketAddr::new(server.ip4, APP_PORT), 1000)?;
    assert_eq!(
        r["refused"],
        Value::Bool(true),
        "the pod still fails closed, never sent around the agent: {r}"
    );

    // Repaired, the file gives the pod back.
    fs::write(&state, &good)?;
    tb.start_agent(0, &[])?;
    assert_eq!(tb.agent(0).pod_names()?, [client.name.as_str()]);
    let r = tb.connect(&client, SocketAddr::new(server.ip4, APP_PORT), 1000)?;
    assert_eq!(r["ok"], Value::Bool(true), "{r}");
    assert!(
        r["peer"].as_str().is_some_and(|p| p.ends_with(":15001")),
        "captured again: {r}"
    );
    Ok(())
}

/// Two nodes, a client pod on one and a server pod under STRICT on the
/// other, both enrolled by their labels, each node's agent running: the
/// testbed, the client, the server's app address and the agents' mesh
/// arguments (to start them again).
fn strict_pair() -> anyhow::Result<(Testbed, mesh_tests::Pod, SocketAddr, Vec<String>)> {
    use mesh_tests::{
        converge,
        mesh::{namespace_yaml, pod_yaml, with_netns},
    };
    let mut tb = Testbed::new(2)?;
    let client = tb.add_pod(0, "client")?;
    let server = tb.add_pod(1, "server")?;
    tb.serve(&server, SocketAddr::new([0u8; 16].into(), APP_PORT))?;
    tb.write_config(&[
        namespace_yaml("shop", true),
        with_netns(&pod_yaml(&client, 0, "shop", "client", &[]), &client),
        with_netns(&pod_yaml(&server, 1, "shop", "server", &[]), &server),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n".to_owned(),
    ])?;
    let args = tb.mesh_args()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    for node in 0..2 {
        tb.start_agent(node, &argv)?;
    }
    converge(
        "both pods enrolled",
        std::time::Duration::from_secs(10),
        || {
            Ok(tb.agent(0).pod_names()? == ["shop/client"]
                && tb.agent(1).pod_names()? == ["shop/server"])
        },
    )?;
    Ok((tb, client, SocketAddr::new(server.ip4, APP_PORT), args))
}

/// The STRICT server's agent refused no plaintext: no call of the client
/// ever left its pod uncaptured.
fn assert_no_plaintext_reached_the_server(tb: &Testbed) -> anyhow::Result<()> {
    let page = tb.agent(1).metrics()?;
    assert_eq!(
        mesh_tests::metrics::series_sum_or_absent(
            &page,
            "mesh_proxy_connections_total",
            &[("direction", "inbound_plaintext")]
        )?,
        0.0,
        "a call reached the STRICT server in plaintext: {page}"
    );
    Ok(())
}

/// The `upgrade-test` variant of the kernel object (`cargo xtask
/// build-ebpf --features upgrade-test`, which `cargo xtask ci` runs): its
/// sk_lookup program differs and its counters map has one more slot.
fn variant_object() -> std::path::PathBuf {
    let object = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/ebpf-upgrade-test/bpfel-unknown-none/release/mesh");
    assert!(
        object.exists(),
        "{} is missing: build it with `cargo xtask build-ebpf --features upgrade-test`",
        object.display()
    );
    object
}

/// The program each pinned link of the node runs, from `/capture`.
fn attached(tb: &Testbed) -> anyhow::Result<Value> {
    let (status, body) = tb.agent(0).http("GET", "/capture", None)?;
    anyhow::ensure!(status == 200, "/capture: {status} {body}");
    Ok(serde_json::from_str::<Value>(&body)?["programs"].clone())
}

/// A rolling upgrade of the kernel side: version A runs with pods enrolled
/// and a client calling a STRICT server on another node without pause;
/// A is killed and B (different programs, a counters map of another
/// layout) takes over its pinned links in place and carries its maps over;
/// then back to A. No call ever leaves the client pod in plaintext (the
/// server's agent would refuse it and count it), calls go on over HBONE
/// after each switch, every link runs the new program, and the counters
/// survive the change of layout.
#[test]
fn an_upgrade_replaces_the_programs_in_place_and_no_call_leaves_in_plaintext() -> anyhow::Result<()>
{
    use mesh_tests::{converge, delivered_by_agent};
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        time::{Duration, Instant},
    };
    let variant = variant_object();
    let (mut tb, client, dst, args) = strict_pair()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let variant_arg = variant.to_string_lossy().into_owned();
    let mut argv_b = argv.clone();
    argv_b.extend(["--ebpf-object", &variant_arg]);
    let wait_enrolled = |tb: &Testbed| {
        converge("the client enrolled", Duration::from_secs(10), || {
            Ok(tb.agent(0).pod_names()? == ["shop/client"])
        })
    };
    let r = tb.connect(&client, dst, 100)?;
    assert!(r["ok"] == true && delivered_by_agent(&r), "before: {r}");

    // One client process calling without pause, for the whole upgrade.
    let mut repl = tb.repl(&client)?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let calls = scope.spawn(|| -> anyhow::Result<(u32, u32, Vec<Value>)> {
            let (mut ok, mut refused, mut odd) = (0, 0, Vec::new());
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                let r = repl.connect(dst, 100)?;
                if r["ok"] == true && delivered_by_agent(&r) {
                    ok += 1;
                } else if r["ok"] == true {
                    odd.push(r);
                } else {
                    // No agent on the client's node for a moment: refused
                    // in the pod, never sent.
                    refused += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok((ok, refused, odd))
        });
        let result = (|| -> anyhow::Result<()> {
            for (label, next_args, change) in [
                ("A -> B", &argv_b, "COUNTERS: entries 8 -> 9"),
                ("B -> A", &argv, "COUNTERS: entries 9 -> 8"),
            ] {
                let before = attached(&tb)?;
                let redirected = tb.agent(0).capture_counter("outbound_redirected")?;
                tb.kill_agent(0)?;
                tb.start_agent(0, next_args)?;
                wait_enrolled(&tb)?;
                let after = attached(&tb)?;
                for name in ["mesh_connect4", "mesh_connect6", "mesh_sockops"] {
                    assert!(
                        after[name].as_u64().is_some() && after[name] != before[name],
                        "{label}: {name} still runs {}",
                        before[name]
                    );
                }
                let old_ids = before["mesh_sk_lookup"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let new_ids = after["mesh_sk_lookup"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                assert!(
                    !new_ids.is_empty() && new_ids.iter().all(|id| !old_ids.contains(id)),
                    "{label}: sk_lookup links {old_ids:?} -> {new_ids:?}"
                );
                let log = tb.agent(0).log_text();
                assert!(
                    log.contains("pinned maps have another layout: migrating them")
                        && log.contains(change),
                    "{label}: {log}"
                );
                // Counted before the switch, still there after it.
                assert!(
                    tb.agent(0).capture_counter("outbound_redirected")? >= redirected,
                    "{label}: counters lost"
                );
                converge(
                    &format!("{label}: calls go through the new programs"),
                    Duration::from_secs(10),
                    || {
                        let r = tb.connect(&client, dst, 100)?;
                        Ok(r["ok"] == true && delivered_by_agent(&r))
                    },
                )?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let (ok, refused, odd) = calls.join().expect("calls thread")?;
        result?;
        assert!(
            odd.is_empty(),
            "calls that reached the app without the agent: {odd:?}"
        );
        assert!(ok > 0, "no call went through ({refused} refused)");
        eprintln!(
            "during the upgrade: {ok} calls over HBONE, {refused} refused while no agent ran"
        );
        Ok(())
    })?;
    assert_no_plaintext_reached_the_server(&tb)
}

/// A graceful restart: a new agent starts beside the running one (its
/// listeners join the old ones' with `SO_REUSEPORT`), the old one gets
/// SIGTERM, stops taking connections, lets its live one finish and exits.
/// A client calling a STRICT server on another node without pause sees no
/// failed call, and the connection the old agent carried goes on until the
/// client closes it.
#[test]
fn a_new_agent_beside_a_draining_one_refuses_no_connection() -> anyhow::Result<()> {
    use mesh_tests::{converge, delivered_by_agent};
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        time::{Duration, Instant},
    };
    let (mut tb, client, dst, args) = strict_pair()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    // A long-lived connection through the first agent.
    let mut held = tb.hold(&client, dst)?;
    assert_eq!(held.hello["ok"], true, "{}", held.hello);
    assert_eq!(held.send("before")?["echo"], "before");

    // Ten client processes calling without pause (each one call at a time).
    let repls = (0..10)
        .map(|_| tb.repl(&client))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let stop = AtomicBool::new(false);
    let (ok, failed, took) =
        std::thread::scope(|scope| -> anyhow::Result<(u32, Vec<Value>, Duration)> {
            let callers: Vec<_> = repls
                .into_iter()
                .map(|mut repl| {
                    let stop = &stop;
                    scope.spawn(move || -> anyhow::Result<(u32, Vec<Value>, Duration)> {
                        let (mut ok, mut failed) = (0, Vec::new());
                        let started = Instant::now();
                        while !stop.load(Ordering::Relaxed)
                            && started.elapsed() < Duration::from_secs(60)
                        {
                            let r = repl.connect(dst, 100)?;
                            if r["ok"] == true && delivered_by_agent(&r) {
                                ok += 1;
                            } else {
                                failed.push(r);
                            }
                        }
                        Ok((ok, failed, started.elapsed()))
                    })
                })
                .collect();
            let result = (|| -> anyhow::Result<()> {
                std::thread::sleep(Duration::from_millis(300));
                let mut old = tb.take_agent(0).expect("agent on node 0");
                tb.start_agent(0, &argv)?;
                converge(
                    "the new agent ready beside the old one",
                    Duration::from_secs(20),
                    || Ok(tb.agent(0).log_text().matches("node agent ready").count() >= 2),
                )?;
                std::thread::sleep(Duration::from_millis(300));
                old.terminate()?;
                converge("the old agent draining", Duration::from_secs(10), || {
                    Ok(old
                        .log_text()
                        .contains("draining: new connections go to the next agent"))
                })?;
                // Its live connection goes on while it drains...
                std::thread::sleep(Duration::from_millis(300));
                assert_eq!(held.send("during")?["echo"], "during");
                // ...and once the client closes it, the old agent exits.
                drop(held);
                let status = old.wait_exit(Duration::from_secs(15))?;
                assert!(status.success(), "the old agent exited with {status}");
                assert!(old.log_text().contains("drained: no connection left"));
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            })();
            stop.store(true, Ordering::Relaxed);
            let (mut ok, mut failed, mut took) = (0, Vec::new(), Duration::ZERO);
            for caller in callers {
                let (o, f, t) = caller.join().expect("caller thread")?;
                ok += o;
                failed.extend(f);
                took = took.max(t);
            }
            result?;
            Ok((ok, failed, took))
        })?;
    eprintln!(
        "calls during the restart: {ok} over HBONE in {took:?} ({:.0}/s), {} failed",
        f64::from(ok) / took.as_secs_f64(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "calls failed during the restart: {failed:?}"
    );
    assert!(ok > 100, "too few calls to tell: {ok}");
    assert_no_plaintext_reached_the_server(&tb)
}
