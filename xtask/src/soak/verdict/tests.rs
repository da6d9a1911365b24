use std::collections::HashMap;

use mesh_tests::soak::{Event, Kind, Outcome};

use super::{Excuse, Problem, Topology, Verdict, judge, tally};
use crate::soak::timeline::{Churn, ChurnKind, Denial, Restart, Timeline};

/// client0 on node 0, client1 and mover1 on node 1; server0 (10.1.0.11)
/// on node 0, server1 (10.2.0.11) on node 1.
fn topology() -> Topology {
    Topology {
        client_node: HashMap::from([
            ("client0".to_owned(), 0),
            ("client1".to_owned(), 1),
            ("mover1".to_owned(), 1),
        ]),
        server_node: HashMap::from([
            ("10.1.0.11".parse().expect("ip"), 0),
            ("10.2.0.11".parse().expect("ip"), 1),
        ]),
        deny_port: 8081,
    }
}

fn timeline() -> Timeline {
    Timeline {
        restarts: vec![Restart {
            node: 0,
            killed: 100.0,
            ready: 102.0,
            pods_back: 102.0,
            restored: 2,
        }],
        denials: vec![Denial {
            written: 200.0,
            applied: 200.5,
            lifted: 204.0,
            cleared: 204.5,
        }],
        churns: vec![Churn {
            pod: "mover1".into(),
            how: ChurnKind::PodLabel,
            left: 300.0,
            released: 300.5,
            back: 303.0,
            enrolled: 303.5,
        }],
        rewrites: Vec::new(),
    }
}

fn req(client: &str, dst: &str, start: f64, end: f64, outcome: Outcome) -> Event {
    Event {
        run: "r".into(),
        client: client.into(),
        dst: dst.parse().expect("addr"),
        kind: Kind::Request,
        id: 1,
        start,
        end,
        outcome,
        captured: (!matches!(
            outcome,
            Outcome::Refused | Outcome::ConnectTimeout | Outcome::ConnectError
        ))
        .then_some(true),
        exchanges: 0,
        detail: String::new(),
    }
}

fn hold(client: &str, dst: &str, start: f64, end: f64, outcome: Outcome, lines: u64) -> Event {
    Event {
        kind: Kind::Hold,
        exchanges: lines,
        ..req(client, dst, start, end, outcome)
    }
}

fn verdict(e: &Event) -> Verdict {
    judge(e, &timeline(), &topology())
}

#[test]
fn a_failure_is_excused_only_by_a_restart_on_its_path() {
    let through_0 = "10.1.0.11:8080";
    let only_1 = "10.2.0.11:8080";
    // In flight when node 0's agent was killed.
    let e = req("client1", through_0, 99.9, 100.1, Outcome::Closed);
    assert_eq!(verdict(&e), Verdict::Expected(Excuse::AgentRestart));
    // Refused while it was down, and just after it was ready.
    let e = req("client0", only_1, 101.0, 101.0, Outcome::Refused);
    assert_eq!(verdict(&e), Verdict::Expected(Excuse::AgentRestart));
    let e = req("client0", only_1, 102.3, 102.3, Outcome::Refused);
    assert_eq!(verdict(&e), Verdict::Expected(Excuse::AgentRestart));
    // Never corrupted bytes.
    let e = req("client0", only_1, 101.0, 101.1, Outcome::WrongBytes);
    assert_eq!(
        verdict(&e),
        Verdict::Unexpected(Problem::Failed(Outcome::WrongBytes))
    );
    // Long after it was back; or on a path without that agent.
    let e = req("client0", only_1, 110.0, 110.0, Outcome::Refused);
    assert_eq!(
        verdict(&e),
        Verdict::Unexpected(Problem::Failed(Outcome::Refused))
    );
    let e = req("client1", only_1, 101.0, 101.1, Outcome::Reset);
    assert_eq!(
        verdict(&e),
        Verdict::Unexpected(Problem::Failed(Outcome::Reset))
    );
    // A long-lived connection counts where it broke, not where it began.
    let e = hold("client1", through_0, 50.0, 100.05, Outcome::Closed, 200);
    assert_eq!(verdict(&e), Verdict::Expected(Excuse::AgentRestart));
    let e = hold("client1", through_0, 50.0, 100.05, Outcome::WrongBytes, 200);
    assert_eq!(
        verdict(&e),
        Verdict::Unexpected(Problem::Failed(Outcome::WrongBytes))
    );
    let e = hold("client1", through_0, 50.0, 130.0, Outcome::Closed, 300);
    assert_eq!(
        verdict(&e),
        Verdict::Unexpected(Problem::Failed(Outcome::Closed))
    );
}

#[test]
fn the_deny_port_must_be_refused_while_the_policy_is_in_force() {
    let denied = "10.2.0.11:8081";
    let e = req("client0", denied, 202.0, 202.01, Outcome::Closed);
    assert_eq!(verdict(&e), Verdict::Expected(Excuse::Denied));
    let e = req("client0", denied, 202.0, 202.01, Outcome::Ok);
    assert_eq!(
        verdict(&e),
        Verdict::Unexpected(Problem::AllowedWhileDenied)
    );
    // While it is being applied or lifted, either is fine.
    let e = req("client0", denied, 200.2, 200.21, Outcome::Ok);
    assert_eq!(verdict(&e), Verdict::Ok);
    let e = req("client0", denied, 204.2, 204.21, Outcome::Closed);
    assert_eq!(verdict(&e), Verdict::Expected(Excuse::Denied));
    // Outside the window a refusal is a failure; other ports never deny.
    let e = req("client0", denied, 210.0, 210.01, Outcome::Closed);
    assert_eq!(
        verdict(&e),
        Verdict::Unexpected(Problem::Failed(Outcome::Closed))
    );
    let e = req("client0", "10.2.0.11:8080", 202.0, 202.01, Outcome::Closed);
    assert_eq!(
        verdict(&e),
        Verdict::Unexpected(Problem::Failed(Outcome::Closed))
    );
}

#[test]
fn a_live_connection_must_be_closed_when_the_policy_comes_in_force() {
    let denied = "10.2.0.11:8081";
    let e = hold("client0", denied, 150.0, 200.9, Outcome::Closed, 100);
    assert_eq!(verdict(&e), Verdict::Expected(Excuse::Revoked));
    // Still exchanging lines well after the policy applied.
    let e = hold("client0", denied, 150.0, 203.0, Outcome::Closed, 100);
    assert_eq!(
        verdict(&e),
        Verdict::Unexpected(Problem::AllowedWhileDenied)
    );
    let e = hold("client0", denied, 150.0, 400.0, Outcome::Ok, 1000);
    assert_eq!(
        verdict(&e),
        Verdict::Unexpected(Problem::AllowedWhileDenied)
    );
    // A reconnect refused unserved while it is in force.
    let e = hold("client0", denied, 202.0, 202.01, Outcome::Closed, 0);
    assert_eq!(verdict(&e), Verdict::Expected(Excuse::Denied));
    // A request served until the policy applied, then cut.
    let e = req("client0", denied, 200.3, 200.31, Outcome::Truncated);
    assert_eq!(verdict(&e), Verdict::Expected(Excuse::Revoked));
    let e = req("client0", denied, 202.0, 202.01, Outcome::Truncated);
    assert_eq!(
        verdict(&e),
        Verdict::Unexpected(Problem::Failed(Outcome::Truncated)),
        "cut long after the policy applied"
    );
}

#[test]
fn a_connection_made_as_its_pod_leaves_may_be_reset() {
    let dst = "10.2.0.11:8080";
    let e = req("mover1", dst, 300.4, 300.41, Outcome::Reset);
    assert_eq!(verdict(&e), Verdict::Expected(Excuse::Released));
    // Not once it is out, not coming back, not another pod, not wrong bytes.
    for e in [
        req("mover1", dst, 301.0, 301.01, Outcome::Reset),
        req("mover1", dst, 303.2, 303.21, Outcome::Reset),
        req("client1", dst, 300.4, 300.41, Outcome::Reset),
        req("mover1", dst, 300.4, 300.41, Outcome::WrongBytes),
    ] {
        assert!(
            matches!(verdict(&e), Verdict::Unexpected(_)),
            "{e:?}: {:?}",
            verdict(&e)
        );
    }
}

#[test]
fn capture_follows_the_pods_membership() {
    let dst = "10.2.0.11:8080";
    let out = |start, captured| Event {
        captured: Some(captured),
        ..req("mover1", dst, start, start + 0.01, Outcome::Ok)
    };
    assert_eq!(verdict(&out(301.0, false)), Verdict::Ok, "out of the mesh");
    assert_eq!(
        verdict(&out(301.0, true)),
        Verdict::Unexpected(Problem::CapturedWhileOut)
    );
    // Leaving and coming back: either.
    assert_eq!(verdict(&out(300.2, true)), Verdict::Ok);
    assert_eq!(verdict(&out(303.2, false)), Verdict::Ok);
    assert_eq!(
        verdict(&out(310.0, false)),
        Verdict::Unexpected(Problem::NotCaptured)
    );
    let e = Event {
        captured: Some(false),
        ..req("client1", dst, 301.0, 301.01, Outcome::Ok)
    };
    assert_eq!(verdict(&e), Verdict::Unexpected(Problem::NotCaptured));
}

#[test]
fn the_tally_counts_denials_per_window_and_plaintext_per_churn() {
    let events = [
        req("client0", "10.2.0.11:8081", 202.0, 202.01, Outcome::Closed),
        req("client0", "10.2.0.11:8081", 202.1, 202.11, Outcome::Closed),
        Event {
            captured: Some(false),
            ..req("mover1", "10.2.0.11:8080", 301.0, 301.01, Outcome::Ok)
        },
        req(
            "client0",
            "10.2.0.11:8080",
            120.0,
            120.01,
            Outcome::WrongBytes,
        ),
    ];
    let t = tally(&events, &timeline(), &topology());
    assert_eq!(t.requests, 4);
    assert_eq!(t.requests_ok, 1);
    assert_eq!(t.denied_per_window, [2]);
    assert_eq!(t.served_out_per_churn, [1]);
    assert_eq!(t.unexpected_total(), 1);
    assert!(t.examples[0].contains("wrong bytes"), "{:?}", t.examples);
}
