//! DestinationRule's circuit breakers at the waypoint: `connectionPool`
//! caps the requests in flight to a Service (and those that may wait for a
//! place; past them a request is answered 503 with `response_flags="UO"`),
//! and `outlierDetection` ejects an endpoint after consecutive errors for
//! a growing time, during which it gets no request.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::state::{ConnectionPool, Endpoint, OutlierDetection};
use crate::sync::LockExt as _;

/// One Service's cap, made again when its configuration changes.
struct Gate {
    config: ConnectionPool,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

/// The caps of every Service with a `connectionPool`.
#[derive(Default)]
pub struct Limits(Mutex<HashMap<String, Arc<Gate>>>);

/// Whether a request may go on.
pub enum Admit {
    /// Yes, holding this place (if the Service has a cap) until it is done.
    Go(Option<OwnedSemaphorePermit>),
    /// No: the cap and the waiting room are full.
    Overflow,
}

impl Limits {
    pub async fn admit(&self, service: &str, config: Option<&ConnectionPool>) -> Admit {
        let Some(config) = config else {
            return Admit::Go(None);
        };
        let Some(max) = config.max_requests else {
            return Admit::Go(None);
        };
        let gate = {
            let mut gates = self.0.locked();
            let gate = gates.entry(service.to_owned()).or_insert_with(|| {
                Arc::new(Gate {
                    config: config.clone(),
                    slots: Arc::new(Semaphore::new(max)),
                    waiting: AtomicUsize::new(0),
                })
            });
            if gate.config != *config {
                *gate = Arc::new(Gate {
                    config: config.clone(),
                    slots: Arc::new(Semaphore::new(max)),
                    waiting: AtomicUsize::new(0),
                });
            }
            gate.clone()
        };
        if let Ok(p) = gate.slots.clone().try_acquire_owned() {
            return Admit::Go(Some(p));
        }
        if gate.waiting.fetch_add(1, Ordering::AcqRel) >= config.max_pending {
            gate.waiting.fetch_sub(1, Ordering::AcqRel);
            return Admit::Overflow;
        }
        // Leaves the waiting room however the wait ends (a timeout or a
        // client that went away drops this future).
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _waiting = Waiting(&gate.waiting);
        let permit = gate.slots.clone().acquire_owned().await;
        match permit {
            Ok(p) => Admit::Go(Some(p)),
            Err(_) => Admit::Overflow,
        }
    }
}

#[derive(Debug, Default)]
struct EndpointHealth {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    times_ejected: u32,
    ejected_until: Option<Instant>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

/// Outlier detection's view of every endpoint the waypoint sent to.
#[derive(Default)]
pub struct Outliers {
    health: Mutex<HashMap<SocketAddr, EndpointHealth>>,
    pub ejections: Family<ServiceLabel, Counter>,
}

/// What came back from an endpoint.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Status(u16),
    /// No answer at all (connect failure, reset).
    Failed,
}

impl Outliers {
    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        let now = Instant::now();
        self.health
            .locked()
            .get(&addr)
            .and_then(|h| h.ejected_until)
            .is_some_and(|until| until > now)
    }

    /// Counts an outcome; ejects the endpoint when its errors reach the
    /// threshold and fewer than `max_ejection_percent` of `endpoints` are
    /// out already.
    pub fn observe(
        &self,
        service: &str,
        endpoints: &[Endpoint],
        addr: SocketAddr,
        outcome: Outcome,
        config: &OutlierDetection,
    ) {
        let now = Instant::now();
        let mut health = self.health.locked();
        let out = endpoints
            .iter()
            .filter(|e| {
                health
                    .get(&e.addr)
                    .and_then(|h| h.ejected_until)
                    .is_some_and(|u| u > now)
            })
            .count();
        let h = health.entry(addr).or_default();
        let (server_error, gateway_error) = match outcome {
            Outcome::Status(s) => ((500..600).contains(&s), matches!(s, 502..=504)),
            Outcome::Failed => (true, true),
        };
        if !server_error {
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            if h.ejected_until.is_some_and(|u| u <= now) {
                // Back, and answering: its next ejection starts short again.
                h.ejected_until = None;
                h.times_ejected = 0;
            }
            return;
        }
        h.consecutive_5xx += 1;
        if gateway_error {
            h.consecutive_gateway += 1;
        }
        let reached = config
            .consecutive_5xx
            .is_some_and(|n| h.consecutive_5xx >= n)
            || config
                .consecutive_gateway
                .is_some_and(|n| h.consecutive_gateway >= n);
        let allowed =
            (out + 1) * 100 <= endpoints.len().max(1) * config.max_ejection_percent as usize;
        let already = h.ejected_until.is_some_and(|u| u > now);
        if reached && allowed && !already {
            h.times_ejected += 1;
            h.ejected_until = Some(now + config.base_ejection * h.times_ejected);
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            self.ejections
                .get_or_create(&ServiceLabel {
                    service: service.to_owned(),
                })
                .inc();
            tracing::info!(service, endpoint = %addr, for_s = (config.base_ejection * h.times_ejected).as_secs(), "endpoint ejected (outlier detection)");
        }
    }

    /// Endpoints out now and for how long, for `/config_dump`.
    pub fn dump(&self) -> Vec<serde_json::Value> {
        let now = Instant::now();
        let mut out: Vec<serde_json::Value> = self
            .health
            .locked()
            .iter()
            .filter_map(|(addr, h)| {
                let until = h.ejected_until.filter(|u| *u > now)?;
                Some(serde_json::json!({
                    "endpoint": addr.to_string(),
                    "seconds_left": until.duration_since(now).as_secs_f64(),
                    "times_ejected": h.times_ejected,
                }))
            })
            .collect();
        out.sort_by(|a, b| a["endpoint"].as_str().cmp(&b["endpoint"].as_str()));
        out
    }
}

/// How long a request waits for a place before it counts as overflow too.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
