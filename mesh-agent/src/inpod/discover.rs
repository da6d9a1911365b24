//! Finding a pod's network namespace in a cluster, from its UID alone.
//!
//! The kubelet puts every container of a pod (the sandbox's pause process
//! first) in a cgroup whose path names the pod UID:
//! - cgroupfs driver: `/kubepods/besteffort/pod<uid>/<container>`
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with '_' for '-'>.slice/cri-containerd-<id>.scope`
//!
//! So `/proc/<pid>/cgroup` of a process of the pod names the UID, and
//! `/proc/<pid>/ns/net` is the pod's network namespace. This needs the host's
//! PID namespace (`hostPID: true`) and the right to open other processes'
//! namespace files (`CAP_SYS_PTRACE`). It works the same whatever the
//! container runtime is, as long as it follows the kubelet's cgroup naming.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("listing processes in {root}: {source}")]
    Proc { root: PathBuf, source: io::Error },
    #[error("no process of pod UID {uid} under {root} (not started yet, or not on this node)")]
    NotFound { uid: String, root: PathBuf },
}

/// Pod UID → the lowest PID in its cgroup (the sandbox, usually), from one
/// pass over the process table.
#[derive(Debug, Default)]
pub struct ProcessTable {
    root: PathBuf,
    by_uid: HashMap<String, u32>,
}

impl ProcessTable {
    pub fn read(root: &Path) -> Result<ProcessTable, DiscoverError> {
        let err = |source| DiscoverError::Proc {
            root: root.to_owned(),
            source,
        };
        let mut by_uid: HashMap<String, u32> = HashMap::new();
        for entry in fs::read_dir(root).map_err(err)? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Processes come and go while we read: a vanished one is skipped.
            let Ok(cgroups) = fs::read_to_string(entry.path().join("cgroup")) else {
                continue;
            };
            let Some(uid) = cgroups.lines().find_map(pod_uid) else {
                continue;
            };
            by_uid
                .entry(uid)
                .and_modify(|p| *p = (*p).min(pid))
                .or_insert(pid);
        }
        Ok(ProcessTable {
            root: root.to_owned(),
            by_uid,
        })
    }

    /// `<root>/<pid>/ns/net` of a process of the pod.
    pub fn netns(&self, uid: &str) -> Result<PathBuf, DiscoverError> {
        let uid = uid.to_ascii_lowercase();
        let pid = self
            .by_uid
            .get(&uid)
            .ok_or_else(|| DiscoverError::NotFound {
                uid: uid.clone(),
                root: self.root.clone(),
            })?;
        Ok(self.root.join(pid.to_string()).join("ns").join("net"))
    }
}

/// The pod UID in one line of `/proc/PID/cgroup` (`0::/path` on cgroup v2,
/// `N:controllers:/path` on v1), in its usual dashed form.
pub fn pod_uid(line: &str) -> Option<String> {
    let path = line.splitn(3, ':').nth(2)?;
    path.split('/').find_map(|part| {
        // `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid>.slice` (systemd).
        let at = part.rfind("pod")?;
        let rest = part[at + 3..].trim_end_matches(".slice");
        let uid = rest.replace('_', "-").to_ascii_lowercase();
        is_uid(&uid).then_some(uid)
    })
}

/// 8-4-4-4-12 hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f0c3c2e-8d1a-4b7e-9c3d-2a1b0c9d8e7f";

    #[test]
    fn reads_the_uid_of_both_cgroup_drivers_and_nothing_else() {
        let systemd = "0::/kubepods.slice/kubepods-besteffort.slice/\
                       kubepods-besteffort-pod5f0c3c2e_8d1a_4b7e_9c3d_2a1b0c9d8e7f.slice/\
                       cri-containerd-0123abcd.scope";
        let cgroupfs = "0::/kubepods/burstable/pod5f0c3c2e-8d1a-4b7e-9c3d-2a1b0c9d8e7f/0123abcd";
        // Seen from inside the agent's own cgroup namespace.
        let relative = "0::/../../kubepods/pod5F0C3C2E-8D1A-4B7E-9C3D-2A1B0C9D8E7F/x";
        let v1 = "4:memory:/kubepods/pod5f0c3c2e-8d1a-4b7e-9c3d-2a1b0c9d8e7f/abc";
        for line in [systemd, cgroupfs, relative, v1] {
            assert_eq!(pod_uid(line).as_deref(), Some(UID), "{line}");
        }
        for line in [
            "0::/system.slice/containerd.service",
            "0::/kubepods.slice/kubepods-besteffort.slice",
            "0::/kubepods/podnot-a-uid/x",
            "0::/user.slice/pod.slice",
            "garbage",
        ] {
            assert_eq!(pod_uid(line), None, "{line}");
        }
    }

    /// A simulated /proc: the pod's pause and app processes, a host daemon,
    /// a process gone between listing and reading, non-PID entries.
    #[test]
    fn finds_the_pods_lowest_pid_in_a_simulated_proc() {
        let root = std::env::temp_dir().join(format!("mesh-proc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let proc = |pid: &str, cgroup: Option<&str>| {
            let dir = root.join(pid);
            fs::create_dir_all(dir.join("ns")).unwrap();
            fs::write(dir.join("ns/net"), "").unwrap();
            if let Some(c) = cgroup {
                fs::write(dir.join("cgroup"), c).unwrap();
            }
        };
        let pod = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-1.scope\n",
            UID.replace('-', "_")
        );
        proc("4321", Some(&pod));
        proc("987", Some(&pod));
        proc("1", Some("0::/init.scope\n"));
        proc("555", None);
        fs::create_dir_all(root.join("self")).unwrap();
        fs::write(root.join("meminfo"), "").unwrap();

        let table = ProcessTable::read(&root).unwrap();
        assert_eq!(table.netns(UID).unwrap(), root.join("987/ns/net"));
        assert_eq!(
            table.netns(&UID.to_ascii_uppercase()).unwrap(),
            root.join("987/ns/net")
        );
        let other = "00000000-0000-0000-0000-000000000000";
        let err = table.netns(other).unwrap_err().to_string();
        assert!(
            err.contains(other) && err.contains("not started yet"),
            "{err}"
        );
        fs::remove_dir_all(&root).unwrap();
        let err = ProcessTable::read(&root).unwrap_err().to_string();
        assert!(err.contains(&root.display().to_string()), "{err}");
    }
}
