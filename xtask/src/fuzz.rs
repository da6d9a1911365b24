//! `cargo xtask fuzz`: runs the agent's fuzz targets (`mesh-agent/src/fuzz.rs`:
//! policy YAML, a CONNECT's authority and metadata headers, a CA
//! certificate request, an API object) for a bounded time each, from the seeds in `fuzz/corpus/`. A
//! crashing input is saved in `fuzz/artifacts/<target>/` and fails the run.
//! The targets are ignored unit tests of the agent, so they build with the
//! unit tests' own build and the stable toolchain; `setup` needs to add
//! nothing for them.

use std::process::Command;

use anyhow::Result;

use crate::exec;

/// Every target, as named in `fuzz/corpus/`.
pub const TARGETS: &[&str] = &[
    "policy_yaml",
    "hbone_connect",
    "hbone_headers",
    "csr",
    "k8s_object",
    "tls_hello",
];

#[derive(clap::Args)]
pub struct Options {
    /// Seconds per target.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
    /// Start of the mutation sequence (a run is reproducible from it).
    #[arg(long, default_value_t = 0x9e37_79b9_7f4a_7c15)]
    pub seed: u64,
    /// Targets to run (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
}

pub fn run(options: &Options) -> Result<()> {
    let root = crate::workspace_root();
    let targets: Vec<&str> = if options.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        options.targets.iter().map(String::as_str).collect()
    };
    for target in targets {
        exec::run(
            Command::new("cargo")
                .current_dir(&root)
                .args(["test", "-p", "mesh-agent", "--", "--ignored", "--exact"])
                .arg(format!("fuzz::fuzz_{target}"))
                .arg("--nocapture")
                .env("MESH_FUZZ_SECONDS", options.seconds.to_string())
                .env("MESH_FUZZ_SEED", options.seed.to_string()),
        )?;
    }
    Ok(())
}
