//! Signed, resumable, chunk-verified updates end to end, with real processes: the `gateway`
//! binary, `test-device` devices on the device library (A/B slot files), `fleetctl` and the SDK
//! as the update authority and operator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloud_client::{
    CampaignState, DeployUpdate, FleetClient, UpdateError, UpdatePhase, UpdateRecord,
};
use fleet_testkit::{eventually, eventually_async};
use fleet_tests::procs::{DeviceOpts, DeviceProc, GatewayProc};
use fleet_tests::proxy::{Relay, Target};
use fleet_tests::updates::{authority, write_image, Publish};

/// How long one fleetctl run may take (a deploy with `--wait` included).
const FLEETCTL: Duration = Duration::from_secs(300);

/// Polls the update until `cond` holds on its record (the last record is in the failure).
async fn until_update(
    fleet: &FleetClient,
    id: &str,
    timeout: Duration,
    cond: impl Fn(&UpdateRecord) -> bool,
) -> UpdateRecord {
    eventually_async(timeout, format!("update {id} gets there"), async || {
        let r = fleet.get_update(id).await.unwrap();
        if cond(&r) {
            Ok(r)
        } else {
            Err(r)
        }
    })
    .await
}

fn device_opts(dir: &Path, id: &str, key: &Path, extra: &[&str]) -> DeviceOpts {
    let mut o = DeviceOpts::new(dir, id);
    o.args = vec!["--update-key".into(), key.display().to_string()];
    o.args.extend(extra.iter().map(|s| s.to_string()));
    o
}

/// The running slot's image of a test device.
fn active_image(o: &DeviceOpts) -> PathBuf {
    device_client::SlotInstaller::new(&o.state)
        .active_image("rootfs")
        .unwrap()
}

fn fleetctl(gw: &GatewayProc, args: &[&str]) -> std::process::Output {
    gw.fleetctl(args, FLEETCTL)
}

/// `fleetctl update create` of `image` as component rootfs, version 1.1.0 of test-class,
/// sequence 11, signed with `key`, under `id`, with `extra` options.
fn fleetctl_create(gw: &GatewayProc, image: &Path, key: &Path, id: &str, extra: &[&str]) {
    let mut args = vec!["update", "create", "--image"];
    args.push(image.to_str().unwrap());
    args.extend([
        "--component",
        "rootfs",
        "--version",
        "1.1.0",
        "--class",
        "test-class",
    ]);
    args.extend([
        "--sequence",
        "11",
        "--key",
        key.to_str().unwrap(),
        "--id",
        id,
    ]);
    args.extend(extra);
    let out = fleetctl(gw, &args);
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the gateway knows `device`'s class to be `class` (from its presence).
async fn class_known(fleet: &FleetClient, device: &str, class: &str) {
    eventually_async(
        Duration::from_secs(30),
        format!("the gateway knows {device}'s class"),
        async || {
            let s = fleet.status(&[device.into()]).await.unwrap();
            let known = s
                .first()
                .and_then(|s| s.presence.as_ref())
                .is_some_and(|p| p.device_class == class);
            if known {
                Ok(())
            } else {
                Err(s)
            }
        },
    )
    .await;
}

fn target<'a>(r: &'a UpdateRecord, device: &str) -> &'a cloud_client::TargetRecord {
    r.targets
        .iter()
        .find(|t| t.device_id == device)
        .unwrap_or_else(|| panic!("{device} is not a target: {r:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_devices_go_from_1_0_to_1_1_with_an_8_mib_image() {
    const N: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), N as u32, &[]);
    let (_, key, public) = authority(dir.path());
    let image_path = dir.path().join("rootfs-1.1.img");
    let image = write_image(&image_path, 8 << 20, 1);
    let opts: Vec<DeviceOpts> = (1..=N)
        .map(|i| device_opts(dir.path(), &format!("dev-{i:04}"), &public, &[]))
        .collect();
    let devs: Vec<DeviceProc> = opts
        .iter()
        .map(|o| DeviceProc::start(&gw.address(), &gw.pki(), o))
        .collect();
    for d in &devs {
        d.connected(Duration::from_secs(30)).await;
    }

    // The update authority signs and uploads with fleetctl.
    fleetctl_create(&gw, &image_path, &key, "fw-1.1", &[]);
    // Every known device of the class (they told the gateway with their presence), at once.
    let out = fleetctl(
        &gw,
        &[
            "--json",
            "update",
            "deploy",
            "fw-1.1",
            "--class",
            "test-class",
            "--batch",
            "all",
            "--max-failures",
            "100",
            "--wait",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deploy: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["campaign"]["state"], "completed");
    assert_eq!(v["summary"]["committed"], N);
    let targets = v["targets"].as_array().unwrap();
    assert_eq!(targets.len(), N);
    for t in targets {
        assert_eq!(t["phase"], "committed", "{t}");
        assert_eq!(t["running_version"], "1.1.0", "{t}");
    }
    for o in &opts {
        let slot = std::fs::read(active_image(o)).unwrap();
        assert!(
            slot == image,
            "{}: the running slot differs from the source image",
            o.id
        );
    }
    // Human output of status shows the summary line.
    let out = fleetctl(&gw, &["update", "status", "fw-1.1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{N} devices: {N} committed, 0 failed")),
        "{text}"
    );
}

/// Held chunks in the device's latest `update ... downloading H/T` line.
fn held(dev: &DeviceProc) -> u32 {
    dev.lines()
        .iter()
        .rev()
        .find_map(|l| {
            let rest = l.strip_prefix("update ")?;
            let mut parts = rest.split_whitespace();
            let (_, phase, ht) = (parts.next()?, parts.next()?, parts.next()?);
            (phase == "downloading").then_some(())?;
            ht.split_once('/')?.0.parse().ok()
        })
        .unwrap_or(0)
}

async fn deploy(fleet: &FleetClient, id: &str, devices: &[&str], batch: u32, max_failures: u32) {
    fleet
        .deploy_update(DeployUpdate {
            update_id: id.into(),
            device_ids: devices.iter().map(|d| d.to_string()).collect(),
            batch_size: batch,
            max_failures_percent: max_failures,
            ..DeployUpdate::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_killed_half_way_resumes_and_fetches_under_1_6x_the_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let fleet = gw.fleet().await;
    let (signer, _, public) = authority(dir.path());
    let image_path = dir.path().join("img");
    let image = write_image(&image_path, 8 << 20, 2);
    let rec = Publish::new("fw-resume", &image_path)
        .run(&fleet, &signer)
        .await;
    let count = rec.images[0].chunk_count;
    assert_eq!(count, 512);
    // A small window makes the download take many round trips, so "half way" is a moment the
    // test can catch.
    let o = device_opts(dir.path(), "dev-0001", &public, &["--window", "2"]);
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &o);
    deploy(&fleet, "fw-resume", &["dev-0001"], 0, 0).await;
    eventually(Duration::from_secs(60), "half the chunks held", || {
        held(&dev) >= count / 2
    })
    .await;
    dev.kill();
    let at_kill = fleet.get_update("fw-resume").await.unwrap();
    let sent_before = target(&at_kill, "dev-0001").chunks_sent;
    assert!(
        sent_before < u64::from(count),
        "killed too late: {sent_before} sent"
    );

    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &o);
    let r = until_update(&fleet, "fw-resume", Duration::from_secs(120), |r| {
        target(r, "dev-0001").phase() == UpdatePhase::Committed
    })
    .await;
    let t = target(&r, "dev-0001");
    eprintln!(
        "resume: killed after {sent_before} chunks sent; {} sent in total for {count}",
        t.chunks_sent
    );
    assert!(
        (t.chunks_sent as f64) < 1.6 * f64::from(count),
        "fetched {} chunks for a {count}-chunk image",
        t.chunks_sent
    );
    // It resumed: its first report after the restart already held about half.
    let first = dev
        .lines()
        .into_iter()
        .find(|l| l.contains("downloading"))
        .unwrap();
    let resumed: u32 = first
        .split_whitespace()
        .nth(3)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(resumed >= count / 3, "restarted from {resumed}: {first}");
    assert!(std::fs::read(active_image(&o)).unwrap() == image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_every_hundred_chunks_still_completes() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let fleet = gw.fleet().await;
    let (signer, _, public) = authority(dir.path());
    let image_path = dir.path().join("img");
    let image = write_image(&image_path, 8 << 20, 3);
    Publish::new("fw-flaky", &image_path)
        .run(&fleet, &signer)
        .await;
    // ~100 chunks of 16 KiB (plus framing) per connection.
    let proxy = fleet_tests::proxy::CuttingProxy::start(gw.addr, 100 * 16 * 1024)
        .await
        .unwrap();
    let o = device_opts(dir.path(), "dev-0001", &public, &[]);
    let _dev = DeviceProc::start(&format!("localhost:{}", proxy.addr.port()), &gw.pki(), &o);
    deploy(&fleet, "fw-flaky", &["dev-0001"], 0, 0).await;
    until_update(&fleet, "fw-flaky", Duration::from_secs(180), |r| {
        target(r, "dev-0001").phase() == UpdatePhase::Committed
    })
    .await;
    let r = fleet.get_update("fw-flaky").await.unwrap();
    eprintln!(
        "cuts: {} connections cut, {} chunks sent for 512",
        proxy.cuts(),
        target(&r, "dev-0001").chunks_sent
    );
    assert!(proxy.cuts() >= 4, "only {} cuts", proxy.cuts());
    assert!(std::fs::read(active_image(&o)).unwrap() == image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_chunks_are_rejected_and_persistent_corruption_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("img");
    let image = write_image(&image_path, 1 << 20, 4);

    // A gateway in `dir/name` corrupting every `every`th chunk it sends, fw-c published and
    // deployed to `device`; the device's target record once it reaches `until`.
    let run =
        |name: &'static str, every: &'static str, device: &'static str, until: UpdatePhase| {
            let (dir, image_path) = (dir.path(), &image_path);
            async move {
                let at = dir.join(name);
                std::fs::create_dir_all(&at).unwrap();
                let gw = GatewayProc::start(&at, 2, &[("GATEWAY_TEST_CORRUPT_CHUNKS", every)]);
                // Each gateway has its own development PKI, so its own updates key.
                let (signer, _, public) = authority(&at);
                let (signer, public) = (&signer, &public);
                // The switch is announced before the ready line, so it is in the log by now.
                assert!(
                    gw.logged("corrupts chunks"),
                    "the gateway binary lacks the fault-injection feature (cargo test builds it)"
                );
                let fleet = gw.fleet().await;
                Publish::new("fw-c", image_path).run(&fleet, signer).await;
                let o = device_opts(&at, device, public, &[]);
                let dev = DeviceProc::start(&gw.address(), &gw.pki(), &o);
                deploy(&fleet, "fw-c", &[device], 0, 0).await;
                let r = until_update(&fleet, "fw-c", Duration::from_secs(120), |r| {
                    target(r, device).phase() == until
                })
                .await;
                (target(&r, device).clone(), o, dev)
            }
        };

    // Every 7th chunk corrupted: each is caught, asked again, and the update commits.
    let (t, o, _dev) = run("sporadic", "7", "dev-0001", UpdatePhase::Committed).await;
    assert!(t.chunks_rejected >= 64 / 7, "{t:?}");
    assert!(std::fs::read(active_image(&o)).unwrap() == image);

    // Every chunk corrupted: the update fails with the reason; the running slot is untouched.
    let (t, o, dev) = run("always", "1", "dev-0002", UpdatePhase::Failed).await;
    assert_eq!(t.error(), UpdateError::ChunkVerification, "{t:?}");
    assert!(t.detail.contains("failed verification"), "{t:?}");
    assert_eq!(t.chunks_held, 0);
    assert!(dev.printed("update fw-c failed"));
    let slots = o.state.join("slots");
    assert!(!slots.join("rootfs/active").exists() && !slots.join("rootfs/pending").exists());
    assert!(!active_image(&o).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_modified_stale_foreign_and_expired_manifests_are_rejected_with_nothing_downloaded()
{
    use fleet_proto::signing::UpdateSigner;
    use fleet_proto::Message;

    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let fleet = gw.fleet().await;
    let (signer, _, public) = authority(dir.path());
    let image_path = dir.path().join("img");
    write_image(&image_path, 256 << 10, 5);
    // The factory firmware has sequence 5.
    let o = device_opts(
        dir.path(),
        "dev-0001",
        &public,
        &["--factory-sequence", "5"],
    );
    let dev = DeviceProc::start(&gw.address(), &gw.pki(), &o);
    dev.connected(Duration::from_secs(30)).await;

    let forger = UpdateSigner::generate();
    let mut cases: Vec<(&str, UpdateError)> = Vec::new();
    // Signed by a key the device does not trust.
    Publish::new("u-forged", &image_path)
        .run(&fleet, &forger)
        .await;
    cases.push(("u-forged", UpdateError::UnknownKey));
    // One manifest byte changed after signing (a letter of the description).
    let built =
        cloud_client::build_update(&Publish::new("u-modified", &image_path).spec(), &signer)
            .unwrap();
    let mut signed = built.signed.clone();
    let at = signed.manifest.len() - 2;
    signed.manifest[at] ^= 0x01;
    assert!(fleet_proto::v1::UpdateManifest::decode(signed.manifest.as_slice()).is_ok());
    fleet.create_update(signed).await.unwrap();
    cases.push(("u-modified", UpdateError::BadSignature));
    // Equal and older sequences.
    let mut p = Publish::new("u-equal", &image_path);
    p.sequence = 5;
    p.run(&fleet, &signer).await;
    cases.push(("u-equal", UpdateError::NotNewer));
    let mut p = Publish::new("u-older", &image_path);
    p.sequence = 3;
    p.run(&fleet, &signer).await;
    cases.push(("u-older", UpdateError::NotNewer));

    for (id, want) in &cases {
        deploy(&fleet, id, &["dev-0001"], 0, 0).await;
        let r = until_update(&fleet, id, Duration::from_secs(30), |r| {
            target(r, "dev-0001").phase() == UpdatePhase::Rejected
        })
        .await;
        let t = target(&r, "dev-0001");
        assert_eq!(t.error(), *want, "{id}: {t:?}");
        assert!(!t.detail.is_empty(), "{id}: no reason given");
        assert_eq!(t.chunks_sent, 0, "{id}: chunks were downloaded");
    }

    // Another device class: the gateway, which knows the device's class from its presence,
    // refuses to offer it and names the device (the device would reject it as well: the
    // class is part of its freshness check).
    let mut p = Publish::new("u-class", &image_path);
    p.class = "valve";
    p.run(&fleet, &signer).await;
    class_known(&fleet, "dev-0001", "test-class").await;
    let refused = fleet
        .deploy_update(DeployUpdate {
            update_id: "u-class".into(),
            device_ids: vec!["dev-0001".into()],
            ..DeployUpdate::default()
        })
        .await;
    match refused {
        Err(cloud_client::SdkError::Api { code, message }) => {
            assert_eq!(code, cloud_client::ApiErrorCode::Invalid, "{message}");
            assert!(message.contains("dev-0001 (test-class)"), "{message}");
        }
        other => panic!("a foreign class was deployed: {other:?}"),
    }

    // Expired: valid when deployed, expired by the time the device comes back. The gateway
    // refuses to take or deploy an expired manifest, so the signature must outlive the
    // publish and the deploy; on a machine too slow for that, the same is tried again with
    // twice the time (a new update id each time), so load makes the test slower, never red.
    dev.kill();
    let mut valid_ms = 3_000;
    let (id, expires_at_ms) = loop {
        let id = format!("u-expired-{valid_ms}");
        let mut p = Publish::new(&id, &image_path);
        p.expires_in_ms = valid_ms;
        let expires_at_ms = p.spec().expires_at_ms;
        let published = p.try_run(&fleet, &signer).await;
        let deployed = match &published {
            Ok(_) => fleet
                .deploy_update(DeployUpdate {
                    update_id: id.clone(),
                    device_ids: vec!["dev-0001".into()],
                    ..DeployUpdate::default()
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match (published, deployed) {
            (Ok(rec), Ok(())) => break (id, rec.expires_at_ms),
            (_, Err(e)) => assert!(
                // Only a manifest that ran out of time may fail (the spec was made first, so
                // the manifest expires no earlier than this).
                fleet_proto::time::now_ms() >= expires_at_ms,
                "{id} failed while its manifest was still valid: {e}"
            ),
            (Err(_), Ok(())) => unreachable!("deployed without being published"),
        }
        assert!(valid_ms < 200_000, "never fast enough to deploy");
        valid_ms *= 2;
    };
    // The device comes back once the manifest's own time is up.
    eventually(
        Duration::from_millis(valid_ms + 30_000),
        "the manifest expires",
        || fleet_proto::time::now_ms() > expires_at_ms,
    )
    .await;
    let _dev = DeviceProc::start(&gw.address(), &gw.pki(), &o);
    let r = until_update(&fleet, &id, Duration::from_secs(30), |r| {
        target(r, "dev-0001").phase() == UpdatePhase::Rejected
    })
    .await;
    let t = target(&r, "dev-0001");
    assert_eq!(t.error(), UpdateError::Expired, "{t:?}");
    assert_eq!(t.chunks_sent, 0);
    assert!(!active_image(&o).exists(), "nothing was installed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_self_test_rolls_back_and_the_campaign_pauses_at_its_failure_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 4, &[]);
    let (_, key, public) = authority(dir.path());
    let image_path = dir.path().join("img");
    let image = write_image(&image_path, 512 << 10, 6);
    let opts: Vec<DeviceOpts> = (1..=4)
        .map(|i| {
            let extra: &[&str] = if i == 1 { &["--fail-self-test"] } else { &[] };
            device_opts(dir.path(), &format!("dev-{i:04}"), &public, extra)
        })
        .collect();
    let _devs: Vec<DeviceProc> = opts
        .iter()
        .map(|o| DeviceProc::start(&gw.address(), &gw.pki(), o))
        .collect();
    fleetctl_create(&gw, &image_path, &key, "fw-st", &["--chunk-size", "8KiB"]);
    // Two batches of two; more than 25 % failed after the first pauses the campaign.
    let out = fleetctl(
        &gw,
        &[
            "update",
            "deploy",
            "fw-st",
            "-d",
            "dev-0001",
            "-d",
            "dev-0002",
            "-d",
            "dev-0003",
            "-d",
            "dev-0004",
            "--batch",
            "2",
            "--max-failures",
            "25",
            "--wait",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a paused campaign is not a success: {text}"
    );
    assert!(text.contains("campaign paused"), "{text}");
    let fleet = gw.fleet().await;
    let r = fleet.get_update("fw-st").await.unwrap();
    assert_eq!(r.campaign.as_ref().unwrap().state(), CampaignState::Paused);
    let t1 = target(&r, "dev-0001");
    assert_eq!(t1.phase(), UpdatePhase::RolledBack, "{t1:?}");
    assert_eq!(t1.error(), UpdateError::SelfTestFailed);
    assert_eq!(target(&r, "dev-0002").phase(), UpdatePhase::Committed);
    for d in ["dev-0003", "dev-0004"] {
        let t = target(&r, d);
        assert!(!t.offered && t.phase() == UpdatePhase::Unspecified, "{t:?}");
    }
    // The rolled-back device still runs its old slot; the other got the new image.
    assert!(!active_image(&opts[0]).exists());
    assert!(!opts[0].state.join("slots/rootfs/pending").exists());
    assert!(std::fs::read(active_image(&opts[1])).unwrap() == image);

    // The operator resumes: the second batch goes out and the campaign completes.
    let out = fleetctl(&gw, &["update", "resume", "fw-st"]);
    assert!(out.status.success());
    let out = fleetctl(
        &gw,
        &[
            "--json",
            "update",
            "status",
            "fw-st",
            "--wait",
            "--timeout",
            "2m",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["campaign"]["state"], "completed", "{v}");
    assert_eq!(v["summary"]["committed"], 3);
    assert_eq!(v["summary"]["failed"], 1);
    assert_eq!(out.status.code(), Some(1), "one device failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_defaults_offer_one_device_first_and_pause_at_its_failure_and_refuse_another_class(
) {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 4, &[]);
    let (_, key, public) = authority(dir.path());
    let image_path = dir.path().join("img");
    write_image(&image_path, 64 << 10, 7);
    let opts: Vec<DeviceOpts> = (1..=4)
        .map(|i| {
            let extra: &[&str] = match i {
                1 => &["--fail-self-test"],
                4 => &["--class", "other-class"],
                _ => &[],
            };
            device_opts(dir.path(), &format!("dev-{i:04}"), &public, extra)
        })
        .collect();
    let devs: Vec<DeviceProc> = opts
        .iter()
        .map(|o| DeviceProc::start(&gw.address(), &gw.pki(), o))
        .collect();
    for d in &devs {
        d.connected(Duration::from_secs(30)).await;
    }
    fleetctl_create(&gw, &image_path, &key, "fw-def", &["--chunk-size", "8KiB"]);
    let fleet = gw.fleet().await;
    class_known(&fleet, "dev-0004", "other-class").await;

    // A target of another class: refused, named, nothing deployed.
    let out = fleetctl(
        &gw,
        &[
            "update", "deploy", "fw-def", "-d", "dev-0002", "-d", "dev-0004",
        ],
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("dev-0004 (other-class)"), "{said}");
    assert!(!said.contains("dev-0002 ("), "{said}");
    let r = fleet.get_update("fw-def").await.unwrap();
    assert!(r.campaign.is_none(), "{r:?}");

    // The defaults: one device first (5 % of three, rounded up), and its failure pauses the
    // campaign before anyone else is offered the update.
    let out = fleetctl(
        &gw,
        &[
            "update", "deploy", "fw-def", "-d", "dev-0001", "-d", "dev-0002", "-d", "dev-0003",
            "--wait",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("campaign paused"), "{text}");
    let r = fleet.get_update("fw-def").await.unwrap();
    let c = r.campaign.as_ref().unwrap();
    assert_eq!(
        (c.batch_size, c.batches, c.max_failures_percent),
        (1, 3, 1),
        "{c:?}"
    );
    assert_eq!(c.state(), CampaignState::Paused, "{c:?}");
    let t1 = target(&r, "dev-0001");
    assert_eq!(t1.phase(), UpdatePhase::RolledBack, "{t1:?}");
    for d in ["dev-0002", "dev-0003"] {
        let t = target(&r, d);
        assert!(!t.offered && t.phase() == UpdatePhase::Unspecified, "{t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_update_over_the_image_budget_is_refused_before_anything_is_stored() {
    use cloud_client::{ApiErrorCode, SdkError};
    use fleet_proto::v1::{Component, SignedManifest, UpdateManifest};
    use fleet_proto::Message;

    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let (signer, _, _) = authority(dir.path());
    // Sixteen components of u32::MAX - 1 chunks of 1 KiB: consistent with their sizes, so
    // only the budget stands between them and a 512 MiB upload bitmap each.
    let now = fleet_proto::time::now_ms();
    let m = UpdateManifest {
        format_version: fleet_proto::manifest::FORMAT_VERSION,
        update_id: "fw-huge".into(),
        device_class: "test-class".into(),
        version: "9.9.9".into(),
        sequence: 99,
        issued_at_ms: now,
        expires_at_ms: now + 3_600_000,
        components: (0..16u8)
            .map(|i| Component {
                name: format!("c{i}"),
                size: u64::from(u32::MAX - 1) * 1024,
                sha256: vec![i; 32],
                chunk_size: 1024,
                chunk_count: u32::MAX - 1,
                merkle_root: vec![1; 32],
            })
            .collect(),
        description: String::new(),
    };
    let bytes = m.encode_to_vec();
    let signed = SignedManifest {
        withdrawal: Default::default(),
        signatures: vec![signer.sign(&bytes)],
        manifest: bytes,
    };
    let fleet = gw.fleet().await;
    match fleet.create_update(signed).await {
        Err(SdkError::Api { code, message }) => {
            assert_eq!(code, ApiErrorCode::Limit, "{message}");
            assert!(message.contains("updates.max_update_bytes"), "{message}");
        }
        other => panic!("not refused: {other:?}"),
    }
    // Nothing was registered, the gateway still answers, and the refusal was counted.
    match fleet.get_update("fw-huge").await {
        Err(SdkError::Api { code, .. }) => assert_eq!(code, ApiErrorCode::NotFound),
        other => panic!("registered after all: {other:?}"),
    }
    assert_eq!(gw.metric("update_requests_refused_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restarted_mid_campaign_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 4, &[]);
    // The devices reconnect to the restarted gateway at the address they know: a relay holds
    // it for the whole test (see `Relay`), each gateway binds its own port 0.
    let relay = Relay::start(Some(Target::Tcp(gw.addr))).unwrap();
    let fleet = gw.fleet().await;
    let (signer, _, public) = authority(dir.path());
    let image_path = dir.path().join("img");
    let image = write_image(&image_path, 8 << 20, 7);
    Publish::new("fw-restart", &image_path)
        .run(&fleet, &signer)
        .await;
    let opts: Vec<DeviceOpts> = (1..=4)
        .map(|i| device_opts(dir.path(), &format!("dev-{i:04}"), &public, &[]))
        .collect();
    let devs: Vec<DeviceProc> = opts
        .iter()
        .map(|o| DeviceProc::start(&relay.address(), &gw.pki(), o))
        .collect();
    for d in &devs {
        d.connected(Duration::from_secs(30)).await;
    }
    deploy(
        &fleet,
        "fw-restart",
        &["dev-0001", "dev-0002", "dev-0003", "dev-0004"],
        2,
        0,
    )
    .await;
    // Mid-campaign: the first batch is downloading.
    eventually(Duration::from_secs(60), "the first batch downloads", || {
        held(&devs[0]) > 0
    })
    .await;
    drop(fleet);
    relay.point_to(None);
    gw.kill();
    let gw = GatewayProc::start(dir.path(), 4, &[]);
    relay.point_to(Some(Target::Tcp(gw.addr)));
    let fleet = gw.fleet().await;
    let r = until_update(&fleet, "fw-restart", Duration::from_secs(180), |r| {
        r.campaign
            .as_ref()
            .is_some_and(|c| c.state() == CampaignState::Completed)
    })
    .await;
    for t in &r.targets {
        assert_eq!(t.phase(), UpdatePhase::Committed, "{t:?}");
    }
    for o in &opts {
        assert!(std::fs::read(active_image(o)).unwrap() == image, "{}", o.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_resumes_and_two_components_install_together() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let fleet = gw.fleet().await;
    let (signer, key, public) = authority(dir.path());
    let rootfs_path = dir.path().join("rootfs.img");
    let modem_path = dir.path().join("modem.img");
    let rootfs = write_image(&rootfs_path, 600 << 10, 8);
    let modem = write_image(&modem_path, 100 << 10, 9);
    let spec = cloud_client::UpdateSpec {
        update_id: "fw-two".into(),
        version: "1.1.0".into(),
        device_class: "test-class".into(),
        sequence: 11,
        chunk_size: 16 * 1024,
        expires_at_ms: fleet_proto::time::now_ms() + 86_400_000,
        description: String::new(),
        images: vec![
            cloud_client::ImageSpec {
                component: "rootfs".into(),
                path: rootfs_path.clone(),
            },
            cloud_client::ImageSpec {
                component: "modem".into(),
                path: modem_path.clone(),
            },
        ],
    };
    // The upload stops half way: only the even chunks of the rootfs reach the gateway.
    let built = cloud_client::build_update(&spec, &signer).unwrap();
    let rec = fleet.create_update(built.signed.clone()).await.unwrap();
    let mut pretend = rec.images.clone();
    let rootfs_chunks = pretend[0].chunk_count;
    pretend[0].held = vec![0b1010_1010; rootfs_chunks.div_ceil(8) as usize];
    pretend[1].complete = true;
    let sent = fleet
        .upload_images(&built, &pretend, |_, _| {})
        .await
        .unwrap();
    assert_eq!(sent, u64::from(rootfs_chunks.div_ceil(2)));
    let rec = fleet.get_update("fw-two").await.unwrap();
    assert_eq!(rec.images[0].chunks_held, rootfs_chunks.div_ceil(2));
    assert!(!rec.images[0].complete && rec.images[1].chunks_held == 0);
    // Deploying an incomplete update is refused with what is missing.
    let err = fleet
        .deploy_update(DeployUpdate {
            update_id: "fw-two".into(),
            device_ids: vec!["dev-0001".into()],
            ..DeployUpdate::default()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not complete"), "{err}");

    // Running the same create again (a newly signed manifest of the same images) sends only
    // what the gateway lacks.
    let out = fleetctl(
        &gw,
        &[
            "update",
            "create",
            "--image",
            rootfs_path.to_str().unwrap(),
            "--component",
            "rootfs",
            "--image",
            modem_path.to_str().unwrap(),
            "--component",
            "modem",
            "--version",
            "1.1.0",
            "--class",
            "test-class",
            "--sequence",
            "11",
            "--key",
            key.to_str().unwrap(),
            "--id",
            "fw-two",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let missing = rootfs_chunks / 2 + 7; // the odd rootfs chunks and the 7 modem chunks
    assert!(
        err.contains(&format!("{missing} chunk(s) uploaded")),
        "{err}"
    );

    // Both components are installed together.
    let o = device_opts(dir.path(), "dev-0001", &public, &[]);
    let _dev = DeviceProc::start(&gw.address(), &gw.pki(), &o);
    deploy(&fleet, "fw-two", &["dev-0001"], 0, 0).await;
    until_update(&fleet, "fw-two", Duration::from_secs(60), |r| {
        target(r, "dev-0001").phase() == UpdatePhase::Committed
    })
    .await;
    let slots = device_client::SlotInstaller::new(&o.state);
    assert!(std::fs::read(slots.active_image("rootfs").unwrap()).unwrap() == rootfs);
    assert!(std::fs::read(slots.active_image("modem").unwrap()).unwrap() == modem);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_update_installs_later_and_abort_withdraws_an_offer() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 2, &[]);
    let fleet = gw.fleet().await;
    let (signer, _, public) = authority(dir.path());
    let image_path = dir.path().join("img");
    let image = write_image(&image_path, 128 << 10, 10);
    Publish::new("fw-later", &image_path)
        .run(&fleet, &signer)
        .await;
    // dev-0001 defers for 3 s, then accepts; dev-0002 defers for an hour.
    let o1 = device_opts(dir.path(), "dev-0001", &public, &["--defer-for", "3"]);
    let o2 = device_opts(dir.path(), "dev-0002", &public, &["--defer-for", "3600"]);
    let d1 = DeviceProc::start(&gw.address(), &gw.pki(), &o1);
    let d2 = DeviceProc::start(&gw.address(), &gw.pki(), &o2);
    deploy(&fleet, "fw-later", &["dev-0001", "dev-0002"], 0, 0).await;
    until_update(&fleet, "fw-later", Duration::from_secs(30), |r| {
        target(r, "dev-0001").phase() == UpdatePhase::Deferred
            && target(r, "dev-0002").phase() == UpdatePhase::Deferred
    })
    .await;
    let r = until_update(&fleet, "fw-later", Duration::from_secs(60), |r| {
        target(r, "dev-0001").phase() == UpdatePhase::Committed
    })
    .await;
    assert_eq!(
        r.campaign.unwrap().state(),
        CampaignState::Running,
        "dev-0002 still defers"
    );
    assert!(d1.printed("update fw-later deferred"));
    assert!(std::fs::read(active_image(&o1)).unwrap() == image);

    let out = fleetctl(&gw, &["--json", "update", "abort", "fw-later"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["campaign"]["state"], "aborted", "{v}");
    assert_eq!(v["summary"]["committed"], 1);
    assert_eq!(v["summary"]["aborted"], 1);
    // dev-0002, which was still deferring it, sees the offer withdrawn and drops it.
    eventually(
        Duration::from_secs(30),
        "dev-0002 sees the offer withdrawn",
        || {
            d2.lines().iter().any(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .is_ok_and(|v| v["withdrawn"]["update_id"] == "fw-later")
            })
        },
    )
    .await;
    assert!(!active_image(&o2).exists());
    // An aborted campaign cannot be resumed.
    let out = fleetctl(&gw, &["update", "resume", "fw-later"]);
    assert_eq!(out.status.code(), Some(4), "refused by the gateway");
}
