//! `--profile`: the agents under `perf record` during one 1-stream iperf3
//! run and during one new-connections run, each reported as where the
//! cycles go (a few categories) and the top symbols.

use std::{
    path::Path as FsPath,
    process::{Command, Stdio},
};

use anyhow::{Context as _, ensure};
use mesh_tests::{Pod, Testbed};

use super::{iperf, load, paths::Targets};

/// Categories, first match wins: (name, does a (DSO, symbol) belong to it).
type Rule = (&'static str, fn(&str, &str) -> bool);

const CATEGORIES: &[Rule] = &[
    ("crypto (AES-GCM, GHASH)", |_, s| {
        s.contains("aes_gcm") || s.contains("ghash") || s.contains("gcm_")
    }),
    ("kernel: copies to and from user space", |d, s| {
        d == KERNEL
            && [
                "_copy_to_iter",
                "_copy_from_iter",
                "__check_object_size",
                "__virt_addr_valid",
                "check_heap_object",
            ]
            .contains(&s)
    }),
    ("kernel: wakeups, scheduling, locks", |d, s| {
        d == KERNEL
            && [
                "finish_task_switch",
                "spin_unlock",
                "spin_lock",
                "futex",
                "schedule",
                "try_to_wake",
                "pv_queued",
                "ttwu",
                "ep_",
                "epoll",
                "wake",
            ]
            .iter()
            .any(|k| s.contains(k))
    }),
    ("kernel: TCP/IP, veth, bridge, syscalls", |d, _| d == KERNEL),
    ("user space: memmove/memcpy", |_, s| {
        s.contains("memmove") || s.contains("memcpy")
    }),
    ("user space: malloc/free", |d, s| {
        d.starts_with("libc")
            && ["malloc", "free", "realloc", "_int_", "tcache", "unlink"]
                .iter()
                .any(|k| s.contains(k))
    }),
    ("agent code: HTTP/2, TLS records, tokio, splice", |d, _| {
        d == AGENT
    }),
    ("other", |_, _| true),
];

const KERNEL: &str = "[kernel.kallsyms]";
/// The agent's DSO as the categories name it; a build given by path
/// (`MESH_AGENT_BIN`, any file name) is reported under it.
const AGENT: &str = "mesh-agent";

/// The file name `perf` gives the agent's binary.
fn agent_dso() -> String {
    std::env::var_os("MESH_AGENT_BIN")
        .and_then(|p| {
            FsPath::new(&p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| AGENT.to_owned())
}

/// One line of `perf report --sort dso,symbol`: percent, DSO, symbol.
fn parse_line(line: &str) -> Option<(f64, &str, &str)> {
    let mut words = line.split_whitespace();
    let pct = words.next()?.strip_suffix('%')?.parse().ok()?;
    let dso = words.next()?;
    let kind = words.next()?;
    if kind != "[.]" && kind != "[k]" {
        return None;
    }
    Some((pct, dso, words.next()?))
}

/// The category table and the top symbols of a `perf report` text.
/// `agent` is the file name of the agent's binary.
pub fn summarize(report: &str, agent: &str, top: usize) -> String {
    let mut shares = vec![0.0; CATEGORIES.len()];
    let mut symbols = Vec::new();
    for (pct, dso, sym) in report.lines().filter_map(parse_line) {
        let dso = if dso == agent { AGENT } else { dso };
        let i = CATEGORIES
            .iter()
            .position(|(_, f)| f(dso, sym))
            .unwrap_or(CATEGORIES.len() - 1);
        shares[i] += pct;
        symbols.push((pct, dso, sym));
    }
    let mut out = String::from("where the cycles go (share of the agents' samples):\n");
    for ((name, _), share) in CATEGORIES.iter().zip(&shares) {
        out.push_str(&format!("  {share:5.1}%  {name}\n"));
    }
    out.push_str(&format!("top {top} symbols:\n"));
    for (pct, dso, sym) in symbols.iter().take(top) {
        out.push_str(&format!("  {pct:5.2}%  {dso:<20} {sym}\n"));
    }
    out
}

/// Records the agents with `perf` (999 Hz, no call graphs) during a
/// 1-stream iperf3 run, then during a new-connections run (connect, one
/// request, close, as fast as they go), and writes each summary, then its
/// whole report, to `file` and to `file` with `-connections` before its
/// extension; then counts their system calls per new connection (one
/// client thread) into `file` with `-syscalls`.
pub fn record(
    tb: &Testbed,
    client: &Pod,
    targets: &Targets,
    agents: &[u32],
    seconds: f64,
    file: &FsPath,
) -> anyhow::Result<()> {
    let target = targets
        .iperf
        .context("this path carries no iperf3 traffic to profile")?;
    record_during(agents, seconds, file, || {
        let gbps = iperf(tb, client, target, 1, seconds)?;
        Ok(format!("1-stream iperf3 at {gbps:.2} Gbit/s"))
    })?;
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("profile");
    let connections = file.with_file_name(format!("{stem}-connections.txt"));
    record_during(agents, seconds, &connections, || {
        let r = load(tb, client, targets.http, 4, 0.0, seconds, true)?;
        let rate = r["rps"].as_f64().unwrap_or(f64::NAN);
        Ok(format!("new connections (1 request each) at {rate:.0}/s"))
    })?;
    let syscalls = file.with_file_name(format!("{stem}-syscalls.txt"));
    count_syscalls(agents, seconds, &syscalls, || {
        let r = load(tb, client, targets.http, 1, 0.0, seconds, true)?;
        Ok(r["requests"].as_f64().unwrap_or(f64::NAN))
    })
}

/// The agents' system calls per new connection: `perf trace -s` counts
/// them while `run` opens connections one at a time (tracing slows each
/// call, so the rate means nothing here; the count per connection does)
/// and returns how many it opened. The table goes to `file`.
fn count_syscalls(
    agents: &[u32],
    seconds: f64,
    file: &FsPath,
    run: impl FnOnce() -> anyhow::Result<f64>,
) -> anyhow::Result<()> {
    let summary = file.with_extension("trace");
    // Longer than the run: every connection's calls are in.
    let connections = perf_during(&["trace", "-s"], agents, &summary, seconds + 1.0, run)?;
    let table = per_connection(&std::fs::read_to_string(&summary)?, connections);
    println!("{table}");
    std::fs::write(file, table)?;
    println!("    system calls: {}", file.display());
    Ok(())
}

/// `perf trace -s` output (a table per thread: `name calls errors ...`)
/// summed by call over every thread, per connection, most frequent first.
pub fn per_connection(summary: &str, connections: f64) -> String {
    let mut calls: std::collections::BTreeMap<&str, u64> = Default::default();
    for line in summary.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let (Ok(n), Some(_errors)) = (n.parse::<u64>(), words.next()) else {
            continue;
        };
        if name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            *calls.entry(name).or_default() += n;
        }
    }
    let mut rows: Vec<(&str, u64)> = calls.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let total: u64 = rows.iter().map(|r| r.1).sum();
    let mut out = format!(
        "the agents' system calls per new connection ({connections:.0} connections):\n  {:6.1}  all\n",
        total as f64 / connections
    );
    for (name, n) in rows {
        out.push_str(&format!("  {:6.2}  {name}\n", n as f64 / connections));
    }
    out
}

/// `perf <command...> -p <agents> -o <out> -- sleep <seconds>` while `run`
/// runs; perf is stopped if `run` fails, and must succeed otherwise.
fn perf_during<T>(
    command: &[&str],
    agents: &[u32],
    out: &FsPath,
    seconds: f64,
    run: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let pids: Vec<String> = agents.iter().map(u32::to_string).collect();
    let mut perf = Command::new("perf")
        .args(command)
        .args(["-p", &pids.join(","), "-o"])
        .arg(out)
        .args(["--", "sleep", &format!("{seconds}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running perf (apt-get install linux-perf)")?;
    let done = match run() {
        Ok(done) => done,
        Err(e) => {
            let _ = perf.kill();
            let _ = perf.wait();
            return Err(e);
        }
    };
    let status = perf.wait_with_output()?;
    ensure!(
        status.status.success(),
        "perf {} failed: {}",
        command[0],
        String::from_utf8_lossy(&status.stderr)
    );
    Ok(done)
}

/// `perf record` of `agents` while `run` runs; `run` says what it did.
fn record_during(
    agents: &[u32],
    seconds: f64,
    file: &FsPath,
    run: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let data = file.with_extension("data");
    let pids: Vec<String> = agents.iter().map(u32::to_string).collect();
    let what = perf_during(&["record", "-F", "999"], agents, &data, seconds, run)?;
    let report = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "dso,symbol"])
        .args(["--percent-limit", "0", "-i"])
        .arg(&data)
        .output()?;
    ensure!(
        report.status.success(),
        "perf report: {}",
        String::from_utf8_lossy(&report.stderr)
    );
    let report = String::from_utf8_lossy(&report.stdout);
    let summary = summarize(&report, &agent_dso(), 25);
    println!("{summary}");
    std::fs::write(
        file,
        format!("agents {pids:?}, {what}\n{summary}\n{report}"),
    )?;
    println!("    profile: {}", file.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_calls_are_summed_over_threads_per_connection() {
        let summary = "
 Summary of events:

 tokio-rt-worker (18556), 44836 events, 22.7%

   syscall            calls  errors  total       min       avg       max       stddev
                                     (msec)    (msec)    (msec)    (msec)        (%)
   --------------- --------  ------ -------- --------- --------- ---------     ------
   writev               400      0    71.472     0.021     0.030     0.192      0.69%
   epoll_wait           100      0   752.276     0.011     0.331     4.515      3.82%

 tokio-rt-worker (18557), 44712 events, 22.7%

   syscall            calls  errors  total       min       avg       max       stddev
   --------------- --------  ------ -------- --------- --------- ---------     ------
   writev               200      0    71.472     0.021     0.030     0.192      0.69%
";
        let t = per_connection(summary, 100.0);
        assert!(t.contains("(100 connections)"), "{t}");
        assert!(t.contains("     7.0  all"), "{t}");
        assert!(t.contains("    6.00  writev\n    1.00  epoll_wait"), "{t}");
    }

    #[test]
    fn perf_lines_fall_into_their_categories() {
        let report = "\
# Overhead  Shared Object      Symbol
    10.55%  libc.so.6          [.] __memmove_avx512_unaligned_erms   -  -
     8.11%  [kernel.kallsyms]  [k] _copy_to_iter                      -  -
     7.08%  mesh-agent         [.] ring_core_0_17_14__aes_gcm_enc_update_vaes_avx2
     4.57%  [kernel.kallsyms]  [k] _raw_spin_unlock_irqrestore
     1.95%  [kernel.kallsyms]  [k] tcp_sendmsg_locked
     1.22%  libc.so.6          [.] _int_free
     0.50%  agent.bin          [.] h2::proto::streams::prioritize::Prioritize::pop_frame
     0.25%  [vdso]             [.] __vdso_clock_gettime
";
        let s = summarize(report, "agent.bin", 3);
        for line in [
            "7.1%  crypto",
            "8.1%  kernel: copies",
            "4.6%  kernel: wakeups",
            "1.9%  kernel: TCP/IP",
            "10.6%  user space: memmove",
            "1.2%  user space: malloc",
            "0.5%  agent code",
            "0.2%  other",
        ] {
            assert!(s.contains(line), "{line:?} not in\n{s}");
        }
        assert!(s.contains("10.55%  libc.so.6"), "{s}");
        assert_eq!(s.matches("%  ").count(), CATEGORIES.len() + 3, "{s}");
    }
}
