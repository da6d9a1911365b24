//! `cargo xtask bench`: the same client and server pods, cross-node and on
//! one node, measured over each path (`paths.rs`) in one run, repeated, and
//! reported as min/median/max with ratios to `direct` and `tls-tunnel`
//! (`report.rs`).

pub mod ab;
mod idle;
mod paths;
mod profile;
mod report;
mod scale;
mod verify;

use std::{
    collections::BTreeMap,
    path::{Path as FsPath, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};
use mesh_tests::{Pod, Testbed, Value};

pub use paths::Path;
pub use report::Results;

#[derive(clap::Args)]
pub struct Options {
    /// One short repetition of everything: checks that the harness works
    /// (under 3 minutes), not the numbers.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of each measurement (5 or more for a published table).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Where the JSON results go (a Markdown copy beside it); default
    /// target/bench/results.json, or quick.json with --quick.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only these paths (repeat the option; default: all). Ratios need
    /// `direct` and `tls-tunnel` in the run.
    #[arg(long = "path", value_enum)]
    pub paths: Vec<Path>,
    /// Only these placements (repeat the option; default: cross-node,
    /// same-node, and idle when mesh-ebpf is measured).
    #[arg(long = "placement", value_enum)]
    pub placements: Vec<Placement>,
    /// Only these figures of the cross-node and same-node runs (repeat the
    /// option; default: all): a comparison of a change that can only move
    /// some runs more pairs in the time. Peak RSS is always reported.
    #[arg(long = "figures", value_enum)]
    pub figures: Vec<Figures>,
    /// Also record the agents with `perf` during one more 1-stream
    /// throughput run of each mesh path; the flat profile (by DSO and
    /// symbol) goes to profile-<placement>-<path>.txt beside the results.
    #[arg(long)]
    pub profile: bool,
}

/// The figures of a path, by the runs that take them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Figures {
    /// Keep-alive requests: latency at 1,000 and 5,000 req/s (and the
    /// agents' CPU and RSS at 1,000), saturation.
    Requests,
    /// New connections: as fast as they go, and at 1,000/s.
    Connections,
    /// iperf3 with 1 and 8 streams.
    Throughput,
}

impl Figures {
    pub fn name(self) -> &'static str {
        match self {
            Figures::Requests => "requests",
            Figures::Connections => "connections",
            Figures::Throughput => "throughput",
        }
    }

    /// The figures a traffic metric is one of; none for the peak RSS,
    /// which is over the whole run, whichever runs it had.
    pub fn of(metric: &str) -> Option<Figures> {
        if metric.ends_with("peak_rss_mib") {
            None
        } else if metric.starts_with("throughput_") {
            Some(Figures::Throughput)
        } else if metric.starts_with("connection") || metric.contains("_per_1000_conn") {
            Some(Figures::Connections)
        } else {
            Some(Figures::Requests)
        }
    }
}

/// Where the client and the server pods run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    CrossNode,
    SameNode,
    /// One agent, no traffic: the memory figures.
    Idle,
    /// How the cost grows with what the agent knows: policies (new
    /// connections/s, cross-node) and stored workloads (RSS, time to ready).
    Scale,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::CrossNode => "cross-node",
            Placement::SameNode => "same-node",
            Placement::Idle => "idle",
            Placement::Scale => "scale",
        }
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    crate::setup::ensure()?;
    let (reps, seconds) = if opts.quick {
        (1, 1.0)
    } else {
        ensure!(opts.reps >= 1, "--reps must be at least 1");
        if opts.reps < 5 {
            println!(
                "note: {} repetition(s): fine for a comparison, but a published table needs at least 5",
                opts.reps
            );
        }
        (opts.reps, opts.seconds)
    };
    // The numbers need a release build; the quick check of the harness
    // runs on the debug build CI already has.
    let profile = if opts.quick { "debug" } else { "release" };
    println!("==> building {profile} binaries (agent, eBPF programs, load tools)");
    let root = crate::workspace_root();
    let mut build = Command::new("cargo");
    build.args(["build", "-p", "mesh-tests", "--bins"]);
    // An agent given by path (an A/B of two builds) is not rebuilt.
    if std::env::var_os("MESH_AGENT_BIN").is_none() {
        build.args(["-p", "mesh-agent"]);
    }
    if !opts.quick {
        build.arg("--release");
    }
    crate::exec::run(build.current_dir(&root))?;
    let target_dir = target_dir(&root);
    let bin_dir = target_dir.join(profile);
    // SAFETY: set before any thread of this process is started.
    unsafe { std::env::set_var("MESH_BIN_DIR", &bin_dir) };

    // Enrolled pods and stored workloads for the idle memory figures.
    let (pods, workloads) = if opts.quick {
        (10, 1000)
    } else {
        (100, 10_000)
    };
    let mut results = Results::new(reps, seconds, pods, workloads);
    let out = match &opts.out {
        Some(out) => root.join(out),
        None if opts.quick => target_dir.join("bench/quick.json"),
        None => target_dir.join("bench/results.json"),
    };
    let out_dir = out.parent().unwrap_or(&root).to_owned();
    std::fs::create_dir_all(&out_dir)?;
    let logs = out_dir.join("logs");
    mesh_tests::remove_dir_if_any(&logs).with_context(|| logs.display().to_string())?;
    let _ = LOGS.set(logs);
    let chosen: Vec<Path> = paths::ALL
        .iter()
        .copied()
        .filter(|p| opts.paths.is_empty() || opts.paths.contains(p))
        .collect();
    let placements = if opts.placements.is_empty() {
        let mut all = vec![Placement::CrossNode, Placement::SameNode];
        if chosen.contains(&Path::MeshEbpf) {
            all.extend([Placement::Idle, Placement::Scale]);
        }
        all
    } else {
        opts.placements.clone()
    };
    for &placement in &placements {
        if matches!(placement, Placement::Idle | Placement::Scale) {
            continue;
        }
        for &path in chosen.iter().filter(|p| p.measured_in(placement)) {
            println!("==> {} {}", placement.name(), path.name());
            let profile = (opts.profile && path.is_mesh())
                .then(|| out_dir.join(format!("profile-{}-{}.txt", placement.name(), path.name())));
            let run = Run {
                placement,
                path,
                reps,
                seconds,
                profile,
                quick: opts.quick,
                figures: opts.figures.clone(),
            };
            measure_path(&mut results, &run)
                .with_context(|| format!("{} {}", placement.name(), path.name()))?;
        }
    }
    if placements.contains(&Placement::Idle) {
        println!("==> idle memory: {pods} enrolled pods, {workloads} more workloads");
        idle::measure(&mut results, reps, pods, workloads).context("idle memory")?;
    }
    if placements.contains(&Placement::Scale) {
        println!("==> scale: non-matching policies, stored workloads");
        scale::measure(&mut results, reps, seconds, opts.quick).context("scale")?;
    }
    let md = results.markdown();
    println!("\n{md}");
    std::fs::write(&out, serde_json::to_string_pretty(&results.json())?)?;
    std::fs::write(out.with_extension("md"), &md)?;
    println!(
        "results: {} and {}",
        out.display(),
        out.with_extension("md").display()
    );
    Ok(())
}

/// Where cargo builds: `CARGO_TARGET_DIR` when set (a relative one from
/// the workspace root, where the build runs), else `target/` there.
pub fn target_dir(root: &FsPath) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// One path in one placement.
struct Run {
    placement: Placement,
    path: Path,
    reps: usize,
    seconds: f64,
    /// Where a perf profile of the agents goes, if one is wanted.
    profile: Option<PathBuf>,
    /// A check of the harness: no request may fail.
    quick: bool,
    /// Only these (all when empty).
    figures: Vec<Figures>,
}

impl Run {
    fn takes(&self, figures: Figures) -> bool {
        self.figures.is_empty() || self.figures.contains(&figures)
    }
}

fn measure_path(results: &mut Results, run: &Run) -> anyhow::Result<()> {
    let &Run {
        placement,
        path,
        reps,
        seconds,
        quick,
        ..
    } = run;
    let mut tb = testbed(2, &format!("{}-{}", placement.name(), path.name()))?;
    let server_node = match placement {
        Placement::CrossNode => 1,
        Placement::SameNode | Placement::Idle | Placement::Scale => 0,
    };
    let client = tb.add_pod(0, "client")?;
    let server = tb.add_pod(server_node, "server")?;
    tune_for_connections(&tb, &[&client, &server])?;
    paths::start_servers(&mut tb, &server)?;
    let targets = path.start(&mut tb, &client, 0, &server, server_node)?;
    let agents: Vec<u32> = if path.is_mesh() {
        let mut nodes = vec![0, server_node];
        nodes.dedup();
        nodes.iter().map(|&n| tb.agent(n).pid()).collect()
    } else {
        Vec::new()
    };
    // A short warm-up: connections pooled, certificates issued, caches hot;
    // and the path checked before any figure is taken.
    let warm = load(&tb, &client, targets.http, 4, 1000.0, 0.5, false)?;
    verify::no_failures(&warm, "warm-up")?;
    let mtls_before = if path.is_mesh() {
        if path == Path::MeshEbpfLocal {
            verify::carried_same_node(&tb, 4)?;
        } else {
            verify::carried_over_hbone(&tb, path, server_node, 4)?;
        }
        verify::opened_for_client(&tb, path)?
    } else {
        0.0
    };
    // In the quick check every request must succeed; in a full run the
    // failed requests are one of the figures.
    let checked = |r: &Value, what: &str| -> anyhow::Result<()> {
        if quick {
            verify::no_failures(r, what)?;
        }
        Ok(())
    };
    let mut new_connections = 0.0;
    let mut record = |metric: &str, value: f64| results.add(placement, path, metric, value);
    for rep in 0..reps {
        if run.takes(Figures::Requests) {
            if path.is_mesh() && rep > 0 {
                // The agents give memory back every 5 s: the 1,000 req/s run
                // (RSS read at its end) starts from an agent at rest, not from
                // the last throughput burst.
                std::thread::sleep(std::time::Duration::from_secs(6));
            }
            for rate in [1000.0, 5000.0] {
                let cpu_before = cpu_seconds(&agents)?;
                let middle_before = match targets.middle {
                    Some(pid) => cpu_seconds(&[pid])?,
                    None => 0.0,
                };
                let started = std::time::Instant::now();
                let r = load(&tb, &client, targets.http, 4, rate, seconds, false)?;
                checked(&r, &format!("{rate} req/s"))?;
                // The load tool's start and exit are in it too: per wall second.
                let wall = started.elapsed().as_secs_f64();
                let cpu = cpu_seconds(&agents)? - cpu_before;
                let tag = format!("{}k", rate as u32 / 1000);
                for p in ["p50", "p90", "p99", "max"] {
                    record(
                        &format!("latency_{tag}_{p}_ms"),
                        r[&format!("{p}_us")].as_f64().unwrap_or(f64::NAN) / 1000.0,
                    );
                }
                record(
                    &format!("errors_{tag}"),
                    r["errors"].as_f64().unwrap_or(f64::NAN),
                );
                if path.is_mesh() && rate == 1000.0 {
                    let requests = r["requests"].as_f64().unwrap_or(f64::NAN);
                    record("agent_cpu_s_per_1000_req", cpu / requests * 1000.0);
                    record("agent_vcpu_at_1k", cpu / wall);
                    record("agent_rss_at_1k_mib", max_status_mib(&agents, "VmRSS")?);
                    // The part no other process shares and the kernel cannot
                    // reclaim without swap (heap, stacks), apart from the
                    // mapped pages of the binary and libraries.
                    record("agent_anon_at_1k_mib", max_status_mib(&agents, "RssAnon")?);
                }
                if let (Some(pid), true) = (targets.middle, rate == 1000.0) {
                    let requests = r["requests"].as_f64().unwrap_or(f64::NAN);
                    let cpu = cpu_seconds(&[pid])? - middle_before;
                    record("middle_cpu_s_per_1000_req", cpu / requests * 1000.0);
                    record("middle_vcpu_at_1k", cpu / wall);
                    record("middle_rss_at_1k_mib", max_status_mib(&[pid], "VmRSS")?);
                }
            }
            let r = load(&tb, &client, targets.http, 4, 0.0, seconds, false)?;
            checked(&r, "saturation")?;
            record("saturation_rps", r["rps"].as_f64().unwrap_or(f64::NAN));
        }
        if run.takes(Figures::Connections) {
            let cpu_before = cpu_seconds(&agents)?;
            let middle_before = match targets.middle {
                Some(pid) => cpu_seconds(&[pid])?,
                None => 0.0,
            };
            let r = load(&tb, &client, targets.http, 4, 0.0, seconds, true)?;
            checked(&r, "new connections")?;
            let connections = r["requests"].as_f64().unwrap_or(0.0);
            new_connections += connections;
            record("connections_per_s", r["rps"].as_f64().unwrap_or(f64::NAN));
            // What a connection costs, which the rate shows only through a
            // machine whose other tenants come and go.
            if path.is_mesh() {
                let cpu = cpu_seconds(&agents)? - cpu_before;
                record("agent_cpu_s_per_1000_conn", cpu / connections * 1000.0);
            }
            if let Some(pid) = targets.middle {
                let cpu = cpu_seconds(&[pid])? - middle_before;
                record("middle_cpu_s_per_1000_conn", cpu / connections * 1000.0);
            }
            record(
                "connection_p99_ms",
                r["p99_us"].as_f64().unwrap_or(f64::NAN) / 1000.0,
            );
            // The same at a fixed 1,000 new connections/s, well below any mesh
            // path's limit: the setup latency of a connection that does not
            // queue behind others, and a CPU cost per connection that moves
            // less with the machine's other tenants than the one at the limit.
            let cpu_before = cpu_seconds(&agents)?;
            let r = load(&tb, &client, targets.http, 4, 1000.0, seconds, true)?;
            checked(&r, "1,000 new connections/s")?;
            let connections = r["requests"].as_f64().unwrap_or(0.0);
            new_connections += connections;
            for p in ["p50", "p99"] {
                record(
                    &format!("connection_1k_{p}_ms"),
                    r[&format!("{p}_us")].as_f64().unwrap_or(f64::NAN) / 1000.0,
                );
            }
            if path.is_mesh() {
                let cpu = cpu_seconds(&agents)? - cpu_before;
                record(
                    "agent_cpu_s_per_1000_conn_at_1k",
                    cpu / connections * 1000.0,
                );
            }
        }
        if let (Some(iperf_target), true) = (targets.iperf, run.takes(Figures::Throughput)) {
            for (metric, streams) in [("throughput_1_gbps", 1), ("throughput_8_gbps", 8)] {
                record(metric, iperf(&tb, &client, iperf_target, streams, seconds)?);
            }
        }
        println!("    rep {}/{reps} done", rep + 1);
    }
    if path.is_mesh() {
        // Each measured new connection was one the client's agent carried
        // over mutual TLS (the shortcut's, on mesh-ebpf-local).
        let carried = verify::opened_for_client(&tb, path)? - mtls_before;
        ensure!(
            carried >= new_connections,
            "the client's agent carried {carried} {} connections during the runs, fewer than the {new_connections} new connections measured",
            path.security()
        );
    }
    if let Some(file) = &run.profile {
        profile::record(&tb, &client, &targets, &agents, seconds, file)?;
    }
    if path.is_mesh() {
        let peak = max_status_mib(&agents, "VmHWM")?;
        results.add(placement, path, "agent_peak_rss_mib", peak);
    }
    if let Some(pid) = targets.middle {
        let peak = max_status_mib(&[pid], "VmHWM")?;
        results.add(placement, path, "middle_peak_rss_mib", peak);
    }
    Ok(())
}

/// Thousands of short connections per second per run: without reuse the
/// client's ports sit in TIME_WAIT and later runs cannot connect.
fn tune_for_connections(tb: &Testbed, pods: &[&Pod]) -> anyhow::Result<()> {
    for pod in pods {
        tb.run_in_pod(
            pod,
            FsPath::new("/usr/sbin/sysctl"),
            &[
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65000",
            ],
        )?;
    }
    Ok(())
}

/// iperf3 from the client to `targets.iperf` with `streams` parallel
/// streams; Gbit/s received.
fn iperf(
    tb: &Testbed,
    client: &Pod,
    target: std::net::SocketAddr,
    streams: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let out = tb.run_in_pod(
        client,
        FsPath::new("/usr/bin/iperf3"),
        &[
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
            "-t",
            &format!("{}", seconds.ceil() as u64),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no sum_received in iperf3 output: {}", v["error"]))?;
    Ok(bps / 1e9)
}

/// The load generator in the client pod (`mesh-load load`).
pub(super) fn load(
    tb: &Testbed,
    client: &Pod,
    target: std::net::SocketAddr,
    conns: usize,
    rate: f64,
    seconds: f64,
    new_conn: bool,
) -> anyhow::Result<Value> {
    let bin = mesh_tests::sibling_bin("mesh-load");
    let mut args = vec![
        "load".to_owned(),
        target.to_string(),
        conns.to_string(),
        rate.to_string(),
        seconds.to_string(),
    ];
    if new_conn {
        args.push("new-conn".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tb.run_in_pod(client, &bin, &args)?;
    let v: Value = serde_json::from_str(out.trim()).context("mesh-load output")?;
    ensure!(
        v["requests"].as_u64().unwrap_or(0) > 0,
        "no request succeeded: {v}"
    );
    Ok(v)
}

/// User plus system CPU seconds of these processes so far.
fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name, which is in parentheses.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = f.get(11).context("utime")?.parse()?;
        let stime: f64 = f.get(12).context("stime")?.parse()?;
        total += (utime + stime) / tick;
    }
    Ok(total)
}

/// The largest value of a `/proc/PID/status` memory field (VmRSS, VmHWM)
/// among these processes, in MiB.
fn max_status_mib(pids: &[u32], field: &str) -> anyhow::Result<f64> {
    let mut max = 0;
    for &pid in pids {
        max = max.max(status_kib(pid, field)?);
    }
    Ok(max as f64 / 1024.0)
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{field} of pid {pid}"))
}

/// Used by `report` to name the machine.
pub fn machine() -> BTreeMap<&'static str, String> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = read("/proc/cpuinfo")
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    BTreeMap::from([
        ("cpu", cpu),
        ("cores", cores.to_string()),
        ("memory_gib", format!("{:.0}", mem_kib as f64 / 1048576.0)),
        (
            "kernel",
            read("/proc/sys/kernel/osrelease").trim().to_owned(),
        ),
    ])
}

/// A testbed of `nodes` nodes for what `name` names (`cross-node-mesh-ebpf`,
/// `idle`, ...). Its agents and waypoints log at the agent's default level
/// (`info`: the access log, no debug lines), as deployed, and their logs
/// are kept in `<results dir>/logs/<name>/`.
fn testbed(nodes: usize, name: &str) -> anyhow::Result<Testbed> {
    let mut tb = Testbed::new(nodes)?;
    tb.log_agents_at("info");
    if let Some(dir) = LOGS.get() {
        tb.keep_logs_in(&dir.join(name));
    }
    Ok(tb)
}

/// Where the run's testbeds leave their logs (`<results dir>/logs`),
/// emptied when the run starts.
static LOGS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
