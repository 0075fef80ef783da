//! The chain of trust end to end, attack by attack: the `gateway` binary on its development
//! PKI (root 2 of 3, one updates and one commands key), `test-device` processes on the device
//! library holding that root, the SDK as the operating service, and Debian's `mosquitto_pub`
//! as a service (or a compromised gateway) publishing what the fleet's keys did not sign.
//! Every refusal must reach the cloud side with its reason: command refusals as command
//! records or foreign command events, manifest refusals in the campaign, root refusals in the
//! device's trust report (GetStatus).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cloud_client::{
    CommandEvent, CommandState, DeployUpdate, FleetClient, SendCommand, UpdatePhase,
};
use fleet_certs::TrustFiles;
use fleet_proto::command::sign_command;
use fleet_proto::signing::{Signer, UpdateSigner};
use fleet_proto::trust::{build, TrustedRoot, ROOT_FORMAT_VERSION};
use fleet_proto::v1::{self, CommandRefusal, RootRefusal, UpdateError};
use fleet_proto::Message;
use fleet_testkit::{eventually, eventually_async};
use fleet_tests::procs::{DeviceOpts, DeviceProc, GatewayProc};
use fleet_tests::updates::{write_image, Publish};
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(60);
const DAY_MS: u64 = 86_400_000;

/// The development PKI's trust keys.
struct Keys {
    files: TrustFiles,
    root: Vec<UpdateSigner>,
    updates: UpdateSigner,
    commands: UpdateSigner,
}

fn keys(gw: &GatewayProc) -> Keys {
    let files = TrustFiles::at(&gw.pki().join("trust"));
    let root = (1..=3).map(|n| files.signer("root", n).unwrap()).collect();
    // The development root is a root devices accept.
    TrustedRoot::provisioned(&std::fs::read(files.root_path()).unwrap()).unwrap();
    Keys {
        root,
        updates: files.signer("updates", 1).unwrap(),
        commands: files.signer("commands", 1).unwrap(),
        files,
    }
}

fn role(keys: &[&UpdateSigner], threshold: u32) -> v1::RoleKeys {
    let public: Vec<_> = keys.iter().map(|k| Signer::verifying_key(*k)).collect();
    build::role(&public, threshold)
}

/// A root document: the development root keys (2 of 3), with the given updates and commands.
fn root_doc(
    k: &Keys,
    version: u64,
    expires_at_ms: u64,
    updates: (&[&UpdateSigner], u32),
    commands: (&[&UpdateSigner], u32),
) -> v1::Root {
    let root_keys: Vec<&UpdateSigner> = k.root.iter().collect();
    v1::Root {
        format_version: ROOT_FORMAT_VERSION,
        version,
        expires_at_ms,
        root: Some(role(&root_keys, 2)),
        updates: Some(role(updates.0, updates.1)),
        commands: Some(role(commands.0, commands.1)),
    }
}

fn signed_root(doc: &v1::Root, signers: &[&UpdateSigner]) -> Vec<u8> {
    let mut s = build::encode(doc);
    for signer in signers {
        build::add_signature(*signer, &mut s).unwrap();
    }
    s.encode_to_vec()
}

fn device(gw: &GatewayProc, dir: &Path, id: &str, extra: &[&str]) -> (DeviceProc, DeviceOpts) {
    // DeviceProc provisions it with the development root (`PKI/trust/root.bin`).
    let mut o = DeviceOpts::new(dir, id);
    o.args = extra.iter().map(|s| s.to_string()).collect();
    (DeviceProc::start(&gw.address(), &gw.pki(), &o), o)
}

fn command(id: &str, device: &str, expires_at_ms: u64) -> v1::Command {
    let now = fleet_proto::time::now_ms();
    v1::Command {
        command_id: id.into(),
        name: "blink".into(),
        payload: b"1".to_vec(),
        issued_at_ms: now,
        expires_at_ms,
        issued_by: "attacker".into(),
        device_id: device.into(),
        device_class: String::new(),
        not_before_ms: 0,
    }
}

/// Publishes raw bytes on a topic as service svc-0001 (QoS 1; `extra`: `-r` to retain).
fn publish_raw(gw: &GatewayProc, dir: &Path, topic: &str, bytes: &[u8], extra: &[&str]) {
    let path = dir.join("raw.bin");
    std::fs::write(&path, bytes).unwrap();
    gw.mosquitto_pub("services", "svc-0001", topic, &path, extra);
}

/// The next foreign command event for `device` and `command_id`: the device's refusal of a
/// delivery the gateway never stored.
async fn foreign_refusal(
    events: &mut broadcast::Receiver<CommandEvent>,
    device: &str,
    command_id: &str,
) -> v1::CommandResult {
    tokio::time::timeout(WAIT, async {
        loop {
            let ev = events.recv().await.unwrap();
            let Some(rec) = ev.command else { continue };
            if ev.foreign && rec.device_id == device && rec.command_id == command_id {
                return rec.result.unwrap();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no refusal of {command_id} by {device} reported"))
}

async fn ok_command(fleet: &FleetClient, device: &str, name: &str) {
    let recs = fleet
        .send_command(SendCommand {
            device_ids: vec![device.into()],
            name: name.into(),
            ..SendCommand::default()
        })
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!(recs[0].state(), CommandState::Succeeded, "{recs:?}");
}

/// Commands the fleet's commands key did not sign for this device, published raw on its
/// command topic (the default policy lets services do that): unsigned, signed by a key the
/// root does not name, dev-0001's genuine command replayed to dev-0002, an expired one. Each
/// is refused by the device without running and reported upward with its reason; the
/// devices then still run a properly signed command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_expired_commands_are_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 2, &[]);
    let fleet = gw.fleet().await;
    let mut events = fleet.events();
    let k = keys(&gw);
    let (d1, o1) = device(&gw, dir.path(), "dev-0001", &[]);
    let (d2, o2) = device(&gw, dir.path(), "dev-0002", &[]);
    d1.connected(WAIT).await;
    d2.connected(WAIT).await;
    let later = fleet_proto::time::now_ms() + DAY_MS;

    // Unsigned.
    let mut unsigned = sign_command(&command("c-unsigned", "dev-0001", later), &[]).unwrap();
    unsigned.signatures.clear();
    publish_raw(
        &gw,
        dir.path(),
        "devices/dev-0001/cmd",
        &unsigned.encode_to_vec(),
        &[],
    );
    let r = foreign_refusal(&mut events, "dev-0001", "c-unsigned").await;
    assert_eq!(
        (r.status(), r.refusal()),
        (v1::CommandStatus::Rejected, CommandRefusal::Unsigned),
        "{r:?}"
    );

    // Signed by a key the root does not name (an updates key is no commands key, and a
    // stranger's key is nothing).
    let stranger = UpdateSigner::generate();
    let forged = sign_command(
        &command("c-forged", "dev-0001", later),
        &[&stranger, &k.updates],
    )
    .unwrap();
    publish_raw(
        &gw,
        dir.path(),
        "devices/dev-0001/cmd",
        &forged.encode_to_vec(),
        &[],
    );
    let r = foreign_refusal(&mut events, "dev-0001", "c-forged").await;
    assert_eq!(r.refusal(), CommandRefusal::Untrusted, "{r:?}");

    // dev-0001's genuine command, replayed to dev-0002.
    let genuine = sign_command(&command("c-for-1", "dev-0001", later), &[&k.commands]).unwrap();
    publish_raw(
        &gw,
        dir.path(),
        "devices/dev-0002/cmd",
        &genuine.encode_to_vec(),
        &[],
    );
    let r = foreign_refusal(&mut events, "dev-0002", "c-for-1").await;
    assert_eq!(r.refusal(), CommandRefusal::WrongTarget, "{r:?}");
    assert!(r.message.contains("dev-0001"), "{r:?}");

    // Expired (signed, for the right device, but an hour ago).
    let mut old = command("c-expired", "dev-0001", fleet_proto::time::now_ms() - 1);
    old.issued_at_ms -= 3_600_000;
    let expired = sign_command(&old, &[&k.commands]).unwrap();
    publish_raw(
        &gw,
        dir.path(),
        "devices/dev-0001/cmd",
        &expired.encode_to_vec(),
        &[],
    );
    let r = foreign_refusal(&mut events, "dev-0001", "c-expired").await;
    assert_eq!(
        (r.status(), r.refusal()),
        (v1::CommandStatus::Expired, CommandRefusal::Expired),
        "{r:?}"
    );

    // None ran; a signed command through the gateway still does, on both.
    assert!(
        o1.ran().is_empty() && o2.ran().is_empty(),
        "{:?} {:?}",
        o1.ran(),
        o2.ran()
    );
    ok_command(&fleet, "dev-0001", "after").await;
    ok_command(&fleet, "dev-0002", "after").await;
    assert_eq!(o1.ran().len(), 1);
    assert_eq!(o2.ran().len(), 1);
    let _ = k.files;
}

/// Update `id` built from `image` and signed by every one of `signers`, uploaded and offered
/// to dev-0001: the device's final record.
async fn offer(
    fleet: &FleetClient,
    image: &Path,
    id: &str,
    sequence: u64,
    signers: &[&UpdateSigner],
) -> v1::TargetRecord {
    let mut p = Publish::new(id, image);
    p.sequence = sequence;
    let mut built = cloud_client::build_update(&p.spec(), signers[0]).unwrap();
    for s in &signers[1..] {
        built.signed.signatures.push(s.sign(&built.signed.manifest));
    }
    let rec = fleet.create_update(built.signed.clone()).await.unwrap();
    fleet
        .upload_images(&built, &rec.images, |_, _| {})
        .await
        .unwrap();
    fleet
        .deploy_update(DeployUpdate {
            update_id: id.into(),
            device_ids: vec!["dev-0001".into()],
            ..DeployUpdate::default()
        })
        .await
        .unwrap();
    eventually_async(WAIT, format!("{id} finishes on the device"), async || {
        let r = fleet.get_update(id).await.unwrap();
        match r.targets.first() {
            Some(t) if t.phase().is_final() => Ok(t.clone()),
            _ => Err(r),
        }
    })
    .await
}

/// The updates role rotated to two new keys with threshold 2 while the device runs: a manifest
/// signed by the rotated-out key, and one signed by only one of the new keys, are both
/// refused and the campaign shows why; one signed by both installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_updates_rotation_old_keys_and_short_thresholds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 1, &[]);
    let fleet = gw.fleet().await;
    let k = keys(&gw);
    let (dev, _o) = device(&gw, dir.path(), "dev-0001", &[]);
    dev.connected(WAIT).await;

    let new1 = UpdateSigner::generate();
    let new2 = UpdateSigner::generate();
    let doc = root_doc(
        &k,
        2,
        fleet_proto::time::now_ms() + 30 * DAY_MS,
        (&[&new1, &new2], 2),
        (&[&k.commands], 1),
    );
    let v2 = signed_root(&doc, &[&k.root[0], &k.root[2]]);
    fleet.publish_root(v2).await.unwrap();
    eventually(WAIT, "the device takes root 2", || {
        dev.printed("root_version 2")
    })
    .await;

    let image = dir.path().join("img");
    write_image(&image, 64 << 10, 7);
    // Signed by the rotated-out key (the development update-signing key).
    let t = offer(&fleet, &image, "u-old-key", 20, &[&k.updates]).await;
    assert_eq!(
        (t.phase(), t.error()),
        (UpdatePhase::Rejected, UpdateError::UnknownKey),
        "{t:?}"
    );
    // Signed by one of the two new keys.
    let t = offer(&fleet, &image, "u-one-key", 21, &[&new1]).await;
    assert_eq!(
        (t.phase(), t.error()),
        (UpdatePhase::Rejected, UpdateError::BelowThreshold),
        "{t:?}"
    );
    // Signed by both: installed.
    let t = offer(&fleet, &image, "u-both", 22, &[&new1, &new2]).await;
    assert_eq!(t.phase(), UpdatePhase::Committed, "{t:?}");
}

/// Roots that do not chain from the device's, offered raw on the root topic by a gateway that
/// lies (this gateway's policy lets the service publish there): signed by the new keys only,
/// an older version after a newer one, an expired one. Each is refused and the refusal, with
/// its reason, is in the device's trust report the gateway returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_that_do_not_chain_are_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let default_policy = include_str!("../../broker/src/acl/default_policy.toml");
    let opened = default_policy.replace(
        "    \"fleet/api/{id}/request\",\n]",
        "    \"fleet/api/{id}/request\",\n    \"fleet/trust/roots\",\n]",
    );
    assert_ne!(opened, default_policy, "the service's publish rules moved");
    std::fs::write(&policy, opened).unwrap();
    let gw = GatewayProc::start(
        dir.path(),
        1,
        &[("GATEWAY__ACL__POLICY", policy.to_str().unwrap())],
    );
    let fleet = gw.fleet().await;
    let k = keys(&gw);
    let (dev, _o) = device(&gw, dir.path(), "dev-0001", &[]);
    dev.connected(WAIT).await;
    let chain = |roots: &[&Vec<u8>]| {
        build::chain(&roots.iter().map(|r| (*r).clone()).collect::<Vec<_>>()).encode_to_vec()
    };
    let refused = |version: u64, why: RootRefusal| {
        let fleet = &fleet;
        async move {
            eventually_async(
                WAIT,
                format!("root {version} refused as {why:?}"),
                async || {
                    let s = fleet.status(&["dev-0001".into()]).await.unwrap();
                    match s.first().and_then(|d| d.trust.clone()) {
                        Some(t) if t.refused_version == version && t.refusal() == why => Ok(t),
                        other => Err(other),
                    }
                },
            )
            .await
        }
    };
    let v1 = std::fs::read(k.files.root_path()).unwrap();
    let later = fleet_proto::time::now_ms() + 30 * DAY_MS;

    // A thief of new root keys: version 2 signed by its own (new) keys only.
    let thieves: Vec<UpdateSigner> = (0..3).map(|_| UpdateSigner::generate()).collect();
    let mut doc = root_doc(&k, 2, later, (&[&k.updates], 1), (&[&k.commands], 1));
    doc.root = Some(role(&thieves.iter().collect::<Vec<_>>(), 2));
    let stolen = signed_root(&doc, &[&thieves[0], &thieves[1]]);
    publish_raw(
        &gw,
        dir.path(),
        "fleet/trust/roots",
        &chain(&[&v1, &stolen]),
        &["-r"],
    );
    let t = refused(2, RootRefusal::Untrusted).await;
    assert_eq!(t.root_version, 1, "{t:?}");

    // A genuine version 2, then version 1 again.
    let new_commands = UpdateSigner::generate();
    let v2 = signed_root(
        &root_doc(&k, 2, later, (&[&k.updates], 1), (&[&new_commands], 1)),
        &[&k.root[0], &k.root[1]],
    );
    fleet.publish_root(v2.clone()).await.unwrap();
    eventually(WAIT, "the device takes root 2", || {
        dev.printed("root_version 2")
    })
    .await;
    publish_raw(
        &gw,
        dir.path(),
        "fleet/trust/roots",
        &chain(&[&v1]),
        &["-r"],
    );
    let t = refused(1, RootRefusal::NotNewer).await;
    assert_eq!(t.root_version, 2, "{t:?}");

    // An expired version 3 (correctly signed).
    let v3 = signed_root(
        &root_doc(
            &k,
            3,
            fleet_proto::time::now_ms() - 1,
            (&[&k.updates], 1),
            (&[&new_commands], 1),
        ),
        &[&k.root[1], &k.root[2]],
    );
    publish_raw(
        &gw,
        dir.path(),
        "fleet/trust/roots",
        &chain(&[&v1, &v2, &v3]),
        &["-r"],
    );
    let t = refused(3, RootRefusal::Expired).await;
    assert_eq!(t.root_version, 2, "{t:?}");
    // The gateway itself refuses to distribute any of them.
    for bad in [&stolen, &v1, &v3] {
        assert!(fleet.publish_root(bad.clone()).await.is_err());
    }
}

/// A rotation while the devices are off: the commands key is replaced, the new root published
/// while every device is down. Each takes it at its next connection; from then on a command
/// signed with the old key is refused (reported in its record) and one with the new key runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_reaches_offline_devices_at_their_next_connection() {
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayProc::start(dir.path(), 3, &[]);
    let old_fleet = gw.fleet().await;
    let k = keys(&gw);
    let ids = ["dev-0001", "dev-0002", "dev-0003"];
    let mut devs = Vec::new();
    for id in ids {
        devs.push(device(&gw, dir.path(), id, &[]));
    }
    for (d, _) in &devs {
        d.connected(WAIT).await;
    }
    for id in ids {
        ok_command(&old_fleet, id, "before").await;
    }
    let opts: Vec<DeviceOpts> = devs
        .into_iter()
        .map(|(d, o)| {
            d.kill();
            o
        })
        .collect();

    let new_commands = UpdateSigner::generate();
    let v2 = signed_root(
        &root_doc(
            &k,
            2,
            fleet_proto::time::now_ms() + 30 * DAY_MS,
            (&[&k.updates], 1),
            (&[&new_commands], 1),
        ),
        &[&k.root[0], &k.root[2]],
    );
    let rec = old_fleet.publish_root(v2).await.unwrap();
    assert_eq!(rec.version, 2);

    let devs: Vec<DeviceProc> = opts
        .iter()
        .map(|o| DeviceProc::start(&gw.address(), &gw.pki(), o))
        .collect();
    for d in &devs {
        eventually(WAIT, "the device takes root 2 on reconnecting", || {
            d.printed("root_version 2")
        })
        .await;
    }
    let s = old_fleet.status(&[]).await.unwrap();
    for id in ids {
        let d = s.iter().find(|d| d.device_id == id).unwrap();
        assert_eq!(d.trust.as_ref().map(|t| t.root_version), Some(2), "{d:?}");
    }

    // The old key: refused by every device, each refusal in its record.
    let recs = old_fleet
        .send_command(SendCommand {
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
            name: "old-key".into(),
            ..SendCommand::default()
        })
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    for r in &recs {
        assert_eq!(r.state(), CommandState::Rejected, "{r:?}");
        assert_eq!(
            r.result.as_ref().map(|x| x.refusal()),
            Some(CommandRefusal::Untrusted),
            "{r:?}"
        );
    }
    // The new key: runs everywhere.
    let new_fleet = gw.fleet_signing_with(vec![Arc::new(new_commands)]).await;
    for id in ids {
        ok_command(&new_fleet, id, "after").await;
    }
    for o in &opts {
        assert_eq!(o.ran().len(), 2, "{:?}", o.ran());
    }
}
