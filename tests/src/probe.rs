//! A hand-held HBONE client for tests: it presents whatever certificate a
//! test asks for (valid, from another root, expired, none), sends any HTTP/2
//! request, or plain garbage, and reports what the server answered and the
//! serial of the certificate it presented. Also writes a CA root for the
//! agents to use (bring-your-own root).

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use http_body_util::Empty;
use hyper::body::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Root file names, the same the agent's embedded CA uses.
pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "mesh test root");
    Ok(p)
}

/// The serial number of a PEM certificate, in lowercase hex, as the
/// agents' `/config_dump` gives it.
pub fn serial_of_pem(pem: &str) -> anyhow::Result<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).context("a PEM certificate")?;
    let cert = pem.parse_x509().context("an X.509 certificate")?;
    Ok(cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Writes a fresh CA root (certificate and key, PEM) into `dir`.
pub fn write_root(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    std::fs::write(dir.join(ROOT_CERT), cert.pem())?;
    std::fs::write(dir.join(ROOT_KEY), key.serialize_pem())?;
    Ok(())
}

/// Which client certificate the probe presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertMode {
    Valid,
    None,
    OtherRoot,
    Expired,
}

impl std::str::FromStr for CertMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "valid" => CertMode::Valid,
            "none" => CertMode::None,
            "other-root" => CertMode::OtherRoot,
            "expired" => CertMode::Expired,
            _ => return Err(format!("unknown cert mode {s}")),
        })
    }
}

fn leaf(
    identity: &str,
    mode: CertMode,
    ca_dir: &Path,
) -> anyhow::Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    if mode == CertMode::Expired {
        p.not_before = now - time::Duration::days(2);
        p.not_after = now - time::Duration::days(1);
    } else {
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::hours(1);
    }
    let cert = if mode == CertMode::OtherRoot {
        let other = Issuer::new(ca_params()?, KeyPair::generate()?);
        p.signed_by(&key, &other)?
    } else {
        let cert_pem = std::fs::read_to_string(ca_dir.join(ROOT_CERT))
            .with_context(|| format!("{}", ca_dir.join(ROOT_CERT).display()))?;
        let key_pem = std::fs::read_to_string(ca_dir.join(ROOT_KEY))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, KeyPair::from_pem(&key_pem)?)?;
        p.signed_by(&key, &issuer)?
    };
    Ok((
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    ))
}

/// Accepts any server: the probe tests the server's checks, not its own.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What the probe does once connected.
#[derive(Debug)]
pub struct Probe {
    pub addr: SocketAddr,
    pub identity: String,
    pub cert: CertMode,
    pub ca_dir: std::path::PathBuf,
    /// `CONNECT` or any other method; `GARBAGE` sends plaintext instead of TLS.
    pub method: String,
    pub authority: String,
    /// Bytes to send through a tunnel that was opened.
    pub send: usize,
    /// Extra request headers (`header=name:value`).
    pub headers: Vec<(String, String)>,
}

pub async fn run(p: Probe) -> Value {
    match run_inner(&p).await {
        Ok(v) => v,
        Err((stage, e)) => json!({ "ok": false, "stage": stage, "error": format!("{e:#}") }),
    }
}

type Fail = (&'static str, anyhow::Error);

fn at<T, E: Into<anyhow::Error>>(stage: &'static str, r: Result<T, E>) -> Result<T, Fail> {
    r.map_err(|e| (stage, e.into()))
}

async fn run_inner(p: &Probe) -> Result<Value, Fail> {
    let connect = tokio::net::TcpStream::connect(p.addr);
    let mut tcp = at(
        "tcp",
        tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .context("timeout")
            .and_then(|r| r.map_err(Into::into)),
    )?;
    if p.method == "GARBAGE" {
        at(
            "garbage",
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await,
        )?;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .map(|r| r.unwrap_or(0))
            .unwrap_or(0);
        return Ok(json!({
            "ok": true, "stage": "garbage", "reply_len": n,
            "reply_is_tls_alert": n > 0 && buf[0] == 0x15,
            "reply_text": String::from_utf8_lossy(&buf[..n.min(64)]),
        }));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = at(
        "tls",
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13]),
    )?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = if p.cert == CertMode::None {
        builder.with_no_client_auth()
    } else {
        let (cert, key) = at("cert", leaf(&p.identity, p.cert, &p.ca_dir))?;
        at("cert", builder.with_client_auth_cert(vec![cert], key))?
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::IpAddress(p.addr.ip().into());
    let tls = at(
        "tls",
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await,
    )?;
    let version = tls.get_ref().1.protocol_version().map(|v| format!("{v:?}"));
    let alpn = tls
        .get_ref()
        .1
        .alpn_protocol()
        .map(|a| String::from_utf8_lossy(a).into_owned());
    // The server's certificate, by its serial as the agent's dump shows it.
    let server_serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
        .map(|(_, cert)| {
            cert.raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        });
    let (mut sender, conn) = at(
        "http",
        hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await,
    )?;
    tokio::spawn(conn);
    let uri = if p.method == "CONNECT" {
        p.authority.clone()
    } else {
        format!("https://{}/", p.authority)
    };
    let mut req = hyper::Request::builder().method(p.method.as_str()).uri(uri);
    for (name, value) in &p.headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let req = at("http", req.body(Empty::<Bytes>::new()))?;
    let resp = at("http", sender.send_request(req).await)?;
    let status = resp.status().as_u16();
    let mut out = json!({
        "ok": true, "stage": "http", "status": status,
        "tls_version": version, "alpn": alpn, "server_serial": server_serial,
        "baggage": resp.headers().get("baggage").and_then(|v| v.to_str().ok()),
    });
    if status != 200 || p.method != "CONNECT" {
        return Ok(out);
    }
    let up = at("tunnel", hyper::upgrade::on(resp).await)?;
    let mut io = hyper_util::rt::TokioIo::new(up);
    // The test app greets with one line, then echoes.
    let mut hello = Vec::new();
    let mut byte = [0u8; 1];
    while at("tunnel", io.read_exact(&mut byte).await).is_ok() && byte[0] != b'\n' {
        hello.push(byte[0]);
    }
    let data: Vec<u8> = (0..p.send).map(|i| (i % 251) as u8).collect();
    at("tunnel", io.write_all(&data).await)?;
    at("tunnel", io.shutdown().await)?;
    let mut echo = Vec::new();
    at(
        "tunnel",
        tokio::time::timeout(Duration::from_secs(20), io.read_to_end(&mut echo))
            .await
            .context("timeout"),
    )?
    .map_err(|e| ("tunnel", e.into()))?;
    out["stage"] = "tunnel".into();
    out["server_hello"] = String::from_utf8_lossy(&hello).into();
    out["echo_ok"] = (echo == data).into();
    Ok(out)
}
