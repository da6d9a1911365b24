//! `cargo xtask image`: the agent's container image (the waypoint runs the
//! same binary), built from scratch with buildah so nothing is pulled from a
//! registry. The image holds the stripped release binary (its eBPF object is
//! embedded), the shared libraries it and `iptables` link against (found with
//! `ldd`, copied to the paths the dynamic loader looks in), iptables-nft with
//! its extension modules for the fallback capture mode, the system trust
//! roots (Debian's CA bundle), and a non-root
//! default user. It is written as an OCI archive with gzip layers, dated by
//! the source commit so two builds of one tree are the same image.
//!
//! `--test` then runs the smoke test (see [`smoke`]).

mod smoke;

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::exec;

#[derive(clap::Args)]
pub struct Options {
    /// Then run the smoke test: the image under podman exactly as
    /// deploy/daemonset.yaml runs it, with the testbed's pods.
    #[arg(long)]
    pub test: bool,
    /// From the debug build (what `cargo xtask ci` has built already)
    /// instead of the release one, tagged `-debug`: the same image but for
    /// the binary's speed and size. CI's smoke test uses it.
    #[arg(long)]
    pub debug: bool,
}

/// The image's name; the DaemonSet names it `mesh-agent` too (kustomize
/// replaces the tag).
pub const NAME: &str = "mesh-agent";
/// The image's default user: the waypoint runs as it (deploy/waypoint); the
/// node agent's DaemonSet overrides it with root (see there why).
const NONROOT: u32 = 65532;
/// The system trust roots: where they are on Debian, and in the image.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Where xtables-nft-multi is, and the names the agent calls it by.
const XTABLES: &str = "/usr/sbin/xtables-nft-multi";
const XTABLES_NAMES: &[&str] = &[
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
];

/// The debug build of the agent and the test app.
const SMOKE_BUILD: &[&str] = &["build", "-p", "mesh-agent", "-p", "mesh-tests", "--bins"];

/// What a build made.
pub struct Built {
    /// The OCI archive (`podman load -i`, `skopeo copy oci-archive:...`).
    pub archive: PathBuf,
    /// `sha256:...` of the image's configuration: the same for the same tree.
    pub id: String,
    /// The name and tag in the archive.
    pub reference: String,
}

pub fn run(options: &Options) -> Result<()> {
    crate::setup::ensure()?;
    let built = build(&crate::workspace_root().join("target/image"), options.debug)?;
    if options.test {
        // Built twice from one tree: the same image, or the build is not
        // reproducible.
        let again = build(
            &crate::workspace_root().join("target/image-again"),
            options.debug,
        )?;
        ensure!(
            again.id == built.id,
            "two builds of the same tree gave different images: {} and {}",
            built.id,
            again.id
        );
        println!(
            "image: reproducible: a second build gave the same image {}",
            again.id
        );
        let _ = fs::remove_dir_all(again.archive.parent().expect("in a directory"));
        smoke::run(&built)?;
    }
    Ok(())
}

/// The version and the source revision the image is labelled with, and
/// the time its files and configuration are dated (the commit's).
fn source() -> Result<(String, String, String)> {
    let root = crate::workspace_root();
    let git = |args: &[&str]| {
        exec::probe(Command::new("git").current_dir(&root).args(args))
            .with_context(|| format!("git {}", args.join(" ")))
    };
    let mut revision = git(&["rev-parse", "HEAD"])?;
    // Uncommitted changes: not the commit's content, and said so.
    if !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty() {
        revision.push_str("-dirty");
    }
    let time = git(&["log", "-1", "--format=%ct"])?;
    Ok((env!("CARGO_PKG_VERSION").to_owned(), revision, time))
}

/// Builds the image into `out` (emptied first): `out/rootfs` is what goes
/// in, `out/mesh-agent.oci.tar` the image.
pub fn build(out: &Path, debug: bool) -> Result<Built> {
    let root = crate::workspace_root();
    let mut cargo = Command::new("cargo");
    cargo.current_dir(&root);
    if debug {
        // The build the demo and the smoke test make (the test app too):
        // another package set unifies features differently, and cargo
        // would rebuild rustls and the agent each time the two alternate.
        cargo.args(SMOKE_BUILD);
    } else {
        cargo.args(["build", "--release", "-p", "mesh-agent"]);
    }
    exec::run(&mut cargo)?;
    let profile = if debug { "debug" } else { "release" };
    let (mut version, revision, time) = source()?;
    if debug {
        version.push_str("-debug");
    }
    let _ = fs::remove_dir_all(out);
    let rootfs = out.join("rootfs");
    fs::create_dir_all(&rootfs)?;
    stage(
        &root.join("target").join(profile).join("mesh-agent"),
        &rootfs,
    )?;

    let reference = format!("{NAME}:{version}");
    let archive = out.join(format!("{NAME}.oci.tar"));
    let store = out.join("storage");
    let buildah = || {
        let mut c = Command::new("buildah");
        // A store of its own, removed below: the build leaves nothing in
        // the machine's container storage. vfs works on any filesystem.
        c.arg("--root")
            .arg(store.join("root"))
            .arg("--runroot")
            .arg(store.join("run"))
            .args(["--storage-driver", "vfs"]);
        c
    };
    let container = output(buildah().args(["from", "--name", "mesh-agent-build", "scratch"]))?;
    let result = (|| -> Result<()> {
        exec::run(
            buildah()
                .args(["copy", &container])
                .arg(format!("{}/", rootfs.display()))
                .arg("/"),
        )?;
        exec::run(buildah().args([
            "config",
            "--entrypoint",
            r#"["/usr/bin/mesh-agent"]"#,
            "--cmd",
            "",
            "--user",
            &format!("{NONROOT}:{NONROOT}"),
            "--workingdir",
            "/",
            "--env",
            "PATH=/usr/sbin:/usr/bin",
            "--os",
            "linux",
            "--arch",
            "amd64",
            "--label",
            &format!("org.opencontainers.image.title={NAME}"),
            "--label",
            &format!("org.opencontainers.image.version={version}"),
            "--label",
            &format!("org.opencontainers.image.revision={revision}"),
            "--label",
            "org.opencontainers.image.licenses=Apache-2.0",
            &container,
        ]))?;
        exec::run(
            buildah()
                .args(["commit", "--format", "oci", "--timestamp", &time])
                .arg("--disable-compression=false")
                .arg(&container)
                .arg(format!("oci-archive:{}:{reference}", archive.display())),
        )?;
        Ok(())
    })();
    let _ = exec::probe(buildah().args(["rm", &container]));
    let _ = fs::remove_dir_all(&store);
    result?;
    let id = config_digest(&archive)?;
    let unpacked = dir_size(&rootfs)?;
    let packed = fs::metadata(&archive)?.len();
    println!(
        "image: {reference} (id {id}, revision {revision})\n\
         image: {} ({:.1} MB, layers gzip-compressed; {:.1} MB unpacked)\n\
         image: load it with `podman load -i {}`, or push it with `skopeo copy oci-archive:{}:{reference} docker://REGISTRY/{reference}`",
        archive.display(),
        packed as f64 / 1e6,
        unpacked as f64 / 1e6,
        archive.display(),
        archive.display(),
    );
    Ok(Built {
        archive,
        id,
        reference,
    })
}

/// The image ID (the digest of its configuration, as `podman images`
/// shows it) of the single image in an OCI archive.
fn config_digest(archive: &Path) -> Result<String> {
    let member = |name: &str| -> Result<serde_json::Value> {
        let text = quiet(Command::new("tar").arg("-xOf").arg(archive).arg(name))?;
        Ok(serde_json::from_str(&text)?)
    };
    let blob = |digest: &serde_json::Value| -> Result<String> {
        let digest = digest.as_str().context("a digest")?;
        let hex = digest.strip_prefix("sha256:").context("a sha256 digest")?;
        Ok(format!("blobs/sha256/{hex}"))
    };
    let index = member("index.json")?;
    let manifest = member(&blob(&index["manifests"][0]["digest"])?)?;
    manifest["config"]["digest"]
        .as_str()
        .map(str::to_owned)
        .context("the manifest names no configuration")
}

/// Fills `rootfs`: the agent, iptables, their libraries, /etc.
fn stage(agent: &Path, rootfs: &Path) -> Result<()> {
    for dir in ["usr/bin", "usr/sbin", "usr/lib", "etc"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    // Stripped: the release profile keeps line tables for profiling, four
    // fifths of the file; the embedded eBPF object is data and stays.
    let bin = rootfs.join("usr/bin/mesh-agent");
    exec::run(
        Command::new("objcopy")
            .arg("--strip-all")
            .arg(agent)
            .arg(&bin),
    )?;
    let mut elves = vec![agent.to_owned(), PathBuf::from(XTABLES)];
    ensure!(
        Path::new(XTABLES).exists(),
        "{XTABLES} not found: the image's iptables comes from the machine's (apt-get install iptables)"
    );
    copy_file(
        Path::new(XTABLES),
        &rootfs.join(XTABLES.trim_start_matches('/')),
    )?;
    for name in XTABLES_NAMES {
        symlink("xtables-nft-multi", rootfs.join("usr/sbin").join(name))?;
    }
    // The extension modules (`-j REDIRECT`, `-m mark`, ...), loaded from
    // the directory next to libxtables.
    let libxtables = libraries(Path::new(XTABLES))?
        .into_iter()
        .find(|l| {
            l.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libxtables.so"))
        })
        .context("xtables-nft-multi does not link libxtables")?;
    let modules =
        fs::canonicalize(libxtables.parent().expect("a library's directory"))?.join("xtables");
    for entry in fs::read_dir(&modules).with_context(|| format!("{}", modules.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "so") {
            copy_file(&path, &rootfs.join(path.strip_prefix("/")?))?;
            elves.push(path);
        }
    }
    let mut libs = BTreeSet::new();
    for elf in &elves {
        libs.extend(libraries(elf)?);
    }
    for lib in &libs {
        // Under the directory's real path (/lib is /usr/lib on Debian), by
        // the name the loader asks for (the soname, often a symlink).
        let dir = fs::canonicalize(lib.parent().expect("a library's directory"))?;
        let dest = rootfs
            .join(dir.strip_prefix("/")?)
            .join(lib.file_name().expect("a library's name"));
        if !dest.exists() {
            copy_file(&fs::canonicalize(lib)?, &dest)?;
        }
    }
    // Merged /usr, as Debian: the loader's /lib64 path and the libraries'
    // /lib paths resolve.
    for dir in ["lib", "lib64", "bin", "sbin"] {
        if rootfs.join("usr").join(dir).is_dir() && !rootfs.join(dir).exists() {
            symlink(format!("usr/{dir}"), rootfs.join(dir))?;
        }
    }
    fs::write(
        rootfs.join("etc/passwd"),
        format!(
            "root:x:0:0:root:/:/usr/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/:/usr/sbin/nologin\n"
        ),
    )?;
    fs::write(
        rootfs.join("etc/group"),
        format!("root:x:0:\nnonroot:x:{NONROOT}:\n"),
    )?;
    // glibc's own files and DNS lookups (built into libc since 2.34); the
    // runtime mounts /etc/hosts and /etc/resolv.conf.
    fs::write(rootfs.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
    // The system trust roots, where the waypoint's TLS origination looks
    // when a DestinationRule names no CA (Debian's bundle).
    ensure!(
        Path::new(CA_BUNDLE).is_file(),
        "{CA_BUNDLE} not found: the image's trust roots come from the machine's (apt-get install ca-certificates)"
    );
    copy_file(
        Path::new(CA_BUNDLE),
        &rootfs.join(CA_BUNDLE.trim_start_matches('/')),
    )?;
    Ok(())
}

/// The shared libraries `elf` loads, the dynamic loader included, as `ldd`
/// names them.
fn libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = quiet(Command::new("ldd").arg(elf))?;
    parse_ldd(&out).with_context(|| format!("ldd {}", elf.display()))
}

/// The paths in `ldd`'s output: `name => /path (addr)` or `/path (addr)`;
/// the vDSO has none. A library `ldd` did not find is an error.
fn parse_ldd(out: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in out.lines() {
        ensure!(!line.contains("not found"), "a library is missing: {line}");
        let path = line
            .split_once("=>")
            .map_or(line, |(_, p)| p)
            .split_whitespace()
            .next()
            .unwrap_or_default();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Copies a regular file (its content and mode), creating directories.
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to.parent().expect("a file's directory"))?;
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    let mode = fs::metadata(from)?.permissions().mode();
    fs::set_permissions(to, fs::Permissions::from_mode(mode & 0o755))?;
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = fs::symlink_metadata(entry.path())?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Runs `cmd`, echoed, and returns its trimmed standard output; fails with
/// its standard error.
pub fn output(cmd: &mut Command) -> Result<String> {
    println!("$ {}", exec::display(cmd));
    quiet(cmd)
}

/// [`output`] without the echo, for the many small looks at files.
fn quiet(cmd: &mut Command) -> Result<String> {
    let shown = exec::display(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_each_library_and_the_loader() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f01)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let err = parse_ldd("\tlibnftnl.so.11 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libnftnl.so.11"), "{err}");
    }
}
