//! The `bpf` system call, for what aya does not offer.

use std::{io, mem::MaybeUninit, os::fd::AsRawFd};

use aya::Pod;

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// struct bpf_attr, the member of the BPF_MAP_*_ELEM commands.
#[repr(C)]
struct Elem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf(cmd, attr, size)`.
pub(super) fn bpf(
    cmd: libc::c_long,
    attr: *mut libc::c_void,
    size: usize,
) -> io::Result<libc::c_long> {
    // SAFETY: `attr` points to `size` initialised bytes laid out as the
    // kernel's `union bpf_attr` member for `cmd`, alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Reads and removes `key` in one call (a hash map's
/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, Linux 5.14 and later): `None` if the
/// map does not hold it. Older kernels answer `EINVAL` or `ENOTSUPP`.
pub(super) fn lookup_and_delete<K: Pod, V: Pod>(
    map: &impl AsRawFd,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::uninit();
    let mut attr = Elem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    match bpf(
        BPF_MAP_LOOKUP_AND_DELETE_ELEM,
        (&raw mut attr).cast(),
        size_of::<Elem>(),
    ) {
        // SAFETY: the kernel wrote the value (`V` is `Pod`: any bytes are a
        // valid `V`).
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd as _, OwnedFd};

    use super::*;

    /// A new hash map of `u32` to `u64` (needs root, or CAP_BPF).
    fn hash_map() -> OwnedFd {
        // struct bpf_attr, the BPF_MAP_CREATE member's first fields.
        #[repr(C)]
        struct Create {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let mut attr = Create {
            map_type: 1, // BPF_MAP_TYPE_HASH
            key_size: 4,
            value_size: 8,
            max_entries: 4,
            map_flags: 0,
        };
        let fd = bpf(0, (&raw mut attr).cast(), size_of::<Create>())
            .expect("BPF_MAP_CREATE (the unit tests run as root)");
        // SAFETY: BPF_MAP_CREATE returned a new descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    fn insert(map: &OwnedFd, key: u32, value: u64) {
        let mut attr = Elem {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_ref(&value) as u64,
            flags: 0,
        };
        bpf(2, (&raw mut attr).cast(), size_of::<Elem>()).expect("BPF_MAP_UPDATE_ELEM");
    }

    #[test]
    fn a_value_is_read_and_removed_in_one_call() {
        let map = hash_map();
        insert(&map, 7, 0xfeed_beef);
        insert(&map, 8, 1);
        assert_eq!(
            lookup_and_delete::<u32, u64>(&map, &7).unwrap(),
            Some(0xfeed_beef)
        );
        assert_eq!(
            lookup_and_delete::<u32, u64>(&map, &7).unwrap(),
            None,
            "removed"
        );
        assert_eq!(
            lookup_and_delete::<u32, u64>(&map, &8).unwrap(),
            Some(1),
            "the other stays"
        );
    }
}
