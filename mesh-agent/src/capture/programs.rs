//! Loads the kernel capture programs, attaches them and owns their maps.
//!
//! Maps and links are pinned under the bpf directory (`--bpf-dir`): an agent
//! restart reuses them, so programs stay attached and enrolled pods keep
//! failing closed while no agent listens. Kernel >= 5.15 (sockops netns
//! cookie), cgroup v2, bpffs.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{AddrKey, ConnKey, Counter, FlowKey, NetnsInfo, OrigDst, maps, programs};

use super::{CaptureError, ExcludedPorts, fs, kernel_btf, sys, upgrade};
use crate::inpod::{
    netns::{Netns, NetnsCookie},
    sockets::{PodListener, Role},
};
use crate::sync::LockExt as _;

/// The kernel object built by `build.rs` from `mesh-ebpf`.
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

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
pub struct Programs {
    dir: PathBuf,
    /// Holds the loaded programs; attached links are pinned, not owned here.
    ebpf: Mutex<Ebpf>,
    enrolled: Mutex<HashMap<MapData, u64, NetnsInfo>>,
    orig_dst: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    /// The same map, for reading and removing in one call without the lock.
    orig_dst_fd: OwnedFd,
    inbound_addrs: Mutex<HashMap<MapData, AddrKey, u64>>,
    listeners: Mutex<SockHash<MapData, AddrKey>>,
    counters: PerCpuArray<MapData, u64>,
    flows: Mutex<HashMap<MapData, FlowKey, u8>>,
}

impl std::fmt::Debug for Programs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Programs").field("dir", &self.dir).finish()
    }
}

impl Programs {
    /// Loads the programs and maps (reusing pinned maps), attaches the cgroup
    /// programs to `cgroup` unless pinned links already hold them, and sets the
    /// excluded ports. Mounts bpffs at /sys/fs/bpf if it is missing and
    /// `mount_bpffs` allows.
    pub fn load(
        dir: &Path,
        cgroup: &Path,
        excluded: &ExcludedPorts,
        mount_bpffs: bool,
        object: Option<&[u8]>,
        clear_flows: bool,
    ) -> Result<Self, CaptureError> {
        let object = object.unwrap_or(EBPF_OBJECT);
        fs::ensure_bpffs(dir, mount_bpffs)?;
        let map_dir = dir.join("maps");
        let link_dir = dir.join("links");
        for d in [dir, &link_dir] {
            std::fs::create_dir_all(d).map_err(|source| CaptureError::Io {
                path: d.to_path_buf(),
                source,
            })?;
        }
        upgrade::recover(dir)?;
        std::fs::create_dir_all(&map_dir).map_err(|source| CaptureError::Io {
            path: map_dir.clone(),
            source,
        })?;
        fs::ensure_cgroup2(cgroup)?;
        // Maps whose layout changed are made anew beside the old ones, and
        // take their place once the links run the new programs.
        let changes = upgrade::layout_changes(object, &map_dir)?;
        let pin_dir = if changes.is_empty() {
            map_dir.clone()
        } else {
            let next = upgrade::next_dir(dir);
            std::fs::create_dir_all(&next).map_err(|source| CaptureError::Io {
                path: next.clone(),
                source,
            })?;
            let changes: Vec<String> = changes.iter().map(ToString::to_string).collect();
            tracing::info!(?changes, "pinned maps have another layout: migrating them");
            next
        };
        let mut ebpf = kernel_btf::without_kernel_btf(object, || {
            EbpfLoader::new()
                .default_map_pin_directory(&pin_dir)
                .load(object)
        })
        .map_err(|source| CaptureError::Load {
            dir: pin_dir.clone(),
            source: Box::new(source),
        })?;
        if !changes.is_empty() {
            // Before any link runs the new programs: the enrolled
            // namespaces above all, or their connections would go direct.
            let report = upgrade::carry_over(&map_dir, &mut ebpf);
            tracing::info!(?report, "maps carried over to the new layout");
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

        // Connections an earlier agent was setting up when it stopped: none
        // is in progress now, and a stale entry would let one 4-tuple past
        // inbound capture.
        // Unless that agent is still draining beside this one.
        let mut flows: HashMap<MapData, FlowKey, u8> = take_map(&mut ebpf, maps::AGENT_FLOWS)?;
        let stale: Vec<FlowKey> = if clear_flows {
            flows.keys().filter_map(Result::ok).collect()
        } else {
            Vec::new()
        };
        for key in stale {
            ignore_missing(flows.remove(&key)).map_err(map_err(maps::AGENT_FLOWS))?;
        }

        let cgroup_fd = std::fs::File::open(cgroup).map_err(|source| CaptureError::Io {
            path: cgroup.to_owned(),
            source,
        })?;
        // Links an earlier agent pinned get this agent's programs in place
        // (never detached); missing ones are attached.
        for name in [programs::CONNECT4, programs::CONNECT6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            let fd = prog
                .fd()
                .map_err(prog_err(name))?
                .try_clone()
                .map_err(|source| CaptureError::Io {
                    path: link_dir.join(name),
                    source,
                })?;
            attach_or_update(&link_dir.join(name), fd.as_fd(), || {
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
            let fd = prog
                .fd()
                .map_err(prog_err(name))?
                .try_clone()
                .map_err(|source| CaptureError::Io {
                    path: link_dir.join(name),
                    source,
                })?;
            attach_or_update(&link_dir.join(name), fd.as_fd(), || {
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
            let fd = prog.fd().map_err(prog_err(name))?.as_fd();
            for pin in pinned_sk_lookup_links(&link_dir) {
                // A namespace that is gone cannot take it (the sweep
                // removes its pin once the pods are restored); a live one
                // that cannot keeps the old program, which fails closed.
                if let Err(e) = upgrade::update_link(&pin, fd) {
                    tracing::warn!(pin = %pin.display(), error = %e, "inbound capture link keeps its program");
                }
            }
        }
        if !changes.is_empty() {
            upgrade::switch_maps(dir)?;
        }

        Ok(Programs {
            dir: dir.to_owned(),
            enrolled: Mutex::new(take_map(&mut ebpf, maps::ENROLLED_NETNS)?),
            orig_dst_fd: map_fd(&ebpf, maps::ORIG_DST)?,
            orig_dst: Mutex::new(take_map(&mut ebpf, maps::ORIG_DST)?),
            inbound_addrs: Mutex::new(take_map(&mut ebpf, maps::INBOUND_ADDRS)?),
            listeners: Mutex::new(take_map(&mut ebpf, maps::INBOUND_LISTENERS)?),
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            flows: Mutex::new(flows),
            ebpf: Mutex::new(ebpf),
        })
    }

    /// The program each pinned cgroup link runs, by name, and how many pods'
    /// namespaces have inbound capture attached.
    pub fn attached(&self) -> serde_json::Value {
        let links = self.dir.join("links");
        let mut programs = serde_json::Map::new();
        for name in [programs::CONNECT4, programs::CONNECT6, programs::SOCKOPS] {
            programs.insert(
                name.to_owned(),
                upgrade::link_program_id(&links.join(name)).into(),
            );
        }
        let sk_lookup: Vec<u32> = pinned_sk_lookup_links(&links)
            .iter()
            .filter_map(|p| upgrade::link_program_id(p))
            .collect();
        programs.insert(programs::SK_LOOKUP.to_owned(), sk_lookup.into());
        programs.into()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sk_lookup_pin(&self, cookie: NetnsCookie) -> PathBuf {
        self.dir.join("links").join(format!("sk_lookup-{cookie}"))
    }

    /// Hands a pod's inbound listener to the kernel: SYNs to `addr` go to it.
    /// Each address has one owner, the netns cookie in `INBOUND_ADDRS`: an
    /// address that another enrolled netns owns is left to it (returns
    /// false) unless `take_over`. An owner no longer enrolled (left by an
    /// earlier agent) is replaced.
    pub fn add_inbound<L: AsRawFd>(
        &self,
        addr: IpAddr,
        cookie: NetnsCookie,
        listener: &L,
        take_over: bool,
    ) -> Result<bool, CaptureError> {
        let key = addr_key(addr);
        let enrolled = self.enrolled_cookies();
        let mut owners = self.inbound_addrs.locked();
        if let Ok(owner) = owners.get(&key, 0)
            && owner != cookie.0
            && enrolled.contains(&NetnsCookie(owner))
        {
            if !take_over {
                return Ok(false);
            }
            tracing::warn!(%addr, from = owner, to = %cookie, "inbound address taken over by the pod the configuration gives it to");
        }
        self.listeners
            .locked()
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(map_err(maps::INBOUND_LISTENERS))?;
        owners
            .insert(key, cookie.0, 0)
            .map_err(map_err(maps::INBOUND_ADDRS))?;
        Ok(true)
    }

    /// Stops inbound capture of `addr`, if the netns `cookie` still owns it:
    /// the address may have passed to another pod (a reused IP, a pod that
    /// claimed it), whose capture must stay.
    pub fn remove_inbound(&self, addr: IpAddr, cookie: NetnsCookie) -> Result<(), CaptureError> {
        let key = addr_key(addr);
        let mut owners = self.inbound_addrs.locked();
        if owners.get(&key, 0).ok() != Some(cookie.0) {
            return Ok(());
        }
        ignore_missing(owners.remove(&key)).map_err(map_err(maps::INBOUND_ADDRS))?;
        ignore_missing(self.listeners.locked().remove(&key))
            .map_err(map_err(maps::INBOUND_LISTENERS))
    }

    /// Marks a netns as enrolled: its outbound connects are captured.
    pub fn enroll_netns(&self, cookie: NetnsCookie) -> Result<(), CaptureError> {
        self.enrolled
            .locked()
            .insert(cookie.0, NetnsInfo::default(), 0)
            .map_err(map_err(maps::ENROLLED_NETNS))
    }

    pub fn unenroll_netns(&self, cookie: NetnsCookie) -> Result<(), CaptureError> {
        ignore_missing(self.enrolled.locked().remove(&cookie.0))
            .map_err(map_err(maps::ENROLLED_NETNS))
    }

    /// Attaches inbound capture to a pod netns, reusing a pinned link left by
    /// an earlier agent.
    pub fn attach_sk_lookup(&self, netns: &Netns) -> Result<(), CaptureError> {
        attach_once(&self.sk_lookup_pin(netns.cookie()), || {
            let name = programs::SK_LOOKUP;
            let mut ebpf = self.ebpf.locked();
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
        static ONE_CALL: AtomicBool = AtomicBool::new(true);
        if ONE_CALL.load(Ordering::Relaxed) {
            match sys::lookup_and_delete(&self.orig_dst_fd, &key) {
                Ok(found) => return found,
                Err(e) => {
                    ONE_CALL.store(false, Ordering::Relaxed);
                    tracing::info!(error = %e, "original destinations are read and removed in two calls: this kernel does not do it in one");
                }
            }
        }
        let mut map = self.orig_dst.locked();
        let found = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(found)
    }

    /// Netns cookies the kernel maps hold as enrolled.
    pub fn enrolled_cookies(&self) -> Vec<NetnsCookie> {
        let map = self.enrolled.locked();
        map.keys().filter_map(Result::ok).map(NetnsCookie).collect()
    }

    /// Inbound pod addresses and the netns cookie each belongs to.
    pub fn inbound_addrs(&self) -> Vec<(AddrKey, NetnsCookie)> {
        let map = self.inbound_addrs.locked();
        map.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, NetnsCookie(v)))
            .collect()
    }

    pub fn remove_inbound_key(&self, key: &AddrKey) -> Result<(), CaptureError> {
        ignore_missing(self.inbound_addrs.locked().remove(key))
            .map_err(map_err(maps::INBOUND_ADDRS))?;
        ignore_missing(self.listeners.locked().remove(key))
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

    /// Lists one of the agent's own connections to a local app (`src` the
    /// client's address and the agent's port, `dst` the app), so that
    /// inbound capture lets its SYN through. Fails closed: with the map
    /// full, the connection is not made.
    pub fn let_through(&self, src: SocketAddr, dst: SocketAddr) -> Result<FlowKey, CaptureError> {
        let key = flow_key(src, dst);
        self.flows
            .locked()
            .insert(key, 0, 0)
            .map_err(map_err(maps::AGENT_FLOWS))?;
        Ok(key)
    }

    /// The reverse of [`Programs::let_through`], once the connection is set
    /// up (or failed): later packets are matched by the kernel's own tables.
    pub fn forget_flow(&self, key: &FlowKey) {
        let _ = self.flows.locked().remove(key);
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

/// What enrolment and the data path ask of the programs.
impl Programs {
    /// Hands the pod's inbound listeners to sk_lookup, marks the netns as
    /// enrolled for the connect programs and attaches inbound capture.
    pub(super) fn take_in(
        &self,
        netns: &Netns,
        addresses: &[IpAddr],
        listeners: &[PodListener],
        take_over: bool,
    ) -> Result<Vec<IpAddr>, CaptureError> {
        let cookie = netns.cookie();
        let mut claimed = Vec::new();
        for addr in addresses {
            let Some(l) = listeners
                .iter()
                .find(|l| l.role == Role::InboundPlaintext && l.v6 == addr.is_ipv6())
            else {
                continue;
            };
            if self.add_inbound(*addr, cookie, l.first(), take_over)? {
                claimed.push(*addr);
            }
        }
        self.enroll_netns(cookie)?;
        self.attach_sk_lookup(netns)?;
        Ok(claimed)
    }

    /// The reverse of [`Programs::take_in`], by cookie, so that it works for
    /// a namespace that is already gone. Logs what it cannot undo.
    pub(super) fn let_go(&self, cookie: NetnsCookie, addresses: &[IpAddr]) {
        if let Err(e) = self.detach_sk_lookup(cookie) {
            tracing::warn!(%cookie, error = %e, "detaching inbound capture");
        }
        if let Err(e) = self.unenroll_netns(cookie) {
            tracing::warn!(%cookie, error = %e, "removing enrolled netns");
        }
        for addr in addresses {
            if let Err(e) = self.remove_inbound(*addr, cookie) {
                tracing::warn!(%addr, error = %e, "removing inbound address");
            }
        }
    }

    /// The original destination sockops recorded for a connection accepted
    /// on the outbound listener, found by the client's port and family.
    pub(super) fn outbound_dst(&self, cookie: NetnsCookie, peer: SocketAddr) -> Option<SocketAddr> {
        // The key leaves out the client's source address: two clients in one
        // pod on the same port, one bound to a non-loopback source, would
        // share it. Rare enough to accept for now; the kernel side would need
        // the source too.
        let key = ConnKey {
            netns_cookie: cookie.0,
            port: peer.port(),
            family: if peer.is_ipv4() {
                mesh_common::AF_INET
            } else {
                mesh_common::AF_INET6
            },
            _pad: 0,
        };
        self.take_orig_dst(key).map(|d| orig_dst_addr(&d))
    }

    /// Removes kernel state that no live pod owns.
    pub(super) fn sweep(&self, live: &[NetnsCookie]) {
        for cookie in self.enrolled_cookies() {
            if !live.contains(&cookie) {
                tracing::info!(%cookie, "removing stale enrolled netns");
                let _ = self.unenroll_netns(cookie);
            }
        }
        for (key, cookie) in self.inbound_addrs() {
            if !live.contains(&cookie) {
                let _ = self.remove_inbound_key(&key);
            }
        }
        for cookie in self.pinned_sk_lookup_cookies() {
            if !live.contains(&cookie) {
                tracing::info!(%cookie, "detaching stale inbound capture link");
                let _ = self.detach_sk_lookup(cookie);
            }
        }
    }
}

/// A connection's 4-tuple as inbound capture sees its SYN.
fn flow_key(src: SocketAddr, dst: SocketAddr) -> FlowKey {
    let (remote, local) = (addr_key(src.ip()), addr_key(dst.ip()));
    FlowKey {
        remote: remote.addr,
        local: local.addr,
        remote_port: src.port(),
        local_port: dst.port(),
        family: local.family,
    }
}

/// Removes everything `Programs::load` pinned under `dir`: links (which
/// detaches the programs) and maps. For `mesh-agent node --cleanup` and tests.
pub fn unpin_all(dir: &Path) -> Result<(), CaptureError> {
    for sub in ["links", "maps", "maps-next", "maps-old"] {
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
fn orig_dst_addr(d: &OrigDst) -> SocketAddr {
    let ip = if d.family == mesh_common::AF_INET6 {
        let mut o = [0u8; 16];
        for (i, w) in d.addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(d.addr[0].to_ne_bytes())
    };
    SocketAddr::new(ip, d.port)
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

/// A descriptor of its own for map `name`.
fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, CaptureError> {
    let map = ebpf
        .map(name)
        .ok_or(CaptureError::Missing { what: "map", name })?;
    let data = match map {
        aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) => data,
        _ => {
            return Err(CaptureError::Missing {
                what: "hash map",
                name,
            });
        }
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| map_err(name)(MapError::from(e)))
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

/// Gives the link pinned at `pin` (left by an earlier agent) the program
/// `prog`, or attaches with `attach` and pins the link there.
fn attach_or_update(
    pin: &Path,
    prog: std::os::fd::BorrowedFd<'_>,
    attach: impl FnOnce() -> Result<FdLink, CaptureError>,
) -> Result<(), CaptureError> {
    if pin.exists() {
        tracing::info!(pin = %pin.display(), "pinned link takes the new program");
        return upgrade::update_link(pin, prog);
    }
    pin_link(attach()?, pin)
}

/// The pinned sk_lookup links (one per captured pod namespace).
fn pinned_sk_lookup_links(link_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(link_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("sk_lookup-"))
        })
        .collect()
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
}
