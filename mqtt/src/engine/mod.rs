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
//! One concern per file, each importing only what lies below it: `types` (everything the
//! driver and the engine hand each other; imports nothing of the engine), `session` (queue,
//! in-flight window, packet ids), `router`
//! (subscriptions: exact topics in a hash map, wildcard filters in a trie), `retained`,
//! `conn` (a connection's answers and its incoming pipeline), `inbound` (packets from clients,
//! routing in the publisher's order, answers once durable), `route` (delivery to sessions,
//! queue caps, wills), `outbound` (transmit and acknowledgements), `subscribe`, `lifecycle`
//! (CONNECT, takeover, the end of a connection, stalls, expiry, restore).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::codec::{Connect, Packet};

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
mod types;

use conn::Conn;
use retained::Retained;
use router::{Router, Sub};
use session::Session;
use types::SessionIdx;
pub use types::{
    Action, Authorizer, CloseReason, ConnId, DeniedPublish, Disconnected, DropReason, Message,
    Notice, Role, SessionKey, Settings, StoreOp, StoreSeq, StoredMessage, StoredSession,
};

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
