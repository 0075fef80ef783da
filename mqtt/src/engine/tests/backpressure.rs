use std::collections::HashSet;

use super::*;

#[test]
fn qos1_ack_withheld_until_subscriber_has_room() {
    let mut h = H::new(small(1));
    h.connect(1, "s", true);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    for id in 1..=4 {
        h.pkt(2, publish("t", 1, id, &id.to_string()));
    }
    // Message 1 fills the queue of one; 2 is held, its PUBACK withheld.
    assert_eq!(h.tx(2), vec![Packet::PubAck(1)]);
    assert_eq!(h.tx_got(1).len(), 1);
    assert_eq!(h.tx(2), vec![Packet::PubAck(2)]);
    assert_eq!(h.tx_got(1).len(), 1);
    assert_eq!(h.tx(2), vec![Packet::PubAck(3)]);
    // Window of 2 full, 3 queued, 4 held.
    assert!(h.tx_got(1).is_empty());
    assert!(h.tx(2).is_empty());
    h.pkt(1, Packet::PubAck(1));
    assert_eq!(h.tx_got(1)[0].payload, "3");
    assert_eq!(h.tx(2), vec![Packet::PubAck(4)]);
    h.e.check_invariants();
}

#[test]
fn qos0_for_a_full_queue_is_dropped_and_counted() {
    let mut h = H::new(small(1));
    h.connect(1, "s", true);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 0, 0, "kept"));
    h.pkt(2, publish("t", 0, 0, "dropped"));
    assert_eq!(
        h.notices(),
        vec![Notice::Dropped {
            key: key("s"),
            reason: DropReason::Qos0QueueFull,
            count: 1
        }]
    );
    let g = h.tx_got(1);
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].payload, "kept");
}

#[test]
fn per_publisher_order_kept_behind_a_held_publish() {
    let mut h = H::new(small(2));
    h.connect(1, "slow", true);
    h.sub(1, &[("slow", 1)]);
    h.connect(3, "fast", true);
    h.sub(3, &[("fast", 1)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("slow", 1, 1, "s1"));
    h.pkt(2, publish("slow", 1, 2, "s2"));
    h.pkt(2, publish("slow", 1, 3, "s3"));
    h.pkt(2, publish("fast", 1, 4, "f1"));
    h.pkt(2, publish("fast", 0, 0, "f2"));
    assert_eq!(h.tx(2), vec![Packet::PubAck(1), Packet::PubAck(2)]);
    assert!(
        h.tx_got(3).is_empty(),
        "later publishes do not overtake the held one"
    );
    h.tx(1);
    assert_eq!(h.tx(2), vec![Packet::PubAck(3), Packet::PubAck(4)]);
    let g = h.tx_got(3);
    assert_eq!(
        g.iter().map(|g| g.payload.as_str()).collect::<Vec<_>>(),
        vec!["f1", "f2"]
    );
}

#[test]
fn held_publish_does_not_stop_acks_pings_or_subscribes() {
    let mut h = H::new(small(1));
    h.connect(1, "s", true);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    h.sub(2, &[("back", 1)]);
    h.pkt(1, publish("back", 1, 1, "to p"));
    let to_p = h.tx_got(2);
    h.pkt(2, publish("t", 1, 1, "fills"));
    h.pkt(2, publish("t", 1, 2, "held"));
    h.tx(2);
    h.pkt(2, Packet::PingReq);
    h.pkt(2, Packet::PubAck(to_p[0].pid.unwrap()));
    h.pkt(2, subscribe(5, &[("more", 0)]));
    let out = h.tx(2);
    assert_eq!(out[0], Packet::PingResp);
    let sess = h.e.session(h.e.by_key[&key("p")]).unwrap();
    assert!(
        sess.inflight.is_empty(),
        "PUBACK processed while a publish is held"
    );
    // The SUBSCRIBE is in force at once; its SUBACK goes out in order, behind the answer of
    // the held publish (answers never overtake each other).
    h.pkt(1, publish("more", 0, 0, "already"));
    let got = h.tx(2);
    assert!(
        got.iter()
            .any(|p| matches!(p, Packet::Publish(p) if p.topic == "more")),
        "{got:?}"
    );
    assert!(
        !got.iter().any(|p| matches!(p, Packet::SubAck(_))),
        "{got:?}"
    );
    // Once the subscriber takes what it was sent, the held publish and then the SUBACK are
    // answered.
    let mut answers = Vec::new();
    for _ in 0..4 {
        for g in h.tx_got(1) {
            if let Some(pid) = g.pid {
                h.pkt(1, Packet::PubAck(pid));
            }
        }
        for p in h.tx(2) {
            if matches!(p, Packet::PubAck(_) | Packet::SubAck(_)) {
                answers.push(p);
            }
        }
    }
    assert!(
        matches!(
            answers.as_slice(),
            [
                ..,
                Packet::PubAck(2),
                Packet::SubAck(SubAck { packet_id: 5, .. })
            ]
        ),
        "{answers:?}"
    );
}

#[test]
fn too_many_held_publishes_close_the_connection() {
    let settings = Settings {
        max_held_in: 2,
        ..small(1)
    };
    let mut h = H::new(settings);
    h.connect(1, "s", true);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    for id in 1..=3 {
        h.pkt(2, publish("t", 1, id, "x"));
    }
    assert!(h.closes().is_empty());
    h.e.check_invariants();
    h.pkt(2, publish("t", 1, 4, "x"));
    assert_eq!(h.closes(), vec![(2, CloseReason::TooManyHeld)]);
    h.e.check_invariants();
}

#[test]
fn stalled_subscriber_closed_and_held_publishes_released() {
    let mut h = H::new(small(1));
    h.connect(1, "s", false);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 1, 1, "a"));
    h.pkt(2, publish("t", 1, 2, "b"));
    h.durable_all();
    assert_eq!(h.tx(2), vec![Packet::PubAck(1)]);
    h.tick(Duration::from_secs(29));
    assert!(h.closes().is_empty());
    h.tick(Duration::from_secs(1));
    assert_eq!(h.closes(), vec![(1, CloseReason::Stalled)]);
    // Offline now: the held publish is queued for the persistent session and answered.
    h.durable_all();
    assert_eq!(h.tx(2), vec![Packet::PubAck(2)]);
    h.connect(3, "s", false);
    let g = h.tx_got(3);
    assert_eq!(
        g.iter().map(|g| g.payload.as_str()).collect::<Vec<_>>(),
        vec!["a", "b"]
    );
}

#[test]
fn offline_queue_over_cap_drops_oldest_counted() {
    let settings = Settings {
        offline_messages: 2,
        ..Settings::default()
    };
    let mut h = H::new(settings);
    h.connect(1, "s", false);
    h.sub(1, &[("t", 1)]);
    h.gone(1, Disconnected::Graceful);
    h.connect(2, "p", true);
    for id in 1..=4 {
        h.pkt(2, publish("t", 1, id, &id.to_string()));
    }
    // QoS 0 is not queued for an offline session.
    h.pkt(2, publish("t", 0, 0, "q0"));
    h.durable_all();
    assert_eq!(h.tx(2).len(), 4, "every QoS 1 publish acknowledged");
    let dropped: u64 = h
        .notices()
        .iter()
        .map(|n| match n {
            Notice::Dropped {
                reason: DropReason::OfflineQueueFull,
                count,
                ..
            } => *count,
            _ => 0,
        })
        .sum();
    assert_eq!(dropped, 2);
    let dequeued: Vec<u64> = h
        .store_ops()
        .iter()
        .filter_map(|op| match op {
            StoreOp::Dequeued { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(dequeued, vec![0, 1]);
    h.connect(3, "s", false);
    let g = h.tx_got(3);
    assert_eq!(
        g.iter().map(|g| g.payload.as_str()).collect::<Vec<_>>(),
        vec!["3", "4"]
    );
}

/// A well-behaved client: at most `window` unacknowledged publishes, acknowledges all it gets.
struct Client {
    conn: u64,
    topic: &'static str,
    sent: u16,
    unacked: HashSet<u16>,
    received: Vec<String>,
}

#[test]
fn mutual_publish_does_not_deadlock() {
    const N: u16 = 200;
    let settings = Settings {
        queue_messages: 2,
        max_inflight_out: 1,
        max_held_in: 4,
        ..Settings::default()
    };
    let mut h = H::new(settings);
    h.connect(1, "a", true);
    h.sub(1, &[("to/a", 1)]);
    h.connect(2, "b", true);
    h.sub(2, &[("to/b", 1)]);
    let mut clients = [
        Client {
            conn: 1,
            topic: "to/b",
            sent: 0,
            unacked: HashSet::new(),
            received: Vec::new(),
        },
        Client {
            conn: 2,
            topic: "to/a",
            sent: 0,
            unacked: HashSet::new(),
            received: Vec::new(),
        },
    ];
    let mut rounds = 0;
    while clients
        .iter()
        .any(|c| c.received.len() < N as usize || !c.unacked.is_empty())
    {
        rounds += 1;
        assert!(rounds < 10 * N as usize, "no progress: deadlock");
        for c in clients.iter_mut() {
            // Both publish first, so both queues fill before anyone reads.
            while c.unacked.len() < 4 && c.sent < N {
                c.sent += 1;
                c.unacked.insert(c.sent);
                h.pkt(c.conn, publish(c.topic, 1, c.sent, &c.sent.to_string()));
            }
        }
        for c in clients.iter_mut() {
            for p in h.tx(c.conn) {
                match p {
                    Packet::PubAck(id) => {
                        assert!(c.unacked.remove(&id), "PUBACK for {id} twice");
                    }
                    Packet::Publish(p) => {
                        c.received
                            .push(String::from_utf8_lossy(&p.payload).into_owned());
                        if let Some(id) = p.packet_id {
                            h.pkt(c.conn, Packet::PubAck(id));
                        }
                    }
                    _ => {}
                }
            }
        }
        h.e.check_invariants();
    }
    let want: Vec<String> = (1..=N).map(|i| i.to_string()).collect();
    assert_eq!(clients[0].received, want, "in order, none lost");
    assert_eq!(clients[1].received, want);
    assert!(h.closes().is_empty());
}

#[test]
fn resumed_session_full_of_resends_that_never_reads_is_closed_as_stalled() {
    let settings = Settings {
        max_inflight_out: 2,
        queue_messages: 2,
        ..Settings::default()
    };
    let mut h = H::new(settings);
    h.connect(1, "s", false);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    for id in 1..=4 {
        h.pkt(2, publish("t", 1, id, "x"));
        h.durable_all();
        h.tx(1);
    }
    h.gone(1, Disconnected::Abnormal);
    // Back with four re-sends queued (over the online cap) and it never reads.
    h.connect(3, "s", false);
    h.tick(Duration::from_secs(31));
    assert!(h.closes().is_empty(), "nobody held back yet");
    h.pkt(2, publish("t", 1, 5, "held"));
    h.tick(Duration::from_secs(29));
    assert!(h.closes().is_empty());
    h.tick(Duration::from_secs(1));
    assert_eq!(h.closes(), vec![(3, CloseReason::Stalled)]);
    h.durable_all();
    assert_eq!(h.tx(2).last(), Some(&Packet::PubAck(5)));
}

#[test]
fn client_that_never_reads_its_answers_is_closed() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", true);
    let cap = h.e.control_cap();
    for _ in 0..cap {
        h.pkt(1, Packet::PingReq);
    }
    assert!(h.closes().is_empty());
    h.pkt(1, Packet::PingReq);
    assert_eq!(h.closes(), vec![(1, CloseReason::TooManyHeld)]);
    // Publishes whose PUBACKs are never read hit the same cap.
    h.connect(2, "p", true);
    for id in 1..=cap as u16 {
        h.pkt(2, publish("t", 1, id, "x"));
    }
    assert_eq!(h.closes().len(), 1);
    h.pkt(2, publish("t", 1, cap as u16 + 1, "x"));
    assert_eq!(h.closes().len(), 2);
    h.e.check_invariants();
}

#[test]
fn qos0_behind_an_answer_waiting_for_the_store_takes_no_room() {
    let settings = Settings {
        max_held_in: 2,
        ..Settings::default()
    };
    let mut h = H::new(settings);
    h.connect(1, "s", false);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 1, 1, "durable first"));
    for _ in 0..10 {
        h.pkt(2, publish("t", 0, 0, "q0"));
    }
    assert!(!h
        .notices()
        .iter()
        .any(|n| matches!(n, Notice::Dropped { .. })));
    assert_eq!(
        h.e.conns[&ConnId(2)].inbound.len(),
        1,
        "only the PUBACK waits for the store"
    );
    h.durable_all();
    assert_eq!(h.tx_got(1).len(), 11);
    h.e.check_invariants();
}

#[test]
fn offline_cap_never_drops_a_message_whose_pubrel_is_due() {
    let settings = Settings {
        offline_messages: 1,
        ..Settings::default()
    };
    let mut h = H::new(settings);
    h.connect(1, "s", false);
    h.sub(1, &[("t", 2)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 2, 1, "released"));
    h.durable_all();
    let pid = h.tx_got(1)[0].pid.unwrap();
    h.pkt(1, Packet::PubRec(pid));
    h.durable_all();
    assert_eq!(h.tx(1), vec![Packet::PubRel(pid)]);
    h.gone(1, Disconnected::Abnormal);
    h.pkt(2, publish("t", 2, 2, "newer"));
    h.pkt(2, publish("t", 2, 3, "newest"));
    h.durable_all();
    h.connect(3, "s", false);
    let out = h.tx(3);
    assert_eq!(out[0], Packet::PubRel(pid), "the client still holds {pid}");
    let g: Vec<Got> = out.iter().filter_map(got).collect();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].payload, "newest");
}

#[test]
fn offline_cap_never_drops_a_qos2_message_the_client_may_hold() {
    let settings = Settings {
        offline_messages: 1,
        ..Settings::default()
    };
    let mut h = H::new(settings);
    h.connect(1, "s", false);
    h.sub(1, &[("t", 2)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 2, 1, "sent"));
    h.durable_all();
    let pid = h.tx_got(1)[0].pid.unwrap();
    // Received, never answered: the client keeps the id until it gets PUBREL.
    h.gone(1, Disconnected::Abnormal);
    h.pkt(2, publish("t", 2, 2, "newer"));
    h.pkt(2, publish("t", 2, 3, "newest"));
    h.durable_all();
    h.connect(3, "s", false);
    let g = h.tx_got(3);
    assert_eq!(
        g.iter()
            .map(|g| (g.payload.as_str(), g.dup))
            .collect::<Vec<_>>(),
        vec![("sent", true), ("newest", false)]
    );
    assert_eq!(g[0].pid, Some(pid));
    h.e.check_invariants();
}
