//! Command line and environment configuration. Every flag can also be set
//! through a `MESH_*` variable, which is how a DaemonSet configures it.

use std::{net::SocketAddr, path::PathBuf};

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: load capture, serve enrolled pods.
    Node(NodeArgs),
    /// Detach capture and remove everything pinned under the bpf directory.
    /// Enrolled pods then talk directly again.
    Uninstall(UninstallArgs),
    /// Inspect or change the pods a running agent captures.
    Pods {
        /// The agent's admin address.
        #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
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
    /// Directory on bpffs where maps and links are pinned.
    #[arg(long, env = "MESH_BPF_DIR", default_value = "/sys/fs/bpf/mesh")]
    pub bpf_dir: PathBuf,
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
    /// Destination ports never captured on the way out (comma separated).
    #[arg(long, env = "MESH_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Local ports never captured on the way in (comma separated).
    #[arg(long, env = "MESH_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[arg(long, env = "MESH_BPF_DIR", default_value = "/sys/fs/bpf/mesh")]
    pub bpf_dir: PathBuf,
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/run/mesh")]
    pub state_dir: PathBuf,
}
