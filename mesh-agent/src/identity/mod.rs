//! Workload identity: SPIFFE IDs, the certificate authority that signs them,
//! the per-identity certificates (renewed at half-life) and the rustls
//! configurations that present and verify them.

use std::{
    fmt,
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// The form Istio's AuthorizationPolicy principals use: the SPIFFE ID
    /// without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a SPIFFE workload ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
)]
pub struct BadIdentity(pub String);

impl FromStr for Identity {
    type Err = BadIdentity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadIdentity(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("CA: {0}")]
    Ca(String),
}

/// Where the embedded CA's root comes from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// Generate a root once and keep it in `dir` (root-cert.pem, root-key.pem).
    Generate { dir: PathBuf },
    /// Bring your own root: PEM certificate and key files.
    Files { cert: PathBuf, key: PathBuf },
}

#[derive(Clone, Debug)]
pub struct CaConfig {
    pub trust_domain: String,
    /// Lifetime of workload certificates; they are renewed at half of it.
    pub cert_ttl: Duration,
    pub source: CaSource,
}

/// A workload certificate and its key.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// For `/config_dump`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertInfo {
    pub identity: String,
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    pub not_after: String,
    pub role: &'static str,
}

/// The embedded CA and the certificates of the identities this node serves.
#[derive(Debug)]
pub struct CertManager {}

impl CertManager {
    pub fn new(cfg: CaConfig) -> Result<Arc<Self>, IdentityError> {
        let _ = cfg;
        unimplemented!()
    }

    pub fn trust_domain(&self) -> &str {
        unimplemented!()
    }

    /// The trust root, PEM.
    pub fn root_pem(&self) -> String {
        unimplemented!()
    }

    /// The current certificate for a local identity, issued on first use.
    pub fn certificate(&self, id: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        let _ = id;
        unimplemented!()
    }

    /// Renews certificates past half their lifetime. Live TLS sessions keep
    /// going; new handshakes get the new certificate.
    pub fn spawn_rotation(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        unimplemented!()
    }

    /// TLS 1.3 server config for inbound HBONE: presents `id`'s current
    /// certificate, requires a client certificate chaining to the root with a
    /// SPIFFE URI SAN in the trust domain. ALPN `h2`.
    pub fn server_config(&self, id: &Identity) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let _ = id;
        unimplemented!()
    }

    /// TLS 1.3 client config for outbound HBONE: presents `id`'s current
    /// certificate; accepts only a server chaining to the root whose URI SAN
    /// is exactly `server`. ALPN `h2`.
    pub fn client_config(
        &self,
        id: &Identity,
        server: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        let _ = (id, server);
        unimplemented!()
    }

    pub fn dump(&self) -> Vec<CertInfo> {
        unimplemented!()
    }
}

/// The SPIFFE identity in the peer's (already verified) leaf certificate.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    let _ = conn;
    unimplemented!()
}
