//! Each request and long-lived connection judged against the fault
//! timeline: fine, failed for a reason the faults explain (a denial while
//! the DENY policy was in force, an agent on its path being restarted), or
//! unexpected. Pure functions of the events and the timeline.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use mesh_tests::soak::{Event, HOLD_INTERVAL, Kind, Outcome};

use super::timeline::{Denial, Timeline, overlaps, within};

/// After a restarted agent is ready, how long connections through it may
/// still fail (the other agent's pooled HBONE connections to it are dead
/// and must be noticed). Measured: none failed after `ready`; the margin
/// covers the time between the agent's readiness and the poll that saw it.
pub const RESTART_GRACE: f64 = 0.5;

/// How a connection may fail when an agent on its path is killed, down or
/// starting: refused (the client's own agent has no listener: fail
/// closed), no answer to a SYN (a peer's inbound capture with no agent
/// drops it), closed or reset unserved or cut in the middle (in flight).
/// Never wrong bytes, and never a saturated client.
fn restart_explains(o: Outcome) -> bool {
    matches!(
        o,
        Outcome::Refused
            | Outcome::ConnectTimeout
            | Outcome::Closed
            | Outcome::Reset
            | Outcome::Timeout
            | Outcome::Truncated
    )
}
/// After a DENY policy is applied, how long a long-lived connection it
/// forbids may still exchange a line before it is closed: the agent closes
/// it when it sees the new store; the client notices at its next line.
pub fn revoke_grace() -> f64 {
    HOLD_INTERVAL.as_secs_f64() + 0.75
}

/// Where things are: which node each client pod and each server address
/// is on, the port the DENY policy covers, and the pod that churns.
pub struct Topology {
    pub client_node: HashMap<String, usize>,
    pub server_node: HashMap<IpAddr, usize>,
    pub deny_port: u16,
}

impl Topology {
    /// The nodes whose agents carry this event's connection.
    fn nodes(&self, e: &Event) -> [Option<usize>; 2] {
        [
            self.client_node.get(&e.client).copied(),
            self.server_node.get(&e.dst.ip()).copied(),
        ]
    }
}

/// Why a failure was expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Excuse {
    /// Refused by the DENY policy while it was in force (or being applied).
    Denied,
    /// A long-lived connection the DENY policy closed as it came in force.
    Revoked,
    /// In flight when an agent on its path was killed, or made while it
    /// was down or starting (refused: fail closed).
    AgentRestart,
    /// Made by a pod at the moment it was released: steered to the agent's
    /// listener in the pod just before the capture let go, and reset when
    /// the listener closed before accepting it.
    Released,
}

impl Excuse {
    pub fn name(self) -> &'static str {
        match self {
            Excuse::Denied => "denied by the DENY policy in force",
            Excuse::Revoked => "live connection closed by the DENY policy",
            Excuse::AgentRestart => "agent on its path killed/restarting",
            Excuse::Released => "made as its pod was released from the mesh",
        }
    }
}

/// What should not have happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// Failed with no fault to explain it.
    Failed(Outcome),
    /// Served while the DENY policy was in force.
    AllowedWhileDenied,
    /// Not captured by the agent while its pod was in the mesh.
    NotCaptured,
    /// Still captured while its pod was out of the mesh.
    CapturedWhileOut,
}

impl Problem {
    pub fn name(self) -> String {
        match self {
            Problem::Failed(o) => o.name().to_owned(),
            Problem::AllowedWhileDenied => "served while the DENY policy was in force".into(),
            Problem::NotCaptured => "not captured while its pod was in the mesh".into(),
            Problem::CapturedWhileOut => "captured while its pod was out of the mesh".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Expected(Excuse),
    Unexpected(Problem),
}

/// Judges one event.
pub fn judge(e: &Event, tl: &Timeline, topo: &Topology) -> Verdict {
    let nodes = topo.nodes(e);
    // Requests: in flight at any moment of a restart window; long-lived
    // connections: broken (or refused) inside one.
    let restarting = tl
        .restarts
        .iter()
        .filter(|r| nodes.contains(&Some(r.node)))
        .any(|r| {
            let window = (r.killed, r.ready + RESTART_GRACE);
            match e.kind {
                Kind::Request => overlaps((e.start, e.end), window),
                Kind::Hold => within(e.end, window),
            }
        });
    let failed = |o: Outcome| {
        if restarting && restart_explains(o) {
            Verdict::Expected(Excuse::AgentRestart)
        } else {
            Verdict::Unexpected(Problem::Failed(o))
        }
    };

    if let Some(v) = judge_capture(e, tl) {
        return v;
    }
    if e.outcome != Outcome::Ok && released_under_it(e, tl) {
        return Verdict::Expected(Excuse::Released);
    }
    if e.dst.port() == topo.deny_port {
        for d in &tl.denials {
            if let Some(v) = judge_denial(e, d, restarting) {
                return v;
            }
        }
    }
    match e.outcome {
        Outcome::Ok => Verdict::Ok,
        o => failed(o),
    }
}

/// The capture check: a connection from a pod in the mesh must reach the
/// agent's outbound listener; one from a pod let out must not.
fn judge_capture(e: &Event, tl: &Timeline) -> Option<Verdict> {
    let captured = e.captured?;
    let mut churns = tl.churns.iter().filter(|c| c.pod == e.client);
    let out_for_sure = churns
        .clone()
        .any(|c| c.released < e.start && e.start < c.back);
    let maybe_out = churns.any(|c| overlaps((e.start, e.start), c.out_window()));
    if captured && out_for_sure {
        return Some(Verdict::Unexpected(Problem::CapturedWhileOut));
    }
    if !captured && !maybe_out {
        return Some(Verdict::Unexpected(Problem::NotCaptured));
    }
    None
}

/// Whether `e` failed as its pod's release could make it fail: a request
/// of the pod, refused, closed or reset unserved, in flight while the pod
/// was being let out (from the write until its agent no longer listed it).
fn released_under_it(e: &Event, tl: &Timeline) -> bool {
    e.kind == Kind::Request
        && matches!(
            e.outcome,
            Outcome::Refused | Outcome::Closed | Outcome::Reset
        )
        && tl
            .churns
            .iter()
            .any(|c| c.pod == e.client && overlaps((e.start, e.end), (c.left, c.released)))
}

/// An event to the DENY policy's port against one denial window, if it
/// falls in it.
fn judge_denial(e: &Event, d: &Denial, restarting: bool) -> Option<Verdict> {
    if !overlaps((e.start, e.end), (d.written, d.cleared)) {
        return None;
    }
    let in_force = (d.applied, d.lifted);
    let other = |o| {
        Some(if restarting && restart_explains(o) {
            Verdict::Expected(Excuse::AgentRestart)
        } else {
            Verdict::Unexpected(Problem::Failed(o))
        })
    };
    match (e.kind, e.outcome) {
        // A connection refused unserved: the denial, in force or coming.
        (_, Outcome::Closed) if e.exchanges == 0 => Some(Verdict::Expected(Excuse::Denied)),
        // A live connection closed as the policy came in force (a
        // request: after its greeting, in the middle of its echo).
        (_, Outcome::Closed | Outcome::Reset | Outcome::Truncated)
            if within(e.end, (d.written, d.applied + revoke_grace())) =>
        {
            Some(Verdict::Expected(Excuse::Revoked))
        }
        // Served: only outside the time the policy was surely in force.
        (Kind::Request, Outcome::Ok) => Some(if in_force.0 <= e.start && e.end <= in_force.1 {
            Verdict::Unexpected(Problem::AllowedWhileDenied)
        } else {
            Verdict::Ok
        }),
        (Kind::Hold, _)
            if e.exchanges > 0
                && overlaps((e.start, e.end), (d.applied + revoke_grace(), d.lifted)) =>
        {
            Some(Verdict::Unexpected(Problem::AllowedWhileDenied))
        }
        (_, Outcome::Ok) => Some(Verdict::Ok),
        (_, o) => other(o),
    }
}

/// Every event judged, counted.
#[derive(Default)]
pub struct Tally {
    pub requests: u64,
    pub requests_ok: u64,
    pub holds: u64,
    pub hold_lines: u64,
    pub holds_ok: u64,
    /// (kind, excuse) -> count
    pub expected: BTreeMap<(Kind, Excuse), u64>,
    /// The failures a restart explained, by how they failed.
    pub restart_outcomes: BTreeMap<Outcome, u64>,
    /// (kind, problem) -> count
    pub unexpected: BTreeMap<(Kind, Problem), u64>,
    /// A few unexpected events in full, for the report.
    pub examples: Vec<String>,
    /// Per denial window: requests denied while it was in force.
    pub denied_per_window: Vec<u64>,
    /// Per churn: requests the pod made while surely out, served, not
    /// captured.
    pub served_out_per_churn: Vec<u64>,
}

impl Tally {
    pub fn unexpected_total(&self) -> u64 {
        self.unexpected.values().sum()
    }
}

pub fn tally(events: &[Event], tl: &Timeline, topo: &Topology) -> Tally {
    let mut t = Tally {
        denied_per_window: vec![0; tl.denials.len()],
        served_out_per_churn: vec![0; tl.churns.len()],
        ..Tally::default()
    };
    for e in events {
        match e.kind {
            Kind::Request => {
                t.requests += 1;
                t.requests_ok += u64::from(e.outcome == Outcome::Ok);
            }
            Kind::Hold => {
                t.holds += 1;
                t.hold_lines += e.exchanges;
                t.holds_ok += u64::from(e.outcome == Outcome::Ok);
            }
        }
        match judge(e, tl, topo) {
            Verdict::Ok => {}
            Verdict::Expected(x) => {
                *t.expected.entry((e.kind, x)).or_default() += 1;
                if x == Excuse::AgentRestart {
                    *t.restart_outcomes.entry(e.outcome).or_default() += 1;
                }
                if x == Excuse::Denied && e.kind == Kind::Request {
                    for (i, d) in tl.denials.iter().enumerate() {
                        if d.applied <= e.start && e.end <= d.lifted {
                            t.denied_per_window[i] += 1;
                        }
                    }
                }
            }
            Verdict::Unexpected(p) => {
                *t.unexpected.entry((e.kind, p)).or_default() += 1;
                if t.examples.len() < 20 {
                    t.examples.push(format!(
                        "{} -> {} {:?} {} at {:.3}..{:.3}: {} ({})",
                        e.client,
                        e.dst,
                        e.kind,
                        e.id,
                        e.start,
                        e.end,
                        p.name(),
                        e.detail
                    ));
                }
            }
        }
        if e.kind == Kind::Request && e.outcome == Outcome::Ok && e.captured == Some(false) {
            for (i, c) in tl.churns.iter().enumerate() {
                if c.pod == e.client && c.released < e.start && e.start < c.back {
                    t.served_out_per_churn[i] += 1;
                }
            }
        }
    }
    t
}

#[cfg(test)]
mod tests;
