//! Connection shards (`--runtime sharded`, the default): one
//! single-threaded runtime per core, each serving whole connections. An
//! accepted connection is served by the shard with the fewest open
//! connections (of equals, the one that accepted it) and stays there:
//! its relay, its HBONE stream and the pooled HBONE connection it opens
//! (each shard pools its own) all run on that one thread, so the bytes
//! of a connection cross no thread on their way through the agent. On
//! one work-stealing runtime (`--runtime shared`) a connection's task and
//! its HBONE connection's task may run on two threads, and each hand-off
//! between them wakes the other one. Separate connections still use
//! every core.
//!
//! A pod's outbound and inbound plaintext listeners have one socket per
//! shard (an `SO_REUSEPORT` group, [`accepting`], [`spawn_accepting`]):
//! each shard accepts its share of new connections and serves them
//! itself, unless another shard serves fewer connections, which then
//! gets the connection. A new connection thus mostly wakes one thread,
//! not an accepting one and then a serving one. HBONE listeners, the
//! control plane and the admin servers stay on the main runtime.
//!
//! Between two pods of one node, the destination's side of an HBONE
//! connection is served on the shard that dialled it ([`dialling`],
//! [`dialled_by`]): the call runs on one thread end to end, as it would
//! on each of two nodes. Once such a connection proves bulk (megabytes
//! within a fraction of a second) while another shard is mostly idle and
//! far less busy than its own, the destination's side (the HBONE
//! connection, then the splices of its bulk streams) moves there
//! ([`ask_to_move`], [`move_to`], [`Rehome`]), so that the call uses two
//! cores as it would across two nodes; when the bulk ends it moves back,
//! and request/response calls between two pods of one node run on one
//! thread again.

use std::{
    cell::Cell,
    collections::HashMap,
    future::{Future, poll_fn},
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, runtime::Handle};

use crate::sync::LockExt as _;

/// The process's shards, once [`install`]ed.
static INSTALLED: OnceLock<Shards> = OnceLock::new();

thread_local! {
    /// The shard this thread runs, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
    /// Where the task being polled asked to move ([`ask_to_move`]).
    static MOVE_ASKED: Cell<Option<MoveTo>> = const { Cell::new(None) };
}

struct Shard {
    handle: Handle,
    /// Connections it serves now.
    open: AtomicUsize,
    load: Mutex<Load>,
}

/// A shard's busy time, sampled.
struct Load {
    since: Instant,
    /// The runtime's busy time at `since`.
    busy: Duration,
    /// Busy share of the last window that ended recently.
    share: Option<f64>,
}

/// The shortest window a shard's load is measured over.
const LOAD_WINDOW: Duration = Duration::from_millis(100);
/// A shard busy less than this share of its time is mostly idle.
const MOSTLY_IDLE: f64 = 0.5;
/// A task moves to a mostly idle shard only from one busier by this much.
const BUSIER_BY: f64 = 0.3;
/// A shard serves what it accepts itself while it serves at most this
/// many connections more than the shard with the fewest. None: with
/// one, eight bulk streams between two pods of one node could end five
/// to three on two shards, which cost them 4-20% of their throughput in
/// A/B runs; with none they end as even as when every connection went
/// to the shard with the fewest.
const ACCEPTED_SLACK: usize = 0;
/// At most this many shards accept for one listener; the others take
/// connections handed over by these.
const MAX_ACCEPTING: usize = 8;

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
                .on_thread_park(crate::log_out::parked)
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
                load: Mutex::new(Load {
                    since: Instant::now(),
                    busy: Duration::ZERO,
                    share: None,
                }),
            });
        }
        Ok(Shards { shards })
    }

    fn open(&self, i: usize) -> usize {
        self.shards[i].open.load(Ordering::Relaxed)
    }

    /// `prefer` if it names a shard; else `here`, the shard that accepted
    /// the connection, unless it serves more than [`ACCEPTED_SLACK`]
    /// connections over the one with the fewest; else that one (the first
    /// of equals).
    fn pick(&self, prefer: Option<usize>, here: Option<usize>) -> usize {
        if let Some(i) = prefer.filter(|&i| i < self.shards.len()) {
            return i;
        }
        let fewest = (0..self.shards.len())
            .min_by_key(|&i| self.open(i))
            .expect("at least one shard");
        match here {
            Some(h) if self.open(h) <= self.open(fewest) + ACCEPTED_SLACK => h,
            _ => fewest,
        }
    }

    /// Serves `stream` on shard `prefer`, or on the one [`Shards::pick`]
    /// picks. On the calling shard it is spawned as it is; to another
    /// shard, the stream leaves the calling runtime's reactor for that
    /// shard's.
    fn spawn<F, Fut>(&'static self, stream: TcpStream, prefer: Option<usize>, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let here = current();
        let i = self.pick(prefer, here);
        if here == Some(i) {
            let open = Some(self.count_on(i));
            tokio::spawn(Movable {
                shards: self,
                inner: Box::pin(serve(stream)),
                open,
            });
            return;
        }
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "handing a connection to its shard; closed");
                return;
            }
        };
        let open = self.count_on(i);
        self.shards[i].handle.spawn(Movable {
            shards: self,
            inner: Box::pin(async move {
                match TcpStream::from_std(std) {
                    Ok(stream) => serve(stream).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "registering a connection on its shard; closed")
                    }
                }
            }),
            open: Some(open),
        });
    }

    /// Counts a connection on shard `i` while the result lives.
    fn count_on(&'static self, i: usize) -> Open {
        let open = &self.shards[i].open;
        open.fetch_add(1, Ordering::Relaxed);
        Open(open)
    }

    /// The share of its time shard `i` was busy over its last window (at
    /// least [`LOAD_WINDOW`] long), if that ended within a few windows: a
    /// shard asked after a long pause answers from the next window on.
    fn busy_share(&self, i: usize) -> Option<f64> {
        let shard = &self.shards[i];
        let busy = shard.handle.metrics().worker_total_busy_duration(0);
        let now = Instant::now();
        let mut load = shard.load.locked();
        let window = now - load.since;
        if window >= LOAD_WINDOW {
            load.share = (window < 4 * LOAD_WINDOW)
                .then(|| busy.saturating_sub(load.busy).as_secs_f64() / window.as_secs_f64());
            load.since = now;
            load.busy = busy;
        }
        load.share
    }

    /// The idlest shard, if it is mostly idle and shard `here` is busier
    /// by [`BUSIER_BY`]. Every shard's load is sampled at each ask, so
    /// that after a pause all of them answer from the next window on (the
    /// first ask after a pause answers nothing).
    fn idler_than(&self, here: usize) -> Option<usize> {
        let busy = self.busy_share(here);
        let idlest = (0..self.shards.len())
            .filter(|&i| i != here)
            .filter_map(|i| Some((i, self.busy_share(i)?)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let busy = busy?;
        idlest
            .filter(|&(_, share)| share < MOSTLY_IDLE && share + BUSIER_BY <= busy)
            .map(|(i, _)| i)
    }

    /// The shard a task on `here` that asks for `to` goes to, if any.
    fn target(&self, here: usize, to: MoveTo) -> Option<usize> {
        match to {
            MoveTo::Idler => self.idler_than(here),
            MoveTo::Shard(i) => (i < self.shards.len() && i != here).then_some(i),
        }
    }
}

/// A shard's task that may move to another shard between two polls: when
/// the future it runs asks to ([`ask_to_move`]) and returns pending, the
/// future is spawned on the shard asked for (its connection's count with
/// it) and this task ends.
struct Movable {
    shards: &'static Shards,
    inner: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// A connection's count on the shard it runs on.
    open: Option<Open>,
}

impl Future for Movable {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        MOVE_ASKED.set(None);
        let polled = self.inner.as_mut().poll(cx);
        let Some(asked) = MOVE_ASKED.take().filter(|_| polled.is_pending()) else {
            return polled;
        };
        let shards = self.shards;
        let Some(to) = current().and_then(|here| shards.target(here, asked)) else {
            // Nowhere to go: the task, which woke itself, stays.
            return Poll::Pending;
        };
        let inner = std::mem::replace(&mut self.inner, Box::pin(async {}));
        let open = self.open.take().map(|_here| shards.count_on(to));
        shards.shards[to].handle.spawn(Movable {
            shards,
            inner,
            open,
        });
        Poll::Ready(())
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

/// How many sockets a listener whose connections shards accept opens:
/// one per shard, up to [`MAX_ACCEPTING`]; one without shards.
pub fn accepting() -> usize {
    INSTALLED
        .get()
        .map_or(1, |shards| shards.shards.len().min(MAX_ACCEPTING))
}

/// The shard the next listener's first socket is accepted on
/// ([`spawn_accepting`] takes it modulo the shards): listeners take turns,
/// so that with more shards than [`MAX_ACCEPTING`] every shard accepts for
/// some.
pub fn first_accepting() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(accepting(), Ordering::Relaxed)
}

/// Registers `listener` with shard `i` (modulo the shards) and runs
/// `accept` on it there; with no shard named, or without shards, on the
/// current runtime.
pub fn spawn_accepting<F, Fut>(
    i: Option<usize>,
    listener: std::net::TcpListener,
    accept: F,
) -> io::Result<tokio::task::JoinHandle<()>>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (Some(i), Some(shards)) = (i, INSTALLED.get()) else {
        return Ok(tokio::spawn(accept(tokio::net::TcpListener::from_std(
            listener,
        )?)));
    };
    let handle = &shards.shards[i % shards.shards.len()].handle;
    let listener = {
        let _shard = handle.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    Ok(handle.spawn(accept(listener)))
}

/// Serves an accepted connection: on a shard (`prefer`, else the one that
/// accepted it or the least busy) when the process has them, else as a
/// task of the current runtime.
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

/// Spawns `task` on the current runtime; on a shard, as a task that may
/// move ([`move_to`]).
pub fn spawn_task<F>(task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match INSTALLED.get() {
        Some(shards) if current().is_some() => {
            tokio::spawn(Movable {
                shards,
                inner: Box::pin(task),
                open: None,
            });
        }
        _ => {
            tokio::spawn(task);
        }
    }
}

/// Where a task asks to move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveTo {
    /// A shard that is mostly idle and far less busy than the task's own
    /// (each as busy as its last tenth of a second or so).
    Idler,
    /// That shard.
    Shard(usize),
}

/// Moves the calling task as [`ask_to_move`] asks; true once it runs on
/// another shard. What the task registered with its shard's reactor
/// (sockets, timers) still works from the new one, through the old
/// shard's reactor, until it is [`Rehome`]d.
pub async fn move_to(to: MoveTo) -> bool {
    let Some(here) = current() else {
        return false;
    };
    let mut asked = false;
    poll_fn(|cx| {
        if asked {
            return Poll::Ready(());
        }
        asked = true;
        ask_to_move(cx, to);
        Poll::Pending
    })
    .await;
    current() != Some(here)
}

/// Asks, from within a poll of a task, that the task move to `to` once
/// that poll returns pending: only a task of a shard that may move
/// ([`spawn_connection`], [`spawn_task`]) moves, and only where `to`
/// names another shard. The task is woken, to be polled again where it
/// lands, or where it is if it stays.
pub fn ask_to_move(cx: &Context<'_>, to: MoveTo) {
    MOVE_ASKED.set(Some(to));
    cx.waker().wake_by_ref();
}

/// The shard a connection's task runs on, for the tasks that follow it
/// (the splices of its streams).
#[derive(Debug)]
pub struct Place(AtomicUsize);

impl Place {
    const NONE: usize = usize::MAX;

    pub fn new(shard: Option<usize>) -> Self {
        Place(AtomicUsize::new(shard.unwrap_or(Self::NONE)))
    }

    pub fn get(&self) -> Option<usize> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&i| i != Self::NONE)
    }

    pub fn set(&self, shard: Option<usize>) {
        self.0.store(shard.unwrap_or(Self::NONE), Ordering::Relaxed);
    }
}

/// A stream that registers itself with the current shard's reactor again
/// after its task moved ([`move_to`]), so that its readiness reaches the
/// thread that now polls it without passing through the old one.
pub trait Rehome {
    fn rehome(&mut self) -> io::Result<()>;
}

impl Rehome for TcpStream {
    /// The same socket under a second descriptor, registered here; the
    /// first descriptor leaves the old reactor and is closed.
    fn rehome(&mut self) -> io::Result<()> {
        let std: std::net::TcpStream = socket2::SockRef::from(&*self).try_clone()?.into();
        let here = TcpStream::from_std(std)?;
        drop(std::mem::replace(self, here));
        Ok(())
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
    async fn a_shard_serves_what_it_accepts_unless_another_serves_fewer() {
        let shards = leaked(2);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // Each connection is handed over as if shard `on` had accepted it.
        let accepted_on = |on: usize, stream| {
            shards.shards[on]
                .handle
                .spawn(async move { placed(shards, stream, None).await })
        };
        let mut held = Vec::new();
        // (accepted on, served on): a shard serves what it accepts while
        // no other serves fewer, else the one that does gets it.
        let steps = [(0, 0), (0, 1), (0, 0), (1, 1), (1, 1), (1, 0), (0, 0)];
        for (on, served) in steps {
            let (client, accepted) = pair(&l).await;
            let (shard, done) = accepted_on(on, accepted).await.unwrap();
            assert_eq!(
                shard,
                Some(served),
                "accepted on shard {on} with {} and {} open",
                shards.open(0),
                shards.open(1)
            );
            held.push((client, done));
        }
        assert_eq!((shards.open(0), shards.open(1)), (4, 3));
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

    #[tokio::test]
    async fn a_task_that_asks_moves_to_the_other_shard_with_its_count_and_socket() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let shards = leaked(2);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, accepted) = pair(&l).await;
        let (report_tx, report) = tokio::sync::oneshot::channel();
        shards.spawn(accepted, Some(0), move |mut stream| async move {
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await.unwrap();
            let before = current();
            let moved = move_to(MoveTo::Shard(1)).await;
            stream.rehome().unwrap();
            let _ = report_tx.send((before, moved, current()));
            // Echoes what comes after the move, from the new shard.
            stream.read_exact(&mut buf).await.unwrap();
            stream.write_all(&buf).await.unwrap();
            let _ = stream.read(&mut buf).await;
        });
        client.write_all(b"first").await.unwrap();
        let (before, moved, after) = report.await.unwrap();
        assert_eq!((before, moved, after), (Some(0), true, Some(1)));
        let open = |i: usize| shards.shards[i].open.load(Ordering::Relaxed);
        assert_eq!((open(0), open(1)), (0, 1), "its count moved with it");
        client.write_all(b"after").await.unwrap();
        let mut echo = [0u8; 5];
        client.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"after");
        drop(client);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while open(1) != 0 {
            assert!(tokio::time::Instant::now() < deadline, "count not released");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_task_goes_where_it_asks_only_if_that_is_another_shard() {
        // Not on a shard.
        assert!(!move_to(MoveTo::Shard(0)).await);
        // On a shard but not as a task that may move.
        let two = leaked(2);
        let (tx, rx) = tokio::sync::oneshot::channel();
        two.shards[1].handle.spawn(async move {
            let _ = tx.send((move_to(MoveTo::Shard(0)).await, current()));
        });
        assert_eq!(rx.await.unwrap(), (false, Some(1)));
        // Tasks that may move, each asking in turn; `placed` keeps them open.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ask = |stream: TcpStream, on: usize, to: MoveTo| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            two.spawn(stream, Some(on), move |mut stream| async move {
                let moved = move_to(to).await;
                let _ = tx.send((moved, current()));
                use tokio::io::AsyncReadExt as _;
                let _ = stream.read(&mut [0; 1]).await;
            });
            rx
        };
        let (_c1, s1) = pair(&l).await;
        let (_c2, s2) = pair(&l).await;
        let r = ask(s1, 0, MoveTo::Shard(0)).await.unwrap();
        assert_eq!(r, (false, Some(0)), "its own shard");
        let r = ask(s2, 0, MoveTo::Shard(1)).await.unwrap();
        assert_eq!(r, (true, Some(1)));
        // The only shard: nowhere to go.
        let one = leaked(1);
        let (_c4, s4) = pair(&l).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        one.spawn(s4, None, move |_stream| async move {
            let _ = tx.send((move_to(MoveTo::Idler).await, current()));
        });
        assert_eq!(rx.await.unwrap(), (false, Some(0)));
    }

    /// Asks for [`MoveTo::Idler`] every 20 ms for `within` (shard 0, as a
    /// task that may move, while `spin` keeps it busy or not): where it
    /// ends up.
    async fn idler_from_shard_0(spin: bool, within: std::time::Duration) -> Option<usize> {
        use std::time::{Duration, Instant};
        let shards = leaked(2);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_client, accepted) = pair(&l).await;
        let until = Instant::now() + within;
        if spin {
            shards.shards[0].handle.spawn(async move {
                while Instant::now() < until {
                    // Busy, as far as the runtime can tell.
                    std::thread::sleep(Duration::from_millis(10));
                    tokio::task::yield_now().await;
                }
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        shards.spawn(accepted, Some(0), move |_stream| async move {
            while Instant::now() < until && !move_to(MoveTo::Idler).await {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tx.send(current());
        });
        rx.await.unwrap()
    }

    /// After a pause, the first ask samples every shard, so the next one
    /// a window later can tell the busy shard from the idle one (once,
    /// only the asker's shard was sampled and the others a window later,
    /// too late for a bulk call shorter than a few windows).
    #[tokio::test]
    async fn after_a_pause_the_second_ask_a_window_later_answers() {
        use std::time::{Duration, Instant};
        let shards = leaked(2);
        tokio::time::sleep(5 * LOAD_WINDOW).await;
        let until = Instant::now() + 3 * LOAD_WINDOW;
        shards.shards[0].handle.spawn(async move {
            while Instant::now() < until {
                // Busy for 10 ms, then parked for a moment: the runtime
                // counts its busy time when it parks.
                std::thread::sleep(Duration::from_millis(10));
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        });
        assert_eq!(shards.idler_than(0), None, "the pause: nothing known");
        tokio::time::sleep(LOAD_WINDOW + LOAD_WINDOW / 2).await;
        assert_eq!(shards.idler_than(0), Some(1));
    }

    #[tokio::test]
    async fn a_task_on_a_saturated_shard_moves_to_an_idle_one_and_only_then() {
        let secs = std::time::Duration::from_secs;
        assert_eq!(idler_from_shard_0(true, secs(3)).await, Some(1));
        assert_eq!(
            idler_from_shard_0(false, secs(1)).await,
            Some(0),
            "both idle: stays"
        );
    }
}
