//! The C allocator's arenas, capped before any thread starts.
//!
//! glibc gives each thread that allocates under contention an arena of its own, up to 8 per
//! core, and memory freed into one arena is not reused by another. The store's writer, the
//! bridges and the tokio workers all pass log data around, so freed chunks pile up in arenas
//! that no longer allocate: draining 4 M messages while another bridge's upstream was away
//! ended at 64.3 MiB with glibc's default and at 43.6 MiB with two arenas
//! (`S6_STEP=500000 S6_STEPS=8 scripts/bench.sh --only 6`). An operator's own
//! `MALLOC_ARENA_MAX` wins.
//!
//! glibc also raises its mmap threshold (128 KiB at start) to the size of any mmapped block
//! freed, up to 32 MiB: after the first 1 MiB message is freed, every later one comes from
//! the arenas' heaps, where freed messages fragment and are rarely returned to the system.
//! A fixed threshold keeps large buffers in mmaps of their own, unmapped at free: 300 QoS 1
//! messages of 1 MiB to a forwarded topic whose upstream is down (`scripts/bench.sh --only
//! 9`) peaked at 229 MiB RSS with the dynamic threshold and at ~130 MiB with 256 KiB (together
//! with the store touching the parts it writes; 319 MiB before either). An operator's own
//! `MALLOC_MMAP_THRESHOLD_` wins.

/// Caps glibc at two arenas unless `MALLOC_ARENA_MAX` is set, and fixes its mmap threshold
/// at 256 KiB unless `MALLOC_MMAP_THRESHOLD_` is set. Call first thing in `main`.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's malloc.h: `#define M_ARENA_MAX -8`, `#define M_MMAP_THRESHOLD -3`.
        const M_ARENA_MAX: std::os::raw::c_int = -8;
        const M_MMAP_THRESHOLD: std::os::raw::c_int = -3;
        extern "C" {
            fn mallopt(
                param: std::os::raw::c_int,
                value: std::os::raw::c_int,
            ) -> std::os::raw::c_int;
        }
        // SAFETY: `mallopt` only sets a tunable; it is called before any other thread exists.
        // It returns 0 on failure, which leaves glibc's default: nothing to handle.
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            unsafe {
                mallopt(M_ARENA_MAX, 2);
            }
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 256 * 1024);
            }
        }
    }
}
