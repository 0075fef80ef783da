//! The harness: simulated clients keeping their own MQTT state, the driver loop around the
//! engine, and the reference model the checks compare the deliveries with.
//!
//! Time in the model is an event counter (`clock`), bumped at every call into the engine.
//! A subscription is an interval of that clock (from the SUBSCRIBE to the UNSUBSCRIBE, the
//! revocation, the end of a clean session or a crash that lost it), so every check can ask
//! "was this client subscribed to a matching filter between the publish and the delivery?".

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleet_mqtt::topic::matches;
use fleet_mqtt::{
    Action, CloseReason, ConnAck, ConnId, Connect, ConnectCode, DeniedPublish, Disconnected,
    DropReason, Engine, Notice, Packet, Publish, QoS, SessionKey, StoreOp, SubAck, SubAckCode,
    Subscribe, Unsubscribe,
};

use super::world::{may_publish, may_subscribe, Policy, Store, Who, EVERYONE};

/// Incoming publishes one connection may hold unanswered, and unreleased QoS 2 ids: above
/// any client window the generator uses, so a well-behaved client never reaches them.
const HELD_CAP: usize = 8;

/// How long the driver loop may run for one operation before the engine counts as busy
/// forever.
const PUMP_LIMIT: usize = 20_000;

/// What a run is configured with (shrinks towards the simplest).
#[derive(Debug, Clone)]
pub(crate) struct Params {
    pub(crate) max_inflight_out: usize,
    pub(crate) queue_messages: usize,
    pub(crate) offline_messages: usize,
    pub(crate) stalled_after_secs: u64,
    pub(crate) session_expiry_secs: u64,
    pub(crate) denied_disconnects: bool,
    /// `max_bytes` the driver passes to `Engine::transmit`.
    pub(crate) tx_bytes: usize,
    /// How many of its own QoS 1/2 publishes a client keeps unacknowledged before it waits.
    pub(crate) window: usize,
}

/// One step of a run.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Connect {
        who: Who,
        clean: bool,
    },
    Subscribe {
        who: Who,
        filter: &'static str,
        qos: u8,
    },
    Unsubscribe {
        who: Who,
        filter: &'static str,
    },
    Publish {
        who: Who,
        topic: &'static str,
        qos: u8,
        retain: bool,
    },
    /// Send the oldest QoS 2 publish still waiting for PUBREC again, with DUP.
    ResendQos2 {
        who: Who,
    },
    /// Stop (or resume) answering: PUBACK, PUBREC, PUBREL, PUBCOMP wait while off.
    Acking {
        who: Who,
        on: bool,
    },
    /// Send the oldest answer held back while not acking.
    AckOne {
        who: Who,
    },
    Disconnect {
        who: Who,
        graceful: bool,
    },
    /// The gateway dies: only writes reported durable survive.
    Crash,
    /// The store reports everything written so far durable.
    Durable,
    /// The store reports the older half of what it was given durable.
    DurableHalf,
    Tick {
        secs: u8,
    },
    /// The policy changes (strict) or changes back.
    Policy {
        strict: bool,
    },
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// A client got a message its subscriptions and the policy do not allow, or a denied
    /// publish was delivered, or a denied filter granted.
    Acl,
    /// Delivered at a QoS other than min(published, granted) [MQTT-3.8.4-6].
    MinQos,
    /// QoS >= 1 messages of one publisher on one topic out of order [MQTT-4.6.0-6].
    Order,
    /// An acknowledged QoS >= 1 message never reached a subscriber owed it.
    Loss,
    /// Acknowledged before the store held it for a persistent subscriber.
    AckBeforeDurable,
    /// A QoS 2 message reached one client's application twice.
    Qos2Duplicate,
    /// QoS 2 exactly-once broken by a gateway crash: a message delivered twice with a crash
    /// between.
    Qos2AcrossCrash,
    /// A client answered PUBREC and never got PUBREL [MQTT-4.3.3-1]; or, what follows from
    /// it after a crash, the packet id it still holds unreleased is reused for another
    /// message, which the client must take for a duplicate and never sees.
    Qos2NeverReleased,
    /// The same for a QoS 2 message the client got but had not answered when its connection
    /// ended: the gateway must send it again [MQTT-4.4.0-1], not drop it, or the client
    /// holds its packet id forever.
    Qos2InflightDropped,
    /// A persistent session's SUBACK'd subscription did not survive a crash.
    SubscriptionNotDurable,
    /// More unacknowledged deliveries than `max_inflight_out`, or a packet id in use reused.
    Inflight,
    /// A rule of the protocol or the rustdoc broken (CONNACK, SUBACK, DUP, RETAIN flags,
    /// closes, notices, store numbering).
    Protocol,
    /// After the drain, something is still unanswered: the engine stalled or deadlocked.
    Liveness,
}

#[derive(Clone)]
pub(crate) struct Violation {
    pub(crate) kind: Kind,
    pub(crate) text: String,
}

impl fmt::Debug for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.text)
    }
}

/// A published message, as the model knows it.
#[derive(Debug)]
struct MsgRec {
    publisher: Who,
    topic: &'static str,
    qos: QoS,
    retain: bool,
    /// Every time the engine received it: (clock, allowed by the policy then).
    receipts: Vec<(u64, bool)>,
    /// Whether each policy that came into force while the engine might still hold it (before
    /// its answer) allows it: the engine may check when it routes rather than on receipt.
    later_policies: Vec<bool>,
    /// The publisher's session incarnations it was received in: a session the gateway lost
    /// (expired) forgets the QoS 2 receipt, so the re-sent message is a new one for it.
    publisher_sessions: BTreeSet<u32>,
    /// When the publisher got PUBACK / PUBREC, and how many receipts there were by then.
    acked: Option<(u64, usize)>,
}

#[derive(Debug, Clone)]
struct Interval {
    filter: &'static str,
    qos: QoS,
    start: u64,
    end: Option<u64>,
    /// False when the client cannot know whether the engine has it (its SUBACK or UNSUBACK
    /// never arrived): allowed for the ACL check, no delivery owed.
    sure: bool,
}

/// What one of the client's own QoS 1/2 publishes waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutState {
    Ack,
    Rec,
    Comp,
}

#[derive(Debug)]
struct Out {
    pid: u16,
    msg: u64,
    state: OutState,
}

#[derive(Debug, Clone)]
struct Delivery {
    msg: u64,
    qos: QoS,
    retain: bool,
    at: u64,
    incarnation: u32,
    epoch: u32,
    /// Handed to the application (false for a QoS 2 duplicate the client filtered out).
    app: bool,
    /// Not handed over because its packet id was still unreleased from before a crash (and
    /// the kind of finding behind that).
    shadowed: Option<Kind>,
}

/// A SUBSCRIBE not yet answered: when it was sent, under which policy, what it asked.
#[derive(Debug)]
struct PendingSub {
    at: u64,
    strict: bool,
    filters: Vec<(&'static str, QoS)>,
    /// Filters a policy change revoked while the SUBACK was outstanding (the engine had
    /// applied the SUBSCRIBE; a persistent session's SUBACK waits for the store), and when.
    revoked_at: BTreeMap<&'static str, u64>,
}

#[derive(Debug)]
struct Client {
    who: Who,
    conn: Option<ConnId>,
    connacked: bool,
    /// Clean flag of the current (or last) connection.
    clean: bool,
    /// The engine holds a persistent session for this client (model).
    has_session: bool,
    /// Bumped whenever the session starts afresh.
    incarnation: u32,
    /// Since when the engine has seen no connection of this client (expiry clock).
    offline_since: Option<Instant>,
    /// What CONNACK must say about the session, as of the CONNECT.
    expect_present: bool,
    intervals: Vec<Interval>,
    next_pid: u16,
    outgoing: Vec<Out>,
    /// QoS 2 packet ids received and not yet released: packet id -> (message, epoch).
    recv_qos2: BTreeMap<u16, (u64, u32)>,
    /// Those of them the client has answered with PUBREC (sent, not just decided).
    pubrec_sent: BTreeSet<u16>,
    /// Deliveries on this connection not yet answered to the end: packet id -> message.
    inflight_in: BTreeMap<u16, Option<u64>>,
    /// (packet id, message, epoch) of earlier deliveries in this incarnation, for DUP.
    seen: BTreeSet<(u16, u64, u32)>,
    acking: bool,
    held_answers: VecDeque<Packet>,
    /// SUBSCRIBE packet id -> what it asked, when.
    pending_sub: BTreeMap<u16, PendingSub>,
    /// UNSUBSCRIBE packet id -> (clock when sent, filters).
    pending_unsub: BTreeMap<u16, (u64, Vec<&'static str>)>,
    deliveries: Vec<Delivery>,
}

impl Client {
    fn new(who: Who) -> Self {
        Client {
            who,
            conn: None,
            connacked: false,
            clean: true,
            has_session: false,
            incarnation: 0,
            offline_since: None,
            expect_present: false,
            intervals: Vec::new(),
            next_pid: 0,
            outgoing: Vec::new(),
            recv_qos2: BTreeMap::new(),
            pubrec_sent: BTreeSet::new(),
            inflight_in: BTreeMap::new(),
            seen: BTreeSet::new(),
            acking: true,
            held_answers: VecDeque::new(),
            pending_sub: BTreeMap::new(),
            pending_unsub: BTreeMap::new(),
            deliveries: Vec::new(),
        }
    }

    fn live(&self) -> Option<ConnId> {
        self.conn.filter(|_| self.connacked)
    }

    /// A packet id not in use by this client's own publishes or requests; ids increase so
    /// that a stray late answer never meets a reused id.
    fn alloc_pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
            let p = self.next_pid;
            let busy = self.outgoing.iter().any(|o| o.pid == p)
                || self.pending_sub.contains_key(&p)
                || self.pending_unsub.contains_key(&p);
            if !busy {
                return p;
            }
        }
    }

    fn close_intervals(&mut self, at: u64, filter: Option<&str>) {
        for i in self.intervals.iter_mut().filter(|i| i.end.is_none()) {
            if filter.is_none_or(|f| f == i.filter) {
                i.end = Some(at);
            }
        }
    }
}

/// Why the engine may close a connection during the current call.
#[derive(Debug, Default)]
struct Expect {
    takeover: Option<ConnId>,
    takeover_seen: bool,
    stalled: bool,
    /// Connections that sent a publish the policy denies.
    denied: BTreeSet<ConnId>,
}

pub(crate) struct World {
    p: Params,
    strict: bool,
    now: Instant,
    clock: u64,
    epoch: u32,
    engine: Engine,
    store: Store,
    next_conn: u64,
    clients: Vec<Client>,
    msgs: Vec<MsgRec>,
    drops: [u64; 4],
    revoked: Vec<(Who, String)>,
    expect: Expect,
    /// Bumped by every action and every packet to the engine: the drain stops when it stands.
    moves: u64,
    violations: Vec<Violation>,
    /// `MODEL_TRACE=1`: print every step, packet and action (to read a shrunk case).
    trace: bool,
    /// Inside the action loop: packets from clients wait in `deferred`.
    polling: bool,
    deferred: VecDeque<(ConnId, Packet)>,
}

fn qos_of(v: u8) -> QoS {
    QoS::from_u8(v.min(2)).unwrap_or(QoS::AtMostOnce)
}

fn payload_msg(payload: &Bytes) -> Option<u64> {
    std::str::from_utf8(payload)
        .ok()?
        .strip_prefix('m')?
        .parse()
        .ok()
}

impl World {
    pub(crate) fn new(p: Params) -> Self {
        // Any start will do: the engine only compares the instants it is given.
        let t0 = Instant::now();
        let engine = Engine::new(Self::settings(&p), Arc::new(Policy { strict: false }));
        World {
            p,
            strict: false,
            now: t0,
            clock: 0,
            epoch: 0,
            engine,
            store: Store::new(),
            next_conn: 0,
            clients: EVERYONE.into_iter().map(Client::new).collect(),
            msgs: Vec::new(),
            drops: [0; 4],
            revoked: Vec::new(),
            expect: Expect::default(),
            moves: 0,
            violations: Vec::new(),
            trace: std::env::var_os("MODEL_TRACE").is_some(),
            polling: false,
            deferred: VecDeque::new(),
        }
    }

    fn settings(p: &Params) -> fleet_mqtt::Settings {
        fleet_mqtt::Settings {
            max_inflight_out: p.max_inflight_out,
            max_held_in: HELD_CAP,
            max_unreleased_in: HELD_CAP,
            queue_messages: p.queue_messages,
            queue_bytes: 1 << 20,
            offline_messages: p.offline_messages,
            offline_bytes: 1 << 20,
            stalled_after: Duration::from_secs(p.stalled_after_secs),
            session_expiry: Duration::from_secs(p.session_expiry_secs),
            denied_publish: if p.denied_disconnects {
                DeniedPublish::Disconnect
            } else {
                DeniedPublish::AckAndDrop
            },
        }
    }

    fn violation(&mut self, kind: Kind, text: String) {
        // One line per distinct finding is enough to read a failure.
        if self.violations.len() < 40 {
            self.violations.push(Violation { kind, text });
        }
    }

    /// What the run exercised, for tuning the generator (`MODEL_STATS=1`).
    pub(crate) fn stats(&self) -> String {
        let d: usize = self.clients.iter().map(|c| c.deliveries.len()).sum();
        let acked = self.msgs.iter().filter(|m| m.acked.is_some()).count();
        let owed: usize = (0..self.msgs.len() as u64)
            .filter(|n| self.msgs[*n as usize].acked.is_some())
            .map(|n| self.owed(n).len())
            .sum();
        format!(
            "msgs={} acked={} deliveries={} epoch={} owed={} drops={:?}",
            self.msgs.len(),
            acked,
            d,
            self.epoch,
            owed,
            self.drops
        )
    }

    pub(crate) fn violations(&self) -> &[Violation] {
        &self.violations
    }

    // ----------------------------------------------------------------------------------
    // Operations

    pub(crate) fn apply(&mut self, op: &Op) {
        if self.trace {
            eprintln!("[{}] == {op:?}", self.clock);
        }
        match *op {
            Op::Connect { who, clean } => self.connect(who, clean),
            Op::Subscribe { who, filter, qos } => {
                let c = &mut self.clients[who.idx()];
                let Some(conn) = c.live() else { return };
                let pid = c.alloc_pid();
                let q = qos_of(qos);
                let pending = PendingSub {
                    at: self.clock + 1,
                    strict: self.strict,
                    filters: vec![(filter, q)],
                    revoked_at: BTreeMap::new(),
                };
                c.pending_sub.insert(pid, pending);
                let pkt = Packet::Subscribe(Subscribe {
                    packet_id: pid,
                    filters: vec![(filter.to_owned(), q)],
                });
                self.feed(conn, pkt);
            }
            Op::Unsubscribe { who, filter } => {
                let c = &mut self.clients[who.idx()];
                let Some(conn) = c.live() else { return };
                let pid = c.alloc_pid();
                c.pending_unsub.insert(pid, (self.clock + 1, vec![filter]));
                let pkt = Packet::Unsubscribe(Unsubscribe {
                    packet_id: pid,
                    filters: vec![filter.to_owned()],
                });
                self.feed(conn, pkt);
            }
            Op::Publish {
                who,
                topic,
                qos,
                retain,
            } => self.publish(who, topic, qos_of(qos), retain),
            Op::ResendQos2 { who } => {
                let c = &self.clients[who.idx()];
                let Some(conn) = c.live() else { return };
                let Some(o) = c.outgoing.iter().find(|o| o.state == OutState::Rec) else {
                    return;
                };
                let pkt = self.publish_packet(o.msg, Some(o.pid), true);
                self.feed(conn, pkt);
            }
            Op::Acking { who, on } => {
                self.clients[who.idx()].acking = on;
                if on {
                    while self.answer_one(who) {}
                }
            }
            Op::AckOne { who } => {
                self.answer_one(who);
            }
            Op::Disconnect { who, graceful } => {
                let Some(conn) = self.clients[who.idx()].conn else {
                    return;
                };
                self.lost(who);
                self.clock += 1;
                let how = if graceful {
                    Disconnected::Graceful
                } else {
                    Disconnected::Abnormal
                };
                self.engine.disconnected(self.now, conn, how);
            }
            Op::Crash => self.crash(),
            Op::Durable => self.durable(false),
            Op::DurableHalf => self.durable(true),
            Op::Tick { secs } => {
                self.now += Duration::from_secs(u64::from(secs));
                self.clock += 1;
                self.expect.stalled = true;
                self.engine.tick(self.now);
                self.pump();
                self.expect.stalled = false;
            }
            Op::Policy { strict } => self.set_policy(strict),
        }
        self.pump();
    }

    fn connect(&mut self, who: Who, clean: bool) {
        self.expect.takeover = None;
        self.expect.takeover_seen = false;
        if let Some(old) = self.clients[who.idx()].conn {
            // The client gave up on its old connection; the gateway has not noticed yet.
            self.lost(who);
            self.expect.takeover = Some(old);
        }
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        let at = self.clock + 1;
        let c = &mut self.clients[who.idx()];
        c.conn = Some(conn);
        c.connacked = false;
        c.clean = clean;
        c.offline_since = None;
        // The engine applies the CONNECT now, whenever its CONNACK goes out.
        c.expect_present = !clean && c.has_session;
        if clean {
            // The client starts afresh too [MQTT-3.1.2-6].
            c.outgoing.clear();
        }
        if !c.expect_present {
            // A new session on the gateway's side. The client learns it from CONNACK, which
            // may never reach it (a CONNACK waits for the store); it then drops what it
            // received for the old session, as it would on `session present` 0.
            c.close_intervals(at, None);
            c.recv_qos2.clear();
            c.pubrec_sent.clear();
            c.seen.clear();
            c.incarnation += 1;
        }
        c.has_session = !clean;
        let connect = Connect {
            level: 4,
            clean_session: clean,
            keep_alive: 60,
            client_id: who.client_id().to_owned(),
            will: None,
            username: None,
            password: None,
        };
        self.clock += 1;
        self.engine.connect(self.now, conn, who.key(), connect);
        self.pump();
        if let Some(old) = self.expect.takeover.take() {
            if !self.expect.takeover_seen {
                self.violation(
                    Kind::Protocol,
                    format!("{who:?} connected again but its old connection {old:?} was not closed for takeover"),
                );
            }
        }
    }

    fn publish(&mut self, who: Who, topic: &'static str, qos: QoS, retain: bool) {
        let window = self.p.window;
        let c = &mut self.clients[who.idx()];
        let Some(conn) = c.live() else { return };
        if qos != QoS::AtMostOnce && c.outgoing.len() >= window {
            return; // the client's own in-flight window is full: it waits
        }
        let n = self.msgs.len() as u64;
        self.msgs.push(MsgRec {
            publisher: who,
            topic,
            qos,
            retain,
            receipts: Vec::new(),
            later_policies: Vec::new(),
            publisher_sessions: BTreeSet::new(),
            acked: None,
        });
        let pid = if qos == QoS::AtMostOnce {
            None
        } else {
            let c = &mut self.clients[who.idx()];
            let pid = c.alloc_pid();
            let state = if qos == QoS::AtLeastOnce {
                OutState::Ack
            } else {
                OutState::Rec
            };
            c.outgoing.push(Out { pid, msg: n, state });
            Some(pid)
        };
        let pkt = self.publish_packet(n, pid, false);
        self.feed(conn, pkt);
    }

    fn publish_packet(&self, n: u64, pid: Option<u16>, dup: bool) -> Packet {
        let m = &self.msgs[n as usize];
        Packet::Publish(Publish {
            dup,
            qos: m.qos,
            retain: m.retain,
            topic: m.topic.to_owned(),
            packet_id: pid,
            payload: Bytes::from(format!("m{n}")),
        })
    }

    /// Sends the client's oldest held-back answer; false if there was none.
    fn answer_one(&mut self, who: Who) -> bool {
        let c = &mut self.clients[who.idx()];
        let Some(conn) = c.live() else { return false };
        let Some(pkt) = c.held_answers.pop_front() else {
            return false;
        };
        self.send_answer(who, conn, pkt);
        true
    }

    fn send_answer(&mut self, who: Who, conn: ConnId, pkt: Packet) {
        let c = &mut self.clients[who.idx()];
        match pkt {
            Packet::PubAck(p) | Packet::PubComp(p) => {
                c.inflight_in.remove(&p);
            }
            Packet::PubRec(p) if c.recv_qos2.contains_key(&p) => {
                c.pubrec_sent.insert(p);
            }
            _ => {}
        }
        self.feed(conn, pkt);
    }

    fn answer(&mut self, who: Who, conn: ConnId, pkt: Packet) {
        if self.clients[who.idx()].acking {
            self.send_answer(who, conn, pkt);
        } else {
            self.clients[who.idx()].held_answers.push_back(pkt);
        }
    }

    /// A packet from a client to the engine.
    fn feed(&mut self, conn: ConnId, pkt: Packet) {
        if self.polling {
            self.deferred.push_back((conn, pkt));
            return;
        }
        if self.trace {
            eprintln!("[{}]   {:?} -> {pkt:?}", self.clock, self.client_on(conn));
        }
        self.clock += 1;
        self.moves += 1;
        if let Packet::Publish(p) = &pkt {
            if let Some(n) = payload_msg(&p.payload) {
                let m = &mut self.msgs[n as usize];
                let allowed = may_publish(m.publisher, m.topic, self.strict);
                m.receipts.push((self.clock, allowed));
                m.publisher_sessions
                    .insert(self.clients[m.publisher.idx()].incarnation);
                if !allowed {
                    self.expect.denied.insert(conn);
                }
            }
        }
        self.engine.packet(self.now, conn, pkt);
    }

    /// The client's connection is gone (it dropped it, or the gateway closed it or died).
    fn lost(&mut self, who: Who) {
        let at = self.clock;
        let now = self.now;
        let c = &mut self.clients[who.idx()];
        c.offline_since = Some(now);
        c.conn = None;
        c.connacked = false;
        c.held_answers.clear();
        c.inflight_in.clear();
        if c.clean {
            // A clean session's state dies with its connection, on both sides
            // [MQTT-3.1.2-6]: nothing of it is re-sent later.
            c.outgoing.clear();
            c.recv_qos2.clear();
            c.pubrec_sent.clear();
            c.close_intervals(at, None);
            c.has_session = false;
            c.pending_sub.clear();
            c.pending_unsub.clear();
            return;
        }
        // Requests never answered: the engine may or may not have applied them.
        for (
            _,
            PendingSub {
                at: start,
                strict,
                filters,
                revoked_at,
            },
        ) in std::mem::take(&mut c.pending_sub)
        {
            for (f, q) in filters {
                if may_subscribe(who, f, strict) {
                    c.close_intervals(start, Some(f));
                    c.intervals.push(Interval {
                        filter: f,
                        qos: q,
                        start,
                        end: revoked_at.get(f).copied(),
                        sure: false,
                    });
                }
            }
        }
        for (_, (_, filters)) in std::mem::take(&mut c.pending_unsub) {
            for i in c.intervals.iter_mut().filter(|i| i.end.is_none()) {
                if filters.contains(&i.filter) {
                    i.sure = false;
                }
            }
        }
    }

    fn durable(&mut self, half: bool) {
        if let Some(seq) = self.store.make_durable(half) {
            self.clock += 1;
            self.engine.durable(self.now, seq);
        }
    }

    fn crash(&mut self) {
        for who in EVERYONE {
            if self.clients[who.idx()].conn.is_some() {
                self.lost(who);
            }
        }
        self.store.crash();
        self.epoch += 1;
        self.clock += 1;
        self.expect = Expect::default();
        let policy = Arc::new(Policy {
            strict: self.strict,
        });
        self.engine = Engine::new(Self::settings(&self.p), policy);
        let (sessions, retained) = self.store.contents();
        self.engine.restore(self.now, sessions, retained);
        // A persistent session that survived keeps what it was told it has (SUBACK).
        let mut lost = Vec::new();
        for c in &self.clients {
            let Some(stored) = self.store.sessions.get(&c.who.key()) else {
                continue;
            };
            if !c.has_session {
                continue;
            }
            for i in c.intervals.iter().filter(|i| i.sure && i.end.is_none()) {
                if stored.subs.get(i.filter) != Some(&i.qos) {
                    lost.push(format!(
                        "{:?}'s subscription {:?} at {:?} was acknowledged (SUBACK) and lost in a crash",
                        c.who, i.filter, i.qos
                    ));
                }
            }
        }
        for text in lost {
            self.violation(Kind::SubscriptionNotDurable, text);
        }
        // The model follows what the store kept.
        let (at, now) = (self.clock, self.now);
        for who in EVERYONE {
            let stored = self.store.sessions.get(&who.key()).cloned();
            let c = &mut self.clients[who.idx()];
            // `restore` starts the expiry clocks now.
            c.offline_since = Some(now);
            if !c.has_session && stored.is_some() {
                // A session the crash brought back (its reset was not durable) is an older
                // one than what the client saw last: order and duplicates count apart.
                c.incarnation += 1;
            }
            c.has_session = stored.is_some();
            let subs = stored.map(|s| s.subs).unwrap_or_default();
            for i in c.intervals.iter_mut().filter(|i| i.end.is_none()) {
                if subs.get(i.filter) == Some(&i.qos) {
                    i.sure = true;
                } else {
                    i.end = Some(at);
                }
            }
            for (f, q) in subs {
                let open = c
                    .intervals
                    .iter()
                    .any(|i| i.end.is_none() && i.filter == f.as_str());
                if !open {
                    if let Some(filter) = super::world::FILTERS.iter().find(|x| **x == f) {
                        c.intervals.push(Interval {
                            filter,
                            qos: q,
                            start: at,
                            end: None,
                            sure: true,
                        });
                    }
                }
            }
        }
    }

    fn set_policy(&mut self, strict: bool) {
        self.strict = strict;
        self.clock += 1;
        let at = self.clock;
        let mut must = BTreeSet::new();
        let mut may = BTreeSet::new();
        for c in &mut self.clients {
            let who = c.who;
            // A SUBSCRIBE or UNSUBSCRIBE of the filter not yet answered may have replaced or
            // removed it already.
            let changing: BTreeSet<&'static str> = c
                .pending_unsub
                .values()
                .flat_map(|(_, fs)| fs.iter().copied())
                .chain(
                    c.pending_sub
                        .values()
                        .flat_map(|ps| ps.filters.iter().map(|(f, _)| *f)),
                )
                .collect();
            for i in c.intervals.iter_mut().filter(|i| i.end.is_none()) {
                if !may_subscribe(who, i.filter, strict) {
                    if i.sure && !changing.contains(i.filter) {
                        must.insert((who, i.filter.to_owned()));
                    }
                    may.insert((who, i.filter.to_owned()));
                    i.end = Some(at);
                }
            }
            // Subscriptions still waiting for their SUBACK may already be in force.
            for ps in c.pending_sub.values_mut() {
                for (f, _) in &ps.filters {
                    if may_subscribe(who, f, ps.strict) && !may_subscribe(who, f, strict) {
                        may.insert((who, (*f).to_owned()));
                        ps.revoked_at.entry(f).or_insert(at);
                    }
                }
            }
        }
        for m in self.msgs.iter_mut() {
            if m.acked.is_none() && !m.receipts.is_empty() {
                m.later_policies
                    .push(may_publish(m.publisher, m.topic, strict));
            }
        }
        for c in &self.clients {
            let now_denied = self
                .msgs
                .iter()
                .any(|m| m.publisher == c.who && !may_publish(c.who, m.topic, strict));
            if let (Some(conn), true) = (c.conn, now_denied) {
                self.expect.denied.insert(conn);
            }
        }
        self.revoked.clear();
        self.engine
            .set_authorizer(self.now, Arc::new(Policy { strict }));
        self.pump();
        let got: BTreeSet<_> = self.revoked.drain(..).collect();
        let missing: Vec<_> = must.difference(&got).collect();
        let extra: Vec<_> = got.difference(&may).collect();
        if !missing.is_empty() || !extra.is_empty() {
            self.violation(
                Kind::Protocol,
                format!(
                    "policy change: revocation notices missing {missing:?}, unexpected {extra:?}"
                ),
            );
        }
    }

    // ----------------------------------------------------------------------------------
    // The driver loop

    /// Carries out the engine's actions until it has none. What clients send meanwhile goes
    /// in after the engine's queue ran empty, so each batch of actions belongs to calls made
    /// before it (the store's commit groups rely on that).
    fn pump(&mut self) {
        for _ in 0..PUMP_LIMIT {
            if let Some(action) = self.engine.poll_action() {
                self.polling = true;
                self.action(action);
                self.polling = false;
                continue;
            }
            if self.deferred.is_empty() {
                return;
            }
            for (conn, pkt) in std::mem::take(&mut self.deferred) {
                if self.client_on(conn).is_some() {
                    self.feed(conn, pkt);
                }
            }
        }
        self.violation(
            Kind::Liveness,
            format!("the engine kept producing actions ({PUMP_LIMIT} in one step)"),
        );
    }

    fn client_on(&self, conn: ConnId) -> Option<Who> {
        self.clients
            .iter()
            .find(|c| c.conn == Some(conn))
            .map(|c| c.who)
    }

    fn action(&mut self, action: Action) {
        self.moves += 1;
        if self.trace && !matches!(action, Action::Transmit(_)) {
            eprintln!("[{}]   engine: {action:?}", self.clock);
        }
        match action {
            Action::Transmit(conn) => {
                let Some(who) = self.client_on(conn) else {
                    return; // the client has gone; nobody reads
                };
                let mut out = Vec::new();
                for _ in 0..PUMP_LIMIT {
                    out.clear();
                    self.engine.transmit(conn, self.p.tx_bytes, &mut out);
                    if out.is_empty() {
                        return;
                    }
                    for pkt in out.drain(..) {
                        if self.clients[who.idx()].conn != Some(conn) {
                            break;
                        }
                        self.receive(who, conn, pkt);
                    }
                }
            }
            Action::Close { conn, reason } => {
                let expected = match &reason {
                    CloseReason::Takeover => {
                        let ok = self.expect.takeover == Some(conn);
                        self.expect.takeover_seen |= ok;
                        ok
                    }
                    CloseReason::Stalled => self.expect.stalled,
                    CloseReason::DeniedPublish => {
                        self.p.denied_disconnects && self.expect.denied.contains(&conn)
                    }
                    _ => false,
                };
                let who = self.client_on(conn);
                if !expected {
                    self.violation(
                        Kind::Protocol,
                        format!("unexpected close of {who:?} ({conn:?}): {reason:?}"),
                    );
                }
                if let Some(who) = who {
                    if reason == CloseReason::DeniedPublish {
                        // The application gives up on what the gateway will not take, rather
                        // than re-send it on every reconnect.
                        let strict = self.strict;
                        let msgs = &self.msgs;
                        self.clients[who.idx()]
                            .outgoing
                            .retain(|o| may_publish(who, msgs[o.msg as usize].topic, strict));
                    }
                    self.lost(who);
                }
            }
            Action::Store { seq, op } => {
                if let StoreOp::SessionExpired { key } = &op {
                    self.expired(key);
                }
                if let Err(e) = self.store.write(seq, op, self.clock) {
                    self.violation(Kind::Protocol, e);
                }
            }
            Action::Notice(n) => match n {
                Notice::Dropped { key, reason, count } => {
                    if matches!(
                        reason,
                        DropReason::OfflineQueueFull | DropReason::SessionExpired
                    ) {
                        if let Some(w) = Who::of(&key) {
                            self.drops[w.idx()] += count;
                        }
                    }
                }
                Notice::SubscriptionDenied {
                    key,
                    filter,
                    revoked: true,
                } => {
                    if let Some(w) = Who::of(&key) {
                        self.revoked.push((w, filter));
                    }
                }
                _ => {}
            },
        }
    }

    /// The engine removed an offline persistent session for its age.
    fn expired(&mut self, key: &SessionKey) {
        let Some(who) = Who::of(key) else { return };
        let (at, now, expiry) = (self.clock, self.now, self.p.session_expiry_secs);
        let c = &mut self.clients[who.idx()];
        let early = match (c.conn, c.offline_since) {
            (Some(_), _) => Some("while connected".to_owned()),
            (None, Some(t)) if now - t < Duration::from_secs(expiry) => {
                Some(format!("after {:?} offline, expiry {expiry} s", now - t))
            }
            _ => None,
        };
        c.has_session = false;
        c.close_intervals(at, None);
        if let Some(when) = early {
            self.violation(Kind::Protocol, format!("{who:?}'s session expired {when}"));
        }
    }

    // ----------------------------------------------------------------------------------
    // A simulated client receiving

    fn receive(&mut self, who: Who, conn: ConnId, pkt: Packet) {
        if self.trace {
            eprintln!("[{}]   {who:?} <- {pkt:?}", self.clock);
        }
        if !self.clients[who.idx()].connacked && !matches!(pkt, Packet::ConnAck(_)) {
            self.violation(
                Kind::Protocol,
                format!("{who:?} got {} before CONNACK [MQTT-3.2.0-1]", pkt.name()),
            );
            return;
        }
        match pkt {
            Packet::ConnAck(ack) => self.on_connack(who, conn, ack),
            Packet::Publish(p) => self.on_publish(who, conn, p),
            Packet::PubAck(pid) => {
                let c = &mut self.clients[who.idx()];
                if let Some(ix) = c
                    .outgoing
                    .iter()
                    .position(|o| o.pid == pid && o.state == OutState::Ack)
                {
                    let o = c.outgoing.remove(ix);
                    self.on_acked(o.msg);
                }
            }
            Packet::PubRec(pid) => {
                let c = &mut self.clients[who.idx()];
                let Some(o) = c.outgoing.iter_mut().find(|o| o.pid == pid) else {
                    return;
                };
                if o.state == OutState::Ack {
                    return;
                }
                let first = o.state == OutState::Rec;
                o.state = OutState::Comp;
                let n = o.msg;
                if first {
                    self.on_acked(n);
                }
                self.answer(who, conn, Packet::PubRel(pid));
            }
            Packet::PubComp(pid) => {
                let c = &mut self.clients[who.idx()];
                c.outgoing
                    .retain(|o| !(o.pid == pid && o.state == OutState::Comp));
            }
            Packet::PubRel(pid) => {
                let c = &mut self.clients[who.idx()];
                c.recv_qos2.remove(&pid);
                c.pubrec_sent.remove(&pid);
                c.inflight_in.entry(pid).or_insert(None);
                self.check_inflight(who);
                self.answer(who, conn, Packet::PubComp(pid));
            }
            Packet::SubAck(ack) => self.on_suback(who, ack),
            Packet::UnsubAck(pid) => {
                let c = &mut self.clients[who.idx()];
                match c.pending_unsub.remove(&pid) {
                    Some((at, filters)) => {
                        for f in filters {
                            c.close_intervals(at, Some(f));
                        }
                    }
                    None => self.violation(
                        Kind::Protocol,
                        format!("{who:?}: UNSUBACK {pid} for no UNSUBSCRIBE"),
                    ),
                }
            }
            Packet::PingResp => {}
            other => self.violation(
                Kind::Protocol,
                format!("{who:?} got a {} from the server", other.name()),
            ),
        }
    }

    fn on_connack(&mut self, who: Who, conn: ConnId, ack: ConnAck) {
        let at = self.clock;
        let c = &mut self.clients[who.idx()];
        if c.connacked {
            self.violation(Kind::Protocol, format!("{who:?}: a second CONNACK"));
            return;
        }
        if ack.code != ConnectCode::Accepted {
            c.conn = None;
            self.violation(Kind::Protocol, format!("{who:?}: CONNACK {:?}", ack.code));
            return;
        }
        c.connacked = true;
        let clean = c.clean;
        let expected = c.expect_present;
        let present = ack.session_present;
        if present != expected {
            self.violation(
                Kind::Protocol,
                format!(
                    "{who:?} clean={clean}: session present {present}, expected {expected} [MQTT-3.2.2-1..3]"
                ),
            );
        }
        let c = &mut self.clients[who.idx()];
        if expected && !present {
            // No session after all: the client drops what it received for the old one.
            c.close_intervals(at, None);
            c.recv_qos2.clear();
            c.pubrec_sent.clear();
            c.seen.clear();
            c.incarnation += 1;
        }
        // Unacknowledged publishes and PUBRELs go again, in order [MQTT-4.4.0-1].
        let resend: Vec<(u16, u64, OutState)> =
            c.outgoing.iter().map(|o| (o.pid, o.msg, o.state)).collect();
        for (pid, n, state) in resend {
            let pkt = match state {
                OutState::Comp => Packet::PubRel(pid),
                _ => self.publish_packet(n, Some(pid), true),
            };
            self.feed(conn, pkt);
        }
    }

    fn on_suback(&mut self, who: Who, ack: SubAck) {
        let c = &mut self.clients[who.idx()];
        let Some(PendingSub {
            at: start,
            strict,
            filters,
            revoked_at,
        }) = c.pending_sub.remove(&ack.packet_id)
        else {
            self.violation(
                Kind::Protocol,
                format!("{who:?}: SUBACK {} for no SUBSCRIBE", ack.packet_id),
            );
            return;
        };
        if ack.codes.len() != filters.len() {
            self.violation(
                Kind::Protocol,
                format!(
                    "{who:?}: SUBACK with {} codes for {} filters",
                    ack.codes.len(),
                    filters.len()
                ),
            );
            return;
        }
        for ((f, req), code) in filters.into_iter().zip(ack.codes) {
            let allowed = may_subscribe(who, f, strict);
            match code {
                SubAckCode::Granted(q) => {
                    if !allowed {
                        self.violation(
                            Kind::Acl,
                            format!("{who:?} was granted {f:?}, which the policy denies"),
                        );
                    }
                    if q > req {
                        self.violation(
                            Kind::Protocol,
                            format!("{who:?} asked {f:?} at {req:?}, granted {q:?}"),
                        );
                    }
                    let c = &mut self.clients[who.idx()];
                    c.close_intervals(start, Some(f));
                    c.intervals.push(Interval {
                        filter: f,
                        qos: q,
                        start,
                        // Revoked before its SUBACK arrived: it ended then.
                        end: revoked_at.get(f).copied(),
                        sure: true,
                    });
                }
                SubAckCode::Failure => {
                    if allowed {
                        self.violation(
                            Kind::Protocol,
                            format!("{who:?} was refused {f:?}, which the policy allows"),
                        );
                    }
                }
            }
        }
    }

    fn on_publish(&mut self, who: Who, conn: ConnId, p: Publish) {
        let at = self.clock;
        let Some(n) = payload_msg(&p.payload).filter(|n| (*n as usize) < self.msgs.len()) else {
            self.violation(
                Kind::Protocol,
                format!("{who:?} got a PUBLISH nobody sent: {p:?}"),
            );
            return;
        };
        let m = &self.msgs[n as usize];
        let c = &self.clients[who.idx()];
        let mut bad = Vec::new();
        if p.topic != m.topic {
            bad.push((
                Kind::Protocol,
                format!("m{n} arrived on {:?}, sent on {:?}", p.topic, m.topic),
            ));
        }
        if p.qos == QoS::AtMostOnce && (p.dup || p.packet_id.is_some()) {
            bad.push((
                Kind::Protocol,
                format!("QoS 0 m{n} with DUP or packet id [MQTT-3.3.1-2]"),
            ));
        }
        if p.qos != QoS::AtMostOnce && p.packet_id.is_none_or(|i| i == 0) {
            bad.push((
                Kind::Protocol,
                format!("QoS {:?} m{n} without packet id", p.qos),
            ));
        }
        if !m.receipts.iter().any(|(_, allowed)| *allowed) && !m.later_policies.contains(&true) {
            bad.push((
                Kind::Acl,
                format!(
                    "{who:?} got m{n}, a publish the policy denied ({:?} on {:?})",
                    m.publisher, m.topic
                ),
            ));
        }
        let first = m.receipts.first().map_or(u64::MAX, |r| r.0);
        // Subscriptions that can justify this delivery.
        let grants: Vec<QoS> = c
            .intervals
            .iter()
            .filter(|i| matches(i.filter, m.topic))
            .filter(|i| {
                if p.retain {
                    // A retained message goes out for a subscription made after it was
                    // published (and, like any queued message, may be re-sent after the
                    // subscription ended).
                    i.start >= first && i.start <= at
                } else {
                    i.start <= at && i.end.is_none_or(|e| e >= first)
                }
            })
            .map(|i| i.qos)
            // A subscription not yet acknowledged counts too: the server may send what matches
            // it before its SUBACK (MQTT 3.1.1 section 3.8.4), which a persistent session's
            // SUBACK waits for its store write.
            .chain(c.pending_sub.values().flat_map(|ps| {
                ps.filters
                    .iter()
                    .filter(move |(f, _)| {
                        matches(f, m.topic)
                            && may_subscribe(who, f, ps.strict)
                            && ps.at <= at
                            && (!p.retain || ps.at >= first)
                    })
                    .map(|(_, q)| *q)
            }))
            .collect();
        if grants.is_empty() {
            let what = if p.retain {
                "no subscription made since it was retained [MQTT-3.3.1-9]"
            } else {
                "no matching subscription between publish and delivery"
            };
            bad.push((
                Kind::Acl,
                format!(
                    "{who:?} got m{n} on {:?} (retain={}): {what}",
                    m.topic, p.retain
                ),
            ));
        } else if !grants.iter().any(|g| (*g).min(m.qos) == p.qos) {
            bad.push((
                Kind::MinQos,
                format!(
                    "{who:?} got m{n} at {:?}; published {:?}, granted {grants:?} [MQTT-3.8.4-6]",
                    p.qos, m.qos
                ),
            ));
        }
        if p.retain && !m.retain {
            bad.push((
                Kind::Protocol,
                format!("{who:?} got m{n} with RETAIN, published without"),
            ));
        }
        let epoch = self.epoch;
        let c = &mut self.clients[who.idx()];
        let mut app = true;
        let mut shadow = None;
        if let Some(pid) = p.packet_id.filter(|_| p.qos != QoS::AtMostOnce) {
            if !p.retain && !p.dup && c.seen.contains(&(pid, n, epoch)) {
                bad.push((
                    Kind::Protocol,
                    format!(
                        "{who:?} got m{n} again with packet id {pid} and no DUP [MQTT-3.3.1-1]"
                    ),
                ));
            }
            c.seen.insert((pid, n, epoch));
            match c.inflight_in.get(&pid) {
                Some(Some(other)) if *other != n => bad.push((
                    Kind::Inflight,
                    format!("{who:?}: packet id {pid} of unacknowledged m{other} reused for m{n}"),
                )),
                _ => {}
            }
            c.inflight_in.insert(pid, Some(n));
            if p.qos == QoS::ExactlyOnce {
                match c.recv_qos2.get(&pid) {
                    Some((other, _)) if *other == n => app = false,
                    Some(&(other, ep)) => {
                        let shadowed = ep != epoch;
                        let kind = if !shadowed {
                            Kind::Inflight
                        } else if c.pubrec_sent.contains(&pid) {
                            Kind::Qos2NeverReleased
                        } else {
                            Kind::Qos2InflightDropped
                        };
                        if shadowed {
                            shadow = Some(kind);
                        }
                        bad.push((kind, format!("{who:?}: packet id {pid} of unreleased QoS 2 m{other} (epoch {ep}) reused for m{n} (epoch {epoch})")));
                        app = false;
                    }
                    None => {
                        c.recv_qos2.insert(pid, (n, epoch));
                    }
                }
            }
        }
        c.deliveries.push(Delivery {
            msg: n,
            qos: p.qos,
            retain: p.retain,
            at,
            incarnation: c.incarnation,
            epoch,
            app,
            shadowed: shadow,
        });
        for (kind, text) in bad {
            self.violation(kind, text);
        }
        self.check_inflight(who);
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(pid)) => self.answer(who, conn, Packet::PubAck(pid)),
            (QoS::ExactlyOnce, Some(pid)) => self.answer(who, conn, Packet::PubRec(pid)),
            _ => {}
        }
    }

    fn check_inflight(&mut self, who: Who) {
        let n = self.clients[who.idx()].inflight_in.len();
        if n > self.p.max_inflight_out {
            self.violation(
                Kind::Inflight,
                format!(
                    "{who:?} has {n} unacknowledged deliveries, max_inflight_out is {}",
                    self.p.max_inflight_out
                ),
            );
        }
    }

    /// Subscribers owed `n` now: (client, sure interval matching, open since the first
    /// receipt, delivered QoS >= 1).
    fn owed(&self, n: u64) -> Vec<Who> {
        let m = &self.msgs[n as usize];
        let Some(&(first, _)) = m.receipts.first() else {
            return Vec::new();
        };
        self.clients
            .iter()
            .filter(|c| {
                // An UNSUBSCRIBE, or a SUBSCRIBE replacing the subscription, sent and not yet
                // answered may already be in force (a SUBACK can wait behind earlier answers
                // for the store).
                let leaving = |f: &str| {
                    c.pending_unsub.values().any(|(_, fs)| fs.contains(&f))
                        || c.pending_sub
                            .values()
                            .any(|ps| ps.filters.iter().any(|(x, _)| *x == f))
                };
                let best = c
                    .intervals
                    .iter()
                    .filter(|i| i.sure && i.end.is_none() && i.start <= first)
                    .filter(|i| !leaving(i.filter))
                    .filter(|i| matches(i.filter, m.topic))
                    .map(|i| i.qos)
                    .max();
                best.is_some_and(|g| g.min(m.qos) != QoS::AtMostOnce)
            })
            .map(|c| c.who)
            .collect()
    }

    fn on_acked(&mut self, n: u64) {
        let at = self.clock;
        let m = &mut self.msgs[n as usize];
        if m.acked.is_some() {
            return;
        }
        m.acked = Some((at, m.receipts.len()));
        if !m.receipts.iter().all(|r| r.1) || m.later_policies.contains(&false) {
            return;
        }
        // A persistent subscriber owed it must have it durably queued (or have it already).
        let payload = Bytes::from(format!("m{n}"));
        for who in self.owed(n) {
            let c = &self.clients[who.idx()];
            if !c.has_session || self.drops[who.idx()] > 0 {
                continue;
            }
            let delivered = c.deliveries.iter().any(|d| d.msg == n);
            let stored = self
                .store
                .sessions
                .get(&who.key())
                .is_some_and(|s| s.queue.values().any(|(msg, _)| msg.payload == payload));
            if !delivered && !stored {
                self.violation(
                    Kind::AckBeforeDurable,
                    format!(
                        "m{n} acknowledged to {:?} before the store held it for persistent {who:?}",
                        self.msgs[n as usize].publisher
                    ),
                );
            }
        }
    }

    // ----------------------------------------------------------------------------------
    // The end of a run

    /// Everyone acks, every persistent session reconnects, the store keeps up: run until
    /// nothing moves. Then check what must have happened.
    pub(crate) fn finish(&mut self) {
        for who in EVERYONE {
            self.apply(&Op::Acking { who, on: true });
        }
        let mut quiet = false;
        for _ in 0..200 {
            let before = self.moves;
            // Persistent sessions come back, also those the gateway closed on the way.
            for who in EVERYONE {
                let c = &self.clients[who.idx()];
                if c.conn.is_none() && c.has_session {
                    self.apply(&Op::Connect { who, clean: false });
                }
            }
            self.durable(false);
            self.pump();
            for who in EVERYONE {
                while self.answer_one(who) {}
            }
            self.pump();
            if !self.store.has_pending() && before == self.moves {
                quiet = true;
                break;
            }
        }
        if !quiet {
            self.violation(Kind::Liveness, "the drain never went quiet".to_owned());
        }
        for c in &self.clients {
            if c.conn.is_some() && !c.connacked {
                self.violations.push(Violation {
                    kind: Kind::Liveness,
                    text: format!("{:?} never got its CONNACK", c.who),
                });
            }
            if c.live().is_none() {
                continue;
            }
            let waiting: Vec<_> = c
                .outgoing
                .iter()
                .map(|o| format!("m{}({:?})", o.msg, o.state))
                .collect();
            let mut text = Vec::new();
            if !waiting.is_empty() {
                text.push(format!(
                    "{:?}'s publishes never completed: {waiting:?}",
                    c.who
                ));
            }
            if !c.pending_sub.is_empty() || !c.pending_unsub.is_empty() {
                text.push(format!(
                    "{:?}'s SUBSCRIBE/UNSUBSCRIBE never answered",
                    c.who
                ));
            }
            for (pid, (n, epoch)) in &c.recv_qos2 {
                let (kind, t) = if c.pubrec_sent.contains(pid) {
                    (Kind::Qos2NeverReleased, format!("{:?} answered PUBREC for QoS 2 m{n} (packet id {pid}, epoch {epoch}) and never got PUBREL [MQTT-4.3.3-1]", c.who))
                } else {
                    (Kind::Qos2InflightDropped, format!("{:?} got QoS 2 m{n} (packet id {pid}, epoch {epoch}), lost the connection before its PUBREC went out, and the gateway neither re-sent nor released it [MQTT-4.4.0-1]", c.who))
                };
                self.violations.push(Violation { kind, text: t });
            }
            if !c.inflight_in.is_empty() {
                text.push(format!(
                    "{:?} still has deliveries in flight after acking all: {:?}",
                    c.who, c.inflight_in
                ));
            }
            for t in text {
                self.violations.push(Violation {
                    kind: Kind::Liveness,
                    text: t,
                });
            }
        }
        self.check_loss();
        self.check_order();
        self.check_qos2_once();
    }

    fn check_loss(&mut self) {
        let mut missing: BTreeMap<Who, Vec<u64>> = BTreeMap::new();
        let mut shadowed = Vec::new();
        for n in 0..self.msgs.len() as u64 {
            let m = &self.msgs[n as usize];
            let Some((_, receipts)) = m.acked else {
                continue;
            };
            if m.qos == QoS::AtMostOnce
                || !m.receipts[..receipts].iter().all(|r| r.1)
                || m.later_policies.contains(&false)
            {
                continue;
            }
            for who in self.owed(n) {
                let ds = &self.clients[who.idx()].deliveries;
                if ds.iter().any(|d| d.msg == n && d.app) {
                    continue;
                }
                if let Some(kind) = ds.iter().filter(|d| d.msg == n).find_map(|d| d.shadowed) {
                    shadowed.push((kind, format!("{who:?} never saw acknowledged m{n}: its packet id was still unreleased from before a crash")));
                } else {
                    missing.entry(who).or_default().push(n);
                }
            }
        }
        for (kind, text) in shadowed.into_iter().take(5) {
            self.violations.push(Violation { kind, text });
        }
        for (who, lost) in missing {
            let dropped = self.drops[who.idx()];
            if lost.len() as u64 > dropped {
                let lost: Vec<String> = lost.iter().map(|n| format!("m{n}")).collect();
                self.violations.push(Violation {
                    kind: Kind::Loss,
                    text: format!(
                        "{who:?} never got acknowledged {lost:?} (drops counted for it: {dropped})"
                    ),
                });
            }
        }
    }

    fn check_order(&mut self) {
        let mut found = Vec::new();
        for c in &self.clients {
            // First application delivery of each QoS >= 1 message, per session incarnation,
            // publisher and topic.
            // (incarnation, publisher, topic) -> [(message, epoch delivered in)]
            type Flow<'a> = (u32, Who, &'a str);
            let mut seqs: BTreeMap<Flow, Vec<(u64, u32)>> = BTreeMap::new();
            let mut firsts = BTreeSet::new();
            // A message the client could not take because a crash left its packet id in use
            // is out of order as a consequence; that is reported as `Qos2NeverReleased`.
            let shadowed: BTreeSet<u64> = c
                .deliveries
                .iter()
                .filter(|d| d.shadowed.is_some())
                .map(|d| d.msg)
                .collect();
            for d in &c.deliveries {
                if shadowed.contains(&d.msg)
                    || d.retain
                    || d.qos == QoS::AtMostOnce
                    || !d.app
                    || !firsts.insert((d.incarnation, d.msg))
                {
                    continue;
                }
                let m = &self.msgs[d.msg as usize];
                seqs.entry((d.incarnation, m.publisher, m.topic))
                    .or_default()
                    .push((d.msg, d.epoch));
            }
            for ((_, publisher, topic), seq) in seqs {
                for (i, &(later_sent, later_epoch)) in seq.iter().enumerate() {
                    for &(earlier_sent, earlier_epoch) in &seq[..i] {
                        // `earlier_sent` was delivered first; fine unless it was published after
                        // `later_sent` was last sent by its client. A message dropped over the
                        // offline cap may come back when a crash loses the drop: not an order.
                        if earlier_sent <= later_sent
                            || (later_epoch != earlier_epoch && self.drops[c.who.idx()] > 0)
                        {
                            continue;
                        }
                        let a = &self.msgs[later_sent as usize];
                        let b = &self.msgs[earlier_sent as usize];
                        let a_last = a.receipts.last().map_or(0, |r| r.0);
                        let b_first = b.receipts.first().map_or(0, |r| r.0);
                        if a_last < b_first {
                            found.push(format!(
                                "{:?} got m{earlier_sent} before m{later_sent}, both from {publisher:?} on {topic:?}, published the other way round",
                                c.who
                            ));
                        }
                    }
                }
            }
        }
        for text in found.into_iter().take(5) {
            self.violations.push(Violation {
                kind: Kind::Order,
                text,
            });
        }
    }

    fn check_qos2_once(&mut self) {
        let mut found = Vec::new();
        for c in &self.clients {
            let mut per: BTreeMap<(u32, u64), Vec<&Delivery>> = BTreeMap::new();
            for d in &c.deliveries {
                if d.app && !d.retain && d.qos == QoS::ExactlyOnce {
                    per.entry((d.incarnation, d.msg)).or_default().push(d);
                }
            }
            for ((_, n), ds) in per {
                if ds.len() < 2 {
                    continue;
                }
                let m = &self.msgs[n as usize];
                let first = m.receipts.first().map_or(0, |r| r.0);
                let last = ds.last().map_or(0, |d| d.at);
                // Overlapping subscriptions may each carry a copy [MQTT-3.3.5-1].
                let filters: BTreeSet<&str> = c
                    .intervals
                    .iter()
                    .filter(|i| matches(i.filter, m.topic))
                    .filter(|i| i.start <= last && i.end.is_none_or(|e| e >= first))
                    .map(|i| i.filter)
                    .collect();
                if ds.len() > filters.len() * m.publisher_sessions.len().max(1) {
                    let crash = ds.iter().any(|d| d.epoch != ds[0].epoch);
                    let kind = if crash {
                        Kind::Qos2AcrossCrash
                    } else {
                        Kind::Qos2Duplicate
                    };
                    found.push((
                        kind,
                        format!("{:?}'s application got QoS 2 m{n} {} times (matching filters {filters:?})", c.who, ds.len()),
                    ));
                }
            }
        }
        for (kind, text) in found.into_iter().take(5) {
            self.violations.push(Violation { kind, text });
        }
    }
}
