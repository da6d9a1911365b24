//! The certificate manager: where certificates come from (the embedded CA or
//! the cluster CA), the current certificate of each local identity (renewed
//! at half-life) and the cached TLS configs that read it per handshake.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{crypto::CryptoProvider, pki_types::PrivateKeyDer, sign::CertifiedKey};
use tracing::{debug, info, warn};

use crate::sync::LockExt as _;

use super::{
    CaConfig, CaSource, CertInfo, Identity, IdentityError, WorkloadCert,
    ca::{self, Ca, RootCert},
    ca_client::{self, CaClient},
    rfc3339,
    tls::{self, CertSource},
    verify::Roots,
};

/// After a failed renewal the old certificate stays in use and the next
/// attempt waits twice as long as the last, up to this.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// A client config's identity and the server identities it accepts.
type ClientKey = (Identity, Vec<Identity>);

/// Client configs kept at most (one per source, accepted servers pair).
const MAX_CLIENT_CONFIGS: usize = 4096;

/// Where certificates come from and the certificates of the identities this
/// node serves.
#[derive(Debug)]
pub struct CertManager {
    trust_domain: String,
    cert_ttl: Duration,
    authority: Authority,
    root: RootCert,
    pub(super) provider: Arc<CryptoProvider>,
    pub(super) roots: Arc<Roots>,
    certs: Mutex<HashMap<Identity, Arc<Slot>>>,
    /// One request at a time per identity: whoever comes second waits and
    /// finds the certificate the first one got.
    pending: Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<()>>>>,
    /// Remote mode: identities asked for that have no certificate yet; the
    /// rotation task keeps trying to get them.
    wanted: Mutex<HashMap<Identity, Retry>>,
    server_configs: Mutex<HashMap<Identity, Arc<rustls::ServerConfig>>>,
    /// By our identity and the server identities accepted.
    client_configs: Mutex<HashMap<ClientKey, Arc<rustls::ClientConfig>>>,
}

#[derive(Debug)]
enum Authority {
    /// Signs here, synchronously if need be.
    Embedded(Arc<Ca>),
    /// Asks the cluster CA; never on the data path.
    Remote(Box<CaClient>),
}

/// When to try again for an identity without a certificate.
#[derive(Clone, Copy, Debug)]
struct Retry {
    at: SystemTime,
    failures: u32,
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
    /// Failed renewals since this certificate was issued.
    failures: u32,
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
        let (authority, root) = match &cfg.source {
            CaSource::Remote {
                address,
                root,
                token,
            } => {
                let client = CaClient::new(address, root, token)?;
                let root = client.root().clone();
                info!(
                    address = %address,
                    root = %root.facts.subject,
                    serial = %root.facts.serial,
                    token = %token.display(),
                    "certificates come from the cluster CA"
                );
                (Authority::Remote(Box::new(client)), root)
            }
            source => {
                let ca = Ca::from_source(source, td, &provider)?;
                let root = ca.root.clone();
                (Authority::Embedded(Arc::new(ca)), root)
            }
        };
        let mut anchors = vec![root.anchor.clone()];
        if let Some(path) = &cfg.trust_bundle {
            for extra in RootCert::load_bundle(path)? {
                if extra.der != root.der {
                    info!(
                        bundle = %path.display(),
                        root = %extra.facts.subject,
                        serial = %extra.facts.serial,
                        not_after = %rfc3339(extra.facts.not_after),
                        "also trusting peers of this root"
                    );
                    anchors.push(extra.anchor);
                }
            }
        }
        let roots = Arc::new(Roots::new(
            anchors,
            td,
            provider.signature_verification_algorithms,
        ));
        info!(
            trust_domain = %td,
            root = %root.facts.subject,
            serial = %root.facts.serial,
            not_after = %rfc3339(root.facts.not_after),
            cert_ttl = ?cfg.cert_ttl,
            "certificate authority ready"
        );
        Ok(Arc::new(CertManager {
            trust_domain: cfg.trust_domain,
            cert_ttl: cfg.cert_ttl,
            authority,
            root,
            provider,
            roots,
            certs: Mutex::default(),
            pending: Mutex::default(),
            wanted: Mutex::default(),
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
        self.root.pem.clone()
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
        match &self.authority {
            // Past half-life and the rotation task has not got to it (or is
            // not running): renew here rather than hand out an ageing
            // certificate.
            Authority::Embedded(ca) => {
                let renewed =
                    issue_current(ca, &self.provider, id, &self.trust_domain, self.cert_ttl)?;
                slot.replace(renewed.clone());
                Ok(renewed.cert)
            }
            // Renewing means the network; the rotation task does that.
            Authority::Remote(_) => Ok(current.cert),
        }
    }

    /// Makes sure `id` has a certificate, getting its first one if needed:
    /// from the cluster CA, or signed on a blocking thread by the embedded
    /// CA. Called when a pod is enrolled, so that neither the network nor
    /// key generation is on its first connection.
    #[allow(
        dead_code,
        reason = "called by pod enrolment, which is wired separately"
    )]
    pub async fn prepare(&self, id: &Identity) -> Result<(), IdentityError> {
        if self.certs.locked().contains_key(id) {
            return Ok(());
        }
        let gate = self.pending.locked().entry(id.clone()).or_default().clone();
        let result = async {
            let _turn = gate.lock().await;
            if self.certs.locked().contains_key(id) {
                return Ok(());
            }
            let current = self.fetch(id).await?;
            info!(identity = %id, serial = %current.cert.serial, "certificate issued");
            self.certs
                .locked()
                .entry(id.clone())
                .or_insert_with(|| Arc::new(Slot(RwLock::new(current))));
            Ok(())
        }
        .await;
        // Anyone still waiting holds the gate itself; the next caller finds
        // the certificate, or tries again after a failure.
        self.pending.locked().remove(id);
        let mut wanted = self.wanted.locked();
        match &result {
            Ok(()) => {
                wanted.remove(id);
            }
            // Not ours to sign, whoever asks: no point in trying again.
            Err(IdentityError::ForeignTrustDomain { .. }) => {}
            // The rotation task tries again, later each time.
            Err(_) => {
                let retry = wanted.entry(id.clone()).or_insert(Retry {
                    at: SystemTime::now(),
                    failures: 0,
                });
                retry.failures = retry.failures.saturating_add(1);
                retry.at = SystemTime::now() + retry_delay(retry.failures);
            }
        }
        result
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
                manager.renew_due().await;
            }
        })
    }

    /// Renews every cached certificate past half its lifetime, all at once,
    /// and in remote mode tries again for identities still without one;
    /// returns how many certificates it got. [`CertManager::spawn_rotation`]
    /// calls it on a timer. A failed renewal keeps the old certificate and
    /// is tried again after a back-off.
    pub async fn renew_due(&self) -> usize {
        let now = SystemTime::now();
        let due: Vec<(Identity, Arc<Slot>)> = self
            .certs
            .locked()
            .iter()
            .filter(|(_, slot)| now >= slot.current().renew_at)
            .map(|(id, slot)| (id.clone(), slot.clone()))
            .collect();
        let wanted: Vec<Identity> = self
            .wanted
            .locked()
            .iter()
            .filter(|(_, retry)| now >= retry.at)
            .map(|(id, _)| id.clone())
            .collect();
        let first = futures::future::join_all(wanted.iter().map(|id| async move {
            match self.prepare(id).await {
                Ok(()) => true,
                Err(e) => {
                    warn!(identity = %id, error = %e, "still no certificate");
                    false
                }
            }
        }));
        let renewals = due.into_iter().map(|(id, slot)| async move {
            match self.fetch(&id).await {
                Ok(current) => {
                    debug!(identity = %id, serial = %current.cert.serial, "certificate renewed");
                    slot.replace(current);
                    true
                }
                Err(e) => {
                    let mut current = slot.current();
                    current.failures = current.failures.saturating_add(1);
                    let delay = retry_delay(current.failures);
                    current.renew_at = SystemTime::now() + delay;
                    warn!(
                        identity = %id,
                        error = %e,
                        retry_in = ?delay,
                        not_after = %rfc3339(current.cert.not_after),
                        "certificate renewal failed; the current certificate stays in use"
                    );
                    slot.replace(current);
                    false
                }
            }
        });
        let (first, renewed) =
            futures::future::join(first, futures::future::join_all(renewals)).await;
        first.into_iter().chain(renewed).filter(|got| *got).count()
    }

    /// TLS 1.3 server config for inbound HBONE: presents `id`'s current
    /// certificate, requires a client certificate chaining to the root with a
    /// SPIFFE URI SAN in the trust domain. ALPN `h2`.
    pub fn server_config(&self, id: &Identity) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        if let Some(cfg) = self.server_configs.locked().get(id) {
            return Ok(cfg.clone());
        }
        let slot = self.slot(id)?;
        let cfg = tls::server_config(&self.provider, &self.roots, CertSource::Current(slot))
            .map_err(IdentityError::tls(id))?;
        let mut configs = self.server_configs.locked();
        Ok(configs.entry(id.clone()).or_insert(Arc::new(cfg)).clone())
    }

    /// TLS 1.3 client config for outbound HBONE: presents `id`'s current
    /// certificate; accepts only a server chaining to a root whose URI SANs
    /// include exactly `server`. ALPN `h2`. (The data path uses
    /// [`CertManager::client_config_for`].)
    #[cfg(test)]
    pub fn client_config(
        &self,
        id: &Identity,
        server: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        self.client_config_for(id, server, &[])
    }

    /// As `client_config` (which only tests call), and also accepting a
    /// server proving one of `also` (the identities a Service's endpoints
    /// may rightly show, as ztunnel accepts a destination's Service SANs).
    pub fn client_config_for(
        &self,
        id: &Identity,
        server: &Identity,
        also: &[Identity],
    ) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        let mut others: Vec<Identity> = also.iter().filter(|a| *a != server).cloned().collect();
        others.sort();
        others.dedup();
        let mut servers = Vec::with_capacity(1 + others.len());
        servers.push(server.clone());
        servers.extend(others);
        let key = (id.clone(), servers);
        if let Some(cfg) = self.client_configs.locked().get(&key) {
            return Ok(cfg.clone());
        }
        let slot = self.slot(id)?;
        let cfg = tls::client_config(
            &self.provider,
            &self.roots,
            Some(CertSource::Current(slot)),
            key.1.clone(),
        )
        .map_err(IdentityError::tls(id))?;
        let mut configs = self.client_configs.locked();
        // Sets of Service identities come and go with endpoints: the cache
        // starts over rather than grow without bound.
        if configs.len() >= MAX_CLIENT_CONFIGS {
            configs.clear();
        }
        Ok(configs.entry(key).or_insert(Arc::new(cfg)).clone())
    }

    pub fn dump(&self) -> Vec<CertInfo> {
        let root = &self.root.facts;
        let mut out = vec![CertInfo {
            identity: root.subject.clone(),
            serial: root.serial.clone(),
            not_before: rfc3339(root.not_before),
            not_after: rfc3339(root.not_after),
            role: "root",
        }];
        let mut slots: Vec<(Identity, Arc<Slot>)> = self
            .certs
            .locked()
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

    /// The certificates in ztunnel's `/config_dump` shape: one entry per
    /// identity this node serves or has asked for, sorted by identity,
    /// each with its state, its chain (leaf first) and the roots it is
    /// checked against (the CA's root; extra `--trust-bundle` roots are
    /// trusted but listed only in the summary).
    pub fn ztunnel_dump(&self) -> Vec<super::CertsDump> {
        use super::{CertDump, CertsDump};
        let root = CertDump {
            pem: super::base64(self.root.pem.as_bytes()),
            serial_number: self.root.facts.serial.clone(),
            valid_from: rfc3339(self.root.facts.not_before),
            expiration_time: rfc3339(self.root.facts.not_after),
        };
        let mut out: Vec<CertsDump> = self
            .certs
            .locked()
            .iter()
            .map(|(id, slot)| {
                let cert = slot.current().cert;
                let cert_chain = cert
                    .chain
                    .iter()
                    .enumerate()
                    .map(|(i, der)| {
                        let facts = x509_parser::parse_x509_certificate(der)
                            .ok()
                            .map(|(_, c)| ca::CertFacts::of(&c));
                        CertDump {
                            pem: super::base64(super::pem_of(der).as_bytes()),
                            serial_number: match (i, &facts) {
                                (0, _) => cert.serial.clone(),
                                (_, Some(f)) => f.serial.clone(),
                                (_, None) => String::new(),
                            },
                            valid_from: facts
                                .as_ref()
                                .map_or(rfc3339(cert.not_before), |f| rfc3339(f.not_before)),
                            expiration_time: facts
                                .as_ref()
                                .map_or(rfc3339(cert.not_after), |f| rfc3339(f.not_after)),
                        }
                    })
                    .collect();
                CertsDump {
                    identity: id.to_string(),
                    state: "Available".to_owned(),
                    cert_chain,
                    root_certs: vec![root.clone()],
                }
            })
            .collect();
        for (id, retry) in self.wanted.locked().iter() {
            if out.iter().any(|c| c.identity == id.to_string()) {
                continue;
            }
            out.push(CertsDump {
                identity: id.to_string(),
                state: if retry.failures == 0 {
                    "Initializing".to_owned()
                } else {
                    format!(
                        "Unavailable: the CA has not answered ({} failed requests)",
                        retry.failures
                    )
                },
                cert_chain: Vec::new(),
                root_certs: Vec::new(),
            });
        }
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Signs a certificate for `id` with the given validity, outside the
    /// cache and rotation and without the trust-domain check. For tests and
    /// tools: an expired certificate, one from another trust domain.
    #[allow(dead_code, reason = "API for tests and tools")]
    pub fn issue(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        match &self.authority {
            Authority::Embedded(ca) => issue(ca, id, not_before, not_after),
            Authority::Remote(client) => Err(IdentityError::Ca(format!(
                "cannot sign {id} here: certificates come from the cluster CA at {}",
                client.address()
            ))),
        }
    }

    /// A server config presenting `cert` as given, never renewed: for tests
    /// of what peers do with an expired or foreign certificate.
    #[cfg(test)]
    pub fn server_config_with(
        &self,
        cert: &WorkloadCert,
    ) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let key = certified_key(&self.provider, cert)?;
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
        let key = certified_key(&self.provider, cert)?;
        let cfg = tls::client_config(
            &self.provider,
            &self.roots,
            Some(CertSource::Fixed(key)),
            vec![server.clone()],
        )
        .map_err(IdentityError::tls(&cert.identity))?;
        Ok(Arc::new(cfg))
    }

    /// The slot for `id`. The embedded CA issues a first certificate here
    /// if [`CertManager::prepare`] has not; in remote mode that would mean
    /// waiting for the network, so it is an error instead, and the rotation
    /// task asks the CA in the background.
    fn slot(&self, id: &Identity) -> Result<Arc<Slot>, IdentityError> {
        if let Some(slot) = self.certs.locked().get(id) {
            return Ok(slot.clone());
        }
        let ca = match &self.authority {
            Authority::Embedded(ca) => ca,
            // The rotation task gets it; a later connection finds it.
            Authority::Remote(_) => {
                check_trust_domain(id, &self.trust_domain)?;
                self.wanted.locked().entry(id.clone()).or_insert(Retry {
                    at: SystemTime::now(),
                    failures: 0,
                });
                return Err(IdentityError::NotReady(Box::new(id.clone())));
            }
        };
        // Issue without holding the lock; if two callers race, the first
        // insert wins and the other certificate is dropped unused.
        let current = issue_current(ca, &self.provider, id, &self.trust_domain, self.cert_ttl)?;
        info!(identity = %id, serial = %current.cert.serial, "certificate issued");
        let mut certs = self.certs.locked();
        let slot = certs
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Slot(RwLock::new(current))));
        Ok(slot.clone())
    }

    /// A fresh certificate for a local identity, without blocking the
    /// async workers: key generation and signing run on a blocking thread.
    async fn fetch(&self, id: &Identity) -> Result<Current, IdentityError> {
        match &self.authority {
            Authority::Embedded(ca) => {
                let (ca, provider, id) = (ca.clone(), self.provider.clone(), id.clone());
                let (trust_domain, ttl) = (self.trust_domain.clone(), self.cert_ttl);
                tokio::task::spawn_blocking(move || {
                    issue_current(&ca, &provider, &id, &trust_domain, ttl)
                })
                .await
                .map_err(|e| IdentityError::Ca(format!("signing task failed: {e}")))?
            }
            Authority::Remote(client) => {
                check_trust_domain(id, &self.trust_domain)?;
                let requested = SystemTime::now();
                let cert = client.sign(id).await?;
                let tls = certified_key(&self.provider, &cert)?;
                Ok(Current {
                    renew_at: ca_client::renew_at(requested, &cert),
                    cert: Arc::new(cert),
                    tls,
                    failures: 0,
                })
            }
        }
    }
}

fn check_trust_domain(id: &Identity, trust_domain: &str) -> Result<(), IdentityError> {
    if id.trust_domain != trust_domain {
        return Err(IdentityError::ForeignTrustDomain {
            identity: Box::new(id.clone()),
            trust_domain: trust_domain.to_owned(),
        });
    }
    Ok(())
}

fn issue(
    ca: &Ca,
    id: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<WorkloadCert, IdentityError> {
    let issued = ca
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

/// A fresh certificate from the embedded CA for a local identity, valid
/// from a minute ago (clock skew between nodes) for `ttl`.
fn issue_current(
    ca: &Ca,
    provider: &CryptoProvider,
    id: &Identity,
    trust_domain: &str,
    ttl: Duration,
) -> Result<Current, IdentityError> {
    check_trust_domain(id, trust_domain)?;
    let now = SystemTime::now();
    let cert = issue(ca, id, now - ca::CLOCK_SKEW, now + ttl)?;
    let tls = certified_key(provider, &cert)?;
    Ok(Current {
        cert: Arc::new(cert),
        tls,
        // Half of the real lifetime: the back-dating is not counted.
        renew_at: now + ttl / 2,
        failures: 0,
    })
}

/// The certificate as rustls presents it.
fn certified_key(
    provider: &CryptoProvider,
    cert: &WorkloadCert,
) -> Result<Arc<CertifiedKey>, IdentityError> {
    let key = provider
        .key_provider
        .load_private_key(cert.key.clone_key())
        .map_err(IdentityError::tls(&cert.identity))?;
    Ok(Arc::new(CertifiedKey::new(cert.chain.clone(), key)))
}

/// 1 s, 2 s, 4 s, ... up to [`MAX_RETRY_DELAY`].
fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(MAX_RETRY_DELAY)
}
