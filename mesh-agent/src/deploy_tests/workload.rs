//! The pods the manifests run, read the way the kubelet will: which
//! volume holds a path, which port a probe hits, what a container may do.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, PodSpec, PodTemplateSpec, Probe, ServiceAccountTokenProjection,
        Volume, VolumeMount,
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use super::{METRICS_PATH, Problems, READY_PATH, name};

/// A DaemonSet's or Deployment's pod template, with what locates it.
#[derive(Clone)]
pub(super) struct Workload<'a> {
    /// `DaemonSet mesh-agent`, for messages.
    pub(super) name: String,
    pub(super) namespace: String,
    /// The workload's matchLabels.
    pub(super) selector: BTreeMap<String, String>,
    /// The pod template's labels.
    pub(super) labels: BTreeMap<String, String>,
    pub(super) annotations: BTreeMap<String, String>,
    pub(super) pod: &'a PodSpec,
}

/// A mount, its volume, and the rest of a path below the mount point.
type Mount<'c> = (&'c VolumeMount, &'c Volume, PathBuf);

impl<'a> Workload<'a> {
    pub(super) fn new(
        kind: &str,
        meta: &ObjectMeta,
        selector: &LabelSelector,
        template: &'a PodTemplateSpec,
    ) -> Option<Self> {
        let template_meta = template.metadata.clone().unwrap_or_default();
        Some(Workload {
            name: format!("{kind} {}", name(meta)),
            namespace: meta.namespace.clone().unwrap_or_default(),
            selector: selector.match_labels.clone().unwrap_or_default(),
            labels: template_meta.labels.unwrap_or_default(),
            annotations: template_meta.annotations.unwrap_or_default(),
            pod: template.spec.as_ref()?,
        })
    }

    pub(super) fn service_account(&self) -> &str {
        self.pod
            .service_account_name
            .as_deref()
            .unwrap_or("default")
    }

    /// Init containers, then the others.
    pub(super) fn containers(&self) -> impl Iterator<Item = &'a Container> {
        let pod = self.pod;
        pod.init_containers.iter().flatten().chain(&pod.containers)
    }

    pub(super) fn volume(&self, name: &str) -> Option<&Volume> {
        self.pod.volumes.iter().flatten().find(|v| v.name == name)
    }

    /// The deepest mount of `c` that holds `path`, its volume, and the rest
    /// of the path below the mount point.
    pub(super) fn mount_of<'c>(&'c self, c: &'c Container, path: &Path) -> Option<Mount<'c>> {
        let m = (c.volume_mounts.iter().flatten())
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| Path::new(&m.mount_path).components().count())?;
        let rest = path.strip_prefix(&m.mount_path).ok()?.to_owned();
        Some((m, self.volume(&m.name)?, rest))
    }

    /// [`Self::mount_of`], reporting to `p` when nothing is mounted at
    /// `path`, which `what` (a flag, a variable) names.
    pub(super) fn mount_for<'c>(
        &'c self,
        p: &mut Problems,
        c: &'c Container,
        what: &str,
        path: &Path,
    ) -> Option<Mount<'c>> {
        let found = self.mount_of(c, path);
        if found.is_none() {
            p.fail(format!("nothing is mounted at {what} {}", path.display()));
        }
        found
    }

    /// The projected ServiceAccount token `c` sees at `path`.
    pub(super) fn token_at<'c>(
        &'c self,
        c: &'c Container,
        path: &Path,
    ) -> Option<&'c ServiceAccountTokenProjection> {
        let (_, vol, rest) = self.mount_of(c, path)?;
        let sources = vol.projected.as_ref()?.sources.as_ref()?;
        (sources.iter())
            .filter_map(|s| s.service_account_token.as_ref())
            .find(|t| Path::new(&t.path) == rest)
    }

    /// The node directory a hostPath mount of `c` shows at `path`, if any.
    pub(super) fn host_path_of(&self, c: &Container, path: &Path) -> Option<PathBuf> {
        let (_, v, rest) = self.mount_of(c, path)?;
        Some(Path::new(&v.host_path.as_ref()?.path).join(rest))
    }

    /// The prometheus.io annotations point at `port`, where `flag` serves
    /// `/metrics`.
    pub(super) fn check_scraped(&self, p: &mut Problems, flag: &str, port: i32) {
        let annotation = |k: &str| self.annotations.get(k).map(String::as_str);
        let found = [
            annotation("prometheus.io/scrape"),
            annotation("prometheus.io/port"),
            annotation("prometheus.io/path"),
        ];
        let port_text = port.to_string();
        let want = [Some("true"), Some(port_text.as_str()), Some(METRICS_PATH)];
        p.check(found == want, || {
            format!("prometheus.io/scrape, port, path are {found:?}; {flag} serves {METRICS_PATH} on port {port}")
        });
    }
}

/// The readiness probe of `c` asks for `READY_PATH` where `who` serves
/// it, on `--ready-addr`.
pub(super) fn check_readiness(p: &mut Problems, c: &Container, who: &str, ready_addr: SocketAddr) {
    let readiness = http_probe(c, c.readiness_probe.as_ref());
    let want = (READY_PATH.to_owned(), i32::from(ready_addr.port()));
    p.check(readiness.as_ref() == Some(&want), || {
        format!(
            "readiness probe is {readiness:?}, {who} serves {READY_PATH} on --ready-addr {ready_addr}"
        )
    });
}

/// Each listening flag has a container port and an address that others
/// can reach (`unreachable` says who could not).
pub(super) fn check_exposed(
    p: &mut Problems,
    c: &Container,
    listeners: &[(&str, SocketAddr)],
    unreachable: &str,
) {
    let ports = container_ports(c);
    for (flag, addr) in listeners {
        let port = i32::from(addr.port());
        p.check(ports.contains(&port), || {
            format!("container ports {ports:?} lack {flag} port {port}")
        });
        p.check(!addr.ip().is_loopback(), || {
            format!("{flag} {addr} is loopback: {unreachable}")
        });
    }
}

pub(super) fn port_number(c: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => (c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

pub(super) fn http_probe(c: &Container, probe: Option<&Probe>) -> Option<(String, i32)> {
    let get = probe?.http_get.as_ref()?;
    Some((
        get.path.clone().unwrap_or_default(),
        port_number(c, &get.port)?,
    ))
}

fn container_ports(c: &Container) -> BTreeSet<i32> {
    c.ports.iter().flatten().map(|p| p.container_port).collect()
}

pub(super) fn capabilities(
    c: &Container,
    which: fn(&Capabilities) -> &Option<Vec<String>>,
) -> BTreeSet<String> {
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref());
    caps.and_then(|caps| which(caps).clone())
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// Whether a (non-empty) matchLabels selector selects `labels`.
pub(super) fn selects(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
