//! Sockets the agent opens inside a pod namespace: the capture listeners and
//! the marked sockets it connects out of.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use mesh_common::{
    AGENT_LOCAL_MARK, AGENT_MARK, AGENT_SOURCE_V4, PORT_HBONE, PORT_INBOUND_PLAINTEXT,
    PORT_OUTBOUND,
};
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

    /// How many sockets of this listener are opened when `copies` are
    /// asked for: HBONE has one, accepted on the main runtime, which
    /// places a connection from a pod of this node on the shard that
    /// dialled it (see `crate::shards`); its connections are pooled, so
    /// it accepts few.
    pub fn copies(self, copies: usize) -> usize {
        match self {
            Role::Outbound | Role::InboundPlaintext => copies.max(1),
            Role::Hbone => 1,
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

/// A capture listener opened inside a pod namespace: one or more sockets
/// on one address and port (std, not yet registered with tokio).
#[derive(Debug)]
pub struct PodListener {
    pub role: Role,
    pub v6: bool,
    /// One `SO_REUSEPORT` group: the kernel spreads new connections over
    /// them, so each can be accepted on its own thread.
    pub sockets: Vec<std::net::TcpListener>,
}

impl PodListener {
    /// The group's first socket: naming it (to sk_lookup) names the group.
    pub fn first(&self) -> &std::net::TcpListener {
        &self.sockets[0]
    }
}

/// Opens the capture listeners: `copies` (at least one) sockets each for
/// the outbound and inbound plaintext ports, one for HBONE (see
/// [`Role::copies`]). Call inside the pod namespace. IPv6 listeners are
/// opened only when the pod has IPv6 (`::1` usable).
pub fn open_listeners(v6: bool, copies: usize) -> io::Result<Vec<PodListener>> {
    let mut out = Vec::new();
    for role in [Role::Outbound, Role::InboundPlaintext, Role::Hbone] {
        for fam_v6 in [false, true] {
            if fam_v6 && !v6 {
                continue;
            }
            let addr = SocketAddr::new(role.bind_addr(fam_v6), role.port());
            let sockets = (0..role.copies(copies))
                .map(|_| listen(addr))
                .collect::<io::Result<_>>()?;
            out.push(PodListener {
                role,
                v6: fam_v6,
                sockets,
            });
        }
    }
    Ok(out)
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    // The agent's own copies share the port, and a next agent opens its
    // own beside these while this one still serves (an upgrade), and takes
    // every new connection once these close; `tcp_migrate_req` in the pod
    // hands it what was still queued here.
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_mark(AGENT_MARK)?;
    // Accepted connections inherit it: no call per connection.
    s.set_tcp_nodelay(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Where a connection the agent opens inside a pod comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Out of the pod: the kernel picks the address.
    Pod,
    /// To the pod's own app, on behalf of `client`: the app sees the real
    /// client's address (`IP_TRANSPARENT`), as it would without the mesh, so
    /// a remote caller never looks like a local one. Needs the pod netns set
    /// up by [`super::local_delivery::prepare`].
    LocalApp { client: IpAddr },
}

/// The address the agent connects to a local app `dst` from on `client`'s
/// behalf, and whether it is the client's own (not local: transparent).
/// The client's address cannot be the source of a connection of the other
/// family: the agent's own address is used then.
pub fn local_app_source(client: IpAddr, dst: IpAddr) -> (IpAddr, bool) {
    match (client, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (client, true),
        (_, IpAddr::V4(_)) => (Ipv4Addr::from(AGENT_SOURCE_V4).into(), false),
        (_, ip @ IpAddr::V6(_)) => (ip, false),
    }
}

/// A marked, non-blocking socket for connecting out of the pod. Call inside
/// the pod namespace.
pub fn connect_socket(dst: SocketAddr) -> io::Result<std::net::TcpStream> {
    // Non-blocking from the start: no `fcntl` calls after it.
    let s = Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking(), None)?;
    s.set_tcp_nodelay(true)?;
    s.set_mark(AGENT_MARK)?;
    Ok(s.into())
}

/// A non-blocking socket bound to exactly `src` for connecting to the
/// pod's own app (see [`local_app_source`]). Call inside the pod namespace.
/// The port is the caller's to pick, so that inbound capture can be told
/// the connection's 4-tuple before its SYN is sent.
pub fn local_app_socket(src: SocketAddr, transparent: bool) -> io::Result<std::net::TcpStream> {
    let s = Socket::new(Domain::for_address(src), Type::STREAM.nonblocking(), None)?;
    s.set_tcp_nodelay(true)?;
    if transparent {
        // The app's replies to this non-local address carry the SYN's mark
        // and are routed back over `lo` to this socket.
        s.set_mark(AGENT_LOCAL_MARK)?;
        if src.is_ipv6() {
            s.set_ip_transparent_v6(true)?;
        } else {
            s.set_ip_transparent_v4(true)?;
        }
    } else {
        s.set_mark(AGENT_MARK)?;
    }
    // Ports still in TIME_WAIT from earlier connections to other
    // destinations do not stand in the way; connect checks the 4-tuple.
    s.set_reuse_address(true)?;
    s.bind(&src.into())?;
    Ok(s.into())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listeners_sockets_share_its_port_and_accept_without_nagle() {
        let first = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = listen(addr).unwrap();
        let _clients: Vec<_> = (0..32)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut accepted = [0; 2];
        for (n, l) in accepted.iter_mut().zip([&first, &second]) {
            loop {
                match l.accept() {
                    Ok((s, _)) => {
                        assert!(s.nodelay().unwrap(), "TCP_NODELAY from the listener");
                        *n += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("accept: {e}"),
                }
            }
        }
        assert_eq!(accepted[0] + accepted[1], 32);
        assert!(
            accepted[0] > 0 && accepted[1] > 0,
            "the kernel spreads connections over both: {accepted:?}"
        );
    }
}
