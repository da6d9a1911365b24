//! TLS origination at the waypoint (DestinationRule `tls.mode: SIMPLE`):
//! the app's plain HTTP to an external host leaves the waypoint as HTTPS,
//! with the name from `sni` (else the host) in SNI and the host's
//! certificate checked against the CA of `credentialName` (a Secret of the
//! rule's namespace, as the store last read it) or `caCertificates` (a
//! PEM file the waypoint reads on each new connection, so that a replaced
//! file applies without a restart). A failed check refuses the request: 503 `UF`, the reason in
//! the body and the access log, counted in
//! `mesh_waypoint_tls_origination_failures`.

use std::{io, net::SocketAddr, sync::Arc};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::state::{SYSTEM_CA_BUNDLE, TlsOrigination};

/// Why an originated handshake did not complete, carried inside the
/// connector's `io::Error` up to the request.
#[derive(Debug, thiserror::Error)]
#[error("TLS error: {detail}")]
pub struct TlsFailure {
    /// The metric's `reason`: `certificate` (the host's certificate failed
    /// the check), `ca` (the CA file could not be used), `config` (the
    /// DestinationRule's tls cannot be applied), `handshake` (anything
    /// else).
    pub reason: &'static str,
    pub detail: String,
}

impl TlsFailure {
    fn io(reason: &'static str, detail: String) -> io::Error {
        io::Error::other(TlsFailure { reason, detail })
    }

    /// The failure behind an upstream error, if it is one.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TlsFailure> {
        let mut next = Some(e);
        while let Some(e) = next {
            if let Some(f) = e.downcast_ref::<TlsFailure>() {
                return Some(f);
            }
            // An io::Error's source skips the error it wraps.
            if let Some(f) = e
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref()?.downcast_ref::<TlsFailure>())
            {
                return Some(f);
            }
            next = e.source();
        }
        None
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The destination's host.
    pub service: String,
    pub reason: String,
}

pub type Failures = Family<FailureLabels, Counter>;

/// The TLS to speak to one destination: its settings and the name its
/// certificate must carry.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Origination {
    pub tls: TlsOrigination,
    /// `sni`, else the destination's host.
    pub server_name: String,
}

impl Origination {
    pub fn new(tls: TlsOrigination, host: &str) -> Self {
        let server_name = tls.sni.clone().unwrap_or_else(|| host.to_owned());
        Origination { tls, server_name }
    }

    /// A TLS client connection over `tcp`, the certificate checked.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        to: SocketAddr,
    ) -> io::Result<TlsStream<TcpStream>> {
        if let Some(why) = &self.tls.unusable {
            return Err(TlsFailure::io("config", why.clone()));
        }
        let name = ServerName::try_from(self.server_name.clone()).map_err(|_| {
            TlsFailure::io(
                "config",
                format!("{:?} is not a name to send in SNI", self.server_name),
            )
        })?;
        let config = client_config(&self.tls)?;
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                let (reason, detail) = match e.get_ref().and_then(|i| i.downcast_ref()) {
                    Some(rustls::Error::InvalidCertificate(c)) => (
                        "certificate",
                        format!(
                            "the certificate of {to} ({}) failed verification: {c:?}",
                            self.server_name
                        ),
                    ),
                    Some(other) => ("handshake", format!("handshake with {to}: {other}")),
                    None => ("handshake", format!("handshake with {to}: {e}")),
                };
                TlsFailure::io(reason, detail)
            })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS versions this build of rustls has (1.3), HTTP/1.1, the
/// certificate checked against the CA file for the SNI name or one of
/// `subjectAltNames`.
fn client_config(tls: &TlsOrigination) -> io::Result<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFailure::io("config", e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
        Arc::new(NoVerification(provider))
    } else {
        let (pem, source) = match (&tls.credential_ca, &tls.credential_name) {
            (Some(pem), Some(name)) => (pem.clone(), format!("credentialName {name}")),
            _ => {
                let path = tls
                    .ca_certificates
                    .clone()
                    .unwrap_or_else(|| SYSTEM_CA_BUNDLE.into());
                let pem = std::fs::read(&path).map_err(|e| {
                    TlsFailure::io(
                        "ca",
                        format!("caCertificates {} cannot be read: {e}", path.display()),
                    )
                })?;
                (pem, format!("caCertificates {}", path.display()))
            }
        };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| TlsFailure::io("ca", format!("{source}: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| TlsFailure::io("ca", format!("{source}: {e}")))?;
        }
        if roots.is_empty() {
            return Err(TlsFailure::io(
                "ca",
                format!("{source} holds no certificate"),
            ));
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsFailure::io("ca", e.to_string()))?;
        Arc::new(Names {
            webpki,
            alt_names: tls.subject_alt_names.clone(),
        })
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The CA's check, for the SNI name or, when `subjectAltNames` are given,
/// for one of them (Istio's meaning: the names the certificate may carry).
#[derive(Debug)]
struct Names {
    webpki: Arc<WebPkiServerVerifier>,
    alt_names: Vec<String>,
}

impl ServerCertVerifier for Names {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.alt_names.is_empty() {
            return self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp,
                now,
            );
        }
        let mut last = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        for name in &self.alt_names {
            let Ok(name) = ServerName::try_from(name.as_str()) else {
                continue;
            };
            match self
                .webpki
                .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `insecureSkipVerify: true`: any certificate is accepted (the handshake's
/// signatures are still checked, so the peer holds the key it shows).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
