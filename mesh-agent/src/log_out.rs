//! Where log lines go: standard error, in batches on the runtimes' threads.
//!
//! Every connection writes an access log line at the default level. One
//! `write` per line costs a system call on the data path (and, when
//! standard error is a pipe to the container runtime, a wakeup of its
//! reader). A runtime thread instead appends its lines to a buffer of its
//! own and writes them in one call when it is about to sleep (tokio's
//! park hook), when the buffer passes [`FLUSH_AT`], and when the process
//! ends or panics. A line therefore waits at most while its thread is
//! busy. Other threads (the blocking pool, the main thread outside the
//! runtime) write each line at once, as before. A process killed with
//! SIGKILL loses what its threads had not written yet: at most
//! [`FLUSH_AT`] bytes each.

use std::{
    cell::OnceCell,
    io::{self, Write as _},
    sync::{Arc, Mutex},
};

use crate::sync::LockExt as _;

/// A thread's buffer is written out once it holds this much.
const FLUSH_AT: usize = 8 * 1024;

type Buffer = Arc<Mutex<Vec<u8>>>;

/// Every batching thread's buffer, so that the end of the process (or a
/// panic) can write them all.
static BUFFERS: Mutex<Vec<Buffer>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread's buffer, once it batches (see [`parked`]).
    static MINE: OnceCell<Buffer> = const { OnceCell::new() };
}

/// The `tracing_subscriber` writer: standard error, batched on threads
/// that batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line
    }
}

/// One log line (the formatter writes each whole, in one call).
pub struct Line;

impl io::Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let batched = MINE.with(|mine| {
            let Some(mine) = mine.get() else {
                return false;
            };
            let mut pending = mine.locked();
            pending.extend_from_slice(buf);
            if pending.len() >= FLUSH_AT {
                write_out(&mut pending);
            }
            true
        });
        if !batched {
            emit(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `bytes` to standard error in one piece. A failed write is
/// dropped: a log line is never worth an error on the data path.
fn emit(bytes: &[u8]) {
    #[cfg(test)]
    if tests::captured(bytes) {
        return;
    }
    let _ = io::stderr().lock().write_all(bytes);
}

/// Writes `pending` out and empties it.
fn write_out(pending: &mut Vec<u8>) {
    if !pending.is_empty() {
        emit(pending);
        pending.clear();
        // A burst's buffer is not kept at its peak.
        pending.shrink_to(FLUSH_AT * 2);
    }
}

/// The park hook of a runtime's threads: the thread writes what it holds
/// before it sleeps. A thread batches from its first park on, so a
/// thread that never parks (a blocking one) never holds a line.
pub fn parked() {
    MINE.with(|mine| {
        let mine = mine.get_or_init(|| {
            let buffer = Buffer::default();
            BUFFERS.locked().push(buffer.clone());
            buffer
        });
        write_out(&mut mine.locked());
    });
}

/// Writes every thread's pending lines: at the end of the process.
pub fn flush_all() {
    for buffer in BUFFERS.locked().iter() {
        write_out(&mut buffer.locked());
    }
}

/// Reports a panic after the lines that came before it. A buffer whose
/// lock is held (the panic struck while it was being written) is passed
/// over rather than waited for.
pub fn flush_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(buffers) = BUFFERS.try_lock() {
            for buffer in buffers.iter() {
                if let Ok(mut pending) = buffer.try_lock() {
                    write_out(&mut pending);
                }
            }
        }
        report(info);
    }));
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    thread_local! {
        /// What this test thread's writes sent out, when it captures them.
        static OUT: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
    }

    /// Takes `bytes` instead of standard error on a capturing thread.
    pub(super) fn captured(bytes: &[u8]) -> bool {
        OUT.with_borrow_mut(|out| out.as_mut().map(|o| o.extend_from_slice(bytes)).is_some())
    }

    fn out() -> String {
        OUT.with_borrow(|o| String::from_utf8(o.clone().unwrap()).unwrap())
    }

    #[test]
    fn a_thread_holds_its_lines_from_its_first_park_until_the_next() {
        std::thread::spawn(|| {
            OUT.set(Some(Vec::new()));
            let mut line = Line;
            line.write_all(b"before any park\n").unwrap();
            assert_eq!(
                out(),
                "before any park\n",
                "written at once before the first park"
            );
            parked();
            line.write_all(b"one\n").unwrap();
            line.write_all(b"two\n").unwrap();
            assert_eq!(out(), "before any park\n", "held until the thread parks");
            parked();
            assert_eq!(
                out(),
                "before any park\none\ntwo\n",
                "written, in order, when it parks"
            );
            line.write_all(b"three\n").unwrap();
            flush_all();
            assert_eq!(
                out(),
                "before any park\none\ntwo\nthree\n",
                "written at the end"
            );
            let long = "x".repeat(FLUSH_AT - 1) + "\n";
            line.write_all(long.as_bytes()).unwrap();
            assert!(out().ends_with(&long), "a full buffer is written at once");
        })
        .join()
        .unwrap();
    }
}
