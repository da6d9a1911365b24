//! The local file source: which files are read, the diff each scan applies,
//! and the task that publishes snapshots as files are added, edited and
//! removed.

use std::{net::IpAddr, path::Path, time::Duration};

use tokio::sync::watch;

use super::{tests::opts, *};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-state-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn keys(keys: &[ObjectKey]) -> Vec<String> {
    keys.iter().map(ToString::to_string).collect()
}

fn pod(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nstatus: {{podIP: {ip}}}\n"
    )
}

fn put(path: impl AsRef<Path>, text: impl AsRef<[u8]>) {
    std::fs::write(&path, text).unwrap();
}

#[test]
fn scan_reads_yaml_in_order_and_applies_only_what_changed() {
    let dir = temp_dir("scan");
    put(dir.join("b.yml"), pod("b", "10.4.0.2"));
    put(dir.join("a.yaml"), pod("a", "10.4.0.1"));
    put(dir.join("notes.txt"), pod("txt", "10.4.0.3"));
    put(dir.join(".hidden.yaml"), pod("hidden", "10.4.0.4"));
    // No settle time: one scan reads what changed (waiting for a file to
    // settle is tested in `source_unparsed_tests`).
    let mut src = LocalFiles::new(dir.clone(), Duration::from_secs(1)).with_settle(Duration::ZERO);
    let diff = src.scan().unwrap().expect("first scan reads everything");
    assert_eq!(keys(&diff.added), ["Pod shop/a", "Pod shop/b"]);
    assert_eq!(diff.files, 2);
    let origins: Vec<String> = src.documents().map(|d| d.origin().to_owned()).collect();
    let path = |f: &str| dir.join(f).display().to_string();
    assert_eq!(origins, [path("a.yaml"), path("b.yml")]);
    assert_eq!(src.scan().unwrap(), None, "nothing changed");

    // An edit re-reads that file only.
    put(dir.join("a.yaml"), pod("a", "10.4.0.9"));
    let diff = src.scan().unwrap().unwrap();
    assert_eq!(
        (keys(&diff.changed), diff.files),
        (vec!["Pod shop/a".into()], 1)
    );

    // An object moving to another file is changed, not removed and added.
    put(dir.join("a.yaml"), "");
    put(dir.join("c.yaml"), pod("a", "10.4.0.9"));
    let diff = src.scan().unwrap().unwrap();
    assert_eq!(keys(&diff.changed), ["Pod shop/a"]);
    assert!(diff.added.is_empty() && diff.removed.is_empty(), "{diff:?}");

    std::fs::remove_file(dir.join("b.yml")).unwrap();
    let diff = src.scan().unwrap().unwrap();
    assert_eq!(keys(&diff.removed), ["Pod shop/b"]);

    std::fs::remove_dir_all(&dir).unwrap();
    let err = src.scan().unwrap_err();
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "{err}"
    );
}

/// Waits (bounded) for a snapshot that satisfies `ok`.
async fn until(rx: &mut watch::Receiver<Arc<Store>>, what: &str, ok: impl Fn(&Store) -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| ok(s)))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(
        waited,
        "store did not converge: {what}; last snapshot: {:#}",
        rx.borrow().dump()
    );
}

fn write(dir: &Path, file: &str, text: &str) {
    // Through a rename, as editors and ConfigMap updates do: never half a file.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

fn dump_has(s: &Store, field: &str, name: &str) -> bool {
    s.dump()[field]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["name"] == name)
}

fn has_warning(s: &Store, object: &str, kind: &str) -> bool {
    s.warnings()
        .iter()
        .any(|w| w.object == object && w.kind == kind)
}

#[tokio::test]
async fn each_kind_added_changed_and_deleted_in_the_directory_converges() {
    let dir = temp_dir("kinds");
    let source = Box::new(LocalFiles::new(dir.clone(), Duration::from_millis(10)));
    let (mut rx, task) = spawn_source(source, opts());
    until(&mut rx, "first snapshot", |s| s.generation > 0).await;
    let captured = |s: &Store| s.workload("shop", "web").is_some_and(|w| w.captured);

    // Namespace and Pod: the namespace label decides capture.
    write(
        &dir,
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    );
    write(&dir, "pod.yaml", &pod("web", "10.4.0.1"));
    until(&mut rx, "pod added", |s| {
        s.workload_by_ip(ip("10.4.0.1")).is_some()
    })
    .await;
    assert!(!captured(&rx.borrow()));
    write(
        &dir,
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    until(&mut rx, "namespace labelled", captured).await;
    write(&dir, "pod.yaml", &pod("web", "10.4.0.7"));
    until(&mut rx, "pod changed", |s| {
        s.workload_by_ip(ip("10.4.0.7")).is_some() && s.workload_by_ip(ip("10.4.0.1")).is_none()
    })
    .await;

    // Service.
    let svc = |port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
             spec: {{clusterIP: 10.96.0.5, selector: {{app: web}}, ports: [{{port: {port}}}]}}\n"
        )
    };
    let vip = |port| SocketAddr::new(ip("10.96.0.5"), port);
    write(&dir, "svc.yaml", &svc(80));
    until(&mut rx, "service added", |s| {
        s.service_by_vip(vip(80)).is_some()
    })
    .await;
    write(&dir, "svc.yaml", &svc(8080));
    until(&mut rx, "service changed", |s| {
        s.service_by_vip(vip(8080)).is_some() && s.service_by_vip(vip(80)).is_none()
    })
    .await;

    // ServiceAccount: read and counted.
    write(
        &dir,
        "sa.yaml",
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n",
    );
    until(&mut rx, "service account added", |s| {
        s.dump()["service_accounts"] == 1
    })
    .await;

    // AuthorizationPolicy: an edit flips allow to deny.
    let web = rx.borrow().workload("shop", "web").unwrap().clone();
    let conn = |s: &Store| {
        s.authorize(&Conn {
            src_ip: ip("10.4.0.50"),
            src_identity: None,
            dst: &web,
            dst_ip: ip("10.4.0.7"),
            dst_port: 8080,
        }) == Decision::Allow
    };
    let policy = |action: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\n\
             spec: {{action: {action}, rules: [{{to: [{{operation: {{ports: [\"8080\"]}}}}]}}]}}\n"
        )
    };
    write(&dir, "authz.yaml", &policy("ALLOW"));
    until(&mut rx, "policy added", |s| {
        dump_has(s, "authorization_policies", "p") && conn(s)
    })
    .await;
    write(&dir, "authz.yaml", &policy("DENY"));
    until(&mut rx, "policy changed to DENY", |s| !conn(s)).await;

    // PeerAuthentication.
    let pa = |mode: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa, namespace: shop}}\n\
             spec: {{mtls: {{mode: {mode}}}}}\n"
        )
    };
    write(&dir, "pa.yaml", &pa("STRICT"));
    until(&mut rx, "STRICT", |s| {
        s.mtls_mode(&web, 8080) == MtlsMode::Strict
    })
    .await;
    write(&dir, "pa.yaml", &pa("PERMISSIVE"));
    until(&mut rx, "PERMISSIVE", |s| {
        s.mtls_mode(&web, 8080) == MtlsMode::Permissive
    })
    .await;

    // HTTPRoute and Gateway: the reason the route is not applied follows
    // the waypoint's existence.
    write(
        &dir,
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\n\
         spec: {parentRefs: [{group: '', kind: Service, name: web}]}\n",
    );
    until(&mut rx, "route without waypoint", |s| {
        has_warning(s, "HTTPRoute shop/r", "missing_waypoint")
    })
    .await;
    let svc_waypoint = svc(8080).replace(
        "namespace: shop}",
        "namespace: shop, labels: {istio.io/use-waypoint: wp}}",
    );
    write(&dir, "svc.yaml", &svc_waypoint);
    write(
        &dir,
        "gw.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: shop}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
    );
    // A waypoint with no pod yet: the route is still not applied, and says
    // why.
    until(&mut rx, "gateway added", |s| {
        let dump = s.dump();
        dump["gateways"] == 1
            && dump["waypoints"][0]["name"] == "wp"
            && has_warning(s, "HTTPRoute shop/r", "missing_waypoint")
            && dump["warnings"]
                .to_string()
                .contains("bound to waypoint shop/wp, which has no running pod")
    })
    .await;

    // Deletes, one kind per file.
    for (file, gone) in [
        ("gw.yaml", "gateway"),
        ("route.yaml", "route"),
        ("pa.yaml", "peer authentication"),
        ("authz.yaml", "policy"),
        ("sa.yaml", "service account"),
        ("svc.yaml", "service"),
        ("pod.yaml", "pod"),
        ("ns.yaml", "namespace"),
    ] {
        std::fs::remove_file(dir.join(file)).unwrap();
        until(&mut rx, &format!("{gone} deleted"), |s| match file {
            "gw.yaml" => {
                s.dump()["gateways"] == 0 && has_warning(s, "HTTPRoute shop/r", "missing_waypoint")
            }
            "route.yaml" => {
                // The Service still names the waypoint that is gone: its
                // traffic is refused, and that is the one warning left.
                s.dump()["http_routes"] == 0
                    && !s.warnings().is_empty()
                    && s.warnings()
                        .iter()
                        .all(|w| w.object.starts_with("Service ") && w.kind == "missing_waypoint")
            }
            "pa.yaml" => {
                s.mtls_mode(&web, 8080) == MtlsMode::Permissive
                    && s.dump()["peer_authentications"]
                        .as_array()
                        .unwrap()
                        .is_empty()
            }
            "authz.yaml" => conn(s) && !dump_has(s, "authorization_policies", "p"),
            "sa.yaml" => s.dump()["service_accounts"] == 0,
            "svc.yaml" => s.service_by_vip(vip(8080)).is_none(),
            "pod.yaml" => s.workload("shop", "web").is_none(),
            _ => {
                s.dump()["workloads"].as_array().unwrap().is_empty()
                    && s.dump()["services"].as_array().unwrap().is_empty()
            }
        })
        .await;
    }

    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_broken_object_is_reported_and_the_rest_keeps_working() {
    let dir = temp_dir("broken");
    write(&dir, "good.yaml", &pod("web", "10.4.0.1"));
    let source = Box::new(LocalFiles::new(dir.clone(), Duration::from_millis(10)));
    let (mut rx, task) = spawn_source(source, opts());
    until(&mut rx, "first snapshot", |s| s.generation > 0).await;
    write(
        &dir,
        "bad.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [unclosed\n",
    );
    write(
        &dir,
        "odd.yaml",
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n",
    );
    write(
        &dir,
        "typo.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: t, namespace: shop}\nspec: {acton: DENY}\n",
    );
    let file = |f: &str| dir.join(f).display().to_string();
    until(&mut rx, "three warnings", |s| s.warnings().len() == 3).await;
    let store = rx.borrow().clone();
    let w = |kind: &str| {
        store
            .warnings()
            .iter()
            .find(|w| w.kind == kind)
            .unwrap()
            .clone()
    };
    assert_eq!(w("parse_error").object, file("bad.yaml"));
    assert_eq!(
        w("unsupported").object,
        format!("{}: Widget w", file("odd.yaml"))
    );
    let typo = w("unknown_field");
    assert_eq!(
        typo.object,
        format!("{}: AuthorizationPolicy shop/t", file("typo.yaml"))
    );
    assert!(typo.message.contains("acton"), "{}", typo.message);
    assert!(
        store.workload_by_ip(ip("10.4.0.1")).is_some(),
        "the good file still applies"
    );

    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An empty snapshot published as synced would release every managed pod
/// and make every meshed destination look plain: a source that cannot be
/// read publishes nothing until it can.
#[tokio::test]
async fn a_missing_source_publishes_nothing_and_an_unreadable_one_keeps_the_last_snapshot() {
    let dir = temp_dir("missing");
    let path = dir.join("absent");
    let (mut rx, task) = spawn_source(
        Box::new(LocalFiles::new(path.clone(), Duration::from_millis(10))),
        opts(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rx.borrow().generation,
        0,
        "nothing published while the source cannot be read: {:#}",
        rx.borrow().dump()
    );
    std::fs::create_dir(&path).unwrap();
    write(&path, "pod.yaml", &pod("web", "10.4.0.1"));
    until(&mut rx, "appeared", |s| {
        s.workload_by_ip(ip("10.4.0.1")).is_some()
    })
    .await;
    let generation = rx.borrow().generation;
    std::fs::remove_dir_all(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let store = rx.borrow().clone();
    assert_eq!(
        store.generation, generation,
        "a failed read publishes nothing"
    );
    assert!(store.workload_by_ip(ip("10.4.0.1")).is_some());
    task.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}
