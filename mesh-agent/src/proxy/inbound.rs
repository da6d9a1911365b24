//! Inbound plaintext (15006): connections the kernel handed to the pod's
//! listener with sk_lookup. The accepted socket's local address is the
//! destination the client asked for; the app is reached there from the
//! agent's own source address.

use std::{net::SocketAddr, sync::Arc};

use mesh_common::AGENT_PORTS;
use tokio::net::TcpStream;
use tracing::debug;

use super::{PodCtx, connect_in_pod, splice};

pub async fn serve(pod: Arc<PodCtx>, client: TcpStream, peer: SocketAddr) {
    let Ok(dst) = client.local_addr() else {
        return;
    };
    if AGENT_PORTS.contains(&dst.port()) {
        // A direct connection to the capture port itself: forwarding it would
        // loop back into this listener.
        pod.metrics.connection("inbound_plaintext", "refused");
        debug!(%peer, %dst, "direct connection to an agent port; closing");
        return;
    }
    let app = match connect_in_pod(&pod, dst, true).await {
        Ok(s) => s,
        Err(e) => {
            pod.metrics
                .connection("inbound_plaintext", "connect_failed");
            debug!(%dst, error = %e, "connect to app failed");
            return;
        }
    };
    pod.metrics.connection("inbound_plaintext", "forwarded");
    match splice(client, app).await {
        Ok((received, sent)) => debug!(%dst, received, sent, "inbound closed"),
        Err(e) => debug!(%dst, error = %e, "inbound ended with error"),
    }
}
