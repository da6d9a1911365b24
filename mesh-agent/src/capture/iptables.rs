//! Capture with iptables nat REDIRECT rules inside each enrolled pod's
//! network namespace.
//!
//! Per pod and address family (IPv6 when the pod has it), in the nat table:
//! - `OUTPUT` jumps to `MESH_OUTBOUND`, which leaves alone the agent's own
//!   marked sockets, loopback destinations, the agent's ports and the
//!   excluded outbound ports, and redirects every other TCP connection to
//!   the outbound listener (15001 on loopback);
//! - `PREROUTING` jumps to `MESH_INBOUND`, which leaves alone what arrives
//!   on `lo` or for a loopback address, the agent's ports and the excluded
//!   inbound ports, and
//!   redirects the rest to the inbound plaintext listener (15006).
//!
//! The agent reads the original destination back with `SO_ORIGINAL_DST`.
//! Its own connections to a local app are locally generated, so they never
//! meet `PREROUTING`'s nat rules (those decide only a connection's first
//! packet, and loopback traffic was decided on the way out).
//!
//! Rules are written with one `iptables-restore --noflush` per family after
//! one `iptables-save` shows what is already there, so enrolling a pod again
//! (an agent restart) leaves one copy. They stay when the agent stops:
//! redirected connections then find no listener and are refused, so pods
//! fail closed as they do with the pinned eBPF programs.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
};

use mesh_common::{
    AGENT_LOCAL_MARK, AGENT_MARK, AGENT_PORTS, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND,
    PROBE_SOURCE_V4, PROBE_SOURCE_V6, PortFlags,
};
use tokio::net::TcpStream;

use super::{CaptureError, ExcludedPorts};
use crate::inpod::netns::Netns;

pub const OUT_CHAIN: &str = "MESH_OUTBOUND";
pub const IN_CHAIN: &str = "MESH_INBOUND";
/// The node's chain (nat `POSTROUTING`) that SNATs the node's own
/// connections to enrolled pods' addresses to the probe source.
pub const PROBE_CHAIN: &str = "MESH_PROBES";
/// How errors name the agent's own network namespace.
const NODE_NETNS: &str = "/proc/self/ns/net";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    /// The address the node SNATs its probes to.
    fn probe_addr(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::from(PROBE_SOURCE_V4).into(),
            Family::V6 => Ipv6Addr::from(PROBE_SOURCE_V6).into(),
        }
    }

    /// The prefix length of one address.
    fn host_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// Whether `program --version` runs; why not, if it does not.
fn tool_runs(program: &str) -> Result<(), String> {
    match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// The jumps from the built-in chains, as `iptables-save` prints them.
fn jump(builtin: &str, chain: &str) -> String {
    format!("-A {builtin} -p tcp -j {chain}")
}

#[derive(Debug)]
pub struct Iptables {
    excluded: ExcludedPorts,
}

impl Iptables {
    /// Checks that the iptables tools run here.
    pub fn new(excluded: &ExcludedPorts) -> Result<Self, CaptureError> {
        for program in ["iptables-restore", "iptables-save"] {
            tool_runs(program)
                .map_err(|detail| CaptureError::IptablesMissing { program, detail })?;
        }
        if let Err(detail) = tool_runs("ip6tables-restore") {
            tracing::warn!(%detail, "ip6tables-restore does not run: pods with IPv6 cannot be enrolled");
        }
        Ok(Iptables {
            excluded: excluded.clone(),
        })
    }

    pub fn excluded(&self) -> &ExcludedPorts {
        &self.excluded
    }

    pub(super) fn take_in(&self, netns: &Netns, v6: bool) -> Result<(), CaptureError> {
        self.apply(netns, Family::V4, true)?;
        if v6 {
            // Undo IPv4 if IPv6 cannot be captured: half a capture would
            // let IPv6 traffic leave in plaintext.
            if let Err(e) = self.apply(netns, Family::V6, true) {
                let _ = self.apply(netns, Family::V4, false);
                return Err(e);
            }
        }
        Ok(())
    }

    pub(super) fn let_go(&self, netns: &Netns) {
        if let Err(e) = remove_rules(netns) {
            tracing::warn!(netns = %netns.path().display(), error = %e, "removing iptables capture");
        }
    }

    fn apply(&self, netns: &Netns, family: Family, wanted: bool) -> Result<(), CaptureError> {
        apply(netns, family, &self.excluded, wanted)
    }
}

/// Removes the capture rules of both families from a pod's namespace, if
/// there are any (an agent in either mode, or `mesh-agent uninstall`).
pub fn remove_rules(netns: &Netns) -> Result<(), CaptureError> {
    let none = ExcludedPorts::default();
    // Both families, whatever the first one does.
    let v4 = apply(netns, Family::V4, &none, false);
    let v6 = apply(netns, Family::V6, &none, false);
    v4.and(v6)
}

/// Brings the pod's rules of one family to `wanted` (present or absent).
fn apply(
    netns: &Netns,
    family: Family,
    excluded: &ExcludedPorts,
    wanted: bool,
) -> Result<(), CaptureError> {
    let saved = match run(netns, family.save(), &["-t", "nat"], None) {
        Ok(saved) => saved,
        // Nothing of ours can be where the tool cannot look: no iptables
        // installed (uninstall after eBPF capture), or no IPv6 in the pod.
        Err(_) if !wanted => return Ok(()),
        Err(e) => return Err(e),
    };
    match script(&saved, family, excluded, wanted) {
        // --wait: the legacy backend's lock is host-wide, and pods are
        // enrolled in parallel.
        Some(script) => run(
            netns,
            family.restore(),
            &["--noflush", "--wait=10"],
            Some(&script),
        )
        .map(drop),
        None => Ok(()),
    }
}

/// The `iptables-restore` input that turns the nat table `saved` into one
/// with (or without) the pod's capture rules; `None` when nothing is to do.
fn script(saved: &str, family: Family, excluded: &ExcludedPorts, wanted: bool) -> Option<String> {
    let has_line = |line: &str| saved.lines().any(|l| l.trim_end() == line);
    let has_chain = |chain: &str| {
        saved
            .lines()
            .any(|l| l.strip_prefix(':').and_then(|l| l.split(' ').next()) == Some(chain))
    };
    let out_jump = jump("OUTPUT", OUT_CHAIN);
    let in_jump = jump("PREROUTING", IN_CHAIN);
    let mut s = String::from("*nat\n");
    if wanted {
        // Declaring a chain creates it, or empties it if it is there.
        let _ = writeln!(s, ":{OUT_CHAIN} - [0:0]\n:{IN_CHAIN} - [0:0]");
        let _ = writeln!(s, "-A {OUT_CHAIN} -m mark --mark {AGENT_MARK:#x} -j RETURN");
        let _ = writeln!(
            s,
            "-A {OUT_CHAIN} -m mark --mark {AGENT_LOCAL_MARK:#x} -j RETURN"
        );
        let _ = writeln!(s, "-A {OUT_CHAIN} -d {} -j RETURN", family.loopback());
        for port in skipped_ports(excluded, PortFlags::OUTBOUND) {
            let _ = writeln!(s, "-A {OUT_CHAIN} -p tcp --dport {port} -j RETURN");
        }
        let _ = writeln!(
            s,
            "-A {OUT_CHAIN} -p tcp -j REDIRECT --to-ports {PORT_OUTBOUND}"
        );
        let _ = writeln!(s, "-A {IN_CHAIN} -i lo -j RETURN");
        // A loopback destination arriving from outside is the kernel's to
        // drop; redirected, it would reach services bound to loopback only.
        let _ = writeln!(s, "-A {IN_CHAIN} -d {} -j RETURN", family.loopback());
        // The node's probes, SNATed there (see `probe_snat_script`).
        let _ = writeln!(
            s,
            "-A {IN_CHAIN} -s {}/{} -p tcp -j RETURN",
            family.probe_addr(),
            family.host_len()
        );
        for port in skipped_ports(excluded, PortFlags::INBOUND) {
            let _ = writeln!(s, "-A {IN_CHAIN} -p tcp --dport {port} -j RETURN");
        }
        let _ = writeln!(
            s,
            "-A {IN_CHAIN} -p tcp -j REDIRECT --to-ports {PORT_INBOUND_PLAINTEXT}"
        );
        // First in the built-in chains, ahead of anything else there.
        if !has_line(&out_jump) {
            let _ = writeln!(s, "-I OUTPUT 1 -p tcp -j {OUT_CHAIN}");
        }
        if !has_line(&in_jump) {
            let _ = writeln!(s, "-I PREROUTING 1 -p tcp -j {IN_CHAIN}");
        }
    } else {
        let mut any = false;
        for (line, chain) in [(&out_jump, OUT_CHAIN), (&in_jump, IN_CHAIN)] {
            if has_line(line) {
                let _ = writeln!(s, "{}", line.replacen("-A", "-D", 1));
                any = true;
            }
            if has_chain(chain) {
                let _ = writeln!(s, "-F {chain}\n-X {chain}");
                any = true;
            }
        }
        if !any {
            return None;
        }
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// Brings the node's probe SNAT (in the agent's own network namespace, the
/// node's) to `addresses`: a connection the node itself opens (a socket on
/// the node: the kubelet's probes, and any other node process) to one of
/// them leaves from the probe source, which inbound capture in the pod
/// leaves to the app. `None` removes the chain and its jump. Both families;
/// IPv6 only where ip6tables runs.
pub fn sync_probe_snat(addresses: Option<&[IpAddr]>) -> Result<(), CaptureError> {
    let mut result = Ok(());
    for family in [Family::V4, Family::V6] {
        let of_family: Vec<IpAddr> = addresses
            .unwrap_or_default()
            .iter()
            .copied()
            .filter(|a| a.is_ipv6() == (family == Family::V6))
            .collect();
        let saved = match run_in(None, family.save(), &["-t", "nat"], None) {
            Ok(saved) => saved,
            // Nothing of ours where the tool cannot look, and nothing to
            // add for a family no pod has.
            Err(_) if addresses.is_none() || of_family.is_empty() => continue,
            Err(e) => {
                result = result.and(Err(e));
                continue;
            }
        };
        let wanted = addresses.map(|_| of_family.as_slice());
        if let Some(script) = probe_snat_script(&saved, family, wanted)
            && let Err(e) = run_in(
                None,
                family.restore(),
                &["--noflush", "--wait=10"],
                Some(&script),
            )
        {
            result = result.and(Err(e));
        }
    }
    result
}

/// The `iptables-restore` input that makes the node's probe chain hold
/// exactly `addresses` (`None`: removes it); `None` when nothing is to do.
fn probe_snat_script(saved: &str, family: Family, addresses: Option<&[IpAddr]>) -> Option<String> {
    let jump = jump("POSTROUTING", PROBE_CHAIN);
    let has_jump = saved.lines().any(|l| l.trim_end() == jump);
    let has_chain = saved
        .lines()
        .any(|l| l.strip_prefix(':').and_then(|l| l.split(' ').next()) == Some(PROBE_CHAIN));
    let mut s = String::from("*nat\n");
    match addresses {
        Some(addresses) => {
            // Declaring the chain empties it: it is rewritten whole.
            let _ = writeln!(s, ":{PROBE_CHAIN} - [0:0]");
            let source = family.probe_addr();
            let host = family.host_len();
            for addr in addresses {
                // `--socket-exists`: only packets of the node's own sockets,
                // never traffic the node forwards.
                let _ = writeln!(
                    s,
                    "-A {PROBE_CHAIN} -d {addr}/{host} -p tcp -m owner --socket-exists -j SNAT --to-source {source}"
                );
            }
            if !has_jump {
                let _ = writeln!(s, "-I POSTROUTING 1 -p tcp -j {PROBE_CHAIN}");
            }
        }
        None => {
            if !has_jump && !has_chain {
                return None;
            }
            if has_jump {
                let _ = writeln!(s, "{}", jump.replacen("-A", "-D", 1));
            }
            if has_chain {
                let _ = writeln!(s, "-F {PROBE_CHAIN}\n-X {PROBE_CHAIN}");
            }
        }
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// Destination ports a chain returns early for: the agent's own and the
/// excluded ones of that direction.
fn skipped_ports(excluded: &ExcludedPorts, direction: u8) -> Vec<u16> {
    let mut ports: Vec<u16> = AGENT_PORTS.to_vec();
    ports.extend(
        excluded
            .0
            .iter()
            .filter(|(_, flags)| *flags & direction != 0)
            .map(|(port, _)| *port),
    );
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Runs an iptables tool inside the pod's namespace and returns its stdout.
fn run(
    netns: &Netns,
    program: &'static str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, CaptureError> {
    run_in(Some(netns), program, args, input)
}

/// Runs an iptables tool inside `netns`, or in the agent's own (the
/// node's) namespace, and returns its stdout.
fn run_in(
    netns: Option<&Netns>,
    program: &'static str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, CaptureError> {
    let fail = |detail: String| CaptureError::Iptables {
        netns: netns.map_or_else(|| PathBuf::from(NODE_NETNS), |n| n.path().to_owned()),
        program,
        detail,
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A child started from a thread inside the pod's namespace starts there.
    let mut child = match netns {
        Some(netns) => netns
            .run(|| cmd.spawn())
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))?,
        None => cmd.spawn().map_err(|e| fail(e.to_string()))?,
    };
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take())
        && let Err(e) = stdin.write_all(input.as_bytes())
    {
        let _ = child.kill();
        let _ = child.wait();
        return Err(fail(format!("writing rules: {e}")));
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(fail(format!("{}: {}", out.status, stderr.trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The destination a REDIRECTed connection had before NAT; `None` for a
/// connection made to the listener itself (conntrack knows every
/// connection, and its "original" destination is then the listener's own
/// address: forwarding there would loop through the agent without end).
pub(super) fn original_dst(client: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(client);
    let local = client.local_addr().ok()?;
    let addr = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    addr.ok()?.as_socket().filter(|orig| *orig != local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excluded() -> ExcludedPorts {
        ExcludedPorts::new(&[22], &[9902])
    }

    #[test]
    fn a_fresh_namespace_gets_both_chains_and_both_jumps_first() {
        let empty = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        let s = script(empty, Family::V4, &excluded(), true).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        assert!(
            lines.contains(&"-I OUTPUT 1 -p tcp -j MESH_OUTBOUND"),
            "{s}"
        );
        assert!(
            lines.contains(&"-I PREROUTING 1 -p tcp -j MESH_INBOUND"),
            "{s}"
        );
        assert!(lines.contains(&"-A MESH_OUTBOUND -m mark --mark 0x539 -j RETURN"));
        assert!(lines.contains(&"-A MESH_OUTBOUND -d 127.0.0.0/8 -j RETURN"));
        // Loopback from outside is never redirected to a loopback-only app.
        assert!(lines.contains(&"-A MESH_INBOUND -d 127.0.0.0/8 -j RETURN"));
        // The excluded ports in their own direction only, the agent's in both.
        assert!(lines.contains(&"-A MESH_OUTBOUND -p tcp --dport 22 -j RETURN"));
        assert!(!lines.contains(&"-A MESH_INBOUND -p tcp --dport 22 -j RETURN"));
        assert!(lines.contains(&"-A MESH_INBOUND -p tcp --dport 9902 -j RETURN"));
        assert!(lines.contains(&"-A MESH_INBOUND -p tcp --dport 15008 -j RETURN"));
        assert!(lines.contains(&"-A MESH_OUTBOUND -p tcp --dport 15008 -j RETURN"));
        // The node agent's host ports are an app's ports inside a pod: an app
        // there is captured like any other.
        for port in [15000, 15020, 15021] {
            for chain in [IN_CHAIN, OUT_CHAIN] {
                let rule = format!("-A {chain} -p tcp --dport {port} -j RETURN");
                assert!(!lines.contains(&rule.as_str()), "{rule}: {s}");
            }
        }
        // Every RETURN comes before its chain's REDIRECT.
        for chain in [OUT_CHAIN, IN_CHAIN] {
            let redirect = lines
                .iter()
                .position(|l| l.starts_with(&format!("-A {chain}")) && l.contains("REDIRECT"))
                .unwrap();
            let last_return = lines
                .iter()
                .rposition(|l| l.starts_with(&format!("-A {chain}")) && l.ends_with("RETURN"))
                .unwrap();
            assert!(last_return < redirect, "{s}");
        }
        let v6 = script(empty, Family::V6, &excluded(), true).unwrap();
        assert!(v6.contains("-A MESH_OUTBOUND -d ::1/128 -j RETURN"), "{v6}");
        // The node's probes reach the app, before any REDIRECT.
        let probe = lines
            .iter()
            .position(|l| *l == "-A MESH_INBOUND -s 169.254.7.127/32 -p tcp -j RETURN")
            .unwrap_or_else(|| panic!("{s}"));
        let redirect = lines
            .iter()
            .position(|l| l.starts_with("-A MESH_INBOUND") && l.contains("REDIRECT"))
            .unwrap();
        assert!(probe < redirect, "{s}");
        assert!(
            v6.contains(
                "-A MESH_INBOUND -s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -j RETURN"
            ),
            "{v6}"
        );
    }

    #[test]
    fn the_node_snats_its_own_connections_to_enrolled_addresses_only() {
        let empty = "*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";
        let pods: Vec<IpAddr> = vec!["10.1.0.2".parse().unwrap(), "10.1.0.3".parse().unwrap()];
        let s = probe_snat_script(empty, Family::V4, Some(&pods)).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(
            lines,
            [
                "*nat",
                ":MESH_PROBES - [0:0]",
                "-A MESH_PROBES -d 10.1.0.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127",
                "-A MESH_PROBES -d 10.1.0.3/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127",
                "-I POSTROUTING 1 -p tcp -j MESH_PROBES",
                "COMMIT",
            ]
        );
        // Again with the jump in place: the chain is rewritten, no second
        // jump; no pod left: an empty chain.
        let saved = "*nat\n:POSTROUTING ACCEPT [0:0]\n:MESH_PROBES - [0:0]\n\
            -A POSTROUTING -p tcp -j MESH_PROBES\nCOMMIT\n";
        let s = probe_snat_script(saved, Family::V4, Some(&[])).unwrap();
        assert_eq!(s, "*nat\n:MESH_PROBES - [0:0]\nCOMMIT\n");
        let v6: Vec<IpAddr> = vec!["fd00:1::2".parse().unwrap()];
        let s = probe_snat_script(empty, Family::V6, Some(&v6)).unwrap();
        assert!(s.contains("-A MESH_PROBES -d fd00:1::2/128 -p tcp -m owner --socket-exists -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff\n"), "{s}");
        // Removal takes the jump and the chain, and only what is there.
        let s = probe_snat_script(saved, Family::V4, None).unwrap();
        assert_eq!(
            s,
            "*nat\n-D POSTROUTING -p tcp -j MESH_PROBES\n-F MESH_PROBES\n-X MESH_PROBES\nCOMMIT\n"
        );
        assert_eq!(probe_snat_script(empty, Family::V4, None), None);
    }

    #[test]
    fn enrolling_again_refills_the_chains_without_a_second_jump() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
            :MESH_INBOUND - [0:0]\n:MESH_OUTBOUND - [0:0]\n\
            -A PREROUTING -p tcp -j MESH_INBOUND\n-A OUTPUT -p tcp -j MESH_OUTBOUND\n\
            -A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";
        let s = script(saved, Family::V4, &excluded(), true).unwrap();
        assert!(s.contains(":MESH_OUTBOUND - [0:0]"), "{s}");
        assert!(!s.contains("-I OUTPUT"), "{s}");
        assert!(!s.contains("-I PREROUTING"), "{s}");
    }

    #[test]
    fn release_removes_only_what_is_there() {
        let saved = "*nat\n:OUTPUT ACCEPT [0:0]\n:MESH_OUTBOUND - [0:0]\n\
            -A OUTPUT -p tcp -j MESH_OUTBOUND\n-A OUTPUT -p tcp -j CNI_THING\nCOMMIT\n";
        let s = script(saved, Family::V4, &excluded(), false).unwrap();
        assert_eq!(
            s,
            "*nat\n-D OUTPUT -p tcp -j MESH_OUTBOUND\n-F MESH_OUTBOUND\n-X MESH_OUTBOUND\nCOMMIT\n"
        );
        let clean = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -j CNI_THING\nCOMMIT\n";
        assert_eq!(script(clean, Family::V4, &excluded(), false), None);
        assert_eq!(script("", Family::V6, &excluded(), false), None);
    }
}
