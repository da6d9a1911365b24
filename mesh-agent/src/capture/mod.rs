//! Capture: how an enrolled pod's TCP connections reach the agent's
//! listeners inside the pod, and how the agent learns where each was going.
//!
//! Two modes, one interface for enrolment and the data path:
//! - `ebpf` (default, [`Programs`]): cgroup connect/sockops programs redirect
//!   outbound connects to 15001 and record the original destination in a
//!   map; sk_lookup hands inbound SYNs to the pod's 15006 listener, whose
//!   accepted sockets keep the original destination as their local address.
//! - `iptables` ([`Iptables`]): nat REDIRECT rules inside each pod's network
//!   namespace, the original destination read back with `SO_ORIGINAL_DST`.
//!   The fallback for nodes that cannot load the programs, and the baseline
//!   the benchmark compares them with.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use aya::{
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};
use mesh_common::PortFlags;
use tokio::net::TcpStream;

use crate::inpod::{
    netns::{Netns, NetnsCookie},
    sockets::PodListener,
};

pub mod fs;
mod iptables;
mod kernel_btf;
pub mod probes;
mod programs;
mod sys;
mod upgrade;

pub use iptables::{Iptables, remove_rules};
pub use programs::{Programs, unpin_all};

/// A connection of the agent's own that inbound capture lets through, for as
/// long as this lives.
pub struct LetThrough<'a>(Option<(&'a Programs, mesh_common::FlowKey)>);

impl Drop for LetThrough<'_> {
    fn drop(&mut self) {
        if let Some((programs, key)) = &self.0 {
            programs.forget_flow(key);
        }
    }
}

/// How pods' connections are steered to the agent (`--capture`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Kernel programs: cgroup connect4/6 + sockops (outbound) and sk_lookup (inbound).
    #[default]
    Ebpf,
    /// iptables nat REDIRECT rules inside each pod's network namespace.
    Iptables,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("loading the eBPF object (maps pinned under {dir}): {source}")]
    Load {
        dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<ProgramError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("pinning link {path}: {source}")]
    Pin { path: PathBuf, source: PinError },
    #[error("pinned link {path}: {source}")]
    PinnedLink { path: PathBuf, source: LinkError },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Fs(#[from] fs::FsError),
    #[error("link is not a file-descriptor link and cannot be pinned: {0}")]
    Link(#[from] LinkError),
    #[error("iptables capture needs `{program}` ({detail}); on Debian: apt-get install iptables")]
    IptablesMissing {
        program: &'static str,
        detail: String,
    },
    #[error("iptables capture in {netns}: {program}: {detail}")]
    Iptables {
        netns: PathBuf,
        program: &'static str,
        detail: String,
    },
}

/// The capture of one agent process.
#[derive(Debug)]
pub enum Capture {
    Ebpf(Box<Programs>),
    Iptables(Iptables),
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        }
    }
}

impl Capture {
    pub fn mode(&self) -> Mode {
        match self {
            Capture::Ebpf(_) => Mode::Ebpf,
            Capture::Iptables(_) => Mode::Iptables,
        }
    }

    /// Starts capturing a pod whose listeners are open (not yet served).
    /// Returns the addresses whose inbound traffic is now the pod's: an
    /// address another live pod holds stays with it, unless `take_over`
    /// (the addresses come from the Pod object, not from the pod's
    /// namespace, which the pod controls).
    pub fn take_in(
        &self,
        netns: &Netns,
        addresses: &[IpAddr],
        listeners: &[PodListener],
        take_over: bool,
    ) -> Result<Vec<IpAddr>, CaptureError> {
        match self {
            Capture::Ebpf(p) => p.take_in(netns, addresses, listeners, take_over),
            // The rules live in the pod's own namespace: nothing to share.
            Capture::Iptables(t) => t
                .take_in(netns, listeners.iter().any(|l| l.v6))
                .map(|()| addresses.to_vec()),
        }
    }

    /// Stops capturing a pod: new connections go direct. Only what the pod
    /// owns is removed (an address now held by another pod stays). Logs
    /// what it cannot undo.
    pub fn let_go(&self, netns: &Netns, addresses: &[IpAddr]) {
        match self {
            Capture::Ebpf(p) => p.let_go(netns.cookie(), addresses),
            Capture::Iptables(t) => t.let_go(netns),
        }
    }

    /// Forgets what an earlier agent left for a namespace that has since
    /// been replaced under the same path.
    pub fn forget(&self, cookie: NetnsCookie) {
        match self {
            Capture::Ebpf(p) => p.let_go(cookie, &[]),
            // The rules went with the old namespace.
            Capture::Iptables(_) => {}
        }
    }

    /// Removes capture state that no live pod owns.
    pub fn sweep(&self, live: &[NetnsCookie]) {
        match self {
            Capture::Ebpf(p) => p.sweep(live),
            // Rules live inside the pods' namespaces and go with them.
            Capture::Iptables(_) => {}
        }
    }

    /// Lets the agent's own connection `src -> dst` to a local app through
    /// inbound capture until the returned guard is dropped (once connected).
    /// With iptables the agent's connections are locally generated and meet
    /// no inbound rule: nothing to do.
    pub fn let_through(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<LetThrough<'_>, CaptureError> {
        match self {
            Capture::Ebpf(p) => Ok(LetThrough(Some((p, p.let_through(src, dst)?)))),
            Capture::Iptables(_) => Ok(LetThrough(None)),
        }
    }

    /// Where a connection accepted on a pod's outbound listener was going.
    /// `None`: nothing recorded, and the connection must not be guessed at.
    pub fn outbound_dst(
        &self,
        cookie: NetnsCookie,
        client: &TcpStream,
        peer: SocketAddr,
    ) -> Option<SocketAddr> {
        match self {
            Capture::Ebpf(p) => p.outbound_dst(cookie, peer),
            Capture::Iptables(_) => iptables::original_dst(client),
        }
    }

    /// Where a connection accepted on a pod's inbound plaintext listener
    /// was going. `None` for a connection made to the listener itself.
    pub fn inbound_dst(&self, client: &TcpStream) -> Option<SocketAddr> {
        match self {
            // sk_lookup kept the destination as the local address.
            Capture::Ebpf(_) => client.local_addr().ok(),
            Capture::Iptables(_) => iptables::original_dst(client),
        }
    }

    /// Counters of the kernel programs (none in iptables mode).
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        match self {
            Capture::Ebpf(p) => p.counters(),
            Capture::Iptables(_) => BTreeMap::new(),
        }
    }

    /// What the admin API shows under `/capture`.
    pub fn status(&self) -> serde_json::Value {
        match self {
            Capture::Ebpf(p) => serde_json::json!({
                "mode": Mode::Ebpf,
                "bpf_dir": p.dir(),
                "counters": p.counters(),
                "programs": p.attached(),
                "enrolled_netns_cookies": p.enrolled_cookies(),
            }),
            Capture::Iptables(t) => serde_json::json!({
                "mode": Mode::Iptables,
                "chains": [iptables::OUT_CHAIN, iptables::IN_CHAIN],
                "excluded_ports": t.excluded().0,
            }),
        }
    }
}

/// Ports never captured, with the direction(s) each is excluded in.
#[derive(Clone, Debug, Default)]
pub struct ExcludedPorts(pub BTreeMap<u16, u8>);

impl ExcludedPorts {
    pub fn new(outbound: &[u16], inbound: &[u16]) -> Self {
        let mut m = BTreeMap::new();
        for p in outbound {
            *m.entry(*p).or_insert(0) |= PortFlags::OUTBOUND;
        }
        for p in inbound {
            *m.entry(*p).or_insert(0) |= PortFlags::INBOUND;
        }
        ExcludedPorts(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excluded_ports_merge_directions() {
        let e = ExcludedPorts::new(&[22, 9000], &[9000, 15090]);
        assert_eq!(e.0[&22], PortFlags::OUTBOUND);
        assert_eq!(e.0[&9000], PortFlags::OUTBOUND | PortFlags::INBOUND);
        assert_eq!(e.0[&15090], PortFlags::INBOUND);
    }
}
