//! The link simulator end to end: plain std TCP echo servers behind it, plain std clients in
//! front, every wait bounded by a timeout.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use waystation_linksim::{Chaos, Fault, LinkConfig, LinkSim};

const WAIT: Duration = Duration::from_secs(5);

/// An echo server; it reports how each connection ended (`Ok` for EOF, else the error kind).
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    endings: mpsc::Receiver<Result<(), ErrorKind>>,
}

fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
    let addr = listener.local_addr().expect("echo address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let (ending, endings) = mpsc::channel();
    let counter = Arc::clone(&accepted);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let ending = ending.clone();
            thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone echo stream");
                let outcome = io::copy(&mut reader, &mut stream).map(drop);
                let _ = stream.shutdown(Shutdown::Write);
                let _ = ending.send(outcome.map_err(|e| e.kind()));
            });
        }
    });
    Echo {
        addr,
        accepted,
        endings,
    }
}

fn start(echo: &Echo, tweak: impl FnOnce(&mut LinkConfig)) -> LinkSim {
    let mut config = LinkConfig::new(echo.addr.to_string());
    tweak(&mut config);
    LinkSim::start(config).expect("start link simulator")
}

fn connect(sim: &LinkSim) -> TcpStream {
    let stream = TcpStream::connect(sim.local_addr()).expect("connect to the simulator");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

fn echo_round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).expect("send");
    let mut back = vec![0; message.len()];
    stream.read_exact(&mut back).expect("echo comes back");
    assert_eq!(back, message);
}

/// Reads with a short timeout and expects nothing: no data, no close.
fn assert_silent(stream: &mut TcpStream, for_how_long: Duration) {
    stream
        .set_read_timeout(Some(for_how_long))
        .expect("timeout");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected silence, got {other:?}"),
    }
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
}

/// Polls `condition` for up to a second.
fn eventually(condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !condition() {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
    true
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

#[test]
fn round_trip_takes_both_latencies() {
    let echo = echo_server();
    let sim = start(&echo, |c| (c.up_latency, c.down_latency) = (ms(50), ms(50)));
    let mut client = connect(&sim);
    let started = Instant::now();
    echo_round_trip(&mut client, b"ping");
    let rtt = started.elapsed();
    assert!(rtt >= ms(100) && rtt < ms(1000), "rtt {rtt:?}");
}

#[test]
fn set_latency_applies_to_later_chunks() {
    let echo = echo_server();
    let sim = start(&echo, |_| {});
    let mut client = connect(&sim);
    echo_round_trip(&mut client, b"fast");
    sim.handle().set_latency(ms(150), ms(50));
    let started = Instant::now();
    echo_round_trip(&mut client, b"slow");
    assert!(started.elapsed() >= ms(200), "rtt {:?}", started.elapsed());
}

#[test]
fn a_burst_is_pipelined_not_sent_one_chunk_per_round_trip() {
    let echo = echo_server();
    let sim = start(&echo, |c| {
        (c.up_latency, c.down_latency) = (ms(100), ms(100))
    });
    let mut client = connect(&sim);
    let data: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut writer = client.try_clone().expect("clone client");
    let sent = data.clone();
    let started = Instant::now();
    let sender = thread::spawn(move || writer.write_all(&sent).expect("send burst"));
    let mut back = vec![0; data.len()];
    client.read_exact(&mut back).expect("burst comes back");
    let elapsed = started.elapsed();
    sender.join().expect("sender");
    assert!(back == data, "burst came back altered");
    // Reads are at most 64 KiB, so 1 MiB is at least 16 chunks: one chunk per 100 ms delay
    // would take 1.6 s or more.
    assert!(
        elapsed >= ms(200) && elapsed < ms(1200),
        "burst took {elapsed:?}"
    );
    // The proxy counts a write after it returns, which can be just after the client read it.
    let counted = eventually(|| sim.handle().stats().bytes_down == data.len() as u64);
    assert!(counted, "{:?}", sim.handle().stats());
}

#[test]
fn jitter_never_reorders_bytes() {
    let echo = echo_server();
    let sim = start(&echo, |c| {
        (c.up_latency, c.down_latency, c.jitter) = (ms(10), ms(10), ms(10));
        c.seed = 99;
    });
    let mut client = connect(&sim);
    let mut writer = client.try_clone().expect("clone client");
    let sender = thread::spawn(move || {
        for batch in 0u32..300 {
            let numbers: Vec<u8> = (batch * 10..batch * 10 + 10)
                .flat_map(u32::to_be_bytes)
                .collect();
            writer.write_all(&numbers).expect("send numbers");
            thread::sleep(ms(1)); // separate chunks, each with its own jitter draw
        }
    });
    let mut back = vec![0; 3000 * 4];
    client.read_exact(&mut back).expect("numbers come back");
    sender.join().expect("sender");
    for (expected, number) in back.chunks(4).enumerate() {
        let number = u32::from_be_bytes(number.try_into().expect("4 bytes"));
        assert_eq!(number, expected as u32, "reordered at {expected}");
    }
}

#[test]
fn bandwidth_cap_paces_delivery() {
    let echo = echo_server();
    let sim = start(&echo, |c| c.bandwidth = Some(100 * 1024));
    let mut client = connect(&sim);
    let data: Vec<u8> = (0..200 * 1024).map(|i| (i % 253) as u8).collect();
    let mut writer = client.try_clone().expect("clone client");
    let sent = data.clone();
    let started = Instant::now();
    let sender = thread::spawn(move || writer.write_all(&sent).expect("send"));
    let mut back = vec![0; data.len()];
    client.read_exact(&mut back).expect("data comes back");
    let elapsed = started.elapsed();
    sender.join().expect("sender");
    assert!(back == data, "data came back altered");
    assert!(
        elapsed >= ms(1500),
        "200 KiB at 100 KiB/s took only {elapsed:?}"
    );
}

#[test]
fn close_is_delayed_by_latency_and_slow_close() {
    let echo = echo_server();
    let sim = start(&echo, |c| {
        (c.up_latency, c.down_latency, c.slow_close) = (ms(50), ms(50), ms(200));
    });
    let mut client = connect(&sim);
    let started = Instant::now();
    client.write_all(b"bye").expect("send");
    client.shutdown(Shutdown::Write).expect("half close");
    let mut back = Vec::new();
    client.read_to_end(&mut back).expect("echo then EOF");
    assert_eq!(back, b"bye");
    // FIN up (50 + 200 ms), then the echo server's FIN down (50 + 200 ms).
    assert!(
        started.elapsed() >= ms(480),
        "closed after {:?}",
        started.elapsed()
    );
    assert_eq!(echo.endings.recv_timeout(WAIT), Ok(Ok(())));
}

#[test]
fn reset_all_resets_both_sides_and_new_connections_work() {
    let echo = echo_server();
    let sim = start(&echo, |c| (c.up_latency, c.down_latency) = (ms(20), ms(20)));
    let handle = sim.handle();
    let mut client = connect(&sim);
    echo_round_trip(&mut client, b"hello");
    assert_eq!(handle.stats().open, 1);
    let started = Instant::now();
    handle.reset_all();
    let mut byte = [0u8; 1];
    let kind = client.read(&mut byte).map_err(|e| e.kind());
    assert_eq!(kind, Err(ErrorKind::ConnectionReset));
    assert!(
        started.elapsed() < ms(1000),
        "reset took {:?}",
        started.elapsed()
    );
    let server_saw = echo.endings.recv_timeout(WAIT).expect("server side ends");
    assert_eq!(server_saw, Err(ErrorKind::ConnectionReset));
    let stats = handle.stats();
    assert_eq!((stats.resets, stats.open), (1, 0));

    let mut again = connect(&sim);
    echo_round_trip(&mut again, b"again");
    assert_eq!(handle.faults().len(), 1);
    assert_eq!(handle.faults()[0].1, Fault::Reset);
}

#[test]
fn zombie_all_goes_silent_without_closing_and_new_connections_work() {
    let echo = echo_server();
    let sim = start(&echo, |_| {});
    let handle = sim.handle();
    let mut client = connect(&sim);
    echo_round_trip(&mut client, b"hello");
    handle.zombie_all();
    thread::sleep(ms(50));
    client
        .write_all(b"anyone there?")
        .expect("a zombie still takes writes");
    assert_silent(&mut client, ms(1000));
    assert!(
        echo.endings.try_recv().is_err(),
        "the server's connection was closed"
    );
    let stats = handle.stats();
    assert_eq!((stats.zombies, stats.open, stats.bytes_up), (1, 0, 5));

    let mut again = connect(&sim);
    echo_round_trip(&mut again, b"again");
}

#[test]
fn zombies_are_dropped_after_the_hold() {
    let echo = echo_server();
    let sim = start(&echo, |c| c.zombie_hold = ms(300));
    let mut client = connect(&sim);
    echo_round_trip(&mut client, b"hello");
    let started = Instant::now();
    sim.handle().zombie_all();
    let mut byte = [0u8; 1];
    let ended = client.read(&mut byte);
    assert!(
        matches!(&ended, Ok(0))
            || matches!(&ended, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected a close, got {ended:?}"
    );
    assert!(
        started.elapsed() >= ms(250),
        "dropped after {:?}",
        started.elapsed()
    );
}

#[test]
fn partition_freezes_then_delivers_in_order_and_holds_new_connections() {
    let echo = echo_server();
    let sim = start(&echo, |_| {});
    let handle = sim.handle();
    let mut early = connect(&sim);
    echo_round_trip(&mut early, b"warm");
    let started = Instant::now();
    handle.partition(ms(800));
    early.write_all(b"one").expect("send");
    thread::sleep(ms(20));
    early.write_all(b"two").expect("send");
    let mut during = connect(&sim);
    during.write_all(b"held").expect("send");
    // A client that gives up while held is simply dropped; it never reaches the target.
    drop(connect(&sim));
    assert_silent(&mut early, ms(400));
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);

    let mut back = [0u8; 6];
    early.read_exact(&mut back).expect("frozen data comes back");
    assert_eq!(&back, b"onetwo");
    assert!(
        started.elapsed() >= ms(750),
        "delivered after {:?}",
        started.elapsed()
    );
    let mut back = [0u8; 4];
    during.read_exact(&mut back).expect("held connection works");
    assert_eq!(&back, b"held");
    thread::sleep(ms(100));
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(handle.stats().accepted, 3);
}

#[test]
fn a_dead_target_resets_the_client_and_the_listener_keeps_going() {
    let unused = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = unused.local_addr().expect("address");
    drop(unused);
    let sim = LinkSim::start(LinkConfig::new(dead.to_string())).expect("start");
    for _ in 0..2 {
        let mut client = connect(&sim);
        let mut byte = [0u8; 1];
        let ended = client.read(&mut byte).map_err(|e| e.kind());
        assert_eq!(ended, Err(ErrorKind::ConnectionReset));
    }
    assert_eq!(sim.handle().stats().accepted, 2);
}

#[test]
fn chaos_follows_its_seeded_schedule_and_stops_with_its_guard() {
    let echo = echo_server();
    let sim = start(&echo, |_| {});
    let handle = sim.handle();
    let chaos = Chaos {
        seed: 7,
        min_interval: ms(100),
        max_interval: ms(150),
        kinds: vec![Fault::Reset, Fault::Zombie],
    };
    let planned: Vec<_> = chaos.schedule().take(20).collect();
    let guard = handle.start_chaos(chaos);
    thread::sleep(ms(700));
    drop(guard);
    let applied = handle.faults();
    assert!(applied.len() >= 3, "only {applied:?}");
    for ((at, fault), (planned_at, planned_fault)) in applied.iter().zip(&planned) {
        assert_eq!(fault, planned_fault);
        assert!(
            *at + ms(5) >= *planned_at && *at < *planned_at + ms(200),
            "{at:?} vs {planned_at:?}"
        );
    }
    thread::sleep(ms(400));
    assert_eq!(
        handle.faults().len(),
        applied.len(),
        "chaos kept going after its guard"
    );
}

#[test]
fn dropping_the_simulator_closes_everything_promptly() {
    let echo = echo_server();
    let sim = start(&echo, |c| c.up_latency = ms(10));
    let handle = sim.handle();
    let mut zombie = connect(&sim);
    echo_round_trip(&mut zombie, b"z");
    handle.zombie_all();
    let mut live = connect(&sim);
    echo_round_trip(&mut live, b"live");
    let address = sim.local_addr();
    let started = Instant::now();
    drop(sim);
    assert!(
        started.elapsed() < ms(1500),
        "drop took {:?}",
        started.elapsed()
    );
    for client in [&mut zombie, &mut live] {
        let mut byte = [0u8; 1];
        let ended = client.read(&mut byte);
        assert!(
            matches!(&ended, Ok(0))
                || matches!(&ended, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "expected a close, got {ended:?}"
        );
    }
    assert!(TcpStream::connect(address).is_err(), "still listening");
    // Harmless after the end.
    handle.reset_all();
    let _chaos = handle.start_chaos(Chaos {
        seed: 1,
        min_interval: ms(1),
        max_interval: ms(2),
        kinds: vec![Fault::Reset],
    });
    thread::sleep(ms(20));
    assert_eq!(handle.faults().len(), 2, "{:?}", handle.faults());
}

#[tokio::test]
async fn starts_and_stops_inside_a_tokio_runtime() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = echo_server();
    let sim = start(&echo, |c| c.down_latency = ms(20));
    let mut client = tokio::net::TcpStream::connect(sim.local_addr())
        .await
        .expect("connect");
    client.write_all(b"async").await.expect("send");
    let mut back = [0u8; 5];
    tokio::time::timeout(WAIT, client.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&back, b"async");
    drop(sim);
}

#[test]
fn the_binary_prints_its_address_proxies_and_reports_on_sigterm() {
    let echo = echo_server();
    let mut child = Command::new(env!("CARGO_BIN_EXE_linksim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--target",
            &echo.addr.to_string(),
        ])
        .args(["--latency-ms", "20", "--flaky", "30-60", "--seed", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run linksim");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    let address = first
        .strip_prefix("linksim listening on 127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    let mut client = TcpStream::connect(("127.0.0.1", address.parse::<u16>().expect("port")))
        .expect("connect to linksim");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    echo_round_trip(&mut client, b"ping");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("linksim did not exit on SIGTERM");
        }
        thread::sleep(ms(20));
    }
    let rest: Vec<String> = lines.map(|line| line.expect("utf-8")).collect();
    assert_eq!(
        rest,
        ["linksim stats: accepted=1 bytes_up=4 bytes_down=4 resets=0 zombies=0"]
    );
}
