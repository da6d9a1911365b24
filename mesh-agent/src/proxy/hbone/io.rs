//! The TCP stream under HBONE's TLS, read through a buffer that exists
//! only once the handshake is done. rustls reads at most 4 KiB per call,
//! so a verified connection reads through [`TLS_READ_BUF`]; a connection
//! still in its handshake (anyone can open thousands) holds no buffer.
//! Once verified ([`verified`]), its rustls also takes a whole 64 KiB DATA
//! frame with its header in one write.
//!
//! The destination's side of an HBONE connection from a pod of this node
//! runs on the shard of the client's side (see `crate::shards`). While it
//! reads bulk ([`Buffered::move_when_bulk`]) its task moves to a mostly
//! idle shard (if one is far less busy than its own), and back once the
//! bulk ends; the socket follows it from reactor to reactor.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::{
    proxy::relay::BulkWatch,
    shards::{self, MoveTo, Place, Rehome as _},
};

/// A connection moved for bulk goes back once it has read no bulk for
/// this long.
const BULK_ENDED: Duration = Duration::from_millis(250);

/// Read buffer of a verified connection: four or more reads per 16 KiB
/// record become one read per 64 KiB.
const TLS_READ_BUF: usize = 64 * 1024;
/// What rustls holds to send on a verified connection (see [`verified`]):
/// a 64 KiB DATA frame, its header and what HTTP/2 queued before it
/// (small frames), no more: past it a writer waits for the socket, as
/// with rustls's default of 64 KiB.
const TLS_WRITE_LIMIT: usize = 64 * 1024 + 1024;

pub struct Buffered {
    tcp: TcpStream,
    /// Empty until [`Buffered::buffer`].
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    /// The shard whose reactor `tcp` is registered with, from
    /// [`Buffered::buffer`] on.
    home: Option<usize>,
    /// Bytes read from `tcp`.
    read: u64,
    /// Set by [`Buffered::move_when_bulk`].
    mover: Option<Box<Mover>>,
}

/// What a connection that moves for bulk keeps.
struct Mover {
    watch: BulkWatch,
    /// The shard it was placed on, and goes back to.
    origin: Option<usize>,
    /// Where it runs, for the splices of its streams.
    place: Arc<Place>,
    /// When it last read bulk.
    last_bulk: Instant,
}

impl Buffered {
    /// Unbuffered until [`Buffered::buffer`] is called.
    pub fn new(tcp: TcpStream) -> Self {
        Buffered {
            tcp,
            buf: Box::default(),
            pos: 0,
            filled: 0,
            home: None,
            read: 0,
            mover: None,
        }
    }

    /// Reads through [`TLS_READ_BUF`] from now on.
    fn buffer(&mut self) {
        if self.buf.is_empty() {
            self.buf = vec![0; TLS_READ_BUF].into_boxed_slice();
        }
        self.home = shards::current();
    }

    /// From now on (the connection set up, on the shard it was placed
    /// on), its task asks to move to a mostly idle shard while it reads
    /// bulk, and back once the bulk ends; `place` says where it runs.
    pub fn move_when_bulk(&mut self, place: Arc<Place>) {
        place.set(self.home);
        self.mover = Some(Box::new(Mover {
            watch: BulkWatch::new(),
            origin: self.home,
            place,
            last_bulk: Instant::now(),
        }));
    }

    /// Registers the socket with this shard's reactor if its task moved.
    fn follow(&mut self) -> io::Result<()> {
        let here = shards::current();
        if self.home.is_some() && self.home != here {
            self.tcp.rehome()?;
            self.home = here;
            if let Some(m) = &self.mover {
                m.place.set(here);
                if here == m.origin {
                    tracing::debug!(
                        shard = here,
                        "HBONE connection from a pod of this node: bulk ended, back on its first shard"
                    );
                } else {
                    tracing::debug!(
                        shard = here,
                        "bulk HBONE connection from a pod of this node moved to another shard"
                    );
                }
            }
        }
        Ok(())
    }

    /// Counts `n` bytes read; a connection that may move asks to, as
    /// their rate tells.
    fn count(&mut self, n: usize, cx: &Context<'_>) {
        self.read += n as u64;
        let Some(m) = &mut self.mover else {
            return;
        };
        if m.watch.bulk_at(self.read) {
            m.last_bulk = Instant::now();
            if self.home == m.origin {
                shards::ask_to_move(cx, MoveTo::Idler);
            }
        } else if self.home != m.origin
            && m.last_bulk.elapsed() >= BULK_ENDED
            && let Some(origin) = m.origin
        {
            shards::ask_to_move(cx, MoveTo::Shard(origin));
        }
    }
}

/// Readies a connection whose peer is verified for data: it reads
/// through [`TLS_READ_BUF`], and rustls takes a 64 KiB DATA frame and its
/// header, handed over together, in one write ([`TLS_WRITE_LIMIT`]); with
/// its default of 64 KiB they went as two writes, the second a TLS record
/// of 9 bytes in a TCP segment of its own.
pub fn verified<D>(tcp: &mut Buffered, tls: &mut rustls::ConnectionCommon<D>) {
    tcp.buffer();
    tls.set_buffer_limit(Some(TLS_WRITE_LIMIT));
}

impl AsyncRead for Buffered {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.follow()?;
        if this.pos == this.filled {
            // Nothing held: a caller reading at least a buffer's worth (or
            // any read before the handshake ends) goes straight to the socket.
            if this.buf.is_empty() || out.remaining() >= this.buf.len() {
                let before = out.filled().len();
                std::task::ready!(Pin::new(&mut this.tcp).poll_read(cx, out))?;
                this.count(out.filled().len() - before, cx);
                return Poll::Ready(Ok(()));
            }
            let mut fill = ReadBuf::new(&mut this.buf);
            std::task::ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut fill))?;
            this.pos = 0;
            this.filled = fill.filled().len();
            this.count(this.filled, cx);
        }
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Buffered {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.follow()?;
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.follow()?;
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn reads_the_same_bytes_before_and_after_buffering() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(&sent).await.unwrap();
        });
        let mut b = Buffered::new(TcpStream::connect(addr).await.unwrap());
        let mut got = vec![0u8; 1000];
        b.read_exact(&mut got).await.unwrap();
        assert!(b.buf.is_empty(), "no buffer before the handshake ends");
        b.buffer(); // as `verified` does
        // Small reads (as rustls makes) and large ones, mixed.
        let mut small = [0u8; 4096];
        while got.len() < data.len() {
            let n = b.read(&mut small[..(got.len() % 4000) + 1]).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, data);
    }
}
