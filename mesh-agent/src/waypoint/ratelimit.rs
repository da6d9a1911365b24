//! Token buckets for `LocalRateLimitPolicy`: one for a policy's total rate
//! and one per client identity (its override, else the per-identity rate).
//! A request takes a token from each bucket that applies, or is refused
//! with how long until one is back. A bucket holds one second of tokens.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

use crate::sync::LockExt as _;
use crate::{identity::Identity, state::RateLimit};

#[derive(Debug)]
struct Bucket {
    rate: u32,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Self {
        Bucket {
            rate,
            tokens: f64::from(rate),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let rate = f64::from(self.rate);
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(rate);
        self.at = now;
    }

    /// Time until a token is back, or None when one is here.
    fn wait(&self) -> Option<Duration> {
        (self.tokens < 1.0)
            .then(|| Duration::from_secs_f64((1.0 - self.tokens) / f64::from(self.rate.max(1))))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub policy: String,
    /// `total`, `identity` or `override`.
    pub scope: &'static str,
}

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<(String, String), Bucket>>,
    pub limited: Family<LimitLabels, Counter>,
}

impl RateLimiter {
    /// Takes a token from every bucket of `policies` that this request
    /// counts against; refused (with the wait) when one has none, and then
    /// none is taken. A client without an identity (from outside the mesh,
    /// at an ingress gateway) counts against the total buckets only.
    pub fn check<'a>(
        &self,
        policies: impl Iterator<Item = &'a RateLimit>,
        client: Option<&Identity>,
    ) -> Result<(), Duration> {
        let now = Instant::now();
        let sa = client
            .map(|c| format!("{}/{}", c.namespace, c.service_account))
            .unwrap_or_default();
        let mut buckets = self.buckets.locked();
        // A full bucket is the same as none: drop them when the map grows,
        // so identities that stopped calling (or deleted policies) leave.
        if buckets.len() > 4096 {
            buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < f64::from(b.rate)
            });
        }
        let mut keys = Vec::new();
        for p in policies {
            if let Some(rate) = p.total {
                keys.push(((p.policy.clone(), String::new()), rate, "total", &p.policy));
            }
            if let Some(rate) = client.and_then(|c| p.client_rate(c)) {
                let scope = if p.overrides.iter().any(|(who, _)| *who == sa) {
                    "override"
                } else {
                    "identity"
                };
                keys.push(((p.policy.clone(), sa.clone()), rate, scope, &p.policy));
            }
        }
        for (key, rate, scope, policy) in &keys {
            let b = buckets
                .entry(key.clone())
                .or_insert_with(|| Bucket::new(*rate, now));
            if b.rate != *rate {
                *b = Bucket::new(*rate, now);
            }
            b.refill(now);
            if let Some(wait) = b.wait() {
                self.limited
                    .get_or_create(&LimitLabels {
                        policy: (*policy).clone(),
                        scope,
                    })
                    .inc();
                return Err(wait);
            }
        }
        for (key, ..) in &keys {
            if let Some(b) = buckets.get_mut(key) {
                b.tokens -= 1.0;
            }
        }
        Ok(())
    }
}
