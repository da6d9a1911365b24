//! istio-cni's mark of a captured pod, kept as it keeps it: the node agent
//! sets `ambient.istio.io/redirection: enabled` on a pod of its node once
//! the pod's capture is installed, and clears it once the capture is
//! released (a JSON merge patch on the Pod; RBAC grants `patch` on pods).
//! Agents and ztunnels reach a pod over HBONE only once it carries it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, PoisonError},
};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::{
    metrics::Metrics,
    state::{REDIRECTION_ANNOTATION, Store},
};

/// Writes the annotation through the API.
pub struct Redirection {
    client: kube::Client,
    metrics: Arc<Metrics>,
    /// The last error each pod's write met, so that one that keeps failing
    /// (RBAC without `patch` on pods, say) is logged once, not every retry.
    reported: Mutex<BTreeMap<String, String>>,
}

/// One pod whose annotation is not what its capture says.
#[derive(Debug, PartialEq, Eq)]
pub struct Change {
    pub namespace: String,
    pub name: String,
    /// Set (the capture is installed) or cleared (it is not).
    pub enabled: bool,
}

/// The pods of node `node` whose annotation differs from whether they are
/// enrolled (`namespace/name`): the ones to patch.
pub fn changes(store: &Store, node: &str, enrolled: &BTreeSet<String>) -> Vec<Change> {
    store
        .workloads()
        .filter(|wl| &*wl.node == node)
        .filter_map(|wl| {
            let enabled = enrolled.contains(&format!("{}/{}", wl.namespace, wl.name));
            (enabled != wl.redirected).then(|| Change {
                namespace: wl.namespace.to_string(),
                name: wl.name.clone(),
                enabled,
            })
        })
        .collect()
}

impl Redirection {
    pub fn new(client: kube::Client, metrics: Arc<Metrics>) -> Self {
        Redirection {
            client,
            metrics,
            reported: Mutex::default(),
        }
    }

    /// Patches every pod of `changes`; false when one failed (it is tried
    /// again on the next pass). A pod deleted meanwhile needs nothing.
    pub async fn apply(&self, changes: &[Change]) -> bool {
        let mut all = true;
        for c in changes {
            let value = if c.enabled {
                json!("enabled")
            } else {
                Value::Null
            };
            let patch = json!({ "metadata": { "annotations": { REDIRECTION_ANNOTATION: value } } });
            let pods = Api::<Pod>::namespaced(self.client.clone(), &c.namespace);
            let op = if c.enabled { "annotate" } else { "unannotate" };
            let pod = format!("{}/{}", c.namespace, c.name);
            let result = pods
                .patch(&c.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            let mut reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
            match result {
                Ok(_) => {
                    self.metrics.enrolment(op, "ok");
                    info!(%pod, enabled = c.enabled, "{REDIRECTION_ANNOTATION} written");
                    reported.remove(&pod);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    reported.remove(&pod);
                }
                Err(e) => {
                    self.metrics.enrolment(op, "api_error");
                    let error = e.to_string();
                    if reported.get(&pod) == Some(&error) {
                        debug!(%pod, %error, "cannot write {REDIRECTION_ANNOTATION}; retrying");
                    } else {
                        warn!(%pod, %error, "cannot write {REDIRECTION_ANNOTATION}; retrying every second");
                        reported.insert(pod, error);
                    }
                    all = false;
                }
            }
        }
        all
    }
}

#[cfg(test)]
#[path = "redirection_tests.rs"]
mod tests;
