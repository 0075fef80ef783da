//! The gateway's MQTT 3.1.1 decoder on arbitrary client bytes.
//!
//! Checks, beyond "never panics":
//! * bytes delivered in two pieces (split where the first input byte says) decode to the same
//!   packets and the same verdict as the same bytes delivered at once, as they do when TCP
//!   splits a stream anywhere;
//! * every packet the decoder accepts encodes again, and that encoding decodes to the same
//!   packet (a packet the gateway accepted, it can forward unchanged).
//!
//! Allocation stays bounded because the decoder refuses a packet over its maximum size from
//! the fixed header alone; libFuzzer's `-malloc_limit_mb` (set by scripts/fuzz.sh) turns any
//! larger allocation into a crash.
#![no_main]

use bytes::BytesMut;
use fleet_mqtt::codec::{encode, DecodeError, Decoder};
use fleet_mqtt::Packet;
use libfuzzer_sys::fuzz_target;

/// Smaller than the gateway's 2 MiB default so that "too large" is reachable; large enough for
/// every seed.
const MAX_PACKET_SIZE: usize = 64 * 1024;

/// Packets decoded, then how decoding ended: `None` when it wanted more bytes.
type Outcome = (Vec<Packet>, Option<DecodeError>);

/// Decodes everything in `buf`, as the gateway's connection loop does.
fn drain(decoder: &Decoder, buf: &mut BytesMut, packets: &mut Vec<Packet>) -> Option<DecodeError> {
    loop {
        match decoder.decode(buf) {
            Ok(Some(p)) => packets.push(p),
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

fn decode_in_pieces(decoder: &Decoder, pieces: &[&[u8]]) -> Outcome {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        if let Some(e) = drain(decoder, &mut buf, &mut packets) {
            return (packets, Some(e));
        }
    }
    (packets, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let decoder = Decoder::new(MAX_PACKET_SIZE);
    let whole = decode_in_pieces(&decoder, &[bytes]);
    let at = usize::from(split).min(bytes.len());
    let (a, b) = bytes.split_at(at);
    let pieces = decode_in_pieces(&decoder, &[a, b]);
    assert_eq!(whole, pieces, "decoding depends on how the bytes arrive");

    for packet in &whole.0 {
        let mut out = BytesMut::new();
        encode(packet, &mut out).expect("an accepted packet encodes");
        assert_eq!(out.len(), packet.encoded_len(), "encoded_len is exact");
        let again = decoder
            .decode(&mut out)
            .expect("an encoded packet decodes")
            .expect("an encoded packet is complete");
        assert_eq!(&again, packet, "decode(encode(p)) != p");
        assert!(out.is_empty(), "bytes left after a re-encoded packet");
    }
});
