//! MQTT 3.1.1 packets and their strict wire form.
//!
//! [`Decoder::decode`] reads what a *client* sends to a server and refuses every packet the
//! standard tells a server to refuse (reserved flags, packet id 0, missing filters, bytes after a
//! payload, invalid UTF-8, and so on), with a [`DecodeError`] naming the rule. A protocol level
//! other than 4 is [`DecodeError::UnsupportedLevel`], so the caller can answer CONNACK 0x01
//! before it closes. [`encode`] writes any packet (servers write the server-to-client ones;
//! the client-to-server ones serve test clients and fuzzing).
//!
//! Shaped so that MQTT 5 can follow: the level is carried in [`Connect`], and reason codes are
//! enums rather than bytes.

mod decode;
mod encode;
mod packet;

pub use decode::{DecodeError, Decoder};
pub use encode::{encode, EncodeError};
pub use packet::{
    ConnAck, Connect, ConnectCode, Packet, Publish, QoS, SubAck, SubAckCode, Subscribe,
    Unsubscribe, Will,
};
