//! A pod whose sandbox is re-created (same Pod, same UID, a new network
//! namespace, here even under the same path) is captured again in its new
//! namespace, and the agent lets go of the old one.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    time::Duration,
};

use mesh_tests::{
    Testbed, Value,
    mesh::{namespace_yaml, pod_yaml, with_netns},
    metrics::series_sum,
};

const APP_PORT: u16 = 8080;

fn ok(r: &Value) -> bool {
    r["ok"] == Value::Bool(true)
}

/// Polls until `done`, for at most 10 s.
fn converge(what: &str, done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    mesh_tests::converge(what, Duration::from_secs(10), done).map(drop)
}

/// Inodes of the files the process holds open (a network namespace
/// handle shows its nsfs inode, whatever path opened it).
fn held_inodes(pid: u32) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        if let Ok(m) = std::fs::metadata(e?.path()) {
            out.push(m.ino());
        }
    }
    Ok(out)
}

#[test]
fn a_recreated_sandbox_is_captured_again_and_the_old_namespace_let_go() -> anyhow::Result<()> {
    let mut tb = Testbed::new(2)?;
    let client = tb.add_pod(0, "client")?;
    let server = tb.add_pod(1, "server")?;
    tb.serve(&server, SocketAddr::new(IpAddr::from([0u8; 16]), APP_PORT))?;
    let docs = |restarts: &str| {
        vec![
            namespace_yaml("shop", true),
            with_netns(
                &pod_yaml(&client, 0, "shop", "client", &[("restarts", restarts)]),
                &client,
            ),
            with_netns(&pod_yaml(&server, 1, "shop", "server", &[]), &server),
        ]
    };
    tb.write_config(&docs("0"))?;
    let args = tb.mesh_args()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    for node in 0..2 {
        tb.start_agent(node, &argv)?;
    }
    converge("both pods enrolled", || {
        Ok(tb.agent(0).pod_names()? == ["shop/client"]
            && tb.agent(1).pod_names()? == ["shop/server"])
    })?;
    let over_hbone = |tb: &Testbed| -> anyhow::Result<f64> {
        series_sum(
            &tb.agent(1).metrics()?,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/shop/sa/client",
                ),
            ],
        )
    };
    let dst = SocketAddr::new(server.ip4, APP_PORT);
    assert!(ok(&tb.connect(&client, dst, 1000)?));
    assert_eq!(over_hbone(&tb)?, 1.0);
    let old_inode = std::fs::metadata(client.netns_path())?.ino();
    let old_cookie = tb.agent(0).pods()?[0]["netns_cookie"].clone();
    assert!(held_inodes(tb.agent(0).pid())?.contains(&old_inode));

    // The sandbox dies and is re-created under the same name; the Pod
    // object changes (as its status would), so the agent looks again.
    tb.recreate_pod_netns(&client)?;
    let new_inode = std::fs::metadata(client.netns_path())?.ino();
    assert_ne!(old_inode, new_inode);
    tb.write_config(&docs("1"))?;
    converge("the new namespace enrolled", || {
        let pods = tb.agent(0).pods()?;
        Ok(pods.len() == 1 && pods[0]["netns_cookie"] != old_cookie)
    })?;

    let r = tb.connect(&client, dst, 1000)?;
    assert!(ok(&r), "{r}");
    assert_eq!(
        over_hbone(&tb)?,
        2.0,
        "the call from the new sandbox went over HBONE with the client's identity"
    );
    assert_eq!(
        tb.agent(1).metric_or_absent(
            r#"mesh_proxy_connections_total{direction="inbound_plaintext",result="forwarded"}"#
        )?,
        0.0,
        "nothing reached the server in plaintext"
    );
    let held = held_inodes(tb.agent(0).pid())?;
    assert!(
        !held.contains(&old_inode) && held.contains(&new_inode),
        "the agent let go of the old namespace: holds {held:?}, old {old_inode}, new {new_inode}"
    );
    Ok(())
}
