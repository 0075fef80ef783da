//! The gateway's MQTT core against the MQTT 3.1.1 standard, with raw packets over real mTLS.
//! Each test is named after the normative statement it checks, or after the defect of the
//! embedded rumqttd router it keeps fixed (its bytes as they were sent then).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use fleet_broker::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const WAIT: Duration = Duration::from_secs(10);

/// A raw client: a TLS stream and what has been read but not yet split into packets.
struct Raw {
    s: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// CONNECT with explicit flags and payload after the client id (will, user name, ...).
fn connect_with(flags: u8, client_id: &str, rest: &[u8]) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(4);
    body.push(flags);
    body.extend_from_slice(&30u16.to_be_bytes());
    body.extend_from_slice(&string(client_id.as_bytes()));
    body.extend_from_slice(rest);
    fleet_testkit::mqtt::packet(0x10, &body)
}

/// A will of `topic`/`payload` as the CONNECT payload carries it.
fn will(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = string(topic.as_bytes());
    v.extend_from_slice(&string(payload));
    v
}

impl Raw {
    /// TLS as `id`, nothing sent yet.
    async fn tls(gw: &TestGateway, id: &str) -> Raw {
        Raw {
            s: raw_tls(gw, id).await,
            buf: Vec::new(),
        }
    }

    /// TLS as `id`, CONNECT (clean session unless `persistent`), CONNACK accepted; returns the
    /// session-present flag.
    async fn connect(gw: &TestGateway, id: &str, persistent: bool) -> (Raw, bool) {
        let mut raw = Raw::tls(gw, id).await;
        let flags = if persistent { 0x00 } else { 0x02 };
        raw.send(&connect_with(flags, id, &[])).await;
        let (first, body) = raw.next().await;
        assert_eq!((first, body.get(1)), (0x20, Some(&0)), "CONNACK accepted");
        (raw, body.first() == Some(&1))
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
        self.s.flush().await.unwrap();
    }

    /// The next packet (first byte, body), within [`WAIT`].
    async fn next(&mut self) -> (u8, Vec<u8>) {
        self.next_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("no packet within {WAIT:?}"))
    }

    /// The next packet, or `None` if none arrives within `within` or the connection closes.
    async fn next_within(&mut self, within: Duration) -> Option<(u8, Vec<u8>)> {
        let end = tokio::time::Instant::now() + within;
        loop {
            if let Some(p) = fleet_testkit::mqtt::split_packet(&mut self.buf).unwrap() {
                return Some(p);
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(end, self.s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Sends `bytes` and expects the gateway to close the connection without answering.
    async fn refused(mut self, bytes: &[u8], what: &str) {
        let (got, closed) = send_and_wait_close(&mut self.s, bytes, WAIT).await;
        assert!(closed, "{what}: connection left open");
        assert!(got.is_empty(), "{what}: answered {got:02x?}");
    }

    async fn subscribe(&mut self, pkid: u16, filter: &str, qos: u8) {
        self.send(&subscribe_packet(pkid, &[(filter, qos)])).await;
        let (first, body) = self.next().await;
        assert_eq!(first, 0x90, "SUBACK");
        assert_eq!(body, [(pkid >> 8) as u8, pkid as u8, qos], "granted");
    }
}

/// A received PUBLISH: (flags of the first byte, topic, packet id, payload).
fn publish_of(first: u8, body: &[u8]) -> (u8, String, Option<u16>, Vec<u8>) {
    assert_eq!(first >> 4, 3, "a PUBLISH, got {first:#04x}");
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + len].to_vec()).unwrap();
    let qos = (first >> 1) & 3;
    let (pkid, at) = if qos > 0 {
        (
            Some(u16::from_be_bytes([body[2 + len], body[3 + len]])),
            4 + len,
        )
    } else {
        (None, 2 + len)
    };
    (first & 0x0f, topic, pkid, body[at..].to_vec())
}

// ---- What the codec must refuse (each was accepted by the embedded router) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_2_3_connect_reserved_flag_closes() {
    let gw = TestGateway::start().await;
    let raw = Raw::tls(&gw, "dev-1").await;
    raw.refused(&connect_with(0x03, "dev-1", &[]), "reserved flag")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_2_22_password_without_user_name_closes() {
    let gw = TestGateway::start().await;
    let raw = Raw::tls(&gw, "dev-1").await;
    raw.refused(
        &connect_with(0x42, "dev-1", &string(b"pw")),
        "password alone",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_bytes_after_its_payload_closes() {
    let gw = TestGateway::start().await;
    let raw = Raw::tls(&gw, "dev-1").await;
    raw.refused(&connect_with(0x02, "dev-1", b"junk"), "trailing bytes")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_2_2_other_protocol_levels_get_connack_1() {
    let gw = TestGateway::start().await;
    for level in [3u8, 5] {
        let mut raw = Raw::tls(&gw, "dev-1").await;
        let mut body = string(b"MQTT");
        body.extend_from_slice(&[level, 0x02, 0, 30]);
        body.extend_from_slice(&string(b"dev-1"));
        let (got, closed) =
            send_and_wait_close(&mut raw.s, &fleet_testkit::mqtt::packet(0x10, &body), WAIT).await;
        assert_eq!(got, [0x20, 0x02, 0x00, 0x01], "level {level}");
        assert!(closed, "level {level}: left open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_3_8_empty_client_id_needs_a_clean_session() {
    let gw = TestGateway::start().await;
    let mut raw = Raw::tls(&gw, "dev-1").await;
    let (got, closed) = send_and_wait_close(&mut raw.s, &connect_with(0x00, "", &[]), WAIT).await;
    assert_eq!(got, [0x20, 0x02, 0x00, 0x02]);
    assert!(closed);
    // With clean session 1 the certificate's id is assigned.
    let mut raw = Raw::tls(&gw, "dev-1").await;
    raw.send(&connect_with(0x02, "", &[])).await;
    assert_eq!(raw.next().await, (0x20, vec![0, 0]));
}

/// After a CONNECT accepted for dev-1, `bytes` close the connection unanswered.
async fn refused_after_connect(bytes: &[u8], what: &str) {
    let gw = TestGateway::start().await;
    let (raw, _) = Raw::connect(&gw, "dev-1", false).await;
    let before = Metrics::get(&gw.handle.metrics().protocol_errors);
    raw.refused(bytes, what).await;
    let m = gw.handle.metrics();
    eventually(WAIT, "protocol error counted", || {
        Metrics::get(&m.protocol_errors) > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_8_1_1_subscribe_with_reserved_flags_closes() {
    let mut bytes = subscribe_packet(1, &[("devices/dev-1/cmd", 1)]);
    bytes[0] = 0x80;
    refused_after_connect(&bytes, "SUBSCRIBE flags 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_10_1_1_unsubscribe_with_reserved_flags_closes() {
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend_from_slice(&string(b"devices/dev-1/cmd"));
    refused_after_connect(
        &fleet_testkit::mqtt::packet(0xa0, &body),
        "UNSUBSCRIBE flags 0",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_2_3_1_1_subscribe_with_packet_id_0_closes() {
    refused_after_connect(
        &subscribe_packet(0, &[("devices/dev-1/cmd", 1)]),
        "SUBSCRIBE id 0",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_2_3_1_1_unsubscribe_with_packet_id_0_closes() {
    let mut body = 0u16.to_be_bytes().to_vec();
    body.extend_from_slice(&string(b"devices/dev-1/cmd"));
    refused_after_connect(
        &fleet_testkit::mqtt::packet(0xa2, &body),
        "UNSUBSCRIBE id 0",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_8_3_4_subscription_options_with_reserved_bits_close() {
    refused_after_connect(
        &subscribe_packet(1, &[("devices/dev-1/cmd", 0xfd)]),
        "options 0xFD",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_10_3_2_unsubscribe_without_a_filter_closes() {
    refused_after_connect(&[0xa2, 0x02, 0x00, 0x05], "UNSUBSCRIBE with no filter").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pingreq_with_a_body_closes() {
    refused_after_connect(&[0xc0, 0x01, 0x00], "PINGREQ length 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_14_1_1_disconnect_with_flags_is_abnormal_and_publishes_the_will() {
    let gw = TestGateway::start().await;
    let (mut svc, _) = Raw::connect(&gw, "svc-1", false).await;
    svc.subscribe(1, "devices/dev-1/presence", 1).await;
    let mut dev = Raw::tls(&gw, "dev-1").await;
    // Will flag, will QoS 1, clean session.
    dev.send(&connect_with(
        0x0e,
        "dev-1",
        &will("devices/dev-1/presence", b"gone"),
    ))
    .await;
    assert_eq!(dev.next().await, (0x20, vec![0, 0]));
    dev.refused(&[0xe1, 0x00], "DISCONNECT with flags").await;
    let (first, body) = svc.next().await;
    let (flags, topic, _, payload) = publish_of(first, &body);
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("devices/dev-1/presence", &b"gone"[..])
    );
    // [MQTT-3.1.2-14]: the will is published at its QoS (1 here).
    assert_eq!((flags >> 1) & 3, 1, "will QoS");
}

// ---- QoS ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_8_4_6_delivery_at_the_lower_of_published_and_granted_qos() {
    let gw = TestGateway::start().await;
    let (mut dev, _) = Raw::connect(&gw, "dev-1", false).await;
    dev.subscribe(1, "devices/dev-1/cmd", 1).await;
    let (mut svc, _) = Raw::connect(&gw, "svc-1", false).await;
    svc.send(&publish_packet(b"devices/dev-1/cmd", b"q0", 0, 0))
        .await;
    let (first, body) = dev.next().await;
    let (flags, _, pkid, payload) = publish_of(first, &body);
    assert_eq!((flags >> 1) & 3, 0, "raised to the subscription's QoS");
    assert_eq!((pkid, payload.as_slice()), (None, &b"q0"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_3_3_qos2_publish_sent_twice_is_delivered_once() {
    let gw = TestGateway::start().await;
    let (mut dev, _) = Raw::connect(&gw, "dev-1", false).await;
    dev.subscribe(1, "devices/dev-1/cmd", 2).await;
    let (mut svc, _) = Raw::connect(&gw, "svc-1", false).await;
    let publish = publish_packet(b"devices/dev-1/cmd", b"once", 2, 7);
    let mut dup = publish.clone();
    dup[0] |= 0x08;
    svc.send(&publish).await;
    assert_eq!(svc.next().await, (0x50, vec![0, 7]), "PUBREC");
    svc.send(&dup).await;
    assert_eq!(svc.next().await, (0x50, vec![0, 7]), "PUBREC again");
    svc.send(&[0x62, 0x02, 0x00, 0x07]).await;
    assert_eq!(svc.next().await, (0x70, vec![0, 7]), "PUBCOMP");
    svc.send(&[0x62, 0x02, 0x00, 0x07]).await;
    assert_eq!(svc.next().await, (0x70, vec![0, 7]), "PUBCOMP again");
    // The subscriber gets it once: its QoS 2 exchange, then nothing more.
    let (first, body) = dev.next().await;
    let (_, _, pkid, payload) = publish_of(first, &body);
    assert_eq!(payload, b"once");
    let pkid = pkid.unwrap();
    dev.send(&[0x50, 0x02, (pkid >> 8) as u8, pkid as u8]).await;
    assert_eq!(dev.next().await.0, 0x62, "PUBREL");
    dev.send(&[0x70, 0x02, (pkid >> 8) as u8, pkid as u8]).await;
    // A positive control after the duplicate: a second, different message arrives next.
    svc.send(&publish_packet(b"devices/dev-1/cmd", b"next", 0, 0))
        .await;
    let (first, body) = dev.next().await;
    assert_eq!(
        publish_of(first, &body).3,
        b"next",
        "the duplicate was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publishes_never_released_are_capped() {
    let gw = TestGateway::start_with(|c| c.mqtt.max_unreleased = 4).await;
    let (mut dev, _) = Raw::connect(&gw, "dev-1", false).await;
    for id in 1..=4u16 {
        dev.send(&publish_packet(b"devices/dev-1/presence", b"x", 2, id))
            .await;
        assert_eq!(dev.next().await, (0x50, id.to_be_bytes().to_vec()));
    }
    // A fifth id while four await PUBREL: disconnected, counted.
    let before = Metrics::get(&gw.handle.metrics().clients_closed_over_limits);
    let (_, closed) = send_and_wait_close(
        &mut dev.s,
        &publish_packet(b"devices/dev-1/presence", b"x", 2, 5),
        WAIT,
    )
    .await;
    assert!(closed, "over the cap and still connected");
    let m = gw.handle.metrics();
    eventually(WAIT, "closing counted", || {
        Metrics::get(&m.clients_closed_over_limits) > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_3_1_1_redelivery_after_reconnect_sets_dup() {
    let gw = TestGateway::start().await;
    let (mut dev, _) = Raw::connect(&gw, "dev-1", true).await;
    dev.subscribe(1, "devices/dev-1/cmd", 1).await;
    let (mut svc, _) = Raw::connect(&gw, "svc-1", false).await;
    svc.send(&publish_packet(b"devices/dev-1/cmd", b"c1", 1, 1))
        .await;
    assert_eq!(svc.next().await, (0x40, vec![0, 1]));
    let (first, body) = dev.next().await;
    let (flags, _, pkid, _) = publish_of(first, &body);
    assert_eq!(flags & 0x08, 0, "first delivery has no DUP");
    // Not acknowledged; the connection drops and comes back.
    drop(dev);
    let (mut dev, present) = Raw::connect(&gw, "dev-1", true).await;
    assert!(present, "session present");
    let (first, body) = dev.next().await;
    let (flags, _, again, payload) = publish_of(first, &body);
    assert_eq!(payload, b"c1");
    assert_eq!(again, pkid, "same packet id");
    assert_eq!(flags & 0x08, 0x08, "redelivery without DUP");
}

// ---- Retained messages ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_3_1_12_empty_non_retained_publish_keeps_the_retained_message() {
    let gw = TestGateway::start().await;
    let (mut svc, _) = Raw::connect(&gw, "svc-1", false).await;
    let topic = b"devices/dev-1/update/manifest";
    let mut retained = publish_packet(topic, b"m1", 1, 1);
    retained[0] |= 0x01;
    svc.send(&retained).await;
    assert_eq!(svc.next().await, (0x40, vec![0, 1]));
    svc.send(&publish_packet(topic, b"", 1, 2)).await;
    assert_eq!(svc.next().await, (0x40, vec![0, 2]));
    let (mut dev, _) = Raw::connect(&gw, "dev-1", false).await;
    dev.send(&subscribe_packet(
        1,
        &[("devices/dev-1/update/manifest", 1)],
    ))
    .await;
    assert_eq!(dev.next().await.0, 0x90);
    let (first, body) = dev.next().await;
    let (flags, _, _, payload) = publish_of(first, &body);
    assert_eq!(payload, b"m1", "the retained message is gone");
    assert_eq!(
        flags & 0x01,
        0x01,
        "RETAIN set for a retained message [MQTT-3.3.1-8]"
    );
}

// ---- Sessions keyed by identity ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_id_that_reads_like_a_service_instance_gets_its_own_session() {
    let mut gw = TestGateway::start().await;
    gw.pki
        .issue(
            &fleet_certs::Identity::new(fleet_certs::Role::Device, "svc-1:inst1").unwrap(),
            fleet_certs::profile::Validity::days_from_now(30),
            &fleet_certs::profile::ServerNames::default(),
        )
        .unwrap();
    // Service svc-1, instance inst1, persistent, subscribed to device status.
    let mut svc = Raw::tls(&gw, "svc-1").await;
    svc.send(&connect_with(0x00, "svc-1:inst1", &[])).await;
    assert_eq!(svc.next().await.0, 0x20);
    svc.subscribe(1, "devices/+/status", 1).await;
    drop(svc);
    // The device whose id is the same text connects with clean session 0.
    let mut dev = Raw::tls(&gw, "svc-1:inst1").await;
    dev.send(&connect_with(0x00, "svc-1:inst1", &[])).await;
    assert_eq!(
        dev.next().await,
        (0x20, vec![0, 0]),
        "the device was handed the service's session"
    );
}

// ---- Writes with a deadline ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed() {
    let gw = TestGateway::start_with(|c| c.limits.write_timeout = Duration::from_secs(1)).await;
    let (mut dev, _) = Raw::connect(&gw, "dev-1", false).await;
    dev.subscribe(1, "devices/dev-1/cmd", 0).await;
    let (mut svc, _) = Raw::connect(&gw, "svc-1", false).await;
    // The device never reads again; the service fills its socket.
    let big = vec![0x5a; 64 << 10];
    let m = gw.handle.metrics();
    // QoS 0 for its full queue is dropped, counted: the service is never held back.
    let closed = async {
        loop {
            svc.send(&publish_packet(b"devices/dev-1/cmd", &big, 0, 0))
                .await;
            if Metrics::get(&m.clients_closed_over_limits) > 0 && gw.handle.sessions() < 2 {
                return true;
            }
            tokio::task::yield_now().await;
        }
    };
    let closed = tokio::time::timeout(Duration::from_secs(60), closed)
        .await
        .unwrap_or(false);
    assert!(closed, "a client that does not read kept its connection");
    drop(dev);
}

// ---- Reload, revocation and admission ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_after_its_handshake_is_refused_at_connect() {
    let mut gw = TestGateway::start().await;
    let mut raw = Raw::tls(&gw, "dev-3").await;
    gw.pki.revoke("dev-3").unwrap();
    gw.handle.reload().unwrap();
    let (got, closed) = send_and_wait_close(&mut raw.s, &connect_packet("dev-3", 30), WAIT).await;
    assert_eq!(got, [0x20, 0x02, 0x00, 0x05], "CONNACK not authorized");
    assert!(closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_crl_the_ca_did_not_sign_keeps_the_running_configuration() {
    let mut gw = TestGateway::start().await;
    gw.pki.revoke("dev-3").unwrap();
    gw.handle.reload().unwrap();
    // A CA of the same name but another key signs a CRL that revokes nothing.
    let other_dir = tempfile::tempdir().unwrap();
    let other = make_pki(other_dir.path());
    std::fs::copy(other.crl_path(), gw.pki.crl_path()).unwrap();
    let err = gw
        .handle
        .reload()
        .expect_err("a CRL the CA did not sign was loaded");
    assert!(
        err.to_string().contains("signature does not verify"),
        "{err}"
    );
    // The running CRL still refuses dev-3 at the handshake, and lets dev-1 in.
    let mut raw = Raw::tls(&gw, "dev-3").await;
    let (got, closed) = send_and_wait_close(&mut raw.s, &connect_packet("dev-3", 30), WAIT).await;
    assert!(
        got.is_empty() && closed,
        "dev-3 got {got:?} after the refused reload"
    );
    Raw::connect(&gw, "dev-1", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_crl_is_reported_and_can_refuse_everyone() {
    let mut gw =
        TestGateway::start_with(|c| c.tls.stale_crl = fleet_broker::StaleCrl::Refuse).await;
    let m = gw.handle.metrics();
    Raw::connect(&gw, "dev-1", false).await;
    assert_eq!(Metrics::get(&m.crl_stale), 0);
    gw.pki
        .write_crl_until(time::OffsetDateTime::now_utc() - time::Duration::hours(1))
        .unwrap();
    gw.handle.reload().unwrap();
    let mut raw = Raw::tls(&gw, "dev-1").await;
    let (got, closed) = send_and_wait_close(&mut raw.s, &connect_packet("dev-1", 30), WAIT).await;
    assert_eq!(got, [0x20, 0x02, 0x00, 0x05], "accepted with a stale CRL");
    assert!(closed);
    assert_eq!(Metrics::get(&m.crl_stale), 1);
    // A fresh CRL lets clients in again.
    gw.pki.write_crl().unwrap();
    gw.handle.reload().unwrap();
    Raw::connect(&gw, "dev-1", false).await;
    assert_eq!(Metrics::get(&m.crl_stale), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_pending_connections_cannot_keep_a_device_out() {
    let gw = TestGateway::start_with(|c| {
        // Twenty authenticated sessions at most: with pending connections counted against
        // them (as before), 200 idle sockets would keep everyone out.
        c.limits.max_connections = 20;
        c.limits.max_handshakes = 20;
        c.limits.max_handshakes_per_source = 20;
        c.tls.handshake_timeout = Duration::from_secs(120);
    })
    .await;
    let m = gw.handle.metrics();
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    eventually(WAIT * 3, "200 sockets accepted", || {
        Metrics::get(&m.tcp_accepted) >= 200
    })
    .await;
    assert!(
        Metrics::get(&m.handshakes_evicted) >= 180,
        "pending connections over the budget kept their slots"
    );
    // A device gets in while the flood holds every pending slot it can.
    tokio::time::timeout(WAIT * 3, Raw::connect(&gw, "dev-1", false))
        .await
        .expect("the device was kept out");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_removes_subscriptions_the_policy_no_longer_allows() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let full = r#"
[device]
publish = ["devices/{id}/cmd/result", "devices/{id}/presence"]
subscribe = []
[service]
publish = []
subscribe = ["devices/+/cmd/result", "devices/+/presence"]
"#;
    std::fs::write(&policy, full).unwrap();
    let path = policy.clone();
    let gw = TestGateway::start_with(move |c| c.acl.policy = Some(path)).await;
    // A persistent subscriber, so its stored subscription is re-checked too.
    let (mut svc, _) = Raw::connect(&gw, "svc-1", true).await;
    svc.subscribe(1, "devices/+/cmd/result", 1).await;
    svc.subscribe(2, "devices/+/presence", 1).await;
    std::fs::write(&policy, full.replace("\"devices/+/cmd/result\", ", "")).unwrap();
    gw.handle.reload().unwrap();
    let (mut dev, _) = Raw::connect(&gw, "dev-1", false).await;
    dev.send(&publish_packet(b"devices/dev-1/cmd/result", b"r", 0, 0))
        .await;
    dev.send(&publish_packet(b"devices/dev-1/presence", b"p", 0, 0))
        .await;
    // The first thing the service gets is the presence: the result subscription is gone.
    // (Status reports would not do here: the status owner takes them before the core.)
    let (first, body) = svc.next().await;
    let (_, topic, _, _) = publish_of(first, &body);
    assert_eq!(topic, "devices/dev-1/presence");
    assert!(Metrics::get(&gw.handle.metrics().subscriptions_revoked) >= 1);
    // Resuming the session does not bring it back.
    drop(svc);
    let (mut svc, present) = Raw::connect(&gw, "svc-1", true).await;
    assert!(present);
    dev.send(&publish_packet(b"devices/dev-1/cmd/result", b"r", 0, 0))
        .await;
    dev.send(&publish_packet(b"devices/dev-1/presence", b"p2", 0, 0))
        .await;
    let (first, body) = svc.next().await;
    assert_eq!(publish_of(first, &body).1, "devices/dev-1/presence");
}

// ---- Back-pressure and caps: never a silent drop ----

/// A subscriber that does not acknowledge fills its window and its queue; from then on the
/// publisher's acknowledgements are held back (it runs into its own window) instead of its
/// messages being dropped, and they flow again as the subscriber acknowledges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_acknowledgement_waits_until_the_subscriber_has_room() {
    let gw = TestGateway::start_with(|c| {
        c.mqtt.max_inflight = 1;
        c.mqtt.queue_messages = 2;
    })
    .await;
    let (mut dev, _) = Raw::connect(&gw, "dev-1", false).await;
    dev.subscribe(1, "devices/dev-1/cmd", 1).await;
    let (mut svc, _) = Raw::connect(&gw, "svc-1", false).await;
    // The first goes out to the device (in flight, not acknowledged by it)...
    svc.send(&publish_packet(b"devices/dev-1/cmd", &[1], 1, 1))
        .await;
    assert_eq!(svc.next().await, (0x40, vec![0, 1]));
    let (first, body) = dev.next().await;
    let (_, _, pkid, payload) = publish_of(first, &body);
    assert_eq!(payload, [1]);
    // ...two more fill its queue and are acknowledged; the fourth is held.
    for id in 2..=4u16 {
        svc.send(&publish_packet(b"devices/dev-1/cmd", &[id as u8], 1, id))
            .await;
    }
    for id in 2..=3u16 {
        assert_eq!(svc.next().await, (0x40, id.to_be_bytes().to_vec()));
    }
    // The connection is still read: a ping sent after the fourth is answered first (answers
    // go out in order, so an unheld PUBACK 4 would come before it).
    svc.send(&[0xc0, 0x00]).await;
    assert_eq!(svc.next().await, (0xd0, vec![]), "PINGRESP");
    // The device acknowledges; the queue moves and the fourth is answered.
    let pkid = pkid.unwrap();
    dev.send(&[0x40, 0x02, (pkid >> 8) as u8, pkid as u8]).await;
    assert_eq!(svc.next().await, (0x40, vec![0, 4]), "held PUBACK");
    // Every message arrives, in order.
    for want in 2..=4u8 {
        let (first, body) = dev.next().await;
        let (_, _, pkid, payload) = publish_of(first, &body);
        assert_eq!(payload, [want]);
        let pkid = pkid.unwrap();
        dev.send(&[0x40, 0x02, (pkid >> 8) as u8, pkid as u8]).await;
    }
    assert_eq!(Metrics::get(&gw.handle.metrics().messages_dropped), 0);
}

/// An offline persistent session keeps at most `offline_messages`; the oldest beyond are
/// dropped, counted (the embedded router dropped them after their PUBACK, without a word).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_queue_over_its_cap_drops_the_oldest_counted() {
    let gw = TestGateway::start_with(|c| c.mqtt.offline_messages = 10).await;
    let (mut dev, _) = Raw::connect(&gw, "dev-1", true).await;
    dev.subscribe(1, "devices/dev-1/cmd", 1).await;
    drop(dev);
    eventually(WAIT, "dev-1 offline", || gw.handle.sessions() == 0).await;
    let (mut svc, _) = Raw::connect(&gw, "svc-1", false).await;
    for id in 1..=15u16 {
        svc.send(&publish_packet(b"devices/dev-1/cmd", &[id as u8], 1, id))
            .await;
        assert_eq!(svc.next().await, (0x40, id.to_be_bytes().to_vec()));
    }
    assert_eq!(Metrics::get(&gw.handle.metrics().messages_dropped), 5);
    let (mut dev, present) = Raw::connect(&gw, "dev-1", true).await;
    assert!(present);
    for want in 6..=15u8 {
        let (first, body) = dev.next().await;
        let (_, _, pkid, payload) = publish_of(first, &body);
        assert_eq!(payload, [want], "the newest are kept, in order");
        let pkid = pkid.unwrap();
        dev.send(&[0x40, 0x02, (pkid >> 8) as u8, pkid as u8]).await;
    }
}
