//! Service VIP load balancing: round robin over a Service's endpoints, with
//! an endpoint that failed a connect set aside for a while so that new
//! connections go elsewhere.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::state::Endpoint;
use crate::sync::LockExt as _;

/// How long an endpoint that failed a connect gets no new connections
/// (unless every endpoint is down).
pub const DOWN_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Balancer {
    /// Round-robin position per service port (keys come from the store,
    /// not from traffic, so the map stays as small as the configuration).
    next: Mutex<HashMap<String, usize>>,
    down: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Balancer {
    /// The endpoints of service port `key` in the order to try them: round
    /// robin among the healthy ones, then the ones recently down as a last
    /// resort.
    pub fn order(&self, key: &str, endpoints: &[Endpoint]) -> Vec<Endpoint> {
        self.order_at(key, endpoints, Instant::now())
    }

    fn order_at(&self, key: &str, endpoints: &[Endpoint], now: Instant) -> Vec<Endpoint> {
        if endpoints.is_empty() {
            return Vec::new();
        }
        let start = {
            let mut next = self.next.locked();
            let n = next.entry(key.to_owned()).or_default();
            let start = *n % endpoints.len();
            *n = n.wrapping_add(1);
            start
        };
        let mut down = self.down.locked();
        down.retain(|_, until| *until > now);
        let rotated = endpoints[start..].iter().chain(&endpoints[..start]);
        let (healthy, sick): (Vec<&Endpoint>, Vec<&Endpoint>) =
            rotated.partition(|e| !down.contains_key(&e.addr));
        healthy.into_iter().chain(sick).cloned().collect()
    }

    pub fn mark_down(&self, addr: SocketAddr) {
        self.mark_down_at(addr, Instant::now());
    }

    fn mark_down_at(&self, addr: SocketAddr, now: Instant) {
        self.down.locked().insert(addr, now + DOWN_FOR);
    }

    pub fn mark_up(&self, addr: SocketAddr) {
        self.down.locked().remove(&addr);
    }

    /// How many of `endpoints` are set aside now (`order` puts them last).
    pub fn down_among(&self, endpoints: &[Endpoint]) -> usize {
        let now = Instant::now();
        let down = self.down.locked();
        endpoints
            .iter()
            .filter(|e| down.get(&e.addr).is_some_and(|until| *until > now))
            .count()
    }

    /// Endpoints currently set aside, for `/config_dump`.
    pub fn down(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let down = self.down.locked();
        down.iter()
            .filter(|(_, until)| **until > now)
            .map(|(a, _)| *a)
            .collect()
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn ep(last: u8) -> Endpoint {
        let ip = std::net::IpAddr::from([10, 0, 0, last]);
        Endpoint {
            // The balancer orders by address only.
            workload: None,
            addr: SocketAddr::new(ip, 80),
        }
    }

    fn firsts(b: &Balancer, eps: &[Endpoint], n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| match b.order("svc:80", eps)[0].addr.ip() {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                std::net::IpAddr::V6(_) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn round_robin_then_skip_down() {
        let b = Balancer::default();
        let eps = vec![ep(1), ep(2), ep(3)];
        assert_eq!(firsts(&b, &eps, 6), vec![1, 2, 3, 1, 2, 3]);
        b.mark_down(eps[1].addr);
        let f = firsts(&b, &eps, 6);
        assert!(!f.contains(&2), "{f:?}");
        assert!(f.contains(&1) && f.contains(&3), "{f:?}");
        // The down endpoint is still tried last.
        assert_eq!(b.order("svc:80", &eps).last().unwrap().addr, eps[1].addr);
        b.mark_up(eps[1].addr);
        assert!(firsts(&b, &eps, 3).contains(&2));
        assert!(b.order("svc:80", &[]).is_empty());
    }

    #[test]
    fn a_failed_endpoint_is_set_aside_for_30_seconds() {
        let b = Balancer::default();
        let eps = vec![ep(1), ep(2)];
        let t0 = Instant::now();
        b.mark_down_at(eps[0].addr, t0);
        // Every order within the 30 s puts it last, whatever the rotation.
        for at in [
            t0,
            t0 + Duration::from_secs(15),
            t0 + Duration::from_millis(29_999),
        ] {
            for _ in 0..2 {
                let order = b.order_at("svc:80", &eps, at);
                assert_eq!(order.last().unwrap().addr, eps[0].addr, "{at:?}");
            }
        }
        // Then it is back in the rotation, first every other time.
        let firsts: Vec<SocketAddr> = (0..2)
            .map(|_| b.order_at("svc:80", &eps, t0 + DOWN_FOR)[0].addr)
            .collect();
        assert!(firsts.contains(&eps[0].addr), "{firsts:?}");
        assert_eq!(DOWN_FOR, Duration::from_secs(30), "the README's 30 s");
    }

    #[test]
    fn each_service_has_its_own_rotation() {
        // A client alternating between two services still reaches every
        // endpoint of each.
        let b = Balancer::default();
        let (x, y) = (vec![ep(1), ep(2)], vec![ep(3), ep(4)]);
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(b.order("x:80", &x)[0].addr);
            seen.push(b.order("y:80", &y)[0].addr);
        }
        for e in x.iter().chain(&y) {
            assert!(seen.contains(&e.addr), "{seen:?}");
        }
    }
}
