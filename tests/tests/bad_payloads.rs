//! Malformed protobuf on every topic a client may publish to is logged, counted and dropped;
//! the store stays sound and everybody else keeps their service. Published with the real
//! `mosquitto_pub` (Debian's mosquitto-clients), as a misbehaving device or service would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use cloud_client::{CommandState, SendCommand};
use fleet_testkit::{eventually, eventually_async};
use fleet_tests::procs::{DeviceOpts, DeviceProc, GatewayProc};

fn mosquitto_pub(gw: &GatewayProc, role_dir: &str, id: &str, topic: &str, payload: &Path) {
    gw.mosquitto_pub(role_dir, id, topic, payload, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_is_dropped_and_the_store_stays_sound() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 2, &[]);
    let garbage = dir.path().join("garbage");
    // An invalid varint, then a length running past the end.
    std::fs::write(
        &garbage,
        [
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x12, 0x7f,
        ],
    )
    .unwrap();
    for suffix in ["status", "presence", "cmd/result"] {
        mosquitto_pub(
            &gw,
            "devices",
            "dev-0002",
            &format!("devices/dev-0002/{suffix}"),
            &garbage,
        );
    }
    mosquitto_pub(
        &gw,
        "services",
        "svc-0001",
        "fleet/api/svc-0001/request",
        &garbage,
    );
    for needle in [
        "status report dropped: not a valid StatusReport device=dev-0002",
        "registry: message dropped topic=devices/dev-0002/presence",
        "command result: bad protobuf",
        "API request: bad protobuf",
    ] {
        eventually(
            Duration::from_secs(10),
            format!("log line {needle:?}"),
            || gw.logged(needle),
        )
        .await;
    }

    // Everybody else is served: a real device runs a command and its reports are stored.
    let mut opts = DeviceOpts::new(dir.path(), "dev-0001");
    opts.reports = 3;
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    dev.connected(Duration::from_secs(20)).await;
    let fleet = gw.fleet().await;
    let recs = fleet
        .send_command(SendCommand {
            device_ids: vec!["dev-0001".into()],
            name: "ping".into(),
            ..SendCommand::default()
        })
        .await
        .unwrap()
        .wait(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(recs[0].state(), CommandState::Succeeded);
    eventually_async(Duration::from_secs(10), "3 reports stored", async || {
        let st = fleet.status(&[]).await.unwrap();
        let stored = st
            .iter()
            .find(|s| s.device_id == "dev-0001")
            .map_or(0, |s| s.reports_stored);
        if stored == 3 {
            Ok(())
        } else {
            Err(stored)
        }
    })
    .await;
    // Nothing of the garbage reached the registry.
    let st = fleet.status(&["dev-0002".into()]).await.unwrap();
    assert!(
        st.iter()
            .all(|s| s.last_report.is_none() && s.presence.is_none()),
        "{st:?}"
    );
    // And the file is sound (read beside the running gateway: WAL allows it).
    let store = fleet_broker::Store::open(&dir.path().join("data/gateway.db")).unwrap();
    store.check_integrity().unwrap();
}
