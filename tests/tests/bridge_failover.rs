//! The bridge across several cloud brokers, end to end: two real `mosquitto`s (TLS,
//! require_certificate, each behind its own relay), the gateway binary with both addresses in
//! `bridge.upstream`, test-devices behind it, cloud observers on the brokers. And the
//! gateway's presence upstream: announced, updated, its will, its clean goodbye.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fleet_proto::v1::{GatewayPresence, StatusReport};
use fleet_proto::{topics, Message};
use fleet_testkit::eventually;
use fleet_tests::mosquitto::{Mosquitto, Observer};
use fleet_tests::procs::{DeviceOpts, DeviceProc, GatewayProc};
use fleet_tests::proxy::{Relay, Target};

/// A gateway bridged to `localhost` on each of `ports`, in that order.
fn gateway(dir: &Path, devices: u32, ports: &[u16], env: &[(&str, &str)]) -> GatewayProc {
    let upstream: Vec<String> = ports.iter().map(|p| format!("localhost:{p}")).collect();
    let upstream = upstream.join(",");
    let mut all = vec![
        ("GATEWAY__BRIDGE__UPSTREAM", upstream.as_str()),
        ("GATEWAY__BRIDGE__RECONNECT_MAX", "1s"),
    ];
    all.extend_from_slice(env);
    GatewayProc::start(dir, devices, &all)
}

/// A relay holding a stable port for a cloud broker started later.
fn cloud_relay() -> (Relay, u16) {
    let relay = Relay::start(None).unwrap();
    let port = relay.addr.port();
    (relay, port)
}

/// mosquitto in `dir` with the gateway's development PKI, behind `relay`.
fn cloud(dir: &Path, gw: &GatewayProc, relay: Relay) -> Mosquitto {
    let pki = gw.pki();
    Mosquitto::start(
        dir,
        relay,
        &pki.join("ca.crt"),
        &pki.join("gateways/gw-0001.crt"),
        &pki.join("gateways/gw-0001.key"),
    )
}

/// A cloud service (svc-0001, as `client_id`) subscribed to `filter` on the broker at `port`.
async fn observer(gw: &GatewayProc, port: u16, client_id: &str, filter: &str) -> Observer {
    let pki = gw.pki();
    let mut obs = Observer::start(
        port,
        &pki.join("ca.crt"),
        &pki.join("services/svc-0001.crt"),
        &pki.join("services/svc-0001.key"),
        client_id,
        filter,
    );
    assert!(obs.wait_subscribed(Duration::from_secs(20)).await);
    obs
}

async fn wait_bridged(gw: &GatewayProc) {
    eventually(Duration::from_secs(30), "the bridge connects", || {
        gw.metric("bridge_connected") == 1.0
    })
    .await;
}

/// Every device's status sequences, in arrival order.
fn sequences(obs: &Observer) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for (topic, payload) in obs.seen() {
        let device = topic.split('/').nth(3).unwrap().to_owned();
        let r = StatusReport::decode(payload.as_slice()).unwrap();
        out.entry(device).or_default().push(r.sequence);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_its_cloud_broker_stops_the_bridge_moves_to_the_next_and_loses_no_report() {
    const REPORTS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let (relay_a, port_a) = cloud_relay();
    let (relay_b, port_b) = cloud_relay();
    let gw = gateway(dir.path(), 2, &[port_a, port_b], &[]);
    let mut brokers = [
        cloud(&dir.path().join("cloud-a"), &gw, relay_a),
        cloud(&dir.path().join("cloud-b"), &gw, relay_b),
    ];
    wait_bridged(&gw).await;
    // Both were reachable from the start of their relays; which one the bridge reached first
    // depends on how its early attempts went. The one it is on is stopped.
    let in_use = gw.metric("bridge_upstream_index") as usize;
    assert!(in_use < 2);
    let next = 1 - in_use;
    let failovers = gw.metric("bridge_failovers_total");
    let obs = observer(
        &gw,
        brokers[next].port,
        "cloud-observer",
        "gateways/gw-0001/devices/+/status",
    )
    .await;

    // The next broker is unreachable for a while too (its relay refuses), so the reports
    // made now are queued, and the bridge has to go round both addresses.
    brokers[next].relay().point_to(None);
    brokers[in_use].stop();
    let refused = [brokers[0].relay().refused(), brokers[1].relay().refused()];
    let pki = gw.pki();
    let devices: Vec<DeviceProc> = ["dev-0001", "dev-0002"]
        .iter()
        .map(|id| {
            let mut o = DeviceOpts::new(dir.path(), id);
            o.reports = REPORTS;
            o.exit_after_flush = true;
            DeviceProc::start(&gw.address(), &pki, &o)
        })
        .collect();
    for d in devices {
        let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(60)));
        assert!(status.success(), "a device did not flush: {status}");
    }
    eventually(
        Duration::from_secs(20),
        "the bridge tries both addresses",
        || brokers[0].relay().refused() > refused[0] && brokers[1].relay().refused() > refused[1],
    )
    .await;
    assert_eq!(gw.metric("bridge_connected"), 0.0);
    // (The gauge is refreshed once a second.)
    eventually(Duration::from_secs(5), "every report queued", || {
        gw.metric("bridge_queue_depth") >= (2 * REPORTS) as f64
    })
    .await;

    let socket = dir
        .path()
        .join(if next == 0 { "cloud-a" } else { "cloud-b" })
        .join("mosquitto.sock");
    brokers[next].relay().point_to(Some(Target::Unix(socket)));
    eventually(
        Duration::from_secs(60),
        "every report arrives at the next broker",
        || {
            let s = sequences(&obs);
            let distinct: usize = s
                .values()
                .map(|v| v.iter().collect::<HashSet<_>>().len())
                .sum();
            if distinct >= 2 * REPORTS as usize {
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
    for d in ["dev-0001", "dev-0002"] {
        let mut first = Vec::new();
        let mut seen = HashSet::new();
        for s in &seqs[d] {
            if seen.insert(*s) {
                first.push(*s);
            }
        }
        assert_eq!(first, (1..=REPORTS).collect::<Vec<_>>(), "{d}");
    }
    assert_eq!(gw.metric("bridge_connected"), 1.0);
    assert_eq!(gw.metric("bridge_upstream_index"), next as f64);
    assert!(gw.metric("bridge_failovers_total") > failovers);
    eventually(Duration::from_secs(10), "the uplink queue drains", || {
        gw.metric("bridge_queue_depth") == 0.0
    })
    .await;
}

/// The gateway presences the observer received, in order.
fn presences(obs: &Observer) -> Vec<GatewayPresence> {
    obs.seen()
        .into_iter()
        .map(|(topic, payload)| {
            assert_eq!(topics::parse_gateway_presence(&topic), Some("gw-0001"));
            GatewayPresence::decode(payload.as_slice()).unwrap()
        })
        .collect()
}

/// Waits for a presence after the first `after` that satisfies `want`.
async fn presence_where(
    obs: &Observer,
    after: usize,
    what: &str,
    want: impl Fn(&GatewayPresence) -> bool,
) -> GatewayPresence {
    eventually(Duration::from_secs(30), what, || {
        let all = presences(obs);
        all.iter()
            .skip(after)
            .find(|p| want(p))
            .cloned()
            .ok_or_else(|| format!("{:?}", all.last()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_announces_itself_upstream_and_its_will_says_when_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, port) = cloud_relay();
    let env = [("GATEWAY__BRIDGE__PRESENCE_INTERVAL", "1s")];
    let gw = gateway(dir.path(), 1, &[port], &env);
    let _broker = cloud(&dir.path().join("cloud"), &gw, relay);
    wait_bridged(&gw).await;
    let obs = observer(&gw, port, "presence-observer", topics::ALL_GATEWAY_PRESENCE).await;

    // Retained: a service that subscribes later still sees the gateway.
    let p = presence_where(&obs, 0, "the gateway online", |p| p.online).await;
    assert_eq!(p.gateway_id, "gw-0001");
    assert_eq!(p.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(p.devices_online, 0);
    assert!(p.started_at_ms > 0 && p.timestamp_ms >= p.started_at_ms);

    // A device connects: the counts change upstream.
    let dev = DeviceProc::start(
        &gw.address(),
        &gw.pki(),
        &DeviceOpts::new(dir.path(), "dev-0001"),
    );
    dev.connected(Duration::from_secs(30)).await;
    presence_where(&obs, 0, "one device online and known", |p| {
        p.online && p.devices_online == 1 && p.devices_known == 1
    })
    .await;

    // Killed: the upstream broker publishes the will.
    let before = presences(&obs).len();
    gw.kill();
    let will = presence_where(&obs, before, "the will", |p| !p.online).await;
    assert_eq!(will.gateway_id, "gw-0001");
    assert_eq!(will.version, env!("CARGO_PKG_VERSION"));

    // Restarted, then stopped cleanly: online again, then offline from the gateway itself
    // (dated after the stop: not the will, which dates from its connection).
    let before = presences(&obs).len();
    let gw = gateway(dir.path(), 1, &[port], &env);
    presence_where(&obs, before, "online again", |p| p.online).await;
    let before = presences(&obs).len();
    let stopped_at = fleet_proto::time::now_ms();
    let mut term = Command::new("kill");
    term.args(["-TERM", &gw.pid().to_string()]);
    fleet_testkit::run(term, Duration::from_secs(10));
    let bye = presence_where(&obs, before, "offline on a clean stop", |p| !p.online).await;
    assert!(bye.timestamp_ms >= stopped_at, "{bye:?}");
    drop(dev);
}
