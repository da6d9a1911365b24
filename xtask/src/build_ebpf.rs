//! `cargo xtask build-ebpf`: builds the kernel object (mesh-ebpf) on its own,
//! the way mesh-agent's build script does through aya-build, for iterating
//! on the eBPF code or inspecting the object without building the agent.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Accepted for symmetry with cargo; the object is always built with the
    /// release profile, as aya-build does: unoptimised BPF code does not get
    /// past bpf-linker and the verifier.
    #[arg(long)]
    release: bool,
    /// Features of mesh-ebpf to build with (`upgrade-test`: a variant whose
    /// programs and map layout differ from the default build, which the
    /// upgrade test loads with `mesh-agent node --ebpf-object`).
    #[arg(long, value_delimiter = ',')]
    features: Vec<String>,
}

const TARGET: &str = "bpfel-unknown-none";
/// The `[[bin]]` of mesh-ebpf, which is the object's file name.
const OBJECT: &str = "mesh";

pub fn run(options: &Options) -> Result<()> {
    let object = build(&crate::workspace_root(), &options.features)?;
    let size = fs::metadata(&object)
        .with_context(|| format!("cargo succeeded but left no {}", object.display()))?
        .len();
    println!("{} ({size} bytes)", object.display());
    Ok(())
}

/// Builds the object into `<root>/target/ebpf` (with features,
/// `target/ebpf-<features>`) and returns its path.
pub fn build(root: &Path, features: &[String]) -> Result<PathBuf> {
    if setup::bpf_linker_version().is_none() {
        bail!("bpf-linker is not on PATH: run `cargo xtask setup`");
    }
    let target_dir = if features.is_empty() {
        root.join("target/ebpf")
    } else {
        root.join(format!("target/ebpf-{}", features.join("-")))
    };
    // The same flags aya-build passes, joined by \x1f (the separator of
    // CARGO_ENCODED_RUSTFLAGS): the host's arch, which aya-ebpf needs to read
    // that arch's pt_regs, and debug info that bpf-linker turns into BTF.
    // xtask runs on the host, so its own arch is the host's.
    let rustflags = [
        &format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    exec::run(
        Command::new("cargo")
            .current_dir(root)
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
            // As in aya-build: a RUSTC or wrapper inherited from an outer
            // (stable) cargo would override the +nightly toolchain.
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .args([
                "+nightly",
                "build",
                "-p",
                "mesh-ebpf",
                "--bins",
                "--release",
            ])
            .args(["--target", TARGET, "-Z", "build-std=core"])
            .args(if features.is_empty() {
                Vec::new()
            } else {
                vec!["--features".to_owned(), features.join(",")]
            })
            .arg("--target-dir")
            .arg(&target_dir),
    )?;
    Ok(target_dir.join(TARGET).join("release").join(OBJECT))
}
