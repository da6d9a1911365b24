//! The agent's DaemonSet gives `mesh-agent node` what its flags expect:
//! probes and ports, the host's namespaces and directories, a token for the
//! CA, and the capabilities it needs and no more.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use super::{
    METRICS_PATH, Manifests, Problems,
    workload::{capabilities, check_readiness, http_probe},
};

/// Where `capture::fs::default_cgroup_root` looks for the cgroup v2 root
/// when `--cgroup` is not given.
const CGROUP_ROOTS: &[&str] = &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
/// The agent's capabilities; the reasons are beside them in daemonset.yaml
/// and in the README's table, which change together with this list.
const AGENT_CAPABILITIES: &[&str] = &["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

/// An upgrade starts the new agent beside the old one (surge, nothing
/// unavailable), and the old one's drain fits in its grace period.
#[test]
fn agent_daemonset_upgrades_beside_the_old_agent_and_drains_in_time() {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let m = Manifests::load();
    let (w, _, args) = m.agent();
    let ds = m
        .find::<DaemonSet>(Some(&w.namespace), "mesh-agent")
        .expect("the agent's DaemonSet");
    let rolling = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .expect("a rolling update");
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    // Kubernetes' default is 30 s.
    let grace = w.pod.termination_grace_period_seconds.unwrap_or(30);
    assert!(
        u64::try_from(grace).unwrap_or(0) >= args.drain_period.as_secs() + 5,
        "terminationGracePeriodSeconds {grace} leaves no margin over --drain-period {:?}",
        args.drain_period
    );
}

#[test]
fn agent_daemonset_matches_node_flags() {
    let m = Manifests::load();
    let (w, c, args) = m.agent();
    let pod = w.pod;
    let mut p = Problems::default();
    let metrics = i32::from(args.metrics_addr.port());

    // Probes, ports, scraping.
    check_readiness(&mut p, c, "the agent", args.ready_addr);
    // /healthz/ready answers 503 until the configuration is read: as a
    // liveness probe it would restart an agent that waits for the API server.
    let liveness = http_probe(c, c.liveness_probe.as_ref());
    p.check(liveness == Some((METRICS_PATH.to_owned(), metrics)), || {
        format!("liveness probe is {liveness:?}, not {METRICS_PATH} on --metrics-addr port {metrics}, which answers whatever the configuration's state")
    });
    w.check_scraped(&mut p, "--metrics-addr", metrics);
    // The kubelet and Prometheus come from outside the node's loopback;
    // the admin API must not. No container ports: with hostNetwork the
    // scheduler counts them as host ports, and the surge pod of a rolling
    // update (which binds them beside the old one with SO_REUSEPORT) would
    // never fit on the node.
    for (flag, addr) in [
        ("--metrics-addr", args.metrics_addr),
        ("--ready-addr", args.ready_addr),
    ] {
        p.check(!addr.ip().is_loopback(), || {
            format!("{flag} {addr} is loopback: the kubelet and Prometheus cannot reach it")
        });
    }
    p.check(c.ports.as_ref().is_none_or(Vec::is_empty), || {
        "the agent container declares ports: with hostNetwork they are host ports to the scheduler, and the rolling update's surge pod could not be placed".into()
    });
    p.check(args.admin_addr.ip().is_loopback(), || {
        format!("--admin-addr {} is not loopback: the unauthenticated read-only admin pages would face the node's network", args.admin_addr)
    });

    // Host namespaces.
    p.check(pod.host_network == Some(true), || {
        "hostNetwork is not true".into()
    });
    if pod.host_network == Some(true) {
        p.check(pod.dns_policy.as_deref() == Some("ClusterFirstWithHostNet"), || {
            format!("dnsPolicy is {:?}: with hostNetwork only ClusterFirstWithHostNet resolves Service names", pod.dns_policy)
        });
    }
    if args.proc_root == Path::new("/proc") {
        p.check(pod.host_pid == Some(true), || {
            "--proc-root is /proc but hostPID is not true: pods' processes are invisible".into()
        });
    } else {
        let host = w.host_path_of(c, &args.proc_root);
        p.check(host.as_deref() == Some(Path::new("/proc")), || {
            format!(
                "--proc-root {} is not the node's /proc (hostPath {host:?})",
                args.proc_root.display()
            )
        });
    }

    // Node directories.
    if let Some((mnt, vol, _)) = w.mount_for(&mut p, c, "--bpf-dir", &args.bpf_dir) {
        let host = vol.host_path.as_ref().map(|h| h.path.as_str());
        p.check(host == Some(mnt.mount_path.as_str()), || {
            format!("--bpf-dir {} is on volume {} (hostPath {host:?}), not the node's {}: pins would die with the container", args.bpf_dir.display(), vol.name, mnt.mount_path)
        });
        let propagation = mnt.mount_propagation.as_deref();
        p.check(matches!(propagation, Some("HostToContainer" | "Bidirectional")), || {
            format!("the mount holding --bpf-dir has propagation {propagation:?}: a bpffs the node mounts later stays unseen")
        });
    }
    if let Some((mnt, vol, _)) = w.mount_for(&mut p, c, "--state-dir", &args.state_dir) {
        p.check(vol.host_path.is_some(), || {
            format!("--state-dir {} is on volume {}, not a hostPath: enrolled pods would be forgotten at restart", args.state_dir.display(), vol.name)
        });
        p.check(mnt.read_only != Some(true), || {
            "the mount holding --state-dir is read-only".into()
        });
    }
    let cgroups: Vec<PathBuf> = match &args.cgroup {
        Some(c) => vec![c.clone()],
        None => CGROUP_ROOTS.iter().map(PathBuf::from).collect(),
    };
    for cg in cgroups {
        let host = w.host_path_of(c, &cg);
        p.check(host.as_deref() == Some(cg.as_path()), || {
            format!("cgroup {} shows node path {host:?}: the programs must attach to the node's cgroup tree", cg.display())
        });
    }

    // Identity for the cluster.
    p.check(args.mesh.kubernetes, || {
        "MESH_KUBERNETES is not true: the agent would not read the cluster".into()
    });
    let node_env = c.env.iter().flatten().find(|e| e.name == "MESH_NODE_NAME");
    let node_field = node_env
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    p.check(node_field == Some("spec.nodeName"), || {
        format!("MESH_NODE_NAME comes from {node_field:?}, not the downward API's spec.nodeName that pods are matched by")
    });
    match w.token_at(c, &args.mesh.ca_token) {
        Some(t) => p.check(t.expiration_seconds.is_some_and(|s| s >= 600), || {
            format!(
                "the CA token's expirationSeconds {:?} is unset or below the API's minimum of 600",
                t.expiration_seconds
            )
        }),
        None => p.fail(format!(
            "--ca-token {} is not a projected ServiceAccount token",
            args.mesh.ca_token.display()
        )),
    }

    // Privileges.
    let sc = c.security_context.as_ref();
    p.check(sc.and_then(|s| s.privileged) != Some(true), || {
        "the agent container is privileged".into()
    });
    let dropped = capabilities(c, |c| &c.drop);
    p.check(dropped.contains("ALL"), || {
        format!("capabilities drop {dropped:?}, not ALL")
    });
    let added = capabilities(c, |c| &c.add);
    let expected: BTreeSet<String> = AGENT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
    p.check(added == expected, || {
        format!("capabilities add {added:?}, the reasoned set is {expected:?} (change both, and the README's table)")
    });
    p.assert_none(&format!("{} disagrees with `mesh-agent node`", w.name));
}
