//! Waystation's power-cut simulator: a FUSE file system that passes everything through to a
//! backing directory but keeps written file data in memory until the file is fsynced, and
//! throws away, on command, everything that was not. It is how Jepsen's LazyFS simulates power
//! loss, made small enough to live in our test suite (FACTS.md, "Testing links, power cuts and
//! other faults").
//!
//! ```no_run
//! let fs = waystation_powercut::PowerCutFs::mount().unwrap();
//! // ... run a program with its data directory under fs.path(), SIGKILL it ...
//! let cut = fs.drop_unsynced(); // the power cut: every file reverts to its last fsync
//! // ... start the program again on the same directory ...
//! # drop(cut);
//! ```
//!
//! # What it simulates
//!
//! A machine whose disk honours `fsync` losing power: for each regular file, data written
//! (`write`, `pwrite`, growing or shrinking it with `ftruncate`/`fallocate`) since the file's
//! last `fsync`/`fdatasync` is lost, and the file reverts to the content *and size* it had
//! then. A file created and never synced reverts to empty.
//!
//! - Writes go to a per-inode overlay of 4 KiB pages in memory (a page cache that never writes
//!   back on its own); reads see it, as they would see the page cache. Files are opened
//!   `direct_io` so the kernel caches nothing itself and every read and write reaches us.
//! - `fsync`/`fdatasync` (FUSE `FSYNC`) writes the file's overlay to the backing file, sets
//!   its size, and `fsync`s the backing file. `O_SYNC`/`O_DSYNC` writes are synced at once.
//! - `close` (FUSE `FLUSH`, `RELEASE`) persists nothing: unsynced data outlives the file
//!   descriptor, as dirty pages do.
//! - `sync_file_range` never reaches a FUSE file system and `sync`/`syncfs` are not
//!   forwarded either: both persist nothing here, which is exactly why a program that relies
//!   on them (sled's `flush()`, FACTS.md) is not power-loss safe.
//! - [`PowerCutFs::drop_unsynced`] is the cut: every overlay is discarded.
//! - [`PowerCutFs::hold_next_fsync`] aims a cut: the next fsync of one file is held
//!   unanswered, so the program can be killed between writing data and syncing it (a random
//!   SIGKILL under load lands in that window only now and then).
//!
//! # What it does not simulate
//!
//! - **Metadata loss.** `create`, `mkdir`, `rename`, `unlink`, `rmdir`, `link`, `symlink`,
//!   `chmod`/`chown`/`utimes` pass through to the backing directory at once and are never
//!   lost: data loss only, like LazyFS's default. (A created file's *name* survives the cut;
//!   its unsynced *content* does not. A file renamed over another before it was synced is
//!   empty after the cut, ext4's classic zero-length file.) `fsyncdir` is passed through.
//! - **Torn or partial loss.** A file loses *all* its unsynced writes, never some of them,
//!   and never persists unsynced data early (a real kernel writes dirty pages back whenever
//!   it likes). So it checks "everything acknowledged after an fsync survives", not "a torn
//!   page is detected".
//! - Lying devices (a cache that ignores flushes), bit rot, `ENOSPC`, I/O errors.
//! - `mmap` of files (they are `direct_io`: `MAP_SHARED` fails), extended attributes, and
//!   file locks: `flock`/`fcntl` locks are left to the kernel, which handles them locally
//!   because the file system does not ask for `FUSE_POSIX_LOCKS`/`FUSE_FLOCK_LOCKS`.
//!
//! # Mounting
//!
//! [`PowerCutFs::mount`] mounts in this process with `fuser::spawn_mount` (the 0.18 name of
//! `spawn_mount2`: a background thread) using fuser's pure-Rust mount, which runs
//! `fusermount3` (Debian package `fuse3`; no libfuse) in `auto_unmount` mode: `fusermount3`
//! stays behind and unmounts if this process dies. Dropping the handle unmounts (itself:
//! fuser 0.18 leaves that to fusermount3 in this mode, which never does it while the file
//! system is served, so `umount_and_join` alone hangs) and joins the thread, also while a
//! test panics. Mounts left by a test process that died anyway are
//! unmounted at the next mount ([`unmount_stale`]). The mount allows other users
//! (`allow_other`: root, or `user_allow_other` in /etc/fuse.conf) because fuser requires it
//! for `auto_unmount`; `default_permissions` is not set (root runs the tests).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    SessionACL, TimeOrNow, WriteFlags,
};

/// The file system type shown in /proc/mounts is `fuse.<SUBTYPE>`.
const SUBTYPE: &str = "waystation-powercut";
/// Overlay page size.
const PAGE: u64 = 4096;
/// Attribute and entry lifetime in the kernel: none, so that a size that reverted at a cut is
/// never served from a cache.
const TTL: Duration = Duration::ZERO;

/// Checks that FUSE can be used here: `/dev/fuse` exists and `fusermount3` is installed.
/// The error says what to install.
pub fn check_available() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err(
            "/dev/fuse is missing: this kernel or container has no FUSE \
                    (load the fuse module, or run the container with --device /dev/fuse)"
                .into(),
        );
    }
    if fusermount3().is_none() {
        return Err("fusermount3 is not installed: apt-get install fuse3 \
                    (scripts/test.sh installs it)"
            .into());
    }
    Ok(())
}

fn fusermount3() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("fusermount3"))
        .find(|p| p.is_file())
}

/// Unmounts mounts of this file system left by a test process that died without unmounting
/// (killed by a timeout, say). Each mount names its owner in its source (`<subtype>:<pid>`):
/// mounts whose owner is gone or a zombie are unmounted, those of live processes (this one
/// included) are left alone. Returns the mount points unmounted.
///
/// fusermount3's auto_unmount watchdog normally does this when the owner dies, but not if a
/// thread of the dying owner was itself inside a request on the mount: that thread waits for
/// an answer its own dead request loop will never give, the process cannot finish exiting, and
/// the mount hangs every access. `MNT_FORCE` makes FUSE abort the connection, which frees it.
pub fn unmount_stale() -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    let fstype = format!("fuse.{SUBTYPE}");
    let me = std::process::id();
    let mut done = Vec::new();
    for line in mounts.lines() {
        let mut fields = line.split(' ');
        let (Some(source), Some(target), Some(kind)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if kind != fstype {
            continue;
        }
        let Some(owner) = source
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == me || process_alive(owner) {
            continue;
        }
        let target = PathBuf::from(unescape_mount_path(target));
        let Ok(c) = CString::new(target.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: valid C strings. MNT_FORCE aborts the FUSE connection even when it then
        // fails with EBUSY; MNT_DETACH removes the mount.
        let unmounted = unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_FORCE) == 0
                || libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0
        } || fusermount3().is_some_and(|bin| {
            std::process::Command::new(bin)
                .args(["-u", "-z", "-q", "--"])
                .arg(&target)
                .stdin(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if unmounted {
            let _ = std::fs::remove_dir(&target);
            done.push(target);
        }
    }
    done
}

/// Whether `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    OsStr::from_bytes(&out).to_os_string()
}

/// Counters since the mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// `write` requests and the bytes they carried.
    pub writes: u64,
    pub written_bytes: u64,
    /// `fsync`/`fdatasync` requests on files (and `O_SYNC` writes), and the overlay bytes they
    /// wrote to the backing files.
    pub fsyncs: u64,
    pub synced_bytes: u64,
    /// `fsync` on directories (passed through).
    pub fsyncdirs: u64,
    /// Calls of [`PowerCutFs::drop_unsynced`], and what they discarded in all.
    pub cuts: u64,
    pub dropped_files: u64,
    pub dropped_bytes: u64,
}

/// What one [`PowerCutFs::drop_unsynced`] discarded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cut {
    /// Files that had unsynced changes and reverted to their last synced state.
    pub files: usize,
    /// Bytes written to them since their last sync (overwrites counted each time).
    pub bytes: u64,
    /// Their paths in the mount, relative to its root (as last known).
    pub paths: Vec<PathBuf>,
}

/// A mounted power-cut file system. Unmounted (and its temporary directories removed) on drop.
pub struct PowerCutFs {
    // Field order is drop order: unmount before the directories go.
    session: Option<BackgroundSession>,
    notifier: Notifier,
    state: Arc<Mutex<State>>,
    /// Signalled when a held fsync arrives or is released.
    cv: Arc<Condvar>,
    mountpoint: PathBuf,
    backing: PathBuf,
    _mount_dir: tempfile::TempDir,
    _backing_dir: Option<tempfile::TempDir>,
}

impl PowerCutFs {
    /// Mounts on a new temporary directory, backed by another one in the system's temp dir.
    pub fn mount() -> io::Result<PowerCutFs> {
        let backing = tempfile::Builder::new()
            .prefix("powercut-backing-")
            .tempdir()?;
        let path = backing.path().to_path_buf();
        Self::mount_inner(&path, Some(backing))
    }

    /// Mounts on a new temporary directory, passing through to `backing` (an existing
    /// directory, kept after the unmount). A tmpfs (`/dev/shm`) makes the real fsyncs
    /// behind the simulated ones free.
    pub fn mount_backed_by(backing: &Path) -> io::Result<PowerCutFs> {
        Self::mount_inner(backing, None)
    }

    fn mount_inner(backing: &Path, owned: Option<tempfile::TempDir>) -> io::Result<PowerCutFs> {
        check_available().map_err(io::Error::other)?;
        unmount_stale();
        let backing = backing.canonicalize()?;
        let mount_dir = tempfile::Builder::new().prefix("powercut-mnt-").tempdir()?;
        let mountpoint = mount_dir.path().canonicalize()?;
        let root_meta = std::fs::metadata(&backing)?;
        let state = Arc::new(Mutex::new(State::new(backing.clone(), &root_meta)));
        let cv = Arc::new(Condvar::new());
        let fs = PowerCutImpl {
            state: Arc::clone(&state),
            cv: Arc::clone(&cv),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("{SUBTYPE}:{}", std::process::id())),
            MountOption::Subtype(SUBTYPE.into()),
            MountOption::AutoUnmount,
            MountOption::RW,
            MountOption::NoAtime,
        ];
        config.acl = SessionACL::All;
        let session = fuser::spawn_mount(fs, &mountpoint, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "mounting the power-cut file system on {}: {e}",
                    mountpoint.display()
                ),
            )
        })?;
        let notifier = session.notifier();
        let pc = PowerCutFs {
            session: Some(session),
            notifier,
            state,
            cv,
            mountpoint,
            backing,
            _mount_dir: mount_dir,
            _backing_dir: owned,
        };
        // The mount is usable once the kernel answers through it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !pc.is_mounted() {
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "{} did not show up as a FUSE mount within 10 s",
                    pc.mountpoint.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(pc)
    }

    /// The mount point: put the files under test here.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The backing directory: it holds exactly what a cut would leave (synced data, and all
    /// metadata).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    fn is_mounted(&self) -> bool {
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let Ok(c) = CString::new(self.mountpoint.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: a valid C string and a zeroed out-parameter.
        let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
        r == 0 && st.f_type == 0x6573_5546 // FUSE_SUPER_MAGIC
    }

    /// The power cut: discards every file's unsynced data, so each file reverts to the content
    /// and size of its last fsync (a file never synced: empty). Metadata is not reverted.
    ///
    /// Call it once the program under test is dead (e.g. SIGKILLed and reaped): a request it
    /// had started may still be queued in the kernel, so this first sends one request of its
    /// own through the mount (`statfs`) and waits for it, which the single request loop answers
    /// only after everything queued before it.
    ///
    /// If an fsync is held ([`PowerCutFs::hold_next_fsync`]) the request loop is blocked, so
    /// there is no barrier: the data is dropped, then the held fsync is answered with `EIO`.
    /// Call this once more after the program is reaped, to drop whatever it still had queued.
    pub fn drop_unsynced(&self) -> Cut {
        let held = lock(&self.state).hold.as_ref().is_some_and(|h| h.held);
        if !held {
            let _ = self.is_mounted(); // the barrier
        }
        let mut cut = Cut::default();
        let inodes: Vec<u64> = {
            let mut st = lock(&self.state);
            let st = &mut *st;
            // Disarms, and releases a held fsync (after the drop: the lock is held until then).
            if st.hold.take().is_some() {
                self.cv.notify_all();
            }
            for node in st.nodes.values_mut() {
                if let Some(d) = node.dirty.take() {
                    cut.files += 1;
                    cut.bytes += d.written;
                    cut.paths.push(node.path.clone());
                }
                if node.opens == 0 {
                    node.file = None;
                }
            }
            st.stats.cuts += 1;
            st.stats.dropped_files += cut.files as u64;
            st.stats.dropped_bytes += cut.bytes;
            cut.paths = cut.paths.iter().map(|p| st.relative(p)).collect();
            st.nodes.keys().copied().collect()
        };
        // Nothing should be cached (TTL 0, direct_io), but make sure: sizes and pages the
        // kernel may still hold for these inodes are stale now.
        for ino in inodes {
            let _ = self.notifier.inval_inode(INodeNo(ino), 0, 0);
        }
        cut.paths.sort();
        cut
    }

    /// Arms a cut at the next `fsync`/`fdatasync` of the file at `path` (relative to the
    /// mount's root): that request is held, unanswered, so the program under test sits right
    /// between writing its data and syncing it, the moment a power cut costs most. Wait for it
    /// with [`PowerCutFs::wait_for_held_fsync`], SIGKILL the program, then
    /// [`PowerCutFs::drop_unsynced`] drops the data and fails the held fsync with `EIO` (the
    /// killed process cannot finish exiting before it is answered). While it is held, every
    /// request on the mount waits, as on a machine that lost power. `drop_unsynced` disarms.
    pub fn hold_next_fsync(&self, path: impl AsRef<Path>) {
        let mut st = lock(&self.state);
        let path = st.root.join(path);
        st.hold = Some(Hold { path, held: false });
    }

    /// Waits until the fsync armed by [`PowerCutFs::hold_next_fsync`] is held; false if it
    /// did not come within `timeout` (or nothing is armed). It stays armed either way.
    pub fn wait_for_held_fsync(&self, timeout: Duration) -> bool {
        let st = lock(&self.state);
        let (st, _) = self
            .cv
            .wait_timeout_while(st, timeout, |st| st.hold.as_ref().is_some_and(|h| !h.held))
            .unwrap_or_else(|p| p.into_inner());
        st.hold.as_ref().is_some_and(|h| h.held)
    }

    /// Bytes written and not synced yet, over all files.
    pub fn unsynced_bytes(&self) -> u64 {
        self.unsynced_files().iter().map(|(_, b)| b).sum()
    }

    /// Files with unsynced changes (paths relative to the mount's root, as last known) and the
    /// bytes written to each since its last sync.
    pub fn unsynced_files(&self) -> Vec<(PathBuf, u64)> {
        let st = lock(&self.state);
        let mut v: Vec<(PathBuf, u64)> = st
            .nodes
            .values()
            .filter_map(|n| n.dirty.as_ref().map(|d| (st.relative(&n.path), d.written)))
            .collect();
        v.sort();
        v
    }

    pub fn stats(&self) -> Stats {
        lock(&self.state).stats.clone()
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        // fuser 0.18 leaves unmounting in auto_unmount mode to fusermount3 once our end of its
        // socket closes, but fusermount3 only unmounts a file system whose server is gone
        // (ENOTCONN): ours is still serving, so `umount_and_join` alone never returns. Unmount
        // first (plainly, or lazily if something still has a file open there), then join.
        // A held fsync would block the unmount: release it (disarm).
        if lock(&self.state).hold.take().is_some() {
            self.cv.notify_all();
        }
        let c = CString::new(self.mountpoint.as_os_str().as_bytes()).ok();
        if self.is_mounted() {
            let plain = c.as_ref().is_some_and(|c| {
                // SAFETY: a valid C string.
                unsafe { libc::umount2(c.as_ptr(), 0) == 0 }
            });
            if !plain {
                let lazy = c.as_ref().is_some_and(|c| {
                    // SAFETY: a valid C string.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0 }
                });
                if !lazy {
                    if let Some(bin) = fusermount3() {
                        let _ = std::process::Command::new(bin)
                            .args(["-u", "-z", "-q", "--"])
                            .arg(&self.mountpoint)
                            .stdin(std::process::Stdio::null())
                            .status();
                    }
                }
            }
        }
        if let Some(session) = self.session.take() {
            // The request loop ends when the kernel drops the connection (ENODEV): at once
            // after a plain unmount, once the last open file is closed after a lazy one.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !session.guard.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if session.guard.is_finished() {
                let _ = session.umount_and_join();
            } else {
                // Something still holds a file open on the detached mount: do not hang the
                // test; the thread ends with the process.
                eprintln!(
                    "waystation-powercut: {} still busy 10 s after a lazy unmount; leaving its thread",
                    self.mountpoint.display()
                );
                std::mem::forget(session);
            }
        }
        reap_fusermount3();
    }
}

/// fuser starts `fusermount3` (which stays as the auto_unmount watchdog) and never waits for
/// it: reap the ones of this process that have exited, so that they do not linger as zombies.
/// Only exited `fusermount3` children are waited for, never another child of the process.
fn reap_fusermount3() {
    let me = std::process::id();
    for _ in 0..50 {
        let mut live = 0;
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ..."; comm may hold spaces, so split at the last ')'.
            let Some((head, tail)) = stat.rsplit_once(')') else {
                continue;
            };
            if !head.ends_with("(fusermount3") {
                continue;
            }
            let mut f = tail.split_whitespace();
            let (Some(state), Some(ppid)) = (f.next(), f.next()) else {
                continue;
            };
            if ppid.parse::<u32>().ok() != Some(me) {
                continue;
            }
            let Ok(pid) = head.split_whitespace().next().unwrap_or("").parse::<i32>() else {
                continue;
            };
            if state == "Z" {
                let mut status = 0;
                // SAFETY: waitpid(2) on an exited child of ours that nothing else waits for.
                unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            } else {
                live += 1;
            }
        }
        // A watchdog whose socket just closed exits within milliseconds; others (mounts
        // still in use by this process) stay, and are left alone.
        if live == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------

/// Unsynced changes of one file: its logical size and the pages written since the last sync.
struct Dirty {
    /// The size the file has now.
    size: u64,
    /// Backing bytes at or past this offset read as zeros: the file was truncated to this
    /// size (the smallest since the last sync) and perhaps grown again.
    clip: u64,
    /// Page index -> page (PAGE bytes), loaded from the backing file at the first write.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// Bytes written since the last sync (reporting only).
    written: u64,
}

struct Node {
    /// A path of this inode in the backing directory (the last one seen).
    path: PathBuf,
    /// Backing (st_dev, st_ino), while the backing inode has a name.
    key: Option<(u64, u64)>,
    /// The backing file, opened read-write at the first open, kept while the file is open or
    /// has unsynced data.
    file: Option<File>,
    opens: u64,
    dirty: Option<Dirty>,
}

struct State {
    root: PathBuf,
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(u64, u64), u64>,
    next_ino: u64,
    /// Directory listings taken at opendir, by handle.
    dirs: HashMap<u64, Vec<(u64, FileType, OsString)>>,
    next_fh: u64,
    stats: Stats,
    /// A cut armed at the next fsync of one file ([`PowerCutFs::hold_next_fsync`]).
    hold: Option<Hold>,
}

/// The backing path whose next fsync is held, and whether it has arrived.
struct Hold {
    path: PathBuf,
    held: bool,
}

type Res<T> = Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    match e.raw_os_error() {
        Some(n) if n > 0 => Errno::from_i32(n),
        _ => Errno::EIO,
    }
}

fn key_of(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn cstr(p: &Path) -> Res<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

fn check(r: libc::c_int) -> Res<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(errno(io::Error::last_os_error()))
    }
}

impl State {
    fn new(root: PathBuf, meta: &std::fs::Metadata) -> State {
        let mut nodes = HashMap::new();
        nodes.insert(
            INodeNo::ROOT.0,
            Node {
                path: root.clone(),
                key: Some(key_of(meta)),
                file: None,
                opens: 0,
                dirty: None,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(key_of(meta), INodeNo::ROOT.0);
        State {
            root,
            nodes,
            by_key,
            next_ino: 2,
            dirs: HashMap::new(),
            next_fh: 1,
            stats: Stats::default(),
            hold: None,
        }
    }

    fn relative(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| path.to_path_buf())
    }

    fn node(&mut self, ino: INodeNo) -> Res<&mut Node> {
        self.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)
    }

    fn path(&self, ino: INodeNo) -> Res<PathBuf> {
        self.nodes
            .get(&ino.0)
            .map(|n| n.path.clone())
            .ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Res<PathBuf> {
        Ok(self.path(parent)?.join(name))
    }

    /// The node for the backing inode at `path` (created if new), its path updated.
    fn node_for(&mut self, path: PathBuf, meta: &std::fs::Metadata) -> u64 {
        let key = key_of(meta);
        if let Some(&ino) = self.by_key.get(&key) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.path = path;
                return ino;
            }
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                path,
                key: Some(key),
                file: None,
                opens: 0,
                dirty: None,
            },
        );
        self.by_key.insert(key, ino);
        ino
    }

    /// The backing inode at `key` lost its last name: a new file may reuse its number.
    fn forget_key(&mut self, key: (u64, u64)) {
        if let Some(ino) = self.by_key.remove(&key) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.key = None;
            }
        }
    }

    fn attr(&mut self, ino: INodeNo) -> Res<FileAttr> {
        let node = self.node(ino)?;
        let meta = match &node.file {
            Some(f) => f.metadata(),
            None => std::fs::symlink_metadata(&node.path),
        }
        .map_err(errno)?;
        let size = node.dirty.as_ref().map_or(meta.len(), |d| d.size);
        Ok(attr_from(ino, &meta, size))
    }

    fn entry(&mut self, path: PathBuf) -> Res<FileAttr> {
        let meta = std::fs::symlink_metadata(&path).map_err(errno)?;
        let ino = self.node_for(path, &meta);
        self.attr(INodeNo(ino))
    }

    /// The backing file of a regular file, opened if needed.
    fn file(&mut self, ino: INodeNo) -> Res<&File> {
        let node = self.node(ino)?;
        if node.file.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&node.path)
                .map_err(errno)?;
            node.file = Some(f);
        }
        Ok(node.file.as_ref().expect("opened above"))
    }

    fn dirty(&mut self, ino: INodeNo) -> Res<&mut Dirty> {
        let len = self.file(ino)?.metadata().map_err(errno)?.len();
        let node = self.node(ino)?;
        Ok(node.dirty.get_or_insert_with(|| Dirty {
            size: len,
            clip: len,
            pages: BTreeMap::new(),
            written: 0,
        }))
    }

    fn read(&mut self, ino: INodeNo, offset: u64, size: u32) -> Res<Vec<u8>> {
        let file_len = self.file(ino)?.metadata().map_err(errno)?.len();
        let node = self.node(ino)?;
        let (logical, clip) = node
            .dirty
            .as_ref()
            .map_or((file_len, file_len), |d| (d.size, d.clip));
        if offset >= logical {
            return Ok(Vec::new());
        }
        let end = logical.min(offset + u64::from(size));
        let mut buf = vec![0u8; (end - offset) as usize];
        let base_end = end.min(clip);
        if offset < base_end {
            let f = node.file.as_ref().expect("opened above");
            read_fully_at(f, &mut buf[..(base_end - offset) as usize], offset)?;
        }
        if let Some(d) = &node.dirty {
            for (&pi, page) in d.pages.range(offset / PAGE..=(end - 1) / PAGE) {
                let ps = pi * PAGE;
                let from = offset.max(ps);
                let to = end.min(ps + PAGE);
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&page[(from - ps) as usize..(to - ps) as usize]);
            }
        }
        Ok(buf)
    }

    fn write(&mut self, ino: INodeNo, offset: u64, data: &[u8]) -> Res<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.dirty(ino)?;
        let node = self.node(ino)?;
        let f = node.file.as_ref().expect("opened by dirty()");
        let d = node.dirty.as_mut().expect("made by dirty()");
        let end = offset + data.len() as u64;
        for pi in offset / PAGE..=(end - 1) / PAGE {
            let ps = pi * PAGE;
            let page = match d.pages.entry(pi) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
                    if ps < d.clip {
                        let n = (d.clip - ps).min(PAGE) as usize;
                        read_fully_at(f, &mut p[..n], ps)?;
                    }
                    e.insert(p)
                }
            };
            let from = offset.max(ps);
            let to = end.min(ps + PAGE);
            page[(from - ps) as usize..(to - ps) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
        }
        d.size = d.size.max(end);
        d.written += data.len() as u64;
        Ok(())
    }

    fn set_size(&mut self, ino: INodeNo, size: u64) -> Res<()> {
        let d = self.dirty(ino)?;
        if size < d.size {
            let first_gone = size.div_ceil(PAGE);
            d.pages.split_off(&first_gone);
            if !size.is_multiple_of(PAGE) {
                if let Some(p) = d.pages.get_mut(&(size / PAGE)) {
                    p[(size % PAGE) as usize..].fill(0);
                }
            }
            d.clip = d.clip.min(size);
        }
        d.size = size;
        Ok(())
    }

    /// fsync: the overlay goes to the backing file, which is then synced for real.
    fn sync(&mut self, ino: INodeNo, datasync: bool) -> Res<()> {
        self.file(ino)?;
        let node = self.node(ino)?;
        let f = node.file.as_ref().expect("opened above");
        let mut synced = 0;
        if let Some(d) = node.dirty.take() {
            let applied = (|| -> io::Result<u64> {
                let mut bytes = 0;
                if d.clip < f.metadata()?.len() {
                    f.set_len(d.clip)?;
                }
                for (&pi, page) in &d.pages {
                    let ps = pi * PAGE;
                    if ps >= d.size {
                        break;
                    }
                    let n = (d.size - ps).min(PAGE) as usize;
                    f.write_all_at(&page[..n], ps)?;
                    bytes += n as u64;
                }
                if f.metadata()?.len() != d.size {
                    f.set_len(d.size)?;
                }
                Ok(bytes)
            })();
            match applied {
                Ok(b) => synced = b,
                Err(e) => {
                    // Writing it again is harmless: keep it for the next fsync.
                    node.dirty = Some(d);
                    return Err(errno(e));
                }
            }
        }
        if datasync {
            f.sync_data()
        } else {
            f.sync_all()
        }
        .map_err(errno)?;
        if node.opens == 0 {
            node.file = None;
        }
        self.stats.fsyncs += 1;
        self.stats.synced_bytes += synced;
        Ok(())
    }

    fn rename(&mut self, from: PathBuf, to: PathBuf, flags: RenameFlags) -> Res<()> {
        let moved = std::fs::symlink_metadata(&from).map_err(errno)?;
        let replaced = std::fs::symlink_metadata(&to).ok();
        if flags.is_empty() {
            std::fs::rename(&from, &to).map_err(errno)?;
        } else {
            let (a, b) = (cstr(&from)?, cstr(&to)?);
            // SAFETY: valid C strings; AT_FDCWD with absolute paths.
            check(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    flags.bits(),
                )
            })?;
        }
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        if let Some(r) = &replaced {
            if !exchange && key_of(r) != key_of(&moved) && (r.is_dir() || r.nlink() <= 1) {
                self.forget_key(key_of(r));
            }
        }
        // Every node under the old name (the moved inode, and its descendants if it is a
        // directory) now lives under the new one; with EXCHANGE, the other way round too.
        for n in self.nodes.values_mut() {
            if let Ok(rest) = n.path.strip_prefix(&from) {
                n.path = to.join(rest);
            } else if exchange {
                if let Ok(rest) = n.path.strip_prefix(&to) {
                    n.path = from.join(rest);
                }
            }
        }
        Ok(())
    }

    fn statfs(&self) -> Res<libc::statvfs> {
        let c = cstr(&self.root)?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out-parameter.
        check(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
        Ok(st)
    }
}

fn read_fully_at(f: &File, mut buf: &mut [u8], mut offset: u64) -> Res<()> {
    // A short read (the backing file is shorter) leaves zeros.
    while !buf.is_empty() {
        match f.read_at(buf, offset) {
            Ok(0) => break,
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

fn attr_from(ino: INodeNo, m: &std::fs::Metadata, size: u64) -> FileAttr {
    let kind = FileType::from_std(m.file_type()).unwrap_or(FileType::RegularFile);
    FileAttr {
        ino,
        size,
        blocks: if m.is_file() {
            size.div_ceil(512)
        } else {
            m.blocks()
        },
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

// ---------------------------------------------------------------------------------------
// The FUSE side
// ---------------------------------------------------------------------------------------

struct PowerCutImpl {
    state: Arc<Mutex<State>>,
    cv: Arc<Condvar>,
}

impl PowerCutImpl {
    fn st(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn reply_empty(reply: ReplyEmpty, r: Res<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn reply_entry(reply: ReplyEntry, r: Res<FileAttr>) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn time_spec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            }
        }
    }
}

impl Filesystem for PowerCutImpl {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.st();
        let r = st.child(parent, name).and_then(|p| st.entry(p));
        reply_entry(reply, r);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.st().attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.st();
        let r = (|| -> Res<FileAttr> {
            let path = st.path(ino)?;
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&path, uid, gid).map_err(errno)?;
            }
            if let Some(size) = size {
                // Data, not metadata: buffered like a write.
                st.set_size(ino, size)?;
            }
            if atime.is_some() || mtime.is_some() {
                let c = cstr(&path)?;
                let times = [time_spec(atime), time_spec(mtime)];
                // SAFETY: valid C string, two timespecs.
                check(unsafe {
                    libc::utimensat(
                        libc::AT_FDCWD,
                        c.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            }
            st.attr(ino)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self
            .st()
            .path(ino)
            .and_then(|p| std::fs::read_link(p).map_err(errno));
        match r {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let r = (|| {
            let path = st.child(parent, name)?;
            let c = cstr(&path)?;
            // SAFETY: valid C string.
            check(unsafe { libc::mknod(c.as_ptr(), mode & !umask, libc::dev_t::from(rdev)) })?;
            st.entry(path)
        })();
        reply_entry(reply, r);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let r = (|| {
            let path = st.child(parent, name)?;
            std::fs::DirBuilder::new()
                .mode(mode & !umask & 0o7777)
                .create(&path)
                .map_err(errno)?;
            st.entry(path)
        })();
        reply_entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.st();
        let r = (|| {
            let path = st.child(parent, name)?;
            let meta = std::fs::symlink_metadata(&path).map_err(errno)?;
            std::fs::remove_file(&path).map_err(errno)?;
            if meta.nlink() <= 1 {
                st.forget_key(key_of(&meta));
            }
            Ok(())
        })();
        reply_empty(reply, r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.st();
        let r = (|| {
            let path = st.child(parent, name)?;
            let meta = std::fs::symlink_metadata(&path).map_err(errno)?;
            std::fs::remove_dir(&path).map_err(errno)?;
            st.forget_key(key_of(&meta));
            Ok(())
        })();
        reply_empty(reply, r);
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let r = (|| {
            let path = st.child(parent, link_name)?;
            std::os::unix::fs::symlink(target, &path).map_err(errno)?;
            st.entry(path)
        })();
        reply_entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let r = (|| {
            let from = st.child(parent, name)?;
            let to = st.child(newparent, newname)?;
            st.rename(from, to, flags)
        })();
        reply_empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let r = (|| {
            let from = st.path(ino)?;
            let to = st.child(newparent, newname)?;
            std::fs::hard_link(&from, &to).map_err(errno)?;
            st.attr(ino)
        })();
        reply_entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.st();
        let r = (|| {
            st.file(ino)?;
            if flags.0 & libc::O_TRUNC != 0 {
                st.set_size(ino, 0)?;
            }
            st.node(ino)?.opens += 1;
            Ok(())
        })();
        match r {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.st().read(ino, offset, size) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut st = self.st();
        let r = (|| {
            st.write(ino, offset, data)?;
            st.stats.writes += 1;
            st.stats.written_bytes += data.len() as u64;
            if flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0 {
                st.sync(ino, flags.0 & libc::O_SYNC != libc::O_SYNC)?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): persists nothing.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The last close persists nothing either; the overlay (and the backing descriptor
        // needed to sync it later) stay until a sync or a cut.
        let mut st = self.st();
        if let Ok(n) = st.node(ino) {
            n.opens = n.opens.saturating_sub(1);
            if n.opens == 0 && n.dirty.is_none() {
                n.file = None;
            }
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let armed_here = st.nodes.get(&ino.0).is_some_and(|n| {
            st.hold
                .as_ref()
                .is_some_and(|h| !h.held && h.path == n.path)
        });
        if armed_here {
            // The cut lands here: hold the request until drop_unsynced() has dropped the data
            // (it takes `hold` away), then fail it.
            if let Some(h) = st.hold.as_mut() {
                h.held = true;
            }
            self.cv.notify_all();
            let st = self
                .cv
                .wait_while(st, |st| st.hold.as_ref().is_some_and(|h| h.held))
                .unwrap_or_else(|p| p.into_inner());
            drop(st);
            reply.error(Errno::EIO);
            return;
        }
        let r = st.sync(ino, datasync);
        reply_empty(reply, r);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.st();
        let r = (|| {
            let path = st.path(ino)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (ino.0, FileType::Directory, OsString::from("..")),
            ];
            for e in std::fs::read_dir(&path).map_err(errno)? {
                let e = e.map_err(errno)?;
                let Ok(meta) = e.metadata() else { continue };
                let child = st.node_for(e.path(), &meta);
                let kind = FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile);
                entries.push((child, kind, e.file_name()));
            }
            let fh = st.next_fh;
            st.next_fh += 1;
            st.dirs.insert(fh, entries);
            Ok(fh)
        })();
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let st = self.st();
        let Some(entries) = st.dirs.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.st().dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Metadata is passed through as it happens; this makes it durable on the backing disk.
        let mut st = self.st();
        let r = st.path(ino).and_then(|p| {
            let d = File::open(p).map_err(errno)?;
            if datasync {
                d.sync_data()
            } else {
                d.sync_all()
            }
            .map_err(errno)
        });
        if r.is_ok() {
            st.stats.fsyncdirs += 1;
        }
        reply_empty(reply, r);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.st().statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let r = self
            .st()
            .path(ino)
            .and_then(|p| std::fs::symlink_metadata(p).map(|_| ()).map_err(errno));
        reply_empty(reply, r);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.st();
        let r = (|| {
            let path = st.child(parent, name)?;
            let existed = path.exists();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .create_new(flags & libc::O_EXCL != 0)
                .mode(mode & !umask & 0o7777)
                .open(&path)
                .map_err(errno)?;
            let meta = file.metadata().map_err(errno)?;
            let ino = INodeNo(st.node_for(path, &meta));
            let node = st.node(ino)?;
            if node.file.is_none() {
                node.file = Some(file);
            }
            node.opens += 1;
            if existed && flags & libc::O_TRUNC != 0 {
                st.set_size(ino, 0)?;
            }
            st.attr(ino)
        })();
        match r {
            Ok(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let r = (|| {
            if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
                // Punching holes, zeroing or collapsing ranges: not needed so far.
                return Err(Errno::from_i32(libc::EOPNOTSUPP));
            }
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
                let size = st.attr(ino)?.size;
                if offset + length > size {
                    st.set_size(ino, offset + length)?;
                }
            }
            Ok(())
        })();
        reply_empty(reply, r);
    }
}
