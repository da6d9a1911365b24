//! glibc malloc, tuned for a proxy before any thread starts.
//!
//! One arena for all threads: per-thread arenas keep what a burst freed
//! (HTTP/2 windows, copy buffers) and rarely give it back; with one arena
//! the periodic `malloc_trim` of [`give_back`] returns it. Measured with `cargo
//! xtask bench`: the RSS after 1,000 req/s fell from 32 to 15 MiB, and
//! throughput did not drop.
//!
//! The top of that heap is not given back as soon as it is free: by
//! default glibc trims the heap's end down to 128 KiB at each `free` that
//! leaves more than 128 KiB free there, and a bulk
//! stream's buffers, freed and taken again a few at a time, then moved the
//! heap's end down and up again thousands of times a second, every page
//! taken again faulted in and zeroed by the kernel (190,000 page faults in
//! 4 s of one stream between two pods of a node; 1,100 tuned). It
//! is kept up to [`TRIM_THRESHOLD`] and given back by [`give_back`]
//! instead; buffers up to [`MMAP_THRESHOLD`] come from the heap (a fixed
//! trim threshold stops glibc from raising the mmap one, whose default,
//! 128 KiB, would map and unmap every larger buffer).

/// Free memory at the heap's end kept for the next allocations.
pub const TRIM_THRESHOLD: usize = 8 << 20;
/// Allocations from this size on are mapped on their own.
pub const MMAP_THRESHOLD: usize = 4 << 20;

/// Sets the agent's malloc tuning; before any other thread exists.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc tuning calls, made before any other thread exists.
    unsafe {
        let took = [
            libc::mallopt(libc::M_ARENA_MAX, 1),
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int),
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int),
        ];
        // mallopt answers 1 for a value it took. (The calls are made
        // above, not in the assertion: a release build leaves that out.)
        debug_assert_eq!(took, [1; 3]);
    }
}

/// How often [`give_back`] trims the heap.
const GIVE_BACK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Returns the heap that bursts left free to the system every
/// [`GIVE_BACK_EVERY`]; glibc otherwise keeps what is free inside the
/// heap, and up to [`TRIM_THRESHOLD`] at its end, and the resident set
/// stays at the burst's peak long after it.
pub async fn give_back() {
    let mut every = tokio::time::interval(GIVE_BACK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // It walks the heap under the arena lock: not on a worker.
        #[cfg(target_env = "gnu")]
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim only releases free memory of glibc's arenas.
            unsafe { libc::malloc_trim(0) }
        })
        .await;
    }
}

#[cfg(all(test, target_env = "gnu"))]
mod tests {
    use super::*;

    /// Set in the child process the test below starts.
    const CHILD: &str = "MESH_MALLOC_TEST_CHILD";

    /// Minor page faults of this process so far.
    fn page_faults() -> i64 {
        // SAFETY: getrusage fills the struct it is given.
        let mut usage = unsafe { std::mem::zeroed::<libc::rusage>() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
        usage.ru_minflt
    }

    /// Page faults taken by 200 rounds of what a bulk stream's buffers do:
    /// four 64 KiB buffers and one of 512 KiB (over glibc's default mmap
    /// threshold) taken and written, then freed.
    fn burst_faults() -> i64 {
        let before = page_faults();
        for round in 0..200u8 {
            let mut bufs: Vec<Vec<u8>> = (0..4).map(|_| vec![round; 64 * 1024]).collect();
            bufs.push(vec![round; 512 * 1024]);
            std::hint::black_box(&bufs);
        }
        page_faults() - before
    }

    /// Run in a process of its own (the tuning is for the whole process):
    /// with glibc's default thresholds each round's pages are given back
    /// (trimmed, or the large buffer unmapped) and faulted in again;
    /// tuned, the rounds reuse them.
    #[test]
    fn freed_buffers_are_reused_not_faulted_in_again() {
        if std::env::var_os(CHILD).is_some() {
            // SAFETY: malloc tuning calls: glibc's default values first,
            // set as the tuned ones will be (which fixes them).
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
                libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            }
            let untuned = burst_faults();
            tune();
            burst_faults();
            let tuned = burst_faults();
            println!("faults untuned={untuned} tuned={tuned}");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "malloc::tests::freed_buffers_are_reused_not_faulted_in_again",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env_remove("GLIBC_TUNABLES")
            .output()
            .unwrap();
        // Its line follows the harness's `test ... ` on the same line.
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = text
            .lines()
            .find_map(|l| Some(l.split_once("faults ")?.1))
            .unwrap_or_else(|| panic!("no result from the child: {text}"));
        let count = |name: &str| -> i64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in {line}"))
        };
        let (untuned, tuned) = (count("untuned"), count("tuned"));
        // Given back, each round faults in again what was trimmed and the
        // unmapped buffer (128 pages alone): 25,760 pages in all here.
        assert!(
            untuned > 5_000,
            "the untuned heap was not given back: {line}"
        );
        assert!(tuned < 200, "the tuned heap was given back: {line}");
    }
}
