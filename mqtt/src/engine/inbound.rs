//! Packets from clients: dispatch, and the incoming pipeline that routes publishes and
//! answers them in the order the client sent them.

use std::cmp::Reverse;
use std::sync::Arc;

use super::conn::{answer_for, InPublish, Inbound};
use super::session::SessionIdx;
use super::{CloseReason, ConnId, DeniedPublish, DropReason, Engine, Notice, StoreOp, StoreSeq};
use crate::codec::{Packet, Publish, QoS};
use crate::topic;

/// What processing one incoming entry came to.
enum Step {
    /// Processed: this answer (if any) once writes up to the position are durable.
    Done(Option<Packet>, StoreSeq),
    /// A subscriber's queue is full: retry when it has room.
    Blocked(SessionIdx),
    /// The connection must go.
    Close(CloseReason),
}

impl Engine {
    pub(super) fn on_packet(&mut self, conn: ConnId, packet: Packet) {
        if !self.conns.contains_key(&conn) {
            // Before an accepted CONNECT, or after the engine closed it: nothing to act on.
            return;
        }
        match packet {
            Packet::Publish(p) => self.on_publish(conn, p),
            Packet::PubRel(id) => self.on_pubrel(conn, id),
            Packet::PubAck(id) => self.on_puback(conn, id),
            Packet::PubRec(id) => self.on_pubrec(conn, id),
            Packet::PubComp(id) => self.on_pubcomp(conn, id),
            Packet::Subscribe(s) => self.on_subscribe(conn, s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(conn, u),
            Packet::PingReq => self.push_control(conn, Packet::PingResp),
            Packet::Disconnect => {
                // [MQTT-3.14.4-3]: the will is discarded; the driver reports the end.
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.will = None;
                }
            }
            Packet::Connect(_) => self.close(
                conn,
                CloseReason::ProtocolViolation("second CONNECT [MQTT-3.1.0-2]"),
            ),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => self
                .close(
                    conn,
                    CloseReason::ProtocolViolation("server-to-client packet sent by a client"),
                ),
        }
    }

    fn on_publish(&mut self, conn: ConnId, p: Publish) {
        if !topic::valid_name(&p.topic) {
            self.close(
                conn,
                CloseReason::ProtocolViolation("PUBLISH topic name not valid [MQTT-3.3.2-2]"),
            );
            return;
        }
        let packet_id = match (p.qos, p.packet_id) {
            (QoS::AtMostOnce, _) => None,
            (_, Some(id)) if id != 0 => Some(id),
            _ => {
                self.close(
                    conn,
                    CloseReason::ProtocolViolation("QoS 1/2 PUBLISH without packet id"),
                );
                return;
            }
        };
        // Access is decided when the PUBLISH arrives, under the policy of that moment, even if
        // it then waits behind a held one.
        let Some(sess) = self.conns.get(&conn).and_then(|c| self.session(c.session)) else {
            return;
        };
        // A QoS 2 PUBLISH re-sent for an id already accepted is not published again, only
        // answered: the policy of today does not apply to it (else a client whose first send
        // was allowed could never finish, or be closed on every reconnect).
        let accepted_before = p.qos == QoS::ExactlyOnce
            && packet_id.is_some_and(|id| sess.unreleased_in.contains(&id));
        let denied = !accepted_before && !self.auth.may_publish(&sess.key, &p.topic);
        if denied {
            self.out.notice(Notice::PublishDenied {
                key: sess.key.clone(),
                topic: p.topic.clone(),
            });
            if self.settings.denied_publish == DeniedPublish::Disconnect {
                self.close(conn, CloseReason::DeniedPublish);
                return;
            }
            if p.qos == QoS::AtMostOnce {
                return;
            }
        }
        let max_held = self.settings.max_held_in;
        let control_cap = self.control_cap();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if p.qos == QoS::AtMostOnce {
            if c.qos0_waiting >= max_held.max(1) {
                // QoS 0 behind a held publish, and too many of them: dropped, counted.
                if let Some(sess) = self.sessions.get(c.session).and_then(Option::as_ref) {
                    self.out.notice(Notice::Dropped {
                        key: sess.key.clone(),
                        reason: DropReason::Qos0QueueFull,
                        count: 1,
                    });
                }
                return;
            }
            c.qos0_waiting += 1;
        } else {
            if c.held >= max_held || c.control.len() >= control_cap {
                self.close(conn, CloseReason::TooManyHeld);
                return;
            }
            c.held += 1;
        }
        c.inbound.push_back(Inbound::Publish(InPublish {
            topic: Arc::from(p.topic),
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            packet_id,
            denied,
        }));
        if c.blocked_on.is_none() {
            self.pump(conn);
        }
    }

    fn on_pubrel(&mut self, conn: ConnId, id: u16) {
        let max_held = self.settings.max_held_in;
        let control_cap = self.control_cap();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.held >= max_held || c.control.len() >= control_cap {
            self.close(conn, CloseReason::TooManyHeld);
            return;
        }
        c.held += 1;
        c.inbound.push_back(Inbound::PubRel(id));
        if c.blocked_on.is_none() {
            self.pump(conn);
        }
    }

    /// Queues `packet` (a SUBACK or UNSUBACK) behind `conn`'s earlier answers, to go out once
    /// they have and the writes up to `need` are durable. A client that keeps subscribing
    /// while they wait is closed at the same cap as one that does not read its answers.
    pub(super) fn push_answer(&mut self, conn: ConnId, packet: Packet, need: StoreSeq) {
        let cap = self.control_cap();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.inbound.len() >= cap {
            self.close(conn, CloseReason::TooManyHeld);
            return;
        }
        c.inbound.push_back(Inbound::Control { packet, need });
        self.pump(conn);
    }

    /// Processes `conn`'s waiting entries in order until one is blocked, then writes out the
    /// answers that are ready.
    pub(super) fn pump(&mut self, conn: ConnId) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            let i = c.processed;
            let s = c.session;
            let Some(entry) = c.inbound.get_mut(i) else {
                break;
            };
            let placeholder = Inbound::Answer {
                packet: None,
                need: 0,
            };
            let taken = std::mem::replace(entry, placeholder);
            let step = match &taken {
                Inbound::Publish(p) => self.process_publish(s, p),
                Inbound::PubRel(id) => self.process_pubrel(s, *id),
                Inbound::Answer { .. } | Inbound::Control { .. } => Step::Done(None, 0),
            };
            let last_seq = self.out.last_seq;
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            match step {
                Step::Done(packet, need) => {
                    if let Inbound::Publish(p) = &taken {
                        if p.qos == QoS::AtMostOnce {
                            c.qos0_waiting = c.qos0_waiting.saturating_sub(1);
                        }
                    }
                    match (packet, taken) {
                        (None, answered @ (Inbound::Answer { .. } | Inbound::Control { .. })) => {
                            if let Some(e) = c.inbound.get_mut(i) {
                                *e = answered;
                            }
                            c.processed += 1;
                        }
                        (None, _) => {
                            // Nothing to answer (QoS 0): it leaves the pipeline now, so it
                            // takes no room while earlier answers wait for the store.
                            c.inbound.remove(i);
                        }
                        (Some(packet), _) => {
                            // Answered only once every write made so far is durable, not only
                            // its own: where it was routed may rest on one not yet durable (an
                            // UNSUBSCRIBE before it), and a crash must not leave it acknowledged
                            // against a state the restart no longer has. Costs nothing when
                            // nothing persistent is written.
                            let need = need.max(last_seq);
                            if let Some(e) = c.inbound.get_mut(i) {
                                *e = Inbound::Answer {
                                    packet: Some(packet),
                                    need,
                                };
                            }
                            c.processed += 1;
                        }
                    }
                }
                Step::Blocked(b) => {
                    if let Some(e) = c.inbound.get_mut(i) {
                        *e = taken;
                    }
                    if c.blocked_on != Some(b) {
                        c.blocked_on = Some(b);
                        if let Some(sess) = self.sessions.get_mut(b).and_then(Option::as_mut) {
                            sess.waiters.push(conn);
                        }
                    }
                    break;
                }
                Step::Close(reason) => {
                    self.close(conn, reason);
                    return;
                }
            }
        }
        self.flush_answers(conn);
    }

    /// Moves the answers at the front of `conn`'s pipeline whose writes are durable to its
    /// control queue.
    fn flush_answers(&mut self, conn: ConnId) {
        let durable = self.durable_seq;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let mut pushed = false;
        while let Some(&(seq, pid)) = c.rel_waiting.front() {
            if seq > durable {
                break;
            }
            c.rel_waiting.pop_front();
            c.control.push_back(Packet::PubRel(pid));
            pushed = true;
        }
        while c.processed > 0 {
            let need = match c.inbound.front() {
                Some(Inbound::Answer { need, .. } | Inbound::Control { need, .. }) => *need,
                _ => break,
            };
            if need > durable {
                if c.durable_wait < need {
                    c.durable_wait = need;
                    self.durable_waiters.push(Reverse((need, conn)));
                }
                break;
            }
            match c.inbound.pop_front() {
                Some(Inbound::Answer { packet, .. }) => {
                    c.processed -= 1;
                    if let Some(p) = packet {
                        c.held = c.held.saturating_sub(1);
                        c.control.push_back(p);
                        pushed = true;
                    }
                }
                Some(Inbound::Control { packet, .. }) => {
                    c.processed -= 1;
                    c.control.push_back(packet);
                    pushed = true;
                }
                _ => break,
            }
        }
        if c.inbound.is_empty() {
            c.inbound = Default::default();
        }
        if c.rel_waiting.is_empty() {
            c.rel_waiting = Default::default();
        }
        if pushed {
            self.notify(conn);
        }
    }

    fn process_publish(&mut self, s: SessionIdx, p: &InPublish) -> Step {
        if p.denied {
            // Acknowledged so the client does not send it forever, and dropped (counted when
            // it arrived).
            return Step::Done(answer_for(p.qos, p.packet_id), 0);
        }
        let Some(sess) = self.sessions.get(s).and_then(Option::as_ref) else {
            return Step::Done(None, 0);
        };
        let persistent = sess.persistent;
        if let (QoS::ExactlyOnce, Some(id)) = (p.qos, p.packet_id) {
            if sess.unreleased_in.contains(&id) {
                // Exactly once: routed when it first came; answer once that is durable.
                let need = if persistent { self.out.last_seq } else { 0 };
                return Step::Done(Some(Packet::PubRec(id)), need);
            }
        }
        if p.qos == QoS::ExactlyOnce && sess.unreleased_in.len() >= self.settings.max_unreleased_in
        {
            return Step::Close(CloseReason::TooManyUnreleased);
        }
        // Exactly once across a crash: a persistent publisher's QoS 2 message reaches no client
        // before its receipt (written after the queue writes) is durable.
        let receipt = p.qos == QoS::ExactlyOnce && persistent;
        self.hold_visibility = receipt;
        let routed = self.route(&p.topic, &p.payload, p.qos, p.retain, false);
        self.hold_visibility = false;
        let mut need = match routed {
            Ok(need) => need,
            Err(blocked) => {
                self.just_queued.clear();
                return Step::Blocked(blocked);
            }
        };
        if let (QoS::ExactlyOnce, Some(id)) = (p.qos, p.packet_id) {
            if let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) {
                if sess.unreleased_in.insert(id) && sess.persistent {
                    need = self.out.store(StoreOp::Qos2Received {
                        key: sess.key.clone(),
                        packet_id: id,
                    });
                }
            }
        }
        if receipt {
            self.reveal_after(need);
        }
        Step::Done(answer_for(p.qos, p.packet_id), need)
    }

    /// The messages just queued invisible become visible once `seq` is durable.
    fn reveal_after(&mut self, seq: StoreSeq) {
        for s in std::mem::take(&mut self.just_queued) {
            let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) else {
                continue;
            };
            sess.set_back_visible_at(seq);
            if let Some(conn) = sess.conn {
                self.notify(conn);
            }
        }
    }

    fn process_pubrel(&mut self, s: SessionIdx, id: u16) -> Step {
        let mut need = 0;
        if let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) {
            // PUBREL for an unknown id is answered too: it may have been released before a
            // restart.
            if sess.unreleased_in.remove(&id) && sess.persistent {
                need = self.out.store(StoreOp::Qos2Released {
                    key: sess.key.clone(),
                    packet_id: id,
                });
            }
        }
        Step::Done(Some(Packet::PubComp(id)), need)
    }
}
