//! Packets to clients: the control queue, the in-flight window, and acknowledgements of what
//! the engine sent.

use std::cmp::Reverse;

use super::session::{packet_id, InFlight, SessionIdx, INVISIBLE};
use super::{Action, CloseReason, ConnId, Engine, StoreOp};
use crate::codec::{Packet, Publish, QoS};

/// Answers beyond the protocol's own bounds a connection may leave unread (pings, SUBACKs).
const CONTROL_SLACK: usize = 256;

/// Roughly how many bytes `p` takes on the wire (for the transmit budget).
fn wire_size(p: &Packet) -> usize {
    match p {
        Packet::Publish(p) => 5 + 2 + p.topic.len() + 2 + p.payload.len(),
        Packet::SubAck(s) => 4 + s.codes.len(),
        _ => 4,
    }
}

impl Engine {
    /// Queues an answer for `conn`.
    pub(super) fn push_control(&mut self, conn: ConnId, p: Packet) {
        let cap = self.control_cap();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.control.len() >= cap {
            // It keeps asking (PINGREQ, SUBSCRIBE, ...) and does not read the answers.
            self.close(conn, CloseReason::TooManyHeld);
            return;
        }
        c.control.push_back(p);
        self.notify(conn);
    }

    /// Answers one connection may have waiting to be written: everything a well-behaved
    /// client can have outstanding, plus room for pings and subscriptions.
    pub(super) fn control_cap(&self) -> usize {
        self.settings
            .max_held_in
            .saturating_add(self.settings.max_unreleased_in)
            .saturating_add(self.settings.max_inflight_out)
            .saturating_add(CONTROL_SLACK)
    }

    /// Emits [`Action::Transmit`] if `conn` has something to send and has not been told yet.
    pub(super) fn notify(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.transmit_wanted {
            return;
        }
        let s = c.session;
        let mut sendable = !c.control.is_empty();
        if let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) {
            if !sendable && !sess.can_send(&self.settings, self.durable_seq) {
                // Ask to be told when the head's store write is durable.
                let wait = sess.queue_front().map_or(0, |q| q.visible_at);
                if wait > self.durable_seq && wait != INVISIBLE && wait > sess.visible_wait {
                    sess.visible_wait = wait;
                    self.invisible.push(Reverse((wait, s)));
                }
            }
            sendable = sendable || sess.can_send(&self.settings, self.durable_seq);
        }
        if sendable {
            c.transmit_wanted = true;
            self.out.push(Action::Transmit(conn));
        }
    }

    /// Connections held back by session `s`'s full queue may try again.
    pub(super) fn wake(&mut self, s: SessionIdx) {
        let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) else {
            return;
        };
        for conn in std::mem::take(&mut sess.waiters) {
            if let Some(c) = self.conns.get_mut(&conn) {
                if c.blocked_on == Some(s) {
                    c.blocked_on = None;
                    self.to_pump.push_back(conn);
                }
            }
        }
    }

    pub(super) fn do_transmit(&mut self, conn: ConnId, max_bytes: usize, out: &mut Vec<Packet>) {
        if let Some(p) = self.refused.remove(&conn) {
            out.push(p);
            return;
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.transmit_wanted = false;
        let mut budget = max_bytes;
        let mut first = true;
        while let Some(p) = c.control.front() {
            let size = wire_size(p);
            if !first && size > budget {
                break;
            }
            if let Some(p) = c.control.pop_front() {
                out.push(p);
            }
            budget = budget.saturating_sub(size);
            first = false;
        }
        // An idle connection keeps no queue storage: memory per idle connection is a target.
        if c.control.is_empty() {
            c.control = Default::default();
        }
        let s = c.session;
        if c.control.is_empty() && self.send_queued(s, &mut budget, first, out) {
            let full = self
                .session(s)
                .is_none_or(|sess| sess.is_full(&self.settings));
            if !full {
                if let Some(sess) = self.session_mut(s) {
                    sess.full_since = None;
                }
                self.wake(s);
            }
        }
        self.notify(conn);
    }

    /// Moves messages from session `s`'s queue to `out` (and QoS 1/2 into the in-flight
    /// window) within the budget. True if anything left the queue.
    fn send_queued(
        &mut self,
        s: SessionIdx,
        budget: &mut usize,
        mut first: bool,
        out: &mut Vec<Packet>,
    ) -> bool {
        let window = self.settings.max_inflight_out.max(1);
        let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) else {
            return false;
        };
        let mut moved = false;
        while sess.can_send(&self.settings, self.durable_seq) {
            let Some(head) = sess.queue_front() else {
                break;
            };
            let size = 5 + 2 + head.msg.topic.len() + 2 + head.msg.payload.len();
            if !first && size > *budget {
                break;
            }
            let Some(q) = sess.pop_front() else {
                break;
            };
            moved = true;
            first = false;
            *budget = budget.saturating_sub(size);
            let Some(id) = q.id else {
                out.push(Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtMostOnce,
                    retain: q.msg.retain,
                    topic: q.msg.topic.to_string(),
                    packet_id: None,
                    payload: q.msg.payload,
                }));
                continue;
            };
            let pid = packet_id(id);
            if q.released {
                // [MQTT-4.4.0-1]: a QoS 2 message PUBREC'd before goes on with PUBREL.
                out.push(Packet::PubRel(pid));
            } else {
                out.push(Packet::Publish(Publish {
                    dup: q.dup,
                    qos: q.msg.qos,
                    retain: q.msg.retain,
                    topic: q.msg.topic.to_string(),
                    packet_id: Some(pid),
                    payload: q.msg.payload.clone(),
                }));
            }
            sess.inflight.push_back(InFlight {
                id,
                packet_id: pid,
                msg: q.msg,
                released: q.released,
                released_seq: if q.released { q.visible_at } else { 0 },
            });
            debug_assert!(sess.inflight.len() <= window);
        }
        moved
    }

    /// PUBACK from the client for a QoS 1 message the engine sent.
    pub(super) fn on_puback(&mut self, conn: ConnId, pid: u16) {
        self.acknowledge(conn, pid, |f| f.msg.qos == QoS::AtLeastOnce);
    }

    /// PUBCOMP from the client for a released QoS 2 message.
    pub(super) fn on_pubcomp(&mut self, conn: ConnId, pid: u16) {
        self.acknowledge(conn, pid, |f| f.msg.qos == QoS::ExactlyOnce && f.released);
    }

    /// Removes the in-flight message `pid` if `expected` holds for it; unknown ids are
    /// ignored (a late or repeated acknowledgement is not a violation).
    fn acknowledge(&mut self, conn: ConnId, pid: u16, expected: impl Fn(&InFlight) -> bool) {
        let Some(s) = self.conns.get(&conn).map(|c| c.session) else {
            return;
        };
        let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) else {
            return;
        };
        let Some(i) = sess
            .inflight
            .iter()
            .position(|f| f.packet_id == pid && expected(f))
        else {
            return;
        };
        let Some(f) = sess.inflight.remove(i) else {
            return;
        };
        if sess.inflight.is_empty() {
            sess.inflight = Default::default();
        }
        if sess.persistent {
            self.out.store(StoreOp::Dequeued {
                key: sess.key.clone(),
                id: f.id,
            });
        }
        self.notify(conn);
    }

    /// PUBREC from the client: the QoS 2 message is received; PUBREL goes out.
    pub(super) fn on_pubrec(&mut self, conn: ConnId, pid: u16) {
        let Some(s) = self.conns.get(&conn).map(|c| c.session) else {
            return;
        };
        let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) else {
            return;
        };
        let Some(f) = sess
            .inflight
            .iter_mut()
            .find(|f| f.packet_id == pid && f.msg.qos == QoS::ExactlyOnce)
        else {
            return;
        };
        if !f.released {
            f.released = true;
            if sess.persistent {
                f.released_seq = self.out.store(StoreOp::Released {
                    key: sess.key.clone(),
                    id: f.id,
                });
            }
        }
        let seq = f.released_seq;
        if seq <= self.durable_seq {
            self.push_control(conn, Packet::PubRel(pid));
            return;
        }
        // PUBREL once the release is durable (a repeated PUBREC meanwhile changes nothing).
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.rel_waiting.iter().any(|&(_, p)| p == pid) {
            c.rel_waiting.push_back((seq, pid));
            self.durable_waiters.push(Reverse((seq, conn)));
        }
    }
}
