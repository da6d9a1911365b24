//! Idle memory: one agent with nothing, then with enrolled pods, then with
//! many more workloads in its store (pods on other nodes, as a cluster's
//! watch would deliver them). Each step waits until the agent shows the
//! new state (enrolled pods; `mesh_config_objects{kind="workloads"}`), lets
//! it settle and reads its resident set.

use std::time::Duration;

use anyhow::Context as _;
use mesh_tests::{
    Pod, Testbed,
    mesh::{namespace_yaml, pod_yaml, with_netns},
};

use super::{Placement, Results, paths::Path, paths::wait_for, status_kib};

/// How long the agent is left alone before its RSS is read: longer than
/// its 5 s period of giving freed memory back.
pub const SETTLE: Duration = Duration::from_secs(6);

/// Keep-alive connections held open in the last step, from one enrolled
/// pod to another: each crosses the agent twice (the client's outbound
/// capture, the server's inbound), with mutual TLS between the two over
/// the agent's own HBONE.
pub const CONNECTIONS: usize = 500;
/// One request per connection every 2 s, as an idle pool's health or
/// keep-alive traffic would go.
const CONNECTIONS_RATE: f64 = CONNECTIONS as f64 / 2.0;
/// How long they are held; the RSS is read after [`SETTLE`] of it.
const CONNECTIONS_SECONDS: f64 = 10.0;

/// A Pod of another node (in the store, never enrolled here), shaped like a
/// Deployment's pod as the API server sends it to a watch: owner, managed
/// fields, one container with env, probes, resources and the projected
/// token volume, status with conditions and a container status.
pub fn remote_pod_yaml(i: usize) -> String {
    let app = i % 500;
    let ip4 = format!("10.100.{}.{}", i / 250, i % 250 + 1);
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: w{app}-7d9c5b6f4-{i:05}
  generateName: w{app}-7d9c5b6f4-
  namespace: elsewhere
  uid: 3f6c1a52-{i:04x}-4b7e-9c1d-5e8f2a7b{app:04x}
  resourceVersion: "{rv}"
  creationTimestamp: "2026-11-20T10:00:00Z"
  labels:
    app: w{app}
    version: v1
    pod-template-hash: 7d9c5b6f4
  annotations:
    kubectl.kubernetes.io/restartedAt: "2026-11-20T09:59:00Z"
    prometheus.io/scrape: "true"
  ownerReferences:
  - apiVersion: apps/v1
    kind: ReplicaSet
    name: w{app}-7d9c5b6f4
    uid: 9a1b2c3d-0000-4000-8000-00000000{app:04x}
    controller: true
    blockOwnerDeletion: true
  managedFields:
  - manager: kube-controller-manager
    operation: Update
    apiVersion: v1
    time: "2026-11-20T10:00:00Z"
    fieldsType: FieldsV1
    fieldsV1:
      f:metadata:
        f:generateName: {{}}
        f:labels:
          .: {{}}
          f:app: {{}}
          f:pod-template-hash: {{}}
          f:version: {{}}
      f:spec:
        f:containers:
          'k:{{"name":"app"}}':
            .: {{}}
            f:env: {{}}
            f:image: {{}}
            f:ports: {{}}
  - manager: kubelet
    operation: Update
    apiVersion: v1
    time: "2026-11-20T10:00:05Z"
    fieldsType: FieldsV1
    subresource: status
    fieldsV1:
      f:status:
        f:conditions: {{}}
        f:containerStatuses: {{}}
        f:podIP: {{}}
        f:podIPs: {{}}
spec:
  nodeName: other-node
  serviceAccountName: sa{app}
  restartPolicy: Always
  terminationGracePeriodSeconds: 30
  dnsPolicy: ClusterFirst
  schedulerName: default-scheduler
  containers:
  - name: app
    image: registry.example.com/team/w{app}:1.4.2
    imagePullPolicy: IfNotPresent
    args: ["--port=8080", "--log-level=info"]
    ports:
    - name: http
      containerPort: 8080
      protocol: TCP
    - name: metrics
      containerPort: 9090
      protocol: TCP
    env:
    - name: LOG_FORMAT
      value: json
    - name: UPSTREAM
      value: http://backend.elsewhere.svc.cluster.local:8080
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    resources:
      requests:
        cpu: 100m
        memory: 128Mi
      limits:
        memory: 256Mi
    readinessProbe:
      httpGet:
        path: /ready
        port: 8080
      periodSeconds: 5
    livenessProbe:
      httpGet:
        path: /healthz
        port: 8080
      periodSeconds: 10
    volumeMounts:
    - name: kube-api-access-{i:05}
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
  volumes:
  - name: kube-api-access-{i:05}
    projected:
      defaultMode: 420
      sources:
      - serviceAccountToken:
          expirationSeconds: 3607
          path: token
      - configMap:
          name: kube-root-ca.crt
          items:
          - key: ca.crt
            path: ca.crt
  tolerations:
  - key: node.kubernetes.io/not-ready
    operator: Exists
    effect: NoExecute
    tolerationSeconds: 300
status:
  phase: Running
  hostIP: 192.168.1.{host}
  podIP: {ip4}
  podIPs:
  - ip: {ip4}
  - ip: fd00:200::{i:x}
  qosClass: Burstable
  startTime: "2026-11-20T10:00:00Z"
  conditions:
  - type: Initialized
    status: "True"
    lastTransitionTime: "2026-11-20T10:00:00Z"
  - type: Ready
    status: "True"
    lastTransitionTime: "2026-11-20T10:00:05Z"
  - type: ContainersReady
    status: "True"
    lastTransitionTime: "2026-11-20T10:00:05Z"
  - type: PodScheduled
    status: "True"
    lastTransitionTime: "2026-11-20T10:00:00Z"
  containerStatuses:
  - name: app
    ready: true
    started: true
    restartCount: 0
    image: registry.example.com/team/w{app}:1.4.2
    imageID: registry.example.com/team/w{app}@sha256:{i:064x}
    containerID: containerd://{i:064x}
    state:
      running:
        startedAt: "2026-11-20T10:00:03Z"
"#,
        rv = 100_000 + i,
        host = i % 200 + 1,
    )
}

pub fn measure(
    results: &mut Results,
    reps: usize,
    pods: usize,
    workloads: usize,
) -> anyhow::Result<()> {
    let mut tb = super::testbed(1, "idle")?;
    let enrolled: Vec<Pod> = (0..pods)
        .map(|i| tb.add_pod(0, &format!("app{i}")))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(pods >= 2, "the idle placement needs at least 2 pods");
    super::paths::start_servers(&mut tb, &enrolled[1])?;
    // Each pod its own ServiceAccount, so its own certificate: the
    // conservative case.
    let pod_docs: Vec<String> = enrolled
        .iter()
        .enumerate()
        .map(|(i, p)| with_netns(&pod_yaml(p, 0, "idle", &format!("sa{i}"), &[]), p))
        .collect();
    let remote_docs: Vec<String> = (0..workloads).map(remote_pod_yaml).collect();
    let namespaces = vec![
        namespace_yaml("idle", true),
        namespace_yaml("elsewhere", false),
    ];
    let args = tb.mesh_args()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let record = |results: &mut Results, metric: &str, value: f64| {
        results.add(Placement::Idle, Path::MeshEbpf, metric, value);
    };
    for rep in 0..reps {
        tb.write_config(&namespaces)?;
        tb.start_agent(0, &args)?;
        let rss = |tb: &Testbed| -> anyhow::Result<f64> {
            std::thread::sleep(SETTLE);
            Ok(status_kib(tb.agent(0).pid(), "VmRSS")? as f64)
        };
        let empty = rss(&tb)?;

        let mut docs = namespaces.clone();
        docs.extend(pod_docs.iter().cloned());
        tb.write_config(&docs)?;
        // Enrolled, and each pod's certificate issued (the root is listed too).
        wait_for(Duration::from_secs(60), || {
            let (_, dump) = tb.agent(0).http("GET", "/config_dump", None)?;
            let dump: mesh_tests::Value = serde_json::from_str(&dump)?;
            let count = |key: &str| dump[key].as_array().map_or(0, Vec::len);
            Ok(count("pods") == pods && count("certificate_summary") > pods)
        })
        .context("enrolling the idle pods")?;
        let with_pods = rss(&tb)?;

        docs.extend(remote_docs.iter().cloned());
        tb.write_config(&docs)?;
        let series = r#"mesh_config_objects{kind="workloads"}"#;
        wait_for(Duration::from_secs(120), || {
            // No series before the first snapshot.
            Ok(tb
                .agent(0)
                .metric(series)
                .is_ok_and(|n| n == (pods + workloads) as f64))
        })
        .context("loading the workloads")?;
        let with_workloads = rss(&tb)?;

        // The connections, with the resident set read while they are open.
        let server = &enrolled[1];
        let target = std::net::SocketAddr::new(server.ip4, super::paths::HTTP_PORT);
        let (with_connections, load) = std::thread::scope(|s| {
            let load = s.spawn(|| {
                super::load(
                    &tb,
                    &enrolled[0],
                    target,
                    CONNECTIONS,
                    CONNECTIONS_RATE,
                    CONNECTIONS_SECONDS,
                    false,
                )
            });
            let rss = rss(&tb);
            let load = load.join().expect("load thread");
            (rss, load)
        });
        let (with_connections, load) = (with_connections?, load?);
        anyhow::ensure!(
            load["errors"].as_u64() == Some(0),
            "requests failed on the idle connections: {load}"
        );

        record(results, "idle_rss_mib", empty / 1024.0);
        record(results, "idle_rss_pods_mib", with_pods / 1024.0);
        record(
            results,
            "idle_rss_pods_workloads_mib",
            with_workloads / 1024.0,
        );
        record(
            results,
            "rss_per_pod_kib",
            (with_pods - empty) / pods as f64,
        );
        record(
            results,
            "rss_per_workload_kib",
            (with_workloads - with_pods) / workloads as f64,
        );
        record(
            results,
            "idle_rss_connections_mib",
            with_connections / 1024.0,
        );
        record(
            results,
            "rss_per_connection_kib",
            (with_connections - with_workloads) / CONNECTIONS as f64,
        );
        // The next repetition starts from nothing: no agent, no saved pods.
        stop_and_uninstall(&mut tb)?;
        println!("    rep {}/{reps} done", rep + 1);
    }
    Ok(())
}

/// Kills the agent of node 0 and removes what it left (pinned programs,
/// saved pods): the next start is from nothing.
pub fn stop_and_uninstall(tb: &mut Testbed) -> anyhow::Result<()> {
    tb.kill_agent(0)?;
    let node = &tb.nodes[0];
    let out = std::process::Command::new(mesh_tests::agent_bin())
        .arg("uninstall")
        .arg("--bpf-dir")
        .arg(&node.bpf_dir)
        .arg("--state-dir")
        .arg(&node.state_dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "mesh-agent uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
