//! The node agent's side of the cluster CA (`mesh-agent ca`): a fresh key and
//! CSR per certificate, one HTTPS request proving who we are with the
//! ServiceAccount token, and the answer checked against the configured root
//! before anything uses it.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Request, StatusCode, Uri,
    body::Bytes,
    header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue},
};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::{
    ClientConfig, RootCertStore,
    crypto::WebPkiSupportedAlgorithms,
    pki_types::pem::PemObject,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{
    Identity, IdentityError, WorkloadCert,
    ca::{CertFacts, RootCert},
    verify,
};

/// Where the CA takes certificate requests.
pub(super) const SIGN_PATH: &str = "/v1/certificates";
/// Every request, from connecting to the last byte of the answer.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A chain of a few certificates and a root fits many times over.
const MAX_ANSWER: usize = 256 * 1024;

/// `POST /v1/certificates` body.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SignRequest {
    /// PEM PKCS#10 request with one URI SAN, the SPIFFE ID.
    pub(super) csr: String,
}

/// The CA's answer to a granted request.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SignResponse {
    /// PEM, leaf first, then intermediates (not the root).
    pub(super) certificate_chain: Vec<String>,
    /// PEM.
    pub(super) root: String,
}

/// The CA's answer to anything it refused.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ErrorBody {
    pub(super) error: String,
}

/// A client of the cluster CA, trusting only the configured root.
pub struct CaClient {
    /// As configured, for messages.
    address: String,
    /// `host:port` to connect to.
    connect: String,
    /// The `Host` header.
    authority: HeaderValue,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    token: PathBuf,
    root: RootCert,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for CaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaClient")
            .field("address", &self.address)
            .field("token", &self.token)
            .field("root", &self.root.facts.subject)
            .finish_non_exhaustive()
    }
}

impl CaClient {
    /// `address` is `https://host[:port]`; `root` the PEM root certificate
    /// (the mesh's trust anchor, and the only one the CA's own certificate
    /// may chain to); `token` the file holding the ServiceAccount token.
    pub fn new(address: &str, root: &Path, token: &Path) -> Result<CaClient, IdentityError> {
        let bad = |reason: &str| IdentityError::BadCaAddress {
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = address
            .parse()
            .map_err(|e| bad(&format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must start with https://"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad(
                "must be https://host[:port] without a path: the request path is fixed",
            ));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("must not carry user information"));
        }
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(443);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(bare.to_owned())
            .map_err(|e| bad(&format!("{bare:?} is not a DNS name or IP address: {e}")))?;
        let connect = if bare.contains(':') {
            format!("[{bare}]:{port}")
        } else {
            format!("{bare}:{port}")
        };
        let authority = HeaderValue::from_str(authority.as_str())
            .map_err(|e| bad(&format!("not usable as a Host header: {e}")))?;

        let root = RootCert::load(root)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algs = provider.signature_verification_algorithms;
        let mut anchors = RootCertStore::empty();
        anchors.roots.push(root.anchor.clone());
        let mut tls = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Ca(format!("TLS setup for the cluster CA: {e}")))?
            .with_root_certificates(anchors)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(CaClient {
            address: address.to_owned(),
            connect,
            authority,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            token: token.to_owned(),
            root,
            algs,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The configured root.
    pub(super) fn root(&self) -> &RootCert {
        &self.root
    }

    /// A certificate for `id` from the CA, with a key made here for it.
    pub async fn sign(&self, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        let issue_err = |source| IdentityError::Issue {
            identity: Box::new(id.clone()),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(issue_err)?;
        let csr = csr(id, &key).map_err(issue_err)?;
        let token = self.token().await?;
        let body = serde_json::to_vec(&SignRequest { csr }).expect("a string serializes");
        let (status, answer) = tokio::time::timeout(REQUEST_TIMEOUT, self.post(token, body))
            .await
            .map_err(|_| self.error(format!("no answer within {REQUEST_TIMEOUT:?}")))??;
        if status != StatusCode::OK {
            let reason = match serde_json::from_slice::<ErrorBody>(&answer) {
                Ok(body) => body.error,
                Err(_) => String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned(),
            };
            return Err(self.error(format!("refused {id} ({status}): {reason}")));
        }
        let answer: SignResponse = serde_json::from_slice(&answer)
            .map_err(|e| self.error(format!("malformed answer for {id}: {e}")))?;
        self.check(id, key, &answer)
            .map_err(|reason| self.error(format!("unusable certificate for {id}: {reason}")))
    }

    fn error(&self, reason: String) -> IdentityError {
        IdentityError::Remote {
            address: self.address.clone(),
            reason,
        }
    }

    /// The token as it is now: the kubelet replaces the file before the old
    /// token expires.
    async fn token(&self) -> Result<HeaderValue, IdentityError> {
        let bad = |reason: &str| IdentityError::BadFile {
            path: self.token.clone(),
            reason: reason.to_owned(),
        };
        let text = tokio::fs::read_to_string(&self.token)
            .await
            .map_err(|source| IdentityError::Io {
                op: "reading the cluster CA token",
                path: self.token.clone(),
                source,
            })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(bad("empty; a ServiceAccount token is expected"));
        }
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| bad("not a token: it holds characters a header cannot carry"))?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// One request on its own connection: certificates are asked for rarely.
    async fn post(
        &self,
        token: HeaderValue,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), IdentityError> {
        let tcp = TcpStream::connect(&self.connect)
            .await
            .map_err(|e| self.error(format!("connecting to {}: {e}", self.connect)))?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| self.error(format!("TLS handshake: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.error(format!("HTTP: {e}")))?;
        // Ends when the sender is dropped, at the latest.
        tokio::spawn(conn);
        let request = Request::post(SIGN_PATH)
            .header(HOST, self.authority.clone())
            .header(AUTHORIZATION, token)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.error(format!("building the request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.error(format!("HTTP: {e}")))?;
        let status = response.status();
        let answer = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| self.error(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, answer))
    }

    /// The leaf must chain to our root, name exactly `id` and hold our key.
    fn check(
        &self,
        id: &Identity,
        key: KeyPair,
        answer: &SignResponse,
    ) -> Result<WorkloadCert, String> {
        let chain = answer
            .certificate_chain
            .iter()
            .map(|pem| {
                CertificateDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| format!("a chain entry is not a PEM certificate: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Some(leaf) = chain.first() else {
            return Err("the chain is empty".into());
        };
        let end_entity = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| format!("the leaf does not parse: {e}"))?;
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            end_entity
                .verify_for_usage(
                    self.algs.all,
                    std::slice::from_ref(&self.root.anchor),
                    &chain[1..],
                    UnixTime::now(),
                    usage,
                    None,
                    None,
                )
                .map_err(|e| self.chain_error(e, &answer.root))?;
        }
        let named = verify::spiffe_id(leaf).map_err(|e| e.to_string())?;
        if named != *id {
            return Err(format!("it names {named}"));
        }
        let (_, x509) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("the leaf does not parse: {e}"))?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err("it is not for the key we sent".into());
        }
        let facts = CertFacts::of(&x509);
        Ok(WorkloadCert {
            identity: id.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            serial: facts.serial,
            not_before: facts.not_before,
            not_after: facts.not_after,
        })
    }

    /// Says which root the CA uses when it is not ours: the usual cause
    /// is a --ca-root from an earlier root.
    fn chain_error(&self, e: webpki::Error, their_root: &str) -> String {
        let theirs = CertificateDer::from_pem_slice(their_root.as_bytes()).ok();
        match theirs {
            Some(theirs) if theirs != self.root.der => {
                let serial = x509_parser::parse_x509_certificate(&theirs)
                    .map(|(_, c)| CertFacts::of(&c).serial)
                    .unwrap_or_else(|_| "unparseable".into());
                format!(
                    "it does not chain to --ca-root ({e}); the CA's root has serial {serial}, --ca-root's {}",
                    self.root.facts.serial
                )
            }
            _ => format!("it does not verify against --ca-root: {e}"),
        }
    }
}

/// A PKCS#10 request, PEM, for `key` with the SPIFFE ID as its one URI SAN.
fn csr(id: &Identity, key: &KeyPair) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.serialize_request(key)?.pem()
}

/// When a certificate fetched at `requested` is due for renewal: half way
/// to its end, measured on our clock.
pub(super) fn renew_at(requested: SystemTime, cert: &WorkloadCert) -> SystemTime {
    let life = cert
        .not_after
        .duration_since(requested)
        .unwrap_or(Duration::ZERO);
    requested + life / 2
}
