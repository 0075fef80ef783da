//! The engine's vocabulary: what the driver and the engine hand each other (ids, keys,
//! settings, messages, store writes, closes, notices, actions). Below every other part of the
//! engine; it imports none of them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::codec::QoS;

/// Index of a session in the engine's session table.
pub(super) type SessionIdx = usize;

/// A connection, numbered by the driver: unique for the life of the process, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What kind of party a session belongs to (from its certificate, or the gateway itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A device.
    Device,
    /// A cloud or site service.
    Service,
    /// Another gateway.
    Gateway,
    /// The gateway's own in-process services (no certificate, no socket).
    Internal,
}

/// Who a session belongs to: role, id and (for services running several processes) instance.
/// Two keys are the same session only if all three are equal, so a device whose id happens to
/// read `svc-1:a` never meets the session of service `svc-1`, instance `a`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    /// The role.
    pub role: Role,
    /// The id from the certificate.
    pub id: String,
    /// The instance part of a service's client id (`{id}:{instance}`), if any.
    pub instance: Option<String>,
}

impl std::fmt::Display for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = match self.role {
            Role::Device => "device",
            Role::Service => "service",
            Role::Gateway => "gateway",
            Role::Internal => "internal",
        };
        match &self.instance {
            Some(i) => write!(f, "{role}:{}:{i}", self.id),
            None => write!(f, "{role}:{}", self.id),
        }
    }
}

/// The access policy, as the engine asks it. Implemented by the gateway over its ACL; must be
/// a pure function of its arguments (it is asked again after [`Engine::set_authorizer`]).
pub trait Authorizer: Send + Sync {
    /// May `who` publish on the valid topic name `topic`?
    fn may_publish(&self, who: &SessionKey, topic: &str) -> bool;
    /// May `who` subscribe to the valid filter `filter`?
    fn may_subscribe(&self, who: &SessionKey, filter: &str) -> bool;
}

/// What happens to a PUBLISH the authorizer denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeniedPublish {
    /// Acknowledge it (so the client does not resend it forever) and drop it (counted).
    #[default]
    AckAndDrop,
    /// Close the connection.
    Disconnect,
}

/// Limits and policies. Every default is chosen for a small gateway with thousands of devices.
#[derive(Debug, Clone)]
pub struct Settings {
    /// QoS 1/2 messages sent to one connection and not yet acknowledged by it. Default 32:
    /// enough to fill a 1 Gbit/s link with 16 KiB messages at LAN round-trip times.
    pub max_inflight_out: usize,
    /// Incoming QoS 1/2 publishes one connection may have held unanswered (MQTT 5's receive
    /// maximum, for 3.1.1 clients). Over it the client is disconnected ([`CloseReason::TooManyHeld`]).
    /// Default 100: the default in-flight window of common clients (rumqttc, paho), so a
    /// well-behaved client stops on its own before it reaches the cap. PUBRELs waiting for
    /// their PUBCOMP count too (a client's window covers them). QoS 0 publishes waiting behind
    /// a held one are capped at the same number separately; over it they are dropped
    /// ([`DropReason::Qos0QueueFull`], counted for the publisher).
    pub max_held_in: usize,
    /// Incoming QoS 2 packet ids answered with PUBREC and not yet released by PUBREL. Over it
    /// the client is disconnected ([`CloseReason::TooManyUnreleased`]). Default 100.
    pub max_unreleased_in: usize,
    /// Messages queued for one *online* session beyond its in-flight ones. When full, new
    /// QoS 1/2 messages for it are held (back-pressure) and QoS 0 ones dropped (counted).
    /// Default 1,000.
    pub queue_messages: usize,
    /// Payload bytes queued for one online session. Default 8 MiB.
    pub queue_bytes: usize,
    /// Messages kept for one *offline* persistent session; over it the oldest is dropped
    /// (counted, [`DropReason::OfflineQueueFull`]). Default 1,000.
    pub offline_messages: usize,
    /// Payload bytes kept for one offline persistent session. Default 16 MiB.
    pub offline_bytes: usize,
    /// A subscriber whose queue has been full (holding back publishers) this long is
    /// disconnected ([`CloseReason::Stalled`]); its persistent session keeps its queue under the
    /// offline caps. Default 30 s.
    pub stalled_after: Duration,
    /// A persistent session offline this long is removed with its queue. Default 7 days.
    pub session_expiry: Duration,
    /// What a denied PUBLISH leads to. Default: acknowledged and dropped.
    pub denied_publish: DeniedPublish,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_inflight_out: 32,
            max_held_in: 100,
            max_unreleased_in: 100,
            queue_messages: 1_000,
            queue_bytes: 8 << 20,
            offline_messages: 1_000,
            offline_bytes: 16 << 20,
            stalled_after: Duration::from_secs(30),
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            denied_publish: DeniedPublish::AckAndDrop,
        }
    }
}

/// An application message as routed and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: Arc<str>,
    /// Payload (shared by every queue that holds it).
    pub payload: Bytes,
    /// QoS it was published at.
    pub qos: QoS,
    /// Whether it was published with RETAIN set.
    pub retain: bool,
}

/// Position of a store write in the engine's write log: writes are numbered 1, 2, 3, ... in the
/// order of their [`Action::Store`]; [`Engine::durable`] reports all up to one number as durable.
pub type StoreSeq = u64;

/// A write the store must make, in order. Only persistent sessions (clean session 0) and
/// retained messages are written; clean sessions live in memory only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// A persistent session was created, or a clean-session connection replaced a stored
    /// session: forget everything stored for `key` (subscriptions, queue, QoS 2 ids) first.
    SessionReset {
        /// The session.
        key: SessionKey,
        /// Whether the session is persistent from now on (false: remove it entirely).
        persistent: bool,
    },
    /// A persistent session has been offline longer than the expiry: remove it.
    SessionExpired {
        /// The session.
        key: SessionKey,
    },
    /// The session subscribed (or re-subscribed with a new QoS).
    Subscribed {
        /// The session.
        key: SessionKey,
        /// The filter.
        filter: String,
        /// The granted QoS.
        qos: QoS,
    },
    /// The session unsubscribed, or the authorizer no longer allows the filter.
    Unsubscribed {
        /// The session.
        key: SessionKey,
        /// The filter.
        filter: String,
    },
    /// A message was queued for the session. `id` is the session's message number
    /// (increasing, never reused); the packet id it is sent with is `1 + (id % 65535)`, so a
    /// restored session re-sends with the same packet ids.
    Enqueued {
        /// The session.
        key: SessionKey,
        /// Message number within the session.
        id: u64,
        /// The message, at the QoS it is delivered with (min of published and granted).
        message: Message,
    },
    /// A QoS 2 message was answered with PUBREC by the client and PUBREL sent: after a
    /// restart, re-send PUBREL rather than the PUBLISH.
    Released {
        /// The session.
        key: SessionKey,
        /// Message number.
        id: u64,
    },
    /// The message left the queue: acknowledged (PUBACK / PUBCOMP) or dropped.
    Dequeued {
        /// The session.
        key: SessionKey,
        /// Message number.
        id: u64,
    },
    /// An incoming QoS 2 packet id was accepted (its message routed); PUBREC follows once
    /// durable. A re-sent PUBLISH with this id is a duplicate until PUBREL.
    Qos2Received {
        /// The session.
        key: SessionKey,
        /// The client's packet id.
        packet_id: u16,
    },
    /// PUBREL arrived for the id.
    Qos2Released {
        /// The session.
        key: SessionKey,
        /// The client's packet id.
        packet_id: u16,
    },
    /// The retained message of `topic` is now `message`; `None` deletes it.
    Retained {
        /// The topic.
        topic: String,
        /// The message, or none.
        message: Option<Message>,
    },
}

/// One message of a stored session's queue, as the store gives it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Message number within the session.
    pub id: u64,
    /// The message.
    pub message: Message,
    /// Whether PUBREL had been sent for it ([`StoreOp::Released`]).
    pub released: bool,
}

/// A persistent session as the store gives it back on start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Who it belongs to.
    pub key: SessionKey,
    /// Subscriptions.
    pub subscriptions: Vec<(String, QoS)>,
    /// Queued messages, in id order.
    pub queue: Vec<StoredMessage>,
    /// Incoming QoS 2 ids awaiting PUBREL.
    pub unreleased: Vec<u16>,
}

/// Why the engine closes a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Another connection with the same [`SessionKey`] connected.
    Takeover,
    /// The client broke a rule of the protocol (a second CONNECT, PUBREL for nothing, ...).
    ProtocolViolation(&'static str),
    /// More incoming QoS 1/2 publishes held than [`Settings::max_held_in`], or more answers
    /// waiting to be written than a client that reads them can cause (it does not read).
    TooManyHeld,
    /// More QoS 2 ids awaiting PUBREL than [`Settings::max_unreleased_in`].
    TooManyUnreleased,
    /// Its queue was full for longer than [`Settings::stalled_after`].
    Stalled,
    /// It published where it may not, and the policy is [`DeniedPublish::Disconnect`].
    DeniedPublish,
}

/// How a connection ended, as the driver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnected {
    /// The client sent DISCONNECT: no will.
    Graceful,
    /// Lost, timed out, closed by the gateway or for a protocol error: the will is published.
    Abnormal,
}

/// Why a message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A QoS 0 message for an online session whose queue was full.
    Qos0QueueFull,
    /// The oldest message of an offline persistent session's queue, over its cap.
    OfflineQueueFull,
    /// The session expired with messages queued.
    SessionExpired,
}

/// Something to count and log (rate-limited by the driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Messages dropped for a session.
    Dropped {
        /// The session.
        key: SessionKey,
        /// Why.
        reason: DropReason,
        /// How many.
        count: u64,
    },
    /// A publish (or will) the authorizer denied.
    PublishDenied {
        /// Who.
        key: SessionKey,
        /// Where.
        topic: String,
    },
    /// A subscription the authorizer denied (SUBACK 0x80), or removed after a policy change.
    SubscriptionDenied {
        /// Who.
        key: SessionKey,
        /// The filter.
        filter: String,
        /// True when an existing subscription was removed by [`Engine::set_authorizer`].
        revoked: bool,
    },
    /// A will was published.
    WillPublished {
        /// Whose.
        key: SessionKey,
        /// Its topic.
        topic: String,
    },
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `conn` has packets to write: call [`Engine::transmit`] for it.
    Transmit(ConnId),
    /// Write the packets already taken with [`Engine::transmit`], then close `conn`. The engine
    /// has forgotten the connection; do not report it with [`Engine::disconnected`].
    Close {
        /// The connection.
        conn: ConnId,
        /// Why.
        reason: CloseReason,
    },
    /// Apply this store write; it is number `seq` in the write log.
    Store {
        /// Its number.
        seq: StoreSeq,
        /// The write.
        op: StoreOp,
    },
    /// Count and log this.
    Notice(Notice),
}
