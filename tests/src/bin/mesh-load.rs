//! The benchmark's HTTP/1.1 server and load generator, run inside pods.
//!
//! `http-serve ADDR [BODY_BYTES]`: answers every request on a keep-alive
//! connection with `200` and BODY_BYTES (default 1024) of body.
//!
//! `load ADDR CONNS RATE SECONDS [new-conn]`: CONNS connections send `GET`s
//! for SECONDS. RATE > 0 is an open loop at RATE requests/s in all (each
//! request has a due time; its latency runs from that time, so a stall is
//! not hidden by the requests it delays); RATE = 0 is a closed loop as fast
//! as answers come (saturation). With `new-conn`, every request opens its own
//! connection (connect, one request, close), closed loop. Prints one JSON
//! line: requests, errors, seconds, rps and latency p50/p90/p99/max in µs.
//!
//! `soak RUN CLIENT SECONDS req=ADDR@RATE... hold=ADDR@COUNT...`: the
//! soak's traffic (see `mesh_tests::soak`), one JSON line per request and
//! per long-lived connection.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

const REQUEST: &[u8] = b"GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("http-serve") => {
            let addr = args[1].parse().expect("http-serve ADDR");
            let body = args.get(2).map_or(1024, |b| b.parse().expect("BODY_BYTES"));
            serve(addr, body);
        }
        Some("load") => {
            let addr: SocketAddr = args[1].parse().expect("load ADDR");
            let conns: usize = args[2].parse().expect("CONNS");
            let rate: f64 = args[3].parse().expect("RATE");
            let seconds: f64 = args[4].parse().expect("SECONDS");
            let new_conn = args.get(5).is_some_and(|a| a == "new-conn");
            println!("{}", load(addr, conns.max(1), rate, seconds, new_conn));
        }
        Some("soak") => match mesh_tests::soak::Plan::parse(&args[1..]) {
            Ok(plan) => mesh_tests::soak::run(&plan),
            Err(e) => {
                eprintln!("mesh-load soak: {e}");
                std::process::exit(64);
            }
        },
        _ => {
            eprintln!(
                "usage: mesh-load http-serve ADDR [BODY_BYTES] | load ADDR CONNS RATE SECONDS [new-conn] | soak RUN CLIENT SECONDS SPEC..."
            );
            std::process::exit(64);
        }
    }
}

fn serve(addr: SocketAddr, body: usize) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    println!("listening {addr}");
    std::io::stdout().flush().expect("stdout");
    let mut response = format!("HTTP/1.1 200 OK\r\nContent-Length: {body}\r\n\r\n").into_bytes();
    response.extend((0..body).map(|i| b'a' + (i % 26) as u8));
    let response: &'static [u8] = response.leak();
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut w = s.try_clone().expect("clone socket");
            let mut r = BufReader::new(s);
            let mut line = String::new();
            loop {
                // Headers up to the empty line; GETs carry no body.
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == "\r\n" => {
                        if w.write_all(response).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                }
            }
        });
    }
}

/// One connection's client side.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Client {
            w: s.try_clone()?,
            r: BufReader::new(s),
        })
    }

    /// Sends one request and reads the whole response.
    fn request(&mut self, body: &mut Vec<u8>) -> std::io::Result<()> {
        self.w.write_all(REQUEST)?;
        let mut line = String::new();
        let mut length = None;
        loop {
            line.clear();
            if self.r.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line
                .to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
            {
                length = v.parse::<usize>().ok();
            }
        }
        let n = length.ok_or(std::io::ErrorKind::InvalidData)?;
        body.resize(n, 0);
        self.r.read_exact(body)
    }
}

struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

fn load(addr: SocketAddr, conns: usize, rate: f64, seconds: f64, new_conn: bool) -> String {
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(seconds);
    let workers: Vec<_> = (0..conns)
        .map(|k| {
            std::thread::spawn(move || {
                let mut t = Tally {
                    latencies_us: Vec::new(),
                    errors: 0,
                    first_error: None,
                };
                let mut body = Vec::new();
                let mut client: Option<Client> = None;
                let interval = (rate > 0.0).then(|| Duration::from_secs_f64(conns as f64 / rate));
                // Worker k's requests are due at start + (k/conns + i) * interval.
                let mut due =
                    start + interval.map_or(Duration::ZERO, |i| i.mul_f64(k as f64 / conns as f64));
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let began = if interval.is_some() {
                        due
                    } else {
                        Instant::now()
                    };
                    let ok = (|| -> std::io::Result<()> {
                        if new_conn || client.is_none() {
                            client = Some(Client::connect(addr)?);
                        }
                        client.as_mut().expect("connected").request(&mut body)?;
                        if new_conn {
                            client = None;
                        }
                        Ok(())
                    })();
                    match ok {
                        Ok(()) => {
                            let us = began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                            t.latencies_us.push(us);
                        }
                        Err(e) => {
                            t.errors += 1;
                            t.first_error.get_or_insert_with(|| e.to_string());
                            client = None;
                        }
                    }
                    due = match interval {
                        Some(i) => due + i,
                        None => Instant::now(),
                    };
                }
                t
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for w in workers {
        let t = w.join().expect("load worker");
        all.extend(t.latencies_us);
        errors += t.errors;
        first_error = first_error.or(t.first_error);
    }
    let elapsed = end.saturating_duration_since(start).as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> u32 {
        if all.is_empty() {
            return 0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i]
    };
    serde_json::json!({
        "requests": all.len(),
        "errors": errors,
        "seconds": elapsed,
        "rps": all.len() as f64 / elapsed,
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "max_us": all.last().copied().unwrap_or(0),
        "first_error": first_error,
    })
    .to_string()
}
