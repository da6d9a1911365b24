//! Builds the kernel programs (`mesh-ebpf`) for `bpfel-unknown-none` with the
//! nightly toolchain and bpf-linker, and leaves the object in `OUT_DIR/mesh`
//! where `capture` embeds it. `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    // The programs compile against mesh-common too (ports, map layouts);
    // aya-build only watches mesh-ebpf itself.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-common")
    );
    let package = aya_build::Package {
        name: "mesh-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}
