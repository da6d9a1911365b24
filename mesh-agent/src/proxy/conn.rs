//! One record per proxied connection, as ztunnel keeps it: Istio's TCP
//! metrics when it opens, as its bytes flow and when it closes, and the
//! access log line (tracing target `access`) when it ends.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use prometheus_client::metrics::counter::Counter;
use tracing::Level;

use super::Counted;
use crate::{
    identity::Identity,
    metrics::{Metrics, TcpLabels, TcpSeries},
    state::{Service, Workload},
};

const UNKNOWN: &str = "unknown";

/// How the connection between the two ends is secured, as its
/// `connection_security_policy` label gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// Mutual TLS (HBONE): the source principal is the one its
    /// certificate proves.
    MutualTls,
    /// Plain TCP from a peer of unknown identity.
    Unknown,
    /// Between two pods of this agent without TLS (`--same-node-plaintext`):
    /// the source principal is the one the agent knows its own pod by.
    SameNode,
}

impl Security {
    pub fn label(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::Unknown => "unknown",
            Security::SameNode => "same_node",
        }
    }

    /// Whether the source's identity is known (and so reported).
    fn authenticated(self) -> bool {
        self != Security::Unknown
    }
}

impl From<bool> for Security {
    fn from(mtls: bool) -> Self {
        if mtls {
            Security::MutualTls
        } else {
            Security::Unknown
        }
    }
}

/// What is known about each end of a connection.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub workload: Option<Arc<Workload>>,
    pub identity: Option<Identity>,
}

pub struct ConnRecord {
    metrics: Arc<Metrics>,
    /// `outbound` or `inbound`, for the access log.
    direction: &'static str,
    labels: TcpLabels,
    src: Peer,
    dst: Peer,
    /// Over HBONE: the CONNECT authority, `dst.addr` being the address the
    /// tunnel runs to (port 15008), as ztunnel logs them.
    hbone_addr: Option<SocketAddr>,
    start: Instant,
    /// The series it opened with, looked up once: closing without flags
    /// counts on it with no lookup.
    series: Option<Arc<TcpSeries>>,
    /// Its byte counters (request, response), added to as the bytes are
    /// copied.
    meters: Option<Meters>,
    /// Closed and logged; nothing left for `Drop`.
    done: bool,
}

/// A connection's `istio_tcp_received_bytes` (request direction) and
/// `istio_tcp_sent_bytes` (response direction) series: adding to them is
/// one atomic add, no lock and no lookup.
#[derive(Clone, Debug)]
pub struct Meters {
    pub request: Counter,
    pub response: Counter,
}

/// What a connection carried, and why it ended badly if it did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Client to server.
    pub request_bytes: u64,
    /// Server to client.
    pub response_bytes: u64,
    pub error: Option<String>,
}

impl Outcome {
    pub fn error(msg: impl Into<String>) -> Self {
        Outcome {
            error: Some(msg.into()),
            ..Outcome::default()
        }
    }
}

/// The fields of one access log line, borrowed from the record: writing
/// the line allocates nothing but what the formatter does.
pub(super) struct AccessLog<'a> {
    pub src_addr: Option<SocketAddr>,
    pub src_workload: Option<&'a str>,
    pub src_namespace: Option<&'a str>,
    pub src_identity: Option<&'a Identity>,
    pub src_cluster: Option<&'a str>,
    pub dst_addr: Option<SocketAddr>,
    pub dst_hbone_addr: Option<SocketAddr>,
    pub dst_service: Option<&'a str>,
    pub dst_workload: Option<&'a str>,
    pub dst_namespace: Option<&'a str>,
    pub dst_identity: Option<&'a Identity>,
    pub dst_cluster: Option<&'a str>,
    pub direction: &'static str,
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub duration: Millis,
    pub flags: &'static str,
    pub error: Option<&'a str>,
}

/// A duration as the access log gives it: whole milliseconds, `12ms`.
pub(super) struct Millis(pub u128);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// One access log event at a given level (tracing wants the level to be a
/// constant). Absent values leave their field out; values are written as
/// they display (`src.addr=10.0.0.1:5000`, not quoted).
macro_rules! access_log {
    ($level:expr, $f:expr) => {{
        let f = $f;
        tracing::event!(
            target: "access",
            parent: None,
            $level,
            src.addr = f.src_addr.map(tracing::field::display),
            src.workload = f.src_workload.map(tracing::field::display),
            src.namespace = f.src_namespace.map(tracing::field::display),
            src.identity = f.src_identity.map(tracing::field::display),
            src.cluster = f.src_cluster.map(tracing::field::display),
            dst.addr = f.dst_addr.map(tracing::field::display),
            dst.hbone_addr = f.dst_hbone_addr.map(tracing::field::display),
            dst.service = f.dst_service.map(tracing::field::display),
            dst.workload = f.dst_workload.map(tracing::field::display),
            dst.namespace = f.dst_namespace.map(tracing::field::display),
            dst.identity = f.dst_identity.map(tracing::field::display),
            dst.cluster = f.dst_cluster.map(tracing::field::display),
            direction = f.direction,
            bytes_sent = f.bytes_sent,
            bytes_recv = f.bytes_recv,
            duration = tracing::field::display(&f.duration),
            flags = f.flags,
            error = f.error,
            "connection complete"
        );
    }};
}

impl ConnRecord {
    /// `reporter` is `source` on the client's agent, `destination` on the
    /// server's.
    pub fn new(
        metrics: Arc<Metrics>,
        direction: &'static str,
        reporter: &'static str,
        src: Peer,
        dst: Peer,
        service: Option<&Service>,
        security: Security,
    ) -> Self {
        let labels = labels(
            &metrics.cluster_id.0,
            reporter,
            &src,
            &dst,
            service,
            security,
        );
        ConnRecord {
            metrics,
            direction,
            labels,
            src,
            dst,
            hbone_addr: None,
            start: Instant::now(),
            series: None,
            meters: None,
            done: false,
        }
    }

    pub fn set_destination(&mut self, dst: Peer, service: Option<&Service>, security: Security) {
        self.labels = labels(
            &self.metrics.cluster_id.0,
            self.labels.reporter,
            &self.src,
            &dst,
            service,
            security,
        );
        self.dst = dst;
        self.hbone_addr = None;
        // Opened already: its close is counted under the new labels.
        self.series = None;
    }

    /// The connection runs over HBONE: the tunnel goes to `tunnel` (a
    /// node's or a waypoint's 15008) and asks for `authority`.
    pub fn set_hbone(&mut self, tunnel: SocketAddr, authority: SocketAddr) {
        self.dst.addr = Some(tunnel);
        self.hbone_addr = Some(authority);
    }

    /// Counts the connection as opened (once the path is decided), with
    /// `response_flags="-"` as ztunnel does: the outcome only labels the
    /// close.
    pub fn open(&mut self) {
        if self.meters.is_none() {
            let series = self.metrics.tcp(&self.labels);
            let (request, response) = self.metrics.tcp_opened(&series);
            self.series = Some(series);
            self.meters = Some(Meters { request, response });
        }
    }

    /// The client's side of the splice, counting into this connection's
    /// byte series as it goes (opening the record if it is not yet).
    pub fn counted<S>(&mut self, client: S) -> Counted<S> {
        self.open();
        Counted::metered(client, self.meters.clone())
    }

    /// Counts the end of the connection and writes the access log line.
    /// A connection refused before it was opened is counted as opened and
    /// closed, the close with `flags`.
    pub fn close(mut self, flags: &'static str, outcome: Outcome) {
        self.record_close(flags, outcome);
    }

    fn record_close(&mut self, flags: &'static str, outcome: Outcome) {
        self.done = true;
        self.open();
        let opened = self
            .series
            .take()
            .filter(|s| s.labels().response_flags == flags);
        self.labels.response_flags = flags;
        let series = opened.unwrap_or_else(|| self.metrics.tcp(&self.labels));
        self.metrics.tcp_closed(&series);
        self.log(flags, &outcome);
    }

    /// The access log line, with ztunnel's field names: an unknown value
    /// is left out, identities only over mutual TLS (or between two pods
    /// of this agent, which knows both), `bytes_sent` and
    /// `bytes_recv` from this end's workload's point of view. At ERROR
    /// when the connection failed, as ztunnel logs it.
    fn log(&self, flags: &'static str, outcome: &Outcome) {
        let l = &self.labels;
        let authenticated = l.connection_security_policy != Security::Unknown.label();
        let (bytes_sent, bytes_recv) = if l.reporter == "destination" {
            (outcome.response_bytes, outcome.request_bytes)
        } else {
            (outcome.request_bytes, outcome.response_bytes)
        };
        let fields = AccessLog {
            src_addr: self.src.addr,
            src_workload: pod_name(&self.src, &l.source_canonical_service),
            src_namespace: known(&l.source_workload_namespace),
            src_identity: self.src.identity.as_ref().filter(|_| authenticated),
            src_cluster: known(&l.source_cluster),
            dst_addr: self.dst.addr,
            dst_hbone_addr: self.hbone_addr,
            dst_service: known(&l.destination_service),
            dst_workload: pod_name(&self.dst, &l.destination_canonical_service),
            dst_namespace: known(&l.destination_workload_namespace),
            dst_identity: self.dst.identity.as_ref().filter(|_| authenticated),
            dst_cluster: known(&l.destination_cluster),
            direction: self.direction,
            bytes_sent,
            bytes_recv,
            duration: Millis(self.start.elapsed().as_millis()),
            flags,
            error: outcome.error.as_deref(),
        };
        if fields.error.is_some() {
            access_log!(Level::ERROR, fields);
        } else {
            access_log!(Level::INFO, fields);
        }
    }
}

/// A label value the access log shows: not `unknown`, not empty.
fn known(v: &str) -> Option<&str> {
    (v != UNKNOWN && !v.is_empty()).then_some(v)
}

/// The access log's workload of an end: its pod's name (ztunnel names the
/// pod, not its owner workload), or the canonical service when the agent
/// knows no pod there.
fn pod_name<'a>(p: &'a Peer, canonical: &'a str) -> Option<&'a str> {
    p.workload
        .as_deref()
        .map(|w| w.name.as_str())
        .or_else(|| known(canonical))
}

/// A connection refused before there was enough to record it (no
/// original destination, a pod the configuration does not list, a
/// Service with no endpoint, a destination whose waypoint cannot serve
/// it): as ztunnel, one WARN line and no `istio_tcp_*` series.
pub fn early_deny(direction: &'static str, src: SocketAddr, dst: SocketAddr, error: &str) {
    tracing::event!(
        target: "access",
        parent: None,
        Level::WARN,
        src.addr = %src,
        dst.addr = %dst,
        direction,
        error,
        "connection failed"
    );
}

impl Drop for ConnRecord {
    /// A connection task that ended without closing its record (a panic, an
    /// abort at release) still counts its close, so opened and closed agree.
    fn drop(&mut self) {
        if !self.done && self.meters.is_some() {
            let flags = self.labels.response_flags;
            self.record_close(flags, Outcome::error("connection task ended"));
        }
    }
}

/// Istio's label set for a connection from `src` to `dst`, the workloads
/// this agent knows being in cluster `cluster`. As ztunnel sets them: the
/// source principal only when the source is authenticated (over mutual
/// TLS, the identity the handshake proves; on the same-node shortcut, the
/// one the agent knows its own pod by); the destination principal from the
/// destination's identity, or its workload's, whether or not the
/// connection is mutual TLS.
pub fn labels(
    cluster: &str,
    reporter: &'static str,
    src: &Peer,
    dst: &Peer,
    service: Option<&Service>,
    security: Security,
) -> TcpLabels {
    let name =
        |w: Option<&Arc<Workload>>| w.map_or(UNKNOWN.to_owned(), |w| w.workload_name().to_owned());
    let ns = |w: Option<&Arc<Workload>>| w.map_or(UNKNOWN.to_owned(), |w| w.namespace.to_string());
    let app = |w: Option<&Arc<Workload>>| w.map_or(UNKNOWN.to_owned(), |w| w.app().to_owned());
    let version =
        |w: Option<&Arc<Workload>>| w.map_or(UNKNOWN.to_owned(), |w| w.version().to_owned());
    let principal = |i: Option<&Identity>| i.map_or(UNKNOWN.to_owned(), Identity::to_string);
    let cluster_of = |w: Option<&Arc<Workload>>| w.map_or(UNKNOWN, |_| cluster).to_owned();
    let (s, d) = (src.workload.as_ref(), dst.workload.as_ref());
    TcpLabels {
        reporter,
        source_workload: name(s),
        source_canonical_service: app(s),
        source_canonical_revision: version(s),
        source_workload_namespace: ns(s),
        source_principal: principal(src.identity.as_ref().filter(|_| security.authenticated())),
        source_app: app(s),
        source_version: version(s),
        source_cluster: cluster_of(s),
        destination_service: service.map_or(UNKNOWN.to_owned(), Service::hostname),
        destination_service_namespace: service.map_or(UNKNOWN.to_owned(), |s| s.namespace.clone()),
        destination_service_name: service.map_or(UNKNOWN.to_owned(), |s| s.name.clone()),
        destination_workload: name(d),
        destination_canonical_service: app(d),
        destination_canonical_revision: version(d),
        destination_workload_namespace: ns(d),
        destination_principal: principal(dst.identity.as_ref()),
        destination_app: app(d),
        destination_version: version(d),
        destination_cluster: cluster_of(d),
        request_protocol: "tcp",
        response_flags: "-",
        connection_security_policy: security.label(),
    }
}

#[cfg(test)]
mod tests;
