//! Namespaced test harness: simulated nodes and pods built from network
//! namespaces, veth pairs, bridges and cgroup v2 directories, with the real
//! agent and its eBPF programs. Everything a [`Testbed`] makes carries its
//! unique prefix and is removed when it is dropped, test failure included.
//! Addresses are private ranges inside namespaces the testbed made; nothing
//! touches the host's own network.
//!
//! Layout: a fabric namespace with bridge `fab0` (10.250.0.0/24) links the
//! nodes; node `i` routes its pod subnet 10.(i+1).0.0/24 and fd00:(i+1)::/64
//! through its own bridge `br0`; pods get `.10+j` / `::a+j`.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};

pub use serde_json::Value;

mod agent;
pub mod cluster;
pub mod httpapp;
pub mod mesh;
pub mod metrics;
pub mod probe;
pub mod soak;
pub mod waypoint;

pub use agent::Agent;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The IP part of an address as the test app prints it (`1.2.3.4:5`,
/// `[fd00::1]:5`), with a v4-mapped address (as a dual-stack server sees IPv4
/// peers) given as IPv4.
pub fn ip_of(addr: &str) -> String {
    addr.rsplit_once(':')
        .map(|(ip, _)| ip.trim_matches(['[', ']']))
        .map(|ip| ip.strip_prefix("::ffff:").unwrap_or(ip).to_owned())
        .unwrap_or_default()
}

/// Whether the test app's server saw a connection the agent delivered on the
/// client's behalf (its accepted socket carries the agent's local-delivery
/// mark), rather than one that reached it directly. The peer address cannot
/// tell: the agent connects from the client's own address.
pub fn delivered_by_agent(r: &Value) -> bool {
    r["server_mark"].as_str() == Some(&mesh_common::AGENT_LOCAL_MARK.to_string())
}

/// The port part of an address as the test app prints it.
pub fn port_of(addr: &str) -> String {
    addr.rsplit(':').next().unwrap_or_default().to_owned()
}

/// Polls `done` every 20 ms until it holds, for at most `limit`; returns
/// how long it took. What a test waits for is an event it can see (a
/// counter, a log line, a dump), never a fixed time.
pub fn converge(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !done()? {
        ensure!(
            start.elapsed() < limit,
            "not converged after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(start.elapsed())
}

/// Fails the test loudly unless it runs as root: these tests load eBPF and
/// create namespaces, and must never pass by skipping.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "namespaced tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run them through `cargo xtask ci` as root"
    );
}

/// Runs a command, failing with its output when it fails.
pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    sh("ip", args).map(drop)
}

/// The cgroup v2 mount of this machine.
pub fn cgroup2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .next()
        .expect("cgroup v2 is mounted (the agent attaches its programs to a cgroup v2 directory)")
}

/// Binaries the tests run: the agent from the same target directory as the
/// test, the test app built alongside this crate.
pub fn agent_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MESH_AGENT_BIN") {
        return PathBuf::from(p);
    }
    sibling_bin("mesh-agent")
}

/// A binary of this workspace: from `MESH_BIN_DIR` when set (the benchmark
/// runs a release build), else next to the running one: `target/<profile>/`
/// for xtask, one level up from `deps/` for a test.
pub fn sibling_bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("MESH_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe has a directory");
    let candidates = [dir.join(name), dir.parent().unwrap_or(dir).join(name)];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| panic!("{name} not found next to {}: build it first (`cargo build -p mesh-agent -p mesh-tests --bins`, which `cargo xtask ci` does)", exe.display()))
}

/// `sh -c` script: `$0` is a cgroup directory, `$1` a netns path, the rest a
/// command. The shell moves itself into the cgroup first (entering a netns
/// with `ip netns exec` would remount /sys and hide the cgroup mount).
const IN_POD: &str =
    r#"echo $$ > "$0/cgroup.procs" && ns="$1" && shift && exec nsenter --net="$ns" -- "$@""#;

/// A command that runs `program` inside `cgroup` and network namespace `netns`.
fn in_cgroup_netns(cgroup: &Path, netns: &str, program: &Path) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(IN_POD)
        .arg(cgroup)
        .arg(format!("/run/netns/{netns}"))
        .arg(program);
    c
}

pub struct Testbed {
    pub prefix: String,
    /// This testbed's number in this process.
    seq: u32,
    pub nodes: Vec<Node>,
    fabric: String,
    cgroup: PathBuf,
    children: Vec<Child>,
    pub workdir: PathBuf,
    /// Agents (waypoints) the testbed keeps running until it is dropped.
    kept: Vec<Agent>,
    /// The API stand-in and the cluster CA, once started.
    cluster: Option<cluster::Cluster>,
    /// `MESH_LOG` of the agents and waypoints it starts: the agent's debug
    /// lines by default (tests read them), see [`Testbed::log_agents_at`].
    agent_log: String,
    /// Where its logs are copied when it is dropped, before its work
    /// directory goes ([`Testbed::keep_logs_in`]).
    logs_to: Option<PathBuf>,
}

pub struct Node {
    pub index: usize,
    pub netns: String,
    pub cgroup: PathBuf,
    pub bpf_dir: PathBuf,
    pub state_dir: PathBuf,
    pub pods: Vec<Pod>,
    pub agent: Option<Agent>,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// Its Pod object's `metadata.uid` when the API holds it; the pod's
    /// cgroup is named after it (`pod<uid>`), as the kubelet names it, so
    /// an agent finds the pod's namespace from the UID alone.
    pub uid: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.netns))
    }
}

impl Testbed {
    /// A fabric and `nodes` empty nodes.
    pub fn new(nodes: usize) -> anyhow::Result<Self> {
        require_root();
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("mt{}x{seq}", std::process::id() % 100_000);
        let workdir = std::env::temp_dir().join(format!("mesh-tests-{prefix}"));
        fs::create_dir_all(&workdir)?;
        let cgroup = cgroup2_root().join(&prefix);
        let mut tb = Testbed {
            seq,
            fabric: format!("{prefix}-fab"),
            prefix,
            nodes: Vec::new(),
            cgroup,
            children: Vec::new(),
            workdir,
            kept: Vec::new(),
            cluster: None,
            agent_log: TEST_AGENT_LOG.to_owned(),
            logs_to: None,
        };
        fs::create_dir_all(&tb.cgroup).context("creating the testbed cgroup")?;
        ip(&["netns", "add", &tb.fabric])?;
        ip(&["-n", &tb.fabric, "link", "set", "lo", "up"])?;
        ip(&["-n", &tb.fabric, "link", "add", "fab0", "type", "bridge"])?;
        ip(&["-n", &tb.fabric, "link", "set", "fab0", "up"])?;
        for i in 0..nodes {
            tb.add_node(i)?;
        }
        // Routes between nodes: each node reaches the others' pod subnets
        // through their fabric address.
        for i in 0..nodes {
            for j in 0..nodes {
                if i == j {
                    continue;
                }
                let ns = tb.nodes[i].netns.clone();
                ip(&[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    &format!("10.{}.0.0/24", j + 1),
                    "via",
                    &format!("10.250.0.{}", j + 1),
                ])?;
                ip(&[
                    "-n",
                    &ns,
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:{}::/64", j + 1),
                    "via",
                    &format!("fd00:250::{}", j + 1),
                ])?;
            }
        }
        Ok(tb)
    }

    fn add_node(&mut self, i: usize) -> anyhow::Result<()> {
        let netns = format!("{}-n{i}", self.prefix);
        let n = i + 1;
        ip(&["netns", "add", &netns])?;
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        )?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let fab_if = format!("n{i}");
        ip(&[
            "-n",
            &netns,
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            &fab_if,
            "netns",
            &self.fabric,
        ])?;
        ip(&[
            "-n",
            &self.fabric,
            "link",
            "set",
            &fab_if,
            "master",
            "fab0",
            "up",
        ])?;
        ip(&["-n", &netns, "link", "set", "up0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("10.250.0.{n}/24"),
            "dev",
            "up0",
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("fd00:250::{n}/64"),
            "dev",
            "up0",
            "nodad",
        ])?;
        ip(&["-n", &netns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &netns, "link", "set", "br0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("10.{n}.0.1/24"),
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("fd00:{n}::1/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        let cgroup = self.cgroup.join(format!("n{i}"));
        fs::create_dir_all(&cgroup)?;
        let state_dir = self.workdir.join(format!("n{i}"));
        fs::create_dir_all(&state_dir)?;
        self.nodes.push(Node {
            index: i,
            bpf_dir: PathBuf::from(format!("/sys/fs/bpf/{}-n{i}", self.prefix)),
            netns,
            cgroup,
            state_dir,
            pods: Vec::new(),
            agent: None,
        });
        Ok(())
    }

    /// A pod on node `node`: a netns with `eth0` on the node's bridge, its
    /// addresses and default routes, and a cgroup under the node's.
    pub fn add_pod(&mut self, node: usize, name: &str) -> anyhow::Result<Pod> {
        let pod = self.next_pod(node, name)?;
        let nd = &self.nodes[node];
        let j = nd.pods.len();
        wire_pod(&nd.netns, node + 1, j, &pod.netns, pod.ip4, pod.ip6)?;
        fs::create_dir_all(&pod.cgroup)?;
        self.nodes[node].pods.push(pod.clone());
        Ok(pod)
    }

    /// The pod the next [`Testbed::add_pod`] on `node` makes (its netns
    /// name, cgroup and addresses), before it exists: for a configuration
    /// that names a pod whose sandbox is not there yet.
    pub fn next_pod(&self, node: usize, name: &str) -> anyhow::Result<Pod> {
        let nd = &self.nodes[node];
        let j = nd.pods.len();
        let n = node + 1;
        // Unique on this machine: other testbeds' pods are in /proc too.
        let uid = format!(
            "{:08x}-{:04x}-4000-8000-{:06x}{:06x}",
            std::process::id(),
            self.seq,
            node,
            j
        );
        Ok(Pod {
            name: name.to_owned(),
            netns: format!("{}-n{node}p{j}", self.prefix),
            cgroup: nd.cgroup.join(format!("pod{uid}")),
            uid,
            ip4: format!("10.{n}.0.{}", 10 + j).parse()?,
            ip6: format!("fd00:{n}::{:x}", 10 + j).parse()?,
        })
    }

    /// Re-creates a pod's sandbox, as a kubelet does after the old one died:
    /// a new network namespace under the same name, with the same link and
    /// addresses. The pod's processes are not restarted.
    pub fn recreate_pod_netns(&self, pod: &Pod) -> anyhow::Result<()> {
        let (node, j) = pod
            .netns
            .rsplit_once("-n")
            .and_then(|(_, nj)| nj.split_once('p'))
            .and_then(|(n, j)| Some((n.parse::<usize>().ok()?, j.parse::<usize>().ok()?)))
            .context("a testbed pod's netns name")?;
        // The old namespace may live on (the agent holds it): its link goes
        // first, as a CNI's DEL would remove it.
        let node_ns = &self.nodes[node].netns;
        ip(&["-n", node_ns, "link", "del", &format!("p{j}")])?;
        ip(&["netns", "del", &pod.netns])?;
        wire_pod(
            &self.nodes[node].netns,
            node + 1,
            j,
            &pod.netns,
            pod.ip4,
            pod.ip6,
        )
    }

    /// Where this testbed keeps its files.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Starts `cmd` inside `netns` and `cgroup` (moved into the cgroup first:
    /// entering a netns with `ip netns exec` would hide the cgroup mount).
    pub fn spawn_in(
        &mut self,
        netns: &str,
        cgroup: &Path,
        cmd: &Path,
        args: &[&str],
    ) -> anyhow::Result<usize> {
        let mut c = in_cgroup_netns(cgroup, netns, cmd);
        c.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = c
            .spawn()
            .with_context(|| format!("spawning {}", cmd.display()))?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    /// Starts the test app's echo server in a pod, listening on `addr`.
    /// Returns a handle for [`Testbed::stop`].
    pub fn serve(&mut self, pod: &Pod, addr: SocketAddr) -> anyhow::Result<usize> {
        let app = testapp_bin();
        let idx = self.spawn_in(&pod.netns, &pod.cgroup, &app, &["serve", &addr.to_string()])?;
        let out = self.children[idx].stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        ensure!(
            line.starts_with("listening"),
            "server in {} did not start: {line:?}",
            pod.name
        );
        Ok(idx)
    }

    /// The standard output of a process started by [`Testbed::spawn_in`],
    /// for the caller to read (once).
    pub fn take_stdout(&mut self, handle: usize) -> Option<ChildStdout> {
        self.children[handle].stdout.take()
    }

    /// A TCP listener in `pod` on `addr` that never accepts: the kernel
    /// completes handshakes into its backlog and nothing ever answers (a
    /// peer that hangs). It listens until dropped.
    pub fn listen_silently(&self, pod: &Pod, addr: SocketAddr) -> anyhow::Result<TcpListener> {
        let ns = fs::File::open(pod.netns_path())?;
        std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<TcpListener> {
                nix::sched::setns(
                    std::os::fd::AsFd::as_fd(&ns),
                    nix::sched::CloneFlags::CLONE_NEWNET,
                )?;
                Ok(TcpListener::bind(addr)?)
            })
            .join()
            .expect("listener thread")
        })
    }

    /// The process ID of a process started by the testbed (the program
    /// itself: the wrapper shell and nsenter exec it).
    pub fn child_pid(&self, handle: usize) -> u32 {
        self.children[handle].id()
    }

    /// Stops a process started by the testbed.
    pub fn stop(&mut self, handle: usize) -> anyhow::Result<()> {
        let c = &mut self.children[handle];
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// One connection from a (new) process in `pod` to `dst`, `bytes` echoed.
    pub fn connect(&self, pod: &Pod, dst: SocketAddr, bytes: usize) -> anyhow::Result<Value> {
        self.run_app(pod, &["connect", &dst.to_string(), &bytes.to_string()])
    }

    /// One connection from a (new) process on node `node` itself (its
    /// network namespace, as the kubelet runs), to `dst`, `bytes` echoed.
    pub fn connect_from_node(
        &self,
        node: usize,
        dst: SocketAddr,
        bytes: usize,
    ) -> anyhow::Result<Value> {
        let n = &self.nodes[node];
        let out = in_cgroup_netns(&n.cgroup, &n.netns, &testapp_bin())
            .args(["connect", &dst.to_string(), &bytes.to_string()])
            .output()?;
        ensure!(
            out.status.success(),
            "test app on node {node} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Starts the test app in `pod` with its stdin and stdout piped to the caller.
    pub fn spawn_piped(
        &mut self,
        pod: &Pod,
        args: &[&str],
    ) -> anyhow::Result<(ChildStdin, BufReader<ChildStdout>)> {
        let idx = self.spawn_in(&pod.netns, &pod.cgroup, &testapp_bin(), args)?;
        let child = &mut self.children[idx];
        Ok((
            child.stdin.take().expect("piped"),
            BufReader::new(child.stdout.take().expect("piped")),
        ))
    }

    /// Runs `program` once in `pod` and returns its standard output.
    pub fn run_in_pod(&self, pod: &Pod, program: &Path, args: &[&str]) -> anyhow::Result<String> {
        let out = in_cgroup_netns(&pod.cgroup, &pod.netns, program)
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "{} {args:?} in {} failed: {}",
            program.display(),
            pod.name,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the test app once in `pod` and parses the JSON line it prints.
    pub fn run_app(&self, pod: &Pod, args: &[&str]) -> anyhow::Result<Value> {
        let out = in_cgroup_netns(&pod.cgroup, &pod.netns, &testapp_bin())
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "test app {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// A long-lived client process in `pod`, for connections from the same
    /// process before and after a change.
    pub fn repl(&mut self, pod: &Pod) -> anyhow::Result<Repl> {
        let app = testapp_bin();
        let idx = self.spawn_in(&pod.netns, &pod.cgroup, &app, &["repl"])?;
        let child = &mut self.children[idx];
        Ok(Repl {
            stdin: child.stdin.take().expect("piped"),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
        })
    }

    /// The log filter (`MESH_LOG`) of the agents and waypoints started from
    /// now on. The bench gives the agent's own default (`info`: the access
    /// log, no debug lines) so that it measures the agent as deployed.
    pub fn log_agents_at(&mut self, filter: &str) {
        filter.clone_into(&mut self.agent_log);
    }

    /// When dropped, the testbed replaces what `dir` holds with its logs
    /// (the last [`KEPT_LOG_BYTES`] of each `*.log` of its work directory:
    /// its agents' and waypoints'), which would go with that directory.
    pub fn keep_logs_in(&mut self, dir: &Path) {
        self.logs_to = Some(dir.to_owned());
    }

    /// Starts the agent on a node (inside the node netns and cgroup) and
    /// waits until it is ready.
    pub fn start_agent(&mut self, node: usize, extra: &[&str]) -> anyhow::Result<()> {
        self.launch_agent(node, extra, true)
    }

    /// Starts the agent on a node and waits only until its admin server
    /// answers `/healthz/ready`, ready or not (an agent whose configuration
    /// cannot be read).
    pub fn start_agent_unready(&mut self, node: usize, extra: &[&str]) -> anyhow::Result<()> {
        self.launch_agent(node, extra, false)
    }

    /// Starts the agent; returns once `/healthz/ready` answers 200, or
    /// answers at all when `ready` is false.
    fn launch_agent(&mut self, node: usize, extra: &[&str], ready: bool) -> anyhow::Result<()> {
        self.launch_agent_with_env(node, extra, &[], ready)
    }

    /// [`Testbed::launch_agent`] with more environment variables.
    fn launch_agent_with_env(
        &mut self,
        node: usize,
        extra: &[&str],
        env: &[(String, String)],
        ready: bool,
    ) -> anyhow::Result<()> {
        let (netns, cgroup, bpf_dir, state_dir) = {
            let n = &self.nodes[node];
            (
                n.netns.clone(),
                n.cgroup.clone(),
                n.bpf_dir.clone(),
                n.state_dir.clone(),
            )
        };
        let log = self.workdir.join(format!("agent-n{node}.log"));
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut c = in_cgroup_netns(&cgroup, &netns, &agent_bin());
        c.arg("node")
            .arg("--bpf-dir")
            .arg(&bpf_dir)
            .arg("--cgroup")
            .arg(&cgroup)
            .arg("--state-dir")
            .arg(&state_dir)
            // The name `pod_yaml` gives the node in `spec.nodeName`.
            .arg("--node-name")
            .arg(format!("node{node}"))
            .args(extra)
            .env("MESH_LOG", &self.agent_log)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = c.spawn().context("spawning the agent")?;
        let mut agent = Agent {
            child,
            netns: netns.clone(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if agent
                .http("GET", "/healthz/ready", None)
                .is_ok_and(|(status, _)| status == 200 || !ready && status != 0)
            {
                break;
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "agent on node {node} exited ({status}) before it was ready; log:\n{}",
                    agent.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on node {node} not ready (or not answering, if !{ready}) after 20s; log:\n{}",
                    agent.log_text()
                );
            }
            std::thread::sleep(READY_POLL);
        }
        self.nodes[node].agent = Some(agent);
        Ok(())
    }

    /// Takes the running agent of `node` out of the testbed (it keeps
    /// running until dropped), so that another can start beside it.
    pub fn take_agent(&mut self, node: usize) -> Option<Agent> {
        self.nodes[node].agent.take()
    }

    pub fn agent(&self, node: usize) -> &Agent {
        self.nodes[node]
            .agent
            .as_ref()
            .expect("agent started on this node")
    }

    /// Stops the agent with SIGKILL: nothing of it runs, nothing is cleaned.
    pub fn kill_agent(&mut self, node: usize) -> anyhow::Result<()> {
        let mut a = self.nodes[node].agent.take().expect("agent running");
        a.child.kill()?;
        a.child.wait()?;
        Ok(())
    }
}

/// The agents' log filter in tests: their debug lines, which tests read.
const TEST_AGENT_LOG: &str = "info,mesh_agent=debug";

/// How often a starting agent's `/healthz/ready` is asked: the bench's
/// start-up figures are the time to the first 200, so this is their
/// resolution (one request costs a thread and a loopback connection).
const READY_POLL: Duration = Duration::from_millis(10);

/// A pod's netns `netns` with `eth0` on bridge `br0` of node netns
/// `node_ns` (node number `n`, from 1), its addresses and default routes.
fn wire_pod(
    node_ns: &str,
    n: usize,
    j: usize,
    netns: &str,
    ip4: IpAddr,
    ip6: IpAddr,
) -> anyhow::Result<()> {
    ip(&["netns", "add", netns])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    let host_if = format!("p{j}");
    ip(&[
        "-n", node_ns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns",
        netns,
    ])?;
    ip(&[
        "-n", node_ns, "link", "set", &host_if, "master", "br0", "up",
    ])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{ip4}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{ip6}/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    ip(&[
        "-n",
        netns,
        "route",
        "add",
        "default",
        "via",
        &format!("10.{n}.0.1"),
    ])?;
    ip(&[
        "-n",
        netns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("fd00:{n}::1"),
    ])
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.kept.clear();
        for n in &mut self.nodes {
            // Killed, and its log shown when the test failed, as it drops.
            drop(n.agent.take());
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The agents that talked to it are gone.
        drop(self.cluster.take());
        if let Some(dir) = &self.logs_to
            && let Err(e) = copy_logs(&self.workdir, dir, KEPT_LOG_BYTES)
        {
            eprintln!("keeping the testbed's logs in {}: {e}", dir.display());
        }
        cleanup(&self.prefix);
    }
}

/// How much of the end of each log [`Testbed::keep_logs_in`] keeps: a
/// bench's agents write an access line per connection, some hundred
/// thousand in a full run's testbed.
pub const KEPT_LOG_BYTES: u64 = 1 << 20;

/// Removes `dir` and what it holds; a directory that is not there is
/// already removed.
pub fn remove_dir_if_any(dir: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Replaces what `to` holds with the `*.log` files of `from`, each cut to
/// its last `max` bytes (a first line says how much was left out).
fn copy_logs(from: &Path, to: &Path, max: u64) -> std::io::Result<()> {
    use std::io::{Seek as _, SeekFrom, Write as _};
    remove_dir_if_any(to)?;
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let path = e?.path();
        let (Some(name), true) = (
            path.file_name(),
            path.extension().is_some_and(|x| x == "log"),
        ) else {
            continue;
        };
        let mut src = fs::File::open(&path)?;
        let mut dst = fs::File::create(to.join(name))?;
        let skipped = src.metadata()?.len().saturating_sub(max);
        if skipped > 0 {
            src.seek(SeekFrom::Start(skipped))?;
            writeln!(dst, "[the first {skipped} bytes of this log were left out]")?;
        }
        std::io::copy(&mut src, &mut dst)?;
    }
    Ok(())
}

/// Removes everything a testbed with this prefix made: processes left in its
/// cgroups, its namespaces, pins and state. Safe to call more than once and
/// after a crash (the demo calls it on Ctrl-C).
pub fn cleanup(prefix: &str) {
    let cgroup = cgroup2_root().join(prefix);
    kill_cgroup_tree(&cgroup);
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(&format!("{prefix}-")) {
                let _ = sh("ip", &["netns", "del", ns]);
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
        for e in entries.filter_map(Result::ok) {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{prefix}-"))
            {
                // Unlinking the pins detaches the programs and frees the maps.
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    remove_cgroup_tree(&cgroup);
    let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("mesh-tests-{prefix}")));
}

/// Visits `dir` and every cgroup below it, children before parents.
fn each_cgroup_bottom_up(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        if e.path().is_dir() {
            each_cgroup_bottom_up(&e.path(), f);
        }
    }
    f(dir);
}

fn kill_cgroup_tree(dir: &Path) {
    each_cgroup_bottom_up(dir, &mut |d| {
        for pid in fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: plain kill(2) on a pid read from our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    });
}

fn remove_cgroup_tree(dir: &Path) {
    each_cgroup_bottom_up(dir, &mut |d| {
        // A cgroup empties asynchronously after its last process is reaped.
        for _ in 0..50 {
            if fs::remove_dir(d).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

pub fn testapp_bin() -> PathBuf {
    sibling_bin("mesh-testapp")
}

pub struct Repl {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Repl {
    pub fn connect(&mut self, dst: SocketAddr, bytes: usize) -> anyhow::Result<Value> {
        writeln!(self.stdin, "{dst} {bytes}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(serde_json::from_str(&line)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_testbeds_logs_replace_what_was_kept_each_cut_to_its_end() {
        let root = std::env::temp_dir().join(format!("mesh-tests-logs-{}", std::process::id()));
        let (work, kept) = (root.join("work"), root.join("kept"));
        fs::create_dir_all(work.join("n0")).unwrap();
        fs::write(work.join("agent-n0.log"), "agent line\n").unwrap();
        fs::write(work.join("waypoint-w.log"), "waypoint line\n").unwrap();
        fs::write(work.join("config.yaml"), "kind: List\n").unwrap();
        fs::write(work.join("n0").join("inner.log"), "state\n").unwrap();
        fs::create_dir_all(&kept).unwrap();
        fs::write(kept.join("agent-n1.log"), "an earlier testbed's\n").unwrap();

        copy_logs(&work, &kept, 100).unwrap();

        let mut names: Vec<String> = fs::read_dir(&kept)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["agent-n0.log", "waypoint-w.log"]);
        assert_eq!(
            fs::read_to_string(kept.join("agent-n0.log")).unwrap(),
            "agent line\n"
        );
        // A directory that is not there yet is made; a long log keeps its
        // end.
        fs::remove_dir_all(&kept).unwrap();
        copy_logs(&work, &kept, 5).unwrap();
        assert_eq!(
            fs::read_to_string(kept.join("agent-n0.log")).unwrap(),
            "[the first 6 bytes of this log were left out]\nline\n"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
