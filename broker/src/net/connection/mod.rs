//! One client connection: the CONNECT handshake, then a reader that decodes packets and
//! hands them to the router, and a writer that encodes what the router sends back.
//!
//! Reader and writer are two futures polled side by side in the connection's one task, so
//! that a client that is slow to read can never stop us from reading its acknowledgements
//! (and vice versa). When neither has anything to do for a moment the connection goes quiet:
//! both futures are dropped (at points where they hold nothing) and a small wait takes their
//! place, so an idle client costs its state and that wait, not room for everything a busy one
//! does (see [`handle`]). The reader enforces the keep-alive (1.5x the client's value
//! [MQTT-3.1.2-24]), as does the quiet wait when the router's sweep wakes it
//! (`keep_alive.rs`), and ends the connection on any malformed packet
//! or protocol violation, telling the router whether the end was graceful (DISCONNECT: no
//! will) or not.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

use crate::keep_alive::BUFFER_RELEASE_AFTER;
use crate::outbox::Outbox;
use crate::protocol::inbound::{DecodeError, Inbound};
use crate::protocol::message::{CloseReason, Outbound};
use crate::protocol::Decoder;
use crate::router::RouterCmd;
use crate::session::ConnId;

mod context;
mod dispatch;
mod ending;
mod framing;
mod handshake;

pub use context::ConnectionContext;
use context::Guard;
use dispatch::dispatch;
use ending::{abrupt, on_disconnect, over_receive_maximum, End};
#[cfg(test)]
pub(crate) use framing::write_loop_future_size;
use framing::{poll_read_quietly, WriterSide, Writing, QUIET_READ};
use handshake::{open, Opened};

/// How long a connection with nothing to read nor write stays in its serving phase before it
/// goes quiet (see [`handle`]).
const QUIET_AFTER: Duration = Duration::from_millis(10);

/// Serves one client over any byte stream (TCP, or TLS over TCP: `server::serve` accepts).
/// `identity`: the user name a verified client certificate gives (`use_identity_as_username`).
/// `ctx` is shared by the listener's connections (a copy in each would be 144 bytes, twice
/// over: an async fn's future keeps its arguments beside the locals they move into).
///
/// After CONNECT the connection alternates between two phases: *serving* (reader and writer
/// at work, in a boxed future that exists only while packets move) and *quiet* (nothing to
/// read, nothing to write: one small wait inline). A task keeps its future's largest state
/// for as long as it lives, so an idle client's task holds only [`Live`] and that wait
/// (issue 14: what an idle connection costs), not the reader's and writer's futures.
pub fn handle<S>(
    stream: S,
    peer: SocketAddr,
    ctx: Arc<ConnectionContext>,
    identity: Option<String>,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    handle_holding(stream, peer, ctx, identity, ())
}

/// [`handle`], keeping `held` (e.g. the listener's permit) until the connection ends: a task
/// that awaited `handle` and then dropped it would keep the future twice, as its argument
/// and as what it awaits.
pub fn handle_holding<S, H>(
    stream: S,
    peer: SocketAddr,
    ctx: Arc<ConnectionContext>,
    identity: Option<String>,
    held: H,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Send + 'static,
{
    // Boxed: held inline, the handshake's futures (timers, the password check, the
    // CONNECT on its way to the router) and this function's arguments would be room the
    // task keeps for as long as the client stays connected.
    let opening = Box::pin(open_live(stream, peer, ctx.clone(), identity));
    async move {
        let Some(mut live) = opening.await else {
            drop(held);
            return;
        };
        let end = loop {
            if let Some(end) = Box::pin(live.serve(&ctx)).await {
                break end;
            }
            if let Err(end) = live.wait_quietly(&ctx).await {
                break end;
            }
        };
        Box::pin(live.close(end, &ctx)).await;
        drop(held);
    }
}

/// The CONNECT handshake, then the connection's state for the phases after it (`None`:
/// the connection is to close, refused or the broker stopping).
async fn open_live<S>(
    stream: S,
    peer: SocketAddr,
    ctx: Arc<ConnectionContext>,
    identity: Option<String>,
) -> Option<Live<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut stream = stream;
    // Split for the handshake only (an allocation shared by the halves).
    let (mut reader, mut writer) = tokio::io::split(&mut stream);
    // Enough for a typical CONNECT; `read_buf` grows it for a longer one.
    let mut buf = BytesMut::with_capacity(256);
    let mut decoder = Decoder::new();
    let Opened {
        conn,
        client_id,
        version,
        session_expiry,
        guard,
        encoder,
        outbox,
        outbox_rx,
    } = open(
        (&mut reader, &mut writer),
        (&mut buf, &mut decoder),
        &peer,
        &ctx,
        identity,
    )
    .await?;
    drop((reader, writer));
    // MQTT 5 Receive Maximum: QoS 1/2 PUBLISHes read and not yet acknowledged, counted up
    // by the reader and down by the writer as it writes their PUBACK/PUBCOMP.
    let unacknowledged = (version == crate::protocol::Version::V5
        && ctx.limits.receive_maximum < u16::MAX)
        .then(|| Arc::new(AtomicU32::new(0)));
    Some(Live {
        stream,
        writing: Writing::new(outbox_rx, encoder),
        reading: Reading {
            buf,
            decoder,
            conn,
            client_id,
            session_expiry,
            unacknowledged,
            outbox,
            guard,
            has_published: false,
            traffic: false,
        },
        writer_done: false,
    })
}

/// A connection after CONNECT, kept between its phases.
struct Live<S> {
    /// The socket, whole: split (reader and writer polled side by side) only while serving,
    /// as `tokio::io::split` shares the halves through an allocation of their own (64 B in
    /// every idle client's heap, issue 14).
    stream: S,
    writing: Writing,
    reading: Reading,
    /// The writer has stopped (it wrote a `Close`, a write failed, or the router let go).
    writer_done: bool,
}

/// What the reader works with after CONNECT.
struct Reading {
    buf: BytesMut,
    decoder: Decoder,
    conn: ConnId,
    client_id: Arc<str>,
    /// The session expiry the CONNECT set: a DISCONNECT may not raise it from 0.
    session_expiry: u32,
    /// QoS 1/2 PUBLISHes not yet acknowledged, for an MQTT 5 client with a Receive Maximum.
    unacknowledged: Option<Arc<AtomicU32>>,
    /// This connection's own handle on its outbox: where the router says a subscriber this
    /// client feeds is behind, and what the router's answers go into.
    outbox: Outbox,
    guard: Guard,
    has_published: bool,
    /// A read has filled the buffer since the CONNECT: the client sends more than a few
    /// small packets (a SUBSCRIBE or a ping does not make an idle client's buffer 4 KiB).
    /// The keep-alive, from the last read that brought bytes, is in the outbox, where the
    /// router's sweep sees it.
    traffic: bool,
}

impl Reading {
    /// After a read: the keep-alive starts again; a read that filled the buffer means traffic.
    fn heard(&mut self) {
        self.outbox.keep_alive().heard();
        self.traffic = self.traffic || self.buf.len() == self.buf.capacity();
    }
}

impl<S> Live<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Reader and writer at work until the connection ends (`Some`) or goes quiet (`None`:
    /// nothing buffered to decode, the socket has nothing for us, the writer waits on an
    /// empty outbox).
    async fn serve(&mut self, ctx: &ConnectionContext) -> Option<End> {
        let writer_busy = AtomicBool::new(false);
        let Live {
            stream,
            writing,
            reading,
            writer_done,
        } = self;
        let (mut reader, mut writer) = tokio::io::split(&mut *stream);
        // Copies for the writer while the reader has `reading`: they live in this boxed
        // future, not in the idle connection's state.
        let (client_id, unacknowledged) =
            (reading.client_id.clone(), reading.unacknowledged.clone());
        let side = WriterSide {
            busy: &writer_busy,
            client_id: &client_id,
            unacknowledged: unacknowledged.as_deref(),
            stats: &ctx.stats,
        };
        // Cancel safety: the reader returns `None` (quiet) only at its read, with nothing
        // taken from the socket unhandled (a partial packet stays in `reading.buf`), and only
        // while the writer waits on its outbox holding no packet (`writer_busy` false):
        // both futures may then be dropped, their state is in `Live`. Polled writer first
        // (`biased`), so a writer that has just finished its batch is seen idle by the
        // reader in the same poll. The writer is a state machine that survives the drop
        // (framing.rs): when the reader ends the connection mid-batch, `close` finishes the
        // batch. A packet the reader had partly read, or a command not yet handed to the
        // router, when the connection ends was never acknowledged, so the client sends it
        // again after reconnecting.
        tokio::select! {
            biased;
            () = writing.run(&mut writer, &side) => {
                *writer_done = true;
                Some(End::Abrupt("closed by broker or write failed".into(), None))
            }
            end = read_loop(&mut reader, reading, ctx, &writer_busy) => end,
            () = ctx.shutdown.signalled() => Some(abrupt("broker shutting down", CloseReason::ServerShuttingDown)),
        }
    }

    /// The quiet phase: waits for bytes from the client, a packet for it, or a nudge from
    /// the router (its keep-alive out, its read buffer due back, the broker stopping), and
    /// keeps no timer of its own: the router's sweep looks at every quiet connection's
    /// keep-alive (`keep_alive.rs`). `Ok`: serve again. A plain poll over `self`, so the
    /// wait adds two references to an idle client's task and nothing else.
    fn wait_quietly<'a>(
        &'a mut self,
        ctx: &'a ConnectionContext,
    ) -> impl Future<Output = Result<(), End>> + 'a {
        std::future::poll_fn(move |cx| {
            let woke = self.poll_quiet(ctx, cx);
            if woke.is_ready() {
                self.writing.outbox.keep_alive().set_quiet(false, false);
            }
            woke
        })
    }

    fn poll_quiet(
        &mut self,
        ctx: &ConnectionContext,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<(), End>> {
        let keep_alive = self.writing.outbox.keep_alive();
        let buf = &mut self.reading.buf;
        loop {
            // Not a wait of its own (72 B in every quiet connection): the router wakes every
            // live connection's outbox at the signal (`Router::wake_connections_on`), and
            // one that registers later is woken by its CONNACK into the serving phase,
            // which waits on the signal.
            if ctx.shutdown.is_signalled() {
                return Poll::Ready(Err(abrupt(
                    "broker shutting down",
                    CloseReason::ServerShuttingDown,
                )));
            }
            if keep_alive.expired() {
                ctx.stats
                    .keep_alive_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return Poll::Ready(Err(abrupt(
                    "keep-alive expired",
                    CloseReason::KeepAliveTimeout,
                )));
            }
            // A client that went quiet after a burst holds no read buffer; the next bytes
            // get one of their size and it grows with the traffic again.
            if buf.is_empty()
                && buf.capacity() > 0
                && keep_alive.silent_for() >= BUFFER_RELEASE_AFTER
            {
                *buf = BytesMut::new();
            }
            keep_alive.set_quiet(true, buf.capacity() > 0);
            // Neither poll takes anything it does not hand on: a packet stays in the outbox
            // for the writer, and bytes leave the socket only in the poll that copies them
            // into `buf`; dropped between polls, the wait loses nothing.
            match self.writing.outbox.poll_quiet(cx) {
                // Something to write (or every sender gone: the writer then stops).
                Poll::Ready(true) => return Poll::Ready(Ok(())),
                // Nudged: look again at the signal, the keep-alive and the buffer.
                Poll::Ready(false) => continue,
                Poll::Pending => {}
            }
            let read = std::task::ready!(poll_read_quietly(&mut self.stream, buf, cx));
            return Poll::Ready(match read {
                Ok(0) => Err(End::Abrupt("connection closed by client".into(), None)),
                Err(e) => Err(End::Abrupt(format!("read error: {e}"), None)),
                Ok(n) => {
                    keep_alive.heard();
                    self.reading.traffic = self.reading.traffic || n == QUIET_READ;
                    Ok(())
                }
            });
        }
    }

    /// The end: the router told (it publishes the will, or not), then what the writer has
    /// queued (e.g. a final PUBACK) flushed for a moment.
    async fn close(self, end: End, ctx: &ConnectionContext) {
        let Live {
            mut stream,
            mut writing,
            reading,
            writer_done,
        } = self;
        let client_id = &reading.client_id;
        let (graceful, session_expiry, tell) = match &end {
            End::Disconnect {
                publish_will,
                session_expiry,
            } => {
                info!(client_id = %client_id, publish_will, "client disconnected");
                (!publish_will, *session_expiry, None)
            }
            End::Abrupt(reason, tell) => {
                info!(client_id = %client_id, reason = %reason, "connection closed");
                (false, None, *tell)
            }
        };
        // The router writes the DISCONNECT telling why (a 3.1.1 client just sees the close),
        // after anything it sent before, the CONNACK above all.
        let told = ctx
            .router
            .send(RouterCmd::Disconnected {
                conn: reading.conn,
                graceful,
                session_expiry,
                tell,
            })
            .await;
        if let (Err(_), Some(tell)) = (told, tell) {
            // The router is gone (the broker is stopping): say it here.
            reading.outbox.send(Outbound::Close(tell));
        }
        let (client_id, unacknowledged) =
            (reading.client_id.clone(), reading.unacknowledged.clone());
        drop(reading);
        if !writer_done {
            let busy = AtomicBool::new(false);
            let side = WriterSide {
                busy: &busy,
                client_id: &client_id,
                unacknowledged: unacknowledged.as_deref(),
                stats: &ctx.stats,
            };
            let _ = timeout(Duration::from_millis(100), writing.run(&mut stream, &side)).await;
        }
    }
}

/// Back-pressure on a publisher (outbox.rs has the policy): waits before reading more from
/// it while more than its share of its messages wait in the router's queue, then while a
/// live subscriber it feeds QoS 0 is behind, unless that one turns out slow.
async fn pace(outbox: &Outbox, ctx: &ConnectionContext, client_id: &str) {
    // The router runs behind its publishers: keeping each one's part of its queue short
    // means a subscriber the router finds behind is behind by little when the publisher
    // hears of it (just below), and one publisher cannot fill the router's queue.
    outbox.router_caught_up().await;
    if let Some(subscriber) = outbox.take_wait() {
        ctx.stats.publisher_waits.fetch_add(1, Ordering::Relaxed);
        if !subscriber.caught_up().await {
            ctx.stats.slow_subscribers.fetch_add(1, Ordering::Relaxed);
            debug!(
                client_id,
                "a subscriber this client feeds QoS 0 stayed behind: marked slow"
            );
        }
    }
}

/// Decodes and hands on every whole packet buffered, then reads more, until the connection
/// ends (`Some`) or there is nothing to read while the writer is idle (`None`: quiet).
async fn read_loop(
    reader: &mut (impl AsyncRead + Unpin),
    reading: &mut Reading,
    ctx: &ConnectionContext,
    writer_busy: &AtomicBool,
) -> Option<End> {
    let mut ingest_paused = ctx.ingest_paused.clone();
    loop {
        // Handle every whole packet already buffered before reading again.
        loop {
            let Reading {
                buf,
                decoder,
                conn,
                client_id,
                session_expiry,
                unacknowledged,
                outbox,
                guard,
                has_published,
                ..
            } = &mut *reading;
            let client_id = &**client_id;
            let packet = match decoder.decode(buf, ctx.limits.max_packet_size) {
                Ok(p) => p,
                Err(DecodeError::Incomplete) => break,
                Err(e) => {
                    ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(client_id, error = %e, "bad packet: closing connection");
                    return Some(abrupt(e.to_string(), e.close_reason()));
                }
            };
            if let Inbound::Disconnect(d) = &packet {
                return Some(on_disconnect(d, *session_expiry, client_id, ctx));
            }
            if let Some(end) =
                over_receive_maximum(&packet, unacknowledged.as_deref(), ctx, client_id)
            {
                return Some(end);
            }
            if matches!(packet, Inbound::Publish(_)) {
                *has_published = true;
                if let Some(bucket) = &mut guard.publish_rate {
                    if !bucket.try_take(Instant::now()) {
                        ctx.stats
                            .publish_rate_exceeded
                            .fetch_add(1, Ordering::Relaxed);
                        warn!(
                            client_id,
                            max_publish_rate = ctx.limits.max_publish_rate,
                            "publish rate over max_publish_rate: closing connection"
                        );
                        return Some(abrupt(
                            "max_publish_rate exceeded",
                            CloseReason::QuotaExceeded,
                        ));
                    }
                }
            }
            if let Err(reason) = dispatch(packet, *conn, client_id, ctx, guard, outbox).await {
                ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                warn!(client_id, reason, "protocol violation: closing connection");
                return Some(abrupt(reason, CloseReason::ProtocolError));
            }
        }
        // Cancel safety: pacing holds no data (a partial packet stays in `buf`).
        pace(&reading.outbox, ctx, &reading.client_id).await;
        if reading.has_published && *ingest_paused.borrow() {
            debug!(
                client_id = &*reading.client_id,
                "store full or failing: not reading from this publisher"
            );
            if ingest_paused.wait_for(|paused| !*paused).await.is_err() {
                return Some(abrupt("broker stopping", CloseReason::ServerShuttingDown));
            }
        }
        // Reads run at least 1 KiB at a time once the client sends more than its CONNECT;
        // a client that only connected keeps the small buffer its CONNECT came in, and one
        // whose buffer was given back (quiet) gets it again with its next bytes.
        let deadline = reading.outbox.keep_alive().deadline();
        let buf = &mut reading.buf;
        if (reading.traffic || !buf.is_empty())
            && buf.capacity() > 0
            && buf.capacity() - buf.len() < 1024
        {
            buf.reserve(4096);
        }
        match read_step(reader, buf, deadline, writer_busy).await {
            Step::Read(Ok(0)) => {
                return Some(End::Abrupt("connection closed by client".into(), None))
            }
            Step::Read(Err(e)) => return Some(End::Abrupt(format!("read error: {e}"), None)),
            Step::Read(Ok(_)) => reading.heard(),
            Step::KeepAliveExpired => {
                ctx.stats
                    .keep_alive_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return Some(abrupt("keep-alive expired", CloseReason::KeepAliveTimeout));
            }
            Step::WriterBusy => {}
            Step::Quiet => return None,
        }
    }
}

/// What one read step of the serving phase came to.
enum Step {
    Read(std::io::Result<usize>),
    KeepAliveExpired,
    /// Nothing read while lingering, but the writer took a packet meanwhile: serve on.
    WriterBusy,
    /// Nothing to read nor write for [`QUIET_AFTER`]: the connection goes quiet.
    Quiet,
}

/// Reads, or finds the connection idle: nothing to read while the writer waits on an empty
/// outbox, for [`QUIET_AFTER`]. Cancel safety: `read_buf` takes nothing from the socket
/// unless it completes.
async fn read_step(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    deadline: Instant,
    writer_busy: &AtomicBool,
) -> Step {
    match tokio::time::timeout_at(deadline, read_or_idle(reader, buf, writer_busy)).await {
        Err(_) => Step::KeepAliveExpired,
        Ok(Some(read)) => Step::Read(read),
        Ok(None) => {
            // Linger before going quiet: a client that was just busy is likely to be again
            // within milliseconds, and going quiet and back costs a box and the quiet wait's
            // registrations.
            let linger_until = (Instant::now() + QUIET_AFTER).min(deadline);
            let never_idle = AtomicBool::new(true);
            match tokio::time::timeout_at(linger_until, read_or_idle(reader, buf, &never_idle))
                .await
            {
                Ok(Some(read)) => Step::Read(read),
                Ok(None) => Step::WriterBusy,
                Err(_) if Instant::now() >= deadline => Step::KeepAliveExpired,
                Err(_) if writer_busy.load(Ordering::Relaxed) => Step::WriterBusy,
                Err(_) => Step::Quiet,
            }
        }
    }
}

/// One read: `Some` with its result, or `None` as soon as the socket has nothing for us while
/// `writer_busy` is false (while it is true, waits for bytes).
fn read_or_idle<'a>(
    reader: &'a mut (impl AsyncRead + Unpin),
    buf: &'a mut BytesMut,
    writer_busy: &'a AtomicBool,
) -> impl Future<Output = Option<std::io::Result<usize>>> + 'a {
    std::future::poll_fn(move |cx| {
        let read = std::pin::pin!(reader.read_buf(&mut *buf));
        match read.poll(cx) {
            Poll::Ready(read) => Poll::Ready(Some(read)),
            Poll::Pending if writer_busy.load(Ordering::Relaxed) => Poll::Pending,
            Poll::Pending => Poll::Ready(None),
        }
    })
}

/// What a quiet connection's future is made of, for the footprint test: its state between
/// phases, and the waits the quiet phase holds.
#[cfg(test)]
pub(crate) fn quiet_sizes() -> Vec<(&'static str, usize)> {
    type S = tokio::net::TcpStream;
    vec![
        (
            "Live<TcpStream> (state between phases)",
            std::mem::size_of::<Live<S>>(),
        ),
        ("  Reading", std::mem::size_of::<Reading>()),
        ("  Writing", std::mem::size_of::<Writing>()),
    ]
}
