//! The agent's Prometheus registry. Capture counters are read from the
//! kernel's per-CPU map at scrape time.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, OnceLock, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::capture::Capture;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    /// The listener: `outbound`, `inbound_plaintext`, `hbone`, `waypoint`
    /// (a waypoint's 15008), or the HTTP servers `admin`, `metrics`, `ready`.
    pub direction: &'static str,
    /// `forwarded`, `no_original_destination`, `connect_failed`, `refused`,
    /// `not_synced` (the configuration was not read yet),
    /// `handshake_timeout`, `header_timeout`, `limit` (the listener was
    /// full and stopped accepting), `peer_limit` (one address held its
    /// share and was closed), `accept_error`, ...
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnrolLabels {
    /// `enroll` or `unenroll`; in a cluster also `annotate` and
    /// `unannotate` (the pod's redirection annotation written).
    pub op: &'static str,
    /// `ok` or an error kind.
    pub result: &'static str,
}

/// Istio's TCP label set, so that existing dashboards keep working.
/// Unknown values are `unknown`, as Istio writes them.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (the client's agent) or `destination` (the server's).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    /// ztunnel's values: `-`, or what went wrong: `DENY` (authorization,
    /// at the start or later), `CONNECT` (the upstream connection failed),
    /// `TLS_FAILURE`, `H2_HANDSHAKE_FAILURE`, `IDENTITY_ERROR` (no
    /// certificate to connect with). A waypoint's own L4 records keep
    /// Envoy's (`UF`, `UH`), as Istio's waypoints are Envoy.
    pub response_flags: &'static str,
    /// `mutual_tls` or `unknown` (plain TCP).
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    /// The known workloads at the source and the destination end.
    fn workloads(&self) -> [Option<(String, String)>; 2] {
        let known =
            |ns: &str, name: &str| (name != "unknown").then(|| (ns.to_owned(), name.to_owned()));
        [
            known(&self.source_workload_namespace, &self.source_workload),
            known(
                &self.destination_workload_namespace,
                &self.destination_workload,
            ),
        ]
    }
}

/// `istio_tcp_sockets_open`: as ztunnel, only the reporter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SocketLabels {
    /// `source` (outbound) or `destination` (HBONE and plaintext inbound).
    pub reporter: &'static str,
}

/// The flags ztunnel counts in `istio_tcp_connections_failed`: the
/// connection was refused or never reached its destination.
pub fn is_failure(flags: &str) -> bool {
    matches!(
        flags,
        "DENY"
            | "CONNECT"
            | "TLS_FAILURE"
            | "H2_HANDSHAKE_FAILURE"
            | "NETWORK_POLICY"
            | "IDENTITY_ERROR"
            | "CERT_REVOKED"
            // A waypoint's Envoy-style flags.
            | "UF"
            | "UH"
            // Refused by REGISTRY_ONLY (no route).
            | "NR"
    )
}

/// The `source_cluster`/`destination_cluster` of the workloads this agent
/// knows (all in its own cluster): `--cluster-id`, Istio's `Kubernetes`
/// by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterId(pub String);

impl Default for ClusterId {
    fn default() -> Self {
        ClusterId("Kubernetes".to_owned())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeaderLabels {
    /// `baggage` or `traceparent`.
    pub header: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DryRunLabels {
    /// The listener that evaluated it: `hbone` or `inbound_plaintext`.
    pub direction: &'static str,
    /// What the dry-run policies would have decided: `allow` or `deny`.
    pub result: &'static str,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub proxy_connections: Family<ProxyLabels, Counter>,
    pub enrolment: Family<EnrolLabels, Counter>,
    pub enrolled_pods: Gauge,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    pub tcp_failed: Family<TcpLabels, Counter>,
    pub sockets_open: Family<SocketLabels, Gauge>,
    pub cluster_id: ClusterId,
    pub config_warnings: Family<KindLabels, Counter>,
    pub config_objects: Family<KindLabels, Gauge>,
    pub policy_dry_run: Family<DryRunLabels, Counter>,
    pub hbone_bad_headers: Family<HeaderLabels, Counter>,
    /// The `istio_tcp_*` label sets in use, each with its counters.
    tcp_series: RwLock<TcpIndex>,
}

/// The `istio_tcp_*` series, by label set and by the workloads at their
/// ends.
#[derive(Debug, Default)]
struct TcpIndex {
    /// A connection looks its label set up here once, when it opens (and
    /// once more if it closes with flags), and counts on the counters it
    /// finds: not one lookup in each family for each count.
    by_labels: HashMap<TcpLabels, Arc<TcpSeries>>,
    /// By the workload (namespace, name) at either end: prometheus-client
    /// cannot list a family's label sets, and without this a node that sees
    /// many short-lived pods would export their series forever.
    by_workload: HashMap<(String, String), HashSet<TcpLabels>>,
}

/// One `istio_tcp_*` label set and its counter in each family. A counter
/// is added to its family when first used, so that a series appears on
/// the page once it counts something, as each family's own would.
#[derive(Debug)]
pub struct TcpSeries {
    labels: TcpLabels,
    opened: OnceLock<Counter>,
    closed: OnceLock<Counter>,
    sent: OnceLock<Counter>,
    received: OnceLock<Counter>,
    failed: OnceLock<Counter>,
    /// Its workload's series were removed ([`Metrics::forget_workload`]):
    /// counters not yet taken are taken from a fresh lookup.
    forgotten: AtomicBool,
}

impl TcpSeries {
    fn new(labels: TcpLabels) -> Self {
        TcpSeries {
            labels,
            opened: OnceLock::new(),
            closed: OnceLock::new(),
            sent: OnceLock::new(),
            received: OnceLock::new(),
            failed: OnceLock::new(),
            forgotten: AtomicBool::new(false),
        }
    }

    pub fn labels(&self) -> &TcpLabels {
        &self.labels
    }

    fn counter<'a>(
        &'a self,
        cell: &'a OnceLock<Counter>,
        family: &Family<TcpLabels, Counter>,
    ) -> &'a Counter {
        cell.get_or_init(|| family.get_or_create(&self.labels).clone())
    }
}

impl Metrics {
    /// The agent's metrics, its workloads in cluster `cluster_id`.
    pub fn new(cluster_id: &str) -> Self {
        Metrics {
            cluster_id: ClusterId(cluster_id.to_owned()),
            ..Metrics::default()
        }
    }

    /// Accepted data-path sockets still open (what a drain waits for).
    pub fn open_sockets(&self) -> i64 {
        ["source", "destination"]
            .into_iter()
            .map(|reporter| {
                self.sockets_open
                    .get_or_create(&SocketLabels { reporter })
                    .get()
            })
            .sum()
    }

    /// Counts an accepted socket in `istio_tcp_sockets_open` until the
    /// returned guard is dropped (when its task ends, however it ends).
    pub fn socket_open(self: &Arc<Self>, reporter: &'static str) -> SocketGuard {
        self.sockets_open
            .get_or_create(&SocketLabels { reporter })
            .inc();
        SocketGuard {
            metrics: self.clone(),
            reporter,
        }
    }

    /// Reports what the dry-run policies in scope would decide on a
    /// connection, if there are any: counted, and logged when they would
    /// deny (the enforced decision is unchanged).
    pub fn dry_run(&self, direction: &'static str, decision: Option<crate::state::Decision>) {
        let Some(decision) = decision else { return };
        let result = match &decision {
            crate::state::Decision::Allow => "allow",
            crate::state::Decision::Deny { reason, .. } => {
                tracing::info!(direction, reason = %reason, "dry-run policy would deny this connection (not enforced)");
                "deny"
            }
        };
        self.policy_dry_run
            .get_or_create(&DryRunLabels { direction, result })
            .inc();
    }

    pub fn connection(&self, direction: &'static str, result: &'static str) {
        self.proxy_connections
            .get_or_create(&ProxyLabels { direction, result })
            .inc();
    }

    /// The series of `labels`, made on first use.
    pub fn tcp(&self, labels: &TcpLabels) -> Arc<TcpSeries> {
        let index = self
            .tcp_series
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = index.by_labels.get(labels) {
            return s.clone();
        }
        drop(index);
        let mut index = self
            .tcp_series
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = index.by_labels.get(labels) {
            return s.clone();
        }
        let series = Arc::new(TcpSeries::new(labels.clone()));
        index.by_labels.insert(labels.clone(), series.clone());
        for end in TcpLabels::workloads(labels).into_iter().flatten() {
            index
                .by_workload
                .entry(end)
                .or_default()
                .insert(labels.clone());
        }
        series
    }

    /// `series` itself, or if its workload was forgotten since, the series
    /// of its labels now (which brings them back on the page).
    fn current(&self, series: &Arc<TcpSeries>) -> Arc<TcpSeries> {
        if series.forgotten.load(Ordering::Relaxed) {
            self.tcp(&series.labels)
        } else {
            series.clone()
        }
    }

    /// Counts a connection opened, and returns its byte counters.
    pub fn tcp_opened(&self, series: &Arc<TcpSeries>) -> (Counter, Counter) {
        let s = self.current(series);
        s.counter(&s.opened, &self.tcp_opened).inc();
        (
            s.counter(&s.received, &self.tcp_received).clone(),
            s.counter(&s.sent, &self.tcp_sent).clone(),
        )
    }

    /// Counts a connection closed, and failed if its flags say so.
    pub fn tcp_closed(&self, series: &Arc<TcpSeries>) {
        let s = self.current(series);
        s.counter(&s.closed, &self.tcp_closed).inc();
        if is_failure(s.labels.response_flags) {
            s.counter(&s.failed, &self.tcp_failed).inc();
        }
    }

    /// Removes every `istio_tcp_*` series with this workload at either end:
    /// called when its pod is released, the workload label being the pod's
    /// name. A connection of the pod that is still open when it goes counts
    /// its close afterwards, which brings back that one series.
    pub fn forget_workload(&self, namespace: &str, name: &str) {
        let mut index = self
            .tcp_series
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(series) = index
            .by_workload
            .remove(&(namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        for labels in series {
            if let Some(s) = index.by_labels.remove(&labels) {
                s.forgotten.store(true, Ordering::Relaxed);
            }
            for family in [
                &self.tcp_opened,
                &self.tcp_closed,
                &self.tcp_sent,
                &self.tcp_received,
                &self.tcp_failed,
            ] {
                family.remove(&labels);
            }
            // The other end's entry must not keep the label set alive.
            for end in TcpLabels::workloads(&labels).into_iter().flatten() {
                if let Some(set) = index.by_workload.get_mut(&end) {
                    set.remove(&labels);
                    if set.is_empty() {
                        index.by_workload.remove(&end);
                    }
                }
            }
        }
    }

    pub fn enrolment(&self, op: &'static str, result: &'static str) {
        self.enrolment
            .get_or_create(&EnrolLabels { op, result })
            .inc();
    }
}

/// Holds one socket in `istio_tcp_sockets_open`.
pub struct SocketGuard {
    metrics: Arc<Metrics>,
    reporter: &'static str,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.metrics
            .sockets_open
            .get_or_create(&SocketLabels {
                reporter: self.reporter,
            })
            .dec();
    }
}

pub fn registry(metrics: &Arc<Metrics>, capture: Arc<Capture>) -> Registry {
    let mut r = proxy_registry(metrics);
    r.register_collector(Box::new(CaptureCollector(capture)));
    r
}

/// Everything but the kernel's counters: what a waypoint, which captures
/// nothing, exports too.
pub fn proxy_registry(metrics: &Arc<Metrics>) -> Registry {
    let mut r = Registry::default();
    r.register(
        "mesh_proxy_connections",
        "Connections the agent's listeners accepted or refused, by listener and outcome",
        metrics.proxy_connections.clone(),
    );
    r.register(
        "mesh_enrolment",
        "Pod enrolment and release requests, by outcome",
        metrics.enrolment.clone(),
    );
    r.register(
        "mesh_enrolled_pods",
        "Pods whose traffic this agent captures",
        metrics.enrolled_pods.clone(),
    );
    r.register(
        "istio_tcp_connections_opened",
        "TCP connections opened, Istio's label set",
        metrics.tcp_opened.clone(),
    );
    r.register(
        "istio_tcp_connections_closed",
        "TCP connections closed, Istio's label set",
        metrics.tcp_closed.clone(),
    );
    r.register(
        "istio_tcp_sent_bytes",
        "Bytes of the response direction (server to client), counted as they are copied",
        metrics.tcp_sent.clone(),
    );
    r.register(
        "istio_tcp_received_bytes",
        "Bytes of the request direction (client to server), counted as they are copied",
        metrics.tcp_received.clone(),
    );
    r.register(
        "istio_tcp_connections_failed",
        "TCP connections refused or that failed to reach their destination (response_flags DENY, CONNECT, TLS_FAILURE, H2_HANDSHAKE_FAILURE, IDENTITY_ERROR)",
        metrics.tcp_failed.clone(),
    );
    r.register(
        "istio_tcp_sockets_open",
        "Accepted sockets of the data path open now, by reporter",
        metrics.sockets_open.clone(),
    );
    r.register(
        "mesh_policy_dry_run",
        "Connections the istio.io/dry-run AuthorizationPolicies in scope would have allowed or denied (never enforced)",
        metrics.policy_dry_run.clone(),
    );
    r.register(
        "mesh_hbone_bad_headers",
        "HBONE CONNECT metadata headers that did not parse and were ignored, by header",
        metrics.hbone_bad_headers.clone(),
    );
    r.register(
        "mesh_config_warnings",
        "Configuration not applied as written, by kind (each warning counted once, when it appears)",
        metrics.config_warnings.clone(),
    );
    r.register(
        "mesh_config_objects",
        "Objects of each kind in the configuration snapshot the data path follows",
        metrics.config_objects.clone(),
    );
    r.register_collector(Box::new(ProcessCollector));
    r.register_collector(Box::new(SnapshotCollector));
    r
}

/// Configuration snapshots alive in the process ([`crate::state::live_snapshots`]).
#[derive(Debug)]
struct SnapshotCollector;

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::{MetricType, gauge::ConstGauge};
        ConstGauge::new(crate::state::live_snapshots()).encode(encoder.encode_descriptor(
            "mesh_config_snapshots",
            "Configuration snapshots held in memory: the current one, and older ones tasks still hold (stays low however long connections live)",
            None,
            MetricType::Gauge,
        )?)
    }
}

/// The process's own CPU, memory and open files, under the names
/// Prometheus' client libraries use, read from `/proc/self` at scrape time:
/// what the dashboards' resource panels plot for agents and waypoints.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::{MetricType, gauge::ConstGauge};
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime + stime, in USER_HZ (100 on Linux).
        let cpu = (ticks(11) + ticks(12)) / 100.0;
        let rss_pages = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
            .unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as i64;
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64);
        let c = ConstCounter::new(cpu);
        c.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            MetricType::Counter,
        )?)?;
        ConstGauge::new(rss_pages * page).encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory size, in bytes",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(fds).encode(encoder.encode_descriptor(
            "process_open_fds",
            "Open file descriptors",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

#[derive(Debug)]
struct CaptureCollector(Arc<Capture>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

impl Collector for CaptureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.0.counters();
        let mut family = encoder.encode_descriptor(
            "mesh_capture_events",
            "Decisions of the kernel capture programs, summed over CPUs",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (event, value) in counters {
            let c = ConstCounter::new(value);
            let labels = EventLabel { event };
            c.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("encoding to a String cannot fail");
    out
}
