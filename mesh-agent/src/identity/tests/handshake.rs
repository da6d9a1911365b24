//! Real TLS 1.3 handshakes over an in-memory pipe between the configs the
//! manager builds: who is accepted, who is refused and with what error.

use std::io;

use rustls::{CertificateError, ProtocolVersion, pki_types::ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::*;

pub(super) type Handshake = (
    io::Result<server::TlsStream<DuplexStream>>,
    io::Result<client::TlsStream<DuplexStream>>,
);

/// Both sides of one handshake, concurrently. The server name is arbitrary:
/// the verifiers ignore it.
pub(super) async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Handshake {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from("hbone.mesh.invalid").unwrap();
    tokio::join!(
        TlsAcceptor::from(server).accept(s),
        TlsConnector::from(client).connect(name, c)
    )
}

/// The rustls error inside a failed handshake's io::Error.
pub(super) fn tls_error(e: &io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {e:?}"))
}

/// Our own refusal reason inside a rustls error.
pub(super) fn identity_error(e: &rustls::Error) -> &IdentityError {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other
            .0
            .downcast_ref::<IdentityError>()
            .unwrap_or_else(|| panic!("not an identity error: {e:?}")),
        other => panic!("not an identity refusal: {other:?}"),
    }
}

pub(super) fn server_error(h: Handshake) -> rustls::Error {
    match h.0 {
        Ok(_) => panic!("the server accepted the handshake"),
        Err(e) => tls_error(&e).clone(),
    }
}

#[tokio::test]
async fn mutual_tls_carries_both_identities() {
    let dir = TempDir::new("hs");
    let m = manager(&dir, Duration::from_secs(3600));
    let (srv, cli) = (id("prod", "db"), id("default", "web"));
    let (s, c) = handshake(
        m.server_config(&srv).unwrap(),
        m.client_config(&cli, &srv).unwrap(),
    )
    .await;
    let (mut s, mut c) = (s.unwrap(), c.unwrap());

    let (_, sc) = s.get_ref();
    assert_eq!(peer_identity(sc, TD), Some(cli.clone()));
    assert_eq!(sc.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(sc.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    let (_, cc) = c.get_ref();
    assert_eq!(peer_identity(cc, TD), Some(srv.clone()));
    assert_eq!(cc.alpn_protocol(), Some(&b"h2"[..]));

    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // Configs are cached per identity and per (identity, server).
    assert!(Arc::ptr_eq(
        &m.server_config(&srv).unwrap(),
        &m.server_config(&srv).unwrap()
    ));
    assert!(Arc::ptr_eq(
        &m.client_config(&cli, &srv).unwrap(),
        &m.client_config(&cli, &srv).unwrap()
    ));
}

#[tokio::test]
async fn client_cert_from_another_root_is_refused() {
    let m = manager(&TempDir::new("root-a"), Duration::from_secs(3600));
    let other = manager(&TempDir::new("root-b"), Duration::from_secs(3600));
    let (srv, cli) = (id("prod", "db"), id("default", "web"));
    let foreign = other.certificate(&cli).unwrap();
    let h = handshake(
        m.server_config(&srv).unwrap(),
        m.client_config_with(&foreign, &srv).unwrap(),
    )
    .await;
    assert_eq!(
        server_error(h),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[tokio::test]
async fn expired_client_cert_is_refused() {
    let m = manager(&TempDir::new("expired"), Duration::from_secs(3600));
    let (srv, cli) = (id("prod", "db"), id("default", "web"));
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let expired = m.issue(&cli, now - 2 * hour, now - hour).unwrap();
    let h = handshake(
        m.server_config(&srv).unwrap(),
        m.client_config_with(&expired, &srv).unwrap(),
    )
    .await;
    match server_error(h) {
        rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {}
        other => panic!("expected an expiry error, got {other:?}"),
    }
}

#[tokio::test]
async fn expired_server_cert_is_refused() {
    let m = manager(&TempDir::new("expired-srv"), Duration::from_secs(3600));
    let (srv, cli) = (id("prod", "db"), id("default", "web"));
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let expired = m.issue(&srv, now - 2 * hour, now - hour).unwrap();
    let (s, c) = handshake(
        m.server_config_with(&expired).unwrap(),
        m.client_config(&cli, &srv).unwrap(),
    )
    .await;
    let Err(err) = c else {
        panic!("the client accepted an expired server certificate")
    };
    match tls_error(&err) {
        rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {}
        other => panic!("expected an expiry error, got {other:?}"),
    }
    assert!(s.is_err());
}

#[tokio::test]
async fn missing_client_cert_is_refused() {
    let m = manager(&TempDir::new("nocert"), Duration::from_secs(3600));
    let srv = id("prod", "db");
    let anonymous = tls::client_config(&m.provider, &m.roots, None, vec![srv.clone()]).unwrap();
    let h = handshake(m.server_config(&srv).unwrap(), Arc::new(anonymous)).await;
    assert_eq!(server_error(h), rustls::Error::NoCertificatesPresented);
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused() {
    let m = manager(&TempDir::new("td"), Duration::from_secs(3600));
    let srv = id("prod", "db");
    let stranger = Identity::new("other.domain", "default", "web");
    assert!(matches!(
        m.certificate(&stranger),
        Err(IdentityError::ForeignTrustDomain { .. })
    ));
    let now = SystemTime::now();
    let cert = m
        .issue(&stranger, now, now + Duration::from_secs(600))
        .unwrap();
    let h = handshake(
        m.server_config(&srv).unwrap(),
        m.client_config_with(&cert, &srv).unwrap(),
    )
    .await;
    let err = server_error(h);
    assert!(matches!(
        identity_error(&err),
        IdentityError::ForeignTrustDomain { identity, .. } if **identity == stranger
    ));
}

#[tokio::test]
async fn server_with_another_identity_is_refused() {
    let m = manager(&TempDir::new("mismatch"), Duration::from_secs(3600));
    let (wanted, actual, cli) = (id("prod", "db"), id("prod", "cache"), id("default", "web"));
    let (s, c) = handshake(
        m.server_config(&actual).unwrap(),
        m.client_config(&cli, &wanted).unwrap(),
    )
    .await;
    let Err(err) = c else {
        panic!("the client accepted the wrong server")
    };
    let err = tls_error(&err);
    let msg = err.to_string();
    assert!(
        msg.contains(&wanted.to_string()) && msg.contains(&actual.to_string()),
        "{msg}"
    );
    assert!(matches!(
        identity_error(err),
        IdentityError::UnexpectedPeer { expected, presented }
            if **expected == wanted && **presented == actual
    ));
    assert!(s.is_err());
}

/// A certificate proves nothing without its key: a peer presenting a
/// valid certificate of the expected identity, but signing the handshake
/// with another key, is refused on either side (the signature check, not
/// the chain, refuses it).
#[tokio::test]
async fn a_certificate_presented_without_its_key_is_refused() {
    let m = manager(&TempDir::new("stolen"), Duration::from_secs(3600));
    let (srv, cli) = (id("prod", "db"), id("default", "web"));
    let now = SystemTime::now();
    let valid = |who: &Identity| m.issue(who, now, now + Duration::from_secs(600)).unwrap();
    // The victim's chain with a key of the thief's own, itself certified.
    let stolen = |victim: &Identity| WorkloadCert {
        key: valid(&id("default", "thief")).key,
        ..valid(victim)
    };

    let h = handshake(
        m.server_config(&srv).unwrap(),
        m.client_config_with(&stolen(&cli), &srv).unwrap(),
    )
    .await;
    assert_eq!(
        server_error(h),
        rustls::Error::InvalidCertificate(CertificateError::BadSignature)
    );

    let (s, c) = handshake(
        m.server_config_with(&stolen(&srv)).unwrap(),
        m.client_config(&cli, &srv).unwrap(),
    )
    .await;
    let Err(err) = c else {
        panic!("the client accepted a server that does not hold its key")
    };
    assert_eq!(
        tls_error(&err),
        &rustls::Error::InvalidCertificate(CertificateError::BadSignature)
    );
    assert!(s.is_err());
}

#[tokio::test]
async fn rotation_renews_at_half_life_for_new_handshakes() {
    let m = manager(&TempDir::new("rotate"), Duration::from_secs(2));
    let (srv, cli) = (id("prod", "db"), id("default", "web"));
    let server = m.server_config(&srv).unwrap();
    let client = m.client_config(&cli, &srv).unwrap();
    // The serials each side saw the other present.
    let presented = |h: &Handshake| {
        let (_, sc) = h.0.as_ref().unwrap().get_ref();
        let (_, cc) = h.1.as_ref().unwrap().get_ref();
        (
            leaf_serial(&cc.peer_certificates().unwrap()[0]),
            leaf_serial(&sc.peer_certificates().unwrap()[0]),
        )
    };
    let dumped = |m: &CertManager, id: &Identity| {
        let name = id.to_string();
        m.dump()
            .into_iter()
            .find(|c| c.identity == name)
            .unwrap()
            .serial
    };

    let (srv_first, cli_first) = presented(&handshake(server.clone(), client.clone()).await);
    let rotation = m.spawn_rotation();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Renewed at ~1 s; the next renewal is not due before ~2 s. Stopping
    // here keeps what follows free of timing.
    rotation.abort();

    // Same configs, new certificates on both sides.
    let h = handshake(server, client).await;
    let (srv_second, cli_second) = presented(&h);
    assert_ne!(srv_first, srv_second);
    assert_ne!(cli_first, cli_second);
    assert_eq!(srv_second, dumped(&m, &srv));
    assert_eq!(cli_second, dumped(&m, &cli));
    let (_, sc) = h.0.as_ref().unwrap().get_ref();
    assert_eq!(peer_identity(sc, TD), Some(cli));
}

/// A trust bundle lets a second root's workloads in (a root being rotated
/// in or out) on both sides of a handshake; a third root's stay out.
#[tokio::test]
async fn a_trust_bundle_accepts_peers_of_its_roots_and_no_others() {
    let dir = TempDir::new("bundle-a");
    let b = manager(&TempDir::new("bundle-b"), Duration::from_secs(3600));
    let c = manager(&TempDir::new("bundle-c"), Duration::from_secs(3600));
    let bundle = dir.write("bundle.pem", &b.root_pem());
    let a = CertManager::new(CaConfig {
        trust_domain: TD.into(),
        cert_ttl: Duration::from_secs(3600),
        source: CaSource::Generate {
            dir: dir.path("ca"),
        },
        trust_bundle: Some(bundle),
    })
    .unwrap();
    let (srv, cli) = (id("prod", "db"), id("default", "web"));

    // A client of root B at a server of root A.
    let from_b = b.certificate(&cli).unwrap();
    let (s, c_side) = handshake(
        a.server_config(&srv).unwrap(),
        a.client_config_with(&from_b, &srv).unwrap(),
    )
    .await;
    let s = s.expect("the server accepts a client of a bundled root");
    assert_eq!(peer_identity(s.get_ref().1, TD), Some(cli.clone()));
    c_side.expect("and the client completes");

    // A server of root B, reached by a client of root A.
    let b_server = b.server_config(&srv).unwrap();
    let (s, c_side) = handshake(b_server, a.client_config(&cli, &srv).unwrap()).await;
    let c_side = c_side.expect("the client accepts a server of a bundled root");
    assert_eq!(peer_identity(c_side.get_ref().1, TD), Some(srv.clone()));
    drop(s);

    // Root C is in no bundle.
    let from_c = c.certificate(&cli).unwrap();
    let h = handshake(
        a.server_config(&srv).unwrap(),
        a.client_config_with(&from_c, &srv).unwrap(),
    )
    .await;
    assert_eq!(
        server_error(h),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

/// The server's CertificateRequest names every root it trusts (the CA's,
/// then the bundle's), so a client holding certificates of several roots
/// can present one the server accepts.
#[test]
fn the_certificate_request_names_the_trusted_roots() {
    use rustls::server::danger::ClientCertVerifier as _;

    let dir = TempDir::new("hints-a");
    let b = manager(&TempDir::new("hints-b"), Duration::from_secs(3600));
    let a = CertManager::new(CaConfig {
        trust_domain: TD.into(),
        cert_ttl: Duration::from_secs(3600),
        source: CaSource::Generate {
            dir: dir.path("ca"),
        },
        trust_bundle: Some(dir.write("bundle.pem", &b.root_pem())),
    })
    .unwrap();
    let subject = |pem: &str| {
        let der = der_of_pem(pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.subject().as_raw().to_vec()
    };
    let hints: Vec<Vec<u8>> = verify::ClientVerifier::new(a.roots.clone())
        .root_hint_subjects()
        .iter()
        .map(|dn| dn.as_ref().to_vec())
        .collect();
    assert_eq!(hints, [subject(&a.root_pem()), subject(&b.root_pem())]);
}

/// A bundle is all valid CA certificates or the agent does not start.
#[test]
fn a_bundle_with_a_certificate_that_is_not_a_ca_is_refused() {
    let dir = TempDir::new("bundle-bad");
    let b = manager(&TempDir::new("bundle-b2"), Duration::from_secs(3600));
    let leaf = b.certificate(&id("default", "web")).unwrap();
    let leaf_pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64_of(leaf.chain[0].as_ref())
    );
    let bundle = dir.write("bundle.pem", &format!("{}{leaf_pem}", b.root_pem()));
    let err = CertManager::new(CaConfig {
        trust_domain: TD.into(),
        cert_ttl: Duration::from_secs(3600),
        source: CaSource::Generate {
            dir: dir.path("ca"),
        },
        trust_bundle: Some(bundle),
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("certificate 2: not a CA certificate"),
        "{err}"
    );
}

/// Standard base64 with 64-character lines, for a PEM body.
fn base64_of(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out.as_bytes()
        .chunks(64)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}
