//! Parsing and checking the PKCS#10 request a node agent sends for one
//! workload identity.

use rustls::pki_types::{CertificateSigningRequestDer, pem::PemObject};
use x509_parser::{
    certification_request::X509CertificationRequest,
    cri_attributes::ParsedCriAttribute,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME,
    prelude::FromDer,
};

use crate::identity::Identity;

/// A certificate request as the CA accepts it: signed by its own key, and
/// naming one workload of our trust domain in its one SAN.
pub(crate) struct Csr {
    pub(crate) identity: Identity,
    pub(super) public_key: rcgen::SubjectPublicKeyInfo,
}

impl Csr {
    pub(crate) fn parse(pem: &str, trust_domain: &str) -> Result<Csr, String> {
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("csr is not a PEM CERTIFICATE REQUEST: {e}"))?;
        let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| format!("csr is not a PKCS#10 request: {e}"))?;
        if !rest.is_empty() {
            return Err("csr has trailing bytes after the request".into());
        }
        csr.verify_signature()
            .map_err(|e| format!("csr signature does not verify with its own key: {e}"))?;

        let mut names = Vec::new();
        for attr in csr.certification_request_info.iter_attributes() {
            let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
                continue;
            };
            for ext in &req.extensions {
                if ext.oid != OID_X509_EXT_SUBJECT_ALT_NAME {
                    continue;
                }
                match ext.parsed_extension() {
                    ParsedExtension::SubjectAlternativeName(san) => {
                        names.extend(san.general_names.iter())
                    }
                    _ => return Err("csr has a malformed subjectAltName".into()),
                }
            }
        }
        let uri = match names.as_slice() {
            [GeneralName::URI(uri)] => *uri,
            [other] => {
                return Err(format!(
                    "csr subjectAltName {other} is not a URI; it must be the SPIFFE ID"
                ));
            }
            _ => {
                return Err(format!(
                    "csr must name exactly one subjectAltName, the SPIFFE ID; it names {}",
                    names.len()
                ));
            }
        };
        let identity: Identity = uri.parse().map_err(|e| format!("csr: {e}"))?;
        if identity.trust_domain != trust_domain {
            return Err(format!(
                "csr asks for {identity}, outside the trust domain {trust_domain}"
            ));
        }
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| format!("csr public key is not supported: {e}"))?;
        Ok(Csr {
            identity,
            public_key,
        })
    }
}
