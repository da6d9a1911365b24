//! The same-node shortcut (`--same-node-plaintext`, off by default): a
//! connection from one pod of this agent to another pod of this agent,
//! both captured, is handed to the destination's inbound side in the
//! process instead of going over HBONE to the agent itself. The
//! destination admits it as it admits a CONNECT ([`super::deliver`]), with
//! the identity the agent knows the client pod by; the bytes are then
//! spliced from the client's socket to the socket the agent opens in the
//! destination pod, with no TLS and no HTTP/2. They never leave the node,
//! but they are not encrypted between the two pods (Istio's ztunnel
//! encrypts them), so it is never taken unless asked for, nor under
//! PeerAuthentication STRICT, nor through a waypoint.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, PoisonError, RwLock, Weak},
};

use tokio::net::TcpStream;

use super::{
    Counted, PodCtx, WhenBulk,
    conn::{ConnRecord, Security},
    deliver::{Authenticated, Refused, Request},
    ended, finish, revoked_by_policy, splice,
};
use crate::{
    identity::Identity,
    state::{Decision, MtlsMode, Service, Store, Workload},
};

/// The pods this agent serves, by address: where a same-node connection
/// is delivered. Weak, so that a released pod is never kept alive here.
#[derive(Default)]
pub struct LocalPods {
    by_ip: RwLock<HashMap<IpAddr, Weak<PodCtx>>>,
}

impl LocalPods {
    /// Records an enrolled pod under each address it was given.
    pub fn insert(&self, pod: &Arc<PodCtx>) {
        let mut map = self.by_ip.write().unwrap_or_else(PoisonError::into_inner);
        for ip in &pod.addresses {
            map.insert(*ip, Arc::downgrade(pod));
        }
    }

    /// Forgets a released pod (only the addresses still its own).
    pub fn remove(&self, pod: &Arc<PodCtx>) {
        let mut map = self.by_ip.write().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, p| !std::ptr::eq(p.as_ptr(), Arc::as_ptr(pod)) && p.strong_count() > 0);
    }

    /// Whether `ip` is an address of a pod this agent serves.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.get(ip).is_some()
    }

    fn get(&self, ip: IpAddr) -> Option<Arc<PodCtx>> {
        let map = self.by_ip.read().unwrap_or_else(PoisonError::into_inner);
        map.get(&ip).and_then(Weak::upgrade)
    }
}

/// The pod of this agent a connection to `dst` (a captured workload,
/// reached directly, not through a waypoint) may be delivered to without
/// TLS, with that pod's workload as the store knows it: only with the
/// option on, when `dst` is an address of a pod enrolled here and the same
/// workload, and when no PeerAuthentication asks for mutual TLS on that
/// port (STRICT is kept to the letter: such a connection goes over HBONE).
pub(super) fn target(
    src: &PodCtx,
    store: &Store,
    dst: SocketAddr,
    workload: &Workload,
) -> Option<(Arc<PodCtx>, Arc<Workload>)> {
    if !src.shared.same_node_plaintext || !workload.hbone {
        return None;
    }
    let pod = src.shared.local_pods.get(dst.ip())?;
    let local = pod
        .workload_at(store, dst.ip())
        .filter(|w| w.namespace == workload.namespace && w.name == workload.name)?;
    if store.mtls_mode(&local, dst.port()) == MtlsMode::Strict {
        return None;
    }
    Some((pod, local))
}

/// A same-node connection admitted by its destination: the destination's
/// record and the socket to its app.
pub(super) struct Delivery {
    auth: Arc<Authenticated>,
    rec: ConnRecord,
    app: TcpStream,
    dst: SocketAddr,
}

/// Admits a connection from `peer` (`peer_id`) to `dst` in `pod`, as the
/// HBONE server would a CONNECT for it.
pub(super) async fn admit(
    pod: Arc<PodCtx>,
    local: Arc<Workload>,
    local_id: Identity,
    peer: SocketAddr,
    peer_id: Identity,
    dst: SocketAddr,
    service: Option<&Service>,
) -> Result<Delivery, Refused> {
    let auth = Authenticated {
        pod,
        local,
        local_id,
        peer,
        peer_id,
    };
    let store = auth.pod.shared.store();
    // Only a Service that selects the pod labels it, as over HBONE.
    let service = service.filter(|s| store.serves(s, &auth.local));
    let req = Request {
        dst,
        service,
        tunnel: None,
        security: Security::SameNode,
        counter: "same_node",
    };
    let (rec, app) = auth.admit(store, req).await?;
    Ok(Delivery {
        auth: Arc::new(auth),
        rec,
        app,
        dst,
    })
}

impl Delivery {
    /// Splices the client's socket to the app's until both close, or until
    /// the destination's policy no longer allows it; both ends' records
    /// (`outbound`, the client's, and the destination's) count the bytes.
    pub(super) async fn splice(self, mut outbound: ConnRecord, client: TcpStream) {
        let Delivery {
            auth,
            mut rec,
            mut app,
            dst,
        } = self;
        let mut client: Counted<Counted<TcpStream>> = outbound.counted(rec.counted(client));
        let check = auth.clone();
        let revoked = revoked_by_policy(auth.pod.shared.store.clone(), move |s| {
            check.authorize(s, dst) == Decision::Allow
        });
        let end = splice(&mut client, &mut app, revoked, WhenBulk::Stay).await;
        let (flags, outcome) = ended(&client, &end);
        outbound.close(flags, outcome);
        finish(rec, &client, end, &auth.pod);
    }
}
