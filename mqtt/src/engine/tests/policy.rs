use super::*;

#[test]
fn set_authorizer_revokes_live_and_stored_subscriptions() {
    let mut h = H::new(Settings::default());
    h.connect(1, "live", true);
    h.sub(1, &[("a/#", 1), ("b", 1)]);
    h.connect(2, "stored", false);
    h.sub(2, &[("a/x", 1)]);
    h.gone(2, Disconnected::Graceful);
    h.clear_log();
    let acl = Acl {
        deny_sub: vec!["a"],
        ..Acl::default()
    };
    h.e.set_authorizer(h.now, Arc::new(acl));
    h.drain();
    let mut revoked: Vec<(String, String)> = h
        .notices()
        .iter()
        .filter_map(|n| match n {
            Notice::SubscriptionDenied {
                key,
                filter,
                revoked: true,
            } => Some((key.id.clone(), filter.clone())),
            _ => None,
        })
        .collect();
    revoked.sort();
    assert_eq!(
        revoked,
        vec![
            ("live".to_owned(), "a/#".to_owned()),
            ("stored".to_owned(), "a/x".to_owned())
        ]
    );
    assert_eq!(
        h.store_ops(),
        vec![StoreOp::Unsubscribed {
            key: key("stored"),
            filter: "a/x".into()
        }]
    );
    h.connect(3, "p", true);
    h.pkt(3, publish("a/x", 1, 1, "no"));
    h.pkt(3, publish("b", 1, 2, "yes"));
    let g = h.tx_got(1);
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].payload, "yes");
    h.connect(2, "stored", false);
    assert!(
        h.tx_got(2).is_empty(),
        "revoked stored subscription delivers nothing"
    );
}

#[test]
fn revoking_the_only_subscriber_releases_a_held_publish() {
    let mut h = H::new(small(1));
    h.connect(1, "s", true);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 1, 1, "a"));
    h.pkt(2, publish("t", 1, 2, "b"));
    assert_eq!(h.tx(2), vec![Packet::PubAck(1)]);
    let acl = Acl {
        deny_sub: vec!["t"],
        ..Acl::default()
    };
    h.e.set_authorizer(h.now, Arc::new(acl));
    h.drain();
    assert_eq!(h.tx(2), vec![Packet::PubAck(2)]);
}

#[test]
fn publish_access_is_decided_when_it_arrives_even_if_it_is_then_held() {
    let mut h = H::new(small(1));
    h.connect(1, "s", true);
    h.sub(1, &[("t", 1)]);
    h.connect(2, "p", true);
    h.pkt(2, publish("t", 1, 1, "fills"));
    h.pkt(2, publish("t", 1, 2, "allowed when sent"));
    let deny = Acl {
        deny_pub: vec!["t"],
        ..Acl::default()
    };
    h.e.set_authorizer(h.now, Arc::new(deny));
    h.drain();
    h.pkt(2, publish("t", 1, 3, "denied when sent"));
    // Room appears while publishing on "t" is denied: the held one still goes.
    let mut got: Vec<String> = h.tx_got(1).into_iter().map(|g| g.payload).collect();
    got.extend(h.tx_got(1).into_iter().map(|g| g.payload));
    h.e.set_authorizer(h.now, Arc::new(Acl::default()));
    h.drain();
    h.pkt(1, Packet::PubAck(1));
    h.pkt(1, Packet::PubAck(2));
    got.extend(h.tx_got(1).into_iter().map(|g| g.payload));
    assert_eq!(got, vec!["fills", "allowed when sent"]);
    assert_eq!(
        h.tx(2),
        vec![Packet::PubAck(1), Packet::PubAck(2), Packet::PubAck(3)]
    );
}

#[test]
fn qos2_resend_of_an_accepted_id_is_answered_under_a_stricter_policy() {
    let settings = Settings {
        denied_publish: DeniedPublish::Disconnect,
        ..Settings::default()
    };
    let mut h = H::new(settings);
    h.connect(2, "p", false);
    h.pkt(2, publish("t", 2, 7, "x"));
    h.gone(2, Disconnected::Abnormal);
    let deny = Acl {
        deny_pub: vec!["t"],
        ..Acl::default()
    };
    h.e.set_authorizer(h.now, Arc::new(deny));
    h.drain();
    h.connect(3, "p", false);
    h.pkt(3, publish("t", 2, 7, "x"));
    h.durable_all();
    assert!(
        h.closes().is_empty(),
        "closed for finishing what was allowed"
    );
    assert_eq!(h.tx(3), vec![Packet::PubRec(7)]);
    h.pkt(3, Packet::PubRel(7));
    h.durable_all();
    assert_eq!(h.tx(3), vec![Packet::PubComp(7)]);
    // A new id on the same topic is denied.
    h.pkt(3, publish("t", 2, 8, "x"));
    assert_eq!(h.closes(), vec![(3, CloseReason::DeniedPublish)]);
}
