//! A token bucket per client address in front of the TokenReview that every
//! certificate request costs the API server: an unauthenticated caller
//! cannot turn the CA into a TokenReview flood.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::Instant,
};

/// Addresses tracked at most; past this, idle (full) buckets are dropped,
/// and while none is idle a new address is refused rather than the map grown.
const MAX_ADDRESSES: usize = 4096;

#[derive(Debug)]
pub(super) struct ReviewLimiter {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl ReviewLimiter {
    pub(super) fn new(burst: u32, per_second: f64) -> Self {
        ReviewLimiter {
            burst: f64::from(burst.max(1)),
            per_second: per_second.max(0.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `ip`; false when its bucket is empty.
    pub(super) fn allow(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_ADDRESSES && !buckets.contains_key(&ip) {
            buckets.retain(|_, b| self.level(b, now) < self.burst);
            if buckets.len() >= MAX_ADDRESSES {
                return false;
            }
        }
        let full = Bucket {
            tokens: self.burst,
            at: now,
        };
        let bucket = buckets.entry(ip).or_insert(full);
        let tokens = self.level(bucket, now);
        *bucket = Bucket { tokens, at: now };
        if tokens < 1.0 {
            return false;
        }
        bucket.tokens -= 1.0;
        true
    }

    fn level(&self, b: &Bucket, now: Instant) -> f64 {
        let refill = now.duration_since(b.at).as_secs_f64() * self.per_second;
        (b.tokens + refill).min(self.burst)
    }
}
