//! Kernel half of traffic capture. Four programs share the maps declared in
//! `mesh-common`:
//! - `mesh_connect4` / `mesh_connect6` (cgroup/connect4, connect6; kernel >= 5.7
//!   for links, `bpf_get_netns_cookie` in sock_addr >= 5.7): an enrolled pod's
//!   TCP connect is rewritten to the agent's 15001 listener, the original
//!   destination kept by socket cookie;
//! - `mesh_sockops` (sockops, `bpf_get_netns_cookie` >= 5.15): once the client
//!   port is known, the record moves to a key the agent can build after accept;
//! - `mesh_sk_lookup` (sk_lookup, kernel >= 5.9, attached per pod netns): a
//!   SYN to an enrolled pod address is handed to the pod's 15006 listener, or
//!   dropped (fail closed) when no agent listens or the address is not one the
//!   pod was enrolled with; the agent's own connections to the app (listed in
//!   `AGENT_FLOWS` by 4-tuple), the node's probes (from `PROBE_SOURCE_V4`/`_V6`,
//!   which the node SNATs its own connections to) and loopback are left alone.
// For bpf the object has no std and no main. On the host (clippy, `cargo
// test --workspace`) it is an ordinary binary that only type-checks the
// programs, so workspace-wide lints see the kernel code too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, sk_action},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use mesh_common::{
    AF_INET, AF_INET6, AGENT_LOCAL_MARK, AGENT_MARK, AGENT_PORTS, AddrKey, ConnKey, Counter,
    FlowKey, MAX_AGENT_FLOWS, MAX_ENROLLED_NETNS, MAX_EXCLUDED_PORTS, MAX_INBOUND_ADDRS,
    MAX_PENDING, NetnsInfo, OrigDst, PORT_HBONE, PORT_OUTBOUND, PROBE_SOURCE_V4, PROBE_SOURCE_V6,
    PortFlags,
};

const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;
/// `::ffff:0:0/96` prefix word, network order.
const V4_MAPPED_PREFIX: u32 = u32::from_be(0x0000_ffff);
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6_LAST: u32 = u32::from_be(1);
/// The probe source addresses as sk_lookup reads them (network order).
const PROBE_V4: u32 = u32::from_ne_bytes(PROBE_SOURCE_V4);
const PROBE_V6: [u32; 4] = [
    u32::from_ne_bytes([
        PROBE_SOURCE_V6[0],
        PROBE_SOURCE_V6[1],
        PROBE_SOURCE_V6[2],
        PROBE_SOURCE_V6[3],
    ]),
    u32::from_ne_bytes([
        PROBE_SOURCE_V6[4],
        PROBE_SOURCE_V6[5],
        PROBE_SOURCE_V6[6],
        PROBE_SOURCE_V6[7],
    ]),
    u32::from_ne_bytes([
        PROBE_SOURCE_V6[8],
        PROBE_SOURCE_V6[9],
        PROBE_SOURCE_V6[10],
        PROBE_SOURCE_V6[11],
    ]),
    u32::from_ne_bytes([
        PROBE_SOURCE_V6[12],
        PROBE_SOURCE_V6[13],
        PROBE_SOURCE_V6[14],
        PROBE_SOURCE_V6[15],
    ]),
];
const CONNECT_ALLOW: i32 = 1;

#[map]
static ENROLLED_NETNS: HashMap<u64, NetnsInfo> = HashMap::pinned(MAX_ENROLLED_NETNS, 0);
#[map]
static PENDING_CONNECT: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_PENDING, 0);
#[map]
static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(MAX_PENDING, 0);
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(MAX_EXCLUDED_PORTS, 0);
#[map]
static INBOUND_ADDRS: HashMap<AddrKey, u64> = HashMap::pinned(MAX_INBOUND_ADDRS, 0);
#[map]
static INBOUND_LISTENERS: SockHash<AddrKey> = SockHash::pinned(MAX_INBOUND_ADDRS, 0);
/// Counter slots beyond [`Counter::ALL`]: the `upgrade-test` variant has
/// one more (a map layout that differs from the default build's).
#[cfg(feature = "upgrade-test")]
const EXTRA_COUNTERS: u32 = 1;
#[cfg(not(feature = "upgrade-test"))]
const EXTRA_COUNTERS: u32 = 0;
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT + EXTRA_COUNTERS, 0);
#[map]
static AGENT_FLOWS: HashMap<FlowKey, u8> = HashMap::pinned(MAX_AGENT_FLOWS, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn port_excluded(port: u16, direction: u8) -> bool {
    if AGENT_PORTS.contains(&port) {
        return true;
    }
    // SAFETY: the value is a plain u8 copied out at once.
    match unsafe { EXCLUDED_PORTS.get(port) } {
        Some(flags) => *flags & direction != 0,
        None => false,
    }
}

/// Whether a connect from this socket is ours to capture. Returns the netns
/// cookie when it is.
#[inline(always)]
fn capturable(ctx: &SockAddrContext) -> Option<u64> {
    let sa = ctx.sock_addr;
    // SAFETY: ctx fields readable in cgroup/connect{4,6}.
    let (protocol, sock_type) = unsafe { ((*sa).protocol, (*sa).type_) };
    if protocol != IPPROTO_TCP || sock_type != SOCK_STREAM {
        return None;
    }
    // SAFETY: helper valid for sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    // SAFETY: key lookup only.
    unsafe { ENROLLED_NETNS.get(netns) }?;
    // SAFETY: `sk` is always set for sock_addr programs; `mark` is a readable field.
    let mark = unsafe { (*(*sa).__bindgen_anon_1.sk).mark };
    if mark == AGENT_MARK || mark == AGENT_LOCAL_MARK {
        count(Counter::OutboundSkipped);
        return None;
    }
    Some(netns)
}

#[inline(always)]
fn record(ctx: &SockAddrContext, dst: &OrigDst) -> bool {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if PENDING_CONNECT.insert(cookie, dst, 0).is_err() {
        count(Counter::OutboundErrors);
        return false;
    }
    true
}

#[inline(always)]
fn skip_destination(port: u16) -> bool {
    port == PORT_HBONE || port_excluded(port, PortFlags::OUTBOUND)
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    if capturable(&ctx).is_none() {
        return CONNECT_ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: ctx fields readable in connect4.
    let (ip, port) = unsafe { ((*sa).user_ip4, u16::from_be((*sa).user_port as u16)) };
    if ip & 0xff == 127 || skip_destination(port) {
        count(Counter::OutboundSkipped);
        return CONNECT_ALLOW;
    }
    let dst = OrigDst {
        addr: [ip, 0, 0, 0],
        port,
        family: AF_INET,
        _pad: 0,
    };
    // When recording fails the connection is still redirected: the agent
    // refuses what it cannot route, so nothing leaves in plaintext.
    record(&ctx, &dst);
    // SAFETY: user_ip4/user_port are writable in connect4.
    unsafe {
        (*sa).user_ip4 = LOOPBACK_V4;
        (*sa).user_port = u32::from(PORT_OUTBOUND.to_be());
    }
    count(Counter::OutboundRedirected);
    CONNECT_ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    if capturable(&ctx).is_none() {
        return CONNECT_ALLOW;
    }
    let sa = ctx.sock_addr;
    // The verifier only accepts 4-byte accesses to user_ip6: read word by word.
    // SAFETY: ctx fields readable in connect6.
    let ip = unsafe {
        let p = addr_of!((*sa).user_ip6) as *const u32;
        [
            read_volatile(p),
            read_volatile(p.add(1)),
            read_volatile(p.add(2)),
            read_volatile(p.add(3)),
        ]
    };
    // SAFETY: as above.
    let port = unsafe { u16::from_be((*sa).user_port as u16) };
    let v4_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX;
    let loopback = if v4_mapped {
        ip[3] & 0xff == 127
    } else {
        ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == LOOPBACK_V6_LAST
    };
    if loopback || skip_destination(port) {
        count(Counter::OutboundSkipped);
        return CONNECT_ALLOW;
    }
    let (dst, new_ip) = if v4_mapped {
        (
            OrigDst {
                addr: [ip[3], 0, 0, 0],
                port,
                family: AF_INET,
                _pad: 0,
            },
            [0, 0, V4_MAPPED_PREFIX, LOOPBACK_V4],
        )
    } else {
        (
            OrigDst {
                addr: ip,
                port,
                family: AF_INET6,
                _pad: 0,
            },
            [0, 0, 0, LOOPBACK_V6_LAST],
        )
    };
    record(&ctx, &dst);
    // SAFETY: user_ip6/user_port are writable in connect6, 4 bytes at a time.
    unsafe {
        let p = addr_of_mut!((*sa).user_ip6) as *mut u32;
        write_volatile(p, new_ip[0]);
        write_volatile(p.add(1), new_ip[1]);
        write_volatile(p.add(2), new_ip[2]);
        write_volatile(p.add(3), new_ip[3]);
        (*sa).user_port = u32::from(PORT_OUTBOUND.to_be());
    }
    count(Counter::OutboundRedirected);
    CONNECT_ALLOW
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(dst) = (unsafe { PENDING_CONNECT.get(cookie) }).copied() else {
        return 1;
    };
    let key = ConnKey {
        // SAFETY: helper valid for sock_ops programs since 5.15.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        port: ctx.local_port() as u16,
        family: dst.family,
        _pad: 0,
    };
    if ORIG_DST.insert(key, dst, 0).is_err() {
        count(Counter::OutboundErrors);
    }
    let _ = PENDING_CONNECT.remove(cookie);
    1
}

#[inline(always)]
fn read_ip6(p: *const u32) -> [u32; 4] {
    // SAFETY: callers pass a ctx field the verifier lets us read 4 bytes at
    // a time.
    unsafe {
        [
            read_volatile(p),
            read_volatile(p.add(1)),
            read_volatile(p.add(2)),
            read_volatile(p.add(3)),
        ]
    }
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // The upgrade-test variant's program differs: it counts every lookup
    // in its extra slot.
    #[cfg(feature = "upgrade-test")]
    if let Some(slot) = COUNTERS.get_ptr_mut(Counter::COUNT) {
        // SAFETY: a per-CPU slot, written only from this CPU.
        unsafe { *slot += 1 };
    }
    let l = ctx.lookup;
    // SAFETY: ctx fields readable in sk_lookup.
    let (protocol, family, local_port, remote_port) = unsafe {
        (
            (*l).protocol,
            (*l).family,
            (*l).local_port,
            u16::from_be((*l).remote_port),
        )
    };
    if protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let (local, remote) = if family == u32::from(AF_INET) {
        // SAFETY: as above.
        unsafe { ([(*l).local_ip4, 0, 0, 0], [(*l).remote_ip4, 0, 0, 0]) }
    } else if family == u32::from(AF_INET6) {
        // SAFETY: as above.
        unsafe {
            (
                read_ip6(addr_of!((*l).local_ip6) as *const u32),
                read_ip6(addr_of!((*l).remote_ip6) as *const u32),
            )
        }
    } else {
        return sk_action::SK_PASS;
    };
    // The agent's own connection to the app, from the client's address: it
    // registered the exact 4-tuple before connecting.
    let flow = FlowKey {
        remote,
        local,
        remote_port,
        local_port: local_port as u16,
        family,
    };
    // SAFETY: key lookup only.
    if unsafe { AGENT_FLOWS.get(flow) }.is_some() {
        count(Counter::InboundSkipped);
        return sk_action::SK_PASS;
    }
    let key = AddrKey {
        addr: local,
        family,
    };
    // Inside the pod, over loopback: the pod talking to itself.
    if is_loopback(&key) {
        return sk_action::SK_PASS;
    }
    if port_excluded(local_port as u16, PortFlags::INBOUND) {
        count(Counter::InboundSkipped);
        return sk_action::SK_PASS;
    }
    // This program is attached only to enrolled pods' namespaces, so every
    // other SYN here is for an enrolled pod. One to an address that is not
    // its Pod's (an IPv6 link-local address, one added inside the pod) has
    // no listener to go to and is dropped: it must not reach the app
    // uncaptured.
    // SAFETY: key lookup only.
    if unsafe { INBOUND_ADDRS.get(key) }.is_none() {
        count(Counter::InboundUnknownAddress);
        return sk_action::SK_DROP;
    }
    // The node's own connection (the kubelet's probe), SNATed on the node
    // to the probe address: the app answers it itself, as under istio-cni,
    // so probes work under STRICT. Nothing off the node can complete a
    // handshake from this address: the pod's answer goes to the node,
    // which knows it only through its SNAT.
    if is_probe_source(family, &remote) {
        count(Counter::InboundProbe);
        return sk_action::SK_PASS;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => {
            count(Counter::InboundAssigned);
            sk_action::SK_PASS
        }
        Err(_) => {
            count(Counter::InboundNoListener);
            sk_action::SK_DROP
        }
    }
}

#[inline(always)]
fn is_probe_source(family: u32, remote: &[u32; 4]) -> bool {
    if family == u32::from(AF_INET) {
        return remote[0] == PROBE_V4;
    }
    remote[0] == PROBE_V6[0]
        && remote[1] == PROBE_V6[1]
        && remote[2] == PROBE_V6[2]
        && remote[3] == PROBE_V6[3]
}

/// 127.0.0.0/8, `::1` and v4-mapped loopback.
#[inline(always)]
fn is_loopback(key: &AddrKey) -> bool {
    let a = key.addr;
    if key.family == u32::from(AF_INET) {
        return a[0] & 0xff == 127;
    }
    let v4_mapped = a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_PREFIX;
    (v4_mapped && a[3] & 0xff == 127)
        || (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == LOOPBACK_V6_LAST)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
