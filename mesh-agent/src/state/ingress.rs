//! Ingress gateways: a `Gateway` of an ingress class (`mesh-ingress`, or
//! Istio's `istio`) takes traffic from outside the mesh on its listeners
//! (HTTP, or HTTPS terminated with the certificate of a Kubernetes TLS
//! Secret in the Gateway's namespace, picked by SNI), and sends it into the
//! mesh by the HTTPRoutes attached to it. What cannot be served is warned
//! about and left out; a listener whose Secret does not load refuses its
//! handshakes rather than serving another certificate.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::Secret;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};

use super::{
    ConfigWarning,
    gateway::{Gateway, SecretRef},
    waypoint::{Waypoint, WaypointFor},
    yaml::Objects,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ListenerProtocol {
    Http,
    Https,
}

/// One listener of an ingress gateway.
#[derive(Debug, serde::Serialize)]
pub struct IngressListener {
    pub name: String,
    pub port: u16,
    pub protocol: ListenerProtocol,
    /// None: any host.
    pub hostname: Option<String>,
    /// `namespace/name` of the Secret an HTTPS listener serves.
    pub secret: Option<String>,
    /// HTTPS: the Secret's certificate, or why there is none.
    #[serde(skip)]
    pub certificate: Option<Result<Arc<CertifiedKey>, String>>,
}

/// An ingress Gateway and its listeners.
#[derive(Debug, serde::Serialize)]
pub struct IngressGateway {
    pub namespace: String,
    pub name: String,
    /// `metadata.generation`, for the status' `observedGeneration`.
    pub generation: Option<i64>,
    pub listeners: Vec<IngressListener>,
    /// Listeners not programmed: name, status reason, message.
    pub refused: Vec<(String, &'static str, String)>,
    /// The Gateway as AuthorizationPolicy and rate limits address it.
    #[serde(skip)]
    pub anchor: Arc<Waypoint>,
}

/// Why a TLS handshake gets no certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsRefusal {
    /// No SNI, and every HTTPS listener of the port names a hostname.
    NoSni,
    /// An SNI no HTTPS listener of the port serves.
    UnknownSni,
    /// The listener's Secret did not load.
    NoCertificate(String),
}

impl TlsRefusal {
    /// The reason label of `mesh_connections{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            TlsRefusal::NoSni => "tls_no_sni",
            TlsRefusal::UnknownSni => "tls_unknown_sni",
            TlsRefusal::NoCertificate(_) => "tls_no_certificate",
        }
    }
}

/// Whether a listener or route hostname (`*.example.com` matches one or
/// more labels in front of `example.com`) matches a host (no port).
pub fn hostname_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1 && {
                let (head, tail) = host.split_at(host.len() - suffix.len());
                tail.eq_ignore_ascii_case(suffix) && head.ends_with('.')
            }
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The host of a Host header or authority: without its port.
pub fn host_only(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split(']').next().map_or(host, |h| &h[1..]);
    }
    host.rsplit_once(':')
        .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

impl IngressGateway {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The listener of `port` and `protocol` that serves `host` (None: no
    /// SNI): an exact hostname first, then the longest wildcard, then one
    /// without a hostname (the Gateway API's precedence).
    pub fn listener(
        &self,
        port: u16,
        protocol: ListenerProtocol,
        host: Option<&str>,
    ) -> Option<&IngressListener> {
        self.listeners
            .iter()
            .filter(|l| l.port == port && l.protocol == protocol)
            .filter(|l| match (&l.hostname, host) {
                (None, _) => true,
                (Some(p), Some(h)) => hostname_matches(p, h),
                (Some(_), None) => false,
            })
            .max_by_key(|l| match &l.hostname {
                None => (0, 0),
                Some(p) if p.starts_with("*.") => (1, p.len()),
                Some(p) => (2, p.len()),
            })
    }

    /// The certificate for a handshake on `port` with `sni`.
    #[cfg(test)]
    pub fn certificate(
        &self,
        port: u16,
        sni: Option<&str>,
    ) -> Result<Arc<CertifiedKey>, TlsRefusal> {
        self.tls_listener(port, sni).map(|(_, c)| c)
    }

    /// The HTTPS listener of `port` that serves `sni`, and its certificate.
    pub fn tls_listener(
        &self,
        port: u16,
        sni: Option<&str>,
    ) -> Result<(&IngressListener, Arc<CertifiedKey>), TlsRefusal> {
        let Some(l) = self.listener(port, ListenerProtocol::Https, sni) else {
            return Err(match sni {
                None => TlsRefusal::NoSni,
                Some(_) => TlsRefusal::UnknownSni,
            });
        };
        match &l.certificate {
            Some(Ok(c)) => Ok((l, c.clone())),
            Some(Err(e)) => Err(TlsRefusal::NoCertificate(e.clone())),
            None => Err(TlsRefusal::NoCertificate("no certificateRefs".into())),
        }
    }

    /// The ports to listen on, with their protocol.
    pub fn ports(&self) -> BTreeMap<u16, ListenerProtocol> {
        self.listeners
            .iter()
            .map(|l| (l.port, l.protocol))
            .collect()
    }
}

/// Every ingress Gateway, its listeners and their certificates.
/// `certificates`: whether Secrets are read (else listeners get none and
/// nothing is said about them: this process does not serve them).
pub(super) fn compile(
    objects: &Objects,
    certificates: bool,
    warnings: &mut Vec<ConfigWarning>,
) -> BTreeMap<(String, String), Arc<IngressGateway>> {
    let mut out = BTreeMap::new();
    for ((ns, name), parsed) in &objects.gateways {
        let gw: &Gateway = &parsed.object;
        if !gw.is_ingress() {
            continue;
        }
        let object = format!("Gateway {ns}/{name}");
        let mut refused: Vec<(String, &'static str, String)> = Vec::new();
        // A listener with a reason is not programmed; one without (a
        // certificate that does not load) is kept, refusing handshakes.
        let mut warn = |listener: &str, reason: &'static str, message: String| {
            if !reason.is_empty() {
                refused.push((listener.to_owned(), reason, message.clone()));
            }
            warnings.push(ConfigWarning {
                object: object.clone(),
                kind: "unsupported",
                message,
            })
        };
        let mut listeners: Vec<IngressListener> = Vec::new();
        let mut protocols: BTreeMap<u16, ListenerProtocol> = BTreeMap::new();
        for l in &gw.spec.listeners {
            let protocol = match l.protocol.as_str() {
                "HTTP" => ListenerProtocol::Http,
                "HTTPS" => ListenerProtocol::Https,
                other => {
                    warn(
                        &l.name,
                        "UnsupportedProtocol",
                        format!(
                            "listener {:?}: protocol {other:?} is not served (HTTP and HTTPS are); \
                         the listener is not programmed",
                            l.name
                        ),
                    );
                    continue;
                }
            };
            if protocols
                .insert(l.port, protocol)
                .is_some_and(|p| p != protocol)
            {
                warn(
                    &l.name,
                    "ProtocolConflict",
                    format!(
                        "listener {:?}: port {} has listeners of both HTTP and HTTPS; the listener is \
                     not programmed",
                        l.name, l.port
                    ),
                );
                protocols.insert(l.port, ListenerProtocol::Http);
                continue;
            }
            let (secret, certificate) = match (protocol, &l.tls) {
                (ListenerProtocol::Http, _) => (None, None),
                (ListenerProtocol::Https, Some(tls)) if !certificates => (
                    tls.certificate_refs
                        .first()
                        .map(|r| format!("{}/{}", r.namespace.as_deref().unwrap_or(ns), r.name)),
                    None,
                ),
                (ListenerProtocol::Https, None) => (
                    None,
                    Some(Err("an HTTPS listener needs tls.certificateRefs".to_owned())),
                ),
                (ListenerProtocol::Https, Some(tls)) => {
                    let mode = tls.mode.as_deref().unwrap_or("Terminate");
                    if mode != "Terminate" {
                        warn(
                            &l.name,
                            "UnsupportedValue",
                            format!(
                                "listener {:?}: tls.mode {mode} is not served (Terminate is); the \
                             listener is not programmed",
                                l.name
                            ),
                        );
                        continue;
                    }
                    match tls.certificate_refs.first() {
                        None => (None, Some(Err("tls.certificateRefs is empty".to_owned()))),
                        Some(r) => {
                            let secret_ns = r.namespace.as_deref().unwrap_or(ns);
                            let key = format!("{secret_ns}/{}", r.name);
                            (Some(key), Some(load(objects, ns, r)))
                        }
                    }
                }
            };
            if let Some(Err(e)) = &certificate {
                warn(
                    &l.name,
                    "",
                    format!("listener {:?}: {e}; its handshakes are refused", l.name),
                );
            }
            listeners.push(IngressListener {
                name: l.name.clone(),
                port: l.port,
                protocol,
                hostname: l.hostname.clone(),
                secret,
                certificate,
            });
        }
        let anchor = Arc::new(Waypoint {
            namespace: ns.clone(),
            name: name.clone(),
            serves: WaypointFor::None,
            pods: Vec::new(),
        });
        out.insert(
            (ns.clone(), name.clone()),
            Arc::new(IngressGateway {
                namespace: ns.clone(),
                name: name.clone(),
                generation: gw.metadata.generation,
                listeners,
                refused,
                anchor,
            }),
        );
    }
    out
}

/// A listener's certificate from the Secret `r` names: a TLS Secret in the
/// Gateway's own namespace (there is no ReferenceGrant here).
fn load(objects: &Objects, gateway_ns: &str, r: &SecretRef) -> Result<Arc<CertifiedKey>, String> {
    let group = r.group.as_deref().unwrap_or("");
    let kind = r.kind.as_deref().unwrap_or("Secret");
    if !(group.is_empty() || group == "core") || kind != "Secret" {
        return Err(format!(
            "certificateRef {group}/{kind} {} is not a Secret",
            r.name
        ));
    }
    let ns = r.namespace.as_deref().unwrap_or(gateway_ns);
    if ns != gateway_ns {
        return Err(format!(
            "Secret {ns}/{} is in another namespace than the Gateway's",
            r.name
        ));
    }
    let secret = objects
        .secrets
        .get(&(ns.to_owned(), r.name.clone()))
        .ok_or_else(|| format!("Secret {ns}/{} does not exist", r.name))?;
    certified_key(&secret.object).map_err(|e| format!("Secret {ns}/{}: {e}", r.name))
}

/// A Secret's key `k`: from `data`, else `stringData`.
pub(super) fn secret_field(secret: &Secret, k: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(k))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(k))
                .map(|s| s.as_bytes().to_vec())
        })
}

/// The certificate chain and key of a `kubernetes.io/tls` Secret (`data`,
/// else `stringData`).
pub(super) fn certified_key(secret: &Secret) -> Result<Arc<CertifiedKey>, String> {
    if let Some(t) = secret
        .type_
        .as_deref()
        .filter(|t| *t != "kubernetes.io/tls")
    {
        return Err(format!("type {t} is not kubernetes.io/tls"));
    }
    let field = |k: &str| secret_field(secret, k);
    let crt = field("tls.crt").ok_or("no tls.crt")?;
    let key = field("tls.key").ok_or("no tls.key")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&crt)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| format!("tls.key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("tls.key: {e}"))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|e| format!("tls.key does not belong to tls.crt: {e}"))?;
    Ok(Arc::new(ck))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_match_exactly_or_by_wildcard() {
        assert!(hostname_matches("shop.example.com", "SHOP.example.com"));
        assert!(!hostname_matches("shop.example.com", "example.com"));
        assert!(hostname_matches("*.example.com", "a.example.com"));
        assert!(hostname_matches("*.example.com", "a.b.example.com"));
        assert!(!hostname_matches("*.example.com", "example.com"));
        assert!(!hostname_matches("*.example.com", "aexample.com"));
        assert_eq!(host_only("shop.example.com:8443"), "shop.example.com");
        assert_eq!(host_only("shop.example.com"), "shop.example.com");
        assert_eq!(host_only("[::1]:80"), "::1");
    }
}
