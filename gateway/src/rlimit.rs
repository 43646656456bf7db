//! The open-files limit: one descriptor per client connection.
//!
//! A shell or a plain `fork/exec` hands the daemon a soft RLIMIT_NOFILE of 1024 on most
//! distributions (the hard limit is often 524288 or more): far below `max_connections`
//! (10,000 by default). Like nginx's `worker_rlimit_nofile` or Mosquitto's packaging, the
//! daemon raises its soft limit to the hard one at start (no privilege needed), and says
//! when even that does not fit `max_connections`: past the limit, accept() fails with
//! EMFILE and the accept loop backs off (broker/src/net/server.rs) until descriptors free up.

use tracing::{info, warn};

/// Descriptors kept for the store, listeners, bridges, the HTTP server and logs.
pub const RESERVED: u64 = 64;

/// Raises the soft RLIMIT_NOFILE to the hard limit; warns if `max_connections` plus
/// [`RESERVED`] does not fit. Returns (soft before, soft after), or `None` where unknown.
pub fn raise_nofile(max_connections: u64) -> Option<(u64, u64)> {
    let (before, hard) = get()?;
    // An unlimited hard limit still stops at the kernel's fs.nr_open.
    let target = hard.min(nr_open());
    let after = if before < target {
        match set(target, hard) {
            Ok(()) => target,
            Err(e) => {
                warn!(soft = before, hard, error = %e, "cannot raise the open files limit");
                before
            }
        }
    } else {
        before
    };
    if after != before {
        info!(
            from = before,
            to = after,
            "open files limit raised to the hard limit"
        );
    }
    let need = max_connections.saturating_add(RESERVED);
    if after < need {
        warn!(open_files_limit = after, max_connections, "the open files limit is below max_connections + {RESERVED}: connections past it are not accepted until others close (raise LimitNOFILE= or `ulimit -Hn`, or lower max_connections)");
    }
    Some((before, after))
}

fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

// rlim_t is u64 on 64-bit targets and musl, u32 on 32-bit glibc (armhf).
#[cfg(unix)]
#[allow(clippy::useless_conversion)]
fn get() -> Option<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes one `rlimit` into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return None;
    }
    Some((u64::from(r.rlim_cur), u64::from(r.rlim_max)))
}

#[cfg(unix)]
#[allow(clippy::unnecessary_fallible_conversions)]
fn set(soft: u64, hard: u64) -> std::io::Result<()> {
    let r = libc::rlimit {
        rlim_cur: libc::rlim_t::try_from(soft).unwrap_or(libc::rlim_t::MAX),
        rlim_max: libc::rlim_t::try_from(hard).unwrap_or(libc::rlim_t::MAX),
    };
    // SAFETY: `setrlimit` only reads the struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(unix))]
fn get() -> Option<(u64, u64)> {
    None
}

#[cfg(not(unix))]
fn set(_: u64, _: u64) -> std::io::Result<()> {
    Ok(())
}
