//! The C allocator's arenas, capped before any thread starts.
//!
//! glibc gives each thread that allocates under contention an arena of its own, up to 8 per
//! core, and memory freed into one arena is not reused by another. The store's writer, the
//! bridges and the tokio workers all pass log data around, so freed chunks pile up in arenas
//! that no longer allocate: draining 4 M messages while another bridge's upstream was away
//! ended at 64.3 MiB with glibc's default and at 43.6 MiB with two arenas
//! (`S6_STEP=500000 S6_STEPS=8 scripts/bench.sh --only 6`). An operator's own
//! `MALLOC_ARENA_MAX` wins.

/// Caps glibc at two arenas unless `MALLOC_ARENA_MAX` is set. Call first thing in `main`.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return;
        }
        // glibc's malloc.h: `#define M_ARENA_MAX -8`.
        const M_ARENA_MAX: std::os::raw::c_int = -8;
        extern "C" {
            fn mallopt(
                param: std::os::raw::c_int,
                value: std::os::raw::c_int,
            ) -> std::os::raw::c_int;
        }
        // SAFETY: `mallopt` only sets a tunable; it is called before any other thread exists.
        // It returns 0 on failure, which leaves glibc's default: nothing to handle.
        unsafe {
            mallopt(M_ARENA_MAX, 2);
        }
    }
}
