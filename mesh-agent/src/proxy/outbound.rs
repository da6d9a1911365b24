//! Outbound (15001): connections the kernel redirected away from their
//! destination. The original destination is looked up by (netns cookie,
//! client port, family); without one, the connection is refused, never
//! guessed.

use std::{net::SocketAddr, sync::Arc};

use mesh_common::{AF_INET, AF_INET6, ConnKey};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{PodCtx, connect_in_pod, splice};
use crate::capture::orig_dst_addr;

pub async fn serve(pod: Arc<PodCtx>, client: TcpStream, peer: SocketAddr) {
    // The key leaves out the client's source address: two clients in one pod
    // on the same port, one bound to a non-loopback source, would share it.
    // Rare enough to accept for now; the kernel side would need the source too.
    let key = ConnKey {
        netns_cookie: pod.netns.cookie().0,
        port: peer.port(),
        family: if peer.is_ipv4() { AF_INET } else { AF_INET6 },
        _pad: 0,
    };
    let Some(orig) = pod.capture.take_orig_dst(key) else {
        pod.metrics
            .connection("outbound", "no_original_destination");
        warn!("no original destination recorded for this connection; refusing it");
        return;
    };
    let dst = orig_dst_addr(&orig);
    let server = match connect_in_pod(&pod, dst, false).await {
        Ok(s) => s,
        Err(e) => {
            pod.metrics.connection("outbound", "connect_failed");
            debug!(%dst, error = %e, "connect to original destination failed");
            return;
        }
    };
    pod.metrics.connection("outbound", "forwarded");
    match splice(client, server).await {
        Ok((sent, received)) => debug!(%dst, sent, received, "outbound closed"),
        Err(e) => debug!(%dst, error = %e, "outbound ended with error"),
    }
}
