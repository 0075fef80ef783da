//! Random event sequences against the engine: no panic, its bookkeeping stays within every
//! cap, and once every client keeps reading and acknowledging, every held publish is answered
//! (no deadlock, including clients publishing to each other).

use proptest::prelude::*;

use super::durability::MemStore;
use super::*;

const CLIENTS: usize = 4;
const TOPICS: &[&str] = &["to/0", "to/1", "to/2", "to/3", "all", "$sys/x"];
const FILTERS: &[&str] = &["to/0", "to/1", "to/2", "to/3", "to/+", "#", "all", "$sys/#"];

#[derive(Debug, Clone)]
enum Ev {
    Connect(usize, bool),
    Gone(usize, bool),
    Sub(usize, usize, u8),
    Unsub(usize, usize),
    Pub(usize, usize, u8, bool, u16),
    PubRel(usize, u16),
    RawAck(usize, u8, u16),
    Ping(usize),
    Read(usize),
    Durable,
    Tick(u64),
    Policy(bool),
    Restart,
}

fn ev() -> impl Strategy<Value = Ev> {
    let c = 0..CLIENTS;
    prop_oneof![
        2 => (c.clone(), any::<bool>()).prop_map(|(c, clean)| Ev::Connect(c, clean)),
        1 => (c.clone(), any::<bool>()).prop_map(|(c, g)| Ev::Gone(c, g)),
        2 => (c.clone(), 0..FILTERS.len(), 0u8..3).prop_map(|(c, f, q)| Ev::Sub(c, f, q)),
        1 => (c.clone(), 0..FILTERS.len()).prop_map(|(c, f)| Ev::Unsub(c, f)),
        6 => (c.clone(), 0..TOPICS.len(), 0u8..3, any::<bool>(), 1u16..6)
            .prop_map(|(c, t, q, r, p)| Ev::Pub(c, t, q, r, p)),
        1 => (c.clone(), 1u16..6).prop_map(|(c, p)| Ev::PubRel(c, p)),
        1 => (c.clone(), 0u8..3, 1u16..8).prop_map(|(c, k, p)| Ev::RawAck(c, k, p)),
        1 => c.clone().prop_map(Ev::Ping),
        4 => c.prop_map(Ev::Read),
        2 => Just(Ev::Durable),
        1 => (0u64..40).prop_map(Ev::Tick),
        1 => any::<bool>().prop_map(Ev::Policy),
        1 => Just(Ev::Restart),
    ]
}

/// A client as the test drives it: its current connection, if any.
#[derive(Default, Clone)]
struct Client {
    conn: Option<u64>,
    /// PUBRECs received for its own QoS 2 publishes, to release.
    to_release: Vec<u16>,
}

struct World {
    h: H,
    clients: Vec<Client>,
    next_conn: u64,
    store: MemStore,
    /// Writes given to the store and not yet reported durable (lost in a crash).
    pending: Vec<StoreOp>,
    applied: usize,
}

fn settings() -> Settings {
    Settings {
        max_inflight_out: 2,
        max_held_in: 4,
        max_unreleased_in: 3,
        queue_messages: 2,
        queue_bytes: 64,
        offline_messages: 3,
        offline_bytes: 64,
        stalled_after: Duration::from_secs(30),
        session_expiry: Duration::from_secs(100),
        denied_publish: DeniedPublish::AckAndDrop,
    }
}

impl World {
    fn new() -> Self {
        World {
            h: H::new(settings()),
            clients: vec![Client::default(); CLIENTS],
            next_conn: 1,
            store: MemStore::default(),
            pending: Vec::new(),
            applied: 0,
        }
    }

    /// Keeps the client table in step with the engine's closes, and the store with its writes.
    fn sync(&mut self) {
        for a in &self.h.log[self.applied..] {
            match a {
                Action::Close { conn, .. } => {
                    for c in &mut self.clients {
                        if c.conn == Some(conn.0) {
                            c.conn = None;
                        }
                    }
                }
                Action::Store { op, .. } => self.pending.push(op.clone()),
                _ => {}
            }
        }
        self.applied = self.h.log.len();
    }

    /// The store makes every write so far durable and says so.
    fn durable(&mut self) {
        self.sync();
        for op in self.pending.drain(..) {
            self.store.apply(&op);
        }
        self.h.durable_all();
        self.sync();
    }

    /// Reads everything the client's connection has, answering like a good client.
    fn read(&mut self, i: usize, ack: bool) {
        let Some(conn) = self.clients[i].conn else {
            return;
        };
        for p in self.h.tx(conn) {
            let answer = match p {
                Packet::Publish(Publish {
                    qos: QoS::AtLeastOnce,
                    packet_id: Some(id),
                    ..
                }) => Some(Packet::PubAck(id)),
                Packet::Publish(Publish {
                    qos: QoS::ExactlyOnce,
                    packet_id: Some(id),
                    ..
                }) => Some(Packet::PubRec(id)),
                Packet::PubRel(id) => Some(Packet::PubComp(id)),
                Packet::PubRec(id) => {
                    self.clients[i].to_release.push(id);
                    None
                }
                _ => None,
            };
            if let (true, Some(a)) = (ack, answer) {
                self.h.pkt(conn, a);
                self.sync();
                if self.clients[i].conn.is_none() {
                    return;
                }
            }
        }
        if ack {
            for id in std::mem::take(&mut self.clients[i].to_release) {
                self.h.pkt(conn, Packet::PubRel(id));
            }
        }
        self.sync();
    }

    fn step(&mut self, e: Ev) {
        let conn_of = |w: &World, i: usize| w.clients[i].conn;
        match e {
            Ev::Connect(i, clean) => {
                let conn = self.next_conn;
                self.next_conn += 1;
                let id = format!("c{i}");
                self.h.e.connect(
                    self.h.now,
                    ConnId(conn),
                    key(&id),
                    connect_packet(&id, clean, None),
                );
                self.h.drain();
                self.sync();
                self.clients[i].conn = Some(conn);
                self.clients[i].to_release.clear();
            }
            Ev::Gone(i, graceful) => {
                if let Some(conn) = conn_of(self, i) {
                    let how = if graceful {
                        Disconnected::Graceful
                    } else {
                        Disconnected::Abnormal
                    };
                    self.h.gone(conn, how);
                    self.clients[i].conn = None;
                }
            }
            Ev::Sub(i, f, q) => {
                if let Some(conn) = conn_of(self, i) {
                    self.h.pkt(conn, subscribe(1, &[(FILTERS[f], q)]));
                }
            }
            Ev::Unsub(i, f) => {
                if let Some(conn) = conn_of(self, i) {
                    self.h.pkt(conn, unsubscribe(2, &[FILTERS[f]]));
                }
            }
            Ev::Pub(i, t, q, r, pid) => {
                if let Some(conn) = conn_of(self, i) {
                    let p = if r {
                        retained(TOPICS[t], q, pid, "x")
                    } else {
                        publish(TOPICS[t], q, pid, "xy")
                    };
                    self.h.pkt(conn, p);
                }
            }
            Ev::PubRel(i, pid) => {
                if let Some(conn) = conn_of(self, i) {
                    self.h.pkt(conn, Packet::PubRel(pid));
                }
            }
            Ev::RawAck(i, kind, pid) => {
                if let Some(conn) = conn_of(self, i) {
                    let p = match kind {
                        0 => Packet::PubAck(pid),
                        1 => Packet::PubRec(pid),
                        _ => Packet::PubComp(pid),
                    };
                    self.h.pkt(conn, p);
                }
            }
            Ev::Ping(i) => {
                if let Some(conn) = conn_of(self, i) {
                    self.h.pkt(conn, Packet::PingReq);
                }
            }
            Ev::Read(i) => self.read(i, true),
            Ev::Durable => self.durable(),
            Ev::Tick(s) => self.h.tick(Duration::from_secs(s)),
            Ev::Policy(strict) => {
                let acl = if strict {
                    Acl {
                        deny_pub: vec!["to/3"],
                        deny_sub: vec!["#", "to/0"],
                    }
                } else {
                    Acl::default()
                };
                self.h.e.set_authorizer(self.h.now, Arc::new(acl));
                self.h.drain();
            }
            Ev::Restart => {
                // A crash: only what was reported durable survives.
                self.sync();
                self.pending.clear();
                let (sessions, retained) = self.store.load();
                let mut e = Engine::new(settings(), Arc::new(Acl::default()));
                e.restore(self.h.now, sessions, retained);
                self.h.e = e;
                self.h.drain();
                for c in &mut self.clients {
                    c.conn = None;
                    c.to_release.clear();
                }
            }
        }
        self.sync();
        self.h.e.check_invariants();
    }
}

proptest! {
    // 256 cases by default; PROPTEST_CASES raises it.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_event_sequences_keep_every_invariant_and_never_deadlock(
        events in proptest::collection::vec(ev(), 1..120)
    ) {
        let mut w = World::new();
        for e in events {
            w.step(e);
        }
        // Every client now reads and acknowledges; the store keeps up. Every publish that is
        // held must then be answered: nothing waits forever.
        for _ in 0..50 {
            w.durable();
            for i in 0..CLIENTS {
                w.read(i, true);
            }
            w.h.e.check_invariants();
        }
        for (conn, c) in &w.h.e.conns {
            prop_assert!(c.inbound.is_empty(), "conn {conn:?} still holds {} entries", c.inbound.len());
        }
        for sess in w.h.e.sessions.iter().flatten() {
            if sess.conn.is_some() {
                prop_assert!(sess.inflight.is_empty() && sess.queue_len() == 0,
                    "{} still has messages in flight or queued", sess.key);
            }
        }
    }
}
