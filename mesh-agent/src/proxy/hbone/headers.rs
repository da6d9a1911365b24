//! The metadata headers of an HBONE CONNECT, as ztunnel writes them:
//! `baggage` (W3C) naming the sending workload with OpenTelemetry's
//! Kubernetes keys, and `traceparent`. Read defensively on the server: a
//! header that does not parse is ignored (and counted), never an error.

use crate::state::Workload;
use crate::waypoint::trace::TraceParent;

/// A baggage header larger than this is not read (W3C's limit is 8192).
const MAX_BAGGAGE: usize = 8192;

/// `k8s.cluster.name=..,k8s.namespace.name=..,k8s.<kind>.name=..,
/// service.name=..,service.version=..` for `wl` in `cluster`: the keys
/// ztunnel sends on CONNECT (the source) and on the 200 (the destination).
pub fn baggage(cluster: &str, wl: &Workload) -> String {
    format!(
        "k8s.cluster.name={},k8s.namespace.name={},k8s.{}.name={},service.name={},service.version={}",
        encode(cluster),
        encode(&wl.namespace),
        // A kind is a Kubernetes kind in lower case: no encoding needed,
        // but it becomes part of a key, so only key characters pass.
        key_safe(wl.workload_kind()),
        encode(wl.workload_name()),
        encode(wl.app()),
        encode(wl.version())
    )
}

/// What a peer's `baggage` says about it; a key it did not send is None.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    /// The `k8s.<kind>.name` member: the kind and the name.
    pub workload: Option<(String, String)>,
    pub service: Option<String>,
    pub version: Option<String>,
}

/// Kinds the workload key may name (`k8s.<kind>.name`); `k8s.cluster`,
/// `k8s.namespace` and `k8s.node` are not workloads.
fn workload_key(key: &str) -> Option<&str> {
    let kind = key.strip_prefix("k8s.")?.strip_suffix(".name")?;
    let not_workload = ["cluster", "namespace", "node", "container"];
    (!kind.is_empty() && !not_workload.contains(&kind) && kind == key_safe(kind)).then_some(kind)
}

impl Baggage {
    /// Reads a W3C baggage value: comma-separated `key=value` members,
    /// optional `;properties` (ignored), percent-encoded values. Unknown
    /// keys are skipped; anything malformed (a member without `=`, an
    /// empty key, bad percent-encoding, not UTF-8, too long) makes the
    /// whole header unreadable: None.
    pub fn parse(header: &[u8]) -> Option<Baggage> {
        if header.len() > MAX_BAGGAGE {
            return None;
        }
        let text = std::str::from_utf8(header).ok()?;
        let mut out = Baggage::default();
        for member in text.split(',') {
            let member = member.split(';').next().unwrap_or_default().trim();
            if member.is_empty() {
                continue;
            }
            let (key, value) = member.split_once('=')?;
            let (key, value) = (key.trim(), decode(value.trim())?);
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return None;
            }
            match key {
                "k8s.cluster.name" => out.cluster = Some(value),
                "k8s.namespace.name" => out.namespace = Some(value),
                "service.name" => out.service = Some(value),
                "service.version" => out.version = Some(value),
                _ => {
                    if let Some(kind) = workload_key(key) {
                        out.workload = Some((kind.to_owned(), value));
                    }
                }
            }
        }
        Some(out)
    }
}

/// A `traceparent` header, if it is one; None for anything else.
pub fn traceparent(header: &[u8]) -> Option<TraceParent> {
    TraceParent::parse(std::str::from_utf8(header).ok()?)
}

/// Percent-encodes all but a safe set, so that a label can neither break
/// the header nor add members.
fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn key_safe(v: &str) -> String {
    v.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn decode(v: &str) -> Option<String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn wl(owner: Option<(&str, &str)>, labels: &[(&str, &str)]) -> Workload {
        Workload {
            service_account: "reviews".into(),
            node: "n".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
                .into(),
            redirected: true,
            owner: owner.map(|o| o.1.into()),
            owner_kind: owner.map(|o| o.0.into()),
            ..Workload::for_tests("shop", "reviews-v1-5f7d9c6b8-x2x9z")
        }
    }

    #[test]
    fn baggage_names_the_cluster_namespace_owner_service_and_version() {
        let w = wl(
            Some(("deployment", "reviews-v1")),
            &[("app", "reviews"), ("version", "v1")],
        );
        assert_eq!(
            baggage("east", &w),
            "k8s.cluster.name=east,k8s.namespace.name=shop,k8s.deployment.name=reviews-v1,\
             service.name=reviews,service.version=v1"
        );
        // A bare pod is its own workload; no labels: the workload's name
        // and `latest`, as Istio's canonical service and revision.
        let bare = wl(None, &[]);
        assert_eq!(
            baggage("Kubernetes", &bare),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,\
             k8s.pod.name=reviews-v1-5f7d9c6b8-x2x9z,\
             service.name=reviews-v1-5f7d9c6b8-x2x9z,service.version=latest"
        );
        let sts = wl(Some(("statefulset", "db")), &[]);
        assert!(baggage("c", &sts).contains(",k8s.statefulset.name=db,"));
    }

    #[test]
    fn what_is_sent_reads_back_and_a_value_cannot_add_members() {
        let w = wl(
            Some(("job", "migrate")),
            &[("app", "a,k8s.namespace.name=evil"), ("version", "v 1;x")],
        );
        let sent = baggage("my cluster", &w);
        assert!(!sent.contains("=evil"), "{sent}");
        let read = Baggage::parse(sent.as_bytes()).unwrap();
        assert_eq!(
            read,
            Baggage {
                cluster: Some("my cluster".into()),
                namespace: Some("shop".into()),
                workload: Some(("job".into(), "migrate".into())),
                service: Some("a,k8s.namespace.name=evil".into()),
                version: Some("v 1;x".into()),
            }
        );
    }

    #[test]
    fn baggage_from_others_is_read_leniently_but_malformed_is_refused() {
        // Order, spaces, properties and unknown keys do not matter.
        let read = Baggage::parse(
            b" service.name = web ;prop=1, other=x,k8s.daemonset.name=agent,k8s.node.name=n1",
        )
        .unwrap();
        assert_eq!(read.service.as_deref(), Some("web"));
        assert_eq!(read.workload, Some(("daemonset".into(), "agent".into())));
        assert_eq!(read.cluster, None);
        assert_eq!(Baggage::parse(b""), Some(Baggage::default()));
        for bad in [
            &b"k8s.cluster.name"[..],
            b"=x",
            b"service.name=%zz",
            b"service.name=%4",
            b"service.name=%FF",
            b"a=1,b",
            b"\xff=1",
        ] {
            assert_eq!(
                Baggage::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(Baggage::parse(&vec![b'a'; MAX_BAGGAGE + 1]), None);
    }

    #[test]
    fn traceparent_headers_are_parsed_or_ignored() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(traceparent(tp.as_bytes()).unwrap().to_string(), tp);
        assert_eq!(traceparent(b"\xff\xfe"), None);
        assert_eq!(traceparent(b"00-abc"), None);
    }
}
