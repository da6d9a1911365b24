//! The embedded CA's root: generated once and kept on disk, or brought by the
//! user as PEM files. It signs the workload certificates.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls::{
    crypto::{CryptoProvider, SecureRandom},
    pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, TrustAnchor, UnixTime,
        pem::{self, PemObject},
    },
};
use tracing::{info, warn};
use x509_parser::certificate::X509Certificate;

use super::{CaSource, Identity, IdentityError, rfc3339};

const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";
const ROOT_CN: &str = "mesh-agent root CA";
const ROOT_TTL: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Certificates are back-dated by this much so a peer whose clock runs a
/// little behind still accepts them.
pub(super) const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The signing root.
#[derive(Debug)]
pub(super) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    random: &'static dyn SecureRandom,
    pub(super) root: RootCert,
}

/// A root certificate as read from a PEM file: what verifying against it
/// and showing it need. Node agents of a cluster CA have only this.
#[derive(Clone, Debug)]
pub(super) struct RootCert {
    pub(super) der: CertificateDer<'static>,
    /// The certificate's PEM block alone.
    pub(super) pem: String,
    pub(super) anchor: TrustAnchor<'static>,
    pub(super) facts: CertFacts,
}

/// What `/config_dump` and the logs show of a certificate.
#[derive(Clone, Debug)]
pub(super) struct CertFacts {
    /// Hex, as in the certificate (no sign byte added).
    pub(super) serial: String,
    pub(super) not_before: SystemTime,
    pub(super) not_after: SystemTime,
    pub(super) subject: String,
}

impl CertFacts {
    pub(super) fn of(cert: &X509Certificate<'_>) -> Self {
        let mut serial = String::with_capacity(2 * cert.raw_serial().len());
        for b in cert.raw_serial() {
            let _ = write!(serial, "{b:02x}");
        }
        let validity = cert.validity();
        CertFacts {
            serial,
            not_before: validity.not_before.to_datetime().into(),
            not_after: validity.not_after.to_datetime().into(),
            subject: cert.subject().to_string(),
        }
    }
}

/// A freshly signed leaf.
pub(super) struct Issued {
    pub(super) cert: CertificateDer<'static>,
    pub(super) key: PrivatePkcs8KeyDer<'static>,
    pub(super) facts: CertFacts,
}

impl Ca {
    pub(super) fn from_source(
        source: &CaSource,
        trust_domain: &str,
        provider: &CryptoProvider,
    ) -> Result<Ca, IdentityError> {
        match source {
            CaSource::Files { cert, key } => {
                let ca = Ca::load(cert, key, provider)?;
                info!(cert = %cert.display(), "using the provided root CA");
                Ok(ca)
            }
            CaSource::Generate { dir } => Ca::load_or_generate(dir, trust_domain, provider),
            CaSource::Remote { address, .. } => Err(IdentityError::Ca(format!(
                "certificates come from the cluster CA at {address}; this node holds no signing root"
            ))),
        }
    }

    fn load_or_generate(
        dir: &Path,
        trust_domain: &str,
        provider: &CryptoProvider,
    ) -> Result<Ca, IdentityError> {
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        let exists = |path: &Path| {
            path.try_exists().map_err(|source| IdentityError::Io {
                op: "checking",
                path: path.to_owned(),
                source,
            })
        };
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => {
                let ca = Ca::load(&cert_path, &key_path, provider)?;
                info!(dir = %dir.display(), "loaded the root CA");
                return Ok(ca);
            }
            // Without the key the root cannot sign, and replacing it would
            // silently break trust with every node that has the old one.
            (true, false) => {
                return Err(IdentityError::BadFile {
                    path: key_path,
                    reason: format!(
                        "missing while {ROOT_CERT} exists; restore it, or remove both to generate a new root"
                    ),
                });
            }
            // The key is written first, so a key alone is a generation that
            // never finished: its root was never handed out.
            (false, true) => {
                warn!(dir = %dir.display(), "found a root key without its certificate; generating a new root")
            }
            (false, false) => {}
        }
        let (cert_pem, key_pem) = generate_root(trust_domain, provider.secure_random)
            .map_err(IdentityError::GenerateRoot)?;
        fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
            op: "creating",
            path: dir.to_owned(),
            source,
        })?;
        write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)?;
        let ca = Ca::load(&cert_path, &key_path, provider)?;
        info!(dir = %dir.display(), serial = %ca.root.facts.serial, "generated a new root CA");
        Ok(ca)
    }

    /// Loads and checks a root: one PEM certificate that is a CA and still
    /// valid, a PKCS#8 key that belongs to it, and a trial leaf that verifies.
    fn load(
        cert_path: &Path,
        key_path: &Path,
        provider: &CryptoProvider,
    ) -> Result<Ca, IdentityError> {
        let bad_cert = |reason: String| IdentityError::BadFile {
            path: cert_path.to_owned(),
            reason,
        };
        let bad_key = |reason: String| IdentityError::BadFile {
            path: key_path.to_owned(),
            reason,
        };

        let root = RootCert::load(cert_path)?;
        let key_bytes = read(key_path)?;
        let key = match PrivateKeyDer::from_pem_slice(&key_bytes) {
            Ok(PrivateKeyDer::Pkcs8(key)) => key,
            Ok(other) => {
                let kind = match other {
                    PrivateKeyDer::Sec1(_) => "an EC PRIVATE KEY (SEC1)",
                    PrivateKeyDer::Pkcs1(_) => "an RSA PRIVATE KEY (PKCS#1)",
                    _ => "an unsupported key",
                };
                return Err(bad_key(format!(
                    "{kind}; a PKCS#8 PRIVATE KEY is needed (openssl pkcs8 -topk8 -nocrypt -in KEY)"
                )));
            }
            Err(pem::Error::NoItemsFound) => {
                return Err(bad_key("no PRIVATE KEY PEM block".into()));
            }
            Err(e) => return Err(bad_key(format!("not a PEM file: {e}"))),
        };
        let key = KeyPair::try_from(&key)
            .map_err(|e| bad_key(format!("unsupported or malformed private key: {e}")))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&root.der)
            .map_err(|e| bad_cert(format!("not an X.509 certificate: {e}")))?;
        if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(IdentityError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }

        let issuer = Issuer::from_ca_cert_der(&root.der, key)
            .map_err(|e| bad_cert(format!("cannot sign with this root: {e}")))?;
        let ca = Ca {
            issuer,
            random: provider.secure_random,
            root,
        };
        ca.self_check(provider).map_err(bad_cert)?;
        Ok(ca)
    }

    /// Signs a trial leaf and verifies it against the root. This catches a
    /// root whose name rcgen re-encodes differently (the leaf's issuer would
    /// then not match) or whose algorithm the verifier does not support,
    /// at start-up instead of at the first handshake.
    fn self_check(&self, provider: &CryptoProvider) -> Result<(), String> {
        let probe = Identity::new("self-check.invalid", "self-check", "self-check");
        let now = SystemTime::now();
        let issued = self
            .issue(&probe, now - CLOCK_SKEW, now + CLOCK_SKEW)
            .map_err(|e| format!("cannot sign with this root: {e}"))?;
        let leaf = webpki::EndEntityCert::try_from(&issued.cert)
            .map_err(|e| format!("signs unparseable certificates: {e}"))?;
        leaf.verify_for_usage(
            provider.signature_verification_algorithms.all,
            std::slice::from_ref(&self.root.anchor),
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| format!("certificates signed with this root do not verify against it: {e}"))?;
        Ok(())
    }

    /// A leaf for `id`: fresh P-256 key, URI SAN = the SPIFFE ID, not a CA,
    /// for TLS client and server authentication.
    pub(super) fn issue(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = self
            .sign_workload(id, &key, not_before, not_after)?
            .der()
            .clone();
        let facts = facts_of(&cert)?;
        Ok(Issued {
            cert,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            facts,
        })
    }

    /// A workload leaf for a key held elsewhere (a node agent's CSR): the
    /// same profile as [`Ca::issue`], whatever else the request asked for.
    pub(super) fn sign_workload(
        &self,
        id: &Identity,
        public_key: &impl PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<rcgen::Certificate, rcgen::Error> {
        let mut params = CertificateParams::default();
        // SPIFFE X.509-SVIDs name the workload in the SAN only; rcgen marks
        // the SAN critical when the subject is empty, as RFC 5280 requires.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial(self.random)?);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.signed_by(public_key, &self.issuer)
    }

    /// A TLS server certificate for the cluster CA itself: the given DNS
    /// names (or IP addresses) as SANs, server authentication only.
    pub(super) fn issue_server(
        &self,
        names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(name.as_str().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial(self.random)?);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer)?.der().clone();
        let facts = facts_of(&cert)?;
        Ok(Issued {
            cert,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            facts,
        })
    }
}

impl RootCert {
    /// Reads one PEM root certificate that is a CA and still valid.
    pub(super) fn load(path: &Path) -> Result<RootCert, IdentityError> {
        let mut roots = Self::load_bundle(path)?;
        match roots.len() {
            1 => Ok(roots.remove(0)),
            n => Err(IdentityError::BadFile {
                path: path.to_owned(),
                reason: format!("expected one root certificate, found {n}"),
            }),
        }
    }

    /// Reads a PEM bundle of one or more root certificates, each a CA and
    /// still valid: one that is not refuses the whole bundle (a trust
    /// bundle half read would fail some peers in ways hard to trace).
    pub(super) fn load_bundle(path: &Path) -> Result<Vec<RootCert>, IdentityError> {
        let bad = |reason: String| IdentityError::BadFile {
            path: path.to_owned(),
            reason,
        };
        let bytes = read(path)?;
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("not a PEM file: {e}")))?;
        if certs.is_empty() {
            return Err(bad("no CERTIFICATE PEM block".into()));
        }
        let several = certs.len() > 1;
        let blocks = pem_blocks(&bytes);
        certs
            .into_iter()
            .enumerate()
            .map(|(i, der)| {
                let which = if several {
                    format!("certificate {}: ", i + 1)
                } else {
                    String::new()
                };
                let pem = blocks.get(i).cloned().unwrap_or_default();
                Self::from_der(der, pem).map_err(|reason| bad(format!("{which}{reason}")))
            })
            .collect()
    }

    fn from_der(der: CertificateDer<'static>, pem: String) -> Result<RootCert, String> {
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        if !x509.is_ca() {
            return Err("not a CA certificate (basicConstraints CA is not set)".into());
        }
        let facts = CertFacts::of(&x509);
        if facts.not_after <= SystemTime::now() {
            return Err(format!(
                "the root certificate expired at {}",
                rfc3339(facts.not_after)
            ));
        }
        let anchor = webpki::anchor_from_trusted_cert(&der)
            .map_err(|e| format!("not usable as a trust anchor: {e}"))?
            .to_owned();
        Ok(RootCert {
            pem,
            der,
            anchor,
            facts,
        })
    }
}

fn facts_of(cert: &CertificateDer<'_>) -> Result<CertFacts, rcgen::Error> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
    Ok(CertFacts::of(&x509))
}

/// A self-signed P-256 root, PEM certificate and PKCS#8 key.
fn generate_root(
    trust_domain: &str,
    random: &dyn SecureRandom,
) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let serial = random_serial(random)?;
    let mut params = CertificateParams::default();
    // Each root gets its own name: two clusters' roots must not look like
    // the same issuer to a verifier (or to whoever reads `/config_dump`).
    let tag: String = serial.to_bytes()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, ROOT_CN);
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, format!("root {tag}"));
    // The root signs leaves directly; it cannot make intermediates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(serial);
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + ROOT_TTL).into();
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// 16 random bytes, the top bit clear so the DER integer stays positive at
/// that length and the next bit set so it never gets shorter.
fn random_serial(random: &dyn SecureRandom) -> Result<SerialNumber, rcgen::Error> {
    let mut bytes = [0u8; 16];
    random
        .fill(&mut bytes)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The one CERTIFICATE block of an already parsed file, without whatever
/// text (openssl's "Bag Attributes", comments) surrounds it.
/// Every CERTIFICATE block of a PEM file, in order, each ending in a newline.
fn pem_blocks(file: &[u8]) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let text = String::from_utf8_lossy(file);
    let mut out = Vec::new();
    let mut rest = &text[..];
    while let Some(begin) = rest.find(BEGIN) {
        let Some(end) = rest[begin..].find(END) else {
            break;
        };
        let stop = begin + end + END.len();
        out.push(format!("{}\n", &rest[begin..stop]));
        rest = &rest[stop..];
    }
    out
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| IdentityError::Io {
        op: "reading",
        path: path.to_owned(),
        source,
    })
}

/// Writes through a temporary file and a rename, so a crash never leaves a
/// half-written key or certificate under the final name.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let io_err = |op, path: &Path| {
        let path = path.to_owned();
        move |source| IdentityError::Io { op, path, source }
    };
    // A leftover from a crashed run would make create_new fail.
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    file.write_all(contents).map_err(io_err("writing", &tmp))?;
    file.sync_all().map_err(io_err("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    Ok(())
}
