use super::*;

#[test]
fn qos2_duplicate_publish_routed_once() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", true);
    h.sub(1, &[("t", 2)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 2, 9, "once"));
    // Re-sent before and after PUBREC: answered, not routed again.
    h.pkt(2, publish("t", 2, 9, "once"));
    assert_eq!(h.tx(2), vec![Packet::PubRec(9), Packet::PubRec(9)]);
    h.pkt(2, publish("t", 2, 9, "once"));
    assert_eq!(h.tx(2), vec![Packet::PubRec(9)]);
    h.pkt(2, Packet::PubRel(9));
    assert_eq!(h.tx(2), vec![Packet::PubComp(9)]);
    // A second PUBREL (id released already): PUBCOMP anyway.
    h.pkt(2, Packet::PubRel(9));
    assert_eq!(h.tx(2), vec![Packet::PubComp(9)]);
    assert_eq!(h.tx_got(1).len(), 1, "delivered exactly once");
    // After the release the id is free for a new message.
    h.pkt(2, publish("t", 2, 9, "again"));
    assert_eq!(h.tx_got(1).len(), 1);
}

#[test]
fn too_many_unreleased_qos2_ids_close_the_connection() {
    let settings = Settings {
        max_unreleased_in: 3,
        ..Settings::default()
    };
    let mut h = H::new(settings);
    h.connect(2, "p", true);
    for id in 1..=3 {
        h.pkt(2, publish("t", 2, id, "x"));
    }
    assert!(h.closes().is_empty());
    // The same ids again are duplicates, not new ones.
    h.pkt(2, publish("t", 2, 1, "x"));
    assert!(h.closes().is_empty());
    h.pkt(2, publish("t", 2, 4, "x"));
    assert_eq!(h.closes(), vec![(2, CloseReason::TooManyUnreleased)]);
    h.e.check_invariants();
}

#[test]
fn in_flight_out_never_exceeds_the_window() {
    let mut h = H::new(small(100));
    h.connect(1, "s", true);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    for id in 1..=5 {
        h.pkt(2, publish("t", 1, id, &id.to_string()));
    }
    let first = h.tx_got(1);
    assert_eq!(
        first.iter().map(|g| g.pid).collect::<Vec<_>>(),
        vec![Some(1), Some(2)]
    );
    assert!(h.tx_got(1).is_empty(), "window of 2 full");
    // Acks for unknown ids are ignored.
    h.pkt(1, Packet::PubAck(77));
    h.pkt(1, Packet::PubComp(1));
    assert!(h.tx_got(1).is_empty());
    let acts = h.pkt(1, Packet::PubAck(1));
    assert_eq!(acts, vec![Action::Transmit(ConnId(1))]);
    let next = h.tx_got(1);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].payload, "3");
    h.e.check_invariants();
}

#[test]
fn outgoing_qos2_publish_pubrec_pubrel_pubcomp() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", false);
    h.sub(1, &[("t", 2)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 2, 1, "x"));
    h.durable_all();
    let g = h.tx_got(1);
    let pid = g[0].pid.unwrap();
    h.durable_all();
    h.clear_log();
    h.pkt(1, Packet::PubRec(pid));
    // PUBREL only once the release is durable: after a crash the PUBLISH must not go again
    // to a client that has finished with it.
    assert!(h.tx(1).is_empty());
    h.pkt(1, Packet::PubRec(pid));
    assert!(h.tx(1).is_empty());
    h.durable_all();
    assert_eq!(h.tx(1), vec![Packet::PubRel(pid)]);
    // A repeated PUBREC gets PUBREL again, stored once.
    h.pkt(1, Packet::PubRec(pid));
    assert_eq!(h.tx(1), vec![Packet::PubRel(pid)]);
    h.pkt(1, Packet::PubComp(pid));
    assert_eq!(
        h.store_ops(),
        vec![
            StoreOp::Released {
                key: key("s"),
                id: 0
            },
            StoreOp::Dequeued {
                key: key("s"),
                id: 0
            }
        ]
    );
    assert!(h
        .e
        .session(h.e.by_key[&key("s")])
        .unwrap()
        .inflight
        .is_empty());
}

#[test]
fn mqtt_3_3_1_1_and_4_4_0_1_resume_resends_with_dup_and_pubrel() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", false);
    h.sub(1, &[("t", 2)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 2, 1, "released"));
    h.pkt(2, publish("t", 1, 2, "sent"));
    h.pkt(2, publish("t", 1, 3, "queued"));
    h.durable_all();
    let g = h.tx_got(1);
    assert_eq!(g.len(), 3);
    assert!(g.iter().all(|g| !g.dup), "first sends carry no DUP");
    h.pkt(1, Packet::PubRec(g[0].pid.unwrap()));
    h.tx(1);
    h.gone(1, Disconnected::Abnormal);
    let ack = h.connect(3, "s", false);
    assert!(ack.session_present);
    assert!(
        h.tx(3).is_empty(),
        "PUBREL waits for the release to be durable"
    );
    h.durable_all();
    let out = h.tx(3);
    assert_eq!(
        out[0],
        Packet::PubRel(g[0].pid.unwrap()),
        "released one goes on as PUBREL"
    );
    let again: Vec<Got> = out.iter().filter_map(got).collect();
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|g| g.dup), "re-sent with DUP: {again:?}");
    assert_eq!(again[0].pid, g[1].pid, "same packet ids");
    assert_eq!(again[1].pid, g[2].pid);
}

#[test]
fn packet_id_still_in_flight_is_not_reused() {
    let settings = Settings {
        max_inflight_out: 4,
        ..Settings::default()
    };
    let mut h = H::new(settings);
    h.connect(1, "s", true);
    h.sub(1, &[("t", 1)]);
    let s = h.e.by_key[&key("s")];
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 1, 1, "old"));
    assert_eq!(h.tx_got(1)[0].pid, Some(1));
    // Jump the message numbers to where packet id 1 comes round again.
    h.e.session_mut(s).unwrap().next_id = 65_535;
    h.pkt(2, publish("t", 1, 2, "wraps"));
    assert!(h.tx_got(1).is_empty(), "packet id 1 still in flight");
    h.pkt(1, Packet::PubAck(1));
    let g = h.tx_got(1);
    assert_eq!((g[0].pid, g[0].payload.as_str()), (Some(1), "wraps"));
}
