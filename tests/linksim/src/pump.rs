//! One proxied connection: wait out a partition, connect to the target, then pump each
//! direction through a reader task and a delayed writer task joined by a bounded queue.
//!
//! The reader keeps reading while earlier chunks wait out their latency, so latency does not
//! become a throughput cap of one chunk per round trip. Each task watches the connection's
//! [`Mode`] and handles a fault itself: a reset must set SO_LINGER to zero on the socket before
//! the last half of it is dropped, and the halves live in the tasks, so aborting the tasks
//! from outside would close gracefully (FIN) instead of resetting.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::sleep_until;

use crate::{Direction, Mode, Shared};

/// Bytes read from a socket at a time.
const READ_BUFFER: usize = 64 * 1024;
/// Bytes a direction may hold in flight before its reader stops reading (TCP back-pressure).
const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// With a bandwidth cap, writes go out in slices of 1/50 s worth of traffic (at least 1 KiB),
/// so the rate is smooth rather than a 64 KiB burst followed by a pause.
const PACING_SLICES_PER_SECOND: u64 = 50;
const MIN_PACING_SLICE: u64 = 1024;

/// What travels from a reader to its writer.
enum Segment {
    Data {
        bytes: Vec<u8>,
        deliver_at: Instant,
        /// Room taken in the queue, given back when the chunk is written or discarded.
        _room: OwnedSemaphorePermit,
    },
    /// The source closed its write half: pass the FIN on.
    Eof { deliver_at: Instant },
}

/// Either a fault arrived first, or the awaited future finished.
enum Event<T> {
    Fault(Mode),
    Done(T),
}

/// Why a writer stopped before delivering a chunk.
enum Stop {
    Fault(Mode),
    /// The destination socket failed (e.g. the peer reset it).
    Broken,
}

pub(crate) async fn run_connection(
    client: TcpStream,
    id: u64,
    shared: Arc<Shared>,
    mode: watch::Receiver<Mode>,
) {
    serve(client, &shared, mode).await;
    shared.unregister(id);
}

async fn serve(client: TcpStream, shared: &Arc<Shared>, mut mode: watch::Receiver<Mode>) {
    let _ = client.set_nodelay(true);
    match hold_while_partitioned(&client, shared, &mut mode).await {
        Hold::Proceed => {}
        Hold::ClientGone => return,
        Hold::Fault(fault) => return abandon(client, fault, shared.zombie_hold).await,
    }
    // Cancel-safe: dropping `connect` merely abandons the attempt.
    let server = match unless_fault(&mut mode, TcpStream::connect(shared.target.as_str())).await {
        Event::Fault(fault) => return abandon(client, fault, shared.zombie_hold).await,
        Event::Done(Ok(server)) => server,
        // The target is down: the client sees its connection reset, as through a real proxy.
        Event::Done(Err(_)) => return abandon(client, Mode::Reset, shared.zombie_hold).await,
    };
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = spawn_direction(Direction::Up, client_read, server_write, shared, &mode);
    let down = spawn_direction(Direction::Down, server_read, client_write, shared, &mode);
    // Both sockets close once all four tasks are done and have dropped their halves.
    for task in up.into_iter().chain(down) {
        let _ = task.await;
    }
}

enum Hold {
    Proceed,
    ClientGone,
    Fault(Mode),
}

/// Keeps a new connection away from the target while a partition is on.
async fn hold_while_partitioned(
    client: &TcpStream,
    shared: &Shared,
    mode: &mut watch::Receiver<Mode>,
) -> Hold {
    // Once the client has sent something, `peek` would return at once for ever; after that
    // a close can only be noticed when the partition ends.
    let mut watch_client = true;
    let mut probe = [0u8; 1];
    while let Some(end) = shared.partition_end() {
        // Cancel-safe: a fault watch, a sleep, and `peek`, which consumes nothing.
        let peeked = tokio::select! {
            biased;
            fault = fault_of(mode) => return Hold::Fault(fault),
            _ = sleep_until(end.into()) => None,
            peeked = client.peek(&mut probe), if watch_client => Some(peeked),
        };
        match peeked {
            Some(Ok(0)) | Some(Err(_)) => return Hold::ClientGone,
            Some(Ok(_)) => watch_client = false,
            None => {}
        }
    }
    Hold::Proceed
}

fn spawn_direction(
    direction: Direction,
    source: OwnedReadHalf,
    destination: OwnedWriteHalf,
    shared: &Arc<Shared>,
    mode: &watch::Receiver<Mode>,
) -> [tokio::task::JoinHandle<()>; 2] {
    let (queue, queued) = mpsc::unbounded_channel();
    // The channel is unbounded in chunks but bounded in bytes by this semaphore, so that many
    // small chunks (MQTT packets) are not capped by a chunk count.
    let room = Arc::new(Semaphore::new(QUEUE_BYTES));
    let reader = tokio::spawn(read_side(
        direction,
        source,
        queue,
        room,
        Arc::clone(shared),
        mode.clone(),
    ));
    let writer = tokio::spawn(write_side(
        direction,
        destination,
        queued,
        Arc::clone(shared),
        mode.clone(),
    ));
    [reader, writer]
}

/// Reads chunks, stamps each with its delivery time and queues it for the writer.
async fn read_side(
    direction: Direction,
    mut source: OwnedReadHalf,
    queue: mpsc::UnboundedSender<Segment>,
    room: Arc<Semaphore>,
    shared: Arc<Shared>,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut last_deliver_at = Instant::now();
    loop {
        // Cancel-safe: `read` takes nothing from the socket unless it completes.
        let read = match unless_fault(&mut mode, source.read(&mut buffer)).await {
            Event::Fault(fault) => return abandon(source, fault, shared.zombie_hold).await,
            Event::Done(read) => read,
        };
        let length = match read {
            Ok(length) if length > 0 => length,
            // End of stream, or the source failed: either way the other side gets a FIN.
            _ => {
                let deliver_at = shared.deliver_at(direction, last_deliver_at) + shared.slow_close;
                let _ = queue.send(Segment::Eof { deliver_at });
                return;
            }
        };
        last_deliver_at = shared.deliver_at(direction, last_deliver_at);
        // Cancel-safe: a dropped semaphore acquire only gives up its place in line. Waiting
        // here is the back-pressure: the source's bytes stay in its socket buffers.
        // `length` fits: it is at most READ_BUFFER.
        let permits = length as u32;
        let room =
            match unless_fault(&mut mode, Arc::clone(&room).acquire_many_owned(permits)).await {
                Event::Fault(fault) => return abandon(source, fault, shared.zombie_hold).await,
                Event::Done(Ok(room)) => room,
                Event::Done(Err(_)) => return, // never closed; nothing sensible to do
            };
        let segment = Segment::Data {
            bytes: buffer[..length].to_vec(),
            deliver_at: last_deliver_at,
            _room: room,
        };
        if queue.send(segment).is_err() {
            return; // the writer gave up: its socket is broken
        }
    }
}

/// Writes each queued chunk to the destination once its time has come.
async fn write_side(
    direction: Direction,
    mut destination: OwnedWriteHalf,
    mut queued: mpsc::UnboundedReceiver<Segment>,
    shared: Arc<Shared>,
    mut mode: watch::Receiver<Mode>,
) {
    loop {
        // Cancel-safe: an mpsc `recv` loses no message when dropped.
        let segment = match unless_fault(&mut mode, queued.recv()).await {
            Event::Fault(fault) => {
                drop(queued); // queued data is discarded, not delivered late
                return abandon_writer(destination, fault, shared.zombie_hold).await;
            }
            Event::Done(Some(segment)) => segment,
            Event::Done(None) => return, // the reader stopped without an EOF
        };
        let outcome = match segment {
            Segment::Data {
                bytes, deliver_at, ..
            } => match wait_to_deliver(deliver_at, &shared, &mut mode).await {
                Ok(()) => deliver(direction, &mut destination, &bytes, &shared, &mut mode).await,
                Err(fault) => Err(Stop::Fault(fault)),
            },
            Segment::Eof { deliver_at } => {
                if let Err(fault) = wait_to_deliver(deliver_at, &shared, &mut mode).await {
                    drop(queued);
                    return abandon_writer(destination, fault, shared.zombie_hold).await;
                }
                let _ = destination.shutdown().await;
                return;
            }
        };
        match outcome {
            Ok(()) => {}
            Err(Stop::Fault(fault)) => {
                drop(queued);
                return abandon_writer(destination, fault, shared.zombie_hold).await;
            }
            Err(Stop::Broken) => return,
        }
    }
}

/// Writes one chunk, paced by the bandwidth cap if there is one.
async fn deliver(
    direction: Direction,
    destination: &mut OwnedWriteHalf,
    bytes: &[u8],
    shared: &Shared,
    mode: &mut watch::Receiver<Mode>,
) -> Result<(), Stop> {
    let slice_length = match shared.bandwidth {
        Some(rate) => {
            (rate / PACING_SLICES_PER_SECOND).clamp(MIN_PACING_SLICE, READ_BUFFER as u64) as usize
        }
        None => bytes.len().max(1),
    };
    for slice in bytes.chunks(slice_length) {
        if let Some(rate) = shared.bandwidth {
            let start = shared.book_bandwidth(direction, slice.len(), rate);
            // Also waits out a partition that began in the middle of a long chunk.
            wait_to_deliver(start, shared, mode)
                .await
                .map_err(Stop::Fault)?;
        }
        let mut written = 0;
        while written < slice.len() {
            // Cancel-safe: `write` writes nothing if dropped before it completes, and what it
            // did write is counted in `written`, which lives outside the select.
            match unless_fault(mode, destination.write(&slice[written..])).await {
                Event::Fault(fault) => return Err(Stop::Fault(fault)),
                Event::Done(Ok(count)) if count > 0 => {
                    written += count;
                    shared.count_delivered(direction, count);
                }
                Event::Done(_) => return Err(Stop::Broken),
            }
        }
    }
    Ok(())
}

/// Waits until `deliver_at` and until no partition is on (re-checked, as partitions can
/// start or grow while we sleep). Frozen data is kept and then delivered in order.
async fn wait_to_deliver(
    deliver_at: Instant,
    shared: &Shared,
    mode: &mut watch::Receiver<Mode>,
) -> Result<(), Mode> {
    loop {
        let until = shared
            .partition_end()
            .map_or(deliver_at, |end| end.max(deliver_at));
        if until <= Instant::now() {
            return Ok(());
        }
        // Cancel-safe: a sleep.
        if let Event::Fault(fault) = unless_fault(mode, sleep_until(until.into())).await {
            return Err(fault);
        }
    }
}

/// Ends a socket (or half of one) after a fault: a reset sets SO_LINGER to zero so the close
/// sends an RST; a zombie keeps the socket silent until `zombie_hold` has passed (or the
/// runtime is dropped with the simulator) and then drops it quietly.
async fn abandon<S: AsRef<TcpStream>>(socket: S, fault: Mode, zombie_hold: Duration) {
    match fault {
        Mode::Reset => set_zero_linger(socket.as_ref()),
        Mode::Zombie => tokio::time::sleep(zombie_hold).await,
        Mode::Normal => {}
    }
    drop(socket);
}

/// [`abandon`] for a write half, whose drop would otherwise send a FIN ahead of the RST.
async fn abandon_writer(half: OwnedWriteHalf, fault: Mode, zombie_hold: Duration) {
    match fault {
        Mode::Reset => {
            set_zero_linger(half.as_ref());
            // No shutdown on drop: the socket closes (with an RST) with its read half.
            half.forget();
        }
        _ => abandon(half, fault, zombie_hold).await,
    }
}

fn set_zero_linger(socket: &TcpStream) {
    // A zero linger never blocks on close; `set_zero_linger` would need tokio 1.50 while the
    // workspace asks for 1.48.
    #[allow(deprecated)]
    let _ = socket.set_linger(Some(Duration::ZERO));
}

/// Runs `work` unless a fault comes first. Only pass cancel-safe futures: when the fault wins,
/// `work` is dropped half done.
async fn unless_fault<F: Future>(mode: &mut watch::Receiver<Mode>, work: F) -> Event<F::Output> {
    // Cancel-safe on the fault side: watching a watch channel consumes nothing. The caller
    // vouches for `work`.
    tokio::select! {
        biased;
        fault = fault_of(mode) => Event::Fault(fault),
        output = work => Event::Done(output),
    }
}

/// Resolves once the connection has been reset or made a zombie (at once if it already was).
///
/// The mode is read on every poll, not only when the watch wakes us: the watch notifies its
/// waiters one shard at a time, so a task woken by something else (its reader dropping the
/// queue after seeing the fault) could otherwise miss a fault already set and close with a FIN.
async fn fault_of(mode: &mut watch::Receiver<Mode>) -> Mode {
    let probe = mode.clone();
    let mut notified = pin!(notified_of_fault(mode));
    poll_fn(|context| match *probe.borrow() {
        Mode::Normal => notified.as_mut().poll(context),
        fault => Poll::Ready(fault),
    })
    .await
}

/// Waits for the watch to report a fault; this is what wakes the task.
async fn notified_of_fault(mode: &mut watch::Receiver<Mode>) -> Mode {
    // The guard (not `Send`) must be gone before awaiting again, hence the copy first.
    let fault = mode
        .wait_for(|mode| *mode != Mode::Normal)
        .await
        .map(|fault| *fault);
    match fault {
        Ok(fault) => fault,
        // The registry entry is gone, so no fault can come any more.
        Err(_) => std::future::pending().await,
    }
}
