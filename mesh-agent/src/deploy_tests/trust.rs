//! The agent finds the CA and they trust each other: the address names the
//! CA's Service on a name its certificate has, and the trust domain, the
//! ServiceAccount, the token's audience and the root all agree.

use std::path::Path;

use k8s_openapi::api::core::v1::{Container, Service};

use super::{
    Manifests, Problems, Workload, qualified,
    workload::{port_number, selects},
};
use crate::{config::CaArgs, identity::ca_server::ROOT_KEY};

#[test]
fn agent_finds_and_trusts_the_ca() {
    let m = Manifests::load();
    let (aw, ac, agent) = m.agent();
    let (cw, cc, ca) = m.ca();
    let mut p = Problems::default();

    let address = agent.mesh.ca_address.clone().unwrap_or_default();
    check_ca_address(&mut p, &m, (&cw, cc, &ca), &address);

    p.check(agent.mesh.trust_domain == ca.trust_domain, || {
        format!(
            "the agent's trust domain {} differs from the CA's {}",
            agent.mesh.trust_domain, ca.trust_domain
        )
    });
    let agent_sa = format!("{}/{}", aw.namespace, aw.service_account());
    p.check(agent_sa == ca.agent_service_account, || {
        format!(
            "the agent runs as {agent_sa}, the CA accepts only --agent-service-account {}",
            ca.agent_service_account
        )
    });

    // The token the agent shows carries the audience the CA wants.
    let audience = aw
        .token_at(ac, &agent.mesh.ca_token)
        .and_then(|t| t.audience.as_deref());
    p.check(audience == Some(ca.audience.as_str()), || {
        format!(
            "--ca-token has audience {audience:?}, the CA's --audience is {}",
            ca.audience
        )
    });

    // MESH_CA_ROOT is the key the CA publishes, from the ConfigMap it
    // publishes it in, which the agent's pod can mount only in its own
    // namespace.
    let (cm_ns, cm_name) = qualified(&ca.root_configmap);
    p.check(cm_ns == aw.namespace, || {
        format!(
            "--root-configmap {} is outside the agent's namespace {}: a pod cannot mount it",
            ca.root_configmap, aw.namespace
        )
    });
    let root = agent.mesh.ca_root.clone().unwrap_or_default();
    if let Some((_, vol, rest)) = aw.mount_for(&mut p, ac, "MESH_CA_ROOT", &root) {
        match &vol.config_map {
            Some(cm) => {
                p.check(cm.name == cm_name, || {
                    format!(
                        "MESH_CA_ROOT is in ConfigMap {}, the CA publishes {}",
                        cm.name, ca.root_configmap
                    )
                });
                p.check(cm.optional != Some(true), || {
                    "the root ConfigMap is optional: the agent would start with no trust anchor"
                        .into()
                });
                let key = match cm.items.as_deref() {
                    None => Some(rest.to_string_lossy().into_owned()),
                    Some(items) => items
                        .iter()
                        .find(|i| Path::new(&i.path) == rest)
                        .map(|i| i.key.clone()),
                };
                p.check(key.as_deref() == Some(ROOT_KEY), || {
                    format!(
                        "MESH_CA_ROOT {} reads key {key:?}, the CA publishes {ROOT_KEY}",
                        root.display()
                    )
                });
            }
            None => p.fail(format!(
                "MESH_CA_ROOT {} is not in a ConfigMap volume",
                root.display()
            )),
        }
    }
    p.assert_none("the agent and the CA disagree");
}

/// MESH_CA_ADDRESS names the CA's Service, on a name its certificate has,
/// and the Service sends to the CA's `--listen`.
fn check_ca_address(
    p: &mut Problems,
    m: &Manifests,
    (cw, cc, ca): (&Workload<'_>, &Container, &CaArgs),
    address: &str,
) {
    let Some((host, svc, ns, port)) = service_address(address) else {
        p.fail(format!(
            "MESH_CA_ADDRESS {address:?} is not https://<service>.<namespace>.svc:<port>"
        ));
        return;
    };
    p.check(ca.server_names.iter().any(|n| n == host), || {
        format!(
            "MESH_CA_ADDRESS host {host} is not among the CA's --server-names {:?}",
            ca.server_names
        )
    });
    let Some(s) = m.find::<Service>(Some(ns), svc) else {
        p.fail(format!(
            "MESH_CA_ADDRESS names Service {ns}/{svc}, which deploy/ does not create"
        ));
        return;
    };
    let spec = s.spec.clone().unwrap_or_default();
    let selector = spec.selector.unwrap_or_default();
    p.check(selects(&selector, &cw.labels), || {
        format!(
            "Service {svc}'s selector {selector:?} does not select the CA's pods {:?}",
            cw.labels
        )
    });
    p.check(cw.namespace == ns, || {
        format!(
            "Service {ns}/{svc} and the CA ({}) are in different namespaces",
            cw.namespace
        )
    });
    let Some(sp) = spec.ports.iter().flatten().find(|sp| sp.port == port) else {
        p.fail(format!(
            "Service {svc} has no port {port} (MESH_CA_ADDRESS)"
        ));
        return;
    };
    p.check(sp.name.as_deref() == Some("https"), || {
        format!(
            "Service {svc} port {port} is named {:?}, not https",
            sp.name
        )
    });
    let listen = i32::from(ca.listen.port());
    let target = (sp.target_port.as_ref())
        .and_then(|t| port_number(cc, t))
        .unwrap_or(sp.port);
    p.check(target == listen, || {
        format!(
            "Service {svc} port {port} sends to {target}, the CA's --listen is {}",
            ca.listen
        )
    });
    p.check(port == listen, || {
        format!("Service {svc} port {port} differs from the CA's --listen port {listen}")
    });
}

/// `https://<service>.<namespace>.svc:<port>` as its host, service,
/// namespace and port.
fn service_address(address: &str) -> Option<(&str, &str, &str, i32)> {
    let host_port = address.strip_prefix("https://")?.trim_end_matches('/');
    let (host, port) = host_port.rsplit_once(':')?;
    let (svc, rest) = host.split_once('.')?;
    let (ns, svc_suffix) = rest.split_once('.')?;
    (svc_suffix == "svc").then_some((host, svc, ns, port.parse().ok()?))
}
