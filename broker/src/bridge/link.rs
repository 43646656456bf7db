//! The bridge's connection to its upstream broker: an MQTT client link of our own, MQTT 3.1.1
//! or 5 (`wire.rs`: rumqttc's `mqttbytes::v4` codec or rmqtt-codec's v5), with no event loop
//! of rumqttc's in the way.
//!
//! Why our own and not `rumqttc::EventLoop`: its `poll()` owns the TCP connect, the
//! CONNECT and the wait for CONNACK inside the future it returns, so a `select!` that wakes
//! for anything else drops the attempt half-way (over a link of 10 ms or more it never
//! connected), and it writes and flushes every PUBLISH on its own.
//!
//! Shape:
//! - [`connect`] is one straight sequence of steps, each under `connect_timeout`: name
//!   lookup, TCP connect (Nagle off, TCP keepalive and `TCP_USER_TIMEOUT` on), TLS
//!   handshake, CONNECT, CONNACK. The bridge runs it as a task of its own and only waits
//!   on its `JoinHandle`, so nothing cancels an attempt half-way; shutdown aborts the task.
//! - Once connected, a **reader task** frames packets off the socket and passes them on in
//!   order, and a **writer task** takes ready-encoded frames, gathers whatever is queued
//!   into one buffer and writes it with one `write_all`: a window of PUBLISHes goes out in
//!   one syscall where the socket takes it. Neither is ever dropped half-way through a
//!   packet; both end with the [`Link`] (aborted on drop) or when the socket fails.
//! - The link knows nothing of the log, windows or keep-alive deadlines: the bridge's
//!   session loop (`session.rs`) owns those and reads [`Link::incoming`] and writes
//!   [`Link::send`], both of which are safe to use from a `select!`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;

use super::wire::{self, ConnectOptions, Decoder, Incoming, UpstreamLimits, WireError};
use crate::stats::WireCounters;

/// Most bytes the writer gathers into one write.
const WRITE_GATHER: usize = 256 * 1024;

/// Packets the reader may run ahead of the session loop.
const INCOMING_QUEUE: usize = 1024;

/// What a connection attempt needs.
#[derive(Clone)]
pub struct LinkParams {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<ClientConfig>>,
    pub connect: ConnectOptions,
    /// Each step of the attempt (lookup, TCP, TLS, CONNECT → CONNACK) gets this long.
    pub step_timeout: Duration,
    /// `TCP_USER_TIMEOUT`: the kernel drops the connection when sent data stays
    /// unacknowledged this long (a vanished peer), without waiting for our keep-alive.
    pub tcp_user_timeout: Duration,
}

/// Why a connection attempt failed or a connection ended. `Display` is what the log,
/// `last_error` and the dashboard show; [`LinkError::reason`] is the metric label.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("{step} timed out after {secs}s")]
    Timeout { step: &'static str, secs: u64 },
    #[error("TCP connect: {0}")]
    Connect(String),
    #[error("TLS handshake: {0}")]
    Tls(String),
    #[error("upstream refused the connection: CONNACK {0}")]
    Refused(String),
    #[error("upstream closed the connection")]
    Closed,
    #[error("connection error: {0}")]
    Io(String),
    #[error("protocol error from upstream: {0}")]
    Protocol(String),
    #[error("no answer to PINGREQ within {0:?}: connection is dead")]
    PingTimeout(Duration),
    #[error("upstream stalled: no acknowledgement for {0}s")]
    AckTimeout(u64),
}

impl From<WireError> for LinkError {
    fn from(e: WireError) -> LinkError {
        match e {
            WireError::Refused(why) => LinkError::Refused(why),
            WireError::Protocol(what) => LinkError::Protocol(what),
        }
    }
}

impl LinkError {
    /// A short, fixed label for metrics (`reason="..."`).
    pub fn reason(&self) -> &'static str {
        match self {
            LinkError::Resolve(_) => "resolve",
            LinkError::Timeout { step, .. } => step,
            LinkError::Connect(_) => "connect_refused",
            LinkError::Tls(_) => "tls",
            LinkError::Refused(_) => "connack_refused",
            LinkError::Closed => "closed_by_upstream",
            LinkError::Io(_) => "io_error",
            LinkError::Protocol(_) => "protocol_error",
            LinkError::PingTimeout(_) => "ping_timeout",
            LinkError::AckTimeout(_) => "ack_timeout",
        }
    }

    /// Every label [`LinkError::reason`] can give, so metrics can show zeros.
    pub const REASONS: [&'static str; 13] = [
        "resolve",
        "lookup_timeout",
        "tcp_connect_timeout",
        "tls_timeout",
        "connack_timeout",
        "connect_refused",
        "tls",
        "connack_refused",
        "closed_by_upstream",
        "io_error",
        "protocol_error",
        "ping_timeout",
        "ack_timeout",
    ];
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connected upstream: CONNACK received and accepted.
/// Queues frames for a link's writer task, counting the bytes queued and not yet written
/// ([`Link::queued_bytes`]): the channel never blocks its sender, so the session bounds it
/// by not refilling while a stalled upstream leaves too much queued.
#[derive(Clone)]
pub struct LinkSender {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl LinkSender {
    /// `Err` once the writer is gone (the connection is ending).
    pub fn send(&self, frames: Bytes) -> Result<(), ()> {
        let len = frames.len();
        self.queued.fetch_add(len, Ordering::Relaxed);
        self.tx.send(frames).map_err(|_| {
            self.queued.fetch_sub(len, Ordering::Relaxed);
        })
    }
}

pub struct Link {
    pub session_present: bool,
    /// 4 or 5, as connected.
    pub protocol: u8,
    /// What the CONNACK allowed (an MQTT 3.1.1 upstream: no limits).
    pub limits: UpstreamLimits,
    incoming: mpsc::Receiver<Result<Incoming, LinkError>>,
    outgoing: Option<LinkSender>,
    queued: Arc<AtomicUsize>,
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
}

impl Link {
    /// The next packet from the upstream, or why the connection ended. Cancel-safe
    /// (an mpsc receive): the packet stays queued if the caller's `select!` picks another
    /// branch.
    pub async fn incoming(&mut self) -> Result<Incoming, LinkError> {
        match self.incoming.recv().await {
            Some(result) => result,
            None => Err(LinkError::Closed),
        }
    }

    /// The next packet if one is already queued (to handle a burst of PUBACKs in one turn).
    pub fn try_incoming(&mut self) -> Option<Result<Incoming, LinkError>> {
        self.incoming.try_recv().ok()
    }

    /// Queues ready-encoded packets for the writer task. Never waits: what may be queued
    /// is bounded by the session's window (QoS 1 PUBLISHes), by [`Link::queued_bytes`]
    /// (QoS 0 ones, which take no window slot) and by its control packets.
    pub fn send(&self, frames: Bytes) {
        if let Some(tx) = &self.outgoing {
            // A closed writer means the connection is ending; the reader reports why.
            let _ = tx.send(frames);
        }
    }

    /// A handle that queues frames from another task (command acknowledgements).
    pub fn sender(&self) -> Option<LinkSender> {
        self.outgoing.clone()
    }

    /// Bytes queued for the writer and not yet written to the socket.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Sends what is queued plus DISCONNECT, then closes, waiting at most `grace`.
    pub async fn close(mut self, grace: Duration) {
        self.send(wire::disconnect_frame(self.protocol));
        self.outgoing = None; // the writer drains its queue, shuts down its half and ends
        if let Some(writer) = self.writer.take() {
            let _ = timeout(grace, writer).await;
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(writer) = &self.writer {
            writer.abort();
        }
    }
}

/// Name lookup, TCP connect (each address in turn) and the TLS handshake, each step within
/// `step_timeout`: the byte stream the CONNECT goes over.
async fn open_stream(params: &LinkParams) -> Result<Box<dyn Stream>, LinkError> {
    let step = params.step_timeout;
    let secs = step.as_secs().max(1);
    let addrs = timeout(
        step,
        tokio::net::lookup_host((params.host.as_str(), params.port)),
    )
    .await
    .map_err(|_| LinkError::Timeout {
        step: "lookup_timeout",
        secs,
    })?
    .map_err(|e| LinkError::Resolve(format!("{}: {e}", params.host)))?;

    let mut last_error = LinkError::Resolve(params.host.clone());
    let mut tcp = None;
    for addr in addrs {
        match timeout(step, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last_error = LinkError::Connect(format!("{addr}: {e}")),
            Err(_) => {
                last_error = LinkError::Timeout {
                    step: "tcp_connect_timeout",
                    secs,
                }
            }
        }
    }
    let tcp = tcp.ok_or(last_error)?;
    tune_socket(&tcp, params.tcp_user_timeout);

    let stream: Box<dyn Stream> = match &params.tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = ServerName::try_from(params.host.clone())
                .map_err(|e| LinkError::Tls(format!("{}: {e}", params.host)))?;
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let tls = timeout(step, connector.connect(name, tcp))
                .await
                .map_err(|_| LinkError::Timeout {
                    step: "tls_timeout",
                    secs,
                })?
                .map_err(|e| LinkError::Tls(e.to_string()))?;
            Box::new(tls)
        }
    };
    Ok(stream)
}

/// One connection attempt, from name lookup to an accepted CONNACK. Meant to run as a task
/// of its own (see the module docs): dropping it half-way leaves nothing behind, but a
/// caller that keeps dropping it would never connect.
pub async fn connect(params: LinkParams, counters: Arc<WireCounters>) -> Result<Link, LinkError> {
    let step = params.step_timeout;
    let secs = step.as_secs().max(1);
    let mut stream = open_stream(&params).await?;

    let frame = wire::connect_frame(&params.connect)?;
    let mut decoder = Decoder::new(params.connect.protocol);
    let mut read_buf = BytesMut::with_capacity(4096);
    let connack = timeout(step, async {
        stream
            .write_all(&frame)
            .await
            .map_err(|e| LinkError::Io(e.to_string()))?;
        stream
            .flush()
            .await
            .map_err(|e| LinkError::Io(e.to_string()))?;
        counters
            .bytes_sent
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        loop {
            match decoder.read(&mut read_buf)? {
                Some(packet) => return Ok(packet),
                None => {
                    let n = stream
                        .read_buf(&mut read_buf)
                        .await
                        .map_err(|e| LinkError::Io(e.to_string()))?;
                    if n == 0 {
                        return Err(LinkError::Closed);
                    }
                    counters
                        .bytes_received
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    })
    .await
    .map_err(|_| LinkError::Timeout {
        step: "connack_timeout",
        secs,
    })??;
    let (session_present, limits) = match connack {
        Incoming::ConnAck {
            refused: Some(why), ..
        } => return Err(LinkError::Refused(why)),
        Incoming::ConnAck {
            session_present,
            limits,
            ..
        } => (session_present, limits),
        other => {
            return Err(LinkError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            )))
        }
    };

    let (read_half, write_half) = tokio::io::split(stream);
    let (in_tx, in_rx) = mpsc::channel(INCOMING_QUEUE);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_packets(
        read_half,
        read_buf,
        decoder,
        in_tx.clone(),
        counters.clone(),
    ));
    let queued = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_frames(
        write_half,
        out_rx,
        in_tx,
        counters,
        queued.clone(),
    ));
    Ok(Link {
        session_present,
        protocol: params.connect.protocol,
        limits,
        incoming: in_rx,
        outgoing: Some(LinkSender {
            tx: out_tx,
            queued: queued.clone(),
        }),
        queued,
        reader,
        writer: Some(writer),
    })
}

/// Nagle off (a PUBLISH waits for nothing); TCP keepalive and `TCP_USER_TIMEOUT`, so the
/// kernel also gives up on a peer that stopped acknowledging. Best effort: a socket option
/// that cannot be set costs only a slower detection, which the keep-alive still bounds.
fn tune_socket(tcp: &TcpStream, user_timeout: Duration) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let probe_after = (user_timeout / 2).max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(probe_after)
        .with_interval(Duration::from_secs(1).max(probe_after / 4));
    let _ = sock.set_tcp_keepalive(&keepalive);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = sock.set_tcp_user_timeout(Some(user_timeout));
}

/// The reader task: every packet in order into `tx`, then why it stopped.
async fn read_packets<R: AsyncRead + Unpin>(
    mut read_half: R,
    mut buf: BytesMut,
    mut decoder: Decoder,
    tx: mpsc::Sender<Result<Incoming, LinkError>>,
    counters: Arc<WireCounters>,
) {
    let ended = loop {
        loop {
            match decoder.read(&mut buf).map_err(LinkError::from) {
                Ok(Some(packet)) => {
                    if tx.send(Ok(packet)).await.is_err() {
                        return; // the link was dropped
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        match read_half.read_buf(&mut buf).await {
            Ok(0) => break LinkError::Closed,
            Ok(n) => {
                counters
                    .bytes_received
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => break LinkError::Io(e.to_string()),
        }
    };
    let _ = tx.send(Err(ended)).await;
}

/// The writer task: gathers queued frames into one buffer per write. Ends when the queue
/// closes (after writing what it held, and shutting its half down) or on a write error,
/// which it reports through the incoming queue.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut write_half: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    errors: mpsc::Sender<Result<Incoming, LinkError>>,
    counters: Arc<WireCounters>,
    queued: Arc<AtomicUsize>,
) {
    let mut gathered = BytesMut::new();
    while let Some(first) = rx.recv().await {
        // One queued buffer (the usual case: the session queues one per turn) is written as
        // it is; several are gathered into one write.
        let mut single = Some(first);
        while gathered.len() < WRITE_GATHER {
            match rx.try_recv() {
                Ok(more) => {
                    if let Some(first) = single.take() {
                        gathered.extend_from_slice(&first);
                    }
                    gathered.extend_from_slice(&more);
                }
                Err(_) => break,
            }
        }
        let bytes: &[u8] = match &single {
            Some(first) => first,
            None => &gathered,
        };
        let result = async {
            write_half.write_all(bytes).await?;
            write_half.flush().await
        }
        .await;
        if let Err(e) = result {
            let _ = errors.send(Err(LinkError::Io(e.to_string()))).await;
            return;
        }
        counters
            .bytes_sent
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        queued.fetch_sub(bytes.len(), Ordering::Relaxed);
        gathered.clear();
        if gathered.capacity() > 4 * WRITE_GATHER {
            gathered = BytesMut::new();
        }
    }
    let _ = write_half.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4;
    use tokio::net::TcpListener;

    fn params(port: u16) -> LinkParams {
        LinkParams {
            host: "127.0.0.1".into(),
            port,
            tls: None,
            connect: ConnectOptions {
                protocol: 4,
                client_id: "link-test".into(),
                keep_alive: 30,
                clean_session: false,
                session_expiry: 0,
                username: None,
                password: None,
            },
            step_timeout: Duration::from_millis(500),
            tcp_user_timeout: Duration::from_secs(5),
        }
    }

    async fn accept_and_read_connect(listener: &TcpListener) -> (TcpStream, BytesMut) {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut buf = BytesMut::new();
        loop {
            if let Ok(v4::Packet::Connect(_)) = v4::Packet::read(&mut buf, 1 << 20) {
                return (sock, buf);
            }
            assert!(sock.read_buf(&mut buf).await.expect("read") > 0);
        }
    }

    #[tokio::test]
    async fn connects_and_frames_packets_split_across_reads() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut sock, _) = accept_and_read_connect(&listener).await;
            let mut out = BytesMut::new();
            v4::ConnAck::new(v4::ConnectReturnCode::Success, true)
                .write(&mut out)
                .expect("connack");
            v4::PubAck::new(7).write(&mut out).expect("puback");
            // One byte at a time: the reader must put packets together across reads.
            for b in out.iter() {
                sock.write_all(&[*b]).await.expect("write");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sock
        });
        let counters = Arc::new(WireCounters::default());
        let mut link = connect(params(port), counters.clone())
            .await
            .expect("connect");
        assert!(link.session_present);
        match link.incoming().await {
            Ok(Incoming::PubAck { pkid, .. }) => assert_eq!(pkid, 7),
            other => panic!("expected PUBACK 7, got {other:?}"),
        }
        let _sock = server.await.expect("server");
        assert_eq!(counters.bytes_received.load(Ordering::Relaxed), 4 + 4);
    }

    #[tokio::test]
    async fn refused_connack_is_an_error_naming_the_code() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (mut sock, _) = accept_and_read_connect(&listener).await;
            let mut out = BytesMut::new();
            v4::ConnAck::new(v4::ConnectReturnCode::NotAuthorized, false)
                .write(&mut out)
                .expect("connack");
            sock.write_all(&out).await.expect("write");
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let err = connect(params(port), Arc::default())
            .await
            .err()
            .expect("refused");
        assert_eq!(err.reason(), "connack_refused", "{err}");
        assert!(err.to_string().contains("NotAuthorized"), "{err}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_waiting_for_connack() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (sock, _) = accept_and_read_connect(&listener).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(sock);
        });
        let err = connect(params(port), Arc::default())
            .await
            .err()
            .expect("timeout");
        assert_eq!(err.reason(), "connack_timeout", "{err}");
    }

    #[tokio::test]
    async fn queued_frames_are_gathered_and_written_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut sock, mut buf) = accept_and_read_connect(&listener).await;
            let mut out = BytesMut::new();
            v4::ConnAck::new(v4::ConnectReturnCode::Success, false)
                .write(&mut out)
                .expect("connack");
            sock.write_all(&out).await.expect("write");
            let mut pkids = Vec::new();
            while pkids.len() < 50 {
                match v4::Packet::read(&mut buf, 1 << 20) {
                    Ok(v4::Packet::Publish(p)) => pkids.push(p.pkid),
                    Ok(v4::Packet::Disconnect) => break,
                    Ok(_) => {}
                    Err(_) => {
                        if sock.read_buf(&mut buf).await.expect("read") == 0 {
                            break;
                        }
                    }
                }
            }
            pkids
        });
        let link = connect(params(port), Arc::default())
            .await
            .expect("connect");
        for pkid in 1..=50u16 {
            let mut publish = v4::Publish::new("t", rumqttc::QoS::AtLeastOnce, vec![1, 2, 3]);
            publish.pkid = pkid;
            let mut frame = BytesMut::new();
            publish.write(&mut frame).expect("encode");
            link.send(frame.freeze());
        }
        link.close(Duration::from_secs(2)).await;
        let pkids = server.await.expect("server");
        assert_eq!(pkids, (1..=50).collect::<Vec<u16>>());
    }
}
