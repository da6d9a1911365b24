//! What the fault schedule did and when (unix seconds, the clock the
//! traffic's events use): the windows the verdict judges each request
//! against.

use serde::Serialize;

#[derive(Default, Serialize)]
pub struct Timeline {
    pub restarts: Vec<Restart>,
    pub denials: Vec<Denial>,
    pub churns: Vec<Churn>,
    pub rewrites: Vec<Rewrite>,
}

/// An agent killed with SIGKILL and started again.
#[derive(Clone, Serialize)]
pub struct Restart {
    pub node: usize,
    pub killed: f64,
    /// The new agent answered `/healthz/ready`.
    pub ready: f64,
    /// It listed every pod it had again (taken back from its state
    /// directory).
    pub pods_back: f64,
    /// `restored enrolled pod` lines the new agent logged.
    pub restored: usize,
}

/// A DENY policy written, in force, and removed.
#[derive(Clone, Serialize)]
pub struct Denial {
    pub written: f64,
    /// Every agent's store holds it.
    pub applied: f64,
    pub lifted: f64,
    /// No agent's store holds it any more.
    pub cleared: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ChurnKind {
    /// The pod labelled `istio.io/dataplane-mode: none`, then not.
    PodLabel,
    /// Its namespace's ambient label removed, then put back.
    NamespaceLabel,
    /// The Pod object removed from the configuration, then written again.
    PodObject,
}

impl ChurnKind {
    pub const ALL: [ChurnKind; 3] = [
        ChurnKind::PodLabel,
        ChurnKind::NamespaceLabel,
        ChurnKind::PodObject,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ChurnKind::PodLabel => "pod labelled out and back",
            ChurnKind::NamespaceLabel => "namespace label removed and back",
            ChurnKind::PodObject => "Pod object removed and written back",
        }
    }
}

/// A pod let out of the mesh on purpose, and back.
#[derive(Clone, Serialize)]
pub struct Churn {
    pub pod: String,
    pub how: ChurnKind,
    /// The configuration that lets it out was written.
    pub left: f64,
    /// Its agent no longer lists it.
    pub released: f64,
    /// The configuration that takes it back was written.
    pub back: f64,
    /// Its agent lists it again.
    pub enrolled: f64,
}

impl Churn {
    /// When the pod may send plaintext: from the write that lets it out
    /// until its agent has it back.
    pub fn out_window(&self) -> (f64, f64) {
        (self.left, self.enrolled)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum WriteKind {
    /// A temporary file renamed over the old one.
    Atomic,
    /// Truncated and written in place, in pieces cut mid-line, with pauses
    /// shorter than the agent's settle time.
    InPlace,
    /// A version with a YAML syntax error (to be kept out whole), then
    /// repaired.
    Broken,
}

impl WriteKind {
    pub const ALL: [WriteKind; 3] = [WriteKind::Atomic, WriteKind::InPlace, WriteKind::Broken];

    pub fn name(self) -> &'static str {
        match self {
            WriteKind::Atomic => "atomic (rename)",
            WriteKind::InPlace => "in place, in pieces",
            WriteKind::Broken => "YAML syntax error, then repaired",
        }
    }
}

/// The file holding every steady pod rewritten.
#[derive(Clone, Serialize)]
pub struct Rewrite {
    pub how: WriteKind,
    pub at: f64,
    /// Every agent's store shows the new version.
    pub applied: f64,
}

/// Whether two closed intervals meet.
pub fn overlaps(a: (f64, f64), b: (f64, f64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// Whether `t` is inside the closed interval.
pub fn within(t: f64, w: (f64, f64)) -> bool {
    w.0 <= t && t <= w.1
}
