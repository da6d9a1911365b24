//! `cargo xtask mutants`: mutation testing of the security core with
//! cargo-mutants. Each mutant (a `==` turned `!=`, a function returning a
//! constant, a match arm deleted) of the policy evaluation, the matcher,
//! PeerAuthentication and the certificate verifiers is built and the agent's
//! unit tests run against it; a mutant the tests do not notice (MISSED) is a
//! decision nothing checks. Not part of `ci`: a full run takes about 22
//! minutes on two cores.
//!
//! cargo-mutants cannot write the mutants that would allow or accept
//! everything (`Decision` and rustls' verdicts have no `Default`): they are
//! listed as unviable. Made by hand, each fails a unit test.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::{exec, setup};

/// The files mutated: what decides allow or deny, and accept or refuse.
const FILES: &[&str] = &[
    "mesh-agent/src/state/policy.rs",
    "mesh-agent/src/state/matcher.rs",
    "mesh-agent/src/state/peer_auth.rs",
    "mesh-agent/src/identity/verify.rs",
];

/// The unit tests run against each mutant: those of the policies, the
/// waypoint, the store and the handshakes, about 2 s where all of the
/// agent's take 13 s (the file and API sources wait on watchers). A full
/// run against all of them caught no mutant these miss; `--all-tests`
/// checks that again. A filter can only add survivors, never hide one.
const TEST_FILTER: &[&str] = &[
    "state::policy",
    "state::peer_auth",
    "state::waypoint_tests",
    "state::tests::",
    "identity::tests::handshake",
];

#[derive(clap::Args)]
pub struct Options {
    /// Mutate the working tree and reuse its build (faster; do not edit,
    /// build or commit in it while this runs). Without it the tree is copied
    /// and built in target/mutants/build.
    #[arg(long)]
    pub in_place: bool,
    /// Only the mutants whose name matches this regex (repeatable), e.g.
    /// `--re evaluate --re verify_client_cert`.
    #[arg(long)]
    pub re: Vec<String>,
    /// List the mutants without testing them.
    #[arg(long)]
    pub list: bool,
    /// Run all of the agent's unit tests against each mutant, not only
    /// those of the code mutated (slower; to check the filter).
    #[arg(long)]
    pub all_tests: bool,
    /// Seconds a mutant's tests may run before it counts as a timeout.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

pub fn run(options: &Options) -> Result<()> {
    let root = crate::workspace_root();
    setup::ensure_cargo_mutants()?;
    let out = root.join("target/mutants");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["mutants", "--package", "mesh-agent", "--colors", "never"])
        // The workspace's .cargo/mutants.toml, if someone adds one, would
        // change what this run means.
        .arg("--no-config");
    for file in FILES {
        cmd.args(["--file", file]);
    }
    for re in &options.re {
        cmd.args(["--re", re]);
    }
    if options.list {
        return exec::run(cmd.arg("--list"));
    }
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    cmd.arg("--output").arg(&out);
    if options.in_place {
        // --in-place cannot take --jobs: it is one job by nature.
        cmd.arg("--in-place");
    } else {
        // A copy of the tree (in a temporary directory) built in a target
        // dir of its own that outlives the run: the dependencies are built
        // once, the working tree's build is left alone, and the tree can be
        // edited meanwhile. The eBPF object is rebuilt once per run (its
        // build script watches the copy's paths).
        cmd.args(["--jobs", "1"])
            .env("CARGO_TARGET_DIR", out.join("build"));
    }
    cmd.args(["--timeout", &options.timeout.to_string()])
        .args(["--build-timeout", "900"])
        // The agent's unit tests: not the namespaced tests (another
        // package) nor the ignored fuzz targets.
        .args(["--", "--bins"]);
    if !options.all_tests {
        cmd.arg("--").args(TEST_FILTER);
    }
    let result = exec::run(&mut cmd);
    let reported = report(&out.join("mutants.out"));
    // cargo-mutants exits 2 when mutants were missed and 3 on timeouts
    // (then the report says which); 1 or 4 when it could not run them,
    // baseline tests failing included (then its own output says why).
    result.context("mutants survived or timed out, or the run failed (see above)")?;
    reported
}

/// Prints the surviving and timed-out mutants the run left in `dir`.
fn report(dir: &Path) -> Result<()> {
    let read = |name: &str| -> Result<Vec<String>> {
        let path = dir.join(name);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(text.lines().map(str::to_owned).collect())
    };
    let (caught, missed, timeout, unviable) = (
        read("caught.txt")?,
        read("missed.txt")?,
        read("timeout.txt")?,
        read("unviable.txt")?,
    );
    println!();
    for file in FILES {
        let count = |list: &[String]| list.iter().filter(|m| m.starts_with(file)).count();
        println!(
            "mutants: {file}: {} caught, {} missed, {} timeouts, {} unviable",
            count(&caught),
            count(&missed),
            count(&timeout),
            count(&unviable)
        );
    }
    for m in &missed {
        println!("MISSED  {m}");
    }
    for m in &timeout {
        println!("TIMEOUT {m}");
    }
    println!("mutants: outcomes and logs in {}", dir.display());
    Ok(())
}
