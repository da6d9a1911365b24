//! The two kernel filesystems capture needs: bpffs for pins, cgroup v2 to
//! attach to.

use std::path::{Path, PathBuf};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(
        "{path} is not on a bpf filesystem and mounting one at /sys/fs/bpf failed: {source} (the agent needs CAP_SYS_ADMIN, or mount bpffs yourself)"
    )]
    NoBpffs { path: PathBuf, source: nix::Error },
    #[error("{path} is not on a bpf filesystem (pins must live on bpffs, e.g. under /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
    #[error(
        "cgroup {path} is not a cgroup v2 directory: capture needs cgroup v2 (try /sys/fs/cgroup or /sys/fs/cgroup/unified)"
    )]
    NotCgroup2 { path: PathBuf },
}

fn magic(path: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|s| s.filesystem_type().0)
}

/// Makes sure `dir` (or its nearest existing parent) is on bpffs, mounting
/// bpffs at /sys/fs/bpf when nothing is mounted there yet.
///
/// With `mount_if_missing` false (in a container), a missing bpffs is an
/// error: one mounted inside the container would go away with it, taking
/// the pins and the pods' fail-closed protection along.
pub fn ensure_bpffs(dir: &Path, mount_if_missing: bool) -> Result<(), FsError> {
    let sysfs_bpf = Path::new("/sys/fs/bpf");
    if mount_if_missing && dir.starts_with(sysfs_bpf) && magic(sysfs_bpf) != Some(BPF_FS_MAGIC) {
        nix::mount::mount(
            Some("bpf"),
            sysfs_bpf,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| FsError::NoBpffs {
            path: dir.to_owned(),
            source,
        })?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if magic(existing) != Some(BPF_FS_MAGIC) {
        return Err(FsError::NotBpffs {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

pub fn ensure_cgroup2(path: &Path) -> Result<(), FsError> {
    if magic(path) != Some(CGROUP2_SUPER_MAGIC) {
        return Err(FsError::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// The cgroup v2 root of this machine: /sys/fs/cgroup on a unified host,
/// /sys/fs/cgroup/unified on a hybrid one.
pub fn default_cgroup_root() -> PathBuf {
    for p in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if magic(Path::new(p)) == Some(CGROUP2_SUPER_MAGIC) {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("/sys/fs/cgroup")
}
