//! Kubelet probes under PeerAuthentication STRICT, as istio-cni arranges
//! them. A probe is plaintext from the node, which STRICT would refuse, so
//! the node SNATs its own connections to enrolled pods' addresses to a
//! dedicated source ([`mesh_common::PROBE_SOURCE_V4`], `_V6`), and inbound
//! capture in the pod leaves connections from that source to the app.
//!
//! Only sockets on the node itself are rewritten (`-m owner
//! --socket-exists`), never traffic the node forwards, and nothing off the
//! node can complete a handshake from that source: the pod answers it
//! through the node, which knows it only through its own SNAT. Any process
//! on the node (not only the kubelet) reaches enrolled pods this way, which
//! is what Istio does too.
//!
//! The node's rules follow the enrolled set from a thread of their own, so
//! that enrolment never waits on `iptables-restore`; a burst of changes is
//! applied once.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex, mpsc},
};

use tracing::{debug, warn};

use crate::sync::LockExt as _;

/// Where the node's probe SNAT stands, for `/capture`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProbeStatus {
    /// Enrolled addresses the node's rules cover.
    pub addresses: usize,
    /// Why the last update failed (probes under STRICT are then refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Updates that failed since the agent started.
    pub failures: u64,
}

pub struct ProbeSnat {
    tx: Mutex<mpsc::Sender<Vec<IpAddr>>>,
    status: Arc<Mutex<ProbeStatus>>,
}

impl ProbeSnat {
    /// Starts the thread that keeps the node's rules in step.
    pub fn start() -> std::io::Result<ProbeSnat> {
        let (tx, rx) = mpsc::channel::<Vec<IpAddr>>();
        let status = Arc::new(Mutex::new(ProbeStatus::default()));
        let shown = status.clone();
        std::thread::Builder::new()
            .name("probe-snat".into())
            .spawn(move || {
                while let Ok(mut wanted) = rx.recv() {
                    // Only the latest set matters.
                    while let Ok(newer) = rx.try_recv() {
                        wanted = newer;
                    }
                    let r = super::iptables::sync_probe_snat(Some(&wanted));
                    let mut s = shown.locked();
                    match r {
                        Ok(()) => {
                            debug!(addresses = wanted.len(), "node probe SNAT updated");
                            s.addresses = wanted.len();
                            s.error = None;
                        }
                        Err(e) => {
                            warn!(error = %e, "updating the node's probe SNAT: kubelet probes to pods under STRICT are refused until it works");
                            s.error = Some(e.to_string());
                            s.failures += 1;
                        }
                    }
                }
            })?;
        Ok(ProbeSnat {
            tx: Mutex::new(tx),
            status,
        })
    }

    /// The enrolled pods' addresses now (the whole set).
    pub fn set(&self, addresses: Vec<IpAddr>) {
        // The thread lives as long as the agent.
        let _ = self.tx.locked().send(addresses);
    }

    pub fn status(&self) -> ProbeStatus {
        self.status.locked().clone()
    }
}

/// Removes the node's probe SNAT (`mesh-agent uninstall`).
pub fn remove() -> Result<(), super::CaptureError> {
    super::iptables::sync_probe_snat(None)
}
