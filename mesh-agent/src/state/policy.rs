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

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::Value;

use super::{
    ConfigWarning, Conn, Decision, Workload, gateway,
    matcher::{Attr, Attrs, Check, Compiler},
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
        (self.namespace == wl.namespace || self.namespace == root_namespace)
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
/// scope allows; else one of them must match.
pub(super) fn authorize(
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
/// same rules (None when there are none): reported, never enforced.
pub(super) fn dry_run(
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
                    "Service" => service == Some(key),
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
