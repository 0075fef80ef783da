//! Encoding any packet.

use bytes::BytesMut;

use super::Packet;

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string longer than 65,535 bytes.
    #[error("string of {0} bytes does not fit a length prefix")]
    StringTooLong(usize),
    /// The packet exceeds the largest remaining length (268,435,455 bytes).
    #[error("packet too large: {0} bytes")]
    TooLarge(usize),
    /// A field violates the standard (QoS 0 with a packet id, packet id 0, ...).
    #[error("cannot encode {packet}: {rule}")]
    Invalid {
        /// The packet type.
        packet: &'static str,
        /// What is wrong.
        rule: &'static str,
    },
}

/// Appends the wire form of `packet` to `out`. On error nothing is appended.
pub fn encode(packet: &Packet, out: &mut BytesMut) -> Result<(), EncodeError> {
    let _ = (packet, out);
    Err(EncodeError::Invalid {
        packet: "?",
        rule: "encoder not written yet",
    })
}
