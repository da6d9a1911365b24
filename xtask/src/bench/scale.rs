//! How the cost grows with what the agent knows: new connections per second
//! with many AuthorizationPolicies in the destination's namespace that
//! never match the client (as ratios to the same run without them), and
//! the agent's resident set and time to ready with many workloads stored.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use mesh_tests::mesh::namespace_yaml;

use super::{
    Placement, Results, idle, load,
    paths::{self, Path, wait_for},
    status_kib, tune_for_connections, verify,
};

/// Policy counts, and stored workload counts, measured in a full run and
/// in the quick check.
pub const POLICIES: &[usize] = &[0, 1000, 10_000];
const QUICK_POLICIES: &[usize] = &[0, 1000];
const WORKLOADS: &[usize] = &[0, 10_000, 30_000];
const QUICK_WORKLOADS: &[usize] = &[0, 1000];
/// How long the configuration is in place before the agent starts: as on
/// a node where the agent restarts, its files are older than the agent's
/// settle time (300 ms), so it parses them at first sight. A file written
/// the moment before is parsed only once it has settled.
const CONFIG_AGE: Duration = Duration::from_millis(400);

/// A DENY policy in the server's namespace that never matches the client
/// (`bench/client`): another peer's principal, another namespace, or a
/// principal and a port. Each is in the form the agent indexes (exact
/// values), as policies naming peers usually are.
fn deny_policy(i: usize) -> String {
    let rule = match i % 3 {
        0 => format!("from: [{{source: {{principals: ['cluster.local/ns/bench/sa/other-{i}']}}}}]"),
        1 => format!("from: [{{source: {{namespaces: ['team-{i}']}}}}]"),
        _ => format!(
            "from: [{{source: {{principals: ['cluster.local/ns/team-{i}/sa/app']}}}}], \
             to: [{{operation: {{ports: ['{}']}}}}]",
            paths::HTTP_PORT
        ),
    };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: deny-{i:05}, namespace: bench}}\n\
         spec:\n  action: DENY\n  rules: [{{{rule}}}]\n"
    )
}

pub fn measure(
    results: &mut Results,
    reps: usize,
    seconds: f64,
    quick: bool,
) -> anyhow::Result<()> {
    policies(results, reps, seconds, quick).context("policies")?;
    workloads(results, reps, quick).context("stored workloads")
}

fn policies(results: &mut Results, reps: usize, seconds: f64, quick: bool) -> anyhow::Result<()> {
    let counts = if quick { QUICK_POLICIES } else { POLICIES };
    let mut tb = super::testbed(2, "scale-policies")?;
    let client = tb.add_pod(0, "client")?;
    let server = tb.add_pod(1, "server")?;
    tune_for_connections(&tb, &[&client, &server])?;
    paths::start_servers(&mut tb, &server)?;
    let targets = Path::MeshEbpf.start(&mut tb, &client, 0, &server, 1)?;
    let base = paths::mesh_docs(&client, 0, &server, 1);
    let warm = load(&tb, &client, targets.http, 4, 1000.0, 0.5, false)?;
    verify::no_failures(&warm, "warm-up")?;
    verify::carried_over_hbone(&tb, Path::MeshEbpf, 1, 4)?;
    let policies: Vec<String> = (0..counts[counts.len() - 1]).map(deny_policy).collect();
    let mut made = 4.0;
    for rep in 0..reps {
        let mut without = f64::NAN;
        for &n in counts {
            let mut docs = base.clone();
            docs.extend(policies[..n].iter().cloned());
            tb.write_config(&docs)?;
            let series = r#"mesh_config_objects{kind="authorization_policies"}"#;
            wait_for(Duration::from_secs(120), || {
                Ok([0, 1]
                    .iter()
                    .all(|&node| tb.agent(node).metric(series).is_ok_and(|v| v == n as f64)))
            })
            .with_context(|| format!("the agents did not load {n} policies"))?;
            let r = load(&tb, &client, targets.http, 4, 0.0, seconds, true)?;
            // Policies that do not match the client must not refuse it, and
            // every connection must still be HBONE with its identity.
            verify::no_failures(&r, &format!("new connections with {n} policies"))?;
            made += r["requests"].as_f64().unwrap_or(0.0);
            verify::carried_over_hbone(&tb, Path::MeshEbpf, 1, made as usize)?;
            let rate = r["rps"].as_f64().unwrap_or(f64::NAN);
            results.add(
                Placement::Scale,
                Path::MeshEbpf,
                &format!("policies_{n}_conn_per_s"),
                rate,
            );
            if n == 0 {
                without = rate;
            } else {
                let ratio = rate / without;
                results.add(
                    Placement::Scale,
                    Path::MeshEbpf,
                    &format!("policies_{n}_ratio"),
                    ratio,
                );
                // The quick check's bound on the absurd (a debug build on a
                // busy machine: not the target): unrelated policies must not
                // cost most of the rate. A full run reports the figure.
                ensure!(
                    !quick || ratio > 0.3,
                    "{n} non-matching policies cut new connections/s to {ratio:.2}x of none"
                );
            }
        }
        println!("    rep {}/{reps} done", rep + 1);
    }
    Ok(())
}

/// The format of the configuration file the agent starts from.
#[derive(Clone, Copy, PartialEq)]
enum Format {
    Yaml,
    /// One `kind: List`, as `kubectl get -o json` writes it.
    Json,
}

/// The YAML documents as the items of a JSON `kind: List`, each indented
/// as a pretty printer writes it.
fn json_items(docs: &[String]) -> anyhow::Result<Vec<String>> {
    docs.iter()
        .map(|doc| {
            let value: serde_json::Value = serde_yaml::from_str(doc)?;
            Ok(serde_json::to_string_pretty(&value)?)
        })
        .collect()
}

fn write_json_list(path: &std::path::Path, items: &[&String]) -> anyhow::Result<()> {
    let mut text = String::from("{\n\"apiVersion\": \"v1\",\n\"kind\": \"List\",\n\"items\": [\n");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            text.push_str(",\n");
        }
        text.push_str(item);
    }
    text.push_str("\n]\n}\n");
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn workloads(results: &mut Results, reps: usize, quick: bool) -> anyhow::Result<()> {
    let counts = if quick { QUICK_WORKLOADS } else { WORKLOADS };
    let mut tb = super::testbed(1, "scale-workloads")?;
    let yaml_args = tb.mesh_args()?;
    let json_path = tb.config_path().with_extension("json");
    let json_args = tb.mesh_args_with_config(&json_path)?;
    let pods: Vec<String> = (0..counts[counts.len() - 1])
        .map(idle::remote_pod_yaml)
        .collect();
    let namespace = namespace_yaml("elsewhere", false);
    let namespace_json = json_items(std::slice::from_ref(&namespace))?;
    let pods_json = json_items(&pods)?;
    for rep in 0..reps {
        let mut empty = f64::NAN;
        for (&n, format) in counts
            .iter()
            .flat_map(|n| [(n, Format::Yaml), (n, Format::Json)])
        {
            let (args, written) = match format {
                Format::Yaml => {
                    let mut docs = vec![namespace.clone()];
                    docs.extend(pods[..n].iter().cloned());
                    tb.write_config(&docs)?;
                    (&yaml_args, tb.config_path())
                }
                Format::Json => {
                    let items: Vec<&String> =
                        namespace_json.iter().chain(&pods_json[..n]).collect();
                    write_json_list(&json_path, &items)?;
                    (&json_args, json_path.clone())
                }
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            // On disk before the agent starts, as a configuration that
            // outlived the agent before is: else the kernel writes the
            // hundreds of MB written here back to disk some 30 s later,
            // on a core some later start is measured on.
            std::fs::File::open(&written)?.sync_all()?;
            std::thread::sleep(CONFIG_AGE);
            // Ready (`/healthz/ready` answers 200, polled every 10 ms) once
            // the first snapshot of the whole configuration is in.
            let started = Instant::now();
            tb.start_agent(0, &args)?;
            let ready = started.elapsed().as_secs_f64() * 1000.0;
            // The gauge is set by a task of its own once the snapshot is
            // out, a moment after the agent answers ready from it.
            let series = r#"mesh_config_objects{kind="workloads"}"#;
            let mut stored = f64::NAN;
            wait_for(Duration::from_secs(10), || {
                stored = tb.agent(0).metric(series)?;
                Ok(stored == n as f64)
            })
            .with_context(|| format!("ready with {stored} workloads stored, not {n}"))?;
            let record = |results: &mut Results, metric: String, value: f64| {
                results.add(Placement::Scale, Path::MeshEbpf, &metric, value);
            };
            if format == Format::Json {
                // The start from JSON: its time to ready; memory is
                // measured from YAML.
                record(results, format!("workloads_{n}_json_ready_ms"), ready);
                idle::stop_and_uninstall(&mut tb)?;
                continue;
            }
            if !quick {
                std::thread::sleep(idle::SETTLE);
            }
            let rss = status_kib(tb.agent(0).pid(), "VmRSS")? as f64;
            record(results, format!("workloads_{n}_ready_ms"), ready);
            record(results, format!("workloads_{n}_rss_mib"), rss / 1024.0);
            if n == 0 {
                empty = rss;
            } else {
                record(
                    results,
                    format!("workloads_{n}_per_workload_kib"),
                    (rss - empty) / n as f64,
                );
            }
            idle::stop_and_uninstall(&mut tb)?;
        }
        println!("    rep {}/{reps} done", rep + 1);
    }
    Ok(())
}
