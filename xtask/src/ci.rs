//! `cargo xtask ci`: the project's single test command, run by `.ci/run` and
//! by hand. Setup, formatting, clippy, the agent build, the unit tests, the
//! namespaced tests, the quick bench and A/B harness, the demo, the container image's smoke
//! test and the quick soak, each
//! timed, stopping at the first failure.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Skip `cargo fmt --check` and clippy, for quick local iterations.
    #[arg(long)]
    pub skip_lint: bool,
    /// Passed to the namespaced tests' harness after `--test-threads=1`,
    /// e.g. a test name filter: `cargo xtask ci -- proxy`.
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

/// The package in `tests/` holding the tests that build network namespaces
/// and run the agent binary; they need root and run one at a time.
const NAMESPACED_TESTS: &str = "mesh-tests";
/// The Kubernetes API stand-in: its tests say nothing about the product.
const API_STAND_IN: &str = "fake-kube-api";

pub fn run(options: &Options) -> Result<()> {
    let root = crate::workspace_root();
    let mut timings = Vec::new();

    // Also the root check: setup fails first thing when not root, which the
    // namespaced tests need anyway.
    step(&mut timings, "setup", setup::ensure)?;
    if !options.test_args.is_empty() {
        // A filter that matches nothing would pass with nothing run: say so
        // first, before the long steps.
        let listed = exec::probe(
            cargo(&root)
                .args(["test", "-p", NAMESPACED_TESTS, "--", "--list"])
                .args(&options.test_args),
        )
        .unwrap_or_default();
        let matched = listed.lines().filter(|l| l.ends_with(": test")).count();
        anyhow::ensure!(
            matched > 0,
            "no namespaced test matches {:?}: nothing would run",
            options.test_args
        );
        println!(
            "ci: {matched} namespaced test(s) match {:?}",
            options.test_args
        );
    }
    if options.skip_lint {
        println!("\nskipped: fmt and clippy (--skip-lint)");
    } else {
        step(&mut timings, "fmt", || {
            exec::run(cargo(&root).args(["fmt", "--all", "--", "--check"]))
        })?;
        step(&mut timings, "clippy", || {
            exec::run(cargo(&root).args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
    }
    // The namespaced tests run target/debug/mesh-agent, which `cargo test`
    // of another package does not build.
    step(&mut timings, "build mesh-agent", || {
        exec::run(cargo(&root).args(["build", "-p", "mesh-agent"]))
    })?;
    let mut unit = Tally::default();
    step(&mut timings, "unit tests", || {
        // The namespaced tests get their own step, serialised.
        unit = run_tests(
            cargo(&root).args([
                "test",
                "--workspace",
                "--exclude",
                NAMESPACED_TESTS,
                "--exclude",
                API_STAND_IN,
            ]),
            of_the_api_stand_in,
        )?;
        let stand_in = run_tests(cargo(&root).args(["test", "-p", API_STAND_IN]), |_| true)?;
        unit.tools += stand_in.tools;
        unit.ignored += stand_in.ignored;
        Ok(())
    })?;
    // A smoke run of each fuzz target; `cargo xtask fuzz` runs longer.
    step(&mut timings, "fuzz (10 s each)", || {
        crate::fuzz::run(&crate::fuzz::Options {
            seconds: 10.0,
            seed: 0x9e37_79b9_7f4a_7c15,
            targets: Vec::new(),
        })
    })?;
    // The upgrade test replaces the agent's kernel programs with this
    // variant (other programs, another map layout) and back.
    step(&mut timings, "build the upgrade-test eBPF variant", || {
        crate::build_ebpf::build(&root, &["upgrade-test".to_owned()]).map(drop)
    })?;
    let mut namespaced = Tally::default();
    step(&mut timings, "namespaced tests", || {
        namespaced = run_tests(
            cargo(&root)
                .args(["test", "-p", NAMESPACED_TESTS, "--"])
                // Each test builds namespaces, veths and pinned BPF state
                // that share one kernel; serial keeps failures readable.
                .arg("--test-threads=1")
                .args(&options.test_args),
            of_the_harness,
        )?;
        Ok(())
    })?;
    step(&mut timings, "bench --quick", || {
        crate::bench::run(&crate::bench::Options {
            quick: true,
            reps: 1,
            seconds: 1.0,
            out: None,
            paths: Vec::new(),
            placements: Vec::new(),
            figures: Vec::new(),
            profile: false,
        })
    })?;
    // The A/B harness, the debug agent against a copy of itself: that it
    // runs and tabulates, not the numbers (the iperf3 figures only, which
    // also checks that `--figures` still yields figures).
    step(
        &mut timings,
        "bench-ab --quick --figures throughput",
        || {
            let root = crate::workspace_root();
            crate::bench::ab::run(&crate::bench::ab::Options {
                base: crate::bench::target_dir(&root).join("debug/mesh-agent"),
                new: None,
                pairs: 1,
                placements: vec![crate::bench::Placement::CrossNode],
                path: crate::bench::Path::MeshEbpf,
                figures: vec![crate::bench::Figures::Throughput],
                quick: true,
            })
        },
    )?;
    // The README's first command: every claim it prints is checked.
    step(&mut timings, "demo", crate::demo::run)?;
    // The container image (from the debug build made above: a release
    // build would add minutes) run under podman as the DaemonSet runs it.
    step(&mut timings, "image --test", || {
        crate::image::run(&crate::image::Options {
            test: true,
            debug: true,
        })
    })?;
    // A minute of faults under load; `cargo xtask soak` runs longer.
    step(&mut timings, "soak --quick", || {
        crate::soak::run(&crate::soak::Options {
            quick: true,
            duration: None,
            rate: crate::soak::DEFAULT_RATE,
            out: None,
        })
    })?;

    println!();
    for (name, took) in &timings {
        println!("ci: {name:<18} {:>7.1}s", took.as_secs_f64());
    }
    let total: Duration = timings.iter().map(|(_, took)| *took).sum();
    println!("ci: {:<18} {:>7.1}s", "total", total.as_secs_f64());
    // The product's tests apart from the tests of what only tests use.
    println!(
        "ci: {} unit tests of the product passed ({} ignored), {} of the API stand-in",
        unit.product, unit.ignored, unit.tools
    );
    println!(
        "ci: {} namespaced tests passed ({} ignored), {} of their harness",
        namespaced.product, namespaced.ignored, namespaced.tools
    );
    println!("ci: passed");
    Ok(())
}

/// Tests counted from `cargo test`'s line per test, the tests of test
/// tooling apart: they say nothing about the product.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    product: usize,
    tools: usize,
    ignored: usize,
}

impl Tally {
    /// Counts one output line if it is a test's outcome (`test NAME ... ok`).
    fn count(&mut self, line: &str, is_tool: fn(&str) -> bool) {
        let Some((name, outcome)) = line
            .strip_prefix("test ")
            .and_then(|l| l.rsplit_once(" ... "))
        else {
            return;
        };
        if outcome.starts_with("ignored") {
            self.ignored += 1;
        } else if outcome == "ok" {
            if is_tool(name) {
                self.tools += 1;
            } else {
                self.product += 1;
            }
        }
    }
}

/// Among the agent's tests, those of its use of the API stand-in
/// (`cluster/fake_api.rs`); the stand-in's own crate is run and counted
/// apart.
fn of_the_api_stand_in(name: &str) -> bool {
    name.starts_with("cluster::fake_api::")
}

/// The harness's own unit tests (in its modules); the namespaced tests are
/// the top-level functions of `tests/tests/*.rs`.
fn of_the_harness(name: &str) -> bool {
    name.contains("::")
}

/// Runs a `cargo test` command like [`exec::run`], its output shown as it
/// comes, and counts its tests.
fn run_tests(cmd: &mut Command, is_tool: fn(&str) -> bool) -> Result<Tally> {
    let shown = exec::display(cmd);
    println!("$ {shown}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let mut tally = Tally::default();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        tally.count(&line, is_tool);
    }
    let status = child.wait()?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(tally)
}

/// Runs one step between a header and a footer with its wall time.
fn step(
    timings: &mut Vec<(&'static str, Duration)>,
    name: &'static str,
    body: impl FnOnce() -> Result<()>,
) -> Result<()> {
    println!("\n==> {name}");
    let started = Instant::now();
    let result = body();
    let took = started.elapsed();
    let outcome = if result.is_ok() { "ok" } else { "FAILED" };
    println!("<== {name}: {outcome} in {:.1}s", took.as_secs_f64());
    timings.push((name, took));
    result.with_context(|| format!("ci step `{name}` failed"))
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tests_of_the_api_stand_in_are_counted_apart() {
        let mut t = Tally::default();
        for line in [
            "running 4 tests",
            "test cluster::fake_api::the_harness_serves_what_the_agent_reads_and_writes ... ok",
            "test cluster::source_tests::relists_after_410 ... ok",
            "test fuzz::tests::policy_yaml ... ignored, slow",
            "test state::tests::x ... FAILED",
            "test result: ok. 2 passed; 0 failed; 1 ignored",
        ] {
            t.count(line, of_the_api_stand_in);
        }
        assert_eq!(
            t,
            Tally {
                product: 1,
                tools: 1,
                ignored: 1
            }
        );
        let mut t = Tally::default();
        t.count("test metrics::tests::sums ... ok", of_the_harness);
        t.count(
            "test hbone_refuses_bad_peers_and_bad_requests ... ok",
            of_the_harness,
        );
        assert_eq!((t.product, t.tools), (1, 1));
    }
}
