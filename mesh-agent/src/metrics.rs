//! The agent's Prometheus registry. Capture counters are read from the
//! kernel's per-CPU map at scrape time.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::capture::Capture;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    /// `outbound`, `inbound_plaintext` or `hbone`.
    pub direction: &'static str,
    /// `forwarded`, `no_original_destination`, `connect_failed`, `refused`, ...
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnrolLabels {
    /// `enroll` or `unenroll`.
    pub op: &'static str,
    /// `ok` or an error kind.
    pub result: &'static str,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub proxy_connections: Family<ProxyLabels, Counter>,
    pub enrolment: Family<EnrolLabels, Counter>,
    pub enrolled_pods: Gauge,
}

impl Metrics {
    pub fn connection(&self, direction: &'static str, result: &'static str) {
        self.proxy_connections
            .get_or_create(&ProxyLabels { direction, result })
            .inc();
    }

    pub fn enrolment(&self, op: &'static str, result: &'static str) {
        self.enrolment
            .get_or_create(&EnrolLabels { op, result })
            .inc();
    }
}

pub fn registry(metrics: &Arc<Metrics>, capture: Arc<Capture>) -> Registry {
    let mut r = Registry::default();
    r.register(
        "mesh_proxy_connections",
        "Connections the agent's capture listeners accepted, by direction and outcome",
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
    r.register_collector(Box::new(CaptureCollector(capture)));
    r
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
