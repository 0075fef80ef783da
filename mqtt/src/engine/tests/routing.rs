use super::*;

#[test]
fn mqtt_3_8_4_6_delivery_at_min_qos() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s0", true);
    h.connect(2, "s2", true);
    h.connect(3, "p", true);
    h.sub(1, &[("t", 0)]);
    h.sub(2, &[("t", 2)]);
    h.pkt(3, publish("t", 1, 5, "a"));
    h.pkt(3, publish("t", 2, 6, "b"));
    h.pkt(3, publish("t", 0, 0, "c"));
    let qos = |g: Vec<Got>| g.iter().map(|g| g.qos).collect::<Vec<_>>();
    assert_eq!(qos(h.tx_got(1)), vec![0, 0, 0]);
    assert_eq!(qos(h.tx_got(2)), vec![1, 2, 0]);
}

#[test]
fn overlapping_subscriptions_deliver_once_at_the_highest_granted_qos() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", true);
    h.sub(1, &[("a/#", 0), ("a/+", 2), ("a/b", 1)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("a/b", 2, 1, "x"));
    let g = h.tx_got(1);
    assert_eq!(g.len(), 1, "delivered once: {g:?}");
    assert_eq!(g[0].qos, 2);
}

#[test]
fn publisher_receives_its_own_matching_publish() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", true);
    h.sub(1, &[("echo", 1)]);
    h.pkt(1, publish("echo", 1, 3, "me"));
    let out = h.tx(1);
    assert!(out.contains(&Packet::PubAck(3)));
    assert_eq!(out.iter().filter_map(got).count(), 1);
}

#[test]
fn mqtt_3_8_4_3_resubscribe_replaces_the_subscription() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", true);
    h.sub(1, &[("t", 2)]);
    assert_eq!(
        h.sub(1, &[("t", 0)]),
        vec![SubAckCode::Granted(QoS::AtMostOnce)]
    );
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 2, 1, "x"));
    let g = h.tx_got(1);
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].qos, 0, "the second grant replaced the first");
}

#[test]
fn mqtt_3_3_1_6_retained_sent_after_suback_with_retain_set() {
    let mut h = H::new(Settings::default());
    h.connect(2, "p", true);
    h.pkt(2, retained("r/a", 2, 1, "ra"));
    h.pkt(2, retained("r/b", 0, 0, "rb"));
    h.pkt(2, publish("r/c", 1, 2, "not retained"));
    h.connect(1, "s", true);
    h.pkt(1, subscribe(7, &[("r/#", 1)]));
    let out = h.tx(1);
    assert!(matches!(
        out.first(),
        Some(Packet::SubAck(SubAck { packet_id: 7, .. }))
    ));
    let mut g: Vec<Got> = out.iter().filter_map(got).collect();
    g.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(g.len(), 2);
    assert!(
        g.iter().all(|g| g.retain),
        "RETAIN set on retained messages"
    );
    // At min(retained QoS, granted).
    assert_eq!((g[0].topic.as_str(), g[0].qos), ("r/a", 1));
    assert_eq!((g[1].topic.as_str(), g[1].qos), ("r/b", 0));
}

#[test]
fn mqtt_3_3_1_9_retain_cleared_on_normal_delivery() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", true);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    h.pkt(2, retained("t", 1, 1, "x"));
    let g = h.tx_got(1);
    assert_eq!(g.len(), 1);
    assert!(!g[0].retain);
    assert_eq!(
        h.store_ops().last(),
        Some(&StoreOp::Retained {
            topic: "t".into(),
            message: Some(Message {
                topic: "t".into(),
                payload: Bytes::from_static(b"x"),
                qos: QoS::AtLeastOnce,
                retain: true
            })
        })
    );
}

#[test]
fn mqtt_3_3_1_10_empty_retained_publish_deletes_and_3_3_1_12_non_retained_keeps() {
    let mut h = H::new(Settings::default());
    h.connect(2, "p", true);
    h.pkt(2, retained("t", 0, 0, "keep"));
    // [MQTT-3.3.1-12]: RETAIN 0, even with an empty payload, leaves it alone.
    h.pkt(2, publish("t", 1, 1, ""));
    h.pkt(2, publish("t", 0, 0, "other"));
    assert_eq!(&h.e.retained.get("t").unwrap().payload[..], b"keep");
    // QoS 0 RETAIN 1 replaces [MQTT-3.3.1-7].
    h.pkt(2, retained("t", 0, 0, "new"));
    assert_eq!(&h.e.retained.get("t").unwrap().payload[..], b"new");
    // [MQTT-3.3.1-10/11]: empty payload with RETAIN deletes.
    h.clear_log();
    h.pkt(2, retained("t", 1, 2, ""));
    assert!(h.e.retained.get("t").is_none());
    assert_eq!(
        h.store_ops(),
        vec![StoreOp::Retained {
            topic: "t".into(),
            message: None
        }]
    );
    h.connect(1, "s", true);
    let out = h.sub(1, &[("t", 1)]);
    assert_eq!(out.len(), 1);
    assert!(h.tx_got(1).is_empty());
}

#[test]
fn mqtt_4_7_2_1_wildcards_do_not_match_dollar_topics() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", true);
    h.sub(1, &[("#", 0), ("+/x", 0)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("$SYS/x", 0, 0, "a"));
    assert!(h.tx_got(1).is_empty());
    h.sub(1, &[("$SYS/#", 0)]);
    h.pkt(2, publish("$SYS/x", 0, 0, "a"));
    assert_eq!(h.tx_got(1).len(), 1);
}

#[test]
fn subscription_denied_gets_0x80_and_a_notice() {
    let acl = Acl {
        deny_sub: vec!["secret"],
        ..Acl::default()
    };
    let mut h = H::with_acl(Settings::default(), acl);
    h.connect(1, "s", true);
    let codes = h.sub(1, &[("ok", 1), ("secret/#", 1)]);
    assert_eq!(
        codes,
        vec![SubAckCode::Granted(QoS::AtLeastOnce), SubAckCode::Failure]
    );
    assert_eq!(
        h.notices(),
        vec![Notice::SubscriptionDenied {
            key: key("s"),
            filter: "secret/#".into(),
            revoked: false
        }]
    );
    h.connect(2, "p", true);
    h.pkt(2, publish("secret/x", 0, 0, "no"));
    assert!(h.tx_got(1).is_empty());
}

#[test]
fn subscribe_with_invalid_filter_closes() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", true);
    h.pkt(1, subscribe(1, &[("ok", 0), ("a/#/b", 0)]));
    assert!(matches!(
        h.closes().as_slice(),
        [(1, CloseReason::ProtocolViolation(_))]
    ));
    assert!(h.e.router.live_nodes() == 1, "nothing subscribed");
}

#[test]
fn unsubscribe_is_always_answered_and_stops_delivery() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", false);
    h.sub(1, &[("a/+", 1)]);
    h.clear_log();
    h.pkt(1, unsubscribe(4, &["a/+", "never/subscribed"]));
    assert_eq!(h.tx(1), vec![Packet::UnsubAck(4)]);
    assert_eq!(
        h.store_ops(),
        vec![StoreOp::Unsubscribed {
            key: key("s"),
            filter: "a/+".into()
        }]
    );
    h.connect(2, "p", true);
    h.pkt(2, publish("a/b", 0, 0, "x"));
    assert!(h.tx_got(1).is_empty());
}

#[test]
fn publish_denied_is_acknowledged_and_dropped_by_default() {
    let acl = Acl {
        deny_pub: vec!["other/"],
        ..Acl::default()
    };
    let mut h = H::with_acl(Settings::default(), acl);
    h.connect(1, "s", true);
    h.sub(1, &[("#", 1)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("other/x", 1, 1, "x"));
    h.pkt(2, publish("other/x", 2, 2, "x"));
    assert_eq!(h.tx(2), vec![Packet::PubAck(1), Packet::PubRec(2)]);
    assert!(h.tx_got(1).is_empty());
    assert_eq!(
        h.notices()
            .iter()
            .filter(|n| matches!(n, Notice::PublishDenied { .. }))
            .count(),
        2
    );
}

#[test]
fn publish_denied_disconnects_when_configured() {
    let acl = Acl {
        deny_pub: vec!["other/"],
        ..Acl::default()
    };
    let settings = Settings {
        denied_publish: DeniedPublish::Disconnect,
        ..Settings::default()
    };
    let mut h = H::with_acl(settings, acl);
    h.connect(2, "p", true);
    h.pkt(2, publish("other/x", 0, 0, "x"));
    assert_eq!(h.closes(), vec![(2, CloseReason::DeniedPublish)]);
}

#[test]
fn transmit_respects_the_byte_budget_but_gives_at_least_one_packet() {
    let mut h = H::new(Settings::default());
    h.connect(1, "s", true);
    h.sub(1, &[("t", 0)]);
    h.connect(2, "p", true);
    for _ in 0..3 {
        h.pkt(2, publish("t", 0, 0, "0123456789"));
    }
    let mut out = Vec::new();
    h.e.transmit(ConnId(1), 1, &mut out);
    assert_eq!(out.len(), 1);
    let acts = h.drain();
    assert_eq!(
        acts,
        vec![Action::Transmit(ConnId(1))],
        "more to send: asked again"
    );
    out.clear();
    h.e.transmit(ConnId(1), 1000, &mut out);
    assert_eq!(out.len(), 2);
    assert!(h.drain().is_empty());
}
