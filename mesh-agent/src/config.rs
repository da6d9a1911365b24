//! Command line and environment configuration. Every flag can also be set
//! through a `MESH_*` variable, which is how a DaemonSet configures it.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "mesh-agent", version, about = "eBPF ambient mesh node agent")]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// `--runtime`: see [`NodeArgs::runtime`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RuntimeKind {
    Sharded,
    Shared,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: load capture, serve enrolled pods.
    Node(Box<NodeArgs>),
    /// Detach capture and remove everything pinned under the bpf directory.
    /// Enrolled pods then talk directly again.
    Uninstall(UninstallArgs),
    /// Run a waypoint: the L7 proxy (HTTP routing, method-level
    /// authorization, request metrics) of the Services and pods bound to its
    /// Gateway. Runs in a pod of its own, which is not captured.
    Waypoint(Box<WaypointArgs>),
    /// Run an ingress gateway: serves the HTTP and HTTPS listeners of its
    /// Gateway (class `mesh-ingress` or `istio`) to clients outside the
    /// mesh and sends their requests into it by the HTTPRoutes attached,
    /// with its own identity. Runs in a pod of its own, which is not
    /// captured; the same flags as a waypoint (`--listen` is not used).
    Gateway(Box<WaypointArgs>),
    /// Run the cluster certificate authority: signs workload certificates
    /// for node agents, which prove who they are with a ServiceAccount token.
    Ca(Box<CaArgs>),
    /// Inspect or change the pods a running agent captures.
    Pods {
        /// The agent's state directory, which holds its control socket
        /// (`admin.sock`, root or the agent's own user only).
        #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/run/mesh")]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: PodsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum PodsCommand {
    /// List enrolled pods.
    List,
    /// Enrol a pod given its network namespace.
    Enroll {
        /// A unique pod name, e.g. `namespace/name`.
        #[arg(long)]
        name: String,
        /// The pod's network namespace handle (/run/netns/NAME or /proc/PID/ns/net).
        #[arg(long)]
        netns: PathBuf,
    },
    /// Release a pod: its traffic goes direct again.
    Unenroll {
        #[arg(long)]
        name: String,
    },
    /// Show the kernel capture counters.
    Capture,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// How pods' connections are steered to the agent: eBPF programs, or
    /// iptables REDIRECT rules inside each pod (needs iptables-restore).
    #[arg(long, env = "MESH_CAPTURE", value_enum, default_value_t = crate::capture::Mode::Ebpf)]
    pub capture: crate::capture::Mode,
    /// Directory on bpffs where maps and links are pinned (eBPF capture).
    #[arg(long, env = "MESH_BPF_DIR", default_value = "/sys/fs/bpf/mesh")]
    pub bpf_dir: PathBuf,
    /// Load the kernel programs from this object instead of the one built
    /// into the agent (a developer's build from `cargo xtask build-ebpf`).
    /// Its maps must have the entry types this agent reads; pinned links
    /// take its programs in place, as on an upgrade.
    #[arg(long, env = "MESH_EBPF_OBJECT")]
    pub ebpf_object: Option<PathBuf>,
    /// cgroup v2 directory holding the pods (default: the cgroup v2 root).
    #[arg(long, env = "MESH_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Directory for the agent's state (the enrolled pods, kept across restarts).
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/run/mesh")]
    pub state_dir: PathBuf,
    /// Admin server address (keep it on localhost).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness probe address.
    #[arg(long, env = "MESH_READY_ADDR", default_value = "0.0.0.0:15021")]
    pub ready_addr: SocketAddr,
    /// This node's name as pods' `spec.nodeName` gives it (default: the host
    /// name). Only this node's pods are enrolled.
    #[arg(long, env = "MESH_NODE_NAME")]
    pub node_name: Option<String>,
    /// Where the host's processes are seen: in a cluster, a pod's network
    /// namespace is found through the cgroup of one of its processes.
    #[arg(long, env = "MESH_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Destination ports never captured on the way out (comma separated).
    #[arg(long, env = "MESH_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Local ports never captured on the way in (comma separated).
    #[arg(long, env = "MESH_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Do not SNAT the node's own connections to enrolled pods (the
    /// kubelet's probes) to the probe source (169.254.7.127,
    /// fd16:9254:7127:1337:ffff:ffff:ffff:ffff). Without it, probes of
    /// pods under PeerAuthentication STRICT are refused like any plaintext.
    #[arg(long, env = "MESH_NO_PROBE_SNAT")]
    pub no_probe_snat: bool,
    /// On SIGTERM, how long live connections may go on before the agent
    /// exits (new ones go to the next agent, or are refused). Keep it under
    /// the pod's `terminationGracePeriodSeconds`.
    #[arg(long, env = "MESH_DRAIN_PERIOD", default_value = "20s", value_parser = parse_duration)]
    pub drain_period: Duration,
    /// Between two pods of this node, both captured, skip mutual TLS: the
    /// agent hands the connection to the destination's inbound side in the
    /// process (the same policy, with the identity it knows the client by,
    /// the same metrics and access log) and splices plain TCP. The bytes
    /// never leave the node, but they are not encrypted between the two
    /// pods (Istio encrypts them). Never under PeerAuthentication STRICT,
    /// never through a waypoint, never to another node.
    #[arg(long, env = "MESH_SAME_NODE_PLAINTEXT")]
    pub same_node_plaintext: bool,
    /// Threads that serve connections (default: one per core): shards
    /// under `--runtime sharded`, the runtime's workers under `shared`.
    #[arg(long, env = "MESH_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// How connections are spread over the threads. `sharded`: each
    /// connection is served whole by one thread (one single-threaded
    /// runtime per thread, HBONE connections pooled per thread), so its
    /// bytes cross no thread in the agent; `shared`: one work-stealing
    /// runtime, a connection's tasks run on any thread (more hand-offs
    /// between threads, but one busy connection between two pods of this
    /// node can use two cores). See the README's Performance section.
    #[arg(long, env = "MESH_RUNTIME", value_enum, default_value_t = RuntimeKind::Sharded)]
    pub runtime: RuntimeKind,
    #[command(flatten)]
    pub mesh: MeshArgs,
}

/// Identity, certificates and the configuration the data path follows.
#[derive(Debug, Args)]
pub struct MeshArgs {
    /// Kubernetes YAML (a file, or a directory of `*.yaml`): Namespaces,
    /// Pods, Services, AuthorizationPolicies, PeerAuthentications. Reloaded
    /// when it changes. Without it, nothing is meshed: captured traffic
    /// passes through as plain TCP.
    #[arg(
        long,
        env = "MESH_CONFIG",
        visible_alias = "config-dir",
        conflicts_with = "kubernetes"
    )]
    pub config: Option<PathBuf>,
    /// Read the objects from the Kubernetes API (in-cluster service account,
    /// else KUBECONFIG) instead of a local directory.
    #[arg(long, env = "MESH_KUBERNETES")]
    pub kubernetes: bool,
    /// How often the configuration is checked for changes.
    #[arg(long, env = "MESH_CONFIG_POLL", default_value = "500ms", value_parser = parse_duration)]
    pub config_poll: Duration,
    /// SPIFFE trust domain of this mesh.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The cluster's name, as Istio's `CLUSTER_ID`: sent in HBONE
    /// `baggage` (`k8s.cluster.name`), and the `source_cluster` and
    /// `destination_cluster` metric labels.
    #[arg(long, env = "MESH_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Where a captured connection to a destination outside the registry
    /// (no known workload, Service or ServiceEntry) may go: ALLOW_ANY
    /// passes it through, REGISTRY_ONLY refuses it. A Namespace annotated
    /// `mesh-agent/outbound-traffic-policy` sets its own.
    #[arg(
        long,
        env = "MESH_OUTBOUND_TRAFFIC_POLICY",
        value_enum,
        default_value_t = crate::state::OutboundTrafficPolicy::AllowAny
    )]
    pub outbound_traffic_policy: crate::state::OutboundTrafficPolicy,
    /// Namespace whose policies apply to the whole mesh.
    #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// Where the embedded CA keeps the root it generates (default: STATE_DIR/ca).
    #[arg(long, env = "MESH_CA_DIR", conflicts_with_all = ["ca_cert", "ca_key"])]
    pub ca_dir: Option<PathBuf>,
    /// Bring your own root: the CA certificate (PEM). Needs --ca-key.
    #[arg(long, env = "MESH_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Bring your own root: the CA private key (PEM). Needs --ca-cert.
    #[arg(long, env = "MESH_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Lifetime of workload certificates; they are renewed at half of it.
    #[arg(long, env = "MESH_CERT_TTL", default_value = "24h", value_parser = parse_cert_ttl)]
    pub cert_ttl: Duration,
    /// Get certificates from a cluster CA (`mesh-agent ca`) at this URL
    /// instead of the embedded CA. Needs --ca-root.
    #[arg(long, env = "MESH_CA_ADDRESS", requires = "ca_root", conflicts_with_all = ["ca_dir", "ca_cert"])]
    pub ca_address: Option<String>,
    /// The cluster CA's root certificate (PEM): the mesh's trust anchor, and
    /// how the agent checks the CA it talks to.
    #[arg(long, env = "MESH_CA_ROOT")]
    pub ca_root: Option<PathBuf>,
    /// More trust roots (a PEM bundle of one or more CA certificates): peers
    /// whose certificates chain to any of them are accepted too, as well as
    /// those of the CA's own root. To rotate the root: give every agent a
    /// bundle with the new root, then move the CA to it, then drop the old
    /// one. Read at start; a certificate that is not a valid CA refuses
    /// the start.
    #[arg(long, env = "MESH_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// The ServiceAccount token (audience `mesh-ca`) the agent shows the
    /// cluster CA; read again for every request, as the kubelet rotates it.
    #[arg(
        long,
        env = "MESH_CA_TOKEN",
        default_value = "/var/run/secrets/mesh-ca/token"
    )]
    pub ca_token: PathBuf,
}

#[derive(Debug, Args)]
pub struct WaypointArgs {
    /// This pod's name (the Deployment gives it from the downward API); its
    /// Pod object gives the waypoint's identity and Gateway.
    #[arg(long, env = "MESH_POD_NAME")]
    pub pod_name: String,
    /// This pod's namespace.
    #[arg(long, env = "MESH_POD_NAMESPACE")]
    pub pod_namespace: String,
    /// HBONE listener.
    #[arg(long, env = "MESH_LISTEN", default_value = "[::]:15008")]
    pub listen: SocketAddr,
    /// Admin server address (`/config_dump`; keep it on localhost).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness probe address.
    #[arg(long, env = "MESH_READY_ADDR", default_value = "0.0.0.0:15021")]
    pub ready_addr: SocketAddr,
    /// Export spans to this OTLP/HTTP endpoint (JSON encoding), e.g.
    /// `http://collector:4318/v1/traces`.
    #[arg(long, env = "MESH_TRACING_OTLP")]
    pub tracing_otlp: Option<String>,
    /// Export spans to this Zipkin v2 endpoint, e.g.
    /// `http://zipkin:9411/api/v2/spans`.
    #[arg(long, env = "MESH_TRACING_ZIPKIN")]
    pub tracing_zipkin: Option<String>,
    /// Percent of new traces recorded (Istio's default, 1); a caller's own
    /// sampling decision is kept.
    #[arg(long, env = "MESH_TRACING_SAMPLING", default_value_t = 1.0)]
    pub tracing_sampling: f64,
    /// Runtime worker threads. A waypoint scales by replicas; one thread
    /// each spares the cross-thread wakeups that cost more CPU per request
    /// than they win (measured with `cargo xtask bench`).
    #[arg(long, env = "MESH_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// Directory for the waypoint's state (the embedded CA's root when it
    /// generates one).
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/run/mesh-waypoint")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub mesh: MeshArgs,
}

#[derive(Debug, Args)]
pub struct CaArgs {
    /// Address the CA serves on (HTTPS).
    #[arg(long, env = "MESH_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Readiness probe address (plain HTTP, `/healthz/ready`).
    #[arg(long, env = "MESH_READY_ADDR", default_value = "0.0.0.0:15021")]
    pub ready_addr: SocketAddr,
    /// The root's files (root-cert.pem, root-key.pem), generated when absent.
    #[arg(long, env = "MESH_CA_DIR", default_value = "/etc/mesh-ca")]
    pub ca_dir: PathBuf,
    /// SPIFFE trust domain of this mesh.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of the certificates it signs.
    #[arg(long, env = "MESH_CERT_TTL", default_value = "24h", value_parser = parse_cert_ttl)]
    pub cert_ttl: Duration,
    /// DNS names on the CA's own serving certificate (comma separated).
    #[arg(
        long,
        env = "MESH_CA_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "mesh-ca.mesh-system.svc,mesh-ca.mesh-system.svc.cluster.local"
    )]
    pub server_names: Vec<String>,
    /// The audience node agents' tokens must carry.
    #[arg(long, env = "MESH_CA_AUDIENCE", default_value = "mesh-ca")]
    pub audience: String,
    /// The only caller allowed: the node agents' ServiceAccount (namespace/name).
    #[arg(
        long,
        env = "MESH_CA_AGENT_SERVICE_ACCOUNT",
        default_value = "mesh-system/mesh-agent"
    )]
    pub agent_service_account: String,
    /// The ConfigMap (namespace/name) where the CA publishes its root
    /// certificate (key `root-cert.pem`) for the node agents to mount.
    #[arg(
        long,
        env = "MESH_CA_ROOT_CONFIGMAP",
        default_value = "mesh-system/mesh-ca-root"
    )]
    pub root_configmap: String,
    /// Certificate requests one client address may make at once before it
    /// is answered 429: each costs the API server a TokenReview.
    #[arg(long, env = "MESH_CA_REVIEW_BURST", default_value_t = 50)]
    pub review_burst: u32,
    /// Requests per second a client address gets back after its burst.
    #[arg(long, env = "MESH_CA_REVIEW_RATE", default_value_t = 5.0)]
    pub review_rate: f64,
}

/// Workload certificates live at most a year: short lifetimes are the point
/// of renewing them.
pub fn parse_cert_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(2) || d > Duration::from_secs(365 * 24 * 3600) {
        return Err(format!(
            "{s:?}: a certificate lifetime must be between 2s and 8760h"
        ));
    }
    Ok(d)
}

/// `500ms`, `30s`, `10m`, `24h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 500ms, 30s, 10m, 24h)"))?;
    let too_large = || format!("{s:?} is too large");
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(too_large)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(too_large)?),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(d)
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[arg(long, env = "MESH_BPF_DIR", default_value = "/sys/fs/bpf/mesh")]
    pub bpf_dir: PathBuf,
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/run/mesh")]
    pub state_dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("abc").is_err());
        assert!(
            parse_duration("99999999999999999h")
                .unwrap_err()
                .contains("too large")
        );
        assert!(parse_cert_ttl("1s").is_err());
        assert!(parse_cert_ttl("9000h").is_err());
        assert_eq!(parse_cert_ttl("4s"), Ok(Duration::from_secs(4)));
    }
}
