//! Commands and status end to end, with real processes: the `gateway` binary, `test-device`
//! devices on the device library, the SDK (and `fleetctl`) with a service certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use cloud_client::{CommandState, SendCommand};
use fleet_testkit::{eventually, eventually_async, Proc};
use fleet_tests::procs::{bin, DeviceOpts, DeviceProc, GatewayProc};
use fleet_tests::proxy::{Relay, Target};

/// How long one fleetctl run may take.
const FLEETCTL: Duration = Duration::from_secs(60);

fn send(device: &str, name: &str, ttl_ms: u64) -> SendCommand {
    SendCommand {
        device_ids: vec![device.into()],
        name: name.into(),
        payload: b"p".to_vec(),
        ttl_ms,
        ..SendCommand::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_to_an_online_device_returns_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 2, &[]);
    let opts = DeviceOpts::new(dir.path(), "dev-0001");
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    let fleet = gw.fleet().await;
    dev.connected(Duration::from_secs(20)).await;
    // The device is online once the gateway has seen it subscribe; a command sent now is
    // delivered at once.
    let handle = fleet
        .send_command(send("dev-0001", "ping", 0))
        .await
        .unwrap();
    let recs = handle.wait(Duration::from_secs(30)).await.unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].state(), CommandState::Succeeded);
    let result = recs[0].result.as_ref().unwrap();
    assert_eq!(result.output, b"ok:ping:p");
    assert_eq!(recs[0].issued_by, "svc-0001");
    assert_eq!(opts.ran(), vec![recs[0].command_id.clone()]);

    // A failing command reports FAILED with the device's message; an unknown device id is
    // accepted (it may come later) and a bad one refused.
    let recs = fleet
        .send_command(send("dev-0001", "fail", 0))
        .await
        .unwrap()
        .wait(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(recs[0].state(), CommandState::Failed);
    assert_eq!(recs[0].result.as_ref().unwrap().message, "asked to fail");
    let err = fleet.send_command(send("a/b", "x", 0)).await.err().unwrap();
    assert!(err.to_string().contains("device id"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_to_an_offline_device_runs_exactly_once_when_it_connects() {
    let dir = tempfile::tempdir().unwrap();
    // Re-delivery after 1 s instead of 30 s, so the test sees several within its time.
    let gw = GatewayProc::start(
        dir.path(),
        2,
        &[("GATEWAY__COMMANDS__REDELIVER_AFTER", "1s")],
    );
    let fleet = gw.fleet().await;
    let handle = fleet
        .send_command(send("dev-0002", "ping", 60_000))
        .await
        .unwrap();
    // Stored while the device is offline, and handed to nobody.
    assert_eq!(handle.records()[0].state(), CommandState::Pending);
    assert_eq!(gw.metric("commands_delivered_total"), 0.0);
    let id = handle.command_id().to_owned();

    // The device connects, runs it, and keeps its result to itself: the gateway hands the
    // command over again every second. Each re-delivery is answered from the device's journal
    // without running the command again.
    let mut opts = DeviceOpts::new(dir.path(), "dev-0002");
    opts.hold_results = true;
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    eventually(Duration::from_secs(30), "two re-deliveries", || {
        gw.metric("commands_delivered_total") >= 3.0
    })
    .await;
    assert_eq!(
        opts.ran(),
        vec![id.clone()],
        "run once, delivered three times"
    );

    // Back with its results: the command completes, still run once.
    dev.kill();
    opts.hold_results = false;
    let _dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    let recs = handle.wait(Duration::from_secs(30)).await.unwrap();
    assert_eq!(recs[0].state(), CommandState::Succeeded);
    assert!(recs[0].attempts >= 3, "{:?}", recs[0]);
    assert_eq!(opts.ran(), vec![id]);
}

/// The gateway re-delivers a command the application is still running (here every second;
/// also at every reconnect). The device neither runs it again nor answers it early: the
/// application's later answer is accepted and is what the service sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_redelivered_while_it_runs_gets_the_applications_result() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(
        dir.path(),
        1,
        &[("GATEWAY__COMMANDS__REDELIVER_AFTER", "1s")],
    );
    // The device library in this process, so the test decides when the command finishes.
    let pki = gw.pki();
    let (client, mut commands) = device_client::DeviceClient::builder()
        .gateway("localhost", gw.addr.port())
        .pem_files(
            pki.join("ca.crt"),
            pki.join("devices/dev-0001.crt"),
            pki.join("devices/dev-0001.key"),
        )
        .state_dir(dir.path().join("dev-0001-state"))
        .trust_root_file(pki.join("trust/root.bin"))
        .backoff(Duration::from_millis(100), Duration::from_millis(500))
        .start()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), client.wait_connected())
        .await
        .expect("connected within 20 s")
        .unwrap();
    let fleet = gw.fleet().await;
    let handle = fleet
        .send_command(send("dev-0001", "slow", 120_000))
        .await
        .unwrap();
    let id = handle.command_id().to_owned();
    let running = tokio::time::timeout(Duration::from_secs(30), commands.next())
        .await
        .expect("the command arrives within 30 s")
        .unwrap();
    assert_eq!(running.command().command_id, id);

    // Held while the gateway hands it over again.
    eventually_async(
        Duration::from_secs(30),
        "the gateway re-delivers the running command",
        async || {
            let recs = fleet.get_command(&id, None).await.unwrap();
            (recs[0].attempts >= 2).then_some(())
        },
    )
    .await;
    // A command sent now reaches the application after the device has handled every
    // delivery before it, the re-delivery included.
    let control = fleet
        .send_command(send("dev-0001", "control", 120_000))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(30), commands.next())
        .await
        .expect("the control arrives within 30 s")
        .unwrap();
    assert_eq!(
        next.command().command_id,
        control.command_id(),
        "the running command was handed out again"
    );
    let recs = fleet.get_command(&id, None).await.unwrap();
    assert_eq!(
        recs[0].state(),
        CommandState::Delivered,
        "answered before it finished: {:?}",
        recs[0]
    );

    // The application finishes: its answer is accepted, and it is the command's result.
    running.succeed(b"done late".to_vec()).await.unwrap();
    next.succeed(b"control".to_vec()).await.unwrap();
    let recs = handle.wait(Duration::from_secs(30)).await.unwrap();
    assert_eq!(recs[0].state(), CommandState::Succeeded, "{:?}", recs[0]);
    assert_eq!(recs[0].result.as_ref().unwrap().output, b"done late");
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_command_survives_a_gateway_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let id = {
        let fleet = gw.fleet().await;
        let handle = fleet
            .send_command(send("dev-0001", "ping", 120_000))
            .await
            .unwrap();
        handle.command_id().to_owned()
    };
    gw.kill();
    // The device comes only after the restart, so the new gateway may have any port.
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let opts = DeviceOpts::new(dir.path(), "dev-0001");
    let _dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    let fleet = gw.fleet().await;
    eventually_async(
        Duration::from_secs(30),
        "the command succeeds after the restart",
        async || {
            let recs = fleet.get_command(&id, None).await.unwrap();
            (recs[0].state() == CommandState::Succeeded).then_some(())
        },
    )
    .await;
    assert_eq!(opts.ran(), vec![id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_killed_before_its_result_left_does_not_run_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let fleet = gw.fleet().await;
    let mut opts = DeviceOpts::new(dir.path(), "dev-0001");
    opts.hold_results = true;
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    dev.connected(Duration::from_secs(20)).await;
    let handle = fleet
        .send_command(send("dev-0001", "ping", 120_000))
        .await
        .unwrap();
    let id = handle.command_id().to_owned();
    // It ran, and its result is in the journal, but it never left the device.
    let answered = format!("answered {id}");
    eventually(Duration::from_secs(20), &answered, || {
        dev.printed(&answered)
    })
    .await;
    assert_eq!(opts.ran().len(), 1);
    dev.kill();
    opts.hold_results = false;
    let _dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    let recs = handle.wait(Duration::from_secs(30)).await.unwrap();
    assert_eq!(recs[0].state(), CommandState::Succeeded);
    assert_eq!(recs[0].result.as_ref().unwrap().output, b"ok:ping:p");
    assert!(recs[0].attempts >= 2, "delivered again after the restart");
    assert_eq!(opts.ran(), vec![id], "run once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_device_cannot_collect_commands_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(
        dir.path(),
        1,
        &[("GATEWAY__COMMANDS__MAX_OPEN_PER_DEVICE", "2")],
    );
    let fleet = gw.fleet().await;
    for _ in 0..2 {
        fleet
            .send_command(send("dev-0001", "x", 60_000))
            .await
            .unwrap();
    }
    let err = fleet
        .send_command(send("dev-0001", "x", 60_000))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            cloud_client::SdkError::Api {
                code: cloud_client::ApiErrorCode::Limit,
                ..
            }
        ),
        "{err}"
    );
    // Other devices are not affected.
    fleet
        .send_command(send("dev-0002", "x", 60_000))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_command_is_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let fleet = gw.fleet().await;
    let handle = fleet
        .send_command(send("dev-0001", "ping", 2_000))
        .await
        .unwrap();
    let id = handle.command_id().to_owned();
    let recs = handle.wait(Duration::from_secs(10)).await.unwrap();
    assert_eq!(recs[0].state(), CommandState::Expired);
    let opts = DeviceOpts::new(dir.path(), "dev-0001");
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    dev.connected(Duration::from_secs(20)).await;
    // Positive control: a command sent now is delivered and run. Open commands are handed
    // over when the device subscribes, before this one, and the device runs them in order:
    // had the expired one been delivered, it would be in the log before the control.
    let control = fleet
        .send_command(send("dev-0001", "ping", 60_000))
        .await
        .unwrap();
    let control_id = control.command_id().to_owned();
    let recs = control.wait(Duration::from_secs(30)).await.unwrap();
    assert_eq!(recs[0].state(), CommandState::Succeeded);
    assert_eq!(opts.ran(), vec![control_id], "only the control ran");
    let recs = fleet.get_command(&id, None).await.unwrap();
    assert_eq!(recs[0].state(), CommandState::Expired);
    assert_eq!(recs[0].attempts, 0, "never delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_made_while_the_gateway_is_down_all_arrive_once_in_order_and_stay() {
    let dir = tempfile::tempdir().unwrap();
    // The device needs one address for a gateway that is down, then up, then restarted: a
    // relay holds it for the whole test (see `Relay`); each gateway binds its own port 0.
    let relay = Relay::start(None).unwrap();
    // The PKI comes from the gateway's first start.
    drop(GatewayProc::start(dir.path(), 1, &[]));
    let pki = dir.path().join("data/pki");
    let mut opts = DeviceOpts::new(dir.path(), "dev-0001");
    opts.reports = 500;
    opts.exit_after_flush = true;
    let dev = DeviceProc::start(&format!("127.0.0.1:{}", relay.addr.port()), &pki, &opts);
    // It has tried the gateway and found nothing; its 500 reports are queued (its ready line).
    eventually(
        Duration::from_secs(20),
        "the device tries to connect",
        || relay.refused() >= 1,
    )
    .await;
    assert!(!dev.printed("connected"));
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    relay.point_to(Some(Target::Tcp(gw.addr)));
    let status = tokio::task::spawn_blocking(move || dev.wait_exit(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(
        status.success(),
        "the device did not flush its outbox: {status}"
    );
    // Every report the device saw acknowledged is on disk: kill the gateway the moment the
    // device is done, and ask the restarted one.
    gw.kill();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let fleet = gw.fleet().await;
    let st = fleet.status(&["dev-0001".into()]).await.unwrap();
    let s = &st[0];
    // Stored only when newer than the last: 500 stored means all 500, each once, in order.
    assert_eq!(s.reports_stored, 500);
    let last = s.last_report.as_ref().unwrap();
    assert_eq!(last.sequence, 500);
    assert_eq!(last.metrics.get("i"), Some(&499.0));
}

/// Runs `fleetctl` against `gw` with `args`; returns (exit code, stdout).
fn fleetctl(gw: &GatewayProc, args: &[&str]) -> (i32, String) {
    let out = gw.fleetctl(args, FLEETCTL);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_sends_commands_and_shows_status() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 2, &[]);
    let opts = DeviceOpts::new(dir.path(), "dev-0001");
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    dev.connected(Duration::from_secs(20)).await;
    let (code, out) = tokio::task::block_in_place(|| {
        fleetctl(
            &gw,
            &[
                "command",
                "send",
                "-d",
                "dev-0001",
                "--name",
                "blink",
                "--payload",
                "3",
                "--json",
            ],
        )
    });
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["device_id"], "dev-0001");
    assert_eq!(v[0]["state"], "succeeded");
    assert_eq!(v[0]["result_output"], "ok:blink:3");

    // Events: one JSON object per line, as the command moves.
    let mut cmd = Command::new(bin("fleetctl"));
    cmd.arg("--gateway")
        .arg(format!("localhost:{}", gw.addr.port()))
        .arg("--pki")
        .arg(gw.pki())
        .args(["events", "--json", "-d", "dev-0001", "--count", "3"]);
    let watcher = Proc::spawn(cmd);
    // It says when it is subscribed (on stderr, to the operator; fleetctl has no ready line);
    // the command starts moving only then.
    eventually(Duration::from_secs(20), "fleetctl events watches", || {
        watcher
            .stderr()
            .iter()
            .any(|l| l.contains("watching command events"))
    })
    .await;
    let (code, _) = fleetctl(
        &gw,
        &["command", "send", "-d", "dev-0001", "--name", "ping"],
    );
    assert_eq!(code, 0);
    let out = tokio::task::spawn_blocking(move || watcher.finish(FLEETCTL))
        .await
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout).into_owned();
    let states: Vec<String> = got
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["state"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(states, ["pending", "delivered", "succeeded"], "{got}");

    // Status: the device's presence (ONLINE, its class) is in the registry.
    eventually(
        Duration::from_secs(10),
        "fleetctl status shows dev-0001 online",
        || {
            let (_, out) = fleetctl(&gw, &["status", "--json"]);
            serde_json::from_str::<serde_json::Value>(&out)
                .map(|v| v[0]["presence"] == "online" && v[0]["connected"] == true)
                .unwrap_or(false)
        },
    )
    .await;
    let (code, out) = fleetctl(&gw, &["status", "--json", "dev-0001"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["device_class"], "test-class");

    // A command to an offline device that expires: exit code 1, state expired.
    let (code, out) = fleetctl(
        &gw,
        &[
            "command", "send", "-d", "dev-0002", "--name", "x", "--ttl", "1s", "--json",
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("\"expired\""), "{out}");
    // Usage errors and an unreachable gateway have their own codes.
    let (code, _) = fleetctl(&gw, &["command", "send", "--name", "x"]);
    assert_eq!(code, 2);
    let mut cmd = Command::new(bin("fleetctl"));
    cmd.args([
        "--gateway",
        "localhost:1",
        "--request-timeout",
        "1s",
        "status",
    ])
    .arg("--pki")
    .arg(gw.pki());
    let out = fleet_testkit::run(cmd, FLEETCTL);
    assert_eq!(out.status.code(), Some(3));
}
