//! Routing one message to every matching session: hold-or-commit for QoS 1/2, queue caps,
//! offline queues, retained messages and wills.

use std::sync::Arc;

use bytes::Bytes;

use super::session::{Queued, SessionIdx, INVISIBLE};
use super::{DropReason, Engine, Message, Notice, SessionKey, StoreOp, StoreSeq};
use crate::codec::{QoS, Will};
use crate::topic;

impl Engine {
    /// Routes a message published on the valid `topic`. Without `force`, a QoS 1/2 message for
    /// an online session whose queue is full is not routed at all: `Err` names that session
    /// (the caller holds the publish and retries when it has room). Otherwise every matching
    /// session gets it once, at the highest QoS its matching subscriptions grant (capped by
    /// `qos`), and the retained store is updated. `Ok` carries the store position that must be
    /// durable before the publish is answered (0: none).
    pub(super) fn route(
        &mut self,
        topic: &Arc<str>,
        payload: &Bytes,
        qos: QoS,
        retain: bool,
        force: bool,
    ) -> Result<StoreSeq, SessionIdx> {
        let mut targets = std::mem::take(&mut self.scratch);
        targets.clear();
        self.router.matches(topic, &mut targets);
        if targets.len() > 1 {
            // One delivery per session, at the highest granted QoS of its matching filters.
            targets.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            targets.dedup_by_key(|t| t.0);
        }
        if !force && qos != QoS::AtMostOnce {
            let blocked = targets.iter().find(|&&(s, granted)| {
                granted != QoS::AtMostOnce
                    && self
                        .session(s)
                        .is_some_and(|x| x.conn.is_some() && x.is_full(&self.settings))
            });
            if let Some(&(s, _)) = blocked {
                self.scratch = targets;
                // Holding back a publisher counts as full for the stall clock, even when the
                // queue filled up without a new message (re-sends after a resume).
                let now = self.now;
                if let Some(sess) = self.session_mut(s) {
                    if sess.full_since.is_none() {
                        sess.full_since = now;
                    }
                }
                return Err(s);
            }
        }
        let before = self.out.last_seq;
        for &(s, granted) in &targets {
            let message = Message {
                topic: topic.clone(),
                payload: payload.clone(),
                // [MQTT-3.8.4-6]
                qos: qos.min(granted),
                // [MQTT-3.3.1-9]
                retain: false,
            };
            self.deliver(s, message);
        }
        self.scratch = targets;
        if retain {
            self.set_retained(topic, payload, qos);
        }
        Ok(if self.out.last_seq > before {
            self.out.last_seq
        } else {
            0
        })
    }

    /// Puts `msg` (at its delivery QoS) in session `s`'s queue. QoS 0 for a full online queue
    /// and for an offline session is not queued; an offline queue over its caps loses its
    /// oldest messages, counted.
    pub(super) fn deliver(&mut self, s: SessionIdx, msg: Message) {
        let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) else {
            return;
        };
        let qos0 = msg.qos == QoS::AtMostOnce;
        let online = sess.conn;
        if online.is_none() && (qos0 || !sess.persistent) {
            return;
        }
        if online.is_some() && qos0 && sess.is_full(&self.settings) {
            self.out.notice(Notice::Dropped {
                key: sess.key.clone(),
                reason: DropReason::Qos0QueueFull,
                count: 1,
            });
            return;
        }
        let id = if qos0 { None } else { Some(sess.take_id()) };
        // A persistent session's message goes out only once it is durable: the client may
        // hold on to its packet id across a crash, so the number must survive too.
        let mut visible_at = 0;
        if let (Some(id), true) = (id, sess.persistent) {
            visible_at = self.out.store(StoreOp::Enqueued {
                key: sess.key.clone(),
                id,
                message: msg.clone(),
            });
        }
        sess.push_back(Queued {
            id,
            msg,
            dup: false,
            released: false,
            visible_at: if self.hold_visibility {
                INVISIBLE
            } else {
                visible_at
            },
        });
        if self.hold_visibility {
            self.just_queued.push(s);
        }
        match online {
            Some(conn) => {
                if sess.full_since.is_none() && sess.is_full(&self.settings) {
                    sess.full_since = self.now;
                }
                self.notify(conn);
            }
            None => self.trim_offline(s),
        }
    }

    /// Drops the oldest messages of session `s` while it is over the offline caps.
    pub(super) fn trim_offline(&mut self, s: SessionIdx) {
        let Some(sess) = self.sessions.get_mut(s).and_then(Option::as_mut) else {
            return;
        };
        let mut dropped = 0u64;
        let mut last_write = 0;
        while sess.over_offline_caps(&self.settings) {
            let Some(q) = sess.pop_oldest_droppable() else {
                break;
            };
            if let (Some(id), true) = (q.id, sess.persistent) {
                last_write = self.out.store(StoreOp::Dequeued {
                    key: sess.key.clone(),
                    id,
                });
            }
            dropped += 1;
        }
        // What follows a dropped message goes out only once the drop is durable: a crash
        // before that would bring the dropped one back behind what the client already has.
        sess.hold_front_until(last_write);
        if dropped > 0 {
            self.out.notice(Notice::Dropped {
                key: sess.key.clone(),
                reason: DropReason::OfflineQueueFull,
                count: dropped,
            });
        }
    }

    /// RETAIN set: a non-empty payload replaces the topic's retained message, an empty one
    /// deletes it [MQTT-3.3.1-5], [MQTT-3.3.1-10], [MQTT-3.3.1-11].
    fn set_retained(&mut self, topic: &Arc<str>, payload: &Bytes, qos: QoS) {
        if payload.is_empty() {
            if self.retained.delete(topic) {
                self.out.store(StoreOp::Retained {
                    topic: topic.to_string(),
                    message: None,
                });
            }
            return;
        }
        let message = Message {
            topic: topic.clone(),
            payload: payload.clone(),
            qos,
            retain: true,
        };
        self.retained.set(message.clone());
        self.out.store(StoreOp::Retained {
            topic: topic.to_string(),
            message: Some(message),
        });
    }

    /// Publishes `key`'s will at its QoS and RETAIN, if the authorizer (still) allows it.
    pub(super) fn fire_will(&mut self, key: &SessionKey, will: Will) {
        if !topic::valid_name(&will.topic) || !self.auth.may_publish(key, &will.topic) {
            self.out.notice(Notice::PublishDenied {
                key: key.clone(),
                topic: will.topic,
            });
            return;
        }
        let topic: Arc<str> = Arc::from(will.topic.as_str());
        // Forced: a will has no publisher to hold back, so it never waits for room.
        let _routed = self.route(&topic, &will.payload, will.qos, will.retain, true);
        self.out.notice(Notice::WillPublished {
            key: key.clone(),
            topic: will.topic,
        });
    }
}
