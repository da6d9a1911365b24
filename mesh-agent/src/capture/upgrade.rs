//! Replacing the kernel programs of a running node: a new agent (a new
//! version, or a developer's object from `--ebpf-object`) takes over the
//! pinned links and maps an earlier one left, without a moment in which an
//! enrolled pod is uncaptured.
//!
//! - Links are never detached: each pinned link gets the new program with
//!   `BPF_LINK_UPDATE`, which swaps it atomically (a connect either runs the
//!   old program or the new one).
//! - Maps are kept in place when their layout (type, key and value sizes,
//!   entries, flags) is what the new object declares. When any differs,
//!   the new object's maps are created under `maps-next`, what can be
//!   carried over is copied from the old maps (the enrolled namespaces and
//!   their addresses first: without them the new programs would let
//!   enrolled pods' connections go direct), the links are switched, and
//!   `maps-next` replaces `maps`. The layout is compared map by map against
//!   the kernel's own description of the pinned maps, so no version number
//!   can be forgotten.
//!
//! An agent that stops anywhere in between leaves links that point at one
//! consistent set of programs and maps; the next one starts over from
//! whatever `maps` holds, and takes the pods back from its saved state.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapInfo, PerCpuArray, PerCpuValues},
};
use mesh_common::{AddrKey, ConnKey, NetnsInfo, OrigDst, maps};

use super::{CaptureError, sys::bpf};

/// What differs between a pinned map and the object's declaration of it.
#[derive(Debug, PartialEq, Eq)]
pub struct LayoutChange {
    pub map: String,
    pub what: String,
}

impl std::fmt::Display for LayoutChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.map, self.what)
    }
}

/// The pinned maps under `map_dir` whose layout is not the one `object`
/// declares. Maps the object does not pin, and maps not pinned yet, are
/// not compared.
pub fn layout_changes(object: &[u8], map_dir: &Path) -> Result<Vec<LayoutChange>, CaptureError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| CaptureError::Io {
        path: map_dir.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    let mut changes = Vec::new();
    let mut names: Vec<&String> = obj.maps.keys().collect();
    names.sort();
    for name in names {
        let def = &obj.maps[name];
        if def.pinning() != aya_obj::maps::PinningType::ByName {
            continue;
        }
        let pin = map_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&pin).map_err(|source| CaptureError::Map {
            name: "pinned",
            source: Box::new(source),
        })?;
        let kernel_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let pairs = [
            ("type", kernel_type, def.map_type()),
            ("key size", info.key_size(), def.key_size()),
            ("value size", info.value_size(), def.value_size()),
            ("entries", info.max_entries(), def.max_entries()),
            ("flags", info.map_flags(), def.map_flags()),
        ];
        let what: Vec<String> = pairs
            .iter()
            .filter(|(_, pinned, wanted)| pinned != wanted)
            .map(|(field, pinned, wanted)| format!("{field} {pinned} -> {wanted}"))
            .collect();
        if !what.is_empty() {
            changes.push(LayoutChange {
                map: name.clone(),
                what: what.join(", "),
            });
        }
    }
    Ok(changes)
}

/// Where the maps of a new layout are created before they replace `maps`
/// (bpffs refuses names with a dot).
pub fn next_dir(dir: &Path) -> PathBuf {
    dir.join("maps-next")
}

/// Where the old maps go while `maps-next` takes their place.
fn old_dir(dir: &Path) -> PathBuf {
    dir.join("maps-old")
}

/// Finishes or clears what an agent that stopped mid-upgrade left: with no
/// `maps` but a `maps-next`, the next set was already live (the links use
/// it) and becomes `maps`; otherwise a `maps-next` was never switched to
/// and goes. `maps-old` always goes (its maps live on while a program
/// still uses them).
pub fn recover(dir: &Path) -> Result<(), CaptureError> {
    let (maps, next) = (dir.join("maps"), next_dir(dir));
    if !maps.exists() && next.exists() {
        rename(&next, &maps)?;
    }
    unpin_dir(&next)?;
    unpin_dir(&old_dir(dir))
}

/// Makes `maps-next` (where the new maps were pinned) the maps, and
/// removes the old ones.
pub fn switch_maps(dir: &Path) -> Result<(), CaptureError> {
    let (maps, next, old) = (dir.join("maps"), next_dir(dir), old_dir(dir));
    rename(&maps, &old)?;
    rename(&next, &maps)?;
    unpin_dir(&old)
}

/// Copies what the running node needs from the old maps (`map_dir`) into
/// the new object's maps: the enrolled namespaces, the pods' inbound
/// addresses, the original destinations of connections in progress, and
/// the counters. A map whose entries changed shape is not copied (the
/// agent rebuilds the enrolled set from its saved state); each map is
/// reported.
pub fn carry_over(map_dir: &Path, ebpf: &mut Ebpf) -> Vec<String> {
    let mut report = Vec::new();
    let mut note = |name: &str, r: Result<usize, String>| {
        report.push(match r {
            Ok(n) => format!("{name}: {n} entries carried over"),
            Err(e) => format!("{name}: not carried over ({e})"),
        });
    };
    note(
        maps::ENROLLED_NETNS,
        copy_hash::<u64, NetnsInfo>(map_dir, ebpf, maps::ENROLLED_NETNS, Map::HashMap),
    );
    note(
        maps::INBOUND_ADDRS,
        copy_hash::<AddrKey, u64>(map_dir, ebpf, maps::INBOUND_ADDRS, Map::HashMap),
    );
    note(
        maps::ORIG_DST,
        copy_hash::<ConnKey, OrigDst>(map_dir, ebpf, maps::ORIG_DST, Map::LruHashMap),
    );
    note(
        maps::PENDING_CONNECT,
        copy_hash::<u64, OrigDst>(map_dir, ebpf, maps::PENDING_CONNECT, Map::LruHashMap),
    );
    note(maps::COUNTERS, copy_counters(map_dir, ebpf));
    report
}

fn old_map(map_dir: &Path, name: &str) -> Result<MapData, String> {
    MapData::from_pin(map_dir.join(name)).map_err(|e| e.to_string())
}

/// Copies a hash map (or an LRU one: `kind` says which).
fn copy_hash<K: aya::Pod, V: aya::Pod>(
    map_dir: &Path,
    ebpf: &mut Ebpf,
    name: &str,
    kind: fn(MapData) -> Map,
) -> Result<usize, String> {
    let old: HashMap<MapData, K, V> =
        HashMap::try_from(kind(old_map(map_dir, name)?)).map_err(|e| e.to_string())?;
    let mut new: HashMap<&mut MapData, K, V> = HashMap::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| "not in the new object".to_owned())?,
    )
    .map_err(|e| e.to_string())?;
    let mut n = 0;
    for (k, v) in old.iter().filter_map(Result::ok) {
        new.insert(k, v, 0).map_err(|e| e.to_string())?;
        n += 1;
    }
    Ok(n)
}

/// Counters by index, as many as both maps have.
fn copy_counters(map_dir: &Path, ebpf: &mut Ebpf) -> Result<usize, String> {
    let name = maps::COUNTERS;
    let old: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(old_map(map_dir, name)?))
            .map_err(|e| e.to_string())?;
    let mut new: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| "not in the new object".to_owned())?,
    )
    .map_err(|e| e.to_string())?;
    let n = old.len().min(new.len());
    for i in 0..n {
        let values = old.get(&i, 0).map_err(|e| e.to_string())?;
        let values: Vec<u64> = values.iter().copied().collect();
        new.set(
            i,
            PerCpuValues::try_from(values).map_err(|e| e.to_string())?,
            0,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(n as usize)
}

/// Gives the pinned link at `pin` the program `prog` (`BPF_LINK_UPDATE`:
/// atomic, the attachment never lapses).
pub fn update_link(pin: &Path, prog: BorrowedFd<'_>) -> Result<(), CaptureError> {
    let io = |source| CaptureError::Io {
        path: pin.to_owned(),
        source,
    };
    let link = obj_get(pin).map_err(io)?;
    // struct bpf_attr, link_update member: link_fd, new_prog_fd, flags,
    // old_prog_fd.
    let mut attr = [0u32; 4];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = prog.as_raw_fd() as u32;
    bpf(
        BPF_LINK_UPDATE,
        attr.as_mut_ptr().cast(),
        size_of_val(&attr),
    )
    .map_err(io)?;
    Ok(())
}

/// The ID of the program a pinned link runs (for `/capture`).
pub fn link_program_id(pin: &Path) -> Option<u32> {
    aya::programs::links::PinnedLink::from_pin(pin)
        .ok()
        .map(aya::programs::links::FdLink::from)
        .and_then(|l| l.info().ok())
        .map(|i| i.program_id())
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `BPF_OBJ_GET`: a file descriptor for a pinned object.
fn obj_get(pin: &Path) -> std::io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // struct bpf_attr, obj_get member: pathname (u64), bpf_fd, file_flags,
    // path_fd.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let mut attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, (&raw mut attr).cast(), size_of::<ObjGet>())?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn rename(from: &Path, to: &Path) -> Result<(), CaptureError> {
    std::fs::rename(from, to).map_err(|source| CaptureError::Io {
        path: from.to_owned(),
        source,
    })
}

/// Unpins everything in `dir` and removes it; nothing to do if it is not
/// there.
fn unpin_dir(dir: &Path) -> Result<(), CaptureError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CaptureError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        std::fs::remove_file(&path).map_err(|source| CaptureError::Io { path, source })?;
    }
    std::fs::remove_dir(dir).map_err(|source| CaptureError::Io {
        path: dir.to_owned(),
        source,
    })
}
