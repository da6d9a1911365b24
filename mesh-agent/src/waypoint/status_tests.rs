//! HTTPRoute status written by the waypoint that serves it, through the
//! real kube client against the API stand-in.

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};

use super::status;
use crate::{
    cluster::fake_api,
    state::{Store, StoreOptions},
};

const OBJECTS: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {clusterIP: 10.96.0.2, selector: {app: web}, ports: [{port: 80}]}
";

fn route() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "shop", "generation": 3},
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "web", "port": 80},
                {"group": "", "kind": "Service", "name": "plain"},
            ],
            "rules": [{"backendRefs": [{"name": "web", "port": 80}, {"name": "gone", "port": 80}]}],
        },
    })
}

#[tokio::test]
async fn the_serving_waypoint_writes_its_parents_conditions() {
    let fake = fake_api::start().await;
    fake.apply(route());
    let yaml = format!("{OBJECTS}---\n{}", serde_yaml::to_string(&route()).unwrap());
    let opts = StoreOptions {
        redirection_annotation: true,
        ..StoreOptions::for_tests()
    };
    let mut store = Store::from_yaml(&[("t.yaml".into(), yaml)], &opts);
    store.generation = 1;
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(store));
    let task = status::spawn(Some(fake.client()), rx, ("shop".into(), "wp-0".into()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let written = loop {
        let obj = fake
            .objects("gateway.networking.k8s.io/v1", "HTTPRoute")
            .into_iter()
            .next()
            .unwrap();
        if !obj["status"].is_null() {
            break obj;
        }
        assert!(tokio::time::Instant::now() < deadline, "no status written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    task.abort();
    // Only the parent this waypoint serves; the spec is untouched.
    let parents = written["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 1, "{written}");
    let p = &parents[0];
    assert_eq!(
        p["parentRef"],
        json!({"group": "", "kind": "Service", "namespace": "shop", "name": "web", "port": 80})
    );
    assert_eq!(p["controllerName"], status::CONTROLLER);
    let conditions: Vec<(String, String, String)> = p["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["observedGeneration"], 3, "{c}");
            assert!(
                c["lastTransitionTime"].as_str().unwrap().ends_with('Z'),
                "{c}"
            );
            (
                c["type"].as_str().unwrap().to_owned(),
                c["status"].as_str().unwrap().to_owned(),
                c["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        conditions,
        [
            ("Accepted".into(), "True".into(), "Accepted".into()),
            (
                "ResolvedRefs".into(),
                "False".into(),
                "BackendNotFound".into()
            ),
        ]
    );
    assert_eq!(written["spec"], route()["spec"]);
    // Written once, through the status subresource.
    let writes: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PATCH"))
        .collect();
    assert_eq!(
        writes,
        ["PATCH /apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web/status?"],
        "{writes:?}"
    );
}

fn ingress() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "public", "namespace": "edge", "generation": 2},
        "spec": {
            "gatewayClassName": "mesh-ingress",
            "listeners": [
                {"name": "http", "port": 8080, "protocol": "HTTP"},
                {"name": "https", "port": 8443, "protocol": "HTTPS", "hostname": "shop.example.com",
                 "tls": {"certificateRefs": [{"name": "missing"}]}},
                {"name": "raw", "port": 9000, "protocol": "TCP"},
            ],
        },
    })
}

#[tokio::test]
async fn an_ingress_gateway_writes_its_gateways_and_routes_conditions() {
    let fake = fake_api::start().await;
    fake.apply(ingress());
    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "shop", "namespace": "edge", "generation": 1},
        "spec": {
            "parentRefs": [{"name": "public", "sectionName": "http"}],
            "rules": [{"backendRefs": [{"name": "shop", "port": 80}]}],
        },
    });
    fake.apply(route.clone());
    let pod = "
apiVersion: v1
kind: Pod
metadata: {name: gw-0, namespace: edge, labels: {gateway.networking.k8s.io/gateway-name: public}}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: edge}
spec: {clusterIP: 10.96.0.3, selector: {app: shop}, ports: [{port: 80}]}
";
    let yaml = format!(
        "{pod}---\n{}---\n{}",
        serde_yaml::to_string(&ingress()).unwrap(),
        serde_yaml::to_string(&route).unwrap()
    );
    let opts = StoreOptions {
        redirection_annotation: true,
        ..StoreOptions::for_tests()
    };
    let mut store = Store::from_yaml(&[("t.yaml".into(), yaml)], &opts);
    store.generation = 1;
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(store));
    let task = status::spawn(Some(fake.client()), rx, ("edge".into(), "gw-0".into()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (gateway, route) = loop {
        let gw = fake.objects("gateway.networking.k8s.io/v1", "Gateway");
        let rt = fake.objects("gateway.networking.k8s.io/v1", "HTTPRoute");
        if !gw[0]["status"].is_null() && !rt[0]["status"].is_null() {
            break (gw[0].clone(), rt[0].clone());
        }
        assert!(tokio::time::Instant::now() < deadline, "no status written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    task.abort();
    let conditions = |v: &Value| -> Vec<(String, String, String)> {
        v["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                assert!(c["lastTransitionTime"].is_string(), "{c}");
                (
                    c["type"].as_str().unwrap().to_owned(),
                    c["status"].as_str().unwrap().to_owned(),
                    c["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let c = |t: &str, s: &str, r: &str| (t.to_owned(), s.to_owned(), r.to_owned());
    let status = &gateway["status"];
    assert_eq!(status["conditions"][0]["observedGeneration"], 2, "{status}");
    assert_eq!(
        conditions(status),
        [
            c("Accepted", "True", "Accepted"),
            c("Programmed", "False", "Invalid")
        ]
    );
    let listener = |name: &str| {
        status["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no listener {name}: {status}"))
            .clone()
    };
    let http = listener("http");
    assert_eq!(http["attachedRoutes"], 1, "{http}");
    assert_eq!(
        conditions(&http),
        [
            c("Accepted", "True", "Accepted"),
            c("Programmed", "True", "Programmed"),
            c("ResolvedRefs", "True", "ResolvedRefs")
        ]
    );
    let https = listener("https");
    assert_eq!(https["attachedRoutes"], 0, "{https}");
    assert_eq!(
        conditions(&https)[2],
        c("ResolvedRefs", "False", "InvalidCertificateRef")
    );
    assert!(
        https["conditions"][2]["message"]
            .as_str()
            .unwrap()
            .contains("Secret edge/missing does not exist"),
        "{https}"
    );
    assert_eq!(
        conditions(&listener("raw"))[0],
        c("Accepted", "False", "UnsupportedProtocol")
    );
    // The route's parent, written by the same pod.
    let parent = &route["status"]["parents"][0];
    assert_eq!(parent["parentRef"]["name"], "public", "{route}");
    assert_eq!(parent["conditions"][0]["status"], "True", "{route}");
    assert_eq!(gateway["spec"], ingress()["spec"]);
}
