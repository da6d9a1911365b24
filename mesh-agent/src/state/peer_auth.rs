//! Istio PeerAuthentication: whether a workload port requires mutual TLS.
//! Precedence as Istio's: a selector policy in the workload's namespace
//! (port-level first), then the namespace-wide policy, then the mesh-wide one
//! in the root namespace; UNSET at a level defers to the next. Among
//! policies of the same scope the oldest wins, as in Istio.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

use super::{
    ConfigWarning, MtlsMode, Workload,
    yaml::{Key, Parsed, Scalar, WorkloadSelector},
};

#[derive(Debug, Deserialize)]
pub(super) struct PeerAuthentication {
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: Option<PeerAuthenticationSpec>,
}

/// The one field of the metadata that decides: the name and namespace are
/// the object's key.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Metadata {
    creation_timestamp: Option<Time>,
}

impl PeerAuthentication {
    /// What stands in for a PeerAuthentication that does not parse: STRICT
    /// for the workloads it selects (its whole namespace when the selector
    /// cannot be read either), so a typo never lets plaintext in.
    pub fn strict(selector: Option<WorkloadSelector>) -> Self {
        PeerAuthentication {
            // No creation time: a stand-in ranks as the oldest, so a policy
            // that does not parse wins its conflicts, closed.
            metadata: Metadata::default(),
            spec: Some(PeerAuthenticationSpec {
                selector,
                mtls: Some(Mtls {
                    mode: Some(Mode::Strict),
                }),
                port_level_mtls: None,
            }),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PeerAuthenticationSpec {
    selector: Option<WorkloadSelector>,
    mtls: Option<Mtls>,
    port_level_mtls: Option<BTreeMap<Scalar, Mtls>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mtls {
    mode: Option<Mode>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub(super) enum Mode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl Mode {
    fn set(self) -> Option<MtlsMode> {
        match self {
            Mode::Unset => None,
            Mode::Strict => Some(MtlsMode::Strict),
            // DISABLE would have Istio's sidecars send plaintext; the node
            // agent never refuses plaintext except under STRICT, so for an
            // inbound check DISABLE and PERMISSIVE are the same.
            Mode::Disable | Mode::Permissive => Some(MtlsMode::Permissive),
        }
    }
}

#[derive(Debug)]
pub(super) struct PeerAuth {
    namespace: String,
    name: String,
    selector: Option<BTreeMap<String, String>>,
    mode: Mode,
    ports: BTreeMap<u16, Mode>,
    /// A `portLevelMtls` key that is not a port: nobody can tell which port
    /// was meant, so every port of the workloads it selects is STRICT.
    unreadable_port: bool,
}

impl PeerAuth {
    pub fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "namespace": self.namespace,
            "name": self.name,
            "selector": self.selector,
            "mode": self.mode,
            "port_level": self.ports,
            "unreadable_port_strict": self.unreadable_port,
        })
    }
}

pub(super) fn mtls_mode(
    policies: &[PeerAuth],
    root_namespace: &str,
    wl: &Workload,
    port: u16,
) -> MtlsMode {
    let workload_level = policies
        .iter()
        .filter(|p| *p.namespace == *wl.namespace)
        .find(|p| p.selector.as_ref().is_some_and(|s| wl.has_labels(s)))
        .and_then(|p| {
            if p.unreadable_port {
                return Some(MtlsMode::Strict);
            }
            let port_mode = p.ports.get(&port).and_then(|m| m.set());
            port_mode.or_else(|| p.mode.set())
        });
    let namespace_wide = |ns: &str| {
        let p = policies
            .iter()
            .find(|p| p.namespace == ns && p.selector.is_none())?;
        p.mode.set()
    };
    workload_level
        .or_else(|| namespace_wide(&wl.namespace))
        .or_else(|| namespace_wide(root_namespace))
        .unwrap_or(MtlsMode::Permissive)
}

/// Policies per namespace, oldest first (by `creationTimestamp`, the name
/// breaking ties; one without a time counts as oldest), so the first that
/// applies is the one Istio would pick. Of several namespace-wide policies
/// only the oldest is kept, and the others are warned about.
pub(super) fn compile(
    objects: &BTreeMap<Key, Parsed<PeerAuthentication>>,
    warnings: &mut Vec<ConfigWarning>,
) -> Vec<PeerAuth> {
    let mut by_age: Vec<_> = objects.iter().collect();
    by_age.sort_by_key(|((namespace, name), parsed)| {
        let created = parsed.object.metadata.creation_timestamp.as_ref();
        (namespace, created.map(|t| t.0), name)
    });
    let mut policies: Vec<PeerAuth> = Vec::new();
    for ((namespace, name), parsed) in by_age {
        let object = format!("PeerAuthentication {namespace}/{name}");
        let empty = PeerAuthenticationSpec::default();
        let spec = parsed.object.spec.as_ref().unwrap_or(&empty);
        let selector = WorkloadSelector::labels(spec.selector.as_ref());

        let mut ports = BTreeMap::new();
        let mut unreadable_port = false;
        let port_level = spec.port_level_mtls.iter().flatten();
        if selector.is_none() && spec.port_level_mtls.as_ref().is_some_and(|m| !m.is_empty()) {
            warnings.push(ConfigWarning {
                object: object.clone(),
                kind: "unsupported",
                message: "portLevelMtls applies only to a policy with a selector; ignored"
                    .to_owned(),
            });
        } else {
            for (port, mtls) in port_level {
                match port.0.parse::<u16>() {
                    Ok(n) if n != 0 => {
                        ports.insert(n, mtls.mode.unwrap_or_default());
                    }
                    _ => {
                        unreadable_port = true;
                        warnings.push(ConfigWarning {
                            object: object.clone(),
                            kind: "parse_error",
                            message: format!(
                                "portLevelMtls: {:?} is not a port number; every port of the \
                                 workloads it selects gets STRICT (plaintext refused)",
                                port.0
                            ),
                        });
                    }
                }
            }
        }

        if selector.is_none() {
            let first = policies
                .iter()
                .find(|p| p.namespace == *namespace && p.selector.is_none());
            if let Some(first) = first {
                warnings.push(ConfigWarning {
                    object,
                    kind: "conflict",
                    message: format!(
                        "namespace {namespace} already has the older namespace-wide \
                         PeerAuthentication {}; only the oldest is used, and this one is ignored",
                        first.name
                    ),
                });
                continue;
            }
        }

        policies.push(PeerAuth {
            namespace: namespace.clone(),
            name: name.clone(),
            selector,
            mode: spec.mtls.as_ref().and_then(|m| m.mode).unwrap_or_default(),
            ports,
            unreadable_port,
        });
    }
    policies
}
