//! Workload identity: SPIFFE IDs, the certificate authority that signs them,
//! the per-identity certificates (renewed at half-life) and the rustls
//! configurations that present and verify them.

mod ca;
mod ca_client;
pub mod ca_server;
mod manager;
#[cfg(test)]
mod tests;
mod tls;
mod verify;

#[allow(
    unused_imports,
    reason = "API for tools; the manager uses the client through CaSource::Remote"
)]
pub use self::ca_client::CaClient;
pub use self::manager::CertManager;

use std::{
    fmt, io,
    path::PathBuf,
    str::FromStr,
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

#[derive(thiserror::Error)]
pub enum IdentityError {
    #[error("CA: {0}")]
    Ca(String),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A root certificate or key file that cannot be used, and why.
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("{} is not the private key of the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("generating the root CA: {0}")]
    GenerateRoot(#[source] rcgen::Error),
    #[error("issuing a certificate for {identity}: {source}")]
    Issue {
        identity: Box<Identity>,
        #[source]
        source: rcgen::Error,
    },
    #[error("TLS setup for {identity}: {source}")]
    Tls {
        identity: Box<Identity>,
        #[source]
        source: rustls::Error,
    },
    /// A certificate without a URI SAN holding a SPIFFE workload ID (or,
    /// from our own CA, with more than one URI SAN).
    #[error("certificate has no usable SPIFFE ID: {0}")]
    NoSpiffeId(String),
    #[error("{identity} is outside the trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: Box<Identity>,
        trust_domain: String,
    },
    /// Remote mode: the identity has no certificate yet because the cluster
    /// CA has not (successfully) answered for it. The data path never waits
    /// for the network; it fails the connection instead.
    #[error("no certificate yet for {0}: the cluster CA has not answered")]
    NotReady(Box<Identity>),
    /// A cluster CA address that cannot be used, and why.
    #[error("--ca-address {address:?}: {reason}")]
    BadCaAddress { address: String, reason: String },
    /// A request to the cluster CA that failed: what the CA (or the way to
    /// it) said.
    #[error("cluster CA {address}: {reason}")]
    Remote { address: String, reason: String },
    /// The server proved an identity other than the one the client dialled.
    #[error("server presented {presented}, expected {expected}")]
    UnexpectedPeer {
        expected: Box<Identity>,
        presented: Box<Identity>,
    },
}

/// rustls prints a verifier's `CertificateError::Other` with `{:?}`; this
/// keeps handshake errors as readable as the `Display` text.
impl fmt::Debug for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl IdentityError {
    fn tls(identity: &Identity) -> impl Fn(rustls::Error) -> IdentityError + '_ {
        move |source| IdentityError::Tls {
            identity: Box::new(identity.clone()),
            source,
        }
    }
}

/// Where certificates come from: the embedded CA's root, or a cluster CA.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// Generate a root once and keep it in `dir` (root-cert.pem, root-key.pem).
    Generate { dir: PathBuf },
    /// Bring your own root: PEM certificate and key files.
    Files { cert: PathBuf, key: PathBuf },
    /// Ask the cluster CA (`mesh-agent ca`) at `address` (`https://host:port`),
    /// trusting the PEM root in `root` and showing the ServiceAccount token
    /// in `token` (read again for every request).
    Remote {
        address: String,
        root: PathBuf,
        token: PathBuf,
    },
}

#[derive(Clone, Debug)]
pub struct CaConfig {
    pub trust_domain: String,
    /// Lifetime of workload certificates; they are renewed at half of it.
    pub cert_ttl: Duration,
    pub source: CaSource,
    /// More roots whose workloads peers are accepted from (PEM bundle), on
    /// top of the CA's own: how a root is rotated without a flag day.
    pub trust_bundle: Option<PathBuf>,
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

/// One identity's certificates as ztunnel's `/config_dump` lists them.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertsDump {
    pub identity: String,
    /// `Available`, `Initializing` (asked for, no answer yet) or
    /// `Unavailable: <why>`.
    pub state: String,
    /// Leaf first, then intermediates.
    pub cert_chain: Vec<CertDump>,
    pub root_certs: Vec<CertDump>,
}

/// One certificate: its PEM text base64-encoded, as ztunnel gives it.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertDump {
    pub pem: String,
    /// Hex.
    pub serial_number: String,
    /// RFC 3339.
    pub valid_from: String,
    pub expiration_time: String,
}

/// A certificate's PEM block.
fn pem_of(der: &[u8]) -> String {
    let body = base64(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Standard base64, padded, on one line.
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// When the chain the peer presented stops being valid: the earliest
/// `notAfter` among its certificates (the verifier checked them all at the
/// handshake; a long-lived connection outlives that check). `None` when
/// there is no chain or a certificate does not parse.
pub fn peer_valid_until(conn: &rustls::CommonState) -> Option<SystemTime> {
    conn.peer_certificates()?
        .iter()
        .map(|c| {
            let (_, x509) = x509_parser::parse_x509_certificate(c).ok()?;
            Some(SystemTime::from(x509.validity().not_after.to_datetime()))
        })
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .min()
}

/// `t` on the monotonic clock (now if it is past).
pub fn instant_of(t: SystemTime) -> tokio::time::Instant {
    let left = t.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::Instant::now() + left
}

/// The SPIFFE identity in the peer's (already verified) leaf certificate:
/// the first of its SPIFFE URI SANs in `trust_domain`, else its first.
pub fn peer_identity(conn: &rustls::CommonState, trust_domain: &str) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    let ids = verify::spiffe_ids(leaf).ok()?;
    verify::in_trust_domain(&ids, trust_domain)
        .or(ids.first())
        .cloned()
}

/// The SPIFFE identity of a certificate: its one URI SAN, parsed.
#[cfg(test)]
pub fn cert_identity(cert: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    verify::spiffe_id(cert)
}

/// RFC 3339 in UTC, to the second (certificates carry no finer times).
fn rfc3339(t: SystemTime) -> String {
    use time::{OffsetDateTime, format_description::well_known::Rfc3339};
    OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{t:?}"))
}
