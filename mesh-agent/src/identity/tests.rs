//! Identity tests: SPIFFE parsing, the CA's root handling and the dump;
//! `handshake` runs real TLS 1.3 handshakes between the configs;
//! `cluster_ca` and `remote` the cluster CA and the agents that use it.

mod ca_binary;
mod cluster_ca;
mod handshake;
mod lying_ca;
mod remote;
mod trust;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime},
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};

use super::*;

const TD: &str = "cluster.local";

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mesh-identity-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn write(&self, file: &str, contents: &str) -> PathBuf {
        std::fs::create_dir_all(&self.0).unwrap();
        let path = self.path(file);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa)
}

fn manager(dir: &TempDir, ttl: Duration) -> Arc<CertManager> {
    CertManager::new(CaConfig {
        trust_domain: TD.into(),
        cert_ttl: ttl,
        source: CaSource::Generate { dir: dir.0.clone() },
        trust_bundle: None,
    })
    .unwrap()
}

fn der_of_pem(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// A CA made outside the manager, as a user would bring it.
fn external_ca(cn: &str) -> (String, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.remove(rcgen::DnType::CommonName);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn leaf_serial(der: &CertificateDer<'_>) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    ca::CertFacts::of(&cert).serial
}

#[test]
fn identity_round_trips() {
    let s = "spiffe://cluster.local/ns/default/sa/web";
    let id: Identity = s.parse().unwrap();
    assert_eq!(id, Identity::new("cluster.local", "default", "web"));
    assert_eq!(id.to_string(), s);
    assert_eq!(id.principal(), "cluster.local/ns/default/sa/web");
}

#[test]
fn identity_rejects_non_workload_ids() {
    for bad in [
        "",
        "cluster.local/ns/default/sa/web",
        "http://cluster.local/ns/default/sa/web",
        "spiffe://cluster.local",
        "spiffe:///ns/default/sa/web",
        "spiffe://cluster.local/ns//sa/web",
        "spiffe://cluster.local/ns/default/sa/",
        "spiffe://cluster.local/namespace/default/sa/web",
        "spiffe://cluster.local/ns/default/sa/web/extra",
    ] {
        assert_eq!(
            bad.parse::<Identity>(),
            Err(BadIdentity(bad.to_owned())),
            "{bad:?}"
        );
    }
}

#[test]
fn generated_root_is_kept_across_restarts() {
    let dir = TempDir::new("keep");
    let first = manager(&dir, Duration::from_secs(3600));
    let second = manager(&dir, Duration::from_secs(3600));
    assert_eq!(first.root_pem(), second.root_pem());
    assert_eq!(first.dump()[0].serial, second.dump()[0].serial);
    assert!(first.root_pem().starts_with("-----BEGIN CERTIFICATE-----"));

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path("root-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A certificate from the restarted manager chains to the first root.
    let cert = second.certificate(&id("default", "web")).unwrap();
    verify_chain(&cert.chain[0], &der_of_pem(&first.root_pem())).unwrap();
}

#[test]
fn a_cert_without_its_key_is_an_error_not_a_new_root() {
    let dir = TempDir::new("nokey");
    let _ = manager(&dir, Duration::from_secs(3600));
    std::fs::remove_file(dir.path("root-key.pem")).unwrap();
    let err = CertManager::new(CaConfig {
        trust_domain: TD.into(),
        cert_ttl: Duration::from_secs(3600),
        source: CaSource::Generate { dir: dir.0.clone() },
        trust_bundle: None,
    })
    .unwrap_err();
    assert!(matches!(&err, IdentityError::BadFile { path, .. } if path.ends_with("root-key.pem")));
}

fn verify_chain(leaf: &CertificateDer<'_>, root: &CertificateDer<'_>) -> Result<(), webpki::Error> {
    let anchor = webpki::anchor_from_trusted_cert(root)?;
    webpki::EndEntityCert::try_from(leaf)?
        .verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &[anchor],
            &[],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map(|_| ())
}

#[test]
fn brought_root_signs_workload_certs() {
    let dir = TempDir::new("byo");
    let (cert_pem, key_pem) = external_ca("corp mesh root");
    let cert = dir.write("ca.pem", &cert_pem);
    let key = dir.write("ca-key.pem", &key_pem);
    let ttl = Duration::from_secs(3600);
    let m = CertManager::new(CaConfig {
        trust_domain: TD.into(),
        cert_ttl: ttl,
        source: CaSource::Files { cert, key },
        trust_bundle: None,
    })
    .unwrap();
    assert_eq!(der_of_pem(&m.root_pem()), der_of_pem(&cert_pem));
    assert_eq!(m.trust_domain(), TD);

    let web = id("default", "web");
    let before = SystemTime::now();
    let wc = m.certificate(&web).unwrap();
    assert_eq!(wc.chain.len(), 1, "the root is not sent");
    verify_chain(&wc.chain[0], &der_of_pem(&cert_pem)).unwrap();
    assert_eq!(cert_identity(&wc.chain[0]).unwrap(), web);

    let (_, x509) = x509_parser::parse_x509_certificate(&wc.chain[0]).unwrap();
    assert!(!x509.is_ca());
    assert_eq!(x509.issuer().to_string(), "CN=corp mesh root");
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(x509.key_usage().unwrap().unwrap().value.digital_signature());
    let sans = &x509.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(sans.general_names.len(), 1);
    // Back-dated for clock skew, valid for the TTL.
    let skew = before.duration_since(wc.not_before).unwrap();
    assert!((Duration::from_secs(59)..=Duration::from_secs(62)).contains(&skew));
    let life = wc.not_after.duration_since(before).unwrap();
    assert!((ttl - Duration::from_secs(2)..=ttl + Duration::from_secs(2)).contains(&life));
    assert_eq!(wc.serial, leaf_serial(&wc.chain[0]));
    // Cached: the same certificate until renewal.
    assert_eq!(m.certificate(&web).unwrap().serial, wc.serial);
    assert_ne!(
        m.certificate(&id("default", "db")).unwrap().serial,
        wc.serial
    );
}

fn byo(cert: PathBuf, key: PathBuf) -> IdentityError {
    CertManager::new(CaConfig {
        trust_domain: TD.into(),
        cert_ttl: Duration::from_secs(3600),
        source: CaSource::Files { cert, key },
        trust_bundle: None,
    })
    .unwrap_err()
}

fn names(err: &IdentityError, path: &Path, what: &str) {
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(what), "{msg}");
}

#[test]
fn bad_brought_root_files_are_named() {
    let dir = TempDir::new("bad");
    let (cert_pem, key_pem) = external_ca("root");
    let cert = dir.write("ca.pem", &cert_pem);
    let key = dir.write("ca-key.pem", &key_pem);

    let missing = dir.path("missing.pem");
    let err = byo(missing.clone(), key.clone());
    assert!(matches!(err, IdentityError::Io { .. }));
    names(&err, &missing, "reading");

    let garbage = dir.write("garbage.pem", "hello\n");
    names(
        &byo(garbage.clone(), key.clone()),
        &garbage,
        "no CERTIFICATE",
    );
    names(
        &byo(cert.clone(), garbage.clone()),
        &garbage,
        "no PRIVATE KEY",
    );

    let (_, other_key) = external_ca("other");
    let other_key = dir.write("other-key.pem", &other_key);
    let err = byo(cert.clone(), other_key.clone());
    assert!(matches!(err, IdentityError::KeyMismatch { .. }));
    names(&err, &other_key, "not the private key");

    let sec1 = dir.write(
        "sec1.pem",
        "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
    );
    names(&byo(cert.clone(), sec1.clone()), &sec1, "PKCS#8");

    // A self-signed end-entity certificate with its own key is not a CA.
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["web.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let leaf_cert = dir.write("leaf.pem", &leaf.pem());
    let leaf_key = dir.write("leaf-key.pem", &key.serialize_pem());
    names(&byo(leaf_cert.clone(), leaf_key), &leaf_cert, "not a CA");

    // A CA whose validity has ended: nothing it signs would be trusted.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let expired = params.self_signed(&key).unwrap();
    let expired_cert = dir.write("expired.pem", &expired.pem());
    let expired_key = dir.write("expired-key.pem", &key.serialize_pem());
    names(
        &byo(expired_cert.clone(), expired_key),
        &expired_cert,
        "the root certificate expired at 2021-01-01T00:00:00Z",
    );
}

#[test]
fn dump_shows_root_and_workloads() {
    let m = manager(&TempDir::new("dump"), Duration::from_secs(3600));
    let web = m.certificate(&id("default", "web")).unwrap();
    m.certificate(&id("prod", "db")).unwrap();
    let dump = m.dump();
    let roles: Vec<_> = dump.iter().map(|c| (c.role, c.identity.as_str())).collect();
    assert_eq!(
        roles[1..],
        [
            ("workload", "spiffe://cluster.local/ns/default/sa/web"),
            ("workload", "spiffe://cluster.local/ns/prod/sa/db"),
        ]
    );
    let root = &dump[0];
    assert_eq!(root.role, "root");
    let tag = &root.serial[..8];
    assert_eq!(
        root.identity,
        format!("CN=mesh-agent root CA, O=cluster.local, OU=root {tag}")
    );
    assert_eq!(dump[1].serial, web.serial);
    assert!(dump[1].serial.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(dump[1].not_after, rfc3339(web.not_after));
    assert!(dump[1].not_after.ends_with('Z') && dump[1].not_after.contains('T'));
}

/// ztunnel's shape: an entry per identity with its state, its chain and
/// the roots, each certificate's PEM base64-encoded.
#[test]
fn ztunnel_dump_lists_each_identity_with_chain_and_roots() {
    let m = manager(&TempDir::new("zdump"), Duration::from_secs(3600));
    let web = m.certificate(&id("default", "web")).unwrap();
    m.certificate(&id("prod", "db")).unwrap();
    let dump = serde_json::to_value(m.ztunnel_dump()).unwrap();
    let ids: Vec<_> = dump
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["identity"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        [
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/prod/sa/db"
        ]
    );
    let entry = &dump[0];
    assert_eq!(entry["state"], "Available");
    let leaf = &entry["certChain"][0];
    assert_eq!(leaf["serialNumber"], web.serial.as_str(), "{entry:#}");
    assert_eq!(leaf["expirationTime"], rfc3339(web.not_after));
    assert_eq!(leaf["validFrom"], rfc3339(web.not_before));
    // The PEM, base64-encoded, decodes to the leaf the manager holds.
    let pem = base64_decode(leaf["pem"].as_str().unwrap());
    assert_eq!(der_of_pem(&pem), web.chain[0], "{entry:#}");
    let root = &entry["rootCerts"][0];
    assert_eq!(root["serialNumber"], m.dump()[0].serial.as_str());
    assert!(
        base64_decode(root["pem"].as_str().unwrap()).starts_with("-----BEGIN CERTIFICATE-----\n")
    );
}

fn base64_decode(s: &str) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = ABC.iter().position(|&a| a == c).expect("base64") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8(out).unwrap()
}
