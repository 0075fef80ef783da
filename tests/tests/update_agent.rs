//! The device's update agent against what a hostile service or gateway can send and what a
//! device's own firmware can do to it, end to end: the `gateway` binary, `test-device` on the
//! device library, the SDK, and Debian's `mosquitto_pub` as the misbehaving service.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use cloud_client::{CommandState, DeployUpdate, FleetClient, SendCommand, UpdatePhase};
use fleet_proto::v1::Signature;
use fleet_proto::Message;
use fleet_testkit::{eventually, eventually_async};
use fleet_tests::procs::{status_kib, DeviceOpts, DeviceProc, GatewayProc};
use fleet_tests::updates::{authority, write_image, Publish};

const WAIT: Duration = Duration::from_secs(60);

fn device_opts(dir: &Path, id: &str, key: &Path, extra: &[&str]) -> DeviceOpts {
    let mut o = DeviceOpts::new(dir, id);
    o.args = vec!["--update-key".into(), key.display().to_string()];
    o.args.extend(extra.iter().map(|s| s.to_string()));
    o
}

/// Publishes `payload` as service `svc-0001` (`extra`: more mosquitto_pub arguments).
fn publish_as_service(gw: &GatewayProc, topic: &str, payload: &Path, extra: &[&str]) {
    gw.mosquitto_pub("services", "svc-0001", topic, payload, extra);
}

async fn ping(fleet: &FleetClient, n: u32) {
    let recs = fleet
        .send_command(SendCommand {
            device_ids: vec!["dev-0001".into()],
            name: format!("ping-{n}"),
            ..SendCommand::default()
        })
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!(recs[0].state(), CommandState::Succeeded, "{recs:?}");
}

fn sessions_of(gw: &GatewayProc, id: &str) -> usize {
    gw.log()
        .iter()
        .filter(|l| l.contains("session open") && l.contains(&format!("client_id=\"{id}\"")))
        .count()
}

/// D1: a service publishes, retained, an envelope of 10,000 signatures whose key ids are
/// control bytes. It used to make the device's rejection report larger than the gateway's
/// packet limit, so the device was cut off at every connection and never ran a command again.
/// Now the device refuses it unread with a short report, stays connected and keeps running
/// commands. A genuine manifest for another class, pushed the same way, is refused by the
/// device itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_retained_manifest_from_a_service_does_not_cut_the_device_off() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let fleet = gw.fleet().await;
    let (signer, _, public) = authority(dir.path());
    let dev = DeviceProc::start(
        &gw.address(),
        &gw.pki(),
        &device_opts(dir.path(), "dev-0001", &public, &[]),
    );
    dev.connected(WAIT).await;
    ping(&fleet, 0).await;
    assert_eq!(sessions_of(&gw, "dev-0001"), 1);

    let image = dir.path().join("img");
    write_image(&image, 64 << 10, 3);
    let built =
        cloud_client::build_update(&Publish::new("u-genuine", &image).spec(), &signer).unwrap();
    let mut hostile = built.signed.clone();
    // Key ids of 64 control bytes: echoed Debug-formatted, 10,000 of them were over 3 MiB.
    hostile.signatures = (0..10_000u32)
        .map(|i| Signature {
            key_id: (0..64u32)
                .map(|k| char::from(((i + k) % 31 + 1) as u8))
                .collect(),
            algorithm: 1,
            signature: vec![0xEE; 64],
        })
        .collect();
    let bytes = hostile.encode_to_vec();
    assert!(
        bytes.len() > 1 << 20 && bytes.len() < 2 << 20,
        "{}",
        bytes.len()
    );
    let path = dir.path().join("hostile");
    std::fs::write(&path, &bytes).unwrap();
    publish_as_service(&gw, "devices/dev-0001/update/manifest", &path, &["-r"]);
    eventually(WAIT, "the device refuses the envelope", || {
        dev.printed("update  rejected 0/0 rejected=0 error=malformed_manifest")
    })
    .await;
    for n in 1..=3 {
        ping(&fleet, n).await;
    }

    // A genuinely signed manifest of another class, pushed past the gateway's deploy checks.
    let mut p = Publish::new("u-valve", &image);
    p.class = "valve";
    let valve = cloud_client::build_update(&p.spec(), &signer).unwrap();
    let path = dir.path().join("valve");
    std::fs::write(&path, valve.signed.encode_to_vec()).unwrap();
    publish_as_service(&gw, "devices/dev-0001/update/manifest", &path, &["-r"]);
    eventually(WAIT, "the device refuses the other class", || {
        dev.printed("update u-valve rejected 0/0 rejected=0 error=wrong_class")
    })
    .await;
    ping(&fleet, 4).await;
    assert_eq!(
        sessions_of(&gw, "dev-0001"),
        1,
        "the device was disconnected: {:?}",
        gw.log()
    );
    assert!(
        !std::fs::read_dir(dir.path().join("dev-0001-state/update/staging"))
            .unwrap()
            .any(|_| true)
    );
}

/// D2: firmware whose commit step restarts the device (here: aborts the process) after the
/// agent journaled the raised sequence. The device comes back after the manifest expired: the
/// commit is finished, not refused and not installed again, and the counter is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_aborts_the_process_is_finished_after_restart_even_past_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let fleet = gw.fleet().await;
    let (signer, _, public) = authority(dir.path());
    let image_path = dir.path().join("img");
    let image = write_image(&image_path, 128 << 10, 4);
    let opts = device_opts(dir.path(), "dev-0001", &public, &["--abort-in-commit"]);
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    dev.connected(WAIT).await;

    // Valid long enough to publish, deploy and install; on a slow machine tried again with
    // twice the time (a new id each time), so load makes the test slower, never red.
    let mut valid_ms = 8_000;
    let (id, expires_at_ms) = loop {
        let id = format!("u-abort-{valid_ms}");
        let mut p = Publish::new(&id, &image_path);
        p.expires_in_ms = valid_ms;
        let expires_at_ms = p.spec().expires_at_ms;
        let ok = match p.try_run(&fleet, &signer).await {
            Ok(_) => fleet
                .deploy_update(DeployUpdate {
                    update_id: id.clone(),
                    device_ids: vec!["dev-0001".into()],
                    ..DeployUpdate::default()
                })
                .await
                .is_ok(),
            Err(_) => false,
        };
        if ok {
            break (id, expires_at_ms);
        }
        assert!(valid_ms < 256_000, "could not publish and deploy in time");
        valid_ms *= 2;
    };
    let status = dev.wait_exit(WAIT);
    assert!(!status.success(), "the commit hook aborts the process");
    assert!(opts.state.join("aborted-in-commit").exists());
    let journal = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(opts.state.join("update/journal.json")).unwrap())
            .unwrap()
    };
    let j = journal();
    assert_eq!(j["installed_sequence"], 11, "raised before commit ran: {j}");
    assert!(j["current"]["phase"]["Committing"].is_object(), "{j}");

    // Back after the manifest expired.
    eventually(WAIT, "the manifest expires", || {
        fleet_proto::time::now_ms() > expires_at_ms + 500
    })
    .await;
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    dev.connected(WAIT).await;
    eventually(WAIT, "the device commits", || {
        dev.printed(&format!("update {id} committed"))
    })
    .await;
    let r = eventually_async(WAIT, "the gateway learns it", async || {
        let r = fleet.get_update(&id).await.unwrap();
        match r.targets.first() {
            Some(t) if t.phase() == UpdatePhase::Committed => Ok(r),
            _ => Err(r),
        }
    })
    .await;
    assert_eq!(r.targets[0].device_id, "dev-0001");
    assert!(
        !dev.lines()
            .iter()
            .any(|l| l.contains("installing") || l.contains("downloading")),
        "installed again: {:?}",
        dev.lines()
    );
    let active = device_client::SlotInstaller::new(&opts.state)
        .active_image("rootfs")
        .unwrap();
    assert!(std::fs::read(active).unwrap() == image);
    let j = journal();
    assert_eq!(
        (j["installed_sequence"].clone(), j["current"].clone()),
        (11.into(), serde_json::Value::Null)
    );
    dev.kill();
    // A third start: the answer stands, nothing runs again.
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    dev.connected(WAIT).await;
    eventually(WAIT, "the final report again", || {
        dev.printed(&format!("update {id} committed"))
    })
    .await;
    assert!(!dev.lines().iter().any(|l| l.contains("installing")));
}

/// D5: a gateway floods the device with garbage chunks while the device runs a long
/// self-test (no chunk is expected then; the self-test ends when the test says so). The device drops them unread: its peak memory grows
/// by far less than the flood, and the update still commits. (The gateway's default policy
/// does not let services publish chunks; this gateway runs a policy that does, standing in
/// for a compromised gateway.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_chunks_during_a_long_self_test_cost_the_device_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let default_policy = include_str!("../../broker/src/acl/default_policy.toml");
    std::fs::write(
        &policy,
        default_policy.replace(
            "    \"devices/+/update/manifest\",\n    \"fleet/api/{id}/request\",",
            "    \"devices/+/update/manifest\",\n    \"devices/+/update/chunk\",\n    \"fleet/api/{id}/request\",",
        ),
    )
    .unwrap();
    let gw = GatewayProc::start(
        dir.path(),
        1,
        &[("GATEWAY__ACL__POLICY", policy.to_str().unwrap())],
    );
    let fleet = gw.fleet().await;
    let (signer, _, public) = authority(dir.path());
    let image_path = dir.path().join("img");
    write_image(&image_path, 128 << 10, 5);
    let go = dir.path().join("self-test-passes");
    let opts = device_opts(
        dir.path(),
        "dev-0001",
        &public,
        &["--self-test-until", go.to_str().unwrap()],
    );
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &opts);
    dev.connected(WAIT).await;
    Publish::new("u-flood", &image_path)
        .run(&fleet, &signer)
        .await;
    fleet
        .deploy_update(DeployUpdate {
            update_id: "u-flood".into(),
            device_ids: vec!["dev-0001".into()],
            ..DeployUpdate::default()
        })
        .await
        .unwrap();
    eventually(WAIT, "the self-test starts", || {
        dev.printed("update u-flood self_test")
    })
    .await;
    let before = status_kib(dev.pid(), "VmHWM:");
    // 60 x 1.5 MiB: 90 MiB of garbage on the device's chunk topic.
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0x0Au8; 3 << 19]).unwrap();
    publish_as_service(
        &gw,
        "devices/dev-0001/update/chunk",
        &garbage,
        &["--repeat", "60", "--repeat-delay", "0.03"],
    );
    // Paced, so that the gateway's own queue limits let it through to the device.
    // The device saw the flood and dropped it unread.
    // The device saw the flood and dropped it unread. (Its chunk subscription is QoS 0, so
    // the gateway may shed a few under pressure.)
    eventually(WAIT, "the device drops most of the garbage", || {
        dev.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("update_chunks_dropped "))
            .filter_map(|n| n.parse::<u32>().ok())
            .any(|n| n >= 45)
    })
    .await;
    assert!(!dev.printed("update u-flood committed"));
    std::fs::write(&go, b"").unwrap();
    eventually(WAIT, "the update commits", || {
        dev.printed("update u-flood committed")
    })
    .await;
    let after = status_kib(dev.pid(), "VmHWM:");
    println!("device peak RSS {before} KiB before the 90 MiB flood, {after} KiB after");
    assert!(
        after.saturating_sub(before) < 40 << 10,
        "peak RSS grew from {before} KiB to {after} KiB"
    );
}
