//! The state store: what the agent knows about workloads, services and
//! policies, as one immutable snapshot that is swapped whole on every change.
//! Built from Kubernetes objects; where they come from is a `Source`.

mod gateway;
mod ingress;
#[cfg(test)]
mod ingress_tests;
mod json;
mod k8s;
mod matcher;
mod peer_auth;
mod pod_parse;
mod policy;
mod ratelimit;
mod route;
mod service_entry;
mod source;
mod waypoint;
mod yaml;
mod ztunnel_dump;

pub use ztunnel_dump::ztunnel_uid;

#[cfg(test)]
mod egress_tests;
#[cfg(test)]
mod istio_route_tests;
#[cfg(test)]
mod peer_auth_tests;
#[cfg(test)]
mod policy_index_tests;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod policy_waypoint_tests;
#[cfg(test)]
mod service_entry_tests;
#[cfg(test)]
mod source_tests;
#[cfg(test)]
mod source_unparsed_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod waypoint_tests;

use std::{
    collections::{BTreeMap, HashMap, hash_map::Entry},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

pub use gateway::INGRESS_CLASSES;
pub use ingress::{
    IngressGateway, IngressListener, ListenerProtocol, TlsRefusal, host_only, hostname_matches,
};
pub use k8s::{NETNS_ANNOTATION, REDIRECTION_ANNOTATION};
pub use matcher::{Attrs, L7Request};
pub use ratelimit::RateLimit;
pub use route::{
    Abort, Backend, Condition, ConnectionPool, LoadBalancer, OutlierDetection, RequestView,
    RouteEntry, RouteStatus, RuleAction, SYSTEM_CA_BUNDLE, TlsOrigination, modify_path,
};
pub use service_entry::Location;
pub use source::{LocalFiles, Publisher, Source, spawn_source};
pub use waypoint::{Binding, GATEWAY_NAME, Waypoint};
pub use yaml::{Document, ObjectKey};

use crate::identity::Identity;

/// A pod, as far as the data path cares.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub name: String,
    /// The namespace, service account, node and owner strings are shared
    /// by the pods that have the same (see `k8s::Shared`).
    #[serde(serialize_with = "shared_str")]
    pub namespace: Arc<str>,
    #[serde(serialize_with = "shared_str")]
    pub service_account: Arc<str>,
    #[serde(serialize_with = "shared_str")]
    pub node: Arc<str>,
    pub ips: Vec<IpAddr>,
    /// Shared by the pods that have the same (a Deployment's pods: see
    /// `k8s::Shared`).
    #[serde(serialize_with = "shared")]
    pub labels: Arc<BTreeMap<String, String>>,
    /// Named container ports (for Service targetPort by name); shared as
    /// the labels are.
    #[serde(serialize_with = "shared")]
    pub ports: Arc<BTreeMap<String, u16>>,
    /// In the mesh: its namespace or the pod itself is labelled
    /// `istio.io/dataplane-mode=ambient`, the pod did not opt out (`none`),
    /// and it is neither a sidecar pod nor one of the agent's own.
    pub captured: bool,
    /// Annotated `ambient.istio.io/redirection: enabled`: an ambient node
    /// agent (this project's, or Istio's istio-cni) has installed its
    /// capture.
    pub redirected: bool,
    /// Reached over HBONE: see [`StoreOptions::redirection_annotation`].
    pub hbone: bool,
    /// `metadata.uid`: tells a pod from its replacement of the same name.
    pub uid: String,
    /// The pod's network namespace, when its manifest names it (annotation
    /// `mesh-agent/netns`, local configuration); in a cluster the agent finds
    /// it from the pod UID.
    pub netns: Option<std::path::PathBuf>,
    /// The workload its controller makes it part of (a Deployment, a
    /// StatefulSet, ...), as Istio names it; None for a bare pod.
    #[serde(serialize_with = "shared_opt_str")]
    pub owner: Option<Arc<str>>,
    /// The owner workload's kind in lower case (`deployment`,
    /// `statefulset`, `daemonset`, `job`, `cronjob`, ...); None for a bare
    /// pod.
    #[serde(serialize_with = "shared_opt_str")]
    pub owner_kind: Option<Arc<str>>,
}

/// What an `Arc` holds, serialized as itself.
fn shared<T: serde::Serialize, S: serde::Serializer>(v: &Arc<T>, s: S) -> Result<S::Ok, S::Error> {
    T::serialize(v, s)
}

/// A shared string, serialized as itself.
fn shared_str<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

/// A shared string if any, serialized as itself.
fn shared_opt_str<S: serde::Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&v.as_deref(), s)
}

impl Workload {
    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &self.namespace, &self.service_account)
    }

    /// Namespace and name: what names a pod's workload in a snapshot.
    fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }

    /// Istio's workload name (the `*_workload` metric labels): the owner
    /// workload (a Deployment, not its ReplicaSet), or the pod's own name.
    pub fn workload_name(&self) -> &str {
        self.owner.as_deref().unwrap_or(&self.name)
    }

    /// The kind of [`Workload::workload_name`], in lower case: the owner's,
    /// or `pod` (the `k8s.<kind>.name` key of HBONE's `baggage`).
    pub fn workload_kind(&self) -> &str {
        match (&self.owner, &self.owner_kind) {
            (Some(_), Some(kind)) => kind,
            _ => "pod",
        }
    }

    /// Istio's canonical service: `service.istio.io/canonical-name`, else
    /// `app.kubernetes.io/name`, else `app`, else the workload name.
    pub fn app(&self) -> &str {
        self.label("service.istio.io/canonical-name")
            .or_else(|| self.label("app.kubernetes.io/name"))
            .or_else(|| self.label("app"))
            .unwrap_or_else(|| self.workload_name())
    }

    /// Istio's canonical revision: `service.istio.io/canonical-revision`,
    /// else `app.kubernetes.io/version`, else `version`, else `latest`.
    pub fn version(&self) -> &str {
        self.label("service.istio.io/canonical-revision")
            .or_else(|| self.label("app.kubernetes.io/version"))
            .or_else(|| self.label("version"))
            .unwrap_or("latest")
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    /// Whether every label of `selector` is on this workload (an empty
    /// selector selects everything).
    pub fn has_labels(&self, selector: &BTreeMap<String, String>) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: TargetPort,
    /// `appProtocol` as written (`http`, `http2`, `grpc`,
    /// `kubernetes.io/h2c`, `tcp`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// clusterIP(s).
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    /// Added by a ServiceEntry (its `location`): `name` is the entry's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<Location>,
    /// A ServiceEntry's `subjectAltNames` (SPIFFE IDs): identities its
    /// endpoints may show besides their own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

impl Service {
    /// `<name>.<namespace>.svc.cluster.local`; a ServiceEntry's host as
    /// written.
    pub fn hostname(&self) -> String {
        match self.entry {
            Some(_) => self.name.clone(),
            None => format!("{}.{}.svc.cluster.local", self.name, self.namespace),
        }
    }
}

/// Where a captured connection to a destination outside the registry may
/// go: Istio's `outboundTrafficPolicy.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum OutboundTrafficPolicy {
    /// Anywhere: an unknown destination passes through in plain TCP.
    #[default]
    #[value(name = "ALLOW_ANY")]
    #[serde(rename = "ALLOW_ANY")]
    AllowAny,
    /// Only to a known workload, a Service or a ServiceEntry.
    #[value(name = "REGISTRY_ONLY")]
    #[serde(rename = "REGISTRY_ONLY")]
    RegistryOnly,
}

/// The Namespace annotation that sets [`OutboundTrafficPolicy`] for the
/// pods of one namespace, over the mesh-wide flag.
pub const OUTBOUND_POLICY_ANNOTATION: &str = "mesh-agent/outbound-traffic-policy";

/// An endpoint of a Service: an address and port, and the workload there
/// when it is a known pod (an EndpointSlice may list any address).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub workload: Option<Arc<Workload>>,
    pub addr: SocketAddr,
}

/// PeerAuthentication mode in effect for a workload port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum MtlsMode {
    Strict,
    Permissive,
}

/// A connection arriving at a local workload, as authorization sees it.
#[derive(Clone, Debug)]
pub struct Conn<'a> {
    pub src_ip: IpAddr,
    /// The verified peer identity (None for plaintext).
    pub src_identity: Option<&'a Identity>,
    pub dst: &'a Workload,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

impl Conn<'_> {
    pub fn attrs(&self) -> Attrs<'_> {
        Attrs {
            src_ip: self.src_ip,
            src_identity: self.src_identity,
            dst_ip: self.dst_ip,
            dst_port: self.dst_port,
            request: None,
        }
    }
}

/// What a waypoint was asked to serve: a Service port (by its VIP) or a
/// pod (by its address).
#[derive(Clone, Debug)]
pub enum WaypointTarget {
    Service(Arc<Service>, ServicePort),
    /// A pod, at the address it was addressed by.
    Workload(Arc<Workload>, SocketAddr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy` is `namespace/name` of the deciding policy, or empty when no
    /// ALLOW policy matched.
    Deny {
        policy: String,
        reason: String,
    },
}

/// Something in the configuration that was not applied as written.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ConfigWarning {
    /// `AuthorizationPolicy ns/name`; for a parse error the file, and the
    /// object when known (`policies.yaml: AuthorizationPolicy ns/name`).
    pub object: String,
    /// A short class for metrics: `parse_error`, `unknown_field`,
    /// `l7_rule_at_l4`, `missing_waypoint` (a route or policy for a waypoint
    /// that does not exist), `unsupported`, `duplicate` (the same object twice:
    /// the later one is used), `conflict` (two objects where Istio wants
    /// one), `load_error` (the source could not be read at all).
    pub kind: &'static str,
    pub message: String,
}

/// Picks out, snapshot after snapshot, the warnings the previous snapshot
/// did not have: what is logged, counted and written as an Event once, when
/// it appears.
#[derive(Debug, Default)]
pub struct NewWarnings(std::collections::HashSet<ConfigWarning>);

impl NewWarnings {
    pub fn of<'a>(&mut self, store: &'a Store) -> Vec<&'a ConfigWarning> {
        let new = store
            .warnings()
            .iter()
            .filter(|w| !self.0.contains(*w))
            .collect();
        self.0 = store.warnings().iter().cloned().collect();
        new
    }
}

#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub trust_domain: String,
    /// Policies here apply mesh-wide (Istio's `istio-system`).
    pub root_namespace: String,
    /// A destination pod is reached over HBONE only once it carries the
    /// redirection annotation (the cluster source, as Istio decides it: the
    /// label says a pod should be captured, the annotation that it is).
    /// Without it (a local configuration), a pod its labels put in the mesh
    /// is reached over HBONE too.
    pub redirection_annotation: bool,
    /// The source does not read Secrets (a node agent with the Kubernetes
    /// API): ingress listeners' certificates and DestinationRule
    /// `credentialName`s are neither loaded nor warned about; only the
    /// proxies that read them (gateway, waypoint) judge.
    pub skip_ingress_secrets: bool,
    /// A Service's endpoints are those of its EndpointSlices only (the
    /// cluster source, where Kubernetes writes them): a Service without
    /// slices has none. Otherwise (a local configuration) a Service without
    /// slices has the pods its selector picks.
    pub endpoint_slices_only: bool,
    /// The mesh-wide [`OutboundTrafficPolicy`]; a namespace may set its own
    /// ([`OUTBOUND_POLICY_ANNOTATION`]).
    pub outbound_traffic_policy: OutboundTrafficPolicy,
}

#[cfg(test)]
impl StoreOptions {
    /// A local configuration's options with trust domain `cluster.local`
    /// and root namespace `istio-system`: what tests start from, changing
    /// what they are about (`StoreOptions { x, ..StoreOptions::for_tests() }`).
    pub fn for_tests() -> StoreOptions {
        StoreOptions {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            redirection_annotation: false,
            skip_ingress_secrets: false,
            endpoint_slices_only: false,
            outbound_traffic_policy: Default::default(),
        }
    }
}

#[cfg(test)]
impl Workload {
    /// A captured pod `namespace/name` reached over HBONE, with no
    /// addresses, labels or ports, service account `default`: what tests
    /// start from (`Workload { x, ..Workload::for_tests("shop", "web") }`).
    pub fn for_tests(namespace: &str, name: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: namespace.into(),
            service_account: "default".into(),
            node: "".into(),
            ips: Vec::new(),
            labels: Default::default(),
            ports: Default::default(),
            captured: true,
            redirected: false,
            hbone: true,
            uid: String::new(),
            netns: None,
            owner: None,
            owner_kind: None,
        }
    }
}

/// Workloads in namespace/name order, found by a binary search on the
/// names they hold: no key of their own (two strings a workload, when
/// they were a map's keys).
#[derive(Debug, Default)]
struct Workloads(Vec<Arc<Workload>>);

impl Workloads {
    /// From workloads in namespace/name order, each named once.
    fn sorted(workloads: Vec<Arc<Workload>>) -> Workloads {
        debug_assert!(workloads.is_sorted_by(|a, b| a.key() < b.key()));
        Workloads(workloads)
    }

    fn get(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        let at = self
            .0
            .binary_search_by(|w| w.key().cmp(&(namespace, name)))
            .ok()?;
        Some(&self.0[at])
    }

    /// The workloads of one namespace, in name order.
    fn in_namespace(&self, namespace: &str) -> &[Arc<Workload>] {
        let from = self.0.partition_point(|w| &*w.namespace < namespace);
        let to = from + self.0[from..].partition_point(|w| &*w.namespace == namespace);
        &self.0[from..to]
    }

    fn iter(&self) -> std::slice::Iter<'_, Arc<Workload>> {
        self.0.iter()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// One snapshot of everything known.
#[derive(Debug, Default)]
pub struct Store {
    /// Counts the snapshots a source published; 0 is the empty one that
    /// stands until the source has read everything once.
    pub generation: u64,
    trust_domain: String,
    root_namespace: String,
    /// By (namespace, name): the order of endpoints and of the dump.
    workloads: Workloads,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: BTreeMap<(String, String), Arc<Service>>,
    by_vip: HashMap<IpAddr, Vec<Arc<Service>>>,
    /// EndpointSlices by Service (namespace, name).
    slices: HashMap<(String, String), Vec<k8s::Slice>>,
    /// [`StoreOptions::endpoint_slices_only`].
    slices_only: bool,
    /// ServiceEntries with resolution NONE: a connection goes where it was
    /// addressed.
    passthrough: std::collections::HashSet<(String, String)>,
    /// ServiceEntry endpoint addresses, to the entries listing them: what a
    /// connection made straight to one is (telemetry, registry-only egress).
    entry_addrs: HashMap<IpAddr, Vec<Arc<Service>>>,
    /// ServiceEntries with resolution DNS: the names to resolve.
    dns: HashMap<(String, String), Vec<service_entry::DnsName>>,
    /// [`StoreOptions::outbound_traffic_policy`].
    outbound_policy: OutboundTrafficPolicy,
    /// Namespaces that set their own.
    namespace_outbound_policies: HashMap<String, OutboundTrafficPolicy>,
    /// Sorted by namespace/name: the order DENY policies are checked in, so
    /// that the same connection is always denied by the same policy.
    policies: Vec<policy::AuthzPolicy>,
    /// Policies attached with `targetRefs`: the waypoints'.
    waypoint_policies: Vec<policy::AuthzPolicy>,
    /// `policies` indexed for the data path.
    policy_index: policy::PolicyIndex,
    peer_auths: Vec<peer_auth::PeerAuth>,
    bindings: waypoint::Bindings,
    /// HTTPRoutes of Services that have a waypoint.
    routes: route::Routes,
    /// LocalRateLimitPolicies, the waypoints'.
    rate_limits: Vec<RateLimit>,
    /// Ingress gateways, by (namespace, name).
    ingresses: BTreeMap<(String, String), Arc<IngressGateway>>,
    /// Read and counted; nothing on the node's data path uses them.
    service_accounts: usize,
    http_routes: usize,
    gateways: usize,
    warnings: Vec<ConfigWarning>,
    _live: Live,
}

/// Snapshots alive in the process: the one the data path follows, plus any
/// a task still holds. A connection that held its first snapshot for its
/// whole life would keep every configuration it outlived in memory; tasks
/// take what they need from a snapshot and let it go, and this count (the
/// `mesh_config_snapshots` gauge) shows that they do.
static LIVE_SNAPSHOTS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Counts one live [`Store`].
#[derive(Debug)]
struct Live;

impl Default for Live {
    fn default() -> Self {
        LIVE_SNAPSHOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Live
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        LIVE_SNAPSHOTS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How many configuration snapshots the process holds now.
pub fn live_snapshots() -> i64 {
    LIVE_SNAPSHOTS.load(std::sync::atomic::Ordering::Relaxed)
}

impl Store {
    /// Builds a snapshot from YAML texts `(origin, text)`, each with one or
    /// more `---` separated documents. Bad objects become warnings; the rest
    /// is used.
    #[cfg(test)]
    pub fn from_yaml(docs: &[(String, String)], opts: &StoreOptions) -> Store {
        let docs: Vec<Document> = docs
            .iter()
            .map(|(origin, text)| Document::parse_text(origin, text))
            .collect();
        Store::from_documents(&docs, opts)
    }

    /// Builds a snapshot from parsed documents, merged in order.
    pub fn from_documents<'a>(
        docs: impl IntoIterator<Item = &'a Document>,
        opts: &StoreOptions,
    ) -> Store {
        let mut warnings = Vec::new();
        let objects = yaml::Objects::merge(docs, &mut warnings);
        let pods = k8s::workloads(&objects, opts.redirection_annotation, &mut warnings);
        let services = k8s::services(&objects, &mut warnings);
        let slices = k8s::slices(&objects, &mut warnings);
        let peer_auths = peer_auth::compile(&objects.peer_authentications, &mut warnings);
        let mut store = Store {
            trust_domain: opts.trust_domain.clone(),
            root_namespace: opts.root_namespace.clone(),
            slices,
            slices_only: opts.endpoint_slices_only,
            outbound_policy: opts.outbound_traffic_policy,
            namespace_outbound_policies: k8s::outbound_policies(&objects, &mut warnings),
            peer_auths,
            service_accounts: objects.service_accounts.len(),
            http_routes: objects.http_routes.len(),
            gateways: objects.gateways.len(),
            ..Store::default()
        };
        store.index_workloads(pods, &mut warnings);
        store.index_services(services);
        let entries = service_entry::compile(&objects, &store.workloads, &mut warnings);
        store.index_entries(entries);
        store.bindings = waypoint::bind(
            &objects,
            store.workloads.iter(),
            store.services.values(),
            &mut warnings,
        );
        let bound = &store.bindings.services;
        (store.policies, store.waypoint_policies) = policy::compile(&objects, bound, &mut warnings);
        store.policy_index = policy::PolicyIndex::new(&store.policies);
        gateway::check_routes(&objects, bound, &mut warnings);
        store.ingresses = ingress::compile(&objects, !opts.skip_ingress_secrets, &mut warnings);
        store.rate_limits = ratelimit::compile(&objects, bound, &mut warnings);
        store.routes = route::compile(
            &objects,
            &store.services,
            |ns, name| match bound.get(&(ns.to_owned(), name.to_owned())) {
                Some(Binding::Bound(wp)) => Some(wp.key()),
                _ => None,
            },
            |ns, gw| {
                store
                    .bindings
                    .waypoints
                    .get(&(ns.to_owned(), gw.to_owned()))?;
                let mut served: Vec<(String, String)> = bound
                    .iter()
                    .filter(|(_, b)| {
                        matches!(b, Binding::Bound(w) if w.namespace == ns && w.name == gw)
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                served.sort();
                Some(served)
            },
            |ns, gw| {
                let ingress = store.ingresses.get(&(ns.to_owned(), gw.to_owned()))?;
                Some(ingress.listeners.iter().map(|l| l.name.clone()).collect())
            },
            &mut warnings,
        );
        route::compile_istio(
            &objects,
            !opts.skip_ingress_secrets,
            &store.services,
            |ns, name| match bound.get(&(ns.to_owned(), name.to_owned())) {
                Some(Binding::Bound(wp)) => Some(wp.key()),
                _ => None,
            },
            &mut store.routes,
            &mut warnings,
        );
        store.warnings = warnings;
        store
    }

    /// A snapshot with nothing in it.
    pub fn empty(opts: &StoreOptions) -> Store {
        Store {
            trust_domain: opts.trust_domain.clone(),
            root_namespace: opts.root_namespace.clone(),
            ..Store::default()
        }
    }

    fn index_workloads(&mut self, pods: Vec<k8s::PodWorkload>, warnings: &mut Vec<ConfigWarning>) {
        self.by_ip.reserve(pods.len());
        let mut named = Vec::with_capacity(pods.len());
        for pod in pods {
            let wl = pod.workload;
            // A host-network pod's address is its node's: finding the pod by
            // it would misattribute everything the node sends.
            if !pod.host_network {
                for ip in &wl.ips {
                    match self.by_ip.entry(*ip) {
                        Entry::Occupied(first) => warnings.push(ConfigWarning {
                            object: format!("Pod {}/{}", wl.namespace, wl.name),
                            kind: "conflict",
                            message: format!(
                                "IP {ip} is also the address of Pod {}/{}, which lookups \
                                 by this IP find",
                                first.get().namespace,
                                first.get().name
                            ),
                        }),
                        Entry::Vacant(free) => {
                            free.insert(wl.clone());
                        }
                    }
                }
            }
            named.push(wl);
        }
        // The pods come in namespace/name order (`Objects::pods`).
        self.workloads = Workloads::sorted(named);
    }

    fn index_services(&mut self, services: Vec<Service>) {
        for svc in services {
            let svc = Arc::new(svc);
            for vip in &svc.vips {
                self.by_vip.entry(*vip).or_default().push(svc.clone());
            }
            self.services
                .insert((svc.namespace.clone(), svc.name.clone()), svc);
        }
    }

    fn index_entries(&mut self, entries: Vec<service_entry::Entry>) {
        for entry in entries {
            let key = (entry.service.namespace.clone(), entry.service.name.clone());
            if !entry.dns.is_empty() {
                self.dns.insert(key.clone(), entry.dns);
            }
            let svc = Arc::new(entry.service);
            match entry.endpoints {
                Some(slices) => {
                    for ip in slices.iter().flat_map(|s| &s.addresses) {
                        let listed = self.entry_addrs.entry(*ip).or_default();
                        if !listed.iter().any(|s| Arc::ptr_eq(s, &svc)) {
                            listed.push(svc.clone());
                        }
                    }
                    self.slices.insert(key.clone(), slices);
                }
                None => {
                    self.passthrough.insert(key.clone());
                }
            }
            for vip in &svc.vips {
                self.by_vip.entry(*vip).or_default().push(svc.clone());
            }
            self.services.insert(key, svc);
        }
    }

    /// The ServiceEntry whose endpoint `addr` is (its address, one of its
    /// ports), for a connection made straight to it.
    pub fn entry_by_endpoint(&self, addr: SocketAddr) -> Option<&Arc<Service>> {
        let ip = addr.ip().to_canonical();
        self.entry_addrs.get(&ip)?.iter().find(|svc| {
            self.slices
                .get(&(svc.namespace.clone(), svc.name.clone()))
                .is_some_and(|slices| {
                    slices.iter().any(|s| {
                        s.addresses.contains(&ip) && s.ports.iter().any(|(_, p)| *p == addr.port())
                    })
                })
        })
    }

    /// The names a ServiceEntry with resolution DNS has its endpoints at on
    /// `port`, with the port to reach there: resolved when a connection
    /// needs them, so each connection sees what DNS says now.
    pub fn dns_targets(&self, svc: &Service, port: &ServicePort) -> Vec<(String, u16)> {
        self.dns
            .get(&(svc.namespace.clone(), svc.name.clone()))
            .into_iter()
            .flatten()
            .filter_map(|name| {
                let (_, n) = name.ports.iter().find(|(p, _)| *p == port.name)?;
                Some((name.host.clone(), *n))
            })
            .collect()
    }

    /// The outbound traffic policy for the pods of `namespace` (None: a
    /// pod the configuration does not list): its namespace's annotation, or
    /// the mesh-wide one.
    pub fn outbound_policy(&self, namespace: Option<&str>) -> OutboundTrafficPolicy {
        namespace
            .and_then(|ns| self.namespace_outbound_policies.get(ns))
            .copied()
            .unwrap_or(self.outbound_policy)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical())
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.iter()
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(namespace, name)
    }

    /// The Service named by its cluster hostname
    /// (`<name>.<namespace>.svc.cluster.local`, or without the cluster
    /// domain).
    pub fn service_by_hostname(&self, host: &str) -> Option<&Arc<Service>> {
        let host = host.trim_end_matches('.');
        let short = host
            .strip_suffix(".svc.cluster.local")
            .or_else(|| host.strip_suffix(".svc"))?;
        let (name, namespace) = short.split_once('.')?;
        self.services.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// The Service whose VIP and port this is.
    pub fn service_by_vip(&self, addr: SocketAddr) -> Option<(&Arc<Service>, &ServicePort)> {
        self.by_vip
            .get(&addr.ip().to_canonical())?
            .iter()
            .find_map(|svc| {
                let port = svc.ports.iter().find(|p| p.port == addr.port())?;
                Some((svc, port))
            })
    }

    /// Whether the store knows who serves `svc`: it has EndpointSlices, a
    /// selector, or slices are the only source (then none means none). A
    /// Service without any (the local configuration's `kubernetes`, a
    /// selector-less one nobody wrote slices for) is passed on to its VIP.
    pub fn has_endpoints_source(&self, svc: &Service) -> bool {
        let key = (svc.namespace.clone(), svc.name.clone());
        if self.passthrough.contains(&key) {
            return false;
        }
        self.slices_only
            || !svc.selector.is_empty()
            || self
                .slices
                .contains_key(&(svc.namespace.clone(), svc.name.clone()))
    }

    /// Whether `wl` is one of `svc`'s endpoints (any port).
    pub fn serves(&self, svc: &Service, wl: &Workload) -> bool {
        match self.service_slices(svc) {
            Some(slices) => slices
                .iter()
                .any(|s| s.addresses.iter().any(|ip| wl.ips.contains(ip))),
            None => {
                !svc.selector.is_empty()
                    && *svc.namespace == *wl.namespace
                    && wl.has_labels(&svc.selector)
            }
        }
    }

    /// The slices `svc`'s endpoints come from; None: its selector decides.
    fn service_slices(&self, svc: &Service) -> Option<&[k8s::Slice]> {
        let key = (svc.namespace.clone(), svc.name.clone());
        if self.passthrough.contains(&key) {
            return None;
        }
        match self.slices.get(&key) {
            Some(slices) => Some(slices),
            None if self.slices_only => Some(&[]),
            None => None,
        }
    }

    /// Endpoints of a service port: the ready addresses of its
    /// EndpointSlices with the slice port of the same name; without slices
    /// (a local configuration only, see [`StoreOptions::endpoint_slices_only`])
    /// the workloads its selector picks, the target port resolved (a named
    /// port the pod does not have skips that pod).
    pub fn endpoints(&self, svc: &Service, port: &ServicePort) -> Vec<Endpoint> {
        let want_v4 = svc.vips.first().map(IpAddr::is_ipv4);
        if let Some(slices) = self.service_slices(svc) {
            let mut out: Vec<Endpoint> = Vec::new();
            for slice in slices {
                let Some(&(_, target)) = slice.ports.iter().find(|(name, _)| *name == port.name)
                else {
                    continue;
                };
                for ip in &slice.addresses {
                    // A dual-stack Service has a slice per family; its
                    // first VIP's family is the one to reach.
                    if want_v4.is_some_and(|v4| ip.is_ipv4() != v4) {
                        continue;
                    }
                    let addr = SocketAddr::new(*ip, target);
                    if out.iter().any(|e| e.addr == addr) {
                        continue;
                    }
                    out.push(Endpoint {
                        workload: self.by_ip.get(ip).cloned(),
                        addr,
                    });
                }
            }
            return out;
        }
        // Kubernetes: a Service without a selector has its endpoints managed
        // by someone else, in EndpointSlices.
        if svc.selector.is_empty() {
            return Vec::new();
        }
        self.workloads
            .in_namespace(&svc.namespace)
            .iter()
            .filter(|wl| wl.has_labels(&svc.selector))
            .filter_map(|wl| {
                let ip = want_v4
                    .and_then(|v4| wl.ips.iter().find(|ip| ip.is_ipv4() == v4))
                    .or_else(|| wl.ips.first())?;
                let target = match &port.target_port {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => *wl.ports.get(name)?,
                };
                Some(Endpoint {
                    workload: Some(wl.clone()),
                    addr: SocketAddr::new(*ip, target),
                })
            })
            .collect()
    }

    /// L4 AuthorizationPolicy at the destination.
    pub fn authorize(&self, conn: &Conn<'_>) -> Decision {
        self.policy_index
            .authorize(&self.policies, &self.root_namespace, conn)
    }

    /// What the `istio.io/dry-run` policies in scope would decide, if any:
    /// for the log and `mesh_policy_dry_run_total`, never enforced.
    pub fn dry_run(&self, conn: &Conn<'_>) -> Option<Decision> {
        self.policy_index
            .dry_run(&self.policies, &self.root_namespace, conn)
    }

    /// The waypoint a Service must be reached through, if it names one.
    pub fn service_binding(&self, svc: &Service) -> Option<&Binding> {
        self.bindings
            .services
            .get(&(svc.namespace.clone(), svc.name.clone()))
    }

    /// The waypoint a pod must be reached through (by its own address), if
    /// it names one.
    pub fn workload_binding(&self, wl: &Workload) -> Option<&Binding> {
        self.bindings
            .workloads
            .get(&(wl.namespace.to_string(), wl.name.clone()))
    }

    /// Every HTTPRoute's status per parent (`Accepted`, `ResolvedRefs`).
    pub fn route_statuses(&self) -> &[RouteStatus] {
        self.routes.statuses()
    }

    /// The waypoint whose pod `namespace/name` is.
    pub fn waypoint_of_pod(&self, namespace: &str, name: &str) -> Option<&Arc<Waypoint>> {
        let pod = self.workload(namespace, name)?;
        let gateway = pod.labels.get(GATEWAY_NAME)?;
        self.waypoint(&pod.namespace, gateway)
    }

    pub fn waypoint(&self, namespace: &str, name: &str) -> Option<&Arc<Waypoint>> {
        self.bindings
            .waypoints
            .get(&(namespace.to_owned(), name.to_owned()))
    }

    /// What `dst` (a CONNECT authority) is to waypoint `ns/name`: a Service
    /// VIP and port or a pod address bound to it; None when it is not bound
    /// to that waypoint.
    pub fn waypoint_target(&self, ns: &str, name: &str, dst: SocketAddr) -> Option<WaypointTarget> {
        let ours = |b: Option<&Binding>| matches!(b, Some(Binding::Bound(w)) if w.namespace == ns && w.name == name);
        if let Some((svc, port)) = self.service_by_vip(dst)
            && ours(self.service_binding(svc))
        {
            return Some(WaypointTarget::Service(svc.clone(), port.clone()));
        }
        let wl = self.workload_by_ip(dst.ip())?;
        ours(self.workload_binding(wl)).then(|| WaypointTarget::Workload(wl.clone(), dst))
    }

    /// Whether an ingress gateway sends Service `svc` through its waypoint
    /// (`istio.io/ingress-use-waypoint`): None to its pods, Some(Ok) through
    /// that waypoint, Some(Err) refused (the waypoint it is bound to cannot
    /// serve it: never sent around it).
    pub fn ingress_waypoint(&self, svc: &Service) -> Option<Result<&Arc<Waypoint>, String>> {
        let key = (svc.namespace.clone(), svc.name.clone());
        if !self.bindings.ingress_use_waypoint.contains(&key) {
            return None;
        }
        match self.bindings.services.get(&key)? {
            Binding::Bound(wp) => Some(Ok(wp)),
            Binding::Refused { reason, .. } => Some(Err(reason.clone())),
        }
    }

    /// The ingress Gateway whose pod `namespace/name` is.
    pub fn ingress_of_pod(&self, namespace: &str, name: &str) -> Option<&Arc<IngressGateway>> {
        let pod = self.workload(namespace, name)?;
        let gateway = pod.labels.get(GATEWAY_NAME)?;
        self.ingresses
            .get(&(pod.namespace.to_string(), gateway.clone()))
    }

    /// The route entry of ingress Gateway `gw` that a request for `host`
    /// on `listener` matches.
    pub fn ingress_route(
        &self,
        gw: &IngressGateway,
        listener: &IngressListener,
        host: &str,
        req: &RequestView<'_>,
    ) -> Option<&RouteEntry> {
        self.routes.select_ingress(
            &(gw.namespace.clone(), gw.name.clone()),
            listener,
            host,
            req,
        )
    }

    /// The rate limits for a request for `service` through `waypoint`.
    pub fn rate_limits<'a>(
        &'a self,
        waypoint: &'a Waypoint,
        service: Option<&'a Service>,
    ) -> impl Iterator<Item = &'a RateLimit> {
        let svc = service.map(|s| (s.namespace.as_str(), s.name.as_str()));
        self.rate_limits
            .iter()
            .filter(move |r| r.applies(svc, (&waypoint.namespace, &waypoint.name)))
    }

    /// The DestinationRule applied to Service `svc`, if any.
    pub fn destination_policy(&self, svc: &Service) -> Option<&route::DestinationPolicy> {
        self.routes
            .destination(&(svc.namespace.clone(), svc.name.clone()))
    }

    /// The route entry of Service `svc` that a request on `port` matches.
    pub fn route(&self, svc: &Service, port: u16, req: &RequestView<'_>) -> Option<&RouteEntry> {
        self.routes
            .select(&(svc.namespace.clone(), svc.name.clone()), port, req)
    }

    /// A waypoint's authorization of a request (or, without one, of a TCP
    /// connection): its decision and the AUDIT policies that matched.
    pub fn authorize_at_waypoint(
        &self,
        waypoint: &Waypoint,
        service: Option<&Service>,
        attrs: &Attrs<'_>,
    ) -> (Decision, Vec<String>) {
        policy::authorize_waypoint(
            &self.waypoint_policies,
            service.map(|s| (s.namespace.as_str(), s.name.as_str())),
            (&waypoint.namespace, &waypoint.name),
            attrs,
        )
    }

    /// PeerAuthentication in effect for a workload and port (default PERMISSIVE).
    pub fn mtls_mode(&self, wl: &Workload, port: u16) -> MtlsMode {
        peer_auth::mtls_mode(&self.peer_auths, &self.root_namespace, wl, port)
    }

    pub fn warnings(&self) -> &[ConfigWarning] {
        &self.warnings
    }

    /// How many objects of each kind this snapshot holds.
    pub fn counts(&self) -> [(&'static str, usize); 8] {
        [
            ("workloads", self.workloads.len()),
            ("services", self.services.len()),
            (
                "authorization_policies",
                self.policies.len() + self.waypoint_policies.len(),
            ),
            ("waypoints", self.bindings.waypoints.len()),
            ("peer_authentications", self.peer_auths.len()),
            ("service_accounts", self.service_accounts),
            ("http_routes", self.http_routes),
            ("gateways", self.gateways),
        ]
    }

    /// Workloads, services, policies and warnings for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let workloads: Vec<&Workload> = self.workloads.iter().map(|w| &**w).collect();
        let services: Vec<&Service> = self.services.values().map(|s| &**s).collect();
        let policies: Vec<_> = self
            .policies
            .iter()
            .chain(&self.waypoint_policies)
            .map(policy::AuthzPolicy::dump)
            .collect();
        let waypoints: Vec<&Waypoint> = self.bindings.waypoints.values().map(|w| &**w).collect();
        let bindings = |m: &HashMap<(String, String), Binding>| {
            let sorted: BTreeMap<String, &Binding> = m
                .iter()
                .map(|((ns, name), b)| (format!("{ns}/{name}"), b))
                .collect();
            serde_json::json!(sorted)
        };
        let peer_auths: Vec<_> = self
            .peer_auths
            .iter()
            .map(peer_auth::PeerAuth::dump)
            .collect();
        serde_json::json!({
            "generation": self.generation,
            "trust_domain": self.trust_domain,
            "root_namespace": self.root_namespace,
            "workloads": workloads,
            "services": services,
            "authorization_policies": policies,
            "peer_authentications": peer_auths,
            "service_accounts": self.service_accounts,
            "http_routes": self.http_routes,
            "gateways": self.gateways,
            "waypoints": waypoints,
            "ingress_gateways": self.ingresses.values().map(|g| &**g).collect::<Vec<_>>(),
            "service_waypoints": bindings(&self.bindings.services),
            "workload_waypoints": bindings(&self.bindings.workloads),
            "routes": self.routes.dump(),
            "destination_rules": self.routes.destinations(),
            "rate_limits": self.rate_limits,
            "route_status": self.routes.statuses(),
            "warnings": self.warnings,
            "outbound_traffic_policy": self.outbound_policy,
            "namespace_outbound_traffic_policies": self
                .namespace_outbound_policies
                .iter()
                .collect::<BTreeMap<_, _>>(),
        })
    }
}
