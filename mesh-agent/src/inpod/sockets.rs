//! Sockets the agent opens inside a pod namespace: the capture listeners and
//! the marked sockets it connects out of.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use mesh_common::{AGENT_MARK, AGENT_SOURCE_V4, PORT_HBONE, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND};
use socket2::{Domain, Socket, Type};

/// Which capture listener a socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Outbound,
    InboundPlaintext,
    Hbone,
}

impl Role {
    pub fn port(self) -> u16 {
        match self {
            Role::Outbound => PORT_OUTBOUND,
            Role::InboundPlaintext => PORT_INBOUND_PLAINTEXT,
            Role::Hbone => PORT_HBONE,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Outbound => "outbound",
            Role::InboundPlaintext => "inbound_plaintext",
            Role::Hbone => "hbone",
        }
    }

    fn bind_addr(self, v6: bool) -> IpAddr {
        match (self, v6) {
            (Role::Outbound, false) => Ipv4Addr::LOCALHOST.into(),
            (Role::Outbound, true) => Ipv6Addr::LOCALHOST.into(),
            (_, false) => Ipv4Addr::UNSPECIFIED.into(),
            (_, true) => Ipv6Addr::UNSPECIFIED.into(),
        }
    }
}

/// A listener opened inside a pod namespace (std, not yet registered with tokio).
#[derive(Debug)]
pub struct PodListener {
    pub role: Role,
    pub v6: bool,
    pub socket: std::net::TcpListener,
}

/// Opens the capture listeners. Call inside the pod namespace. IPv6
/// listeners are opened only when the pod has IPv6 (`::1` usable).
pub fn open_listeners(v6: bool) -> io::Result<Vec<PodListener>> {
    let mut out = Vec::new();
    for role in [Role::Outbound, Role::InboundPlaintext, Role::Hbone] {
        for fam_v6 in [false, true] {
            if fam_v6 && !v6 {
                continue;
            }
            let addr = SocketAddr::new(role.bind_addr(fam_v6), role.port());
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            if fam_v6 {
                s.set_only_v6(true)?;
            }
            s.set_mark(AGENT_MARK)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())
                .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
            s.listen(1024)?;
            out.push(PodListener {
                role,
                v6: fam_v6,
                socket: s.into(),
            });
        }
    }
    Ok(out)
}

/// A marked, non-blocking socket for connecting to `dst`. Call inside the pod
/// namespace. With `to_local_app`, the source is the agent's own address
/// (127.0.0.6 for IPv4, the destination itself for IPv6) so that inbound
/// capture does not take the connection back.
pub fn connect_socket(dst: SocketAddr, to_local_app: bool) -> io::Result<std::net::TcpStream> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    s.set_mark(AGENT_MARK)?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    if to_local_app {
        let src: IpAddr = match dst.ip() {
            IpAddr::V4(_) => Ipv4Addr::from(AGENT_SOURCE_V4).into(),
            IpAddr::V6(ip) => ip.into(),
        };
        // The port is picked at connect time, for the whole 4-tuple: a port
        // picked at bind time must be free of every TIME_WAIT to any
        // destination, and at thousands of connections per second the
        // search for one stalls.
        bind_address_no_port(&s)?;
        s.bind(&SocketAddr::new(src, 0).into())?;
    }
    Ok(s.into())
}

fn bind_address_no_port(s: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and an int option with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of_val(&on) as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The pod's own addresses: global unicast addresses on non-loopback
/// interfaces. Call inside the pod namespace.
pub fn pod_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        let ip: IpAddr = if let Some(v4) = addr.as_sockaddr_in() {
            v4.ip().into()
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            v6.ip().into()
        } else {
            continue;
        };
        let usable = match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
            IpAddr::V6(v6) => {
                !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified()
            }
        };
        if usable && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// Whether IPv6 loopback works here (IPv6 not disabled in the namespace).
pub fn has_ipv6_loopback() -> bool {
    Socket::new(Domain::IPV6, Type::STREAM, None)
        .and_then(|s| s.bind(&SocketAddr::from((Ipv6Addr::LOCALHOST, 0)).into()))
        .is_ok()
}
