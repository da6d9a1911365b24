//! Enrolment by configuration: every snapshot of the store says which pods of
//! this node are in the mesh (`istio.io/dataplane-mode` on their namespace or
//! themselves); this task enrols the ones that are not yet and releases the
//! ones that left, without restarting anything. A pod that cannot be enrolled
//! yet (no network namespace, no IP) is retried every second.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::{
    discover::ProcessTable,
    pods::{PodInfo, PodSpec, Pods},
};
use crate::{
    cluster::redirection::{self, Redirection},
    identity::CertManager,
    state::{Store, Workload},
};

/// How soon a pod that could not be enrolled is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// How the agent finds an enrolled pod's network namespace.
#[derive(Clone, Debug)]
pub enum NetnsFinder {
    /// The pod's `mesh-agent/netns` annotation (local configuration).
    Annotation,
    /// The pod UID through the cgroups of the processes under this `/proc`
    /// (cluster).
    Proc(PathBuf),
}

pub struct Enroller {
    pub pods: Arc<Pods>,
    /// This node's name, as `spec.nodeName` gives it.
    pub node: String,
    pub finder: NetnsFinder,
    /// Enrolled pods get their certificates now, not on their first
    /// connection (with a cluster CA, a first connection cannot wait for one).
    pub certs: Arc<CertManager>,
    /// In a cluster: keeps each pod's redirection annotation in line with
    /// its capture.
    pub redirection: Option<Redirection>,
}

impl Enroller {
    /// Whether a workload is this agent's to capture. Locally, a pod without
    /// `spec.nodeName` runs here: a single machine needs no node names.
    fn is_mine(&self, wl: &Workload) -> bool {
        wl.captured
            && (*wl.node == *self.node
                || (wl.node.is_empty() && matches!(self.finder, NetnsFinder::Annotation)))
    }

    /// Whether an enrolled pod is still the workload the store describes,
    /// looking up where its namespace is now.
    fn same_pod(
        &self,
        enrolled: &PodInfo,
        wl: &Workload,
        table: &mut Option<ProcessTable>,
    ) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let found = self
            .find_netns(wl, table)
            .ok()
            .and_then(|path| std::fs::metadata(path).ok())
            .map(|m| m.ino());
        same_pod(enrolled, &wl.uid, found)
    }

    /// Brings the enrolled set in line with `store`. Returns the pods that
    /// should be enrolled but are not, with the reason.
    pub fn reconcile(&self, store: &Store) -> BTreeMap<String, String> {
        let mine: BTreeMap<String, &Arc<Workload>> = store
            .workloads()
            .filter(|wl| self.is_mine(wl))
            .map(|wl| (format!("{}/{}", wl.namespace, wl.name), wl))
            .collect();
        let mut table: Option<ProcessTable> = None;
        for p in self.pods.list().iter().filter(|p| p.managed) {
            if mine
                .get(&p.name)
                .is_some_and(|wl| self.same_pod(p, wl, &mut table))
            {
                continue;
            }
            match self.pods.unenroll(&p.name) {
                Ok(_) => info!(pod = %p.name, "released: no longer in the mesh on this node"),
                Err(e) => warn!(pod = %p.name, error = %e, "release failed"),
            }
        }
        let enrolled: BTreeMap<String, PodInfo> = self
            .pods
            .list()
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        let mut pending = BTreeMap::new();
        for (name, wl) in mine {
            // Enrolled already: by this pass's rule, or by hand (the admin
            // API owns those).
            if enrolled.contains_key(&name) {
                continue;
            }
            if wl.ips.is_empty() {
                pending.insert(name, "the pod has no IP yet".to_owned());
                continue;
            }
            let netns = match self.find_netns(wl, &mut table) {
                Ok(path) => path,
                Err(reason) => {
                    pending.insert(name, reason);
                    continue;
                }
            };
            let spec = PodSpec {
                name: name.clone(),
                netns,
                uid: Some(wl.uid.clone()),
                addresses: wl.ips.clone(),
                managed: true,
                workload: Some(wl.workload_name().to_owned()),
            };
            if let Err(e) = self.pods.enroll(&spec) {
                pending.insert(name, e.to_string());
            }
        }
        pending
    }

    /// Makes sure every enrolled pod's identity has a certificate.
    async fn prepare_certificates(&self, store: &Store) {
        let td = self.certs.trust_domain().to_owned();
        let mut ids: Vec<_> = self
            .pods
            .list()
            .iter()
            .filter_map(|p| {
                let (ns, name) = p.name.split_once('/')?;
                Some(store.workload(ns, name)?.identity(&td))
            })
            .collect();
        ids.sort();
        ids.dedup();
        for id in ids {
            if let Err(e) = self.certs.prepare(&id).await {
                warn!(identity = %id, error = %e, "no certificate yet; retried in the background");
            }
        }
    }

    fn find_netns(
        &self,
        wl: &Workload,
        table: &mut Option<ProcessTable>,
    ) -> Result<PathBuf, String> {
        match &self.finder {
            NetnsFinder::Annotation => wl.netns.clone().ok_or_else(|| {
                format!(
                    "no {} annotation naming its network namespace",
                    crate::state::NETNS_ANNOTATION
                )
            }),
            NetnsFinder::Proc(root) => {
                if wl.uid.is_empty() {
                    return Err("the pod has no metadata.uid".to_owned());
                }
                if table.is_none() {
                    *table = Some(ProcessTable::read(root).map_err(|e| e.to_string())?);
                }
                let table = table.as_ref().expect("just read");
                table.netns(&wl.uid).map_err(|e| e.to_string())
            }
        }
    }
}

/// Whether an enrolled pod is still the pod the store describes (UID
/// `uid`), whose namespace is now the one with inode `found` (None: not
/// found at the moment, and left as it is). A pod replaced under its name
/// has a new UID; a sandbox re-created for the same pod keeps the UID and
/// has a new namespace, maybe under the same path: both are released and
/// enrolled again, which also lets go of the old namespace's handle.
fn same_pod(enrolled: &PodInfo, uid: &str, found: Option<u64>) -> bool {
    enrolled.uid.as_deref().unwrap_or_default() == uid
        && found.is_none_or(|inode| inode == enrolled.netns_inode)
}

/// Reconciles on every new snapshot (once the source has read everything:
/// an empty first snapshot must not release the pods a restarted agent took
/// back), and every second while some pod is pending.
pub fn spawn(enroller: Enroller, mut store: watch::Receiver<Arc<Store>>) -> JoinHandle<()> {
    let enroller = Arc::new(enroller);
    tokio::spawn(async move {
        let mut reported: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let snapshot = store.borrow_and_update().clone();
            let mut retry = false;
            if snapshot.generation > 0 {
                let seen = snapshot.clone();
                let e = enroller.clone();
                let pending =
                    match tokio::task::spawn_blocking(move || e.reconcile(&snapshot)).await {
                        Ok(p) => p,
                        Err(e) => {
                            warn!(error = %e, "enrolment pass failed");
                            BTreeMap::new()
                        }
                    };
                for (pod, reason) in &pending {
                    if reported.get(pod) != Some(reason) {
                        warn!(pod = %pod, %reason, "in the mesh but not enrolled yet; retrying");
                    }
                }
                retry = !pending.is_empty();
                if let Some(r) = &enroller.redirection {
                    let enrolled = enroller.pods.list().into_iter().map(|p| p.name).collect();
                    let changes = redirection::changes(&seen, &enroller.node, &enrolled);
                    retry |= !r.apply(&changes).await;
                }
                enroller.pods.set_pending(pending.clone());
                reported = pending;
                let current = store.borrow().clone();
                enroller.prepare_certificates(&current).await;
            }
            tokio::select! {
                changed = store.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(RETRY), if retry => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::inpod::netns::NetnsCookie;

    const UID: &str = "5f0c3c2e-8d1a-4b7e-9c3d-2a1b0c9d8e7f";

    fn enrolled(netns_inode: u64) -> PodInfo {
        PodInfo {
            name: "shop/app".into(),
            netns: "/run/netns/app".into(),
            netns_cookie: NetnsCookie(1),
            netns_inode,
            addresses: vec![IpAddr::from([10, 1, 0, 10])],
            hbone_connections: 0,
            uid: Some(UID.into()),
            managed: true,
        }
    }

    #[test]
    fn a_pod_is_the_same_while_its_uid_and_namespace_are() {
        let p = enrolled(4026532001);
        assert!(same_pod(&p, UID, Some(4026532001)), "unchanged");
        assert!(same_pod(&p, UID, None), "namespace not found now: left");
        assert!(
            !same_pod(&p, "00000000-0000-0000-0000-000000000000", Some(4026532001)),
            "another pod under the same name"
        );
        assert!(
            !same_pod(&p, UID, Some(4026532002)),
            "sandbox re-created (same UID, new namespace): enrolled again"
        );
    }
}
