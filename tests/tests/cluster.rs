//! The cloud side on a three-node NATS cluster (JetStream, MQTT listener, mTLS with the
//! certificate as the user, an ACL per gateway and per service), with the fleet's own PKI:
//! who gets in, what each identity may publish and subscribe to across nodes, a gateway bridged
//! to one node serving a service on another, a persistent subscriber whose node dies, and a
//! device id the cluster refuses in a topic not blocking the uplink.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cloud_client::{CommandState, FleetClient, SendCommand};
use fleet_certs::pki::{InitOptions, Pki};
use fleet_certs::profile::{ServerNames, Validity};
use fleet_certs::{Identity, Role};
use fleet_proto::Message;
use fleet_testkit::eventually;
use fleet_tests::cluster::{Acl, ClusterPki, NatsCluster};
use fleet_tests::mosquitto::Observer;
use fleet_tests::procs::{DeviceOpts, DeviceProc, GatewayProc};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Incoming, MqttOptions, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Any single MQTT exchange with the cluster (a QoS 1 SUBSCRIBE takes about a second).
const EXCHANGE: Duration = Duration::from_secs(20);

/// The nodes' certificate: a gateway-role certificate of the fleet CA for `localhost`.
const SERVER_ID: &str = "cloud";

/// The fleet PKI in `dir/data/pki` (where a gateway with data in `dir/data` finds it): the CA,
/// gateways gw-0001 and gw-0002, services svc-0001 and svc-0002, device dev-0001, and the
/// nodes' certificate.
fn fleet_pki(dir: &Path) -> PathBuf {
    let pki_dir = dir.join("data/pki");
    let mut pki = Pki::init(
        &pki_dir,
        &InitOptions {
            devices: 1,
            ..InitOptions::default()
        },
    )
    .unwrap();
    let year = Validity::days_from_now(365);
    for (role, id) in [
        (Role::Gateway, "gw-0002"),
        (Role::Service, "svc-0002"),
        (Role::Gateway, SERVER_ID),
    ] {
        let names = if role == Role::Gateway {
            ServerNames::local()
        } else {
            ServerNames::default()
        };
        pki.issue(&Identity::new(role, id).unwrap(), year, &names)
            .unwrap();
    }
    pki_dir
}

fn role_dir(role: Role) -> &'static str {
    match role {
        Role::Gateway => "gateways",
        Role::Service => "services",
        Role::Device => "devices",
    }
}

async fn cluster(dir: &Path, pki: &Path) -> NatsCluster {
    let server = pki.join("gateways").join(SERVER_ID);
    NatsCluster::start(
        &dir.join("cluster"),
        &ClusterPki {
            ca: pki.join("ca.crt"),
            server_cert: server.with_extension("crt"),
            server_key: server.with_extension("key"),
        },
        &Acl::new(["gw-0001", "gw-0002"], ["svc-0001", "svc-0002"]),
    )
    .await
}

/// A TLS client configuration trusting the fleet CA and presenting `id`'s certificate from
/// `pki` (the CA of `pki` need not be the fleet's: a rogue one is presented as it is).
fn tls(fleet_ca: &Path, pki: &Path, role: Role, id: &str) -> Arc<rustls::ClientConfig> {
    let base = pki.join(role_dir(role)).join(id);
    fleet_testkit::mqtt::client_config(
        fleet_ca,
        &std::fs::read_to_string(base.with_extension("crt")).unwrap(),
        &std::fs::read_to_string(base.with_extension("key")).unwrap(),
    )
    .unwrap()
}

/// A TLS client configuration trusting the fleet CA and presenting no certificate.
fn tls_without_certificate(fleet_ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fleet_ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A client of the test on one node, its event loop driven inline; QoS 1 throughout.
struct Mqtt {
    client: AsyncClient,
    events: EventLoop,
    name: String,
}

impl Mqtt {
    /// Connects (clean session) as `client_id`: the client, or the error that ended the attempt.
    async fn connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        client_id: &str,
    ) -> Result<Mqtt, ConnectionError> {
        let mut o = MqttOptions::new(client_id, "localhost", addr.port());
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)))
            .set_keep_alive(Duration::from_secs(10));
        let (client, mut events) = AsyncClient::new(o, 16);
        let name = format!("{client_id}@{addr}");
        loop {
            match tokio::time::timeout(EXCHANGE, events.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) => {
                    return Ok(Mqtt {
                        client,
                        events,
                        name,
                    })
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => panic!("{name}: neither CONNACK nor an error within {EXCHANGE:?}"),
            }
        }
    }

    /// The next event, within [`EXCHANGE`].
    async fn next(&mut self, waiting_for: &str) -> Incoming {
        loop {
            match tokio::time::timeout(EXCHANGE, self.events.poll()).await {
                Ok(Ok(Event::Incoming(i))) => return i,
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => panic!("{}: {e} while waiting for {waiting_for}", self.name),
                Err(_) => panic!("{}: no {waiting_for} within {EXCHANGE:?}", self.name),
            }
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    async fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
        while !matches!(self.next("a PUBACK").await, Incoming::PubAck(_)) {}
    }

    /// Subscribes to `filter` at QoS 1: the SUBACK's return code.
    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            if let Incoming::SubAck(ack) = self.next("a SUBACK").await {
                return ack.return_codes[0];
            }
        }
    }

    /// The topics received until `topic` arrives, `topic` last.
    async fn receive_until(&mut self, topic: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            if let Incoming::Publish(p) = self.next(topic).await {
                seen.push(p.topic.clone());
                if p.topic == topic {
                    return seen;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_fleet_certificates_get_in_and_each_one_stays_within_its_acl_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let pki = fleet_pki(dir.path());
    let ca = pki.join("ca.crt");
    let cluster = cluster(dir.path(), &pki).await;
    let nodes = cluster.mqtt_addrs();

    // mTLS: no certificate, or gw-0001's name from another CA, fails the TLS handshake; a
    // fleet certificate whose holder is not a user of the cluster is refused at CONNECT.
    let rogue = dir.path().join("rogue");
    Pki::init(&rogue, &InitOptions::default()).unwrap();
    for (what, config) in [
        ("no certificate", tls_without_certificate(&ca)),
        (
            "a rogue CA's gw-0001",
            tls(&ca, &rogue, Role::Gateway, "gw-0001"),
        ),
    ] {
        match Mqtt::connect(nodes[0], config, "gw-0001").await {
            // The handshake's end: the server's alert surfaces on the first read.
            Err(e) => assert!(
                e.to_string().contains("received fatal alert"),
                "{what}: not a TLS failure: {e}"
            ),
            Ok(_) => panic!("{what}: connected"),
        }
    }
    match Mqtt::connect(
        nodes[0],
        tls(&ca, &pki, Role::Device, "dev-0001"),
        "dev-0001",
    )
    .await
    {
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)) => {}
        Err(e) => panic!("dev-0001: not refused as unauthorised: {e}"),
        Ok(_) => panic!("dev-0001 connected to the cloud"),
    }

    // A service watches every gateway from node 2.
    let mut watch = Mqtt::connect(nodes[1], tls(&ca, &pki, Role::Service, "svc-0002"), "watch")
        .await
        .unwrap();
    assert_eq!(
        watch.subscribe("gateways/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );

    // gw-0001 on node 1: under gw-0002's prefix NATS acknowledges and drops; under its own
    // the message crosses to node 2. Both from one connection in order, so the forged one
    // would have arrived first.
    let mut gw1 = Mqtt::connect(
        nodes[0],
        tls(&ca, &pki, Role::Gateway, "gw-0001"),
        "gw-0001",
    )
    .await
    .unwrap();
    gw1.publish("gateways/gw-0002/devices/dev-0001/status", b"forged")
        .await;
    gw1.publish("gateways/gw-0001/devices/dev-0001/status", b"real")
        .await;
    assert_eq!(
        watch
            .receive_until("gateways/gw-0001/devices/dev-0001/status")
            .await,
        ["gateways/gw-0001/devices/dev-0001/status"]
    );
    assert!(cluster.logged(0, "Publish Violation"));

    // svc-0001 on node 3 requests as itself only.
    let mut svc1 = Mqtt::connect(nodes[2], tls(&ca, &pki, Role::Service, "svc-0001"), "svc-1")
        .await
        .unwrap();
    svc1.publish("gateways/gw-0001/fleet/api/svc-0002/request", b"forged")
        .await;
    svc1.publish("gateways/gw-0001/fleet/api/svc-0001/request", b"real")
        .await;
    assert_eq!(
        watch
            .receive_until("gateways/gw-0001/fleet/api/svc-0001/request")
            .await,
        ["gateways/gw-0001/fleet/api/svc-0001/request"]
    );

    // gw-0002 subscribes within its own prefix only.
    let mut gw2 = Mqtt::connect(
        nodes[2],
        tls(&ca, &pki, Role::Gateway, "gw-0002"),
        "gw-0002",
    )
    .await
    .unwrap();
    assert_eq!(
        gw2.subscribe("gateways/gw-0001/#").await,
        SubscribeReasonCode::Failure
    );
    assert_eq!(
        gw2.subscribe("gateways/gw-0002/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_bridged_to_one_node_serves_a_service_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let pki = fleet_pki(&dir.path().join("gw"));
    let cluster = cluster(dir.path(), &pki).await;
    let nodes = cluster.mqtt_addrs();
    let svc = |id: &str, ext: &str| pki.join("services").join(format!("{id}.{ext}"));

    // A service watches the gateway's status reports on node 3.
    let mut reports = Observer::start(
        nodes[2].port(),
        &pki.join("ca.crt"),
        &svc("svc-0001", "crt"),
        &svc("svc-0001", "key"),
        "status-watch",
        "gateways/gw-0001/devices/+/status",
    );
    assert!(reports.wait_subscribed(EXCHANGE).await);

    // The gateway finds the fleet PKI in its data directory and bridges to node 1 as gw-0001.
    let gw = GatewayProc::start(
        &dir.path().join("gw"),
        1,
        &[
            (
                "GATEWAY__BRIDGE__UPSTREAM",
                &format!("localhost:{}", nodes[0].port()),
            ),
            ("GATEWAY__BRIDGE__RECONNECT_MAX", "1s"),
        ],
    );
    eventually(Duration::from_secs(30), "the bridge connects", || {
        gw.metric("bridge_connected") == 1.0
    })
    .await;
    let mut opts = DeviceOpts::new(dir.path(), "dev-0001");
    opts.reports = 3;
    let dev = DeviceProc::start(&gw.address(), &pki, &opts);
    dev.connected(Duration::from_secs(30)).await;

    eventually(
        Duration::from_secs(30),
        "3 status reports on node 3",
        || {
            let seqs: Vec<u64> = reports
                .seen()
                .iter()
                .map(|(_, p)| {
                    fleet_proto::v1::StatusReport::decode(p.as_slice())
                        .unwrap()
                        .sequence
                })
                .collect();
            (seqs == [1, 2, 3]).then_some(()).ok_or(seqs)
        },
    )
    .await;

    // The SDK on node 2 reaches the device through the cluster and the bridge.
    let fleet = FleetClient::builder()
        .gateway("localhost", nodes[1].port())
        .pem_files(
            pki.join("ca.crt"),
            svc("svc-0001", "crt"),
            svc("svc-0001", "key"),
        )
        .via_broker("gw-0001")
        .unwrap()
        .command_key_file(pki.join("trust/commands-1.key"))
        .connect()
        .await
        .unwrap();
    let recs = fleet
        .send_command(SendCommand {
            device_ids: vec!["dev-0001".into()],
            name: "ping".into(),
            payload: b"up".to_vec(),
            ..SendCommand::default()
        })
        .await
        .unwrap()
        .wait(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].state(), CommandState::Succeeded, "{recs:?}");
    assert_eq!(recs[0].result.as_ref().unwrap().output, b"ok:ping:up");
    assert_eq!(opts.ran().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_subscriber_gets_what_was_published_while_its_node_was_down() {
    let dir = tempfile::tempdir().unwrap();
    let pki = fleet_pki(dir.path());
    let ca = pki.join("ca.crt");
    let mut cluster = cluster(dir.path(), &pki).await;
    let nodes = cluster.mqtt_addrs();

    // svc-0001 holds a persistent session (clean session 0, QoS 1) on node 2.
    let mut obs = Observer::start(
        nodes[1].port(),
        &ca,
        &pki.join("services/svc-0001.crt"),
        &pki.join("services/svc-0001.key"),
        "svc-0001-watch",
        "gateways/gw-0001/#",
    );
    assert!(obs.wait_subscribed(EXCHANGE).await);

    cluster.kill(1);
    // gw-0001 publishes through node 1 while node 2 is down. If the dead node led the
    // message stream, NATS may close the connection while a new leader is elected: publish
    // again on a new connection (at least once).
    let topics: Vec<String> = (1..=5)
        .map(|n| format!("gateways/gw-0001/queued/{n}"))
        .collect();
    let mut pending = topics.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not published within 60 s: {pending:?}"
        );
        let gw = tls(&ca, &pki, Role::Gateway, "gw-0001");
        let Ok(mut gw) = Mqtt::connect(nodes[0], gw, "gw-0001").await else {
            // Refused while the session of the closed connection is being taken over.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while let Some(topic) = pending.first().cloned() {
            gw.client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, b"q".to_vec())
                .await
                .unwrap();
            let acked = loop {
                match tokio::time::timeout(EXCHANGE, gw.events.poll()).await {
                    Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => break true,
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => break false,
                }
            };
            if !acked {
                break;
            }
            pending.remove(0);
        }
    }
    assert!(
        obs.seen().is_empty(),
        "received while its node was down: {:?}",
        obs.seen()
    );

    cluster.restart(1).await;
    eventually(
        Duration::from_secs(60),
        "the queued messages arrive",
        || {
            let seen: Vec<String> = obs.seen().into_iter().map(|(t, _)| t).collect();
            topics
                .iter()
                .all(|t| seen.contains(t))
                .then_some(())
                .ok_or(seen)
        },
    )
    .await;
}

/// NATS closes a connection that publishes a topic with `.` or a space. With
/// `bridge.refuse_topic_chars` set, a device whose id holds a `.` does not block the uplink:
/// its messages stay on the gateway (counted), the next device's reports go up, and the bridge
/// keeps its one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_cluster_refuses_does_not_block_the_uplink() {
    let dir = tempfile::tempdir().unwrap();
    let pki = fleet_pki(&dir.path().join("gw"));
    let mut fleet = Pki::open(&pki).unwrap();
    fleet
        .issue(
            &Identity::new(Role::Device, "dev.0002").unwrap(),
            Validity::days_from_now(365),
            &ServerNames::default(),
        )
        .unwrap();
    let cluster = cluster(dir.path(), &pki).await;
    let nodes = cluster.mqtt_addrs();
    let svc = |ext: &str| pki.join("services").join(format!("svc-0001.{ext}"));

    let mut reports = Observer::start(
        nodes[2].port(),
        &pki.join("ca.crt"),
        &svc("crt"),
        &svc("key"),
        "status-watch",
        "gateways/gw-0001/devices/+/status",
    );
    assert!(reports.wait_subscribed(EXCHANGE).await);

    let gw = GatewayProc::start(
        &dir.path().join("gw"),
        1,
        &[
            (
                "GATEWAY__BRIDGE__UPSTREAM",
                &format!("localhost:{}", nodes[0].port()),
            ),
            ("GATEWAY__BRIDGE__RECONNECT_MAX", "1s"),
            ("GATEWAY__BRIDGE__REFUSE_TOPIC_CHARS", ". "),
        ],
    );
    eventually(Duration::from_secs(30), "the bridge connects", || {
        gw.metric("bridge_connected") == 1.0
    })
    .await;

    // dev.0002's reports are stored, and so queued upward, first.
    let mut dotted = DeviceOpts::new(dir.path(), "dev.0002");
    dotted.reports = 2;
    let _dotted = DeviceProc::start(&gw.address(), &pki, &dotted);
    eventually(Duration::from_secs(30), "dev.0002's reports stored", || {
        let stored = gw.metric("status_stored_total");
        (stored >= 2.0).then_some(()).ok_or(stored)
    })
    .await;

    let mut opts = DeviceOpts::new(dir.path(), "dev-0001");
    opts.reports = 3;
    let _dev = DeviceProc::start(&gw.address(), &pki, &opts);
    eventually(
        Duration::from_secs(20),
        "dev-0001's 3 reports on node 3",
        || {
            let seen: Vec<(String, u64)> = reports
                .seen()
                .iter()
                .map(|(t, p)| {
                    let seq = fleet_proto::v1::StatusReport::decode(p.as_slice())
                        .unwrap()
                        .sequence;
                    (t.clone(), seq)
                })
                .collect();
            let topic = "gateways/gw-0001/devices/dev-0001/status";
            let ours: Vec<u64> = seen
                .iter()
                .filter(|(t, _)| t == topic)
                .map(|(_, s)| *s)
                .collect();
            (ours == [1, 2, 3]).then_some(()).ok_or(seen)
        },
    )
    .await;
    assert!(gw.metric("bridge_refused_topics_total") >= 2.0);
    assert_eq!(
        gw.metric("bridge_connects_total"),
        1.0,
        "the bridge reconnected"
    );
    assert_eq!(gw.metric("bridge_connected"), 1.0);
    assert!(gw.logged("not sent up"));
}
