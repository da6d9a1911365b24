//! The fake API server driven by the real kube-rs client, watcher and event
//! recorder: what the cluster source and the CA tests rely on.

use std::time::Duration;

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::{ConfigMap, Pod},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use serde_json::{Value, json};

use super::{FakeApi, MESH_AGENT_KINDS, TokenUser};

type PodEvents = BoxStream<'static, Result<watcher::Event<Pod>, watcher::Error>>;

fn pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": "default", "labels": { "app": name } },
        "spec": { "nodeName": node, "containers": [{ "name": "app", "image": "app" }] },
    })
}

fn config_map(name: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name } })
}

fn pod_watcher(api: &FakeApi) -> PodEvents {
    watcher(Api::<Pod>::all(api.client()), watcher::Config::default()).boxed()
}

async fn next(events: &mut PodEvents) -> Result<watcher::Event<Pod>, watcher::Error> {
    let next = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
    next.expect("a watcher event within 5s")
        .expect("the watcher stream goes on")
}

/// The next `n` events, as "Apply name" and the like.
async fn take(events: &mut PodEvents, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..n {
        seen.push(describe(
            next(events).await.expect("a watcher event, not an error"),
        ));
    }
    seen
}

fn describe(event: watcher::Event<Pod>) -> String {
    match event {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(pod) => format!("InitApply {}", pod.name_any()),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(pod) => format!("Apply {}", pod.name_any()),
        watcher::Event::Delete(pod) => format!("Delete {}", pod.name_any()),
    }
}

/// The watcher's pod requests: (lists, watches).
fn pod_requests(api: &FakeApi) -> (Vec<String>, Vec<String>) {
    let requests = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?"));
    requests.partition(|r| !r.contains("watch=true"))
}

/// Starts a pod watcher on a server holding pod "a", and waits until its
/// watch is open (it has seen "b", written after the list).
async fn watching(api: &FakeApi) -> PodEvents {
    api.apply(pod("a", "node-a"));
    let mut events = pod_watcher(api);
    assert_eq!(
        take(&mut events, 3).await,
        ["Init", "InitApply a", "InitDone"]
    );
    api.apply(pod("b", "node-a"));
    assert_eq!(take(&mut events, 1).await, ["Apply b"]);
    events
}

#[tokio::test]
async fn lists_pods_with_selectors() {
    let api = FakeApi::start(MESH_AGENT_KINDS).await;
    api.apply(pod("a", "node-a"));
    api.apply(pod("b", "node-b"));
    let pods = Api::<Pod>::all(api.client());
    let names = |pods: Vec<Pod>| pods.iter().map(ResourceExt::name_any).collect::<Vec<_>>();

    let all = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(all.metadata.resource_version.as_deref(), Some("2"));
    assert_eq!(names(all.items), ["a", "b"]);
    let on_a = pods
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    assert_eq!(names(on_a.items), ["a"]);
    let labelled_b = pods
        .list(&ListParams::default().labels("app=b"))
        .await
        .unwrap();
    assert_eq!(names(labelled_b.items), ["b"]);
    let elsewhere = Api::<Pod>::namespaced(api.client(), "other");
    assert!(
        elsewhere
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn watcher_sees_the_list_then_changes() {
    let api = FakeApi::start(MESH_AGENT_KINDS).await;
    api.apply(pod("a", "node-a"));
    let mut events = pod_watcher(&api);
    assert_eq!(
        take(&mut events, 3).await,
        ["Init", "InitApply a", "InitDone"]
    );
    api.apply(pod("b", "node-a"));
    api.apply(pod("a", "node-b"));
    assert!(api.delete("v1", "Pod", Some("default"), "b"));
    assert!(!api.delete("v1", "Pod", Some("default"), "b"));
    assert_eq!(
        take(&mut events, 3).await,
        ["Apply b", "Apply a", "Delete b"]
    );

    // What kube's default watcher asks for.
    let (lists, watches) = pod_requests(&api);
    assert_eq!(lists, ["GET /api/v1/pods?&limit=500"]);
    let watch = "GET /api/v1/pods?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=1";
    assert_eq!(watches, [watch]);
}

#[tokio::test]
async fn streaming_list_ends_with_the_initial_events_bookmark() {
    let api = FakeApi::start(MESH_AGENT_KINDS).await;
    api.apply(pod("a", "node-a"));
    let config = watcher::Config::default().streaming_lists();
    let mut events = watcher(Api::<Pod>::all(api.client()), config).boxed();
    // kube 2.0.1 sends no Init before a streaming list.
    assert_eq!(take(&mut events, 2).await, ["InitApply a", "InitDone"]);
    api.apply(pod("b", "node-a"));
    assert_eq!(take(&mut events, 1).await, ["Apply b"]);
    let (_, watches) = pod_requests(&api);
    assert!(
        watches[0].contains("&sendInitialEvents=true&"),
        "{watches:?}"
    );
}

#[tokio::test]
async fn watch_ends_after_its_timeout() {
    let api = FakeApi::start(MESH_AGENT_KINDS).await;
    api.apply(pod("a", "node-a"));
    let pods = Api::<Pod>::all(api.client());
    let stream = pods
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap();
    let within = Duration::from_secs(3);
    let events = tokio::time::timeout(within, stream.collect::<Vec<_>>()).await;
    let events = events.expect("the watch ended after timeoutSeconds");
    assert!(matches!(events.as_slice(), [Ok(WatchEvent::Added(pod))] if pod.name_any() == "a"));
}

#[tokio::test]
async fn watcher_resumes_after_a_dropped_watch() {
    let api = FakeApi::start(MESH_AGENT_KINDS).await;
    let mut events = watching(&api).await;
    // No await in between: the watcher cannot come back before "c" is written.
    api.drop_watches();
    api.apply(pod("c", "node-a"));
    assert_eq!(take(&mut events, 1).await, ["Apply c"]);

    let (lists, watches) = pod_requests(&api);
    assert_eq!(lists.len(), 1, "{lists:?}");
    assert_eq!(watches.len(), 2, "{watches:?}");
    assert!(watches[1].ends_with("&resourceVersion=2"), "{watches:?}");
}

#[tokio::test]
async fn watcher_relists_after_410_gone() {
    let api = FakeApi::start(MESH_AGENT_KINDS).await;
    let mut events = watching(&api).await;
    api.drop_watches();
    api.apply(pod("c", "node-a"));
    api.compact();

    match next(&mut events).await {
        Err(watcher::Error::WatchError(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected 410 Gone, got {other:?}"),
    }
    let relisted = take(&mut events, 5).await;
    assert_eq!(
        relisted,
        [
            "Init",
            "InitApply a",
            "InitApply b",
            "InitApply c",
            "InitDone"
        ]
    );
    let (lists, watches) = pod_requests(&api);
    assert_eq!(lists.len(), 2, "{lists:?}");
    assert!(watches[1].ends_with("&resourceVersion=2"), "{watches:?}");
}

#[tokio::test]
async fn watcher_resumes_from_a_bookmark() {
    let api = FakeApi::start(MESH_AGENT_KINDS).await;
    let mut events = watching(&api).await;
    api.apply(config_map("unrelated"));
    api.bookmark();
    api.apply(pod("c", "node-a"));
    assert_eq!(take(&mut events, 1).await, ["Apply c"]);

    let bookmarked = api.apply(config_map("unrelated-too"));
    assert_eq!(bookmarked["metadata"]["resourceVersion"], "5");
    api.bookmark();
    api.drop_watches();
    api.apply(pod("d", "node-a"));
    assert_eq!(take(&mut events, 1).await, ["Apply d"]);
    let (lists, watches) = pod_requests(&api);
    assert_eq!(lists.len(), 1, "{lists:?}");
    assert!(
        watches.last().unwrap().ends_with("&resourceVersion=5"),
        "{watches:?}"
    );
}

#[tokio::test]
async fn watcher_backs_off_through_api_errors() {
    let api = FakeApi::start(MESH_AGENT_KINDS).await;
    api.apply(pod("a", "node-a"));
    api.fail_next(2, 500);
    let mut events: PodEvents = watcher(Api::<Pod>::all(api.client()), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut seen = Vec::new();
    while seen.last().is_none_or(|last| last != "InitDone") {
        match next(&mut events).await {
            Ok(event) => seen.push(describe(event)),
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) => {
                assert_eq!(
                    (status.code, status.reason.as_str()),
                    (500, "InternalError")
                );
                seen.push("500".into());
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "Init",
            "500",
            "Init",
            "500",
            "Init",
            "InitApply a",
            "InitDone"
        ]
    );
}

#[tokio::test]
async fn token_review_authenticates_known_tokens_for_their_audiences() {
    let api = FakeApi::start(MESH_AGENT_KINDS).await;
    let extra = [(
        "authentication.kubernetes.io/pod-name".to_owned(),
        vec!["app-1".to_owned()],
    )];
    api.add_token(
        "good",
        TokenUser {
            username: "system:serviceaccount:default:app".into(),
            uid: "sa-uid".into(),
            groups: vec!["system:serviceaccounts".into()],
            extra: extra.into_iter().collect(),
            audiences: vec!["mesh-ca".into()],
        },
    );
    let reviews = Api::<TokenReview>::all(api.client());
    let review = async |token: &str, audiences: &[&str]| -> TokenReviewStatus {
        let spec = TokenReviewSpec {
            token: Some(token.into()),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
        };
        let review = TokenReview {
            spec,
            ..Default::default()
        };
        reviews
            .create(&PostParams::default(), &review)
            .await
            .unwrap()
            .status
            .unwrap()
    };

    let known = review("good", &["mesh-ca"]).await;
    assert_eq!(known.authenticated, Some(true));
    assert_eq!(known.audiences, Some(vec!["mesh-ca".to_owned()]));
    let user = known.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:default:app")
    );
    assert_eq!(
        user.extra.unwrap()["authentication.kubernetes.io/pod-name"],
        ["app-1"]
    );

    let unknown = review("bad", &["mesh-ca"]).await;
    assert_eq!(unknown.authenticated, Some(false));
    assert!(unknown.error.is_some());
    let wrong_audience = review("good", &["other"]).await;
    assert_eq!(wrong_audience.authenticated, Some(false));
    assert!(wrong_audience.user.is_none());
}

#[tokio::test]
async fn recorder_events_land_in_the_store() {
    let api = FakeApi::start(MESH_AGENT_KINDS).await;
    let pod: Pod = serde_json::from_value(api.apply(pod("a", "node-a"))).unwrap();
    let reporter = Reporter {
        controller: "mesh-agent".into(),
        instance: Some("node-a".into()),
    };
    let recorder = Recorder::new(api.client(), reporter);
    let event = Event {
        type_: EventType::Warning,
        reason: "PolicyRejected".into(),
        note: Some("unknown field".into()),
        action: "Apply".into(),
        secondary: None,
    };
    // The second publish of the same event is a merge patch bumping its series.
    recorder
        .publish(&event, &pod.object_ref(&()))
        .await
        .unwrap();
    recorder
        .publish(&event, &pod.object_ref(&()))
        .await
        .unwrap();

    let events = api.objects("events.k8s.io/v1", "Event");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "PolicyRejected");
    assert_eq!(events[0]["regarding"]["name"], "a");
    assert_eq!(events[0]["series"]["count"], 2);
    assert!(api.objects("v1", "Event").is_empty());
}

#[tokio::test]
async fn config_maps_support_crud_with_conflicts() {
    let api = FakeApi::start(MESH_AGENT_KINDS).await;
    let maps = Api::<ConfigMap>::default_namespaced(api.client());
    let code = |result: Result<ConfigMap, kube::Error>| match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    };
    let map: ConfigMap = serde_json::from_value(config_map("ca")).unwrap();

    let created = maps.create(&PostParams::default(), &map).await.unwrap();
    assert_eq!(code(maps.create(&PostParams::default(), &map).await), 409);
    let mut stale = created.clone();
    stale.data = Some([("a".to_owned(), "1".to_owned())].into());
    let replaced = maps
        .replace("ca", &PostParams::default(), &stale)
        .await
        .unwrap();
    assert_eq!(
        code(maps.replace("ca", &PostParams::default(), &stale).await),
        409
    );
    assert_eq!(replaced.uid(), created.uid());

    let merge = Patch::Merge(json!({ "data": { "a": null, "b": "2" } }));
    let patched = maps
        .patch("ca", &PatchParams::default(), &merge)
        .await
        .unwrap();
    assert_eq!(
        patched.data,
        Some([("b".to_owned(), "2".to_owned())].into())
    );
    let apply =
        Patch::Apply(json!({ "apiVersion": "v1", "kind": "ConfigMap", "data": { "c": "3" } }));
    let applied = maps
        .patch("new", &PatchParams::apply("mesh-agent"), &apply)
        .await
        .unwrap();
    assert_eq!(
        applied.data,
        Some([("c".to_owned(), "3".to_owned())].into())
    );

    maps.delete("ca", &DeleteParams::default()).await.unwrap();
    assert_eq!(code(maps.get("ca").await), 404);
    assert_eq!(api.objects("v1", "ConfigMap").len(), 1);
}
