//! Peer certificate checks for HBONE mTLS: the chain must lead to one of
//! our roots (webpki, the provider's signature algorithms) and the leaf
//! must name a SPIFFE workload in a URI SAN: as a client, one of those we
//! meant to reach; as a server, any of our trust domain (as ztunnel
//! accepts them). Server names are never consulted.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use x509_parser::extensions::GeneralName;

use super::{Identity, IdentityError};

/// The trust roots (the CA's, then any from the trust bundle) and what
/// verifying against them needs.
#[derive(Debug)]
pub(super) struct Roots {
    anchors: Vec<TrustAnchor<'static>>,
    /// Sent in the CertificateRequest so clients know which roots we trust.
    hints: Vec<DistinguishedName>,
    trust_domain: String,
    algs: WebPkiSupportedAlgorithms,
}

impl Roots {
    pub(super) fn new(
        anchors: Vec<TrustAnchor<'static>>,
        trust_domain: &str,
        algs: WebPkiSupportedAlgorithms,
    ) -> Self {
        let hints = anchors
            .iter()
            .map(|a| DistinguishedName::in_sequence(a.subject.as_ref()))
            .collect();
        Roots {
            anchors,
            hints,
            trust_domain: trust_domain.to_owned(),
            algs,
        }
    }

    /// The chain leads to a root, every certificate is valid at `now` and
    /// the leaf allows `usage`. Returns the leaf's SPIFFE identities.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<Vec<Identity>, rustls::Error> {
        let leaf = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        leaf.verify_for_usage(
            self.algs.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        spiffe_ids(end_entity).map_err(reject)
    }
}

/// Inbound: any workload of our trust domain, chained to our root.
#[derive(Debug)]
pub(super) struct ClientVerifier {
    roots: Arc<Roots>,
}

impl ClientVerifier {
    pub(super) fn new(roots: Arc<Roots>) -> Self {
        ClientVerifier { roots }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.roots.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ids = self.roots.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        if in_trust_domain(&ids, &self.roots.trust_domain).is_none() {
            return Err(reject(IdentityError::ForeignTrustDomain {
                identity: Box::new(ids[0].clone()),
                trust_domain: self.roots.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    // The configs allow TLS 1.3 only; this is here for the trait.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.roots.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.roots.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.roots.algs.supported_schemes()
    }
}

/// The first of `ids` in `trust_domain`: the identity a peer is known by.
pub(super) fn in_trust_domain<'a>(ids: &'a [Identity], trust_domain: &str) -> Option<&'a Identity> {
    ids.iter().find(|id| id.trust_domain == trust_domain)
}

/// Outbound: the workload we meant to reach (or, as ztunnel allows, one
/// of the other identities the destination may rightly show), whatever
/// name or address the connection was opened with.
#[derive(Debug)]
pub(super) struct ServerVerifier {
    roots: Arc<Roots>,
    /// The destination workload's identity first, then any others.
    expected: Vec<Identity>,
}

impl ServerVerifier {
    pub(super) fn new(roots: Arc<Roots>, expected: Vec<Identity>) -> Self {
        ServerVerifier { roots, expected }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ids = self.roots.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if !ids.iter().any(|id| self.expected.contains(id)) {
            return Err(reject(IdentityError::UnexpectedPeer {
                expected: Box::new(self.expected[0].clone()),
                presented: Box::new(ids[0].clone()),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    // The configs allow TLS 1.3 only; this is here for the trait.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.roots.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.roots.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.roots.algs.supported_schemes()
    }
}

/// The SPIFFE ID in a certificate's only URI SAN. Other SAN kinds (DNS
/// names) may be present; a second URI makes the identity ambiguous.
pub(super) fn spiffe_id(der: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    let bad = |reason: String| IdentityError::NoSpiffeId(reason);
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("malformed subjectAltName: {e}")))?
        .ok_or_else(|| bad("no subjectAltName".into()))?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => uri.parse().map_err(|e| bad(format!("{e}"))),
        (None, _) => Err(bad("no URI SAN".into())),
        (Some(_), Some(_)) => Err(bad("more than one URI SAN".into())),
    }
}

/// The SPIFFE workload IDs among a certificate's URI SANs, in order; other
/// URIs are skipped. At least one, or an error.
pub(super) fn spiffe_ids(der: &CertificateDer<'_>) -> Result<Vec<Identity>, IdentityError> {
    let bad = |reason: String| IdentityError::NoSpiffeId(reason);
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("malformed subjectAltName: {e}")))?
        .ok_or_else(|| bad("no subjectAltName".into()))?;
    let ids: Vec<Identity> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.parse().ok(),
            _ => None,
        })
        .collect();
    if ids.is_empty() {
        return Err(bad("no URI SAN is a SPIFFE workload ID".into()));
    }
    Ok(ids)
}

/// Our own refusals, as a rustls error that keeps the reason: callers can
/// downcast `OtherError.0` to [`IdentityError`].
fn reject(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// webpki's verdicts in the rustls terms that pick the TLS alert (expired,
/// unknown CA, ...); the rest stay readable inside `Other`.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let e = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        E::UnsupportedCriticalExtension => CertificateError::UnhandledCriticalExtension,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(e)
}
