//! What one idle connection keeps alive, in bytes: the futures its tasks are made of (a
//! task holds its future's largest state for as long as it lives) and the router's
//! per-client state. Printed with `--nocapture`; the limits keep issue 14's gains.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::net::connection::{self, ConnectionContext};

fn context() -> Arc<ConnectionContext> {
    let (router, _) = mpsc::channel(1);
    let (_, ingest_paused) = watch::channel(false);
    Arc::new(ConnectionContext {
        limits: Default::default(),
        router,
        stats: Arc::default(),
        shutdown: crate::shutdown::Shutdown::new(),
        ingest_paused,
        auth: Arc::new(crate::policy::auth::Authenticator::new(Default::default())),
        tls: None,
    })
}

#[tokio::test]
async fn an_idle_connection_keeps_small_futures() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client = TcpStream::connect(addr).await.expect("connect");
    let (stream, peer): (TcpStream, SocketAddr) = listener.accept().await.expect("accept");
    let handle = std::mem::size_of_val(&connection::handle(
        TcpStream::connect(addr).await.expect("connect"),
        peer,
        context(),
        None,
    ));
    let task = super::server::task_future_size(stream, peer, context());
    let sizes = [
        ("the connection task's future (accept_loop)", task),
        ("connection::handle<TcpStream>", handle),
        (
            "Writing::run (the writer, boxed with the reader while serving)",
            connection::write_loop_future_size(),
        ),
        (
            "ConnectionContext",
            std::mem::size_of::<ConnectionContext>(),
        ),
        (
            "session::Session",
            std::mem::size_of::<crate::session::Session>(),
        ),
        (
            "session::Online",
            std::mem::size_of::<crate::session::Online>(),
        ),
        (
            "status::ClientInfo",
            std::mem::size_of::<crate::status::ClientInfo>(),
        ),
        (
            "protocol::Decoder",
            std::mem::size_of::<crate::protocol::Decoder>(),
        ),
        (
            "protocol::Encoder",
            std::mem::size_of::<crate::protocol::Encoder>(),
        ),
        ("TcpStream", std::mem::size_of::<TcpStream>()),
        (
            "outbox::OutboxShared (one allocation per connection)",
            crate::outbox::shared_size(),
        ),
    ];
    for (what, size) in sizes.into_iter().chain(connection::quiet_sizes()) {
        eprintln!("{size:>6} B  {what}");
    }
    drop(client);
    // Before issue 14's work: 5752 B (a plain connection's task kept room for TLS and the
    // handshake), then 3128 B (the CONNECT and `send`'s copies of each command inline), then
    // ~1500 B (the reader's and the writer's futures inline for the connection's life; now
    // they are boxed while packets move, and a quiet connection keeps only its state and
    // one wait), then 728 B, then 656 B. tokio's task cell is the future plus 96 B (header
    // 32, scheduler and task id 16, trailer 48; 8 more if the stage needs a tag of its
    // own), aligned to 128 B on x86_64 and aarch64: <= 536 B made it 640 B where 656 made
    // it 768 (the quiet wait lost its own wait on the shutdown signal, the close log the
    // peer's address, the keep-alive its 16 B `Instant`). Now <= 288 B makes it 384: the
    // quiet wait holds no timer (112 B; the router's sweep wakes a connection whose
    // keep-alive is out) and no `Notified` (64 B; the outbox keeps the task's waker), and it
    // is a plain poll over the connection's state (two references, where an async loop
    // kept a dozen).
    assert!(task <= 288, "connection task future {task} B");
    assert!(handle <= 272, "connection::handle future {handle} B");
    let client_info = std::mem::size_of::<crate::status::ClientInfo>();
    assert!(client_info <= 112, "ClientInfo {client_info} B");
    // 304 B before its QoS 2 id set became a `BTreeSet`, its will a box and what it holds
    // while messages move a box of its own (none while idle).
    let session = std::mem::size_of::<crate::session::Session>();
    assert!(session <= 112, "Session {session} B");
    // 232 B (an allocation of 256 with the `Arc`'s counts) before its rarely used fields
    // were boxed, 200 B before pacing's two `Notify`s were made only when first needed.
    let outbox = crate::outbox::shared_size();
    assert!(outbox <= 152, "OutboxShared {outbox} B");
}

/// A stream that answers reads from a script, then never again, and records how much room
/// each read offered (the read buffer's spare capacity).
struct Scripted {
    reads: std::collections::VecDeque<Vec<u8>>,
    offered: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl tokio::io::AsyncRead for Scripted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.offered.lock().expect("lock").push(buf.remaining());
        match self.reads.pop_front() {
            Some(data) => {
                buf.put_slice(&data);
                std::task::Poll::Ready(Ok(()))
            }
            None => std::task::Poll::Pending,
        }
    }
}

impl tokio::io::AsyncWrite for Scripted {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_subscribe_does_not_grow_an_idle_clients_read_buffer() {
    // CONNECT (3.1.1, client id "a", keep-alive 60), then SUBSCRIBE a/b/c at QoS 1.
    let connect = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01a".to_vec();
    let subscribe = b"\x82\x0a\x00\x01\x00\x05a/b/c\x01".to_vec();
    let offered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stream = Scripted {
        reads: [connect, subscribe].into(),
        offered: offered.clone(),
    };
    let (router, mut commands) = mpsc::channel(16);
    let mut ctx = Arc::into_inner(context()).expect("one owner");
    ctx.router = router;
    let peer = SocketAddr::from(([127, 0, 0, 1], 1883));
    let task = tokio::spawn(connection::handle(stream, peer, Arc::new(ctx), None));
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let cmd = tokio::time::timeout(std::time::Duration::from_secs(5), commands.recv())
            .await
            .expect("CONNECT and SUBSCRIBE reach the router")
            .expect("router queue open");
        seen.push(cmd);
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let offered = offered.lock().expect("lock").clone();
    // Reads: the CONNECT, the SUBSCRIBE, then the wait for more: in the buffer the CONNECT
    // came in, not a 4 KiB one (the SUBSCRIBE did not fill the buffer).
    assert!(offered.len() >= 3, "{offered:?}");
    assert!(offered[2] < 1024, "{offered:?}");
    task.abort();
}
