use std::collections::BTreeMap;

use super::*;

/// A store as the driver keeps it: applies writes in order, gives back what it kept.
#[derive(Default)]
pub(super) struct MemStore {
    sessions: BTreeMap<SessionKey, StoredSession>,
    retained: BTreeMap<String, Message>,
}

impl MemStore {
    pub(super) fn apply(&mut self, op: &StoreOp) {
        let blank = |key: &SessionKey| StoredSession {
            key: key.clone(),
            subscriptions: Vec::new(),
            queue: Vec::new(),
            unreleased: Vec::new(),
        };
        match op {
            StoreOp::SessionReset { key, persistent } => {
                self.sessions.remove(key);
                if *persistent {
                    self.sessions.insert(key.clone(), blank(key));
                }
            }
            StoreOp::SessionExpired { key } => {
                self.sessions.remove(key);
            }
            StoreOp::Subscribed { key, filter, qos } => {
                let s = self
                    .sessions
                    .entry(key.clone())
                    .or_insert_with(|| blank(key));
                s.subscriptions.retain(|(f, _)| f != filter);
                s.subscriptions.push((filter.clone(), *qos));
            }
            StoreOp::Unsubscribed { key, filter } => {
                if let Some(s) = self.sessions.get_mut(key) {
                    s.subscriptions.retain(|(f, _)| f != filter);
                }
            }
            StoreOp::Enqueued { key, id, message } => {
                let s = self
                    .sessions
                    .entry(key.clone())
                    .or_insert_with(|| blank(key));
                s.queue.push(StoredMessage {
                    id: *id,
                    message: message.clone(),
                    released: false,
                });
            }
            StoreOp::Released { key, id } => {
                if let Some(m) = self
                    .sessions
                    .get_mut(key)
                    .and_then(|s| s.queue.iter_mut().find(|m| m.id == *id))
                {
                    m.released = true;
                }
            }
            StoreOp::Dequeued { key, id } => {
                if let Some(s) = self.sessions.get_mut(key) {
                    s.queue.retain(|m| m.id != *id);
                }
            }
            StoreOp::Qos2Received { key, packet_id } => {
                let s = self
                    .sessions
                    .entry(key.clone())
                    .or_insert_with(|| blank(key));
                s.unreleased.push(*packet_id);
            }
            StoreOp::Qos2Released { key, packet_id } => {
                if let Some(s) = self.sessions.get_mut(key) {
                    s.unreleased.retain(|p| p != packet_id);
                }
            }
            StoreOp::Retained { topic, message } => match message {
                Some(m) => {
                    self.retained.insert(topic.clone(), m.clone());
                }
                None => {
                    self.retained.remove(topic);
                }
            },
        }
    }

    pub(super) fn load(&self) -> (Vec<StoredSession>, Vec<Message>) {
        (
            self.sessions.values().cloned().collect(),
            self.retained.values().cloned().collect(),
        )
    }
}

fn store_of(h: &H) -> MemStore {
    let mut store = MemStore::default();
    for op in h.store_ops() {
        store.apply(&op);
    }
    store
}

fn restarted(h: &H) -> H {
    let (sessions, retained) = store_of(h).load();
    let mut fresh = H::new(Settings::default());
    fresh.e.restore(fresh.now, sessions, retained);
    fresh.drain();
    fresh
}

#[test]
fn persistent_ack_waits_for_durable() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", false);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    h.durable_all();
    h.pkt(2, publish("t", 1, 1, "x"));
    let seq = h.last_seq();
    assert!(matches!(
        h.store_ops().last(),
        Some(StoreOp::Enqueued { id: 0, .. })
    ));
    assert!(
        h.tx(2).is_empty(),
        "no PUBACK before the message is durable"
    );
    h.e.durable(h.now, seq - 1);
    h.drain();
    assert!(h.tx(2).is_empty());
    h.e.durable(h.now, seq);
    assert!(h.drain().contains(&Action::Transmit(ConnId(2))));
    assert_eq!(h.tx(2), vec![Packet::PubAck(1)]);
}

#[test]
fn clean_only_subscribers_are_answered_without_store_writes() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", true);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 2, 1, "x"));
    assert!(h.store_ops().is_empty());
    assert_eq!(h.tx(2), vec![Packet::PubRec(1)]);
}

#[test]
fn persistent_qos2_publisher_answers_after_its_writes_are_durable() {
    let mut h = H::new(Settings::default());
    h.connect(2, "p", false);
    h.durable_all();
    h.pkt(2, publish("t", 2, 7, "x"));
    assert_eq!(
        h.store_ops().last(),
        Some(&StoreOp::Qos2Received {
            key: key("p"),
            packet_id: 7
        })
    );
    assert!(h.tx(2).is_empty());
    h.durable_all();
    assert_eq!(h.tx(2), vec![Packet::PubRec(7)]);
    h.pkt(2, Packet::PubRel(7));
    assert!(
        h.tx(2).is_empty(),
        "PUBCOMP waits for the release to be durable"
    );
    h.durable_all();
    assert_eq!(h.tx(2), vec![Packet::PubComp(7)]);
}

#[test]
fn restore_resends_with_same_packet_ids_and_dup() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", false);
    h.sub(1, &[("t", 2)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 1, 1, "a"));
    h.pkt(2, publish("t", 2, 2, "b"));
    h.pkt(2, publish("t", 1, 3, "c"));
    h.durable_all();
    let first = h.tx_got(1);
    h.pkt(1, Packet::PubAck(first[0].pid.unwrap()));
    h.pkt(1, Packet::PubRec(first[1].pid.unwrap()));
    // The gateway restarts.
    let mut r = restarted(&h);
    let ack = r.connect(1, "s", false);
    assert!(ack.session_present);
    let out = r.tx(1);
    assert_eq!(out[0], Packet::PubRel(first[1].pid.unwrap()));
    let again: Vec<Got> = out.iter().filter_map(got).collect();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].pid, first[2].pid);
    assert!(again[0].dup);
    assert_eq!(again[0].payload, "c");
    // New messages continue after the restored ids.
    r.connect(2, "p", true);
    r.pkt(2, publish("t", 1, 4, "d"));
    r.durable_all();
    let next = r.tx_got(1);
    assert_eq!(next[0].pid, Some(first[2].pid.unwrap() + 1));
    r.e.check_invariants();
}

#[test]
fn restore_keeps_unreleased_qos2_ids_retained_and_subscriptions() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", false);
    h.sub(1, &[("t", 2)]);
    h.connect(2, "p", false);
    h.pkt(2, publish("t", 2, 9, "once"));
    h.pkt(2, retained("r", 1, 10, "kept"));
    let mut r = restarted(&h);
    r.connect(2, "p", false);
    r.connect(1, "s", false);
    let before = r.tx_got(1).len();
    // The publisher re-sends after the restart: a duplicate, not routed again.
    r.pkt(2, publish("t", 2, 9, "once"));
    r.durable_all();
    assert_eq!(r.tx(2), vec![Packet::PubRec(9)]);
    assert_eq!(r.tx_got(1).len(), 0);
    assert_eq!(before, 1);
    r.connect(3, "late", true);
    r.sub(3, &[("r", 1)]);
    assert_eq!(r.tx_got(3)[0].payload, "kept");
}

#[test]
fn session_expiry_removes_the_session_and_counts_its_queue() {
    let settings = Settings {
        session_expiry: Duration::from_secs(60),
        ..Settings::default()
    };
    let mut h = H::new(settings);
    h.connect(1, "s", false);
    h.sub(1, &[("t", 1)]);
    h.gone(1, Disconnected::Graceful);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 1, 1, "x"));
    h.tick(Duration::from_secs(59));
    assert!(h.e.by_key.contains_key(&key("s")));
    h.clear_log();
    h.tick(Duration::from_secs(1));
    assert_eq!(
        h.store_ops(),
        vec![StoreOp::SessionExpired { key: key("s") }]
    );
    assert_eq!(
        h.notices(),
        vec![Notice::Dropped {
            key: key("s"),
            reason: DropReason::SessionExpired,
            count: 1
        }]
    );
    assert!(!h.connect(3, "s", false).session_present);
}

/// The gateway restarts with only the writes up to `durable` kept.
fn crashed_at(h: &H, durable: StoreSeq) -> H {
    let mut store = MemStore::default();
    for a in &h.log {
        if let Action::Store { seq, op } = a {
            if *seq <= durable {
                store.apply(op);
            }
        }
    }
    let (sessions, retained) = store.load();
    let mut fresh = H::new(Settings::default());
    fresh.e.restore(fresh.now, sessions, retained);
    fresh.drain();
    fresh
}

#[test]
fn qos2_of_a_persistent_publisher_reaches_nobody_before_its_receipt_is_durable() {
    let mut h = H::new(Settings::default());
    h.connect(1, "clean-sub", true);
    h.sub(1, &[("t", 2)]);
    h.connect(2, "p", false);
    h.durable_all();
    h.pkt(2, publish("t", 2, 5, "once"));
    assert!(
        h.tx_got(1).is_empty(),
        "visible before the receipt is durable"
    );
    h.durable_all();
    assert_eq!(h.tx_got(1).len(), 1);
    assert_eq!(h.tx(2), vec![Packet::PubRec(5)]);
}

#[test]
fn qos2_exactly_once_across_a_crash_before_the_receipt_is_durable() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", false);
    h.sub(1, &[("t", 2)]);
    h.connect(2, "p", false);
    h.durable_all();
    let before = h.last_seq();
    h.pkt(2, publish("t", 2, 5, "once"));
    let early = h.tx_got(1);
    // The gateway dies before the writes of the publish are durable.
    let mut r = crashed_at(&h, before);
    r.connect(1, "s", false);
    r.connect(2, "p", false);
    // The publisher never saw PUBREC: it sends again, with DUP.
    r.pkt(2, publish("t", 2, 5, "once"));
    r.durable_all();
    assert_eq!(r.tx(2), vec![Packet::PubRec(5)]);
    let late = r.tx_got(1);
    assert_eq!(
        early.len() + late.len(),
        1,
        "delivered {early:?} then {late:?}"
    );
}

#[test]
fn persistent_subscriber_gets_a_message_only_once_it_is_durable() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", false);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    h.durable_all();
    let before = h.last_seq();
    h.pkt(2, publish("t", 1, 1, "a"));
    h.pkt(2, publish("t", 0, 0, "behind"));
    // Not yet: after a crash its packet id would be given to another message while the
    // client may still hold it.
    assert!(h.tx_got(1).is_empty());
    let mut r = crashed_at(&h, before);
    r.connect(1, "s", false);
    assert!(
        r.tx_got(1).is_empty(),
        "nothing the client saw is forgotten"
    );
    h.durable_all();
    let g = h.tx_got(1);
    assert_eq!(
        g.iter().map(|g| g.payload.as_str()).collect::<Vec<_>>(),
        vec!["a", "behind"],
        "in order"
    );
}

#[test]
fn offline_drop_is_durable_before_what_follows_goes_out() {
    let settings = Settings {
        offline_messages: 1,
        ..Settings::default()
    };
    let mut h = H::new(settings);
    h.connect(1, "s", false);
    h.sub(1, &[("t", 1)]);
    h.gone(1, Disconnected::Graceful);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 1, 1, "a"));
    h.pkt(2, publish("t", 1, 2, "b"));
    let drop_seq = h.last_seq();
    assert!(matches!(
        h.store_ops().last(),
        Some(StoreOp::Dequeued { id: 0, .. })
    ));
    // Everything but the drop is durable.
    h.e.durable(h.now, drop_seq - 1);
    h.drain();
    h.connect(3, "s", false);
    assert!(
        h.tx_got(3).is_empty(),
        "b before the drop of a is durable: a crash would bring a back after b"
    );
    h.durable_all();
    let g = h.tx_got(3);
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].payload, "b");
}
