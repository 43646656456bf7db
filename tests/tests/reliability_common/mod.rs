//! Helpers shared by the reliability suites of issue 17 (`reliability_admission.rs`,
//! `reliability_durable_acks.rs`): the daemon's HTTP endpoints (`/metrics`, `/healthz`,
//! `/api/v1/status`), persistent-session CONNECTs, and the "offenders": clients that keep
//! connecting with a client id too long to key a stored session (clean session 0), each
//! of which must get CONNACK 0x02 and nothing else. Every wait is bounded.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use waystation_e2e::raw::{Connect, Pkt, RawClient, RecvError};
use waystation_e2e::Waystation;

/// Longer than the 4,086 bytes a stored session's client id may have (2 + id + 8 bytes
/// must fit the store's 4,096-byte keys).
pub const LONG_ID_BYTES: usize = 5_000;

/// A CONNECT with clean session 0 (a persistent session).
pub fn persistent(id: &str) -> Connect {
    Connect::new(id).clean(false)
}

/// `GET path` over HTTP/1.0 from the daemon's HTTP server: (status code, body).
pub fn http_get(ws: &Waystation, path: &str) -> (u16, String) {
    let addr = ws.http_addr();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to http://{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("read http://{addr}{path}: {e}"));
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in the answer to {path}: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    (status, body.to_string())
}

/// A sample of `/metrics` by its full name, labels included (`name{k="v"}`); `None` when
/// the daemon does not export it.
pub fn metric(ws: &Waystation, name: &str) -> Option<f64> {
    let (status, body) = http_get(ws, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// What the offenders saw.
#[derive(Debug, Default)]
pub struct OffenderReport {
    /// CONNECTs answered with exactly CONNACK 0x02, then a close.
    pub refused_with_code_2: u64,
    /// Anything else (first 20), with what the broker sent.
    pub failures: Vec<String>,
    pub failure_count: u64,
}

/// Threads that keep connecting with a `LONG_ID_BYTES` client id and clean session 0 until
/// [`Offenders::finish`], each checking that the broker answers with CONNACK 0x02 (identifier
/// rejected, session present 0) and closes the connection [MQTT-3.2.2-4, MQTT-3.2.2-5].
pub struct Offenders {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<OffenderReport>>,
}

impl Offenders {
    pub fn start(addr: SocketAddr, threads: usize) -> Offenders {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|t| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut report = OffenderReport::default();
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let mut id = format!("offender-{t}-{n}-");
                        while id.len() < LONG_ID_BYTES {
                            id.push('o');
                        }
                        n += 1;
                        match offend_once(addr, &id) {
                            Ok(()) => report.refused_with_code_2 += 1,
                            Err(e) => {
                                report.failure_count += 1;
                                if report.failures.len() < 20 {
                                    report.failures.push(e);
                                }
                            }
                        }
                    }
                    report
                })
            })
            .collect();
        Offenders { stop, handles }
    }

    /// Stops the threads (each finishes the attempt under way) and sums their reports.
    pub fn finish(mut self) -> OffenderReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = OffenderReport::default();
        for h in self.handles.drain(..) {
            let r = h.join().expect("offender thread panicked");
            all.refused_with_code_2 += r.refused_with_code_2;
            all.failure_count += r.failure_count;
            all.failures.extend(r.failures);
        }
        all.failures.truncate(20);
        all
    }
}

impl Drop for Offenders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One offending CONNECT: Ok when the broker sent exactly CONNACK(0, 0x02) and closed.
fn offend_once(addr: SocketAddr, id: &str) -> Result<(), String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    let mut c = RawClient::tcp_from(stream);
    c.try_send(&persistent(id).encode())
        .map_err(|e| format!("send CONNECT: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv_timeout(left) {
            Ok(p) => got.push(p),
            Err(RecvError::Closed) => break,
            Err(RecvError::Timeout) => {
                return Err(format!("connection still open after 5 s, got {got:?}"))
            }
        }
    }
    let want = [Pkt::ConnAck {
        session_present: false,
        code: 2,
    }];
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "want exactly [CONNACK 0x02] then close, got {got:?}"
        ))
    }
}

/// The largest persistent session record, as the broker defines it.
#[allow(unused_imports)] // not every test that includes this module uses it
pub use waystation_broker::MAX_SESSION_RECORD_BYTES;

/// What one filter costs in that record (`persist::subscription_record_len`).
pub fn record_cost(filter: &str) -> usize {
    3 + filter.len()
}

/// A topic filter (a plain topic, no wildcard) of exactly `len` bytes, unique per `tag`/`i`.
pub fn long_filter(tag: &str, i: usize, len: usize) -> String {
    let mut f = format!("{tag}/{i:06}/");
    while f.len() < len {
        f.push('f');
    }
    f
}

/// What a [`SubscriptionHog`] saw.
#[derive(Debug, Default)]
pub struct HogReport {
    pub packets: u64,
    pub granted: u64,
    pub refused: u64,
    /// Filters granted after one had been refused for the record's size (first 20).
    pub granted_after_full: Vec<String>,
}

/// A persistent session that keeps subscribing to new 1,000-byte filters, 50 per SUBSCRIBE
/// (a 50 KB packet: under any `max_packet_size` this suite uses), until stopped: its record
/// fills up after ~122 filters, and every filter after that must get 0x80. Panics (seen at
/// `finish`) if a SUBACK does not come.
pub struct SubscriptionHog {
    stop: Arc<AtomicBool>,
    refused: Arc<std::sync::atomic::AtomicU64>,
    handle: Option<JoinHandle<HogReport>>,
}

impl SubscriptionHog {
    pub const FILTER_BYTES: usize = 1_000;
    pub const PER_PACKET: usize = 50;

    pub fn start(addr: SocketAddr, client_id: &str) -> SubscriptionHog {
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let handle = {
            let (stop, id) = (Arc::clone(&stop), client_id.to_string());
            let refused_so_far = Arc::clone(&refused);
            std::thread::spawn(move || {
                let (mut c, _) = RawClient::connect_ok(addr, &persistent(&id));
                let mut report = HogReport::default();
                let mut next = 0usize;
                let mut pid = 0u16;
                while !stop.load(Ordering::SeqCst) {
                    let names: Vec<String> = (next..next + Self::PER_PACKET)
                        .map(|i| long_filter(&id, i, Self::FILTER_BYTES))
                        .collect();
                    next += Self::PER_PACKET;
                    pid = pid % 60_000 + 1;
                    let filters: Vec<(&str, u8)> = names.iter().map(|n| (n.as_str(), 1)).collect();
                    let codes = c.subscribe(pid, &filters);
                    assert_eq!(codes.len(), names.len(), "{id}: one SUBACK code per filter");
                    report.packets += 1;
                    for (name, code) in names.iter().zip(codes) {
                        match code {
                            0x80 => report.refused += 1,
                            _ if report.refused > 0 => {
                                report.granted += 1;
                                if report.granted_after_full.len() < 20 {
                                    report.granted_after_full.push(name[..20].to_string());
                                }
                            }
                            _ => report.granted += 1,
                        }
                    }
                    refused_so_far.store(report.refused, Ordering::SeqCst);
                }
                c.disconnect();
                report
            })
        };
        SubscriptionHog {
            stop,
            refused,
            handle: Some(handle),
        }
    }

    /// Filters refused so far (non-zero: the record is full, and every further SUBSCRIBE
    /// is one that would once have voided its burst).
    pub fn refused_so_far(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    pub fn finish(mut self) -> HogReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("finished once")
            .join()
            .expect("the subscription hog failed (no SUBACK, see its panic)")
    }
}

impl Drop for SubscriptionHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
