//! Fleet-wide operations from the cloud: two gateway processes on one fleet PKI, bridged to
//! one cloud broker, test-devices behind each, and the SDK on ONE connection to the cloud
//! broker listing the gateways, reading every device's status and commanding a class across
//! both gateways.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cloud_client::{CommandState, FleetClient, GatewayPresence, SendCommand};
use fleet_testkit::eventually_async;
use fleet_tests::fleet::{CloudBroker, FleetGateway, FleetPki};

fn presence(gw: &str, online: bool, devices: u32) -> GatewayPresence {
    GatewayPresence {
        gateway_id: gw.into(),
        online,
        version: "test".into(),
        devices_known: devices,
        devices_online: devices,
        ..GatewayPresence::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cloud_connection_lists_reads_and_commands_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let pki = FleetPki::init(&dir.path().join("pki"), 3, 4);
    let cloud = CloudBroker::mosquitto(dir.path(), &pki);
    let up = cloud.addresses();
    let gw1 = FleetGateway::start(
        dir.path(),
        &pki,
        1,
        &up,
        &[("dev-0001", "pump"), ("dev-0002", "valve")],
    )
    .await;
    let gw2 = FleetGateway::start(
        dir.path(),
        &pki,
        2,
        &up,
        &[("dev-0003", "pump"), ("dev-0004", "pump")],
    )
    .await;
    // Presence as the gateways' bridges publish it (retained). gw-0003 says it is online but
    // no such process runs: it must be reported as not answering, not fail the fleet calls.
    cloud.publish_presence(&pki, "gw-0001", &presence("gw-0001", true, 2));
    cloud.publish_presence(&pki, "gw-0002", &presence("gw-0002", true, 2));
    cloud.publish_presence(&pki, "gw-0003", &presence("gw-0003", true, 0));

    let fleet: FleetClient = pki
        .sdk("localhost", cloud.port())
        .fleet()
        .request_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let gateways = fleet.gateways().await.unwrap();
    let ids: Vec<_> = gateways
        .iter()
        .map(|p| (p.gateway_id.as_str(), p.online))
        .collect();
    assert_eq!(
        ids,
        [("gw-0001", true), ("gw-0002", true), ("gw-0003", true)]
    );

    // Every device of every answering gateway, with its gateway.
    let status = eventually_async(
        Duration::from_secs(30),
        "every device's status reaches the cloud",
        async || {
            let s = fleet.fleet_status().await.unwrap();
            (s.devices.iter().filter(|d| d.status.connected).count() == 4).then_some(s)
        },
    )
    .await;
    let seen: Vec<_> = status
        .devices
        .iter()
        .map(|d| {
            (
                d.gateway_id.as_str(),
                d.status.device_id.as_str(),
                d.device_class().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("gw-0001", "dev-0001", "pump"),
            ("gw-0001", "dev-0002", "valve"),
            ("gw-0002", "dev-0003", "pump"),
            ("gw-0002", "dev-0004", "pump"),
        ]
    );
    let unreachable: Vec<_> = status
        .unreachable
        .iter()
        .map(|f| f.gateway_id.as_str())
        .collect();
    assert_eq!(unreachable, ["gw-0003"]);

    // One gateway through the fleet connection, like via_broker.
    let one = fleet.gateway("gw-0002").unwrap().status(&[]).await.unwrap();
    assert_eq!(one.len(), 2);

    // A class command: every pump on both gateways runs it, under one command id.
    let cmd = fleet
        .send_class_command(
            "pump",
            SendCommand {
                name: "ping".into(),
                payload: b"all".to_vec(),
                ..SendCommand::default()
            },
        )
        .await
        .unwrap();
    let id = cmd.command_id().to_owned();
    let out = cmd.wait(Duration::from_secs(30)).await;
    let got: Vec<_> = out
        .records
        .iter()
        .map(|r| {
            (
                r.gateway_id.as_str(),
                r.record.device_id.as_str(),
                r.record.state(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("gw-0001", "dev-0001", CommandState::Succeeded),
            ("gw-0002", "dev-0003", CommandState::Succeeded),
            ("gw-0002", "dev-0004", CommandState::Succeeded),
        ],
        "{out:?}"
    );
    for r in &out.records {
        assert_eq!(r.record.command_id, id);
        assert_eq!(r.record.result.as_ref().unwrap().output, b"ok:ping:all");
    }
    let failed: Vec<_> = out.failed.iter().map(|f| f.gateway_id.as_str()).collect();
    assert_eq!(failed, ["gw-0003"]);
    // The valve was no target.
    let valve = fleet
        .gateway("gw-0001")
        .unwrap()
        .get_command(&id, Some("dev-0002"))
        .await;
    assert!(valve.as_ref().map_or(true, Vec::is_empty), "{valve:?}");

    // The same through fleetctl, against the cloud broker.
    let fleetctl = |args: &[&str]| {
        let mut cmd = std::process::Command::new(fleet_tests::procs::bin("fleetctl"));
        cmd.arg("--gateway")
            .arg(&up[0])
            .arg("--pki")
            .arg(&pki.dir)
            .args(["--request-timeout", "3s", "--json", "fleet"])
            .args(args);
        let out = fleet_testkit::run(cmd, Duration::from_secs(60));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "fleetctl {args:?}: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), doc)
    };
    let (code, doc) = fleetctl(&["gateways"]);
    assert_eq!(code, Some(0));
    let listed: Vec<_> = doc
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["gateway_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ["gw-0001", "gw-0002", "gw-0003"]);
    let (code, doc) = fleetctl(&["status", "--class", "pump"]);
    assert_eq!(code, Some(0));
    let pumps: Vec<_> = doc["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["gateway_id"].as_str().unwrap(),
                d["device_id"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        pumps,
        ["gw-0001/dev-0001", "gw-0002/dev-0003", "gw-0002/dev-0004"]
    );
    assert_eq!(doc["unreachable"][0]["gateway_id"], "gw-0003");
    let (code, doc) = fleetctl(&[
        "command",
        "--class",
        "valve",
        "--name",
        "ping",
        "--payload",
        "v",
    ]);
    assert_eq!(code, Some(1), "gw-0003 did not answer: {doc}");
    assert_eq!(doc["records"].as_array().unwrap().len(), 1, "{doc}");
    assert_eq!(doc["records"][0]["device_id"], "dev-0002");
    assert_eq!(doc["records"][0]["state"], "succeeded");
    assert_eq!(doc["records"][0]["result_output"], "ok:ping:v");
    assert_eq!(doc["failed"][0]["gateway_id"], "gw-0003");
    drop((gw1, gw2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_rolls_out_to_a_class_across_gateways_under_one_batch_rule() {
    use cloud_client::{
        build_update, BatchSize, FleetRolloutState, FleetUpdateOptions, Rollout, TargetState,
    };
    use fleet_proto::signing::UpdateSigner;
    use fleet_tests::updates::{write_image, Publish};

    let dir = tempfile::tempdir().unwrap();
    let pki = FleetPki::init(&dir.path().join("pki"), 2, 4);
    let cloud = CloudBroker::mosquitto(dir.path(), &pki);
    let up = cloud.addresses();
    let gw1 = FleetGateway::start(
        dir.path(),
        &pki,
        1,
        &up,
        &[("dev-0001", "pump"), ("dev-0002", "valve")],
    )
    .await;
    let gw2 = FleetGateway::start(
        dir.path(),
        &pki,
        2,
        &up,
        &[("dev-0003", "pump"), ("dev-0004", "pump")],
    )
    .await;
    cloud.publish_presence(&pki, "gw-0001", &presence("gw-0001", true, 2));
    cloud.publish_presence(&pki, "gw-0002", &presence("gw-0002", true, 2));
    let fleet = pki
        .sdk("localhost", cloud.port())
        .fleet()
        .connect()
        .await
        .unwrap();
    eventually_async(
        Duration::from_secs(30),
        "the pumps' classes are known",
        async || {
            let s = fleet.fleet_status().await.unwrap();
            (s.of_class("pump").count() == 3).then_some(())
        },
    )
    .await;

    let image_path = dir.path().join("img");
    let size = 256 << 10;
    write_image(&image_path, size, 7);
    let key = std::fs::read_to_string(pki.dir.join("trust/updates-1.key")).unwrap();
    let signer = UpdateSigner::from_pkcs8_pem(&key).unwrap();
    let mut publish = Publish::new("fw-fleet", &image_path);
    publish.class = "pump";
    let built = build_update(&publish.spec(), &signer).unwrap();
    let down_before = [
        gw1.proc.metric("bridge_bytes_down_total"),
        gw2.proc.metric("bridge_bytes_down_total"),
    ];
    let opts = FleetUpdateOptions {
        rollout: Rollout {
            batch: BatchSize::Devices(2),
            max_failures_percent: 100,
        },
        poll: Duration::from_millis(300),
        timeout: Duration::from_secs(60),
        resume: false,
    };
    let mut seen = Vec::new();
    let report = fleet
        .fleet_update(&built, &opts, |p| seen.push(p.progress()))
        .await
        .unwrap();
    assert_eq!(report.state, FleetRolloutState::Completed, "{report:?}");
    let states: Vec<_> = report
        .targets
        .iter()
        .map(|(t, s)| (t.gateway_id.as_str(), t.device_id.as_str(), *s))
        .collect();
    assert_eq!(
        states,
        [
            ("gw-0001", "dev-0001", TargetState::Succeeded),
            ("gw-0002", "dev-0003", TargetState::Succeeded),
            ("gw-0002", "dev-0004", TargetState::Succeeded),
        ]
    );
    // One fleet batch spanned both gateways; the second went to gw-0002 as a new batch of
    // its campaign.
    let batches = |r: &cloud_client::UpdateRecord| -> Vec<(String, u32)> {
        r.targets
            .iter()
            .map(|t| (t.device_id.clone(), t.batch))
            .collect()
    };
    let r1 = fleet
        .gateway("gw-0001")
        .unwrap()
        .get_update("fw-fleet")
        .await
        .unwrap();
    let r2 = fleet
        .gateway("gw-0002")
        .unwrap()
        .get_update("fw-fleet")
        .await
        .unwrap();
    assert_eq!(batches(&r1), [("dev-0001".to_owned(), 0)]);
    assert_eq!(
        batches(&r2),
        [("dev-0003".to_owned(), 0), ("dev-0004".to_owned(), 1)]
    );
    assert!(
        seen.iter().any(|p| p.deployed == 2 && p.succeeded < 2),
        "the first batch ran alone: {seen:?}"
    );
    // Each gateway's uplink carried the image once (plus requests and answers).
    for (gw, before) in [&gw1, &gw2].iter().zip(down_before) {
        let carried = gw.proc.metric("bridge_bytes_down_total") - before;
        let ratio = carried / size as f64;
        assert!((1.0..1.5).contains(&ratio), "{}: {ratio}", gw.id);
    }
    // Restarted (a new call): restored from the gateways' records, nothing is deployed again.
    let again = fleet.fleet_update(&built, &opts, |_| {}).await.unwrap();
    assert_eq!(again.state, FleetRolloutState::Completed);
    assert_eq!(again.targets, report.targets);
    let r2 = fleet
        .gateway("gw-0002")
        .unwrap()
        .get_update("fw-fleet")
        .await
        .unwrap();
    assert_eq!(r2.campaign.unwrap().batches, 2);

    // The next version through fleetctl.
    let image2 = dir.path().join("img2");
    write_image(&image2, 64 << 10, 8);
    let mut cmd = std::process::Command::new(fleet_tests::procs::bin("fleetctl"));
    cmd.arg("--gateway")
        .arg(&up[0])
        .arg("--pki")
        .arg(&pki.dir)
        .args(["--json", "fleet", "update", "--class", "pump", "--image"])
        .arg(&image2)
        .args([
            "--component",
            "rootfs",
            "--version",
            "1.2.0",
            "--sequence",
            "12",
        ])
        .args([
            "--batch",
            "2",
            "--max-failures",
            "100",
            "--timeout",
            "60s",
            "--key",
        ])
        .arg(pki.dir.join("trust/updates-1.key"));
    let out = fleet_testkit::run(cmd, Duration::from_secs(90));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{doc}");
    assert_eq!(doc["update_id"], "pump-1.2.0");
    assert_eq!(doc["state"], "completed");
    let committed: Vec<_> = doc["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{} {}",
                t["device_id"].as_str().unwrap(),
                t["state"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        committed,
        [
            "dev-0001 committed",
            "dev-0003 committed",
            "dev-0004 committed"
        ]
    );
}
