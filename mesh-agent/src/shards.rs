//! Connection shards (`--runtime sharded`, the default): one
//! single-threaded runtime per core, each serving whole connections. An
//! accepted connection is handed to the shard with the fewest open
//! connections and stays there: its relay, its HBONE stream and the
//! pooled HBONE connection it opens (each shard pools its own) all run on
//! that one thread, so the bytes of a connection cross no thread on their
//! way through the agent. On one work-stealing runtime (`--runtime
//! shared`) a connection's task and its HBONE connection's task may run
//! on two threads, and each hand-off between them wakes the other one.
//! Separate connections still use every core. The listeners' accept
//! loops, the control plane and the admin servers stay on the main
//! runtime.
//!
//! Between two pods of one node, the destination's side of an HBONE
//! connection is served on the shard that dialled it ([`dialling`],
//! [`dialled_by`]): the call runs on one thread end to end, as it would
//! on each of two nodes.

use std::{
    cell::Cell,
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{net::TcpStream, runtime::Handle};

use crate::sync::LockExt as _;

/// The process's shards, once [`install`]ed.
static INSTALLED: OnceLock<Shards> = OnceLock::new();

thread_local! {
    /// The shard this thread runs, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

struct Shard {
    handle: Handle,
    /// Connections it serves now.
    open: AtomicUsize,
}

pub struct Shards {
    shards: Vec<Shard>,
}

impl Shards {
    /// Starts `n` (at least one) shard threads; they run for the life of
    /// the process.
    pub fn start(n: usize) -> io::Result<Shards> {
        let n = n.max(1);
        let mut shards = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || {
                    CURRENT.set(Some(i));
                    rt.block_on(std::future::pending::<()>());
                })?;
            shards.push(Shard {
                handle,
                open: AtomicUsize::new(0),
            });
        }
        Ok(Shards { shards })
    }

    /// `prefer` if it names a shard, else the one with the fewest open
    /// connections (the first of equals).
    fn pick(&self, prefer: Option<usize>) -> usize {
        match prefer {
            Some(i) if i < self.shards.len() => i,
            _ => (0..self.shards.len())
                .min_by_key(|&i| self.shards[i].open.load(Ordering::Relaxed))
                .expect("at least one shard"),
        }
    }

    /// Serves `stream` on shard `prefer`, or on the least busy one. The
    /// stream leaves the calling runtime's reactor for the shard's.
    fn spawn<F, Fut>(&'static self, stream: TcpStream, prefer: Option<usize>, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "handing a connection to its shard; closed");
                return;
            }
        };
        let i = self.pick(prefer);
        let shard = &self.shards[i];
        shard.open.fetch_add(1, Ordering::Relaxed);
        let open = Open(&shard.open);
        shard.handle.spawn(async move {
            let _open = open;
            match TcpStream::from_std(std) {
                Ok(stream) => serve(stream).await,
                Err(e) => {
                    tracing::warn!(error = %e, "registering a connection on its shard; closed")
                }
            }
        });
    }
}

/// A connection's count on its shard, while it lives.
struct Open(&'static AtomicUsize);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Makes `shards` the process's (once; a later call leaves the first).
pub fn install(shards: Shards) {
    let _ = INSTALLED.set(shards);
}

/// The shard the calling thread runs, if it is one.
pub fn current() -> Option<usize> {
    CURRENT.get()
}

/// Serves an accepted connection: on a shard (`prefer`, or the least busy)
/// when the process has them, else as a task of the current runtime.
pub fn spawn_connection<F, Fut>(stream: TcpStream, prefer: Option<usize>, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    match INSTALLED.get() {
        Some(shards) => shards.spawn(stream, prefer, serve),
        None => {
            tokio::spawn(serve(stream));
        }
    }
}

/// HBONE connections a shard is dialling, by (source port, destination),
/// with the shard: if the destination is a pod of this node, its side of
/// the connection is served on the same shard.
static DIALLING: Mutex<Option<HashMap<(u16, SocketAddr), usize>>> = Mutex::new(None);

/// An entry of [`DIALLING`], removed when dropped: once the TLS handshake
/// is over, when the destination's side (if it is this agent) has long
/// accepted the connection and placed it.
pub struct Dialling((u16, SocketAddr));

impl Drop for Dialling {
    fn drop(&mut self) {
        if let Some(map) = DIALLING.locked().as_mut() {
            map.remove(&self.0);
        }
    }
}

/// Notes that the calling shard dials `dst` from source port `port` (a
/// thread that is not a shard notes nothing).
pub fn dialling(port: u16, dst: SocketAddr) -> Option<Dialling> {
    let shard = current()?;
    DIALLING
        .locked()
        .get_or_insert_with(HashMap::new)
        .insert((port, dst), shard);
    Some(Dialling((port, dst)))
}

/// The shard that is dialling the connection accepted on `local` from
/// `peer`, if a shard of this agent is.
pub fn dialled_by(peer: SocketAddr, local: SocketAddr) -> Option<usize> {
    DIALLING
        .locked()
        .as_ref()?
        .get(&(peer.port(), local))
        .copied()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::AtomicBool};

    use super::*;

    fn leaked(n: usize) -> &'static Shards {
        Box::leak(Box::new(Shards::start(n).unwrap()))
    }

    /// Serves each connection on `shards` and reports the shard it ran on.
    async fn placed(
        shards: &'static Shards,
        stream: TcpStream,
        prefer: Option<usize>,
    ) -> (Option<usize>, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        shards.spawn(stream, prefer, move |mut stream| async move {
            use tokio::io::AsyncReadExt as _;
            let _ = tx.send(current());
            // Held open (and counted) until the peer closes.
            let _ = stream.read(&mut [0; 1]).await;
            let _ = done_tx.send(());
        });
        (rx.await.unwrap(), done)
    }

    async fn pair(l: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(l.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, l.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn connections_go_to_the_least_busy_shard_or_the_one_asked_for() {
        let shards = leaked(2);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (c1, s1) = pair(&l).await;
        let (first, done1) = placed(shards, s1, None).await;
        assert_eq!(first, Some(0));
        let (c2, s2) = pair(&l).await;
        let (second, done2) = placed(shards, s2, None).await;
        assert_eq!(
            second,
            Some(1),
            "shard 0 serves one connection, shard 1 none"
        );
        let (_c3, s3) = pair(&l).await;
        let (asked, _) = placed(shards, s3, Some(1)).await;
        assert_eq!(asked, Some(1), "the shard asked for, busy or not");
        // Shard 1 now has two: the next goes to shard 0; once both of
        // shard 0's end, shard 0 is the least busy again.
        let (c4, s4) = pair(&l).await;
        let (fourth, done4) = placed(shards, s4, None).await;
        assert_eq!(fourth, Some(0));
        drop((c1, c2, c4));
        for done in [done1, done2, done4] {
            done.await.unwrap();
        }
        let (_c5, s5) = pair(&l).await;
        let (fifth, _) = placed(shards, s5, Some(7)).await;
        assert_eq!(
            fifth,
            Some(0),
            "a shard that does not exist is not asked for"
        );
    }

    #[tokio::test]
    async fn a_connection_dialled_by_a_shard_is_known_by_its_port_until_set_up() {
        let shards = leaked(2);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = l.local_addr().unwrap();
        let (noted_tx, noted) = tokio::sync::oneshot::channel();
        let (release_tx, release) = tokio::sync::oneshot::channel::<()>();
        let dialled = Arc::new(AtomicBool::new(false));
        let flag = dialled.clone();
        // Dial from shard 1, as an HBONE connection's client side does.
        shards.shards[1].handle.spawn(async move {
            let (tcp, noted) =
                crate::proxy::connect_from_noting(None, dst, |port| dialling(port, dst))
                    .await
                    .unwrap();
            flag.store(noted.is_some(), Ordering::SeqCst);
            let _ = noted_tx.send(tcp.local_addr().unwrap());
            // Set up once released: the entry goes with `noted`.
            let _ = release.await;
            drop(noted);
            tcp
        });
        let (accepted, peer) = l.accept().await.unwrap();
        let local = accepted.local_addr().unwrap();
        let from = noted.await.unwrap();
        assert_eq!(peer, from);
        assert!(dialled.load(Ordering::SeqCst));
        assert_eq!(dialled_by(peer, local), Some(1));
        // Another destination, or another port, is not that connection.
        assert_eq!(
            dialled_by(peer, SocketAddr::new(local.ip(), local.port() ^ 1)),
            None
        );
        release_tx.send(()).unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while dialled_by(peer, local).is_some() {
            assert!(tokio::time::Instant::now() < deadline, "entry not removed");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // A thread that is not a shard notes nothing.
        assert!(dialling(1, dst).is_none());
    }
}
