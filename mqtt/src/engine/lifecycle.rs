//! Sessions coming and going: CONNECT (refusal, takeover, clean or resumed session), the end
//! of a connection, expiry and stalls, and rebuilding from the store.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::conn::Conn;
use super::session::{Queued, Session, SessionIdx};
use super::{
    Action, CloseReason, ConnId, DropReason, Engine, Message, Notice, SessionKey, StoreOp,
    StoredSession,
};
use crate::codec::{ConnAck, Connect, ConnectCode, Packet, QoS};
use crate::topic;

impl Engine {
    pub(super) fn do_connect(&mut self, conn: ConnId, key: SessionKey, c: Connect) {
        if self.conns.contains_key(&conn) {
            self.close(
                conn,
                CloseReason::ProtocolViolation("second CONNECT [MQTT-3.1.0-2]"),
            );
            return;
        }
        if c.client_id.is_empty() && !c.clean_session {
            // [MQTT-3.1.3-8]
            self.refuse(conn, ConnectCode::IdentifierRejected);
            return;
        }
        if let Some(will) = &c.will {
            if !topic::valid_name(&will.topic) || !self.auth.may_publish(&key, &will.topic) {
                self.out.notice(Notice::PublishDenied {
                    key,
                    topic: will.topic.clone(),
                });
                self.refuse(conn, ConnectCode::NotAuthorized);
                return;
            }
        }
        // Takeover: the old connection goes, with its will [MQTT-3.1.4-2].
        if let Some(old) = self
            .by_key
            .get(&key)
            .and_then(|&s| self.session(s))
            .and_then(|s| s.conn)
        {
            self.close(old, CloseReason::Takeover);
        }
        // What is left of the session now is a persistent, offline one (a clean one went with
        // its connection).
        let existing = self.by_key.get(&key).copied();
        let (s, present) = match (c.clean_session, existing) {
            (false, Some(s)) => (s, true),
            (false, None) => {
                self.out.store(StoreOp::SessionReset {
                    key: key.clone(),
                    persistent: true,
                });
                (self.create_session(key, true), false)
            }
            (true, existing) => {
                if let Some(old) = existing {
                    // [MQTT-3.1.2-6]: a clean session discards the stored one.
                    self.remove_session(old);
                    self.out.store(StoreOp::SessionReset {
                        key: key.clone(),
                        persistent: false,
                    });
                }
                (self.create_session(key, false), false)
            }
        };
        if let Some(sess) = self.session_mut(s) {
            sess.conn = Some(conn);
            sess.offline_since = None;
            sess.full_since = None;
        }
        let mut state = Conn::new(s, c.will);
        // [MQTT-3.2.2-1..3]
        state.control.push_back(Packet::ConnAck(ConnAck {
            session_present: present,
            code: ConnectCode::Accepted,
        }));
        self.conns.insert(conn, state);
        self.notify(conn);
    }

    /// Answers `conn` with a refusing CONNACK; the engine keeps nothing else for it.
    fn refuse(&mut self, conn: ConnId, code: ConnectCode) {
        self.refused.insert(
            conn,
            Packet::ConnAck(ConnAck {
                session_present: false,
                code,
            }),
        );
        self.out.push(Action::Transmit(conn));
    }

    fn create_session(&mut self, key: SessionKey, persistent: bool) -> SessionIdx {
        let session = Session::new(key.clone(), persistent);
        let s = match self.free_sessions.pop() {
            Some(s) => {
                if let Some(slot) = self.sessions.get_mut(s) {
                    *slot = Some(session);
                }
                s
            }
            None => {
                self.sessions.push(Some(session));
                self.sessions.len() - 1
            }
        };
        self.by_key.insert(key, s);
        s
    }

    /// Forgets session `s` with its subscriptions and queue (no store write).
    pub(super) fn remove_session(&mut self, s: SessionIdx) {
        self.wake(s);
        let Some(sess) = self.sessions.get_mut(s).and_then(Option::take) else {
            return;
        };
        for filter in sess.subs.keys() {
            self.router.remove(filter, s);
        }
        self.by_key.remove(&sess.key);
        self.free_sessions.push(s);
    }

    /// The engine closes `conn`: [`Action::Close`], then the will, as for a lost connection.
    pub(super) fn close(&mut self, conn: ConnId, reason: CloseReason) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        self.out.push(Action::Close { conn, reason });
        let now = self.now;
        if let Some(now) = now {
            self.detach(now, conn, true);
        }
    }

    /// `conn` is gone: its session goes offline (persistent) or away (clean), its held
    /// publishes are forgotten unanswered, and its will is published if `will`.
    pub(super) fn detach(&mut self, now: Instant, conn: ConnId, will: bool) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let s = c.session;
        let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) else {
            return;
        };
        let key = sess.key.clone();
        if sess.conn == Some(conn) {
            sess.conn = None;
            sess.full_since = None;
            sess.requeue_inflight();
            if sess.persistent {
                sess.offline_since = Some(now);
                self.trim_offline(s);
                self.wake(s);
            } else {
                self.remove_session(s);
            }
        }
        if will {
            if let Some(w) = c.will {
                self.fire_will(&key, w);
            }
        }
    }

    pub(super) fn do_tick(&mut self, now: Instant) {
        let stalled_after = self.settings.stalled_after;
        let expiry = self.settings.session_expiry;
        let mut stalled = Vec::new();
        let mut expired = Vec::new();
        for (s, sess) in self.sessions.iter().enumerate() {
            let Some(sess) = sess else {
                continue;
            };
            match (sess.conn, sess.full_since, sess.offline_since) {
                (Some(conn), Some(since), _)
                    if now.saturating_duration_since(since) >= stalled_after =>
                {
                    stalled.push(conn)
                }
                (None, _, Some(since)) if now.saturating_duration_since(since) >= expiry => {
                    expired.push(s)
                }
                _ => {}
            }
        }
        for conn in stalled {
            self.close(conn, CloseReason::Stalled);
        }
        for s in expired {
            let Some(sess) = self.session(s) else {
                continue;
            };
            let key = sess.key.clone();
            let queued = sess.queue_len() as u64;
            self.out.store(StoreOp::SessionExpired { key: key.clone() });
            if queued > 0 {
                self.out.notice(Notice::Dropped {
                    key,
                    reason: DropReason::SessionExpired,
                    count: queued,
                });
            }
            self.remove_session(s);
        }
    }

    pub(super) fn do_restore(
        &mut self,
        now: Instant,
        sessions: Vec<StoredSession>,
        retained: Vec<Message>,
    ) {
        for stored in sessions {
            if let Some(old) = self.by_key.get(&stored.key).copied() {
                self.remove_session(old);
            }
            let s = self.create_session(stored.key, true);
            let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) else {
                continue;
            };
            sess.offline_since = Some(now);
            for (filter, qos) in stored.subscriptions {
                if !topic::valid_filter(&filter) {
                    continue;
                }
                let f: Arc<str> = Arc::from(filter);
                self.router.insert(&f, s, qos);
                sess.subs.insert(f, qos);
            }
            let mut next = 0;
            for m in stored.queue {
                next = next.max(m.id.saturating_add(1));
                let stored_qos0 = m.message.qos == QoS::AtMostOnce;
                sess.push_back(Queued {
                    id: (!stored_qos0).then_some(m.id),
                    // It may have been sent before the restart [MQTT-3.3.1-1].
                    dup: !stored_qos0,
                    released: m.released && m.message.qos == QoS::ExactlyOnce,
                    msg: m.message,
                    visible_at: 0,
                });
            }
            sess.next_id = next;
            sess.unreleased_in = stored.unreleased.into_iter().collect::<HashSet<u16>>();
        }
        for m in retained {
            if topic::valid_name(&m.topic) && !m.payload.is_empty() {
                self.retained.set(Message { retain: true, ..m });
            }
        }
    }
}
