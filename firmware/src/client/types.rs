//! The client's vocabulary, shared by its callers (re-exported from `client`) and by the
//! client's own files: the transport it drives, its timing, the buffer sizes, the counters and
//! what `poll` hands back. A leaf: it names nothing else of `client`, so `mod.rs` and `session.rs`
//! can both use it without an import circle.

use crate::event::{MAX_DEVICE_ID, MAX_EVENT_JSON};
use embedded_io::{Read, ReadReady, Write};

/// A byte stream to the broker. `read` is only called after `read_ready` said true, so it
/// must not block then; `write` may block (briefly) until bytes are accepted.
pub trait Transport: Read + Write + ReadReady {
    /// Opens, or opens again, the stream before a CONNECT. A UART does nothing here.
    fn open(&mut self) -> Result<(), Self::Error>;
    /// Closes the stream after the client gave up on it.
    fn close(&mut self) {}
}

/// Receive buffer: larger incoming packets are skipped.
pub const RX_BUF: usize = 256;
const MAX_TOPIC: usize = 8 + MAX_DEVICE_ID + 7;
/// Transmit buffer: the largest packet the client sends is an event PUBLISH (rounded up to
/// whole words).
pub const TX_BUF: usize = (5 + 2 + MAX_TOPIC + 2 + MAX_EVENT_JSON + 3) & !3;

/// Session timing.
#[derive(Clone, Copy, Debug)]
pub struct ClientConfig {
    pub keep_alive_s: u16,
    /// How long to wait for CONNACK or PINGRESP before the link is considered dead.
    pub response_timeout_ms: u32,
    pub backoff_min_ms: u32,
    pub backoff_max_ms: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            keep_alive_s: 30,
            response_timeout_ms: 5_000,
            backoff_min_ms: 500,
            backoff_max_ms: 30_000,
        }
    }
}

/// Counters, for progress output and tests. They wrap at 2^32 (wrapping adds are smaller in
/// flash than saturating ones; the `dropped` count carried in events saturates).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Events sent for the first time.
    pub published: u32,
    /// Events the broker acknowledged (PUBACK).
    pub acknowledged: u32,
    /// Events dropped from a full outbox.
    pub dropped: u32,
    /// PUBLISHes sent again with DUP after a reconnect.
    pub resent: u32,
    /// CONNACKs accepted.
    pub connects: u32,
    /// Links dropped.
    pub link_losses: u32,
}

/// The device id or sensor name is empty, too long or not a valid topic level.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BadIdentity;

/// What `poll` hands to the caller.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Incoming<'a> {
    /// A message on `sensors/<id>/config` (possibly empty: a cleared retained document).
    Config(&'a [u8]),
}

/// The result of a configuration document, reported on the status topic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConfigReport {
    Applied,
    Rejected(&'static str),
}
