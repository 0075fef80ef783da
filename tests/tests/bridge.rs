//! The bridge end to end: a real `mosquitto` as the cloud broker (TLS, require_certificate,
//! started by the test on a free port), the gateway binary bridging to it, test-devices behind
//! the gateway, the SDK connected to mosquitto only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use cloud_client::{CommandState, DeployUpdate, FleetClient, SendCommand, UpdatePhase};
use fleet_proto::Message;
use fleet_tests::mosquitto::{Mosquitto, Observer};
use fleet_tests::procs::{free_port, until, DeviceOpts, DeviceProc, GatewayProc};
use fleet_tests::updates::{authority, write_image, Publish};

const GW: &str = "gw-0001";

/// A gateway bridged to 127.0.0.1:`cloud_port`.
fn gateway(dir: &Path, port: u16, devices: u32, cloud_port: u16) -> GatewayProc {
    GatewayProc::start(
        dir,
        port,
        devices,
        &[
            (
                "GATEWAY__BRIDGE__UPSTREAM",
                &format!("localhost:{cloud_port}"),
            ),
            ("GATEWAY__BRIDGE__RECONNECT_MAX", "1s"),
        ],
    )
}

/// mosquitto with the gateway's development PKI (its server certificate is the gateway's).
fn cloud(dir: &Path, gw: &GatewayProc, port: u16) -> Mosquitto {
    let pki = gw.pki();
    Mosquitto::start(
        &dir.join("cloud"),
        port,
        &pki.join("ca.crt"),
        &pki.join("gateways/gw-0001.crt"),
        &pki.join("gateways/gw-0001.key"),
    )
}

/// The SDK for svc-0001 through the cloud broker.
async fn cloud_sdk(gw: &GatewayProc, port: u16) -> FleetClient {
    let pki = gw.pki();
    FleetClient::builder()
        .gateway("localhost", port)
        .pem_files(
            pki.join("ca.crt"),
            pki.join("services/svc-0001.crt"),
            pki.join("services/svc-0001.key"),
        )
        .via_broker(GW)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn wait_bridged(gw: &GatewayProc) {
    assert!(
        until(Duration::from_secs(30), || gw.metric("bridge_connected")
            == 1.0)
        .await,
        "the bridge did not connect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_through_the_cloud_broker_runs_on_the_device_and_the_metrics_show_it() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_port = free_port();
    let gw = gateway(dir.path(), 0, 2, cloud_port);
    let _cloud = cloud(dir.path(), &gw, cloud_port);
    wait_bridged(&gw).await;
    let dev = DeviceProc::start(
        &gw.address(),
        &gw.pki(),
        &DeviceOpts::new(dir.path(), "dev-0001"),
    );
    assert!(until(Duration::from_secs(30), || dev.out.contains("connected")).await);
    let fleet = cloud_sdk(&gw, cloud_port).await;
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
    // Status through the cloud too.
    let st = fleet.status(&["dev-0001".into()]).await.unwrap();
    assert!(st[0].connected);

    // The metrics endpoint serves the named series (Prometheus text) and a health document.
    let body = gw.http_get("/metrics");
    for series in [
        "connections",
        "messages_in_total",
        "messages_out_total",
        "acl_denials_total",
        "handshake_failures_total",
        "bridge_connected",
        "bridge_queue_depth",
        "bridge_queue_age_seconds",
        "bridge_messages_up_total",
        "bridge_messages_down_total",
        "update_chunks_served_total",
        "update_progress_reports_total",
    ] {
        assert!(
            body.contains(&format!("# TYPE fleet_gateway_{series} ")),
            "{series} missing:\n{body}"
        );
    }
    assert!(gw.metric("connections") >= 1.0);
    assert!(gw.metric("messages_in_total") >= 1.0);
    assert!(
        gw.metric("bridge_messages_down_total") >= 2.0,
        "request(s) came down"
    );
    assert!(
        until(Duration::from_secs(10), || gw
            .metric("bridge_messages_up_total")
            >= 2.0)
        .await
    );
    let health: serde_json::Value = serde_json::from_str(&gw.http_get("/health")).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["bridge_connected"], true);
}

/// Sequences of each device's status reports, in arrival order, from what the observer saw.
fn sequences(obs: &Observer) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for (topic, payload) in obs.seen() {
        let device = topic.split('/').nth(3).unwrap().to_owned();
        let r = fleet_proto::v1::StatusReport::decode(payload.as_slice()).unwrap();
        out.entry(device).or_default().push(r.sequence);
    }
    out
}

/// Every device's reports 1..=n arrived, first arrivals in order (re-sends after a
/// reconnect may repeat some: at least once).
fn check_all_in_order(seqs: &HashMap<String, Vec<u64>>, devices: &[&str], n: u64) {
    for d in devices {
        let got = seqs.get(*d).map(Vec::as_slice).unwrap_or_default();
        let mut first = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for s in got {
            if seen.insert(*s) {
                first.push(*s);
            }
        }
        let want: Vec<u64> = (1..=n).collect();
        assert_eq!(
            first,
            want,
            "{d}: {} received, {} distinct",
            got.len(),
            first.len()
        );
    }
}

async fn outage(kill_gateway: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cloud_port = free_port();
    let gw = gateway(dir.path(), 0, 2, cloud_port);
    let port = gw.addr.port();
    let mut broker = cloud(dir.path(), &gw, cloud_port);
    wait_bridged(&gw).await;
    let pki = gw.pki();
    let mut obs = Observer::start(
        cloud_port,
        &pki.join("ca.crt"),
        &pki.join("services/svc-0001.crt"),
        &pki.join("services/svc-0001.key"),
        "cloud-observer",
        "gateways/gw-0001/devices/+/status",
    );
    assert!(obs.wait_subscribed(Duration::from_secs(20)).await);

    // The uplink goes down; the devices publish 2 x 500 reports, all acknowledged by the
    // gateway (stored) while the cloud is unreachable.
    broker.stop();
    let down_at = Instant::now();
    let devices: Vec<DeviceProc> = ["dev-0001", "dev-0002"]
        .iter()
        .map(|id| {
            let mut o = DeviceOpts::new(dir.path(), id);
            o.reports = 500;
            o.exit_after_flush = true;
            DeviceProc::start(&gw.address(), &pki, &o)
        })
        .collect();
    for d in devices {
        assert!(
            d.wait_exit(Duration::from_secs(60)),
            "a device did not flush"
        );
    }
    assert!(
        until(Duration::from_secs(5), || gw.metric("bridge_queue_depth")
            >= 1000.0)
        .await
    );
    let gw = if kill_gateway {
        gw.kill();
        gateway(dir.path(), port, 2, cloud_port)
    } else {
        gw
    };
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed())).await;
    broker.restart();

    let ok = until(Duration::from_secs(60), || {
        let s = sequences(&obs);
        s.values()
            .map(|v| v.iter().collect::<std::collections::HashSet<_>>().len())
            .sum::<usize>()
            >= 1000
    })
    .await;
    let seqs = sequences(&obs);
    assert!(
        ok,
        "only {:?} arrived",
        seqs.iter().map(|(d, v)| (d, v.len())).collect::<Vec<_>>()
    );
    check_all_in_order(&seqs, &["dev-0001", "dev-0002"], 500);
    assert!(
        until(Duration::from_secs(10), || gw.metric("bridge_queue_depth")
            == 0.0)
        .await
    );
    eprintln!(
        "outage (gateway killed: {kill_gateway}): {} received for 1000 reports",
        seqs.values().map(Vec::len).sum::<usize>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_made_while_the_cloud_broker_is_down_all_arrive_in_order() {
    outage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn and_so_they_do_when_the_gateway_is_killed_during_the_outage() {
    outage(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_through_the_cloud_broker_crosses_the_uplink_once() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_port = free_port();
    let gw = gateway(dir.path(), 0, 10, cloud_port);
    let _cloud = cloud(dir.path(), &gw, cloud_port);
    wait_bridged(&gw).await;
    let (signer, _, public) = authority(dir.path());
    let image_path = dir.path().join("img");
    let size = 2 << 20;
    let image = write_image(&image_path, size, 11);
    let ids: Vec<String> = (1..=10).map(|i| format!("dev-{i:04}")).collect();
    let opts: Vec<DeviceOpts> = ids
        .iter()
        .map(|id| {
            let mut o = DeviceOpts::new(dir.path(), id);
            o.args = vec!["--update-key".into(), public.display().to_string()];
            o
        })
        .collect();
    let _devs: Vec<DeviceProc> = opts
        .iter()
        .map(|o| DeviceProc::start(&gw.address(), &gw.pki(), o))
        .collect();
    let fleet = cloud_sdk(&gw, cloud_port).await;
    let down_before = gw.metric("bridge_bytes_down_total");
    Publish::new("fw-cloud", &image_path)
        .run(&fleet, &signer)
        .await;
    fleet
        .deploy_update(DeployUpdate {
            update_id: "fw-cloud".into(),
            device_ids: ids.clone(),
            ..DeployUpdate::default()
        })
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let r = fleet.get_update("fw-cloud").await.unwrap();
        if r.targets
            .iter()
            .all(|t| t.phase() == UpdatePhase::Committed)
        {
            break;
        }
        assert!(Instant::now() < end, "not all committed: {r:#?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for o in &opts {
        let slot = device_client::SlotInstaller::new(&o.state).active_image("rootfs");
        assert!(std::fs::read(slot).unwrap() == image, "{}", o.id);
    }
    let carried = gw.metric("bridge_bytes_down_total") - down_before;
    let ratio = carried / size as f64;
    eprintln!(
        "uplink carried {carried} bytes down for a {size}-byte image to 10 devices: {ratio:.3}x"
    );
    assert!(ratio < 1.2, "{ratio}");
    assert!(ratio >= 1.0, "the image must have come down: {ratio}");
}
