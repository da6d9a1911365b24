//! Locks that outlive a panic elsewhere. A task that panics while holding a
//! `std` mutex poisons it, and `lock().expect(..)` would then turn one bad
//! request into a panic in every later user of the lock (enrolment, the
//! data path, the admin pages): one fault would take the node's mesh down.
//! The agent's shared maps and counters are only ever updated by whole
//! values, so what a panicking holder left is still a consistent state, and
//! the lock is taken as it is.

use std::sync::{Mutex, MutexGuard, PoisonError};

pub trait LockExt<T> {
    /// The guard, whether or not an earlier holder panicked.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> LockExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_poisoned_by_a_panic_is_still_usable() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let r = std::thread::spawn(move || {
            let _g = m2.lock().expect("fresh lock");
            panic!("a holder panics");
        })
        .join();
        assert!(r.is_err());
        assert!(m.is_poisoned());
        *m.locked() += 1;
        assert_eq!(*m.locked(), 2);
    }
}
