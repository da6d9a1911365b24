//! One record per proxied connection: Istio's TCP metrics when it opens and
//! closes, and the access log line (tracing target `access`) when it ends.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tracing::info;

use crate::{
    identity::Identity,
    metrics::{Metrics, TcpLabels},
    state::{Service, Workload},
};

const UNKNOWN: &str = "unknown";
/// Istio's default cluster name, which dashboards filter on.
const CLUSTER: &str = "Kubernetes";

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
    start: Instant,
    opened: bool,
    /// Closed and logged; nothing left for `Drop`.
    done: bool,
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
        mtls: bool,
    ) -> Self {
        let labels = labels(reporter, &src, &dst, service, mtls);
        ConnRecord {
            metrics,
            direction,
            labels,
            src,
            dst,
            start: Instant::now(),
            opened: false,
            done: false,
        }
    }

    pub fn set_destination(&mut self, dst: Peer, service: Option<&Service>, mtls: bool) {
        self.labels = labels(self.labels.reporter, &self.src, &dst, service, mtls);
        self.dst = dst;
    }

    /// Counts the connection as opened (once the path is decided).
    pub fn open(&mut self) {
        if !self.opened {
            self.opened = true;
            self.metrics.tcp_opened.get_or_create(&self.labels).inc();
            self.metrics.tcp_series(&self.labels);
        }
    }

    /// Counts the end of the connection and writes the access log line.
    /// A connection refused before it was opened is counted as opened and
    /// closed with `flags`.
    pub fn close(mut self, flags: &'static str, outcome: Outcome) {
        self.record_close(flags, outcome);
    }

    fn record_close(&mut self, flags: &'static str, outcome: Outcome) {
        self.done = true;
        self.labels.response_flags = flags;
        if !self.opened {
            self.open();
        }
        let m = &self.metrics;
        m.tcp_closed.get_or_create(&self.labels).inc();
        if flags != "-" {
            m.tcp_series(&self.labels);
        }
        // Istio's meaning: received = the request direction, sent = the
        // response direction, from the destination's point of view.
        m.tcp_received
            .get_or_create(&self.labels)
            .inc_by(outcome.request_bytes);
        m.tcp_sent
            .get_or_create(&self.labels)
            .inc_by(outcome.response_bytes);
        let duration_ms = self.start.elapsed().as_millis() as u64;
        let addr = |p: &Peer| p.addr.map(|a| a.to_string()).unwrap_or_default();
        let wl = |p: &Peer| {
            p.workload
                .as_ref()
                .map(|w| format!("{}/{}", w.namespace, w.name))
                .unwrap_or_default()
        };
        let id = |p: &Peer| {
            p.identity
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_default()
        };
        info!(
            target: "access",
            direction = self.direction,
            src.addr = %addr(&self.src),
            src.workload = %wl(&self.src),
            src.identity = %id(&self.src),
            dst.addr = %addr(&self.dst),
            dst.workload = %wl(&self.dst),
            dst.identity = %id(&self.dst),
            dst.service = %self.labels.destination_service,
            security = self.labels.connection_security_policy,
            request_bytes = outcome.request_bytes,
            response_bytes = outcome.response_bytes,
            duration_ms,
            flags,
            error = outcome.error.as_deref().unwrap_or(""),
            "connection complete"
        );
    }
}

impl Drop for ConnRecord {
    /// A connection task that ended without closing its record (a panic, an
    /// abort at release) still counts its close, so opened and closed agree.
    fn drop(&mut self) {
        if !self.done && self.opened {
            let flags = self.labels.response_flags;
            self.record_close(flags, Outcome::error("connection task ended"));
        }
    }
}

pub fn labels(
    reporter: &'static str,
    src: &Peer,
    dst: &Peer,
    service: Option<&Service>,
    mtls: bool,
) -> TcpLabels {
    let name =
        |w: Option<&Arc<Workload>>| w.map_or(UNKNOWN.to_owned(), |w| w.workload_name().to_owned());
    let ns = |w: Option<&Arc<Workload>>| w.map_or(UNKNOWN.to_owned(), |w| w.namespace.clone());
    let app = |w: Option<&Arc<Workload>>| w.map_or(UNKNOWN.to_owned(), |w| w.app().to_owned());
    let version =
        |w: Option<&Arc<Workload>>| w.map_or(UNKNOWN.to_owned(), |w| w.version().to_owned());
    let principal = |i: Option<&Identity>| i.map_or(UNKNOWN.to_owned(), Identity::to_string);
    let (s, d) = (src.workload.as_ref(), dst.workload.as_ref());
    TcpLabels {
        reporter,
        source_workload: name(s),
        source_canonical_service: app(s),
        source_canonical_revision: version(s),
        source_workload_namespace: ns(s),
        source_principal: principal(src.identity.as_ref()),
        source_app: app(s),
        source_version: version(s),
        source_cluster: if s.is_some() { CLUSTER } else { UNKNOWN }.to_owned(),
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
        destination_cluster: if d.is_some() { CLUSTER } else { UNKNOWN }.to_owned(),
        request_protocol: "tcp",
        response_flags: "-",
        connection_security_policy: if mtls { "mutual_tls" } else { "unknown" },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{encode, proxy_registry};

    fn pod(namespace: &str, name: &str) -> Peer {
        Peer {
            workload: Some(Arc::new(Workload {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
                service_account: "default".to_owned(),
                node: "node".to_owned(),
                ips: Vec::new(),
                labels: Default::default(),
                ports: Default::default(),
                captured: true,
                redirected: false,
                hbone: true,
                uid: name.to_owned(),
                netns: None,
                owner: None,
                owner_kind: None,
            })),
            ..Peer::default()
        }
    }

    /// The `*_workload` labels name the owner workload, as Kiali reads
    /// them, with the canonical service and revision labels first.
    #[test]
    fn workload_labels_name_the_owner_and_canonical_labels_come_first() {
        let mut p = pod("shop", "reviews-v1-5f7d9c6b8-abcde");
        let mut wl = (**p.workload.as_ref().unwrap()).clone();
        wl.owner = Some("reviews-v1".into());
        wl.labels = [
            ("app", "reviews"),
            ("version", "v1"),
            ("service.istio.io/canonical-name", "reviews-canonical"),
            ("service.istio.io/canonical-revision", "1.2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        p.workload = Some(Arc::new(wl));
        let l = labels("source", &p, &pod("shop", "db"), None, true);
        assert_eq!(l.source_workload, "reviews-v1");
        assert_eq!(l.source_canonical_service, "reviews-canonical");
        assert_eq!(l.source_canonical_revision, "1.2");
        assert_eq!(
            l.destination_workload, "db",
            "a bare pod is its own workload"
        );
    }

    fn connection(metrics: &Arc<Metrics>, src: Peer, dst: Peer, flags: &'static str) {
        let mut c = ConnRecord::new(metrics.clone(), "outbound", "source", src, dst, None, true);
        c.open();
        c.close(flags, Outcome::default());
    }

    /// The `istio_tcp_connections_opened` lines naming a workload.
    fn lines_with(page: &str, workload: &str) -> usize {
        page.lines()
            .filter(|l| l.starts_with("istio_tcp_"))
            .filter(|l| l.contains(&format!("_workload=\"{workload}\"")))
            .count()
    }

    #[test]
    fn a_released_pods_series_leave_the_metrics_page() {
        let metrics = Arc::new(Metrics::default());
        let registry = proxy_registry(&metrics);
        connection(&metrics, pod("shop", "web-1"), pod("shop", "db-1"), "-");
        connection(&metrics, pod("shop", "web-1"), pod("shop", "db-1"), "UF");
        connection(&metrics, pod("shop", "api-1"), pod("shop", "web-1"), "-");
        connection(&metrics, pod("shop", "api-1"), pod("shop", "db-1"), "-");
        let page = encode(&registry);
        // As source: opened once (both opened unflagged), closed, sent and
        // received twice (`-` and `UF`); as destination: four lines.
        assert_eq!(lines_with(&page, "web-1"), 11, "{page}");

        metrics.forget_workload("shop", "web-1");

        let page = encode(&registry);
        assert_eq!(lines_with(&page, "web-1"), 0, "{page}");
        assert_eq!(
            lines_with(&page, "api-1"),
            4,
            "what web-1 had no part in stays"
        );
        assert!(
            page.contains(
                "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"api-1\""
            ),
            "{page}"
        );
        // A pod of the same name in another namespace is not touched.
        connection(&metrics, pod("other", "web-1"), pod("shop", "db-1"), "-");
        metrics.forget_workload("shop", "web-1");
        assert_eq!(lines_with(&encode(&registry), "web-1"), 4);
    }
}
