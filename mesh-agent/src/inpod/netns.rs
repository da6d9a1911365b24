//! A handle on a pod's network namespace, and the one way the agent works
//! inside it: switch the calling thread in, create sockets, switch back.
//! Sockets keep the namespace they were created in, so only socket creation
//! (never an `.await`) happens while the thread is switched.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use std::os::unix::fs::OpenOptionsExt as _;

use nix::sched::{CloneFlags, setns};

/// `statfs` magic of nsfs, where netns handles live.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The netns cookie the kernel gives a network namespace
/// (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`). Not a socket cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct NetnsCookie(pub u64);

impl std::fmt::Display for NetnsCookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not a network namespace handle (expected a file on nsfs, such as /run/netns/NAME or /proc/PID/ns/net)"
    )]
    NotNetns { path: PathBuf },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("reading the cookie of network namespace {path}: {source}")]
    Cookie { path: PathBuf, source: io::Error },
}

/// The namespace the agent started in; threads return to it after each visit.
static HOME: OnceLock<File> = OnceLock::new();

fn home() -> &'static File {
    HOME.get_or_init(|| {
        File::open("/proc/thread-self/ns/net")
            .expect("the agent's own network namespace is readable")
    })
}

/// Records the agent's own namespace. Call once at start, before any thread
/// enters a pod namespace.
pub fn init_home() {
    let _ = home();
}

#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
    cookie: NetnsCookie,
    /// The nsfs inode: what `stat` of any handle on this namespace shows,
    /// so a path can be checked against it without entering it.
    inode: u64,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        // Non-blocking: a FIFO (or a device) given as a netns path must not
        // hang the open; the nsfs check below then refuses it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| NetnsError::Open {
                path: path.to_owned(),
                source,
            })?;
        let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| NetnsError::Open {
            path: path.to_owned(),
            source: e.into(),
        })?;
        if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(NetnsError::NotNetns {
                path: path.to_owned(),
            });
        }
        let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata().map_err(|source| {
            NetnsError::Open {
                path: path.to_owned(),
                source,
            }
        })?);
        let mut netns = Netns {
            path: path.to_owned(),
            file,
            cookie: NetnsCookie(0),
            inode,
        };
        let cookie = netns
            .run(|| {
                let probe =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                netns_cookie_of(probe.as_fd())
            })?
            .map_err(|source| NetnsError::Cookie {
                path: path.to_owned(),
                source,
            })?;
        netns.cookie = cookie;
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cookie(&self) -> NetnsCookie {
        self.cookie
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `f` with the calling thread inside this namespace. `f` must not
    /// block on anything but its own syscalls. The thread returns home when
    /// `f` returns and also when it panics: a worker thread left in a pod's
    /// namespace would open later sockets there.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let _home = ReturnHome;
        Ok(f())
    }
}

/// Moves the thread back to the agent's namespace when dropped, on return
/// and on unwind alike.
struct ReturnHome;

impl Drop for ReturnHome {
    fn drop(&mut self) {
        // A thread left in a pod's namespace would open the next pod's
        // sockets in the wrong place: better to stop the agent than to carry
        // on.
        if let Err(e) = setns(home(), CloneFlags::CLONE_NEWNET) {
            eprintln!("fatal: cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `SO_NETNS_COOKIE` (kernel >= 5.14) of the namespace a socket lives in.
pub fn netns_cookie_of(socket: BorrowedFd<'_>) -> io::Result<NetnsCookie> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for a u64 option.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NetnsCookie(cookie))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie_here() -> NetnsCookie {
        let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("a socket");
        netns_cookie_of(probe.as_fd()).expect("SO_NETNS_COOKIE")
    }

    /// Needs root (a new network namespace): fails without it.
    #[test]
    fn a_panic_inside_a_pod_namespace_leaves_the_thread_back_home() {
        init_home();
        // A namespace of its own, made by a thread that then exits; the
        // handle keeps it alive.
        let handle = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare (needs root)");
            File::open("/proc/thread-self/ns/net").expect("own netns handle")
        })
        .join()
        .expect("helper thread");
        let path = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
        let ns = Netns::open(&path).expect("open the new namespace");
        let home = cookie_here();
        assert_ne!(ns.cookie(), home);
        assert_eq!(ns.run(cookie_here).expect("enter"), ns.cookie());
        let r = std::panic::catch_unwind(|| ns.run(|| panic!("a closure panics inside")));
        assert!(r.is_err());
        assert_eq!(cookie_here(), home, "the thread went back home on unwind");
    }
}
