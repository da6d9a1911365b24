//! Trust as ztunnel has it: a chain through an intermediate CA is sent in
//! the handshake (and needed), a client is accepted on any SPIFFE URI SAN
//! of the trust domain, a client accepts the destination's identity or
//! one its Service's workloads hold, and a bundle of the old and the new
//! root carries a rotation.

use rcgen::{ExtendedKeyUsagePurpose, Issuer, SanType};
use rustls::CertificateError;

use super::{
    cluster_ca::within,
    handshake::{Handshake, handshake, identity_error, server_error, tls_error},
    lying_ca::stand_in,
    *,
};
use crate::identity::{
    ca::Ca,
    ca_client::{SignRequest, SignResponse},
};

/// A root made outside the manager (it may sign intermediates), its PEMs
/// written to `dir`, and a manager whose CA it is.
struct Root {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    manager: Arc<CertManager>,
}

fn root(dir: &TempDir, cn: &str) -> Root {
    let (cert_pem, key_pem) = external_ca(cn);
    let cert = dir.write("root.pem", &cert_pem);
    let key = dir.write("root-key.pem", &key_pem);
    let manager = CertManager::new(CaConfig {
        trust_domain: TD.into(),
        cert_ttl: Duration::from_secs(3600),
        source: CaSource::Files { cert, key },
        trust_bundle: None,
    })
    .unwrap();
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, KeyPair::from_pem(&key_pem).unwrap()).unwrap();
    Root {
        cert_pem,
        issuer,
        manager,
    }
}

/// An intermediate CA under `root`: its certificate and its issuer.
fn intermediate(root: &Root) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mesh intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.signed_by(&key, &root.issuer).unwrap();
    (cert, Issuer::new(params, key))
}

/// A workload leaf with the given URI SANs for `key`, signed by `issuer`.
fn leaf(
    uris: &[&str],
    key: &impl rcgen::PublicKeyData,
    issuer: &Issuer<'_, KeyPair>,
) -> rcgen::Certificate {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + Duration::from_secs(3600)).into();
    params.signed_by(key, issuer).unwrap()
}

/// A certificate and key as the manager holds them, from `chain`.
fn workload_cert(
    identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    key: &KeyPair,
) -> WorkloadCert {
    let now = SystemTime::now();
    WorkloadCert {
        identity,
        chain,
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        serial: String::new(),
        not_before: now,
        not_after: now + Duration::from_secs(3600),
    }
}

fn client_error(h: Handshake) -> rustls::Error {
    match h.1 {
        Ok(_) => panic!("the client accepted the handshake"),
        Err(e) => tls_error(&e).clone(),
    }
}

/// A cluster CA that signs through an intermediate hands back
/// `[leaf, intermediate]`; the agent presents both, so a peer that trusts
/// only the root accepts it, both as a server and as a client. Without
/// the intermediate the same leaf is refused.
#[tokio::test]
async fn a_chain_through_an_intermediate_is_sent_in_the_handshake() {
    within(async {
        let dir = TempDir::new("intermediate");
        let root = Arc::new(root(&dir, "corp root"));
        let (int_cert, int_issuer) = intermediate(&root);
        let int_issuer = Arc::new(int_issuer);
        let (int_pem, root_pem) = (int_cert.pem(), root.cert_pem.clone());
        let signer = int_issuer.clone();
        let tls_ca = Ca::from_source(
            &CaSource::Files {
                cert: dir.path("root.pem"),
                key: dir.path("root-key.pem"),
            },
            TD,
            &rustls::crypto::ring::default_provider(),
        )
        .unwrap();
        let ca = stand_in(&tls_ca, move |body| {
            let request: SignRequest = serde_json::from_slice(body).unwrap();
            let csr = rcgen::CertificateSigningRequestParams::from_pem(&request.csr).unwrap();
            let web = id("default", "web").to_string();
            let leaf = leaf(&[&web], &csr.public_key, &signer);
            serde_json::to_vec(&SignResponse {
                certificate_chain: vec![leaf.pem(), int_pem.clone()],
                root: root_pem.clone(),
            })
            .unwrap()
        })
        .await;
        let agent = CertManager::new(CaConfig {
            trust_domain: TD.into(),
            cert_ttl: Duration::from_secs(3600),
            source: CaSource::Remote {
                address: format!("https://127.0.0.1:{}", ca.addr.port()),
                root: dir.path("root.pem"),
                token: dir.write("token", "a-token\n"),
            },
            trust_bundle: None,
        })
        .unwrap();
        let (web, db) = (id("default", "web"), id("prod", "db"));
        agent.prepare(&web).await.unwrap();
        let held = agent.certificate(&web).unwrap();
        assert_eq!(held.chain.len(), 2, "leaf and intermediate");
        assert_eq!(held.chain[1], *int_cert.der());

        // The agent as the server: the peer trusts the root only.
        let peer = &root.manager;
        let (s, c) = handshake(
            agent.server_config(&web).unwrap(),
            peer.client_config(&db, &web).unwrap(),
        )
        .await;
        let c = c.expect("a peer trusting the root accepts the chain");
        assert_eq!(c.get_ref().1.peer_certificates().map(<[_]>::len), Some(2));
        drop(s);

        // The agent as the client.
        let (s, c) = handshake(
            peer.server_config(&db).unwrap(),
            agent.client_config(&web, &db).unwrap(),
        )
        .await;
        let s = s.expect("a server trusting the root accepts the chain");
        assert_eq!(s.get_ref().1.peer_certificates().map(<[_]>::len), Some(2));
        assert_eq!(peer_identity(s.get_ref().1, TD), Some(web.clone()));
        drop(c);

        // The leaf alone does not lead to the root.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let alone = leaf(&[&web.to_string()], &key, &int_issuer);
        let alone = workload_cert(web.clone(), vec![alone.der().clone()], &key);
        let h = handshake(
            peer.server_config(&db).unwrap(),
            peer.client_config_with(&alone, &db).unwrap(),
        )
        .await;
        assert_eq!(
            server_error(h),
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    })
    .await
}

/// As ztunnel: a client is accepted when any of its SPIFFE URI SANs is of
/// the trust domain (other URIs and other trust domains beside it do not
/// matter), and is known by that one. Without one, it is refused.
#[tokio::test]
async fn the_server_accepts_any_spiffe_san_of_its_trust_domain() {
    let dir = TempDir::new("any-san");
    let root = root(&dir, "corp root");
    let m = &root.manager;
    let srv = id("prod", "db");
    let web = id("default", "web");
    let present = |uris: &[&str]| {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = leaf(uris, &key, &root.issuer);
        let wc = workload_cert(web.clone(), vec![cert.der().clone()], &key);
        m.client_config_with(&wc, &srv).unwrap()
    };

    let h = handshake(
        m.server_config(&srv).unwrap(),
        present(&[
            "https://example.com/not-spiffe",
            "spiffe://elsewhere.test/ns/default/sa/web",
            "spiffe://cluster.local/ns/default/sa/web",
        ]),
    )
    .await;
    let s = h.0.expect("a SAN of the trust domain is enough");
    assert_eq!(peer_identity(s.get_ref().1, TD), Some(web.clone()));

    let h = handshake(
        m.server_config(&srv).unwrap(),
        present(&["spiffe://elsewhere.test/ns/default/sa/web"]),
    )
    .await;
    assert!(
        matches!(
            identity_error(&server_error(h)),
            IdentityError::ForeignTrustDomain { .. }
        ),
        "another trust domain only"
    );

    let h = handshake(
        m.server_config(&srv).unwrap(),
        present(&["https://example.com/not-spiffe"]),
    )
    .await;
    assert!(
        matches!(
            identity_error(&server_error(h)),
            IdentityError::NoSpiffeId(_)
        ),
        "no SPIFFE ID at all"
    );
}

/// A client accepts the destination's own identity, or one of the
/// identities the addressed Service's workloads hold; anyone else is
/// refused, naming whom it expected.
#[tokio::test]
async fn the_client_accepts_the_destination_or_its_service_s_identities() {
    let dir = TempDir::new("service-ids");
    let m = manager(&dir, Duration::from_secs(3600));
    let cli = id("default", "web");
    let (expected, v2, other) = (
        id("shop", "reviews"),
        id("shop", "reviews-v2"),
        id("shop", "ratings"),
    );
    let server = m.server_config(&v2).unwrap();

    let h = handshake(
        server.clone(),
        m.client_config_for(&cli, &expected, &[other.clone(), v2.clone()])
            .unwrap(),
    )
    .await;
    let c = h.1.expect("an identity behind the Service is accepted");
    assert_eq!(peer_identity(c.get_ref().1, TD), Some(v2.clone()));

    let h = handshake(
        server,
        m.client_config_for(&cli, &expected, &[other]).unwrap(),
    )
    .await;
    match identity_error(&client_error(h)) {
        IdentityError::UnexpectedPeer {
            expected: e,
            presented,
        } => {
            assert_eq!(**e, expected);
            assert_eq!(**presented, v2);
        }
        e => panic!("refused for another reason: {e}"),
    }
}

/// A root rotation: the CA has moved to the new root, and the bundle holds
/// the old and the new one. Workloads of both are accepted, as clients and
/// as servers; a third root's are not.
#[tokio::test]
async fn a_bundle_of_the_old_and_the_new_root_accepts_both_and_no_third() {
    let ttl = Duration::from_secs(3600);
    let (old_dir, new_dir) = (TempDir::new("rotation-old"), TempDir::new("rotation-new"));
    let old = manager(&old_dir, ttl);
    let new = manager(&new_dir, ttl);
    let third = manager(&TempDir::new("rotation-third"), ttl);
    let dir = TempDir::new("rotation");
    let bundle = dir.write(
        "bundle.pem",
        &format!("{}{}", old.root_pem(), new.root_pem()),
    );
    let agent = CertManager::new(CaConfig {
        trust_domain: TD.into(),
        cert_ttl: ttl,
        source: CaSource::Generate {
            dir: new_dir.0.clone(),
        },
        trust_bundle: Some(bundle),
    })
    .unwrap();
    assert_eq!(
        agent.root_pem(),
        new.root_pem(),
        "the CA is on the new root"
    );
    let (srv, cli) = (id("prod", "db"), id("default", "web"));

    for (root, name) in [(&old, "old"), (&new, "new")] {
        // A client of that root.
        let cert = root.certificate(&cli).unwrap();
        let (s, c) = handshake(
            agent.server_config(&srv).unwrap(),
            agent.client_config_with(&cert, &srv).unwrap(),
        )
        .await;
        let s = s.unwrap_or_else(|e| panic!("a client of the {name} root was refused: {e}"));
        assert_eq!(peer_identity(s.get_ref().1, TD), Some(cli.clone()));
        drop(c);
        // A server of that root.
        let (s, c) = handshake(
            root.server_config(&srv).unwrap(),
            agent.client_config(&cli, &srv).unwrap(),
        )
        .await;
        let c = c.unwrap_or_else(|e| panic!("a server of the {name} root was refused: {e}"));
        assert_eq!(peer_identity(c.get_ref().1, TD), Some(srv.clone()));
        drop(s);
    }

    let cert = third.certificate(&cli).unwrap();
    let h = handshake(
        agent.server_config(&srv).unwrap(),
        agent.client_config_with(&cert, &srv).unwrap(),
    )
    .await;
    assert_eq!(
        server_error(h),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
    let h = handshake(
        third.server_config(&srv).unwrap(),
        agent.client_config(&cli, &srv).unwrap(),
    )
    .await;
    assert_eq!(
        client_error(h),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}
