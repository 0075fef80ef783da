use super::*;

#[test]
fn mqtt_3_1_3_8_empty_client_id_with_clean_0_refused_0x02() {
    let mut h = H::new(Settings::default());
    let ack = h.connect_with(1, key(""), connect_packet("", false, None));
    assert_eq!(ack.code, ConnectCode::IdentifierRejected);
    assert!(!ack.session_present);
    assert!(h.e.conns.is_empty() && h.e.by_key.is_empty() && h.e.refused.is_empty());
    // An empty client id with clean session 1 is fine.
    let ack = h.connect_with(2, key(""), connect_packet("", true, None));
    assert_eq!(ack.code, ConnectCode::Accepted);
}

#[test]
fn will_topic_not_allowed_refused_0x05() {
    let acl = Acl {
        deny_pub: vec!["other/"],
        ..Acl::default()
    };
    let mut h = H::with_acl(Settings::default(), acl);
    let will = Will {
        topic: "other/x".into(),
        payload: Bytes::from_static(b"bye"),
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    let ack = h.connect_with(1, key("d"), connect_packet("d", true, Some(will.clone())));
    assert_eq!(ack.code, ConnectCode::NotAuthorized);
    assert!(h.e.by_key.is_empty());
    let bad = Will {
        topic: "a/+".into(),
        ..will
    };
    let ack = h.connect_with(2, key("d"), connect_packet("d", true, Some(bad)));
    assert_eq!(ack.code, ConnectCode::NotAuthorized);
}

#[test]
fn mqtt_3_2_2_session_present_follows_clean_flag_and_stored_state() {
    let mut h = H::new(Settings::default());
    // [MQTT-3.2.2-3]: clean 0 without a session.
    assert!(!h.connect(1, "d", false).session_present);
    assert_eq!(
        h.store_ops(),
        vec![StoreOp::SessionReset {
            key: key("d"),
            persistent: true
        }]
    );
    h.gone(1, Disconnected::Graceful);
    // [MQTT-3.2.2-2]: clean 0 with a session.
    assert!(h.connect(2, "d", false).session_present);
    h.gone(2, Disconnected::Graceful);
    // [MQTT-3.2.2-1]: clean 1, and the stored session is discarded [MQTT-3.1.2-6].
    h.clear_log();
    assert!(!h.connect(3, "d", true).session_present);
    assert_eq!(
        h.store_ops(),
        vec![StoreOp::SessionReset {
            key: key("d"),
            persistent: false
        }]
    );
    h.gone(3, Disconnected::Graceful);
    assert!(h.e.by_key.is_empty(), "clean session kept after disconnect");
    h.clear_log();
    assert!(!h.connect(4, "d", true).session_present);
    assert!(h.store_ops().is_empty(), "nothing stored to reset");
}

#[test]
fn takeover_closes_old_connection_and_publishes_its_will() {
    let mut h = H::new(Settings::default());
    h.connect(9, "watcher", true);
    h.sub(9, &[("wills/#", 1)]);
    let will = Will {
        topic: "wills/d".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    h.connect_with(1, key("d"), connect_packet("d", false, Some(will)));
    h.pkt(1, subscribe(1, &[("x", 1)]));
    let ack = h.connect(2, "d", false);
    assert!(ack.session_present, "persistent session resumed");
    assert_eq!(h.closes(), vec![(1, CloseReason::Takeover)]);
    assert!(h.notices().contains(&Notice::WillPublished {
        key: key("d"),
        topic: "wills/d".into()
    }));
    let w = h.tx_got(9);
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].topic.as_str(), w[0].qos), ("wills/d", 1));
    // The old connection is forgotten: its packets and end are ignored.
    h.pkt(1, publish("x", 0, 0, "late"));
    h.gone(1, Disconnected::Abnormal);
    assert!(h.tx_got(2).is_empty());
    h.e.check_invariants();
}

#[test]
fn sessions_are_keyed_by_role_id_and_instance() {
    let mut h = H::new(Settings::default());
    let service = SessionKey {
        role: Role::Service,
        id: "svc-1".into(),
        instance: Some("a".into()),
    };
    h.connect_with(1, service.clone(), connect_packet("svc-1:a", false, None));
    h.pkt(1, subscribe(1, &[("cmd/#", 1)]));
    h.gone(1, Disconnected::Graceful);
    // A device whose id reads like the service instance gets a session of its own.
    let ack = h.connect_with(2, key("svc-1:a"), connect_packet("svc-1:a", false, None));
    assert!(!ack.session_present);
    assert!(h.closes().is_empty());
    let ack = h.connect_with(3, service, connect_packet("svc-1:a", false, None));
    assert!(ack.session_present);
}

#[test]
fn second_connect_and_server_packets_are_protocol_violations() {
    let mut h = H::new(Settings::default());
    h.connect(1, "a", true);
    h.pkt(1, Packet::Connect(connect_packet("a", true, None)));
    assert!(matches!(
        h.closes().as_slice(),
        [(1, CloseReason::ProtocolViolation(_))]
    ));
    h.connect(2, "b", true);
    h.pkt(2, Packet::PingResp);
    assert_eq!(h.closes().len(), 2);
    // Packets on a connection the engine does not know are ignored.
    assert!(h.pkt(77, publish("t", 1, 1, "x")).is_empty());
    assert!(h.tx(77).is_empty());
    h.e.check_invariants();
}

#[test]
fn pingreq_answered_with_pingresp() {
    let mut h = H::new(Settings::default());
    h.connect(1, "a", true);
    let acts = h.pkt(1, Packet::PingReq);
    assert_eq!(acts, vec![Action::Transmit(ConnId(1))]);
    assert_eq!(h.tx(1), vec![Packet::PingResp]);
}

#[test]
fn mqtt_3_14_4_3_graceful_disconnect_publishes_no_will() {
    let mut h = H::new(Settings::default());
    h.connect(9, "w", true);
    h.sub(9, &[("will/#", 2)]);
    let will = |t: &str| Will {
        topic: t.into(),
        payload: Bytes::from_static(b"x"),
        qos: QoS::ExactlyOnce,
        retain: true,
    };
    h.connect_with(1, key("a"), connect_packet("a", true, Some(will("will/a"))));
    h.gone(1, Disconnected::Graceful);
    h.connect_with(2, key("b"), connect_packet("b", true, Some(will("will/b"))));
    h.pkt(2, Packet::Disconnect);
    h.gone(2, Disconnected::Abnormal);
    assert!(h.tx_got(9).is_empty());
    // Abnormal: published at its QoS and RETAIN.
    h.connect_with(3, key("c"), connect_packet("c", true, Some(will("will/c"))));
    h.gone(3, Disconnected::Abnormal);
    let w = h.tx_got(9);
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].qos, 2, "will at its QoS");
    assert!(h.e.retained.get("will/c").is_some(), "will retained");
}

#[test]
fn will_denied_when_it_fires_is_not_published() {
    let mut h = H::new(Settings::default());
    h.connect(9, "w", true);
    h.sub(9, &[("will/#", 1)]);
    let will = Will {
        topic: "will/a".into(),
        payload: Bytes::from_static(b"x"),
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    h.connect_with(1, key("a"), connect_packet("a", true, Some(will)));
    let acl = Acl {
        deny_pub: vec!["will/"],
        ..Acl::default()
    };
    h.e.set_authorizer(h.now, Arc::new(acl));
    h.gone(1, Disconnected::Abnormal);
    assert!(h.tx_got(9).is_empty());
    assert!(h.notices().contains(&Notice::PublishDenied {
        key: key("a"),
        topic: "will/a".into()
    }));
}
