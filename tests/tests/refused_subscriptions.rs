//! A cloud broker that refuses a subscription once (as a cluster does while it elects leaders)
//! and grants it when asked again: the SDK and the gateway's bridge each ask again on the same
//! connection, after about a second, and then receive what the subscription carries. Taking
//! the refusal as final left the SDK deaf to every answer (the scale test's cluster fail-over
//! hung on "no answer from the gateway" until its deadline) and a gateway deaf to requests,
//! until their next connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cloud_client::GatewayPresence;
use fleet_proto::Message;
use fleet_testkit::{eventually, eventually_async};
use fleet_tests::fleet::{gateway_id, FleetGateway, FleetPki};
use fleet_tests::scripted_broker::{ScriptedBroker, Subscribe};

/// The first subscription was refused, the second (on the same connection, at least a second
/// later, with the same filters) granted; nothing else.
fn refused_then_granted(subs: &[Subscribe]) {
    assert_eq!(subs.len(), 2, "{subs:#?}");
    let (first, again) = (&subs[0], &subs[1]);
    assert!(!first.granted && again.granted, "{subs:#?}");
    assert_eq!(
        first.connection, again.connection,
        "asked again on a new connection"
    );
    assert_eq!(first.filters, again.filters);
    let waited = again.at - first.at;
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
        "asked again after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_asks_again_for_subscriptions_the_cloud_broker_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = FleetPki::init(&dir.path().join("pki"), 1, 1);
    let (cert, key) = pki.pair("gateways", &gateway_id(1));
    let broker = ScriptedBroker::start(&cert, &key, 1).await;

    // Ready only once the subscriptions are granted.
    let fleet = pki
        .sdk("localhost", broker.addr.port())
        .fleet()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connected once the subscriptions are granted");
    let subs = broker.subscribes();
    refused_then_granted(&subs);
    assert!(
        subs[0]
            .filters
            .contains(&"gateways/+/fleet/api/svc-0001/response".to_owned()),
        "{subs:#?}"
    );
    assert_eq!(broker.connections(), 1);

    // What the granted subscriptions carry arrives: a gateway's presence is listed.
    let presence = GatewayPresence {
        gateway_id: "gw-0001".into(),
        online: true,
        ..GatewayPresence::default()
    };
    broker.publish("gateways/gw-0001/presence", &presence.encode_to_vec());
    eventually_async(
        Duration::from_secs(10),
        "the presence sent after the grant is listed",
        async || {
            let listed = fleet.gateways().await.unwrap();
            listed
                .iter()
                .any(|p| p.gateway_id == "gw-0001" && p.online)
                .then_some(())
                .ok_or(listed)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_asks_again_for_the_request_subscription_the_cloud_broker_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = FleetPki::init(&dir.path().join("pki"), 1, 1);
    let (cert, key) = pki.pair("gateways", &gateway_id(1));
    let broker = ScriptedBroker::start(&cert, &key, 1).await;
    let gw = FleetGateway::start(dir.path(), &pki, 1, &[broker.address()], &[]).await;

    eventually(
        Duration::from_secs(10),
        "the bridge asks for its subscription again and it is granted",
        || broker.subscribes().iter().any(|s| s.granted),
    )
    .await;
    let subs = broker.subscribes();
    refused_then_granted(&subs);
    assert_eq!(subs[0].filters, ["gateways/gw-0001/fleet/api/+/request"]);
    assert_eq!(gw.proc.metric("bridge_connects_total"), 1.0);
    assert!(gw
        .proc
        .logged("the upstream broker refused a subscription; asking again"));

    // What the granted subscription carries arrives at the gateway.
    let before = gw.proc.metric("bridge_messages_down_total");
    broker.publish(
        "gateways/gw-0001/fleet/api/svc-0001/request",
        b"not a request",
    );
    eventually(
        Duration::from_secs(10),
        "a message sent down after the grant reaches the gateway",
        || gw.proc.metric("bridge_messages_down_total") > before,
    )
    .await;
}
