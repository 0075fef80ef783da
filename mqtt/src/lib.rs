//! The gateway's MQTT core: a strict MQTT 3.1.1 codec, sessions keyed by identity, and a router
//! with bounded queues and back-pressure. It does no I/O and reads no clock: the driver feeds it
//! packets, time and store completions, and carries out the actions it returns (packets to
//! write, connections to close, store writes). Like quinn-proto under quinn.
//!
//! * [`codec`]: bytes to [`Packet`]s and back, refusing everything the standard says a server
//!   must refuse.
//! * [`Engine`]: sessions, subscriptions, QoS 0/1/2, retained messages and wills, with the
//!   promises the gateway makes: a client reaches only what its [`Authorizer`] allows, and a
//!   QoS 1/2 publish is acknowledged only once every matching subscriber's queue holds it
//!   (durably, for persistent sessions).

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod codec;
mod engine;
pub mod topic;

pub use codec::{
    ConnAck, Connect, ConnectCode, Packet, Publish, QoS, SubAck, SubAckCode, Subscribe,
    Unsubscribe, Will,
};
pub use engine::{
    Action, Authorizer, CloseReason, ConnId, DeniedPublish, Disconnected, DropReason, Engine,
    Message, Notice, Role, SessionKey, Settings, StoreOp, StoreSeq, StoredMessage, StoredSession,
};
