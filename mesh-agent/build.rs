//! Builds the kernel programs (`mesh-ebpf`) for `bpfel-unknown-none` with the
//! nightly toolchain and bpf-linker, and leaves the object in `OUT_DIR/mesh`
//! where `capture` embeds it. `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    // Paths are taken when the script runs, not when it is compiled: cargo
    // runs one compiled script for checkouts of the same commit at
    // different paths (with one target directory), and a path built in
    // would name another checkout's files.
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    // The programs compile against mesh-common too (ports, map layouts);
    // aya-build only watches mesh-ebpf itself.
    println!("cargo:rerun-if-changed={manifest}/../mesh-common");
    let root_dir = format!("{manifest}/../mesh-ebpf");
    let package = aya_build::Package {
        name: "mesh-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)?;
    code_order(&manifest);
    Ok(())
}

/// The release agent's functions that a run executes (start-up, enrolment,
/// traffic), listed in `code-order.txt`, are laid out together at the start
/// of the text, so that the pages the kernel maps for them (64 KiB around
/// each one faulted) hold little code that never runs (README, Performance:
/// "Agent memory"). Names missing from the build are skipped by the linker,
/// so a stale list costs only resident pages, never correctness. LLD, the
/// default linker of x86_64 Linux, reads the list; other targets link as
/// before.
fn code_order(manifest: &str) {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let file = format!("{manifest}/code-order.txt");
    println!("cargo:rerun-if-changed={file}");
    if var("PROFILE") == "release"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
    {
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={file}");
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
