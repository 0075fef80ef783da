//! Unit tests of the engine, each named after the normative statement or promise it checks.
//! They drive the public API the way the driver does and look at packets and actions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::codec::{
    ConnAck, ConnectCode, Publish, QoS, SubAck, SubAckCode, Subscribe, Unsubscribe, Will,
};

mod backpressure;
mod connect;
mod durability;
mod policy;
mod prop;
mod qos;
mod routing;
mod throughput;

/// Allows everything except what the lists deny (topic or filter prefixes).
#[derive(Default)]
pub(super) struct Acl {
    pub(super) deny_pub: Vec<&'static str>,
    pub(super) deny_sub: Vec<&'static str>,
}

impl Authorizer for Acl {
    fn may_publish(&self, _who: &SessionKey, topic: &str) -> bool {
        !self.deny_pub.iter().any(|p| topic.starts_with(p))
    }
    fn may_subscribe(&self, _who: &SessionKey, filter: &str) -> bool {
        !self.deny_sub.iter().any(|p| filter.starts_with(p))
    }
}

pub(super) fn key(id: &str) -> SessionKey {
    SessionKey {
        role: Role::Device,
        id: id.to_owned(),
        instance: None,
    }
}

pub(super) fn connect_packet(id: &str, clean: bool, will: Option<Will>) -> Connect {
    Connect {
        level: 4,
        clean_session: clean,
        keep_alive: 30,
        client_id: id.to_owned(),
        will,
        username: None,
        password: None,
    }
}

pub(super) fn publish(topic: &str, qos: u8, pid: u16, payload: &str) -> Packet {
    let qos = QoS::from_u8(qos).unwrap();
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_owned(),
        packet_id: (qos != QoS::AtMostOnce).then_some(pid),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    })
}

pub(super) fn retained(topic: &str, qos: u8, pid: u16, payload: &str) -> Packet {
    match publish(topic, qos, pid, payload) {
        Packet::Publish(p) => Packet::Publish(Publish { retain: true, ..p }),
        other => other,
    }
}

pub(super) fn subscribe(pid: u16, filters: &[(&str, u8)]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid,
        filters: filters
            .iter()
            .map(|(f, q)| ((*f).to_owned(), QoS::from_u8(*q).unwrap()))
            .collect(),
    })
}

pub(super) fn unsubscribe(pid: u16, filters: &[&str]) -> Packet {
    Packet::Unsubscribe(Unsubscribe {
        packet_id: pid,
        filters: filters.iter().map(|f| (*f).to_owned()).collect(),
    })
}

/// A delivered PUBLISH, reduced to what tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Got {
    pub(super) topic: String,
    pub(super) payload: String,
    pub(super) qos: u8,
    pub(super) retain: bool,
    pub(super) dup: bool,
    pub(super) pid: Option<u16>,
}

pub(super) fn got(p: &Packet) -> Option<Got> {
    match p {
        Packet::Publish(p) => Some(Got {
            topic: p.topic.clone(),
            payload: String::from_utf8_lossy(&p.payload).into_owned(),
            qos: p.qos as u8,
            retain: p.retain,
            dup: p.dup,
            pid: p.packet_id,
        }),
        _ => None,
    }
}

/// The engine plus a clock and a log of every action it gave.
pub(super) struct H {
    pub(super) e: Engine,
    pub(super) now: Instant,
    pub(super) log: Vec<Action>,
}

impl H {
    pub(super) fn new(settings: Settings) -> Self {
        Self::with_acl(settings, Acl::default())
    }

    pub(super) fn with_acl(settings: Settings, acl: Acl) -> Self {
        H {
            e: Engine::new(settings, Arc::new(acl)),
            now: Instant::now(),
            log: Vec::new(),
        }
    }

    /// Takes every pending action into the log; returns them.
    pub(super) fn drain(&mut self) -> Vec<Action> {
        let mut new = Vec::new();
        while let Some(a) = self.e.poll_action() {
            new.push(a);
        }
        self.log.extend(new.iter().cloned());
        new
    }

    pub(super) fn connect(&mut self, conn: u64, id: &str, clean: bool) -> ConnAck {
        self.connect_with(conn, key(id), connect_packet(id, clean, None))
    }

    pub(super) fn connect_with(&mut self, conn: u64, key: SessionKey, c: Connect) -> ConnAck {
        self.e.connect(self.now, ConnId(conn), key, c);
        self.drain();
        // A budget of 0 gives exactly one packet: the CONNACK, leaving re-sends queued.
        let mut out = Vec::new();
        self.e.transmit(ConnId(conn), 0, &mut out);
        self.drain();
        match out.first() {
            Some(Packet::ConnAck(a)) => *a,
            other => panic!("expected CONNACK first, got {other:?}"),
        }
    }

    pub(super) fn pkt(&mut self, conn: u64, p: Packet) -> Vec<Action> {
        self.e.packet(self.now, ConnId(conn), p);
        self.drain()
    }

    /// Everything `conn` may write now.
    pub(super) fn tx(&mut self, conn: u64) -> Vec<Packet> {
        let mut out = Vec::new();
        self.e.transmit(ConnId(conn), usize::MAX, &mut out);
        self.drain();
        out
    }

    pub(super) fn tx_got(&mut self, conn: u64) -> Vec<Got> {
        self.tx(conn).iter().filter_map(got).collect()
    }

    pub(super) fn gone(&mut self, conn: u64, how: Disconnected) {
        self.e.disconnected(self.now, ConnId(conn), how);
        self.drain();
    }

    pub(super) fn durable_all(&mut self) {
        let last = self.last_seq();
        self.e.durable(self.now, last);
        self.drain();
    }

    pub(super) fn last_seq(&self) -> StoreSeq {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Store { seq, .. } => Some(*seq),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    pub(super) fn tick(&mut self, after: Duration) {
        self.now += after;
        self.e.tick(self.now);
        self.drain();
    }

    pub(super) fn sub(&mut self, conn: u64, filters: &[(&str, u8)]) -> Vec<SubAckCode> {
        self.pkt(conn, subscribe(1, filters));
        // One packet at a time up to the SUBACK, so what follows it stays queued. A persistent
        // session's SUBACK waits for its subscription to be durable: the store catches up once.
        let mut caught_up = false;
        loop {
            let mut out = Vec::new();
            self.e.transmit(ConnId(conn), 0, &mut out);
            self.drain();
            match out.pop() {
                Some(Packet::SubAck(SubAck { codes, .. })) => return codes,
                Some(_) => continue,
                None if !caught_up => {
                    caught_up = true;
                    self.durable_all();
                }
                None => panic!("no SUBACK"),
            }
        }
    }

    pub(super) fn store_ops(&self) -> Vec<StoreOp> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Store { op, .. } => Some(op.clone()),
                _ => None,
            })
            .collect()
    }

    pub(super) fn notices(&self) -> Vec<Notice> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Notice(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    pub(super) fn closes(&self) -> Vec<(u64, CloseReason)> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Close { conn, reason } => Some((conn.0, reason.clone())),
                _ => None,
            })
            .collect()
    }

    pub(super) fn clear_log(&mut self) {
        self.log.clear();
    }
}

pub(super) fn small(queue: usize) -> Settings {
    Settings {
        queue_messages: queue,
        max_inflight_out: 2,
        ..Settings::default()
    }
}

impl Engine {
    /// Checks the engine's internal bookkeeping; panics with a description when broken.
    pub(super) fn check_invariants(&self) {
        let window = self.settings.max_inflight_out.max(1);
        for (s, sess) in self.sessions.iter().enumerate() {
            let Some(sess) = sess else { continue };
            assert_eq!(
                self.by_key.get(&sess.key),
                Some(&s),
                "by_key of {}",
                sess.key
            );
            assert!(sess.inflight.len() <= window, "in-flight over the window");
            assert!(
                sess.queue_iter()
                    .all(|q| q.visible_at != session::INVISIBLE),
                "a queued message left without its visibility position"
            );
            let bytes: usize = sess.queue_iter().map(|q| q.msg.payload.len()).sum();
            assert_eq!(bytes, sess.queue_bytes(), "queue byte counter");
            let pinned = sess.queue_iter().filter(|q| q.pinned()).count();
            assert_eq!(pinned, sess.queue_pinned, "pinned counter");
            if let Some(conn) = sess.conn {
                assert_eq!(self.conns.get(&conn).map(|c| c.session), Some(s));
            } else {
                assert!(sess.persistent, "offline clean session kept");
                assert!(sess.inflight.is_empty(), "offline session with in-flight");
            }
            assert!(sess.unreleased_in.len() <= self.settings.max_unreleased_in);
        }
        for (conn, c) in &self.conns {
            let sess = self.session(c.session).expect("connection without session");
            assert_eq!(sess.conn, Some(*conn));
            assert!(c.held <= self.settings.max_held_in, "held over the cap");
            assert!(c.processed <= c.inbound.len());
            assert!(
                c.control.len() <= self.control_cap(),
                "control queue over its cap"
            );
            let qos0 = c
                .inbound
                .iter()
                .filter(|i| matches!(i, conn::Inbound::Publish(p) if p.qos == QoS::AtMostOnce))
                .count();
            assert_eq!(qos0, c.qos0_waiting, "QoS 0 waiting counter");
            assert!(qos0 <= self.settings.max_held_in.max(1));
            let held = c
                .inbound
                .iter()
                .filter(|i| match i {
                    conn::Inbound::Publish(p) => p.qos != QoS::AtMostOnce,
                    conn::Inbound::PubRel(_) => true,
                    conn::Inbound::Answer { packet, .. } => packet.is_some(),
                    conn::Inbound::Control { .. } => false,
                })
                .count();
            assert_eq!(held, c.held, "held counter");
        }
        assert_eq!(self.by_key.len(), self.sessions.iter().flatten().count());
    }
}
