//! The gateway through real TLS with the generated PKI and the mosquitto command-line clients
//! as third-party devices and services.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use fleet_broker::Metrics;

/// An encoded StatusReport with sequence 1 (field 1, varint 1), as mosquitto_pub -m text.
const STATUS_SEQ_1: &str = "\u{8}\u{1}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_talks_on_its_own_topics_and_is_denied_everything_else() {
    let gw = TestGateway::start().await;

    // dev-1 subscribes to its command topic; a service command reaches it.
    let sub = gw.subscribe(
        "dev-1",
        "devices/dev-1/cmd",
        &["-C", "1", "-W", "10", "-q", "1"],
    );
    sub.subscribed().await;
    let out = gw.publish("svc-1", "devices/dev-1/cmd", "reboot", &["-q", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let got = finish(sub).await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "devices/dev-1/cmd reboot",
        "{}",
        text(&got)
    );

    // dev-1 publishes its status; a service subscribed to all statuses sees it.
    let svc = gw.subscribe("svc-1", "devices/+/status", &["-C", "1", "-W", "10"]);
    svc.subscribed().await;
    // Status payloads are StatusReports (stored before they are routed): 08 01 is sequence 1.
    let out = gw.publish("dev-1", "devices/dev-1/status", STATUS_SEQ_1, &["-q", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let got = finish(svc).await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim_end_matches('\n'),
        format!("devices/dev-1/status {STATUS_SEQ_1}")
    );

    // Each of these subscriptions is refused with SUBACK 0x80, and counted.
    let before = Metrics::get(&gw.handle.metrics().acl_denials);
    for filter in ["devices/dev-2/#", "devices/+/cmd", "+/+/cmd", "#", "$SYS/#"] {
        let sub = gw.subscribe("dev-1", filter, &["-W", "5"]);
        let got = finish(sub).await;
        assert!(
            text(&got).contains("All subscription requests were denied"),
            "{filter}: {}",
            text(&got)
        );
    }
    assert_eq!(Metrics::get(&gw.handle.metrics().acl_denials) - before, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_to_another_device_never_reach_it() {
    let gw = TestGateway::start().await;
    // dev-2 listens on everything it may read.
    // Each stops at its first message (-C 1): the forgeries are sent, and acknowledged, before
    // the legitimate message below, so a forgery that got through would be that first one.
    let victim = gw.subscribe(
        "dev-2",
        "devices/dev-2/cmd",
        &["-C", "1", "-W", "60", "-q", "1"],
    );
    let victim_updates = gw.subscribe(
        "dev-3",
        "devices/dev-3/update/manifest",
        &["-C", "1", "-W", "60"],
    );
    let svc = gw.subscribe("svc-2", "devices/+/status", &["-C", "1", "-W", "60"]);
    for s in [&victim, &victim_updates, &svc] {
        s.subscribed().await;
    }
    // dev-1 tries to command dev-2, forge dev-2's status and push dev-3 a manifest, at QoS 0
    // and 1 (both acknowledged and dropped: the default policy drops denied publishes).
    for (topic, qos) in [
        ("devices/dev-2/cmd", "1"),
        ("devices/dev-2/cmd", "0"),
        ("devices/dev-2/status", "1"),
        ("devices/dev-3/update/manifest", "1"),
    ] {
        let out = gw.publish("dev-1", topic, "forged", &["-q", qos]);
        assert!(out.status.success(), "{topic}: {}", text(&out));
    }
    // A legitimate message to each, so an empty result cannot come from a dead subscriber.
    assert!(gw
        .publish("svc-1", "devices/dev-2/cmd", "real", &["-q", "1"])
        .status
        .success());
    assert!(gw
        .publish("svc-1", "devices/dev-3/update/manifest", "real", &[])
        .status
        .success());
    assert!(gw
        .publish("dev-2", "devices/dev-2/status", STATUS_SEQ_1, &[])
        .status
        .success());
    for (child, want) in [
        (victim, "devices/dev-2/cmd real"),
        (victim_updates, "devices/dev-3/update/manifest real"),
        (svc, "devices/dev-2/status \u{8}\u{1}"),
    ] {
        let got = finish(child).await;
        assert_eq!(
            String::from_utf8_lossy(&got.stdout).trim(),
            want,
            "{}",
            text(&got)
        );
    }
    assert!(Metrics::get(&gw.handle.metrics().acl_denials) >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_must_be_the_certificates() {
    let gw = TestGateway::start().await;
    let (cert, key) = gw.cert("dev-1");
    let mut c = std::process::Command::new(tool("mosquitto_pub"));
    c.args(gw.mosq_args_with(&cert, &key, "dev-2"))
        .args(["-t", "devices/dev-2/status", "-m", "x"]);
    let out = run_output(c);
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("identifier rejected"),
        "{}",
        text(&out)
    );
    // An empty client id is given the certificate's id (mosquitto_pub sends none with -i "").
    let mut c = std::process::Command::new(tool("mosquitto_pub"));
    let mut args = gw.mosq_args_with(&cert, &key, "x");
    let at = args.iter().position(|a| a == "-i").unwrap_or(0);
    args.drain(at..at + 2);
    c.args(args)
        .args(["-t", "devices/dev-1/status", "-m", STATUS_SEQ_1, "-q", "1"]);
    let svc = gw.subscribe("svc-2", "devices/+/status", &["-C", "1", "-W", "8"]);
    svc.subscribed().await;
    let out = run_output(c);
    assert!(out.status.success(), "{}", text(&out));
    let got = finish(svc).await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        format!("devices/dev-1/status {STATUS_SEQ_1}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_are_refused_at_the_handshake() {
    let mut gw = TestGateway::start().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = make_pki(other_dir.path());
    // Expired device certificate from the right CA.
    let now = time::OffsetDateTime::now_utc();
    let past = fleet_certs::profile::Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    gw.pki
        .issue(
            &fleet_certs::Identity::new(fleet_certs::Role::Device, "dev-old").unwrap(),
            past,
            &Default::default(),
        )
        .unwrap();
    // Revoked: dev-3, then the gateway reloads the CRL.
    gw.pki.revoke("dev-3").unwrap();
    gw.handle.reload().unwrap();

    let metrics = gw.handle.metrics();
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("another CA", {
            let e = other.entry("dev-1").unwrap();
            gw.mosq_args_with(&other.cert_path(e), &other.key_path(e), "dev-1")
        }),
        ("expired", gw.mosq_args("dev-old")),
        ("revoked", gw.mosq_args("dev-3")),
        ("no certificate", {
            let mut a = gw.mosq_args("dev-1");
            for flag in ["--cert", "--key"] {
                let at = a.iter().position(|x| x == flag).unwrap();
                a.drain(at..at + 2);
            }
            a
        }),
    ];
    for (what, args) in cases {
        let before = Metrics::get(&metrics.handshake_failures);
        let mut c = std::process::Command::new(tool("mosquitto_pub"));
        c.args(args).args(["-t", "devices/dev-1/status", "-m", "x"]);
        let out = run_output(c);
        assert!(!out.status.success(), "{what}: accepted: {}", text(&out));
        let m = metrics.clone();
        eventually(Duration::from_secs(5), what, || {
            Metrics::get(&m.handshake_failures) > before
        })
        .await;
    }
    // The good certificate still works.
    assert!(gw
        .publish("dev-1", "devices/dev-1/status", "fine", &["-q", "1"])
        .status
        .success());
    gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_follow_the_acl() {
    let gw = TestGateway::start().await;
    let watcher = gw.subscribe("svc-1", "devices/+/presence", &["-C", "1", "-W", "10"]);
    let wide = gw.subscribe("svc-2", "devices/+/status", &["-C", "1", "-W", "60"]);
    watcher.subscribed().await;
    wide.subscribed().await;

    // A will on a foreign topic: the CONNECT is refused (not authorized), so it can never fire.
    let mut c = std::process::Command::new(tool("mosquitto_sub"));
    c.args(gw.mosq_args("dev-1")).args([
        "-t",
        "devices/dev-1/cmd",
        "-W",
        "3",
        "--will-topic",
        "devices/dev-2/status",
        "--will-payload",
        "forged-will",
    ]);
    let out = run_output(c);
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("not authorised")
            || text(&out).to_lowercase().contains("not authorized"),
        "{}",
        text(&out)
    );

    // A will on its own presence topic fires when the device is killed.
    let mut c = std::process::Command::new(tool("mosquitto_sub"));
    c.args(gw.mosq_args("dev-1")).args([
        "-t",
        "devices/dev-1/cmd",
        "--will-topic",
        "devices/dev-1/presence",
        "--will-payload",
        "lost",
    ]);
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut device = c.spawn().unwrap();
    gw.wait_sessions(3).await;
    device.kill().unwrap();
    let _ = device.wait();
    let got = finish(watcher).await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "devices/dev-1/presence lost"
    );
    // The refused connection ended before the presence will fired, and wills go out in order:
    // had the forged will been published, it would arrive before this control status.
    let out = gw.publish("dev-2", "devices/dev-2/status", STATUS_SEQ_1, &["-q", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let got = finish(wide).await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim_end_matches('\n'),
        format!("devices/dev-2/status {STATUS_SEQ_1}"),
        "{}",
        text(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_gets_its_command_on_reconnect() {
    let gw = TestGateway::start().await;
    // dev-1 subscribes with a persistent session (-c) at QoS 1, then goes away.
    gw.persistent_session("dev-1", "devices/dev-1/cmd").await;
    // While it is offline, the service commands it.
    let out = gw.publish(
        "svc-1",
        "devices/dev-1/cmd",
        "while-you-were-away",
        &["-q", "1"],
    );
    assert!(out.status.success(), "{}", text(&out));
    // At reconnect the queued command arrives.
    let sub = gw.subscribe(
        "dev-1",
        "devices/dev-1/cmd",
        &["-c", "-q", "1", "-C", "1", "-W", "10"],
    );
    let got = finish(sub).await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "devices/dev-1/cmd while-you-were-away",
        "{}",
        text(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_of_an_identity_replaces_the_first() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start().await;
    let mut first = raw_tls(&gw, "dev-1").await;
    first.write_all(&connect_packet("dev-1", 30)).await.unwrap();
    assert_eq!(read_n(&mut first, 4).await, [0x20, 0x02, 0x00, 0x00]);
    let mut second = raw_tls(&gw, "dev-1").await;
    second
        .write_all(&connect_packet("dev-1", 30))
        .await
        .unwrap();
    assert_eq!(read_n(&mut second, 4).await, [0x20, 0x02, 0x00, 0x00]);
    // The first is closed by the gateway; the second works.
    let (_, closed) = send_and_wait_close(&mut first, &[], Duration::from_secs(5)).await;
    assert!(closed, "first connection not closed");
    second.write_all(&[0xc0, 0x00]).await.unwrap();
    assert_eq!(read_n(&mut second, 2).await, [0xd0, 0x00]);
    assert_eq!(gw.handle.sessions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_and_retained_messages() {
    let gw = TestGateway::start().await;
    // QoS 2 end to end.
    let sub = gw.subscribe(
        "dev-1",
        "devices/dev-1/cmd",
        &["-q", "2", "-C", "1", "-W", "10"],
    );
    sub.subscribed().await;
    let out = gw.publish("svc-1", "devices/dev-1/cmd", "exactly-once", &["-q", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    let got = finish(sub).await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "devices/dev-1/cmd exactly-once"
    );

    // A retained manifest reaches a device that subscribes later.
    let out = gw.publish(
        "svc-1",
        "devices/dev-2/update/manifest",
        "manifest-v2",
        &["-q", "1", "-r"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let sub = gw.subscribe(
        "dev-2",
        "devices/dev-2/update/manifest",
        &["-C", "1", "-W", "10"],
    );
    let got = finish(sub).await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "devices/dev-2/update/manifest manifest-v2"
    );

    // A denied retained publish leaves nothing behind for the victim. A retained message is
    // sent right after the SUBACK, before anything published later; so once the subscription
    // is acknowledged, a live control message must be the first (and only) thing to arrive.
    let out = gw.publish(
        "dev-1",
        "devices/dev-3/update/manifest",
        "forged",
        &["-q", "1", "-r"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let sub = gw.subscribe(
        "dev-3",
        "devices/dev-3/update/manifest",
        &["-C", "1", "-W", "60"],
    );
    sub.subscribed().await;
    let out = gw.publish("svc-1", "devices/dev-3/update/manifest", "control", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let got = finish(sub).await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "devices/dev-3/update/manifest control",
        "{}",
        text(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_arrives_complete_and_in_order() {
    use std::io::Write;
    let gw = TestGateway::start().await;
    // dev-1 has a persistent session and goes offline.
    gw.persistent_session("dev-1", "devices/dev-1/cmd").await;
    // 300 QoS 1 commands queue up for it (mosquitto_pub -l publishes each stdin line).
    let mut c = std::process::Command::new(tool("mosquitto_pub"));
    c.args(gw.mosq_args("svc-1"))
        .args(["-t", "devices/dev-1/cmd", "-q", "1", "-l"]);
    c.stdin(std::process::Stdio::piped());
    let mut publisher = c.spawn().unwrap();
    {
        let mut stdin = publisher.stdin.take().unwrap();
        for i in 0..300 {
            writeln!(stdin, "cmd-{i:03}").unwrap();
        }
    }
    assert!(publisher.wait().unwrap().success());
    // At reconnect the router hands the whole backlog over at once (100 in flight): every
    // message must reach the device, in order.
    let got = finish(gw.subscribe(
        "dev-1",
        "devices/dev-1/cmd",
        &["-c", "-q", "1", "-C", "300", "-W", "20"],
    ))
    .await;
    let lines: Vec<String> = String::from_utf8_lossy(&got.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let want: Vec<String> = (0..300)
        .map(|i| format!("devices/dev-1/cmd cmd-{i:03}"))
        .collect();
    assert_eq!(
        lines.len(),
        300,
        "{} of 300 arrived: {}",
        lines.len(),
        text(&got)
    );
    assert_eq!(lines, want);
}
