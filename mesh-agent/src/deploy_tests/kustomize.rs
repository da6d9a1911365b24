//! `kubectl apply -k deploy/` applies every manifest, each in the namespace
//! it says, and this test module reads every one of them.

use std::{collections::BTreeSet, path::Path};

use k8s_openapi::api::core::v1::Namespace;

use super::{MANIFESTS, Manifests, Problems, name};

const KUSTOMIZATION: &str = include_str!("../../../deploy/kustomization.yaml");

#[test]
fn kustomization_lists_every_manifest_file() {
    #[derive(serde::Deserialize)]
    struct Kustomization {
        kind: String,
        namespace: Option<String>,
        #[serde(default)]
        resources: Vec<String>,
    }
    let k: Kustomization =
        serde_yaml::from_str(KUSTOMIZATION).expect("deploy/kustomization.yaml reads");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("deploy/ is readable")
        .map(|e| {
            e.expect("deploy/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|f| (f.ends_with(".yaml") || f.ends_with(".yml")) && f != "kustomization.yaml")
        .collect();
    let tested: BTreeSet<String> = MANIFESTS.iter().map(|(f, _)| f.to_string()).collect();
    let listed: BTreeSet<String> = k.resources.iter().cloned().collect();

    let mut p = Problems::default();
    p.check(k.kind == "Kustomization", || {
        format!("kustomization.yaml is a {}, not a Kustomization", k.kind)
    });
    for f in on_disk.difference(&tested) {
        p.fail(format!(
            "deploy/{f} is not in MANIFESTS in deploy_tests/mod.rs, so nothing checks it"
        ));
    }
    for f in on_disk.difference(&listed) {
        p.fail(format!(
            "deploy/{f} is not in kustomization.yaml's resources: `kubectl apply -k` skips it"
        ));
    }
    for f in &listed {
        p.check(dir.join(f).exists(), || {
            format!("kustomization.yaml lists {f}, which is not in deploy/")
        });
    }

    let m = Manifests::load();
    let ns = k.namespace.as_deref();
    p.check(
        ns.is_some_and(|ns| m.find::<Namespace>(None, ns).is_some()),
        || format!("kustomization.yaml's namespace {ns:?} is not a Namespace in deploy/"),
    );
    for d in &m.docs {
        let (kind, meta) = (d.object.kind(), d.object.meta());
        let name = name(meta);
        match (d.object.namespaced(), meta.namespace.as_deref()) {
            (true, Some(own)) => p.check(Some(own) == ns, || {
                format!("{kind} {name} in deploy/{} is in namespace {own}, the kustomization puts it in {ns:?}", d.file)
            }),
            (true, None) => {}
            (false, own) => p.check(own.is_none(), || {
                format!("{kind} {name} in deploy/{} is cluster-scoped but names namespace {own:?}", d.file)
            }),
        }
    }
    p.assert_none("deploy/ and its kustomization disagree");
}
