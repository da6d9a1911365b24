//! A restarted agent takes back only the namespaces it saved: a netns
//! replaced under the same path, or a saved path that now names another
//! namespace (a reused PID, the host's own), is not enrolled; and a state
//! file it cannot read stops it rather than release every pod.

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
