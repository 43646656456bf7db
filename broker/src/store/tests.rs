use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::engine::{KEY_MARKER, KEY_NEXT_SEQ, MARKER_VALUE, TREE_NAME};
use super::record::StoredMessage;
use super::recovery::utc_stamp;
use super::*;

const WAIT: Duration = Duration::from_secs(30);

fn open(dir: &Path) -> (Store, Recovery) {
    Store::open(StoreConfig::new(dir.join("store"))).expect("open store")
}

fn rec(n: usize) -> Bytes {
    Bytes::from(vec![b'x'; n])
}

fn append(store: &Store, records: &[Bytes]) -> (Ticket, Vec<Seq>) {
    store
        .submit(records.iter().cloned().map(Op::Append).collect())
        .expect("submit")
}

fn commit(store: &Store, ops: Vec<Op>) -> (Ticket, Vec<Seq>) {
    let (t, seqs) = store.submit(ops).expect("submit");
    store.wait_durable(t, WAIT).expect("durable");
    (t, seqs)
}

fn all_seqs(store: &Store) -> Vec<Seq> {
    store
        .read_log_budget(0, usize::MAX, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

#[test]
fn store_append_read_delete_put_get_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, rec0) = open(tmp.path());
    assert_eq!(
        rec0,
        Recovery {
            moved_aside: None,
            log_len: 0,
            log_bytes: 0,
            first_seq: None,
            last_seq: None
        }
    );
    let (t1, seqs) = append(&store, &[rec(10), rec(20), rec(30)]);
    assert_eq!(seqs, vec![1, 2, 3]);
    store.wait_durable(t1, WAIT).unwrap();
    let log = store.read_log(2, 10).unwrap();
    assert_eq!(log, vec![(2, rec(20)), (3, rec(30))]);
    assert_eq!(store.read_log(0, 1).unwrap(), vec![(1, rec(10))]);
    let s = store.log_stats();
    assert_eq!(
        (s.len, s.bytes, s.first_seq, s.last_seq),
        (3, 60, Some(1), Some(3))
    );

    commit(
        &store,
        vec![
            Op::Put {
                space: Keyspace::Meta,
                key: b"bridge/a/cursor".to_vec(),
                value: b"2".to_vec(),
            },
            Op::Put {
                space: Keyspace::Meta,
                key: b"bridge/b/cursor".to_vec(),
                value: b"3".to_vec(),
            },
            Op::Put {
                space: Keyspace::Retained,
                key: b"bridge/a/cursor".to_vec(),
                value: b"other space".to_vec(),
            },
            Op::DeleteLogThrough(2),
        ],
    );
    assert_eq!(all_seqs(&store), vec![3]);
    let s = store.log_stats();
    assert_eq!(
        (s.len, s.bytes, s.first_seq, s.last_seq),
        (1, 30, Some(3), Some(3))
    );
    assert_eq!(
        store.get(Keyspace::Meta, b"bridge/a/cursor").unwrap(),
        Some(b"2".to_vec())
    );
    assert_eq!(
        store.get(Keyspace::Sessions, b"bridge/a/cursor").unwrap(),
        None
    );
    assert_eq!(
        store.scan(Keyspace::Meta, b"bridge/").unwrap(),
        vec![
            (b"bridge/a/cursor".to_vec(), b"2".to_vec()),
            (b"bridge/b/cursor".to_vec(), b"3".to_vec())
        ]
    );
    assert_eq!(store.scan(Keyspace::Retained, b"").unwrap().len(), 1);

    // Same group: append, delete one, delete through, remove; later ops win.
    let (_, seqs) = commit(
        &store,
        vec![
            Op::Append(rec(1)),
            Op::Append(rec(2)),
            Op::Append(rec(4)),
            Op::DeleteLog(5),
            Op::DeleteLog(5),
            Op::DeleteLogThrough(4),
            Op::Remove {
                space: Keyspace::Meta,
                key: b"bridge/b/cursor".to_vec(),
            },
            Op::DeleteLog(999),
        ],
    );
    assert_eq!(seqs, vec![4, 5, 6]);
    assert_eq!(all_seqs(&store), vec![6]);
    let s = store.log_stats();
    assert_eq!(
        (s.len, s.bytes, s.first_seq, s.last_seq),
        (1, 4, Some(6), Some(6))
    );
    assert_eq!(store.get(Keyspace::Meta, b"bridge/b/cursor").unwrap(), None);
    store.shutdown().unwrap();
    assert!(matches!(
        store.submit(vec![Op::Append(rec(1))]),
        Err(StoreError::Closed)
    ));
}

#[test]
fn store_rejects_oversized_values_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let err = store
        .submit(vec![
            Op::Append(rec(1)),
            Op::Append(rec(MAX_VALUE_BYTES + 1)),
        ])
        .unwrap_err();
    assert!(matches!(err, StoreError::ValueTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("larger than the store accepts"));
    let err = store
        .submit(vec![Op::Put {
            space: Keyspace::Meta,
            key: vec![0; MAX_KEY_BYTES + 1],
            value: vec![],
        }])
        .unwrap_err();
    assert!(matches!(err, StoreError::KeyTooLarge { .. }));
    // Nothing was queued, no seq consumed.
    let (_, seqs) = commit(&store, vec![Op::Append(rec(MAX_VALUE_BYTES))]);
    assert_eq!(seqs, vec![1]);
}

#[test]
fn store_seq_never_reused_across_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(tmp.path());
        let (_, seqs) = commit(&store, (0..5).map(|_| Op::Append(rec(8))).collect());
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        // Delete the whole log, tail included.
        commit(&store, vec![Op::DeleteLogThrough(5)]);
        assert_eq!(store.log_stats().len, 0);
    }
    let (store, recovery) = open(tmp.path());
    assert_eq!(
        (recovery.log_len, recovery.first_seq, recovery.last_seq),
        (0, None, None)
    );
    let (_, seqs) = commit(&store, vec![Op::Append(rec(8))]);
    assert_eq!(seqs, vec![6]);
    commit(&store, vec![Op::DeleteLog(6)]);
    drop(store);
    let (store, _) = open(tmp.path());
    let (_, seqs) = commit(&store, vec![Op::Append(rec(8)), Op::Append(rec(8))]);
    assert_eq!(seqs, vec![7, 8]);
}

#[test]
fn store_counters_rebuilt_on_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = StoredMessage {
        topic: "a/b".into(),
        payload: rec(50),
        qos: 1,
        retain: false,
        received_at_ms: 1_234_567,
        origin: "c".into(),
        properties: None,
    }
    .encode()
    .unwrap();
    let expected;
    {
        let (store, _) = open(tmp.path());
        let mut ops: Vec<Op> = (1..=100).map(|n| Op::Append(rec(n))).collect();
        ops.insert(0, Op::Append(msg.clone()));
        commit(&store, ops);
        commit(&store, vec![Op::DeleteLogThrough(10), Op::DeleteLog(50)]);
        expected = store.log_stats();
        // 101 appended (msg + 1..=100 bytes), seqs 1..=10 and 50 deleted.
        let bytes: u64 = (10..=100).map(|n: u64| n).sum::<u64>() - 49;
        assert_eq!((expected.len, expected.bytes), (90, bytes));
        assert_eq!(
            (expected.first_seq, expected.last_seq),
            (Some(11), Some(101))
        );
        store.shutdown().unwrap();
    }
    let (store, recovery) = open(tmp.path());
    assert_eq!(
        (
            recovery.log_len,
            recovery.log_bytes,
            recovery.first_seq,
            recovery.last_seq
        ),
        (
            expected.len,
            expected.bytes,
            expected.first_seq,
            expected.last_seq
        )
    );
    assert_eq!(store.log_stats(), expected);
    // oldest_received_at_ms reads the first entry when it is a StoredMessage.
    drop(store);
    let tmp2 = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp2.path());
    commit(&store, vec![Op::Append(msg), Op::Append(rec(3))]);
    assert_eq!(store.log_stats().oldest_received_at_ms, Some(1_234_567));
}

#[test]
fn store_lone_append_is_durable_without_a_timer() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let mut rx = store.durability();
    assert_eq!(rx.borrow_and_update().durable_through, 0);
    let (t, _) = append(&store, &[rec(100)]);
    // Through the async interface the router uses.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let d = rt
        .block_on(async {
            tokio::time::timeout(WAIT, rx.wait_for(|d| d.durable_through >= t)).await
        })
        .expect("lone append became durable")
        .expect("watch open")
        .clone();
    assert_eq!(
        (d.durable_through, d.commits, d.last_batch_ops, d.error),
        (1, 1, 1, None)
    );
}

#[test]
fn store_durable_through_only_covers_applied_commits() {
    // Every published durable_through covers only appends that are already in the store, and
    // commits/durable_through move together.
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let mut rx = store.durability();
    let submitted = Arc::new(Mutex::new(Vec::<(Ticket, Seq)>::new()));
    let writer = {
        let (store, submitted) = (store.clone(), submitted.clone());
        std::thread::spawn(move || {
            for i in 0..300 {
                let mut st = lock(&submitted);
                let (t, seqs) = store.submit(vec![Op::Append(rec(i % 50 + 1))]).unwrap();
                st.push((t, seqs[0]));
            }
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut last = 0;
    while last < 300 {
        rt.block_on(async { tokio::time::timeout(WAIT, rx.changed()).await })
            .expect("progress")
            .unwrap();
        let d = rx.borrow_and_update().clone();
        assert!(d.durable_through >= last && d.error.is_none());
        last = d.durable_through;
        let present: BTreeSet<Seq> = all_seqs(&store).into_iter().collect();
        for (t, s) in lock(&submitted).iter() {
            if *t <= d.durable_through {
                assert!(
                    present.contains(s),
                    "ticket {t} reported durable but seq {s} absent"
                );
            }
        }
    }
    writer.join().unwrap();
    assert_eq!(all_seqs(&store).len(), 300);
}

#[test]
fn store_concurrent_submitters_share_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let max_batch = Arc::new(AtomicU64::new(0));
    let mut rx = store.durability();
    let watcher = {
        let max_batch = max_batch.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            while rt.block_on(rx.changed()).is_ok() {
                let ops = rx.borrow_and_update().last_batch_ops as u64;
                max_batch.fetch_max(ops, Ordering::SeqCst);
            }
        })
    };
    const THREADS: usize = 8;
    const PER_THREAD: usize = 250;
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                // Like a QoS 1 publisher: one message, wait for its ack, next.
                for _ in 0..PER_THREAD {
                    let (t, _) = store.submit(vec![Op::Append(rec(64))]).unwrap();
                    store.wait_durable(t, WAIT).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let d = store.durability().borrow().clone();
    let submits = (THREADS * PER_THREAD) as u64;
    println!(
        "{submits} submits in {} commits, largest batch {} ops",
        d.commits,
        max_batch.load(Ordering::SeqCst)
    );
    assert_eq!(d.durable_through, submits);
    assert!(
        d.commits < submits,
        "{} commits for {submits} submits",
        d.commits
    );
    assert_eq!(store.log_stats().len, submits);
    store.shutdown().unwrap();
    drop(store);
    watcher.join().unwrap();
    assert!(max_batch.load(Ordering::SeqCst) > 1);
}

#[test]
fn store_commit_failure_withholds_acks_and_retries_same_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    commit(&store, vec![Op::Append(rec(10))]);
    store.inner.shared.fail_commits.store(3, Ordering::SeqCst);
    let (t, seqs) = store
        .submit(vec![
            Op::Append(rec(20)),
            Op::DeleteLog(1),
            Op::Put {
                space: Keyspace::Sessions,
                key: b"s".to_vec(),
                value: b"v".to_vec(),
            },
        ])
        .unwrap();
    // The first attempt fails: error published, durable_through stays.
    let deadline = Instant::now() + WAIT;
    loop {
        let d = store.durability().borrow().clone();
        if d.error.is_some() {
            assert!(d.durable_through < t);
            assert!(
                d.error.as_deref().unwrap().contains("injected"),
                "{:?}",
                d.error
            );
            break;
        }
        assert!(Instant::now() < deadline, "no error published");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(
        store.wait_durable(t, Duration::from_millis(50)),
        Err(StoreError::Timeout(_))
    ));
    // Retries (with reopen) then succeed; counters applied exactly once.
    store.wait_durable(t, WAIT).unwrap();
    let d = store.durability().borrow().clone();
    assert_eq!((d.durable_through, d.error), (t, None));
    assert_eq!(all_seqs(&store), seqs);
    let s = store.log_stats();
    assert_eq!((s.len, s.bytes), (1, 20));
    assert_eq!(
        store.get(Keyspace::Sessions, b"s").unwrap(),
        Some(b"v".to_vec())
    );
    drop(store);
    let (_, recovery) = open(tmp.path());
    assert_eq!((recovery.log_len, recovery.log_bytes), (1, 20));
}

#[test]
fn store_shutdown_commits_queued_ops() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(tmp.path());
        for _ in 0..100 {
            store.submit(vec![Op::Append(rec(5))]).unwrap();
        }
        store.shutdown().unwrap();
    }
    let (_, recovery) = open(tmp.path());
    assert_eq!(recovery.log_len, 100);
}

#[test]
fn store_can_reopen_right_after_shutdown_or_drop() {
    // The daemon calls `shutdown()` on one clone while others may still exist; a restart (or
    // a test) opens the directory right after it returns. sled's I/O thread pool can hold the
    // directory lock briefly after the sled::Db is dropped: shutdown waits for that.
    let tmp = tempfile::tempdir().unwrap();
    let mut expected = 0;
    for round in 0..40u64 {
        let (store, recovery) = open(tmp.path());
        assert_eq!(recovery.log_len, expected, "round {round}");
        let clone = store.clone();
        commit(&store, (0..20).map(|_| Op::Append(rec(200))).collect());
        // Deleting a prefix makes sled free (and truncate) segments in the background.
        let through = store.log_stats().last_seq.unwrap() - 10;
        commit(&store, vec![Op::DeleteLogThrough(through)]);
        expected = 10;
        if round % 2 == 0 {
            store.shutdown().unwrap();
            // Opens while the clone is still alive.
            let (reopened, _) = open(tmp.path());
            // The clone outlives the shutdown and sees a closed store.
            assert!(matches!(clone.read_log(0, 1), Err(StoreError::Closed)));
            assert!(matches!(
                clone.submit(vec![Op::Append(rec(1))]),
                Err(StoreError::Closed)
            ));
            assert!(
                matches!(clone.shutdown(), Ok(())),
                "a second shutdown is a no-op"
            );
            drop((store, clone));
            drop(reopened);
        } else {
            drop((store, clone));
        }
    }
}

#[test]
fn store_large_values_survive_reopen() {
    // Leaves of up to 17 values of ~100 KiB make sled write page images to blob files; those
    // are synced by the writer and must read back.
    let tmp = tempfile::tempdir().unwrap();
    let big: Vec<Bytes> = (0..40u8)
        .map(|i| Bytes::from(vec![i; 100 * 1024]))
        .collect();
    {
        let (store, _) = open(tmp.path());
        for chunk in big.chunks(5) {
            let (t, _) = append(&store, chunk);
            store.wait_durable(t, WAIT).unwrap();
        }
        let blobs = std::fs::read_dir(tmp.path().join("store/blobs"))
            .map(|d| d.count())
            .unwrap_or(0);
        println!("blob files after 40 values of 100 KiB: {blobs}");
    }
    let (store, recovery) = open(tmp.path());
    assert_eq!(recovery.log_len, 40);
    let log = store.read_log(0, 100).unwrap();
    assert!(log.iter().zip(&big).all(|((_, a), b)| a == b));
}

// ---- corruption -------------------------------------------------------------------------

fn populated(dir: &Path) {
    let (store, _) = open(dir);
    commit(&store, (0..50).map(|_| Op::Append(rec(100))).collect());
    store.shutdown().unwrap();
}

fn assert_moved_aside(tmp: &Path) {
    let (store, recovery) = open(tmp);
    let aside = recovery.moved_aside.clone().expect("moved aside");
    assert!(aside.exists(), "{aside:?}");
    let name = aside.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("store.corrupt-") && name.ends_with('Z'),
        "{name}"
    );
    assert_eq!(recovery.log_len, 0);
    assert!(store.read_log(0, 10).unwrap().is_empty());
    // And the fresh store works.
    let (_, seqs) = commit(&store, vec![Op::Append(rec(1))]);
    assert_eq!(seqs, vec![1]);
    drop(store);
    let (_, again) = open(tmp);
    assert_eq!((again.moved_aside, again.log_len), (None, 1));
}

#[test]
fn store_corrupt_db_file_is_moved_aside() {
    let tmp = tempfile::tempdir().unwrap();
    populated(tmp.path());
    let db = tmp.path().join("store/db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    let mut x: u32 = 12345;
    let garbage: Vec<u8> = (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    std::fs::write(&db, garbage).unwrap();
    assert_moved_aside(tmp.path());
}

#[test]
fn store_unopenable_dir_is_moved_aside() {
    let tmp = tempfile::tempdir().unwrap();
    populated(tmp.path());
    std::fs::write(tmp.path().join("store/conf"), b"\xff\xfe not a sled config").unwrap();
    assert_moved_aside(tmp.path());
}

#[test]
fn store_foreign_key_found_by_scan_is_moved_aside() {
    let tmp = tempfile::tempdir().unwrap();
    populated(tmp.path());
    {
        let db = sled::open(tmp.path().join("store")).unwrap();
        db.open_tree(TREE_NAME)
            .unwrap()
            .insert(b"Lshort", b"x")
            .unwrap();
        db.flush().unwrap();
    }
    // A dropped sled::Db may keep its lock for a moment (see `release_engine`).
    wait_until_unlocked(&tmp.path().join("store/db"), Instant::now() + WAIT).unwrap();
    assert_moved_aside(tmp.path());
}

#[test]
fn store_utc_stamp_format() {
    assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
    assert_eq!(
        utc_stamp(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
        "20240229T235959Z"
    );
}

// ---- crash (SIGKILL) ----------------------------------------------------------------------

const CRASH_ENV: &str = "WAYSTATION_STORE_CRASH_DIR";
/// Set to 1 for a child that also writes large records.
const CRASH_LARGE_ENV: &str = "WAYSTATION_STORE_CRASH_LARGE";

/// Payload length of record `n`: small, or with `large` every sixth one stored in parts
/// (up to 1.5 MB, so its batch spans several sled segments).
fn crash_len(n: u64, large: bool) -> usize {
    if large && n.is_multiple_of(6) {
        [9_000, 40_000, 200_000, 1_500_000][(n / 6 % 4) as usize]
    } else {
        (n % 64) as usize + 1
    }
}

/// A record whose payload can be checked on its own: (writer, counter) and a pattern.
fn crash_record(writer: u64, n: u64, large: bool) -> Bytes {
    let len = crash_len(n, large);
    let mut payload = Vec::with_capacity(16 + len);
    payload.extend_from_slice(&writer.to_be_bytes());
    payload.extend_from_slice(&n.to_be_bytes());
    payload.extend((0..len).map(|i| (writer as u8).wrapping_add(n as u8).wrapping_add(i as u8)));
    StoredMessage {
        topic: format!("crash/{writer}"),
        payload: Bytes::from(payload),
        qos: 1,
        retain: false,
        received_at_ms: n,
        origin: format!("w{writer}"),
        properties: None,
    }
    .encode()
    .unwrap()
}

fn check_crash_record(seq: Seq, bytes: &Bytes, large: bool) {
    let m = StoredMessage::decode(bytes)
        .unwrap_or_else(|e| panic!("seq {seq}: torn or corrupt record: {e}"));
    let p = &m.payload;
    assert!(p.len() > 16, "seq {seq}: short payload");
    let writer = u64::from_be_bytes(p[..8].try_into().unwrap());
    let n = u64::from_be_bytes(p[8..16].try_into().unwrap());
    assert_eq!(
        crash_record(writer, n, large),
        *bytes,
        "seq {seq}: payload does not match its header"
    );
}

/// The child side of `store_sigkill_loses_no_acked_entry`: does nothing unless re-executed
/// with `WAYSTATION_STORE_CRASH_DIR` set. Appends from 3 threads and prints `A <seq>` once the
/// seq is durable, and `D <seq>` once a delete-through is durable; runs until killed.
/// Before submitting a delete-through it prints `P <through> <n> <k>` (writer 0's records
/// `n..n+k` ride in the same submission): once submitted, the delete may become durable and
/// take effect although the kill comes before its `D` line, so the parent must know about it.
#[test]
fn store_crash_child() {
    let Some(dir) = std::env::var_os(CRASH_ENV) else {
        return;
    };
    let large = std::env::var_os(CRASH_LARGE_ENV).is_some_and(|v| v == "1");
    let (store, _) = Store::open(StoreConfig::new(PathBuf::from(dir))).expect("child open");
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let acked = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..3u64)
        .map(|w| {
            let (store, out, acked) = (store.clone(), out.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                loop {
                    let k = (n % 17 + 1) as usize;
                    let mut ops: Vec<Op> = (0..k)
                        .map(|i| Op::Append(crash_record(w, n + i as u64, large)))
                        .collect();
                    let first_n = n;
                    n += k as u64;
                    // Large records make commits slower: delete more often, closer behind.
                    let lag = if large { 40 } else { 300 };
                    let delete = w == 0
                        && (large || n.is_multiple_of(10))
                        && acked.load(Ordering::SeqCst) > lag;
                    let through = acked.load(Ordering::SeqCst).saturating_sub(lag);
                    if delete {
                        ops.push(Op::DeleteLogThrough(through));
                        let mut o = lock(&out);
                        o.write_all(format!("P {through} {first_n} {k}\n").as_bytes())
                            .unwrap();
                        o.flush().unwrap();
                    }
                    let (t, seqs) = store.submit(ops).expect("submit");
                    store
                        .wait_durable(t, Duration::from_secs(60))
                        .expect("durable");
                    let mut text = String::new();
                    for s in &seqs {
                        text.push_str(&format!("A {s}\n"));
                    }
                    if delete {
                        text.push_str(&format!("D {through}\n"));
                    }
                    acked.fetch_max(*seqs.last().unwrap(), Ordering::SeqCst);
                    let mut o = lock(&out);
                    o.write_all(text.as_bytes()).unwrap();
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

#[test]
fn store_sigkill_loses_no_acked_entry() {
    sigkill_trials(12, false);
}

/// The same with large records among the small ones: their parts are in the same atomic batch
/// as their markers, so after a SIGKILL every acknowledged record is whole, no record is torn
/// (the scan at open would report parts without a marker or a marker without all its parts,
/// and move the store aside) and the log is still contiguous and in order.
#[test]
fn store_sigkill_large_records_stay_whole() {
    sigkill_trials(10, true);
}

fn sigkill_trials(trials: usize, large: bool) {
    if std::env::var_os(CRASH_ENV).is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let exe = std::env::current_exe().unwrap();
    let mut rng = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut max_deleted: Seq = 0;
    let mut max_seq_seen: Seq = 0;
    let (mut total_acked, mut total_present, mut total_large) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    for trial in 0..trials {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let run_ms = 100 + rng % 600;
        let mut child = Command::new(&exe)
            .args([
                "store::tests::store_crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_ENV, &dir)
            .env(CRASH_LARGE_ENV, if large { "1" } else { "" })
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        std::thread::sleep(Duration::from_millis(run_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let text = reader.join().unwrap();

        let mut acked = Vec::new();
        // A delete-through submitted but not acknowledged when the kill came: (through, first
        // record counter of writer 0 in the same submission, number of such records). Only
        // writer 0 deletes and it waits for each ack, so there is at most one.
        let mut pending: Option<(Seq, u64, u64)> = None;
        // Only complete lines count: the kill can cut the last one.
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let mut parts = line.split_whitespace();
            let tag = parts.next();
            let nums: Vec<u64> = parts.filter_map(|s| s.parse::<u64>().ok()).collect();
            match (tag, nums.as_slice()) {
                (Some("A"), [s]) => acked.push(*s),
                (Some("D"), [s]) => {
                    max_deleted = max_deleted.max(*s);
                    assert_eq!(
                        pending.take().map(|p| p.0),
                        Some(*s),
                        "trial {trial}: D {s} without its P line"
                    );
                }
                (Some("P"), [through, n, k]) => {
                    assert!(pending.is_none(), "trial {trial}: two deletes in flight");
                    pending = Some((*through, *n, *k));
                }
                _ => {}
            }
        }
        if let Some(min) = acked.iter().min() {
            assert!(
                *min > max_seq_seen,
                "trial {trial}: seq {min} reused (had seen {max_seq_seen})"
            );
        }

        let (store, recovery) =
            Store::open(StoreConfig::new(dir.clone())).expect("reopen after SIGKILL");
        assert_eq!(
            recovery.moved_aside, None,
            "trial {trial}: store was corrupt after SIGKILL"
        );
        let log = store.read_log_budget(0, usize::MAX, usize::MAX).unwrap();
        let present: BTreeSet<Seq> = log.iter().map(|(s, _)| *s).collect();
        // The unacknowledged delete-through either took effect whole or not at all (the
        // contract: unacknowledged submissions may be lost, never torn). It took effect iff
        // nothing at or below its bound is left beyond what acknowledged deletes removed.
        // In that case the appends of the same submission are durable too (one atomic batch),
        // and the bound becomes the deletion point every check below uses. If it did not take
        // effect, every acknowledged seq above the acknowledged deletes must still be there.
        let acked_deleted = max_deleted;
        let mut pending_applied = false;
        if let Some((through, first_n, k)) = pending {
            if through > max_deleted && present.range(..=through).next().is_none() {
                pending_applied = true;
                max_deleted = through;
                let records: BTreeSet<Bytes> = log.iter().map(|(_, b)| b.clone()).collect();
                for n in first_n..first_n + k {
                    assert!(
                        records.contains(&crash_record(0, n, large)),
                        "trial {trial}: unacked delete-through {through} took effect but record (0, {n}) of the \
                         same submission is missing: torn batch"
                    );
                }
            }
        }
        for (seq, bytes) in &log {
            check_crash_record(*seq, bytes, large);
            assert!(
                *seq > max_deleted,
                "trial {trial}: seq {seq} resurrected after delete-through {max_deleted}"
            );
        }
        for s in &acked {
            if *s > max_deleted {
                assert!(
                    present.contains(s),
                    "trial {trial}: acked seq {s} lost (log {:?}..={:?}, acked deletes through {acked_deleted}, \
                     unacked delete in flight {pending:?})",
                    present.first(),
                    present.last()
                );
            }
        }
        // No gaps: only prefixes are deleted, so the log is one contiguous range.
        if let (Some(first), Some(last)) = (present.first(), present.last()) {
            assert_eq!(
                present.len() as u64,
                last - first + 1,
                "trial {trial}: gap in the log"
            );
        }
        assert_eq!(recovery.log_len, log.len() as u64);
        assert_eq!(
            recovery.log_bytes,
            log.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
        );
        total_large += log
            .iter()
            .filter(|(_, b)| b.len() > MAX_INLINE_VALUE_BYTES)
            .count();
        max_seq_seen = max_seq_seen
            .max(present.last().copied().unwrap_or(0))
            .max(acked.iter().copied().max().unwrap_or(0));
        total_acked += acked.len();
        total_present += log.len();
        println!(
            "crash trial {trial}: killed after {run_ms} ms, {} acked, log {}..={:?} ({} entries), deleted through \
             {max_deleted}{}",
            acked.len(),
            present.first().copied().unwrap_or(0),
            present.last(),
            log.len(),
            match (pending, pending_applied) {
                (Some((t, _, _)), true) => format!(" (by the unacked delete-through {t}, which took effect)"),
                (Some((t, _, _)), false) => format!(" (the unacked delete-through {t} did not take effect)"),
                (None, _) => String::new(),
            }
        );
        store.shutdown().unwrap();
    }
    println!(
        "{trials} SIGKILL trials{} in {:.1} s: {total_acked} acked appends, none lost; {total_present} entries \
         checked ({total_large} of them in parts)",
        if large { " with large records" } else { "" },
        started.elapsed().as_secs_f64()
    );
    assert!(total_acked > 0, "the child never acknowledged anything");
    assert_eq!(
        large,
        total_large > 0,
        "{total_large} large records checked"
    );
}

// ---- disk full ----------------------------------------------------------------------------

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn store_disk_full_stops_acks_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        println!("SKIPPED store_disk_full_stops_acks_and_resumes: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _unmount = Unmount(mnt.clone());
    let (store, _) = open(&mnt);
    commit(&store, (0..100).map(|_| Op::Append(rec(100))).collect());

    // Fill the file system.
    let filler = mnt.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    // Keep submitting until a commit fails (sled may have room left in its current segment).
    let mut last_ticket = 0;
    let mut submitted = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let (t, seqs) = append(&store, &vec![rec(1000); 32]);
        last_ticket = last_ticket.max(t);
        submitted.extend(seqs);
        std::thread::sleep(Duration::from_millis(10));
        if store.durability().borrow().error.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "disk never reported full");
    }
    let d = store.durability().borrow().clone();
    println!(
        "disk full after {} more appends: {:?}",
        submitted.len(),
        d.error
    );
    assert!(d.durable_through < last_ticket);
    // Acks stay stopped while the disk is full.
    std::thread::sleep(Duration::from_millis(1500));
    let later = store.durability().borrow().clone();
    assert!(later.error.is_some());
    assert!(
        later.durable_through < last_ticket,
        "acked {} while the disk was full",
        later.durable_through
    );
    assert!(matches!(
        store.wait_durable(last_ticket, Duration::from_millis(10)),
        Err(StoreError::Timeout(_))
    ));

    // Free space: the same batches commit, acks resume, the error clears.
    std::fs::remove_file(&filler).unwrap();
    store
        .wait_durable(last_ticket, WAIT)
        .expect("acks resume after space is freed");
    let d = store.durability().borrow().clone();
    assert_eq!((d.durable_through, d.error), (last_ticket, None));
    let present: BTreeSet<Seq> = all_seqs(&store).into_iter().collect();
    assert!(submitted.iter().all(|s| present.contains(s)));
    store.shutdown().unwrap();
    drop(store);
    let (store, recovery) = open(&mnt);
    assert_eq!(recovery.log_len, 100 + submitted.len() as u64);
    drop(store);
}

// ---- chunks -----------------------------------------------------------------------------

/// Log keys in sled (one per chunk), read after the store is shut down.
fn log_keys_on_disk(dir: &Path) -> Vec<(Seq, usize)> {
    wait_until_unlocked(&dir.join("store/db"), Instant::now() + WAIT).unwrap();
    let db = sled::open(dir.join("store")).unwrap();
    let keys = db
        .open_tree(TREE_NAME)
        .unwrap()
        .range(log_key(0)..=log_key(Seq::MAX))
        .map(|r| {
            let (k, v) = r.unwrap();
            (parse_log_key(&k).unwrap(), v.len())
        })
        .collect();
    drop(db);
    wait_until_unlocked(&dir.join("store/db"), Instant::now() + WAIT).unwrap();
    keys
}

/// Memory follows the number of sled keys, so the log must pack entries: a burst and a trickle
/// of lone commits (the low-rate case, where each group commit holds one message) both end up
/// in few keys, none over the chunk target.
#[test]
fn store_log_packs_entries_into_few_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    commit(&store, (0..2_000).map(|_| Op::Append(rec(100))).collect());
    for _ in 0..300 {
        commit(&store, vec![Op::Append(rec(100))]);
    }
    assert_eq!(store.log_stats().len, 2_300);
    store.shutdown().unwrap();
    let keys = log_keys_on_disk(tmp.path());
    // 2,300 x 102 B in chunks of at most 2 KiB (20 entries): 115 keys when full.
    assert!(keys.len() <= 120, "{} keys", keys.len());
    assert!(keys
        .iter()
        .all(|&(_, len)| len <= chunk::CHUNK_TARGET_BYTES));
    // A record larger than the target (but inline) still goes in whole, in a chunk of its
    // own; a large one leaves only a small marker in its chunk.
    let (store, _) = open(tmp.path());
    let (_, big) = commit(
        &store,
        vec![
            Op::Append(rec(5_000)),
            Op::Append(rec(20_000)),
            Op::Append(rec(10)),
        ],
    );
    let read = store.read_log(big[0], 3).unwrap();
    assert_eq!(
        read.iter().map(|(_, r)| r.len()).collect::<Vec<_>>(),
        vec![5_000, 20_000, 10]
    );
    store.shutdown().unwrap();
    let keys = log_keys_on_disk(tmp.path());
    assert!(keys.iter().any(|&(k, len)| k == big[0] && len > 5_000));
    assert!(keys.iter().any(|&(k, len)| k == big[1] && len < 16));
    assert!(keys
        .iter()
        .all(|&(_, len)| len <= MAX_INLINE_VALUE_BYTES + 16));
}

/// Deleting into the middle of a chunk keeps the rest readable under the new first seq, and
/// reads that start inside a chunk return exactly the entries from there.
#[test]
fn store_partial_chunk_deletes_and_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let records: Vec<Bytes> = (0..200u32)
        .map(|i| Bytes::from(i.to_be_bytes().repeat(10)))
        .collect();
    let (_, seqs) = commit(&store, records.iter().cloned().map(Op::Append).collect());
    let read = store.read_log(seqs[57], 3).unwrap();
    assert_eq!(
        read,
        vec![
            (seqs[57], records[57].clone()),
            (seqs[58], records[58].clone()),
            (seqs[59], records[59].clone())
        ]
    );
    commit(
        &store,
        vec![Op::DeleteLogThrough(seqs[29]), Op::DeleteLog(seqs[100])],
    );
    let stats = store.log_stats();
    assert_eq!(
        (stats.len, stats.first_seq, stats.last_seq),
        (169, Some(seqs[30]), Some(seqs[199]))
    );
    assert_eq!(stats.bytes, 169 * 40);
    let expect: Vec<(Seq, Bytes)> = (30..200)
        .filter(|&i| i != 100)
        .map(|i| (seqs[i], records[i].clone()))
        .collect();
    assert_eq!(store.read_log(0, usize::MAX).unwrap(), expect);
    assert_eq!(
        store.read_log(seqs[100], 1).unwrap(),
        vec![expect[70].clone()]
    );
    store.shutdown().unwrap();
    let (store, recovery) = open(tmp.path());
    assert_eq!((recovery.log_len, recovery.log_bytes), (169, 169 * 40));
    assert_eq!(store.read_log(0, usize::MAX).unwrap(), expect);
}

/// A store written before chunks (one raw record per key, no `_chunked_from`) opens with its
/// entries intact; new entries go into chunks after them; both delete and survive reopening.
#[test]
fn store_opens_a_store_written_before_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    {
        let db = sled::open(&dir).unwrap();
        let tree = db.open_tree(TREE_NAME).unwrap();
        tree.insert(KEY_MARKER, MARKER_VALUE).unwrap();
        for seq in 3..=12u64 {
            tree.insert(&log_key(seq)[..], rec(seq as usize).to_vec())
                .unwrap();
        }
        tree.insert(KEY_NEXT_SEQ, &13u64.to_be_bytes()[..]).unwrap();
        db.flush().unwrap();
    }
    wait_until_unlocked(&dir.join("db"), Instant::now() + WAIT).unwrap();
    let (store, recovery) = open(tmp.path());
    assert_eq!(recovery.moved_aside, None);
    assert_eq!(
        (recovery.log_len, recovery.first_seq, recovery.last_seq),
        (10, Some(3), Some(12))
    );
    assert_eq!(recovery.log_bytes, (3..=12).sum::<u64>());
    let (_, seqs) = commit(&store, (0..5).map(|_| Op::Append(rec(1))).collect());
    assert_eq!(seqs, vec![13, 14, 15, 16, 17]);
    commit(&store, vec![Op::DeleteLogThrough(7)]);
    commit(&store, vec![Op::Append(rec(2))]);
    let log = store.read_log(0, usize::MAX).unwrap();
    let got: Vec<(Seq, usize)> = log.iter().map(|(s, v)| (*s, v.len())).collect();
    let mut want: Vec<(Seq, usize)> = (8..=12).map(|s| (s, s as usize)).collect();
    want.extend((13..=17).map(|s| (s, 1)));
    want.push((18, 2));
    assert_eq!(got, want);
    store.shutdown().unwrap();
    let keys = log_keys_on_disk(tmp.path());
    // Five legacy keys, then one chunk holding 13..=18.
    assert_eq!(
        keys.iter().map(|k| k.0).collect::<Vec<_>>(),
        vec![8, 9, 10, 11, 12, 13]
    );
    let (store, recovery) = open(tmp.path());
    assert_eq!((recovery.log_len, recovery.last_seq), (11, Some(18)));
    assert_eq!(
        store
            .read_log(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|(s, v)| (*s, v.len()))
            .collect::<Vec<_>>(),
        want
    );
}

/// A chunk whose bytes do not decode is corruption: the store is moved aside, never misread.
#[test]
fn store_undecodable_chunk_is_moved_aside() {
    let tmp = tempfile::tempdir().unwrap();
    populated(tmp.path());
    let keys = log_keys_on_disk(tmp.path());
    {
        let db = sled::open(tmp.path().join("store")).unwrap();
        db.open_tree(TREE_NAME)
            .unwrap()
            .insert(&log_key(keys[0].0)[..], &[chunk::CHUNK_V1, 0, 50, 1][..])
            .unwrap();
        db.flush().unwrap();
    }
    wait_until_unlocked(&tmp.path().join("store/db"), Instant::now() + WAIT).unwrap();
    assert_moved_aside(tmp.path());
}

mod model {
    //! The log against a model (a BTreeMap) under random appends, deletions and reopens.
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Step {
        /// One submission appending records of these sizes.
        Append(Vec<usize>),
        /// Several submissions queued before waiting (one group commit, usually).
        Burst(Vec<Vec<usize>>),
        /// Delete through the entry at this fraction of the live log (0..=100 %).
        DeleteThrough(u8),
        /// Delete the entry at this fraction of the live log.
        DeleteOne(u8),
        /// Read from the entry at this fraction, at most this many.
        Read(u8, usize),
        Reopen,
    }

    fn step() -> impl Strategy<Value = Step> {
        let sizes = || proptest::collection::vec(0usize..3_000, 1..40);
        prop_oneof![
            4 => sizes().prop_map(Step::Append),
            2 => proptest::collection::vec(sizes(), 1..4).prop_map(Step::Burst),
            2 => (0u8..=100).prop_map(Step::DeleteThrough),
            1 => (0u8..=100).prop_map(Step::DeleteOne),
            2 => ((0u8..=100), 1usize..300).prop_map(|(f, n)| Step::Read(f, n)),
            1 => Just(Step::Reopen),
        ]
    }

    fn pick(model: &BTreeMap<Seq, Bytes>, frac: u8) -> Option<Seq> {
        let n = model.len();
        (n > 0).then(|| *model.keys().nth((n - 1) * frac as usize / 100).unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn store_log_matches_model(steps in proptest::collection::vec(step(), 1..30)) {
            let tmp = tempfile::tempdir().unwrap();
            let (mut store, _) = open(tmp.path());
            let mut model: BTreeMap<Seq, Bytes> = BTreeMap::new();
            let mut counter = 0u32;
            let mut records = |sizes: &[usize]| -> Vec<Bytes> {
                sizes.iter().map(|&n| {
                    counter += 1;
                    let mut v = counter.to_be_bytes().to_vec();
                    v.resize(n.max(4), b'a' + (counter % 26) as u8);
                    Bytes::from(v)
                }).collect()
            };
            for step in steps {
                match step {
                    Step::Append(sizes) => {
                        let recs = records(&sizes);
                        let (_, seqs) = commit(&store, recs.iter().cloned().map(Op::Append).collect());
                        model.extend(seqs.into_iter().zip(recs));
                    }
                    Step::Burst(subs) => {
                        let mut last = 0;
                        for sizes in subs {
                            let recs = records(&sizes);
                            let (t, seqs) = store.submit(recs.iter().cloned().map(Op::Append).collect()).unwrap();
                            model.extend(seqs.into_iter().zip(recs));
                            last = t;
                        }
                        store.wait_durable(last, WAIT).unwrap();
                    }
                    Step::DeleteThrough(f) => {
                        if let Some(s) = pick(&model, f) {
                            commit(&store, vec![Op::DeleteLogThrough(s)]);
                            model.retain(|k, _| *k > s);
                        }
                    }
                    Step::DeleteOne(f) => {
                        if let Some(s) = pick(&model, f) {
                            commit(&store, vec![Op::DeleteLog(s)]);
                            model.remove(&s);
                        }
                    }
                    Step::Read(f, n) => {
                        if let Some(s) = pick(&model, f) {
                            let want: Vec<(Seq, Bytes)> = model.range(s..).take(n).map(|(k, v)| (*k, v.clone())).collect();
                            prop_assert_eq!(store.read_log(s, n).unwrap(), want);
                        }
                    }
                    Step::Reopen => {
                        store.shutdown().unwrap();
                        drop(store);
                        let (s, recovery) = open(tmp.path());
                        store = s;
                        prop_assert_eq!(recovery.log_len, model.len() as u64);
                    }
                }
                let stats = store.log_stats();
                prop_assert_eq!(stats.len, model.len() as u64);
                prop_assert_eq!(stats.bytes, model.values().map(|v| v.len() as u64).sum::<u64>());
                prop_assert_eq!(stats.first_seq, model.keys().next().copied());
                prop_assert_eq!(stats.last_seq, model.keys().next_back().copied());
            }
            let all: Vec<(Seq, Bytes)> = model.into_iter().collect();
            prop_assert_eq!(store.read_log(0, usize::MAX).unwrap(), all);
        }
    }
}

/// Reads racing commits that re-key chunks (deletions into them) and grow the last chunk never
/// return an entry twice, out of order, or one that was never deleted missing.
#[test]
fn store_reads_racing_partial_deletes_stay_ordered() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let (_, seqs) = commit(&store, (0..20_000).map(|_| Op::Append(rec(50))).collect());
    let last = *seqs.last().unwrap();
    let deleted_through = std::sync::Arc::new(AtomicU64::new(0));
    let reader = {
        let store = store.clone();
        let deleted_through = deleted_through.clone();
        std::thread::spawn(move || {
            let mut reads = 0;
            while deleted_through.load(Ordering::SeqCst) < last - 1_000 {
                let from = deleted_through.load(Ordering::SeqCst) + 1;
                let got = store.read_log(from, 600).unwrap();
                assert!(
                    got.windows(2).all(|w| w[0].0 < w[1].0),
                    "out of order or twice"
                );
                assert!(got.iter().all(|(s, _)| *s >= from));
                // Entries above the announced watermark are never deleted, so the first one
                // returned is at most the watermark (read after the read) + 1.
                let now = deleted_through.load(Ordering::SeqCst);
                assert!(
                    got[0].0 <= now.max(from) + 1,
                    "skipped entries: from {from}, got {}",
                    got[0].0
                );
                reads += 1;
            }
            reads
        })
    };
    // Delete in steps that land inside chunks (20 entries of 50 B per 2 KiB chunk, roughly),
    // appending meanwhile so the last chunk is rewritten too.
    let mut through = 0;
    while through < last - 1_000 {
        through += 7;
        // Announced before the commit: nothing above the announced value is ever deleted.
        deleted_through.store(through, Ordering::SeqCst);
        commit(
            &store,
            vec![Op::DeleteLogThrough(through), Op::Append(rec(50))],
        );
    }
    let reads = reader.join().unwrap();
    assert!(reads > 10, "{reads} reads");
}

// ---- large values ------------------------------------------------------------------------

/// A record of `n` bytes whose content depends on `tag` and on the position (so a part in the
/// wrong place, or of another record, shows).
fn big(n: usize, tag: u8) -> Bytes {
    Bytes::from(
        (0..n)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ tag)
            .collect::<Vec<u8>>(),
    )
}

/// Part keys in the open store's tree.
fn part_keys(store: &Store) -> usize {
    let engine = store.inner.shared.engine().unwrap();
    engine.tree.scan_prefix([parts::PREFIX_PART]).count()
}

fn lens(log: &[(Seq, Bytes)]) -> Vec<usize> {
    log.iter().map(|(_, b)| b.len()).collect()
}

const MIB16: usize = 16 * 1024 * 1024;

#[test]
fn store_large_log_records_round_trip_and_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let records = [
        rec(100),
        big(500_000, 1),
        rec(3),
        big(MIB16, 2),
        big(MAX_INLINE_VALUE_BYTES, 3),
        big(MAX_INLINE_VALUE_BYTES + 1, 4),
        rec(7),
    ];
    let (_, seqs) = commit(&store, records.iter().cloned().map(Op::Append).collect());
    let total: u64 = records.iter().map(|r| r.len() as u64).sum();
    let stats = store.log_stats();
    assert_eq!((stats.len, stats.bytes), (7, total));
    let all = store.read_log_budget(0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(
        all,
        seqs.iter()
            .copied()
            .zip(records.iter().cloned())
            .collect::<Vec<_>>()
    );
    // Parts: 500,000 B and 16 MiB and 7 KiB + 1 in 7 KiB parts.
    let expected_parts =
        500_000usize.div_ceil(MAX_INLINE_VALUE_BYTES) + MIB16.div_ceil(MAX_INLINE_VALUE_BYTES) + 2;
    assert_eq!(part_keys(&store), expected_parts);
    // Reads that start at a large record, or inside the log.
    assert_eq!(
        store.read_log(seqs[3], 1).unwrap(),
        vec![(seqs[3], records[3].clone())]
    );
    assert_eq!(
        lens(&store.read_log_budget(seqs[2], 3, usize::MAX).unwrap()),
        vec![3, MIB16, MAX_INLINE_VALUE_BYTES]
    );
    // read_log's default budget stops before the 16 MiB record, then returns it alone.
    assert_eq!(lens(&store.read_log(seqs[2], 3).unwrap()), vec![3]);
    assert_eq!(lens(&store.read_log(seqs[3], 3).unwrap()), vec![MIB16]);

    // Survives a reopen (the scan at open checks every part).
    store.shutdown().unwrap();
    drop(store);
    let (store, recovery) = open(tmp.path());
    assert_eq!(
        (recovery.moved_aside, recovery.log_len, recovery.log_bytes),
        (None, 7, total)
    );
    assert_eq!(
        store.read_log_budget(0, usize::MAX, usize::MAX).unwrap(),
        seqs.iter()
            .copied()
            .zip(records.iter().cloned())
            .collect::<Vec<_>>()
    );

    // DeleteLog of one large record, then DeleteLogThrough past another: their parts go.
    commit(&store, vec![Op::DeleteLog(seqs[1])]);
    assert_eq!(
        part_keys(&store),
        expected_parts - 500_000usize.div_ceil(MAX_INLINE_VALUE_BYTES)
    );
    commit(&store, vec![Op::DeleteLogThrough(seqs[3])]);
    assert_eq!(part_keys(&store), 2);
    assert_eq!(
        lens(&store.read_log(0, usize::MAX).unwrap()),
        vec![MAX_INLINE_VALUE_BYTES, MAX_INLINE_VALUE_BYTES + 1, 7]
    );
    let stats = store.log_stats();
    assert_eq!(
        (stats.len, stats.bytes),
        (3, MAX_INLINE_VALUE_BYTES as u64 * 2 + 8)
    );
    // Appended and deleted in the same group commit: nothing of it remains.
    let (_, s2) = commit(
        &store,
        vec![
            Op::Append(big(100_000, 5)),
            Op::Append(rec(1)),
            Op::DeleteLogThrough(seqs[6] + 1),
        ],
    );
    assert_eq!(part_keys(&store), 0);
    assert_eq!(all_seqs(&store), vec![s2[1]]);
    assert_eq!(store.log_stats().bytes, 1);
    store.shutdown().unwrap();
    drop(store);
    let (_, recovery) = open(tmp.path());
    assert_eq!(
        (recovery.moved_aside, recovery.log_len, recovery.log_bytes),
        (None, 1, 1)
    );
}

#[test]
fn store_large_records_pack_with_small_ones_in_order() {
    // Small records before and after a large one keep joining chunks; the large one's marker
    // sits in a chunk of its own, and everything reads back in seq order across commits.
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let mut want = Vec::new();
    for round in 0..20u8 {
        let recs = vec![rec(50), big(8_000 + round as usize * 3_000, round), rec(60)];
        let (_, seqs) = commit(&store, recs.iter().cloned().map(Op::Append).collect());
        want.extend(seqs.into_iter().zip(recs));
        let (_, seqs) = commit(&store, vec![Op::Append(rec(70))]);
        want.push((seqs[0], rec(70)));
    }
    assert_eq!(store.read_log(0, usize::MAX).unwrap(), want);
    // From inside, in small budgets.
    let mut from = 0;
    let mut got = Vec::new();
    loop {
        let page = store.read_log_budget(from, 5, 10_000).unwrap();
        let Some(last) = page.last() else { break };
        from = last.0 + 1;
        got.extend(page);
    }
    assert_eq!(got, want);
    let stats = store.log_stats();
    assert_eq!(
        stats.bytes,
        want.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
    );
}

#[test]
fn store_read_log_budget_bounds_bytes_but_always_progresses() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let sizes = [300_000usize, 300_000, 10, 1_000_000, 20, 20];
    let (_, seqs) = commit(
        &store,
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Op::Append(big(n, i as u8)))
            .collect(),
    );
    // A budget smaller than the first record still returns it, alone.
    assert_eq!(
        lens(&store.read_log_budget(0, 100, 1).unwrap()),
        vec![300_000]
    );
    // Stops before the record that would exceed the budget.
    assert_eq!(
        lens(&store.read_log_budget(0, 100, 650_000).unwrap()),
        vec![300_000, 300_000, 10]
    );
    assert_eq!(
        lens(&store.read_log_budget(seqs[2], 100, 100).unwrap()),
        vec![10]
    );
    assert_eq!(
        lens(&store.read_log_budget(seqs[3], 100, 2_000_000).unwrap()),
        vec![1_000_000, 20, 20]
    );
    // Entry count still bounds.
    assert_eq!(
        lens(&store.read_log_budget(0, 2, usize::MAX).unwrap()),
        vec![300_000, 300_000]
    );
    assert!(store.read_log_budget(0, 0, usize::MAX).unwrap().is_empty());
    assert!(store
        .read_log_budget(seqs[5] + 1, 10, 10)
        .unwrap()
        .is_empty());
    // read_log has a default budget.
    let (_, more) = commit(&store, (0..3).map(|i| Op::Append(big(MIB16, i))).collect());
    assert_eq!(
        lens(&store.read_log(seqs[5], usize::MAX).unwrap()),
        vec![20]
    );
    assert_eq!(
        lens(&store.read_log(more[1], usize::MAX).unwrap()),
        vec![MIB16]
    );
}

#[test]
fn store_large_keyspace_values_round_trip_overwrite_and_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let put = |key: &[u8], value: Bytes| Op::Put {
        space: Keyspace::Retained,
        key: key.to_vec(),
        value: value.to_vec(),
    };
    let get = |store: &Store, key: &[u8]| store.get(Keyspace::Retained, key).unwrap();
    commit(
        &store,
        vec![
            put(b"a", big(500_000, 1)),
            put(b"b", rec(10)),
            put(b"c", big(MIB16, 2)),
            // Values that start with the tag byte are escaped, small and large.
            put(
                b"d",
                Bytes::from_static(b"\xff\x01 looks like a descriptor"),
            ),
            put(b"e", Bytes::from(vec![0xff; 9_000])),
        ],
    );
    assert_eq!(get(&store, b"a").unwrap(), big(500_000, 1));
    assert_eq!(get(&store, b"c").unwrap(), big(MIB16, 2));
    assert_eq!(
        get(&store, b"d").unwrap(),
        b"\xff\x01 looks like a descriptor"
    );
    assert_eq!(get(&store, b"e").unwrap(), vec![0xff; 9_000]);
    assert_eq!(get(&store, b"zz"), None);
    let scanned = store.scan(Keyspace::Retained, b"").unwrap();
    assert_eq!(
        scanned
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect::<Vec<_>>(),
        vec![
            (b"a".to_vec(), 500_000),
            (b"b".to_vec(), 10),
            (b"c".to_vec(), MIB16),
            (b"d".to_vec(), 26),
            (b"e".to_vec(), 9_000)
        ]
    );
    assert_eq!(scanned[2].1, big(MIB16, 2));
    // Another keyspace with the same key does not see them.
    assert_eq!(store.get(Keyspace::Meta, b"a").unwrap(), None);
    let parts_now = part_keys(&store);
    assert_eq!(
        parts_now,
        500_000usize.div_ceil(MAX_INLINE_VALUE_BYTES) + MIB16.div_ceil(MAX_INLINE_VALUE_BYTES) + 2
    );
    // Large -> small, small -> large, large -> large, large -> removed, twice in one group.
    commit(
        &store,
        vec![
            put(b"a", rec(5)),
            put(b"b", big(100_000, 3)),
            put(b"c", big(20_000, 4)),
            put(b"c", big(30_000, 5)),
            Op::Remove {
                space: Keyspace::Retained,
                key: b"e".to_vec(),
            },
        ],
    );
    assert_eq!(get(&store, b"a").unwrap(), rec(5));
    assert_eq!(get(&store, b"b").unwrap(), big(100_000, 3));
    assert_eq!(get(&store, b"c").unwrap(), big(30_000, 5));
    assert_eq!(get(&store, b"e"), None);
    assert_eq!(
        part_keys(&store),
        100_000usize.div_ceil(MAX_INLINE_VALUE_BYTES)
            + 30_000usize.div_ceil(MAX_INLINE_VALUE_BYTES)
    );
    // Reopen: values, and the writer's knowledge of which keys are large, survive.
    store.shutdown().unwrap();
    drop(store);
    let (store, recovery) = open(tmp.path());
    assert_eq!(recovery.moved_aside, None);
    assert_eq!(get(&store, b"b").unwrap(), big(100_000, 3));
    assert_eq!(
        get(&store, b"d").unwrap(),
        b"\xff\x01 looks like a descriptor"
    );
    commit(
        &store,
        vec![
            put(b"b", rec(1)),
            Op::Remove {
                space: Keyspace::Retained,
                key: b"c".to_vec(),
            },
            put(b"f", big(50_000, 6)),
            Op::Remove {
                space: Keyspace::Retained,
                key: b"f".to_vec(),
            },
        ],
    );
    assert_eq!(part_keys(&store), 0);
    assert_eq!(get(&store, b"c"), None);
    assert_eq!(get(&store, b"f"), None);
    assert_eq!(store.scan(Keyspace::Retained, b"").unwrap().len(), 3);
    store.shutdown().unwrap();
    drop(store);
    let (_, recovery) = open(tmp.path());
    assert_eq!(recovery.moved_aside, None);
}

/// Writes to the tree of a closed store directly, as damage would.
fn tamper(dir: &Path, f: impl FnOnce(&sled::Tree)) {
    wait_until_unlocked(&dir.join("store/db"), Instant::now() + WAIT).unwrap();
    {
        let db = sled::open(dir.join("store")).unwrap();
        f(&db.open_tree(TREE_NAME).unwrap());
        db.flush().unwrap();
    }
    wait_until_unlocked(&dir.join("store/db"), Instant::now() + WAIT).unwrap();
}

fn with_large_values(dir: &Path) -> Seq {
    let (store, _) = open(dir);
    let (_, seqs) = commit(
        &store,
        vec![Op::Append(rec(10)), Op::Append(big(50_000, 1))],
    );
    commit(
        &store,
        vec![Op::Put {
            space: Keyspace::Sessions,
            key: b"k".to_vec(),
            value: big(30_000, 2).to_vec(),
        }],
    );
    store.shutdown().unwrap();
    seqs[1]
}

#[test]
fn store_orphan_part_is_moved_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let seq = with_large_values(tmp.path());
    tamper(tmp.path(), |t| {
        t.insert(parts::part_key(&log_key(seq + 5), 0, 0), &b"x"[..])
            .unwrap();
    });
    assert_moved_aside(tmp.path());
}

#[test]
fn store_missing_or_bad_parts_are_moved_aside() {
    // A log record missing one of its parts (50,000 B: parts 0..=6).
    let tmp = tempfile::tempdir().unwrap();
    let seq = with_large_values(tmp.path());
    tamper(tmp.path(), |t| {
        assert!(t
            .remove(parts::part_key(&log_key(seq), 0, 3))
            .unwrap()
            .is_some());
    });
    assert_moved_aside(tmp.path());
    // A keyspace value with a part too short.
    let tmp = tempfile::tempdir().unwrap();
    with_large_values(tmp.path());
    tamper(tmp.path(), |t| {
        let owner = Keyspace::Sessions.key(b"k");
        let gen = match parts::decode_value(&t.get(&owner).unwrap().unwrap()).unwrap() {
            parts::Stored::Large(l) => l.gen,
            other => panic!("{other:?}"),
        };
        t.insert(parts::part_key(&owner, gen, 1), &b"short"[..])
            .unwrap();
    });
    assert_moved_aside(tmp.path());
    // A keyspace value with a tag that is neither escape nor descriptor.
    let tmp = tempfile::tempdir().unwrap();
    with_large_values(tmp.path());
    tamper(tmp.path(), |t| {
        t.insert(Keyspace::Meta.key(b"x"), &b"\xff\x07"[..])
            .unwrap();
    });
    assert_moved_aside(tmp.path());
}

#[test]
fn store_damaged_parts_read_as_corrupt_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let seq = with_large_values(tmp.path());
    let (store, _) = open(tmp.path());
    {
        let engine = store.inner.shared.engine().unwrap();
        engine
            .tree
            .remove(parts::part_key(&log_key(seq), 0, 2))
            .unwrap();
        let owner = Keyspace::Sessions.key(b"k");
        let gen = match parts::decode_value(&engine.tree.get(&owner).unwrap().unwrap()).unwrap() {
            parts::Stored::Large(l) => l.gen,
            other => panic!("{other:?}"),
        };
        engine
            .tree
            .insert(parts::part_key(&owner, gen, 4), vec![0u8; 100_000])
            .unwrap();
    }
    let err = store.read_log(0, 10).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert!(
        err.to_string().contains(&format!("log record {seq}")),
        "{err}"
    );
    // The entry before it still reads.
    assert_eq!(lens(&store.read_log(0, 1).unwrap()), vec![10]);
    let err = store.get(Keyspace::Sessions, b"k").unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert!(store.scan(Keyspace::Sessions, b"").is_err());
    // Deleting the damaged record and key still works and removes what is left of them.
    commit(
        &store,
        vec![
            Op::DeleteLog(seq),
            Op::Remove {
                space: Keyspace::Sessions,
                key: b"k".to_vec(),
            },
        ],
    );
    assert_eq!(part_keys(&store), 0);
    assert_eq!(lens(&store.read_log(0, 10).unwrap()), vec![10]);
}

/// Readers racing commits that delete large records and replace large values never see a torn
/// value or a spurious corruption: a value read is whole (old or new), a deleted one is absent.
#[test]
fn store_reads_racing_large_deletes_and_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    for (_, r) in store.read_log(0, 50).unwrap() {
                        let tag = r[0] ^ big(1, 0)[0];
                        assert_eq!(r, big(r.len(), tag), "torn log record");
                    }
                    if let Some(v) = store.get(Keyspace::Retained, b"t").unwrap() {
                        let tag = v[0] ^ big(1, 0)[0];
                        assert_eq!(v, big(v.len(), tag).to_vec(), "torn value");
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for i in 0..60u8 {
        let (_, seqs) = commit(
            &store,
            vec![
                Op::Append(big(20_000 + i as usize * 500, i)),
                Op::Put {
                    space: Keyspace::Retained,
                    key: b"t".to_vec(),
                    value: big(if i % 3 == 0 { 100 } else { 40_000 + i as usize }, i).to_vec(),
                },
            ],
        );
        if i % 2 == 1 {
            commit(&store, vec![Op::DeleteLogThrough(seqs[0] - 1)]);
        }
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
}

// ---- pending bytes and a dead writer -------------------------------------------------------

#[test]
fn store_pending_bytes_count_until_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    assert_eq!(store.pending_bytes(), 0);
    // Hold the commit back (its first attempt fails) to see the bytes pending.
    store.inner.shared.fail_commits.store(1, Ordering::SeqCst);
    let (t, _) = store
        .submit(vec![
            Op::Append(rec(1_000)),
            Op::Put {
                space: Keyspace::Meta,
                key: b"key".to_vec(),
                value: vec![1; 200],
            },
            Op::Remove {
                space: Keyspace::Meta,
                key: b"other".to_vec(),
            },
            Op::DeleteLog(99),
        ])
        .unwrap();
    assert_eq!(store.pending_bytes(), 1_000 + 3 + 200 + 5);
    store.wait_durable(t, WAIT).unwrap();
    assert_eq!(store.pending_bytes(), 0);

    // Whoever wakes on a durability update already sees the bytes of that commit gone.
    let mut rx = store.durability();
    let submitter = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut last = 0;
            for i in 0..40 {
                let (t, _) = store.submit(vec![Op::Append(big(200_000, i))]).unwrap();
                last = t;
            }
            last
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let last = submitter.join().unwrap();
    loop {
        let d = rt
            .block_on(async { tokio::time::timeout(WAIT, rx.changed()).await })
            .expect("progress");
        d.unwrap();
        let through = rx.borrow_and_update().durable_through;
        let pending = store.pending_bytes();
        // Everything after `through` is at most 200,000 B per ticket.
        assert!(
            pending <= (last - through.min(last)) * 200_000,
            "{pending} bytes pending with {through} of {last} durable"
        );
        if through >= last {
            assert_eq!(pending, 0);
            break;
        }
    }
}

#[test]
fn store_writer_panic_is_fatal_and_never_silent() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    commit(&store, vec![Op::Append(rec(10))]);
    let mut rx = store.durability();
    assert_eq!(rx.borrow_and_update().fatal, None);
    store
        .inner
        .shared
        .panic_writer
        .store(true, Ordering::SeqCst);
    let (t, _) = store.submit(vec![Op::Append(rec(20))]).unwrap();
    let err = store.wait_durable(t, WAIT).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("panicked"), "{err}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let d = rt
        .block_on(async { tokio::time::timeout(WAIT, rx.wait_for(|d| d.fatal.is_some())).await })
        .expect("fatal published")
        .unwrap()
        .clone();
    assert!(
        d.fatal
            .as_deref()
            .unwrap()
            .contains("injected store writer panic"),
        "{d:?}"
    );
    assert!(d.error.is_some());
    assert!(d.durable_through < t);
    // Nothing is queued into the dead writer, and nothing stays counted as pending.
    let err = store.submit(vec![Op::Append(rec(1))]).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert_eq!(store.pending_bytes(), 0);
    assert!(store.shutdown().is_err());
    drop(store);
    // What was acknowledged is there after a restart.
    let (store, recovery) = open(tmp.path());
    assert_eq!((recovery.moved_aside, recovery.log_len), (None, 1));
    commit(&store, vec![Op::Append(rec(1))]);
}

/// Throughput of a stream of appends of 1 MiB records (one per submission, up to 8 waiting at
/// a time, as from a few publishers), then of reading them back and deleting them 8 per commit,
/// with the process's RSS after each. A report, not a test (it asserts no time):
/// `cargo test -p waystation-broker --release --lib store_large_append_report -- --ignored
/// --nocapture`; `WS_REC_KIB`, `WS_N`, `WS_BATCH_MB` and `WS_CACHE_MB` change the record size,
/// their number, `max_batch_bytes` and the cache.
#[test]
#[ignore = "a measurement report (prints MiB/s and RSS, asserts no time): run with --ignored --nocapture"]
fn store_large_append_report() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = StoreConfig::new(tmp.path().join("store"));
    if let Some(mb) = env("WS_CACHE_MB") {
        cfg.cache_capacity_bytes = (mb << 20) as u64;
    }
    if let Some(mb) = env("WS_BATCH_MB") {
        cfg.max_batch_bytes = mb << 20;
    }
    let kib = env("WS_REC_KIB").unwrap_or(1024);
    let n = env("WS_N").unwrap_or(256);
    println!("start: {}", rss());
    let (store, _) = Store::open(cfg).unwrap();
    let record = big(kib << 10, 9);
    let mib = |records: usize| (records * kib) as f64 / 1024.0;
    let started = Instant::now();
    let mut waiting = std::collections::VecDeque::new();
    for _ in 0..n {
        let (t, _) = store.submit(vec![Op::Append(record.clone())]).unwrap();
        waiting.push_back(t);
        if waiting.len() >= 8 {
            store
                .wait_durable(waiting.pop_front().unwrap(), WAIT)
                .unwrap();
        }
    }
    store.wait_durable(n as Ticket, WAIT).unwrap();
    let secs = started.elapsed().as_secs_f64();
    let commits = store.durability().borrow().commits;
    let blobs = std::fs::read_dir(tmp.path().join("store/blobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    println!(
        "{n} x {kib} KiB appends: {:.1} MiB/s, {:.1} ms per record, {commits} commits, {blobs} blob files, {}",
        mib(n) / secs,
        secs * 1000.0 / n as f64,
        rss()
    );
    let started = Instant::now();
    let (mut from, mut read) = (0, 0);
    loop {
        let page = store.read_log_budget(from, 64, 8 << 20).unwrap();
        let Some(last) = page.last() else { break };
        from = last.0 + 1;
        read += page.len();
    }
    println!(
        "read back {read} in {:.1} MiB/s, {}",
        mib(read) / started.elapsed().as_secs_f64(),
        rss()
    );
    let started = Instant::now();
    for through in (8..=n as Seq).step_by(8) {
        commit(&store, vec![Op::DeleteLogThrough(through)]);
    }
    println!(
        "deleted all, 8 per commit, in {:.0} ms, {}",
        started.elapsed().as_secs_f64() * 1000.0,
        rss()
    );
}

/// What deleting much of the log in one commit costs (sled loads every leaf it deletes from
/// and holds it until the batch is applied): a report, as above.
#[test]
#[ignore = "a measurement report (prints time and RSS per delete size): run with --ignored --nocapture"]
fn store_delete_in_one_commit_report() {
    let cases: [(usize, usize); 4] = [(16, 1 << 20), (64, 1 << 20), (256, 1 << 20), (75, 100)];
    for (mib, size) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path());
        let record = big(size, 9);
        let count = (mib << 20) / size;
        let per_commit = (8 << 20) / size;
        for start in (0..count).step_by(per_commit) {
            let k = per_commit.min(count - start);
            commit(&store, (0..k).map(|_| Op::Append(record.clone())).collect());
        }
        let before = rss();
        let started = Instant::now();
        commit(&store, vec![Op::DeleteLogThrough(Seq::MAX)]);
        println!(
            "{mib} MiB of {size}-byte records deleted in one commit: {:.0} ms; before: {before}; after: {}",
            started.elapsed().as_secs_f64() * 1000.0,
            rss()
        );
    }
}

fn rss() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}
