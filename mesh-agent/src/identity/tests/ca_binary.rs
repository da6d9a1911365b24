//! `mesh-agent ca` and `mesh-agent waypoint --kubernetes --ca-address` run
//! as the binary, not as in-process pieces: their command lines, their
//! Kubernetes clients from KUBECONFIG, against the API stand-in served on
//! loopback. The CA publishes its root in the ConfigMap and signs (or
//! refuses) a node agent's request; the waypoint reads its configuration
//! from the API, gets its own certificate from that CA and is ready; so
//! does `mesh-agent gateway`, which serves its listener with the
//! certificate of a Secret it watches in its own namespace only.

use std::process::{Child, Command, Stdio};

use serde_json::json;

use super::{
    cluster_ca::{AGENT_SA, NODE_NAME, POD_NAME, POD_UID, within},
    *,
};
use crate::cluster::fake_api::{self, TokenUser};

/// Where the CA and the waypoint listen: addresses of their own on
/// loopback, so the fixed ports cannot meet another test's.
const HOST: &str = "127.0.16.1";
const WAYPOINT: &str = "127.0.16.2";
const GATEWAY: &str = "127.0.16.3";

/// The agent binary next to this test binary (`target/<profile>/`), which
/// `cargo xtask ci` builds before the unit tests.
fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("mesh-agent"))
        .unwrap();
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p mesh-agent`, which `cargo xtask ci` runs before the unit tests)",
        bin.display()
    );
    bin
}

/// A process of the binary, killed when dropped; its log is shown on
/// failure.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(dir: &TempDir, name: &str, kubeconfig: &Path, args: &[&str]) -> Process {
        let log = dir.path(&format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(agent_binary())
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Process { child, log }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} ---\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// One HTTP/1.0 GET: the status and the body (0 when nothing answers).
async fn get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n");
    let mut answer = String::new();
    if s.write_all(req.as_bytes()).await.is_err() || s.read_to_string(&mut answer).await.is_err() {
        return (0, String::new());
    }
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|x| x.1.to_owned());
    (status, body.unwrap_or_default())
}

#[tokio::test]
async fn mesh_agent_ca_runs_as_the_binary_against_the_api_stand_in() {
    within(async {
        let fake = fake_api::start().await;
        let dir = TempDir::new("ca-binary");
        let kubeconfig = dir.write(
            "kubeconfig",
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n\
                 users:\n- name: nobody\n  user: {{}}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: nobody\n\
                 current-context: stand-in\n",
                fake.url()
            ),
        );
        let ca_dir = dir.path("ca").display().to_string();
        let _ca = Process::start(
            &dir,
            "ca",
            &kubeconfig,
            &[
                "ca",
                "--listen",
                &format!("{HOST}:15012"),
                "--ready-addr",
                &format!("{HOST}:15021"),
                "--ca-dir",
                &ca_dir,
                "--server-names",
                HOST,
            ],
        );

        // It publishes the root it generated, through the stand-in.
        let root_pem = loop {
            let published = fake
                .objects("v1", "ConfigMap")
                .into_iter()
                .find(|cm| {
                    cm["metadata"]["namespace"] == "mesh-system"
                        && cm["metadata"]["name"] == "mesh-ca-root"
                })
                .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(str::to_owned));
            if let Some(pem) = published {
                break pem;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let on_disk = std::fs::read_to_string(dir.path("ca").join("root-cert.pem")).unwrap();
        assert_eq!(root_pem, on_disk);

        // A node agent's client, trusting that root, with a token the
        // stand-in reviews: its pod's identity is signed, another node's
        // is refused with the reason.
        fake.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "default"},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": []},
            "status": {"phase": "Running"},
        }));
        fake.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "db-1", "namespace": "prod"},
            "spec": {"nodeName": "node-b", "serviceAccountName": "db", "containers": []},
            "status": {"phase": "Running"},
        }));
        fake.add_token(
            "token-node-a",
            TokenUser {
                username: AGENT_SA.into(),
                uid: "uid-node-a".into(),
                groups: vec!["system:serviceaccounts".into()],
                extra: [(NODE_NAME.to_owned(), vec!["node-a".to_owned()])].into(),
                audiences: vec!["mesh-ca".into()],
            },
        );
        let root = dir.write("root-cert.pem", &root_pem);
        let token = dir.write("token", "token-node-a\n");
        let client = CaClient::new(&format!("https://{HOST}:15012"), &root, &token).unwrap();
        let web = id("default", "web");
        let cert = loop {
            // The listener may not be up yet when the root is published.
            match client.sign(&web).await {
                Ok(cert) => break cert,
                Err(e) if e.to_string().contains("connecting to") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        verify_chain(&cert.chain[0], &der_of_pem(&root_pem)).unwrap();
        let err = client.sign(&id("prod", "db")).await.unwrap_err().to_string();
        assert!(
            err.contains("403") && err.contains("node-a"),
            "another node's identity: {err}"
        );

        // A waypoint, configured from the API, its certificate from the CA.
        for obj in [
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": "shop"},
                "spec": {"gatewayClassName": "istio-waypoint",
                         "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
            }),
        ] {
            fake.apply(obj);
        }
        let pod = fake.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "waypoint-1", "namespace": "shop",
                         "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint",
                                    "istio.io/dataplane-mode": "none"}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "waypoint", "containers": []},
            "status": {"phase": "Running", "podIP": WAYPOINT, "podIPs": [{"ip": WAYPOINT}]},
        }));
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
        fake.add_token(
            "token-waypoint",
            TokenUser {
                username: "system:serviceaccount:shop:waypoint".into(),
                uid: "uid-waypoint".into(),
                groups: vec!["system:serviceaccounts".into()],
                extra: [
                    (POD_NAME.to_owned(), vec!["waypoint-1".to_owned()]),
                    (POD_UID.to_owned(), vec![uid]),
                ]
                .into(),
                audiences: vec!["mesh-ca".into()],
            },
        );
        let waypoint_token = dir.write("waypoint-token", "token-waypoint\n");
        let at = |port: u16| format!("{WAYPOINT}:{port}");
        let state = dir.path("waypoint").display().to_string();
        let _waypoint = Process::start(
            &dir,
            "waypoint",
            &kubeconfig,
            &[
                "waypoint",
                "--kubernetes",
                "--ca-address",
                &format!("https://{HOST}:15012"),
                "--ca-root",
                &root.display().to_string(),
                "--ca-token",
                &waypoint_token.display().to_string(),
                "--pod-name",
                "waypoint-1",
                "--pod-namespace",
                "shop",
                "--listen",
                &at(15008),
                "--admin-addr",
                &at(15000),
                "--metrics-addr",
                &at(15020),
                "--ready-addr",
                &at(15021),
                "--state-dir",
                &state,
            ],
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while get(&at(15021), "/healthz/ready").await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the waypoint is not ready:\n{}",
                std::fs::read_to_string(&_waypoint.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let own = "spiffe://cluster.local/ns/shop/sa/waypoint";
        // Ready means it holds its certificate, from the CA, before any
        // connection asked for it.
        let (_, body) = get(&at(15000), "/config_dump").await;
        let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
        let certs = dump["certificates"].as_array().unwrap();
        assert!(
            certs.iter().any(|c| c["identity"] == own && c["role"] == "workload"),
            "{dump:#}"
        );
        let root_serial = leaf_serial(&der_of_pem(&root_pem));
        let roots: Vec<_> = certs
            .iter()
            .filter(|c| c["role"] == "root")
            .map(|c| c["serial"].clone())
            .collect();
        assert_eq!(roots, [serde_json::Value::from(root_serial)], "{dump:#}");

        // An ingress gateway, configured from the API: its identity from
        // the CA, its listener's certificate from a Secret of its own
        // namespace, read by a watch of that namespace only.
        let cert = rcgen::generate_simple_self_signed(vec!["shop.example.com".to_owned()]).unwrap();
        for obj in [
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": "public", "namespace": "shop"},
                "spec": {"gatewayClassName": "mesh-ingress",
                         "listeners": [{"name": "https", "port": 18443, "protocol": "HTTPS",
                                        "hostname": "shop.example.com",
                                        "tls": {"certificateRefs": [{"name": "shop-cert"}]}}]},
            }),
            json!({
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": "shop-cert", "namespace": "shop"},
                "stringData": {"tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem()},
            }),
        ] {
            fake.apply(obj);
        }
        let pod = fake.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "public-1", "namespace": "shop",
                         "labels": {"gateway.networking.k8s.io/gateway-name": "public",
                                    "istio.io/dataplane-mode": "none"}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "public-gw", "containers": []},
            "status": {"phase": "Running", "podIP": GATEWAY, "podIPs": [{"ip": GATEWAY}]},
        }));
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
        fake.add_token(
            "token-gateway",
            TokenUser {
                username: "system:serviceaccount:shop:public-gw".into(),
                uid: "uid-gateway".into(),
                groups: vec!["system:serviceaccounts".into()],
                extra: [
                    (POD_NAME.to_owned(), vec!["public-1".to_owned()]),
                    (POD_UID.to_owned(), vec![uid]),
                ]
                .into(),
                audiences: vec!["mesh-ca".into()],
            },
        );
        let gateway_token = dir.write("gateway-token", "token-gateway\n");
        let gw_at = |port: u16| format!("{GATEWAY}:{port}");
        let state = dir.path("gateway").display().to_string();
        let gateway = Process::start(
            &dir,
            "gateway",
            &kubeconfig,
            &[
                "gateway",
                "--kubernetes",
                "--ca-address",
                &format!("https://{HOST}:15012"),
                "--ca-root",
                &root.display().to_string(),
                "--ca-token",
                &gateway_token.display().to_string(),
                "--pod-name",
                "public-1",
                "--pod-namespace",
                "shop",
                "--listen",
                &gw_at(15008),
                "--admin-addr",
                &gw_at(15000),
                "--metrics-addr",
                &gw_at(15020),
                "--ready-addr",
                &gw_at(15021),
                "--state-dir",
                &state,
            ],
        );
        let log = || std::fs::read_to_string(&gateway.log).unwrap_or_default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while get(&gw_at(15021), "/healthz/ready").await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway is not ready:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The handshake for the listener's name presents the Secret's
        // certificate (the client trusts nothing else).
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls::pki_types::ServerName::try_from("shop.example.com").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let handshake = async {
                let tcp = tokio::net::TcpStream::connect(gw_at(18443)).await?;
                connector.connect(name.clone(), tcp).await
            };
            match handshake.await {
                Ok(_) => break,
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "no handshake with the Secret's certificate: {e}\n{}",
                    log()
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secrets: Vec<String> = fake
            .requests()
            .into_iter()
            .filter(|r| r.contains("secrets"))
            .collect();
        assert!(
            !secrets.is_empty() && secrets.iter().all(|r| r.contains("/api/v1/namespaces/shop/secrets")),
            "Secrets read outside the gateway's namespace: {secrets:?}"
        );
    })
    .await
}
