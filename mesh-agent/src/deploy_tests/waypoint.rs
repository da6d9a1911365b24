//! `deploy/waypoint/`: a waypoint as Istio would generate it from its
//! Gateway. Its Deployment runs `mesh-agent waypoint` with flags clap
//! accepts; its pods, with the Gateway, make a waypoint in the store (the
//! labels agree); it reaches and trusts the same CA as the agents with a
//! token the CA accepts from a waypoint; its Service, RBAC and kustomization
//! hold together.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use serde::Deserialize as _;
use serde_json::Value;

use super::{
    Manifests, Object, Problems,
    command_line::{env_flags, mesh_argv, parse_cli},
    qualified,
    workload::{Workload, check_exposed, check_readiness},
};
use crate::{
    config::{Command, WaypointArgs},
    state::{Binding, Store, StoreOptions},
};

const WAYPOINT: &str = include_str!("../../../deploy/waypoint/waypoint.yaml");
const KUSTOMIZATION: &str = include_str!("../../../deploy/waypoint/kustomization.yaml");

/// The waypoint's documents, in the kustomization's namespace as kubectl
/// would apply them; the Gateway apart (no k8s-openapi type).
struct WaypointManifests {
    namespace: String,
    objects: Vec<Object>,
    gateway: Value,
}

fn load() -> WaypointManifests {
    #[derive(serde::Deserialize)]
    struct Kustomization {
        namespace: String,
        resources: Vec<String>,
    }
    let k: Kustomization = serde_yaml::from_str(KUSTOMIZATION).expect("kustomization reads");
    assert_eq!(
        k.resources,
        ["waypoint.yaml"],
        "deploy/waypoint/kustomization.yaml"
    );
    let mut objects = Vec::new();
    let mut gateway = None;
    for de in serde_yaml::Deserializer::from_str(WAYPOINT) {
        let mut doc = Value::deserialize(de).expect("deploy/waypoint/waypoint.yaml reads");
        if doc.is_null() {
            continue;
        }
        if doc["kind"] == "Gateway" {
            doc["metadata"]["namespace"] = Value::String(k.namespace.clone());
            gateway = Some(doc);
            continue;
        }
        let object = Object::read(&doc).unwrap_or_else(|e| panic!("deploy/waypoint: {e}"));
        objects.push(object);
    }
    WaypointManifests {
        namespace: k.namespace,
        objects,
        gateway: gateway.expect("deploy/waypoint has the Gateway"),
    }
}

impl WaypointManifests {
    fn one<T: super::Kind>(&self) -> &T {
        let mut found = self.objects.iter().filter_map(T::pick);
        let one = found.next().expect("one object of each kind");
        assert!(found.next().is_none(), "more than one of a kind");
        one
    }
}

#[test]
fn waypoint_deployment_runs_a_waypoint_its_gateway_recognises() {
    let wm = load();
    let main = Manifests::load();
    let mut p = Problems::default();
    let ns = wm.namespace.as_str();

    let deploy: &Deployment = wm.one();
    let spec = deploy.spec.as_ref().expect("Deployment spec");
    let mut w = Workload::new(
        "Deployment",
        &deploy.metadata,
        &spec.selector,
        &spec.template,
    )
    .expect("pod template");
    w.namespace = ns.to_owned();
    let c = w
        .containers()
        .find(|c| mesh_argv(c).is_some_and(|a| a.first().map(String::as_str) == Some("waypoint")))
        .expect("a container runs `mesh-agent waypoint`");
    let cli = env_flags(c, ns)
        .and_then(|env| parse_cli(mesh_argv(c).unwrap_or_default(), env))
        .unwrap_or_else(|e| panic!("the waypoint container would not start: {e}"));
    let Command::Waypoint(args) = cli.command else {
        panic!("not `mesh-agent waypoint`")
    };
    let args: WaypointArgs = *args;

    // Who it is: its own Pod object, named by the downward API.
    for (var, field) in [
        ("MESH_POD_NAME", "metadata.name"),
        ("MESH_POD_NAMESPACE", "metadata.namespace"),
    ] {
        let from = (c.env.iter().flatten())
            .find(|e| e.name == var)
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        p.check(from == Some(field), || {
            format!("{var} comes from {from:?}, not the downward API's {field}")
        });
    }
    p.check(args.mesh.kubernetes, || "MESH_KUBERNETES is not set".into());

    // Ports, probes, scraping.
    check_readiness(&mut p, c, "the waypoint", args.ready_addr);
    w.check_scraped(
        &mut p,
        "--metrics-addr",
        i32::from(args.metrics_addr.port()),
    );
    check_exposed(
        &mut p,
        c,
        &[
            ("--listen", args.listen),
            ("--metrics-addr", args.metrics_addr),
            ("--ready-addr", args.ready_addr),
        ],
        "node agents could not reach it",
    );

    // A read-only root filesystem, and somewhere to write its state.
    let sc = c.security_context.clone().unwrap_or_default();
    p.check(sc.read_only_root_filesystem == Some(true), || {
        "readOnlyRootFilesystem is not true".into()
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

    // The same CA as the agents, with a token the CA takes from a waypoint.
    let (_, _, agent) = main.agent();
    let (_, _, ca) = main.ca();
    p.check(args.mesh.ca_address == agent.mesh.ca_address, || {
        format!(
            "the waypoint's CA {:?} is not the agents' {:?}",
            args.mesh.ca_address, agent.mesh.ca_address
        )
    });
    p.check(args.mesh.trust_domain == ca.trust_domain, || {
        "the waypoint's trust domain differs from the CA's".into()
    });
    let audience = w
        .token_at(c, &args.mesh.ca_token)
        .and_then(|t| t.audience.as_deref());
    p.check(audience == Some(ca.audience.as_str()), || {
        format!(
            "--ca-token has audience {audience:?}, the CA wants {}",
            ca.audience
        )
    });
    let root = args.mesh.ca_root.clone().unwrap_or_default();
    if let Some((_, vol, rest)) = w.mount_for(&mut p, c, "MESH_CA_ROOT", &root) {
        let (_, cm_name) = qualified(&ca.root_configmap);
        p.check(
            vol.config_map.as_ref().is_some_and(|cm| cm.name == cm_name)
                && rest == std::path::Path::new(crate::identity::ca_server::ROOT_KEY),
            || {
                format!(
                    "MESH_CA_ROOT is not {} of ConfigMap {cm_name}",
                    crate::identity::ca_server::ROOT_KEY
                )
            },
        );
    }

    // Its pods and the Gateway make a waypoint that serves a bound Service.
    p.check(
        w.labels.get("istio.io/dataplane-mode").map(String::as_str) == Some("none"),
        || "the waypoint's pods are not labelled istio.io/dataplane-mode=none: the agent would capture them".into(),
    );
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "waypoint-7d9f-abcde", "namespace": ns, "labels": w.labels},
        "spec": {"serviceAccountName": w.service_account()},
        "status": {"phase": "Running", "podIP": "10.0.0.5"},
    });
    let svc = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews", "namespace": ns,
                     "labels": {"istio.io/use-waypoint": wm.gateway["metadata"]["name"]}},
        "spec": {"clusterIP": "10.96.0.9", "selector": {"app": "reviews"}, "ports": [{"port": 80}]},
    });
    let text = [&wm.gateway, &pod, &svc]
        .map(|d| serde_yaml::to_string(d).expect("yaml"))
        .join("---\n");
    let store = Store::from_yaml(
        &[("deploy/waypoint".into(), text)],
        &StoreOptions::for_tests(),
    );
    p.check(store.warnings().is_empty(), || {
        format!(
            "the Gateway and its pod draw warnings: {:?}",
            store.warnings()
        )
    });
    let bound = store
        .service_by_vip("10.96.0.9:80".parse().expect("addr"))
        .and_then(|(s, _)| store.service_binding(s));
    p.check(
        matches!(bound, Some(Binding::Bound(wp)) if wp.pods.len() == 1),
        || format!("a Service labelled for the waypoint is not served by it: {bound:?}"),
    );

    // The Service selects the pods; RBAC lets it read what the agents read.
    let service: &Service = wm.one();
    let selector: BTreeMap<String, String> = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    p.check(
        !selector.is_empty() && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)),
        || {
            format!(
                "Service selector {selector:?} does not select the pods {:?}",
                w.labels
            )
        },
    );
    let sa: &ServiceAccount = wm.one();
    p.check(
        sa.metadata.name.as_deref() == Some(w.service_account()),
        || "the pods' ServiceAccount is not the one in deploy/waypoint".into(),
    );
    let binding: &ClusterRoleBinding = wm.one();
    let subject = binding.subjects.iter().flatten().next();
    p.check(
        subject.is_some_and(|s| {
            s.kind == "ServiceAccount"
                && s.name == w.service_account()
                && s.namespace.as_deref() == Some(ns)
        }),
        || {
            format!(
                "the ClusterRoleBinding's subject {subject:?} is not {ns}/{}",
                w.service_account()
            )
        },
    );
    let role = &binding.role_ref.name;
    p.check(main.find::<ClusterRole>(None, role).is_some(), || {
        format!("ClusterRole {role} is not in deploy/")
    });
    // It may write the status of the routes it serves.
    let role: &Role = wm.one();
    let grants_status = role.rules.iter().flatten().any(|r| {
        r.api_groups
            .iter()
            .flatten()
            .any(|g| g == "gateway.networking.k8s.io")
            && r.resources
                .iter()
                .flatten()
                .any(|x| x == "httproutes/status")
            && r.verbs.iter().any(|v| v == "patch")
    });
    p.check(grants_status, || {
        "no Role grants patch on httproutes/status".into()
    });
    // And read its own namespace's Secrets (DestinationRule
    // credentialName), by this Role only.
    let secrets = crate::cluster::SECRETS;
    for verb in ["get", "list", "watch"] {
        p.check(
            role.rules
                .iter()
                .flatten()
                .any(|r| super::gateway::grants(r, secrets.group, secrets.plural, verb)),
            || format!("no Role grants {verb} on secrets"),
        );
    }
    let role_binding: &RoleBinding = wm.one();
    p.check(
        role_binding.role_ref.name == role.metadata.name.clone().unwrap_or_default()
            && role_binding
                .subjects
                .iter()
                .flatten()
                .any(|s| s.kind == "ServiceAccount" && s.name == w.service_account()),
        || "the RoleBinding does not give the waypoint's ServiceAccount its Role".into(),
    );
    p.assert_none("deploy/waypoint/ would not run a working waypoint");
}
