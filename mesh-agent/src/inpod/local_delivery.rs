//! The in-pod routing that lets the agent connect to a pod's app from the
//! real client's address (`IP_TRANSPARENT`), so that the app sees who is
//! calling instead of one loopback address for every caller.
//!
//! The agent's connection carries [`AGENT_LOCAL_MARK`]. With
//! `net.ipv4.tcp_fwmark_accept` set, the app's accepted socket (its SYN-ACK
//! too) takes that mark, and a policy rule sends marked packets to a table
//! whose only route is `local default dev lo`: the app's replies to the
//! client's (non-local) address come back over `lo` to the agent's socket
//! instead of leaving the pod. `fwmark_reflect` (IPv4, IPv6) does the same
//! for what the kernel answers by itself: the RST of a port nobody listens
//! on reaches the agent at once, instead of leaving the pod and leaving
//! the agent to time out. Nothing else in the pod carries the mark
//! (packets from the network arrive unmarked: a mark does not cross a veth),
//! so the pod's own traffic is routed as before.
//!
//! The agent picks each such connection's source port itself (from
//! [`mesh_common::LOCAL_APP_PORTS`], so that it can tell inbound capture the
//! 4-tuple before the SYN leaves). The agent usually closes first, so its
//! side keeps TIME_WAIT; `net.ipv4.tcp_tw_reuse = 1` in the pod lets a port
//! whose TIME_WAIT is over a second old serve the same client again, as
//! loopback connections may by default (without it one client could open
//! only ~75 connections per second to one app port).
//!
//! Set up once per pod netns at enrolment, idempotently (a restarted agent
//! finds it there). Left in place when a pod is released: connections the
//! agent delivered before keep working until they close, and the rule
//! matches nothing new.
//!
//! The sysctls are per network namespace and written through `/proc/sys`
//! from a thread inside the pod's. In a container, every runtime mounts
//! `/proc/sys` read-only; the agent (CAP_SYS_ADMIN) then remounts it
//! writable in its own mount namespace, once, on the first write that finds
//! it read-only. That changes nothing outside the agent's container.

use std::io;

use mesh_common::{AGENT_LOCAL_MARK, LOCAL_DELIVERY_RULE_PRIORITY, LOCAL_DELIVERY_TABLE};

const SYSCTL_FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
const SYSCTL_TW_REUSE: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";
/// Connections queued on a capture listener that closes (a draining agent)
/// move to the next agent's listener on the same port (`SO_REUSEPORT`)
/// instead of being reset. Kernel >= 5.14.
const SYSCTL_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
const SYSCTL_REFLECT_V4: &str = "/proc/sys/net/ipv4/fwmark_reflect";
const SYSCTL_REFLECT_V6: &str = "/proc/sys/net/ipv6/fwmark_reflect";

const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_LOCAL: u8 = 2;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RT_TABLE_UNSPEC: u8 = 0;
const LOOPBACK_IFINDEX: u32 = mesh_common::LOOPBACK_IFINDEX;

/// Sets up local delivery in the calling thread's network namespace (call
/// inside the pod netns). `v6`: the pod has IPv6 too.
pub fn prepare(v6: bool) -> io::Result<()> {
    let mut sysctls = vec![
        SYSCTL_FWMARK_ACCEPT,
        SYSCTL_TW_REUSE,
        SYSCTL_REFLECT_V4,
        SYSCTL_MIGRATE_REQ,
    ];
    if v6 {
        sysctls.push(SYSCTL_REFLECT_V6);
    }
    for sysctl in sysctls {
        enable(sysctl).map_err(|e| io::Error::new(e.kind(), format!("{sysctl}: {e}")))?;
    }
    let nl = Netlink::open()?;
    let families: &[u8] = if v6 {
        &[libc::AF_INET as u8, libc::AF_INET6 as u8]
    } else {
        &[libc::AF_INET as u8]
    };
    for &family in families {
        nl.create(RTM_NEWRULE, &rule(family))
            .map_err(|e| with_context(e, "adding the local delivery rule", family))?;
        nl.create(RTM_NEWROUTE, &route(family))
            .map_err(|e| with_context(e, "adding the local delivery route", family))?;
    }
    Ok(())
}

/// Writes `1` to a sysctl, making `/proc/sys` writable first if it is
/// read-only (in the agent's container).
fn enable(sysctl: &str) -> io::Result<()> {
    match std::fs::write(sysctl, b"1") {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            remount_proc_sys_writable()?;
            std::fs::write(sysctl, b"1")
        }
        written => written,
    }
}

/// `mount -o remount,bind,rw /proc/sys`, keeping the flags runtimes set.
fn remount_proc_sys_writable() -> io::Result<()> {
    use nix::mount::{MsFlags, mount};
    mount(
        None::<&str>,
        "/proc/sys",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("read-only, and remounting /proc/sys writable failed: {e}"),
        )
    })?;
    tracing::info!(
        "remounted /proc/sys writable in the agent's mount namespace (the container's is read-only) to set pods' network sysctls"
    );
    Ok(())
}

fn with_context(e: io::Error, what: &str, family: u8) -> io::Error {
    let fam = if family == libc::AF_INET6 as u8 {
        "IPv6"
    } else {
        "IPv4"
    };
    io::Error::new(e.kind(), format!("{what} ({fam}): {e}"))
}

/// `ip rule add fwmark MARK/0xffffffff lookup TABLE pref PRIORITY`.
fn rule(family: u8) -> Vec<u8> {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2,
    // action, flags (u32).
    let mut b = vec![family, 0, 0, 0, RT_TABLE_UNSPEC, 0, 0, FR_ACT_TO_TBL];
    b.extend_from_slice(&0u32.to_ne_bytes());
    attr(&mut b, FRA_PRIORITY, LOCAL_DELIVERY_RULE_PRIORITY);
    attr(&mut b, FRA_FWMARK, AGENT_LOCAL_MARK);
    attr(&mut b, FRA_FWMASK, u32::MAX);
    attr(&mut b, FRA_TABLE, LOCAL_DELIVERY_TABLE);
    b
}

/// `ip route add local default dev lo table TABLE`.
fn route(family: u8) -> Vec<u8> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
    // type, flags (u32).
    let mut b = vec![
        family,
        0,
        0,
        0,
        RT_TABLE_UNSPEC,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ];
    b.extend_from_slice(&0u32.to_ne_bytes());
    attr(&mut b, RTA_OIF, LOOPBACK_IFINDEX);
    attr(&mut b, RTA_TABLE, LOCAL_DELIVERY_TABLE);
    b
}

/// Appends a `u32` netlink attribute (already 4-byte aligned).
fn attr(b: &mut Vec<u8>, kind: u16, value: u32) {
    b.extend_from_slice(&8u16.to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(&value.to_ne_bytes());
}

/// A `NETLINK_ROUTE` socket of the namespace it was opened in.
struct Netlink(std::os::fd::OwnedFd);

impl Netlink {
    fn open() -> io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        let nl = Netlink(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        // The kernel answers at once; a missing answer must not hold the
        // enrolling thread (and the pods lock) for ever.
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: valid fd, option and length.
        let rc = unsafe {
            use std::os::fd::AsRawFd as _;
            libc::setsockopt(
                nl.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of_val(&timeout) as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(nl)
    }

    /// Sends one create request and waits for its answer; an object that is
    /// there already counts as created.
    fn create(&self, kind: u16, body: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let len = 16 + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        msg.extend_from_slice(body);
        // SAFETY: valid fd and buffer; the kernel is the default destination.
        let sent = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: valid fd and buffer of the given length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            if n < 20 {
                return Err(io::Error::other("short netlink answer"));
            }
            let kind = u16::from_ne_bytes([buf[4], buf[5]]);
            if kind != NLMSG_ERROR {
                continue;
            }
            let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            return match -code {
                0 => Ok(()),
                libc::EEXIST => Ok(()),
                errno => Err(io::Error::from_raw_os_error(errno)),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_and_route_are_laid_out_as_the_kernel_reads_them() {
        let r = rule(libc::AF_INET as u8);
        // 12-byte header, then four 8-byte attributes.
        assert_eq!(r.len(), 12 + 4 * 8);
        assert_eq!(r[7], FR_ACT_TO_TBL);
        let fwmark = &r[12 + 8..12 + 16];
        assert_eq!(&fwmark[2..4], &FRA_FWMARK.to_ne_bytes());
        assert_eq!(&fwmark[4..], &AGENT_LOCAL_MARK.to_ne_bytes());
        let rt = route(libc::AF_INET6 as u8);
        assert_eq!(
            (rt[0], rt[6], rt[7]),
            (libc::AF_INET6 as u8, 254, RTN_LOCAL)
        );
        assert_eq!(&rt[12 + 4..12 + 8], &1u32.to_ne_bytes(), "dev lo");
    }

    /// As in a container: `/proc/sys` read-only (a mount namespace and a
    /// network namespace of this thread's own; needs root). The sysctl is
    /// still set, and `/proc/sys` is writable afterwards.
    #[test]
    fn a_read_only_proc_sys_is_remounted_writable_to_set_a_sysctl() {
        use nix::mount::{MsFlags, mount};
        let value = std::thread::spawn(|| {
            nix::sched::unshare(
                nix::sched::CloneFlags::CLONE_NEWNS | nix::sched::CloneFlags::CLONE_NEWNET,
            )
            .expect("unshare (root)");
            let none = None::<&str>;
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
                .expect("private mounts");
            mount(Some("/proc/sys"), "/proc/sys", none, MsFlags::MS_BIND, none)
                .expect("bind /proc/sys");
            mount(
                none,
                "/proc/sys",
                none,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                none,
            )
            .expect("read-only /proc/sys");
            let read_only = std::fs::write(SYSCTL_TW_REUSE, b"1").unwrap_err();
            assert_eq!(read_only.raw_os_error(), Some(libc::EROFS));
            enable(SYSCTL_TW_REUSE).expect("set through the remount");
            std::fs::read_to_string(SYSCTL_TW_REUSE).expect("read back")
        })
        .join()
        .expect("thread");
        assert_eq!(value.trim(), "1");
    }

    /// Needs root (a network namespace of its own) and iproute2 to read the
    /// result back: fails without them.
    #[test]
    fn the_rule_and_route_are_installed_once_however_often_asked() {
        let out = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            let ip = |args: &[&str]| {
                let o = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .expect("ip");
                String::from_utf8_lossy(&o.stdout).into_owned()
            };
            // As in a pod: `lo` is up.
            ip(&["link", "set", "lo", "up"]);
            prepare(true).expect("first time");
            prepare(true).expect("again: already there is fine");
            let accept = [
                SYSCTL_FWMARK_ACCEPT,
                SYSCTL_TW_REUSE,
                SYSCTL_REFLECT_V4,
                SYSCTL_REFLECT_V6,
                SYSCTL_MIGRATE_REQ,
            ]
            .map(|s| std::fs::read_to_string(s).expect("sysctl"))
            .concat();
            (
                ip(&["-4", "rule"]),
                ip(&["-6", "rule"]),
                ip(&["-4", "route", "show", "table", "1338"]),
                ip(&["-6", "route", "show", "table", "1338"]),
                accept,
            )
        })
        .join()
        .expect("thread");
        let (rule4, rule6, route4, route6, accept) = out;
        for rules in [&rule4, &rule6] {
            assert_eq!(
                rules.matches("fwmark 0x53a lookup 1338").count(),
                1,
                "one rule: {rules}"
            );
        }
        assert_eq!(
            route4.trim(),
            "local default dev lo proto static scope host"
        );
        assert!(route6.starts_with("local default dev lo"), "{route6}");
        assert_eq!(
            accept, "1\n1\n1\n1\n1\n",
            "tcp_fwmark_accept, tcp_tw_reuse, fwmark_reflect, tcp_migrate_req"
        );
    }
}
