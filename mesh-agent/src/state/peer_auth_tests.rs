//! PeerAuthentication precedence: workload selector (port-level first), then
//! namespace-wide, then mesh-wide; UNSET inherits; DISABLE is permissive.

use super::{
    tests::{PODS, store, warning_list},
    *,
};

fn peer_auth(ns_name: &str, spec: &str) -> String {
    let (ns, name) = ns_name.split_once('/').unwrap();
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n"
    )
}

/// A policy with a `creationTimestamp`, as the API server writes it.
fn created(ns_name: &str, at: &str, spec: &str) -> String {
    let (ns, name) = ns_name.split_once('/').unwrap();
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{at}\"}}\n\
         spec: {spec}\n---\n"
    )
}

fn with(policies: &[String]) -> Store {
    store(&format!("{PODS}---\n{}", policies.concat()))
}

fn mode(s: &Store, wl: &str, port: u16) -> MtlsMode {
    let (ns, name) = wl.split_once('/').unwrap();
    s.mtls_mode(s.workload(ns, name).unwrap(), port)
}

use MtlsMode::{Permissive, Strict};

#[test]
fn default_is_permissive() {
    let s = with(&[]);
    assert_eq!(mode(&s, "shop/web", 80), Permissive);
}

#[test]
fn namespace_overrides_mesh_and_selector_overrides_namespace() {
    let s = with(&[
        peer_auth("istio-system/mesh", "{mtls: {mode: STRICT}}"),
        peer_auth("shop/ns", "{mtls: {mode: PERMISSIVE}}"),
        peer_auth(
            "shop/db",
            "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}",
        ),
    ]);
    assert_eq!(mode(&s, "other/web", 80), Strict, "mesh-wide");
    assert_eq!(mode(&s, "shop/web", 80), Permissive, "namespace-wide");
    assert_eq!(mode(&s, "shop/db", 80), Strict, "workload selector");
    assert_eq!(s.warnings(), &[]);
}

#[test]
fn unset_inherits_and_disable_is_permissive() {
    let s = with(&[
        peer_auth("istio-system/mesh", "{mtls: {mode: STRICT}}"),
        peer_auth("shop/ns", "{mtls: {mode: UNSET}}"),
        peer_auth("shop/db", "{selector: {matchLabels: {app: db}}}"),
        peer_auth("other/ns", "{mtls: {mode: DISABLE}}"),
    ]);
    assert_eq!(
        mode(&s, "shop/web", 80),
        Strict,
        "UNSET namespace defers to the mesh"
    );
    assert_eq!(mode(&s, "shop/db", 80), Strict, "no mode at all defers too");
    assert_eq!(mode(&s, "other/web", 80), Permissive, "DISABLE");
}

#[test]
fn port_level_on_a_selector_policy() {
    let s = with(&[
        peer_auth("shop/ns", "{mtls: {mode: STRICT}}"),
        peer_auth(
            "shop/web",
            "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: PERMISSIVE}, \"9090\": {mode: UNSET}}}",
        ),
        peer_auth(
            "shop/db",
            "{selector: {matchLabels: {app: db}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {5432: {mode: STRICT}}}",
        ),
    ]);
    assert_eq!(mode(&s, "shop/web", 8080), Permissive, "port-level");
    assert_eq!(
        mode(&s, "shop/web", 9090),
        Strict,
        "port-level UNSET inherits"
    );
    assert_eq!(
        mode(&s, "shop/web", 80),
        Strict,
        "other ports inherit the namespace"
    );
    assert_eq!(mode(&s, "shop/db", 5432), Strict);
    assert_eq!(mode(&s, "shop/db", 80), Permissive);
}

#[test]
fn port_level_without_selector_and_conflicts_are_reported() {
    let s = with(&[
        peer_auth(
            "shop/a",
            "{mtls: {mode: STRICT}, portLevelMtls: {80: {mode: DISABLE}}}",
        ),
        peer_auth("shop/b", "{mtls: {mode: PERMISSIVE}}"),
    ]);
    assert_eq!(
        mode(&s, "shop/web", 80),
        Strict,
        "port-level ignored; first by name wins"
    );
    let w = warning_list(&s);
    assert_eq!(
        w,
        [
            (
                "PeerAuthentication shop/a",
                "unsupported",
                "portLevelMtls applies only to a policy with a selector; ignored"
            ),
            (
                "PeerAuthentication shop/b",
                "conflict",
                "namespace shop already has the older namespace-wide PeerAuthentication a; \
                 only the oldest is used, and this one is ignored"
            ),
        ]
    );
}

#[test]
fn typo_in_mode_is_a_parse_error_and_fails_closed() {
    let s = with(&[peer_auth("shop/typo", "{mtls: {mode: STRICTT}}")]);
    // Read as STRICT until it parses: a typo never lets plaintext in.
    assert_eq!(mode(&s, "shop/web", 80), Strict);
    let w = &s.warnings()[0];
    assert_eq!(
        (w.object.as_str(), w.kind),
        ("test.yaml: PeerAuthentication shop/typo", "parse_error")
    );
    assert!(
        w.message.contains("unknown variant `STRICTT`"),
        "{}",
        w.message
    );
}

#[test]
fn the_oldest_policy_of_a_scope_wins_not_the_first_by_name() {
    let s = with(&[
        created(
            "shop/a-new",
            "2026-03-01T00:00:00Z",
            "{mtls: {mode: STRICT}}",
        ),
        created(
            "shop/b-old",
            "2026-01-01T00:00:00Z",
            "{mtls: {mode: PERMISSIVE}}",
        ),
        created(
            "shop/db-a-new",
            "2026-03-01T00:00:00Z",
            "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}",
        ),
        created(
            "shop/db-b-old",
            "2026-01-01T00:00:00Z",
            "{selector: {matchLabels: {app: db}}, mtls: {mode: PERMISSIVE}}",
        ),
    ]);
    assert_eq!(mode(&s, "shop/web", 80), Permissive, "namespace-wide");
    assert_eq!(mode(&s, "shop/db", 80), Permissive, "workload selector");
    assert_eq!(
        warning_list(&s),
        [(
            "PeerAuthentication shop/a-new",
            "conflict",
            "namespace shop already has the older namespace-wide PeerAuthentication b-old; \
             only the oldest is used, and this one is ignored"
        )]
    );
}

#[test]
fn same_creation_time_falls_back_to_the_name() {
    let at = "2026-01-01T00:00:00Z";
    let s = with(&[
        created("shop/b", at, "{mtls: {mode: PERMISSIVE}}"),
        created("shop/a", at, "{mtls: {mode: STRICT}}"),
    ]);
    assert_eq!(mode(&s, "shop/web", 80), Strict);
    assert_eq!(warning_list(&s)[0].0, "PeerAuthentication shop/b");
}

#[test]
fn a_port_level_key_that_is_not_a_port_makes_the_policy_strict() {
    let s = with(&[
        peer_auth("shop/ns", "{mtls: {mode: PERMISSIVE}}"),
        peer_auth(
            "shop/web",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, \
             portLevelMtls: {http: {mode: DISABLE}, 8080: {mode: PERMISSIVE}}}",
        ),
    ]);
    // Which port "http" meant is unknown: every port of the workload is
    // STRICT, the ones named correctly too; other workloads are untouched.
    assert_eq!(mode(&s, "shop/web", 80), Strict);
    assert_eq!(mode(&s, "shop/web", 8080), Strict);
    assert_eq!(mode(&s, "shop/db", 80), Permissive);
    assert_eq!(
        warning_list(&s),
        [(
            "PeerAuthentication shop/web",
            "parse_error",
            "portLevelMtls: \"http\" is not a port number; every port of the workloads it \
             selects gets STRICT (plaintext refused)"
        )]
    );
}

/// Port 0 names no port a workload can listen on: read as a key that is
/// not a port, so the policy's workloads get STRICT.
#[test]
fn port_level_port_zero_makes_the_policy_strict() {
    let s = with(&[
        peer_auth("shop/ns", "{mtls: {mode: PERMISSIVE}}"),
        peer_auth(
            "shop/web",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, \
             portLevelMtls: {0: {mode: DISABLE}}}",
        ),
    ]);
    assert_eq!(mode(&s, "shop/web", 80), Strict);
    assert_eq!(mode(&s, "shop/db", 80), Permissive);
    assert_eq!(
        warning_list(&s),
        [(
            "PeerAuthentication shop/web",
            "parse_error",
            "portLevelMtls: \"0\" is not a port number; every port of the workloads it \
             selects gets STRICT (plaintext refused)"
        )]
    );
}

#[test]
fn the_config_dump_shows_each_policy_as_applied() {
    let s = with(&[peer_auth(
        "shop/web",
        "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, \
         portLevelMtls: {8080: {mode: STRICT}}}",
    )]);
    assert_eq!(
        s.dump()["peer_authentications"],
        serde_json::json!([{
            "namespace": "shop", "name": "web", "selector": {"app": "web"},
            "mode": "PERMISSIVE", "port_level": {"8080": "STRICT"},
            "unreadable_port_strict": false,
        }])
    );
}
