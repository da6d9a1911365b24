//! The API stand-in (crate `fake-kube-api`) serving the kinds this agent
//! reads and writes, for the unit tests.

pub use fake_kube_api::{FakeApi, Kind, TokenUser};

use super::{EVENTS, Resource, SECRETS, WATCHED};

/// Kinds written besides the watched ones: the CA's root ConfigMap, and
/// core Events (kube's recorder writes `events.k8s.io`, [`EVENTS`]).
const WRITTEN: &[Resource] = &[
    Resource::new("", "v1", "ConfigMap", "configmaps", true),
    Resource::new("", "v1", "Event", "events", true),
];

fn kind(r: &Resource) -> Kind {
    Kind::new(r.group, r.version, r.kind, r.plural, r.namespaced)
}

/// Everything the agent reads and writes, from its own lists (Secrets: an
/// ingress gateway's, in its namespace).
pub fn kinds() -> Vec<Kind> {
    WATCHED
        .iter()
        .chain([&EVENTS, &SECRETS])
        .chain(WRITTEN)
        .map(kind)
        .collect()
}

/// A stand-in on 127.0.0.1 serving [`kinds`].
pub async fn start() -> FakeApi {
    FakeApi::start(&kinds()).await
}

/// The harness, which cannot see this crate's lists, serves the stand-in's
/// copy of them: it must name the same kinds.
#[test]
fn the_harness_serves_what_the_agent_reads_and_writes() {
    assert_eq!(kinds(), fake_kube_api::MESH_AGENT_KINDS);
}
