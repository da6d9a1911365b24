//! Loading the programs without parsing the kernel's BTF when they do not
//! need it. aya's `EbpfLoader::new` always parses `/sys/kernel/btf/vmlinux`
//! (5.5 MB on this project's test kernel, 17 MiB of heap once parsed: the
//! agent's whole start-up peak), and only uses it to relocate CO-RE field
//! accesses. Our programs make none, so for an object without CO-RE
//! relocations the loader runs on a thread of its own whose mount
//! namespace (a private copy, changes never propagated back) has an empty
//! directory over `/sys/kernel/btf`: the parse finds nothing and costs
//! nothing. Maps and pins are the same bpffs either way.

use std::ffi::CStr;

use tracing::debug;

/// Where the kernel publishes its BTF (Linux >= 5.4).
const KERNEL_BTF_DIR: &CStr = c"/sys/kernel/btf";

/// Whether `object` needs the kernel's BTF: it does when it carries CO-RE
/// relocations, or when it cannot be parsed (the loader then reports why).
pub fn needed_by(object: &[u8]) -> bool {
    aya_obj::Object::parse(object).map_or(true, |o| o.has_btf_relocations())
}

/// Runs `load` where `/sys/kernel/btf` is empty, when the programs do not
/// need it; else (or when the namespace cannot be made) where it is.
pub fn without_kernel_btf<T: Send>(object: &[u8], load: impl FnOnce() -> T + Send) -> T {
    if needed_by(object) {
        return load();
    }
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("ebpf-load".into())
            .spawn_scoped(s, || {
                if let Err(e) = hide_kernel_btf() {
                    debug!(error = %e, "loading with the kernel's BTF in view");
                }
                load()
            })
            .expect("spawning the eBPF load thread")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Gives the calling thread its own mount namespace (a copy that receives
/// the host's mount events and sends none back) with an empty read-only
/// tmpfs over [`KERNEL_BTF_DIR`]. Only this thread sees it, and it goes
/// with the thread.
fn hide_kernel_btf() -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls on this thread's own namespaces with
    // NUL-terminated constant strings; no memory is handed over.
    unsafe {
        check(libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            c"none".as_ptr(),
            KERNEL_BTF_DIR.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_agents_programs_make_no_co_re_access() {
        // Were this to change, the loader would parse the kernel's BTF
        // again (and need it): nothing breaks, the start costs 17 MiB more.
        assert!(!needed_by(super::super::programs::EBPF_OBJECT));
        assert!(needed_by(b"not an ELF object"));
    }

    #[test]
    fn the_load_thread_sees_no_kernel_btf_and_the_rest_of_the_process_does() {
        let vmlinux = Path::new("/sys/kernel/btf/vmlinux");
        assert!(
            vmlinux.exists(),
            "this kernel publishes its BTF (the test needs it)"
        );
        let object = super::super::programs::EBPF_OBJECT;
        let (hidden, bpffs) = without_kernel_btf(object, || {
            (!vmlinux.exists(), Path::new("/sys/fs/bpf").exists())
        });
        assert!(hidden, "the kernel's BTF was in view of the load");
        assert!(bpffs, "the rest of /sys stays in view");
        assert!(vmlinux.exists(), "the process's own view is unchanged");
        // An object that needs it loads with it in view.
        assert!(without_kernel_btf(b"not an ELF object", || vmlinux.exists()));
    }
}
