//! The userspace data path for captured connections. For now a plain TCP
//! pass-through in both directions; HBONE (mTLS) replaces the outbound leg
//! for meshed destinations.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};
use tracing::{Instrument as _, debug, info_span, warn};

use crate::{
    capture::Capture,
    inpod::{
        netns::Netns,
        sockets::{PodListener, Role, connect_socket},
    },
    metrics::Metrics,
};

mod inbound;
mod outbound;

/// Copy buffer per direction: large enough for bulk transfers in few syscalls.
const COPY_BUF: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener's connections need: the pod they belong to and the
/// agent-wide parts.
#[derive(Debug)]
pub struct PodCtx {
    pub name: String,
    pub netns: Netns,
    pub capture: Arc<Capture>,
    pub metrics: Arc<Metrics>,
}

/// Serves one capture listener until the task is aborted.
pub fn spawn_listener(pod: Arc<PodCtx>, listener: PodListener) -> io::Result<JoinHandle<()>> {
    let role = listener.role;
    let l = TcpListener::from_std(listener.socket)?;
    Ok(tokio::spawn(async move {
        loop {
            let (stream, peer) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    warn!(pod = %pod.name, listener = role.as_str(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let pod = pod.clone();
            match role {
                Role::Outbound => {
                    let span = info_span!("outbound", pod = %pod.name, client = %peer);
                    tokio::spawn(outbound::serve(pod, stream, peer).instrument(span));
                }
                Role::InboundPlaintext => {
                    let span = info_span!("inbound_plaintext", pod = %pod.name, client = %peer);
                    tokio::spawn(inbound::serve(pod, stream, peer).instrument(span));
                }
                Role::Hbone => {
                    // mTLS termination is not built yet: refuse rather than
                    // pretend. The port is held so that nothing else binds it.
                    pod.metrics.connection("hbone", "refused");
                    debug!(pod = %pod.name, client = %peer, "HBONE not implemented yet; closing");
                    drop(stream);
                }
            }
        }
    }))
}

/// Connects from inside the pod's namespace with the agent's mark.
async fn connect_in_pod(
    pod: &PodCtx,
    dst: SocketAddr,
    to_local_app: bool,
) -> io::Result<TcpStream> {
    let std = pod
        .netns
        .run(|| connect_socket(dst, to_local_app))
        .map_err(io::Error::other)??;
    let socket = TcpSocket::from_std_stream(std);
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// Splices both directions until both are closed; half-close is passed on.
/// Returns (bytes client->server, bytes server->client).
async fn splice(mut client: TcpStream, mut server: TcpStream) -> io::Result<(u64, u64)> {
    let r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, COPY_BUF, COPY_BUF)
        .await;
    let _ = client.shutdown().await;
    let _ = server.shutdown().await;
    r
}
