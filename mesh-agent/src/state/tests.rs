//! Parsing Kubernetes objects into workloads and services, and warnings for
//! bad input.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use super::*;

pub(super) fn opts() -> StoreOptions {
    StoreOptions::for_tests()
}

pub(super) fn store(yaml: &str) -> Store {
    Store::from_yaml(&[("test.yaml".into(), yaml.into())], &opts())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web, version: v2}
spec:
  serviceAccountName: web
  nodeName: node-a
  containers:
  - name: app
    ports:
    - {name: http, containerPort: 8080}
    - {containerPort: 9090}
status:
  phase: Running
  podIP: 10.0.0.10
  podIPs: [{ip: 10.0.0.10}, {ip: "fd00::10"}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web-2
  namespace: shop
  labels: {app: web, istio.io/dataplane-mode: none}
spec:
  containers:
  - name: app
    ports: [{name: http, containerPort: 8081}]
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-old
  namespace: shop
  labels: {app: web}
spec: {containers: [{name: app}]}
status: {phase: Succeeded, podIP: 10.0.0.12}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-noport
  namespace: shop
  labels: {app: web}
spec: {containers: [{name: app}]}
status: {podIP: 10.0.0.13}
---
apiVersion: v1
kind: Pod
metadata:
  name: pending
  namespace: shop
  labels: {app: web}
spec: {containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: lone
  labels:
    app.kubernetes.io/name: lonely
    app.kubernetes.io/version: "1.2"
    istio.io/dataplane-mode: ambient
spec: {containers: [{name: app}]}
status: {podIP: 10.0.9.1}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: other}
spec: {containers: [{name: app}]}
status: {podIP: 10.0.9.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: admin, port: 9090}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec:
  clusterIP: None
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 443}]
"#;

/// The warnings of a snapshot as (object, kind, message), for exact asserts.
pub(super) fn warning_list(s: &Store) -> Vec<(&str, &str, &str)> {
    s.warnings()
        .iter()
        .map(|w| (w.object.as_str(), w.kind, w.message.as_str()))
        .collect()
}

/// `web` and `db` in shop, `web` in other: the pods the policy tests use.
pub(super) const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: other, labels: {app: web}}
status: {podIP: 10.0.1.10}
"#;

#[test]
fn pods_become_workloads() {
    let s = store(OBJECTS);
    assert_eq!(s.warnings(), &[]);
    let web = s.workload("shop", "web-1").unwrap();
    assert_eq!(
        **web,
        Workload {
            service_account: "web".into(),
            node: "node-a".into(),
            ips: vec![ip("10.0.0.10"), ip("fd00::10")],
            labels: BTreeMap::from([
                ("app".into(), "web".into()),
                ("version".into(), "v2".into()),
            ])
            .into(),
            ports: BTreeMap::from([("http".into(), 8080)]).into(),
            ..Workload::for_tests("shop", "web-1")
        }
    );
    assert_eq!(
        (web.workload_name(), web.app(), web.version()),
        ("web-1", "web", "v2")
    );

    let lone = s.workload("default", "lone").unwrap();
    assert_eq!(&*lone.service_account, "default");
    assert_eq!(&*lone.node, "");
    assert_eq!((lone.app(), lone.version()), ("lonely", "1.2"));
    let plain = s.workload("other", "plain").unwrap();
    assert_eq!((plain.app(), plain.version()), ("plain", "latest"));

    assert_eq!(
        s.workload("shop", "pending").unwrap().ips,
        Vec::<IpAddr>::new()
    );
    assert!(
        s.workload("shop", "web-old").is_none(),
        "Succeeded pods are gone"
    );
    assert!(s.workload_by_ip(ip("10.0.0.12")).is_none());
    assert_eq!(s.workload_by_ip(ip("fd00::10")).unwrap().name, "web-1");
    assert_eq!(
        s.workload_by_ip(ip("::ffff:10.0.0.11")).unwrap().name,
        "web-2"
    );
}

const REDIRECTION: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata:
  name: captured
  namespace: shop
  annotations: {ambient.istio.io/redirection: enabled}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: labelled-only, namespace: shop}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: by-istio-cni
  namespace: elsewhere
  annotations: {ambient.istio.io/redirection: enabled}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata:
  name: disabled
  namespace: shop
  annotations: {ambient.istio.io/redirection: disabled}
status: {podIP: 10.0.0.4}
---
apiVersion: v1
kind: Pod
metadata:
  name: sidecar
  namespace: shop
  annotations: {sidecar.istio.io/status: '{"containers":["istio-proxy"]}'}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Pod
metadata:
  name: mesh-agent-x7k2p
  namespace: shop
  labels: {app.kubernetes.io/name: mesh-agent}
status: {podIP: 10.0.0.6}
---
apiVersion: v1
kind: Pod
metadata:
  name: mesh-ca-5d9f-abcde
  namespace: shop
  labels: {app.kubernetes.io/name: mesh-ca}
status: {podIP: 10.0.0.7}
"#;

/// From the API, a pod is reached over HBONE once it carries istio-cni's
/// redirection annotation (enabled), whoever captured it, and only then;
/// from a local configuration, its labels suffice too. Sidecar pods and
/// the agent's own are never captured.
#[test]
fn hbone_follows_the_redirection_annotation_from_the_api_and_the_labels_locally() {
    let cluster = Store::from_yaml(
        &[("api".into(), REDIRECTION.into())],
        &StoreOptions {
            redirection_annotation: true,
            ..opts()
        },
    );
    let local = store(REDIRECTION);
    let hbone = |s: &Store, name| s.workload_by_ip(ip(name)).unwrap().hbone;
    let captured = |s: &Store, name| s.workload_by_ip(ip(name)).unwrap().captured;
    // (address, over HBONE from the API, over HBONE locally, captured)
    for (addr, api, locally, enrolled) in [
        ("10.0.0.1", true, true, true),
        ("10.0.0.2", false, true, true),
        ("10.0.0.3", true, true, false),
        ("10.0.0.4", false, true, true),
        ("10.0.0.5", false, false, false),
        ("10.0.0.6", false, false, false),
        ("10.0.0.7", false, false, false),
    ] {
        assert_eq!(hbone(&cluster, addr), api, "{addr} from the API");
        assert_eq!(hbone(&local, addr), locally, "{addr} locally");
        for s in [&cluster, &local] {
            assert_eq!(captured(s, addr), enrolled, "{addr} captured");
        }
    }
}

#[test]
fn captured_follows_pod_then_namespace_label() {
    let s = store(OBJECTS);
    let captured = |ns, name| s.workload(ns, name).unwrap().captured;
    assert!(captured("shop", "web-1"), "namespace ambient");
    assert!(!captured("shop", "web-2"), "pod opts out with none");
    assert!(
        captured("default", "lone"),
        "pod opts in, no namespace object"
    );
    assert!(!captured("other", "plain"), "no label anywhere");

    let host = store(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: h, labels: {istio.io/dataplane-mode: ambient}}\n\
         spec: {hostNetwork: true, containers: []}\nstatus: {podIP: 192.168.1.5}\n",
    );
    assert!(!host.workload("default", "h").unwrap().captured);
    assert!(
        host.workload_by_ip(ip("192.168.1.5")).is_none(),
        "the node's address"
    );
}

#[test]
fn services_and_vip_lookup() {
    let s = store(OBJECTS);
    let (svc, port) = s.service_by_vip(addr("10.96.0.10:80")).unwrap();
    assert_eq!(svc.hostname(), "web.shop.svc.cluster.local");
    assert_eq!(svc.vips, vec![ip("10.96.0.10"), ip("fd00:96::10")]);
    assert_eq!(
        svc.ports,
        vec![
            ServicePort {
                name: "http".into(),
                port: 80,
                target_port: TargetPort::Name("http".into()),
                app_protocol: None,
            },
            ServicePort {
                name: "admin".into(),
                port: 9090,
                target_port: TargetPort::Number(9090),
                app_protocol: None,
            },
        ],
        "UDP is left out; a missing targetPort is the port"
    );
    assert_eq!(port.port, 80);
    assert_eq!(
        s.service_by_vip(addr("[fd00:96::10]:9090")).unwrap().1.name,
        "admin"
    );
    assert!(s.service_by_vip(addr("10.96.0.10:81")).is_none());
    assert!(s.service_by_vip(addr("10.96.0.99:80")).is_none());
    assert!(s.service_by_vip(addr("10.96.0.10:53")).is_none());
}

#[test]
fn endpoints_resolve_named_ports() {
    let s = store(OBJECTS);
    let (svc, http) = s.service_by_vip(addr("10.96.0.10:80")).unwrap();
    let eps: Vec<(String, SocketAddr)> = s
        .endpoints(svc, http)
        .into_iter()
        .map(|e| (e.workload.unwrap().name.clone(), e.addr))
        .collect();
    // web-noport has no `http` port, pending has no IP, web-old has ended.
    assert_eq!(
        eps,
        vec![
            ("web-1".into(), addr("10.0.0.10:8080")),
            ("web-2".into(), addr("10.0.0.11:8081")),
        ]
    );
    let admin = &svc.ports[1];
    let addrs: Vec<SocketAddr> = s.endpoints(svc, admin).iter().map(|e| e.addr).collect();
    assert_eq!(
        addrs,
        vec![
            addr("10.0.0.10:9090"),
            addr("10.0.0.11:9090"),
            addr("10.0.0.13:9090")
        ]
    );

    // An IPv6-first service picks each pod's IPv6 address when it has one.
    let mut v6 = (**svc).clone();
    v6.vips.reverse();
    let addrs: Vec<SocketAddr> = s.endpoints(&v6, admin).iter().map(|e| e.addr).collect();
    assert_eq!(addrs[0], addr("[fd00::10]:9090"));
    assert_eq!(addrs[1], addr("10.0.0.11:9090"));

    let (external, port) = s.service_by_vip(addr("10.96.0.11:443")).unwrap();
    assert!(
        s.endpoints(external, port).is_empty(),
        "no selector, no endpoints"
    );
}

#[test]
fn list_duplicates_and_unsupported_kinds() {
    let yaml = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a}
  status: {podIP: 10.1.0.1}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: d, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: a}
status: {podIP: 10.1.0.2}
"#;
    let s = store(yaml);
    assert_eq!(
        s.workload("default", "a").unwrap().ips,
        vec![ip("10.1.0.2")]
    );
    assert_eq!(
        s.warnings(),
        &[
            ConfigWarning {
                object: "test.yaml: Deployment shop/d".into(),
                kind: "unsupported",
                message: "apps/v1 Deployment is not a kind the node agent reads; ignored".into(),
            },
            ConfigWarning {
                object: "Pod default/a".into(),
                kind: "duplicate",
                message: "defined again in test.yaml (first in test.yaml); the later \
                          definition is used"
                    .into(),
            },
        ]
    );
}

/// A pod defined three times over two files, between others: the last
/// definition is used, each later one is warned about naming the one it
/// replaced, and the pods stay in namespace/name order.
#[test]
fn a_pod_defined_three_times_keeps_the_last() {
    let pod = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nstatus: {{podIP: {ip}}}\n---\n"
        )
    };
    let a = [pod("b", "10.1.0.1"), pod("c", "10.1.0.9")].concat();
    let b = [
        pod("b", "10.1.0.2"),
        pod("a", "10.1.0.8"),
        pod("b", "10.1.0.3"),
    ]
    .concat();
    let s = Store::from_yaml(&[("a.yaml".into(), a), ("b.yaml".into(), b)], &opts());
    assert_eq!(
        s.workload("default", "b").unwrap().ips,
        vec![ip("10.1.0.3")]
    );
    let names: Vec<&str> = s.workloads().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let again = |origin: &str, first: &str| ConfigWarning {
        object: "Pod default/b".into(),
        kind: "duplicate",
        message: format!(
            "defined again in {origin} (first in {first}); the later definition is used"
        ),
    };
    assert_eq!(
        s.warnings(),
        &[again("b.yaml", "a.yaml"), again("b.yaml", "b.yaml")]
    );
}

#[test]
fn unknown_field_names_the_object_and_the_rest_loads() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: shop}
spec:
  rules:
  - from:
    - source: {principal: ["cluster.local/ns/shop/sa/web"]}
---
apiVersion: v1
kind: Pod
metadata: {name: still-here, namespace: shop}
status: {podIP: 10.2.0.1}
"#;
    let s = store(yaml);
    assert!(s.workload("shop", "still-here").is_some());
    assert_eq!(s.warnings().len(), 1);
    let w = &s.warnings()[0];
    assert_eq!(w.kind, "unknown_field");
    assert_eq!(w.object, "test.yaml: AuthorizationPolicy shop/typo");
    assert!(
        w.message
            .starts_with("spec.rules[0].from[0].source: unknown field `principal`"),
        "{}",
        w.message
    );
    assert!(w.message.contains("line 8"), "{}", w.message);
    assert!(
        w.message.ends_with(
            "until it parses, the agent denies every connection to every workload of its namespace"
        ),
        "{}",
        w.message
    );
    // It stands as a DENY of everything in its namespace, never as nothing.
    let dump = &s.dump()["authorization_policies"][0];
    assert_eq!(
        (&dump["name"], &dump["action"]),
        (&"typo".into(), &"DENY".into())
    );
    let web = Workload {
        service_account: "web".into(),
        ..Workload::for_tests("shop", "web")
    };
    let id = crate::identity::Identity::new("cluster.local", "shop", "web");
    let conn = Conn {
        src_ip: "10.2.0.9".parse().unwrap(),
        src_identity: Some(&id),
        dst: &web,
        dst_ip: "10.2.0.1".parse().unwrap(),
        dst_port: 80,
    };
    assert!(matches!(s.authorize(&conn), Decision::Deny { .. }));
}

#[test]
fn malformed_yaml_names_the_origin() {
    let good = "apiVersion: v1\nkind: Pod\nmetadata: {name: ok}\nstatus: {podIP: 10.3.0.1}\n";
    let docs = [
        ("a.yaml".to_owned(), format!("{good}---\nkind: [oops\n")),
        (
            "b.yaml".to_owned(),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: b}\n".to_owned(),
        ),
        (
            "c.yaml".to_owned(),
            "apiVersion: v1\nkind: Pod\nspec: {}\n".to_owned(),
        ),
    ];
    let s = Store::from_yaml(&docs, &opts());
    assert!(
        s.workload("default", "ok").is_some(),
        "documents before the error load"
    );
    assert!(s.workload("default", "b").is_some(), "other files load");
    let w = s.warnings();
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!((w[0].object.as_str(), w[0].kind), ("a.yaml", "parse_error"));
    assert!(w[0].message.contains("line 6"), "{}", w[0].message);
    assert_eq!(
        w[1],
        ConfigWarning {
            object: "c.yaml: Pod default/<unnamed>".into(),
            kind: "parse_error",
            message: "metadata.name is missing".into(),
        }
    );
}

#[test]
fn bad_value_in_a_pod_is_a_parse_error() {
    let s = store(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\n\
         spec: {containers: [{name: c, ports: [{containerPort: http}]}]}\n",
    );
    assert!(s.workload("x", "p").is_none());
    let w = &s.warnings()[0];
    assert_eq!(
        (w.object.as_str(), w.kind),
        ("test.yaml: Pod x/p", "parse_error")
    );
    assert!(w.message.contains("containerPort"), "{}", w.message);
}

#[test]
fn dump_lists_everything() {
    let s = store(OBJECTS);
    let d = s.dump();
    assert_eq!(d["workloads"].as_array().unwrap().len(), 6);
    assert_eq!(d["workloads"][0]["name"], "lone");
    assert_eq!(
        d["services"][2]["vips"],
        serde_json::json!(["10.96.0.10", "fd00:96::10"])
    );
    assert_eq!(d["warnings"], serde_json::json!([]));
    assert_eq!(d["root_namespace"], "istio-system");
}

#[test]
fn services_are_found_by_their_cluster_hostname() {
    let s = store(
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.9, selector: {app: r}, ports: [{port: 9080}]}\n",
    );
    for host in [
        "reviews.shop.svc.cluster.local",
        "reviews.shop.svc.cluster.local.",
        "reviews.shop.svc",
    ] {
        assert_eq!(
            s.service_by_hostname(host).map(|svc| svc.name.as_str()),
            Some("reviews"),
            "{host}"
        );
    }
    for host in ["reviews.other.svc.cluster.local", "reviews.shop", "reviews"] {
        assert!(s.service_by_hostname(host).is_none(), "{host}");
    }
}

const SLICES: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
endpoints:
- addresses: [10.0.0.10]
  conditions: {ready: true}
- addresses: [10.0.0.11]
  conditions: {ready: false}
- addresses: [10.0.0.99]
---
apiVersion: v1
kind: Service
metadata: {name: selectorless, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: tcp, port: 443, targetPort: 8443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: selectorless-1
  namespace: shop
  labels: {kubernetes.io/service-name: selectorless}
addressType: IPv4
ports: [{name: tcp, port: 9443}]
endpoints:
- addresses: [192.0.2.7, not-an-ip, 10.0.0.11]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: headless-1
  namespace: shop
  labels: {kubernetes.io/service-name: headless}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.11]
---
apiVersion: v1
kind: Service
metadata: {name: unsliced, namespace: shop}
spec:
  clusterIP: 10.96.0.12
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan, namespace: shop}
addressType: IPv4
endpoints: [{addresses: [10.0.0.10]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: by-name
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: FQDN
endpoints: [{addresses: [web.example.com]}]
"#;

fn endpoint_list(s: &Store, ns: &str, name: &str) -> Vec<(Option<String>, SocketAddr)> {
    let svc = s.services.get(&(ns.into(), name.into())).unwrap();
    s.endpoints(svc, &svc.ports[0])
        .into_iter()
        .map(|e| (e.workload.map(|w| w.name.clone()), e.addr))
        .collect()
}

/// A Service's endpoints are its EndpointSlices' ready addresses at the
/// slice port named like the Service port: a not-ready endpoint is left
/// out, an unset `ready` counts as ready, an address that is no known pod
/// is still an endpoint (without a workload), and selector-less and
/// headless Services have endpoints too. Locally, a Service without slices
/// keeps its selector's pods; slices that cannot be used are warned about.
#[test]
fn endpoints_come_from_endpoint_slices_ready_only() {
    let s = store(SLICES);
    assert_eq!(
        endpoint_list(&s, "shop", "web"),
        vec![
            (Some("web-1".into()), addr("10.0.0.10:8080")),
            (None, addr("10.0.0.99:8080")),
        ]
    );
    assert_eq!(
        endpoint_list(&s, "shop", "selectorless"),
        vec![
            (None, addr("192.0.2.7:9443")),
            (Some("web-2".into()), addr("10.0.0.11:9443")),
        ]
    );
    assert_eq!(
        endpoint_list(&s, "shop", "headless"),
        vec![(Some("web-2".into()), addr("10.0.0.11:8080"))]
    );
    assert_eq!(
        endpoint_list(&s, "shop", "unsliced"),
        vec![
            (Some("web-1".into()), addr("10.0.0.10:8080")),
            (Some("web-2".into()), addr("10.0.0.11:8080")),
        ]
    );
    let selectorless = s.service_by_vip(addr("10.96.0.11:443")).unwrap().0;
    assert!(s.has_endpoints_source(selectorless));
    let web_2 = s.workload("shop", "web-2").unwrap();
    let web_1 = s.workload("shop", "web-1").unwrap();
    assert!(s.serves(selectorless, web_2), "listed in its slice");
    assert!(!s.serves(selectorless, web_1));
    let web = s.service_by_vip(addr("10.96.0.10:80")).unwrap().0;
    assert!(
        !s.serves(web, web_2),
        "not ready: its selector matches, its slice says no"
    );

    let warned: Vec<(&str, &str)> = s
        .warnings()
        .iter()
        .map(|w| (w.object.as_str(), w.kind))
        .collect();
    for expected in [
        ("EndpointSlice shop/selectorless-1", "parse_error"),
        ("EndpointSlice shop/orphan", "parse_error"),
        ("EndpointSlice shop/by-name", "unsupported"),
    ] {
        assert!(warned.contains(&expected), "{expected:?} in {warned:?}");
    }
    let bad_address = s
        .warnings()
        .iter()
        .find(|w| w.object == "EndpointSlice shop/selectorless-1")
        .unwrap();
    assert!(
        bad_address.message.contains("\"not-an-ip\""),
        "{bad_address:?}"
    );
}

/// From the API, slices are the only source: a Service Kubernetes wrote no
/// slices for has no endpoints, whatever its selector.
#[test]
fn from_the_api_a_service_without_slices_has_no_endpoints() {
    let s = Store::from_yaml(
        &[("api".into(), SLICES.into())],
        &StoreOptions {
            redirection_annotation: true,
            endpoint_slices_only: true,
            ..opts()
        },
    );
    assert_eq!(endpoint_list(&s, "shop", "unsliced"), vec![]);
    assert_eq!(
        endpoint_list(&s, "shop", "web"),
        vec![
            (Some("web-1".into()), addr("10.0.0.10:8080")),
            (None, addr("10.0.0.99:8080")),
        ]
    );
    let unsliced = s.service_by_vip(addr("10.96.0.12:80")).unwrap().0;
    let web_1 = s.workload("shop", "web-1").unwrap();
    assert!(!s.serves(unsliced, web_1));
}
