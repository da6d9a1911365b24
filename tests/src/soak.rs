//! The soak's traffic (`mesh-load soak`, run in a client pod by `cargo
//! xtask soak`): short request/response connections at a fixed rate to each
//! target, and long-lived connections that exchange a line at a fixed
//! interval and reconnect when broken. Every byte the client sends carries a
//! marker naming the run, the client and the request, so that a packet
//! capture can tell which request a plaintext byte belonged to. Each request
//! and each long-lived connection ends in one [`Event`], printed as a JSON
//! line. Everything is bounded: the run's length, the requests in flight,
//! every connect and read.

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// What every marker starts with; the run's id follows.
pub const MARKER: &str = "MESHSOAK-";
/// Bounds on one exchange: connect, then each read or write.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Requests in flight per target: past it a due request is not sent and is
/// counted as `saturated` (the client, not the mesh, was behind).
const MAX_IN_FLIGHT: usize = 64;
/// A long-lived connection's exchange interval and reconnect delay.
pub const HOLD_INTERVAL: Duration = Duration::from_millis(250);
/// Bytes of payload in a request (the marker repeated).
const PAYLOAD: usize = 512;

/// A request, or one long-lived connection from its connect to its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Request,
    Hold,
}

impl Kind {
    /// The letter before the id in a marker.
    fn tag(self) -> char {
        match self {
            Kind::Request => 'r',
            Kind::Hold => 'h',
        }
    }
}

/// How an exchange ended, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Outcome {
    /// Every byte echoed intact (for a long-lived connection: it lasted
    /// until the end of the run).
    Ok,
    /// The connect was refused (nothing listening: an agent down).
    Refused,
    ConnectTimeout,
    /// Another connect error.
    ConnectError,
    /// Closed before the server's first line: the mesh closed the
    /// connection unserved (a policy's denial, no upstream).
    Closed,
    /// Reset by the peer (or a broken pipe) after connecting.
    Reset,
    /// No answer within the read timeout.
    Timeout,
    /// Closed in the middle of the echo.
    Truncated,
    /// The echo differs from what was sent.
    WrongBytes,
    /// Not sent: the client had too many requests in flight.
    Saturated,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "connection refused",
            Outcome::ConnectTimeout => "connect timeout",
            Outcome::ConnectError => "connect error",
            Outcome::Closed => "closed before the server answered",
            Outcome::Reset => "reset",
            Outcome::Timeout => "timeout",
            Outcome::Truncated => "truncated echo",
            Outcome::WrongBytes => "wrong bytes",
            Outcome::Saturated => "not sent (client saturated)",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The run (and phase) its marker names.
    pub run: String,
    pub client: String,
    pub dst: SocketAddr,
    pub kind: Kind,
    /// The request's sequence number, or the long-lived connection's
    /// attempt number (per client): what its marker names.
    pub id: u64,
    /// Unix time (s) when it was due (request) or connected (hold).
    pub start: f64,
    /// Unix time (s) when it ended: answered, failed, or broke.
    pub end: f64,
    pub outcome: Outcome,
    /// Whether the client's socket was connected to the agent's outbound
    /// listener (`127.0.0.1:15001`): captured. None when it did not connect.
    pub captured: Option<bool>,
    /// Lines a long-lived connection exchanged (0 for a request).
    pub exchanges: u64,
    pub detail: String,
}

/// The marker of one request or long-lived connection.
pub fn marker(run: &str, client: &str, kind: Kind, id: u64) -> String {
    format!("{MARKER}{run}:{client}:{}{id}:", kind.tag())
}

/// Reads a marker back: (run, client, kind, id) from the bytes after
/// [`MARKER`], up to its closing colon.
pub fn parse_marker(rest: &[u8]) -> Option<(String, String, Kind, u64)> {
    let text = std::str::from_utf8(&rest[..rest.len().min(80)])
        .ok()
        .or_else(|| {
            // Cut inside a multi-byte character: the marker is ASCII anyway.
            let ascii = rest.iter().take(80).take_while(|b| b.is_ascii()).count();
            std::str::from_utf8(&rest[..ascii]).ok()
        })?;
    let mut parts = text.splitn(4, ':');
    let run = parts.next()?;
    let client = parts.next()?;
    let tagged = parts.next()?;
    parts.next()?; // the closing colon was there
    let kind = match tagged.chars().next()? {
        'r' => Kind::Request,
        'h' => Kind::Hold,
        _ => return None,
    };
    let id = tagged[1..].parse().ok()?;
    (!run.is_empty() && !client.is_empty()).then(|| (run.to_owned(), client.to_owned(), kind, id))
}

/// What one `mesh-load soak` process does.
pub struct Plan {
    pub run: String,
    pub client: String,
    pub seconds: f64,
    /// Short requests: target and requests per second.
    pub requests: Vec<(SocketAddr, f64)>,
    /// Long-lived connections: target and how many.
    pub holds: Vec<(SocketAddr, usize)>,
}

impl Plan {
    /// `RUN CLIENT SECONDS SPEC...` with SPEC `req=ADDR@RATE` or
    /// `hold=ADDR@COUNT`.
    pub fn parse(args: &[String]) -> Result<Plan, String> {
        let [run, client, seconds, specs @ ..] = args else {
            return Err("soak RUN CLIENT SECONDS req=ADDR@RATE|hold=ADDR@COUNT...".into());
        };
        let mut plan = Plan {
            run: run.clone(),
            client: client.clone(),
            seconds: seconds
                .parse()
                .map_err(|e| format!("SECONDS {seconds}: {e}"))?,
            requests: Vec::new(),
            holds: Vec::new(),
        };
        for spec in specs {
            let bad = |e: &dyn std::fmt::Display| format!("{spec}: {e}");
            let (what, rest) = spec.split_once('=').ok_or_else(|| bad(&"no ="))?;
            let (addr, n) = rest.split_once('@').ok_or_else(|| bad(&"no @"))?;
            let addr: SocketAddr = addr.parse().map_err(|e| bad(&e))?;
            match what {
                "req" => plan.requests.push((addr, n.parse().map_err(|e| bad(&e))?)),
                "hold" => plan.holds.push((addr, n.parse().map_err(|e| bad(&e))?)),
                _ => return Err(bad(&"req= or hold=")),
            }
        }
        Ok(plan)
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs the plan, printing each event as it ends; returns when every
/// request and connection is done.
pub fn run(plan: &Plan) {
    let (tx, rx) = mpsc::channel::<Event>();
    let end = Instant::now() + Duration::from_secs_f64(plan.seconds);
    // One count per kind for the whole client: a marker names one request.
    let ids = Arc::new(AtomicU64::new(0));
    let attempts = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for &(dst, rate) in &plan.requests {
        let (tx, run, client) = (tx.clone(), plan.run.clone(), plan.client.clone());
        let ids = ids.clone();
        workers.push(std::thread::spawn(move || {
            requests(&run, &client, dst, rate, end, &ids, &tx);
        }));
    }
    for &(dst, count) in &plan.holds {
        for _ in 0..count {
            let (tx, run, client) = (tx.clone(), plan.run.clone(), plan.client.clone());
            let attempts = attempts.clone();
            workers.push(std::thread::spawn(move || {
                hold(&run, &client, dst, end, &attempts, &tx);
            }));
        }
    }
    drop(tx);
    let mut out = std::io::stdout().lock();
    for event in rx {
        let line = serde_json::to_string(&event).expect("serializable");
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    for w in workers {
        let _ = w.join();
    }
}

/// Requests to `dst` at `rate` per second until `end`, each on its own
/// connection and thread, numbered by `ids`.
fn requests(
    run: &str,
    client: &str,
    dst: SocketAddr,
    rate: f64,
    end: Instant,
    ids: &AtomicU64,
    tx: &mpsc::Sender<Event>,
) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    let start = Instant::now();
    for seq in 0u64.. {
        let due = start + interval.mul_f64(seq as f64);
        if due >= end {
            break;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let marker = marker(run, client, Kind::Request, id);
        let event = |at: f64| Event {
            run: run.to_owned(),
            client: client.to_owned(),
            dst,
            kind: Kind::Request,
            id,
            start: at,
            end: at,
            outcome: Outcome::Ok,
            captured: None,
            exchanges: 0,
            detail: String::new(),
        };
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            let at = now();
            let _ = tx.send(Event {
                outcome: Outcome::Saturated,
                ..event(at)
            });
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, in_flight) = (tx.clone(), in_flight.clone());
        let mut ev = event(now());
        threads.push(std::thread::spawn(move || {
            let (outcome, captured, detail) = exchange(dst, &marker);
            ev.end = now();
            ev.outcome = outcome;
            ev.captured = captured;
            ev.detail = detail;
            let _ = tx.send(ev);
            in_flight.fetch_sub(1, Ordering::Relaxed);
        }));
        threads.retain(|t| !t.is_finished());
    }
    for t in threads {
        let _ = t.join();
    }
}

/// The marker repeated to [`PAYLOAD`] bytes: any packet holding a few dozen
/// bytes of it holds a whole marker.
fn payload(marker: &str) -> Vec<u8> {
    marker
        .bytes()
        .cycle()
        .take(PAYLOAD.max(marker.len()))
        .collect()
}

/// The agent's outbound listener in each enrolled pod (loopback).
const AGENT_OUTBOUND_PORT: u16 = 15001;

/// Whether a connected socket is the agent's outbound listener in the pod:
/// the connection was captured (the agent does not hide it from
/// `getpeername` yet).
fn is_captured(s: &TcpStream) -> Option<bool> {
    let peer = s.peer_addr().ok()?;
    Some(peer.ip().is_loopback() && peer.port() == AGENT_OUTBOUND_PORT)
}

fn connect(dst: SocketAddr) -> Result<TcpStream, (Outcome, String)> {
    let s = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT).map_err(|e| {
        let outcome = match e.kind() {
            ErrorKind::ConnectionRefused => Outcome::Refused,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::ConnectTimeout,
            _ => Outcome::ConnectError,
        };
        (outcome, e.to_string())
    })?;
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    Ok(s)
}

/// An I/O error after the connect, by cause.
fn io_outcome(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Timeout,
        ErrorKind::UnexpectedEof => Outcome::Truncated,
        _ => Outcome::Reset,
    }
}

/// One request: connect, read the server's greeting line, send the
/// payload, half-close, read the echo to its end and compare.
fn exchange(dst: SocketAddr, marker: &str) -> (Outcome, Option<bool>, String) {
    let s = match connect(dst) {
        Ok(s) => s,
        Err((outcome, detail)) => return (outcome, None, detail),
    };
    let captured = is_captured(&s);
    let fail = |outcome, detail: String| (outcome, captured, detail);
    let mut reader = match s.try_clone() {
        Ok(r) => BufReader::new(r),
        Err(e) => return fail(Outcome::ConnectError, e.to_string()),
    };
    let mut hello = String::new();
    match reader.read_line(&mut hello) {
        Ok(0) => return fail(Outcome::Closed, "closed before the greeting".into()),
        Ok(_) => {}
        Err(e) => return fail(io_outcome(&e), format!("reading the greeting: {e}")),
    }
    let sent = payload(marker);
    let mut w = s;
    if let Err(e) = w
        .write_all(&sent)
        .and_then(|()| w.shutdown(Shutdown::Write))
    {
        return fail(io_outcome(&e), format!("sending: {e}"));
    }
    let mut got = Vec::with_capacity(sent.len());
    if let Err(e) = reader.read_to_end(&mut got) {
        return fail(
            io_outcome(&e),
            format!("reading the echo after {} bytes: {e}", got.len()),
        );
    }
    if got.len() < sent.len() && sent.starts_with(&got) {
        return fail(
            Outcome::Truncated,
            format!("{} of {} bytes echoed", got.len(), sent.len()),
        );
    }
    if got != sent {
        return fail(
            Outcome::WrongBytes,
            format!("{} bytes echoed, not the {} sent", got.len(), sent.len()),
        );
    }
    (Outcome::Ok, captured, String::new())
}

/// One long-lived connection to `dst`, kept until `end`: a line (its
/// marker and a count) every [`HOLD_INTERVAL`], its echo checked; when it
/// breaks, an event and a new connection after the interval.
fn hold(
    run: &str,
    client: &str,
    dst: SocketAddr,
    end: Instant,
    attempts: &AtomicU64,
    tx: &mpsc::Sender<Event>,
) {
    while Instant::now() < end {
        let id = attempts.fetch_add(1, Ordering::Relaxed);
        let marker = marker(run, client, Kind::Hold, id);
        let start = now();
        let (outcome, captured, exchanges, detail) = hold_once(dst, &marker, end);
        let _ = tx.send(Event {
            run: run.to_owned(),
            client: client.to_owned(),
            dst,
            kind: Kind::Hold,
            id,
            start,
            end: now(),
            outcome,
            captured,
            exchanges,
            detail,
        });
        if outcome == Outcome::Ok {
            // It lasted until the end of the run.
            return;
        }
        std::thread::sleep(HOLD_INTERVAL);
    }
}

fn hold_once(dst: SocketAddr, marker: &str, end: Instant) -> (Outcome, Option<bool>, u64, String) {
    let s = match connect(dst) {
        Ok(s) => s,
        Err((outcome, detail)) => return (outcome, None, 0, detail),
    };
    let captured = is_captured(&s);
    let mut reader = match s.try_clone() {
        Ok(r) => BufReader::new(r),
        Err(e) => return (Outcome::ConnectError, captured, 0, e.to_string()),
    };
    let mut w = s;
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => {
            return (
                Outcome::Closed,
                captured,
                0,
                "closed before the greeting".into(),
            );
        }
        Ok(_) => {}
        Err(e) => {
            return (
                io_outcome(&e),
                captured,
                0,
                format!("reading the greeting: {e}"),
            );
        }
    }
    for n in 0u64.. {
        if Instant::now() + HOLD_INTERVAL >= end {
            let _ = w.shutdown(Shutdown::Both);
            return (Outcome::Ok, captured, n, String::new());
        }
        std::thread::sleep(HOLD_INTERVAL);
        let sent = format!("{marker} line {n} {marker}\n");
        line.clear();
        let r = w
            .write_all(sent.as_bytes())
            .and_then(|()| reader.read_line(&mut line));
        match r {
            Ok(0) => {
                return (
                    Outcome::Closed,
                    captured,
                    n,
                    format!("closed after {n} lines"),
                );
            }
            Ok(_) if line != sent => {
                return (
                    Outcome::WrongBytes,
                    captured,
                    n,
                    format!("line {n} echoed as {line:?}"),
                );
            }
            Ok(_) => {}
            Err(e) => return (io_outcome(&e), captured, n, format!("line {n}: {e}")),
        }
    }
    unreachable!("the loop returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_reads_back_from_the_payload() {
        let m = marker("ab12", "c0", Kind::Request, 4711);
        let p = payload(&m);
        let at = p
            .windows(MARKER.len())
            .position(|w| w == MARKER.as_bytes())
            .expect("marker in payload");
        assert_eq!(
            parse_marker(&p[at + MARKER.len()..]),
            Some(("ab12".to_owned(), "c0".to_owned(), Kind::Request, 4711)),
            "in {:?}",
            String::from_utf8_lossy(&p)
        );
        assert_eq!(parse_marker(b"ab12:c0:h12"), None, "cut before its colon");
        assert_eq!(parse_marker(b"ab12:c0:x12:"), None);
    }

    #[test]
    fn a_plan_reads_its_specs() {
        let args: Vec<String> = [
            "ab12",
            "c0",
            "30",
            "req=10.2.0.10:8080@20",
            "hold=10.2.0.10:8081@2",
        ]
        .map(str::to_owned)
        .into();
        let plan = Plan::parse(&args).expect("parses");
        assert_eq!(plan.requests, [("10.2.0.10:8080".parse().unwrap(), 20.0)]);
        assert_eq!(plan.holds, [("10.2.0.10:8081".parse().unwrap(), 2)]);
        assert!(Plan::parse(&args[..2]).is_err());
    }
}
