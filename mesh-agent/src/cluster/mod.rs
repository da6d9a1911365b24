//! The Kubernetes API as the store's source: watchers on the kinds the agent
//! reads, feeding the same objects the local directory does; and the Events
//! the agent writes about objects it could not apply.

pub mod events;
#[cfg(test)]
pub mod fake_api;
pub mod redirection;
pub mod source;
#[cfg(test)]
mod source_tests;

pub use source::KubeSource;

/// A kind the cluster source lists and watches. RBAC must grant `list` and
/// `watch` on every one (`deploy/rbac.yaml`, checked by a test).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    /// API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
}

impl Resource {
    const fn new(
        group: &'static str,
        version: &'static str,
        kind: &'static str,
        plural: &'static str,
        namespaced: bool,
    ) -> Self {
        Resource {
            group,
            version,
            kind,
            plural,
            namespaced,
        }
    }
}

/// Everything the cluster source watches.
pub const WATCHED: &[Resource] = &[
    Resource::new("", "v1", "Namespace", "namespaces", false),
    Resource::new("", "v1", "Pod", "pods", true),
    Resource::new("", "v1", "Service", "services", true),
    Resource::new("", "v1", "ServiceAccount", "serviceaccounts", true),
    Resource::new(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        true,
    ),
    Resource::new(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        true,
    ),
    Resource::new(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
        true,
    ),
    Resource::new(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
        "httproutes",
        true,
    ),
    Resource::new(
        "gateway.networking.k8s.io",
        "v1",
        "Gateway",
        "gateways",
        true,
    ),
    Resource::new(
        "gateway.networking.k8s.io",
        "v1",
        "GatewayClass",
        "gatewayclasses",
        false,
    ),
    Resource::new(
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
        true,
    ),
    Resource::new(
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
        true,
    ),
    Resource::new(
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "serviceentries",
        true,
    ),
    Resource::new(
        "policy.mesh-agent.dev",
        "v1alpha1",
        "LocalRateLimitPolicy",
        "localratelimitpolicies",
        true,
    ),
];

/// TLS Secrets: watched by an ingress gateway only, in its own namespace
/// (`get`, `list`, `watch` there, by a Role; never cluster-wide).
pub const SECRETS: Resource = Resource::new("", "v1", "Secret", "secrets", true);

/// Pods: the node agent writes their redirection annotation (`patch` in
/// RBAC, checked by a test; [`redirection`]).
#[cfg_attr(
    not(test),
    allow(dead_code, reason = "read by the test that checks deploy/rbac.yaml")
)]
pub const PATCHED: Resource = Resource::new("", "v1", "Pod", "pods", true);

/// Where the agent writes Events (`create` and `patch` in RBAC): kube's
/// recorder picks the resource; this names it for the RBAC check.
#[cfg_attr(
    not(test),
    allow(dead_code, reason = "read by the test that checks deploy/rbac.yaml")
)]
pub const EVENTS: Resource = Resource::new("events.k8s.io", "v1", "Event", "events", true);
