//! AuthorizationPolicy at L4: scope, actions, every source/operation/when
//! field, Istio's edge cases, and the L7 rules the agent cannot enforce.

use super::{
    tests::{PODS, store, warning_list},
    *,
};

fn with(policies: &str) -> Store {
    store(&format!("{PODS}---\n{policies}"))
}

/// `dst` is `ns/name`; `from` is the peer's `ns/sa`, None for plaintext.
fn decide(s: &Store, dst: &str, from: Option<&str>, src_ip: &str, port: u16) -> Decision {
    let (ns, name) = dst.split_once('/').unwrap();
    let wl = s.workload(ns, name).unwrap();
    let id = from.map(|f| {
        let (ns, sa) = f.split_once('/').unwrap();
        Identity::new("cluster.local", ns, sa)
    });
    s.authorize(&Conn {
        src_ip: src_ip.parse().unwrap(),
        src_identity: id.as_ref(),
        dst: wl,
        dst_ip: wl.ips[0],
        dst_port: port,
    })
}

fn allowed(s: &Store, dst: &str, from: Option<&str>, src_ip: &str, port: u16) -> bool {
    decide(s, dst, from, src_ip, port) == Decision::Allow
}

fn policy(name_ns: &str, spec: &str) -> String {
    let (ns, name) = name_ns.split_once('/').unwrap();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )
}

fn no_allow(policies: &str) -> Decision {
    Decision::Deny {
        policy: String::new(),
        reason: format!("no ALLOW policy matched (applicable ALLOW policies: {policies})"),
    }
}

#[test]
fn no_policy_allows_everything() {
    let s = with("");
    assert!(allowed(&s, "shop/web", None, "10.9.9.9", 80));
}

#[test]
fn allow_by_principal_denies_the_rest() {
    let s = with(&policy(
        "shop/allow-fe",
        "  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]",
    ));
    assert!(allowed(
        &s,
        "shop/web",
        Some("shop/frontend"),
        "10.0.0.5",
        80
    ));
    assert_eq!(
        decide(&s, "shop/web", Some("shop/other"), "10.0.0.5", 80),
        no_allow("shop/allow-fe")
    );
    assert_eq!(
        decide(&s, "shop/web", None, "10.0.0.5", 80),
        no_allow("shop/allow-fe")
    );
    assert!(
        allowed(&s, "other/web", Some("shop/other"), "10.0.0.5", 80),
        "other namespace"
    );
}

#[test]
fn deny_is_checked_before_allow() {
    let policies = policy("shop/allow-all", "  rules: [{}]")
        + &policy(
            "shop/deny-other",
            "  action: DENY\n  rules: [{from: [{source: {namespaces: [other]}}]}]",
        );
    let s = with(&policies);
    assert_eq!(
        decide(&s, "shop/web", Some("other/x"), "10.0.1.10", 80),
        Decision::Deny {
            policy: "shop/deny-other".into(),
            reason: "denied by DENY policy shop/deny-other".into(),
        }
    );
    assert!(allowed(&s, "shop/web", Some("shop/x"), "10.0.0.11", 80));
}

#[test]
fn selector_and_scope() {
    let policies = policy("shop/db-only", "  selector: {matchLabels: {app: db}}")
        + &policy(
            "istio-system/web-everywhere",
            "  selector: {matchLabels: {app: web}}",
        )
        + &policy("other/elsewhere", "  action: DENY\n  rules: [{}]");
    let s = with(&policies);
    assert_eq!(
        decide(&s, "shop/db", None, "10.0.0.5", 80),
        no_allow("shop/db-only")
    );
    // The root namespace's selector reaches every namespace.
    assert_eq!(
        decide(&s, "shop/web", None, "10.0.0.5", 80),
        no_allow("istio-system/web-everywhere")
    );
    // other/elsewhere denies in `other` only (it is checked first there).
    assert_eq!(
        decide(&s, "other/web", None, "10.0.0.5", 80),
        Decision::Deny {
            policy: "other/elsewhere".into(),
            reason: "denied by DENY policy other/elsewhere".into(),
        }
    );
}

#[test]
fn empty_spec_denies_and_empty_rule_allows() {
    let s = with(&policy("shop/deny-all", "  {}"));
    assert_eq!(
        decide(&s, "shop/web", Some("shop/a"), "10.0.0.5", 80),
        no_allow("shop/deny-all")
    );

    let s = with(&(policy("shop/deny-all", "  {}") + &policy("shop/allow-all", "  rules: [{}]")));
    assert!(allowed(&s, "shop/web", None, "10.0.0.5", 80));

    let s = with(&policy("shop/deny-nothing", "  action: DENY"));
    assert!(
        allowed(&s, "shop/web", None, "10.0.0.5", 80),
        "DENY without rules"
    );
}

#[test]
fn namespace_patterns_and_not_forms() {
    let s = with(&policy(
        "shop/ns",
        "  rules:\n  - from: [{source: {namespaces: [\"team-*\", \"*-prod\"], notNamespaces: [team-x]}}]",
    ));
    assert!(allowed(&s, "shop/web", Some("team-a/sa"), "10.0.0.5", 80));
    assert!(allowed(
        &s,
        "shop/web",
        Some("shop-prod/sa"),
        "10.0.0.5",
        80
    ));
    assert!(!allowed(&s, "shop/web", Some("team-x/sa"), "10.0.0.5", 80));
    assert!(!allowed(&s, "shop/web", Some("shop/sa"), "10.0.0.5", 80));
    assert!(!allowed(&s, "shop/web", None, "10.0.0.5", 80));
}

#[test]
fn plaintext_fails_positive_and_passes_negative_identity_checks() {
    let s = with(&policy(
        "shop/mtls",
        "  rules: [{from: [{source: {principals: [\"*\"]}}]}]",
    ));
    assert!(allowed(&s, "shop/web", Some("any/sa"), "10.0.0.5", 80));
    assert!(!allowed(&s, "shop/web", None, "10.0.0.5", 80));

    let s = with(&policy(
        "shop/not-x",
        "  rules: [{from: [{source: {notPrincipals: [cluster.local/ns/shop/sa/x]}}]}]",
    ));
    assert!(allowed(&s, "shop/web", None, "10.0.0.5", 80));
    assert!(allowed(&s, "shop/web", Some("shop/y"), "10.0.0.5", 80));
    assert!(!allowed(&s, "shop/web", Some("shop/x"), "10.0.0.5", 80));

    let s = with(&policy(
        "shop/no-plaintext",
        "  action: DENY\n  rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]",
    ));
    assert!(!allowed(&s, "shop/web", None, "10.0.0.5", 80));
    assert!(allowed(&s, "shop/web", Some("shop/y"), "10.0.0.5", 80));
}

#[test]
fn service_accounts_and_source_fields_combine() {
    let s = with(&policy(
        "shop/sa",
        "  rules:\n  - from:\n    - source: {serviceAccounts: [shop/fe], ipBlocks: [10.0.0.0/24]}\n    \
         - source: {principals: [\"*/sa/admin\"]}",
    ));
    assert!(allowed(&s, "shop/web", Some("shop/fe"), "10.0.0.5", 80));
    assert!(
        !allowed(&s, "shop/web", Some("shop/fe"), "10.0.1.5", 80),
        "both fields must hold"
    );
    assert!(
        allowed(&s, "shop/web", Some("ops/admin"), "10.7.0.1", 80),
        "second entry"
    );
}

#[test]
fn ip_blocks() {
    let s = with(&policy(
        "shop/ips",
        "  rules:\n  - from: [{source: {ipBlocks: [10.0.0.0/16, 192.168.1.7], notIpBlocks: [10.0.5.0/24]}}]\n  \
         - from: [{source: {ipBlocks: [\"fd00::/8\"], notIpBlocks: [\"fd00::1\"]}}]",
    ));
    assert!(allowed(&s, "shop/web", None, "10.0.200.1", 80));
    assert!(
        allowed(&s, "shop/web", None, "::ffff:10.0.200.1", 80),
        "IPv4-mapped"
    );
    assert!(allowed(&s, "shop/web", None, "192.168.1.7", 80));
    assert!(!allowed(&s, "shop/web", None, "192.168.1.8", 80));
    assert!(!allowed(&s, "shop/web", None, "10.0.5.9", 80));
    assert!(!allowed(&s, "shop/web", None, "10.1.0.1", 80));
    assert!(allowed(&s, "shop/web", None, "fd00::2", 80));
    assert!(!allowed(&s, "shop/web", None, "fd00::1", 80));
}

#[test]
fn ipv4_mapped_blocks_are_ipv4_blocks() {
    let s = with(&policy(
        "shop/mapped",
        "  rules: [{from: [{source: {ipBlocks: [\"::ffff:10.0.0.0/104\"]}}]}]",
    ));
    assert!(allowed(&s, "shop/web", None, "10.200.0.1", 80));
    assert!(allowed(&s, "shop/web", None, "::ffff:10.200.0.1", 80));
    assert!(
        !allowed(&s, "shop/web", None, "11.0.0.1", 80),
        "outside 10/8"
    );
    assert!(!allowed(&s, "shop/web", None, "192.168.0.1", 80));
    // Shorter than /96 it spans more than the mapped range: an IPv6 block
    // as written, not an error.
    let s = with(&policy(
        "shop/wide",
        "  rules: [{from: [{source: {ipBlocks: [\"::ffff:0.0.0.0/95\"]}}]}]",
    ));
    assert_eq!(s.warnings(), &[]);
    assert!(allowed(&s, "shop/web", None, "::fffe:1:2", 80));
    assert!(!allowed(&s, "shop/web", None, "fd00::1", 80));
}

/// A policy that does not parse denies what it selects when its selector
/// can still be read, and nothing else.
#[test]
fn a_policy_that_does_not_parse_denies_what_its_selector_picks() {
    let s = with(&policy(
        "shop/typo",
        "  selector: {matchLabels: {app: db}}\n  \
         rules: [{from: [{source: {principal: [cluster.local/ns/shop/sa/a]}}]}]",
    ));
    assert_eq!(
        decide(&s, "shop/db", Some("shop/a"), "10.0.0.5", 80),
        Decision::Deny {
            policy: "shop/typo".into(),
            reason: "denied by DENY policy shop/typo".into(),
        }
    );
    assert!(allowed(&s, "shop/web", Some("shop/a"), "10.0.0.5", 80));
    assert!(
        s.warnings()[0].message.ends_with(
            "until it parses, the agent denies every connection to the workloads it selects"
        ),
        "{}",
        s.warnings()[0].message
    );
}

#[test]
fn ports_and_not_ports() {
    let s = with(&policy(
        "shop/ports",
        "  rules:\n  - to: [{operation: {ports: [\"8080\", 9090]}}]\n  \
         - to: [{operation: {notPorts: [\"1\", \"2\"]}}]\n    \
         from: [{source: {namespaces: [ops]}}]",
    ));
    assert!(allowed(&s, "shop/web", None, "10.0.0.5", 8080));
    assert!(
        allowed(&s, "shop/web", None, "10.0.0.5", 9090),
        "a port written as a number"
    );
    assert!(!allowed(&s, "shop/web", None, "10.0.0.5", 80));
    assert!(allowed(&s, "shop/web", Some("ops/a"), "10.0.0.5", 80));
    assert!(!allowed(&s, "shop/web", Some("ops/a"), "10.0.0.5", 2));
    assert_eq!(s.warnings(), &[]);
}

#[test]
fn when_conditions() {
    let s = with(&policy(
        "shop/when",
        "  rules:\n  - when:\n    - {key: source.ip, values: [10.0.0.0/24]}\n    \
         - {key: destination.port, values: [\"80\"], notValues: [\"81\"]}\n    \
         - {key: destination.ip, values: [10.0.0.10]}\n  \
         - when:\n    - {key: source.namespace, values: [ops]}\n    \
         - {key: source.principal, notValues: [\"*/sa/bad\"]}\n    \
         - {key: source.ip, notValues: [10.0.9.9]}",
    ));
    assert!(allowed(&s, "shop/web", None, "10.0.0.5", 80));
    assert!(!allowed(&s, "shop/web", None, "10.0.0.5", 81));
    assert!(!allowed(&s, "shop/web", None, "10.0.1.5", 80));
    assert!(
        !allowed(&s, "shop/db", None, "10.0.0.5", 80),
        "destination.ip"
    );
    assert!(allowed(&s, "shop/web", Some("ops/good"), "10.3.0.1", 443));
    assert!(!allowed(&s, "shop/web", Some("ops/bad"), "10.3.0.1", 443));
    assert!(!allowed(&s, "shop/web", Some("ops/good"), "10.0.9.9", 443));
    assert!(!allowed(&s, "shop/web", Some("dev/good"), "10.3.0.1", 443));
}

#[test]
fn l7_allow_rule_never_matches() {
    let s = with(&policy(
        "shop/l7",
        "  rules:\n  - to: [{operation: {methods: [GET], paths: [/api], ports: [\"80\"]}}]\n  \
         - from: [{source: {namespaces: [ops]}}]\n  \
         - when: [{key: \"request.headers[x-user]\", values: [me]}]",
    ));
    assert!(
        !allowed(&s, "shop/web", Some("shop/a"), "10.0.0.5", 80),
        "rule 0 never matches"
    );
    assert!(
        !allowed(&s, "shop/web", None, "10.0.0.5", 80),
        "nor does rule 2"
    );
    assert!(
        allowed(&s, "shop/web", Some("ops/a"), "10.0.0.5", 80),
        "rule 1 still does"
    );
    assert_eq!(
        s.warnings(),
        &[
            ConfigWarning {
                object: "AuthorizationPolicy shop/l7".into(),
                kind: "l7_rule_at_l4",
                message: "rule 0 uses methods, paths: L7 fields cannot be enforced by the node \
                          agent; this ALLOW rule never matches (use a waypoint)"
                    .into(),
            },
            ConfigWarning {
                object: "AuthorizationPolicy shop/l7".into(),
                kind: "l7_rule_at_l4",
                message: "rule 2 uses when request.headers[x-user]: L7 fields cannot be \
                          enforced by the node agent; this ALLOW rule never matches (use a \
                          waypoint)"
                    .into(),
            },
        ]
    );
}

#[test]
fn l7_deny_rule_applies_without_its_l7_parts() {
    let s = with(&policy(
        "shop/no-post",
        "  action: DENY\n  rules:\n  - from: [{source: {namespaces: [other], requestPrincipals: [\"*\"]}}]\n    \
         to: [{operation: {methods: [POST]}}]",
    ));
    assert_eq!(
        decide(&s, "shop/web", Some("other/a"), "10.0.0.5", 80),
        Decision::Deny {
            policy: "shop/no-post".into(),
            reason: "denied by DENY policy shop/no-post".into(),
        }
    );
    assert!(
        allowed(&s, "shop/web", Some("shop/a"), "10.0.0.5", 80),
        "L4 part still narrows"
    );
    assert_eq!(
        s.warnings()[0].message,
        "rule 0 uses requestPrincipals, methods: L7 fields cannot be enforced by the node agent; \
         this DENY rule is applied without them, so it denies more than written (use a waypoint)"
    );
}

#[test]
fn bad_values_fail_closed() {
    let s = with(&policy(
        "shop/bad",
        "  rules:\n  \
         - to: [{operation: {ports: [http, \"81\"]}}]\n    \
         from: [{source: {ipBlocks: [10.0.0.0/33]}}]\n  \
         - to: [{operation: {ports: [http]}}]",
    ));
    assert!(
        !allowed(&s, "shop/web", None, "10.0.0.5", 81),
        "an ALLOW condition whose only value is bad never holds"
    );
    let never = "a condition with a value that does not parse never holds \
                 (the ALLOW rule allows less than written)";
    let left_out =
        "values that do not parse are left out (the ALLOW rule allows less than written)";
    let messages: Vec<(&str, String)> = s
        .warnings()
        .iter()
        .map(|w| (w.kind, w.message.clone()))
        .collect();
    assert_eq!(
        messages,
        [
            (
                "parse_error",
                "rule 0: \"10.0.0.0/33\" is not an IP address or CIDR".to_owned()
            ),
            ("parse_error", format!("rule 0: {never}")),
            (
                "parse_error",
                "rule 0: port \"http\" is not a number".to_owned()
            ),
            ("parse_error", format!("rule 0: {left_out}")),
            (
                "parse_error",
                "rule 1: port \"http\" is not a number".to_owned()
            ),
            ("parse_error", format!("rule 1: {never}")),
        ]
    );

    // In a DENY rule the same mistake denies more, never less: a negated
    // condition with a bad value still holds.
    let s = with(&policy(
        "shop/bad-deny",
        "  action: DENY\n  rules:\n  - from: [{source: {notIpBlocks: [10.0.0.0/33]}}]",
    ));
    assert_eq!(
        decide(&s, "shop/web", Some("shop/a"), "10.9.9.9", 80),
        Decision::Deny {
            policy: "shop/bad-deny".into(),
            reason: "denied by DENY policy shop/bad-deny".into(),
        }
    );
}

#[test]
fn unsupported_policies_are_ignored_with_a_warning() {
    let policies = policy(
        "shop/waypoint",
        "  targetRefs: [{kind: Service, group: \"\", name: web}]",
    ) + &policy("shop/audit", "  action: AUDIT\n  rules: [{}]")
        + &policy(
            "shop/ext",
            "  action: CUSTOM\n  provider: {name: ext}\n  rules: [{}]",
        );
    let s = with(&policies);
    assert!(allowed(&s, "shop/web", None, "10.0.0.5", 80));
    let w = warning_list(&s);
    assert_eq!(
        w,
        [
            (
                "AuthorizationPolicy shop/audit",
                "unsupported",
                "action AUDIT is not supported by the node agent; this policy is ignored"
            ),
            (
                "AuthorizationPolicy shop/ext",
                "unsupported",
                "action CUSTOM is not supported by the node agent; this policy is ignored"
            ),
            (
                "AuthorizationPolicy shop/waypoint",
                "missing_waypoint",
                "Service shop/web does not exist; the policy is not applied"
            ),
        ]
    );
}

#[test]
fn v1beta1_and_dump() {
    let s = with(
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\n\
         metadata: {name: old, namespace: shop}\n\
         spec: {action: DENY, selector: {matchLabels: {app: db}}, rules: [{}, {}]}\n",
    );
    assert!(!allowed(&s, "shop/db", None, "10.0.0.5", 80));
    assert_eq!(
        s.dump()["authorization_policies"],
        serde_json::json!([{
            "namespace": "shop", "name": "old", "action": "DENY",
            "selector": {"app": "db"}, "rules": 2, "l7_allow_rules_never_matching": 0,
            "target_refs": [], "dry_run": false,
        }])
    );
}

/// As istiod converts policies for ztunnel: a value that does not parse is
/// dropped from its list where that only narrows what the policy grants,
/// and fixes the condition to the safe side where dropping it would widen
/// an ALLOW or narrow a DENY.
#[test]
fn bad_values_are_dropped_only_where_that_grants_less() {
    // ALLOW, positive list with a good value left: the bad one is dropped.
    let s = with(&policy(
        "shop/a",
        "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/24, not-an-ip]}}]}]",
    ));
    assert!(
        allowed(&s, "shop/web", None, "10.0.0.5", 80),
        "the good value still allows"
    );
    assert!(!allowed(&s, "shop/web", None, "10.0.1.5", 80));
    // ALLOW, negated list: dropping would allow more, so the rule never holds.
    let s = with(&policy(
        "shop/a",
        "  rules: [{from: [{source: {notIpBlocks: [10.0.0.0/24, not-an-ip]}}]}]",
    ));
    assert!(!allowed(&s, "shop/web", None, "10.0.1.5", 80));
    // DENY, positive list: dropping would deny less, so the rule denies all.
    let s = with(&policy(
        "shop/d",
        "  action: DENY\n  rules: [{from: [{source: {ipBlocks: [10.0.0.0/24, not-an-ip]}}]}]",
    ));
    assert!(
        !allowed(&s, "shop/web", None, "10.0.1.5", 80),
        "denies more"
    );
    // DENY, negated list: dropped, the good exception still holds.
    let s = with(&policy(
        "shop/d",
        "  action: DENY\n  rules: [{from: [{source: {notIpBlocks: [10.0.0.0/24, not-an-ip]}}]}]",
    ));
    assert!(
        allowed(&s, "shop/web", None, "10.0.0.5", 80),
        "the exception stands"
    );
    assert!(!allowed(&s, "shop/web", None, "10.0.1.5", 80));
}

/// `serviceAccounts` entries are exact, and a bare name is in the policy's
/// own namespace.
#[test]
fn a_bare_service_account_is_in_the_policys_namespace_and_exact() {
    let s = with(&policy(
        "shop/sa",
        "  rules: [{from: [{source: {serviceAccounts: [fe, \"ops/ad*\"]}}]}]",
    ));
    assert!(allowed(&s, "shop/web", Some("shop/fe"), "10.0.0.5", 80));
    assert!(
        !allowed(&s, "shop/web", Some("ops/fe"), "10.0.0.5", 80),
        "a bare name is the policy's namespace"
    );
    assert!(
        !allowed(&s, "shop/web", Some("ops/admin"), "10.0.0.5", 80),
        "no wildcards"
    );
    assert!(allowed(&s, "shop/web", Some("ops/ad*"), "10.0.0.5", 80));
}

/// The remote address (`remoteIpBlocks`, `when: remote.ip`) is an HTTP
/// attribute: the node agent cannot enforce it, and treats it like the
/// other L7 fields.
#[test]
fn remote_ip_is_an_l7_attribute_at_l4() {
    let s = with(&policy(
        "shop/remote",
        "  rules:\n  - from: [{source: {remoteIpBlocks: [10.0.0.0/8]}}]\n  \
         - when: [{key: remote.ip, values: [10.0.0.5]}]",
    ));
    assert!(
        !allowed(&s, "shop/web", None, "10.0.0.5", 80),
        "an ALLOW rule that needs the remote address never matches"
    );
    let kinds: Vec<&str> = s.warnings().iter().map(|w| w.kind).collect();
    assert_eq!(
        kinds,
        ["l7_rule_at_l4", "l7_rule_at_l4"],
        "{:?}",
        s.warnings()
    );
    let s = with(&policy(
        "shop/remote-deny",
        "  action: DENY\n  rules: [{from: [{source: {remoteIpBlocks: [10.9.0.0/16]}}]}]",
    ));
    assert!(
        !allowed(&s, "shop/web", None, "10.0.0.5", 80),
        "a DENY rule is applied without it: it denies more"
    );
}

/// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
#[test]
fn dry_run_policies_are_evaluated_but_not_enforced() {
    let p = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {name: try, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}\n\
             spec:\n  action: DENY\n  rules: [{from: [{source: {ipBlocks: [10.0.0.0/24]}}]}]\n---\n";
    let s = with(p);
    let wl = s.workload("shop", "web").unwrap();
    let conn = |ip: &str| Conn {
        src_ip: ip.parse().unwrap(),
        src_identity: None,
        dst: wl,
        dst_ip: wl.ips[0],
        dst_port: 80,
    };
    assert_eq!(
        s.authorize(&conn("10.0.0.5")),
        Decision::Allow,
        "not enforced"
    );
    assert_eq!(
        s.dry_run(&conn("10.0.0.5")),
        Some(Decision::Deny {
            policy: "shop/try".into(),
            reason: "denied by DENY policy shop/try".into(),
        }),
        "but it would deny"
    );
    assert_eq!(s.dry_run(&conn("10.0.1.5")), Some(Decision::Allow));
    let other = s.workload("other", "web").unwrap();
    assert_eq!(
        s.dry_run(&Conn {
            dst: other,
            ..conn("10.0.0.5")
        }),
        None,
        "no dry-run policy in scope"
    );
}
