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
            "framing::write_loop (the writer task)",
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
    ];
    for (what, size) in sizes {
        eprintln!("{size:>6} B  {what}");
    }
    drop(client);
    // Before issue 14's work: 5752 B (a plain connection's task kept room for TLS and the
    // handshake), then 3128 B (the CONNECT and `send`'s copies of each command inline).
    assert!(task <= 1792, "connection task future {task} B");
    assert!(handle <= 1664, "connection::handle future {handle} B");
}
