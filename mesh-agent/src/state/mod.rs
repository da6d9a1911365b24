//! The state store: what the agent knows about workloads, services and
//! policies, as one immutable snapshot that is swapped whole on every change.
//! Built from Kubernetes objects; where they come from is a `Source`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;

use crate::identity::Identity;

/// A pod, as far as the data path cares.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// Named container ports (for Service targetPort by name).
    pub ports: BTreeMap<String, u16>,
    /// In the mesh: its namespace or the pod itself is labelled
    /// `istio.io/dataplane-mode=ambient` and the pod did not opt out (`none`).
    pub captured: bool,
}

impl Workload {
    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &self.namespace, &self.service_account)
    }

    /// Istio's workload name: the `app.kubernetes.io/name` or `app` label's
    /// owner is not known here, so the pod name without a ReplicaSet hash is
    /// not attempted: the pod name.
    pub fn workload_name(&self) -> &str {
        unimplemented!()
    }

    /// `app.kubernetes.io/name`, else `app`, else the workload name.
    pub fn app(&self) -> &str {
        unimplemented!()
    }

    /// `app.kubernetes.io/version`, else `version`, else `latest`.
    pub fn version(&self) -> &str {
        unimplemented!()
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
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// clusterIP(s).
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
}

impl Service {
    /// `<name>.<namespace>.svc.cluster.local`
    pub fn hostname(&self) -> String {
        unimplemented!()
    }
}

/// An endpoint of a Service: a workload and the port on it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConfigWarning {
    /// `AuthorizationPolicy ns/name`, or the file for a parse error.
    pub object: String,
    /// A short class for metrics: `parse_error`, `unknown_field`,
    /// `l7_rule_at_l4`, `unsupported`.
    pub kind: &'static str,
    pub message: String,
}

#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub trust_domain: String,
    /// Policies here apply mesh-wide (Istio's `istio-system`).
    pub root_namespace: String,
}

/// One snapshot of everything known.
#[derive(Debug, Default)]
pub struct Store {}

impl Store {
    /// Builds a snapshot from YAML documents (one or more per text, `---`
    /// separated). Bad objects become warnings; the rest is used.
    pub fn from_yaml(docs: &[(String, String)], opts: &StoreOptions) -> Store {
        let _ = (docs, opts);
        unimplemented!()
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        let _ = ip;
        unimplemented!()
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        let _ = (namespace, name);
        unimplemented!()
    }

    /// The Service whose VIP and port this is.
    pub fn service_by_vip(&self, addr: SocketAddr) -> Option<(&Arc<Service>, &ServicePort)> {
        let _ = addr;
        unimplemented!()
    }

    /// Endpoints of a service port: selected workloads with the target port
    /// resolved (a named port the pod does not have skips that pod).
    pub fn endpoints(&self, svc: &Service, port: &ServicePort) -> Vec<Endpoint> {
        let _ = (svc, port);
        unimplemented!()
    }

    /// L4 AuthorizationPolicy at the destination.
    pub fn authorize(&self, conn: &Conn<'_>) -> Decision {
        let _ = conn;
        unimplemented!()
    }

    /// PeerAuthentication in effect for a workload and port (default PERMISSIVE).
    pub fn mtls_mode(&self, wl: &Workload, port: u16) -> MtlsMode {
        let _ = (wl, port);
        unimplemented!()
    }

    pub fn warnings(&self) -> &[ConfigWarning] {
        unimplemented!()
    }

    /// Workloads, services, policies and warnings for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        unimplemented!()
    }
}

/// Where the store's objects come from. Implemented by a local file or
/// directory of YAML now; by the Kubernetes API later.
pub trait Source: Send + 'static {
    /// Reads the whole configuration. Called at start and on every change.
    fn load(&mut self) -> Result<Vec<(String, String)>, std::io::Error>;
    /// Whether the source may have changed since the last `load`.
    fn changed(&mut self) -> bool;
}

/// A YAML file, or every `*.yaml`/`*.yml` file of a directory.
#[derive(Debug)]
pub struct LocalFiles {
    pub path: PathBuf,
}

impl Source for LocalFiles {
    fn load(&mut self) -> Result<Vec<(String, String)>, std::io::Error> {
        unimplemented!()
    }

    fn changed(&mut self) -> bool {
        unimplemented!()
    }
}

/// Loads the source now, then polls it every `interval` and publishes a new
/// snapshot when it changed. Warnings are logged once per new snapshot.
pub fn spawn_watch(
    source: Box<dyn Source>,
    opts: StoreOptions,
    interval: Duration,
) -> (watch::Receiver<Arc<Store>>, tokio::task::JoinHandle<()>) {
    let _ = (source, opts, interval);
    unimplemented!()
}
