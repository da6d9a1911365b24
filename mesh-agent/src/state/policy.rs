//! Istio AuthorizationPolicy: the object as written (strict about field
//! names, so that a typo is an error and not a silently wider policy),
//! compiled into checks, and evaluated DENY first, then ALLOW.
//!
//! A policy with a `selector` (or none) is the node agent's, at L4: it sees
//! connections, not requests. Rules that need a request (methods, paths,
//! hosts, request principals, `request.*` conditions) are handled as
//! Istio's ztunnel does: an ALLOW rule using them never matches, and a DENY
//! rule is applied with those parts left out, so it denies more than
//! written rather than less. Both cases are reported as warnings.
//!
//! A policy with `targetRefs` (a Service, or a waypoint Gateway) is a
//! waypoint's, with the request fields compiled too.

use std::{
    cell::OnceCell,
    collections::{BTreeMap, HashMap},
};

use serde::Deserialize;
use serde_yaml::Value;

use super::{
    ConfigWarning, Conn, Decision, Workload, gateway,
    matcher::{Attr, Attrs, Check, Compiler, Key},
    waypoint::Binding,
    yaml::{Objects, Scalar, WorkloadSelector},
};

#[derive(Debug, Deserialize)]
pub(super) struct AuthorizationPolicy {
    #[serde(default)]
    pub metadata: PolicyMetadata,
    pub spec: Option<PolicySpec>,
}

/// The part of the metadata that changes what a policy does.
#[derive(Debug, Default, Deserialize)]
pub(super) struct PolicyMetadata {
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Istio's annotation for a policy that is evaluated and reported, not
/// enforced.
const DRY_RUN: &str = "istio.io/dry-run";

impl AuthorizationPolicy {
    /// What stands in for a policy that does not parse: a DENY of every
    /// connection to the workloads it selects (its whole namespace when the
    /// selector cannot be read either). A typo must never widen access.
    pub fn deny_all(selector: Option<WorkloadSelector>) -> Self {
        AuthorizationPolicy {
            metadata: PolicyMetadata::default(),
            spec: Some(PolicySpec {
                selector,
                action: Some(Action::Deny),
                rules: Some(vec![Rule {
                    from: None,
                    to: None,
                    when: None,
                }]),
                ..PolicySpec::default()
            }),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PolicySpec {
    selector: Option<WorkloadSelector>,
    target_ref: Option<Value>,
    target_refs: Option<Vec<Value>>,
    action: Option<Action>,
    /// Only meaningful with CUSTOM, which is not supported.
    #[serde(rename = "provider")]
    _provider: Option<serde::de::IgnoredAny>,
    rules: Option<Vec<Rule>>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub(super) enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Rule {
    from: Option<Vec<RuleFrom>>,
    to: Option<Vec<RuleTo>>,
    when: Option<Vec<Condition>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleFrom {
    source: Option<SourceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleTo {
    operation: Option<Operation>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SourceSpec {
    principals: Option<Vec<String>>,
    not_principals: Option<Vec<String>>,
    request_principals: Option<Vec<String>>,
    not_request_principals: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    not_namespaces: Option<Vec<String>>,
    service_accounts: Option<Vec<String>>,
    not_service_accounts: Option<Vec<String>>,
    ip_blocks: Option<Vec<String>>,
    not_ip_blocks: Option<Vec<String>>,
    remote_ip_blocks: Option<Vec<String>>,
    not_remote_ip_blocks: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Operation {
    hosts: Option<Vec<String>>,
    not_hosts: Option<Vec<String>>,
    ports: Option<Vec<Scalar>>,
    not_ports: Option<Vec<Scalar>>,
    methods: Option<Vec<String>>,
    not_methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    not_paths: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Condition {
    key: String,
    values: Option<Vec<Scalar>>,
    not_values: Option<Vec<Scalar>>,
}

/// A policy as the data path evaluates it. At L4 only ALLOW and DENY
/// survive compilation; a waypoint's policies keep AUDIT too.
#[derive(Debug)]
pub(super) struct AuthzPolicy {
    namespace: String,
    name: String,
    action: Action,
    /// None: every workload in scope.
    selector: Option<BTreeMap<String, String>>,
    /// A waypoint's policy: what it is attached to.
    targets: Vec<Target>,
    rules: Vec<CompiledRule>,
    /// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    dry_run: bool,
}

/// What a waypoint policy is attached to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(super) struct Target {
    kind: String,
    namespace: String,
    name: String,
}

#[derive(Debug)]
struct CompiledRule {
    /// Any entry matching is enough; empty means no constraint.
    from: Vec<Vec<Check>>,
    to: Vec<Vec<Check>>,
    /// All must hold.
    when: Vec<Check>,
    /// An ALLOW rule that needs L7 attributes.
    never: bool,
}

impl CompiledRule {
    fn matches(&self, conn: &Attrs<'_>) -> bool {
        let any = |entries: &[Vec<Check>]| {
            entries.is_empty() || entries.iter().any(|e| e.iter().all(|c| c.holds(conn)))
        };
        !self.never && any(&self.from) && any(&self.to) && self.when.iter().all(|c| c.holds(conn))
    }
}

impl AuthzPolicy {
    /// Root-namespace policies apply everywhere, others in their namespace;
    /// a selector narrows either by labels.
    fn applies_to(&self, wl: &Workload, root_namespace: &str) -> bool {
        (*self.namespace == *wl.namespace || self.namespace == root_namespace)
            && self.selector.as_ref().is_none_or(|s| wl.has_labels(s))
    }

    fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "namespace": self.namespace,
            "name": self.name,
            "action": match self.action {
                Action::Deny => "DENY",
                Action::Audit => "AUDIT",
                _ => "ALLOW",
            },
            "selector": self.selector,
            "target_refs": self.targets,
            "rules": self.rules.len(),
            "l7_allow_rules_never_matching": self.rules.iter().filter(|r| r.never).count(),
            "dry_run": self.dry_run,
        })
    }
}

/// Istio's order: a matching DENY policy denies; else no ALLOW policy in
/// scope allows; else one of them must match. Every policy in scope, one
/// after the other: the reference the index is tested against.
#[cfg(test)]
pub(super) fn authorize_linear(
    policies: &[AuthzPolicy],
    root_namespace: &str,
    conn: &Conn<'_>,
) -> Decision {
    let in_scope = policies
        .iter()
        .filter(|p| !p.dry_run && p.applies_to(conn.dst, root_namespace));
    evaluate(in_scope, &conn.attrs()).0
}

/// What the dry-run policies in scope would decide on their own, by the
/// same rules (None when there are none), every policy in scope checked:
/// the reference for [`PolicyIndex::dry_run`].
#[cfg(test)]
pub(super) fn dry_run_linear(
    policies: &[AuthzPolicy],
    root_namespace: &str,
    conn: &Conn<'_>,
) -> Option<Decision> {
    let mut in_scope = policies
        .iter()
        .filter(|p| p.dry_run && p.applies_to(conn.dst, root_namespace))
        .peekable();
    in_scope.peek()?;
    Some(evaluate(in_scope, &conn.attrs()).0)
}

/// The node agent's policies, indexed so that a connection is checked
/// against the policies that can match it, not against every policy of
/// its namespace: by namespace, by one label of the selector, and by the
/// exact principals, namespaces, service accounts or ports a policy's
/// rules require. A policy whose rules say none of these exactly (a
/// negated list, a prefix, an address block) is checked for every
/// connection in its scope. The decision is the one of checking every
/// policy in scope in namespace/name order (DENY first, then ALLOW):
/// candidates are checked in that order, and the ALLOW policies in scope
/// are only listed when none of them matched.
#[derive(Debug, Default)]
pub(super) struct PolicyIndex {
    enforced: Scopes,
    dry_run: Scopes,
}

/// By the policies' namespace.
#[derive(Debug, Default)]
struct Scopes(HashMap<String, Scope>);

#[derive(Debug, Default)]
struct Scope {
    /// Policies without a selector.
    every_workload: Group,
    /// Policies with a selector, by its first label: key, then value.
    by_label: HashMap<String, HashMap<String, Group>>,
    /// Every policy of the namespace (positions in the policy list, in
    /// order): whether any applies, when no candidate did.
    all: Vec<u32>,
    /// Its ALLOW policies: those that apply are listed in the refusal when
    /// none matched.
    allow: Vec<u32>,
}

/// Positions of policies in the policy list, in order.
#[derive(Debug, Default)]
struct Group {
    /// Checked for every connection.
    always: Vec<u32>,
    by_key: HashMap<Key, Vec<u32>>,
}

impl AuthzPolicy {
    /// The values one of which a connection must have for any rule of this
    /// policy to match; None when some rule cannot be filed under such
    /// values.
    fn keys(&self) -> Option<Vec<Key>> {
        let mut keys = Vec::new();
        for rule in &self.rules {
            keys.extend(rule.keys()?);
        }
        keys.sort();
        keys.dedup();
        Some(keys)
    }
}

impl CompiledRule {
    /// See [`AuthzPolicy::keys`]: one condition that must hold is enough
    /// (a `from` whose every entry names exact values, one such `when`, or
    /// a `to` whose every entry names ports).
    fn keys(&self) -> Option<Vec<Key>> {
        if self.never {
            return Some(Vec::new());
        }
        let entries = |entries: &[Vec<Check>]| -> Option<Vec<Key>> {
            if entries.is_empty() {
                return None;
            }
            let mut keys = Vec::new();
            for entry in entries {
                keys.extend(entry.iter().find_map(Check::keys)?);
            }
            Some(keys)
        };
        entries(&self.from)
            .or_else(|| self.when.iter().find_map(Check::keys))
            .or_else(|| entries(&self.to))
    }
}

/// What a connection is looked up by, computed once and only when an index
/// needs it.
struct ConnKeys<'c> {
    conn: &'c Conn<'c>,
    principal: OnceCell<Option<Key>>,
    namespace: OnceCell<Option<Key>>,
    service_account: OnceCell<Option<Key>>,
}

impl<'c> ConnKeys<'c> {
    fn new(conn: &'c Conn<'c>) -> Self {
        ConnKeys {
            conn,
            principal: OnceCell::new(),
            namespace: OnceCell::new(),
            service_account: OnceCell::new(),
        }
    }

    /// The keys of this connection: without a peer identity, only its port.
    fn each(&self, mut f: impl FnMut(&Key)) {
        f(&Key::DstPort(self.conn.dst_port));
        let id = self.conn.src_identity;
        let keys = [
            self.principal
                .get_or_init(|| id.map(|id| Key::Principal(id.principal()))),
            self.namespace
                .get_or_init(|| id.map(|id| Key::Namespace(id.namespace.clone()))),
            self.service_account.get_or_init(|| {
                id.map(|id| Key::ServiceAccount(format!("{}/{}", id.namespace, id.service_account)))
            }),
        ];
        keys.into_iter().flatten().for_each(f);
    }
}

impl Group {
    fn add(&mut self, at: u32, keys: Option<Vec<Key>>) {
        match keys {
            None => self.always.push(at),
            Some(keys) => {
                for key in keys {
                    self.by_key.entry(key).or_default().push(at);
                }
            }
        }
    }

    fn candidates(&self, keys: &ConnKeys<'_>, out: &mut Vec<u32>) {
        out.extend_from_slice(&self.always);
        if !self.by_key.is_empty() {
            keys.each(|k| {
                if let Some(found) = self.by_key.get(k) {
                    out.extend_from_slice(found);
                }
            });
        }
    }
}

impl Scopes {
    fn add(&mut self, at: u32, p: &AuthzPolicy) {
        let scope = self.0.entry(p.namespace.clone()).or_default();
        scope.all.push(at);
        if p.action == Action::Allow {
            scope.allow.push(at);
        }
        let group = match p.selector.as_ref().and_then(|s| s.iter().next()) {
            Some((k, v)) => scope
                .by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default(),
            None => &mut scope.every_workload,
        };
        group.add(at, p.keys());
    }

    /// The scopes a connection to `dst` is in: its namespace's and the
    /// root namespace's.
    fn of<'a>(
        &'a self,
        dst: &'a Workload,
        root_namespace: &'a str,
    ) -> impl Iterator<Item = &'a Scope> {
        let root = (root_namespace != &*dst.namespace).then_some(root_namespace);
        [Some(&*dst.namespace), root]
            .into_iter()
            .flatten()
            .filter_map(|ns| self.0.get(ns))
    }

    /// The positions of the policies that may match a connection, in order.
    fn candidates(&self, root_namespace: &str, conn: &Conn<'_>) -> Vec<u32> {
        let keys = ConnKeys::new(conn);
        let mut candidates = Vec::new();
        for scope in self.of(conn.dst, root_namespace) {
            scope.every_workload.candidates(&keys, &mut candidates);
            for (k, v) in conn.dst.labels.iter() {
                if let Some(group) = scope.by_label.get(k).and_then(|values| values.get(v)) {
                    group.candidates(&keys, &mut candidates);
                }
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates
    }

    /// The decision of the policies in scope; with `report_none`, None when
    /// there are none (else Allow).
    fn decide(
        &self,
        policies: &[AuthzPolicy],
        root_namespace: &str,
        conn: &Conn<'_>,
        report_none: bool,
    ) -> Option<Decision> {
        if self.0.is_empty() {
            return None;
        }
        let candidates = self.candidates(root_namespace, conn);
        let attrs = conn.attrs();
        let mut allowed = false;
        for &at in &candidates {
            let p = &policies[at as usize];
            if !p.applies_to(conn.dst, root_namespace) {
                continue;
            }
            if !p.rules.iter().any(|r| r.matches(&attrs)) {
                continue;
            }
            match p.action {
                Action::Deny => {
                    let policy = p.id();
                    return Some(Decision::Deny {
                        reason: format!("denied by DENY policy {policy}"),
                        policy,
                    });
                }
                Action::Allow => allowed = true,
                _ => {}
            }
        }
        if allowed {
            return Some(Decision::Allow);
        }
        // No candidate matched: the ALLOW policies in scope (if any) deny.
        let mut allow: Vec<u32> = self
            .of(conn.dst, root_namespace)
            .flat_map(|s| s.allow.iter().copied())
            .filter(|&at| policies[at as usize].applies_to(conn.dst, root_namespace))
            .collect();
        let in_scope = || {
            self.of(conn.dst, root_namespace)
                .flat_map(|s| &s.all)
                .any(|&at| policies[at as usize].applies_to(conn.dst, root_namespace))
        };
        if allow.is_empty() {
            // Whether there were policies in scope at all matters only to
            // the dry-run report.
            return (!report_none || in_scope()).then_some(Decision::Allow);
        }
        allow.sort_unstable();
        let allow: Vec<String> = allow.iter().map(|&at| policies[at as usize].id()).collect();
        Some(Decision::Deny {
            policy: String::new(),
            reason: format!(
                "no ALLOW policy matched (applicable ALLOW policies: {})",
                allow.join(", ")
            ),
        })
    }
}

impl PolicyIndex {
    pub fn new(policies: &[AuthzPolicy]) -> Self {
        let mut index = PolicyIndex::default();
        for (at, p) in policies.iter().enumerate() {
            let at = u32::try_from(at).expect("fewer than 2^32 policies");
            if p.dry_run {
                index.dry_run.add(at, p);
            } else {
                index.enforced.add(at, p);
            }
        }
        index
    }

    /// How many enforced policies a connection is checked against.
    #[cfg(test)]
    pub fn candidates(&self, root_namespace: &str, conn: &Conn<'_>) -> usize {
        self.enforced.candidates(root_namespace, conn).len()
    }

    /// The enforced decision on a connection (`policies` is the list the
    /// index was built from).
    pub fn authorize(
        &self,
        policies: &[AuthzPolicy],
        root_namespace: &str,
        conn: &Conn<'_>,
    ) -> Decision {
        self.enforced
            .decide(policies, root_namespace, conn, false)
            .unwrap_or(Decision::Allow)
    }

    /// What the dry-run policies in scope would decide on their own, by the
    /// same rules (None when there are none): reported, never enforced.
    pub fn dry_run(
        &self,
        policies: &[AuthzPolicy],
        root_namespace: &str,
        conn: &Conn<'_>,
    ) -> Option<Decision> {
        self.dry_run.decide(policies, root_namespace, conn, true)
    }
}

/// A waypoint's decision on a request (or a TCP connection) for the
/// Service `service` (None when it was addressed to a pod) through the
/// waypoint `gateway`; the second value names the AUDIT policies that
/// matched.
pub(super) fn authorize_waypoint(
    policies: &[AuthzPolicy],
    service: Option<(&str, &str)>,
    gateway: (&str, &str),
    attrs: &Attrs<'_>,
) -> (Decision, Vec<String>) {
    let in_scope = policies.iter().filter(|p| {
        !p.dry_run
            && p.targets.iter().any(|t| {
                let key = (t.namespace.as_str(), t.name.as_str());
                match t.kind.as_str() {
                    // A ServiceEntry's target names one of its hosts.
                    "Service" | "ServiceEntry" => service == Some(key),
                    _ => key == gateway,
                }
            })
    });
    evaluate(in_scope, attrs)
}

fn evaluate<'p>(
    in_scope: impl Iterator<Item = &'p AuthzPolicy>,
    conn: &Attrs<'_>,
) -> (Decision, Vec<String>) {
    let mut allow_policies = Vec::new();
    let mut allowed = false;
    let mut audited = Vec::new();
    for p in in_scope {
        let matched = p.rules.iter().any(|r| r.matches(conn));
        match p.action {
            Action::Deny if matched => {
                let policy = p.id();
                let deny = Decision::Deny {
                    reason: format!("denied by DENY policy {policy}"),
                    policy,
                };
                return (deny, audited);
            }
            Action::Allow => {
                allow_policies.push(p.id());
                allowed |= matched;
            }
            Action::Audit if matched => audited.push(p.id()),
            _ => {}
        }
    }
    if allowed || allow_policies.is_empty() {
        return (Decision::Allow, audited);
    }
    let deny = Decision::Deny {
        policy: String::new(),
        reason: format!(
            "no ALLOW policy matched (applicable ALLOW policies: {})",
            allow_policies.join(", ")
        ),
    };
    (deny, audited)
}

/// The node agent's policies and the waypoints' (attached with
/// `targetRefs`), each in namespace/name order; those that cannot be
/// enforced are left out with a warning.
pub(super) fn compile(
    objects: &Objects,
    services: &std::collections::HashMap<(String, String), Binding>,
    warnings: &mut Vec<ConfigWarning>,
) -> (Vec<AuthzPolicy>, Vec<AuthzPolicy>) {
    let (mut l4, mut l7) = (Vec::new(), Vec::new());
    for ((namespace, name), parsed) in &objects.authorization_policies {
        let Some(p) = compile_one(objects, services, namespace, name, &parsed.object, warnings)
        else {
            continue;
        };
        if p.targets.is_empty() {
            l4.push(p);
        } else {
            l7.push(p);
        }
    }
    (l4, l7)
}

fn compile_one(
    objects: &Objects,
    services: &std::collections::HashMap<(String, String), Binding>,
    namespace: &str,
    name: &str,
    policy: &AuthorizationPolicy,
    warnings: &mut Vec<ConfigWarning>,
) -> Option<AuthzPolicy> {
    let object = format!("AuthorizationPolicy {namespace}/{name}");
    let empty = PolicySpec::default();
    let spec = policy.spec.as_ref().unwrap_or(&empty);
    let targets: Vec<&Value> = spec
        .target_ref
        .iter()
        .filter(|v| !v.is_null())
        .chain(spec.target_refs.iter().flatten())
        .collect();
    // Attached to a Service or waypoint: a waypoint's to enforce, never
    // the node agent's. A target no waypoint serves says why.
    let mut applied = Vec::new();
    for target in &targets {
        match gateway::policy_target_status(objects, services, namespace, target) {
            Some((kind, message)) => warnings.push(ConfigWarning {
                object: object.clone(),
                kind,
                message,
            }),
            None => {
                let field = |k: &str| target.get(k).and_then(|v| v.as_str()).unwrap_or_default();
                let ns = Some(field("namespace"))
                    .filter(|n| !n.is_empty())
                    .unwrap_or(namespace);
                // A ServiceEntry stands for its hosts: the services the
                // store made of it.
                if field("kind") == "ServiceEntry" {
                    for host in super::service_entry::hosts_of(objects, ns, field("name"))
                        .into_iter()
                        .flatten()
                    {
                        applied.push(Target {
                            kind: "ServiceEntry".to_owned(),
                            namespace: ns.to_owned(),
                            name: host.clone(),
                        });
                    }
                    continue;
                }
                applied.push(Target {
                    kind: field("kind").to_owned(),
                    namespace: ns.to_owned(),
                    name: field("name").to_owned(),
                });
            }
        }
    }
    if !targets.is_empty() && applied.is_empty() {
        return None;
    }
    let at_waypoint = !applied.is_empty();
    let action = spec.action.unwrap_or_default();
    if action == Action::Custom || (action == Action::Audit && !at_waypoint) {
        let action = if action == Action::Audit {
            "AUDIT"
        } else {
            "CUSTOM"
        };
        let by = if at_waypoint {
            "this version"
        } else {
            "the node agent"
        };
        warnings.push(ConfigWarning {
            object: object.clone(),
            kind: "unsupported",
            message: format!("action {action} is not supported by {by}; this policy is ignored"),
        });
        return None;
    }

    let mut compiler = Compiler::new(object.clone(), namespace, warnings);
    compiler.deny = action == Action::Deny;
    let rules = spec
        .rules
        .iter()
        .flatten()
        .enumerate()
        .map(|(index, rule)| compile_rule(&mut compiler, index, rule, action, at_waypoint))
        .collect();
    Some(AuthzPolicy {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        action,
        selector: WorkloadSelector::labels(spec.selector.as_ref()),
        targets: applied,
        rules,
        dry_run: policy
            .metadata
            .annotations
            .get(DRY_RUN)
            .is_some_and(|v| v.eq_ignore_ascii_case("true")),
    })
}

fn compile_rule(
    c: &mut Compiler<'_>,
    index: usize,
    rule: &Rule,
    action: Action,
    at_waypoint: bool,
) -> CompiledRule {
    c.rule = index;
    // L7 fields are collected instead of compiled: for DENY that is exactly
    // "evaluated without them".
    let mut l7: Vec<String> = Vec::new();
    let mut note = |field: &str, values: bool| {
        if values && !l7.iter().any(|f| f == field) {
            l7.push(field.to_owned());
        }
    };

    let mut from = Vec::new();
    for entry in rule.from.iter().flatten() {
        let empty = SourceSpec::default();
        let s = entry.source.as_ref().unwrap_or(&empty);
        note("requestPrincipals", has(&s.request_principals));
        note("notRequestPrincipals", has(&s.not_request_principals));
        let mut checks = Vec::new();
        checks.extend(c.strings(Attr::Principal, &s.principals, false));
        checks.extend(c.strings(Attr::Principal, &s.not_principals, true));
        checks.extend(c.strings(Attr::Namespace, &s.namespaces, false));
        checks.extend(c.strings(Attr::Namespace, &s.not_namespaces, true));
        checks.extend(c.strings(Attr::ServiceAccount, &s.service_accounts, false));
        checks.extend(c.strings(Attr::ServiceAccount, &s.not_service_accounts, true));
        checks.extend(c.strings(Attr::SrcIp, &s.ip_blocks, false));
        checks.extend(c.strings(Attr::SrcIp, &s.not_ip_blocks, true));
        // The remote address is an HTTP attribute in Istio (the client
        // before any proxy, from X-Forwarded-For): at L4 it is not known,
        // as istiod tells ztunnel. A waypoint takes its downstream peer.
        if at_waypoint {
            checks.extend(c.strings(Attr::SrcIp, &s.remote_ip_blocks, false));
            checks.extend(c.strings(Attr::SrcIp, &s.not_remote_ip_blocks, true));
        } else {
            note("remoteIpBlocks", has(&s.remote_ip_blocks));
            note("notRemoteIpBlocks", has(&s.not_remote_ip_blocks));
        }
        from.push(checks);
    }

    let mut to = Vec::new();
    for entry in rule.to.iter().flatten() {
        let empty = Operation::default();
        let op = entry.operation.as_ref().unwrap_or(&empty);
        let mut checks = Vec::new();
        if at_waypoint {
            checks.extend(c.strings(Attr::Host, &op.hosts, false));
            checks.extend(c.strings(Attr::Host, &op.not_hosts, true));
            checks.extend(c.strings(Attr::Method, &op.methods, false));
            checks.extend(c.strings(Attr::Method, &op.not_methods, true));
            checks.extend(c.strings(Attr::Path, &op.paths, false));
            checks.extend(c.strings(Attr::Path, &op.not_paths, true));
        } else {
            note("hosts", has(&op.hosts));
            note("notHosts", has(&op.not_hosts));
            note("methods", has(&op.methods));
            note("notMethods", has(&op.not_methods));
            note("paths", has(&op.paths));
            note("notPaths", has(&op.not_paths));
        }
        checks.extend(c.scalars(Attr::DstPort, &op.ports, false));
        checks.extend(c.scalars(Attr::DstPort, &op.not_ports, true));
        to.push(checks);
    }

    let mut when = Vec::new();
    for cond in rule.when.iter().flatten() {
        let attr = match cond.key.as_str() {
            "source.ip" => Attr::SrcIp,
            "remote.ip" if at_waypoint => Attr::SrcIp,
            "source.namespace" => Attr::Namespace,
            "source.principal" => Attr::Principal,
            "destination.ip" => Attr::DstIp,
            "destination.port" => Attr::DstPort,
            key if at_waypoint && key.starts_with("request.headers[") && key.ends_with(']') => {
                let name = &key["request.headers[".len()..key.len() - 1];
                match hyper::http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                    Ok(h) => Attr::Header(h),
                    Err(_) => {
                        note(&format!("when {key}"), true);
                        continue;
                    }
                }
            }
            // request.auth.*, and anything else Istio knows: only a proxy
            // that parses the traffic (and JWTs) has it.
            key => {
                note(&format!("when {key}"), true);
                continue;
            }
        };
        when.extend(c.scalars(attr.clone(), &cond.values, false));
        when.extend(c.scalars(attr, &cond.not_values, true));
    }

    if !l7.is_empty() {
        let effect = match action {
            Action::Deny => {
                "this DENY rule is applied without them, so it denies more than written"
            }
            _ => "this ALLOW rule never matches",
        };
        if at_waypoint {
            c.warn(
                "unsupported",
                format!(
                    "rule {index} uses {}, which this waypoint does not read; {effect}",
                    l7.join(", ")
                ),
            );
        } else {
            c.warn(
                "l7_rule_at_l4",
                format!(
                    "rule {index} uses {}: L7 fields cannot be enforced by the node agent; \
                     {effect} (use a waypoint)",
                    l7.join(", ")
                ),
            );
        }
    }
    CompiledRule {
        from,
        to,
        when,
        never: action == Action::Allow && !l7.is_empty(),
    }
}

fn has<T>(values: &Option<Vec<T>>) -> bool {
    values.as_ref().is_some_and(|v| !v.is_empty())
}
