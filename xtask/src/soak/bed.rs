//! The soak's world and its faults. Two nodes with an agent each; on each a
//! client pod and a server pod of namespace `shop`, and on node 1 a pod of
//! namespace `batch` that leaves the mesh and comes back. The configuration
//! is a directory of three files: `base.yaml` (namespace `shop` and its four
//! pods: rewritten), `mover.yaml` (namespace `batch` and its pod: churned),
//! `policy.yaml` (the DENY policy: there only while in force). Node 0's
//! agent is the one killed; node 1's lives through the run and is the one
//! whose memory and file descriptors are checked.

use std::{
    fs,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use mesh_tests::{
    Pod, Testbed, Value,
    mesh::{namespace_yaml, pod_yaml, with_netns},
};

use super::timeline::{Churn, ChurnKind, Denial, Restart, Rewrite, Timeline, WriteKind};

/// The servers' app port, and the port the DENY policy covers.
pub const APP_PORT: u16 = 8080;
pub const DENY_PORT: u16 = 8081;
/// Workload certificates live this long and are renewed at half of it.
pub const CERT_TTL: Duration = Duration::from_secs(10);
/// The node whose agent is killed, and the one whose agent lives on.
pub const KILLED: usize = 0;
pub const SURVIVOR: usize = 1;
/// How long a killed agent stays down.
const DOWN: Duration = Duration::from_secs(1);
/// How long the DENY policy stays in force, and the pod out of the mesh.
const DENY_FOR: Duration = Duration::from_secs(3);
const OUT_FOR: Duration = Duration::from_secs(2);
/// A change must reach every agent within this.
const APPLY_LIMIT: Duration = Duration::from_secs(10);
const POLICY_NAME: &str = "soak-deny";
/// The label `base.yaml` rewrites: its value is the file's version.
const VERSION_LABEL: &str = "soak/version";

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The agent's resident memory and open file descriptors.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Sample {
    pub rss_kib: u64,
    pub fds: usize,
}

impl Sample {
    pub fn of(pid: u32) -> anyhow::Result<Sample> {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("the agent (pid {pid}) is gone"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmRSS")?;
        let fds = fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        Ok(Sample { rss_kib, fds })
    }

    pub fn max(self, other: Sample) -> Sample {
        Sample {
            rss_kib: self.rss_kib.max(other.rss_kib),
            fds: self.fds.max(other.fds),
        }
    }
}

/// Where the pod that churns stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mover {
    In,
    Out(ChurnKind),
}

pub struct Bed {
    pub tb: Testbed,
    pub client0: Pod,
    pub server0: Pod,
    pub client1: Pod,
    pub server1: Pod,
    pub mover1: Pod,
    config: PathBuf,
    args: Vec<String>,
    version: u64,
    pub timeline: Timeline,
    /// The surviving agent's largest sample during the run.
    pub peak: Sample,
}

impl Bed {
    /// Builds the nodes and pods, starts the servers, writes the
    /// configuration and starts both agents; returns once every pod is
    /// enrolled.
    pub fn new() -> anyhow::Result<Bed> {
        let mut tb = Testbed::new(2).context("building the simulated nodes")?;
        crate::interrupt::clean_up_on_interrupt(&tb.prefix)?;
        let client0 = tb.add_pod(0, "client0")?;
        let server0 = tb.add_pod(0, "server0")?;
        let client1 = tb.add_pod(1, "client1")?;
        let server1 = tb.add_pod(1, "server1")?;
        let mover1 = tb.add_pod(1, "mover1")?;
        for server in [&server0, &server1] {
            for port in [APP_PORT, DENY_PORT] {
                tb.serve(server, SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port))?;
            }
        }
        let config = tb.workdir().join("config");
        fs::create_dir_all(&config)?;
        let mut args = tb.mesh_args_with_config(&config)?;
        args.extend(["--cert-ttl".into(), format!("{}s", CERT_TTL.as_secs())]);
        let mut bed = Bed {
            tb,
            client0,
            server0,
            client1,
            server1,
            mover1,
            config,
            args,
            version: 0,
            timeline: Timeline::default(),
            peak: Sample::default(),
        };
        bed.write("base.yaml", &bed.base_yaml(0), WriteKind::Atomic)?;
        bed.write("mover.yaml", &bed.mover_yaml(Mover::In), WriteKind::Atomic)?;
        for node in [KILLED, SURVIVOR] {
            bed.start_agent(node)?;
        }
        bed.wait_enrolled(KILLED, &["shop/client0", "shop/server0"])?;
        bed.wait_enrolled(SURVIVOR, &["shop/client1", "shop/server1", "batch/mover1"])?;
        Ok(bed)
    }

    fn start_agent(&mut self, node: usize) -> anyhow::Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.tb.start_agent(node, &args)
    }

    /// Where each pod is, for the verdict.
    pub fn topology(&self) -> super::verdict::Topology {
        super::verdict::Topology {
            client_node: [(&self.client0, 0), (&self.client1, 1), (&self.mover1, 1)]
                .into_iter()
                .map(|(p, n)| (p.name.clone(), n))
                .collect(),
            server_node: [(&self.server0, 0), (&self.server1, 1)]
                .into_iter()
                .map(|(p, n)| (p.ip4, n))
                .collect(),
            deny_port: DENY_PORT,
        }
    }

    /// The clients' traffic at `rate` requests per second in all, as
    /// `mesh-load soak` specs: (pod, specs).
    pub fn traffic(&self, rate: f64) -> Vec<(Pod, Vec<String>)> {
        let to = |p: &Pod, port| SocketAddr::new(p.ip4, port);
        let req = |p: &Pod, port, share: f64| format!("req={}@{}", to(p, port), rate * share);
        let hold = |p: &Pod, port, n: usize| format!("hold={}@{n}", to(p, port));
        let (s0, s1) = (&self.server0, &self.server1);
        vec![
            (
                self.client0.clone(),
                vec![
                    req(s1, APP_PORT, 0.2),
                    req(s0, APP_PORT, 0.1),
                    req(s1, DENY_PORT, 0.1),
                    hold(s1, APP_PORT, 2),
                    hold(s1, DENY_PORT, 1),
                ],
            ),
            (
                self.client1.clone(),
                vec![
                    req(s0, APP_PORT, 0.2),
                    req(s1, APP_PORT, 0.1),
                    req(s0, DENY_PORT, 0.1),
                    hold(s0, APP_PORT, 2),
                    hold(s0, DENY_PORT, 1),
                ],
            ),
            (
                self.mover1.clone(),
                vec![req(s1, APP_PORT, 0.1), req(s0, APP_PORT, 0.1)],
            ),
        ]
    }

    fn pod_doc(
        &self,
        pod: &Pod,
        node: usize,
        ns: &str,
        sa: &str,
        labels: &[(&str, &str)],
    ) -> String {
        with_netns(&pod_yaml(pod, node, ns, sa, labels), pod)
    }

    /// Namespace `shop` and its four pods, at a version.
    fn base_yaml(&self, version: u64) -> String {
        let v = version.to_string();
        let docs = [
            namespace_yaml("shop", true),
            self.pod_doc(
                &self.client0,
                0,
                "shop",
                "client",
                &[("app", "client"), (VERSION_LABEL, &v)],
            ),
            self.pod_doc(
                &self.server0,
                0,
                "shop",
                "server",
                &[("app", "server"), (VERSION_LABEL, &v)],
            ),
            self.pod_doc(
                &self.client1,
                1,
                "shop",
                "client",
                &[("app", "client"), (VERSION_LABEL, &v)],
            ),
            self.pod_doc(
                &self.server1,
                1,
                "shop",
                "server",
                &[("app", "server"), (VERSION_LABEL, &v)],
            ),
        ];
        docs.join("---\n")
    }

    /// Namespace `batch` and its pod, in the mesh or let out one way.
    fn mover_yaml(&self, state: Mover) -> String {
        let ambient = state != Mover::Out(ChurnKind::NamespaceLabel);
        let mut docs = vec![namespace_yaml("batch", ambient)];
        match state {
            Mover::Out(ChurnKind::PodObject) => {}
            Mover::Out(ChurnKind::PodLabel) => docs.push(self.pod_doc(
                &self.mover1,
                1,
                "batch",
                "mover",
                &[("app", "mover"), ("istio.io/dataplane-mode", "none")],
            )),
            _ => docs.push(self.pod_doc(&self.mover1, 1, "batch", "mover", &[("app", "mover")])),
        }
        docs.join("---\n")
    }

    fn policy_yaml() -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {POLICY_NAME}\n  namespace: shop\n\
             spec:\n  selector:\n    matchLabels:\n      app: server\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"{DENY_PORT}\"]\n"
        )
    }

    /// Writes a configuration file the way `how` says.
    fn write(&self, name: &str, content: &str, how: WriteKind) -> anyhow::Result<()> {
        let path = self.config.join(name);
        match how {
            WriteKind::Atomic | WriteKind::Broken => {
                // A hidden file: the agent reads no hidden file.
                let tmp = self.config.join(format!(".{name}.tmp"));
                fs::write(&tmp, content)?;
                fs::rename(&tmp, &path)?;
            }
            WriteKind::InPlace => {
                let mut f = fs::File::create(&path)?;
                let bytes = content.as_bytes();
                let cuts = [0, bytes.len() / 3 + 7, 2 * bytes.len() / 3 + 5, bytes.len()];
                for (i, w) in cuts.windows(2).enumerate() {
                    if i > 0 {
                        // Shorter than the agent's 300 ms settle time: a
                        // careful reader never takes a piece for the file.
                        std::thread::sleep(Duration::from_millis(80));
                    }
                    f.write_all(&bytes[w[0]..w[1]])?;
                    f.flush()?;
                }
            }
        }
        Ok(())
    }

    /// Every agent's `/config_dump`, until `done` holds for each; the time
    /// it held for the last one.
    fn wait_all(&self, what: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<f64> {
        let deadline = Instant::now() + APPLY_LIMIT;
        for node in [KILLED, SURVIVOR] {
            loop {
                let (status, body) = self.tb.agent(node).http("GET", "/config_dump", None)?;
                let dump: Value = serde_json::from_str(&body).unwrap_or_default();
                if status == 200 && done(&dump) {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "{what}: not seen by the agent of node {node} after {APPLY_LIMIT:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(now())
    }

    /// Polls an agent's `/pods` until `done` holds for the names; the time.
    fn wait_pods(
        &self,
        node: usize,
        what: &str,
        done: impl Fn(&[String]) -> bool,
    ) -> anyhow::Result<f64> {
        let deadline = Instant::now() + APPLY_LIMIT;
        loop {
            let names = self.tb.agent(node).pod_names()?;
            if done(&names) {
                return Ok(now());
            }
            ensure!(
                Instant::now() < deadline,
                "{what} on node {node} after {APPLY_LIMIT:?}: it lists {names:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_enrolled(&self, node: usize, pods: &[&str]) -> anyhow::Result<f64> {
        self.wait_pods(node, &format!("{pods:?} not enrolled"), |names| {
            pods.iter().all(|p| names.iter().any(|n| n == p))
        })
    }

    /// Sleeps, sampling the surviving agent's memory and descriptors.
    pub fn idle(&mut self, time: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + time;
        loop {
            self.peak = self.peak.max(self.survivor_sample()?);
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(Duration::from_millis(250)));
        }
    }

    pub fn survivor_sample(&self) -> anyhow::Result<Sample> {
        Sample::of(self.tb.agent(SURVIVOR).pid())
    }

    /// Kills node 0's agent with SIGKILL, leaves it down a second, starts
    /// it again and waits until it has taken its pods back.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let agent = self.tb.agent(KILLED);
        let pods = agent.pod_names()?;
        let log = agent.log.clone();
        let restored_lines = || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("restored enrolled pod")
                .count()
        };
        let before = restored_lines();
        let killed = now();
        self.tb.kill_agent(KILLED)?;
        std::thread::sleep(DOWN);
        self.start_agent(KILLED)?;
        let ready = now();
        let names: Vec<&str> = pods.iter().map(String::as_str).collect();
        let pods_back = self.wait_enrolled(KILLED, &names)?;
        let restored = restored_lines() - before;
        ensure!(
            restored == pods.len(),
            "the restarted agent restored {restored} pod(s) from its state directory, not its {}",
            pods.len()
        );
        self.timeline.restarts.push(Restart {
            node: KILLED,
            killed,
            ready,
            pods_back,
            restored,
        });
        Ok(())
    }

    /// The DENY policy written, left in force, and removed.
    pub fn flip_policy(&mut self) -> anyhow::Result<()> {
        let has_policy = |d: &Value| {
            d["config"]["authorization_policies"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == POLICY_NAME))
        };
        let written = now();
        self.write("policy.yaml", &Self::policy_yaml(), WriteKind::Atomic)?;
        let applied = self.wait_all("the DENY policy", has_policy)?;
        self.idle(DENY_FOR)?;
        let lifted = now();
        fs::remove_file(self.config.join("policy.yaml"))?;
        let cleared = self.wait_all("the DENY policy's removal", |d| !has_policy(d))?;
        self.timeline.denials.push(Denial {
            written,
            applied,
            lifted,
            cleared,
        });
        Ok(())
    }

    /// The churning pod let out of the mesh `how`, and taken back.
    pub fn churn(&mut self, how: ChurnKind) -> anyhow::Result<()> {
        let name = "batch/mover1";
        let left = now();
        self.write(
            "mover.yaml",
            &self.mover_yaml(Mover::Out(how)),
            WriteKind::Atomic,
        )?;
        let released = self.wait_pods(SURVIVOR, &format!("{name} not released"), |names| {
            !names.iter().any(|n| n == name)
        })?;
        self.idle(OUT_FOR)?;
        let back = now();
        self.write("mover.yaml", &self.mover_yaml(Mover::In), WriteKind::Atomic)?;
        let enrolled = self.wait_enrolled(SURVIVOR, &[name])?;
        self.timeline.churns.push(Churn {
            pod: self.mover1.name.clone(),
            how,
            left,
            released,
            back,
            enrolled,
        });
        Ok(())
    }

    /// `base.yaml` (every steady pod) rewritten with its next version.
    pub fn rewrite(&mut self, how: WriteKind) -> anyhow::Result<()> {
        let next = self.version + 1;
        let at = now();
        if how == WriteKind::Broken {
            // A syntax error after the first pod: a reader that applied
            // what parsed before it would drop three pods.
            let good = self.base_yaml(next);
            let cut = good
                .match_indices("---\n")
                .nth(1)
                .map_or(good.len(), |(i, _)| i);
            let broken = format!("{}---\nkind: [unclosed\n{}", &good[..cut], &good[cut..]);
            self.write("base.yaml", &broken, how)?;
            self.wait_all("the syntax error in base.yaml", |d| {
                d["config"]["warnings"].as_array().is_some_and(|ws| {
                    ws.iter().any(|w| {
                        w["kind"] == "parse_error"
                            && w["object"]
                                .as_str()
                                .is_some_and(|o| o.contains("base.yaml"))
                    })
                })
            })?;
            let version = self.version;
            self.wait_all("the last good base.yaml kept whole", |d| {
                all_at_version(d, version)
            })?;
        }
        let how_written = if how == WriteKind::Broken {
            WriteKind::Atomic
        } else {
            how
        };
        self.write("base.yaml", &self.base_yaml(next), how_written)?;
        let applied = self.wait_all("the new base.yaml", |d| all_at_version(d, next))?;
        self.version = next;
        self.timeline.rewrites.push(Rewrite { how, at, applied });
        Ok(())
    }

    /// What explains a failure, and goes with the testbed: the agents'
    /// logs and the packet captures.
    pub fn kept_files(&self) -> Vec<PathBuf> {
        let captures = fs::read_dir(self.tb.workdir())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "pcapng"));
        self.agent_logs()
            .into_iter()
            .map(|(_, log)| log)
            .chain(captures)
            .collect()
    }

    /// The logs of both agents (node 0's holds every instance's).
    pub fn agent_logs(&self) -> Vec<(usize, PathBuf)> {
        [KILLED, SURVIVOR]
            .into_iter()
            .map(|n| (n, self.tb.workdir().join(format!("agent-n{n}.log"))))
            .collect()
    }

    pub fn config_dir(&self) -> &Path {
        &self.config
    }
}

/// Whether the four steady pods are all at `version` in this dump.
fn all_at_version(dump: &Value, version: u64) -> bool {
    let v = version.to_string();
    let Some(workloads) = dump["config"]["workloads"].as_array() else {
        return false;
    };
    let at: Vec<&Value> = workloads
        .iter()
        .filter(|w| w["namespace"] == "shop")
        .collect();
    at.len() == 4 && at.iter().all(|w| w["labels"][VERSION_LABEL] == v.as_str())
}

/// Fails unless every event of a run without faults went through.
pub fn check_quiet(what: &str, tally: &super::verdict::Tally) -> anyhow::Result<()> {
    if tally.unexpected_total() > 0 {
        bail!(
            "{what}: {} unexpected failure(s) before any fault, e.g.:\n  {}",
            tally.unexpected_total(),
            tally.examples.join("\n  ")
        );
    }
    Ok(())
}
