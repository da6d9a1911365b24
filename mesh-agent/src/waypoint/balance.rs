//! Which endpoint serves a request at the waypoint: the chosen Service
//! port's endpoints, narrowed to a DestinationRule subset, in the order of
//! the subset's (or the Service's) load balancer: round robin (the
//! default), least request, random, or a consistent hash of a header or of
//! the client's address. Endpoints recently set aside come last.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hasher as _,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use hyper::HeaderMap;

use super::Ctx;
use crate::state::{Endpoint, LoadBalancer, Store, WaypointTarget};
use crate::sync::LockExt as _;

/// A Service port (or pod) and, from a DestinationRule, the subset of its
/// pods that may serve.
#[derive(Clone, Debug)]
pub struct Choice {
    pub target: WaypointTarget,
    pub subset: Option<(String, Arc<BTreeMap<String, String>>)>,
}

impl From<WaypointTarget> for Choice {
    fn from(target: WaypointTarget) -> Self {
        Choice {
            target,
            subset: None,
        }
    }
}

/// What a hashing load balancer may read of the request.
#[derive(Clone, Copy, Default)]
pub struct Keys<'a> {
    pub headers: Option<&'a HeaderMap>,
    pub client: Option<IpAddr>,
}

/// Requests in flight per endpoint, for `LEAST_REQUEST`.
#[derive(Debug, Default)]
pub struct InFlight(Mutex<HashMap<SocketAddr, usize>>);

/// One request's count on its endpoint, released when dropped.
pub struct InFlightGuard<'a>(&'a InFlight, SocketAddr);

impl InFlight {
    pub fn start(&self, addr: SocketAddr) -> InFlightGuard<'_> {
        *self.0.locked().entry(addr).or_default() += 1;
        InFlightGuard(self, addr)
    }

    fn get(&self, addr: SocketAddr) -> usize {
        self.0.locked().get(&addr).copied().unwrap_or(0)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.0.0.locked();
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// The endpoints of `choice` in the order to try them.
pub fn endpoints(ctx: &Ctx, store: &Store, choice: &Choice, keys: Keys<'_>) -> Vec<Endpoint> {
    let (svc, port) = match &choice.target {
        WaypointTarget::Service(svc, port) => (svc, port),
        // The pod at the address it was addressed by.
        WaypointTarget::Workload(wl, addr) => {
            return vec![Endpoint {
                workload: Some(wl.clone()),
                addr: *addr,
            }];
        }
    };
    // An ingress gateway sends a Service that asks for it to its waypoint:
    // to the Service's address, which the connector tunnels through one of
    // the waypoint's pods (`upstream::open`).
    if ctx.mode == super::Mode::Ingress
        && let Some(Ok(wp)) = store.ingress_waypoint(svc)
        && let (Some(vip), Some(pod)) = (svc.vips.first(), wp.pods.first())
    {
        return vec![Endpoint {
            workload: Some(pod.clone()),
            addr: std::net::SocketAddr::new(*vip, port.port),
        }];
    }
    let mut all = store.endpoints(svc, port);
    if let Some((_, labels)) = &choice.subset {
        all.retain(|e| {
            labels
                .iter()
                .all(|(k, v)| e.workload.as_ref().and_then(|w| w.labels.get(k)) == Some(v))
        });
    }
    // Ejected endpoints (outlier detection) get nothing while others of
    // the subset remain.
    if all.iter().any(|e| !ctx.outliers.is_ejected(e.addr)) {
        all.retain(|e| !ctx.outliers.is_ejected(e.addr));
    }
    let subset = choice.subset.as_ref().map_or("", |(n, _)| n.as_str());
    let lb = store
        .destination_policy(svc)
        .map(|p| p.load_balancer_for(Some(subset).filter(|s| !s.is_empty()), port.port))
        .unwrap_or_default();
    let key = format!("{}:{}:{subset}", svc.hostname(), port.port);
    // Round robin first: it also puts set-aside endpoints last.
    let mut order = ctx.balancer.order(&key, &all);
    let healthy = order.len() - ctx.balancer.down_among(&order);
    let mut hash = |h: u64| {
        if healthy > 0 {
            let at = (h % healthy as u64) as usize;
            // Stable for a key: sort the healthy ones by address first.
            order[..healthy].sort_by_key(|e| e.addr);
            order[..healthy].rotate_left(at);
        }
    };
    match lb {
        LoadBalancer::RoundRobin => {}
        LoadBalancer::Random => hash(super::http::random_u64()),
        LoadBalancer::LeastRequest => {
            // Fewest in flight first; round robin among equals.
            order[..healthy].sort_by_key(|e| ctx.in_flight.get(e.addr));
        }
        LoadBalancer::HashHeader(name) => {
            if let Some(v) = keys.headers.and_then(|h| h.get(name.as_str())) {
                hash(stable_hash(&v.as_bytes()));
            }
        }
        LoadBalancer::HashSourceIp => {
            if let Some(ip) = keys.client {
                hash(stable_hash(&ip))
            }
        }
    }
    order
}

/// `endpoints`, or when there are none and the destination is a
/// ServiceEntry with resolution DNS, what its names resolve to now (as
/// the node agent resolves them per connection).
pub async fn or_resolved(
    store: &Store,
    choice: &Choice,
    endpoints: Vec<Endpoint>,
) -> Vec<Endpoint> {
    let WaypointTarget::Service(svc, port) = &choice.target else {
        return endpoints;
    };
    if !endpoints.is_empty() {
        return endpoints;
    }
    let names = store.dns_targets(svc, port);
    if names.is_empty() {
        return endpoints;
    }
    let ipv4 = svc.vips.first().is_none_or(IpAddr::is_ipv4);
    crate::proxy::resolve(&names, ipv4)
        .await
        .into_iter()
        .map(|addr| Endpoint {
            workload: store.workload_by_ip(addr.ip()).cloned(),
            addr,
        })
        .collect()
}

fn stable_hash(v: &impl std::hash::Hash) -> u64 {
    // SipHash with fixed keys: the same key picks the same endpoint in
    // every waypoint replica.
    let mut h = std::hash::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}
