//! Idle memory: one agent with nothing, then with enrolled pods, then with
//! many more workloads in its store (pods on other nodes, as a cluster's
//! watch would deliver them). Each step waits until the agent shows the
//! new state (enrolled pods; `mesh_config_objects{kind="workloads"}`), lets
//! it settle and reads its resident set.

use std::time::Duration;

use anyhow::Context as _;
use mesh_tests::{
    Pod, Testbed,
    mesh::{namespace_yaml, pod_yaml, with_netns},
};

use super::{Placement, Results, paths::Path, paths::wait_for, status_kib};

/// How long the agent is left alone before its RSS is read.
const SETTLE: Duration = Duration::from_secs(2);

/// A Pod object for a workload on another node: in the store, never
/// enrolled here.
fn remote_pod_yaml(i: usize) -> String {
    let ip4 = format!("10.100.{}.{}", i / 250, i % 250 + 1);
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: w{i}\n  namespace: elsewhere\n  labels:\n    app: w{app}\n\
         spec:\n  nodeName: other-node\n  serviceAccountName: sa{app}\n\
         status:\n  phase: Running\n  podIP: {ip4}\n  podIPs:\n  - ip: {ip4}\n  - ip: fd00:200::{i:x}\n",
        app = i % 500,
    )
}

pub fn measure(
    results: &mut Results,
    reps: usize,
    pods: usize,
    workloads: usize,
) -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let enrolled: Vec<Pod> = (0..pods)
        .map(|i| tb.add_pod(0, &format!("app{i}")))
        .collect::<anyhow::Result<_>>()?;
    // Each pod its own ServiceAccount, so its own certificate: the
    // conservative case.
    let pod_docs: Vec<String> = enrolled
        .iter()
        .enumerate()
        .map(|(i, p)| with_netns(&pod_yaml(p, 0, "idle", &format!("sa{i}"), &[]), p))
        .collect();
    let remote_docs: Vec<String> = (0..workloads).map(remote_pod_yaml).collect();
    let namespaces = vec![
        namespace_yaml("idle", true),
        namespace_yaml("elsewhere", false),
    ];
    let args = tb.mesh_args()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let record = |results: &mut Results, metric: &str, value: f64| {
        results.add(Placement::Idle, Path::MeshEbpf, metric, value);
    };
    for rep in 0..reps {
        tb.write_config(&namespaces)?;
        tb.start_agent(0, &args)?;
        let rss = |tb: &Testbed| -> anyhow::Result<f64> {
            std::thread::sleep(SETTLE);
            Ok(status_kib(tb.agent(0).pid(), "VmRSS")? as f64)
        };
        let empty = rss(&tb)?;

        let mut docs = namespaces.clone();
        docs.extend(pod_docs.iter().cloned());
        tb.write_config(&docs)?;
        wait_for(Duration::from_secs(60), || {
            Ok(tb.agent(0).pod_names()?.len() == pods)
        })
        .context("enrolling the idle pods")?;
        let with_pods = rss(&tb)?;

        docs.extend(remote_docs.iter().cloned());
        tb.write_config(&docs)?;
        let series = r#"mesh_config_objects{kind="workloads"}"#;
        wait_for(Duration::from_secs(120), || {
            // No series before the first snapshot.
            Ok(tb
                .agent(0)
                .metric(series)
                .is_ok_and(|n| n == (pods + workloads) as f64))
        })
        .context("loading the workloads")?;
        let with_workloads = rss(&tb)?;

        record(results, "idle_rss_mib", empty / 1024.0);
        record(results, "idle_rss_pods_mib", with_pods / 1024.0);
        record(
            results,
            "idle_rss_pods_workloads_mib",
            with_workloads / 1024.0,
        );
        record(
            results,
            "rss_per_pod_kib",
            (with_pods - empty) / pods as f64,
        );
        record(
            results,
            "rss_per_workload_kib",
            (with_workloads - with_pods) / workloads as f64,
        );
        // The next repetition starts from nothing: no agent, no saved pods.
        tb.kill_agent(0)?;
        let node = &tb.nodes[0];
        let out = std::process::Command::new(mesh_tests::agent_bin())
            .arg("uninstall")
            .arg("--bpf-dir")
            .arg(&node.bpf_dir)
            .arg("--state-dir")
            .arg(&node.state_dir)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "mesh-agent uninstall: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("    rep {}/{reps} done", rep + 1);
    }
    Ok(())
}
