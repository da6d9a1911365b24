//! Inbound plaintext (15006): connections the capture handed to the pod's
//! listener (sk_lookup, or an iptables REDIRECT). The capture gives the
//! destination the client asked for, which must be one of the pod's own
//! addresses; the app is reached there from the agent's own source
//! address. Refused under PeerAuthentication STRICT; otherwise authorized
//! with no peer identity.

use std::{net::SocketAddr, sync::Arc};

use mesh_common::AGENT_PORTS;
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    PodCtx, WhenBulk,
    conn::{ConnRecord, Outcome, Peer, Security},
    connect_in_pod, finish, revoked_by_policy, splice,
};
use crate::{
    inpod::sockets::Source,
    state::{Conn, Decision, MtlsMode, Store},
};

/// Whether plaintext from `peer` to `dst` may go on under this snapshot.
fn admit(store: &Store, pod: &PodCtx, peer: SocketAddr, dst: SocketAddr) -> Result<(), String> {
    let Some(local) = pod.workload_at(store, dst.ip()) else {
        if pod.shared.configured {
            // Mesh-wide policy could apply to it; without knowing the pod,
            // refuse rather than guess.
            return Err("this pod is not in the configuration; plaintext refused".into());
        }
        // No configuration at all: capture only, plain pass-through.
        return Ok(());
    };
    if store.mtls_mode(&local, dst.port()) == MtlsMode::Strict {
        return Err("PeerAuthentication STRICT: plaintext is refused".into());
    }
    match store.authorize(&Conn {
        src_ip: peer.ip(),
        src_identity: None,
        dst: &local,
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    }) {
        Decision::Allow => Ok(()),
        Decision::Deny { reason, .. } => Err(reason),
    }
}

pub async fn serve(pod: Arc<PodCtx>, client: TcpStream, peer: SocketAddr) {
    let metrics = pod.shared.metrics.clone();
    let dst = pod.shared.capture.inbound_dst(&client);
    // A direct connection to the capture port itself (forwarding it would
    // loop back into this listener), or one to an address that is not the
    // pod's (a loopback-only service reached from outside).
    let Some(dst) =
        dst.filter(|d| !AGENT_PORTS.contains(&d.port()) && pod.addresses.contains(&d.ip()))
    else {
        metrics.connection("inbound_plaintext", "refused");
        debug!(%peer, ?dst, "not a connection to the pod's own address and app port; closing");
        return;
    };
    let store = pod.shared.store();
    let local = pod.workload_at(&store, dst.ip());
    if let Some(local) = &local {
        metrics.dry_run(
            "inbound_plaintext",
            store.dry_run(&Conn {
                src_ip: peer.ip(),
                src_identity: None,
                dst: local,
                dst_ip: dst.ip(),
                dst_port: dst.port(),
            }),
        );
    }
    let trust_domain = pod.shared.certs.trust_domain();
    let rec = ConnRecord::new(
        metrics.clone(),
        "inbound",
        "destination",
        Peer {
            addr: Some(peer),
            workload: store.workload_by_ip(peer.ip()).cloned(),
            identity: None,
        },
        Peer {
            addr: Some(dst),
            identity: local.as_ref().map(|w| w.identity(trust_domain)),
            workload: local,
        },
        None,
        Security::Unknown,
    );
    if let Err(reason) = admit(&store, &pod, peer, dst) {
        metrics.connection("inbound_plaintext", "denied");
        debug!(%dst, reason, "plaintext connection refused");
        rec.close("DENY", Outcome::error(reason));
        return;
    }
    // Not held for the connection's life; the policy watch reads the
    // current snapshot on each change.
    drop(store);
    let mut app = match connect_in_pod(&pod, dst, Source::LocalApp { client: peer.ip() }).await {
        Ok(s) => s,
        Err(e) => {
            metrics.connection("inbound_plaintext", "connect_failed");
            debug!(%dst, error = %e, "connect to app failed");
            rec.close("CONNECT", Outcome::error(format!("connect to app: {e}")));
            return;
        }
    };
    metrics.connection("inbound_plaintext", "forwarded");
    let mut rec = rec;
    let mut client = rec.counted(client);
    let check = pod.clone();
    let revoked = revoked_by_policy(pod.shared.store.clone(), move |s| {
        admit(s, &check, peer, dst).is_ok()
    });
    let end = splice(&mut client, &mut app, revoked, WhenBulk::Stay).await;
    finish(rec, &client, end, &pod);
}
