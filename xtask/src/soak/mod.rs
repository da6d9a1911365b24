//! `cargo xtask soak`: faults under load. Two simulated nodes with the real
//! agent and eBPF programs (`bed.rs`), fixed-rate traffic between meshed
//! pods for the whole run (short request/response connections and
//! long-lived ones, `mesh-load soak`), while a schedule kills one agent
//! with SIGKILL and starts it again, flips a DENY policy, lets a pod leave
//! the mesh and come back, and rewrites the configuration (atomically, in
//! place, with a syntax error); certificates live 10 s, so they rotate all
//! along. Then every request is judged against the fault timeline
//! (`verdict.rs`), every packet of every pod's link is searched for the
//! traffic's plaintext (`plaintext.rs`), and the surviving agent's memory
//! and file descriptors are compared with their baseline (`report.rs`).
//! Exits non-zero when a check fails. Everything is removed at the end, on
//! failure and on Ctrl-C.

mod bed;
mod plaintext;
mod report;
mod timeline;
mod verdict;

use std::{
    io::BufRead as _,
    path::PathBuf,
    process::Command,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use mesh_tests::soak::Event;

use bed::{Bed, Sample, now};
use timeline::{ChurnKind, Timeline, WriteKind};

#[derive(clap::Args)]
pub struct Options {
    /// The CI smoke run: 60 s of traffic, each fault at least once.
    #[arg(long)]
    pub quick: bool,
    /// Seconds of traffic under faults (default 240, or 60 with --quick).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests per second, every client together (plus 6 long-lived
    /// connections exchanging 4 lines a second each).
    #[arg(long, default_value_t = DEFAULT_RATE)]
    pub rate: f64,
    /// Where the report, the events and the timeline go (default
    /// target/soak).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub const DEFAULT_RATE: f64 = 100.0;
const FULL: f64 = 240.0;
const QUICK: f64 = 60.0;
/// Traffic before any fault: connections pooled, certificates issued. It
/// must all go through.
const WARMUP: f64 = 5.0;
/// Quiet time before each resource sample: the agent gives memory back
/// every 5 s, and closed connections' tasks end.
const SETTLE: Duration = Duration::from_secs(10);
/// Steady traffic before the first fault, between faults, and after the
/// last one.
const LEAD: Duration = Duration::from_secs(3);
const GAP: Duration = Duration::from_secs(2);
const TAIL: f64 = 3.0;
/// The longest a fault takes (the DENY flip: 3 s in force, its writes
/// applied), so that the last one ends before the traffic does.
const LONGEST_FAULT: f64 = 6.0;

/// One turn of the schedule: every fault, churns and rewrites rotating
/// through their kinds, so one turn has each kind once.
#[derive(Clone, Copy)]
enum Step {
    Restart,
    Churn,
    Rewrite,
    Deny,
}

const TURN: [Step; 8] = [
    Step::Restart,
    Step::Churn,
    Step::Rewrite,
    Step::Deny,
    Step::Churn,
    Step::Rewrite,
    Step::Churn,
    Step::Rewrite,
];

pub fn run(opts: &Options) -> anyhow::Result<()> {
    crate::setup::ensure()?;
    let duration = opts
        .duration
        .unwrap_or(if opts.quick { QUICK } else { FULL });
    ensure!(
        duration >= QUICK,
        "--duration {duration}: at least {QUICK} s, to inject every fault once"
    );
    ensure!(
        opts.rate > 0.0 && opts.rate <= 1000.0,
        "--rate {}: between 1 and 1000 requests per second",
        opts.rate
    );
    let root = crate::workspace_root();
    println!("==> building the agent (and its eBPF programs) and the load tool");
    crate::exec::run(
        Command::new("cargo")
            .args(["build", "-p", "mesh-agent", "-p", "mesh-tests", "--bins"])
            .current_dir(&root),
    )?;
    let out = root.join(opts.out.clone().unwrap_or_else(|| "target/soak".into()));
    std::fs::create_dir_all(&out)?;
    let run = run_id();
    let began = Instant::now();

    let mut bed = Bed::new()?;
    let result = soak(&mut bed, &run, duration, opts.rate, &out, began);
    if !matches!(&result, Ok(failures) if failures.is_empty()) {
        // The testbed's directory goes with it: keep what explains a failure.
        for file in bed.kept_files() {
            if let Some(name) = file.file_name() {
                let _ = std::fs::copy(&file, out.join(name));
            }
        }
        println!("agents' logs and captures kept in {}", out.display());
    }
    drop(bed);
    let failures = result?;
    ensure!(
        failures.is_empty(),
        "soak failed:\n  {}",
        failures.join("\n  ")
    );
    println!("soak: passed");
    Ok(())
}

/// The run on a testbed that is up: warm-up, baseline, traffic under
/// faults, the checks and the report. Returns why it fails (empty when it
/// passes); an error when it could not go on.
fn soak(
    bed: &mut Bed,
    run: &str,
    duration: f64,
    rate: f64,
    out: &std::path::Path,
    began: Instant,
) -> anyhow::Result<Vec<String>> {
    println!(
        "==> two nodes, five pods, both agents up (run {run}; configuration in {})",
        bed.config_dir().display()
    );
    let pods = [
        bed.client0.clone(),
        bed.server0.clone(),
        bed.client1.clone(),
        bed.server1.clone(),
        bed.mover1.clone(),
    ];
    let captures = pods
        .iter()
        .map(|p| bed.tb.capture_packets(p, &format!("soak-{}", p.name)))
        .collect::<anyhow::Result<Vec<_>>>()?;

    println!("==> warm-up: {WARMUP} s of traffic, no fault");
    let warm_run = format!("{run}w");
    let warm = traffic(bed, &warm_run, WARMUP, rate)?;
    let warm = collect(warm)?;
    let topology = bed.topology();
    let quiet = verdict::tally(&warm, &Timeline::default(), &topology);
    bed::check_quiet("warm-up", &quiet)?;
    bed.idle(SETTLE)?;
    let baseline = bed.survivor_sample()?;
    let killed_baseline = Sample::of(bed.tb.agent(bed::KILLED).pid())?;
    bed.peak = baseline;
    println!(
        "    {} requests, all served; baseline of node {}'s agent: {:.1} MiB, {} fds",
        quiet.requests,
        bed::SURVIVOR,
        baseline.rss_kib as f64 / 1024.0,
        baseline.fds
    );

    println!("==> {duration} s of traffic at {rate} requests/s, faults on a schedule");
    let start = now();
    let load = traffic(bed, run, duration, rate)?;
    let injected = inject(bed, start, start + duration);
    // The traffic ends on its own; its events are wanted even when a
    // fault failed.
    let events = collect(load)?;
    injected?;
    println!("==> traffic done; settling {} s", SETTLE.as_secs());
    bed.idle(SETTLE)?;
    let end = bed.survivor_sample()?;
    let killed_end = Sample::of(bed.tb.agent(bed::KILLED).pid())?;

    let files = captures
        .into_iter()
        .map(|c| c.stop())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let all: Vec<Event> = warm.iter().chain(&events).cloned().collect();
    let paths: Vec<&std::path::Path> = files.iter().map(PathBuf::as_path).collect();
    let wire = plaintext::check(&paths, &all, &bed.timeline)?;
    let tally = verdict::tally(&events, &bed.timeline, &topology);
    let page = bed.tb.agent(bed::SURVIVOR).metrics()?;
    let report = report::Report {
        run: run.to_owned(),
        duration,
        rate,
        wall: began.elapsed(),
        tally,
        timeline: &bed.timeline,
        wire,
        baseline,
        end,
        peak: bed.peak,
        killed_baseline,
        killed_end,
        denied_by_survivor: mesh_tests::metrics::series_sum_or_absent(
            &page,
            "mesh_proxy_connections_total",
            &[("direction", "hbone"), ("result", "denied")],
        )?,
        denied_in_force_to_survivor: report::denied_in_force(
            &events,
            &bed.timeline,
            bed.server1.ip4,
            bed::DENY_PORT,
        ),
        renewals: report::renewals(&bed.agent_logs())?,
    };
    let text = report.markdown();
    println!("\n{text}");
    let failures = report.failures();
    std::fs::write(out.join("report.md"), &text)?;
    std::fs::write(
        out.join("timeline.json"),
        serde_json::to_string_pretty(&bed.timeline)?,
    )?;
    let lines: Vec<String> = all
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    std::fs::write(out.join("events.jsonl"), lines.join("\n") + "\n")?;
    println!("report, events and timeline: {}", out.display());
    Ok(failures)
}

/// A run's id, unique enough to tell its markers from any other run's.
fn run_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:08x}", (t as u64 ^ u64::from(std::process::id())) as u32)
}

/// Starts the clients' traffic for `seconds`; each handle yields one
/// client's events once its process has ended.
fn traffic(
    bed: &mut Bed,
    run: &str,
    seconds: f64,
    rate: f64,
) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<Vec<Event>>>>> {
    let load = mesh_tests::sibling_bin("mesh-load");
    let mut handles = Vec::new();
    for (pod, specs) in bed.traffic(rate) {
        let mut args = vec![
            "soak".to_owned(),
            run.to_owned(),
            pod.name.clone(),
            seconds.to_string(),
        ];
        args.extend(specs);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = bed.tb.spawn_in(&pod.netns, &pod.cgroup, &load, &args)?;
        let stdout = bed
            .tb
            .take_stdout(child)
            .context("the load tool's output")?;
        handles.push(std::thread::spawn(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map(|line| {
                    let line = line?;
                    serde_json::from_str(&line).with_context(|| format!("an event: {line}"))
                })
                .collect()
        }));
    }
    Ok(handles)
}

fn collect(handles: Vec<JoinHandle<anyhow::Result<Vec<Event>>>>) -> anyhow::Result<Vec<Event>> {
    let mut all = Vec::new();
    for h in handles {
        all.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("an event reader panicked"))??,
        );
    }
    Ok(all)
}

/// Runs the schedule from `start` until the last fault that fits before
/// `end`, with steady traffic between faults.
fn inject(bed: &mut Bed, start: f64, end: f64) -> anyhow::Result<()> {
    bed.idle(LEAD)?;
    let mut churns = ChurnKind::ALL.iter().copied().cycle();
    let mut writes = WriteKind::ALL.iter().copied().cycle();
    for step in TURN.iter().copied().cycle() {
        if now() + LONGEST_FAULT > end - TAIL {
            break;
        }
        let at = now() - start;
        let what = match step {
            Step::Restart => {
                bed.restart()?;
                let r = bed.timeline.restarts.last().expect("just pushed");
                format!(
                    "agent of node {} killed (SIGKILL); ready {:.2} s later, its {} pods back from its state directory",
                    r.node,
                    r.ready - r.killed,
                    r.restored
                )
            }
            Step::Deny => {
                bed.flip_policy()?;
                let d = bed.timeline.denials.last().expect("just pushed");
                format!(
                    "DENY policy on :{} written, applied in {:.2} s, in force {:.1} s, removed in {:.2} s",
                    bed::DENY_PORT,
                    d.applied - d.written,
                    d.lifted - d.applied,
                    d.cleared - d.lifted
                )
            }
            Step::Churn => {
                let how = churns.next().expect("cycles");
                bed.churn(how)?;
                let c = bed.timeline.churns.last().expect("just pushed");
                format!(
                    "{} out of the mesh ({}): released in {:.2} s, back in {:.2} s",
                    c.pod,
                    how.name(),
                    c.released - c.left,
                    c.enrolled - c.back
                )
            }
            Step::Rewrite => {
                let how = writes.next().expect("cycles");
                bed.rewrite(how)?;
                let w = bed.timeline.rewrites.last().expect("just pushed");
                format!(
                    "base.yaml rewritten {}: applied in {:.2} s",
                    how.name(),
                    w.applied - w.at
                )
            }
        };
        println!("    [{at:6.1} s] {what}");
        bed.idle(GAP)?;
    }
    Ok(())
}
