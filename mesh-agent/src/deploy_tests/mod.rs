//! The manifests in `deploy/` read as the typed Kubernetes objects they
//! claim to be, and agree with the code's defaults.
//!
//! Each document is read into its k8s-openapi type, and a field the type
//! drops (a typo, a field in the wrong place) is an error. The mesh-agent
//! containers' `args` and `MESH_*` variables are parsed by the real clap
//! command (`command_line`), so the values checked in `agent`, `ca` and
//! `trust` are the ones the binary would run with. `rbac`, `crds`,
//! `cluster_rules` and `kustomize` check what the API server and kubectl
//! would make of the manifests.
//!
//! This module loads and types the manifests; `workload` reads the pods
//! they run. `waypoint` checks `deploy/waypoint/`, a waypoint for a user's
//! namespace, applied on its own; `gateway` checks `deploy/gateway/`, an
//! ingress gateway, likewise.

mod agent;
mod ca;
mod cluster_rules;
mod command_line;
mod crds;
mod gateway;
mod kustomize;
mod rbac;
mod trust;
mod waypoint;
mod workload;

use std::any::TypeId;

use k8s_openapi::{
    Metadata, NamespaceResourceScope, Resource as ApiResource,
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;

use workload::Workload;

/// Every manifest but the kustomization, as this test build sees it.
const MANIFESTS: &[(&str, &str)] = &[
    (
        "namespace.yaml",
        include_str!("../../../deploy/namespace.yaml"),
    ),
    ("crds.yaml", include_str!("../../../deploy/crds.yaml")),
    ("rbac.yaml", include_str!("../../../deploy/rbac.yaml")),
    ("ca.yaml", include_str!("../../../deploy/ca.yaml")),
    (
        "daemonset.yaml",
        include_str!("../../../deploy/daemonset.yaml"),
    ),
];

/// Paths every mesh-agent HTTP surface serves (admin.rs).
const READY_PATH: &str = "/healthz/ready";
const METRICS_PATH: &str = "/metrics";

/// Declares the kinds the manifests may hold: an unknown kind is an error.
macro_rules! objects {
    ($($variant:ident),* $(,)?) => {
        #[derive(Debug)]
        enum Object {
            $($variant(Box<$variant>),)*
        }

        impl Object {
            fn read(doc: &Value) -> Result<Object, String> {
                let field = |f: &str| doc.get(f).and_then(Value::as_str).unwrap_or_default();
                let (api_version, kind) = (field("apiVersion"), field("kind"));
                $(if (api_version, kind) == (<$variant>::API_VERSION, <$variant>::KIND) {
                    return strict(doc).map(|o| Object::$variant(Box::new(o)));
                })*
                Err(format!("{api_version} {kind} is not a kind this test knows (add it to `objects!`)"))
            }

            fn meta(&self) -> &ObjectMeta {
                match self {
                    $(Object::$variant(o) => o.metadata(),)*
                }
            }

            fn kind(&self) -> &'static str {
                match self {
                    $(Object::$variant(_) => <$variant>::KIND,)*
                }
            }

            fn namespaced(&self) -> bool {
                match self {
                    $(Object::$variant(_) => {
                        TypeId::of::<<$variant as ApiResource>::Scope>()
                            == TypeId::of::<NamespaceResourceScope>()
                    })*
                }
            }
        }

        trait Kind: Metadata<Ty = ObjectMeta> + 'static {
            fn pick(o: &Object) -> Option<&Self>;
        }

        $(impl Kind for $variant {
            fn pick(o: &Object) -> Option<&Self> {
                match o {
                    Object::$variant(x) => Some(x),
                    #[allow(unreachable_patterns, reason = "one arm per kind, however many")]
                    _ => None,
                }
            }
        })*
    };
}

objects!(
    Namespace,
    ServiceAccount,
    Service,
    DaemonSet,
    Deployment,
    ClusterRole,
    ClusterRoleBinding,
    Role,
    RoleBinding,
    CustomResourceDefinition,
);

/// Reads `doc` as a `T`, and fails on any field `T` does not keep.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match dropped_field(doc, &back, "") {
        Some(path) => Err(format!(
            "field `{path}` is not part of {} (misspelt, or in the wrong place?)",
            std::any::type_name::<T>()
        )),
        None => Ok(typed),
    }
}

/// The first field of `written` missing from `kept`, as a dotted path.
fn dropped_field(written: &Value, kept: &Value, at: &str) -> Option<String> {
    match (written, kept) {
        (Value::Object(w), Value::Object(k)) => w.iter().find_map(|(name, v)| {
            let path = if at.is_empty() {
                name.clone()
            } else {
                format!("{at}.{name}")
            };
            match k.get(name) {
                None => Some(path),
                Some(kv) => dropped_field(v, kv, &path),
            }
        }),
        (Value::Array(w), Value::Array(k)) => (w.iter().zip(k).enumerate())
            .find_map(|(i, (wv, kv))| dropped_field(wv, kv, &format!("{at}[{i}]"))),
        _ => None,
    }
}

struct Doc {
    file: &'static str,
    object: Object,
}

struct Manifests {
    docs: Vec<Doc>,
}

impl Manifests {
    /// Every document of every manifest; panics listing every one that
    /// does not read.
    fn load() -> Manifests {
        let mut docs = Vec::new();
        let mut errors = Vec::new();
        for (file, text) in MANIFESTS {
            for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
                let at = format!("deploy/{file} document {}", i + 1);
                let doc = match Value::deserialize(de) {
                    Ok(Value::Null) => continue,
                    Ok(doc) => doc,
                    Err(e) => {
                        // serde_yaml yields a syntax error again for every
                        // document after it, without end.
                        errors.push(format!("{at}: {e}"));
                        break;
                    }
                };
                match Object::read(&doc) {
                    Ok(object) => docs.push(Doc { file, object }),
                    Err(e) => errors.push(format!("{at}: {e}")),
                }
            }
        }
        assert!(
            errors.is_empty(),
            "unreadable manifests:\n  {}",
            errors.join("\n  ")
        );
        Manifests { docs }
    }

    fn all<T: Kind>(&self) -> impl Iterator<Item = &T> {
        self.docs.iter().filter_map(|d| T::pick(&d.object))
    }

    fn find<T: Kind>(&self, namespace: Option<&str>, name: &str) -> Option<&T> {
        self.all::<T>().find(|o| {
            let m = o.metadata();
            m.name.as_deref() == Some(name) && m.namespace.as_deref() == namespace
        })
    }

    /// The pods the manifests run: DaemonSets and Deployments.
    fn workloads(&self) -> Vec<Workload<'_>> {
        let ds = self.all::<DaemonSet>().filter_map(|o| {
            let spec = o.spec.as_ref()?;
            Workload::new(DaemonSet::KIND, &o.metadata, &spec.selector, &spec.template)
        });
        let deploy = self.all::<Deployment>().filter_map(|o| {
            let spec = o.spec.as_ref()?;
            Workload::new(
                Deployment::KIND,
                &o.metadata,
                &spec.selector,
                &spec.template,
            )
        });
        ds.chain(deploy).collect()
    }
}

/// An object's name, or "" for messages about one without.
fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

/// `namespace/name`, split.
fn qualified(s: &str) -> (&str, &str) {
    s.split_once('/')
        .unwrap_or_else(|| panic!("{s:?} is not namespace/name"))
}

/// Collects what disagrees, to report it all at once.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }

    fn fail(&mut self, msg: String) {
        self.0.push(msg);
    }

    fn assert_none(self, what: &str) {
        assert!(self.0.is_empty(), "{what}:\n  - {}", self.0.join("\n  - "));
    }
}
