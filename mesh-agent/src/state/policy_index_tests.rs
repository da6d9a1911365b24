//! The policy index decides as checking every policy in scope does: the
//! same decisions (and the same deciding policy and reason) on randomized
//! sets of policies and connections, and a connection is checked only
//! against the policies that can match it.

use super::{
    tests::{PODS, store},
    *,
};

/// A small deterministic generator (xorshift64*): the same cases every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }

    /// One to three of `from`, as a YAML flow list.
    fn list(&mut self, from: &[&str]) -> String {
        let n = 1 + self.below(3);
        let items: Vec<String> = (0..n).map(|_| format!("'{}'", self.pick(from))).collect();
        format!("[{}]", items.join(", "))
    }
}

const NAMESPACES: &[&str] = &["shop", "other", "istio-system", "shop"];
const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/shop/sa/frontend",
    "cluster.local/ns/other/sa/default",
    "cluster.local/ns/shop/*",
    "*",
    "cluster.local/ns/nowhere/sa/x",
];
const SOURCE_NAMESPACES: &[&str] = &["shop", "other", "nowhere", "sh*", "*"];
const SERVICE_ACCOUNTS: &[&str] = &["frontend", "other/default", "shop/frontend", "nobody"];
const PORTS: &[&str] = &["80", "8080", "9090", "not-a-port"];
const BLOCKS: &[&str] = &["10.0.0.0/8", "192.168.0.1", "10.9.9.9/32"];

fn source(r: &mut Rng) -> String {
    let field = r.pick(&[
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "serviceAccounts",
        "notServiceAccounts",
        "ipBlocks",
        "notIpBlocks",
    ]);
    let values = match field {
        "principals" | "notPrincipals" => r.list(PRINCIPALS),
        "namespaces" | "notNamespaces" => r.list(SOURCE_NAMESPACES),
        "serviceAccounts" | "notServiceAccounts" => r.list(SERVICE_ACCOUNTS),
        _ => r.list(BLOCKS),
    };
    let mut entry = format!("{field}: {values}");
    if r.below(3) == 0 && field != "namespaces" {
        entry.push_str(&format!(", namespaces: {}", r.list(SOURCE_NAMESPACES)));
    }
    format!("{{source: {{{entry}}}}}")
}

fn rule(r: &mut Rng) -> String {
    let mut parts = Vec::new();
    if r.below(4) != 0 {
        let n = 1 + r.below(2);
        let from: Vec<String> = (0..n).map(|_| source(r)).collect();
        parts.push(format!("from: [{}]", from.join(", ")));
    }
    if r.below(3) == 0 {
        let field = r.pick(&["ports", "notPorts", "methods"]);
        let values = match field {
            "methods" => "[GET]".to_owned(),
            _ => r.list(PORTS),
        };
        parts.push(format!("to: [{{operation: {{{field}: {values}}}}}]"));
    }
    if r.below(4) == 0 {
        let (key, values) = match r.below(3) {
            0 => ("source.namespace", r.list(SOURCE_NAMESPACES)),
            1 => ("source.principal", r.list(PRINCIPALS)),
            _ => ("destination.port", r.list(PORTS)),
        };
        let not = if r.below(3) == 0 {
            "notValues"
        } else {
            "values"
        };
        parts.push(format!("when: [{{key: {key}, {not}: {values}}}]"));
    }
    format!("{{{}}}", parts.join(", "))
}

fn policies(r: &mut Rng, count: usize) -> String {
    let mut out = String::new();
    for i in 0..count {
        let ns = r.pick(NAMESPACES);
        let action = r.pick(&["ALLOW", "DENY", "DENY"]);
        let dry = if r.below(5) == 0 {
            "annotations: {istio.io/dry-run: \"true\"}, "
        } else {
            ""
        };
        let selector = match r.below(4) {
            0 => "  selector: {matchLabels: {app: web}}\n",
            1 => "  selector: {matchLabels: {app: db}}\n",
            _ => "",
        };
        let rules: Vec<String> = (0..r.below(3)).map(|_| rule(r)).collect();
        out.push_str(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: p{i:03}, namespace: {ns}, {dry}}}\nspec:\n{selector}\
             \x20 action: {action}\n  rules: [{}]\n---\n",
            rules.join(", ")
        ));
    }
    out
}

/// Every destination and peer the policies above can tell apart.
fn check_all(s: &Store, case: &str) -> usize {
    let ids: Vec<Option<Identity>> = [
        None,
        Some(("shop", "frontend")),
        Some(("other", "default")),
        Some(("shop", "db")),
        Some(("nowhere", "x")),
    ]
    .into_iter()
    .map(|id| id.map(|(ns, sa)| Identity::new("cluster.local", ns, sa)))
    .collect();
    let mut denied = 0;
    for (ns, name) in [("shop", "web"), ("shop", "db"), ("other", "web")] {
        let wl = s.workload(ns, name).unwrap();
        for id in &ids {
            for src_ip in ["10.9.9.9", "192.168.0.1", "172.16.0.1"] {
                for port in [80, 8080, 9090] {
                    let conn = Conn {
                        src_ip: src_ip.parse().unwrap(),
                        src_identity: id.as_ref(),
                        dst: wl,
                        dst_ip: wl.ips[0],
                        dst_port: port,
                    };
                    let root = &s.root_namespace;
                    let linear = policy::authorize_linear(&s.policies, root, &conn);
                    assert_eq!(s.authorize(&conn), linear, "{case}: {conn:?}");
                    let linear = policy::dry_run_linear(&s.policies, root, &conn);
                    assert_eq!(s.dry_run(&conn), linear, "{case}: dry run, {conn:?}");
                    denied += usize::from(linear.is_some_and(|d| d != Decision::Allow));
                }
            }
        }
    }
    denied
}

#[test]
fn index_decides_as_checking_every_policy() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut allowed, mut denied) = (0, 0);
    for case in 0..300 {
        let count = 1 + r.below(12);
        let yaml = policies(&mut r, count);
        let s = store(&format!("{PODS}---\n{yaml}"));
        assert_eq!(s.policies.len(), count, "case {case}: {:?}", s.warnings());
        denied += check_all(&s, &format!("case {case}:\n{yaml}"));
        // How many decisions went each way: the cases must exercise both.
        for (ns, name) in [("shop", "web"), ("other", "web")] {
            let wl = s.workload(ns, name).unwrap();
            let conn = Conn {
                src_ip: "10.9.9.9".parse().unwrap(),
                src_identity: None,
                dst: wl,
                dst_ip: wl.ips[0],
                dst_port: 80,
            };
            if s.authorize(&conn) == Decision::Allow {
                allowed += 1;
            }
        }
    }
    assert!(
        allowed > 50 && denied > 50,
        "allowed {allowed}, denied {denied}"
    );
}

/// Many DENY policies that name other peers: a connection is checked
/// against none of them (they are filed under principals, namespaces and
/// ports it does not have), and one that names the peer still denies.
#[test]
fn unrelated_policies_are_not_candidates() {
    let mut yaml = String::new();
    for i in 0..2000 {
        let source = match i % 4 {
            0 => format!("principals: [cluster.local/ns/shop/sa/client-{i}]"),
            1 => format!("namespaces: [team-{i}]"),
            2 => format!("serviceAccounts: [sa-{i}]"),
            _ => format!("principals: [cluster.local/ns/x/sa/{i}], namespaces: [x]"),
        };
        yaml.push_str(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: deny-{i:05}, namespace: shop}}\nspec:\n  action: DENY\n\
             \x20 rules: [{{from: [{{source: {{{source}}}}}]}}]\n---\n"
        ));
    }
    yaml.push_str(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: deny-ports, namespace: shop}\nspec:\n  action: DENY\n\
         \x20 rules: [{to: [{operation: {ports: ['9999']}}]}]\n",
    );
    let s = store(&format!("{PODS}---\n{yaml}"));
    assert_eq!(s.policies.len(), 2001);
    let wl = s.workload("shop", "web").unwrap();
    let id = |sa: &str| Identity::new("cluster.local", "shop", sa);
    fn conn<'a>(wl: &'a Workload, id: &'a Identity, port: u16) -> Conn<'a> {
        Conn {
            src_ip: "10.9.9.9".parse().unwrap(),
            src_identity: Some(id),
            dst: wl,
            dst_ip: wl.ips[0],
            dst_port: port,
        }
    }
    let frontend = id("frontend");
    assert_eq!(
        s.policy_index
            .candidates(&s.root_namespace, &conn(wl, &frontend, 80)),
        0
    );
    assert_eq!(s.authorize(&conn(wl, &frontend, 80)), Decision::Allow);

    let named = id("client-1000");
    assert_eq!(
        s.policy_index
            .candidates(&s.root_namespace, &conn(wl, &named, 80)),
        1
    );
    assert_eq!(
        s.authorize(&conn(wl, &named, 80)),
        Decision::Deny {
            policy: "shop/deny-01000".into(),
            reason: "denied by DENY policy shop/deny-01000".into(),
        }
    );
    let by_sa = id("sa-1002");
    assert!(
        matches!(s.authorize(&conn(wl, &by_sa, 80)), Decision::Deny { policy, .. } if policy == "shop/deny-01002")
    );
    assert!(
        matches!(s.authorize(&conn(wl, &frontend, 9999)), Decision::Deny { policy, .. } if policy == "shop/deny-ports")
    );
}
