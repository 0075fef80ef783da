//! Hostile clients: idle sockets that never handshake, malformed and abusive MQTT on an
//! authenticated connection. Each offender is cut off with a log line; nobody else notices;
//! nothing panics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use fleet_broker::Metrics;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default(info);
    }));
}

/// A device connects (TLS + CONNECT + CONNACK accepted), bounded by `within` so that a gateway
/// that stopped serving fails the test instead of hanging it.
async fn device_connects(gw: &TestGateway, id: &str, within: Duration) {
    let connect = async {
        let mut s = raw_tls(gw, id).await;
        s.write_all(&connect_packet(id, 30)).await.unwrap();
        read_n(&mut s, 4).await
    };
    let connack = tokio::time::timeout(within, connect)
        .await
        .unwrap_or_else(|_| panic!("{id} could not connect within {within:?}"));
    assert_eq!(
        connack,
        [0x20, 0x02, 0x00, 0x00],
        "CONNACK accepted expected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_do_not_block_devices() {
    count_panics();
    // Idle sockets are given 60 s to start their handshake: far longer than the device below
    // may take, so it cannot get in by waiting for them to time out.
    let gw = TestGateway::start_with(|c| c.tls.handshake_timeout = Duration::from_secs(60)).await;
    let m = gw.handle.metrics();
    // 200 TCP connections that never send a ClientHello.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    let accepted = m.clone();
    eventually(Duration::from_secs(30), "200 idle sockets accepted", || {
        Metrics::get(&accepted.tcp_accepted) >= 200
    })
    .await;
    // A device still gets in while every one of them is pending: handshakes run in
    // per-connection tasks, not in the accept loop. (Positive evidence, not a stopwatch: no
    // idle socket has been given up on yet.)
    device_connects(&gw, "dev-1", Duration::from_secs(30)).await;
    assert_eq!(
        Metrics::get(&m.handshake_failures),
        0,
        "the device got in only after idle handshakes were given up on"
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handshakes_time_out() {
    let gw =
        TestGateway::start_with(|c| c.tls.handshake_timeout = Duration::from_millis(300)).await;
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    let m = gw.handle.metrics();
    eventually(Duration::from_secs(5), "handshake timeout counted", || {
        Metrics::get(&m.handshake_failures) >= 1
    })
    .await;
    // The gateway closed the socket.
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
    )
    .await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "socket still open: {n:?}"
    );
}

/// Every way a connection can be refused after the handshake is counted.
fn counted(m: &Metrics) -> u64 {
    Metrics::get(&m.protocol_errors) + Metrics::get(&m.connects_refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_the_offender() {
    count_panics();
    // A short connect timeout so that the truncated CONNECT is cut off by it.
    let gw = TestGateway::start_with(|c| {
        c.limits.max_packet_size = 64 * 1024;
        c.limits.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let connect = connect_packet("dev-1", 30);
    let big = vec![b'x'; 70 * 1024];
    // (name, bytes sent after the TLS handshake, whether a CONNECT goes first)
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "random bytes",
            (0..200u32).map(|i| (i * 7919 % 251) as u8).collect(),
            false,
        ),
        ("reserved packet type 0", vec![0x00, 0x02, 0, 0], false),
        ("packet type 15", vec![0xf0, 0x02, 0, 0], false),
        (
            "remaining length encoding over 4 bytes",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
            true,
        ),
        (
            "remaining length over the maximum",
            vec![0x30, 0x80, 0x80, 0x80, 0x01],
            true,
        ),
        (
            "PUBLISH before CONNECT",
            publish_packet(b"devices/dev-1/status", b"x", 0, 0),
            false,
        ),
        ("second CONNECT", connect.clone(), true),
        (
            "wildcard + in publish topic",
            publish_packet(b"devices/dev-1/+", b"x", 0, 0),
            true,
        ),
        (
            "wildcard # in publish topic",
            publish_packet(b"devices/#", b"x", 1, 7),
            true,
        ),
        (
            "NUL in publish topic",
            publish_packet(b"devices/dev-1/status\0", b"x", 0, 0),
            true,
        ),
        ("empty topic", publish_packet(b"", b"x", 0, 0), true),
        (
            "non-UTF-8 topic",
            publish_packet(b"devices/\xff\xfe/status", b"x", 0, 0),
            true,
        ),
        (
            "oversize payload",
            publish_packet(b"devices/dev-1/status", &big, 1, 9),
            true,
        ),
        (
            "QoS 3 publish",
            {
                let mut p = publish_packet(b"devices/dev-1/status", b"x", 1, 3);
                p[0] |= 0b110;
                p
            },
            true,
        ),
        (
            "packet id zero at QoS 1",
            publish_packet(b"devices/dev-1/status", b"x", 1, 0),
            true,
        ),
        (
            "SUBSCRIBE with malformed filter",
            subscribe_packet(1, &[("devices/dev-1/#/x", 0)]),
            true,
        ),
        ("CONNACK from a client", vec![0x20, 0x02, 0, 0], true),
        (
            "truncated CONNECT",
            connect[..connect.len() - 3]
                .iter()
                .copied()
                .chain([0x10, 0x00])
                .collect(),
            false,
        ),
    ];
    let metrics = gw.handle.metrics();
    for (name, bytes, after_connect) in cases {
        let before = counted(&metrics);
        let mut s = raw_tls(&gw, "dev-1").await;
        if after_connect {
            s.write_all(&connect).await.unwrap();
            assert_eq!(
                read_n(&mut s, 4).await,
                [0x20, 0x02, 0x00, 0x00],
                "{name}: CONNACK"
            );
        }
        let (_, closed) = send_and_wait_close(&mut s, &bytes, Duration::from_secs(5)).await;
        assert!(closed, "{name}: connection left open");
        let m = metrics.clone();
        // Every case is logged and counted.
        eventually(Duration::from_secs(3), name, || counted(&m) > before).await;
        // Another client is still served.
        device_connects(&gw, "dev-2", Duration::from_secs(30)).await;
    }
    // And a third-party client, end to end.
    let out = gw.publish("dev-3", "devices/dev-3/status", "still-here", &["-q", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_enforced() {
    let gw = TestGateway::start().await;
    let mut s = raw_tls(&gw, "dev-1").await;
    // Timed from before the CONNECT leaves: the gateway's clock starts later than this one, so
    // a close is never "early" by this measure, however slow the machine.
    let start = Instant::now();
    s.write_all(&connect_packet("dev-1", 1)).await.unwrap();
    assert_eq!(read_n(&mut s, 4).await, [0x20, 0x02, 0x00, 0x00]);
    // Silent after a 1 s keep-alive: the gateway closes the connection, not before 1.5 s.
    let (_, closed) = send_and_wait_close(&mut s, &[], Duration::from_secs(30)).await;
    assert!(closed, "connection not closed after keep-alive");
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "closed before 1.5 x keep-alive: {:?}",
        start.elapsed()
    );
    // A client that pings keeps its connection: 3 s keep-alive (closed after 4.5 s of
    // silence), pings every 250 ms for longer than that. Only a stall of over 4 s between two
    // pings could close it.
    let mut s = raw_tls(&gw, "dev-2").await;
    s.write_all(&connect_packet("dev-2", 3)).await.unwrap();
    assert_eq!(read_n(&mut s, 4).await, [0x20, 0x02, 0x00, 0x00]);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(&[0xc0, 0x00]).await.unwrap();
        assert_eq!(read_n(&mut s, 2).await, [0xd0, 0x00], "PINGRESP");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_publish_can_disconnect_instead_of_dropping() {
    let gw = TestGateway::start_with(|c| {
        c.acl.on_denied_publish = fleet_broker::DeniedPublish::Disconnect
    })
    .await;
    let mut s = raw_tls(&gw, "dev-1").await;
    s.write_all(&connect_packet("dev-1", 30)).await.unwrap();
    assert_eq!(read_n(&mut s, 4).await, [0x20, 0x02, 0x00, 0x00]);
    // Its own status is fine (QoS 1: PUBACK comes back)...
    s.write_all(&publish_packet(b"devices/dev-1/status", b"ok", 1, 1))
        .await
        .unwrap();
    assert_eq!(read_n(&mut s, 4).await, [0x40, 0x02, 0x00, 0x01]);
    // ...another device's command closes the connection, counted as a denial.
    let before = Metrics::get(&gw.handle.metrics().acl_denials);
    let (got, closed) = send_and_wait_close(
        &mut s,
        &publish_packet(b"devices/dev-2/cmd", b"x", 1, 2),
        Duration::from_secs(5),
    )
    .await;
    assert!(closed, "connection left open");
    assert!(
        got.is_empty(),
        "the denied publish was acknowledged: {got:?}"
    );
    assert_eq!(Metrics::get(&gw.handle.metrics().acl_denials), before + 1);
}
