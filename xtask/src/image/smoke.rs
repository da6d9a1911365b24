//! The container smoke test (`cargo xtask image --test`, and in CI): the
//! image under podman, run exactly as `deploy/daemonset.yaml` runs it. The
//! podman flags come from the manifest itself (host network and PID
//! namespaces, user, capabilities, seccomp and AppArmor, read-only root,
//! the mounts with their propagation, the environment, the grace period,
//! the probes' paths and ports), so a capability or mount the container
//! needs and the manifest lacks fails here, not on a cluster.
//!
//! What a cluster gives and this machine has not is replaced, and only
//! that: no API server and no cluster CA, so the agent reads the testbed's
//! YAML and signs with the testbed's root (the `ca-root` volume holds it),
//! instead of `MESH_KUBERNETES`, `MESH_CA_ADDRESS` and `MESH_CA_ROOT`; its
//! pins and programs go where the testbed cleans up (`--bpf-dir`,
//! `--cgroup`), and its state hostPath is the testbed node's directory.
//! Pods are found through host processes as in a cluster: each Pod's
//! netns annotation is `/proc/PID/ns/net` of a process of the pod, which the
//! container sees only with the host's PID namespace and opens only with
//! CAP_SYS_PTRACE.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_tests::{
    Agent, Pod, Testbed,
    mesh::{namespace_yaml, pod_yaml},
};
use serde::Deserialize as _;
use serde_yaml::Value;

use super::{Built, output};
use crate::exec;

const PORT: u16 = 8080;
/// The environment that points the agent at the cluster (API server, CA):
/// not passed here, where neither exists. Each must be in the manifest, so
/// a renamed variable fails the test instead of going unnoticed.
const CLUSTER_ENV: &[&str] = &["MESH_KUBERNETES", "MESH_CA_ADDRESS", "MESH_CA_ROOT"];
/// Kubernetes' default when the manifest sets none.
const DEFAULT_GRACE_SECONDS: u64 = 30;
/// Where the testbed's directory (its configuration) is mounted.
const TESTBED_MOUNT: &str = "/testbed";

/// The agent container as the DaemonSet describes it.
#[derive(Debug)]
struct AgentSpec {
    args: Vec<String>,
    env: Vec<(String, EnvValue)>,
    /// podman flags for the pod and container security settings.
    security: Vec<String>,
    mounts: Vec<Mount>,
    grace: Duration,
    readiness: (String, u16),
    liveness: (String, u16),
}

#[derive(Debug)]
enum EnvValue {
    Literal(String),
    NodeName,
}

#[derive(Debug)]
struct Mount {
    name: String,
    path: String,
    read_only: bool,
    /// podman's propagation option for the manifest's mountPropagation.
    propagation: &'static str,
    volume: Volume,
}

#[derive(Debug)]
enum Volume {
    HostPath { path: String, directory: bool },
    ServiceAccountToken { path: String },
    ConfigMap,
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

fn text(v: &Value, path: &str) -> Result<String> {
    at(v, path)
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{path} is not a string"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl AgentSpec {
    fn parse(manifest: &str) -> Result<Self> {
        let mut daemonset = None;
        for doc in serde_yaml::Deserializer::from_str(manifest) {
            let v = Value::deserialize(doc)?;
            if v["kind"].as_str() == Some("DaemonSet") {
                daemonset = Some(v);
            }
        }
        let ds = daemonset.context("no DaemonSet in the manifest")?;
        let pod = at(&ds, "spec.template.spec");
        let container = pod["containers"]
            .as_sequence()
            .and_then(|c| c.iter().find(|c| c["name"].as_str() == Some("agent")))
            .context("no container `agent` in the DaemonSet")?;
        let mut security = Vec::new();
        // Host network: the agent's ports are the node's, and podman runs
        // inside the node's namespace. Without it the test could not work
        // as written, so it is not optional here.
        ensure!(
            pod["hostNetwork"].as_bool() == Some(true),
            "the DaemonSet does not use the host network"
        );
        security.push("--network=host".into());
        if pod["hostPID"].as_bool() == Some(true) {
            security.push("--pid=host".into());
        }
        let sc = &container["securityContext"];
        if let Some(uid) = sc["runAsUser"].as_i64() {
            let gid = sc["runAsGroup"].as_i64().unwrap_or(uid);
            security.push(format!("--user={uid}:{gid}"));
        }
        if sc["privileged"].as_bool() == Some(true) {
            security.push("--privileged".into());
        }
        if sc["readOnlyRootFilesystem"].as_bool() == Some(true) {
            // Kubernetes adds no writable /tmp or /run; podman would.
            security.push("--read-only".into());
            security.push("--read-only-tmpfs=false".into());
        }
        for cap in strings(&sc["capabilities"]["drop"]) {
            security.push(format!("--cap-drop={}", cap.to_lowercase()));
        }
        for cap in strings(&sc["capabilities"]["add"]) {
            security.push(format!("--cap-add={cap}"));
        }
        match sc["seccompProfile"]["type"].as_str() {
            // podman's default profile is the runtime's default.
            None | Some("RuntimeDefault") => {}
            Some("Unconfined") => security.push("--security-opt=seccomp=unconfined".into()),
            Some(other) => bail!("seccompProfile {other}: not mapped to podman"),
        }
        match sc["appArmorProfile"]["type"].as_str() {
            None | Some("RuntimeDefault") => {}
            Some("Unconfined") => security.push("--security-opt=apparmor=unconfined".into()),
            Some(other) => bail!("appArmorProfile {other}: not mapped to podman"),
        }
        let mut env = Vec::new();
        for e in container["env"].as_sequence().into_iter().flatten() {
            let name = text(e, "name")?;
            let value = if let Some(v) = e["value"].as_str() {
                EnvValue::Literal(v.to_owned())
            } else if at(e, "valueFrom.fieldRef.fieldPath").as_str() == Some("spec.nodeName") {
                EnvValue::NodeName
            } else {
                bail!("env {name}: only values and spec.nodeName are mapped");
            };
            env.push((name, value));
        }
        for name in CLUSTER_ENV {
            ensure!(
                env.iter().any(|(n, _)| n == name),
                "{name} is not in the manifest any more: update the smoke test's CLUSTER_ENV"
            );
        }
        let volumes = pod["volumes"].as_sequence().cloned().unwrap_or_default();
        let mut mounts = Vec::new();
        for m in container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            let name = text(m, "name")?;
            let v = volumes
                .iter()
                .find(|v| v["name"].as_str() == Some(name.as_str()))
                .with_context(|| format!("volumeMount {name} has no volume"))?;
            let volume = if v["hostPath"].is_mapping() {
                Volume::HostPath {
                    path: text(v, "hostPath.path")?,
                    directory: at(v, "hostPath.type").as_str() == Some("Directory"),
                }
            } else if v["configMap"].is_mapping() {
                Volume::ConfigMap
            } else if let Some(token) = at(v, "projected.sources")
                .as_sequence()
                .and_then(|s| s.iter().find(|s| s["serviceAccountToken"].is_mapping()))
            {
                Volume::ServiceAccountToken {
                    path: text(token, "serviceAccountToken.path")?,
                }
            } else {
                bail!("volume {name}: its type is not mapped to podman");
            };
            let propagation = match m["mountPropagation"].as_str() {
                None | Some("None") => "rprivate",
                Some("HostToContainer") => "rslave",
                Some("Bidirectional") => "rshared",
                Some(other) => bail!("mountPropagation {other}"),
            };
            mounts.push(Mount {
                name,
                path: text(m, "mountPath")?,
                read_only: m["readOnly"].as_bool() == Some(true),
                propagation,
                volume,
            });
        }
        // The memory limit: the kernel charges the agent's BPF maps to it
        // too. (No CPU limit is set, on purpose.)
        if let Some(limit) = at(container, "resources.limits.memory").as_str() {
            security.push(format!("--memory={}", bytes(limit)?));
        }
        let probe = |which: &str| -> Result<(String, u16)> {
            let get = &container[which]["httpGet"];
            Ok((
                text(get, "path")?,
                get["port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .with_context(|| format!("{which}: a numeric port"))?,
            ))
        };
        Ok(AgentSpec {
            args: strings(&container["args"]),
            env,
            security,
            mounts,
            grace: Duration::from_secs(
                pod["terminationGracePeriodSeconds"]
                    .as_u64()
                    .unwrap_or(DEFAULT_GRACE_SECONDS),
            ),
            readiness: probe("readinessProbe")?,
            liveness: probe("livenessProbe")?,
        })
    }
}

/// A Kubernetes memory quantity (`128Mi`, `1Gi`, `500M`, bytes) in bytes.
fn bytes(quantity: &str) -> Result<u64> {
    let units: [(&str, u64); 6] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    let (number, unit) = units
        .iter()
        .find_map(|(suffix, unit)| quantity.strip_suffix(suffix).map(|n| (n, *unit)))
        .unwrap_or((quantity, 1));
    let n: u64 = number
        .parse()
        .with_context(|| format!("memory quantity {quantity}: not mapped"))?;
    Ok(n * unit)
}

/// podman with the test's own store, run inside a node's network
/// namespace (nsenter keeps the mounts, which `ip netns exec` would not),
/// so that `--network=host` is the node's network.
struct Podman<'a> {
    store: &'a Store,
    netns: &'a str,
}

impl Podman<'_> {
    fn cmd(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg("podman");
        self.store.flags(&mut c);
        c
    }
}

/// The test's container storage; dropping it removes its containers,
/// images and files.
struct Store {
    dir: PathBuf,
}

impl Store {
    fn flags(&self, c: &mut Command) {
        c.arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args([
                "--storage-driver=vfs",
                "--cgroup-manager=cgroupfs",
                "--events-backend=file",
                // crun refuses a hybrid cgroup layout (v1 controllers with
                // cgroup v2 beside them), which runc accepts.
                "--runtime=runc",
            ]);
    }

    fn podman(&self) -> Command {
        let mut c = Command::new("podman");
        self.flags(&mut c);
        c
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = exec::probe(self.podman().args(["rm", "--all", "--force", "--time=0"]));
        let _ = exec::probe(self.podman().args(["rmi", "--all", "--force"]));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The pods of one node's check.
struct Pods {
    frontend: Pod,
    backend: Pod,
}

pub fn run(built: &Built) -> Result<()> {
    let root = crate::workspace_root();
    println!(
        "==> smoke test: {} as deploy/daemonset.yaml runs it",
        built.reference
    );
    // The test app the pods run, next to this xtask binary.
    exec::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(super::SMOKE_BUILD),
    )?;
    let spec = AgentSpec::parse(&fs::read_to_string(root.join("deploy/daemonset.yaml"))?)?;
    println!("smoke: the manifest's container: {spec:?}");

    // Node 0's agent captures with eBPF (the default), node 1's with
    // iptables (the image's iptables and its modules).
    let mut tb = Testbed::new(2).context("building the simulated nodes")?;
    crate::interrupt::clean_up_on_interrupt(&tb.prefix)?;
    let started = Instant::now();
    let mut docs = vec![namespace_yaml("shop", true)];
    let mut nodes = Vec::new();
    for node in 0..2 {
        let suffix = if node == 0 { "" } else { "-iptables" };
        let frontend = tb.add_pod(node, &format!("frontend{suffix}"))?;
        let backend = tb.add_pod(node, &format!("backend{suffix}"))?;
        // One process in each pod: what the agent finds its namespace by.
        let server = tb.serve(&backend, SocketAddr::new(backend.ip4, PORT))?;
        let idle = tb.serve(&frontend, "127.0.0.1:7000".parse()?)?;
        for (p, handle) in [(&frontend, idle), (&backend, server)] {
            let pid = tb.child_pid(handle);
            docs.push(
                pod_yaml(p, node, "shop", &p.name, &[("app", p.name.as_str())]).replacen(
                    "metadata:\n",
                    &format!(
                        "metadata:\n  annotations:\n    mesh-agent/netns: /proc/{pid}/ns/net\n"
                    ),
                    1,
                ),
            );
        }
        nodes.push(Pods { frontend, backend });
    }
    tb.write_config(&docs)?;

    let store = Store {
        dir: tb.workdir().join("podman"),
    };
    let dir = store.dir.clone();
    // Ctrl-C: the containers (they live outside the testbed's cgroups)
    // and the store go too.
    crate::interrupt::also_on_interrupt(move || drop(Store { dir }));
    output(
        store
            .podman()
            .arg("load")
            .arg("--input")
            .arg(&built.archive),
    )?;
    for (node, pods) in nodes.iter().enumerate() {
        let capture = if node == 0 { "ebpf" } else { "iptables" };
        println!("smoke: node {node}, capture {capture}");
        let netns = tb.nodes[node].netns.clone();
        let podman = Podman {
            store: &store,
            netns: &netns,
        };
        let name = format!("{}-n{node}-agent", tb.prefix);
        let result = start(&mut tb, &podman, &spec, built, node, &name, capture)
            .and_then(|()| check(&mut tb, &podman, &name, &spec, node, pods));
        if result.is_err() {
            eprintln!(
                "--- container log ---\n{}",
                tb.nodes[node]
                    .agent
                    .as_ref()
                    .map(Agent::log_text)
                    .unwrap_or_default()
            );
        }
        result.with_context(|| format!("node {node} (capture {capture})"))?;
    }
    println!("smoke: passed in {:.1}s", started.elapsed().as_secs_f64());
    // The containers and their store go first, then the testbed.
    drop(store);
    drop(tb);
    Ok(())
}

/// `podman run` of the agent on `node`, flags from the manifest, until the
/// test stops it.
fn start(
    tb: &mut Testbed,
    podman: &Podman,
    spec: &AgentSpec,
    built: &Built,
    node: usize,
    name: &str,
    capture: &str,
) -> Result<()> {
    let ca = tb.ca_dir()?;
    let token = tb.workdir().join("ca-token");
    fs::create_dir_all(&token)?;
    let nd = &tb.nodes[node];
    let mut run = podman.cmd();
    run.args(["run", "--pull=never", "--name", name]);
    run.args(&spec.security);
    run.args(inherited_limits()?);
    for m in &spec.mounts {
        let source: PathBuf = match &m.volume {
            // The node's state directory is the testbed node's.
            Volume::HostPath { path, .. } if path == "/var/run/mesh" => nd.state_dir.clone(),
            Volume::HostPath { path, directory } => {
                ensure!(
                    !directory || Path::new(path).is_dir(),
                    "hostPath {path} (type Directory) is not a directory on this machine"
                );
                PathBuf::from(path)
            }
            Volume::ServiceAccountToken { path } => {
                fs::write(token.join(path), "unused: no cluster CA here\n")?;
                token.clone()
            }
            Volume::ConfigMap if m.name == "ca-root" => ca.clone(),
            Volume::ConfigMap => bail!("configMap volume {}: nothing to mount", m.name),
        };
        let mode = if m.read_only { "ro" } else { "rw" };
        run.arg(format!(
            "--volume={}:{}:{mode},{}",
            source.display(),
            m.path,
            m.propagation
        ));
    }
    run.arg(format!(
        "--volume={}:{TESTBED_MOUNT}:ro",
        tb.workdir().display()
    ));
    for (key, value) in &spec.env {
        if CLUSTER_ENV.contains(&key.as_str()) {
            continue;
        }
        let value = match value {
            EnvValue::Literal(v) => v.clone(),
            // What pod_yaml gives the node's pods as spec.nodeName.
            EnvValue::NodeName => format!("node{node}"),
        };
        run.arg(format!("--env={key}={value}"));
    }
    run.arg("--env=MESH_LOG=info,mesh_agent=debug");
    run.arg(&built.id);
    run.args(&spec.args);
    let ca_root = spec
        .mounts
        .iter()
        .find(|m| m.name == "ca-root")
        .map(|m| m.path.clone())
        .context("no ca-root mount")?;
    run.args(["--capture", capture])
        .args(["--bpf-dir", &nd.bpf_dir.display().to_string()])
        .args(["--cgroup", &nd.cgroup.display().to_string()])
        .args(["--config", &format!("{TESTBED_MOUNT}/config.yaml")])
        .args(["--config-poll", "100ms"])
        .args([
            "--ca-cert",
            &format!("{ca_root}/{}", mesh_tests::probe::ROOT_CERT),
        ])
        .args([
            "--ca-key",
            &format!("{ca_root}/{}", mesh_tests::probe::ROOT_KEY),
        ]);
    let log = tb.workdir().join(format!("container-n{node}.log"));
    let log_file = fs::File::create(&log)?;
    println!("$ {}", exec::display(&run));
    let child = run
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting podman")?;
    let netns = nd.netns.clone();
    tb.nodes[node].agent = Some(Agent::adopt(child, &netns, log));
    Ok(())
}

/// `--ulimit` flags that keep the limits podman runs with, as a kubelet's
/// containers keep the runtime's. podman's own default raises them to the
/// kernel's maximum, which fails where the engine lacks CAP_SYS_RESOURCE
/// (as in some sandboxes); podman also lowers its own process limit to
/// 32768 when it starts.
fn inherited_limits() -> Result<Vec<String>> {
    let limits = fs::read_to_string("/proc/self/limits")?;
    let hard = |what: &str| -> Result<u64> {
        let line = limits
            .lines()
            .find(|l| l.starts_with(what))
            .with_context(|| format!("no {what} in /proc/self/limits"))?;
        let field = line[what.len()..]
            .split_whitespace()
            .nth(1)
            .unwrap_or_default();
        Ok(field.parse().unwrap_or(u64::MAX))
    };
    let nofile = hard("Max open files")?;
    let nproc = hard("Max processes")?.min(32768);
    Ok(vec![
        format!("--ulimit=nofile={nofile}:{nofile}"),
        format!("--ulimit=nproc={nproc}:{nproc}"),
    ])
}

fn check(
    tb: &mut Testbed,
    podman: &Podman,
    name: &str,
    spec: &AgentSpec,
    node: usize,
    pods: &Pods,
) -> Result<()> {
    let (frontend, backend) = (&pods.frontend, &pods.backend);
    let agent = tb.agent(node);
    let (ready_path, ready_port) = &spec.readiness;
    let waited = mesh_tests::converge(
        "the container's readiness probe answers 200",
        Duration::from_secs(60),
        || {
            let state =
                exec::probe(
                    podman
                        .cmd()
                        .args(["inspect", "--format", "{{.State.Status}}", name]),
                );
            ensure!(
                state.as_deref() != Some("exited"),
                "the container exited before it was ready"
            );
            Ok(agent
                .request(*ready_port, "GET", ready_path, None)
                .is_ok_and(|(status, _)| status == 200))
        },
    )?;
    println!(
        "smoke: ready: GET :{ready_port}{ready_path} answered 200 {:.1}s after `podman run`",
        waited.as_secs_f64()
    );
    let (live_path, live_port) = &spec.liveness;
    let (status, page) = agent.request(*live_port, "GET", live_path, None)?;
    ensure!(
        status == 200,
        "liveness GET :{live_port}{live_path} answered {status}"
    );
    println!(
        "smoke: live: GET :{live_port}{live_path} answered 200 ({} lines)",
        page.lines().count()
    );

    let want = [
        format!("shop/{}", backend.name),
        format!("shop/{}", frontend.name),
    ];
    mesh_tests::converge(
        "both pods enrolled (found through /proc/PID/ns/net)",
        Duration::from_secs(20),
        || {
            let mut names = agent.pod_names()?;
            names.sort();
            Ok(names == want)
        },
    )
    .with_context(|| format!("enrolled: {:?}", agent.pod_names()))?;
    println!("smoke: enrolled: {want:?}");

    let hbone = "mesh_proxy_connections_total{direction=\"hbone\",result=\"forwarded\"}";
    let before = agent.metric_or_absent(hbone)?;
    let to = SocketAddr::new(backend.ip4, PORT);
    let r = tb.connect(frontend, to, 64 * 1024)?;
    ensure!(
        r["ok"] == true && r["sent"] == 65536 && r["received"] == 65536,
        "frontend -> backend: not all 64 KiB came back: {r}"
    );
    // eBPF capture connects the client's socket to the agent's 15001 (its
    // peer shows it); iptables NAT keeps the dialed address as the peer.
    ensure!(
        node != 0 || r["peer"].as_str().is_some_and(|p| p.ends_with(":15001")),
        "frontend -> backend was not captured on the way out: {r}"
    );
    ensure!(
        mesh_tests::delivered_by_agent(&r),
        "frontend -> backend was not delivered by the agent: {r}"
    );
    agent.wait_metric(hbone, before + 1.0)?;
    let principal = format!(
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/{}\"",
        frontend.name
    );
    let workload = format!("destination_workload=\"{}\"", backend.name);
    mesh_tests::converge(
        "the destination reports the frontend's principal",
        Duration::from_secs(10),
        || {
            Ok(agent.metrics()?.lines().any(|l| {
                l.starts_with("istio_tcp_connections_closed_total")
                    && l.contains("reporter=\"destination\"")
                    && l.contains(&principal)
                    && l.contains(&workload)
            }))
        },
    )?;
    println!(
        "smoke: frontend -> backend {to}: 64 KiB echoed over HBONE ({hbone} {before} -> {}), the destination saw {principal}",
        before + 1.0
    );

    let grace = spec.grace;
    let stop_started = Instant::now();
    exec::run(
        podman
            .cmd()
            .args(["stop", "--time", &grace.as_secs().to_string(), name]),
    )?;
    let took = stop_started.elapsed();
    let status = tb.nodes[0].agent.as_mut().expect("started above").wait()?;
    let code = output(
        podman
            .cmd()
            .args(["inspect", "--format", "{{.State.ExitCode}}", name]),
    )?;
    ensure!(
        code == "0" && status.success(),
        "after SIGTERM the agent exited with {code} (podman run: {status})"
    );
    ensure!(
        took < grace,
        "stopping took {took:?}, not under the grace period {grace:?}"
    );
    ensure!(
        tb.nodes[node].agent.as_ref().is_some_and(|a| {
            let log = a.log_text();
            log.contains("draining: new connections go to the next agent")
                && log.contains("drained: no connection left")
        }),
        "the agent did not log its orderly stop (draining, then drained)"
    );
    println!(
        "smoke: stopped: SIGTERM, exit code 0 after {:.2}s (grace period {}s)",
        took.as_secs_f64(),
        grace.as_secs()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemonset() -> String {
        fs::read_to_string(crate::workspace_root().join("deploy/daemonset.yaml")).unwrap()
    }

    #[test]
    fn the_daemonsets_agent_container_becomes_podman_flags() {
        let spec = AgentSpec::parse(&daemonset()).unwrap();
        assert_eq!(spec.args, ["node"]);
        for flag in [
            "--network=host",
            "--pid=host",
            "--user=0:0",
            "--read-only",
            "--read-only-tmpfs=false",
            "--cap-drop=all",
            "--cap-add=SYS_ADMIN",
            "--cap-add=NET_ADMIN",
            "--cap-add=SYS_PTRACE",
            "--security-opt=apparmor=unconfined",
            "--memory=1073741824",
        ] {
            assert!(spec.security.iter().any(|f| f == flag), "{flag}: {spec:?}");
        }
        let bpffs = spec
            .mounts
            .iter()
            .find(|m| m.path == "/sys/fs/bpf")
            .unwrap();
        assert_eq!((bpffs.read_only, bpffs.propagation), (false, "rslave"));
        let cgroup = spec
            .mounts
            .iter()
            .find(|m| m.path == "/sys/fs/cgroup")
            .unwrap();
        assert!(cgroup.read_only);
        assert!(
            spec.env
                .iter()
                .any(|(k, v)| k == "MESH_NODE_NAME" && matches!(v, EnvValue::NodeName))
        );
        assert_eq!(spec.grace, Duration::from_secs(DEFAULT_GRACE_SECONDS));
        assert_eq!(spec.readiness, ("/healthz/ready".to_owned(), 15021));
        assert_eq!(spec.liveness, ("/metrics".to_owned(), 15020));
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(bytes("128Mi").unwrap(), 128 << 20);
        assert_eq!(bytes("1Gi").unwrap(), 1 << 30);
        assert_eq!(bytes("500M").unwrap(), 500_000_000);
        assert_eq!(bytes("4096").unwrap(), 4096);
        assert!(bytes("1.5Gi").is_err());
    }

    /// What the smoke test cannot reproduce fails it, with the reason.
    #[test]
    fn what_cannot_be_mapped_is_refused() {
        let manifest = daemonset();
        for (from, to, why) in [
            (
                "        - name: state\n          hostPath:\n            path: /var/run/mesh\n            type: DirectoryOrCreate\n",
                "        - name: state\n          emptyDir: {}\n",
                "volume state",
            ),
            (
                "fieldPath: spec.nodeName",
                "fieldPath: metadata.name",
                "MESH_NODE_NAME",
            ),
            (
                "name: MESH_CA_ROOT",
                "name: MESH_CA_ROOT_FILE",
                "MESH_CA_ROOT",
            ),
            ("hostNetwork: true", "hostNetwork: false", "host network"),
        ] {
            assert!(manifest.contains(from), "{from}");
            let err = AgentSpec::parse(&manifest.replacen(from, to, 1)).unwrap_err();
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
    }
}
