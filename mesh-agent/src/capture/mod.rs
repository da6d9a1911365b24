//! Loads the kernel capture programs, attaches them and owns their maps.
//!
//! Maps and links are pinned under the bpf directory (`--bpf-dir`): an agent
//! restart reuses them, so programs stay attached and enrolled pods keep
//! failing closed while no agent listens. Kernel >= 5.15 (sockops netns
//! cookie), cgroup v2, bpffs.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, SockHash},
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use mesh_common::{AddrKey, ConnKey, Counter, NetnsInfo, OrigDst, PortFlags, maps, programs};

use crate::inpod::netns::{Netns, NetnsCookie};

pub mod fs;

/// The kernel object built by `build.rs` from `mesh-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("loading the eBPF object (maps pinned under {dir}): {source}")]
    Load {
        dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<ProgramError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("pinning link {path}: {source}")]
    Pin { path: PathBuf, source: PinError },
    #[error("pinned link {path}: {source}")]
    PinnedLink { path: PathBuf, source: LinkError },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Fs(#[from] fs::FsError),
    #[error("link is not a file-descriptor link and cannot be pinned: {0}")]
    Link(#[from] LinkError),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> CaptureError {
    move |source| CaptureError::Map {
        name,
        source: Box::new(source),
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> CaptureError {
    move |source| CaptureError::Program {
        name,
        source: Box::new(source),
    }
}

/// What the agent does with the kernel: one per agent process.
pub struct Capture {
    dir: PathBuf,
    /// Holds the loaded programs; attached links are pinned, not owned here.
    ebpf: Mutex<Ebpf>,
    enrolled: Mutex<HashMap<MapData, u64, NetnsInfo>>,
    orig_dst: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    inbound_addrs: Mutex<HashMap<MapData, AddrKey, u64>>,
    listeners: Mutex<SockHash<MapData, AddrKey>>,
    counters: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("dir", &self.dir).finish()
    }
}

impl Capture {
    /// Loads the programs and maps (reusing pinned maps), attaches the cgroup
    /// programs to `cgroup` unless pinned links already hold them, and sets the
    /// excluded ports. Mounts bpffs at /sys/fs/bpf if it is missing and
    /// `mount_bpffs` allows.
    pub fn load(
        dir: &Path,
        cgroup: &Path,
        excluded: &ExcludedPorts,
        mount_bpffs: bool,
    ) -> Result<Self, CaptureError> {
        fs::ensure_bpffs(dir, mount_bpffs)?;
        let map_dir = dir.join("maps");
        let link_dir = dir.join("links");
        for d in [&map_dir, &link_dir] {
            std::fs::create_dir_all(d).map_err(|source| CaptureError::Io {
                path: d.clone(),
                source,
            })?;
        }
        fs::ensure_cgroup2(cgroup)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .load(EBPF_OBJECT)
            .map_err(|source| CaptureError::Load {
                dir: map_dir.clone(),
                source: Box::new(source),
            })?;

        let cgroup_fd = std::fs::File::open(cgroup).map_err(|source| CaptureError::Io {
            path: cgroup.to_owned(),
            source,
        })?;
        for name in [programs::CONNECT4, programs::CONNECT6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            attach_once(&link_dir.join(name), || {
                let id = prog
                    .attach(&cgroup_fd, CgroupAttachMode::default())
                    .map_err(prog_err(name))?;
                Ok(prog.take_link(id).map_err(prog_err(name))?.try_into()?)
            })?;
        }
        {
            let name = programs::SOCKOPS;
            let prog: &mut SockOps = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            attach_once(&link_dir.join(name), || {
                let id = prog
                    .attach(&cgroup_fd, CgroupAttachMode::default())
                    .map_err(prog_err(name))?;
                Ok(prog.take_link(id).map_err(prog_err(name))?.try_into()?)
            })?;
        }
        {
            let name = programs::SK_LOOKUP;
            let prog: &mut SkLookup = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
        }

        let mut excluded_map: HashMap<MapData, u16, u8> =
            take_map(&mut ebpf, maps::EXCLUDED_PORTS)?;
        let stale: Vec<u16> = excluded_map.keys().filter_map(Result::ok).collect();
        for port in stale {
            excluded_map
                .remove(&port)
                .map_err(map_err(maps::EXCLUDED_PORTS))?;
        }
        for (port, flags) in &excluded.0 {
            excluded_map
                .insert(port, flags, 0)
                .map_err(map_err(maps::EXCLUDED_PORTS))?;
        }

        Ok(Capture {
            dir: dir.to_owned(),
            enrolled: Mutex::new(take_map(&mut ebpf, maps::ENROLLED_NETNS)?),
            orig_dst: Mutex::new(take_map(&mut ebpf, maps::ORIG_DST)?),
            inbound_addrs: Mutex::new(take_map(&mut ebpf, maps::INBOUND_ADDRS)?),
            listeners: Mutex::new(take_map(&mut ebpf, maps::INBOUND_LISTENERS)?),
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            ebpf: Mutex::new(ebpf),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sk_lookup_pin(&self, cookie: NetnsCookie) -> PathBuf {
        self.dir.join("links").join(format!("sk_lookup-{cookie}"))
    }

    /// Hands a pod's inbound listener to the kernel: SYNs to `addr` go to it.
    pub fn add_inbound<L: AsRawFd>(
        &self,
        addr: IpAddr,
        cookie: NetnsCookie,
        listener: &L,
    ) -> Result<(), CaptureError> {
        let key = addr_key(addr);
        self.listeners
            .lock()
            .expect("listeners lock")
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(map_err(maps::INBOUND_LISTENERS))?;
        self.inbound_addrs
            .lock()
            .expect("inbound lock")
            .insert(key, cookie.0, 0)
            .map_err(map_err(maps::INBOUND_ADDRS))
    }

    /// Stops inbound capture of `addr`.
    pub fn remove_inbound(&self, addr: IpAddr) -> Result<(), CaptureError> {
        let key = addr_key(addr);
        ignore_missing(
            self.inbound_addrs
                .lock()
                .expect("inbound lock")
                .remove(&key),
        )
        .map_err(map_err(maps::INBOUND_ADDRS))?;
        ignore_missing(self.listeners.lock().expect("listeners lock").remove(&key))
            .map_err(map_err(maps::INBOUND_LISTENERS))
    }

    /// Marks a netns as enrolled: its outbound connects are captured.
    pub fn enroll_netns(&self, cookie: NetnsCookie) -> Result<(), CaptureError> {
        self.enrolled
            .lock()
            .expect("enrolled lock")
            .insert(cookie.0, NetnsInfo::default(), 0)
            .map_err(map_err(maps::ENROLLED_NETNS))
    }

    pub fn unenroll_netns(&self, cookie: NetnsCookie) -> Result<(), CaptureError> {
        ignore_missing(
            self.enrolled
                .lock()
                .expect("enrolled lock")
                .remove(&cookie.0),
        )
        .map_err(map_err(maps::ENROLLED_NETNS))
    }

    /// Attaches inbound capture to a pod netns, reusing a pinned link left by
    /// an earlier agent.
    pub fn attach_sk_lookup(&self, netns: &Netns) -> Result<(), CaptureError> {
        attach_once(&self.sk_lookup_pin(netns.cookie()), || {
            let name = programs::SK_LOOKUP;
            let mut ebpf = self.ebpf.lock().expect("ebpf lock");
            let prog: &mut SkLookup = program(&mut ebpf, name)?;
            let id = prog.attach(netns.as_fd()).map_err(prog_err(name))?;
            Ok(prog.take_link(id).map_err(prog_err(name))?.into())
        })
    }

    /// Detaches inbound capture from a pod netns (by cookie, so that it works
    /// for a namespace that is already gone).
    pub fn detach_sk_lookup(&self, cookie: NetnsCookie) -> Result<(), CaptureError> {
        unpin(&self.sk_lookup_pin(cookie))
    }

    /// The original destination of an accepted outbound connection, removed
    /// from the map as it is read.
    pub fn take_orig_dst(&self, key: ConnKey) -> Option<OrigDst> {
        let mut map = self.orig_dst.lock().expect("orig_dst lock");
        let found = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(found)
    }

    /// Netns cookies the kernel maps hold as enrolled.
    pub fn enrolled_cookies(&self) -> Vec<NetnsCookie> {
        let map = self.enrolled.lock().expect("enrolled lock");
        map.keys().filter_map(Result::ok).map(NetnsCookie).collect()
    }

    /// Inbound pod addresses and the netns cookie each belongs to.
    pub fn inbound_addrs(&self) -> Vec<(AddrKey, NetnsCookie)> {
        let map = self.inbound_addrs.lock().expect("inbound lock");
        map.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, NetnsCookie(v)))
            .collect()
    }

    pub fn remove_inbound_key(&self, key: &AddrKey) -> Result<(), CaptureError> {
        ignore_missing(self.inbound_addrs.lock().expect("inbound lock").remove(key))
            .map_err(map_err(maps::INBOUND_ADDRS))?;
        ignore_missing(self.listeners.lock().expect("listeners lock").remove(key))
            .map_err(map_err(maps::INBOUND_LISTENERS))
    }

    /// Netns cookies that have a pinned sk_lookup link.
    pub fn pinned_sk_lookup_cookies(&self) -> Vec<NetnsCookie> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("links")) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("sk_lookup-")?
                    .parse()
                    .ok()
                    .map(NetnsCookie)
            })
            .collect()
    }

    /// Sums the per-CPU capture counters.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        Counter::ALL
            .iter()
            .map(|c| {
                let total = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (c.name(), total)
            })
            .collect()
    }
}

/// Removes everything `Capture::load` pinned under `dir`: links (which
/// detaches the programs) and maps. For `mesh-agent node --cleanup` and tests.
pub fn unpin_all(dir: &Path) -> Result<(), CaptureError> {
    for sub in ["links", "maps"] {
        let d = dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            unpin(&e.path())?;
        }
        let _ = std::fs::remove_dir(&d);
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Ports never captured, with the direction(s) each is excluded in.
#[derive(Clone, Debug, Default)]
pub struct ExcludedPorts(pub BTreeMap<u16, u8>);

impl ExcludedPorts {
    pub fn new(outbound: &[u16], inbound: &[u16]) -> Self {
        let mut m = BTreeMap::new();
        for p in outbound {
            *m.entry(*p).or_insert(0) |= PortFlags::OUTBOUND;
        }
        for p in inbound {
            *m.entry(*p).or_insert(0) |= PortFlags::INBOUND;
        }
        ExcludedPorts(m)
    }
}

pub fn addr_key(addr: IpAddr) -> AddrKey {
    match addr {
        IpAddr::V4(v4) => AddrKey {
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            family: u32::from(mesh_common::AF_INET),
        },
        IpAddr::V6(v6) => AddrKey {
            addr: words_of_v6(v6),
            family: u32::from(mesh_common::AF_INET6),
        },
    }
}

pub fn words_of_v6(v6: std::net::Ipv6Addr) -> [u32; 4] {
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The address an [`OrigDst`] names.
pub fn orig_dst_addr(d: &OrigDst) -> std::net::SocketAddr {
    let ip = if d.family == mesh_common::AF_INET6 {
        let mut o = [0u8; 16];
        for (i, w) in d.addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(d.addr[0].to_ne_bytes())
    };
    std::net::SocketAddr::new(ip, d.port)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(CaptureError::Missing {
            what: "program",
            name,
        })?
        .try_into()
        .map_err(prog_err(name))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    ebpf.take_map(name)
        .ok_or(CaptureError::Missing { what: "map", name })?
        .try_into()
        .map_err(map_err(name))
}

/// Attaches with `attach` and pins the link at `pin`, unless a link is
/// already pinned there (left by an earlier agent), which is kept as it is.
fn attach_once(
    pin: &Path,
    attach: impl FnOnce() -> Result<FdLink, CaptureError>,
) -> Result<(), CaptureError> {
    if reuse_pinned(pin)? {
        return Ok(());
    }
    pin_link(attach()?, pin)
}

/// Whether a pinned link is already there (kept as it is).
fn reuse_pinned(pin: &Path) -> Result<bool, CaptureError> {
    if !pin.exists() {
        return Ok(false);
    }
    PinnedLink::from_pin(pin).map_err(|source| CaptureError::PinnedLink {
        path: pin.to_owned(),
        source,
    })?;
    tracing::info!(pin = %pin.display(), "reusing pinned link");
    Ok(true)
}

fn pin_link(link: FdLink, pin: &Path) -> Result<(), CaptureError> {
    link.pin(pin).map_err(|source| CaptureError::Pin {
        path: pin.to_owned(),
        source,
    })?;
    Ok(())
}

/// Removing the last reference to a pinned link detaches its program.
fn unpin(pin: &Path) -> Result<(), CaptureError> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CaptureError::Io {
            path: pin.to_owned(),
            source,
        }),
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn orig(addr: SocketAddr) -> OrigDst {
        let key = addr_key(addr.ip());
        OrigDst {
            addr: key.addr,
            port: addr.port(),
            family: key.family as u16,
            _pad: 0,
        }
    }

    #[test]
    fn original_destinations_read_back_as_the_kernel_wrote_them() {
        for a in ["10.1.2.3:8080", "[fd00:1::b]:443", "[2001:db8::1]:1"] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(orig_dst_addr(&orig(addr)), addr);
        }
        // The kernel stores IPv4 in network order in the first word: the
        // first octet is the lowest byte on little-endian.
        let k = addr_key("10.1.2.3".parse().unwrap());
        assert_eq!(k.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(k.family, u32::from(mesh_common::AF_INET));
    }

    #[test]
    fn excluded_ports_merge_directions() {
        let e = ExcludedPorts::new(&[22, 9000], &[9000, 15090]);
        assert_eq!(e.0[&22], PortFlags::OUTBOUND);
        assert_eq!(e.0[&9000], PortFlags::OUTBOUND | PortFlags::INBOUND);
        assert_eq!(e.0[&15090], PortFlags::INBOUND);
    }
}
