//! The host allocator, tuned for tensor work.
//!
//! Candle allocates a fresh buffer for every op's output and frees it when the
//! tensor drops. With glibc's defaults a buffer of a few MiB comes from `mmap`
//! and goes back with `munmap` (the mmap threshold only rises to the largest
//! size freed so far, and the heap's free top is trimmed at 128 KiB), so a
//! training step page-faults and zeroes its activations afresh at every
//! forward and backward (keeping them made the `small` preset's CPU
//! forward+backward 30% faster: README, Benchmarks). Keeping freed memory in the
//! heap lets the next op reuse it, as PyTorch's caching allocator does on a GPU.

/// Buffers up to this size come from the heap, not `mmap`: glibc's largest
/// accepted threshold on 64-bit targets (`DEFAULT_MMAP_THRESHOLD_MAX`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// glibc's variables that set what [`keep_freed_buffers`] would: when the user
/// sets one, the user's setting stands.
const MALLOC_VARIABLES: [&str; 3] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
];

/// Called once at the start of a binary, before the model is built: buffers
/// up to 32 MiB come from the heap and the heap keeps its free memory (the
/// resident set stays at the run's peak, which tensor work reaches again at
/// every step). Returns whether the allocator was tuned: not on other C
/// libraries, nor when the environment sets glibc's malloc variables.
pub fn keep_freed_buffers() -> bool {
    let user_tuned = MALLOC_VARIABLES
        .iter()
        .any(|v| std::env::var_os(v).is_some())
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."));
    if user_tuned {
        return false;
    }
    tune()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune() -> bool {
    // SAFETY: mallopt only sets allocator parameters; glibc serialises it
    // against concurrent allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes the struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
            usage.ru_minflt
        }
    }

    /// Faults while an 8 MiB buffer (an activation of the `small` preset's
    /// size) is allocated and written, after one of its size was freed.
    fn faults_of_a_reused_buffer() -> i64 {
        let len = 8 << 20;
        drop(std::hint::black_box(vec![1u8; len]));
        let before = minor_faults();
        let again = std::hint::black_box(vec![2u8; len]);
        let faults = minor_faults() - before;
        drop(again);
        faults
    }

    #[test]
    fn a_freed_buffer_is_reused_without_page_faults() {
        if MALLOC_VARIABLES
            .iter()
            .any(|v| std::env::var_os(v).is_some())
        {
            assert!(!keep_freed_buffers(), "the user's malloc variables stand");
            return;
        }
        // glibc's default (the threshold has not risen this far yet):
        // the buffer is mmapped afresh and faults in page by page.
        let pages = (8 << 20) / 4096;
        let untuned = faults_of_a_reused_buffer();
        assert!(keep_freed_buffers());
        let tuned = faults_of_a_reused_buffer();
        assert!(
            tuned < pages / 8,
            "{tuned} faults for a reused 8 MiB buffer (untuned: {untuned})"
        );
    }
}
