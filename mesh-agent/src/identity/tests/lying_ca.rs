//! A cluster CA that lies: it serves HTTPS with a certificate from the
//! agent's `--ca-root`, answers every request 200, and hands back a leaf
//! that chains to another root, names another identity, or carries another
//! key than the one the agent sent. The agent refuses each, says why, and
//! holds no certificate for the identity afterwards.

use std::net::SocketAddr;

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{cluster_ca::within, *};
use crate::identity::{
    ca::Ca,
    ca_client::{SignRequest, SignResponse},
};

#[derive(Clone, Copy, Debug)]
enum Lie {
    /// Signed by a root the agent does not trust.
    ForeignRoot,
    /// The agent's key, our root, someone else's identity.
    WrongIdentity,
    /// Our root, the identity asked for, a key the agent never had.
    WrongKey,
}

/// The lying CA: serves on 127.0.0.1 until dropped.
pub(super) struct LyingCa {
    pub(super) addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LyingCa {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ca_in(dir: &TempDir) -> Arc<Ca> {
    let provider = rustls::crypto::ring::default_provider();
    Arc::new(
        Ca::from_source(
            &CaSource::Generate {
                dir: dir.path("ca"),
            },
            TD,
            &provider,
        )
        .unwrap(),
    )
}

async fn lying_ca(trusted: Arc<Ca>, other: Arc<Ca>, lie: Lie) -> LyingCa {
    let tls_ca = trusted.clone();
    stand_in(&tls_ca, move |body| lie_to(&trusted, &other, lie, body)).await
}

/// A cluster CA stand-in serving HTTPS with a certificate from `tls_ca`,
/// answering every request 200 with what `answer` makes of its body.
pub(super) async fn stand_in(
    tls_ca: &Ca,
    answer: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static,
) -> LyingCa {
    let answer = Arc::new(answer);
    let trusted = tls_ca;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let server = trusted
        .issue_server(&["127.0.0.1".to_owned()], now - hour, now + hour)
        .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![server.cert], server.key.into())
    .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let answer = answer.clone();
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let answer = answer.clone();
                async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    let answer = answer(&body);
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(answer))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc),
            );
        }
    });
    LyingCa { addr, task }
}

/// A 200 answer to `body` (a [`SignRequest`]) holding the lie.
fn lie_to(trusted: &Ca, other: &Ca, lie: Lie, body: &[u8]) -> Vec<u8> {
    let request: SignRequest = serde_json::from_slice(body).unwrap();
    let csr = rcgen::CertificateSigningRequestParams::from_pem(&request.csr).unwrap();
    let now = SystemTime::now();
    let (from, to) = (
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let asked = id("default", "web");
    let (leaf, root) = match lie {
        Lie::ForeignRoot => (
            other.sign_workload(&asked, &csr.public_key, from, to),
            &other.root,
        ),
        Lie::WrongIdentity => (
            trusted.sign_workload(&id("prod", "db"), &csr.public_key, from, to),
            &trusted.root,
        ),
        Lie::WrongKey => (
            trusted.sign_workload(&asked, &KeyPair::generate().unwrap(), from, to),
            &trusted.root,
        ),
    };
    serde_json::to_vec(&SignResponse {
        certificate_chain: vec![leaf.unwrap().pem()],
        root: root.pem.clone(),
    })
    .unwrap()
}

#[tokio::test]
async fn answers_that_do_not_chain_name_another_identity_or_carry_another_key_are_refused() {
    within(async {
        let dir = TempDir::new("lying-ca");
        let trusted = ca_in(&TempDir::new("lying-ca-trusted"));
        let other = ca_in(&TempDir::new("lying-ca-other"));
        let root = dir.write("root-cert.pem", &trusted.root.pem);
        let token = dir.write("token", "a-token\n");
        let web = id("default", "web");
        for (lie, says) in [
            (Lie::ForeignRoot, "it does not chain to --ca-root"),
            (
                Lie::WrongIdentity,
                "it names spiffe://cluster.local/ns/prod/sa/db",
            ),
            (Lie::WrongKey, "it is not for the key we sent"),
        ] {
            let ca = lying_ca(trusted.clone(), other.clone(), lie).await;
            let address = format!("https://127.0.0.1:{}", ca.addr.port());
            let client = CaClient::new(&address, &root, &token).unwrap();
            let err = client.sign(&web).await.unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "unusable certificate for spiffe://cluster.local/ns/default/sa/web: {says}"
                )) && err.contains(&address),
                "{lie:?}: {err}"
            );

            // The agent's manager keeps nothing of it: no certificate, so
            // no handshake with that identity.
            let m = CertManager::new(CaConfig {
                trust_domain: TD.into(),
                cert_ttl: Duration::from_secs(3600),
                source: CaSource::Remote {
                    address,
                    root: root.clone(),
                    token: token.clone(),
                },
                trust_bundle: None,
            })
            .unwrap();
            let err = m.prepare(&web).await.unwrap_err().to_string();
            assert!(err.contains(says), "{lie:?}: {err}");
            assert!(m.certificate(&web).is_err(), "{lie:?}");
            assert!(
                matches!(m.server_config(&web), Err(IdentityError::NotReady(_))),
                "{lie:?}"
            );
        }
    })
    .await
}
