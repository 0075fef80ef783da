//! MQTT 3.1.1 framing over rumqttd's v4 codec, made safe for hostile input: a decoder panic is
//! contained and reported as an error, packets with v5 properties are never handed to the v4
//! encoder (it panics on them), and the QoS and packet id of a PUBLISH are read from the raw
//! frame (rumqttd keeps those fields crate-private).

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Packet, Protocol};

/// Why bytes from a client are not a packet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum DecodeError {
    /// The codec refused the bytes.
    #[error("malformed packet: {0}")]
    Malformed(rumqttd::protocol::Error),
    /// The codec panicked on the bytes (a bug in it, contained here).
    #[error("malformed packet: decoder failed")]
    DecoderPanic,
    /// The first byte names a reserved packet type (0 or 15).
    #[error("malformed packet: reserved packet type {0}")]
    ReservedType(u8),
}

/// Reads the next whole packet from `buf`, or `Ok(None)` if more bytes are needed.
pub(crate) fn decode(
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(first) = buf.first() else {
        return Ok(None);
    };
    // Refuse at the first byte rather than wait for the body a garbage length announces.
    let kind = first >> 4;
    if kind == 0 || kind == 15 {
        return Err(DecodeError::ReservedType(kind));
    }
    match catch_unwind(AssertUnwindSafe(|| read_frame(buf, max_packet_size))) {
        Ok(r) => r,
        Err(_) => Err(DecodeError::DecoderPanic),
    }
}

/// The decoding itself, without the panic guard (tests call it directly: a test of "never
/// panics" must not run through a panic catcher).
fn read_frame(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Packet>, DecodeError> {
    match V4.read_mut(buf, max_packet_size) {
        Ok(packet) => Ok(Some(packet)),
        Err(rumqttd::protocol::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(DecodeError::Malformed(e)),
    }
}

/// Appends the encoding of `packet` to `out`, dropping any v5 properties first (the gateway
/// speaks MQTT 3.1.1 to clients). Packets that only a client sends are not encoded.
pub(super) fn encode(packet: Packet, out: &mut BytesMut) -> Result<(), rumqttd::protocol::Error> {
    let packet = match packet {
        Packet::ConnAck(a, _) => Packet::ConnAck(a, None),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(a, _) => Packet::PubAck(a, None),
        Packet::SubAck(a, _) => Packet::SubAck(a, None),
        Packet::UnsubAck(a, _) => Packet::UnsubAck(a, None),
        Packet::PubRec(a, _) => Packet::PubRec(a, None),
        Packet::PubRel(a, _) => Packet::PubRel(a, None),
        Packet::PubComp(a, _) => Packet::PubComp(a, None),
        Packet::PingResp(p) => Packet::PingResp(p),
        Packet::Disconnect(d, _) => Packet::Disconnect(d, None),
        // Client-to-server packets never go to a client.
        Packet::Connect(..)
        | Packet::Subscribe(..)
        | Packet::Unsubscribe(..)
        | Packet::PingReq(_) => return Ok(()),
    };
    V4.write(packet, out).map(drop)
}

/// QoS (0-2) and packet id of the PUBLISH frame at the start of `frame`, read from the raw
/// bytes. `None` if the frame is not a well-formed PUBLISH header.
pub(super) fn publish_header(frame: &[u8]) -> Option<(u8, u16)> {
    let first = *frame.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    // Remaining length: 1 to 4 bytes, 7 bits each.
    let mut at = 1;
    loop {
        let b = *frame.get(at)?;
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return None;
        }
    }
    let topic_len = usize::from(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
    at += 2 + topic_len;
    if qos == 0 {
        return Some((0, 0));
    }
    let pkid = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    Some((qos, pkid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_header_reads_qos_and_pkid() {
        // QoS 1, topic "a/b", pkid 0x1234, payload "x".
        let frame = [0x32, 8, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'x'];
        assert_eq!(publish_header(&frame), Some((1, 0x1234)));
        assert_eq!(publish_header(&[0x30, 4, 0, 1, b'a', b'x']), Some((0, 0)));
        assert_eq!(publish_header(&[0x32, 3, 0, 1]), None);
        assert_eq!(publish_header(&[0x10, 0]), None);
        assert_eq!(publish_header(&[]), None);
    }

    /// Every frame start a client can send, with a short body of junk, through the decoder
    /// with no panic guard: a panic fails the test. `decode` adds only the reserved-type check
    /// and the guard around this.
    #[test]
    fn garbage_never_panics() {
        let mut outcomes = [0usize; 3];
        for first in 0..=255u8 {
            if matches!(first >> 4, 0 | 15) {
                continue; // refused by `decode` before the codec sees them
            }
            for len in [0u8, 1, 2, 3, 5, 7, 0x7f] {
                for tail in [
                    &[0u8, 1, 2, 3, 4, 0xff, 0xff][..],
                    &[0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0],
                ] {
                    let bytes: Vec<u8> = [first, len].iter().chain(tail).copied().collect();
                    let mut buf = BytesMut::from(&bytes[..]);
                    match read_frame(&mut buf, 1024) {
                        Ok(Some(_)) => outcomes[0] += 1,
                        Ok(None) => outcomes[1] += 1,
                        Err(_) => outcomes[2] += 1,
                    }
                }
            }
        }
        // The corpus reaches every outcome, so it exercises more than the first check.
        assert!(outcomes.iter().all(|&n| n > 0), "outcomes {outcomes:?}");
    }

    proptest::proptest! {
        /// Arbitrary bytes behind every packet type's first byte: no panic, and a decoded
        /// packet consumes bytes (no loop on the same input).
        #[test]
        fn arbitrary_frames_never_panic(
            kind in 1u8..15,
            flags in 0u8..16,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let bytes: Vec<u8> = std::iter::once((kind << 4) | flags).chain(body).collect();
            let mut buf = BytesMut::from(&bytes[..]);
            let before = buf.len();
            if let Ok(Some(_)) = read_frame(&mut buf, 1024) {
                proptest::prop_assert!(buf.len() < before);
            }
        }
    }

    #[test]
    fn oversize_is_an_error() {
        // PUBLISH with a remaining length of 2,000 against a 1,024-byte limit.
        let mut buf = BytesMut::from(&[0x30, 0xd0, 0x0f, 0, 1, b'a'][..]);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(DecodeError::Malformed(_))
        ));
    }
}
