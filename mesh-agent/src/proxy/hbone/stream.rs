//! One tunnelled connection: an HTTP/2 `CONNECT` stream read and written
//! as a byte stream, straight on h2's stream handles. A write is handed to
//! h2 as one `Bytes` and leaves with the connection's next frames; a read
//! takes the DATA frames h2 received, and gives their flow-control window
//! back as the bytes are read (so a destination that stops reading stops
//! its sender, and holds at most one stream window here).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    held: Bytes,
    /// End of stream sent.
    ended: bool,
    /// The last write was bulk: the writer's task yields before the next.
    yield_next: bool,
}

/// A write at least this large is bulk: see [`H2Stream::poll_write`].
const BULK_WRITE: usize = 16 * 1024;

impl H2Stream {
    pub(super) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            held: Bytes::new(),
            ended: false,
            yield_next: false,
        }
    }
}

/// An h2 error as an I/O error: the connection's own I/O error as it was,
/// a reset or GOAWAY as `ConnectionReset` (the tunnel was cut), anything
/// else (a protocol error) as `Other`.
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.held.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.held = data,
                // End of stream.
                None => return Poll::Ready(Ok(())),
                // The peer closed its side without error (NO_ERROR, or
                // CANCEL once it has nothing more to say): an end.
                Some(Err(e)) if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
        let n = out.remaining().min(this.held.len());
        out.put_slice(&this.held[..n]);
        this.held.advance(n);
        // Read bytes reopen the window for as many.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

/// Registered with no reactor: h2's handles wake whichever task polls them.
impl crate::shards::Rehome for H2Stream {
    fn rehome(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // After a bulk write, the writer yields once: the connection's task
        // (woken by the write, next on this thread) encrypts and sends it,
        // and the writer, rescheduled behind it, is free to go on reading
        // on another thread meanwhile. Without the yield the two take
        // turns on one thread.
        if this.yield_next {
            this.yield_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        // What the peer's windows (and h2's send buffer) let through now;
        // none: wait for a WINDOW_UPDATE, or learn that the stream is gone.
        this.send.reserve_capacity(buf.len());
        let mut capacity = this.send.capacity();
        while capacity == 0 {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(now)) => capacity = now,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(self::reset(&mut this.send, cx))),
            }
        }
        let n = capacity.min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(io_error)?;
        this.yield_next = n >= BULK_WRITE;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // What was handed to h2 goes out with the connection's next write.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ended {
            this.ended = true;
            // An empty DATA frame with END_STREAM: the half-close (on a
            // stream the peer already reset, an error that says so).
            this.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Why a stream no longer takes data: its reset, if the peer sent one.
fn reset(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> io::Error {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset by the peer: {reason}"),
        ),
        Poll::Ready(Err(e)) => io_error(e),
        Poll::Pending => io::ErrorKind::BrokenPipe.into(),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

    use super::*;

    /// A client and a server h2 connection over an in-memory pipe, and one
    /// stream between them as each side sees it.
    async fn pair() -> (H2Stream, H2Stream) {
        let (c, s) = duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(hyper::Response::new(()), false)
                .unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Stream::new(send, req.into_body())
        });
        let (h2, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let mut h2 = h2.ready().await.unwrap();
        let req = hyper::Request::builder()
            .method("CONNECT")
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (resp, send) = h2.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        (H2Stream::new(send, resp.into_body()), server.await.unwrap())
    }

    #[tokio::test]
    async fn bytes_go_both_ways_past_the_windows_and_each_end_is_passed_on() {
        let (mut client, mut server) = pair().await;
        // More than the default 64 KiB windows: the reads give them back.
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data, "the bytes arrived whole, then the end");
        let mut client = writer.await.unwrap();
        // The other way still runs after the first ended (half-close).
        server.write_all(b"answer").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"answer");
        // Nothing more goes out after the end.
        assert_eq!(
            client.write(b"late").await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[tokio::test]
    async fn a_reset_from_the_peer_is_an_error_not_an_end() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        server.send.send_reset(Reason::INTERNAL_ERROR);
        let err = client.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }
}
