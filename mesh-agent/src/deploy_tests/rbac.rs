//! RBAC as the API server evaluates it: every binding leads somewhere, the
//! agent and the CA may make each request their code makes, and no rule
//! grants a wildcard.

use std::fmt;

use k8s_openapi::{
    api::{
        core::v1::ServiceAccount,
        rbac::v1::{
            ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{Manifests, Problems, Workload, name, qualified};
use crate::cluster::{EVENTS, PATCHED, WATCHED};

/// A RoleBinding (in `namespace`) or a ClusterRoleBinding (no namespace).
struct Binding<'a> {
    what: String,
    namespace: Option<&'a str>,
    role_ref: &'a RoleRef,
    subjects: &'a [Subject],
}

impl<'a> Binding<'a> {
    fn new(
        kind: &str,
        meta: &'a ObjectMeta,
        role_ref: &'a RoleRef,
        subjects: &'a Option<Vec<Subject>>,
    ) -> Self {
        Binding {
            what: format!("{kind} {}", name(meta)),
            namespace: meta.namespace.as_deref(),
            role_ref,
            subjects: subjects.as_deref().unwrap_or_default(),
        }
    }
}

impl Manifests {
    /// Every RoleBinding and ClusterRoleBinding.
    fn bindings(&self) -> Vec<Binding<'_>> {
        let cluster = self.all::<ClusterRoleBinding>().map(|b| Binding {
            // A ClusterRoleBinding grants everywhere, whatever its metadata says.
            namespace: None,
            ..Binding::new("ClusterRoleBinding", &b.metadata, &b.role_ref, &b.subjects)
        });
        let namespaced = (self.all::<RoleBinding>())
            .map(|b| Binding::new("RoleBinding", &b.metadata, &b.role_ref, &b.subjects));
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

    /// What ServiceAccount `ns/name` may do, through every binding.
    fn grants(&self, ns: &str, name: &str) -> Vec<Grant<'_>> {
        let mut out = Vec::new();
        for b in self.bindings() {
            let bound = (b.subjects.iter()).any(|s| {
                s.kind == "ServiceAccount" && s.name == name && s.namespace.as_deref() == Some(ns)
            });
            if bound {
                let rules = self.rules_of(&b).unwrap_or_default();
                out.extend(rules.iter().map(|rule| Grant {
                    namespace: b.namespace,
                    rule,
                }));
            }
        }
        out
    }
}

/// One rule of a role, and where it applies (None: every namespace).
struct Grant<'a> {
    namespace: Option<&'a str>,
    rule: &'a PolicyRule,
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

impl fmt::Display for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

/// Each request (with why it is made) is allowed to the ServiceAccount `w`
/// runs as; `who` is what `w` runs.
fn check_allowed<'r>(
    m: &Manifests,
    w: &Workload<'_>,
    who: &str,
    needs: impl IntoIterator<Item = (Request<'r>, String)>,
) {
    let (namespace, sa) = (&w.namespace, w.service_account());
    let g = m.grants(namespace, sa);
    let mut p = Problems::default();
    for (req, why) in needs {
        p.check(req.allowed(&g), || format!("cannot {req}{why}"));
    }
    p.assert_none(&format!(
        "ServiceAccount {namespace}/{sa} lacks what {who} does"
    ));
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
fn agent_may_watch_every_watched_kind_write_events_and_annotate_pods() {
    let m = Manifests::load();
    let (w, _, _) = m.agent();
    let watches = WATCHED.iter().flat_map(|r| {
        ["list", "watch"].map(|verb| {
            let why = format!(" (cluster::WATCHED has {})", r.kind);
            (Request::new(verb, r.group, r.plural), why)
        })
    });
    let events = ["create", "patch"].map(|verb| {
        let req = Request::new(verb, EVENTS.group, EVENTS.plural);
        (req, " (cluster::EVENTS)".to_owned())
    });
    let annotate = Request::new("patch", PATCHED.group, PATCHED.plural);
    let annotate = [(annotate, " (cluster::PATCHED)".to_owned())];
    check_allowed(&m, &w, "the agent", watches.chain(events).chain(annotate));
}

#[test]
fn ca_may_review_tokens_read_pods_and_publish_its_root() {
    let m = Manifests::load();
    let (w, _, ca) = m.ca();
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
    let needs = needs.map(|req| (req, String::new()));
    check_allowed(&m, &w, "the CA", needs);
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
