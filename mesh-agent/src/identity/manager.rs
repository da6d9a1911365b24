//! The certificate manager: the embedded CA, the current certificate of each
//! local identity (renewed at half-life) and the cached TLS configs that read
//! it per handshake.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{crypto::CryptoProvider, pki_types::PrivateKeyDer, sign::CertifiedKey};
use tracing::{debug, info, warn};

use super::{
    CaConfig, CertInfo, Identity, IdentityError, WorkloadCert,
    ca::{self, Ca},
    rfc3339,
    tls::{self, CertSource},
    verify::Roots,
};

/// The embedded CA and the certificates of the identities this node serves.
#[derive(Debug)]
pub struct CertManager {
    trust_domain: String,
    cert_ttl: Duration,
    ca: Ca,
    pub(super) provider: Arc<CryptoProvider>,
    pub(super) roots: Arc<Roots>,
    certs: Mutex<HashMap<Identity, Arc<Slot>>>,
    server_configs: Mutex<HashMap<Identity, Arc<rustls::ServerConfig>>>,
    client_configs: Mutex<HashMap<(Identity, Identity), Arc<rustls::ClientConfig>>>,
}

/// The current certificate of one identity. The TLS configs hold the slot and
/// read it per handshake, so a renewal reaches new connections without
/// rebuilding any config.
#[derive(Debug)]
pub(super) struct Slot(RwLock<Current>);

#[derive(Clone, Debug)]
pub(super) struct Current {
    cert: Arc<WorkloadCert>,
    pub(super) tls: Arc<CertifiedKey>,
    renew_at: SystemTime,
}

impl Slot {
    pub(super) fn current(&self) -> Current {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, current: Current) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = current;
    }
}

/// The maps only ever get whole values inserted, so a panic elsewhere while
/// one was held cannot leave them half-updated.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CertManager {
    pub fn new(cfg: CaConfig) -> Result<Arc<Self>, IdentityError> {
        let td = &cfg.trust_domain;
        if td.is_empty() || td.contains('/') || td.contains(':') {
            return Err(IdentityError::Ca(format!(
                "trust domain {td:?} must be a non-empty name without '/' or ':'"
            )));
        }
        if cfg.cert_ttl.is_zero() {
            return Err(IdentityError::Ca(
                "workload certificate TTL must be above zero".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = Ca::from_source(&cfg.source, td, &provider)?;
        let roots = Arc::new(Roots::new(
            ca.anchor.clone(),
            td,
            provider.signature_verification_algorithms,
        ));
        info!(
            trust_domain = %td,
            root = %ca.facts.subject,
            serial = %ca.facts.serial,
            not_after = %rfc3339(ca.facts.not_after),
            cert_ttl = ?cfg.cert_ttl,
            "certificate authority ready"
        );
        Ok(Arc::new(CertManager {
            trust_domain: cfg.trust_domain,
            cert_ttl: cfg.cert_ttl,
            ca,
            provider,
            roots,
            certs: Mutex::default(),
            server_configs: Mutex::default(),
            client_configs: Mutex::default(),
        }))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust root, PEM.
    #[allow(
        dead_code,
        reason = "API for the admin server and tools, not called by every build yet"
    )]
    pub fn root_pem(&self) -> String {
        self.ca.pem.clone()
    }

    /// The current certificate for a local identity, issued on first use.
    #[allow(
        dead_code,
        reason = "API for the admin server and tools, not called by every build yet"
    )]
    pub fn certificate(&self, id: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        let slot = self.slot(id)?;
        let current = slot.current();
        if SystemTime::now() < current.renew_at {
            return Ok(current.cert);
        }
        // Past half-life and the rotation task has not got to it (or is not
        // running): renew here rather than hand out an ageing certificate.
        let renewed = self.issue_current(id)?;
        slot.replace(renewed.clone());
        Ok(renewed.cert)
    }

    /// Renews certificates past half their lifetime. Live TLS sessions keep
    /// going; new handshakes get the new certificate.
    pub fn spawn_rotation(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let manager = Arc::downgrade(self);
        let period = (self.cert_ttl / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Holding only a weak reference lets the manager go away; the
                // task ends with it.
                let Some(manager) = manager.upgrade() else {
                    break;
                };
                // Key generation and signing are CPU work: keep them off the
                // async workers.
                if let Err(e) = tokio::task::spawn_blocking(move || manager.renew_due()).await {
                    warn!(error = %e, "certificate renewal task failed");
                }
            }
        })
    }

    /// Re-issues every cached certificate past half its lifetime; returns how
    /// many were renewed. [`CertManager::spawn_rotation`] calls it on a timer.
    pub fn renew_due(&self) -> usize {
        let slots: Vec<(Identity, Arc<Slot>)> = lock(&self.certs)
            .iter()
            .map(|(id, slot)| (id.clone(), slot.clone()))
            .collect();
        let now = SystemTime::now();
        let mut renewed = 0;
        for (id, slot) in slots {
            if now < slot.current().renew_at {
                continue;
            }
            match self.issue_current(&id) {
                Ok(current) => {
                    debug!(identity = %id, serial = %current.cert.serial, "certificate renewed");
                    slot.replace(current);
                    renewed += 1;
                }
                // The old certificate stays in use; the next tick retries.
                Err(e) => warn!(identity = %id, error = %e, "certificate renewal failed"),
            }
        }
        renewed
    }

    /// TLS 1.3 server config for inbound HBONE: presents `id`'s current
    /// certificate, requires a client certificate chaining to the root with a
    /// SPIFFE URI SAN in the trust domain. ALPN `h2`.
    pub fn server_config(&self, id: &Identity) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        if let Some(cfg) = lock(&self.server_configs).get(id) {
            return Ok(cfg.clone());
        }
        let slot = self.slot(id)?;
        let cfg = tls::server_config(&self.provider, &self.roots, CertSource::Current(slot))
            .map_err(IdentityError::tls(id))?;
        let mut configs = lock(&self.server_configs);
        Ok(configs.entry(id.clone()).or_insert(Arc::new(cfg)).clone())
    }

    /// TLS 1.3 client config for outbound HBONE: presents `id`'s current
    /// certificate; accepts only a server chaining to the root whose URI SAN
    /// is exactly `server`. ALPN `h2`.
    pub fn client_config(
        &self,
        id: &Identity,
        server: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        let key = (id.clone(), server.clone());
        if let Some(cfg) = lock(&self.client_configs).get(&key) {
            return Ok(cfg.clone());
        }
        let slot = self.slot(id)?;
        let cfg = tls::client_config(
            &self.provider,
            &self.roots,
            Some(CertSource::Current(slot)),
            server,
        )
        .map_err(IdentityError::tls(id))?;
        let mut configs = lock(&self.client_configs);
        Ok(configs.entry(key).or_insert(Arc::new(cfg)).clone())
    }

    pub fn dump(&self) -> Vec<CertInfo> {
        let root = &self.ca.facts;
        let mut out = vec![CertInfo {
            identity: root.subject.clone(),
            serial: root.serial.clone(),
            not_before: rfc3339(root.not_before),
            not_after: rfc3339(root.not_after),
            role: "root",
        }];
        let mut slots: Vec<(Identity, Arc<Slot>)> = lock(&self.certs)
            .iter()
            .map(|(id, slot)| (id.clone(), slot.clone()))
            .collect();
        slots.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(slots.into_iter().map(|(id, slot)| {
            let cert = slot.current().cert;
            CertInfo {
                identity: id.to_string(),
                serial: cert.serial.clone(),
                not_before: rfc3339(cert.not_before),
                not_after: rfc3339(cert.not_after),
                role: "workload",
            }
        }));
        out
    }

    /// Signs a certificate for `id` with the given validity, outside the
    /// cache and rotation and without the trust-domain check. For tests and
    /// tools: an expired certificate, one from another trust domain.
    pub fn issue(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        let issued =
            self.ca
                .issue(id, not_before, not_after)
                .map_err(|source| IdentityError::Issue {
                    identity: Box::new(id.clone()),
                    source,
                })?;
        Ok(WorkloadCert {
            identity: id.clone(),
            chain: vec![issued.cert],
            key: PrivateKeyDer::Pkcs8(issued.key),
            serial: issued.facts.serial,
            not_before: issued.facts.not_before,
            not_after: issued.facts.not_after,
        })
    }

    /// A server config presenting `cert` as given, never renewed: for tests
    /// of what peers do with an expired or foreign certificate.
    #[cfg(test)]
    pub fn server_config_with(
        &self,
        cert: &WorkloadCert,
    ) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let key = self.certified_key(cert)?;
        let cfg = tls::server_config(&self.provider, &self.roots, CertSource::Fixed(key))
            .map_err(IdentityError::tls(&cert.identity))?;
        Ok(Arc::new(cfg))
    }

    /// A client config presenting `cert` as given and expecting `server`:
    /// for tests of what servers do with an expired or foreign certificate.
    #[cfg(test)]
    pub fn client_config_with(
        &self,
        cert: &WorkloadCert,
        server: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        let key = self.certified_key(cert)?;
        let cfg = tls::client_config(
            &self.provider,
            &self.roots,
            Some(CertSource::Fixed(key)),
            server,
        )
        .map_err(IdentityError::tls(&cert.identity))?;
        Ok(Arc::new(cfg))
    }

    /// The slot for `id`, issuing its first certificate if needed.
    fn slot(&self, id: &Identity) -> Result<Arc<Slot>, IdentityError> {
        if let Some(slot) = lock(&self.certs).get(id) {
            return Ok(slot.clone());
        }
        // Issue without holding the lock; if two callers race, the first
        // insert wins and the other certificate is dropped unused.
        let current = self.issue_current(id)?;
        info!(identity = %id, serial = %current.cert.serial, "certificate issued");
        let mut certs = lock(&self.certs);
        let slot = certs
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Slot(RwLock::new(current))));
        Ok(slot.clone())
    }

    /// A fresh certificate for a local identity, valid from a minute ago
    /// (clock skew between nodes) for the configured TTL.
    fn issue_current(&self, id: &Identity) -> Result<Current, IdentityError> {
        if id.trust_domain != self.trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                identity: Box::new(id.clone()),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let now = SystemTime::now();
        let cert = self.issue(id, now - ca::CLOCK_SKEW, now + self.cert_ttl)?;
        let tls = self.certified_key(&cert)?;
        Ok(Current {
            cert: Arc::new(cert),
            tls,
            // Half of the real lifetime: the back-dating is not counted.
            renew_at: now + self.cert_ttl / 2,
        })
    }

    /// The certificate as rustls presents it.
    fn certified_key(&self, cert: &WorkloadCert) -> Result<Arc<CertifiedKey>, IdentityError> {
        let key = self
            .provider
            .key_provider
            .load_private_key(cert.key.clone_key())
            .map_err(IdentityError::tls(&cert.identity))?;
        Ok(Arc::new(CertifiedKey::new(cert.chain.clone(), key)))
    }
}
