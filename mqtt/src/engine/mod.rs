//! Sessions and routing: the [`Engine`].
//!
//! # Driving it
//! The driver owns the sockets, the clock and the store. For each connection it:
//! 1. decodes the CONNECT itself (refusing it at the codec level when malformed), works out the
//!    client's [`SessionKey`] from its certificate, and calls [`Engine::connect`];
//! 2. feeds every further decoded packet to [`Engine::packet`];
//! 3. reports the end of the connection with [`Engine::disconnected`];
//! 4. after every call, takes [`Engine::poll_action`] until `None` and carries the actions out
//!    in order: [`Action::Transmit`] means "this connection has packets to write": the driver
//!    calls [`Engine::transmit`] when its socket can take more; [`Action::Store`] writes go to
//!    the store in order, and once a batch is durable the driver calls [`Engine::durable`];
//! 5. calls [`Engine::tick`] now and then (once a second is plenty) for time-based rules.
//!
//! Time is passed in as an [`Instant`]; the engine never reads a clock.
//!
//! # Promises
//! * A client reaches only what the [`Authorizer`] allows: every PUBLISH (will included, checked
//!   at CONNECT and again when it fires), every SUBSCRIBE filter, and again for every live and
//!   stored subscription when the authorizer is replaced ([`Engine::set_authorizer`]).
//! * Nothing acknowledged is lost: a QoS 1/2 PUBLISH is answered (PUBACK/PUBREC) only once every
//!   matching subscriber's queue holds it, and, when any of them is a persistent session, once
//!   the store has made it durable. While an online subscriber's queue is full, the publish is
//!   held and its answer withheld; the publisher runs into its own in-flight window. The engine
//!   keeps taking every connection's packets meanwhile, so acknowledgements always flow and two
//!   clients publishing to each other never deadlock.
//! * Nothing is dropped silently: every drop (QoS 0 under pressure, the oldest message of an
//!   offline queue over its cap) is a [`Notice`].
//! * Sessions are keyed by identity ([`SessionKey`]), never by client id text alone.
//! * A crash loses nothing a client was told and repeats nothing exactly-once: a persistent
//!   session's message goes out only once its queue write is durable (so its packet id
//!   survives a restart); a persistent publisher's QoS 2 message reaches no one before its
//!   receipt ([`StoreOp::Qos2Received`]) is durable; PUBREL goes out only once the release is
//!   durable; after a message is dropped over the offline cap, the next goes out only once the
//!   drop is durable. So the driver must report [`Engine::durable`] promptly: it sets the pace
//!   of persistent sessions (one store batch of latency). One window stays open: a clean
//!   session replacing a stored one takes effect at once, and a crash before its
//!   [`StoreOp::SessionReset`] is durable brings the old session back.
//! * Access to publish is decided when a PUBLISH arrives, under the policy of that moment
//!   (a held publish keeps its verdict); a QoS 2 re-send of an id already accepted is only
//!   answered.
//!
//! # Inside
//! One concern per file: `session` (queue, in-flight window, packet ids), `router`
//! (subscriptions: exact topics in a hash map, wildcard filters in a trie), `retained`,
//! `conn` (a connection's answers and its incoming pipeline), `inbound` (packets from clients,
//! routing in the publisher's order, answers once durable), `route` (delivery to sessions,
//! queue caps, wills), `outbound` (transmit and acknowledgements), `subscribe`, `lifecycle`
//! (CONNECT, takeover, the end of a connection, stalls, expiry, restore).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::{Connect, Packet, QoS};

mod conn;
mod inbound;
mod lifecycle;
mod outbound;
mod retained;
mod route;
mod router;
mod session;
mod subscribe;
#[cfg(test)]
mod tests;

use conn::Conn;
use retained::Retained;
use router::{Router, Sub};
use session::{Session, SessionIdx};

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

/// The actions waiting for the driver, and the numbering of store writes.
#[derive(Debug, Default)]
struct Out {
    actions: VecDeque<Action>,
    /// Number of the last [`Action::Store`] emitted.
    last_seq: StoreSeq,
}

impl Out {
    fn push(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    /// Emits a store write; returns its number.
    fn store(&mut self, op: StoreOp) -> StoreSeq {
        self.last_seq += 1;
        self.actions.push_back(Action::Store {
            seq: self.last_seq,
            op,
        });
        self.last_seq
    }

    fn notice(&mut self, notice: Notice) {
        self.actions.push_back(Action::Notice(notice));
    }
}

/// The MQTT engine: every session, subscription, queue and retained message of the gateway.
pub struct Engine {
    settings: Settings,
    auth: Arc<dyn Authorizer>,
    /// Session table; freed slots are reused (a session's index is dropped everywhere when it
    /// is removed).
    sessions: Vec<Option<Session>>,
    free_sessions: Vec<SessionIdx>,
    by_key: HashMap<SessionKey, SessionIdx>,
    conns: HashMap<ConnId, Conn>,
    /// Refused connections: the CONNACK to write, nothing else.
    refused: HashMap<ConnId, Packet>,
    router: Router,
    retained: Retained,
    out: Out,
    /// Every store write up to this one is durable.
    durable_seq: StoreSeq,
    /// Connections whose next answer waits for a store position.
    durable_waiters: BinaryHeap<Reverse<(StoreSeq, ConnId)>>,
    /// Connections whose incoming pipeline may move again.
    to_pump: VecDeque<ConnId>,
    /// Routing scratch space (no allocation per publish).
    scratch: Vec<Sub>,
    /// While set, routed messages are queued invisible and their sessions noted in
    /// `just_queued` (a persistent publisher's QoS 2 message waiting for its receipt's number).
    hold_visibility: bool,
    just_queued: Vec<SessionIdx>,
    /// Online sessions whose queue head waits for a store position to be durable.
    invisible: BinaryHeap<Reverse<(StoreSeq, SessionIdx)>>,
    /// The latest time the driver passed in.
    now: Option<Instant>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("sessions", &self.by_key.len())
            .field("connections", &self.conns.len())
            .field("last_seq", &self.out.last_seq)
            .field("durable_seq", &self.durable_seq)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine with no sessions, checking access with `authorizer`.
    pub fn new(settings: Settings, authorizer: Arc<dyn Authorizer>) -> Self {
        Engine {
            settings,
            auth: authorizer,
            sessions: Vec::new(),
            free_sessions: Vec::new(),
            by_key: HashMap::new(),
            conns: HashMap::new(),
            refused: HashMap::new(),
            router: Router::default(),
            retained: Retained::default(),
            out: Out::default(),
            durable_seq: 0,
            durable_waiters: BinaryHeap::new(),
            to_pump: VecDeque::new(),
            scratch: Vec::new(),
            hold_visibility: false,
            just_queued: Vec::new(),
            invisible: BinaryHeap::new(),
            now: None,
        }
    }

    /// Rebuilds the persistent sessions and retained messages the store kept (all offline).
    /// Call before the first [`Engine::connect`]; `now` starts their expiry clocks.
    pub fn restore(&mut self, now: Instant, sessions: Vec<StoredSession>, retained: Vec<Message>) {
        self.now = Some(now);
        self.do_restore(now, sessions, retained);
    }

    /// A client on `conn` sent this (decoded, level 4) CONNECT and its certificate gives
    /// `key`. The driver has checked the client id against the certificate. Queues CONNACK on
    /// `conn` (see [`Engine::transmit`]):
    /// * 0x02 for an empty client id with clean session 0 [MQTT-3.1.3-8];
    /// * 0x05 if the will's topic is not allowed;
    /// * otherwise 0x00: a previous connection of `key` is closed ([`CloseReason::Takeover`],
    ///   its will published), a clean session discards stored state [MQTT-3.1.2-6], a
    ///   persistent one resumes [MQTT-3.1.2-4] with session present set [MQTT-3.2.2-2] and
    ///   re-sends its unacknowledged messages with DUP [MQTT-4.4.0-1], [MQTT-3.3.1-1].
    ///
    /// After a refusal the driver writes what [`Engine::transmit`] gives and closes; the engine
    /// keeps nothing for `conn`.
    pub fn connect(&mut self, now: Instant, conn: ConnId, key: SessionKey, connect: Connect) {
        self.now = Some(now);
        self.do_connect(conn, key, connect);
        self.run_pumps();
    }

    /// A packet from the client on `conn` (after its CONNECT was accepted).
    pub fn packet(&mut self, now: Instant, conn: ConnId, packet: Packet) {
        self.now = Some(now);
        self.on_packet(conn, packet);
        self.run_pumps();
    }

    /// The connection ended (not after an [`Action::Close`] for it). Publishes the will unless
    /// `how` is graceful [MQTT-3.14.4-3]; a clean session is discarded [MQTT-3.1.2-6]; a
    /// persistent one keeps its subscriptions and queue (unacknowledged in-flight messages go
    /// back to the head of its queue).
    pub fn disconnected(&mut self, now: Instant, conn: ConnId, how: Disconnected) {
        self.now = Some(now);
        if self.refused.remove(&conn).is_none() {
            self.detach(now, conn, how == Disconnected::Abnormal);
        }
        self.run_pumps();
    }

    /// Takes up to `max_bytes` (at least one packet if any is ready) of packets to write to
    /// `conn`, in order. QoS 1/2 publishes leave the queue only while fewer than
    /// [`Settings::max_inflight_out`] are unacknowledged.
    pub fn transmit(&mut self, conn: ConnId, max_bytes: usize, out: &mut Vec<Packet>) {
        self.do_transmit(conn, max_bytes, out);
        self.run_pumps();
    }

    /// Every store write up to and including `seq` is durable: answers held back for them go
    /// out.
    pub fn durable(&mut self, now: Instant, seq: StoreSeq) {
        self.now = Some(now);
        self.durable_seq = self.durable_seq.max(seq.min(self.out.last_seq));
        while let Some(Reverse((need, conn))) = self.durable_waiters.peek().copied() {
            if need > self.durable_seq {
                break;
            }
            self.durable_waiters.pop();
            self.to_pump.push_back(conn);
        }
        while let Some(Reverse((need, s))) = self.invisible.peek().copied() {
            if need > self.durable_seq {
                break;
            }
            self.invisible.pop();
            if let Some(conn) = self.session(s).and_then(|sess| sess.conn) {
                self.notify(conn);
            }
        }
        self.run_pumps();
    }

    /// Time passed: stalled subscribers are closed, expired sessions removed.
    pub fn tick(&mut self, now: Instant) {
        self.now = Some(now);
        self.do_tick(now);
        self.run_pumps();
    }

    /// Replaces the access policy. Every live and stored subscription is checked again and
    /// removed when no longer allowed ([`Notice::SubscriptionDenied`] with `revoked`, and
    /// [`StoreOp::Unsubscribed`] for persistent sessions).
    pub fn set_authorizer(&mut self, now: Instant, authorizer: Arc<dyn Authorizer>) {
        self.now = Some(now);
        self.auth = authorizer;
        self.recheck_subscriptions();
        self.run_pumps();
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.actions.pop_front()
    }

    fn session(&self, s: SessionIdx) -> Option<&Session> {
        self.sessions.get(s).and_then(Option::as_ref)
    }

    fn session_mut(&mut self, s: SessionIdx) -> Option<&mut Session> {
        self.sessions.get_mut(s).and_then(Option::as_mut)
    }

    /// Lets every connection queued in `to_pump` move its incoming pipeline.
    fn run_pumps(&mut self) {
        while let Some(conn) = self.to_pump.pop_front() {
            self.pump(conn);
        }
    }
}
