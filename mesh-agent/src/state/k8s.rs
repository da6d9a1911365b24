//! Pods, Services and Namespaces turned into the store's `Workload` and
//! `Service`: defaults filled in, addresses parsed, ambient capture decided.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet},
    hash::{BuildHasher as _, Hash, Hasher as _, RandomState},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use hashbrown::HashTable;
use k8s_openapi::{
    api::core::v1::{Pod, Service as K8sService},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{ConfigWarning, Service, ServicePort, TargetPort, Workload, yaml::Objects};

/// The label (on a namespace or a pod) that puts workloads in the mesh.
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// The annotation naming a pod's network namespace in a local configuration
/// (`/run/netns/NAME`, `/proc/PID/ns/net`).
pub const NETNS_ANNOTATION: &str = "mesh-agent/netns";

/// The annotation istio-cni sets on a pod once its traffic is captured
/// (value `enabled`), and clears when it lets go; this agent does the same
/// for the pods it enrols. Ztunnels and agents reach a pod over HBONE only
/// once it carries it.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// Set by Istio's sidecar injector: such a pod has its own proxy and is
/// never captured by an ambient node agent.
const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

/// Every annotation [`workload`] reads: the fast read of a Pod
/// ([`super::pod_parse`]) keeps only these.
pub(super) const ANNOTATIONS_READ: [&str; 3] =
    [NETNS_ANNOTATION, REDIRECTION_ANNOTATION, SIDECAR_STATUS];

/// `app.kubernetes.io/name` of the agent's own pods (`deploy/`: the node
/// agents and the CA), which are never captured, whatever their
/// namespace's label says.
const OWN_APPS: [&str; 2] = ["mesh-agent", "mesh-ca"];

/// A workload and what the store needs to know about its pod besides.
#[derive(Debug)]
pub(super) struct PodWorkload {
    pub workload: Arc<Workload>,
    /// Shares its node's network namespace and addresses.
    pub host_network: bool,
    /// Never captured, whatever the labels say: it shares its node's
    /// network, has its own sidecar proxy, or is one of the agent's own.
    pub exempt: bool,
}

/// The label sets and named ports of the pods the process holds: a
/// Deployment's pods have the same, and share one copy, whichever text or
/// API object they came from.
static SHARED: std::sync::LazyLock<Mutex<Shared>> = std::sync::LazyLock::new(Default::default);

#[derive(Debug, Default)]
struct Shared {
    /// Found by the pairs a pod's fields lend ([`Shared::labels`]): a pod
    /// whose set is held already copies none of its strings.
    labels: HashTable<Arc<BTreeMap<String, String>>>,
    ports: HashTable<Arc<BTreeMap<String, u16>>>,
    /// Namespaces, service accounts, nodes and owners.
    strings: HashSet<Arc<str>>,
    /// Hashes the label sets and port maps.
    hasher: RandomState,
    /// How many the last sweep left.
    kept: usize,
}

impl Shared {
    /// The table, swept: taken once for all that one pod shares.
    fn lock() -> MutexGuard<'static, Shared> {
        let mut shared = SHARED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shared.sweep();
        shared
    }

    /// The copy already held of `value`, or a copy of it now held.
    fn string(&mut self, value: &str) -> Arc<str> {
        if let Some(seen) = self.strings.get(value) {
            return seen.clone();
        }
        let value: Arc<str> = value.into();
        self.strings.insert(value.clone());
        value
    }

    /// The set held of these labels (sorted by key, each key once), or a
    /// copy of them now held.
    fn labels(&mut self, labels: &[(Cow<'_, str>, Cow<'_, str>)]) -> Arc<BTreeMap<String, String>> {
        let pairs = labels.iter().map(|(k, v)| (&**k, &**v));
        share_pairs(&mut self.labels, &self.hasher, pairs)
    }

    /// The map held of these named ports (sorted by name, each name once),
    /// or a copy of it now held.
    fn ports(&mut self, ports: &[(&str, u16)]) -> Arc<BTreeMap<String, u16>> {
        share_pairs(&mut self.ports, &self.hasher, ports.iter().copied())
    }

    fn len(&self) -> usize {
        self.labels.len() + self.ports.len() + self.strings.len()
    }

    /// Lets go of what no pod holds any more, once the table has doubled
    /// since the last sweep: what it keeps for gone pods stays under what
    /// the live ones hold.
    fn sweep(&mut self) {
        if self.len() < (2 * self.kept).max(1024) {
            return;
        }
        self.labels.retain(|set| Arc::strong_count(set) > 1);
        self.ports.retain(|set| Arc::strong_count(set) > 1);
        self.strings.retain(|s| Arc::strong_count(s) > 1);
        self.kept = self.len();
    }
}

/// The map in `table` with these pairs (sorted by key, each key once),
/// found without copying them; else one built of them and held. A pair
/// hashes the same whether its strings are borrowed (`V = &str`) or held
/// (`S = String`).
fn share_pairs<'p, V, S>(
    table: &mut HashTable<Arc<BTreeMap<String, S>>>,
    hasher: &RandomState,
    pairs: impl ExactSizeIterator<Item = (&'p str, V)> + Clone,
) -> Arc<BTreeMap<String, S>>
where
    V: Hash + PartialEq<S>,
    S: Hash + From<V>,
{
    let hash = hash_pairs(hasher, pairs.clone());
    let same = |held: &Arc<BTreeMap<String, S>>| {
        held.len() == pairs.len()
            && held
                .iter()
                .zip(pairs.clone())
                .all(|((hk, hv), (k, v))| hk == k && v == *hv)
    };
    if let Some(held) = table.find(hash, same) {
        return held.clone();
    }
    let map: Arc<BTreeMap<String, S>> =
        Arc::new(pairs.map(|(k, v)| (k.to_owned(), S::from(v))).collect());
    table.insert_unique(hash, map.clone(), |held| {
        hash_pairs(hasher, held.iter().map(|(k, v)| (k.as_str(), v)))
    });
    map
}

fn hash_pairs<'p>(hasher: &RandomState, pairs: impl Iterator<Item = (&'p str, impl Hash)>) -> u64 {
    let mut state = hasher.build_hasher();
    for (k, v) in pairs {
        k.hash(&mut state);
        v.hash(&mut state);
    }
    state.finish()
}

/// What the agent keeps of a Pod: its workload, built once when the object
/// is read, and the warnings about it. A Pod as the API server sends it
/// also carries container specs, env, volumes, conditions and managed
/// fields, kilobytes each that every agent would otherwise hold for every
/// pod of the cluster; the workload is shared with every snapshot that
/// has it unchanged.
#[derive(Debug)]
pub(super) struct StoredPod {
    /// The workload as the last snapshot had it (whether it is captured
    /// depends on its namespace's labels too); None for a pod that has
    /// finished (Succeeded or Failed).
    workload: Option<Mutex<Arc<Workload>>>,
    host_network: bool,
    exempt: bool,
    warnings: Vec<ConfigWarning>,
}

impl StoredPod {
    pub fn new(pod: &Pod) -> StoredPod {
        StoredPod::of(PodFields::of(pod))
    }

    /// Of the fields read from a Pod, borrowed or not.
    pub fn of(pod: PodFields<'_>) -> StoredPod {
        let mut warnings = Vec::new();
        let built = workload(pod, &mut warnings);
        StoredPod {
            host_network: built.as_ref().is_some_and(|b| b.host_network),
            exempt: built.as_ref().is_some_and(|b| b.exempt),
            workload: built.map(|b| Mutex::new(b.workload)),
            warnings,
        }
    }
}

/// The fields of a Pod that its workload is built from ([`workload`]):
/// borrowed from a Kubernetes `Pod` (the API's, the general read's), or
/// from the text itself by the fast read ([`super::pod_parse`]), so that
/// only what the workload keeps is copied.
#[derive(Debug, Default)]
pub(super) struct PodFields<'a> {
    pub name: Option<Cow<'a, str>>,
    pub namespace: Option<Cow<'a, str>>,
    pub uid: Option<Cow<'a, str>>,
    /// Sorted by key, each key once (as a map has them).
    pub labels: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The values of [`ANNOTATIONS_READ`], in its order.
    pub annotations: [Option<Cow<'a, str>>; 3],
    /// The kind and name of the controller: the first owner reference
    /// with `controller: true`.
    pub controller: Option<(Cow<'a, str>, Cow<'a, str>)>,
    /// The containers' named ports in order, each number as written.
    pub ports: Vec<(Cow<'a, str>, i32)>,
    pub host_network: bool,
    pub service_account: Option<Cow<'a, str>>,
    pub node: Option<Cow<'a, str>>,
    pub phase: Option<Cow<'a, str>>,
    /// `status.podIPs`.
    pub pod_ips: Vec<Cow<'a, str>>,
    /// `status.podIP`.
    pub pod_ip: Option<Cow<'a, str>>,
}

impl<'a> PodFields<'a> {
    /// A Pod's, borrowed.
    pub fn of(pod: &'a Pod) -> PodFields<'a> {
        let lent = |s: &'a String| Cow::Borrowed(s.as_str());
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let annotations = meta.annotations.as_ref();
        PodFields {
            name: meta.name.as_ref().map(lent),
            namespace: meta.namespace.as_ref().map(lent),
            uid: meta.uid.as_ref().map(lent),
            labels: (meta.labels.iter().flatten())
                .map(|(k, v)| (lent(k), lent(v)))
                .collect(),
            annotations: ANNOTATIONS_READ.map(|key| annotations.and_then(|a| a.get(key)).map(lent)),
            controller: (meta.owner_references.iter().flatten())
                .find(|r| r.controller == Some(true))
                .map(|r| (lent(&r.kind), lent(&r.name))),
            ports: (spec.into_iter().flat_map(|s| &s.containers))
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| Some((lent(p.name.as_ref()?), p.container_port)))
                .collect(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            service_account: spec.and_then(|s| s.service_account_name.as_ref()).map(lent),
            node: spec.and_then(|s| s.node_name.as_ref()).map(lent),
            phase: status.and_then(|s| s.phase.as_ref()).map(lent),
            pod_ips: (status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten())
            .map(|p| lent(&p.ip))
            .collect(),
            pod_ip: status.and_then(|s| s.pod_ip.as_ref()).map(lent),
        }
    }

    /// The value of label `key`.
    fn label(&self, key: &str) -> Option<&str> {
        let at = self.labels.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.labels[at].1)
    }

    /// The value of annotation `key`, one of [`ANNOTATIONS_READ`].
    fn annotation(&self, key: &str) -> Option<&str> {
        let at = ANNOTATIONS_READ.iter().position(|k| *k == key);
        // The fast read of a Pod keeps no other.
        debug_assert!(at.is_some(), "{key}");
        self.annotations[at?].as_deref()
    }
}

/// Workloads of the pods that may still run (not Succeeded or Failed), in
/// namespace/name order.
/// `redirection_annotation`: whether a destination is reached over HBONE
/// only when annotated as captured (see
/// [`super::StoreOptions::redirection_annotation`]), or when its labels say
/// it is captured.
pub(super) fn workloads(
    objects: &Objects,
    redirection_annotation: bool,
    warnings: &mut Vec<ConfigWarning>,
) -> Vec<PodWorkload> {
    objects
        .pods
        .iter()
        .filter_map(|(_, pod)| {
            let pod = &pod.object;
            warnings.extend(pod.warnings.iter().cloned());
            let mut stored = pod
                .workload
                .as_ref()?
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let ns_labels = objects
                .namespaces
                .get(&*stored.namespace)
                .and_then(|ns| ns.object.metadata.labels.as_ref());
            let mode = stored.labels.get(DATAPLANE_MODE).map(String::as_str);
            let captured = !pod.exempt && captured(mode, ns_labels);
            let hbone = stored.redirected || !redirection_annotation && captured;
            if stored.captured != captured || stored.hbone != hbone {
                *stored = Arc::new(Workload {
                    captured,
                    hbone,
                    ..Workload::clone(&stored)
                });
            }
            Some(PodWorkload {
                workload: stored.clone(),
                host_network: pod.host_network,
                exempt: pod.exempt,
            })
        })
        .collect()
}

fn workload(pod: PodFields<'_>, warnings: &mut Vec<ConfigWarning>) -> Option<PodWorkload> {
    if matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let namespace = pod.namespace.as_deref().unwrap_or("default");
    let object = || {
        let name = pod.name.as_deref().unwrap_or_default();
        format!("Pod {namespace}/{name}")
    };

    // As a map of them: by name, the last port of a name kept.
    let mut ports: Vec<(&str, u16)> = Vec::with_capacity(pod.ports.len());
    for (port_name, number) in &pod.ports {
        match port_number(*number) {
            Some(n) => ports.push((port_name, n)),
            None => warnings.push(ConfigWarning {
                object: object(),
                kind: "parse_error",
                message: format!(
                    "container port {port_name} is {number}, not a port number; ignored"
                ),
            }),
        }
    }
    ports.sort_by(|a, b| a.0.cmp(b.0));
    ports.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 = later.1;
        }
        same
    });

    // Capturing a host-network pod would capture its whole node; Istio's CNI
    // never does, whatever the labels say.
    let host_network = pod.host_network;
    // A sidecar pod has its own proxy; the agent's own pods carry the mesh.
    let sidecar = pod.annotation(SIDECAR_STATUS).is_some();
    let own = pod
        .label("app.kubernetes.io/name")
        .is_some_and(|app| OWN_APPS.contains(&app));
    let exempt = host_network || sidecar || own;
    let captured = !exempt && captured(pod.label(DATAPLANE_MODE), None);
    let redirected = pod.annotation(REDIRECTION_ANNOTATION) == Some("enabled");
    let netns = pod
        .annotation(NETNS_ANNOTATION)
        .filter(|path| !path.is_empty())
        .map(std::path::PathBuf::from);
    let ips = pod_ips(&pod.pod_ips, pod.pod_ip.as_deref(), object, warnings);
    let owner = owner_workload(&pod);
    let owner_kind = owner_kind(&pod);
    let mut shared = Shared::lock();
    let workload = Workload {
        ips,
        service_account: shared.string(
            pod.service_account
                .as_deref()
                .filter(|sa| !sa.is_empty())
                .unwrap_or("default"),
        ),
        node: shared.string(pod.node.as_deref().unwrap_or_default()),
        owner: owner.map(|o| shared.string(o)),
        owner_kind: owner_kind.map(|k| shared.string(&k)),
        namespace: shared.string(namespace),
        labels: shared.labels(&pod.labels),
        ports: shared.ports(&ports),
        captured,
        redirected,
        // Decided with the store's options, when it is indexed.
        hbone: false,
        name: pod.name.map(Cow::into_owned).unwrap_or_default(),
        uid: pod.uid.map(Cow::into_owned).unwrap_or_default(),
        netns,
    };
    drop(shared);
    Some(PodWorkload {
        workload: Arc::new(workload),
        host_network,
        exempt,
    })
}

/// Istio's workload name for a pod with a controller: a ReplicaSet's
/// without its pod-template hash (the Deployment's), a Job's without a
/// CronJob's schedule suffix (`-` and 8 to 10 digits: the CronJob's), any
/// other controller's (StatefulSet, DaemonSet, ...) as it is. None for a
/// bare pod, whose workload is the pod itself.
fn owner_workload<'a>(pod: &'a PodFields<'_>) -> Option<&'a str> {
    let (kind, name) = pod.controller.as_ref()?;
    let name = &**name;
    let trimmed = match &**kind {
        "ReplicaSet" => pod
            .label("pod-template-hash")
            .and_then(|hash| name.strip_suffix(hash)?.strip_suffix('-'))
            .unwrap_or(name),
        "Job" => match name.rsplit_once('-') {
            Some((cron, stamp))
                if (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron
            }
            _ => name,
        },
        _ => name,
    };
    (!trimmed.is_empty()).then_some(trimmed)
}

/// The kind of [`owner_workload`], in lower case: a ReplicaSet whose name
/// carries the pod-template hash is a Deployment's, a Job whose name
/// carries a CronJob's schedule suffix is a CronJob's.
fn owner_kind(pod: &PodFields<'_>) -> Option<Cow<'static, str>> {
    let (kind, name) = pod.controller.as_ref()?;
    let trimmed = owner_workload(pod)? != name;
    Some(match (&**kind, trimmed) {
        ("ReplicaSet", true) => Cow::Borrowed("deployment"),
        ("Job", true) => Cow::Borrowed("cronjob"),
        (kind, _) => Cow::Owned(kind.to_ascii_lowercase()),
    })
}

/// The pod's own `istio.io/dataplane-mode` (`pod_mode`) decides (`none`
/// opts out, `ambient` opts in); otherwise its namespace's label does.
fn captured(pod_mode: Option<&str>, namespace: Option<&BTreeMap<String, String>>) -> bool {
    match pod_mode {
        Some("none") => false,
        Some("ambient") => true,
        _ => namespace
            .and_then(|labels| labels.get(DATAPLANE_MODE))
            .is_some_and(|mode| mode == "ambient"),
    }
}

/// `status.podIPs` (`listed`), else `status.podIP`; none while the pod is
/// pending.
fn pod_ips(
    listed: &[Cow<'_, str>],
    single: Option<&str>,
    object: impl Fn() -> String,
    warnings: &mut Vec<ConfigWarning>,
) -> Vec<IpAddr> {
    // `podIP` only when `podIPs` lists none.
    let single = single.filter(|_| listed.is_empty());
    let raw = listed.iter().map(|p| &**p).chain(single);
    let mut ips = Vec::with_capacity(listed.len().max(1));
    for text in raw.filter(|t| !t.is_empty()) {
        match text.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip.to_canonical()) => ips.push(ip.to_canonical()),
            Ok(_) => {}
            Err(e) => warnings.push(ConfigWarning {
                object: object(),
                kind: "parse_error",
                message: format!("pod IP {text:?}: {e}; ignored"),
            }),
        }
    }
    // One or two addresses, held as long as the pod: without the slack a
    // growing Vec keeps.
    ips.shrink_to_fit();
    ips
}

pub(super) fn services(objects: &Objects, warnings: &mut Vec<ConfigWarning>) -> Vec<Service> {
    objects
        .services
        .values()
        .map(|svc| service(&svc.object, warnings))
        .collect()
}

fn service(svc: &K8sService, warnings: &mut Vec<ConfigWarning>) -> Service {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let object = format!("Service {namespace}/{name}");
    let mut warn = |message: String| {
        warnings.push(ConfigWarning {
            object: object.clone(),
            kind: "parse_error",
            message,
        });
    };
    let Some(spec) = &svc.spec else {
        return Service {
            name,
            namespace,
            vips: Vec::new(),
            ports: Vec::new(),
            selector: BTreeMap::new(),
            entry: None,
            subject_alt_names: Vec::new(),
        };
    };

    // clusterIPs holds clusterIP first, and the second family when dual-stack.
    let cluster_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let mut vips = Vec::new();
    for text in cluster_ips {
        if text.is_empty() || text == "None" {
            continue;
        }
        match text.parse::<IpAddr>() {
            Ok(ip) if !vips.contains(&ip.to_canonical()) => vips.push(ip.to_canonical()),
            Ok(_) => {}
            Err(e) => warn(format!("clusterIP {text:?}: {e}; ignored")),
        }
    }

    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let port_name = p.name.clone().unwrap_or_default();
        // The data path carries TCP only.
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let Some(port) = port_number(p.port) else {
            warn(format!(
                "port {port_name:?} is {}, not a port number; ignored",
                p.port
            ));
            continue;
        };
        match target_port(port, p.target_port.as_ref()) {
            Some(target_port) => ports.push(ServicePort {
                name: port_name,
                port,
                target_port,
                app_protocol: p.app_protocol.clone(),
            }),
            None => warn(format!(
                "port {port_name:?}: targetPort {:?} is not a port number or name; ignored",
                p.target_port
            )),
        }
    }

    Service {
        name,
        namespace,
        vips,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
        entry: None,
        subject_alt_names: Vec::new(),
    }
}

/// The label that names an EndpointSlice's Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the store keeps of an EndpointSlice: its ready addresses and its
/// TCP ports by name (the Service port's name; empty for an unnamed one).
#[derive(Debug, Default)]
pub(super) struct Slice {
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<(String, u16)>,
}

/// EndpointSlices by the Service they belong to (`kubernetes.io/service-name`,
/// in the slice's namespace): only endpoints that are ready (a missing
/// `conditions.ready` counts as ready, as Kubernetes says), only TCP ports.
pub(super) fn slices(
    objects: &Objects,
    warnings: &mut Vec<ConfigWarning>,
) -> HashMap<(String, String), Vec<Slice>> {
    let mut by_service: HashMap<(String, String), Vec<Slice>> = HashMap::new();
    for ((namespace, name), parsed) in &objects.endpoint_slices {
        let slice = &parsed.object;
        let object = format!("EndpointSlice {namespace}/{name}");
        let mut warn = |kind, message: String| {
            warnings.push(ConfigWarning {
                object: object.clone(),
                kind,
                message,
            })
        };
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|s| !s.is_empty())
        else {
            warn(
                "parse_error",
                format!("has no {SERVICE_NAME_LABEL} label, so no Service; ignored"),
            );
            continue;
        };
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            warn(
                "unsupported",
                format!(
                    "addressType {:?} is not supported (IPv4 and IPv6 are); ignored",
                    slice.address_type
                ),
            );
            continue;
        }
        let mut ports = Vec::new();
        for p in slice.ports.iter().flatten() {
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue;
            }
            let port_name = p.name.clone().unwrap_or_default();
            match p.port.and_then(port_number) {
                Some(n) => ports.push((port_name, n)),
                None => warn(
                    "parse_error",
                    format!("port {port_name:?} has no valid port number; ignored"),
                ),
            }
        }
        let mut addresses = Vec::new();
        for ep in &slice.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for text in &ep.addresses {
                match text.parse::<IpAddr>() {
                    Ok(ip) if !addresses.contains(&ip.to_canonical()) => {
                        addresses.push(ip.to_canonical())
                    }
                    Ok(_) => {}
                    Err(e) => warn("parse_error", format!("address {text:?}: {e}; ignored")),
                }
            }
        }
        by_service
            .entry((namespace.clone(), service.clone()))
            .or_default()
            .push(Slice { addresses, ports });
    }
    by_service
}

/// Namespaces that set their own outbound traffic policy
/// ([`super::OUTBOUND_POLICY_ANNOTATION`]); a value that is neither mode is
/// reported and the mesh-wide policy applies.
pub(super) fn outbound_policies(
    objects: &Objects,
    warnings: &mut Vec<ConfigWarning>,
) -> HashMap<String, super::OutboundTrafficPolicy> {
    use super::{OUTBOUND_POLICY_ANNOTATION, OutboundTrafficPolicy};
    let mut out = HashMap::new();
    for (name, parsed) in &objects.namespaces {
        let Some(value) = parsed
            .object
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(OUTBOUND_POLICY_ANNOTATION))
        else {
            continue;
        };
        let policy = match value.as_str() {
            "ALLOW_ANY" => OutboundTrafficPolicy::AllowAny,
            "REGISTRY_ONLY" => OutboundTrafficPolicy::RegistryOnly,
            other => {
                warnings.push(ConfigWarning {
                    object: format!("Namespace {name}"),
                    kind: "parse_error",
                    message: format!(
                        "{OUTBOUND_POLICY_ANNOTATION} {other:?} is neither ALLOW_ANY nor \
                         REGISTRY_ONLY; the mesh-wide policy applies"
                    ),
                });
                continue;
            }
        };
        out.insert(name.clone(), policy);
    }
    out
}

/// Kubernetes defaults a missing targetPort to the port itself.
fn target_port(port: u16, target: Option<&IntOrString>) -> Option<TargetPort> {
    match target {
        None | Some(IntOrString::Int(0)) => Some(TargetPort::Number(port)),
        Some(IntOrString::Int(n)) => port_number(*n).map(TargetPort::Number),
        Some(IntOrString::String(s)) if s.is_empty() => Some(TargetPort::Number(port)),
        Some(IntOrString::String(s)) => match s.parse::<u16>() {
            Ok(0) => None,
            Ok(n) => Some(TargetPort::Number(n)),
            Err(_) => Some(TargetPort::Name(s.clone())),
        },
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::pod_parse::Probe;

    /// A pod as a watch delivers it, with much the agent does not read.
    const FULL_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9c5b6f4-x2x9q
  namespace: shop
  uid: 3f6c1a52-0001-4b7e-9c1d-5e8f2a7b0001
  resourceVersion: "1234"
  labels: {app: web, version: v2, istio.io/dataplane-mode: ambient, pod-template-hash: 7d9c5b6f4}
  annotations:
    mesh-agent/netns: /run/netns/web
    prometheus.io/scrape: "true"
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9c5b6f4, uid: 9a1b, controller: true}
  managedFields:
  - {manager: kubelet, operation: Update, apiVersion: v1, fieldsType: FieldsV1, fieldsV1: {"f:status": {}}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers:
  - name: app
    image: registry.example.com/web:2
    env: [{name: LOG, value: json}]
    ports:
    - {name: http, containerPort: 8080}
    - {containerPort: 9090}
  - name: sidecar-free
    image: registry.example.com/helper:1
    ports: [{name: admin, containerPort: 9901}]
  volumes: [{name: data, emptyDir: {}}]
status:
  phase: Running
  podIP: 10.1.0.5
  podIPs: [{ip: 10.1.0.5}, {ip: "fd00:1::5"}]
  conditions: [{type: Ready, status: "True"}]
"#;

    /// Pods with the same labels, namespace, service account, node and
    /// owner share one copy of each, whether from one text or from separate
    /// API objects; a sweep lets go of what no pod holds.
    #[test]
    fn pods_share_their_label_set_and_a_sweep_drops_the_unused() {
        let pod = |name: &str| {
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "share",
                             "labels": {"app": "share-test", "v": "unique-1"},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                  "name": "share-test-5f7d9c6b8", "uid": "u",
                                                  "controller": true}]},
                "spec": {"serviceAccountName": "share-sa", "nodeName": "share-node",
                         "containers": [{"name": "c", "ports": [{"name": "h", "containerPort": 80}]}]},
                "status": {"podIP": "10.9.8.7"},
            })
        };
        let docs = [
            crate::state::Document::from_json("a", pod("a")),
            crate::state::Document::from_json("b", pod("b")),
        ];
        let store =
            crate::state::Store::from_documents(&docs, &crate::state::StoreOptions::for_tests());
        let (a, b) = (
            store.workload("share", "a").unwrap(),
            store.workload("share", "b").unwrap(),
        );
        assert!(Arc::ptr_eq(&a.labels, &b.labels));
        assert!(Arc::ptr_eq(&a.ports, &b.ports));
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        assert!(Arc::ptr_eq(&a.service_account, &b.service_account));
        assert!(Arc::ptr_eq(&a.node, &b.node));
        let (Some(ao), Some(bo)) = (&a.owner, &b.owner) else {
            panic!("no owner: {:?} {:?}", a.owner, b.owner);
        };
        assert_eq!(&**ao, "share-test-5f7d9c6b8");
        assert!(Arc::ptr_eq(ao, bo));
        assert!(Arc::ptr_eq(
            a.owner_kind.as_ref().unwrap(),
            b.owner_kind.as_ref().unwrap()
        ));
        assert_eq!(a.ips.capacity(), 1);

        let mut shared = Shared::default();
        let set = |value: String| vec![(Cow::Borrowed("k"), Cow::Owned(value))];
        let held = shared.labels(&set("held".into()));
        assert_eq!(*held, BTreeMap::from([("k".into(), "held".into())]));
        for i in 0..1100 {
            shared.labels(&set(i.to_string()));
        }
        assert_eq!(shared.labels.len(), 1101);
        shared.sweep();
        assert_eq!(shared.labels.len(), 1);
        assert!(Arc::ptr_eq(&shared.labels(&set("held".into())), &held));
        assert_eq!(shared.kept, 1);

        let held: Arc<str> = "held-namespace".into();
        shared.strings.insert(held.clone());
        for i in 0..2100 {
            shared.strings.insert(format!("gone-{i}").into());
        }
        shared.sweep();
        assert_eq!(shared.strings.len(), 1);
        assert!(shared.strings.contains(&held));
    }

    /// The full Pod, as kube-rs or the general read has it, and its
    /// fields as the fast read borrows them from the JSON text.
    #[test]
    fn a_stored_pod_gives_the_same_workload_as_the_full_pod() {
        let full: Pod = serde_yaml::from_str(FULL_POD).unwrap();
        let stored = StoredPod::new(&full);
        let json = serde_json::to_string(&full).unwrap();
        let Ok(Probe::Pod(fields)) = serde_json::from_str::<Probe>(&json) else {
            panic!("not read as a Pod: {json}");
        };
        assert!(matches!(fields.name, Some(Cow::Borrowed(_))), "{fields:?}");
        let fast = StoredPod::of(fields);
        let a = fast.workload.as_ref().unwrap().lock().unwrap().clone();
        let b = stored.workload.as_ref().unwrap().lock().unwrap().clone();
        assert_eq!(*a, *b);
        assert!(Arc::ptr_eq(&a.labels, &b.labels));
        assert_eq!(fast.host_network, stored.host_network);
        assert_eq!(fast.warnings, stored.warnings);
        assert_eq!(b.ports.len(), 2, "{:?}", b.ports);
        assert_eq!(b.ips.len(), 2);
        assert!(b.netns.is_some());
        assert_eq!(b.owner.as_deref(), Some("web"), "the Deployment");
    }

    /// Snapshot after snapshot, a pod whose workload did not change is
    /// the same allocation; its namespace's label changes whether it is
    /// captured.
    #[test]
    fn snapshots_share_a_pods_workload() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: ns, labels: {app: a}}\n\
                   spec: {containers: [{name: c, ports: [{name: http, containerPort: 0}]}]}\n\
                   status: {podIP: 10.1.0.9}\n";
        let ambient = "apiVersion: v1\nkind: Namespace\n\
                       metadata: {name: ns, labels: {istio.io/dataplane-mode: ambient}}\n";
        let doc = crate::state::Document::parse_text("pods.yaml", pod);
        let labelled = crate::state::Document::parse_text("ns.yaml", ambient);
        let opts = crate::state::tests::opts();
        let store = |docs: &[&crate::state::Document]| {
            crate::state::Store::from_documents(docs.iter().copied(), &opts)
        };
        let (one, two) = (store(&[&doc]), store(&[&doc]));
        let (a, b) = (
            one.workload("ns", "p").unwrap(),
            two.workload("ns", "p").unwrap(),
        );
        assert!(Arc::ptr_eq(a, b), "one copy for both snapshots");
        assert!(!a.captured);
        // The warning about the pod comes with every snapshot.
        assert_eq!(one.warnings(), two.warnings());
        assert_eq!(one.warnings().len(), 1, "{:?}", one.warnings());

        let three = store(&[&labelled, &doc]);
        let c = three.workload("ns", "p").unwrap();
        assert!(c.captured, "its namespace is ambient now");
        assert!(!a.captured, "the older snapshot is unchanged");
        assert_eq!(
            **c,
            Workload {
                captured: true,
                // Locally, captured is reached over HBONE.
                hbone: true,
                ..Workload::clone(a)
            }
        );
    }

    /// A pod's fields with a controller of `kind` and `name`, and its
    /// `pod-template-hash` label when given.
    fn controlled_by<'a>(kind: &'a str, name: &'a str, hash: Option<&'a str>) -> PodFields<'a> {
        PodFields {
            controller: Some((kind.into(), name.into())),
            labels: hash
                .map(|h| ("pod-template-hash".into(), h.into()))
                .into_iter()
                .collect(),
            ..PodFields::default()
        }
    }

    #[test]
    fn the_workload_is_the_controller_istio_names() {
        let owned = |kind: &str, name: &str, hash: Option<&str>| {
            owner_workload(&controlled_by(kind, name, hash)).map(str::to_owned)
        };
        assert_eq!(
            owned("ReplicaSet", "reviews-v1-5f7d9c6b8", Some("5f7d9c6b8")).as_deref(),
            Some("reviews-v1"),
            "a Deployment's"
        );
        assert_eq!(
            owned("ReplicaSet", "standalone", None).as_deref(),
            Some("standalone"),
            "a ReplicaSet of its own"
        );
        assert_eq!(owned("StatefulSet", "db", None).as_deref(), Some("db"));
        assert_eq!(owned("DaemonSet", "agent", None).as_deref(), Some("agent"));
        assert_eq!(
            owned("Job", "backup-29012345", None).as_deref(),
            Some("backup"),
            "a CronJob's"
        );
        assert_eq!(
            owned("Job", "migrate-2", None).as_deref(),
            Some("migrate-2")
        );
        assert_eq!(owner_workload(&PodFields::default()), None);
    }

    #[test]
    fn the_workload_kind_is_the_controller_s_istio_names() {
        let kind = |kind: &str, name: &str, hash: Option<&str>| {
            owner_kind(&controlled_by(kind, name, hash))
        };
        for (k, name, hash, want) in [
            (
                "ReplicaSet",
                "reviews-v1-5f7d9c6b8",
                Some("5f7d9c6b8"),
                "deployment",
            ),
            ("ReplicaSet", "standalone", None, "replicaset"),
            ("StatefulSet", "db", None, "statefulset"),
            ("DaemonSet", "agent", None, "daemonset"),
            ("Job", "backup-29012345", None, "cronjob"),
            ("Job", "migrate-2", None, "job"),
        ] {
            assert_eq!(kind(k, name, hash).as_deref(), Some(want), "{k} {name}");
        }
        assert_eq!(owner_kind(&PodFields::default()), None);
    }
}
