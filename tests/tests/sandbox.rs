//! Enrolment by the configuration when a pod's sandbox is not what it was:
//! a pod whose sandbox is re-created (same Pod, same UID, a new network
//! namespace, here even under the same path) is captured again in its new
//! namespace, and the agent lets go of the old one; a pod whose namespace
//! is not there yet waits in `pods_pending` and is retried until it is.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    time::Duration,
};

use mesh_tests::{
    Pod, Testbed, Value,
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

/// A pod the configuration puts in the mesh whose network namespace is not
/// there yet is listed in `pods_pending` with the reason and retried every
/// second, with no configuration change, until it is enrolled. A pod
/// enrolled by hand, here under the name of a Pod outside the mesh, is
/// left alone by every reconciliation meanwhile.
#[test]
fn a_pending_pod_is_retried_until_enrolled_and_a_hand_enrolled_pod_is_left_alone()
-> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let hand = tb.add_pod(0, "legacy/hand")?;
    let hand_object = Pod {
        name: "hand".into(),
        ..hand.clone()
    };
    let later = tb.next_pod(0, "later")?;
    let docs = |extra: &[String]| {
        let mut docs = vec![
            namespace_yaml("shop", true),
            namespace_yaml("legacy", false),
            pod_yaml(&hand_object, 0, "legacy", "hand", &[]),
            with_netns(&pod_yaml(&later, 0, "shop", "later", &[]), &later),
        ];
        docs.extend_from_slice(extra);
        docs
    };
    tb.write_config(&docs(&[]))?;
    let args = tb.mesh_args()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_agent(0, &argv)?;
    tb.agent(0).enroll(&hand)?;
    let pending = |tb: &Testbed| -> anyhow::Result<Value> {
        let (_, dump) = tb.agent(0).http("GET", "/config_dump", None)?;
        Ok(serde_json::from_str::<Value>(&dump)?["pods_pending"].clone())
    };
    let retries = |tb: &Testbed| {
        tb.agent(0)
            .metric_or_absent(r#"mesh_enrolment_total{op="enroll",result="bad_netns"}"#)
    };
    converge("the pod without its namespace listed as pending", || {
        Ok(pending(&tb)?["shop/later"]
            .as_str()
            .is_some_and(|why| why.contains(&later.netns_path().display().to_string())))
    })?;
    // Retried on its own, every second.
    let tried = retries(&tb)?;
    converge("retried", || Ok(retries(&tb)? >= tried + 2.0))?;

    // A configuration change reconciles again; the hand-enrolled pod,
    // whose name is a Pod outside the mesh, stays enrolled and captured.
    let svc = mesh_tests::mesh::service_yaml("echo", "shop", "10.96.0.30", 80, "8080", "later");
    tb.apply_config(&docs(&[svc]), |dump| dump.contains("10.96.0.30"))?;
    converge("another pass over the new snapshot", || {
        Ok(retries(&tb)? >= tried + 3.0)
    })?;
    assert_eq!(tb.agent(0).pod_names()?, ["legacy/hand"]);

    // The namespace appears: enrolled at the next retry, with no
    // configuration change.
    let later = tb.add_pod(0, "later")?;
    tb.serve(&later, SocketAddr::new(IpAddr::from([0u8; 16]), APP_PORT))?;
    let took = mesh_tests::converge(
        "the pod enrolled once its namespace is there",
        Duration::from_secs(5),
        || {
            let mut names = tb.agent(0).pod_names()?;
            names.sort();
            Ok(names == ["legacy/hand", "shop/later"])
        },
    )?;
    assert!(took < Duration::from_secs(3), "enrolled after {took:?}");
    converge("nothing pending", || {
        Ok(pending(&tb)? == serde_json::json!({}))
    })?;
    assert!(
        tb.agent(0)
            .log_text()
            .contains("in the mesh but not enrolled yet; retrying"),
        "the pending pod was logged"
    );

    // Both are captured: the hand-enrolled pod's call leaves through the
    // agent, reaches the new pod over HBONE and is delivered by its agent.
    let r = tb.connect(&hand, SocketAddr::new(later.ip4, APP_PORT), 1000)?;
    assert!(ok(&r), "{r}");
    assert!(
        r["peer"].as_str().is_some_and(|p| p.ends_with(":15001")),
        "{r}"
    );
    assert!(mesh_tests::delivered_by_agent(&r), "{r}");
    assert_eq!(
        series_sum(
            &tb.agent(0).metrics()?,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/legacy/sa/hand"
                ),
                ("connection_security_policy", "mutual_tls"),
            ],
        )?,
        1.0
    );
    Ok(())
}
