//! The redirection annotation through the real kube client against the API
//! stand-in, read back by the cluster source.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokio::sync::watch;

use super::{Change, Redirection, changes};
use crate::{
    cluster::{KubeSource, fake_api},
    metrics::{EnrolLabels, Metrics},
    state::{Store, StoreOptions, spawn_source},
};

fn pod(name: &str, node: &str, pod_ip: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
        "spec": {"nodeName": node, "containers": []},
        "status": {"phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}
    })
}

async fn until(rx: &mut watch::Receiver<Arc<Store>>, what: &str, ok: impl Fn(&Store) -> bool) {
    let converged = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| ok(s)))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(converged, "store did not converge: {what}");
}

/// (redirected, over HBONE) of the pod at `ip`, as the store has it.
fn seen(s: &Store, ip: &str) -> Option<(bool, bool)> {
    let ip: IpAddr = ip.parse().unwrap();
    s.workload_by_ip(ip).map(|w| (w.redirected, w.hbone))
}

fn count(m: &Metrics, op: &'static str, result: &'static str) -> u64 {
    m.enrolment.get_or_create(&EnrolLabels { op, result }).get()
}

/// Written when the pod is enrolled, removed when it is released (by merge
/// patch: the pod's other annotations stay), on this node's pods only; the
/// store then reaches the pod over HBONE, and then no longer. A failed
/// write is counted and reported for a retry.
#[tokio::test]
async fn the_annotation_is_written_on_enrol_and_removed_on_release() {
    let fake = fake_api::start().await;
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}));
    fake.apply(pod("web-1", "node-a", "10.1.0.5", json!({"team": "web"})));
    // Another node's pod, annotated by its own agent: not this agent's.
    fake.apply(pod(
        "db-1",
        "node-b",
        "10.2.0.5",
        json!({"ambient.istio.io/redirection": "enabled"}),
    ));
    let opts = StoreOptions {
        redirection_annotation: true,
        ..StoreOptions::for_tests()
    };
    let (mut rx, _task) = spawn_source(Box::new(KubeSource::new(fake.client())), opts);
    until(&mut rx, "initial list", |s| s.generation > 0).await;
    let store = rx.borrow().clone();
    assert_eq!(
        seen(&store, "10.1.0.5"),
        Some((false, false)),
        "labelled only"
    );
    assert_eq!(
        seen(&store, "10.2.0.5"),
        Some((true, true)),
        "captured there"
    );

    let metrics = Arc::new(Metrics::default());
    let writer = Redirection::new(fake.client(), metrics.clone());
    let annotations = || {
        fake.objects("v1", "Pod")
            .into_iter()
            .find(|p| p["metadata"]["name"] == "web-1")
            .map(|p| p["metadata"]["annotations"].clone())
            .unwrap()
    };

    // Enrolled: set.
    let enrolled = BTreeSet::from(["shop/web-1".to_owned()]);
    let set = changes(&store, "node-a", &enrolled);
    let web = |enabled| Change {
        namespace: "shop".into(),
        name: "web-1".into(),
        enabled,
    };
    assert_eq!(set, [web(true)]);
    assert!(writer.apply(&set).await);
    assert_eq!(
        annotations(),
        json!({"team": "web", "ambient.istio.io/redirection": "enabled"})
    );
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.starts_with("PATCH /api/v1/namespaces/shop/pods/web-1")),
        "{:?}",
        fake.requests()
    );
    until(&mut rx, "the annotation read back", |s| {
        seen(s, "10.1.0.5") == Some((true, true))
    })
    .await;
    assert!(
        changes(&rx.borrow(), "node-a", &enrolled).is_empty(),
        "in line"
    );
    assert_eq!(count(&metrics, "annotate", "ok"), 1);

    // Released: cleared, the rest kept.
    let released = changes(&rx.borrow(), "node-a", &BTreeSet::new());
    assert_eq!(released, [web(false)]);
    // A failure first: counted, and the caller retries.
    fake.fail_next(1, 500);
    assert!(!writer.apply(&released).await);
    assert_eq!(count(&metrics, "unannotate", "api_error"), 1);
    // Remembered, so that the same failure again is not logged again.
    let reported = || writer.reported.lock().unwrap().clone();
    assert_eq!(reported().keys().collect::<Vec<_>>(), ["shop/web-1"]);
    assert!(writer.apply(&released).await);
    assert!(reported().is_empty(), "forgotten once written");
    assert_eq!(annotations(), json!({"team": "web"}));
    until(&mut rx, "the removal read back", |s| {
        seen(s, "10.1.0.5") == Some((false, false))
    })
    .await;
    assert_eq!(count(&metrics, "unannotate", "ok"), 1);
    // The other node's pod was never written.
    assert!(
        !fake.requests().iter().any(|r| r.contains("pods/db-1")),
        "{:?}",
        fake.requests()
    );
}
