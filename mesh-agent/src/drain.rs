//! Draining on SIGTERM. The agent stops taking new connections (its
//! listeners in the pods close, so a next agent that opened its own with
//! `SO_REUSEPORT` takes every new connection; without one they are refused,
//! as on any stop), tells its HBONE peers to go elsewhere (`GOAWAY` on
//! every HBONE connection it serves), reports not ready, and lets live
//! connections finish for the drain period.

use std::sync::OnceLock;

use tokio::sync::watch;

fn signal() -> &'static watch::Sender<bool> {
    static DRAIN: OnceLock<watch::Sender<bool>> = OnceLock::new();
    DRAIN.get_or_init(|| watch::channel(false).0)
}

/// Starts draining (once; later calls do nothing).
pub fn start() {
    signal().send_replace(true);
}

pub fn is_draining() -> bool {
    *signal().borrow()
}

/// Resolves once draining has started.
pub async fn started() {
    let mut rx = signal().subscribe();
    // The sender is static: it never goes away.
    let _ = rx.wait_for(|d| *d).await;
}
