//! The Kubernetes API source: one kube-rs watcher per kind, each object
//! parsed once into a `Document` when it arrives, the store merged from all
//! of them. The watchers list, then watch from the list's resourceVersion;
//! they resume after a dropped connection, relist after `410 Gone`, and back
//! off on API errors (kube-runtime's default back-off).
//!
//! Every pod of the cluster is watched, not only this node's: the data path
//! needs the addresses and identities of remote pods (HBONE's expected peer,
//! Service endpoints). Enrolment and the cluster CA are what stay limited to
//! this node's pods.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt as _, future::BoxFuture, stream::SelectAll};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tracing::{debug, info, warn};

use super::{Resource, WATCHED};
use crate::state::{ConfigWarning, Document, ObjectKey, Publisher, Source};
use crate::sync::LockExt as _;

/// Changes arriving within this window are published as one snapshot...
const SETTLE: Duration = Duration::from_millis(50);
/// ...but a steady stream of changes is published at least this often.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// How documents from the API are named in warnings.
pub const ORIGIN: &str = "kubernetes";

/// API objects by the key warnings name them with, for Events.
pub type References = Arc<Mutex<HashMap<ObjectKey, ObjectReference>>>;

pub struct KubeSource {
    client: Client,
    pub(super) resources: Vec<Resource>,
    references: References,
    /// The one namespace Secrets are watched in (an ingress gateway's).
    secrets_namespace: Option<String>,
}

impl KubeSource {
    pub fn new(client: Client) -> Self {
        KubeSource {
            client,
            resources: WATCHED.to_vec(),
            references: References::default(),
            secrets_namespace: None,
        }
    }

    /// Also watches the Secrets of `namespace` (only there), for an
    /// ingress gateway's certificates.
    pub fn with_secrets(mut self, namespace: String) -> Self {
        self.resources.push(super::SECRETS);
        self.secrets_namespace = Some(namespace);
        self
    }

    /// Where the objects' references are kept as they arrive.
    pub fn references(&self) -> References {
        self.references.clone()
    }
}

/// What one kind's watcher has delivered so far.
#[derive(Default)]
struct Kind {
    /// `group/version` (`v1` for the core group), for every object's
    /// reference.
    api_version: String,
    /// Listed completely at least once (or known to be unavailable).
    synced: bool,
    /// Objects being relisted, replacing `objects` when the list is done.
    relisting: Option<BTreeMap<(String, String), Document>>,
    objects: BTreeMap<(String, String), Document>,
    /// Why the kind cannot be read (missing CRD, RBAC).
    unavailable: Option<String>,
    last_error: Option<String>,
}

impl Source for KubeSource {
    fn name(&self) -> String {
        "Kubernetes API".to_owned()
    }

    fn run(self: Box<Self>, mut out: Publisher) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut streams = SelectAll::new();
            for (index, r) in self.resources.iter().enumerate() {
                let ar = api_resource(r);
                let api: Api<DynamicObject> = match &self.secrets_namespace {
                    Some(ns) if r.kind == super::SECRETS.kind => {
                        Api::namespaced_with(self.client.clone(), ns, &ar)
                    }
                    _ => Api::all_with(self.client.clone(), &ar),
                };
                let stream = watcher::watcher(api, watcher::Config::default())
                    .default_backoff()
                    .map(move |event| (index, event));
                streams.push(stream.boxed());
            }
            let mut kinds: Vec<Kind> = self
                .resources
                .iter()
                .map(|r| Kind {
                    api_version: api_resource(r).api_version,
                    ..Kind::default()
                })
                .collect();
            // Since when changes wait to be published.
            let mut dirty: Option<tokio::time::Instant> = None;
            let mut published = false;
            loop {
                let all_synced = kinds.iter().all(|k| k.synced);
                let next = match dirty.filter(|_| all_synced) {
                    Some(since) => {
                        let wait = SETTLE.min(MAX_DELAY.saturating_sub(since.elapsed()));
                        match tokio::time::timeout(wait, streams.next()).await {
                            Ok(next) => next,
                            Err(_) => {
                                // Quiet for a moment (or waiting too long):
                                // publish what has arrived.
                                if !published {
                                    info!(
                                        "every kind listed; configuration from the Kubernetes API is complete"
                                    );
                                }
                                published = true;
                                dirty = None;
                                if !publish(&mut out, &self.resources, &kinds) {
                                    return;
                                }
                                continue;
                            }
                        }
                    }
                    None => streams.next().await,
                };
                let Some((index, event)) = next else { return };
                if out.is_closed() {
                    return;
                }
                let resource = &self.resources[index];
                let kind = &mut kinds[index];
                let changed = match event {
                    Ok(event) => {
                        kind.last_error = None;
                        apply(resource, kind, event, &self.references)
                    }
                    Err(e) => failed(resource, kind, &e),
                };
                if changed && dirty.is_none() {
                    dirty = Some(tokio::time::Instant::now());
                }
            }
        })
    }
}

fn api_resource(r: &Resource) -> ApiResource {
    ApiResource {
        group: r.group.to_owned(),
        version: r.version.to_owned(),
        api_version: if r.group.is_empty() {
            r.version.to_owned()
        } else {
            format!("{}/{}", r.group, r.version)
        },
        kind: r.kind.to_owned(),
        plural: r.plural.to_owned(),
    }
}

/// Applies one watcher event; true when the objects changed.
fn apply(
    r: &Resource,
    kind: &mut Kind,
    event: Event<DynamicObject>,
    references: &References,
) -> bool {
    match event {
        Event::Init => {
            kind.relisting = Some(BTreeMap::new());
            false
        }
        Event::InitApply(obj) => {
            if let Some((key, doc)) = document(r, &kind.api_version, obj, references) {
                kind.relisting.get_or_insert_default().insert(key, doc);
            }
            false
        }
        Event::InitDone => {
            let listed = kind.relisting.take().unwrap_or_default();
            debug!(kind = r.kind, objects = listed.len(), "listed");
            let mut refs = references.locked();
            for (ns, name) in kind.objects.keys().filter(|k| !listed.contains_key(*k)) {
                refs.remove(&object_key(r, ns, name));
            }
            kind.objects = listed;
            kind.synced = true;
            kind.unavailable = None;
            true
        }
        Event::Apply(obj) => match document(r, &kind.api_version, obj, references) {
            Some((key, doc)) => {
                kind.objects.insert(key, doc);
                true
            }
            None => false,
        },
        Event::Delete(obj) => {
            let ns = obj.metadata.namespace.clone().unwrap_or_default();
            let name = obj.metadata.name.clone().unwrap_or_default();
            references.locked().remove(&object_key(r, &ns, &name));
            kind.objects.remove(&(ns, name)).is_some()
        }
    }
}

/// A watcher error. A kind the API server does not serve (its CRD is not
/// installed, or not at this version) or that RBAC does not let the agent
/// read counts as listed, with a warning: one missing kind must not hold
/// back the rest. It is empty, except for the policy kinds, which stand in
/// closed (`fail_closed_stand_in`). The watcher keeps retrying it with
/// back-off; once it lists, its objects replace the stand-in. A kind that
/// had been listed keeps its last objects through later errors. Logged once
/// each.
fn failed(r: &Resource, kind: &mut Kind, e: &watcher::Error) -> bool {
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => Some(status.code),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    };
    let message = e.to_string();
    if kind.last_error.as_ref() != Some(&message) {
        warn!(kind = r.kind, error = %message, "Kubernetes API error; retrying with back-off");
    }
    kind.last_error = Some(message.clone());
    match code {
        Some(404 | 403) if !kind.synced => {
            let why = if code == Some(404) {
                format!(
                    "the API server does not serve {}/{} (is its CRD installed?)",
                    kind.api_version, r.plural
                )
            } else {
                format!(
                    "the agent is not allowed to list {}: check its RBAC",
                    r.plural
                )
            };
            kind.unavailable = Some(why);
            kind.synced = true;
            true
        }
        _ => false,
    }
}

fn object_key(r: &Resource, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        kind: r.kind,
        namespace: if r.namespaced {
            namespace.to_owned()
        } else {
            String::new()
        },
        name: name.to_owned(),
    }
}

/// The object as a document, its reference recorded for Events.
fn document(
    r: &Resource,
    api_version: &str,
    obj: DynamicObject,
    references: &References,
) -> Option<((String, String), Document)> {
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let name = obj.metadata.name.clone()?;
    references.locked().insert(
        object_key(r, &ns, &name),
        ObjectReference {
            api_version: Some(api_version.to_owned()),
            kind: Some(r.kind.to_owned()),
            namespace: obj.metadata.namespace.clone(),
            name: Some(name.clone()),
            uid: obj.metadata.uid.clone(),
            resource_version: obj.metadata.resource_version.clone(),
            field_path: None,
        },
    );
    let mut value = match serde_json::to_value(&obj) {
        Ok(v) => v,
        Err(e) => {
            warn!(kind = r.kind, %name, error = %e, "cannot read object");
            return None;
        }
    };
    // List items carry no apiVersion/kind; and what the agent never reads
    // need not be parsed or kept.
    value["apiVersion"] = api_version.into();
    value["kind"] = r.kind.into();
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
        if let Some(annotations) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
    Some(((ns, name), Document::from_json(ORIGIN, value)))
}

fn publish(out: &mut Publisher, resources: &[Resource], kinds: &[Kind]) -> bool {
    let mut notes: Vec<Document> = Vec::new();
    let mut slices_unreadable = false;
    for (r, k) in resources.iter().zip(kinds) {
        let Some(why) = k.unavailable.as_ref() else {
            continue;
        };
        let stand_in = fail_closed_stand_in(r, out.root_namespace());
        let effect = match &stand_in {
            Some((_, effect)) => effect,
            // Without slices a Service would have no endpoints at all.
            None if r.kind == "EndpointSlice" => {
                slices_unreadable = true;
                "Services' endpoints are found by their selectors instead (a Service without \
                 one has none)"
            }
            None => "no objects of this kind are read",
        };
        notes.push(Document::with_warning(ConfigWarning {
            object: format!("{ORIGIN}: {}", r.plural),
            kind: "load_error",
            message: format!("{why}; {effect}"),
        }));
        notes.extend(stand_in.map(|(object, _)| Document::from_json(ORIGIN, object)));
    }
    out.set_endpoint_slices_unreadable(slices_unreadable);
    out.publish(kinds.iter().flat_map(|k| k.objects.values()).chain(&notes))
}

/// What stands for a policy kind that could not be read: its objects may
/// exist (RBAC hides them, or the cluster serves another version), and
/// reading it as empty would drop every DENY and every STRICT. A mesh-wide
/// DENY-all AuthorizationPolicy, or a mesh-wide STRICT PeerAuthentication
/// (no narrower one can be in the store, since none was read), with what it
/// does, for the warning.
fn fail_closed_stand_in(
    r: &Resource,
    root_namespace: &str,
) -> Option<(serde_json::Value, &'static str)> {
    let metadata = serde_json::json!({
        "name": format!("mesh-agent-unreadable-{}", r.plural),
        "namespace": root_namespace,
    });
    let (spec, effect) = match r.kind {
        "AuthorizationPolicy" => (
            serde_json::json!({"action": "DENY", "rules": [{}]}),
            "every connection to a meshed pod is denied until they can be read",
        ),
        "PeerAuthentication" => (
            serde_json::json!({"mtls": {"mode": "STRICT"}}),
            "every meshed pod refuses plaintext until they can be read",
        ),
        _ => return None,
    };
    let object = serde_json::json!({
        "apiVersion": format!("{}/{}", r.group, r.version),
        "kind": r.kind,
        "metadata": metadata,
        "spec": spec,
    });
    Some((object, effect))
}

/// One API object as JSON through the conversion the watchers apply, as
/// every watched kind, then into a snapshot: what `cargo xtask fuzz` feeds
/// arbitrary bytes.
#[cfg(test)]
pub(crate) fn fuzz_object(json: &[u8]) {
    let Ok(obj) = serde_json::from_slice::<DynamicObject>(json) else {
        return;
    };
    let references = References::default();
    let docs: Vec<Document> = WATCHED
        .iter()
        .filter_map(|r| document(r, "v1", obj.clone(), &references).map(|(_, d)| d))
        .collect();
    let opts = crate::state::StoreOptions {
        trust_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        redirection_annotation: true,
        skip_ingress_secrets: false,
        endpoint_slices_only: true,
        outbound_traffic_policy: Default::default(),
    };
    let _ = crate::state::Store::from_documents(&docs, &opts);
}
