//! `cargo xtask code-order`: writes `mesh-agent/code-order.txt`, the release
//! agent's functions that the benchmark's runs execute, which its build
//! script hands to the linker so that they are laid out together.
//!
//! Which pages of the binary a run touches cannot be read from the agent's
//! RSS: the kernel maps the 64 KiB around each faulted page (fault-around),
//! and reads up to the device's read-ahead (8 MiB here) around it. So the
//! agent runs from a file system of its own, on a loop device with
//! read-ahead off and its cache empty: every page of the binary in the page
//! cache afterwards is one that some agent faulted (fault-around maps only
//! pages already cached). A function whose first page was faulted is
//! listed, in the order of the binary it came from.

use std::{
    collections::{BTreeSet, HashSet},
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{bench, exec};

#[derive(clap::Args)]
pub struct Options {
    /// Also list the functions that enrolling pods and storing workloads
    /// runs (the bench's idle placement), after those of the traffic runs.
    #[arg(long)]
    pub idle: bool,
}

const PAGE: u64 = 4096;

pub fn run(opts: &Options) -> Result<()> {
    let root = crate::workspace_root();
    let scratch = root.join("target/code-order");
    fs::create_dir_all(&scratch)?;
    exec::run(
        Command::new("cargo")
            .args([
                "build",
                "-p",
                "mesh-agent",
                "-p",
                "mesh-tests",
                "--bins",
                "--release",
            ])
            .current_dir(&root),
    )?;
    let built = bench::target_dir(&root).join("release/mesh-agent");
    let mnt = Mount::new(&scratch)?;
    let agent = mnt.dir.join("mesh-agent");
    fs::copy(&built, &agent).with_context(|| format!("copying {}", built.display()))?;
    // Mounted again: an empty page cache for the copy.
    mnt.remount()?;
    // SAFETY: set before any thread of this process is started (the bench
    // below starts them).
    unsafe { std::env::set_var("MESH_AGENT_BIN", &agent) };
    let mut rounds = vec![vec![
        bench::Placement::CrossNode,
        bench::Placement::SameNode,
    ]];
    if opts.idle {
        rounds.push(vec![bench::Placement::Idle]);
    }
    let mut listed = HashSet::new();
    let mut order = Vec::new();
    let symbols = Symbols::read(&agent)?;
    for (round, placements) in rounds.into_iter().enumerate() {
        bench::run(&bench::Options {
            quick: false,
            reps: 1,
            seconds: 3.0,
            out: Some(scratch.join(format!("bench-{round}.json"))),
            paths: vec![bench::Path::MeshEbpf],
            placements,
            figures: Vec::new(),
            profile: false,
        })?;
        let cached = cached_pages(&agent)?;
        let names = symbols.entered(&cached);
        println!(
            "round {round}: {} pages of the binary were faulted, the first pages of {} functions",
            cached.len(),
            names.len()
        );
        for name in names {
            if listed.insert(name.clone()) {
                order.push(name);
            }
        }
    }
    drop(mnt);
    let out = root.join("mesh-agent/code-order.txt");
    fs::write(&out, order.join("\n") + "\n")?;
    println!("{} functions listed in {}", order.len(), out.display());
    Ok(())
}

/// An ext4 image on a loop device with read-ahead off, mounted under the
/// scratch directory; unmounted and detached when dropped.
struct Mount {
    image: PathBuf,
    device: String,
    dir: PathBuf,
}

impl Mount {
    fn new(scratch: &Path) -> Result<Mount> {
        let image = scratch.join("image");
        let dir = scratch.join("mnt");
        fs::create_dir_all(&dir)?;
        let file = fs::File::create(&image)?;
        file.set_len(512 << 20)?;
        drop(file);
        exec::run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        let device = exec::probe(Command::new("losetup").args(["-f", "--show"]).arg(&image))
            .context("losetup could not attach the image to a loop device")?;
        let mount = Mount { image, device, dir };
        let name = mount.device.trim_start_matches("/dev/");
        fs::write(format!("/sys/block/{name}/queue/read_ahead_kb"), "0")
            .context("turning read-ahead off on the loop device")?;
        mount.mount()?;
        Ok(mount)
    }

    fn mount(&self) -> Result<()> {
        exec::run(Command::new("mount").arg(&self.device).arg(&self.dir))
    }

    fn remount(&self) -> Result<()> {
        exec::run(Command::new("umount").arg(&self.dir))?;
        self.mount()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = fs::remove_file(&self.image);
    }
}

/// The pages of `file` in the page cache (`mincore` of a mapping of it).
fn cached_pages(file: &Path) -> Result<BTreeSet<u64>> {
    let f = fs::File::open(file)?;
    let len = f.metadata()?.len() as usize;
    // SAFETY: a private read-only mapping of a file no one writes, unmapped
    // below; mincore writes one byte per page into a vector of that size.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        if addr == libc::MAP_FAILED {
            bail!(
                "mmap {}: {}",
                file.display(),
                std::io::Error::last_os_error()
            );
        }
        let mut vec = vec![0u8; len.div_ceil(PAGE as usize)];
        let rc = libc::mincore(addr, len, vec.as_mut_ptr());
        let err = std::io::Error::last_os_error();
        libc::munmap(addr, len);
        ensure!(rc == 0, "mincore {}: {err}", file.display());
        Ok(vec
            .iter()
            .enumerate()
            .filter(|(_, v)| *v & 1 == 1)
            .map(|(i, _)| i as u64)
            .collect())
    }
}

/// The binary's functions and read-only data with their file offsets.
struct Symbols {
    /// (is data, address, file offset, name), in address order.
    list: Vec<(bool, u64, u64, String)>,
}

impl Symbols {
    fn read(binary: &Path) -> Result<Symbols> {
        // Section address -> file offset, from `readelf -SW`.
        let sections = exec::probe(Command::new("readelf").arg("-SW").arg(binary))
            .context("readelf (binutils) is needed")?;
        let mut ranges = Vec::new();
        for line in sections.lines() {
            let f: Vec<String> = line
                .replace("[ ", "[")
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if f.len() < 7 || !f[1].starts_with('.') || f[2] == "NOBITS" {
                continue;
            }
            let (Ok(addr), Ok(off), Ok(size)) = (
                u64::from_str_radix(&f[3], 16),
                u64::from_str_radix(&f[4], 16),
                u64::from_str_radix(&f[5], 16),
            ) else {
                continue;
            };
            if addr != 0 && (f[1] == ".text" || f[1].starts_with(".rodata")) {
                ranges.push((addr, off, size, f[1] != ".text"));
            }
        }
        let nm = exec::probe(
            Command::new("nm")
                .args(["--defined-only", "-S"])
                .arg(binary),
        )
        .context("nm (binutils) is needed")?;
        let mut list = Vec::new();
        for line in nm.lines() {
            let mut f = line.splitn(4, ' ');
            let (Some(addr), Some(size), Some(_), Some(name)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            let (Ok(addr), Ok(size)) =
                (u64::from_str_radix(addr, 16), u64::from_str_radix(size, 16))
            else {
                continue;
            };
            if size == 0 {
                continue;
            }
            if let Some(&(a, o, _, data)) = ranges
                .iter()
                .find(|(a, _, s, _)| (*a..a + s).contains(&addr))
            {
                list.push((data, addr, addr - a + o, name.to_owned()));
            }
        }
        list.sort();
        ensure!(
            !list.is_empty(),
            "no symbols in {} (stripped?)",
            binary.display()
        );
        Ok(Symbols { list })
    }

    /// The functions (then data) whose first page is among `pages`.
    fn entered(&self, pages: &BTreeSet<u64>) -> Vec<String> {
        self.list
            .iter()
            .filter(|(_, _, off, _)| pages.contains(&(off / PAGE)))
            .map(|(_, _, _, name)| name.clone())
            .collect()
    }
}
