//! The fleet at scale on the cloud cluster: five gateway processes (FLEET_SCALE_GATEWAYS), each
//! with twenty test-devices (FLEET_SCALE_DEVICES, half `sensor`, half `valve`), every bridge
//! given all three NATS nodes (gateway k starting at node k % 3), and the SDK on one fleet
//! connection. During a fleet-wide rollout to the valves and a stream of class commands to the
//! sensors, the node carrying the most bridges is killed: every bridge comes back on another
//! node, the rollout completes, every command ends and ran exactly once, the gateways stay
//! listed online. While JetStream elects new leaders, requests through the cluster stall (up
//! to tens of seconds) and subscriptions are refused (the SDK and the bridges ask for them
//! again; `refused_subscriptions.rs` checks that on cue): a class command whose answer was
//! lost is sent again under the same command id (an idempotency key), and a rollout call
//! ended by such an error is continued from the gateways' records; the summary counts both. A summary (rollout time, uplink bytes
//! per image, the nodes' RSS and CPU) is printed past the harness's capture: the figures of
//! BENCHMARKS.md "Scale-out".
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use cloud_client::{
    build_update, BatchSize, CommandState, FleetClient, FleetRolloutState, FleetUpdateOptions,
    Rollout, SendCommand, TargetState,
};
use fleet_proto::signing::UpdateSigner;
use fleet_testkit::{eventually, eventually_async};
use fleet_tests::cluster::{Acl, ClusterPki, NatsCluster, NODES};
use fleet_tests::fleet::{gateway_id, FleetGateway, FleetPki};
use fleet_tests::procs::{cpu_seconds, status_kib, DeviceOpts};
use fleet_tests::updates::{write_image, Publish};

/// The update's image: large enough that requests and command traffic on the uplink are
/// small beside it.
const IMAGE: usize = 1 << 20;

/// Class commands sent over the rollout; half before the kill, half after.
const COMMANDS: usize = 30;

/// Fleet-wide batch of the rollout (of the whole fleet's valves).
const BATCH: usize = 10;

/// The bound on what one gateway's uplink carries for the update.
const UPLINK_BOUND: f64 = 1.2;

fn env_count(name: &str, default: u32) -> u32 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a count: {e}")),
        Err(_) => default,
    }
}

/// The class of a gateway's `i`-th device (0-based): half sensors, half valves.
fn class_of(i: u32) -> &'static str {
    if i.is_multiple_of(2) {
        "sensor"
    } else {
        "valve"
    }
}

/// The node gateway `k` (1-based) is on when its bridge uses address `index` of its list,
/// which starts at node `k % NODES`.
fn node_of(k: u32, index: f64) -> usize {
    (k as usize + index as usize) % NODES
}

/// Node `node`'s RSS (MiB) and CPU seconds.
fn usage(cluster: &NatsCluster, node: usize) -> (f64, f64) {
    cluster.pid(node).map_or((0.0, 0.0), |pid| {
        (status_kib(pid, "VmRSS:") as f64 / 1024.0, cpu_seconds(pid))
    })
}

/// The whole scenario's deadline: its waits are bounded one by one, but their sum is large
/// (re-sends across a long stall); past this the test fails with a clear message, and the
/// gateways, devices and nodes are killed as the scenario is dropped.
const DEADLINE: Duration = Duration::from_secs(420);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_rolls_out_and_commands_through_a_cluster_node_killed_mid_rollout() {
    if tokio::time::timeout(DEADLINE, scenario()).await.is_err() {
        panic!("the scale test did not finish within its deadline of {DEADLINE:?} (its progress lines above say where it was)");
    }
}

async fn scenario() {
    let gateways = env_count("FLEET_SCALE_GATEWAYS", 5);
    let per_gateway = env_count("FLEET_SCALE_DEVICES", 20);
    assert!(
        gateways >= 1 && per_gateway >= 2,
        "at least 1 gateway, 2 devices each"
    );
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let pki = FleetPki::init(&dir.path().join("pki"), gateways, gateways * per_gateway);
    let gw_ids: Vec<String> = (1..=gateways).map(gateway_id).collect();
    // The nodes serve gw-0001's certificate (it names the local host); their warm-up
    // connection is then gw-0001, which the ACL already lets in.
    let (server_cert, server_key) = pki.pair("gateways", &gw_ids[0]);
    let mut cluster = NatsCluster::start(
        &dir.path().join("cluster"),
        &ClusterPki {
            ca: pki.ca(),
            server_cert,
            server_key,
        },
        &Acl::new(gw_ids.clone(), ["svc-0001"]),
    )
    .await;
    let nodes: Vec<String> = cluster
        .mqtt_addrs()
        .iter()
        .map(|a| format!("localhost:{}", a.port()))
        .collect();

    // The gateways, each with the three nodes rotated, and their devices.
    let mut fleet_gws = Vec::new();
    let mut devices_of: BTreeMap<String, Vec<(String, &str)>> = BTreeMap::new();
    for k in 1..=gateways {
        let upstream: Vec<String> = (0..NODES)
            .map(|i| nodes[(k as usize + i) % NODES].clone())
            .collect();
        let devs: Vec<(String, &str)> = (0..per_gateway)
            .map(|i| {
                let n = (k - 1) * per_gateway + i + 1;
                (format!("dev-{n:04}"), class_of(i))
            })
            .collect();
        let pairs: Vec<(&str, &str)> = devs.iter().map(|(d, c)| (d.as_str(), *c)).collect();
        fleet_gws.push(
            FleetGateway::start_with(
                dir.path(),
                &pki,
                k,
                &upstream,
                &pairs,
                &[
                    ("GATEWAY__BRIDGE__PRESENCE_INTERVAL", "1s"),
                    // The cluster can lose a presence (one published while the SDK's
                    // subscription is being set up) or publish a will late, over the presence
                    // of the bridge's new connection: the refresh puts it right.
                    ("GATEWAY__BRIDGE__PRESENCE_REFRESH", "5s"),
                ],
            )
            .await,
        );
        devices_of.insert(gateway_id(k), devs);
    }
    let setup = started.elapsed();

    // Which node carries which bridges; the busiest is the one to kill.
    let mut bridges = [0usize; NODES];
    for (k, gw) in (1..=gateways).zip(&fleet_gws) {
        bridges[node_of(k, gw.proc.metric("bridge_upstream_index"))] += 1;
    }
    let victim = (0..NODES).max_by_key(|n| (bridges[*n], NODES - n)).unwrap();
    let sdk_node = (victim + 1) % NODES;
    let fleet: FleetClient = pki
        .sdk("localhost", cluster.mqtt_addrs()[sdk_node].port())
        .fleet()
        // Long enough to ride out a bridge's fail-over: a request waits in the bridge's
        // session on the cluster until the bridge is back.
        .request_timeout(Duration::from_secs(30))
        .connect()
        .await
        .unwrap();

    // Every gateway online with all its devices, and every device with its gateway.
    eventually_async(
        Duration::from_secs(60),
        "every gateway online with all its devices",
        async || {
            let listed: Vec<_> = fleet
                .gateways()
                .await
                .unwrap()
                .into_iter()
                .map(|p| (p.gateway_id, p.online, p.devices_online))
                .collect();
            let want: Vec<_> = gw_ids
                .iter()
                .map(|g| (g.clone(), true, per_gateway))
                .collect();
            if listed == want {
                Ok(())
            } else {
                Err(listed)
            }
        },
    )
    .await;
    let status = eventually_async(
        Duration::from_secs(60),
        "every device's status and class reach the cloud",
        async || {
            let s = fleet.fleet_status().await.unwrap();
            let n = s
                .devices
                .iter()
                .filter(|d| d.status.connected && d.device_class().is_some())
                .count();
            if n == (gateways * per_gateway) as usize && s.unreachable.is_empty() {
                Ok(s)
            } else {
                Err((n, s.unreachable))
            }
        },
    )
    .await;
    let seen: Vec<(String, String, String)> = status
        .devices
        .iter()
        .map(|d| {
            (
                d.gateway_id.clone(),
                d.status.device_id.clone(),
                d.device_class().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = devices_of
        .iter()
        .flat_map(|(g, devs)| {
            devs.iter()
                .map(|(d, c)| (g.clone(), d.clone(), (*c).to_owned()))
        })
        .collect();
    assert_eq!(seen, want, "fleet status");

    // The update: the valves of every gateway.
    let image_path = dir.path().join("img");
    write_image(&image_path, IMAGE, 11);
    let key = std::fs::read_to_string(pki.dir.join("trust/updates-1.key")).unwrap();
    let signer = UpdateSigner::from_pkcs8_pem(&key).unwrap();
    let mut publish = Publish::new("fw-scale", &image_path);
    publish.class = "valve";
    let built = build_update(&publish.spec(), &signer).unwrap();
    let down_before: Vec<f64> = fleet_gws
        .iter()
        .map(|g| g.proc.metric("bridge_bytes_down_total"))
        .collect();
    let opts = FleetUpdateOptions {
        rollout: Rollout {
            batch: BatchSize::Devices(BATCH as u32),
            max_failures_percent: 0,
        },
        poll: Duration::from_millis(300),
        timeout: Duration::from_secs(180),
        resume: false,
    };

    let (progress_tx, mut progress_rx) = tokio::sync::watch::channel((0usize, 0usize, 0usize));
    let (killed_tx, killed_rx) = tokio::sync::watch::channel(false);
    let rollout_started = Instant::now();
    let t0 = Instant::now();
    let log = |what: String| eprintln!("scale: {:6.1} s {what}", t0.elapsed().as_secs_f64());
    let sensors_of = |gw: &str| -> Vec<String> {
        devices_of[gw]
            .iter()
            .filter(|(_, c)| *c == "sensor")
            .map(|(d, _)| d.clone())
            .collect()
    };
    // Waits until every gateway answers a status query (a rollout restarted before that
    // would leave the silent gateway's valves out of its targets).
    let all_answer = async || {
        eventually_async(
            Duration::from_secs(90),
            "every gateway answers the fleet status",
            async || match fleet.fleet_status().await {
                Ok(s) if s.unreachable.is_empty() && s.gateways.len() == gw_ids.len() => Ok(()),
                Ok(s) => Err(format!("{:?}", s.unreachable)),
                Err(e) => Err(e.to_string()),
            },
        )
        .await;
    };
    let rollout = async {
        // The SDK's rollout is restartable from the gateways' records: a request lost in the
        // cluster's fail-over ends a call, the next call continues the same rollout.
        let mut restarts = 0;
        loop {
            let r = fleet
                .fleet_update(&built, &opts, |p| {
                    let p = p.progress();
                    progress_tx.send_replace((p.targets, p.deployed, p.succeeded));
                })
                .await;
            match r {
                Ok(report) => break (report, rollout_started.elapsed(), restarts),
                Err(e) if restarts < 3 => {
                    restarts += 1;
                    log(format!("rollout call ended: {e}; continued"));
                    all_answer().await;
                }
                Err(e) => panic!("the fleet rollout, after {restarts} restarts: {e}"),
            }
        }
    };
    let commands = async {
        let mut ids: Vec<String> = Vec::new();
        let mut resent = 0;
        for i in 0..COMMANDS {
            if i == COMMANDS / 2 {
                // The second half goes out once the node is dead.
                let mut rx = killed_rx.clone();
                tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|k| *k))
                    .await
                    .expect("the node is killed within 120 s")
                    .unwrap();
            }
            let req = SendCommand {
                command_id: format!("scale-{i:02}"),
                name: "ping".into(),
                payload: format!("c{i}").into_bytes(),
                ..SendCommand::default()
            };
            // Submitted to every gateway: a gateway whose answer was lost in the fail-over, or
            // that was missing from the presence list at that moment (so not a target at
            // all), is sent the same command id again (an idempotency key: the gateway answers
            // the current state, or CONFLICT when the first submission did arrive re-signed).
            let mut pending: Vec<String> =
                match fleet.send_class_command("sensor", req.clone()).await {
                    Ok(cmd) => {
                        let records = cmd.records();
                        gw_ids
                            .iter()
                            .filter(|gw| !records.iter().any(|r| &r.gateway_id == *gw))
                            .cloned()
                            .collect()
                    }
                    Err(e) => {
                        log(format!("class command {i}: {e}"));
                        gw_ids.clone()
                    }
                };
            let deadline = Instant::now() + Duration::from_secs(120);
            while let Some(gw) = pending.first().cloned() {
                assert!(
                    Instant::now() < deadline,
                    "class command {i} not submitted to {pending:?} within 120 s"
                );
                resent += 1;
                let again = SendCommand {
                    device_ids: sensors_of(&gw),
                    ..req.clone()
                };
                match fleet.gateway(&gw).unwrap().send_command(again).await {
                    Ok(_)
                    | Err(cloud_client::SdkError::Api {
                        code: fleet_proto::v1::ApiErrorCode::Conflict,
                        ..
                    }) => {
                        pending.remove(0);
                    }
                    Err(e) => {
                        let bridge = fleet_gws.iter().find(|g| g.id == gw).map(|g| {
                            [
                                "bridge_connected",
                                "bridge_connects_total",
                                "bridge_upstream_index",
                                "bridge_queue_depth",
                                "bridge_queue_age_seconds",
                                "bridge_messages_up_total",
                                "bridge_messages_down_total",
                            ]
                            .map(|m| format!("{m}={}", g.proc.metric(m)))
                            .join(" ")
                        });
                        log(format!(
                            "class command {i} to {gw}: {e}; again (its bridge: {})",
                            bridge.unwrap_or_default()
                        ))
                    }
                }
            }
            log(format!("class command {i} submitted"));
            ids.push(req.command_id);
        }
        (ids, resent)
    };
    let chaos = async {
        // Mid-rollout: once the first valve committed, while most are still to come.
        tokio::time::timeout(
            Duration::from_secs(120),
            progress_rx.wait_for(|(targets, _, succeeded)| *succeeded >= 1 && succeeded < targets),
        )
        .await
        .expect("a first valve commits within 120 s")
        .unwrap();
        let before = usage(&cluster, victim);
        let at = *progress_rx.borrow();
        cluster.kill(victim);
        log(format!("node n{} killed at {at:?}", victim + 1));
        killed_tx.send_replace(true);
        (before, at)
    };
    let ((report, rollout_time, restarts), (ids, resent), (victim_usage, killed_at)) =
        tokio::join!(rollout, commands, chaos);

    // Every bridge is connected again, to a node alive.
    eventually(
        Duration::from_secs(60),
        "every bridge connected to another node",
        || {
            let on: Vec<_> = (1..=gateways)
                .zip(&fleet_gws)
                .map(|(k, g)| {
                    (
                        g.proc.metric("bridge_connected"),
                        node_of(k, g.proc.metric("bridge_upstream_index")),
                    )
                })
                .collect();
            if on.iter().all(|(c, n)| *c == 1.0 && *n != victim) {
                Ok(())
            } else {
                Err(on)
            }
        },
    )
    .await;

    // The rollout completed: every valve of every gateway committed.
    assert_eq!(report.state, FleetRolloutState::Completed, "{report:?}");
    let valves: Vec<(String, String)> = devices_of
        .iter()
        .flat_map(|(g, devs)| {
            devs.iter()
                .filter(|(_, c)| *c == "valve")
                .map(|(d, _)| (g.clone(), d.clone()))
        })
        .collect();
    let mut targets: Vec<(String, String, TargetState)> = report
        .targets
        .iter()
        .map(|(t, s)| (t.gateway_id.clone(), t.device_id.clone(), *s))
        .collect();
    targets.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let want: Vec<_> = valves
        .iter()
        .map(|(g, d)| (g.clone(), d.clone(), TargetState::Succeeded))
        .collect();
    assert_eq!(targets, want, "the rollout's targets");
    for gw in &fleet_gws {
        for (dev, (id, class)) in gw.devices.iter().zip(&devices_of[&gw.id]) {
            assert_eq!(
                dev.printed("update fw-scale committed"),
                *class == "valve",
                "{}/{id} ({class}): committed fw-scale",
                gw.id
            );
        }
    }

    // Every command reached a final state on every sensor, and ran exactly once.
    let sensors: Vec<(String, String)> = devices_of
        .iter()
        .flat_map(|(g, devs)| {
            devs.iter()
                .filter(|(_, c)| *c == "sensor")
                .map(|(d, _)| (g.clone(), d.clone()))
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        eventually_async(
            Duration::from_secs(90),
            format!("command {i} ({id}) succeeded on every sensor"),
            async || {
                let mut got = Vec::new();
                for gw in &gw_ids {
                    match fleet.gateway(gw).unwrap().get_command(id, None).await {
                        Ok(recs) => got.extend(
                            recs.into_iter()
                                .map(|r| (gw.clone(), r.device_id.clone(), r.state())),
                        ),
                        Err(e) => return Err(format!("{gw}: {e}")),
                    }
                }
                got.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
                let want: Vec<_> = sensors
                    .iter()
                    .map(|(g, d)| (g.clone(), d.clone(), CommandState::Succeeded))
                    .collect();
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            },
        )
        .await;
    }
    for (g, d) in &sensors {
        let ran = DeviceOpts::new(&dir.path().join(g), d).ran();
        for (i, id) in ids.iter().enumerate() {
            let times = ran.iter().filter(|r| *r == id).count();
            assert_eq!(times, 1, "{g}/{d} ran command {i} ({id}) {times} times");
        }
    }

    // Still every gateway listed online.
    eventually_async(
        Duration::from_secs(30),
        "every gateway listed online after the fail-over",
        async || {
            let listed: Vec<_> = fleet
                .gateways()
                .await
                .unwrap()
                .into_iter()
                .map(|p| (p.gateway_id, p.online))
                .collect();
            let want: Vec<_> = gw_ids.iter().map(|g| (g.clone(), true)).collect();
            if listed == want {
                Ok(())
            } else {
                Err(listed)
            }
        },
    )
    .await;

    // The figures.
    let mut text = String::new();
    let _ = writeln!(
        text,
        "=== scale summary: {gateways} gateways x {per_gateway} devices, 3 NATS nodes ==="
    );
    let _ = writeln!(
        text,
        "setup (PKI, cluster, gateways, devices): {:.1} s",
        setup.as_secs_f64()
    );
    let _ = writeln!(
        text,
        "rollout of {} KiB to {} valves, batches of {BATCH}: {:.1} s, {restarts} restarts \
         (node n{} killed at {}/{} deployed, {} committed); {COMMANDS} class commands to {} \
         sensors, {resent} re-sent to a gateway",
        IMAGE >> 10,
        valves.len(),
        rollout_time.as_secs_f64(),
        victim + 1,
        killed_at.1,
        killed_at.0,
        killed_at.2,
        sensors.len()
    );
    let mut worst = 0.0f64;
    for (gw, before) in fleet_gws.iter().zip(&down_before) {
        let carried = gw.proc.metric("bridge_bytes_down_total") - before;
        let ratio = carried / IMAGE as f64;
        worst = worst.max(ratio);
        let _ = writeln!(
            text,
            "{}: uplink payload bytes down {carried:.0} = {ratio:.3} x image",
            gw.id
        );
    }
    for (n, count) in bridges.iter().enumerate() {
        let (rss, cpu) = if n == victim {
            victim_usage
        } else {
            usage(&cluster, n)
        };
        let _ = writeln!(
            text,
            "node n{}: {count} bridges at start, RSS {rss:.1} MiB, CPU {cpu:.2} s{}",
            n + 1,
            if n == victim { " (at its kill)" } else { "" }
        );
    }
    let _ = writeln!(text, "total: {:.1} s", started.elapsed().as_secs_f64());
    {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "{text}");
    }
    // The image crosses each uplink once; the rest is requests and commands.
    assert!(
        worst <= UPLINK_BOUND,
        "a gateway's uplink carried {worst:.3} x the image (bound {UPLINK_BOUND}):\n{text}"
    );
}
