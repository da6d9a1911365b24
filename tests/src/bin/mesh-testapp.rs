//! The application the namespaced tests run inside pods.
//!
//! `serve ADDR`: accepts TCP connections; on each, writes one line
//! `peer=<client addr> local=<local addr> mark=<SO_MARK>` and then echoes
//! every byte until the client half-closes.
//!
//! `connect ADDR BYTES` / `repl`: connects to ADDR (for `repl`, one connection
//! per stdin line `ADDR BYTES`), sends BYTES of a pattern, half-closes, reads
//! the echo and prints one JSON line: the client's local and peer addresses as
//! the client's socket sees them, what the server saw, and whether every byte
//! came back intact.
//!
//! `hold ADDR`: one long-lived connection; each stdin line is sent and its
//! echo read back, one JSON line per exchange (or `closed` once the
//! connection is gone).
//!
//! `http-serve ADDR NAME`: an HTTP/1.1 and h2c server that answers every
//! request with what it saw (see `mesh_tests::httpapp`).
//!
//! `upgrade ADDR PATH`: an HTTP/1.1 `Upgrade: websocket` request; once
//! switched, sends a line and reads its echo (one JSON line).
//!
//! `raw ADDR FILE`: sends the file's bytes, reads what comes back for up to
//! 3 s, prints it as hex in one JSON line.
//!
//! `hbone ADDR AUTHORITY [cert=valid|none|other-root|expired] [ca=DIR]
//! [id=SPIFFE] [method=CONNECT|GET|GARBAGE] [send=BYTES]`: a hand-held HBONE
//! client (see `mesh_tests::probe`). `gen-ca DIR`: writes a CA root there.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(args[1].parse().expect("serve ADDR")),
        Some("connect") => {
            let out = connect(
                args[1].parse().expect("connect ADDR"),
                args[2].parse().expect("BYTES"),
            );
            println!("{out}");
        }
        Some("repl") => {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let line = line.expect("stdin");
                let mut it = line.split_whitespace();
                let (Some(addr), Some(n)) = (it.next(), it.next()) else {
                    continue;
                };
                let out = connect(addr.parse().expect("ADDR"), n.parse().expect("BYTES"));
                println!("{out}");
                std::io::stdout().flush().expect("stdout");
            }
        }
        Some("hold") => hold(args[1].parse().expect("hold ADDR")),
        Some("upgrade") => println!("{}", upgrade(args[1].parse().expect("ADDR"), &args[2])),
        Some("raw") => println!(
            "{}",
            raw(
                args[1].parse().expect("ADDR"),
                &std::fs::read(&args[2]).expect("FILE")
            )
        ),
        Some("http-serve") => {
            mesh_tests::httpapp::serve(args[1].parse().expect("http-serve ADDR"), args[2].clone())
        }
        Some("gen-ca") => {
            mesh_tests::probe::write_root(std::path::Path::new(&args[1])).expect("gen-ca DIR");
        }
        Some("hbone") => {
            let mut p = mesh_tests::probe::Probe {
                addr: args[1].parse().expect("hbone ADDR"),
                authority: args[2].clone(),
                identity: "spiffe://cluster.local/ns/default/sa/default".into(),
                cert: mesh_tests::probe::CertMode::Valid,
                ca_dir: ".".into(),
                method: "CONNECT".into(),
                send: 0,
                headers: Vec::new(),
            };
            for kv in &args[3..] {
                let (k, v) = kv.split_once('=').expect("key=value");
                match k {
                    "cert" => p.cert = v.parse().expect("cert mode"),
                    "ca" => p.ca_dir = v.into(),
                    "id" => p.identity = v.into(),
                    "method" => p.method = v.into(),
                    "send" => p.send = v.parse().expect("send=BYTES"),
                    "header" => {
                        let (name, value) = v.split_once(':').expect("header=NAME:VALUE");
                        p.headers.push((name.into(), value.into()));
                    }
                    _ => panic!("unknown option {k}"),
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            println!("{}", rt.block_on(mesh_tests::probe::run(p)));
        }
        _ => {
            eprintln!(
                "usage: mesh-testapp serve ADDR | connect ADDR BYTES | repl | hold ADDR | hbone ADDR AUTHORITY [k=v...] | gen-ca DIR"
            );
            std::process::exit(64);
        }
    }
}

fn serve(addr: SocketAddr) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    println!("listening {addr}");
    std::io::stdout().flush().expect("stdout");
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let mark = socket_mark(&s);
            let _ = s.write_all(format!("peer={peer} local={local} mark={mark}\n").as_bytes());
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        });
    }
}

/// The accepted socket's `SO_MARK`: the agent's local-delivery mark when the
/// agent connected on a client's behalf (the SYN's mark, kept with
/// `tcp_fwmark_accept`), 0 for a client that connected directly.
fn socket_mark(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd as _;
    let mut mark: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for a u32 option.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw mut mark).cast(),
            &mut len,
        )
    };
    if rc == 0 { mark } else { u32::MAX }
}

/// What `connect` sends: bytes that repeat every [`PERIOD`], so a byte
/// lost, added or moved shows.
const PERIOD: usize = 251;
/// The most `connect` writes or reads at once.
const CHUNK: usize = 64 * 1024;

/// The pattern from its start, long enough that any chunk of it is a
/// slice (sent and compared whole: a debug build doing it byte by byte
/// ran at ~45 MB/s, as slow as the agent's bulk threshold).
fn pattern_block() -> Vec<u8> {
    (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect()
}

/// The pattern's `n` bytes from stream offset `at`.
fn pattern(block: &[u8], at: usize, n: usize) -> &[u8] {
    let off = at % PERIOD;
    &block[off..off + n]
}

fn connect(addr: SocketAddr, bytes: usize) -> serde_json::Value {
    let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            return serde_json::json!({ "ok": false, "error": e.to_string(), "refused": e.kind() == std::io::ErrorKind::ConnectionRefused });
        }
    };
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let fail = |e: String| serde_json::json!({ "ok": false, "error": e, "refused": false, "local": local, "peer": peer });
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut hello = String::new();
    if let Err(e) = reader.read_line(&mut hello) {
        return fail(format!("reading server hello: {e}"));
    }
    let mut server_peer = String::new();
    let mut server_local = String::new();
    let mut server_mark = String::new();
    for kv in hello.split_whitespace() {
        if let Some(v) = kv.strip_prefix("peer=") {
            server_peer = v.to_owned();
        } else if let Some(v) = kv.strip_prefix("local=") {
            server_local = v.to_owned();
        } else if let Some(v) = kv.strip_prefix("mark=") {
            server_mark = v.to_owned();
        }
    }
    let mut w = s;
    let block = std::sync::Arc::new(pattern_block());
    let writer = std::thread::spawn({
        let block = block.clone();
        move || -> std::io::Result<()> {
            let mut sent = 0;
            while sent < bytes {
                let n = (bytes - sent).min(CHUNK);
                w.write_all(pattern(&block, sent, n))?;
                sent += n;
            }
            w.shutdown(Shutdown::Write)
        }
    });
    let mut got = 0usize;
    let mut intact = true;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                intact &= buf[..n] == *pattern(&block, got, n);
                got += n;
            }
            Err(e) => return fail(format!("reading echo after {got} bytes: {e}")),
        }
    }
    if let Ok(Err(e)) = writer.join() {
        return fail(format!("sending: {e}"));
    }
    serde_json::json!({
        "ok": intact && got == bytes,
        "local": local,
        "peer": peer,
        "server_peer": server_peer,
        "server_local": server_local,
        "server_mark": server_mark,
        "sent": bytes,
        "received": got,
        "intact": intact,
    })
}

fn hold(addr: SocketAddr) {
    let say = |v: serde_json::Value| {
        println!("{v}");
        std::io::stdout().flush().expect("stdout");
    };
    let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return say(serde_json::json!({ "ok": false, "error": e.to_string() })),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    let mut hello = String::new();
    if let Err(e) = reader.read_line(&mut hello) {
        return say(serde_json::json!({ "ok": false, "error": e.to_string() }));
    }
    say(serde_json::json!({ "ok": true, "hello": hello.trim_end() }));
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let mut echo = String::new();
        let r = w
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| reader.read_line(&mut echo));
        match r {
            Ok(n) if n > 0 => say(serde_json::json!({ "ok": true, "echo": echo.trim_end() })),
            Ok(_) => {
                return say(
                    serde_json::json!({ "ok": false, "closed": true, "error": "end of stream" }),
                );
            }
            Err(e) => {
                return say(
                    serde_json::json!({ "ok": false, "closed": true, "error": e.to_string() }),
                );
            }
        }
    }
}

fn upgrade(addr: SocketAddr, path: &str) -> serde_json::Value {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return serde_json::json!({"ok": false, "error": e.to_string()}),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    if let Err(e) = s.write_all(req.as_bytes()) {
        return serde_json::json!({"ok": false, "error": e.to_string()});
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let switched = head.starts_with("HTTP/1.1 101");
    let line = b"ping through the upgrade\n";
    let mut echo = vec![0u8; line.len()];
    let echoed = switched && s.write_all(line).is_ok() && s.read_exact(&mut echo).is_ok();
    serde_json::json!({
        "ok": switched && echoed && echo == line,
        "head": head,
        "echo": String::from_utf8_lossy(&echo),
    })
}

fn raw(addr: SocketAddr, bytes: &[u8]) -> serde_json::Value {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return serde_json::json!({"ok": false, "error": e.to_string()}),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({"ok": true, "hex": hex, "text": String::from_utf8_lossy(&got)})
}
