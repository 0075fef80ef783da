//! The bridge end to end: a real `mosquitto` as the cloud broker (TLS, require_certificate,
//! reached through a relay holding a port for the whole test), the gateway binary bridging to
//! it, test-devices behind the gateway, the SDK connected to mosquitto only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use cloud_client::{CommandState, DeployUpdate, FleetClient, SendCommand, UpdatePhase};
use fleet_proto::Message;
use fleet_testkit::{eventually, eventually_async};
use fleet_tests::mosquitto::{Mosquitto, Observer};
use fleet_tests::procs::{DeviceOpts, DeviceProc, GatewayProc};
use fleet_tests::proxy::Relay;
use fleet_tests::updates::{authority, write_image, Publish};

const GW: &str = "gw-0001";

/// A gateway bridged to 127.0.0.1:`cloud_port`.
fn gateway(dir: &Path, devices: u32, cloud_port: u16) -> GatewayProc {
    GatewayProc::start(
        dir,
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

/// mosquitto with the gateway's development PKI (its server certificate is the gateway's),
/// behind `relay`.
fn cloud(dir: &Path, gw: &GatewayProc, relay: Relay) -> Mosquitto {
    let pki = gw.pki();
    Mosquitto::start(
        &dir.join("cloud"),
        relay,
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
        .command_key_file(pki.join("trust/commands-1.key"))
        .connect()
        .await
        .unwrap()
}

async fn wait_bridged(gw: &GatewayProc) {
    eventually(Duration::from_secs(30), "the bridge connects", || {
        gw.metric("bridge_connected") == 1.0
    })
    .await;
}

/// The cloud broker's stable address, held before the gateway that bridges to it starts.
/// A cloud service (svc-0001) subscribed upstream to `filter`.
async fn observer(pki: &Path, cloud_port: u16, filter: &str) -> Observer {
    let mut obs = Observer::start(
        cloud_port,
        &pki.join("ca.crt"),
        &pki.join("services/svc-0001.crt"),
        &pki.join("services/svc-0001.key"),
        "cloud-observer",
        filter,
    );
    assert!(obs.wait_subscribed(Duration::from_secs(20)).await);
    obs
}

fn cloud_relay() -> (Relay, u16) {
    let relay = Relay::start(None).unwrap();
    let port = relay.addr.port();
    (relay, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_through_the_cloud_broker_runs_on_the_device_and_the_metrics_show_it() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, cloud_port) = cloud_relay();
    let gw = gateway(dir.path(), 2, cloud_port);
    let _cloud = cloud(dir.path(), &gw, relay);
    wait_bridged(&gw).await;
    let dev = DeviceProc::start(
        &gw.address(),
        &gw.pki(),
        &DeviceOpts::new(dir.path(), "dev-0001"),
    );
    dev.connected(Duration::from_secs(30)).await;
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
    eventually(
        Duration::from_secs(10),
        "results and status went up",
        || gw.metric("bridge_messages_up_total") >= 2.0,
    )
    .await;
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
    let (relay, cloud_port) = cloud_relay();
    let gw = gateway(dir.path(), 2, cloud_port);
    let mut broker = cloud(dir.path(), &gw, relay);
    wait_bridged(&gw).await;
    let pki = gw.pki();
    let obs = observer(&pki, cloud_port, "gateways/gw-0001/devices/+/status").await;

    // The uplink goes down; the devices publish 2 x 500 reports, all acknowledged by the
    // gateway (stored) while the cloud is unreachable.
    broker.stop();
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
        let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(60)));
        assert!(status.success(), "a device did not flush: {status}");
    }
    eventually(
        Duration::from_secs(5),
        "1000 reports queued for the uplink",
        || gw.metric("bridge_queue_depth") >= 1000.0,
    )
    .await;
    // The devices are gone; the restarted gateway only needs the cloud's address, which the
    // relay holds, so it binds its own port 0.
    let gw = if kill_gateway {
        gw.kill();
        gateway(dir.path(), 2, cloud_port)
    } else {
        gw
    };
    // While the cloud is down the bridge keeps trying (reconnect_max 1 s) and fails; the
    // reports stay queued. Once it has failed again with everything queued, the cloud comes
    // back.
    let refused = broker.relay().refused();
    eventually(
        Duration::from_secs(30),
        "the bridge retries the cloud",
        || broker.relay().refused() > refused + 1,
    )
    .await;
    assert_eq!(gw.metric("bridge_connected"), 0.0);
    broker.restart();

    eventually(
        Duration::from_secs(60),
        "1000 distinct reports arrive",
        || {
            let s = sequences(&obs);
            let distinct: usize = s
                .values()
                .map(|v| v.iter().collect::<std::collections::HashSet<_>>().len())
                .sum();
            if distinct >= 1000 {
                Ok(())
            } else {
                Err(s
                    .iter()
                    .map(|(d, v)| (d.clone(), v.len()))
                    .collect::<Vec<_>>())
            }
        },
    )
    .await;
    let seqs = sequences(&obs);
    check_all_in_order(&seqs, &["dev-0001", "dev-0002"], 500);
    eventually(Duration::from_secs(10), "the uplink queue drains", || {
        gw.metric("bridge_queue_depth") == 0.0
    })
    .await;
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
    let (relay, cloud_port) = cloud_relay();
    let gw = gateway(dir.path(), 10, cloud_port);
    let _cloud = cloud(dir.path(), &gw, relay);
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
    eventually_async(Duration::from_secs(120), "all committed", async || {
        let r = fleet.get_update("fw-cloud").await.unwrap();
        if r.targets
            .iter()
            .all(|t| t.phase() == UpdatePhase::Committed)
        {
            Ok(())
        } else {
            Err(r)
        }
    })
    .await;
    for o in &opts {
        let slot = device_client::SlotInstaller::new(&o.state)
            .active_image("rootfs")
            .unwrap();
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

/// A device (raw MQTT client, device certificate) publishes `n` update progress reports at
/// QoS 1 to the gateway at 127.0.0.1:`port` and returns once every one is acknowledged.
async fn publish_progress_acknowledged(pki: &Path, port: u16, n: u32) {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
    let tls = fleet_certs::client_tls(
        &pki.join("ca.crt"),
        &pki.join("devices/dev-0001.crt"),
        &pki.join("devices/dev-0001.key"),
    )
    .unwrap();
    let mut o = MqttOptions::new("dev-0001", "localhost", port);
    o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls.config)))
        .set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(o, 2 * n as usize);
    for i in 1..=n {
        let report = fleet_proto::v1::UpdateProgress {
            update_id: "fw-kill".into(),
            chunks_held: i,
            chunks_total: n,
            ..Default::default()
        };
        client
            .try_publish(
                "devices/dev-0001/update/progress",
                QoS::AtLeastOnce,
                false,
                report.encode_to_vec(),
            )
            .unwrap();
    }
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(60), async {
        while acked < n {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("the device's connection failed: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{acked} of {n} progress reports acknowledged"));
}

/// Upward messages other than status reports are as safe as those: a device's progress
/// reports, acknowledged by the gateway while the uplink is down, survive a SIGKILL right
/// after the last acknowledgement and all arrive upstream once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reports_acknowledged_to_a_device_survive_a_kill_during_an_outage() {
    const N: u32 = 200;
    let dir = tempfile::tempdir().unwrap();
    let (relay, cloud_port) = cloud_relay();
    let gw = gateway(dir.path(), 1, cloud_port);
    let mut broker = cloud(dir.path(), &gw, relay);
    wait_bridged(&gw).await;
    let pki = gw.pki();
    let obs = observer(
        &pki,
        cloud_port,
        "gateways/gw-0001/devices/+/update/progress",
    )
    .await;
    broker.stop();
    eventually(
        Duration::from_secs(30),
        "the bridge sees the outage",
        || gw.metric("bridge_connected") == 0.0,
    )
    .await;

    let port: u16 = gw.address().rsplit_once(':').unwrap().1.parse().unwrap();
    publish_progress_acknowledged(&pki, port, N).await;
    gw.kill();
    let _gw = gateway(dir.path(), 1, cloud_port);
    broker.restart();

    let held = |obs: &Observer| {
        obs.seen()
            .iter()
            .map(|(_, p)| {
                fleet_proto::v1::UpdateProgress::decode(p.as_slice())
                    .unwrap()
                    .chunks_held
            })
            .collect::<std::collections::BTreeSet<u32>>()
    };
    eventually(
        Duration::from_secs(60),
        "every acknowledged report arrives upstream",
        || {
            let got = held(&obs);
            if got.len() == N as usize {
                Ok(())
            } else {
                Err(format!(
                    "{} of {N} distinct; missing from {:?}",
                    got.len(),
                    (1..=N).find(|i| !got.contains(i))
                ))
            }
        },
    )
    .await;
    eprintln!(
        "{} progress reports received upstream for {N} acknowledged",
        obs.seen().len()
    );
}
