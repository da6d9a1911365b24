//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, mutual
//! authentication, and our certificate looked up per handshake so a renewal
//! reaches new connections without rebuilding a config.

use std::sync::Arc;

use rustls::{
    ClientConfig, ServerConfig, SignatureScheme,
    client::{ResolvesClientCert, Resumption},
    crypto::CryptoProvider,
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::{
    Identity,
    manager::Slot,
    verify::{ClientVerifier, Roots, ServerVerifier},
};

const ALPN_H2: &[u8] = b"h2";

/// Which certificate a config presents.
#[derive(Debug)]
pub(super) enum CertSource {
    /// The identity's current certificate, renewed in place.
    Current(Arc<Slot>),
    /// One certificate as given, for tests.
    #[cfg(test)]
    Fixed(Arc<CertifiedKey>),
}

#[derive(Debug)]
struct Resolver(CertSource);

impl Resolver {
    fn get(&self) -> Arc<CertifiedKey> {
        match &self.0 {
            CertSource::Current(slot) => slot.current().tls,
            #[cfg(test)]
            CertSource::Fixed(key) => key.clone(),
        }
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

pub(super) fn server_config(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<Roots>,
    cert: CertSource,
) -> Result<ServerConfig, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(ClientVerifier::new(roots.clone())))
        .with_cert_resolver(Arc::new(Resolver(cert)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection proves its current certificate, and
    // HBONE connections are long-lived and pooled anyway.
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// `cert: None` makes a client without a certificate (for tests). The
/// server must prove one of `servers` (not empty).
pub(super) fn client_config(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<Roots>,
    cert: Option<CertSource>,
    servers: Vec<Identity>,
) -> Result<ClientConfig, rustls::Error> {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier::new(roots.clone(), servers)));
    let mut cfg = match cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(Resolver(cert))),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // A resumed session would skip the server identity check.
    cfg.resumption = Resumption::disabled();
    Ok(cfg)
}
