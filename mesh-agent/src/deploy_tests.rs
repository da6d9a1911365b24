//! The manifests in `deploy/` read as the typed Kubernetes objects they
//! claim to be, and agree with the code's defaults.
//!
//! Each document is read into its k8s-openapi type, and a field the type
//! drops (a typo, a field in the wrong place) is an error. The mesh-agent
//! containers' `args` and `MESH_*` variables are parsed by the real clap
//! command, so the values checked below are the ones the binary would run
//! with.

use std::{
    any::TypeId,
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    path::{Path, PathBuf},
};

use clap::{CommandFactory as _, FromArgMatches as _};
use k8s_openapi::{
    Metadata, NamespaceResourceScope, Resource as ApiResource,
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            Container, Namespace, PodSpec, PodTemplateSpec, Probe, Service, ServiceAccount,
            ServiceAccountTokenProjection, Volume, VolumeMount,
        },
        rbac::v1::{
            ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
        },
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{
    cluster::{EVENTS, Resource, WATCHED},
    config::{CaArgs, Cli, Command, NodeArgs},
    identity::ca_server::ROOT_KEY,
};

/// Every manifest but the kustomization, as this test build sees it.
const MANIFESTS: &[(&str, &str)] = &[
    (
        "namespace.yaml",
        include_str!("../../deploy/namespace.yaml"),
    ),
    ("crds.yaml", include_str!("../../deploy/crds.yaml")),
    ("rbac.yaml", include_str!("../../deploy/rbac.yaml")),
    ("ca.yaml", include_str!("../../deploy/ca.yaml")),
    (
        "daemonset.yaml",
        include_str!("../../deploy/daemonset.yaml"),
    ),
];
const KUSTOMIZATION: &str = include_str!("../../deploy/kustomization.yaml");

/// Paths every mesh-agent HTTP surface serves (admin.rs).
const READY_PATH: &str = "/healthz/ready";
const METRICS_PATH: &str = "/metrics";
/// Where `capture::fs::default_cgroup_root` looks for the cgroup v2 root
/// when `--cgroup` is not given.
const CGROUP_ROOTS: &[&str] = &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
/// API groups whose CRDs come from their upstream project, not crds.yaml.
const UPSTREAM_CRD_GROUPS: &[&str] = &["gateway.networking.k8s.io"];
/// `MESH_*` variables the binary reads outside clap (the log filter, main.rs).
const NON_FLAG_ENV: &[&str] = &["MESH_LOG"];
/// The agent's capabilities; the reasons are beside them in daemonset.yaml
/// and in the README's table, which change together with this list.
const AGENT_CAPABILITIES: &[&str] = &["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

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
                let doc = match Value::deserialize(de) {
                    Ok(Value::Null) => continue,
                    Ok(doc) => doc,
                    Err(e) => {
                        errors.push(format!("deploy/{file} document {}: {e}", i + 1));
                        continue;
                    }
                };
                match Object::read(&doc) {
                    Ok(object) => docs.push(Doc { file, object }),
                    Err(e) => errors.push(format!("deploy/{file} document {}: {e}", i + 1)),
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
            Some((
                DaemonSet::KIND,
                o.metadata(),
                &spec.selector,
                &spec.template,
            ))
        });
        let deploy = self.all::<Deployment>().filter_map(|o| {
            let spec = o.spec.as_ref()?;
            Some((
                Deployment::KIND,
                o.metadata(),
                &spec.selector,
                &spec.template,
            ))
        });
        ds.chain(deploy)
            .filter_map(|(k, m, s, t)| Workload::new(k, m, s, t))
            .collect()
    }

    /// Every container that runs mesh-agent, with the command line its
    /// args and environment make.
    fn mesh_containers(&self) -> Vec<MeshContainer<'_>> {
        let mut out = Vec::new();
        for w in self.workloads() {
            let pod = w.pod;
            for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
                if let Some(argv) = mesh_argv(c) {
                    let cli = env_flags(c, &w.namespace).and_then(|env| parse_cli(argv, env));
                    out.push(MeshContainer {
                        workload: w.clone(),
                        container: c,
                        cli,
                    });
                }
            }
        }
        out
    }

    /// The one container running `mesh-agent SUBCOMMAND`, and how clap
    /// reads its command line.
    fn running(&self, subcommand: &str) -> (Workload<'_>, &Container, Cli) {
        let mut found = (self.mesh_containers().into_iter()).filter(|m| {
            mesh_argv(m.container)
                .unwrap_or_default()
                .first()
                .map(String::as_str)
                == Some(subcommand)
        });
        let m = found
            .next()
            .unwrap_or_else(|| panic!("no container in deploy/ runs `mesh-agent {subcommand}`"));
        assert!(
            found.next().is_none(),
            "more than one container runs `mesh-agent {subcommand}`"
        );
        let cli = m.cli.unwrap_or_else(|e| {
            panic!(
                "{} container {} runs `mesh-agent {subcommand}`, but: {e}",
                m.workload.name, m.container.name
            )
        });
        (m.workload, m.container, cli)
    }

    fn agent(&self) -> (Workload<'_>, &Container, NodeArgs) {
        let (w, c, cli) = self.running("node");
        let Command::Node(args) = cli.command else {
            unreachable!("`node` is Command::Node")
        };
        (w, c, *args)
    }

    fn ca(&self) -> (Workload<'_>, &Container, CaArgs) {
        let (w, c, cli) = self.running("ca");
        let Command::Ca(args) = cli.command else {
            unreachable!("`ca` is Command::Ca")
        };
        (w, c, *args)
    }

    /// Every RoleBinding and ClusterRoleBinding.
    fn bindings(&self) -> Vec<Binding<'_>> {
        let cluster = self.all::<ClusterRoleBinding>().map(|b| Binding {
            what: format!(
                "ClusterRoleBinding {}",
                b.metadata.name.as_deref().unwrap_or_default()
            ),
            namespace: None,
            role_ref: &b.role_ref,
            subjects: b.subjects.as_deref().unwrap_or_default(),
        });
        let namespaced = self.all::<RoleBinding>().map(|b| Binding {
            what: format!(
                "RoleBinding {}",
                b.metadata.name.as_deref().unwrap_or_default()
            ),
            namespace: b.metadata.namespace.as_deref(),
            role_ref: &b.role_ref,
            subjects: b.subjects.as_deref().unwrap_or_default(),
        });
        cluster.chain(namespaced).collect()
    }

    /// The rules a binding's roleRef names, if that role exists.
    fn rules_of(&self, b: &Binding<'_>) -> Option<&[PolicyRule]> {
        let name = &b.role_ref.name;
        let rules = match b.role_ref.kind.as_str() {
            "ClusterRole" => &self.find::<ClusterRole>(None, name)?.rules,
            "Role" => &self.find::<Role>(b.namespace, name)?.rules,
            _ => return None,
        };
        Some(rules.as_deref().unwrap_or_default())
    }
}

/// A RoleBinding (in `namespace`) or a ClusterRoleBinding (no namespace).
struct Binding<'a> {
    what: String,
    namespace: Option<&'a str>,
    role_ref: &'a RoleRef,
    subjects: &'a [Subject],
}

#[derive(Clone)]
struct Workload<'a> {
    /// `DaemonSet mesh-agent`, for messages.
    name: String,
    namespace: String,
    /// The workload's matchLabels.
    selector: BTreeMap<String, String>,
    /// The pod template's labels.
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    pod: &'a PodSpec,
}

impl<'a> Workload<'a> {
    fn new(
        kind: &str,
        meta: &ObjectMeta,
        selector: &LabelSelector,
        template: &'a PodTemplateSpec,
    ) -> Option<Self> {
        let labels = template.metadata.as_ref().and_then(|m| m.labels.clone());
        let annotations = template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone());
        Some(Workload {
            name: format!("{kind} {}", meta.name.as_deref().unwrap_or_default()),
            namespace: meta.namespace.clone().unwrap_or_default(),
            selector: selector.match_labels.clone().unwrap_or_default(),
            labels: labels.unwrap_or_default(),
            annotations: annotations.unwrap_or_default(),
            pod: template.spec.as_ref()?,
        })
    }

    fn service_account(&self) -> &str {
        self.pod
            .service_account_name
            .as_deref()
            .unwrap_or("default")
    }

    fn volume(&self, name: &str) -> Option<&Volume> {
        self.pod.volumes.iter().flatten().find(|v| v.name == name)
    }

    /// The deepest mount of `c` that holds `path`, its volume, and the rest
    /// of the path below the mount point.
    fn mount_of<'c>(
        &'c self,
        c: &'c Container,
        path: &Path,
    ) -> Option<(&'c VolumeMount, &'c Volume, PathBuf)> {
        let m = (c.volume_mounts.iter().flatten())
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| Path::new(&m.mount_path).components().count())?;
        let rest = path.strip_prefix(&m.mount_path).ok()?.to_owned();
        Some((m, self.volume(&m.name)?, rest))
    }

    /// The projected ServiceAccount token `c` sees at `path`.
    fn token_at<'c>(
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
    fn host_path_of(&self, c: &Container, path: &Path) -> Option<PathBuf> {
        let (_, v, rest) = self.mount_of(c, path)?;
        Some(Path::new(&v.host_path.as_ref()?.path).join(rest))
    }
}

struct MeshContainer<'a> {
    workload: Workload<'a>,
    container: &'a Container,
    cli: Result<Cli, String>,
}

/// The arguments after the program name, if `c` runs mesh-agent: an image
/// named mesh-agent with its entrypoint, or a command naming the binary.
fn mesh_argv(c: &Container) -> Option<Vec<String>> {
    let is_mesh_agent = |s: &str| s.rsplit('/').next() == Some("mesh-agent");
    let mut argv = match c.command.as_deref() {
        None => {
            let image = c.image.as_deref()?;
            let repo = image.split(['@', ':']).next().unwrap_or(image);
            if !is_mesh_agent(repo) {
                return None;
            }
            Vec::new()
        }
        Some([bin, rest @ ..]) if is_mesh_agent(bin) => rest.to_vec(),
        Some(_) => return None,
    };
    argv.extend(c.args.iter().flatten().cloned());
    Some(argv)
}

/// The `MESH_*` variables of `c` as the flags they stand for, each checked
/// to be one the container's subcommand reads.
fn env_flags(c: &Container, namespace: &str) -> Result<Vec<(String, String)>, String> {
    let cli = Cli::command();
    let argv = mesh_argv(c).unwrap_or_default();
    let sub_name = argv.first().ok_or("no subcommand in args")?;
    let sub = cli
        .find_subcommand(sub_name)
        .ok_or_else(|| format!("`{sub_name}` is not a mesh-agent subcommand"))?;
    let global = cli.get_arguments().filter(|a| a.is_global_set());
    let args: Vec<_> = sub.get_arguments().chain(global).collect();
    let mut seen = BTreeSet::new();
    let mut flags = Vec::new();
    for e in c.env.iter().flatten() {
        if !seen.insert(&e.name) {
            return Err(format!("{} is set twice", e.name));
        }
        if !e.name.starts_with("MESH_") || NON_FLAG_ENV.contains(&e.name.as_str()) {
            continue;
        }
        let arg = (args.iter())
            .find(|a| a.get_env() == Some(OsStr::new(&e.name)))
            .ok_or_else(|| {
                format!(
                    "sets {}, which no flag of `mesh-agent {sub_name}` reads",
                    e.name
                )
            })?;
        let long = arg
            .get_long()
            .ok_or_else(|| format!("{} belongs to a flag without a long name", e.name))?;
        let value = match (
            &e.value,
            e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()),
        ) {
            (Some(v), None) => v.clone(),
            (None, Some(field)) => match field.field_path.as_str() {
                "spec.nodeName" => "node-a".to_owned(),
                "metadata.name" => "pod-a".to_owned(),
                "metadata.namespace" => namespace.to_owned(),
                "status.podIP" | "status.hostIP" => "10.0.0.1".to_owned(),
                other => return Err(format!("{}: no sample value for fieldRef {other}", e.name)),
            },
            _ => {
                return Err(format!(
                    "{}: only a value or a fieldRef is understood here",
                    e.name
                ));
            }
        };
        if arg.get_action().takes_values() {
            flags.push((e.name.clone(), format!("--{long}={value}")));
        } else {
            match value.as_str() {
                "true" => flags.push((e.name.clone(), format!("--{long}"))),
                "false" => {}
                other => {
                    return Err(format!(
                        "{} is a switch: write \"true\" or \"false\", not {other:?}",
                        e.name
                    ));
                }
            }
        }
    }
    Ok(flags)
}

/// Parses like the binary, but without reading this process's environment.
fn parse_cli(argv: Vec<String>, env_flags: Vec<(String, String)>) -> Result<Cli, String> {
    let no_env = |a: clap::Arg| a.env(None);
    let cmd = Cli::command()
        .mut_args(no_env)
        .mut_subcommands(|s| s.mut_args(no_env));
    let flags = env_flags.iter().map(|(_, flag)| flag.clone());
    let line = std::iter::once("mesh-agent".to_owned())
        .chain(argv)
        .chain(flags);
    let matches = cmd.try_get_matches_from(line).map_err(|e| {
        let first = e.to_string().lines().next().unwrap_or_default().to_owned();
        let env: Vec<String> = env_flags
            .iter()
            .map(|(var, flag)| format!("{var} as {flag}"))
            .collect();
        format!("{first} (environment read as: {})", env.join(", "))
    })?;
    Cli::from_arg_matches(&matches).map_err(|e| e.to_string())
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

    fn assert_none(self, what: &str) {
        assert!(self.0.is_empty(), "{what}:\n  - {}", self.0.join("\n  - "));
    }
}

fn port_number(c: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => (c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

fn http_probe(c: &Container, probe: Option<&Probe>) -> Option<(String, i32)> {
    let get = probe?.http_get.as_ref()?;
    Some((
        get.path.clone().unwrap_or_default(),
        port_number(c, &get.port)?,
    ))
}

fn container_ports(c: &Container) -> BTreeSet<i32> {
    c.ports.iter().flatten().map(|p| p.container_port).collect()
}

fn capabilities(
    c: &Container,
    which: fn(&k8s_openapi::api::core::v1::Capabilities) -> &Option<Vec<String>>,
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

/// The prometheus.io annotations of `w` point at `port`, where `flag`
/// serves `/metrics`.
fn scraped(p: &mut Problems, w: &Workload<'_>, flag: &str, port: i32) {
    let annotation = |k: &str| w.annotations.get(k).map(String::as_str);
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

/// Whether a (non-empty) matchLabels selector selects `labels`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `namespace/name`, split.
fn qualified(s: &str) -> (&str, &str) {
    s.split_once('/')
        .unwrap_or_else(|| panic!("{s:?} is not namespace/name"))
}

#[test]
fn kustomization_lists_every_manifest_file() {
    #[derive(serde::Deserialize)]
    struct Kustomization {
        kind: String,
        namespace: Option<String>,
        #[serde(default)]
        resources: Vec<String>,
    }
    let k: Kustomization =
        serde_yaml::from_str(KUSTOMIZATION).expect("deploy/kustomization.yaml reads");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("deploy/ is readable")
        .map(|e| {
            e.expect("deploy/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|f| (f.ends_with(".yaml") || f.ends_with(".yml")) && f != "kustomization.yaml")
        .collect();
    let tested: BTreeSet<String> = MANIFESTS.iter().map(|(f, _)| f.to_string()).collect();
    let listed: BTreeSet<String> = k.resources.iter().cloned().collect();

    let mut p = Problems::default();
    p.check(k.kind == "Kustomization", || {
        format!("kustomization.yaml is a {}, not a Kustomization", k.kind)
    });
    for f in on_disk.difference(&tested) {
        p.check(false, || {
            format!("deploy/{f} is not in MANIFESTS in deploy_tests.rs, so nothing checks it")
        });
    }
    for f in on_disk.difference(&listed) {
        p.check(false, || {
            format!(
                "deploy/{f} is not in kustomization.yaml's resources: `kubectl apply -k` skips it"
            )
        });
    }
    for f in &listed {
        p.check(dir.join(f).exists(), || {
            format!("kustomization.yaml lists {f}, which is not in deploy/")
        });
    }

    let m = Manifests::load();
    let ns = k.namespace.as_deref();
    p.check(
        ns.is_some_and(|ns| m.find::<Namespace>(None, ns).is_some()),
        || format!("kustomization.yaml's namespace {ns:?} is not a Namespace in deploy/"),
    );
    for d in &m.docs {
        let (kind, meta) = (d.object.kind(), d.object.meta());
        let name = meta.name.as_deref().unwrap_or_default();
        match (d.object.namespaced(), meta.namespace.as_deref()) {
            (true, Some(own)) => p.check(Some(own) == ns, || {
                format!("{kind} {name} in deploy/{} is in namespace {own}, the kustomization puts it in {ns:?}", d.file)
            }),
            (true, None) => {}
            (false, own) => p.check(own.is_none(), || {
                format!("{kind} {name} in deploy/{} is cluster-scoped but names namespace {own:?}", d.file)
            }),
        }
    }
    p.assert_none("deploy/ and its kustomization disagree");
}

#[test]
fn service_accounts_and_role_refs_exist() {
    let m = Manifests::load();
    let mut p = Problems::default();
    for w in m.workloads() {
        let sa = w.service_account();
        p.check(
            m.find::<ServiceAccount>(Some(&w.namespace), sa).is_some(),
            || {
                format!(
                    "{} runs as ServiceAccount {}/{sa}, which deploy/ does not create",
                    w.name, w.namespace
                )
            },
        );
    }
    for b in m.bindings() {
        let (what, role) = (&b.what, &b.role_ref);
        p.check(m.rules_of(&b).is_some(), || {
            format!(
                "{what} refers to {} {}, which deploy/ does not create",
                role.kind, role.name
            )
        });
        p.check(!b.subjects.is_empty(), || format!("{what} has no subjects"));
        for s in b.subjects {
            let found = s.kind == "ServiceAccount"
                && m.find::<ServiceAccount>(s.namespace.as_deref(), &s.name)
                    .is_some();
            p.check(found, || {
                format!(
                    "{what} binds {} {:?}/{}, which deploy/ does not create",
                    s.kind, s.namespace, s.name
                )
            });
        }
    }
    p.assert_none("RBAC references that lead nowhere");
}

#[test]
fn mesh_containers_set_only_what_their_subcommand_reads() {
    let m = Manifests::load();
    let mut p = Problems::default();
    let mesh = m.mesh_containers();
    p.check(!mesh.is_empty(), || {
        "no container runs mesh-agent".to_owned()
    });
    for mc in &mesh {
        if let Err(e) = &mc.cli {
            p.check(false, || {
                format!("{} container {}: {e}", mc.workload.name, mc.container.name)
            });
        }
    }
    // Other containers (init steps) get no MESH_* variable by mistake.
    for w in m.workloads() {
        for c in w
            .pod
            .init_containers
            .iter()
            .flatten()
            .chain(&w.pod.containers)
        {
            if mesh_argv(c).is_none() {
                let stray: Vec<_> = c
                    .env
                    .iter()
                    .flatten()
                    .filter(|e| e.name.starts_with("MESH_"))
                    .collect();
                p.check(stray.is_empty(), || {
                    format!(
                        "{} container {} does not run mesh-agent but sets MESH_* variables",
                        w.name, c.name
                    )
                });
            }
        }
    }
    p.assert_none("mesh-agent would not start with these arguments and variables");
}

#[test]
fn agent_daemonset_matches_node_flags() {
    let m = Manifests::load();
    let (w, c, args) = m.agent();
    let pod = w.pod;
    let mut p = Problems::default();
    let (metrics, ready) = (
        args.metrics_addr.port() as i32,
        args.ready_addr.port() as i32,
    );

    // Probes, ports, scraping.
    let readiness = http_probe(c, c.readiness_probe.as_ref());
    p.check(readiness == Some((READY_PATH.to_owned(), ready)), || {
        format!(
            "readiness probe is {readiness:?}, the agent serves {READY_PATH} on --ready-addr {}",
            args.ready_addr
        )
    });
    // /healthz/ready answers 503 until the configuration is read: as a
    // liveness probe it would restart an agent that waits for the API server.
    let liveness = http_probe(c, c.liveness_probe.as_ref());
    p.check(liveness == Some((METRICS_PATH.to_owned(), metrics)), || {
        format!("liveness probe is {liveness:?}, not {METRICS_PATH} on --metrics-addr port {metrics}, which answers whatever the configuration's state")
    });
    let ports = container_ports(c);
    for (flag, port) in [("--metrics-addr", metrics), ("--ready-addr", ready)] {
        p.check(ports.contains(&port), || {
            format!("container ports {ports:?} lack {flag} port {port}")
        });
    }
    scraped(&mut p, &w, "--metrics-addr", metrics);
    // The kubelet and Prometheus come from outside the node's loopback;
    // the admin API must not.
    for (flag, addr) in [
        ("--metrics-addr", args.metrics_addr),
        ("--ready-addr", args.ready_addr),
    ] {
        p.check(!addr.ip().is_loopback(), || {
            format!("{flag} {addr} is loopback: the kubelet and Prometheus cannot reach it")
        });
    }
    p.check(args.admin_addr.ip().is_loopback(), || {
        format!("--admin-addr {} is not loopback: the unauthenticated admin API would face the node's network", args.admin_addr)
    });

    // Host namespaces.
    p.check(pod.host_network == Some(true), || {
        "hostNetwork is not true".into()
    });
    if pod.host_network == Some(true) {
        p.check(pod.dns_policy.as_deref() == Some("ClusterFirstWithHostNet"), || {
            format!("dnsPolicy is {:?}: with hostNetwork only ClusterFirstWithHostNet resolves Service names", pod.dns_policy)
        });
    }
    if args.proc_root == Path::new("/proc") {
        p.check(pod.host_pid == Some(true), || {
            "--proc-root is /proc but hostPID is not true: pods' processes are invisible".into()
        });
    } else {
        let host = w.host_path_of(c, &args.proc_root);
        p.check(host.as_deref() == Some(Path::new("/proc")), || {
            format!(
                "--proc-root {} is not the node's /proc (hostPath {host:?})",
                args.proc_root.display()
            )
        });
    }

    // Node directories.
    match w.mount_of(c, &args.bpf_dir) {
        Some((mnt, vol, _)) => {
            let host = vol.host_path.as_ref().map(|h| h.path.as_str());
            p.check(host == Some(mnt.mount_path.as_str()), || {
                format!("--bpf-dir {} is on volume {} (hostPath {host:?}), not the node's {}: pins would die with the container", args.bpf_dir.display(), vol.name, mnt.mount_path)
            });
            let propagation = mnt.mount_propagation.as_deref();
            p.check(matches!(propagation, Some("HostToContainer" | "Bidirectional")), || {
                format!("the mount holding --bpf-dir has propagation {propagation:?}: a bpffs the node mounts later stays unseen")
            });
        }
        None => p.check(false, || {
            format!("nothing is mounted at --bpf-dir {}", args.bpf_dir.display())
        }),
    }
    match w.mount_of(c, &args.state_dir) {
        Some((mnt, vol, _)) => {
            p.check(vol.host_path.is_some(), || {
                format!("--state-dir {} is on volume {}, not a hostPath: enrolled pods would be forgotten at restart", args.state_dir.display(), vol.name)
            });
            p.check(mnt.read_only != Some(true), || {
                "the mount holding --state-dir is read-only".into()
            });
        }
        None => p.check(false, || {
            format!(
                "nothing is mounted at --state-dir {}",
                args.state_dir.display()
            )
        }),
    }
    let cgroups: Vec<PathBuf> = match &args.cgroup {
        Some(c) => vec![c.clone()],
        None => CGROUP_ROOTS.iter().map(PathBuf::from).collect(),
    };
    for cg in cgroups {
        let host = w.host_path_of(c, &cg);
        p.check(host.as_deref() == Some(cg.as_path()), || {
            format!("cgroup {} shows node path {host:?}: the programs must attach to the node's cgroup tree", cg.display())
        });
    }

    // Identity for the cluster.
    p.check(args.mesh.kubernetes, || {
        "MESH_KUBERNETES is not true: the agent would not read the cluster".into()
    });
    let node_env = c.env.iter().flatten().find(|e| e.name == "MESH_NODE_NAME");
    let node_field = node_env
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    p.check(node_field == Some("spec.nodeName"), || {
        format!("MESH_NODE_NAME comes from {node_field:?}, not the downward API's spec.nodeName that pods are matched by")
    });
    match w.token_at(c, &args.mesh.ca_token) {
        Some(t) => p.check(t.expiration_seconds.is_some_and(|s| s >= 600), || {
            format!(
                "the CA token's expirationSeconds {:?} is unset or below the API's minimum of 600",
                t.expiration_seconds
            )
        }),
        None => p.check(false, || {
            format!(
                "--ca-token {} is not a projected ServiceAccount token",
                args.mesh.ca_token.display()
            )
        }),
    }

    // Privileges.
    let sc = c.security_context.as_ref();
    p.check(sc.and_then(|s| s.privileged) != Some(true), || {
        "the agent container is privileged".into()
    });
    let dropped = capabilities(c, |c| &c.drop);
    p.check(dropped.contains("ALL"), || {
        format!("capabilities drop {dropped:?}, not ALL")
    });
    let added = capabilities(c, |c| &c.add);
    let expected: BTreeSet<String> = AGENT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
    p.check(added == expected, || {
        format!("capabilities add {added:?}, the reasoned set is {expected:?} (change both, and the README's table)")
    });
    p.assert_none(&format!("{} disagrees with `mesh-agent node`", w.name));
}

#[test]
fn ca_deployment_matches_ca_flags() {
    let m = Manifests::load();
    let (w, c, args) = m.ca();
    let mut p = Problems::default();
    let (listen, ready) = (args.listen.port() as i32, args.ready_addr.port() as i32);

    let readiness = http_probe(c, c.readiness_probe.as_ref());
    p.check(readiness == Some((READY_PATH.to_owned(), ready)), || {
        format!(
            "readiness probe is {readiness:?}, the CA serves {READY_PATH} on --ready-addr {}",
            args.ready_addr
        )
    });
    scraped(&mut p, &w, "--ready-addr", ready);
    let https = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("https"));
    p.check(https.map(|p| p.container_port) == Some(listen), || {
        format!(
            "container port `https` is {:?}, --listen is {}",
            https.map(|p| p.container_port),
            args.listen
        )
    });
    p.check(container_ports(c).contains(&ready), || {
        format!("no container port for --ready-addr {ready}")
    });
    for (flag, addr) in [("--listen", args.listen), ("--ready-addr", args.ready_addr)] {
        p.check(!addr.ip().is_loopback(), || {
            format!("{flag} {addr} is loopback: nothing outside the pod reaches it")
        });
    }

    // The root: a Secret, read-only, readable by the CA's user only.
    match w.mount_of(c, &args.ca_dir) {
        Some((mnt, vol, rest)) => {
            p.check(rest.as_os_str().is_empty(), || {
                format!(
                    "--ca-dir {} is inside mount {}, not the mount itself",
                    args.ca_dir.display(),
                    mnt.mount_path
                )
            });
            p.check(mnt.read_only == Some(true), || {
                "the --ca-dir mount is not read-only".into()
            });
            match &vol.secret {
                Some(s) => {
                    p.check(s.optional != Some(true), || {
                        "the root Secret is optional: without it the CA would generate a root of its own".into()
                    });
                    let mode = s.default_mode.unwrap_or(0o644);
                    p.check(mode & 0o007 == 0 && mode & !0o777 == 0, || {
                        format!("the root Secret's mode {mode:#o} lets every user read the key (or is not a mode)")
                    });
                    let pod_sc = w.pod.security_context.as_ref();
                    let non_root = (pod_sc.and_then(|s| s.run_as_non_root))
                        .or(c.security_context.as_ref().and_then(|s| s.run_as_non_root));
                    if non_root == Some(true) {
                        let fs_group = pod_sc.and_then(|s| s.fs_group);
                        p.check(fs_group.is_some() && mode & 0o040 != 0, || {
                            format!("the CA runs as non-root but cannot read the root: fsGroup {fs_group:?}, mode {mode:#o}")
                        });
                    }
                }
                None => p.check(false, || {
                    format!("--ca-dir {} is not a Secret volume", args.ca_dir.display())
                }),
            }
        }
        None => p.check(false, || {
            format!("nothing is mounted at --ca-dir {}", args.ca_dir.display())
        }),
    }

    let sc = c.security_context.clone().unwrap_or_default();
    let pod_sc = w.pod.security_context.clone().unwrap_or_default();
    p.check(
        sc.run_as_non_root.or(pod_sc.run_as_non_root) == Some(true),
        || "runAsNonRoot is not true".into(),
    );
    p.check(sc.read_only_root_filesystem == Some(true), || {
        "readOnlyRootFilesystem is not true".into()
    });
    p.check(sc.allow_privilege_escalation == Some(false), || {
        "allowPrivilegeEscalation is not false".into()
    });
    p.check(capabilities(c, |c| &c.drop).contains("ALL"), || {
        "capabilities do not drop ALL".into()
    });
    p.check(capabilities(c, |c| &c.add).is_empty(), || {
        "the CA adds capabilities".into()
    });
    p.assert_none(&format!("{} disagrees with `mesh-agent ca`", w.name));
}

#[test]
fn agent_finds_and_trusts_the_ca() {
    let m = Manifests::load();
    let (aw, ac, agent) = m.agent();
    let (cw, cc, ca) = m.ca();
    let mut p = Problems::default();

    // MESH_CA_ADDRESS names the CA's Service, on a name its certificate has.
    let address = agent.mesh.ca_address.clone().unwrap_or_default();
    let host_port = address
        .strip_prefix("https://")
        .map(|r| r.trim_end_matches('/'));
    let parsed = host_port.and_then(|hp| {
        let (host, port) = hp.rsplit_once(':')?;
        let (svc, rest) = host.split_once('.')?;
        let (ns, svc_suffix) = rest.split_once('.')?;
        (svc_suffix == "svc").then_some((host, svc, ns, port.parse::<i32>().ok()?))
    });
    match parsed {
        None => p.check(false, || {
            format!("MESH_CA_ADDRESS {address:?} is not https://<service>.<namespace>.svc:<port>")
        }),
        Some((host, svc, ns, port)) => {
            p.check(ca.server_names.iter().any(|n| n == host), || {
                format!(
                    "MESH_CA_ADDRESS host {host} is not among the CA's --server-names {:?}",
                    ca.server_names
                )
            });
            match m.find::<Service>(Some(ns), svc) {
                None => p.check(false, || {
                    format!(
                        "MESH_CA_ADDRESS names Service {ns}/{svc}, which deploy/ does not create"
                    )
                }),
                Some(s) => {
                    let spec = s.spec.clone().unwrap_or_default();
                    let selector = spec.selector.unwrap_or_default();
                    p.check(selects(&selector, &cw.labels), || {
                        format!("Service {svc}'s selector {selector:?} does not select the CA's pods {:?}", cw.labels)
                    });
                    p.check(cw.namespace == ns, || {
                        format!(
                            "Service {ns}/{svc} and the CA ({}) are in different namespaces",
                            cw.namespace
                        )
                    });
                    let sp = spec.ports.iter().flatten().find(|sp| sp.port == port);
                    match sp {
                        None => p.check(false, || {
                            format!("Service {svc} has no port {port} (MESH_CA_ADDRESS)")
                        }),
                        Some(sp) => {
                            p.check(sp.name.as_deref() == Some("https"), || {
                                format!(
                                    "Service {svc} port {port} is named {:?}, not https",
                                    sp.name
                                )
                            });
                            let target = sp
                                .target_port
                                .as_ref()
                                .and_then(|t| port_number(cc, t))
                                .unwrap_or(sp.port);
                            p.check(target == ca.listen.port() as i32, || {
                                format!("Service {svc} port {port} sends to {target}, the CA's --listen is {}", ca.listen)
                            });
                            p.check(port == ca.listen.port() as i32, || {
                                format!("Service {svc} port {port} differs from the CA's --listen port {}", ca.listen.port())
                            });
                        }
                    }
                }
            }
        }
    }

    p.check(agent.mesh.trust_domain == ca.trust_domain, || {
        format!(
            "the agent's trust domain {} differs from the CA's {}",
            agent.mesh.trust_domain, ca.trust_domain
        )
    });
    let agent_sa = format!("{}/{}", aw.namespace, aw.service_account());
    p.check(agent_sa == ca.agent_service_account, || {
        format!(
            "the agent runs as {agent_sa}, the CA accepts only --agent-service-account {}",
            ca.agent_service_account
        )
    });

    // The token the agent shows carries the audience the CA wants.
    let audience = aw
        .token_at(ac, &agent.mesh.ca_token)
        .and_then(|t| t.audience.as_deref());
    p.check(audience == Some(ca.audience.as_str()), || {
        format!(
            "--ca-token has audience {audience:?}, the CA's --audience is {}",
            ca.audience
        )
    });

    // MESH_CA_ROOT is the key the CA publishes, from the ConfigMap it
    // publishes it in, which the agent's pod can mount only in its own
    // namespace.
    let (cm_ns, cm_name) = qualified(&ca.root_configmap);
    p.check(cm_ns == aw.namespace, || {
        format!(
            "--root-configmap {} is outside the agent's namespace {}: a pod cannot mount it",
            ca.root_configmap, aw.namespace
        )
    });
    let root = agent.mesh.ca_root.clone().unwrap_or_default();
    match aw.mount_of(ac, &root) {
        Some((_, vol, rest)) => match &vol.config_map {
            Some(cm) => {
                p.check(cm.name == cm_name, || {
                    format!(
                        "MESH_CA_ROOT is in ConfigMap {}, the CA publishes {}",
                        cm.name, ca.root_configmap
                    )
                });
                p.check(cm.optional != Some(true), || {
                    "the root ConfigMap is optional: the agent would start with no trust anchor"
                        .into()
                });
                let key = match cm.items.as_deref() {
                    None => Some(rest.to_string_lossy().into_owned()),
                    Some(items) => items
                        .iter()
                        .find(|i| Path::new(&i.path) == rest)
                        .map(|i| i.key.clone()),
                };
                p.check(key.as_deref() == Some(ROOT_KEY), || {
                    format!(
                        "MESH_CA_ROOT {} reads key {key:?}, the CA publishes {ROOT_KEY}",
                        root.display()
                    )
                });
            }
            None => p.check(false, || {
                format!(
                    "MESH_CA_ROOT {} is not in a ConfigMap volume",
                    root.display()
                )
            }),
        },
        None => p.check(false, || {
            format!("nothing is mounted at MESH_CA_ROOT {}", root.display())
        }),
    }
    p.assert_none("the agent and the CA disagree");
}

/// One rule of a role, and where it applies (None: every namespace).
struct Grant<'a> {
    namespace: Option<&'a str>,
    rule: &'a PolicyRule,
}

/// What ServiceAccount `ns/name` may do, through every binding in deploy/.
fn grants<'a>(m: &'a Manifests, ns: &str, name: &str) -> Vec<Grant<'a>> {
    let mut out = Vec::new();
    for b in m.bindings() {
        let bound = (b.subjects.iter()).any(|s| {
            s.kind == "ServiceAccount" && s.name == name && s.namespace.as_deref() == Some(ns)
        });
        if bound {
            let rules = m.rules_of(&b).unwrap_or_default();
            out.extend(rules.iter().map(|rule| Grant {
                namespace: b.namespace,
                rule,
            }));
        }
    }
    out
}

/// An API request, as RBAC sees it.
struct Request<'a> {
    verb: &'a str,
    group: &'a str,
    resource: &'a str,
    /// None: in every namespace, or a cluster-scoped resource.
    namespace: Option<&'a str>,
    name: Option<&'a str>,
}

impl<'a> Request<'a> {
    fn new(verb: &'a str, group: &'a str, resource: &'a str) -> Self {
        Request {
            verb,
            group,
            resource,
            namespace: None,
            name: None,
        }
    }

    fn allowed(&self, grants: &[Grant<'_>]) -> bool {
        let has =
            |list: &Option<Vec<String>>, x: &str| list.iter().flatten().any(|v| v == x || v == "*");
        grants.iter().any(|g| {
            let r = g.rule;
            let names_ok = match r.resource_names.as_deref() {
                None | Some([]) => true,
                Some(names) => self.name.is_some_and(|n| names.iter().any(|x| x == n)),
            };
            (g.namespace.is_none() || (self.namespace.is_some() && g.namespace == self.namespace))
                && r.verbs.iter().any(|v| v == self.verb || v == "*")
                && has(&r.api_groups, self.group)
                && has(&r.resources, self.resource)
                && names_ok
        })
    }
}

impl std::fmt::Display for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        if let Some(name) = self.name {
            write!(f, " named {name}")?;
        }
        match self.namespace {
            Some(ns) => write!(f, " in namespace {ns}"),
            None => write!(f, " cluster-wide"),
        }
    }
}

fn group_resource(r: &Resource) -> String {
    if r.group.is_empty() {
        r.plural.to_owned()
    } else {
        format!("{}.{}", r.plural, r.group)
    }
}

#[test]
fn agent_may_watch_every_watched_kind_and_write_events() {
    let m = Manifests::load();
    let (w, _, _) = m.agent();
    let sa = w.service_account();
    let g = grants(&m, &w.namespace, sa);
    let mut p = Problems::default();
    for r in WATCHED {
        for verb in ["list", "watch"] {
            let req = Request::new(verb, r.group, r.plural);
            p.check(req.allowed(&g), || {
                format!("cannot {req} (cluster::WATCHED has {})", r.kind)
            });
        }
    }
    for verb in ["create", "patch"] {
        let req = Request::new(verb, EVENTS.group, EVENTS.plural);
        p.check(req.allowed(&g), || {
            format!("cannot {req} (cluster::EVENTS)")
        });
    }
    p.assert_none(&format!(
        "ServiceAccount {}/{sa} lacks what the agent does",
        w.namespace
    ));
}

#[test]
fn ca_may_review_tokens_read_pods_and_publish_its_root() {
    let m = Manifests::load();
    let (w, _, ca) = m.ca();
    let sa = w.service_account();
    let g = grants(&m, &w.namespace, sa);
    let (cm_ns, cm_name) = qualified(&ca.root_configmap);
    let in_ns = |req: Request<'static>| Request {
        namespace: Some(cm_ns),
        ..req
    };
    let root = |verb| Request {
        name: Some(cm_name),
        ..in_ns(Request::new(verb, "", "configmaps"))
    };
    let needs = [
        Request::new("create", "authentication.k8s.io", "tokenreviews"),
        Request::new("get", "", "pods"),
        Request::new("list", "", "pods"),
        in_ns(Request::new("create", "", "configmaps")),
        root("get"),
        root("update"),
    ];
    let mut p = Problems::default();
    for req in needs {
        p.check(req.allowed(&g), || format!("cannot {req}"));
    }
    p.assert_none(&format!(
        "ServiceAccount {}/{sa} lacks what the CA does",
        w.namespace
    ));
}

#[test]
fn rbac_grants_no_wildcards() {
    let m = Manifests::load();
    let cluster = m
        .all::<ClusterRole>()
        .map(|r| (format!("ClusterRole {:?}", r.metadata.name), &r.rules));
    let roles = m
        .all::<Role>()
        .map(|r| (format!("Role {:?}", r.metadata.name), &r.rules));
    let mut p = Problems::default();
    for (what, rules) in cluster.chain(roles) {
        for r in rules.iter().flatten() {
            let lists = [Some(&r.verbs), r.api_groups.as_ref(), r.resources.as_ref()];
            let wild = lists
                .into_iter()
                .flatten()
                .flatten()
                .any(|v| v.contains('*'));
            p.check(!wild, || format!("{what} grants a wildcard: {r:?}"));
        }
    }
    p.assert_none("RBAC wider than named");
}

#[test]
fn crds_define_the_watched_istio_kinds() {
    let m = Manifests::load();
    let crds: Vec<&CustomResourceDefinition> = m.all().collect();
    let mut p = Problems::default();
    let ours = WATCHED
        .iter()
        .filter(|r| !r.group.is_empty() && !UPSTREAM_CRD_GROUPS.contains(&r.group));
    for r in ours {
        let Some(crd) = crds
            .iter()
            .find(|c| c.spec.group == r.group && c.spec.names.kind == r.kind)
        else {
            p.check(false, || {
                format!("no CRD defines {} {} (cluster::WATCHED)", r.group, r.kind)
            });
            continue;
        };
        let (spec, what) = (&crd.spec, format!("CRD for {} {}", r.group, r.kind));
        p.check(spec.names.plural == r.plural, || {
            format!(
                "{what} has plural {}, the agent watches {}",
                spec.names.plural, r.plural
            )
        });
        let name = crd.metadata.name.clone().unwrap_or_default();
        p.check(name == group_resource(r), || {
            format!(
                "{what} is named {name}, the API requires {}",
                group_resource(r)
            )
        });
        let scope = if r.namespaced {
            "Namespaced"
        } else {
            "Cluster"
        };
        p.check(spec.scope == scope, || {
            format!("{what} is {}, the agent expects {scope}", spec.scope)
        });
        let served: Vec<&str> = spec
            .versions
            .iter()
            .filter(|v| v.served)
            .map(|v| v.name.as_str())
            .collect();
        p.check(served.contains(&r.version), || {
            format!("{what} serves {served:?}, the agent watches {}", r.version)
        });
        let storage = spec.versions.iter().filter(|v| v.storage).count();
        p.check(storage == 1, || {
            format!("{what} has {storage} storage versions, not one")
        });
        for v in spec.versions.iter().filter(|v| v.served) {
            let schema = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref());
            let field = |f: &str| schema.and_then(|s| s.properties.as_ref()?.get(f));
            let object = |f: &str| field(f).is_some_and(|s| s.type_.as_deref() == Some("object"));
            p.check(
                schema.is_some_and(|s| s.type_.as_deref() == Some("object")),
                || format!("{what} {}: the schema root is not an object", v.name),
            );
            p.check(object("spec") && object("status"), || {
                format!("{what} {}: spec and status must be objects", v.name)
            });
            let keeps =
                field("spec").and_then(|s| s.x_kubernetes_preserve_unknown_fields) == Some(true);
            p.check(keeps, || {
                format!("{what} {}: spec does not preserve unknown fields, so the API server would prune what the agent must see to refuse it", v.name)
            });
        }
    }
    for c in &crds {
        let (group, kind) = (&c.spec.group, &c.spec.names.kind);
        p.check(
            WATCHED.iter().any(|r| r.group == group && r.kind == kind),
            || format!("CRD {group} {kind} is for a kind the agent does not watch"),
        );
        p.check(!UPSTREAM_CRD_GROUPS.contains(&group.as_str()), || {
            format!("CRD {group} {kind} belongs to its upstream project's release")
        });
    }
    p.assert_none("deploy/crds.yaml disagrees with cluster::WATCHED");
}

/// Rules the API server enforces at admission, which reading the types
/// cannot see.
#[test]
fn pods_pass_the_api_servers_checks() {
    let m = Manifests::load();
    let mut p = Problems::default();
    for w in m.workloads() {
        let pod = w.pod;
        let containers: Vec<&Container> = pod
            .init_containers
            .iter()
            .flatten()
            .chain(&pod.containers)
            .collect();
        let mut mounted = BTreeSet::new();
        for c in &containers {
            let privileged = c.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
            for mnt in c.volume_mounts.iter().flatten() {
                mounted.insert(mnt.name.as_str());
                p.check(w.volume(&mnt.name).is_some(), || {
                    format!(
                        "{} container {} mounts undefined volume {}",
                        w.name, c.name, mnt.name
                    )
                });
                p.check(privileged || mnt.mount_propagation.as_deref() != Some("Bidirectional"), || {
                    format!("{} container {}: Bidirectional propagation on {} needs a privileged container", w.name, c.name, mnt.mount_path)
                });
            }
        }
        for v in pod.volumes.iter().flatten() {
            p.check(mounted.contains(v.name.as_str()), || {
                format!(
                    "{} defines volume {} that no container mounts",
                    w.name, v.name
                )
            });
        }
    }
    for w in m.workloads() {
        p.check(selects(&w.selector, &w.labels), || {
            format!(
                "{}: selector {:?} does not select its own pods {:?}",
                w.name, w.selector, w.labels
            )
        });
    }
    // Host namespaces and host paths are beyond the "baseline" Pod Security
    // level, which many clusters enforce by default.
    for w in m.workloads() {
        let pod = w.pod;
        let host = pod.host_network == Some(true)
            || pod.host_pid == Some(true)
            || pod.volumes.iter().flatten().any(|v| v.host_path.is_some());
        if host {
            let level = (m.find::<Namespace>(None, &w.namespace)).and_then(|n| {
                n.metadata
                    .labels
                    .as_ref()?
                    .get("pod-security.kubernetes.io/enforce")
                    .cloned()
            });
            p.check(level.as_deref() == Some("privileged"), || {
                format!("{} uses the host's namespaces or paths, but namespace {} enforces Pod Security {level:?}, not privileged", w.name, w.namespace)
            });
        }
    }
    p.assert_none("the API server would refuse or break these pods");
}
