//! HBONE: TCP carried as an HTTP/2 `CONNECT` stream over mutual TLS 1.3 on
//! port 15008, as Istio's ambient mesh speaks it. The client side pools one
//! HTTP/2 connection per (source identity, destination identity, address);
//! the server side terminates TLS in the destination pod, checks who the
//! peer is and what it asks for, authorizes, and splices to the app.

use std::time::Duration;

mod client;
mod headers;
mod io;
mod server;
mod stream;

pub use client::{Caller, FIRST_BYTES, HboneError, Pool, Tunnel};
#[cfg(test)]
pub use headers::{Baggage, traceparent};
#[cfg(test)]
use server::serve_streams;
#[cfg(test)]
pub use server::{Authority, connect_authority, connect_destination, forwarded_host};
#[cfg(test)]
mod tests;
pub use server::{Connect, accept, answer, serve, serve_connects};
pub use stream::H2Stream;

/// A TLS handshake must finish in this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An accepted connection's TLS handshake must finish in this time: until
/// it does, the peer is nobody, and thousands of such peers must not hold
/// the pod's connection slots for long. The same bound, again, for its
/// HTTP/2 preface and SETTINGS once verified.
const ACCEPT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A verified peer's request heads (HPACK-decoded) stay under this size.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/2 flow-control windows: large, so that one stream can fill a fast
/// link without waiting for WINDOW_UPDATEs. The connection's window bounds
/// what the agent holds received and not yet delivered (its memory peak,
/// with 8 busy streams): 1.5 stream windows, so that one stream still
/// fills it alone, streams together share it, and a stream whose
/// destination stops reading leaves room for the others.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONN_WINDOW: u32 = 6 * 1024 * 1024;
/// The largest HTTP/2 frame each side accepts: a 16 KiB default frame
/// costs one round of stream and flow-control bookkeeping per TLS record.
const MAX_FRAME: u32 = 256 * 1024;
use io::Buffered;

/// Streams one HTTP/2 connection carries at once (each is one tunnelled
/// TCP connection), as ztunnel allows them: the server advertises 200 (a
/// client past it waits); the client opens at most 100 on one connection,
/// or fewer if the peer allows fewer, and opens another connection beyond.
const SERVER_MAX_STREAMS: u32 = 200;
const CLIENT_MAX_STREAMS: usize = 100;
/// A CONNECT must be answered in this time (a pooled connection to a peer
/// that vanished would otherwise hold the call until TCP gives up).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A server's 200 to a CONNECT that came with the caller's first bytes
/// waits at most this long for the app's first bytes to leave with
/// (`H2Stream::answer_held`): this agent's client does not wait for it
/// before it sends what its app sends, up to [`FIRST_BYTES`]; another
/// client that does waits no longer than this.
const ANSWER_HOLD: Duration = Duration::from_millis(5);
/// HTTP/2 pings find dead peers on idle pooled connections (ztunnel's
/// clocks: a ping after 10 s without a frame, answered within 20 s).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// A pooled connection takes no new streams after this age: new calls
/// handshake again (fresh certificates, fresh policy checks of the peer),
/// old streams finish on the old connection.
const POOL_MAX_AGE: Duration = Duration::from_secs(300);

/// The client side's clocks: the constants above, shortened by tests.
#[derive(Clone, Copy, Debug)]
struct Timers {
    max_age: Duration,
    request_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            max_age: POOL_MAX_AGE,
            request_timeout: REQUEST_TIMEOUT,
            keepalive_interval: KEEPALIVE_INTERVAL,
            keepalive_timeout: KEEPALIVE_TIMEOUT,
        }
    }
}

/// Pings the peer every `interval`; returns once a ping is not answered
/// within `timeout` (a peer that vanished, or a path that went silent).
/// When the connection itself ends first, its task ends with it.
async fn keepalive(mut pings: h2::PingPong, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            // The connection is closing: it ends on its own.
            Ok(Err(_)) => std::future::pending().await,
            Err(_) => return,
        }
    }
}
