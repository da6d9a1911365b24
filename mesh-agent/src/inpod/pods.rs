//! Enrolment: the set of pods this agent captures, and the order in which a
//! pod is taken in (listeners, then maps, then attach) and let go (the
//! reverse). The set is saved to the state directory so that a restarted
//! agent takes back the same pods.

use std::{
    collections::BTreeMap,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{
    local_delivery,
    netns::{Netns, NetnsCookie, NetnsError},
    sockets,
};
use crate::sync::LockExt as _;
use crate::{
    capture::{Capture, CaptureError, probes::ProbeSnat},
    metrics::Metrics,
    proxy::{self, PodCtx, Shared},
};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    /// `namespace/name`, or any unique name.
    pub name: String,
    /// A handle on the pod's network namespace (`/run/netns/X`, `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// The pod's `metadata.uid`, when it came from the configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The addresses of the Pod's status (`podIPs`), for a pod enrolled from
    /// its Pod object. Empty for a pod enrolled by hand: its addresses are
    /// then read from inside its namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// Enrolled because the configuration says so (namespace or pod label),
    /// and released when it stops saying so. Pods enrolled through the admin
    /// API are not managed: only the admin API releases them.
    #[serde(default)]
    pub managed: bool,
    /// Its workload as Istio names it (the Deployment, ...), for the metric
    /// series that go with the pod; the pod's name when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

/// The Pod object a managed pod was enrolled from. Its identity comes from
/// here, never from the addresses its namespace shows, which the pod itself
/// can change (with NET_ADMIN in its own namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The `*_workload` label of its metric series.
    pub workload: String,
}

impl PodSpec {
    /// The Pod object behind a managed pod (`namespace/name` and its UID).
    fn pod_ref(&self) -> Option<PodRef> {
        let (namespace, name) = self.name.split_once('/')?;
        Some(PodRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: self.uid.clone().filter(|_| self.managed)?,
            workload: self.workload.clone().unwrap_or_else(|| name.to_owned()),
        })
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PodInfo {
    pub name: String,
    pub netns: PathBuf,
    pub netns_cookie: NetnsCookie,
    /// The namespace's nsfs inode (`stat -L` of its handle).
    pub netns_inode: u64,
    pub addresses: Vec<IpAddr>,
    /// Pooled outbound HBONE connections.
    pub hbone_connections: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub managed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("pod {name} is already enrolled (network namespace {netns})")]
    AlreadyEnrolled { name: String, netns: PathBuf },
    #[error("network namespace {netns} is already enrolled as pod {other}")]
    NetnsTaken { netns: PathBuf, other: String },
    #[error("pod {name} is not enrolled")]
    NotEnrolled { name: String },
    #[error("pod {name}: {source}")]
    Netns { name: String, source: NetnsError },
    #[error("pod {name}: opening capture listeners: {source}")]
    Listeners { name: String, source: io::Error },
    #[error("pod {name}: setting up delivery from the client's address inside the pod: {source}")]
    LocalDelivery { name: String, source: io::Error },
    #[error("pod {name}: {source}")]
    Capture { name: String, source: CaptureError },
    #[error("saving enrolled pods to {path}: {source}")]
    State { path: PathBuf, source: io::Error },
    #[error(
        "pod {name}: {netns} is not the network namespace that was enrolled (saved cookie {saved}, found {found}): replaced, or its process ID reused"
    )]
    NetnsReplaced {
        name: String,
        netns: PathBuf,
        saved: NetnsCookie,
        found: NetnsCookie,
    },
    #[error(
        "reading the enrolled pods saved in {path}: {reason}; refusing to start rather than release them all (repair the file, or run `mesh-agent uninstall` to release every pod)"
    )]
    Saved { path: PathBuf, reason: String },
    #[error("the agent is draining: pods are left as they are for the next agent")]
    Draining,
}

impl EnrolError {
    /// A short kind for metrics and HTTP status mapping.
    pub fn kind(&self) -> &'static str {
        match self {
            EnrolError::AlreadyEnrolled { .. } | EnrolError::NetnsTaken { .. } => "conflict",
            EnrolError::NotEnrolled { .. } => "not_found",
            EnrolError::Netns { .. } => "bad_netns",
            EnrolError::Listeners { .. } => "listeners",
            EnrolError::LocalDelivery { .. } => "local_delivery",
            EnrolError::Capture { .. } => "capture",
            EnrolError::NetnsReplaced { .. } => "bad_netns",
            EnrolError::State { .. } | EnrolError::Saved { .. } => "state",
            EnrolError::Draining => "draining",
        }
    }
}

struct Enrolled {
    ctx: Arc<PodCtx>,
    tasks: Vec<JoinHandle<()>>,
    uid: Option<String>,
    managed: bool,
    /// The Pod's own addresses, as enrolled (empty: read from the netns).
    pod_ips: Vec<IpAddr>,
    workload: Option<String>,
}

impl Enrolled {
    fn info(&self) -> PodInfo {
        PodInfo {
            name: self.ctx.name.clone(),
            netns: self.ctx.netns.path().to_owned(),
            netns_cookie: self.ctx.netns.cookie(),
            netns_inode: self.ctx.netns.inode(),
            addresses: self.ctx.addresses.clone(),
            hbone_connections: self.ctx.pool.len(),
            uid: self.uid.clone(),
            managed: self.managed,
        }
    }
}

/// Saved form of the enrolled set.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SavedPod {
    name: String,
    netns: PathBuf,
    netns_cookie: u64,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    managed: bool,
    /// The Pod's addresses (managed pods): a restarted agent must not take
    /// them from the namespace, which the pod controls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    workload: Option<String>,
}

pub struct Pods {
    shared: Arc<Shared>,
    capture: Arc<Capture>,
    metrics: Arc<Metrics>,
    state_file: PathBuf,
    pods: Mutex<BTreeMap<String, Enrolled>>,
    /// Pods the configuration enrols that could not be yet, and why.
    pending: Mutex<BTreeMap<String, String>>,
    /// The node's SNAT of its own connections (kubelet probes) to enrolled
    /// pods; `None` when turned off.
    probes: Option<ProbeSnat>,
    /// Set once draining: the enrolled set is the next agent's to change.
    draining: std::sync::atomic::AtomicBool,
}

impl Pods {
    pub fn new(shared: Arc<Shared>, state_dir: &Path, probes: Option<ProbeSnat>) -> Self {
        Pods {
            probes,
            draining: std::sync::atomic::AtomicBool::new(false),
            capture: shared.capture.clone(),
            metrics: shared.metrics.clone(),
            shared,
            state_file: state_dir.join("pods.json"),
            pods: Mutex::new(BTreeMap::new()),
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    /// Pods waiting to be enrolled, with the reason.
    pub fn pending(&self) -> BTreeMap<String, String> {
        self.pending.locked().clone()
    }

    pub(super) fn set_pending(&self, pending: BTreeMap<String, String>) {
        *self.pending.locked() = pending;
    }

    pub fn list(&self) -> Vec<PodInfo> {
        self.pods.locked().values().map(Enrolled::info).collect()
    }

    pub fn enroll(&self, spec: &PodSpec) -> Result<PodInfo, EnrolError> {
        self.enroll_expecting(spec, None)
    }

    /// Enrols a pod whose namespace, when `expect` is given, must be the one
    /// with that cookie (checked on the handle it then keeps).
    fn enroll_expecting(
        &self,
        spec: &PodSpec,
        expect: Option<NetnsCookie>,
    ) -> Result<PodInfo, EnrolError> {
        let r = self.enroll_inner(spec, expect);
        self.metrics
            .enrolment("enroll", r.as_ref().map_or_else(EnrolError::kind, |_| "ok"));
        r
    }

    fn enroll_inner(
        &self,
        spec: &PodSpec,
        expect: Option<NetnsCookie>,
    ) -> Result<PodInfo, EnrolError> {
        if self.is_draining() {
            return Err(EnrolError::Draining);
        }
        let name = spec.name.clone();
        // Opened (and checked to be a netns) before the lock: a path that
        // is not a namespace is refused without holding up other pods.
        let netns = Netns::open(&spec.netns).map_err(|source| EnrolError::Netns {
            name: name.clone(),
            source,
        })?;
        let mut pods = self.pods.locked();
        if let Some(p) = pods.get(&name) {
            return Err(EnrolError::AlreadyEnrolled {
                name,
                netns: p.ctx.netns.path().to_owned(),
            });
        }
        if let Some(saved) = expect
            && netns.cookie() != saved
        {
            return Err(EnrolError::NetnsReplaced {
                name,
                netns: spec.netns.clone(),
                saved,
                found: netns.cookie(),
            });
        }
        if let Some(other) = pods
            .values()
            .find(|p| p.ctx.netns.cookie() == netns.cookie())
        {
            return Err(EnrolError::NetnsTaken {
                netns: spec.netns.clone(),
                other: other.ctx.name.clone(),
            });
        }
        let listeners_err = |source| EnrolError::Listeners {
            name: name.clone(),
            source,
        };
        let from_netns = spec.addresses.is_empty();
        let (found, listeners) = netns
            .run(|| -> Result<_, EnrolError> {
                // A pod enrolled by hand has no Pod object to say which
                // addresses are its own: its namespace is all there is.
                let found = if from_netns {
                    sockets::pod_addresses().map_err(listeners_err)?
                } else {
                    Vec::new()
                };
                let v6 = sockets::has_ipv6_loopback();
                local_delivery::prepare(v6).map_err(|source| EnrolError::LocalDelivery {
                    name: name.clone(),
                    source,
                })?;
                let copies = crate::shards::accepting();
                Ok((
                    found,
                    sockets::open_listeners(v6, copies).map_err(listeners_err)?,
                ))
            })
            .map_err(|source| EnrolError::Netns {
                name: name.clone(),
                source,
            })??;
        let wanted = if from_netns {
            found
        } else {
            spec.addresses.clone()
        };

        // 1. listeners (kept as fds for the maps; served once all is in
        // place), 2. capture (maps and attach, or rules). An address
        // another live pod owns stays that pod's (a Pod's own addresses
        // take it over from one read from a namespace). On failure undo
        // what was done, so that the kernel never names a pod the agent
        // does not serve.
        let cookie = netns.cookie();
        let addresses = match self
            .capture
            .take_in(&netns, &wanted, &listeners, !from_netns)
        {
            Ok(claimed) => claimed,
            Err(source) => {
                self.capture.let_go(&netns, &wanted);
                return Err(EnrolError::Capture { name, source });
            }
        };
        for addr in wanted.iter().filter(|a| !addresses.contains(a)) {
            warn!(pod = %name, %addr, "address held by another enrolled pod; left to it");
        }
        let ctx = Arc::new(PodCtx::new(
            name.clone(),
            netns,
            addresses.clone(),
            spec.pod_ref(),
            self.shared.clone(),
        ));
        let mut tasks = Vec::new();
        for l in listeners {
            match proxy::spawn_listener(ctx.clone(), l) {
                Ok(t) => tasks.extend(t),
                Err(source) => {
                    tasks.iter().for_each(JoinHandle::abort);
                    self.capture.let_go(&ctx.netns, &addresses);
                    return Err(EnrolError::Listeners { name, source });
                }
            }
        }
        // Looked up by address: by the same-node shortcut, and by an HBONE
        // connection between two pods of this node (see `crate::shards`).
        self.shared.local_pods.insert(&ctx);
        let enrolled = Enrolled {
            ctx,
            tasks,
            uid: spec.uid.clone(),
            managed: spec.managed,
            pod_ips: spec.addresses.clone(),
            workload: spec.workload.clone(),
        };
        let info = enrolled.info();
        pods.insert(name, enrolled);
        self.metrics.enrolled_pods.set(pods.len() as i64);
        self.save(&pods)?;
        info!(pod = %info.name, netns = %info.netns.display(), cookie = %cookie, addresses = ?info.addresses, "pod enrolled");
        Ok(info)
    }

    pub fn unenroll(&self, name: &str) -> Result<PodInfo, EnrolError> {
        let r = self.unenroll_inner(name);
        self.metrics.enrolment(
            "unenroll",
            r.as_ref().map_or_else(EnrolError::kind, |_| "ok"),
        );
        r
    }

    fn unenroll_inner(&self, name: &str) -> Result<PodInfo, EnrolError> {
        if self.is_draining() {
            return Err(EnrolError::Draining);
        }
        let mut pods = self.pods.locked();
        let Some(p) = pods.remove(name) else {
            return Err(EnrolError::NotEnrolled {
                name: name.to_owned(),
            });
        };
        let info = p.info();
        // Reverse order: detach, maps, listeners. Live connections finish on
        // their own; new ones go direct.
        self.capture.let_go(&p.ctx.netns, &info.addresses);
        self.shared.local_pods.remove(&p.ctx);
        p.tasks.iter().for_each(JoinHandle::abort);
        // Its series go, unless another pod of the same workload (a
        // Deployment's other replica) is still enrolled here.
        if let Some(key) = p.ctx.workload_key()
            && !pods
                .values()
                .any(|o| o.ctx.workload_key().as_ref() == Some(&key))
        {
            self.metrics.forget_workload(&key.0, &key.1);
        }
        self.metrics.enrolled_pods.set(pods.len() as i64);
        self.save(&pods)?;
        info!(pod = %name, "pod released");
        Ok(info)
    }

    fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Draining: closes every pod's capture listeners (a next agent's, open
    /// beside them with `SO_REUSEPORT`, take the new connections; without
    /// one they are refused, as on any stop) and leaves capture, the maps
    /// and the saved set as they are. Connections already accepted go on.
    /// Nothing is enrolled or released afterwards.
    pub fn stop_listening(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for p in self.pods.locked().values() {
            p.tasks.iter().for_each(JoinHandle::abort);
        }
    }

    /// Where the node's probe SNAT stands; `None` when turned off.
    pub fn probe_status(&self) -> Option<crate::capture::probes::ProbeStatus> {
        self.probes.as_ref().map(ProbeSnat::status)
    }

    /// Saves the enrolled set, and brings the node's probe SNAT to it.
    fn save(&self, pods: &BTreeMap<String, Enrolled>) -> Result<(), EnrolError> {
        if let Some(probes) = &self.probes {
            probes.set(
                pods.values()
                    .flat_map(|p| p.ctx.addresses.iter().copied())
                    .collect(),
            );
        }
        let saved: Vec<SavedPod> = pods
            .values()
            .map(|p| SavedPod {
                name: p.ctx.name.clone(),
                netns: p.ctx.netns.path().to_owned(),
                netns_cookie: p.ctx.netns.cookie().0,
                uid: p.uid.clone(),
                managed: p.managed,
                addresses: p.pod_ips.clone(),
                workload: p.workload.clone(),
            })
            .collect();
        let err = |source| EnrolError::State {
            path: self.state_file.clone(),
            source,
        };
        let tmp = self.state_file.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&saved).map_err(|e| err(e.into()))?;
        std::fs::write(&tmp, body).map_err(err)?;
        std::fs::rename(&tmp, &self.state_file).map_err(err)
    }

    /// Takes back the pods a previous agent enrolled, then clears whatever
    /// the kernel maps or pins still hold for pods that are gone. A saved
    /// path is trusted only while it names the same namespace (the saved
    /// cookie): after a PID is reused or a namespace replaced under the same
    /// path it names another, perhaps the host's, which is left alone. A
    /// state file that cannot be read is an error, and nothing is swept:
    /// taking it as empty would release every pod.
    pub fn restore(&self) -> Result<(), EnrolError> {
        for s in read_saved(&self.state_file)? {
            let spec = PodSpec {
                name: s.name.clone(),
                netns: s.netns.clone(),
                uid: s.uid.clone(),
                managed: s.managed,
                addresses: s.addresses.clone(),
                workload: s.workload.clone(),
            };
            let saved = NetnsCookie(s.netns_cookie);
            match self.enroll_expecting(&spec, Some(saved)) {
                Ok(_) => info!(pod = %s.name, "restored enrolled pod"),
                Err(e @ EnrolError::NetnsReplaced { .. }) => {
                    warn!(pod = %s.name, error = %e, "not taking the pod back; releasing what was left for it");
                    // The kernel state of the saved namespace, by its cookie;
                    // the namespace now at the path is not touched.
                    self.capture.forget(saved);
                }
                Err(e) => {
                    warn!(pod = %s.name, error = %e, "could not restore enrolled pod; releasing it");
                    self.capture.forget(saved);
                    // What an earlier agent left in the pod (iptables rules)
                    // would leave it with no path at all, and the state file
                    // is about to forget it.
                    if let Ok(ns) = Netns::open(&s.netns)
                        && ns.cookie() == saved
                    {
                        self.capture.let_go(&ns, &[]);
                    }
                }
            }
        }
        // The state file now lists only the pods taken back.
        self.save(&self.pods.locked())?;
        self.sweep();
        Ok(())
    }

    /// Removes capture state that no enrolled pod owns.
    pub fn sweep(&self) {
        let live: Vec<NetnsCookie> = self
            .pods
            .locked()
            .values()
            .map(|p| p.ctx.netns.cookie())
            .collect();
        self.capture.sweep(&live);
    }
}

/// The enrolled set a (previous) agent saved; empty when there is none.
fn read_saved(file: &Path) -> Result<Vec<SavedPod>, EnrolError> {
    let err = |reason: String| EnrolError::Saved {
        path: file.to_owned(),
        reason,
    };
    match std::fs::read(file) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Network namespaces (path and cookie) of the pods an agent saved as
/// enrolled in `state_dir` (for `mesh-agent uninstall`); empty, with a
/// warning, when the file cannot be read.
pub fn saved_netns(state_dir: &Path) -> Vec<(PathBuf, NetnsCookie)> {
    read_saved(&state_dir.join("pods.json"))
        .unwrap_or_else(|e| {
            warn!(error = %e, "ignoring the saved pods");
            Vec::new()
        })
        .into_iter()
        .map(|s| (s.netns, NetnsCookie(s.netns_cookie)))
        .collect()
}
