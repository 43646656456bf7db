//! The codec a connection uses, picked by its CONNECT: [`Decoder`] reads the protocol level
//! of the first packet and keeps the adapter for that version (`v4` or `v5`) for the
//! connection's life; [`Encoder`] writes what the router sends in the same version.

use bytes::BytesMut;

use crate::protocol::inbound::{DecodeError, Inbound};
use crate::protocol::message::Outbound;
use crate::protocol::{frame, v4, v5};

/// A connection's packet decoder: undecided until the CONNECT's protocol level is read,
/// then the adapter for that version for the connection's life.
#[derive(Debug)]
pub(crate) enum Decoder {
    Undecided,
    V4,
    V5(Box<v5::V5Decoder>),
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::Undecided
    }

    /// Decodes the next whole packet from `buf` (consuming it), or returns `Incomplete`
    /// leaving `buf` as it was.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        max_packet_size: usize,
    ) -> Result<Inbound, DecodeError> {
        if let Decoder::Undecided = self {
            // Level 5 goes to the MQTT 5 adapter; anything else (3.1.1, 3.1, a packet that
            // is not a CONNECT, garbage) to the 3.1.1 one, which refuses it as before.
            *self = match frame::connect_level(buf)? {
                Some(5) => Decoder::V5(Box::new(v5::V5Decoder::new())),
                _ => Decoder::V4,
            };
        }
        match self {
            Decoder::V5(decoder) => decoder.decode(buf, max_packet_size),
            _ => v4::decode(buf, max_packet_size),
        }
    }
}

/// A connection's packet encoder, for the version its CONNECT chose.
#[derive(Debug)]
pub(crate) enum Encoder {
    V4,
    V5(Box<v5::V5Encoder>),
}

impl Encoder {
    /// Appends the encoding of `packet` to `buf` (a `Close` encodes to nothing in 3.1.1
    /// and to a DISCONNECT with its reason in MQTT 5).
    pub fn encode(&mut self, packet: &Outbound, buf: &mut BytesMut) -> Result<(), String> {
        match self {
            Encoder::V4 => v4::encode(packet, buf).map_err(|e| e.to_string()),
            Encoder::V5(encoder) => encoder.encode(packet, buf).map_err(|e| e.to_string()),
        }
    }
}
