//! Ctrl-C while a task has a testbed up: remove what it made, then exit.
//! ctrlc allows one handler per process, and `cargo xtask ci` runs the demo
//! and the soak in one process, so the handler is installed once and cleans
//! up the testbed registered last.

use std::sync::{Mutex, OnceLock};

use anyhow::Context as _;

/// The prefix of the testbed in use, if any.
static CURRENT: Mutex<Option<String>> = Mutex::new(None);

/// What else the task in progress made (containers), removed first.
type Hook = Box<dyn FnOnce() + Send>;
static BEFORE: Mutex<Option<Hook>> = Mutex::new(None);

/// On Ctrl-C, also `hook`, before the testbed goes (until the next testbed
/// is registered).
pub fn also_on_interrupt(hook: impl FnOnce() + Send + 'static) {
    *BEFORE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(hook));
}

/// From now on, Ctrl-C removes the testbed with this prefix.
pub fn clean_up_on_interrupt(prefix: &str) -> anyhow::Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(prefix.to_owned());
    *BEFORE.lock().unwrap_or_else(|e| e.into_inner()) = None;
    INSTALLED
        .get_or_init(|| {
            ctrlc::set_handler(|| {
                eprintln!("\ninterrupted: cleaning up");
                let hook = BEFORE.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(hook) = hook {
                    hook();
                }
                let prefix = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(prefix) = prefix {
                    mesh_tests::cleanup(&prefix);
                }
                std::process::exit(130);
            })
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(anyhow::Error::msg)
        .context("installing the Ctrl-C handler")
}
