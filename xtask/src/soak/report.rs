//! The soak's figures, its table, and what fails it: unexpected failures,
//! plaintext, resource growth, and the checks that the faults and the
//! checks themselves did something.

use std::{fmt::Write as _, net::IpAddr, path::PathBuf, time::Duration};

use mesh_tests::soak::{Event, Kind, Outcome};

use super::{
    bed::{self, Sample},
    plaintext::Plaintext,
    timeline::{ChurnKind, Timeline, WriteKind},
    verdict::{Excuse, Problem, Tally},
};

/// Unexpected failures tolerated: none. Every failure the faults explain
/// is classified as expected (with the window it fell in); anything else
/// is a finding.
pub const UNEXPECTED_TOLERATED: u64 = 0;
/// The surviving agent's RSS at the end may exceed its baseline by this
/// much: the allocator keeps some freed memory, and the run's peak (the
/// restarts' reconnection bursts) leaves fragments. A leak of 100 bytes
/// per request over a full run (24,000 requests) is 2.3 MiB; of a pod's
/// listeners per churn, far more.
pub const RSS_SLACK_KIB: u64 = 4 * 1024;
/// Open descriptors may differ from the baseline by this many: the pooled
/// HBONE connections (at most one per core per peer pair) are opened on
/// demand and may be one more or fewer at the end.
pub const FD_SLACK: usize = 4;

pub struct Report<'a> {
    pub run: String,
    pub duration: f64,
    pub rate: f64,
    pub wall: Duration,
    pub tally: Tally,
    pub timeline: &'a Timeline,
    pub wire: Plaintext,
    pub baseline: Sample,
    pub end: Sample,
    pub peak: Sample,
    pub killed_baseline: Sample,
    pub killed_end: Sample,
    /// HBONE connections the surviving agent refused by policy.
    pub denied_by_survivor: f64,
    /// Connections to the survivor's server on the DENY port refused while
    /// the policy was surely in force, as the clients saw them.
    pub denied_in_force_to_survivor: u64,
    /// `certificate renewed` lines per node.
    pub renewals: Vec<(usize, usize)>,
}

/// Connections to `ip:port` refused unserved while a DENY policy was surely
/// in force.
pub fn denied_in_force(events: &[Event], tl: &Timeline, ip: IpAddr, port: u16) -> u64 {
    events
        .iter()
        .filter(|e| e.dst.ip() == ip && e.dst.port() == port)
        .filter(|e| e.outcome == Outcome::Closed && e.exchanges == 0)
        .filter(|e| {
            tl.denials
                .iter()
                .any(|d| d.applied <= e.start && e.end <= d.lifted)
        })
        .count() as u64
}

/// Certificate renewals each agent logged.
pub fn renewals(logs: &[(usize, PathBuf)]) -> anyhow::Result<Vec<(usize, usize)>> {
    logs.iter()
        .map(|(node, log)| {
            let text = std::fs::read_to_string(log)?;
            Ok((*node, text.matches("certificate renewed").count()))
        })
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `min-max` of some figures, in seconds.
fn range(values: impl Iterator<Item = f64>) -> String {
    let v: Vec<f64> = values.collect();
    if v.is_empty() {
        return "-".into();
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.2}-{max:.2} s")
}

impl Report<'_> {
    fn rss_limit(&self) -> u64 {
        self.baseline.rss_kib + RSS_SLACK_KIB
    }

    fn fd_limit(&self) -> usize {
        self.baseline.fds + FD_SLACK
    }

    /// Renewals the survivor must have logged at least: half of what its
    /// three identities renewing at half-life over the run would give.
    fn renewals_wanted(&self) -> usize {
        let half_life = bed::CERT_TTL.as_secs_f64() / 2.0;
        (3.0 * self.duration / half_life / 2.0) as usize
    }

    /// Why the run fails; empty when it passes.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let t = &self.tally;
        let tl = self.timeline;
        if t.unexpected_total() > UNEXPECTED_TOLERATED {
            f.push(format!(
                "{} unexpected failure(s) (tolerated: {UNEXPECTED_TOLERATED})",
                t.unexpected_total()
            ));
        }
        if self.wire.dropped > 0 {
            f.push(format!(
                "the captures lost {} packet(s): the plaintext check is incomplete",
                self.wire.dropped
            ));
        }
        if !self.wire.leaks.is_empty() {
            f.push(format!(
                "{} request(s) in plaintext from a pod in the mesh",
                self.wire.leaks.len()
            ));
        }
        if self.wire.windows_with_plaintext < tl.churns.len() {
            f.push(format!(
                "plaintext seen in {} of {} windows where a pod was out of the mesh: the capture check did not see what it must",
                self.wire.windows_with_plaintext,
                tl.churns.len()
            ));
        }
        if let Some(i) = t.served_out_per_churn.iter().position(|n| *n == 0) {
            f.push(format!(
                "churn {} made no uncaptured request while out: the capture check had nothing to see",
                i + 1
            ));
        }
        if let Some(i) = t.denied_per_window.iter().position(|n| *n == 0) {
            f.push(format!(
                "the DENY policy was in force (window {}) and denied nothing",
                i + 1
            ));
        }
        if (self.denied_by_survivor as u64) < self.denied_in_force_to_survivor {
            f.push(format!(
                "node {}'s agent counted {} policy denials, fewer than the {} the clients saw while the policy was in force",
                bed::SURVIVOR,
                self.denied_by_survivor,
                self.denied_in_force_to_survivor
            ));
        }
        let revoked = t.expected.get(&(Kind::Hold, Excuse::Revoked)).copied();
        if revoked.unwrap_or(0) < tl.denials.len() as u64 {
            f.push(format!(
                "{} live connection(s) closed by {} DENY flips: each flip must close at least one",
                revoked.unwrap_or(0),
                tl.denials.len()
            ));
        }
        if self.end.rss_kib > self.rss_limit() {
            f.push(format!(
                "node {}'s agent RSS grew from {:.1} to {:.1} MiB (limit {:.1})",
                bed::SURVIVOR,
                mib(self.baseline.rss_kib),
                mib(self.end.rss_kib),
                mib(self.rss_limit())
            ));
        }
        if self.end.fds > self.fd_limit() {
            f.push(format!(
                "node {}'s agent holds {} fds, {} at its baseline (limit {})",
                bed::SURVIVOR,
                self.end.fds,
                self.baseline.fds,
                self.fd_limit()
            ));
        }
        let survivor_renewals = self
            .renewals
            .iter()
            .find(|(n, _)| *n == bed::SURVIVOR)
            .map_or(0, |r| r.1);
        if survivor_renewals < self.renewals_wanted() {
            f.push(format!(
                "node {}'s agent renewed {survivor_renewals} certificates, fewer than {}",
                bed::SURVIVOR,
                self.renewals_wanted()
            ));
        }
        let missing: Vec<&str> = [
            ("agent restart", !tl.restarts.is_empty()),
            ("DENY flip", !tl.denials.is_empty()),
        ]
        .into_iter()
        .chain(ChurnKind::ALL.map(|k| (k.name(), tl.churns.iter().any(|c| c.how == k))))
        .chain(WriteKind::ALL.map(|k| (k.name(), tl.rewrites.iter().any(|w| w.how == k))))
        .filter(|(_, done)| !done)
        .map(|(name, _)| name)
        .collect();
        if !missing.is_empty() {
            f.push(format!(
                "faults never injected (too short a run): {}",
                missing.join(", ")
            ));
        }
        f
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let t = &self.tally;
        let tl = self.timeline;
        let _ = writeln!(
            s,
            "## Soak: {} s of traffic at {} requests/s under faults (run {}, {:.0} s in all)\n",
            self.duration,
            self.rate,
            self.run,
            self.wall.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "| requests and connections | requests | long-lived connections |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: |");
        let _ = writeln!(
            s,
            "| made (connection attempts) | {} | {} |",
            t.requests, t.holds
        );
        let _ = writeln!(
            s,
            "| served (lasted to the end) | {} | {} |",
            t.requests_ok, t.holds_ok
        );
        let _ = writeln!(s, "| lines exchanged | | {} |", t.hold_lines);
        let count_x = |k, x| t.expected.get(&(k, x)).copied().unwrap_or(0);
        for x in [
            Excuse::Denied,
            Excuse::Revoked,
            Excuse::AgentRestart,
            Excuse::Released,
        ] {
            let _ = writeln!(
                s,
                "| failed, expected: {} | {} | {} |",
                x.name(),
                count_x(Kind::Request, x),
                count_x(Kind::Hold, x)
            );
        }
        let count_p = |k, p| t.unexpected.get(&(k, p)).copied().unwrap_or(0);
        let problems = [
            Outcome::Refused,
            Outcome::ConnectTimeout,
            Outcome::ConnectError,
            Outcome::Closed,
            Outcome::Reset,
            Outcome::Timeout,
            Outcome::Truncated,
            Outcome::WrongBytes,
            Outcome::Saturated,
        ]
        .map(Problem::Failed)
        .into_iter()
        .chain([
            Problem::AllowedWhileDenied,
            Problem::NotCaptured,
            Problem::CapturedWhileOut,
        ]);
        for p in problems {
            let _ = writeln!(
                s,
                "| **failed, unexpected**: {} | {} | {} |",
                p.name(),
                count_p(Kind::Request, p),
                count_p(Kind::Hold, p)
            );
        }
        let _ = writeln!(
            s,
            "\nUnexpected failures tolerated: {UNEXPECTED_TOLERATED}. Expected: a request in flight (or a long-lived connection broken) while an agent on its path was killed, down or starting, up to {:.1} s after it was ready; a connection to :{} refused unserved while the DENY policy was being applied, in force or being removed; a live one closed within {:.2} s of the policy being applied; a request of a pod refused, closed or reset while the pod was being released (steered to the agent's listener just before release, which closes it unaccepted).",
            super::verdict::RESTART_GRACE,
            bed::DENY_PORT,
            super::verdict::revoke_grace()
        );
        let by_outcome: Vec<String> = t
            .restart_outcomes
            .iter()
            .map(|(o, n)| format!("{n} {}", o.name()))
            .collect();
        let _ = writeln!(
            s,
            "Failures a restart explained, by how they failed: {}.",
            if by_outcome.is_empty() {
                "none".to_owned()
            } else {
                by_outcome.join(", ")
            }
        );
        if !t.examples.is_empty() {
            let _ = writeln!(s, "\nUnexpected (first {}):", t.examples.len());
            for e in &t.examples {
                let _ = writeln!(s, "- {e}");
            }
        }

        let _ = writeln!(s, "\n| fault | count | figures |");
        let _ = writeln!(s, "| --- | ---: | --- |");
        let restored: usize = tl.restarts.iter().map(|r| r.restored).sum();
        let _ = writeln!(
            s,
            "| agent killed (SIGKILL), down 1 s, restarted (node {}) | {} | ready after {}; {} pods taken back from its state directory in all |",
            bed::KILLED,
            tl.restarts.len(),
            range(tl.restarts.iter().map(|r| r.ready - r.killed)),
            restored
        );
        let _ = writeln!(
            s,
            "| DENY policy on :{} written, in force, removed | {} | applied in {}, removed in {}; denials in force per window: {:?} |",
            bed::DENY_PORT,
            tl.denials.len(),
            range(tl.denials.iter().map(|d| d.applied - d.written)),
            range(tl.denials.iter().map(|d| d.cleared - d.lifted)),
            t.denied_per_window
        );
        let renewals: Vec<String> = self
            .renewals
            .iter()
            .map(|(n, c)| format!("node {n}: {c}"))
            .collect();
        let _ = writeln!(
            s,
            "| certificates renewed (lifetime {} s, renewed at half) | {} | node {} must renew at least {} |",
            bed::CERT_TTL.as_secs(),
            renewals.join(", "),
            bed::SURVIVOR,
            self.renewals_wanted()
        );
        for k in ChurnKind::ALL {
            let cs: Vec<_> = tl.churns.iter().filter(|c| c.how == k).collect();
            let _ = writeln!(
                s,
                "| pod out of the mesh and back: {} | {} | released in {}, enrolled again in {} |",
                k.name(),
                cs.len(),
                range(cs.iter().map(|c| c.released - c.left)),
                range(cs.iter().map(|c| c.enrolled - c.back))
            );
        }
        for k in WriteKind::ALL {
            let ws: Vec<_> = tl.rewrites.iter().filter(|w| w.how == k).collect();
            let _ = writeln!(
                s,
                "| base.yaml (every steady pod) rewritten {} | {} | new version applied by both agents in {} |",
                k.name(),
                ws.len(),
                range(ws.iter().map(|w| w.applied - w.at))
            );
        }

        let w = &self.wire;
        let _ = writeln!(
            s,
            "\n| plaintext check (dumpcap on every pod's eth0, whole run) | |\n| --- | ---: |"
        );
        let _ = writeln!(s, "| captures | {} |", w.files);
        let _ = writeln!(s, "| packets inspected | {} |", w.packets);
        let _ = writeln!(s, "| packets the captures lost | {} |", w.dropped);
        let _ = writeln!(s, "| bytes inspected | {} |", w.bytes);
        let _ = writeln!(
            s,
            "| requests seen in plaintext while their pod was out of the mesh on purpose (excluded) | {} in {} packets, {} of {} windows |",
            w.excused,
            w.excused_packets,
            w.windows_with_plaintext,
            tl.churns.len()
        );
        let _ = writeln!(
            s,
            "| **requests seen in plaintext from a pod in the mesh (leaks)** | {} |",
            w.leaks.len()
        );
        for l in w.leaks.iter().take(20) {
            let _ = writeln!(s, "- {l}");
        }

        let _ = writeln!(
            s,
            "\n| agent of node {} (never restarted) | baseline | end | peak | limit |\n| --- | ---: | ---: | ---: | ---: |",
            bed::SURVIVOR
        );
        let _ = writeln!(
            s,
            "| RSS (MiB) | {:.1} | {:.1} | {:.1} | {:.1} |",
            mib(self.baseline.rss_kib),
            mib(self.end.rss_kib),
            mib(self.peak.rss_kib),
            mib(self.rss_limit())
        );
        let _ = writeln!(
            s,
            "| open fds | {} | {} | {} | {} |",
            self.baseline.fds,
            self.end.fds,
            self.peak.fds,
            self.fd_limit()
        );
        let _ = writeln!(
            s,
            "\nBoth sampled after {} s without traffic. Node {}'s agent (restarted {} times; not checked, each instance starts afresh): RSS {:.1} -> {:.1} MiB, fds {} -> {}.",
            super::SETTLE.as_secs(),
            bed::KILLED,
            tl.restarts.len(),
            mib(self.killed_baseline.rss_kib),
            mib(self.killed_end.rss_kib),
            self.killed_baseline.fds,
            self.killed_end.fds
        );
        let _ = writeln!(
            s,
            "Policy denials counted by node {}'s agent: {} (the clients saw {} while the policy was in force).",
            bed::SURVIVOR,
            self.denied_by_survivor,
            self.denied_in_force_to_survivor
        );
        let failures = self.failures();
        if failures.is_empty() {
            let _ = writeln!(s, "\n**PASSED**");
        } else {
            let _ = writeln!(s, "\n**FAILED**:");
            for f in failures {
                let _ = writeln!(s, "- {f}");
            }
        }
        s
    }
}
