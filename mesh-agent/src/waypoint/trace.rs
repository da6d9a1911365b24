//! Distributed tracing at the waypoint: each request starts or continues a
//! trace (W3C `traceparent`/`tracestate` and B3 `x-b3-*` read and passed
//! on), the waypoint records a server span and a client span with Istio's
//! attributes, and exports them, batched, to an OTLP/HTTP endpoint (JSON
//! encoding) and/or a Zipkin v2 endpoint. Export never blocks a request:
//! spans that do not fit the queue, or whose export fails, are dropped and
//! counted.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{
    HeaderMap,
    body::Bytes,
    header::{CONTENT_TYPE, HeaderValue},
};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::sync::mpsc;
use tracing::debug;

/// Spans waiting for export at most; past this, new spans are dropped.
const QUEUE: usize = 4096;
/// A batch is sent when it has this many spans, or every second.
const BATCH: usize = 256;
const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where spans go, from the command line.
#[derive(Clone, Debug, Default)]
pub struct TracingConfig {
    pub otlp: Option<String>,
    pub zipkin: Option<String>,
    /// Percent of new traces recorded (a trace the caller sampled is
    /// always recorded, one it did not never is).
    pub sampling: f64,
    pub service_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full` or `export_failed`.
    pub reason: &'static str,
}

/// The trace a request belongs to, and how to pass it on.
#[derive(Clone, Debug)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span, if it sent one.
    pub parent: Option<[u8; 8]>,
    /// The waypoint's server span for this request.
    pub server_span: [u8; 8],
    /// The waypoint's client span (the upstream call).
    pub client_span: [u8; 8],
    pub sampled: bool,
    /// The caller spoke B3: answer in B3 too.
    pub b3: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    (out != [0u8; N]).then_some(out)
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        let r = super::http::random_u64().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    out
}

impl TraceContext {
    /// From the request's headers: W3C first, then B3 (128- or 64-bit
    /// trace ids); else a new trace, sampled at `percent`.
    pub fn from_headers(h: &HeaderMap, percent: f64) -> Self {
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok());
        let mut ctx = TraceContext {
            trace_id: random(),
            parent: None,
            server_span: random(),
            client_span: random(),
            sampled: super::http::chance(percent),
            b3: false,
        };
        if let Some(tp) = get("traceparent").and_then(TraceParent::parse) {
            ctx.trace_id = tp.trace_id;
            ctx.parent = Some(tp.span_id);
            ctx.sampled = tp.sampled;
            return ctx;
        }
        if let (Some(trace), Some(span)) = (get("x-b3-traceid"), get("x-b3-spanid")) {
            let trace = if trace.len() == 16 {
                format!("{:0>32}", trace)
            } else {
                trace.to_owned()
            };
            if let (Some(t), Some(s)) = (unhex::<16>(&trace), unhex::<8>(span)) {
                ctx.trace_id = t;
                ctx.parent = Some(s);
                ctx.b3 = true;
                if let Some(sampled) = get("x-b3-sampled") {
                    ctx.sampled = sampled == "1" || sampled == "true";
                }
            }
        }
        ctx
    }

    /// Sets the headers the upstream call carries: its `traceparent` names
    /// the waypoint's client span; B3 too when the caller spoke it.
    pub fn inject(&self, h: &mut HeaderMap) {
        let tp = TraceParent {
            trace_id: self.trace_id,
            span_id: self.client_span,
            sampled: self.sampled,
        };
        if let Ok(v) = HeaderValue::from_str(&tp.to_string()) {
            h.insert("traceparent", v);
        }
        if self.b3 {
            let set = |h: &mut HeaderMap, k: &'static str, v: String| {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    h.insert(k, v);
                }
            };
            set(h, "x-b3-traceid", hex(&self.trace_id));
            set(h, "x-b3-spanid", hex(&self.client_span));
            set(h, "x-b3-parentspanid", hex(&self.server_span));
            set(
                h,
                "x-b3-sampled",
                if self.sampled { "1" } else { "0" }.into(),
            );
        }
    }
}

/// A W3C `traceparent`: the trace, the sender's span, whether it samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// A new trace with fresh random ids, not sampled (nothing records a
    /// span of it here; a receiver may still log or continue it).
    pub fn fresh() -> Self {
        TraceParent {
            trace_id: random(),
            span_id: random(),
            sampled: false,
        }
    }

    /// `version-traceid-spanid-flags` as W3C Trace Context writes it: two,
    /// 32, 16 and two hex digits, ids not all zero, version not `ff`; a
    /// later version may append fields. None for anything else.
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.trim().split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        let byte = |s: &str| {
            (s.len() == 2 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u8::from_str_radix(s, 16).ok())
                .flatten()
        };
        let version = byte(version).filter(|v| *v != 0xff)?;
        if version == 0 && parts.next().is_some() {
            return None;
        }
        let flags = byte(flags)?;
        Some(TraceParent {
            trace_id: unhex(trace)?,
            span_id: unhex(span)?,
            sampled: flags & 1 == 1,
        })
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let flags = if self.sampled { "01" } else { "00" };
        write!(
            f,
            "00-{}-{}-{flags}",
            hex(&self.trace_id),
            hex(&self.span_id)
        )
    }
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: String,
    /// `SERVER` or `CLIENT`.
    pub kind: &'static str,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: BTreeMap<&'static str, String>,
    pub error: bool,
}

/// The waypoint's span queue; `record` never waits.
pub struct Tracer {
    queue: Option<mpsc::Sender<Span>>,
    pub sampling: f64,
    pub dropped: Family<DropLabels, Counter>,
}

impl Tracer {
    /// Starts the exporter when an endpoint is configured.
    pub fn start(config: &TracingConfig) -> Tracer {
        let dropped = Family::<DropLabels, Counter>::default();
        let queue = (config.otlp.is_some() || config.zipkin.is_some()).then(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(export(config.clone(), rx, dropped.clone()));
            tx
        });
        Tracer {
            queue,
            sampling: config.sampling,
            dropped,
        }
    }

    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    pub fn record(&self, span: Span) {
        let Some(q) = &self.queue else { return };
        if q.try_send(span).is_err() {
            self.dropped
                .get_or_create(&DropLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }
}

async fn export(
    config: TracingConfig,
    mut rx: mpsc::Receiver<Span>,
    dropped: Family<DropLabels, Counter>,
) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(deadline);
        while batch.len() < BATCH {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => batch.push(s),
                    None => return,
                },
                () = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let spans = std::mem::take(&mut batch);
        let sent = |ok: bool, n: usize| {
            if !ok {
                dropped
                    .get_or_create(&DropLabels {
                        reason: "export_failed",
                    })
                    .inc_by(n as u64);
            }
        };
        if let Some(url) = &config.otlp {
            let body = otlp_json(&config.service_name, &spans);
            sent(post(&client, url, body).await, spans.len());
        }
        if let Some(url) = &config.zipkin {
            let body = zipkin_json(&config.service_name, &spans);
            sent(post(&client, url, body).await, spans.len());
        }
    }
}

async fn post(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    body: serde_json::Value,
) -> bool {
    let Ok(req) = hyper::Request::post(url)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
    else {
        return false;
    };
    match tokio::time::timeout(EXPORT_TIMEOUT, client.request(req)).await {
        Ok(Ok(resp)) => {
            let ok = resp.status().is_success();
            let _ = resp.into_body().collect().await;
            ok
        }
        Ok(Err(e)) => {
            debug!(%url, error = %e, "span export failed");
            false
        }
        Err(_) => {
            debug!(%url, "span export timed out");
            false
        }
    }
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

/// OTLP/HTTP, JSON encoding (`ExportTraceServiceRequest`).
fn otlp_json(service: &str, spans: &[Span]) -> serde_json::Value {
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut span = serde_json::json!({
                "traceId": hex(&s.trace_id),
                "spanId": hex(&s.id),
                "name": s.name,
                // SPAN_KIND_SERVER = 2, SPAN_KIND_CLIENT = 3.
                "kind": if s.kind == "SERVER" { 2 } else { 3 },
                "startTimeUnixNano": nanos(s.start).to_string(),
                "endTimeUnixNano": nanos(s.end).to_string(),
                "attributes": s.attributes.iter().map(|(k, v)| serde_json::json!({
                    "key": k, "value": {"stringValue": v},
                })).collect::<Vec<_>>(),
                // STATUS_CODE_ERROR = 2, UNSET = 0.
                "status": {"code": if s.error { 2 } else { 0 }},
            });
            if let Some(p) = s.parent {
                span["parentSpanId"] = serde_json::json!(hex(&p));
            }
            span
        })
        .collect();
    serde_json::json!({
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
            "scopeSpans": [{"scope": {"name": "mesh-agent-waypoint"}, "spans": spans}],
        }]
    })
}

/// Zipkin v2 JSON.
fn zipkin_json(service: &str, spans: &[Span]) -> serde_json::Value {
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut tags: BTreeMap<&str, String> = s.attributes.clone();
            if s.error {
                tags.insert("error", "true".into());
            }
            let mut span = serde_json::json!({
                "traceId": hex(&s.trace_id),
                "id": hex(&s.id),
                "name": s.name,
                "kind": s.kind,
                "timestamp": (nanos(s.start) / 1000) as u64,
                "duration": (s.end.duration_since(s.start).unwrap_or_default().as_micros() as u64).max(1),
                "localEndpoint": {"serviceName": service},
                "tags": tags,
            });
            if let Some(p) = s.parent {
                span["parentId"] = serde_json::json!(hex(&p));
            }
            span
        })
        .collect();
    serde_json::json!(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_w3c_and_b3_and_passes_them_on() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let ctx = TraceContext::from_headers(&h, 0.0);
        assert_eq!(hex(&ctx.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            ctx.parent.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(ctx.sampled && !ctx.b3);
        let mut out = HeaderMap::new();
        ctx.inject(&mut out);
        assert_eq!(
            out["traceparent"].to_str().unwrap(),
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                hex(&ctx.client_span)
            )
        );

        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", HeaderValue::from_static("a3ce929d0e0e4736"));
        h.insert("x-b3-spanid", HeaderValue::from_static("00f067aa0ba902b7"));
        h.insert("x-b3-sampled", HeaderValue::from_static("0"));
        let ctx = TraceContext::from_headers(&h, 100.0);
        assert_eq!(hex(&ctx.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert!(ctx.b3 && !ctx.sampled);
        let mut out = HeaderMap::new();
        ctx.inject(&mut out);
        assert_eq!(
            out["x-b3-parentspanid"].to_str().unwrap(),
            hex(&ctx.server_span)
        );
        assert_eq!(out["x-b3-sampled"], "0");

        // Garbage starts a new trace.
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-zz-00f067aa0ba902b7-01"),
        );
        let ctx = TraceContext::from_headers(&h, 100.0);
        assert!(ctx.parent.is_none() && ctx.sampled);
    }

    #[test]
    fn traceparents_parse_strictly_and_print_back() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(tp).unwrap();
        assert!(parsed.sampled);
        assert_eq!(parsed.to_string(), tp);
        // A later version may add fields; version 00 may not.
        assert!(TraceParent::parse(&format!("01{}-09", &tp[2..])).is_some());
        for bad in [
            "",
            "00",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-09",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        let (a, b) = (TraceParent::fresh(), TraceParent::fresh());
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, b.span_id);
        assert_eq!(TraceParent::parse(&a.to_string()), Some(a));
    }
}
