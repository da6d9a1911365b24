//! Rebuild when the bpf-linker binary changes: building this crate for
//! `bpfel-unknown-none` links with it, a dependency cargo cannot see.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found; run `cargo xtask setup`"),
    }
}
