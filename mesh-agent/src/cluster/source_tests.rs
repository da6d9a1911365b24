//! The Kubernetes API source against the in-process API server stand-in,
//! through the real kube-rs client: the store converges after list, watch
//! events, bookmarks, a dropped connection, `410 Gone` and API errors; a
//! kind the server does not serve or RBAC forbids is reported and the rest
//! still loads; Events are written on objects the agent could not apply.

use std::{net::IpAddr, sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokio::sync::watch;

use super::{
    Resource, events,
    fake_api::{self, FakeApi},
    source::{KubeSource, ORIGIN},
};
use crate::state::{Conn, Decision, MtlsMode, Store, StoreOptions, spawn_source};

fn opts() -> StoreOptions {
    StoreOptions {
        redirection_annotation: true,
        ..StoreOptions::for_tests()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(name: &str, node: &str, pod_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"nodeName": node, "serviceAccountName": "web", "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}
    })
}

fn policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"}, "spec": spec
    })
}

/// Waits (bounded) for a snapshot that satisfies `ok`.
async fn until(rx: &mut watch::Receiver<Arc<Store>>, what: &str, ok: impl Fn(&Store) -> bool) {
    let converged = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| ok(s)))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(
        converged,
        "store did not converge: {what}; last snapshot: {:#}",
        rx.borrow().dump()
    );
}

/// Plaintext from 10.9.9.9 to the pod at `ip`, as authorization sees it.
fn allowed(s: &Store, pod_ip: &str) -> bool {
    let Some(dst) = s.workload_by_ip(ip(pod_ip)) else {
        return false;
    };
    s.authorize(&Conn {
        src_ip: ip("10.9.9.9"),
        src_identity: None,
        dst,
        dst_ip: ip(pod_ip),
        dst_port: 8080,
    }) == Decision::Allow
}

fn lists(fake: &FakeApi, plural: &str) -> usize {
    fake.requests()
        .iter()
        .filter(|r| {
            r.starts_with("GET ") && r.contains(&format!("/{plural}")) && !r.contains("watch=")
        })
        .count()
}

/// Service shop/web: VIP 10.96.0.10:80 to the `app: web` pods' 8080.
fn web_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    })
}

/// The endpoints (addresses) of the Service port at `vip`.
fn endpoints(s: &Store, vip: &str) -> Vec<String> {
    s.service_by_vip(vip.parse().unwrap())
        .map(|(svc, port)| {
            s.endpoints(svc, port)
                .iter()
                .map(|e| e.addr.to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn converges_through_watch_events_bookmarks_drops_410_and_api_errors() {
    let fake = fake_api::start().await;
    fake.apply(namespace("shop", true));
    fake.apply(pod("web-1", "node-a", "10.1.0.5"));
    let source = Box::new(KubeSource::new(fake.client()));
    let (mut rx, task) = spawn_source(source, opts());
    until(&mut rx, "initial list", |s| {
        s.generation > 0 && s.workload_by_ip(ip("10.1.0.5")).is_some_and(|w| w.captured)
    })
    .await;
    assert!(
        rx.borrow().warnings().is_empty(),
        "{:?}",
        rx.borrow().warnings()
    );

    // Watch events: add, change, delete.
    fake.apply(policy("deny-all", json!({"action": "DENY", "rules": [{}]})));
    until(&mut rx, "policy added", |s| !allowed(s, "10.1.0.5")).await;
    fake.apply(pod("web-1", "node-a", "10.1.0.6"));
    until(&mut rx, "pod changed", |s| {
        s.workload_by_ip(ip("10.1.0.6")).is_some() && s.workload_by_ip(ip("10.1.0.5")).is_none()
    })
    .await;
    fake.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        Some("shop"),
        "deny-all",
    );
    until(&mut rx, "policy deleted", |s| allowed(s, "10.1.0.6")).await;

    // A dropped connection: the watch resumes from where it was (after a
    // bookmark), nothing missed, no relist.
    let pod_lists = lists(&fake, "pods");
    fake.bookmark();
    fake.drop_watches();
    fake.apply(pod("web-2", "node-b", "10.2.0.7"));
    until(&mut rx, "pod added while the watch was down", |s| {
        s.workload_by_ip(ip("10.2.0.7")).is_some()
    })
    .await;
    assert_eq!(lists(&fake, "pods"), pod_lists, "resumed without a relist");

    // The API fails while the watches are down (they back off), objects
    // change and history is compacted meanwhile: each watch gets 410 Gone,
    // relists, and what was deleted in between is gone.
    fake.fail_next(8, 503);
    fake.drop_watches();
    fake.delete("v1", "Pod", Some("shop"), "web-2");
    fake.apply(namespace("shop", false));
    fake.compact();
    until(&mut rx, "relisted after API errors and 410", |s| {
        s.workload_by_ip(ip("10.2.0.7")).is_none()
            && s.workload_by_ip(ip("10.1.0.6"))
                .is_some_and(|w| !w.captured)
    })
    .await;
    assert!(
        lists(&fake, "pods") > pod_lists,
        "410 Gone led to a new list"
    );
    drop(rx);
    task.abort();
}

#[tokio::test]
async fn a_kind_the_server_does_not_serve_is_reported_and_the_rest_loads() {
    let fake = fake_api::start().await;
    fake.apply(pod("web-1", "node-a", "10.1.0.5"));
    let mut source = KubeSource::new(fake.client());
    source.resources.push(Resource::new(
        "example.com",
        "v1",
        "Widget",
        "widgets",
        true,
    ));
    let (mut rx, task) = spawn_source(Box::new(source), opts());
    until(&mut rx, "loaded without widgets", |s| {
        s.workload_by_ip(ip("10.1.0.5")).is_some()
    })
    .await;
    let store = rx.borrow().clone();
    let w = &store.warnings()[0];
    assert_eq!(
        (w.object.as_str(), w.kind),
        (&*format!("{ORIGIN}: widgets"), "load_error")
    );
    assert!(
        w.message.contains("example.com/v1/widgets"),
        "{}",
        w.message
    );
    task.abort();
}

#[tokio::test]
async fn objects_that_cannot_be_applied_get_an_event_and_fail_closed() {
    let fake = fake_api::start().await;
    fake.apply(pod("web-1", "node-a", "10.1.0.5"));
    let source = KubeSource::new(fake.client());
    let references = source.references();
    let (mut rx, task) = spawn_source(Box::new(source), opts());
    let writer = events::spawn(fake.client(), "node-a".into(), references, rx.clone());
    fake.apply(policy("typo", json!({"acton": "ALLOW"})));
    until(&mut rx, "typo'd policy", |s| !s.warnings().is_empty()).await;
    {
        let store = rx.borrow();
        let w = &store.warnings()[0];
        assert_eq!(
            (w.object.as_str(), w.kind),
            ("kubernetes: AuthorizationPolicy shop/typo", "unknown_field")
        );
        assert!(w.message.contains("acton"), "{}", w.message);
        assert!(
            !allowed(&store, "10.1.0.5"),
            "a policy that does not parse denies"
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let event = loop {
        let found = fake
            .objects("events.k8s.io/v1", "Event")
            .into_iter()
            .find(|e| e["regarding"]["name"] == "typo");
        if let Some(e) = found {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "no Event written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(event["regarding"]["kind"], "AuthorizationPolicy");
    assert_eq!(event["regarding"]["namespace"], "shop");
    assert!(event["regarding"]["uid"].is_string(), "{event}");
    assert_eq!(event["reason"], "UnknownField");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reportingController"], events::CONTROLLER);
    assert!(event["note"].as_str().unwrap().contains("acton"), "{event}");
    writer.abort();
    task.abort();
}

/// A policy kind the agent may not list is not an empty one: until it can
/// be read every connection to a meshed pod is denied and every workload is
/// STRICT, and the store says why; once read, its objects apply; forbidden
/// again later, its last objects stay.
#[tokio::test]
async fn a_policy_kind_that_cannot_be_listed_fails_closed_and_keeps_its_last_objects() {
    let fake = fake_api::start().await;
    fake.apply(namespace("shop", true));
    fake.apply(pod("web-1", "node-a", "10.1.0.5"));
    fake.apply(policy("deny-all", json!({"action": "DENY", "rules": [{}]})));
    fake.forbid("authorizationpolicies");
    fake.forbid("peerauthentications");
    let (mut rx, task) = spawn_source(Box::new(KubeSource::new(fake.client())), opts());
    until(&mut rx, "loaded", |s| {
        s.workload_by_ip(ip("10.1.0.5")).is_some()
    })
    .await;
    let strict = |s: &Store| {
        s.workload_by_ip(ip("10.1.0.5"))
            .is_some_and(|w| s.mtls_mode(w, 8080) == MtlsMode::Strict)
    };
    {
        let store = rx.borrow().clone();
        assert!(
            !allowed(&store, "10.1.0.5"),
            "AuthorizationPolicies that cannot be read deny: {:#}",
            store.dump()
        );
        assert!(
            strict(&store),
            "PeerAuthentications that cannot be read are STRICT"
        );
        let errors: Vec<(&str, &str)> = store
            .warnings()
            .iter()
            .filter(|w| w.kind == "load_error")
            .map(|w| (w.object.as_str(), w.message.as_str()))
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].0, format!("{ORIGIN}: authorizationpolicies"));
        assert!(errors[0].1.contains("RBAC"), "{}", errors[0].1);
        assert_eq!(errors[1].0, format!("{ORIGIN}: peerauthentications"));
    }

    // Granted: what is there applies (here an ALLOW beside the DENY, then
    // the DENY goes), the stand-ins and their warnings go.
    fake.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        Some("shop"),
        "deny-all",
    );
    fake.apply(policy(
        "deny-other",
        json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.7.0.0/16"]}}]}]}),
    ));
    fake.permit("authorizationpolicies");
    fake.permit("peerauthentications");
    until(&mut rx, "policies readable", |s| {
        allowed(s, "10.1.0.5") && !strict(s) && s.warnings().is_empty()
    })
    .await;

    // Forbidden again and relisted after 410 Gone: the last objects stay
    // while the rest of the configuration moves on.
    fake.apply(policy("deny-all", json!({"action": "DENY", "rules": [{}]})));
    until(&mut rx, "deny-all read", |s| !allowed(s, "10.1.0.5")).await;
    fake.forbid("authorizationpolicies");
    fake.drop_watches();
    fake.compact();
    fake.apply(pod("web-2", "node-b", "10.2.0.7"));
    until(&mut rx, "pods relisted", |s| {
        s.workload_by_ip(ip("10.2.0.7")).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !allowed(&rx.borrow(), "10.1.0.5"),
        "the last AuthorizationPolicies read still apply"
    );
    task.abort();
}

/// A kind that RBAC does not let the agent list (here HTTPRoute, not a
/// policy kind, so nothing stands in for it) is reported with the reason
/// and the rest of the configuration loads and applies.
#[tokio::test]
async fn a_kind_rbac_forbids_is_reported_and_the_rest_loads() {
    let fake = fake_api::start().await;
    fake.apply(namespace("shop", true));
    fake.apply(pod("web-1", "node-a", "10.1.0.5"));
    fake.forbid("httproutes");
    let (mut rx, task) = spawn_source(Box::new(KubeSource::new(fake.client())), opts());
    until(&mut rx, "loaded without HTTPRoutes", |s| {
        s.workload_by_ip(ip("10.1.0.5")).is_some()
    })
    .await;
    {
        let store = rx.borrow().clone();
        let warnings: Vec<(&str, &str, &str)> = store
            .warnings()
            .iter()
            .map(|w| (w.object.as_str(), w.kind, w.message.as_str()))
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(
            (warnings[0].0, warnings[0].1),
            (&*format!("{ORIGIN}: httproutes"), "load_error")
        );
        assert!(
            warnings[0]
                .2
                .contains("the agent is not allowed to list httproutes: check its RBAC"),
            "{}",
            warnings[0].2
        );
        assert!(
            allowed(&store, "10.1.0.5"),
            "a forbidden HTTPRoute kind denies nothing at L4"
        );
    }
    fake.permit("httproutes");
    until(&mut rx, "HTTPRoutes readable", |s| s.warnings().is_empty()).await;
    task.abort();
}

/// Warnings the README names get their Event: an ALLOW rule with L7 fields
/// on the policy (`L7RuleAtL4`), a Service bound to a waypoint that does
/// not exist on the Service (`MissingWaypoint`).
#[tokio::test]
async fn l7_rules_at_l4_and_missing_waypoints_get_their_events() {
    let fake = fake_api::start().await;
    fake.apply(namespace("shop", true));
    fake.apply(pod("web-1", "node-a", "10.1.0.5"));
    fake.apply(policy(
        "get-only",
        json!({"action": "ALLOW", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    ));
    fake.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "shop",
                     "labels": {"istio.io/use-waypoint": "nowhere"}},
        "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }));
    let source = KubeSource::new(fake.client());
    let references = source.references();
    let (mut rx, task) = spawn_source(Box::new(source), opts());
    let writer = events::spawn(fake.client(), "node-a".into(), references, rx.clone());
    until(&mut rx, "both warnings", |s| s.warnings().len() == 2).await;
    let event_on = |kind: &str, name: &str| {
        fake.objects("events.k8s.io/v1", "Event")
            .into_iter()
            .find(|e| e["regarding"]["kind"] == kind && e["regarding"]["name"] == name)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (policy_event, service_event) = loop {
        if let (Some(p), Some(s)) = (
            event_on("AuthorizationPolicy", "get-only"),
            event_on("Service", "reviews"),
        ) {
            break (p, s);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Events written: {:#?}",
            fake.objects("events.k8s.io/v1", "Event")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(policy_event["reason"], "L7RuleAtL4", "{policy_event}");
    assert_eq!(policy_event["type"], "Warning");
    assert_eq!(
        service_event["reason"], "MissingWaypoint",
        "{service_event}"
    );
    assert_eq!(service_event["regarding"]["namespace"], "shop");
    assert!(
        service_event["note"].as_str().unwrap().contains("nowhere"),
        "{service_event}"
    );
    writer.abort();
    task.abort();
}

/// From the API, a Service's endpoints are its EndpointSlices' (watched
/// like any kind: a slice's change reaches the store), not its selector's
/// pods; a ServiceEntry joins the store as a service named by its host.
#[tokio::test]
async fn endpoint_slices_and_service_entries_from_the_api() {
    let fake = fake_api::start().await;
    fake.apply(namespace("shop", true));
    fake.apply(pod("web-1", "node-a", "10.1.0.5"));
    fake.apply(web_service());
    fake.apply(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "ext", "namespace": "shop"},
        "spec": {"hosts": ["api.example.com"], "addresses": ["240.0.0.1"],
                 "resolution": "STATIC", "ports": [{"number": 443, "name": "tls"}],
                 "endpoints": [{"address": "192.0.2.1"}]}
    }));
    let opts = StoreOptions {
        endpoint_slices_only: true,
        ..opts()
    };
    let (mut rx, task) = spawn_source(Box::new(KubeSource::new(fake.client())), opts);
    until(&mut rx, "loaded", |s| {
        s.generation > 0 && s.workload_by_ip(ip("10.1.0.5")).is_some()
    })
    .await;
    assert!(
        endpoints(&rx.borrow(), "10.96.0.10:80").is_empty(),
        "no slice yet: no endpoints, whatever the selector"
    );
    assert_eq!(
        endpoints(&rx.borrow(), "240.0.0.1:443"),
        vec!["192.0.2.1:443"]
    );
    let slice = |ready: bool| {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-x1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": ready}}]
        })
    };
    fake.apply(slice(true));
    until(&mut rx, "slice added", |s| {
        endpoints(s, "10.96.0.10:80") == ["10.1.0.5:8080"]
    })
    .await;
    fake.apply(slice(false));
    until(&mut rx, "endpoint not ready", |s| {
        endpoints(s, "10.96.0.10:80").is_empty()
    })
    .await;
    assert!(
        rx.borrow().warnings().is_empty(),
        "{:?}",
        rx.borrow().warnings()
    );
    task.abort();
}

/// EndpointSlices that RBAC hides: a Service's endpoints come from its
/// selector meanwhile (reported), and from the slices once readable.
#[tokio::test]
async fn services_fall_back_to_their_selectors_while_endpoint_slices_are_forbidden() {
    let fake = fake_api::start().await;
    fake.apply(namespace("shop", true));
    fake.apply(pod("web-1", "node-a", "10.1.0.5"));
    fake.apply(web_service());
    fake.forbid("endpointslices");
    let opts = StoreOptions {
        endpoint_slices_only: true,
        ..opts()
    };
    let (mut rx, task) = spawn_source(Box::new(KubeSource::new(fake.client())), opts);
    let endpoints = |s: &Store| endpoints(s, "10.96.0.10:80");
    until(&mut rx, "the selector's endpoint", |s| {
        endpoints(s) == ["10.1.0.5:8080"]
    })
    .await;
    let warnings: Vec<String> = rx
        .borrow()
        .warnings()
        .iter()
        .map(|w| w.message.clone())
        .collect();
    assert!(
        warnings.iter().any(|w| w.contains(
            "not allowed to list endpointslices: check its RBAC; Services' endpoints are found by their selectors instead"
        )),
        "{warnings:?}"
    );
    fake.permit("endpointslices");
    until(&mut rx, "slices readable (none: no endpoints)", |s| {
        s.warnings().is_empty() && endpoints(s).is_empty()
    })
    .await;
    task.abort();
}
