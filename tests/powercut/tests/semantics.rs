//! The power-cut file system against a real FUSE mount: what survives `drop_unsynced` and
//! what does not, and the access patterns sled needs (pwrite/pread at offsets, growth,
//! ftruncate, fallocate, flock, directory fsync, statfs).
//!
//! These tests need /dev/fuse and fusermount3 (Debian `fuse3`); without them they fail, by
//! design: CI installs fuse3.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use waystation_powercut::PowerCutFs;

fn mount() -> PowerCutFs {
    if let Err(e) = waystation_powercut::check_available() {
        panic!("the power-cut tests need FUSE: {e}");
    }
    PowerCutFs::mount().expect("mount the power-cut file system")
}

fn read(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

#[test]
fn written_not_synced_is_gone_after_the_cut_but_readable_before() {
    let fs = mount();
    let p = fs.path().join("a");
    let mut f = File::create(&p).unwrap();
    f.write_all(b"hello, page cache").unwrap();
    // Reads (also through another descriptor) see unsynced data.
    assert_eq!(read(&p), b"hello, page cache");
    assert_eq!(fs::metadata(&p).unwrap().len(), 17);
    // Nothing reached the backing file.
    assert_eq!(fs::metadata(fs.backing().join("a")).unwrap().len(), 0);
    drop(f); // close persists nothing
    let cut = fs.drop_unsynced();
    assert_eq!(cut.files, 1, "{cut:?}");
    assert_eq!(cut.bytes, 17);
    // The name was metadata (passed through): the file exists, empty.
    assert_eq!(read(&p), b"");
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
}

#[test]
fn written_and_fsynced_survives_the_cut() {
    let fs = mount();
    let p = fs.path().join("b");
    let mut f = File::create(&p).unwrap();
    f.write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs.drop_unsynced().files, 0);
    assert_eq!(read(&p), b"durable");
    // fdatasync counts too, and the synced content is the one at the last sync.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"DUR", 0).unwrap();
    f.sync_data().unwrap();
    f.write_all_at(b"ABLE", 3).unwrap();
    f.write_all_at(b" and more", 7).unwrap();
    assert_eq!(read(&p), b"DURABLE and more");
    let cut = fs.drop_unsynced();
    assert_eq!(cut.files, 1);
    assert_eq!(read(&p), b"DURable");
    assert!(fs.stats().fsyncs >= 2, "{:?}", fs.stats());
}

#[test]
fn one_file_synced_the_other_not() {
    let fs = mount();
    let (a, b) = (fs.path().join("synced"), fs.path().join("unsynced"));
    let rw = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .unwrap()
    };
    let (fa, fb) = (rw(&a), rw(&b));
    fa.write_all_at(b"v1-a", 0).unwrap();
    fb.write_all_at(b"v1-b", 0).unwrap();
    fa.sync_all().unwrap();
    fb.sync_all().unwrap();
    // Second generation: a synced, b not.
    fa.write_all_at(&[b'A'; 10_000], 0).unwrap();
    fb.write_all_at(&[b'B'; 10_000], 0).unwrap();
    fa.sync_data().unwrap();
    // Unsynced writes of one file are not made durable by another file's fsync.
    assert_eq!(fs::read(fs.backing().join("unsynced")).unwrap(), b"v1-b");
    let cut = fs.drop_unsynced();
    assert_eq!(cut.files, 1);
    assert_eq!(cut.paths, vec![Path::new("unsynced").to_path_buf()]);
    assert_eq!(read(&a), vec![b'A'; 10_000]);
    assert_eq!(read(&b), b"v1-b");
    assert_eq!(fs::metadata(&b).unwrap().len(), 4);
    // The open descriptors go on working after the cut, on the reverted content.
    let mut buf = [0u8; 4];
    fb.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"v1-b");
}

#[test]
fn offsets_growth_truncate_and_fallocate_revert_to_the_synced_size() {
    let fs = mount();
    let p = fs.path().join("db");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .unwrap();
    // Sparse pwrites across pages, read back at offsets spanning page boundaries.
    let mut want = vec![0u8; 20_000];
    for (off, byte) in [
        (0usize, 1u8),
        (4090, 2),
        (8192, 3),
        (12_000, 4),
        (19_990, 5),
    ] {
        let chunk = vec![byte; 10];
        f.write_all_at(&chunk, off as u64).unwrap();
        want[off..off + 10].copy_from_slice(&chunk);
    }
    let mut got = vec![0u8; 20_000];
    f.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(got, want);
    f.sync_all().unwrap();
    assert_eq!(fs::read(fs.backing().join("db")).unwrap(), want);

    // Shrink, grow again: the cut bytes must read as zeros, not the old data.
    f.set_len(4093).unwrap();
    f.set_len(16_384).unwrap();
    let mut got = vec![0u8; 16_384];
    f.read_exact_at(&mut got, 0).unwrap();
    let mut shrunk = want[..4093].to_vec();
    shrunk.resize(16_384, 0);
    assert_eq!(got, shrunk);
    // fallocate grows the size (mode 0), KEEP_SIZE does not.
    // SAFETY: fallocate(2) on an open descriptor.
    assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 30_000) }, 0);
    assert_eq!(f.metadata().unwrap().len(), 30_000);
    assert_eq!(
        unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 40_000) },
        0
    );
    assert_eq!(f.metadata().unwrap().len(), 30_000);

    // The cut: back to the 20,000 synced bytes.
    fs.drop_unsynced();
    assert_eq!(f.metadata().unwrap().len(), 20_000);
    assert_eq!(read(&p), want);

    // And a truncate that is synced sticks.
    f.set_len(100).unwrap();
    f.sync_all().unwrap();
    fs.drop_unsynced();
    assert_eq!(read(&p), &want[..100]);
}

#[test]
fn metadata_passes_through_and_sled_style_calls_work() {
    let fs = mount();
    let dir = fs.path().join("store");
    fs::create_dir_all(dir.join("blobs")).unwrap();
    let db = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("db"))
        .unwrap();
    // flock (sled locks <dir>/db): the kernel handles it locally; a second exclusive lock on
    // another open file description must be refused.
    // SAFETY: flock(2) on open descriptors.
    assert_eq!(
        unsafe { libc::flock(db.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let other = File::open(dir.join("db")).unwrap();
    assert_ne!(
        unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0,
        "a second exclusive flock must fail"
    );
    // Directory fsync and statfs.
    File::open(&dir).unwrap().sync_all().unwrap();
    let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert!(st.f_bsize > 0);
    // Write a temporary file, sync it, rename it over: a snapshot the way sled writes one.
    let tmp = dir.join("snap.generating");
    let mut t = File::create(&tmp).unwrap();
    t.write_all(b"snapshot").unwrap();
    t.sync_all().unwrap();
    drop(t);
    fs::rename(&tmp, dir.join("snap.1")).unwrap();
    // A file renamed before it was synced keeps its name, not its content.
    let mut u = File::create(dir.join("conf.tmp")).unwrap();
    u.write_all(b"never synced").unwrap();
    drop(u);
    fs::rename(dir.join("conf.tmp"), dir.join("conf")).unwrap();
    assert_eq!(read(&dir.join("conf")), b"never synced");
    fs::remove_dir(dir.join("blobs")).unwrap();
    let cut = fs.drop_unsynced();
    assert_eq!(cut.paths, vec![Path::new("store/conf").to_path_buf()]);
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["conf", "db", "snap.1"]);
    assert_eq!(read(&dir.join("snap.1")), b"snapshot");
    assert_eq!(read(&dir.join("conf")), b"");
}

/// sled itself on the mount: what it `flush()`es is not synced by that (sled uses
/// `sync_file_range`, which never reaches a FUSE file system, FACTS.md); `flush()` plus
/// `fdatasync` on `<dir>/db` is, and survives a cut.
#[test]
fn sled_flush_is_not_a_sync_flush_plus_db_fdatasync_survives_a_cut() {
    let fs = mount();
    let dir = fs.path().join("sled");
    let open = || {
        sled::Config::new()
            .path(&dir)
            .cache_capacity(8 << 20)
            .flush_every_ms(None)
            .open()
            .expect("open sled")
    };
    let db = open();
    for i in 0u32..1_000 {
        db.insert(i.to_be_bytes(), vec![7u8; 100]).unwrap();
    }
    db.flush().unwrap();
    let pending = fs.unsynced_files();
    let db_pending = |p: &[(std::path::PathBuf, u64)]| {
        p.iter()
            .find(|(path, _)| path == Path::new("sled/db"))
            .map_or(0, |(_, b)| *b)
    };
    assert!(
        db_pending(&pending) > 100_000,
        "after sled's flush() its writes to sled/db are still unsynced: {pending:?}"
    );
    File::open(dir.join("db")).unwrap().sync_data().unwrap();
    let pending = fs.unsynced_files();
    assert_eq!(db_pending(&pending), 0, "{pending:?}");
    // sled never syncs its conf file (FACTS.md): still pending here.
    assert!(
        pending.iter().any(|(p, _)| p == Path::new("sled/conf")),
        "{pending:?}"
    );
    // Dropping a Db syncs (sled's Log::drop calls sync_all); a killed process never gets there.
    std::mem::drop(db);
    let cut = fs.drop_unsynced();
    let db = open();
    for i in 0u32..1_000 {
        assert_eq!(
            db.get(i.to_be_bytes()).unwrap().as_deref(),
            Some(&[7u8; 100][..]),
            "key {i} was flushed and fdatasynced before the cut ({cut:?})"
        );
    }
}

/// A cut armed at the next fsync of one file: the writer is held between writing and syncing,
/// the cut drops its data and its fsync fails; other files' syncs are not held.
#[test]
fn a_cut_held_at_the_next_fsync_drops_what_that_fsync_would_have_kept() {
    let fs = mount();
    let other = fs.path().join("other");
    fs::write(&other, b"x").unwrap();
    File::open(&other).unwrap().sync_all().unwrap();
    fs.hold_next_fsync("log");
    // Not the armed file: synced as usual.
    File::open(&other).unwrap().sync_all().unwrap();
    let path = fs.path().join("log");
    let writer = std::thread::spawn(move || {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        f.write_all_at(b"first", 0).unwrap();
        let first = f.sync_data().map_err(|e| e.raw_os_error());
        f.write_all_at(b"second", 5).unwrap();
        (first, f.sync_data().map_err(|e| e.raw_os_error()))
    });
    assert!(fs.wait_for_held_fsync(std::time::Duration::from_secs(10)));
    assert_eq!(
        fs.unsynced_files(),
        vec![(Path::new("log").to_path_buf(), 5)]
    );
    let cut = fs.drop_unsynced();
    assert_eq!(cut.files, 1);
    let (first, second) = writer.join().unwrap();
    assert_eq!(first, Err(Some(libc::EIO)), "the held fsync fails");
    assert_eq!(
        second,
        Ok(()),
        "disarmed after the cut: the next fsync goes through"
    );
    fs.drop_unsynced();
    // "first" was dropped at the cut; "second" was written at offset 5 and synced.
    assert_eq!(read(&fs.path().join("log")), b"\0\0\0\0\0second");
    assert!(!fs.wait_for_held_fsync(std::time::Duration::from_millis(10)));
}
