//! Mesh-level harness: the Kubernetes YAML the agents read, a CA root the
//! agents share, long-lived sessions, the HBONE probe and packet captures
//! on a pod's link.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::{Pod, Testbed};

/// The label that puts a namespace's pods in the mesh.
pub const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");

pub fn namespace_yaml(name: &str, ambient: bool) -> String {
    let labels = if ambient {
        format!("\n  labels:\n    {}: {}", AMBIENT.0, AMBIENT.1)
    } else {
        String::new()
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n")
}

/// A Pod object for a testbed pod on node `node`, with both its addresses.
pub fn pod_yaml(
    pod: &Pod,
    node: usize,
    namespace: &str,
    service_account: &str,
    labels: &[(&str, &str)],
) -> String {
    let mut labels_yaml = String::new();
    for (k, v) in labels {
        labels_yaml.push_str(&format!("\n    {k}: \"{v}\""));
    }
    let labels_yaml = if labels.is_empty() {
        String::new()
    } else {
        format!("\n  labels:{labels_yaml}")
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}{labels_yaml}\n\
         spec:\n  nodeName: node{node}\n  serviceAccountName: {service_account}\n  containers:\n  - name: app\n    image: test\n    ports:\n    - name: http\n      containerPort: 8080\n\
         status:\n  phase: Running\n  podIP: {ip4}\n  podIPs:\n  - ip: {ip4}\n  - ip: {ip6}\n",
        name = pod.name,
        ip4 = pod.ip4,
        ip6 = pod.ip6,
    )
}

/// The same Pod object, with the annotation that names its network
/// namespace: the agent enrols it when its labels put it in the mesh.
pub fn with_netns(pod_yaml: &str, pod: &Pod) -> String {
    pod_yaml.replacen(
        "metadata:\n",
        &format!(
            "metadata:\n  annotations:\n    mesh-agent/netns: {}\n",
            pod.netns_path().display()
        ),
        1,
    )
}

/// The same Pod object with the pod's UID, as the API server gives it: a
/// node agent reading the API finds the pod's namespace from it.
pub fn with_uid(pod_yaml: &str, pod: &Pod) -> String {
    pod_yaml.replacen(
        "metadata:\n",
        &format!("metadata:\n  uid: {}\n", pod.uid),
        1,
    )
}

/// A ClusterIP Service: `vip:port` to `target_port` on pods with `app=<app>`.
pub fn service_yaml(
    name: &str,
    namespace: &str,
    vip: &str,
    port: u16,
    target_port: &str,
    app: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         spec:\n  clusterIP: {vip}\n  selector:\n    app: {app}\n  ports:\n  - name: tcp\n    port: {port}\n    targetPort: {target_port}\n"
    )
}

/// An EndpointSlice of Service `service` with port `tcp` at `port`:
/// `endpoints` are (address, ready), ready None leaving the condition unset.
pub fn endpoint_slice_yaml(
    name: &str,
    namespace: &str,
    service: &str,
    port: u16,
    endpoints: &[(IpAddr, Option<bool>)],
) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: {namespace}\n  labels:\n    kubernetes.io/service-name: {service}\n\
         addressType: IPv4\nports:\n- name: tcp\n  port: {port}\n  protocol: TCP\nendpoints:\n"
    );
    for (ip, ready) in endpoints {
        yaml.push_str(&format!("- addresses: [\"{ip}\"]\n"));
        if let Some(ready) = ready {
            yaml.push_str(&format!("  conditions: {{ready: {ready}}}\n"));
        }
    }
    yaml
}

impl Testbed {
    pub fn config_path(&self) -> PathBuf {
        self.workdir.join("config.yaml")
    }

    /// The CA root all agents of the testbed share (created on first use).
    pub fn ca_dir(&self) -> anyhow::Result<PathBuf> {
        let dir = self.workdir.join("ca");
        if !dir.join(crate::probe::ROOT_KEY).exists() {
            crate::probe::write_root(&dir)?;
        }
        Ok(dir)
    }

    /// Agent flags for the mesh: the config file, a fast poll, the shared
    /// root (brought by the user, as a cluster operator would).
    pub fn mesh_args(&self) -> anyhow::Result<Vec<String>> {
        if !self.config_path().exists() {
            self.write_config(&[])?;
        }
        self.mesh_args_with_config(&self.config_path())
    }

    /// [`Testbed::mesh_args`] with the configuration at `config`: a file or
    /// a directory of them.
    pub fn mesh_args_with_config(&self, config: &Path) -> anyhow::Result<Vec<String>> {
        let ca = self.ca_dir()?;
        Ok(vec![
            "--config".into(),
            config.display().to_string(),
            "--config-poll".into(),
            "100ms".into(),
            "--ca-cert".into(),
            ca.join(crate::probe::ROOT_CERT).display().to_string(),
            "--ca-key".into(),
            ca.join(crate::probe::ROOT_KEY).display().to_string(),
        ])
    }

    /// Replaces the configuration file (atomically).
    pub fn write_config(&self, docs: &[String]) -> anyhow::Result<()> {
        let tmp = self.workdir.join("config.yaml.tmp");
        fs::write(&tmp, docs.join("---\n"))?;
        fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    /// Writes the configuration and waits until every running agent's
    /// `/config_dump` satisfies `applied`.
    pub fn apply_config(
        &self,
        docs: &[String],
        applied: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        self.write_config(docs)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(agent) = &n.agent else { continue };
            loop {
                let (status, dump) = agent.http("GET", "/config_dump", None)?;
                if status == 200 && applied(&dump) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("agent on node {i} did not apply the configuration; dump:\n{dump}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// A long-lived connection from `pod` to `dst`.
    pub fn hold(&mut self, pod: &Pod, dst: SocketAddr) -> anyhow::Result<Session> {
        let (stdin, mut stdout) = self.spawn_piped(pod, &["hold", &dst.to_string()])?;
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let hello: Value = serde_json::from_str(&line).with_context(|| line.clone())?;
        Ok(Session {
            stdin,
            stdout,
            hello,
        })
    }

    /// The HBONE probe from `pod` to `addr` (see `mesh-testapp hbone`).
    pub fn probe(
        &self,
        pod: &Pod,
        addr: SocketAddr,
        authority: &str,
        opts: &[&str],
    ) -> anyhow::Result<Value> {
        let ca = format!("ca={}", self.ca_dir()?.display());
        let mut args = vec!["hbone", &addr.to_string() as &str, authority, &ca]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        args.extend(opts.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run_app(pod, &args)
    }

    /// Starts capturing packets on `eth0` of `pod` into a pcap file;
    /// returns once a marker datagram sent from the pod is in the file, so
    /// the capture is live (dumpcap writes its file header before).
    pub fn capture_packets(&self, pod: &Pod, name: &str) -> anyhow::Result<PacketCapture> {
        let file = self.workdir.join(format!("{name}.pcapng"));
        let _ = fs::remove_file(&file);
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", pod.netns))
            .args(["--", "dumpcap", "-q", "-i", "eth0", "-w"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dumpcap")?;
        let IpAddr::V4(ip) = pod.ip4 else {
            bail!("a testbed pod's ip4 is IPv4");
        };
        let [a, b, c, _] = ip.octets();
        let capture = PacketCapture {
            child,
            file,
            netns: pod.netns_path(),
            // The pod's gateway: its node's address on the pod bridge.
            gateway: SocketAddr::from(([a, b, c, 1], DISCARD_PORT)),
        };
        capture.mark(&format!("mesh-capture-start-{name}"))?;
        Ok(capture)
    }
}

/// Where the capture's marker datagrams go (the node answers with an ICMP
/// port unreachable, which is fine).
const DISCARD_PORT: u16 = 9;

pub struct Session {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The first line: `ok` and the server's greeting (`peer=.. local=..`).
    pub hello: Value,
}

impl Session {
    /// Sends one line, returns the exchange's JSON (`ok`, `echo` or `closed`).
    pub fn send(&mut self, line: &str) -> anyhow::Result<Value> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        let mut out = String::new();
        self.stdout.read_line(&mut out)?;
        ensure!(!out.is_empty(), "session process ended");
        Ok(serde_json::from_str(&out)?)
    }
}

pub struct PacketCapture {
    child: Child,
    file: PathBuf,
    netns: PathBuf,
    gateway: SocketAddr,
}

impl PacketCapture {
    /// Sends `marker` in a UDP datagram from the pod to its gateway until
    /// the capture file holds it (at most 10 s): every packet the pod sent
    /// before is in the file too.
    fn mark(&self, marker: &str) -> anyhow::Result<()> {
        let ns = fs::File::open(&self.netns)?;
        let socket = std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<std::net::UdpSocket> {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(std::net::UdpSocket::bind("0.0.0.0:0")?)
            })
            .join()
            .expect("marker thread")
        })?;
        crate::converge(
            &format!("the capture holds its marker {marker}"),
            Duration::from_secs(10),
            || {
                socket.send_to(marker.as_bytes(), self.gateway)?;
                std::thread::sleep(Duration::from_millis(30));
                let bytes = fs::read(&self.file).unwrap_or_default();
                Ok(bytes.windows(marker.len()).any(|w| w == marker.as_bytes()))
            },
        )
        .map(drop)
    }

    /// Stops the capture, once it holds every packet sent so far, and
    /// returns the file.
    pub fn stop(mut self) -> anyhow::Result<PathBuf> {
        self.mark("mesh-capture-end")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        self.child.wait()?;
        Ok(self.file.clone())
    }
}

impl Drop for PacketCapture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs tshark on a capture, decoding 15008 as TLS; one output line per packet.
pub fn tshark(file: &Path, filter: &str, fields: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut c = Command::new("tshark");
    c.arg("-r")
        .arg(file)
        .args(["-d", "tcp.port==15008,tls", "-Y", filter, "-T", "fields"]);
    for f in fields {
        c.args(["-e", f]);
    }
    let out = c.output().context("running tshark")?;
    ensure!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Whether the raw capture holds the test app's plaintext: 64 bytes of its
/// send pattern in a row.
pub fn has_app_plaintext(file: &Path) -> anyhow::Result<bool> {
    let bytes = fs::read(file)?;
    let needle: Vec<u8> = (0u8..64).collect();
    Ok(bytes
        .windows(needle.len())
        .any(|w| w[0] == 0 && w[1] == 1 && w == needle.as_slice()))
}
