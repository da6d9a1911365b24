//! `cargo xtask mutants`: mutation testing of the security core with
//! cargo-mutants. Each mutant (a `==` turned `!=`, a function returning a
//! constant, a match arm deleted) of the policy evaluation, the matcher,
//! PeerAuthentication and the certificate verifiers is built and the agent's
//! unit tests run against it; a mutant the tests do not notice (MISSED) is a
//! decision nothing checks. Not part of `ci`: a full run takes about 40
//! minutes on two cores.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::{exec, setup};

/// The files mutated: what decides allow or deny, and accept or refuse.
pub const FILES: &[&str] = &[
    "mesh-agent/src/state/policy.rs",
    "mesh-agent/src/state/matcher.rs",
    "mesh-agent/src/state/peer_auth.rs",
    "mesh-agent/src/identity/verify.rs",
];

/// Mutants that cannot change what the agent does, each with the reason
/// (regexes over the names `--list` prints). Anything else that survives
/// fails the run.
const EQUIVALENT: &[(&str, &str)] = &[];

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
    /// Seconds a mutant's tests may run before it counts as a timeout.
    #[arg(long, default_value_t = 120)]
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
    for (re, _) in EQUIVALENT {
        cmd.args(["--exclude-re", re]);
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
        // The agent's unit tests, all of them: the ones that kill mutants
        // are not only in state:: and identity:: (the proxy's and the
        // waypoint's tests decide through the same code). Not the
        // namespaced tests (another package) nor the ignored fuzz targets.
        .args(["--", "--bins"]);
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
