//! rumqttd 0.20 in-process: the "cloud" a Waystation bridge forwards to, when the cloud has
//! to be a second MQTT implementation rather than Waystation itself.
//!
//! One builder for every place that needs it: `waystation demo` (behind the gateway's
//! `demo` feature), the end-to-end tests (tests/tests/forward_rumqttd.rs and the
//! observability tests) and `wsbench rumqttd`. They differ only in the knobs of
//! [`CloudOptions`]; the rest (a v4 listener, 100 in flight, 200 outgoing packets, 10
//! segments, no auth) is rumqttd as its own rumqttd.toml ships it.
//!
//! rumqttd cannot be stopped: its threads live until the process exits. That suits a test
//! process, a demo run and a benchmark peer, which are the only users.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What differs between the users of the cloud.
#[derive(Clone, Debug)]
pub struct CloudOptions {
    /// Where to listen; `None` picks a free loopback port, so parallel tests and a second
    /// demo never collide.
    pub listen: Option<SocketAddr>,
    /// Largest PUBLISH payload accepted, in bytes.
    pub max_payload_size: usize,
    /// Connections the router admits (the bench's idle scenario needs 20,000).
    pub max_connections: usize,
    /// Size of one of the router's 10 log segments. A subscriber that falls further behind
    /// than the segments hold silently loses messages, so this is sized to the load.
    pub max_segment_size: usize,
    /// rumqttd's pause between two accepts (0 for the bench's connection storms).
    pub next_connection_delay_ms: u64,
    /// How long [`Cloud::start`] waits for the listener to accept connections.
    pub start_timeout: Duration,
}

impl Default for CloudOptions {
    /// The demo's and the observability tests' cloud: a free port, 256 KiB payloads, 100
    /// connections, 16 MiB segments.
    fn default() -> Self {
        CloudOptions {
            listen: None,
            max_payload_size: 256 * 1024,
            max_connections: 100,
            max_segment_size: 16 * 1024 * 1024,
            next_connection_delay_ms: 1,
            start_timeout: Duration::from_secs(10),
        }
    }
}

/// A running rumqttd. Dropping it does not stop it (nothing can).
pub struct Cloud {
    addr: SocketAddr,
    thread: JoinHandle<io::Result<()>>,
}

impl Cloud {
    /// Starts rumqttd on threads of its own and returns once it accepts TCP connections.
    /// Callable from sync code and from inside a tokio runtime (it blocks for the start-up,
    /// typically a few milliseconds).
    pub fn start(options: CloudOptions) -> io::Result<Cloud> {
        let addr = match options.listen {
            Some(addr) => addr,
            None => TcpListener::bind("127.0.0.1:0")?.local_addr()?,
        };
        let config = config(&options, addr);
        let thread = std::thread::Builder::new()
            .name("cloud".into())
            .spawn(move || {
                rumqttd::Broker::new(config)
                    .start()
                    .map_err(|e| io::Error::other(format!("rumqttd: {e:?}")))
            })?;
        let deadline = Instant::now() + options.start_timeout;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            // rumqttd logs a failed bind and returns: say so instead of waiting it out.
            if thread.is_finished() {
                let why = match thread.join() {
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "it stopped".into(),
                    Err(_) => "it panicked".into(),
                };
                return Err(io::Error::other(format!(
                    "the cloud broker (rumqttd) did not start on {addr}: {why}"
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the cloud broker (rumqttd) did not start on {addr}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Cloud { addr, thread })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Blocks while rumqttd runs (for `wsbench rumqttd`, which is killed to stop it);
    /// returns rumqttd's error if it ends.
    pub fn wait(self) -> io::Result<()> {
        self.thread
            .join()
            .map_err(|_| io::Error::other("rumqttd panicked"))?
    }
}

fn config(o: &CloudOptions, listen: SocketAddr) -> rumqttd::Config {
    let server = rumqttd::ServerSettings {
        name: "cloud".into(),
        listen,
        tls: None,
        next_connection_delay_ms: o.next_connection_delay_ms,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: o.max_payload_size,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: o.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: o.max_segment_size,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some([("1".to_string(), server)].into_iter().collect()),
        ..Default::default()
    }
}
