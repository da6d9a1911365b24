//! One tunnelled connection: an HTTP/2 `CONNECT` stream read and written
//! as a byte stream, straight on h2's stream handles. A write is handed to
//! h2 as one `Bytes` and leaves with the connection's next frames; a read
//! takes the DATA frames h2 received, and gives their flow-control window
//! back as the bytes are read (so a destination that stops reading stops
//! its sender, and holds at most one stream window here).

use std::{
    future::Future as _,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream, server::SendResponse};
use hyper::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::FIRST_BYTES;

pub struct H2Stream {
    send: Sending,
    recv: RecvStream,
    /// Received and not yet read.
    held: Bytes,
    /// End of stream sent.
    ended: bool,
    /// The last write was bulk: the writer's task yields before the next.
    yield_next: bool,
}

/// A stream's sending side: open, or (at a server) its 200 not sent yet.
enum Sending {
    Open(SendStream<Bytes>),
    Held(Box<Held>),
    /// The held answer could not be sent: the stream is gone.
    Failed,
}

/// A server's 200, held back to leave with what it is answered for (see
/// [`H2Stream::answer_held`]).
struct Held {
    respond: SendResponse<Bytes>,
    answer: Response<()>,
    until: Pin<Box<Sleep>>,
    /// Read from the peer so far.
    read: usize,
}

/// A write at least this large is bulk: see [`H2Stream::poll_write`].
const BULK_WRITE: usize = 16 * 1024;

impl H2Stream {
    pub(super) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send: Sending::Open(send),
            recv,
            held: Bytes::new(),
            ended: false,
            yield_next: false,
        }
    }

    /// A server's stream whose caller sent `first` with its CONNECT (as
    /// this agent's client does: [`super::Caller::first_bytes`]): the 200
    /// is sent with the first bytes written back, so that both leave in
    /// one TLS record and the caller's agent wakes once for them, not once
    /// for each. It goes sooner, alone, when either side ends (the writing
    /// side without a write, or the caller's), once [`FIRST_BYTES`] have
    /// been read from the caller (a client of this agent sends that much
    /// before it waits for the answer), after `hold` (a client that waits
    /// for it sooner), and before the reset when the stream is dropped.
    pub(super) fn answer_held(
        respond: SendResponse<Bytes>,
        answer: Response<()>,
        recv: RecvStream,
        first: Bytes,
        hold: Duration,
    ) -> Self {
        H2Stream {
            send: Sending::Held(Box::new(Held {
                respond,
                answer,
                until: Box::pin(tokio::time::sleep(hold)),
                read: 0,
            })),
            recv,
            held: first,
            ended: false,
            yield_next: false,
        }
    }

    /// Sends the held answer, if there is one.
    fn answer(&mut self) -> io::Result<()> {
        match std::mem::replace(&mut self.send, Sending::Failed) {
            Sending::Held(held) => {
                let Held {
                    mut respond,
                    answer,
                    ..
                } = *held;
                let send = respond.send_response(answer, false).map_err(io_error)?;
                self.send = Sending::Open(send);
            }
            other => self.send = other,
        }
        Ok(())
    }

    /// The sending side, the held answer sent first.
    fn sender(&mut self) -> io::Result<&mut SendStream<Bytes>> {
        self.answer()?;
        match &mut self.send {
            Sending::Open(send) => Ok(send),
            _ => Err(io::ErrorKind::BrokenPipe.into()),
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
            let Poll::Ready(data) = this.recv.poll_data(cx) else {
                // Nothing to read: a held answer's clock runs from here
                // (its timer is set on its first poll).
                if let Sending::Held(held) = &mut this.send
                    && held.until.as_mut().poll(cx).is_ready()
                {
                    this.answer()?;
                }
                return Poll::Pending;
            };
            let end = match data {
                Some(Ok(data)) => {
                    this.held = data;
                    continue;
                }
                // End of stream.
                None => Ok(()),
                // The peer closed its side without error (NO_ERROR, or
                // CANCEL once it has nothing more to say): an end.
                Some(Err(e)) if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) => {
                    Ok(())
                }
                Some(Err(e)) => Err(io_error(e)),
            };
            // The caller's side ended: it has nothing more to send, and
            // waits for a held answer no longer than its own clock allows.
            let _ = this.answer();
            return Poll::Ready(end);
        }
        let n = out.remaining().min(this.held.len());
        out.put_slice(&this.held[..n]);
        this.held.advance(n);
        // Read bytes reopen the window for as many.
        let _ = this.recv.flow_control().release_capacity(n);
        if let Sending::Held(held) = &mut this.send {
            held.read += n;
            if held.read >= FIRST_BYTES {
                this.answer()?;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// A stream dropped with its answer held (its splice ended in an error, or
/// was cut) is answered first, then reset as it would have been: a caller
/// that was never answered would take the reset for its connection's and
/// try again, and its app would get its request twice.
impl Drop for H2Stream {
    fn drop(&mut self) {
        let _ = self.answer();
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
        let send = this.sender()?;
        send.reserve_capacity(buf.len());
        let mut capacity = send.capacity();
        while capacity == 0 {
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(now)) => capacity = now,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(self::reset(send, cx))),
            }
        }
        let n = capacity.min(buf.len());
        if let Err(e) = send.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
            return Poll::Ready(Err(send_failed(send, e, cx)));
        }
        this.yield_next = n >= BULK_WRITE;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // What was handed to h2 goes out with the connection's next write.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ended {
            this.ended = true;
            // An empty DATA frame with END_STREAM: the half-close (on a
            // stream the peer already reset, an error that says so).
            let send = this.sender()?;
            if let Err(e) = send.send_data(Bytes::new(), true) {
                return Poll::Ready(Err(send_failed(send, e, cx)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Why `send_data` failed. On a stream the peer has reset, h2 says only
/// that the stream is inactive (a "user error", which an access log showed
/// as the agent's fault): the peer's reset is reported instead.
fn send_failed(send: &mut SendStream<Bytes>, e: h2::Error, cx: &mut Context<'_>) -> io::Error {
    if e.is_io() || e.reason().is_some() {
        return io_error(e);
    }
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => reset_by_peer(reason),
        _ => io_error(e),
    }
}

fn reset_by_peer(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("stream reset by the peer: {reason}"),
    )
}

/// Why a stream no longer takes data: its reset, if the peer sent one.
fn reset(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> io::Error {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => reset_by_peer(reason),
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
        let (resp, send) = connect_on(c).await;
        let resp = resp.await.unwrap();
        (H2Stream::new(send, resp.into_body()), server.await.unwrap())
    }

    /// A client h2 connection over `c`, and a CONNECT sent on it.
    async fn connect_on(
        c: tokio::io::DuplexStream,
    ) -> (h2::client::ResponseFuture, SendStream<Bytes>) {
        let (h2, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let mut h2 = h2.ready().await.unwrap();
        let req = hyper::Request::builder()
            .method("CONNECT")
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        h2.send_request(req, false).unwrap()
    }

    /// A CONNECT that came with `first`, and the server's stream for it
    /// with its 200 held for at most `hold`; the client's answer is
    /// awaited by the caller.
    async fn held_pair(
        first: &'static [u8],
        hold: Duration,
    ) -> (h2::client::ResponseFuture, SendStream<Bytes>, H2Stream) {
        let (c, s) = duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = req.into_body();
            let first = body.data().await.unwrap().unwrap();
            H2Stream::answer_held(respond, hyper::Response::new(()), body, first, hold)
        });
        let (resp, mut send) = connect_on(c).await;
        send.send_data(Bytes::from_static(first), false).unwrap();
        (resp, send, server.await.unwrap())
    }

    /// Whether `stream` has bytes to read now, without waiting.
    fn readable_now(stream: &mut H2Stream) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut buf = [0u8; 16];
        let mut read = ReadBuf::new(&mut buf);
        matches!(
            Pin::new(stream).poll_read(&mut cx, &mut read),
            Poll::Ready(Ok(())) if !read.filled().is_empty()
        )
    }

    /// A stream the peer reset says so when written to or shut down (h2
    /// itself says only that the stream is inactive, a "user error").
    #[tokio::test]
    async fn writing_to_a_stream_the_peer_reset_reports_the_reset() {
        let (mut client, server) = pair().await;
        // Its handles gone, the server's h2 resets the stream (CANCEL),
        // which ends the client's reading side once it arrives.
        drop(server);
        assert_eq!(client.read(&mut [0; 8]).await.unwrap(), 0);
        for e in [
            client.write(b"x").await.unwrap_err(),
            client.shutdown().await.unwrap_err(),
        ] {
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
            assert_eq!(
                e.to_string(),
                format!("stream reset by the peer: {}", Reason::CANCEL)
            );
        }
    }

    /// A held 200 waits for the app's first bytes and leaves with them:
    /// once the answer is in, so is what was written after it.
    #[tokio::test]
    async fn a_held_answer_leaves_with_the_first_bytes_written_back() {
        let (resp, send, mut server) = held_pair(b"GET /", Duration::from_secs(30)).await;
        let start = tokio::time::Instant::now();
        let app = tokio::spawn(async move {
            let mut got = [0u8; 5];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"GET /");
            tokio::time::sleep(Duration::from_millis(50)).await;
            server.write_all(b"200 OK").await.unwrap();
            server
        });
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("answered")
            .unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(50),
            "answered early"
        );
        let mut client = H2Stream::new(send, resp.into_body());
        assert!(
            readable_now(&mut client),
            "the answer came without the bytes"
        );
        let _server = app.await.unwrap();
    }

    /// A held 200 goes alone when the server's side ends without a write,
    /// when the client's side ends, once the server has read
    /// [`FIRST_BYTES`] (the client may wait for the answer to send more),
    /// after its hold, and before the reset when the stream is dropped
    /// (a client never answered would try its call again).
    #[tokio::test]
    async fn a_held_answer_goes_alone_at_either_end_after_enough_is_read_or_in_time() {
        let long = Duration::from_secs(30);
        let within = |resp| tokio::time::timeout(Duration::from_secs(10), resp);
        // The end of the server's side: the answer, then the end.
        let (resp, send, mut server) = held_pair(b"x", long).await;
        server.shutdown().await.unwrap();
        let resp = within(resp).await.expect("answered").unwrap();
        let mut client = H2Stream::new(send, resp.into_body());
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        // The end of the client's side, read: answered.
        let (resp, mut send, mut server) = held_pair(b"x", long).await;
        send.send_data(Bytes::new(), true).unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"x");
        within(resp).await.expect("answered").unwrap();
        // Dropped: answered, then reset.
        let (resp, _send, server) = held_pair(b"x", long).await;
        drop(server);
        let resp = within(resp).await.expect("answered").unwrap();
        assert_eq!(resp.status(), hyper::StatusCode::OK);
        let mut body = resp.into_body();
        let err = body.data().await.expect("a reset").unwrap_err();
        assert!(err.is_reset(), "{err}");
        // FIRST_BYTES read: answered with nothing written.
        static FULL: [u8; FIRST_BYTES] = [7; FIRST_BYTES];
        let (resp, _send, mut server) = held_pair(&FULL, long).await;
        let mut got = vec![0u8; FIRST_BYTES];
        server.read_exact(&mut got).await.unwrap();
        within(resp).await.expect("answered").unwrap();
        // Less, and nothing written: answered once the hold is over, as
        // long as the server's side is read.
        let hold = Duration::from_millis(50);
        let (resp, _send, mut server) = held_pair(b"x", hold).await;
        let start = tokio::time::Instant::now();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            while server.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        within(resp).await.expect("answered").unwrap();
        assert!(start.elapsed() >= hold, "answered before its hold");
        reader.abort();
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
        server.sender().unwrap().send_reset(Reason::INTERNAL_ERROR);
        let err = client.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }
}
