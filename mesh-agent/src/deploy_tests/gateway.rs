//! `deploy/gateway/`: an ingress gateway for a user's namespace. Its
//! Deployment runs `mesh-agent gateway` with flags clap accepts; its pods,
//! with the Gateway, make an ingress gateway in the store whose listeners
//! the container and the Service expose; RBAC lets it read Secrets in its
//! own namespace only (a Role, never cluster-wide) and write its routes'
//! status; it reaches the same CA as the agents.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
};
use serde::Deserialize as _;
use serde_json::Value;

use super::{
    Manifests, Object, Problems,
    command_line::{env_flags, mesh_argv, parse_cli},
    workload::{Workload, check_readiness},
};
use crate::{
    cluster::SECRETS,
    config::{Command, WaypointArgs},
    state::{Store, StoreOptions},
};

const GATEWAY: &str = include_str!("../../../deploy/gateway/gateway.yaml");
const KUSTOMIZATION: &str = include_str!("../../../deploy/gateway/kustomization.yaml");

fn load() -> (String, Vec<Object>, Value) {
    #[derive(serde::Deserialize)]
    struct Kustomization {
        namespace: String,
        resources: Vec<String>,
    }
    let k: Kustomization = serde_yaml::from_str(KUSTOMIZATION).expect("kustomization reads");
    assert_eq!(
        k.resources,
        ["gateway.yaml"],
        "deploy/gateway/kustomization.yaml"
    );
    let mut objects = Vec::new();
    let mut gateway = None;
    for de in serde_yaml::Deserializer::from_str(GATEWAY) {
        let mut doc = Value::deserialize(de).expect("deploy/gateway/gateway.yaml reads");
        if doc.is_null() {
            continue;
        }
        if doc["kind"] == "Gateway" {
            doc["metadata"]["namespace"] = Value::String(k.namespace.clone());
            gateway = Some(doc);
            continue;
        }
        objects.push(Object::read(&doc).unwrap_or_else(|e| panic!("deploy/gateway: {e}")));
    }
    (
        k.namespace,
        objects,
        gateway.expect("deploy/gateway has the Gateway"),
    )
}

fn one<T: super::Kind>(objects: &[Object]) -> &T {
    let mut found = objects.iter().filter_map(T::pick);
    let one = found.next().expect("one object of each kind");
    assert!(found.next().is_none(), "more than one of a kind");
    one
}

pub(super) fn grants(rule: &PolicyRule, group: &str, resource: &str, verb: &str) -> bool {
    rule.api_groups.iter().flatten().any(|g| g == group)
        && rule.resources.iter().flatten().any(|r| r == resource)
        && rule.verbs.iter().any(|v| v == verb)
}

#[test]
fn gateway_deployment_runs_an_ingress_gateway_that_reads_only_its_namespaces_secrets() {
    let (ns, objects, gateway) = load();
    let main = Manifests::load();
    let mut p = Problems::default();

    let deploy: &Deployment = one(&objects);
    let spec = deploy.spec.as_ref().expect("Deployment spec");
    let mut w = Workload::new(
        "Deployment",
        &deploy.metadata,
        &spec.selector,
        &spec.template,
    )
    .expect("pod template");
    w.namespace = ns.clone();
    let c = w
        .containers()
        .find(|c| mesh_argv(c).is_some_and(|a| a.first().map(String::as_str) == Some("gateway")))
        .expect("a container runs `mesh-agent gateway`");
    let cli = env_flags(c, &ns)
        .and_then(|env| parse_cli(mesh_argv(c).unwrap_or_default(), env))
        .unwrap_or_else(|e| panic!("the gateway container would not start: {e}"));
    let Command::Gateway(args) = cli.command else {
        panic!("not `mesh-agent gateway`")
    };
    let args: WaypointArgs = *args;
    p.check(args.mesh.kubernetes, || "MESH_KUBERNETES is not set".into());
    check_readiness(&mut p, c, "the gateway", args.ready_addr);
    w.check_scraped(
        &mut p,
        "--metrics-addr",
        i32::from(args.metrics_addr.port()),
    );
    let (_, _, agent) = main.agent();
    p.check(args.mesh.ca_address == agent.mesh.ca_address, || {
        format!(
            "the gateway's CA {:?} is not the agents' {:?}",
            args.mesh.ca_address, agent.mesh.ca_address
        )
    });
    if let Some((mnt, vol, _)) = w.mount_for(&mut p, c, "--state-dir", &args.state_dir) {
        p.check(
            mnt.read_only != Some(true) && vol.empty_dir.is_some(),
            || {
                format!(
                    "--state-dir {} is not a writable emptyDir",
                    args.state_dir.display()
                )
            },
        );
    }
    p.check(
        w.labels.get("istio.io/dataplane-mode").map(String::as_str) == Some("none"),
        || "the gateway's pods are not labelled istio.io/dataplane-mode=none".into(),
    );

    // Its pod, the Gateway and the Secret it names make an ingress
    // gateway with a certificate on each listener, without a warning.
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example.com".to_owned()])
        .expect("certificate");
    let mut docs = vec![gateway.clone()];
    for l in gateway["spec"]["listeners"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for r in l["tls"]["certificateRefs"].as_array().into_iter().flatten() {
            docs.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": r["name"], "namespace": ns},
                "stringData": {"tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem()},
            }));
        }
    }
    docs.push(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "public-gateway-7d9f-abcde", "namespace": ns, "labels": w.labels},
        "spec": {"serviceAccountName": w.service_account()},
        "status": {"phase": "Running", "podIP": "10.0.0.5"},
    }));
    let text = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).expect("yaml"))
        .collect::<Vec<_>>()
        .join("---\n");
    let store = Store::from_yaml(
        &[("deploy/gateway".into(), text)],
        &StoreOptions::for_tests(),
    );
    p.check(store.warnings().is_empty(), || {
        format!(
            "the Gateway and its pod draw warnings: {:?}",
            store.warnings()
        )
    });
    let ingress = store.ingress_of_pod(&ns, "public-gateway-7d9f-abcde");
    p.check(ingress.is_some(), || {
        "the pods are not the Gateway's".into()
    });
    let listeners: BTreeMap<u16, bool> = ingress
        .map(|g| {
            g.listeners
                .iter()
                .map(|l| (l.port, !matches!(l.certificate, Some(Err(_)))))
                .collect()
        })
        .unwrap_or_default();
    p.check(listeners.values().all(|ok| *ok), || {
        format!("a listener has no certificate: {listeners:?}")
    });

    // Every listener port is a container port and a Service target.
    let container_ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    let service: &Service = one(&objects);
    let targets: Vec<String> = (service.spec.as_ref().and_then(|s| s.ports.clone()))
        .into_iter()
        .flatten()
        .filter_map(|p| {
            p.target_port.map(|t| match t {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n.to_string(),
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s,
            })
        })
        .collect();
    for port in listeners.keys() {
        p.check(container_ports.contains(&i32::from(*port)), || {
            format!("listener port {port} is not a container port")
        });
        p.check(targets.contains(&port.to_string()), || {
            format!("listener port {port} is not a target of the Service")
        });
    }
    let selector = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    p.check(
        !selector.is_empty() && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)),
        || format!("Service selector {selector:?} does not select the pods"),
    );

    // RBAC: what the agents read (cluster-wide), Secrets in its own
    // namespace only, and its routes' status.
    let sa: &ServiceAccount = one(&objects);
    p.check(
        sa.metadata.name.as_deref() == Some(w.service_account()),
        || "the pods' ServiceAccount is not the one in deploy/gateway".into(),
    );
    let binding: &ClusterRoleBinding = one(&objects);
    p.check(
        binding
            .subjects
            .iter()
            .flatten()
            .any(|s| s.name == w.service_account() && s.namespace.as_deref() == Some(ns.as_str())),
        || "the ClusterRoleBinding is not for the gateway's ServiceAccount".into(),
    );
    let role: &Role = one(&objects);
    let rules = role.rules.clone().unwrap_or_default();
    for verb in ["get", "list", "watch"] {
        p.check(
            rules
                .iter()
                .any(|r| grants(r, SECRETS.group, SECRETS.plural, verb)),
            || format!("no Role grants {verb} on secrets"),
        );
    }
    for status in ["httproutes/status", "gateways/status"] {
        p.check(
            rules
                .iter()
                .any(|r| grants(r, "gateway.networking.k8s.io", status, "patch")),
            || format!("no Role grants patch on {status}"),
        );
    }
    let cluster_secrets: Vec<&str> = main
        .all::<ClusterRole>()
        .filter(|r| {
            r.rules.iter().flatten().any(|rule| {
                rule.api_groups.iter().flatten().any(|g| g.is_empty())
                    && rule
                        .resources
                        .iter()
                        .flatten()
                        .any(|x| x == "secrets" || x == "*")
            })
        })
        .map(|r| super::name(&r.metadata))
        .collect();
    p.check(cluster_secrets.is_empty(), || {
        format!("cluster-wide Secrets access in deploy/: {cluster_secrets:?}")
    });
    let role_binding: &RoleBinding = one(&objects);
    p.check(
        role_binding.role_ref.kind == "Role"
            && role_binding.role_ref.name == role.metadata.name.clone().unwrap_or_default()
            && role_binding
                .subjects
                .iter()
                .flatten()
                .any(|s| s.kind == "ServiceAccount" && s.name == w.service_account()),
        || "the RoleBinding does not give the gateway's ServiceAccount its Role".into(),
    );
    p.assert_none("deploy/gateway/ would not run a working ingress gateway");
}
