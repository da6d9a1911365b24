//! AuthorizationPolicy at a waypoint, where a slip would widen or narrow
//! access: how a policy attaches, a Host with and without its port, and
//! request fields met by traffic that is not HTTP.

use hyper::http::HeaderMap;

use super::{tests::store, waypoint_tests::BASE, *};

fn with(policy_name: &str, spec: &str) -> Store {
    store(&format!(
        "{BASE}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {policy_name}, namespace: shop}}\nspec:\n{spec}\n"
    ))
}

/// The warnings about policies (the base has one about a Service bound to
/// a missing waypoint).
fn policy_warnings(s: &Store) -> Vec<&ConfigWarning> {
    s.warnings()
        .iter()
        .filter(|w| w.object.contains("AuthorizationPolicy"))
        .collect()
}

/// The waypoint's decision for Service shop/web (10.96.0.1:80) from
/// `shop/front` on a request `(method, host)`, or with None on a TCP
/// connection.
fn at_waypoint(s: &Store, request: Option<(&str, &str)>) -> Decision {
    let web = s
        .service_by_vip("10.96.0.1:80".parse().unwrap())
        .unwrap()
        .0
        .clone();
    let wp = s.waypoint("shop", "wp").unwrap().clone();
    let front = Identity::new("cluster.local", "shop", "front");
    let headers = HeaderMap::new();
    let req = request.map(|(method, host)| L7Request {
        method,
        path: "/",
        host,
        headers: &headers,
    });
    let attrs = Attrs {
        src_ip: "10.0.0.9".parse().unwrap(),
        src_identity: Some(&front),
        dst_ip: "10.96.0.1".parse().unwrap(),
        dst_port: 80,
        request: req.as_ref(),
    };
    s.authorize_at_waypoint(&wp, Some(&web), &attrs).0
}

fn no_allow(policy: &str) -> Decision {
    Decision::Deny {
        policy: String::new(),
        reason: format!("no ALLOW policy matched (applicable ALLOW policies: shop/{policy})"),
    }
}

fn denied_by(policy: &str) -> Decision {
    Decision::Deny {
        policy: format!("shop/{policy}"),
        reason: format!("denied by DENY policy shop/{policy}"),
    }
}

/// `targetRef`, the older single form, attaches as `targetRefs` does: the
/// policy is the waypoint's, and the node agent does not apply it.
#[test]
fn a_single_target_ref_attaches_the_policy_to_the_waypoint() {
    let s = with(
        "get-only",
        "  targetRef: {kind: Service, group: '', name: web}\n  \
         rules: [{to: [{operation: {methods: [GET]}}]}]",
    );
    assert_eq!(policy_warnings(&s), Vec::<&ConfigWarning>::new());
    assert_eq!(at_waypoint(&s, Some(("GET", "web.shop"))), Decision::Allow);
    assert_eq!(
        at_waypoint(&s, Some(("POST", "web.shop"))),
        no_allow("get-only")
    );
    let web = s.workload("shop", "web-1").unwrap();
    let front = Identity::new("cluster.local", "shop", "front");
    let l4 = s.authorize(&Conn {
        src_ip: "10.0.0.9".parse().unwrap(),
        src_identity: Some(&front),
        dst: web,
        dst_ip: web.ips[0],
        dst_port: 8080,
    });
    assert_eq!(l4, Decision::Allow, "not the node agent's policy");
}

#[test]
fn a_host_matches_with_or_without_a_port_and_nothing_else_is_a_port() {
    let s = with(
        "exact-host",
        "  targetRefs: [{kind: Service, group: '', name: web}]\n  \
         rules: [{to: [{operation: {hosts: [web.shop]}}]}]",
    );
    assert_eq!(policy_warnings(&s), Vec::<&ConfigWarning>::new());
    assert_eq!(at_waypoint(&s, Some(("GET", "web.shop"))), Decision::Allow);
    assert_eq!(
        at_waypoint(&s, Some(("GET", "Web.Shop:8080"))),
        Decision::Allow,
        "the port is not part of the host"
    );
    // What follows the last colon is not a port, so the whole value is the
    // host, and that is not web.shop.
    assert_eq!(
        at_waypoint(&s, Some(("GET", "web.shop:evil"))),
        no_allow("exact-host")
    );
    assert_eq!(
        at_waypoint(&s, Some(("GET", "web.shop.evil"))),
        no_allow("exact-host")
    );
}

/// A DENY rule on request fields denies a TCP connection, whose request
/// nobody can read, and an ALLOW rule on them never allows one: both fail
/// closed, the negated fields too.
#[test]
fn request_fields_on_plain_tcp_fail_closed_also_when_negated() {
    let deny = |operation: &str| {
        with(
            "no-post",
            &format!(
                "  targetRefs: [{{kind: Service, group: '', name: web}}]\n  \
                 action: DENY\n  rules: [{{to: [{{operation: {operation}}}]}}]"
            ),
        )
    };
    let s = deny("{methods: [POST]}");
    assert_eq!(at_waypoint(&s, Some(("GET", "web.shop"))), Decision::Allow);
    assert_eq!(
        at_waypoint(&s, Some(("POST", "web.shop"))),
        denied_by("no-post")
    );
    assert_eq!(at_waypoint(&s, None), denied_by("no-post"), "TCP");
    let s = deny("{notHosts: [web.shop]}");
    assert_eq!(at_waypoint(&s, Some(("GET", "web.shop"))), Decision::Allow);
    assert_eq!(at_waypoint(&s, None), denied_by("no-post"), "TCP, negated");

    let s = with(
        "not-post",
        "  targetRefs: [{kind: Service, group: '', name: web}]\n  \
         rules: [{to: [{operation: {notMethods: [POST]}}]}]",
    );
    assert_eq!(at_waypoint(&s, Some(("GET", "web.shop"))), Decision::Allow);
    assert_eq!(
        at_waypoint(&s, Some(("POST", "web.shop"))),
        no_allow("not-post")
    );
    assert_eq!(at_waypoint(&s, None), no_allow("not-post"), "TCP");
}
