//! The CA's own serving certificate, issued by its root, renewed at half its
//! lifetime, and handed to rustls for every handshake.

use std::{
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use rustls::{
    crypto::CryptoProvider,
    pki_types::PrivateKeyDer,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tracing::{info, warn};

use super::CaServer;
use crate::identity::ca::{CLOCK_SKEW, Ca};

/// The CA's own certificate and when to renew it.
struct Serving {
    key: Arc<CertifiedKey>,
    serial: String,
    renew_at: SystemTime,
}

#[derive(Debug)]
pub(super) struct ServingCert(RwLock<Serving>);

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// A first serving certificate for `names`.
    pub(super) fn new(
        ca: &Ca,
        provider: &CryptoProvider,
        names: &[String],
        ttl: Duration,
    ) -> anyhow::Result<ServingCert> {
        Ok(ServingCert(RwLock::new(serving_cert(
            ca, provider, names, ttl,
        )?)))
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .key
            .clone()
    }

    fn renew_at(&self) -> SystemTime {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .renew_at
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn serving_cert(
    ca: &Ca,
    provider: &CryptoProvider,
    names: &[String],
    ttl: Duration,
) -> anyhow::Result<Serving> {
    let now = SystemTime::now();
    let issued = ca
        .issue_server(names, now - CLOCK_SKEW, now + ttl)
        .with_context(|| format!("--server-names {names:?}: making the serving certificate"))?;
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(issued.key))?;
    Ok(Serving {
        key: Arc::new(CertifiedKey::new(vec![issued.cert], key)),
        serial: issued.facts.serial,
        renew_at: now + ttl / 2,
    })
}

impl CaServer {
    /// Replaces the serving certificate once it is past half its life.
    pub(super) fn renew_serving_cert(&self) {
        if SystemTime::now() < self.serving.renew_at() {
            return;
        }
        match serving_cert(&self.ca, &self.provider, &self.server_names, self.cert_ttl) {
            Ok(fresh) => {
                info!(serial = %fresh.serial, "serving certificate renewed");
                *self
                    .serving
                    .0
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = fresh;
            }
            // The current one is still valid for half its life.
            Err(e) => warn!(error = %e, "renewing the serving certificate failed"),
        }
    }
}
