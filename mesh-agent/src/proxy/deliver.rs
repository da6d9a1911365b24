//! Delivery into a pod this agent serves, on behalf of a peer whose
//! identity is known: the destination's record (metrics, access log), its
//! policy, and the socket the agent opens to the app from the peer's
//! address. HBONE's CONNECT handler (the peer proved its identity with its
//! certificate) and the same-node shortcut (the peer is a pod of this
//! agent, which knows its identity) both go through here, so that one pod
//! is admitted by the same decisions whichever way its peer came.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    PodCtx,
    conn::{ConnRecord, Outcome, Peer, Security},
    connect_in_pod,
};
use crate::{
    identity::Identity,
    inpod::sockets::Source,
    state::{Conn, Decision, Service, Store, Workload},
};

/// A peer with a known identity, reaching a pod of this agent.
pub struct Authenticated {
    /// The destination pod.
    pub pod: Arc<PodCtx>,
    /// The destination pod's workload and identity.
    pub local: Arc<Workload>,
    pub local_id: Identity,
    /// The peer's address (its pod's) and identity.
    pub peer: SocketAddr,
    pub peer_id: Identity,
}

/// Why a delivery was refused; the refusal is already counted and recorded.
#[derive(Debug)]
pub enum Refused {
    /// The destination's policy says no.
    Denied(String),
    /// The app did not accept the connection.
    ConnectFailed(String),
}

/// What the connection is and how it came, for its record.
pub struct Request<'a> {
    /// The pod address and app port to deliver to.
    pub dst: SocketAddr,
    /// The Service the client addressed (one that selects the pod).
    pub service: Option<&'a Service>,
    /// Over HBONE: the address the tunnel reached (port 15008).
    pub tunnel: Option<SocketAddr>,
    pub security: Security,
    /// The `mesh_proxy_connections` listener label its outcome counts under.
    pub counter: &'static str,
}

impl Authenticated {
    /// The connection as policy sees it.
    pub fn conn<'a>(&'a self, store: &'a Store, dst: SocketAddr) -> Conn<'a> {
        Conn {
            src_ip: self.peer.ip(),
            src_identity: Some(&self.peer_id),
            dst: store.workload_by_ip(dst.ip()).unwrap_or(&self.local),
            dst_ip: dst.ip(),
            dst_port: dst.port(),
        }
    }

    pub fn authorize(&self, store: &Store, dst: SocketAddr) -> Decision {
        store.authorize(&self.conn(store, dst))
    }

    /// Opens the destination's record, checks policy and connects to the
    /// app from the peer's address. The snapshot is let go before the
    /// connect: the caller watches for revocation with the current one.
    pub async fn admit(
        &self,
        store: Arc<Store>,
        req: Request<'_>,
    ) -> Result<(ConnRecord, TcpStream), Refused> {
        let metrics = &self.pod.shared.metrics;
        let src = Peer {
            addr: Some(self.peer),
            workload: store.workload_by_ip(self.peer.ip()).cloned(),
            identity: Some(self.peer_id.clone()),
        };
        let dst_peer = Peer {
            addr: Some(req.dst),
            workload: Some(self.local.clone()),
            identity: Some(self.local_id.clone()),
        };
        let mut rec = ConnRecord::new(
            metrics.clone(),
            "inbound",
            "destination",
            src,
            dst_peer,
            req.service,
            req.security,
        );
        if let Some(tunnel) = req.tunnel {
            rec.set_hbone(tunnel, req.dst);
        }
        let conn = self.conn(&store, req.dst);
        metrics.dry_run(req.counter, store.dry_run(&conn));
        if let Decision::Deny { reason, .. } = store.authorize(&conn) {
            metrics.connection(req.counter, "denied");
            rec.close("DENY", Outcome::error(reason.clone()));
            return Err(Refused::Denied(reason));
        }
        drop(store);
        let source = Source::LocalApp {
            client: self.peer.ip(),
        };
        match connect_in_pod(&self.pod, req.dst, source).await {
            Ok(app) => {
                metrics.connection(req.counter, "forwarded");
                Ok((rec, app))
            }
            Err(e) => {
                let error = format!("connect to app: {e}");
                metrics.connection(req.counter, "connect_failed");
                rec.close("CONNECT", Outcome::error(error.clone()));
                Err(Refused::ConnectFailed(error))
            }
        }
    }
}
