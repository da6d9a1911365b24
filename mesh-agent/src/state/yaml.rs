//! Reading Kubernetes objects out of YAML text: `---` documents and
//! `kind: List`, dispatch on apiVersion/kind, and a warning for every object
//! that cannot be used (the others still are).

use std::{collections::BTreeMap, fmt, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Secret, Service as K8sService, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml::Value;

use super::{
    ConfigWarning,
    gateway::{Gateway, GatewayClass, HttpRoute},
    k8s::{PodFields, StoredPod},
    peer_auth::PeerAuthentication,
    pod_parse::Probe,
    policy::AuthorizationPolicy,
    ratelimit::LocalRateLimitPolicy,
    route::{DestinationRule, VirtualService},
    service_entry::ServiceEntry,
};

/// `(namespace, name)` of a namespaced object.
pub(super) type Key = (String, String);

/// An object and the file it came from.
#[derive(Debug)]
pub(super) struct Parsed<T> {
    pub origin: Arc<str>,
    pub object: Arc<T>,
}

/// Every usable object, the later definition of a duplicate winning.
#[derive(Debug, Default)]
pub(super) struct Objects<'a> {
    pub namespaces: BTreeMap<String, Parsed<Namespace>>,
    /// In namespace/name order, each pod once. Pods are most of a large
    /// configuration: their keys are the documents', not copied into a
    /// map's (two strings a pod, and a tree insert).
    pub pods: Vec<(&'a ObjectKey, Parsed<StoredPod>)>,
    pub services: BTreeMap<Key, Parsed<K8sService>>,
    pub endpoint_slices: BTreeMap<Key, Parsed<EndpointSlice>>,
    pub service_accounts: BTreeMap<Key, Parsed<ServiceAccount>>,
    pub authorization_policies: BTreeMap<Key, Parsed<AuthorizationPolicy>>,
    pub peer_authentications: BTreeMap<Key, Parsed<PeerAuthentication>>,
    pub http_routes: BTreeMap<Key, Parsed<HttpRoute>>,
    pub gateways: BTreeMap<Key, Parsed<Gateway>>,
    /// Cluster-scoped: by name.
    pub gateway_classes: BTreeMap<String, Parsed<GatewayClass>>,
    pub virtual_services: BTreeMap<Key, Parsed<VirtualService>>,
    pub destination_rules: BTreeMap<Key, Parsed<DestinationRule>>,
    pub service_entries: BTreeMap<Key, Parsed<ServiceEntry>>,
    pub rate_limits: BTreeMap<Key, Parsed<LocalRateLimitPolicy>>,
    /// TLS Secrets, for the certificates of ingress gateway listeners.
    pub secrets: BTreeMap<Key, Parsed<Secret>>,
}

/// Kind, namespace and name: what identifies an object in a source.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: &'static str,
    /// Empty for a Namespace.
    pub namespace: String,
    pub name: String,
}

/// `Pod ns/name`, `Namespace name`.
impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// An object of a kind the agent reads, parsed.
#[derive(Clone, Debug)]
pub(super) enum Typed {
    Namespace(Arc<Namespace>),
    Pod(Arc<StoredPod>),
    Service(Arc<K8sService>),
    EndpointSlice(Arc<EndpointSlice>),
    ServiceAccount(Arc<ServiceAccount>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    PeerAuthentication(Arc<PeerAuthentication>),
    HttpRoute(Arc<HttpRoute>),
    Gateway(Arc<Gateway>),
    GatewayClass(Arc<GatewayClass>),
    VirtualService(Arc<VirtualService>),
    DestinationRule(Arc<DestinationRule>),
    ServiceEntry(Arc<ServiceEntry>),
    LocalRateLimitPolicy(Arc<LocalRateLimitPolicy>),
    Secret(Arc<Secret>),
}

/// The kinds the agent reads: (apiVersions, kind).
const KINDS: &[(&[&str], &str)] = &[
    (&["v1"], "Namespace"),
    (&["v1"], "Pod"),
    (&["v1"], "Service"),
    (&["discovery.k8s.io/v1"], "EndpointSlice"),
    (&["v1"], "ServiceAccount"),
    (&["v1"], "Secret"),
    (
        &["security.istio.io/v1", "security.istio.io/v1beta1"],
        "AuthorizationPolicy",
    ),
    (
        &["security.istio.io/v1", "security.istio.io/v1beta1"],
        "PeerAuthentication",
    ),
    (
        &[
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ],
        "HTTPRoute",
    ),
    (
        &[
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ],
        "Gateway",
    ),
    (
        &[
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ],
        "GatewayClass",
    ),
    (
        &[
            "networking.istio.io/v1",
            "networking.istio.io/v1beta1",
            "networking.istio.io/v1alpha3",
        ],
        "VirtualService",
    ),
    (
        &[
            "networking.istio.io/v1",
            "networking.istio.io/v1beta1",
            "networking.istio.io/v1alpha3",
        ],
        "DestinationRule",
    ),
    (
        &[
            "networking.istio.io/v1",
            "networking.istio.io/v1beta1",
            "networking.istio.io/v1alpha3",
        ],
        "ServiceEntry",
    ),
    (&["policy.mesh-agent.dev/v1alpha1"], "LocalRateLimitPolicy"),
];

/// One unit a source delivers: the objects of a file (every `---` document
/// and `kind: List` item in it) or one object from the Kubernetes API,
/// parsed once, with the warnings about it. Sources keep these and re-parse
/// only what changed; the store is merged from all of them.
#[derive(Debug, Default)]
pub struct Document {
    pub(super) origin: Arc<str>,
    pub(super) entries: Vec<(ObjectKey, Typed)>,
    pub(super) warnings: Vec<ConfigWarning>,
    /// The syntax error that ended parsing early (YAML), or the first one
    /// (JSON), if there was one.
    pub(super) syntax_error: Option<ConfigWarning>,
}

/// A text at least this long is read and parsed in parts, in parallel.
const PARALLEL_FROM: usize = 1 << 20;

/// In how many parts a text of `len` bytes is read and parsed: one per
/// core (at most 8), and none shorter than [`PARALLEL_FROM`].
pub(super) fn parallel_parts(len: usize) -> usize {
    // A short text is one part whatever the cores: they are not counted
    // (std reads the affinity and the cgroup's CPU quota files for it),
    // as each file read asks up to three times.
    if len < 2 * PARALLEL_FROM {
        return 1;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    threads.min(len / PARALLEL_FROM).max(1)
}

/// Where `text` may be cut into `parts` texts of whole documents: at
/// lines that are a `---` marker (which no scalar or collection can hold
/// at the start of a line), near equal sizes apart. None for a text
/// with directives (`%YAML`), which apply to the document after them.
fn cuts(text: &str, parts: usize) -> Option<Vec<usize>> {
    if text.starts_with('%') || text.contains("\n%") {
        return None;
    }
    let mut cuts = Vec::new();
    for k in 1..parts {
        let from = (text.len() * k / parts).max(cuts.last().copied().unwrap_or(0) + 1);
        let Some(found) = text.get(from..).and_then(|rest| {
            rest.match_indices("\n---")
                .map(|(i, _)| from + i + 1)
                .find(|&at| {
                    matches!(
                        text.as_bytes().get(at + 3),
                        None | Some(b'\n' | b'\r' | b' ' | b'\t')
                    )
                })
        }) else {
            break;
        };
        cuts.push(found);
    }
    Some(cuts)
}

/// `work` on each of `inputs`, each on a thread of its own, the results
/// in the order of `inputs` (a panic on a thread goes on in the caller).
pub(super) fn on_threads<I: Sync, T: Send>(inputs: &[I], work: impl Fn(&I) -> T + Sync) -> Vec<T> {
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = inputs
            .iter()
            .map(|input| scope.spawn(move || work(input)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

impl Document {
    /// Every object in a YAML text (`---` separated documents, `kind: List`).
    /// A long text is cut at document markers and its parts are parsed in
    /// parallel; when a later part has an object that does not parse, the
    /// whole text is parsed again in one piece, so that every message
    /// names its line in the text.
    pub fn parse_text(origin: &str, text: &str) -> Document {
        Document::parse_in_parts(origin, text, parallel_parts(text.len()))
    }

    /// [`Document::parse_text`] with `parts` parts at most.
    pub(super) fn parse_in_parts(origin: &str, text: &str, parts: usize) -> Document {
        let cuts = match cuts(text, parts) {
            Some(cuts) if !cuts.is_empty() => cuts,
            _ => return Document::parse_part(origin, text),
        };
        let bounds: Vec<(usize, usize)> = std::iter::once(0)
            .chain(cuts.iter().copied())
            .zip(cuts.iter().copied().chain(std::iter::once(text.len())))
            .collect();
        let mut docs = on_threads(&bounds, |&(from, to)| {
            Document::parse_part(origin, &text[from..to])
        });
        let located = |d: &Document| {
            d.syntax_error.is_some()
                || d.warnings
                    .iter()
                    .any(|w| matches!(w.kind, "parse_error" | "unknown_field"))
        };
        if docs.iter().skip(1).any(located) || docs[0].syntax_error.is_some() {
            return Document::parse_part(origin, text);
        }
        let mut doc = docs.remove(0);
        docs.into_iter().for_each(|part| doc.append(part));
        doc
    }

    /// Adds what a later part of the same text holds; the first syntax
    /// error stays the one reported.
    pub(super) fn append(&mut self, part: Document) {
        self.entries.extend(part.entries);
        self.warnings.extend(part.warnings);
        if self.syntax_error.is_none() {
            self.syntax_error = part.syntax_error;
        }
    }

    /// A syntax error in the text from `origin`: warned about, and (the
    /// first one) what keeps the text from being applied.
    pub(super) fn syntax(&mut self, origin: &str, message: String) {
        let w = ConfigWarning {
            object: origin.to_owned(),
            kind: "parse_error",
            message,
        };
        self.warnings.push(w.clone());
        if self.syntax_error.is_none() {
            self.syntax_error = Some(w);
        }
    }

    fn parse_part(origin: &str, text: &str) -> Document {
        let mut doc = Document {
            origin: origin.into(),
            ..Document::default()
        };
        for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let at = At {
                origin,
                text: Some(text),
                index: Some(index),
                json: None,
            };
            let value = match Probe::deserialize(de) {
                Ok(Probe::Null) => continue,
                Ok(Probe::Pod(pod)) => {
                    doc.add_pod(at, pod);
                    continue;
                }
                Ok(Probe::Other(value)) => Ok(value),
                // Read again the general way, which says what is wrong.
                Err(_) => serde_yaml::Deserializer::from_str(text)
                    .nth(index)
                    .map_or(Ok(Value::Null), Value::deserialize),
            };
            match value {
                Ok(Value::Null) => {}
                Ok(value) => doc.add(at, value),
                Err(e) => {
                    doc.syntax(origin, e.to_string());
                    // The YAML parser cannot find the next document after
                    // a syntax error: the rest of this text is lost.
                    break;
                }
            }
        }
        doc
    }

    /// One object as the Kubernetes API serves it (JSON).
    pub fn from_json(origin: &str, object: serde_json::Value) -> Document {
        let mut doc = Document {
            origin: origin.into(),
            ..Document::default()
        };
        let at = At {
            origin,
            text: None,
            index: None,
            json: None,
        };
        let text = |key: &str| object.get(key).and_then(serde_json::Value::as_str);
        let fast = (text("apiVersion") == Some("v1") && text("kind") == Some("Pod"))
            .then(|| Probe::deserialize(&object).ok())
            .flatten();
        match fast {
            // Read the fast way, as from a text ([`Probe`]).
            Some(Probe::Pod(pod)) => doc.add_pod(at, pod),
            _ => match serde_yaml::to_value(object) {
                Ok(value) => doc.add(at, value),
                Err(e) => doc.warnings.push(ConfigWarning {
                    object: origin.to_owned(),
                    kind: "parse_error",
                    message: e.to_string(),
                }),
            },
        }
        doc
    }

    /// The syntax error that cut the text short: what parsed before it is
    /// not the whole text, so a source must not apply it.
    pub fn syntax_error(&self) -> Option<&ConfigWarning> {
        self.syntax_error.as_ref()
    }

    #[cfg(test)]
    pub fn origin(&self) -> &str {
        &self.origin
    }

    #[cfg(test)]
    pub fn warnings(&self) -> &[ConfigWarning] {
        &self.warnings
    }

    /// The objects, as `Debug` shows them.
    #[cfg(test)]
    pub fn entries_debug(&self) -> String {
        format!("{:?}", self.entries)
    }

    /// The objects it defines.
    pub fn keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.entries.iter().map(|(key, _)| key)
    }

    /// A document that only says something about the source itself.
    pub fn with_warning(w: ConfigWarning) -> Document {
        Document {
            origin: w.object.as_str().into(),
            warnings: vec![w],
            ..Document::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ObjectError {
    #[error("{0}")]
    Yaml(#[from] serde_yaml::Error),
    /// serde_json's message, at the line and column in the whole text.
    #[error("{0}")]
    Json(String),
    #[error("{0} is missing")]
    Missing(&'static str),
}

impl ObjectError {
    fn kind(&self) -> &'static str {
        match self {
            // serde's own wording for `deny_unknown_fields`.
            ObjectError::Yaml(e) if e.to_string().contains("unknown field") => "unknown_field",
            ObjectError::Json(e) if e.contains("unknown field") => "unknown_field",
            _ => "parse_error",
        }
    }
}

/// Where a value came from: the text is parsed again on an error, because
/// serde_yaml names the field path and line only when reading text.
#[derive(Clone, Copy)]
pub(super) struct At<'a> {
    pub origin: &'a str,
    pub text: Option<&'a str>,
    /// Index of the `---` document; None inside a `kind: List`.
    pub index: Option<usize>,
    /// A JSON object's own text, a slice of `text`: read again on an
    /// error, for the line and column of what is wrong.
    pub json: Option<&'a str>,
}

/// apiVersion, kind, namespace and name, read before the typed parse so that
/// a failing object can still be named.
struct Header {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    name: Option<String>,
}

impl Header {
    fn of(value: &Value) -> Header {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let meta = value.get("metadata");
        Header {
            api_version: text(value.get("apiVersion")).unwrap_or_default(),
            kind: text(value.get("kind")).unwrap_or_default(),
            namespace: text(meta.and_then(|m| m.get("namespace"))),
            name: text(meta.and_then(|m| m.get("name"))),
        }
    }

    fn namespace(&self) -> String {
        self.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned())
    }
}

/// `Pod ns/name`, `Namespace name`, `ConfigMap name` (no namespace given).
impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.kind.is_empty() {
            "object"
        } else {
            &self.kind
        };
        let name = self.name.as_deref().unwrap_or("<unnamed>");
        match (kind, &self.namespace) {
            ("Namespace" | "GatewayClass", _) => write!(f, "{kind} {name}"),
            (
                "Pod"
                | "Service"
                | "EndpointSlice"
                | "ServiceAccount"
                | "AuthorizationPolicy"
                | "PeerAuthentication"
                | "HTTPRoute"
                | "Gateway"
                | "VirtualService"
                | "DestinationRule"
                | "ServiceEntry"
                | "LocalRateLimitPolicy",
                _,
            ) => {
                write!(f, "{kind} {}/{name}", self.namespace())
            }
            (_, Some(ns)) => write!(f, "{kind} {ns}/{name}"),
            (_, None) => write!(f, "{kind} {name}"),
        }
    }
}

impl<'a> Objects<'a> {
    /// Merges documents in order; an object defined twice is warned about
    /// and the later definition wins.
    pub fn merge(
        docs: impl IntoIterator<Item = &'a Document>,
        warnings: &mut Vec<ConfigWarning>,
    ) -> Objects<'a> {
        let mut objects = Objects::default();
        for doc in docs {
            warnings.extend(doc.warnings.iter().cloned());
            for (key, typed) in &doc.entries {
                objects.insert(&doc.origin, key, typed.clone(), warnings);
            }
        }
        // Stable: a pod's definitions stay in the order they were read,
        // the later replacing the one kept.
        objects.pods.sort_by(|a, b| a.0.cmp(b.0));
        objects.pods.dedup_by(|later, kept| {
            if later.0 != kept.0 {
                return false;
            }
            std::mem::swap(&mut later.1, &mut kept.1);
            warnings.push(defined_again(kept.0, &kept.1.origin, &later.1.origin));
            true
        });
        objects
    }

    fn insert(
        &mut self,
        origin: &Arc<str>,
        key: &'a ObjectKey,
        typed: Typed,
        warnings: &mut Vec<ConfigWarning>,
    ) {
        fn put<K: Ord, T>(
            map: &mut BTreeMap<K, Parsed<T>>,
            k: K,
            object: Arc<T>,
            origin: &Arc<str>,
        ) -> Option<Arc<str>> {
            let parsed = Parsed {
                origin: origin.clone(),
                object,
            };
            map.insert(k, parsed).map(|first| first.origin)
        }
        let nk = || (key.namespace.clone(), key.name.clone());
        let first = match typed {
            Typed::Namespace(o) => put(&mut self.namespaces, key.name.clone(), o, origin),
            Typed::Pod(object) => {
                // Duplicates are found once all are in (see `merge`).
                let origin = origin.clone();
                self.pods.push((key, Parsed { origin, object }));
                None
            }
            Typed::Service(o) => put(&mut self.services, nk(), o, origin),
            Typed::EndpointSlice(o) => put(&mut self.endpoint_slices, nk(), o, origin),
            Typed::ServiceAccount(o) => put(&mut self.service_accounts, nk(), o, origin),
            Typed::AuthorizationPolicy(o) => put(&mut self.authorization_policies, nk(), o, origin),
            Typed::PeerAuthentication(o) => put(&mut self.peer_authentications, nk(), o, origin),
            Typed::HttpRoute(o) => put(&mut self.http_routes, nk(), o, origin),
            Typed::Gateway(o) => put(&mut self.gateways, nk(), o, origin),
            Typed::GatewayClass(o) => put(&mut self.gateway_classes, key.name.clone(), o, origin),
            Typed::VirtualService(o) => put(&mut self.virtual_services, nk(), o, origin),
            Typed::DestinationRule(o) => put(&mut self.destination_rules, nk(), o, origin),
            Typed::ServiceEntry(o) => put(&mut self.service_entries, nk(), o, origin),
            Typed::LocalRateLimitPolicy(o) => put(&mut self.rate_limits, nk(), o, origin),
            Typed::Secret(o) => put(&mut self.secrets, nk(), o, origin),
        };
        if let Some(first) = first {
            warnings.push(defined_again(key, origin, &first));
        }
    }
}

/// The warning for an object defined again in `origin`, first in `first`.
fn defined_again(key: &ObjectKey, origin: &str, first: &str) -> ConfigWarning {
    ConfigWarning {
        object: key.to_string(),
        kind: "duplicate",
        message: format!(
            "defined again in {origin} (first in {first}); the later definition is used"
        ),
    }
}

impl Document {
    /// A `v1` Pod read the fast way ([`Probe`]): what [`Document::add`]
    /// does with one.
    pub(super) fn add_pod(&mut self, at: At<'_>, pod: PodFields<'_>) {
        let Some(name) = pod.name.as_deref() else {
            let header = Header {
                api_version: "v1".to_owned(),
                kind: "Pod".to_owned(),
                namespace: pod.namespace.as_deref().map(str::to_owned),
                name: None,
            };
            let e = ObjectError::Missing("metadata.name");
            return self.warnings.push(ConfigWarning {
                object: format!("{}: {header}", at.origin),
                kind: e.kind(),
                message: e.to_string(),
            });
        };
        let key = ObjectKey {
            kind: "Pod",
            namespace: pod.namespace.as_deref().unwrap_or("default").to_owned(),
            name: name.to_owned(),
        };
        let stored = StoredPod::of(pod);
        self.entries.push((key, Typed::Pod(Arc::new(stored))));
    }

    pub(super) fn add(&mut self, at: At<'_>, value: Value) {
        let header = Header::of(&value);
        let warn = |doc: &mut Document, kind, message| {
            doc.warnings.push(ConfigWarning {
                object: format!("{}: {header}", at.origin),
                kind,
                message,
            });
        };
        if header.api_version.is_empty() || header.kind.is_empty() {
            let message = "not a Kubernetes object: apiVersion and kind are required".to_owned();
            return warn(self, "parse_error", message);
        }
        if header.api_version == "v1" && header.kind == "List" {
            return match value.get("items") {
                Some(Value::Sequence(items)) => {
                    let inner = At {
                        index: None,
                        json: None,
                        ..at
                    };
                    for item in items.iter().filter(|v| !v.is_null()) {
                        self.add(inner, item.clone());
                    }
                }
                None | Some(Value::Null) => {}
                Some(_) => warn(self, "parse_error", "items is not a list".to_owned()),
            };
        }
        let Some(&(_, kind)) = KINDS.iter().find(|(versions, kind)| {
            *kind == header.kind && versions.contains(&header.api_version.as_str())
        }) else {
            let message = format!(
                "{} {} is not a kind the node agent reads; ignored",
                header.api_version, header.kind
            );
            return warn(self, "unsupported", message);
        };
        let Some(name) = header.name.clone() else {
            let e = ObjectError::Missing("metadata.name");
            return warn(self, e.kind(), e.to_string());
        };
        let key = ObjectKey {
            kind,
            namespace: if kind == "Namespace" || kind == "GatewayClass" {
                String::new()
            } else {
                header.namespace()
            },
            name,
        };
        // Read before the object is: a policy whose spec does not parse is
        // replaced by a fail-closed one scoped by this selector.
        let selector = value
            .get("spec")
            .and_then(|spec| spec.get("selector"))
            .and_then(|v| serde_yaml::from_value::<WorkloadSelector>(v.clone()).ok());
        let result = match kind {
            "Namespace" => typed(at, value).map(Typed::Namespace),
            "Pod" => typed::<Pod>(at, value).map(|pod| Typed::Pod(Arc::new(StoredPod::new(&pod)))),
            "Service" => typed(at, value).map(Typed::Service),
            "EndpointSlice" => typed(at, value).map(Typed::EndpointSlice),
            "ServiceAccount" => typed(at, value).map(Typed::ServiceAccount),
            "Secret" => typed(at, value).map(Typed::Secret),
            "AuthorizationPolicy" => typed(at, value).map(Typed::AuthorizationPolicy),
            "PeerAuthentication" => typed(at, value).map(Typed::PeerAuthentication),
            "HTTPRoute" => typed(at, value).map(Typed::HttpRoute),
            "GatewayClass" => typed(at, value).map(Typed::GatewayClass),
            "VirtualService" => typed(at, value).map(Typed::VirtualService),
            "DestinationRule" => typed(at, value).map(Typed::DestinationRule),
            "ServiceEntry" => typed(at, value).map(Typed::ServiceEntry),
            "LocalRateLimitPolicy" => typed(at, value).map(Typed::LocalRateLimitPolicy),
            _ => typed(at, value).map(Typed::Gateway),
        };
        let e = match result {
            Ok(object) => return self.entries.push((key, object)),
            Err(e) => e,
        };
        let scope = if selector.is_some() {
            "the workloads it selects"
        } else {
            "every workload of its namespace"
        };
        match kind {
            "AuthorizationPolicy" => {
                let message =
                    format!("{e}; until it parses, the agent denies every connection to {scope}");
                warn(self, e.kind(), message);
                let stand_in = AuthorizationPolicy::deny_all(selector);
                self.entries
                    .push((key, Typed::AuthorizationPolicy(Arc::new(stand_in))));
            }
            "PeerAuthentication" => {
                let message =
                    format!("{e}; until it parses, {scope} get STRICT (plaintext refused)");
                warn(self, e.kind(), message);
                let stand_in = PeerAuthentication::strict(selector);
                self.entries
                    .push((key, Typed::PeerAuthentication(Arc::new(stand_in))));
            }
            _ => warn(self, e.kind(), e.to_string()),
        }
    }
}

/// The typed object; on failure, serde's message with the field path and the
/// line when the document can be read again from its text.
fn typed<T: DeserializeOwned>(at: At<'_>, value: Value) -> Result<Arc<T>, ObjectError> {
    serde_yaml::from_value(value).map(Arc::new).map_err(|e| {
        if let Some((item, text)) = at.json.zip(at.text)
            && let Err(located) = serde_json::from_str::<T>(item)
        {
            return ObjectError::Json(super::json::located(text, item, &located));
        }
        let located = at
            .index
            .zip(at.text)
            .and_then(|(i, text)| serde_yaml::Deserializer::from_str(text).nth(i))
            .and_then(|de| T::deserialize(de).err());
        ObjectError::Yaml(located.unwrap_or(e))
    })
}

/// A label selector as Istio writes it (`selector: {matchLabels: ...}`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WorkloadSelector {
    pub match_labels: Option<BTreeMap<String, String>>,
}

impl WorkloadSelector {
    /// The labels to match; None when there are none, which selects every
    /// workload of the namespace, as no selector at all does.
    pub fn labels(selector: Option<&WorkloadSelector>) -> Option<BTreeMap<String, String>> {
        selector
            .and_then(|s| s.match_labels.clone())
            .filter(|labels| !labels.is_empty())
    }
}

/// A string that YAML may also have written as a number: Istio's ports are
/// strings (`"8080"`), and `8080` is the natural way to write one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}
