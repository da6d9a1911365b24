//! Types, names and constants shared by the kernel programs (`mesh-ebpf`) and
//! the agent (`mesh-agent`). This crate is the single source of truth for map
//! layouts, socket marks and ports: both sides compile against it, so a layout
//! change cannot reach only one of them.
#![no_std]

/// Outbound capture listener (`127.0.0.1` / `::1` inside the pod netns).
pub const PORT_OUTBOUND: u16 = 15001;
/// Inbound plaintext capture listener (`0.0.0.0` / `::` inside the pod netns).
pub const PORT_INBOUND_PLAINTEXT: u16 = 15006;
/// Inbound HBONE (mTLS) listener.
pub const PORT_HBONE: u16 = 15008;
/// Admin server, localhost only.
pub const PORT_ADMIN: u16 = 15000;
/// Prometheus metrics.
pub const PORT_METRICS: u16 = 15020;
/// Readiness probe.
pub const PORT_READY: u16 = 15021;

/// The agent's listeners inside a pod: never captured in either direction
/// (a connection to one is for the agent itself). The node agent's other
/// ports ([`PORT_ADMIN`], [`PORT_METRICS`], [`PORT_READY`]) are on the host,
/// not in pods: inside a pod they are an app's ports like any other, and
/// exempting them would let plaintext reach such an app past STRICT and
/// policy.
pub const AGENT_PORTS: [u16; 3] = [PORT_OUTBOUND, PORT_INBOUND_PLAINTEXT, PORT_HBONE];

/// `SO_MARK` carried by every socket the agent opens inside a pod netns; the
/// connect programs leave such sockets alone, which is what prevents loops.
pub const AGENT_MARK: u32 = 0x539;

/// `SO_MARK` of the agent's connections to a local app, which come from the
/// real client's address (`IP_TRANSPARENT`). With `tcp_fwmark_accept` set in
/// the pod netns the app's accepted socket takes the SYN's mark, and a
/// policy rule ([`LOCAL_DELIVERY_TABLE`]) sends its replies to that
/// non-local address back over `lo` to the agent instead of out of the pod.
/// Left alone by the connect programs, like [`AGENT_MARK`], and by inbound
/// capture through [`maps::AGENT_FLOWS`].
pub const AGENT_LOCAL_MARK: u32 = 0x53a;

/// Routing table (and rule priority) inside a pod netns holding the
/// `local 0.0.0.0/0 dev lo` (and `::/0`) route for [`AGENT_LOCAL_MARK`].
pub const LOCAL_DELIVERY_TABLE: u32 = 0x53a;
pub const LOCAL_DELIVERY_RULE_PRIORITY: u32 = 0x53a;

/// Source address of the agent's connections to a local app when the
/// client's address cannot be used (an IPv6 client of an IPv4 app). In
/// network byte order, as the kernel gives it.
pub const AGENT_SOURCE_V4: [u8; 4] = [127, 0, 0, 6];

/// `ifindex` of `lo` in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Source ports of the agent's connections to a local app (from the
/// client's address): outside Linux's default ephemeral range
/// (32768-60999), so that a client's own port rarely meets one.
pub const LOCAL_APP_PORTS: core::ops::RangeInclusive<u16> = 61000..=65535;

/// The source address the node gives its own connections to an enrolled
/// pod's address (the kubelet's probes), by SNAT on the node; inside the
/// pod, inbound capture leaves connections from it to the app, so probes
/// work under PeerAuthentication STRICT. The same address istio-cni uses,
/// so either's node rule is understood by the other's pods.
pub const PROBE_SOURCE_V4: [u8; 4] = [169, 254, 7, 127];
/// [`PROBE_SOURCE_V4`] for IPv6 (a ULA, as istio-cni uses).
pub const PROBE_SOURCE_V6: [u8; 16] = [
    0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
];

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Map names, as the kernel object declares them and the agent looks them up.
pub mod maps {
    /// netns cookie -> [`super::NetnsInfo`]: the enrolled pod network namespaces.
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    /// socket cookie -> [`super::OrigDst`]: set at connect, moved by sockops.
    pub const PENDING_CONNECT: &str = "PENDING_CONNECT";
    /// [`super::ConnKey`] -> [`super::OrigDst`]: read (and deleted) by the agent after accept.
    pub const ORIG_DST: &str = "ORIG_DST";
    /// port (host order) -> [`super::PortFlags`] bits: excluded from capture.
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// [`super::AddrKey`] -> netns cookie: pod addresses whose inbound traffic is captured.
    pub const INBOUND_ADDRS: &str = "INBOUND_ADDRS";
    /// [`super::AddrKey`] -> the pod's 15006 listener socket (SOCKHASH).
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// Per-CPU `u64` counters indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// [`super::FlowKey`] -> 0: the agent's own connections to a local app,
    /// by their exact 4-tuple, while they are being set up. Inbound capture
    /// leaves these SYNs alone: they come from the client's address, and
    /// nothing else in a SYN tells them apart from the client's own.
    pub const AGENT_FLOWS: &str = "AGENT_FLOWS";

    pub const ALL: [&str; 8] = [
        ENROLLED_NETNS,
        PENDING_CONNECT,
        ORIG_DST,
        EXCLUDED_PORTS,
        INBOUND_ADDRS,
        INBOUND_LISTENERS,
        COUNTERS,
        AGENT_FLOWS,
    ];
}

/// Program names, as the kernel object declares them.
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
}

/// Map sizes.
pub const MAX_ENROLLED_NETNS: u32 = 4096;
pub const MAX_PENDING: u32 = 65536;
pub const MAX_EXCLUDED_PORTS: u32 = 256;
pub const MAX_INBOUND_ADDRS: u32 = 8192;
pub const MAX_AGENT_FLOWS: u32 = 65536;

/// Values of [`maps::ENROLLED_NETNS`]. `flags` is reserved for per-pod modes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetnsInfo {
    pub flags: u32,
    pub _pad: u32,
}

/// Bits of an [`maps::EXCLUDED_PORTS`] value.
pub struct PortFlags;
impl PortFlags {
    /// Outbound connections to this destination port are not captured.
    pub const OUTBOUND: u8 = 1;
    /// Inbound connections to this local port are not captured.
    pub const INBOUND: u8 = 2;
}

/// The destination an application asked for, before the connect program
/// rewrote it. A v4-mapped IPv6 destination is stored as plain IPv4, since the
/// connection then runs over IPv4 to the v4 capture listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// Address in network byte order; IPv4 uses `addr[0]`.
    pub addr: [u32; 4],
    /// Port in host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`]: also the family of the listener the
    /// connection was sent to.
    pub family: u16,
    pub _pad: u32,
}

/// Key of [`maps::ORIG_DST`]: what the agent knows after `accept` on 15001:
/// the pod (netns cookie), the client's ephemeral port and the family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub netns_cookie: u64,
    /// Client port in host byte order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Key of [`maps::INBOUND_ADDRS`] and [`maps::INBOUND_LISTENERS`]: a pod address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AddrKey {
    /// Address in network byte order; IPv4 uses `addr[0]`.
    pub addr: [u32; 4],
    pub family: u32,
}

/// Key of [`maps::AGENT_FLOWS`]: one TCP connection as the SYN shows it to
/// the pod (`remote` is the agent's source, `local` the app's address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Addresses in network byte order; IPv4 uses `[0]`.
    pub remote: [u32; 4],
    pub local: [u32; 4],
    /// Ports in host byte order.
    pub remote_port: u16,
    pub local_port: u16,
    pub family: u32,
}

/// Indexes into [`maps::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// An enrolled pod's outbound connect was sent to 15001.
    OutboundRedirected = 0,
    /// An enrolled pod's outbound connect was left alone (loopback, excluded
    /// port, HBONE port, agent socket).
    OutboundSkipped = 1,
    /// The original destination could not be recorded (map full): the
    /// connection still goes to 15001, where the agent refuses it.
    OutboundErrors = 2,
    /// An inbound SYN to an enrolled pod address was given to its 15006 listener.
    InboundAssigned = 3,
    /// An inbound SYN to an enrolled pod address found no agent listener and
    /// was dropped (fail closed).
    InboundNoListener = 4,
    /// An inbound SYN to an enrolled pod was left alone (agent port,
    /// excluded port, one of the agent's own connections to the app).
    InboundSkipped = 5,
    /// An inbound SYN from the network to an address of an enrolled pod that
    /// is not one of its Pod's addresses (IPv6 link-local, an address added
    /// inside the pod) was dropped: no address reaches the app uncaptured.
    InboundUnknownAddress = 6,
    /// An inbound SYN to an enrolled pod's address from the kubelet probe
    /// source ([`PROBE_SOURCE_V4`], [`PROBE_SOURCE_V6`]) was left to the
    /// app's own listener.
    InboundProbe = 7,
}

impl Counter {
    pub const COUNT: u32 = 8;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::OutboundRedirected,
        Counter::OutboundSkipped,
        Counter::OutboundErrors,
        Counter::InboundAssigned,
        Counter::InboundNoListener,
        Counter::InboundSkipped,
        Counter::InboundUnknownAddress,
        Counter::InboundProbe,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::OutboundRedirected => "outbound_redirected",
            Counter::OutboundSkipped => "outbound_skipped",
            Counter::OutboundErrors => "outbound_errors",
            Counter::InboundAssigned => "inbound_assigned",
            Counter::InboundNoListener => "inbound_no_listener",
            Counter::InboundSkipped => "inbound_skipped",
            Counter::InboundUnknownAddress => "inbound_unknown_address",
            Counter::InboundProbe => "inbound_probe",
        }
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: plain `#[repr(C)]` integer structs with explicit padding fields.
    unsafe impl aya::Pod for super::NetnsInfo {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::FlowKey {}
}
