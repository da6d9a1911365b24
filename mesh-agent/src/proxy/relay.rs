//! Both directions of a connection copied by one future, each through a
//! buffer that starts at one page and grows to [`BULK_BUF`] the first time
//! a read fills it. A request/response connection (most of a mesh's, and
//! most of them idle in some pool most of the time) holds 4 KiB per
//! direction; one that moves bulk data reads 64 KiB at a time, as a fixed
//! buffer did (tokio's `copy_bidirectional_with_sizes` allocates both
//! buffers whole when the connection opens: 128 KiB per connection, on
//! each agent it crosses). A grown buffer stays grown for the connection's
//! life.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A direction's buffer until a read fills it.
pub const FIRST_BUF: usize = 4 * 1024;
/// A direction's buffer once a read filled the first one: four or more
/// reads per TLS record's worth become one.
pub const BULK_BUF: usize = 64 * 1024;

/// One direction: what was read and not yet written, and how it ended.
struct Direction {
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    /// The reader returned end of stream.
    read_done: bool,
    /// Something was written since the last flush.
    need_flush: bool,
    /// Its end (end of stream passed on as a shutdown) is done.
    done: bool,
    copied: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: Vec::new(),
            pos: 0,
            filled: 0,
            read_done: false,
            need_flush: false,
            done: false,
            copied: 0,
        }
    }

    /// Copies from `reader` to `writer` until the reader ends (then shuts
    /// the writer down) or either side is pending.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos == self.filled && !self.read_done {
                if self.buf.is_empty() {
                    self.buf = vec![0; FIRST_BUF];
                } else if self.filled == self.buf.len() && self.buf.len() < BULK_BUF {
                    // The last read filled the buffer: more is coming.
                    self.buf.resize(BULK_BUF, 0);
                }
                let mut read = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        self.pos = 0;
                        self.filled = n;
                        self.read_done = n == 0;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more for now: what was written goes out.
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.filled {
                let n = ready!(
                    writer
                        .as_mut()
                        .poll_write(cx, &self.buf[self.pos..self.filled])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                // End of stream: passed on as a half-close.
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended,
/// passing each end of stream on as a shutdown of the other side; returns
/// the bytes copied each way, or the first error.
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut relay = Relay::new(false);
    loop {
        if let Relayed::Done(r) = relay.run(a, b).await {
            return r;
        }
    }
}

/// A connection that copies at least this much within [`BULK_WITHIN`] is
/// bulk: at 320 Mbit/s or more, far beyond any request/response exchange
/// of one connection here.
pub const BULK_BYTES: u64 = 4 * 1024 * 1024;
pub const BULK_WITHIN: Duration = Duration::from_millis(100);

/// Tells a bulk connection from its byte count: each [`BULK_BYTES`] more
/// within [`BULK_WITHIN`].
pub struct BulkWatch {
    since: Instant,
    /// The count at `since`.
    mark: u64,
}

impl BulkWatch {
    pub fn new() -> Self {
        BulkWatch {
            since: Instant::now(),
            mark: 0,
        }
    }

    /// Whether the connection, `total` bytes so far, proves bulk now: true
    /// when the last [`BULK_BYTES`] came within [`BULK_WITHIN`] (a new
    /// count starts at every such step, bulk or not).
    pub fn bulk_at(&mut self, total: u64) -> bool {
        if total - self.mark < BULK_BYTES {
            return false;
        }
        let now = Instant::now();
        let bulk = now - self.since < BULK_WITHIN;
        self.since = now;
        self.mark = total;
        bulk
    }
}

/// A relay's state between calls to [`Relay::run`].
pub struct Relay {
    a_to_b: Direction,
    b_to_a: Direction,
    /// While the relay watches for bulk.
    watch: Option<BulkWatch>,
}

/// How [`Relay::run`] returned.
pub enum Relayed {
    /// Both directions ended (bytes each way), or one failed.
    Done(io::Result<(u64, u64)>),
    /// The connection proved bulk (if watched: at each [`BULK_BYTES`]
    /// within [`BULK_WITHIN`]); `run` again goes on.
    Bulk,
}

impl Relay {
    /// A relay that returns [`Relayed::Bulk`] each time the connection
    /// proves bulk, if `watch_bulk`.
    pub fn new(watch_bulk: bool) -> Self {
        Relay {
            a_to_b: Direction::new(),
            b_to_a: Direction::new(),
            watch: watch_bulk.then(BulkWatch::new),
        }
    }

    /// Copies both ways until both directions have ended, or (watched)
    /// until the connection proves bulk; nothing read and not yet written
    /// is lost between calls.
    pub async fn run<A, B>(&mut self, a: &mut A, b: &mut B) -> Relayed
    where
        A: AsyncRead + AsyncWrite + Unpin + ?Sized,
        B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        poll_fn(|cx| {
            let forth = match self
                .a_to_b
                .poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))
            {
                Poll::Ready(Err(e)) => return Poll::Ready(Relayed::Done(Err(e))),
                p => p.is_ready(),
            };
            let back = match self
                .b_to_a
                .poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))
            {
                Poll::Ready(Err(e)) => return Poll::Ready(Relayed::Done(Err(e))),
                p => p.is_ready(),
            };
            let copied = (self.a_to_b.copied, self.b_to_a.copied);
            if forth && back {
                return Poll::Ready(Relayed::Done(Ok(copied)));
            }
            if let Some(watch) = &mut self.watch
                && watch.bulk_at(copied.0 + copied.1)
            {
                return Poll::Ready(Relayed::Bulk);
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn bytes_go_both_ways_and_each_end_is_passed_on() {
        // app <-> (a) relay (b) <-> server
        let (mut app, mut a) = duplex(1 << 20);
        let (mut b, mut server) = duplex(1 << 20);
        let relay = tokio::spawn(async move { relay(&mut a, &mut b).await });
        let request: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        app.write_all(&request).await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, request, "the request arrived whole, then its end");
        // The other way still runs after the first ended (half-close).
        server.write_all(b"response").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response");
        assert_eq!(relay.await.unwrap().unwrap(), (300_000, 8));
    }

    #[tokio::test]
    async fn a_small_exchange_keeps_the_first_buffer_and_bulk_grows_it() {
        let (mut app, mut a) = duplex(1 << 20);
        let (mut b, mut server) = duplex(1 << 20);
        let mut forth = Direction::new();
        let mut back = Direction::new();
        // A 1 KiB request and its 2 KiB response.
        app.write_all(&[1; 1024]).await.unwrap();
        server.write_all(&[2; 2048]).await.unwrap();
        poll_fn(|cx| {
            assert!(
                forth
                    .poll_copy(cx, Pin::new(&mut a), Pin::new(&mut b))
                    .is_pending()
            );
            assert!(
                back.poll_copy(cx, Pin::new(&mut b), Pin::new(&mut a))
                    .is_pending()
            );
            Poll::Ready(())
        })
        .await;
        assert_eq!((forth.copied, back.copied), (1024, 2048));
        assert_eq!((forth.buf.len(), back.buf.len()), (FIRST_BUF, FIRST_BUF));
        // 200 KiB at once: the first read fills the page, the rest comes
        // 64 KiB at a time.
        app.write_all(&[3; 200 * 1024]).await.unwrap();
        poll_fn(|cx| {
            assert!(
                forth
                    .poll_copy(cx, Pin::new(&mut a), Pin::new(&mut b))
                    .is_pending()
            );
            Poll::Ready(())
        })
        .await;
        assert_eq!(forth.copied, 1024 + 200 * 1024);
        assert_eq!(forth.buf.len(), BULK_BUF);
        assert_eq!(back.buf.len(), FIRST_BUF);
        let mut got = vec![0; 1024 + 200 * 1024];
        server.read_exact(&mut got).await.unwrap();
        assert!(got[..1024].iter().all(|&x| x == 1) && got[1024..].iter().all(|&x| x == 3));
    }

    #[tokio::test]
    async fn a_slow_writer_gets_everything_in_order() {
        // A 4 KiB pipe to the server: the relay's writes are partial and
        // pending most of the time.
        let (mut app, mut a) = duplex(1 << 20);
        let (mut b, mut server) = duplex(4096);
        let relay = tokio::spawn(async move { relay(&mut a, &mut b).await });
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap();
            app
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        drop(server);
        drop(writer.await.unwrap());
        assert_eq!(relay.await.unwrap().unwrap().0, 1_000_000);
    }

    #[tokio::test]
    async fn an_error_on_either_side_ends_the_relay_with_it() {
        let (mut app, mut a) = duplex(1024);
        let (mut b, server) = duplex(1024);
        let relay = tokio::spawn(async move { relay(&mut a, &mut b).await });
        // The server side goes away: writing to it fails (broken pipe).
        drop(server);
        app.write_all(b"into nothing").await.unwrap();
        let err = relay.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    /// Runs `relay` to its end, counting the times it said bulk.
    async fn run_out(
        relay: &mut Relay,
        a: &mut tokio::io::DuplexStream,
        b: &mut tokio::io::DuplexStream,
    ) -> (usize, (u64, u64)) {
        let mut bulk = 0;
        loop {
            match relay.run(a, b).await {
                Relayed::Bulk => bulk += 1,
                Relayed::Done(r) => return (bulk, r.unwrap()),
            }
        }
    }

    #[tokio::test]
    async fn a_watched_relay_says_bulk_at_each_step_and_loses_nothing() {
        let (mut app, mut a) = duplex(1 << 20);
        let (mut b, mut server) = duplex(1 << 20);
        let len = BULK_BYTES as usize * 3;
        let data: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap();
            app
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut relay = Relay::new(true);
        let (bulk, copied) = run_out(&mut relay, &mut a, &mut b).await;
        // At 4, 8 and 12 MiB, each step fast enough here (one at least).
        assert!((1..=3).contains(&bulk), "{bulk}");
        assert_eq!(copied, (len as u64, 0));
        assert_eq!(reader.await.unwrap(), data);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn an_unwatched_or_slow_relay_never_says_bulk() {
        // Unwatched: as much as above.
        let (mut app, mut a) = duplex(1 << 20);
        let (mut b, mut server) = duplex(1 << 20);
        let len = BULK_BYTES as usize * 2;
        tokio::spawn(async move {
            app.write_all(&vec![7; len]).await.unwrap();
            app.shutdown().await.unwrap();
            app
        });
        tokio::spawn(async move { server.read_to_end(&mut Vec::new()).await });
        let (bulk, copied) = run_out(&mut Relay::new(false), &mut a, &mut b).await;
        assert_eq!((bulk, copied), (0, (len as u64, 0)));
        // Watched, but the bulk size spread over more than the window: a
        // long-lived connection, not a bulk one.
        let (mut app, mut a) = duplex(1 << 20);
        let (mut b, mut server) = duplex(1 << 20);
        let chunk = BULK_BYTES as usize / 4;
        tokio::spawn(async move {
            for _ in 0..6 {
                app.write_all(&vec![7; chunk]).await.unwrap();
                tokio::time::sleep(BULK_WITHIN / 2).await;
            }
            app.shutdown().await.unwrap();
            app
        });
        tokio::spawn(async move { server.read_to_end(&mut Vec::new()).await });
        let (bulk, copied) = run_out(&mut Relay::new(true), &mut a, &mut b).await;
        assert_eq!((bulk, copied), (0, (6 * chunk as u64, 0)));
    }
}
