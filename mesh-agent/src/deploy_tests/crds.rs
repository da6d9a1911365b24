//! `deploy/crds.yaml` defines exactly the mesh's own kinds the agent
//! watches, under the names, versions and schema the API server needs.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use super::{Manifests, Problems};
use crate::cluster::WATCHED;

/// API groups whose CRDs come from their upstream project, not crds.yaml.
const UPSTREAM_CRD_GROUPS: &[&str] = &["gateway.networking.k8s.io"];

/// API groups Kubernetes itself serves (the core group is empty).
const BUILT_IN_GROUPS: &[&str] = &["discovery.k8s.io"];

#[test]
fn crds_define_the_watched_istio_kinds() {
    let m = Manifests::load();
    let crds: Vec<&CustomResourceDefinition> = m.all().collect();
    let mut p = Problems::default();
    let ours = WATCHED.iter().filter(|r| {
        !r.group.is_empty()
            && !UPSTREAM_CRD_GROUPS.contains(&r.group)
            && !BUILT_IN_GROUPS.contains(&r.group)
    });
    for r in ours {
        let Some(crd) = crds
            .iter()
            .find(|c| c.spec.group == r.group && c.spec.names.kind == r.kind)
        else {
            p.fail(format!(
                "no CRD defines {} {} (cluster::WATCHED)",
                r.group, r.kind
            ));
            continue;
        };
        let (spec, what) = (&crd.spec, format!("CRD for {} {}", r.group, r.kind));
        p.check(spec.names.plural == r.plural, || {
            format!(
                "{what} has plural {}, the agent watches {}",
                spec.names.plural, r.plural
            )
        });
        let name = crd.metadata.name.clone().unwrap_or_default();
        // `plural.group`, the name the API server requires of a CRD.
        let required = format!("{}.{}", r.plural, r.group);
        p.check(name == required, || {
            format!("{what} is named {name}, the API requires {required}")
        });
        let scope = if r.namespaced {
            "Namespaced"
        } else {
            "Cluster"
        };
        p.check(spec.scope == scope, || {
            format!("{what} is {}, the agent expects {scope}", spec.scope)
        });
        let served: Vec<&str> = (spec.versions.iter())
            .filter(|v| v.served)
            .map(|v| v.name.as_str())
            .collect();
        p.check(served.contains(&r.version), || {
            format!("{what} serves {served:?}, the agent watches {}", r.version)
        });
        let storage = spec.versions.iter().filter(|v| v.storage).count();
        p.check(storage == 1, || {
            format!("{what} has {storage} storage versions, not one")
        });
        for v in spec.versions.iter().filter(|v| v.served) {
            let schema = (v.schema.as_ref()).and_then(|s| s.open_api_v3_schema.as_ref());
            let field = |f: &str| schema.and_then(|s| s.properties.as_ref()?.get(f));
            let object = |f: &str| field(f).is_some_and(|s| s.type_.as_deref() == Some("object"));
            p.check(
                schema.is_some_and(|s| s.type_.as_deref() == Some("object")),
                || format!("{what} {}: the schema root is not an object", v.name),
            );
            p.check(object("spec") && object("status"), || {
                format!("{what} {}: spec and status must be objects", v.name)
            });
            let keeps =
                field("spec").and_then(|s| s.x_kubernetes_preserve_unknown_fields) == Some(true);
            p.check(keeps, || {
                format!("{what} {}: spec does not preserve unknown fields, so the API server would prune what the agent must see to refuse it", v.name)
            });
        }
    }
    for c in &crds {
        let (group, kind) = (&c.spec.group, &c.spec.names.kind);
        p.check(
            WATCHED.iter().any(|r| r.group == group && r.kind == kind),
            || format!("CRD {group} {kind} is for a kind the agent does not watch"),
        );
        p.check(!UPSTREAM_CRD_GROUPS.contains(&group.as_str()), || {
            format!("CRD {group} {kind} belongs to its upstream project's release")
        });
    }
    p.assert_none("deploy/crds.yaml disagrees with cluster::WATCHED");
}
