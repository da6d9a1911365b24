//! TLS origination against a server on loopback whose certificate a test
//! CA signed for `api.example.com`.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::origination::{Origination, TlsFailure};
use crate::state::TlsOrigination;

struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap()
}

fn pki(test: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("mesh-origination-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (issuer, other) = (ca("test CA"), ca("other CA"));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["api.example.com".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (ca, other_ca) = (dir.join("ca.pem"), dir.join("other.pem"));
    std::fs::write(&ca, issuer.pem()).unwrap();
    std::fs::write(&other_ca, other.pem()).unwrap();
    Pki {
        ca,
        other_ca,
        cert: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    }
}

/// A TLS server that answers each connection's first bytes with `ok`.
async fn server(pki: &Pki) -> SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![pki.cert.clone()], pki.key.clone_key())
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let mut b = [0u8; 4];
                    if tls.read(&mut b).await.is_ok() {
                        let _ = tls.write_all(b"ok").await;
                    }
                }
            });
        }
    });
    addr
}

fn tls(ca: Option<&PathBuf>) -> TlsOrigination {
    TlsOrigination {
        sni: None,
        ca_certificates: ca.cloned(),
        credential_name: None,
        credential_ca: None,
        subject_alt_names: Vec::new(),
        insecure_skip_verify: false,
        unusable: None,
    }
}

/// Connects with `tls` for `host`; Ok(answer) or the failure's reason.
async fn call(addr: SocketAddr, tls: TlsOrigination, host: &str) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    match Origination::new(tls, host).connect(tcp, addr).await {
        Ok(mut s) => {
            s.write_all(b"ping").await.unwrap();
            let mut out = [0u8; 2];
            s.read_exact(&mut out).await.unwrap();
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
        Err(e) => {
            let f = TlsFailure::find(&e).expect("a TlsFailure");
            Err(format!("{}: {}", f.reason, f.detail))
        }
    }
}

/// The CA and the name decide: the right CA for the certificate's name
/// (by the host, by `sni`, or by one of `subjectAltNames`) connects; another
/// CA, another name, a CA file that cannot be read or a rule that cannot
/// be applied are refused with the reason; a Secret's CA wins over the
/// file; `insecureSkipVerify` accepts any certificate.
#[tokio::test]
async fn the_certificate_is_checked_against_the_ca_and_the_name() {
    let pki = pki("check");
    let addr = server(&pki).await;
    let good = tls(Some(&pki.ca));
    assert_eq!(
        call(addr, good.clone(), "api.example.com").await,
        Ok("ok".into())
    );
    let sni = TlsOrigination {
        sni: Some("api.example.com".into()),
        ..good.clone()
    };
    assert_eq!(call(addr, sni, "other.example").await, Ok("ok".into()));
    let sans = TlsOrigination {
        subject_alt_names: vec!["nope.example".into(), "api.example.com".into()],
        ..good.clone()
    };
    assert_eq!(call(addr, sans, "other.example").await, Ok("ok".into()));

    let e = call(addr, good.clone(), "other.example").await.unwrap_err();
    assert!(
        e.starts_with("certificate:") && e.contains("NotValidForName"),
        "{e}"
    );
    let e = call(addr, tls(Some(&pki.other_ca)), "api.example.com")
        .await
        .unwrap_err();
    assert!(
        e.starts_with("certificate:") && e.contains("UnknownIssuer"),
        "{e}"
    );
    let missing = PathBuf::from("/nonexistent/ca.pem");
    let e = call(addr, tls(Some(&missing)), "api.example.com")
        .await
        .unwrap_err();
    assert!(
        e.starts_with("ca:") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
    let unusable = TlsOrigination {
        unusable: Some("credentialName is not supported".into()),
        ..good.clone()
    };
    let e = call(addr, unusable, "api.example.com").await.unwrap_err();
    assert!(e.starts_with("config:"), "{e}");

    // A Secret's CA (credentialName) wins over the file.
    let credential = |pem: &PathBuf| TlsOrigination {
        credential_name: Some("api-ca".into()),
        credential_ca: Some(std::fs::read(pem).unwrap()),
        ..good.clone()
    };
    assert_eq!(
        call(addr, credential(&pki.ca), "api.example.com").await,
        Ok("ok".into())
    );
    let e = call(addr, credential(&pki.other_ca), "api.example.com")
        .await
        .unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");

    let insecure = TlsOrigination {
        insecure_skip_verify: true,
        ..tls(Some(&pki.other_ca))
    };
    assert_eq!(call(addr, insecure, "other.example").await, Ok("ok".into()));
}
