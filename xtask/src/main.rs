//! Developer tasks for this workspace, run as `cargo xtask <command>` (the
//! alias lives in `.cargo/config.toml`). Each subcommand is its own module.

mod bench;
mod build_ebpf;
mod ci;
mod code_order;
mod demo;
mod exec;
mod fuzz;
mod image;
mod interrupt;
mod mutants;
mod setup;
mod soak;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for the mesh workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install (or with --check, only look for) everything building and
    /// testing needs: apt packages, toolchains, bpf-linker, bpffs, cgroup
    /// v2 (`mutants` installs cargo-mutants itself).
    Setup(setup::Options),
    /// Build the kernel object (mesh-ebpf) on its own, as mesh-agent's
    /// build script does, and print where it is.
    BuildEbpf(build_ebpf::Options),
    /// The project's test command: setup, fmt, clippy, build, unit tests and
    /// the namespaced tests, stopping at the first failure.
    Ci(ci::Options),
    /// The main job: a simulated node with pods, the real agent and eBPF
    /// programs, traffic, and a plain account of what was captured.
    Demo,
    /// Fuzz the parsers of what the agent reads from others (policy YAML,
    /// CONNECT authorities, CA requests, API objects), bounded in time.
    Fuzz(fuzz::Options),
    /// The agent's container image (OCI archive, built from scratch with
    /// buildah, nothing pulled); `--test` runs it under podman as the
    /// DaemonSet does, with pods and traffic.
    Image(image::Options),
    /// Mutation testing (cargo-mutants) of policy evaluation,
    /// PeerAuthentication and the certificate verifiers against the unit
    /// tests; prints the mutants no test catches.
    Mutants(mutants::Options),
    /// Benchmarks: direct TCP, the mesh and a standard TLS tunnel between
    /// the same pods, side by side (release build).
    Bench(bench::Options),
    /// Two agent builds compared in alternated pairs of one-repetition
    /// bench runs: each run's figures, the medians, and in how many pairs
    /// the new build was lower.
    BenchAb(bench::ab::Options),
    /// Lists the release agent's functions that the benchmark's runs
    /// execute in mesh-agent/code-order.txt, which the release build lays
    /// out together (fewer code pages resident); needs root and a loop
    /// device.
    CodeOrder(code_order::Options),
    /// Faults under load: fixed-rate traffic between meshed pods while the
    /// agent is killed and restarted, policies flip, certificates rotate,
    /// pods leave and rejoin the mesh and the configuration is rewritten;
    /// failures by cause, a packet check for plaintext, the agent's memory
    /// and file descriptors against their baseline.
    Soak(soak::Options),
}

/// Removes what `cargo run` told this process about its own package
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...), so that the cargo commands
/// xtask runs see the environment a developer's own `cargo build` sees.
/// Build scripts (ring's, among others) ask to rerun when such a variable
/// changes: inherited, they rebuilt ring, rustls, kube and the agent on
/// every `cargo xtask bench` after a plain `cargo build`, and back again.
fn forget_cargo_run_env() {
    let own: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| {
            name.to_str().is_some_and(|name| {
                name.starts_with("CARGO_PKG_")
                    || matches!(
                        name,
                        "CARGO_MANIFEST_DIR"
                            | "CARGO_MANIFEST_PATH"
                            | "CARGO_MANIFEST_LINKS"
                            | "CARGO_CRATE_NAME"
                            | "CARGO_BIN_NAME"
                            | "CARGO_PRIMARY_PACKAGE"
                    )
            })
        })
        .collect();
    for name in own {
        // SAFETY: the first thing main does, before any other thread runs.
        unsafe { std::env::remove_var(name) };
    }
}

fn main() -> ExitCode {
    forget_cargo_run_env();
    let result = match Cli::parse().command {
        Command::Setup(options) => setup::run(&options),
        Command::BuildEbpf(options) => build_ebpf::run(&options),
        Command::Ci(options) => ci::run(&options),
        Command::Demo => demo::run(),
        Command::Fuzz(options) => fuzz::run(&options),
        Command::Image(options) => image::run(&options),
        Command::Mutants(options) => mutants::run(&options),
        Command::Bench(options) => bench::run(&options),
        Command::BenchAb(options) => bench::ab::run(&options),
        Command::Soak(options) => soak::run(&options),
        Command::CodeOrder(options) => code_order::run(&options),
    };
    // Printed by hand rather than by returning the error from main: that
    // would add anyhow's backtrace whenever RUST_BACKTRACE is set, burying
    // the message under frames of xtask's own code in every CI log.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root. xtask sits one level below it, so this holds wherever
/// the checkout is and whatever directory `cargo xtask` was started from.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest dir has a parent")
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Command};

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ci_passes_what_follows_double_dash_to_the_tests() {
        let cli = Cli::try_parse_from(["xtask", "ci", "--skip-lint", "--", "proxy", "--nocapture"])
            .unwrap();
        let Command::Ci(options) = cli.command else {
            panic!("parsed as another command");
        };
        assert!(options.skip_lint);
        assert_eq!(options.test_args, ["proxy", "--nocapture"]);
    }
}
