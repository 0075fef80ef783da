//! SUBSCRIBE, UNSUBSCRIBE, and re-checking subscriptions when the policy changes.

use std::sync::Arc;

use super::session::SessionIdx;
use super::{CloseReason, ConnId, Engine, Notice, StoreOp};
use crate::codec::{Packet, SubAck, SubAckCode, Subscribe, Unsubscribe};
use crate::topic;

impl Engine {
    pub(super) fn on_subscribe(&mut self, conn: ConnId, sub: Subscribe) {
        // The codec checked the syntax already; checked again here so a bad filter can never
        // reach the router.
        if sub.filters.is_empty() || !sub.filters.iter().all(|(f, _)| topic::valid_filter(f)) {
            self.close(
                conn,
                CloseReason::ProtocolViolation("SUBSCRIBE with no or an invalid topic filter"),
            );
            return;
        }
        let Some(s) = self.conns.get(&conn).map(|c| c.session) else {
            return;
        };
        let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) else {
            return;
        };
        let before = self.out.last_seq;
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut granted = Vec::new();
        for (filter, qos) in sub.filters {
            if !self.auth.may_subscribe(&sess.key, &filter) {
                self.out.notice(Notice::SubscriptionDenied {
                    key: sess.key.clone(),
                    filter,
                    revoked: false,
                });
                codes.push(SubAckCode::Failure);
                continue;
            }
            let f: Arc<str> = Arc::from(filter.as_str());
            // [MQTT-3.8.4-3]: the same filter again replaces the subscription.
            self.router.insert(&f, s, qos);
            sess.subs.insert(f.clone(), qos);
            if sess.persistent {
                self.out.store(StoreOp::Subscribed {
                    key: sess.key.clone(),
                    filter,
                    qos,
                });
            }
            codes.push(SubAckCode::Granted(qos));
            granted.push((f, qos));
        }
        // A persistent session's SUBACK waits until its subscriptions are durable: a crash
        // must not take back a subscription the client was told it has. (What matches it may
        // be sent before, which MQTT 3.1.1 section 3.8.4 allows.) Behind earlier answers in
        // any case, so answers never overtake each other.
        let need = if self.out.last_seq > before {
            self.out.last_seq
        } else {
            0
        };
        let suback = Packet::SubAck(SubAck {
            packet_id: sub.packet_id,
            codes,
        });
        self.push_answer(conn, suback, need);
        // [MQTT-3.3.1-6]: retained messages of each new subscription, after the SUBACK.
        for (filter, qos) in granted {
            for mut m in self.retained.matching(&filter) {
                m.qos = m.qos.min(qos);
                m.retain = true;
                self.deliver(s, m);
            }
        }
    }

    pub(super) fn on_unsubscribe(&mut self, conn: ConnId, unsub: Unsubscribe) {
        if unsub.filters.is_empty() {
            self.close(
                conn,
                CloseReason::ProtocolViolation("UNSUBSCRIBE with no topic filter"),
            );
            return;
        }
        let Some(s) = self.conns.get(&conn).map(|c| c.session) else {
            return;
        };
        for filter in unsub.filters {
            self.unsubscribe(s, &filter);
        }
        // Held publishes may have been waiting for this session only.
        self.wake(s);
        // Always answered, even for filters it never had [MQTT-3.10.4-5]; in order behind a
        // SUBACK still waiting for the store, but not itself waiting for the removal to be
        // durable: a crash that loses it can only bring back deliveries the client no longer
        // wants, never lose one it is owed.
        self.push_answer(conn, Packet::UnsubAck(unsub.packet_id), 0);
    }

    /// Removes session `s`'s subscription to `filter` (with its store write); false if it had
    /// none.
    fn unsubscribe(&mut self, s: SessionIdx, filter: &str) -> bool {
        let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) else {
            return false;
        };
        if sess.subs.remove(filter).is_none() {
            return false;
        }
        self.router.remove(filter, s);
        if sess.persistent {
            self.out.store(StoreOp::Unsubscribed {
                key: sess.key.clone(),
                filter: filter.to_owned(),
            });
        }
        true
    }

    /// Asks the (new) authorizer about every subscription of every session, live or stored,
    /// and removes what it no longer allows.
    pub(super) fn recheck_subscriptions(&mut self) {
        for s in 0..self.sessions.len() {
            let Some(sess) = self.sessions.get(s).and_then(Option::as_ref) else {
                continue;
            };
            let mut denied: Vec<Arc<str>> = sess
                .subs
                .keys()
                .filter(|f| !self.auth.may_subscribe(&sess.key, f))
                .cloned()
                .collect();
            if denied.is_empty() {
                continue;
            }
            denied.sort();
            let key = sess.key.clone();
            for filter in denied {
                if self.unsubscribe(s, &filter) {
                    self.out.notice(Notice::SubscriptionDenied {
                        key: key.clone(),
                        filter: filter.to_string(),
                        revoked: true,
                    });
                }
            }
            self.wake(s);
        }
    }
}
