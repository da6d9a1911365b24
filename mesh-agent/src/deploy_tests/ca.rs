//! The CA's Deployment gives `mesh-agent ca` what its flags expect: probes
//! and ports, its root as a private read-only Secret, and a locked-down
//! container.

use super::{
    Manifests, Problems,
    workload::{capabilities, check_exposed, check_readiness},
};

#[test]
fn ca_deployment_matches_ca_flags() {
    let m = Manifests::load();
    let (w, c, args) = m.ca();
    let mut p = Problems::default();
    let listen = i32::from(args.listen.port());

    check_readiness(&mut p, c, "the CA", args.ready_addr);
    w.check_scraped(&mut p, "--ready-addr", i32::from(args.ready_addr.port()));
    let https = (c.ports.iter().flatten()).find(|p| p.name.as_deref() == Some("https"));
    p.check(https.map(|p| p.container_port) == Some(listen), || {
        format!(
            "container port `https` is {:?}, --listen is {}",
            https.map(|p| p.container_port),
            args.listen
        )
    });
    check_exposed(
        &mut p,
        c,
        &[("--listen", args.listen), ("--ready-addr", args.ready_addr)],
        "nothing outside the pod reaches it",
    );

    let sc = c.security_context.clone().unwrap_or_default();
    let pod_sc = w.pod.security_context.clone().unwrap_or_default();

    // The root: a Secret, read-only, readable by the CA's user only.
    if let Some((mnt, vol, rest)) = w.mount_for(&mut p, c, "--ca-dir", &args.ca_dir) {
        p.check(rest.as_os_str().is_empty(), || {
            format!(
                "--ca-dir {} is inside mount {}, not the mount itself",
                args.ca_dir.display(),
                mnt.mount_path
            )
        });
        p.check(mnt.read_only == Some(true), || {
            "the --ca-dir mount is not read-only".into()
        });
        match &vol.secret {
            Some(s) => {
                p.check(s.optional != Some(true), || {
                    "the root Secret is optional: without it the CA would generate a root of its own".into()
                });
                let mode = s.default_mode.unwrap_or(0o644);
                p.check(mode & 0o007 == 0 && mode & !0o777 == 0, || {
                    format!("the root Secret's mode {mode:#o} lets every user read the key (or is not a mode)")
                });
                if sc.run_as_non_root.or(pod_sc.run_as_non_root) == Some(true) {
                    let fs_group = pod_sc.fs_group;
                    p.check(fs_group.is_some() && mode & 0o040 != 0, || {
                        format!("the CA runs as non-root but cannot read the root: fsGroup {fs_group:?}, mode {mode:#o}")
                    });
                }
            }
            None => p.fail(format!(
                "--ca-dir {} is not a Secret volume",
                args.ca_dir.display()
            )),
        }
    }

    p.check(
        sc.run_as_non_root.or(pod_sc.run_as_non_root) == Some(true),
        || "runAsNonRoot is not true".into(),
    );
    p.check(sc.read_only_root_filesystem == Some(true), || {
        "readOnlyRootFilesystem is not true".into()
    });
    p.check(sc.allow_privilege_escalation == Some(false), || {
        "allowPrivilegeEscalation is not false".into()
    });
    p.check(capabilities(c, |c| &c.drop).contains("ALL"), || {
        "capabilities do not drop ALL".into()
    });
    p.check(capabilities(c, |c| &c.add).is_empty(), || {
        "the CA adds capabilities".into()
    });
    p.assert_none(&format!("{} disagrees with `mesh-agent ca`", w.name));
}
