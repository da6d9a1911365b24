//! Rules the API server enforces at admission, which reading the types
//! cannot see: volumes that exist and are used, mount propagation,
//! selectors that select, and the namespace's Pod Security level.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Namespace;

use super::{Manifests, Problems, workload::selects};

#[test]
fn pods_pass_the_api_servers_checks() {
    let m = Manifests::load();
    let mut p = Problems::default();
    for w in m.workloads() {
        let pod = w.pod;
        let mut mounted = BTreeSet::new();
        for c in w.containers() {
            let privileged = c.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
            for mnt in c.volume_mounts.iter().flatten() {
                mounted.insert(mnt.name.as_str());
                p.check(w.volume(&mnt.name).is_some(), || {
                    format!(
                        "{} container {} mounts undefined volume {}",
                        w.name, c.name, mnt.name
                    )
                });
                p.check(privileged || mnt.mount_propagation.as_deref() != Some("Bidirectional"), || {
                    format!("{} container {}: Bidirectional propagation on {} needs a privileged container", w.name, c.name, mnt.mount_path)
                });
            }
        }
        for v in pod.volumes.iter().flatten() {
            p.check(mounted.contains(v.name.as_str()), || {
                format!(
                    "{} defines volume {} that no container mounts",
                    w.name, v.name
                )
            });
        }

        p.check(selects(&w.selector, &w.labels), || {
            format!(
                "{}: selector {:?} does not select its own pods {:?}",
                w.name, w.selector, w.labels
            )
        });

        // Host namespaces and host paths are beyond the "baseline" Pod
        // Security level, which many clusters enforce by default.
        let host = pod.host_network == Some(true)
            || pod.host_pid == Some(true)
            || pod.volumes.iter().flatten().any(|v| v.host_path.is_some());
        if host {
            let level = (m.find::<Namespace>(None, &w.namespace)).and_then(|n| {
                n.metadata
                    .labels
                    .as_ref()?
                    .get("pod-security.kubernetes.io/enforce")
                    .cloned()
            });
            p.check(level.as_deref() == Some("privileged"), || {
                format!("{} uses the host's namespaces or paths, but namespace {} enforces Pod Security {level:?}, not privileged", w.name, w.namespace)
            });
        }
    }
    p.assert_none("the API server would refuse or break these pods");
}
