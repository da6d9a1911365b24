//! The cluster CA over real HTTPS against the fake API server: who gets a
//! certificate, who is refused and why, the published root and the counters.
//! `Cluster` is the harness the remote-mode manager tests share.

use std::{future::Future, net::SocketAddr};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::SanType;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};

use super::*;
use crate::{
    cluster::fake_api::{self, FakeApi, TokenUser},
    config::CaArgs,
    identity::ca_server::{CaServer, ROOT_KEY},
};

pub(super) const AGENT_SA: &str = "system:serviceaccount:mesh-system:mesh-agent";
pub(super) const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub(super) const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub(super) const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Every test is over well before this, or it has hung.
pub(super) async fn within<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), test)
        .await
        .expect("the test did not finish within 30 s")
}

/// A fake API server, a CA serving on 127.0.0.1 and the files an agent
/// needs. Its tasks stop when it is dropped.
pub(super) struct Cluster {
    pub(super) fake: FakeApi,
    pub(super) ca: Arc<CaServer>,
    pub(super) addr: SocketAddr,
    ready: SocketAddr,
    pub(super) dir: TempDir,
    pub(super) root: PathBuf,
    pub(super) ttl: Duration,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Cluster {
    pub(super) async fn start(ttl: Duration) -> Cluster {
        Cluster::start_with(ttl, |_| {}).await
    }

    /// `before` runs on the fake API before the CA publishes its root.
    async fn start_with(ttl: Duration, before: impl FnOnce(&FakeApi)) -> Cluster {
        Cluster::build(ttl, 50, before).await
    }

    /// A CA that lets one address make `burst` requests, and no more for
    /// the length of a test.
    async fn start_limited(burst: u32) -> Cluster {
        Cluster::build(Duration::from_secs(3600), burst, |_| {}).await
    }

    async fn build(ttl: Duration, burst: u32, before: impl FnOnce(&FakeApi)) -> Cluster {
        let fake = fake_api::start().await;
        let dir = TempDir::new("cluster-ca");
        let args = CaArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            ready_addr: "127.0.0.1:0".parse().unwrap(),
            ca_dir: dir.path("ca"),
            trust_domain: TD.into(),
            cert_ttl: ttl,
            server_names: vec!["mesh-ca.mesh-system.svc".into(), "127.0.0.1".into()],
            audience: "mesh-ca".into(),
            agent_service_account: "mesh-system/mesh-agent".into(),
            root_configmap: "mesh-system/mesh-ca-root".into(),
            review_burst: burst,
            review_rate: 0.001,
        };
        let ca = CaServer::new(&args, fake.client()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ready = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, ready_addr) = (listener.local_addr().unwrap(), ready.local_addr().unwrap());
        before(&fake);
        let tasks = vec![
            tokio::spawn(ca.clone().serve(listener)),
            tokio::spawn(ca.clone().serve_ready(ready)),
            tokio::spawn(ca.clone().publish_root()),
        ];
        let root = dir.write("root-cert.pem", ca.root_pem());
        Cluster {
            fake,
            ca,
            addr,
            ready: ready_addr,
            dir,
            root,
            ttl,
            tasks,
        }
    }

    pub(super) fn address(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// A token the fake API knows as `user` with `extra`, in a file.
    pub(super) fn token(
        &self,
        name: &str,
        user: &str,
        extra: &[(&str, &str)],
        audience: &str,
    ) -> PathBuf {
        let token = format!("token-{name}");
        self.fake.add_token(
            &token,
            TokenUser {
                username: user.into(),
                uid: format!("uid-{name}"),
                groups: vec!["system:serviceaccounts".into()],
                extra: extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                    .collect(),
                audiences: vec![audience.into()],
            },
        );
        self.dir
            .write(&format!("{name}.token"), &format!("{token}\n"))
    }

    /// The token of the node agent on `node`.
    pub(super) fn agent_token(&self, node: &str) -> PathBuf {
        self.token(node, AGENT_SA, &[(NODE_NAME, node)], "mesh-ca")
    }

    pub(super) fn client(&self, token: &Path) -> CaClient {
        CaClient::new(&self.address(), &self.root, token).unwrap()
    }

    /// A node agent's manager in remote mode.
    pub(super) fn manager(&self, token: &Path) -> Arc<CertManager> {
        CertManager::new(CaConfig {
            trust_domain: TD.into(),
            cert_ttl: self.ttl,
            source: CaSource::Remote {
                address: self.address(),
                root: self.root.clone(),
                token: token.to_owned(),
            },
            trust_bundle: None,
        })
        .unwrap()
    }

    /// A pod; returns it as stored (with its uid).
    pub(super) fn pod(&self, ns: &str, name: &str, sa: &str, node: &str, phase: &str) -> Value {
        self.fake.apply(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": ns },
            "spec": { "nodeName": node, "serviceAccountName": sa, "containers": [] },
            "status": { "phase": phase },
        }))
    }

    /// One request as any client could send it, over HTTP/1.1 or h2.
    async fn raw(
        &self,
        method: Method,
        token: Option<&str>,
        body: impl Into<Bytes>,
        h2: bool,
    ) -> (StatusCode, Value) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der_of_pem(self.ca.root_pem())).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("mesh-ca.mesh-system.svc").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(if h2 { &b"h2"[..] } else { &b"http/1.1"[..] })
        );
        let mut req = Request::builder()
            .method(method)
            .uri(format!(
                "https://mesh-ca.mesh-system.svc{}",
                "/v1/certificates"
            ))
            .header("content-type", "application/json");
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let io = TokioIo::new(tls);
        let resp = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        };
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn post_csr(&self, token: &str, csr: &str) -> (StatusCode, String) {
        let body = json!({ "csr": csr }).to_string();
        let (status, answer) = self.raw(Method::POST, Some(token), body, false).await;
        (
            status,
            answer["error"].as_str().unwrap_or_default().to_owned(),
        )
    }

    /// GET on the readiness port: status and body.
    pub(super) async fn probe(&self, path: &str) -> (StatusCode, String) {
        let tcp = tokio::net::TcpStream::connect(self.ready).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "ca")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The `mesh_ca_requests_total` line for `result`.
    pub(super) async fn count(&self, result: &str) -> u64 {
        let (_, text) = self.probe("/metrics").await;
        let prefix = format!("mesh_ca_requests_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in\n{text}"))
            .parse()
            .unwrap()
    }
}

/// The reason inside a refused `sign`.
fn refusal(e: IdentityError) -> String {
    match e {
        IdentityError::Remote { reason, .. } => reason,
        other => panic!("expected the CA's refusal, got {other}"),
    }
}

fn csr_with(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// `pem` with the last byte of its DER (inside the signature) changed.
fn tampered(pem: &str) -> String {
    let mut der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    *der.last_mut().unwrap() ^= 0x01;
    let body = base64(&der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn a_pod_on_the_callers_node_gets_its_exact_identity() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        c.pod("default", "web-1", "web", "node-a", "Running");
        let web = id("default", "web");
        let before = SystemTime::now();
        let cert = c.client(&c.agent_token("node-a")).sign(&web).await.unwrap();

        assert_eq!(cert.identity, web);
        assert_eq!(cert.chain.len(), 1);
        verify_chain(&cert.chain[0], &der_of_pem(c.ca.root_pem())).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
        let sans = &x509.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            sans.general_names,
            [x509_parser::extensions::GeneralName::URI(
                "spiffe://cluster.local/ns/default/sa/web"
            )]
        );
        // The embedded CA's profile: not a CA, both EKUs, back-dated.
        assert!(!x509.is_ca());
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let skew = before.duration_since(cert.not_before).unwrap();
        assert!((Duration::from_secs(59)..=Duration::from_secs(62)).contains(&skew));
        let life = cert.not_after.duration_since(before).unwrap();
        assert!(life > Duration::from_secs(3590) && life <= Duration::from_secs(3602));
        assert_eq!(cert.serial, leaf_serial(&cert.chain[0]));
        assert_eq!(c.count("issued").await, 1);
    })
    .await
}

#[tokio::test]
async fn an_identity_running_only_on_another_node_is_forbidden() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        c.pod("prod", "db-1", "db", "node-b", "Running");
        // Neither a finished pod of that identity nor a live pod of another
        // service account in the namespace makes it run on node A.
        c.pod("prod", "db-migrate", "db", "node-a", "Succeeded");
        c.pod("prod", "cache-1", "cache", "node-a", "Running");
        let client = c.client(&c.agent_token("node-a"));
        let reason = refusal(client.sign(&id("prod", "db")).await.unwrap_err());
        assert!(reason.contains("403"), "{reason}");
        assert!(
            reason.contains(
                "no pod with identity spiffe://cluster.local/ns/prod/sa/db runs on node node-a"
            ),
            "{reason}"
        );
        // The pods were asked for by node.
        assert!(
            c.fake
                .requests()
                .iter()
                .any(|r| r.starts_with("GET /api/v1/namespaces/prod/pods?")
                    && r.contains("spec.nodeName%3Dnode-a")),
            "{:?}",
            c.fake.requests()
        );
        // A pod without a service account runs as "default".
        c.pod("prod", "legacy", "", "node-a", "Pending");
        client.sign(&id("prod", "default")).await.unwrap();
        assert_eq!(c.count("forbidden").await, 1);
        assert_eq!(c.count("issued").await, 1);
    })
    .await
}

#[tokio::test]
async fn tokens_that_do_not_prove_a_node_agent_are_refused() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        c.pod("default", "web-1", "web", "node-a", "Running");
        let web = id("default", "web");

        let unknown = c.dir.write("unknown.token", "not-a-token\n");
        let reason = refusal(c.client(&unknown).sign(&web).await.unwrap_err());
        assert!(
            reason.contains("401") && reason.contains("invalid bearer token"),
            "{reason}"
        );

        let audience = c.token("aud", AGENT_SA, &[(NODE_NAME, "node-a")], "kubernetes");
        let reason = refusal(c.client(&audience).sign(&web).await.unwrap_err());
        assert!(reason.contains("401"), "{reason}");

        let app = c.token(
            "app",
            "system:serviceaccount:default:web",
            &[(NODE_NAME, "node-a")],
            "mesh-ca",
        );
        let reason = refusal(c.client(&app).sign(&web).await.unwrap_err());
        assert!(reason.contains("403"), "{reason}");
        assert!(
            reason.contains("system:serviceaccount:default:web may not request certificates")
                && reason.contains("mesh-system/mesh-agent"),
            "{reason}"
        );

        let unbound = c.token("unbound", AGENT_SA, &[], "mesh-ca");
        let reason = refusal(c.client(&unbound).sign(&web).await.unwrap_err());
        assert!(
            reason.contains("403") && reason.contains("token is not bound to a pod"),
            "{reason}"
        );

        let (status, _) = c.raw(Method::POST, None, "{}", false).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        // The token file is read for every request: a rotated token works.
        std::fs::copy(c.agent_token("node-a"), &unknown).unwrap();
        c.client(&unknown).sign(&web).await.unwrap();

        assert_eq!(c.count("unauthenticated").await, 3);
        assert_eq!(c.count("forbidden").await, 2);
        assert_eq!(c.count("issued").await, 1);
    })
    .await
}

#[tokio::test]
async fn the_node_comes_from_the_bound_pod_without_a_node_claim() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        c.pod("default", "web-1", "web", "node-a", "Running");
        let agent = c.pod(
            "mesh-system",
            "mesh-agent-x1",
            "mesh-agent",
            "node-a",
            "Running",
        );
        let uid = agent["metadata"]["uid"].as_str().unwrap();
        let bound = c.token(
            "bound",
            AGENT_SA,
            &[(POD_NAME, "mesh-agent-x1"), (POD_UID, uid)],
            "mesh-ca",
        );
        let cert = c.client(&bound).sign(&id("default", "web")).await.unwrap();
        assert_eq!(cert_identity(&cert.chain[0]).unwrap(), id("default", "web"));

        // The pod moved to node B: the agent there is not the caller.
        c.pod(
            "mesh-system",
            "mesh-agent-x1",
            "mesh-agent",
            "node-b",
            "Running",
        );
        let reason = refusal(
            c.client(&bound)
                .sign(&id("default", "web"))
                .await
                .unwrap_err(),
        );
        assert!(reason.contains("runs on node node-b"), "{reason}");

        let stale = c.token(
            "stale",
            AGENT_SA,
            &[(POD_NAME, "mesh-agent-x1"), (POD_UID, "another-uid")],
            "mesh-ca",
        );
        let reason = refusal(
            c.client(&stale)
                .sign(&id("default", "web"))
                .await
                .unwrap_err(),
        );
        assert!(
            reason.contains("403") && reason.contains("earlier pod"),
            "{reason}"
        );

        let gone = c.token(
            "gone",
            AGENT_SA,
            &[(POD_NAME, "mesh-agent-gone")],
            "mesh-ca",
        );
        let reason = refusal(
            c.client(&gone)
                .sign(&id("default", "web"))
                .await
                .unwrap_err(),
        );
        assert!(
            reason.contains("403")
                && reason.contains("mesh-system/mesh-agent-gone, which does not exist"),
            "{reason}"
        );
    })
    .await
}

#[tokio::test]
async fn malformed_requests_are_bad_requests_with_the_reason() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        c.pod("default", "web-1", "web", "node-a", "Running");
        c.agent_token("node-a");
        let token = "token-node-a";
        let web = "spiffe://cluster.local/ns/default/sa/web";

        let good = csr_with(vec![uri(web)]);
        let cases = [
            ("garbage".to_owned(), "not a PEM CERTIFICATE REQUEST"),
            (
                csr_with(vec![
                    uri(web),
                    uri("spiffe://cluster.local/ns/default/sa/db"),
                ]),
                "exactly one subjectAltName",
            ),
            (
                csr_with(vec![uri("spiffe://other.domain/ns/default/sa/web")]),
                "outside the trust domain cluster.local",
            ),
            (tampered(&good), "signature does not verify"),
            (
                csr_with(vec![SanType::DnsName("web.default".try_into().unwrap())]),
                "is not a URI",
            ),
            (csr_with(vec![]), "it names 0"),
            (
                csr_with(vec![uri("spiffe://cluster.local/web")]),
                "is not a SPIFFE workload ID",
            ),
        ];
        for (csr, why) in &cases {
            let (status, error) = c.post_csr(token, csr).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {error}");
            assert!(error.contains(why), "expected {why:?} in {error:?}");
        }
        // The untampered request is fine.
        let (status, error) = c.post_csr(token, &good).await;
        assert_eq!(status, StatusCode::OK, "{error}");

        let (status, answer) = c
            .raw(Method::POST, Some(token), "{\"pem\": 1}", false)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            answer["error"].as_str().unwrap().contains("csr"),
            "{answer}"
        );
        let (status, _) = c.raw(Method::GET, Some(token), "", false).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let (status, answer) = c
            .raw(Method::POST, Some(token), vec![b' '; 100 * 1024], false)
            .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            answer["error"].as_str().unwrap().contains("over"),
            "{answer}"
        );

        assert_eq!(c.count("bad_request").await, cases.len() as u64 + 3);
        assert_eq!(c.count("issued").await, 1);
        assert_eq!(c.count("error").await, 0);
    })
    .await
}

#[tokio::test]
async fn h2_is_served_too() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        c.pod("default", "web-1", "web", "node-a", "Running");
        c.agent_token("node-a");
        let csr = csr_with(vec![uri("spiffe://cluster.local/ns/default/sa/web")]);
        let body = json!({ "csr": csr }).to_string();
        let (status, answer) = c.raw(Method::POST, Some("token-node-a"), body, true).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["root"].as_str(), Some(c.ca.root_pem()));
        let (status, _) = c.raw(Method::POST, Some("nope"), "{}", true).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    })
    .await
}

#[tokio::test]
async fn api_failures_are_errors_not_refusals() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        c.pod("default", "web-1", "web", "node-a", "Running");
        let client = c.client(&c.agent_token("node-a"));
        // Let the root be published first, so the failure hits the request.
        wait_for_root(&c).await;
        c.fake.fail_next(1, 503);
        let reason = refusal(client.sign(&id("default", "web")).await.unwrap_err());
        assert!(
            reason.contains("500") && reason.contains("TokenReview failed"),
            "{reason}"
        );
        client.sign(&id("default", "web")).await.unwrap();
        assert_eq!(c.count("error").await, 1);
        assert_eq!(c.count("issued").await, 1);
    })
    .await
}

async fn wait_for_root(c: &Cluster) -> Value {
    loop {
        let maps = c.fake.objects("v1", "ConfigMap");
        if let Some(cm) = maps
            .into_iter()
            .find(|cm| cm["metadata"]["name"] == "mesh-ca-root")
        {
            return cm;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_root_is_published_after_api_failures() {
    within(async {
        let c = Cluster::start_with(Duration::from_secs(3600), |fake| fake.fail_next(2, 500)).await;
        let cm = wait_for_root(&c).await;
        assert_eq!(cm["metadata"]["namespace"], "mesh-system");
        assert_eq!(cm["data"][ROOT_KEY].as_str(), Some(c.ca.root_pem()));
        // An agent mounting it trusts the CA.
        let root = c
            .dir
            .write("from-configmap.pem", cm["data"][ROOT_KEY].as_str().unwrap());
        CaClient::new(&c.address(), &root, &c.agent_token("node-a")).unwrap();
        let (status, body) = c.probe("/healthz/ready").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ready\n"));
    })
    .await
}

#[tokio::test]
async fn a_stale_root_in_the_configmap_is_replaced() {
    within(async {
        let c = Cluster::start_with(Duration::from_secs(3600), |fake| {
            fake.apply(json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": { "name": "mesh-ca-root", "namespace": "mesh-system" },
                "data": { ROOT_KEY: "old root", "other": "kept" },
            }));
        })
        .await;
        let cm = loop {
            let cm = wait_for_root(&c).await;
            if cm["data"][ROOT_KEY] != "old root" {
                break cm;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(cm["data"][ROOT_KEY].as_str(), Some(c.ca.root_pem()));
        assert_eq!(cm["data"]["other"], "kept");
    })
    .await
}

#[tokio::test]
async fn the_root_survives_a_restart_of_the_ca() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        let args = CaArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            ready_addr: "127.0.0.1:0".parse().unwrap(),
            ca_dir: c.dir.path("ca"),
            trust_domain: TD.into(),
            cert_ttl: Duration::from_secs(3600),
            server_names: vec!["mesh-ca".into()],
            audience: "mesh-ca".into(),
            agent_service_account: "mesh-system/mesh-agent".into(),
            root_configmap: "mesh-system/mesh-ca-root".into(),
            review_burst: 50,
            review_rate: 5.0,
        };
        let again = CaServer::new(&args, c.fake.client()).unwrap();
        assert_eq!(again.root_pem(), c.ca.root_pem());

        let bad = CaArgs {
            agent_service_account: "mesh-agent".into(),
            ..args
        };
        let err = CaServer::new(&bad, c.fake.client()).err().unwrap();
        assert!(err.to_string().contains("--agent-service-account"), "{err}");
    })
    .await
}

#[test]
fn ca_addresses_are_checked() {
    let dir = TempDir::new("addr");
    let (root, _) = external_ca("root");
    let root = dir.write("root.pem", &root);
    let token = dir.path("token");
    for (address, why) in [
        ("http://ca:15012", "https://"),
        ("https://ca:15012/v1", "without a path"),
        ("ca:15012", "https://"),
        ("https://user@ca:15012", "user information"),
    ] {
        let err = CaClient::new(address, &root, &token).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(address) && msg.contains(why), "{msg}");
    }
    CaClient::new("https://[::1]:15012", &root, &token).unwrap();
    CaClient::new("https://mesh-ca.mesh-system.svc:15012", &root, &token).unwrap();
    let missing = dir.path("missing.pem");
    let err = CaClient::new("https://ca", &missing, &token).unwrap_err();
    assert!(matches!(err, IdentityError::Io { .. }), "{err}");
}

#[tokio::test]
async fn a_waypoint_token_gets_exactly_its_own_pods_identity() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        let waypoint = |name: &str, sa: &str, gateway: bool| {
            let mut labels = json!({});
            if gateway {
                labels["gateway.networking.k8s.io/gateway-name"] = json!("waypoint");
            }
            c.fake.apply(json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": { "name": name, "namespace": "shop", "labels": labels },
                "spec": { "nodeName": "node-a", "serviceAccountName": sa, "containers": [] },
                "status": { "phase": "Running" },
            }))
        };
        // Before its Gateway exists, the label proves nothing.
        let wp = waypoint("waypoint-0", "waypoint", true);
        let early_uid = wp["metadata"]["uid"].as_str().unwrap().to_owned();
        let early = c.token(
            "early",
            "system:serviceaccount:shop:waypoint",
            &[(POD_NAME, "waypoint-0"), (POD_UID, &early_uid)],
            "mesh-ca",
        );
        let reason = refusal(
            c.client(&early)
                .sign(&id("shop", "waypoint"))
                .await
                .unwrap_err(),
        );
        assert!(
            reason.contains("403") && reason.contains("no such Gateway"),
            "{reason}"
        );
        c.fake.apply(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "shop"},
            "spec": {"gatewayClassName": "istio-waypoint", "listeners": []},
        }));
        let uid = wp["metadata"]["uid"].as_str().unwrap().to_owned();
        let user = "system:serviceaccount:shop:waypoint";
        let token = c.token(
            "wp",
            user,
            &[(POD_NAME, "waypoint-0"), (POD_UID, &uid)],
            "mesh-ca",
        );
        // Its own identity: issued, and a remote-mode manager completes it.
        let own = id("shop", "waypoint");
        let cert = c.client(&token).sign(&own).await.unwrap();
        assert_eq!(cert_identity(&cert.chain[0]).unwrap(), own);
        verify_chain(&cert.chain[0], &der_of_pem(c.ca.root_pem())).unwrap();

        // Any other identity, even one running on its node: refused.
        c.pod("shop", "reviews-1", "reviews", "node-a", "Running");
        let reason = refusal(
            c.client(&token)
                .sign(&id("shop", "reviews"))
                .await
                .unwrap_err(),
        );
        assert!(
            reason.contains("403")
                && reason.contains("only its own identity")
                && reason.contains("/ns/shop/sa/reviews"),
            "{reason}"
        );
        // A token bound to a pod that is not a waypoint.
        let plain = waypoint("reviews-2", "reviews", false);
        let plain_uid = plain["metadata"]["uid"].as_str().unwrap().to_owned();
        let not_wp = c.token(
            "notwp",
            "system:serviceaccount:shop:reviews",
            &[(POD_NAME, "reviews-2"), (POD_UID, &plain_uid)],
            "mesh-ca",
        );
        let reason = refusal(
            c.client(&not_wp)
                .sign(&id("shop", "reviews"))
                .await
                .unwrap_err(),
        );
        assert!(
            reason.contains("403") && reason.contains("is not a waypoint"),
            "{reason}"
        );
        // A token of another ServiceAccount bound to the waypoint pod.
        let other = c.token(
            "other",
            "system:serviceaccount:shop:reviews",
            &[(POD_NAME, "waypoint-0"), (POD_UID, &uid)],
            "mesh-ca",
        );
        let reason = refusal(
            c.client(&other)
                .sign(&id("shop", "reviews"))
                .await
                .unwrap_err(),
        );
        assert!(
            reason.contains("403") && reason.contains("runs as waypoint"),
            "{reason}"
        );
        // The pod was replaced since the token was issued.
        let stale = c.token(
            "stale",
            user,
            &[(POD_NAME, "waypoint-0"), (POD_UID, "an-earlier-uid")],
            "mesh-ca",
        );
        let reason = refusal(c.client(&stale).sign(&own).await.unwrap_err());
        assert!(
            reason.contains("403") && reason.contains("earlier pod"),
            "{reason}"
        );
        // The pod of an ingress gateway (its Gateway of an ingress class)
        // gets its own identity the same way; another class, none.
        for (class, issued) in [("mesh-ingress", true), ("istio", true), ("other", false)] {
            c.fake.apply(json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": "shop"},
                "spec": {"gatewayClassName": class, "listeners": []},
            }));
            let signed = c.client(&token).sign(&own).await;
            assert_eq!(signed.is_ok(), issued, "class {class}: {signed:?}");
        }
        assert_eq!(c.count("issued").await, 3);
        assert_eq!(c.count("forbidden").await, 6);
    })
    .await
}

#[tokio::test]
async fn one_address_gets_its_burst_of_token_reviews_then_429() {
    within(async {
        let c = Cluster::start_limited(3).await;
        c.pod("default", "web-1", "web", "node-a", "Running");
        let reviews = |c: &Cluster| {
            c.fake
                .requests()
                .iter()
                .filter(|r| r.contains("tokenreviews"))
                .count()
        };
        for _ in 0..3 {
            let (status, _) = c.post_csr("not-a-token", "x").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
        let (status, reason) = c.post_csr("not-a-token", "x").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            reason,
            "too many certificate requests from 127.0.0.1; retry later"
        );
        // The bucket is the address's, whatever the token: a real agent
        // behind the same address waits too, and the API server is not asked.
        let agent = c.client(&c.agent_token("node-a"));
        let reason = refusal(agent.sign(&id("default", "web")).await.unwrap_err());
        assert!(reason.contains("429"), "{reason}");
        assert_eq!(reviews(&c), 3);
        assert_eq!(c.count("rate_limited").await, 2);
        assert_eq!(c.count("unauthenticated").await, 3);
    })
    .await
}
