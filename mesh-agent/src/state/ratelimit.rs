//! `LocalRateLimitPolicy` (`policy.mesh-agent.dev/v1alpha1`): this
//! project's rate limits, applied by a waypoint to the requests for a
//! Service (or every request through the waypoint), in the shape of
//! Linkerd's `HTTPLocalRateLimitPolicy`: a total rate, a rate per client
//! identity, and overrides for named ServiceAccounts. Istio has no API for
//! this.

use serde::Deserialize;

use super::{ConfigWarning, Identity, gateway, waypoint::Binding, yaml::Objects};

#[derive(Debug, Deserialize)]
pub(crate) struct LocalRateLimitPolicy {
    spec: Spec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    target_refs: Vec<serde_yaml::Value>,
    total: Option<Rate>,
    identity: Option<Rate>,
    #[serde(default)]
    overrides: Vec<Override>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Rate {
    requests_per_second: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Override {
    requests_per_second: u32,
    client_refs: Vec<ClientRef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClientRef {
    kind: String,
    name: String,
    namespace: Option<String>,
}

/// A policy as the waypoint applies it.
#[derive(Debug, serde::Serialize)]
pub struct RateLimit {
    /// `namespace/name`
    pub policy: String,
    /// (kind, namespace, name): `Service` or `Gateway`.
    pub targets: Vec<(String, String, String)>,
    pub total: Option<u32>,
    pub per_identity: Option<u32>,
    /// ServiceAccount (`namespace/name`) -> its own rate.
    pub overrides: Vec<(String, u32)>,
}

impl RateLimit {
    /// Whether it applies to a request for `service` through `gateway`.
    pub fn applies(&self, service: Option<(&str, &str)>, gateway: (&str, &str)) -> bool {
        self.targets.iter().any(|(kind, ns, name)| {
            let key = (ns.as_str(), name.as_str());
            match kind.as_str() {
                "Service" => service == Some(key),
                _ => key == gateway,
            }
        })
    }

    /// The rate for a client: its override, else the per-identity rate.
    pub fn client_rate(&self, client: &Identity) -> Option<u32> {
        let sa = format!("{}/{}", client.namespace, client.service_account);
        self.overrides
            .iter()
            .find(|(who, _)| *who == sa)
            .map(|(_, r)| *r)
            .or(self.per_identity)
    }
}

pub(super) fn compile(
    objects: &Objects,
    services: &std::collections::HashMap<(String, String), Binding>,
    warnings: &mut Vec<ConfigWarning>,
) -> Vec<RateLimit> {
    let mut out = Vec::new();
    for ((ns, name), parsed) in &objects.rate_limits {
        let object = format!("LocalRateLimitPolicy {ns}/{name}");
        let spec = &parsed.object.spec;
        let mut warn = |kind, message: String| {
            warnings.push(ConfigWarning {
                object: object.clone(),
                kind,
                message,
            })
        };
        let mut targets = Vec::new();
        for t in &spec.target_refs {
            match gateway::policy_target_status(objects, services, ns, t) {
                Some((kind, message)) => warn(kind, message),
                None => {
                    let field = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or_default();
                    let tns = Some(field("namespace"))
                        .filter(|n| !n.is_empty())
                        .unwrap_or(ns);
                    targets.push((
                        field("kind").to_owned(),
                        tns.to_owned(),
                        field("name").to_owned(),
                    ));
                }
            }
        }
        if targets.is_empty() {
            continue;
        }
        let mut overrides = Vec::new();
        for o in &spec.overrides {
            for c in &o.client_refs {
                if c.kind != "ServiceAccount" {
                    warn(
                        "unsupported",
                        format!("clientRefs kind {:?}: only ServiceAccount; ignored", c.kind),
                    );
                    continue;
                }
                let cns = c.namespace.as_deref().unwrap_or(ns);
                overrides.push((format!("{cns}/{}", c.name), o.requests_per_second));
            }
        }
        let total = spec.total.as_ref().map(|r| r.requests_per_second);
        let per_identity = spec.identity.as_ref().map(|r| r.requests_per_second);
        if total.is_none() && per_identity.is_none() && overrides.is_empty() {
            warn(
                "parse_error",
                "no total, identity or override rate: limits nothing".into(),
            );
        }
        out.push(RateLimit {
            policy: format!("{ns}/{name}"),
            targets,
            total,
            per_identity,
            overrides,
        });
    }
    out
}
