//! A pod cannot knock its node's mesh over: thousands of idle or slow
//! connections against a pod's 15008 and the node agent's 15020 and 15021
//! are held within the listeners' limits and closed after their timeouts,
//! while a meshed call, a readiness probe and a scrape are still served,
//! and the agent's memory stays bounded.

use std::{
    fs,
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use mesh_tests::{
    Testbed, Value,
    mesh::{namespace_yaml, pod_yaml, with_netns},
    metrics::{series_sum, series_sum_or_absent},
};

const APP_PORT: u16 = 8080;
/// Connections opened against each port.
const FLOOD: usize = 5_000;
/// Of those against 15020 and 15021, how many send a request a byte at a
/// time instead of staying idle.
const SLOW: usize = 20;
/// The agent's timeouts: HBONE handshake and HTTP request head.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The agent's resident memory under the flood stays under this bound
/// (about 15 MiB idle; 5,000 connections held with a 64 KiB buffer each
/// would be over 300).
const RSS_BOUND_MIB: f64 = 64.0;

fn status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .with_context(|| format!("{field} of {pid}"))
}

fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Opens `n` non-blocking connections to each of `dsts` from inside the
/// network namespace at `netns` (the sockets stay in it), without waiting
/// for any handshake: a flood, not a client.
fn flood(netns: &Path, dsts: &[SocketAddrV4], n: usize) -> anyhow::Result<Vec<Vec<TcpStream>>> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, connect, socket};
    let ns = fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<Vec<Vec<TcpStream>>> {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            let mut all = Vec::new();
            for dst in dsts {
                let mut conns = Vec::with_capacity(n);
                for _ in 0..n {
                    let fd = socket(
                        AddressFamily::Inet,
                        SockType::Stream,
                        SockFlag::SOCK_NONBLOCK,
                        None,
                    )?;
                    match connect(fd.as_raw_fd(), &SockaddrIn::from(*dst)) {
                        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
                        Err(e) => anyhow::bail!("connect {dst}: {e}"),
                    }
                    conns.push(TcpStream::from(fd));
                }
                all.push(conns);
            }
            Ok(all)
        })
        .join()
        .expect("flood thread")
    })
}

/// Whether the agent has closed this connection (end of stream or reset);
/// a connection still open, or still connecting, reads WouldBlock.
fn closed_by_peer(mut c: &TcpStream) -> bool {
    let mut b = [0u8; 64];
    match c.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected),
    }
}

fn raise_own_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

fn ok(r: &Value) -> bool {
    r["ok"] == Value::Bool(true)
}

#[test]
fn a_flood_of_idle_and_slow_connections_leaves_the_agent_serving_with_bounded_memory()
-> anyhow::Result<()> {
    // 15,000 sockets of our own, plus the testbed's.
    raise_own_nofile();
    let mut tb = Testbed::new(1)?;
    let client = tb.add_pod(0, "client")?;
    let server = tb.add_pod(0, "server")?;
    // Not in the mesh: any pod on the node, reaching the node's addresses.
    let attacker = tb.add_pod(0, "attacker")?;
    tb.serve(&server, SocketAddr::new(IpAddr::from([0u8; 16]), APP_PORT))?;
    tb.write_config(&[
        namespace_yaml("shop", true),
        with_netns(&pod_yaml(&client, 0, "shop", "client", &[]), &client),
        with_netns(&pod_yaml(&server, 0, "shop", "server", &[]), &server),
    ])?;
    let args = tb.mesh_args()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_agent(0, &argv)?;
    let start = Instant::now();
    while tb.agent(0).pod_names()?.len() < 2 {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "pods not enrolled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dst = SocketAddr::new(server.ip4, APP_PORT);
    let r = tb.connect(&client, dst, 10_000)?;
    ensure!(ok(&r), "meshed call before the flood failed: {r}");
    let pid = tb.agent(0).pid();
    let rss_before = status_kib(pid, "VmRSS")? / 1024.0;
    let fds_before = open_fds(pid)?;

    // The pod's gateway is the node's address on the pod bridge.
    let IpAddr::V4(server4) = server.ip4 else {
        unreachable!("pods have IPv4")
    };
    let node = Ipv4Addr::new(10, 1, 0, 1);
    let targets = [
        SocketAddrV4::new(server4, 15008),
        SocketAddrV4::new(node, 15020),
        SocketAddrV4::new(node, 15021),
    ];
    let flooded_at = Instant::now();
    let mut floods = flood(&attacker.netns_path(), &targets, FLOOD)?;
    let opened = flooded_at.elapsed();

    // Slow clients: a request head a byte at a time, every 250 ms.
    let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n";
    let slow_writer = {
        let mut slow: Vec<TcpStream> = floods[1..]
            .iter()
            .flat_map(|conns| conns[..SLOW].iter().map(TcpStream::try_clone))
            .collect::<Result<_, _>>()?;
        std::thread::spawn(move || {
            for i in 0..head.len().min(40) {
                for c in &mut slow {
                    let _ = c.write(&head[i..=i]);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };

    // Meanwhile, once the agent is turning the flood away on every port
    // (past the attacker's share), real traffic: a meshed call, a probe,
    // a scrape.
    mesh_tests::converge(
        "the flood refused past its share on 15008, 15020 and 15021",
        Duration::from_secs(10),
        || {
            let page = tb.agent(0).metrics()?;
            let mut refusing = true;
            for direction in ["hbone", "metrics", "ready"] {
                let refused = series_sum_or_absent(
                    &page,
                    "mesh_proxy_connections_total",
                    &[("direction", direction), ("result", "peer_limit")],
                )?;
                refusing &= refused > 0.0;
            }
            Ok(refusing)
        },
    )?;
    let t = Instant::now();
    let r = tb.connect(&client, dst, 10_000)?;
    let call_latency = t.elapsed();
    ensure!(ok(&r), "meshed call during the flood failed: {r}");
    let t = Instant::now();
    let (ready, _) = tb.agent(0).request(15021, "GET", "/healthz/ready", None)?;
    let probe_latency = t.elapsed();
    ensure!(ready == 200, "readiness during the flood answered {ready}");
    let (scrape, _) = tb.agent(0).request(15020, "GET", "/metrics", None)?;
    ensure!(scrape == 200, "scrape during the flood answered {scrape}");
    let rss_during = status_kib(pid, "VmRSS")? / 1024.0;
    let fds_during = open_fds(pid)?;

    // Every flood connection is closed by the agent: at once past the
    // attacker's share, at the timeout within it (the slow ones too).
    let mut all_closed_after = None;
    // Connections the kernel queued late (a full accept queue drops the
    // client's ACK, and it comes back with the SYN-ACK retransmissions)
    // reach the agent up to ~15 s late.
    while flooded_at.elapsed() < TIMEOUT * 4 {
        let open: usize = floods
            .iter_mut()
            .map(|conns| {
                conns.retain(|c| !closed_by_peer(c));
                conns.len()
            })
            .sum();
        if open == 0 {
            all_closed_after = Some(flooded_at.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    slow_writer.join().expect("slow writer");
    let rss_peak = status_kib(pid, "VmHWM")? / 1024.0;
    let page = tb.agent(0).metrics()?;
    let count = |direction: &str, result: &str| {
        series_sum(
            &page,
            "mesh_proxy_connections_total",
            &[("direction", direction), ("result", result)],
        )
    };
    let hbone_timeouts = count("hbone", "handshake_timeout")?;
    let hbone_refused = count("hbone", "peer_limit")?;
    let metrics_timeouts = count("metrics", "header_timeout")?;
    let metrics_refused = count("metrics", "peer_limit")?;
    let ready_timeouts = count("ready", "header_timeout")?;
    let ready_refused = count("ready", "peer_limit")?;
    println!(
        "flood: {FLOOD} connections to each of {targets:?} opened in {opened:?}, all closed by the agent after {all_closed_after:?}\n\
         meshed call during the flood: {call_latency:?}; readiness probe: {probe_latency:?}\n\
         agent: VmRSS {rss_before:.1} MiB before, {rss_during:.1} during, VmHWM {rss_peak:.1}; fds {fds_before} before, {fds_during} during\n\
         15008: {hbone_timeouts} handshake timeouts, {hbone_refused} refused past the peer's share\n\
         15020: {metrics_timeouts} header timeouts, {metrics_refused} refused; 15021: {ready_timeouts} header timeouts, {ready_refused} refused"
    );

    ensure!(
        call_latency < Duration::from_secs(2),
        "meshed call took {call_latency:?}"
    );
    ensure!(
        probe_latency < Duration::from_secs(2),
        "readiness took {probe_latency:?}"
    );
    ensure!(
        rss_peak < RSS_BOUND_MIB,
        "agent peak RSS {rss_peak:.1} MiB over {RSS_BOUND_MIB} MiB"
    );
    // 256 for the pod's HBONE share, 16 each on 15020 and 15021, and what
    // the agent held before.
    ensure!(
        fds_during <= fds_before + 256 + 16 + 16 + 16,
        "agent held {fds_during} descriptors (before: {fds_before})"
    );
    ensure!(
        all_closed_after.is_some(),
        "flood connections still open {:?} after they were opened",
        TIMEOUT * 4
    );
    // Each flood connection was either held and timed out, or refused.
    ensure!(
        (1.0..=256.0).contains(&hbone_timeouts) && hbone_timeouts + hbone_refused == FLOOD as f64,
        "15008: {hbone_timeouts} timeouts + {hbone_refused} refused != {FLOOD}"
    );
    for (port, timeouts, refused) in [
        (15020, metrics_timeouts, metrics_refused),
        (15021, ready_timeouts, ready_refused),
    ] {
        ensure!(
            (1.0..=16.0).contains(&timeouts) && timeouts + refused == FLOOD as f64,
            "{port}: {timeouts} header timeouts + {refused} refused != {FLOOD}"
        );
    }
    // And it serves as before.
    let r = tb.connect(&client, dst, 10_000)?;
    ensure!(ok(&r), "meshed call after the flood failed: {r}");
    Ok(())
}
