//! The fixed header every MQTT version shares: how long the next packet is, and the
//! fixed-header flag rules a receiver must enforce. Both adapters frame with these before
//! their codec sees a byte, so `max_packet_size` always counts the whole packet (fixed
//! header included, as MQTT 5 defines Maximum Packet Size) and a packet type's reserved
//! flags are checked the same way for 3.1.1 and 5.

use crate::protocol::inbound::DecodeError;

/// Length of the whole packet at the head of `buf` (fixed header + remaining length),
/// without consuming anything. `Incomplete` until the fixed header is whole; `TooLarge`
/// as soon as the header says the packet exceeds `max_packet_size`, before the body comes.
pub fn packet_len(buf: &[u8], max_packet_size: usize) -> Result<usize, DecodeError> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Err(DecodeError::Incomplete);
        };
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            let total = 1 + (i + 1) + remaining;
            if total > max_packet_size {
                return Err(DecodeError::TooLarge(total));
            }
            return Ok(total);
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than 4 bytes".into(),
    ))
}

/// Length of the fixed header (type byte plus 1-4 remaining-length bytes) of a framed packet.
pub fn header_len(frame: &[u8]) -> usize {
    1 + frame[1..]
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |i| i + 1)
}

/// The reserved fixed-header flags [MQTT-2.2.2-1], [MQTT-2.2.2-2] (the same table in 3.1.1
/// and 5), QoS 3 [MQTT-3.3.1-4] and DUP on QoS 0 [MQTT-3.3.1-2].
pub fn check_flags(first: u8) -> Result<(), DecodeError> {
    let packet_type = first >> 4;
    let flags = first & 0x0F;
    let flags_ok = match packet_type {
        3 => {
            let qos = (flags >> 1) & 0b11;
            qos != 3 && !(qos == 0 && flags & 0b1000 != 0)
        }
        6 | 8 | 10 => flags == 0b0010,
        _ => flags == 0,
    };
    if flags_ok {
        Ok(())
    } else {
        Err(DecodeError::Malformed(format!(
            "bad flags 0x{flags:x} for packet type {packet_type}"
        )))
    }
}

/// The protocol level of a CONNECT at the head of `buf`: `Incomplete` until the protocol
/// name and level have arrived; `None` when the first packet is not a CONNECT, has no
/// protocol name MQTT knows, or is malformed before its level (the 3.1.1 adapter then
/// refuses it as it always did, with the same error).
pub fn connect_level(buf: &[u8]) -> Result<Option<u8>, DecodeError> {
    if buf.first().is_some_and(|b| *b != 0x10) {
        return Ok(None);
    }
    let total = match packet_len(buf, usize::MAX) {
        Ok(total) => total,
        Err(DecodeError::Incomplete) => return Err(DecodeError::Incomplete),
        Err(_) => return Ok(None),
    };
    // What is not there yet is awaited only if the packet has not ended before it.
    let wait_or_none = |needed: usize| {
        if needed >= total {
            Ok(None)
        } else {
            Err(DecodeError::Incomplete)
        }
    };
    let at = header_len(buf);
    let name_len = match (buf.get(at), buf.get(at + 1)) {
        (Some(&hi), Some(&lo)) => usize::from(u16::from_be_bytes([hi, lo])),
        _ => return wait_or_none(at + 1),
    };
    if name_len != 4 && name_len != 6 {
        return Ok(None);
    }
    let level_at = at + 2 + name_len;
    match buf.get(level_at) {
        Some(&level) if level_at < total => Ok(Some(level)),
        Some(_) => Ok(None),
        None => wait_or_none(level_at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_len_counts_the_whole_packet_and_waits_for_the_header() {
        assert!(matches!(
            packet_len(&[0x30], 100),
            Err(DecodeError::Incomplete)
        ));
        assert!(matches!(
            packet_len(&[0x30, 0x80], 100),
            Err(DecodeError::Incomplete)
        ));
        assert_eq!(packet_len(&[0x30, 0x05], 100).ok(), Some(7));
        // 0x80 0x01 = 128 remaining, 3 header bytes: 131 in all.
        assert_eq!(packet_len(&[0x30, 0x80, 0x01], 131).ok(), Some(131));
        assert!(matches!(
            packet_len(&[0x30, 0x80, 0x01], 130),
            Err(DecodeError::TooLarge(131))
        ));
        assert!(matches!(
            packet_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn connect_level_reads_the_level_after_the_name() {
        // CONNECT "MQTT" level 5
        let v5 = [0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02];
        assert_eq!(connect_level(&v5).ok(), Some(Some(5)));
        assert!(matches!(
            connect_level(&v5[..8]),
            Err(DecodeError::Incomplete)
        ));
        assert_eq!(connect_level(&[0xC0, 0x00]).ok(), Some(None));
        assert_eq!(
            connect_level(&[0x10, 0x03, 0x00, 0x09, 0x00]).ok(),
            Some(None)
        );
        // Malformed before the level: handed on (the 3.1.1 adapter says why), never awaited.
        for whole in [
            &[0x10, 0xff, 0xff, 0xff, 0xff][..],
            &[0x10, 0x04, 0x00, 0x06, b'M', b'Q'],
            &[0x10, 0x08, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p'],
            &[0x10, 0x01, 0x00],
        ] {
            assert_eq!(connect_level(whole).ok(), Some(None), "{whole:02x?}");
        }
        // A CONNECT still arriving is awaited.
        assert!(matches!(
            connect_level(&[0x10, 0x10, 0x00]),
            Err(DecodeError::Incomplete)
        ));
    }
}
