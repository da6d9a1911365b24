//! The checks an AuthorizationPolicy rule compiles to: one attribute of a
//! connection (or, at a waypoint, of a request) against a list of values,
//! in Istio's forms (exact, `prefix*`, `*suffix`, `*`, an address or a
//! CIDR, a port), possibly negated.

use std::net::IpAddr;

use hyper::http::{HeaderMap, HeaderName};
use ipnet::IpNet;

use super::{ConfigWarning, yaml::Scalar};
use crate::identity::Identity;

/// What a rule is checked against: the connection, and at a waypoint the
/// HTTP request on it.
#[derive(Clone, Copy, Debug)]
pub struct Attrs<'a> {
    pub src_ip: IpAddr,
    /// The verified peer identity (None for plaintext).
    pub src_identity: Option<&'a Identity>,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    pub request: Option<&'a L7Request<'a>>,
}

/// The parts of an HTTP request that L7 rules read.
#[derive(Clone, Copy, Debug)]
pub struct L7Request<'a> {
    pub method: &'a str,
    /// The path without its query string.
    pub path: &'a str,
    /// `:authority` or `Host`.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// What of a connection or request a check looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Attr {
    SrcIp,
    DstIp,
    DstPort,
    /// `td/ns/N/sa/S` of the verified peer.
    Principal,
    /// The peer identity's namespace.
    Namespace,
    /// `N/S` of the peer identity.
    ServiceAccount,
    /// Request attributes (a waypoint's).
    Method,
    Path,
    Host,
    Header(HeaderName),
}

impl Attr {
    fn is_l7(&self) -> bool {
        matches!(
            self,
            Attr::Method | Attr::Path | Attr::Host | Attr::Header(_)
        )
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
    Net(IpNet),
    Port(u16),
    /// A value that did not parse (reported when compiled).
    Never,
}

impl Pattern {
    fn matches_str(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => value == s,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
            _ => false,
        }
    }
}

/// Holds when the attribute matches one of the patterns (or none of them,
/// negated).
#[derive(Debug)]
pub(super) struct Check {
    attr: Attr,
    patterns: Vec<Pattern>,
    negate: bool,
    /// Set when a value did not parse: the check's outcome is then fixed
    /// to the safe side (see `Compiler::check`).
    fixed: Option<bool>,
    /// The outcome of a request check on traffic that is not HTTP: the
    /// safe side again (a DENY rule denies more, an ALLOW rule allows less).
    without_request: bool,
}

impl Check {
    /// Without a peer identity (plaintext) there is no principal, namespace
    /// or service account: a positive check fails and a negated one holds,
    /// as in Istio, where the missing identity matches no value (even `*`,
    /// which is how `principals: ["*"]` requires mTLS and
    /// `notPrincipals: ["*"]` singles out plaintext).
    pub fn holds(&self, conn: &Attrs<'_>) -> bool {
        if let Some(fixed) = self.fixed {
            return fixed;
        }
        if self.attr.is_l7() && conn.request.is_none() {
            return self.without_request;
        }
        let id = conn.src_identity;
        let any_str = |value: Option<&str>| {
            value.is_some_and(|v| self.patterns.iter().any(|p| p.matches_str(v)))
        };
        let any_ip = |ip: IpAddr| {
            let ip = ip.to_canonical();
            self.patterns
                .iter()
                .any(|p| matches!(p, Pattern::Net(net) if net.contains(&ip)))
        };
        let hit = match self.attr {
            Attr::SrcIp => any_ip(conn.src_ip),
            Attr::DstIp => any_ip(conn.dst_ip),
            Attr::DstPort => self.patterns.contains(&Pattern::Port(conn.dst_port)),
            Attr::Principal => any_str(id.map(|id| id.principal()).as_deref()),
            Attr::Namespace => any_str(id.map(|id| id.namespace.as_str())),
            Attr::ServiceAccount => any_str(
                id.map(|id| format!("{}/{}", id.namespace, id.service_account))
                    .as_deref(),
            ),
            Attr::Method => any_str(conn.request.map(|r| r.method)),
            Attr::Path => any_str(conn.request.map(|r| r.path)),
            Attr::Host => conn.request.is_some_and(|r| {
                // Case-insensitive, with or without the port.
                let host = r.host.to_ascii_lowercase();
                let bare = match host.rsplit_once(':') {
                    Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                    _ => host.as_str(),
                };
                any_str(Some(&host)) || any_str(Some(bare))
            }),
            Attr::Header(ref name) => conn.request.is_some_and(|r| {
                r.headers
                    .get_all(name)
                    .iter()
                    .any(|v| any_str(v.to_str().ok()))
            }),
        };
        hit != self.negate
    }
}

/// A value a connection must have for a check to hold: what the policy
/// index files a rule under.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Key {
    Principal(String),
    Namespace(String),
    /// `N/S` of the peer identity.
    ServiceAccount(String),
    DstPort(u16),
}

impl Check {
    /// The values one of which the connection must have for this check to
    /// hold, when the check says so exactly (a positive list of exact
    /// principals, namespaces, service accounts or ports): Some(empty) for
    /// a check that never holds, None when the check cannot be indexed
    /// (negated, a pattern, an address, a request attribute, fixed to hold).
    pub fn keys(&self) -> Option<Vec<Key>> {
        match self.fixed {
            Some(false) => return Some(Vec::new()),
            Some(true) => return None,
            None if self.negate => return None,
            None => {}
        }
        self.patterns
            .iter()
            .map(|p| match (&self.attr, p) {
                (Attr::Principal, Pattern::Exact(s)) => Some(Key::Principal(s.clone())),
                (Attr::Namespace, Pattern::Exact(s)) => Some(Key::Namespace(s.clone())),
                (Attr::ServiceAccount, Pattern::Exact(s)) => Some(Key::ServiceAccount(s.clone())),
                (Attr::DstPort, Pattern::Port(port)) => Some(Key::DstPort(*port)),
                _ => None,
            })
            .collect()
    }
}

/// Compiles the values of one policy, reporting those that do not parse.
pub(super) struct Compiler<'w> {
    object: String,
    warnings: &'w mut Vec<ConfigWarning>,
    /// The rule being compiled, for messages.
    pub rule: usize,
    /// Compiling a DENY policy: see [`Compiler::check`] for what a value
    /// that does not parse does to a condition. Either way it fails closed.
    pub deny: bool,
    /// The policy's namespace: a bare `serviceAccounts` entry is in it.
    namespace: String,
}

impl<'w> Compiler<'w> {
    pub fn new(object: String, namespace: &str, warnings: &'w mut Vec<ConfigWarning>) -> Self {
        Compiler {
            object,
            warnings,
            rule: 0,
            deny: false,
            namespace: namespace.to_owned(),
        }
    }

    pub fn warn(&mut self, kind: &'static str, message: String) {
        self.warnings.push(ConfigWarning {
            object: self.object.clone(),
            kind,
            message,
        });
    }

    /// None when there are no values: an absent or empty field constrains
    /// nothing.
    pub fn strings(
        &mut self,
        attr: Attr,
        values: &Option<Vec<String>>,
        negate: bool,
    ) -> Option<Check> {
        let values = values.as_deref().unwrap_or_default();
        self.check(attr, values.iter().map(String::as_str), negate)
    }

    pub fn scalars(
        &mut self,
        attr: Attr,
        values: &Option<Vec<Scalar>>,
        negate: bool,
    ) -> Option<Check> {
        let values = values.as_deref().unwrap_or_default();
        self.check(attr, values.iter().map(|s| s.0.as_str()), negate)
    }

    /// A value that does not parse is left out of its list, as istiod does,
    /// where that only narrows what the policy grants: from an ALLOW's
    /// positive list that keeps other values (the rule allows less), from a
    /// DENY's negated list (the rule denies more). Anywhere else leaving it
    /// out would widen an ALLOW or narrow a DENY, so the whole condition is
    /// fixed to the safe side instead: it holds in a DENY (denies more) and
    /// never holds in an ALLOW (allows less).
    fn check<'a>(
        &mut self,
        attr: Attr,
        values: impl Iterator<Item = &'a str>,
        negate: bool,
    ) -> Option<Check> {
        let mut patterns: Vec<Pattern> = values.map(|v| self.pattern(&attr, v)).collect();
        let bad = patterns.contains(&Pattern::Never);
        let good = patterns.iter().filter(|p| **p != Pattern::Never).count();
        if bad && ((!self.deny && !negate && good > 0) || (self.deny && negate)) {
            patterns.retain(|p| *p != Pattern::Never);
            let (rule, effect) = (
                self.rule,
                if self.deny {
                    "the DENY rule denies more than written"
                } else {
                    "the ALLOW rule allows less than written"
                },
            );
            self.warn(
                "parse_error",
                format!("rule {rule}: values that do not parse are left out ({effect})"),
            );
        }
        let fixed = patterns.contains(&Pattern::Never).then_some(self.deny);
        if fixed.is_some() {
            let (rule, effect) = (
                self.rule,
                if self.deny {
                    "holds for every connection (the DENY rule denies more than written)"
                } else {
                    "never holds (the ALLOW rule allows less than written)"
                },
            );
            self.warn(
                "parse_error",
                format!("rule {rule}: a condition with a value that does not parse {effect}"),
            );
        }
        (!patterns.is_empty()).then_some(Check {
            attr,
            patterns,
            negate,
            fixed,
            without_request: self.deny,
        })
    }

    fn pattern(&mut self, attr: &Attr, value: &str) -> Pattern {
        let rule = self.rule;
        match attr {
            Attr::Host => string_pattern(&value.to_ascii_lowercase()),
            // `namespace/name`, exact; a bare name is in the policy's
            // namespace.
            Attr::ServiceAccount => Pattern::Exact(if value.contains('/') {
                value.to_owned()
            } else {
                format!("{}/{value}", self.namespace)
            }),
            Attr::Principal | Attr::Namespace | Attr::Method | Attr::Path | Attr::Header(_) => {
                string_pattern(value)
            }
            Attr::SrcIp | Attr::DstIp => match parse_net(value) {
                Some(net) => Pattern::Net(net),
                None => {
                    self.warn(
                        "parse_error",
                        format!("rule {rule}: {value:?} is not an IP address or CIDR"),
                    );
                    Pattern::Never
                }
            },
            Attr::DstPort => match value.parse::<u16>() {
                Ok(port) => Pattern::Port(port),
                Err(_) => {
                    self.warn(
                        "parse_error",
                        format!("rule {rule}: port {value:?} is not a number"),
                    );
                    Pattern::Never
                }
            },
        }
    }
}

/// Istio's string forms: `*`, `*suffix`, `prefix*`, exact.
fn string_pattern(value: &str) -> Pattern {
    if value == "*" {
        Pattern::Any
    } else if let Some(suffix) = value.strip_prefix('*') {
        Pattern::Suffix(suffix.to_owned())
    } else if let Some(prefix) = value.strip_suffix('*') {
        Pattern::Prefix(prefix.to_owned())
    } else {
        Pattern::Exact(value.to_owned())
    }
}

/// `10.0.0.1` (one address) or `10.0.0.0/8`.
fn parse_net(value: &str) -> Option<IpNet> {
    if value.contains('/') {
        let net: IpNet = value.parse().ok()?;
        // An IPv4-mapped IPv6 block is written for IPv4 peers.
        Some(match net {
            IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
                Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).ok()?,
                None => net,
            },
            _ => net,
        })
    } else {
        let ip: IpAddr = value.parse().ok()?;
        Some(IpNet::from(ip.to_canonical()))
    }
}
