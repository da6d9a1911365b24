//! `cargo xtask setup`: installs what building and testing the project needs
//! on a Debian machine, so that a fresh one needs nothing done by hand. Every
//! step looks first and says what it found, so running it again is cheap.

use std::{env, fs, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::exec;

#[derive(clap::Args)]
pub struct Options {
    /// Only report what is missing; exit non-zero if anything is.
    #[arg(long)]
    check: bool,
}

/// The LLVM bpf-linker is built against, and the packages to build it with.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// What the namespaced tests, the demo and the benchmarks drive.
const TOOL_PACKAGES: &[&str] = &[
    "iproute2",
    "iperf3",
    "tshark",
    "python3",
    // An independent OpenMetrics parser for the metrics page.
    "python3-prometheus-client",
    "curl",
    "procps",
    "util-linux",
    // The benchmark's peer: a standard TLS tunnel, and certificates for it.
    "stunnel4",
    "openssl",
    // The agent's fallback capture mode (`--capture iptables`).
    "iptables",
    // `cargo xtask bench --profile`.
    "linux-perf",
    // A real gRPC client and server for the waypoint tests.
    "python3-grpcio",
    // The benchmark's L7 floor: a reverse proxy in the waypoint's place.
    "nginx-light",
    // A real scraper for the dashboards' queries.
    "prometheus",
    // `cargo xtask image`: builds the container image from scratch, and
    // its smoke test runs it as the DaemonSet would.
    "buildah",
    "podman",
    // The system trust roots the image carries (TLS origination without a
    // configured CA, a KUBECONFIG's API server).
    "ca-certificates",
    // podman's runtime for the smoke test: crun refuses hybrid cgroup hosts.
    "runc",
];

/// bpf-linker links the bitcode nightly rustc emits with its own LLVM, which
/// must be at least as new as nightly's (22 today): 0.13.0 built against
/// LLVM 22 is the pairing verified to work. Any 0.13.x is accepted.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_SERIES: &str = "0.13.";

/// `cargo xtask mutants`'s tool; 27.1.0 is the version its runs were made
/// with, and any 27.x is accepted.
const CARGO_MUTANTS_VERSION: &str = "27.1.0";
const CARGO_MUTANTS_SERIES: &str = "27.";

/// Where the agent's cgroup programs may attach: /sys/fs/cgroup on a
/// unified host, /sys/fs/cgroup/unified on a hybrid one.
const CGROUP2_ROOTS: &[&str] = &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Fix what can be fixed, fail on the first thing that cannot.
    Fix,
    /// Change nothing; report everything that is missing.
    Check,
}

pub fn run(options: &Options) -> Result<()> {
    if options.check {
        setup(Mode::Check)
    } else {
        ensure()
    }
}

/// Makes the machine ready to build and test, or fails saying what is not.
/// `ci` (and `demo`) call this first.
pub fn ensure() -> Result<()> {
    setup(Mode::Fix)
}

/// Each step returns whether its part is in place: always `true` in
/// `Mode::Fix` (which fixes or fails), `false` in `Mode::Check` when missing.
type Step = fn(Mode) -> Result<bool>;

fn setup(mode: Mode) -> Result<()> {
    // Root first: in Fix mode the installs and the mount below need it, and
    // saying so before anything else beats failing halfway.
    // cargo-mutants is not among them: only `cargo xtask mutants` (an
    // on-demand run) needs it, and it installs it itself, so CI and a
    // newcomer's first run do not spend minutes building it.
    let steps: [Step; 7] = [
        root,
        apt_packages,
        python_packages,
        rust_toolchains,
        bpf_linker,
        bpffs,
        cgroup2,
    ];
    let mut missing = 0;
    for step in steps {
        if !step(mode)? {
            missing += 1;
        }
    }
    if missing > 0 {
        bail!(
            "{missing} thing(s) missing (see `missing:` above); run `cargo xtask setup` as root to install what it can"
        );
    }
    println!("setup: everything is in place");
    Ok(())
}

/// The OpenTelemetry protobuf definitions the tracing test decodes OTLP
/// with (PyPI, for the `python3` on PATH).
const OTEL_PROTO: &str = "opentelemetry-proto==1.45.2";

fn python_packages(mode: Mode) -> Result<bool> {
    let probe = Command::new("python3")
        .args(["-c", "import opentelemetry.proto.trace.v1.trace_pb2"])
        .output();
    if probe.as_ref().is_ok_and(|o| o.status.success()) {
        println!("ok: python3 has {OTEL_PROTO}");
        return Ok(true);
    }
    match mode {
        Mode::Check => {
            println!("missing: python3 package {OTEL_PROTO}");
            Ok(false)
        }
        Mode::Fix => {
            println!("install: python3 package {OTEL_PROTO}");
            exec::run(Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--break-system-packages",
                OTEL_PROTO,
            ]))?;
            Ok(true)
        }
    }
}

fn root(mode: Mode) -> Result<bool> {
    let uid = exec::probe(Command::new("id").arg("-u")).context("cannot run `id -u`")?;
    if uid == "0" {
        println!("ok: running as root");
        return Ok(true);
    }
    let why = format!(
        "running as uid {uid}, not root: the agent and the namespaced tests need root \
         (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN), and setup installs packages and mounts bpffs"
    );
    match mode {
        Mode::Fix => bail!("{why}; run this as root"),
        Mode::Check => {
            println!("missing: root ({why})");
            Ok(false)
        }
    }
}

fn apt_packages(mode: Mode) -> Result<bool> {
    if exec::probe(Command::new("dpkg-query").arg("--version")).is_none() {
        bail!(
            "dpkg-query not found: setup installs system packages with apt and knows only Debian"
        );
    }
    let (present, absent): (Vec<&str>, Vec<&str>) = BUILD_PACKAGES
        .iter()
        .chain(TOOL_PACKAGES)
        .partition(|package| {
            exec::probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .is_some_and(|status| status == "install ok installed")
        });
    if !present.is_empty() {
        println!("ok: apt packages already installed: {}", present.join(" "));
    }
    if absent.is_empty() {
        return Ok(true);
    }
    if mode == Mode::Check {
        println!("missing: apt packages {}", absent.join(" "));
        return Ok(false);
    }
    println!("install: apt packages {}", absent.join(" "));
    // Package lists on a fresh machine can be stale or absent, and
    // llvm-22-dev is only in bookworm-security.
    exec::run(Command::new("apt-get").arg("update"))?;
    if absent.contains(&"tshark") {
        // wireshark-common asks whether non-root users may capture; answer
        // beforehand so the install never waits for a terminal (CI has none).
        exec::run_with_stdin(
            &mut Command::new("debconf-set-selections"),
            "wireshark-common wireshark-common/install-setuid boolean false\n",
        )?;
    }
    exec::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&absent),
    )?;
    Ok(true)
}

fn rust_toolchains(mode: Mode) -> Result<bool> {
    // nightly builds mesh-ebpf with -Z build-std=core (there is no prebuilt
    // core for bpfel-unknown-none), which needs rust-src; stable runs the
    // host build and ci's fmt and clippy.
    let wanted: [(&str, &[&str]); 2] = [
        ("nightly", &["rust-src"]),
        ("stable", &["rustfmt", "clippy"]),
    ];
    let Some(installed) = exec::probe(Command::new("rustup").args(["toolchain", "list"])) else {
        let why = "`rustup toolchain list` failed: the project needs rustup (https://rustup.rs) \
                   to have a nightly beside stable";
        match mode {
            Mode::Fix => bail!("{why}"),
            Mode::Check => {
                println!("missing: rustup ({why})");
                return Ok(false);
            }
        }
    };
    let mut complete = true;
    for (toolchain, components) in wanted {
        if !has_toolchain(&installed, toolchain) {
            if mode == Mode::Check {
                println!(
                    "missing: rust toolchain {toolchain} (with {})",
                    components.join(", ")
                );
                complete = false;
                continue;
            }
            println!("install: rust toolchain {toolchain}");
            exec::run(
                Command::new("rustup")
                    .args(["toolchain", "install", toolchain, "--profile", "minimal"])
                    .args(components.iter().flat_map(|c| ["--component", c])),
            )?;
            continue;
        }
        let listed = exec::probe(Command::new("rustup").args([
            "component",
            "list",
            "--toolchain",
            toolchain,
            "--installed",
        ]))
        .with_context(|| format!("cannot list the components of toolchain {toolchain}"))?;
        // Components are listed as `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
        let (present, absent): (Vec<&str>, Vec<&str>) = components.iter().partition(|component| {
            listed
                .lines()
                .any(|line| line == **component || line.starts_with(&format!("{component}-")))
        });
        if !present.is_empty() {
            println!("ok: {toolchain} toolchain has {}", present.join(", "));
        }
        if absent.is_empty() {
            continue;
        }
        if mode == Mode::Check {
            println!("missing: {toolchain} components {}", absent.join(", "));
            complete = false;
            continue;
        }
        println!("install: {toolchain} components {}", absent.join(", "));
        exec::run(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", toolchain])
                .args(&absent),
        )?;
    }
    Ok(complete)
}

/// Whether `rustup toolchain list` output has `name` itself, as in
/// `nightly-x86_64-unknown-linux-gnu (active)`, and not merely a dated
/// `nightly-2026-01-01-...` beside it.
fn has_toolchain(list: &str, name: &str) -> bool {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|toolchain| {
            toolchain == name
                || toolchain
                    .strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
        })
}

/// The version of the bpf-linker on PATH, if it runs: `bpf-linker 0.13.0`.
pub fn bpf_linker_version() -> Option<String> {
    let out = exec::probe(Command::new("bpf-linker").arg("--version"))?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

fn bpf_linker(mode: Mode) -> Result<bool> {
    let found = bpf_linker_version();
    let what = match &found {
        Some(version) if version.starts_with(BPF_LINKER_SERIES) => {
            println!("ok: bpf-linker {version} already installed");
            return Ok(true);
        }
        Some(version) => format!("bpf-linker {BPF_LINKER_VERSION} (found {version})"),
        None => format!("bpf-linker {BPF_LINKER_VERSION}"),
    };
    if mode == Mode::Check {
        println!("missing: {what}");
        return Ok(false);
    }
    println!("install: {what}");
    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        // --force: a broken install of the right version (say, its libLLVM
        // went away) would otherwise be left as is.
        cmd.args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
        ]);
        if locked {
            cmd.arg("--locked");
        }
        cmd.args(["--no-default-features", "--features", "llvm-22"])
            // Without LLVM_PREFIX bpf-linker's build script takes
            // /usr/bin/llvm-config, which is LLVM 14 on bookworm, and
            // fails to link -lLLVM; llvm-sys reads the other one.
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            // Build in cargo's own temporary directory rather than a target
            // dir set for the workspace, and away from its config files.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .current_dir(env::temp_dir());
        exec::run(&mut cmd)
    };
    if let Err(err) = install(true) {
        println!("warning: {err:#}; retrying without --locked");
        install(false)?;
    }
    match bpf_linker_version() {
        Some(version) if version.starts_with(BPF_LINKER_SERIES) => {
            println!("ok: bpf-linker {version} installed");
            Ok(true)
        }
        other => bail!(
            "installed bpf-linker {BPF_LINKER_VERSION}, but the bpf-linker on PATH reports {other:?}: \
             is cargo's bin directory (~/.cargo/bin) on PATH, and ahead of any other bpf-linker?"
        ),
    }
}

/// The version of cargo-mutants cargo finds, if any: `cargo-mutants 27.1.0`.
pub fn cargo_mutants_version() -> Option<String> {
    let out = exec::probe(Command::new("cargo").args(["mutants", "--version"]))?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

/// Installs cargo-mutants if it is missing (for `cargo xtask mutants`).
pub fn ensure_cargo_mutants() -> Result<()> {
    cargo_mutants(Mode::Fix).map(drop)
}

fn cargo_mutants(mode: Mode) -> Result<bool> {
    let what = match cargo_mutants_version() {
        Some(version) if version.starts_with(CARGO_MUTANTS_SERIES) => {
            println!("ok: cargo-mutants {version} already installed");
            return Ok(true);
        }
        Some(version) => format!("cargo-mutants {CARGO_MUTANTS_VERSION} (found {version})"),
        None => format!("cargo-mutants {CARGO_MUTANTS_VERSION}"),
    };
    if mode == Mode::Check {
        println!("missing: {what}");
        return Ok(false);
    }
    println!("install: {what}");
    exec::run(
        Command::new("cargo")
            .args(["install", "cargo-mutants", "--locked", "--force"])
            .args(["--version", CARGO_MUTANTS_VERSION])
            // As for bpf-linker: cargo's own temporary build directory.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .current_dir(env::temp_dir()),
    )?;
    match cargo_mutants_version() {
        Some(version) if version.starts_with(CARGO_MUTANTS_SERIES) => {
            println!("ok: cargo-mutants {version} installed");
            Ok(true)
        }
        other => bail!(
            "installed cargo-mutants {CARGO_MUTANTS_VERSION}, but `cargo mutants --version` \
             reports {other:?}: is cargo's bin directory (~/.cargo/bin) on PATH?"
        ),
    }
}

/// Mount point and filesystem type of every line of /proc/mounts.
fn mounts() -> Result<Vec<(String, String)>> {
    let text = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
        .collect())
}

fn bpffs(mode: Mode) -> Result<bool> {
    // The agent pins its maps and links under /sys/fs/bpf/mesh. It can mount
    // bpffs itself, but the tests should not depend on that path being taken.
    if mounts()?
        .iter()
        .any(|(at, fs)| at == "/sys/fs/bpf" && fs == "bpf")
    {
        println!("ok: bpffs mounted at /sys/fs/bpf");
        return Ok(true);
    }
    if mode == Mode::Check {
        println!("missing: bpffs at /sys/fs/bpf");
        return Ok(false);
    }
    println!("mount: bpffs at /sys/fs/bpf");
    exec::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    Ok(true)
}

fn cgroup2(mode: Mode) -> Result<bool> {
    let mounts = mounts()?;
    let is_cgroup2 = |at: &str| mounts.iter().any(|(m, fs)| m == at && fs == "cgroup2");
    if let Some(root) = CGROUP2_ROOTS.iter().find(|root| is_cgroup2(root)) {
        println!("ok: cgroup v2 mounted at {root}");
        return Ok(true);
    }
    // Mounting it is the host's business (it decides the cgroup layout), so
    // this only explains what is wrong.
    let elsewhere: Vec<&str> = mounts
        .iter()
        .filter(|(_, fs)| fs == "cgroup2")
        .map(|(at, _)| at.as_str())
        .collect();
    let mut why = String::from(
        "no cgroup v2 mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified; the agent attaches \
         its programs to a cgroup v2 (boot with systemd.unified_cgroup_hierarchy=1, or \
         `mount -t cgroup2 none /sys/fs/cgroup/unified` on a hybrid host)",
    );
    if !elsewhere.is_empty() {
        why.push_str(&format!("; cgroup2 is mounted at {}", elsewhere.join(", ")));
    }
    match mode {
        Mode::Fix => bail!("{why}"),
        Mode::Check => {
            println!("missing: {why}");
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::has_toolchain;

    #[test]
    fn toolchain_names_match_the_channel_not_dated_ones() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-2026-05-19-x86_64-unknown-linux-gnu\n\
                    1.95.0-x86_64-unknown-linux-gnu";
        assert!(has_toolchain(list, "stable"));
        assert!(!has_toolchain(list, "nightly"));
        assert!(has_toolchain("nightly-x86_64-unknown-linux-gnu", "nightly"));
    }
}
