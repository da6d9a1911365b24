//! The waypoint's L7 telemetry: Istio's request metrics (with
//! `reporter="waypoint"` and Istio's label set and buckets) and one access
//! log line per request.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::metrics::TcpLabels;

/// Istio's request label set: the TCP one plus the response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    #[prometheus(flatten)]
    pub conn: TcpLabels,
    pub response_code: String,
    /// `-` when the request is not gRPC.
    pub grpc_response_status: String,
}

type Histograms = Family<HttpLabels, Histogram, fn() -> Histogram>;

/// Istio's duration buckets, in milliseconds.
const DURATION_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets, in bytes.
const BYTES: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_MS)
}

fn bytes_histogram() -> Histogram {
    Histogram::new(BYTES)
}

#[derive(Debug)]
pub struct RequestMetrics {
    pub requests: Family<HttpLabels, Counter>,
    pub duration: Histograms,
    pub request_bytes: Histograms,
    pub response_bytes: Histograms,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
        }
    }
}

impl RequestMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "istio_requests",
            "Requests served by the waypoint, Istio's label set",
            self.requests.clone(),
        );
        r.register(
            "istio_request_duration_milliseconds",
            "Time from a request's arrival to the end of its response headers, in ms",
            self.duration.clone(),
        );
        r.register(
            "istio_request_bytes",
            "Request sizes (headers and body), in bytes",
            self.request_bytes.clone(),
        );
        r.register(
            "istio_response_bytes",
            "Response sizes (headers and body), in bytes",
            self.response_bytes.clone(),
        );
    }

    pub fn record(&self, labels: &HttpLabels, duration_ms: f64, req: u64, resp: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(duration_ms);
        self.request_bytes.get_or_create(labels).observe(req as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(resp as f64);
    }
}
