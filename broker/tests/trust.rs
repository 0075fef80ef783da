//! The gateway's side of the chain of trust, through a real gateway over real mTLS: it stores
//! and forwards what the fleet's keys signed, byte for byte, and never needs a key itself.
//! Devices and services here are raw MQTT peers, so the tests see the exact bytes on the wire.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{eventually, Api, Peer, TestGateway};
use fleet_broker::Metrics;
use fleet_proto::command::sign_command;
use fleet_proto::signing::{Signer, UpdateSigner};
use fleet_proto::trust::build;
use fleet_proto::v1::{
    api_request, api_response, ApiErrorCode, Command, CommandEvent, CommandRefusal, CommandResult,
    CommandState, CommandStatus, GetCommand, GetStatus, GetTrust, PublishRoot, Root, RootChain,
    RootRefusal, SendCommand, SignedCommand, TrustEvent, TrustReport,
};
use fleet_proto::Message;
use sha2::{Digest as _, Sha256};

const EVENTS_DEV1: &str = "fleet/events/commands/dev-1";

/// A command for dev-1 signed by `key`, valid for a minute.
fn signed_for_dev1(id: &str, key: &dyn Signer) -> SignedCommand {
    let now = fleet_proto::time::now_ms();
    let c = Command {
        command_id: id.into(),
        name: "reboot".into(),
        payload: b"now".to_vec(),
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        issued_by: "svc-1".into(),
        device_id: "dev-1".into(),
        ..Command::default()
    };
    sign_command(&c, &[key]).unwrap()
}

fn send_signed(signed: Vec<SignedCommand>) -> api_request::Body {
    api_request::Body::SendCommand(SendCommand {
        signed,
        ..SendCommand::default()
    })
}

async fn get_command(api: &mut Api, id: &str) -> fleet_proto::v1::CommandRecord {
    match api
        .call(api_request::Body::GetCommand(GetCommand {
            command_id: id.into(),
            device_id: "dev-1".into(),
        }))
        .await
    {
        api_response::Body::GetCommand(r) => r.commands[0].clone(),
        other => panic!("GetCommand: {other:?}"),
    }
}

/// A signed command is stored and handed to the device byte for byte, with the delivery
/// number and the authenticated submitter added; an unsigned one is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_commands_are_delivered_byte_identical_and_unsigned_ones_refused() {
    let gw = TestGateway::start().await;
    let key = UpdateSigner::generate();
    let mut dev = Peer::connect(&gw, "dev-1").await;
    dev.subscribe("devices/dev-1/cmd").await;
    let mut api = Api::connect(&gw, "svc-1").await;

    let sc = signed_for_dev1("c-1", &key);
    match api.call(send_signed(vec![sc.clone()])).await {
        api_response::Body::SendCommand(r) => {
            assert_eq!(r.command_id, "c-1");
            assert_eq!(r.commands.len(), 1);
            assert_eq!(r.commands[0].device_id, "dev-1");
        }
        other => panic!("SendCommand: {other:?}"),
    }
    let got = dev.recv_on("devices/dev-1/cmd").await;
    let d = SignedCommand::decode(got.payload.as_slice()).unwrap();
    assert_eq!(d.command, sc.command, "the signed bytes, unchanged");
    assert_eq!(d.signatures, sc.signatures);
    assert_eq!((d.attempt, d.submitted_by.as_str()), (1, "svc-1"));

    // The same signed bytes again are the same command, not a second one.
    match api.call(send_signed(vec![sc.clone()])).await {
        api_response::Body::SendCommand(r) => assert_eq!(r.commands[0].attempts, 1),
        other => panic!("resubmission: {other:?}"),
    }
    // Other bytes under the same id: a conflict.
    let mut other = signed_for_dev1("c-1", &key);
    other.command = {
        let mut c = Command::decode(other.command.as_slice()).unwrap();
        c.payload = b"later".to_vec();
        c.encode_to_vec()
    };
    match api.call(send_signed(vec![other])).await {
        api_response::Body::Error(e) => assert_eq!(e.code(), ApiErrorCode::Conflict),
        other => panic!("conflicting bytes: {other:?}"),
    }

    // The device comes back without an answer: delivery number 2, same bytes.
    dev.disconnect().await;
    gw.wait_sessions(1).await;
    let mut dev = Peer::connect(&gw, "dev-1").await;
    dev.subscribe("devices/dev-1/cmd").await;
    let again =
        SignedCommand::decode(dev.recv_on("devices/dev-1/cmd").await.payload.as_slice()).unwrap();
    assert_eq!(again.command, sc.command);
    assert_eq!(again.attempt, 2);

    // Unsigned: refused, saying why.
    let unsigned = api_request::Body::SendCommand(SendCommand {
        device_ids: vec!["dev-1".into()],
        name: "reboot".into(),
        ..SendCommand::default()
    });
    match api.call(unsigned).await {
        api_response::Body::Error(e) => {
            assert_eq!(e.code(), ApiErrorCode::Invalid);
            assert!(
                e.message.contains("must be signed by the commands role"),
                "{}",
                e.message
            );
        }
        other => panic!("unsigned: {other:?}"),
    }
    assert_eq!(
        Metrics::get(&gw.handle.metrics().commands_unsigned_refused),
        1
    );
}

/// A device's refusal of something the gateway did not store (a forgery under a stored id)
/// leaves the stored command open and is reported as foreign; its refusal of the stored bytes
/// closes the command with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_result_for_the_stored_bytes_closes_a_command() {
    let gw = TestGateway::start().await;
    let key = UpdateSigner::generate();
    let mut dev = Peer::connect(&gw, "dev-1").await;
    dev.subscribe("devices/dev-1/cmd").await;
    let mut api = Api::connect(&gw, "svc-1").await;
    let sc = signed_for_dev1("c-2", &key);
    api.call(send_signed(vec![sc.clone()])).await;
    dev.recv_on("devices/dev-1/cmd").await;

    let refusal = |digest: Vec<u8>, message: &str| {
        CommandResult {
            command_id: "c-2".into(),
            status: CommandStatus::Rejected.into(),
            message: message.into(),
            completed_at_ms: fleet_proto::time::now_ms(),
            command_digest: digest,
            refusal: CommandRefusal::Untrusted.into(),
            ..CommandResult::default()
        }
        .encode_to_vec()
    };
    // A forgery published under the same id, which the device refused.
    let forged = Sha256::digest(b"forged command bytes").to_vec();
    dev.publish(
        "devices/dev-1/cmd/result",
        &refusal(forged, "signed by an unknown key"),
        false,
    )
    .await;
    let ev: CommandEvent = api.event(EVENTS_DEV1, |e: &CommandEvent| e.foreign).await;
    let rec = ev.command.unwrap();
    assert_eq!(rec.command_id, "c-2");
    assert_eq!(rec.result.unwrap().refusal(), CommandRefusal::Untrusted);
    let m = gw.handle.metrics();
    assert_eq!(Metrics::get(&m.command_results_foreign), 1);
    assert_eq!(
        get_command(&mut api, "c-2").await.state(),
        CommandState::Delivered,
        "the stored command is untouched"
    );

    // The device refuses the stored command itself: closed as REJECTED with the refusal.
    let digest = Sha256::digest(&sc.command).to_vec();
    dev.publish(
        "devices/dev-1/cmd/result",
        &refusal(digest, "root rotated"),
        false,
    )
    .await;
    let ev: CommandEvent = api
        .event(EVENTS_DEV1, |e: &CommandEvent| {
            e.command
                .as_ref()
                .is_some_and(|c| c.state() == CommandState::Rejected)
        })
        .await;
    assert!(!ev.foreign);
    let rec = get_command(&mut api, "c-2").await;
    assert_eq!(rec.state(), CommandState::Rejected);
    let result = rec.result.unwrap();
    assert_eq!(result.refusal(), CommandRefusal::Untrusted);
    assert_eq!(result.message, "root rotated");
    eventually(Duration::from_secs(5), "one foreign result", || {
        Metrics::get(&m.command_results_foreign) == 1
    })
    .await;
}

// ---- Roots ----

fn root_doc(version: u64, root_keys: &[&UpdateSigner], commands: &UpdateSigner) -> Root {
    let vk = |ks: &[&UpdateSigner]| ks.iter().map(|k| k.verifying_key()).collect::<Vec<_>>();
    Root {
        format_version: fleet_proto::trust::ROOT_FORMAT_VERSION,
        version,
        expires_at_ms: fleet_proto::time::now_ms() + 365 * 24 * 3_600_000,
        root: Some(build::role(&vk(root_keys), 2)),
        updates: Some(build::role(&vk(&[commands]), 1)),
        commands: Some(build::role(&vk(&[commands]), 1)),
    }
}

fn signed_by(root: &Root, keys: &[&UpdateSigner]) -> Vec<u8> {
    let mut s = build::encode(root);
    for k in keys {
        build::add_signature(*k, &mut s).unwrap();
    }
    s.encode_to_vec()
}

async fn publish_root(api: &mut Api, bytes: Vec<u8>) -> api_response::Body {
    api.call(api_request::Body::PublishRoot(PublishRoot {
        signed_root: bytes,
    }))
    .await
}

/// The configured root is distributed retained; a successor signed by the current root keys
/// is accepted and distributed; an older root (rollback) and a root signed by new keys only
/// are refused with the reason, and what a late subscriber finds is the accepted chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_are_distributed_and_only_successors_accepted() {
    let gw = TestGateway::start_trusted().await;
    let trust = gw.pki.trust();
    let first = std::fs::read(trust.root_path()).unwrap();
    let mut dev = Peer::connect(&gw, "dev-1").await;
    dev.subscribe("fleet/trust/roots").await;
    let got = dev.recv_on("fleet/trust/roots").await;
    assert!(got.retain, "the chain is retained");
    assert_eq!(
        RootChain::decode(got.payload.as_slice()).unwrap().roots,
        std::slice::from_ref(&first)
    );

    let mut api = Api::connect(&gw, "svc-1").await;
    match api.call(api_request::Body::GetTrust(GetTrust {})).await {
        api_response::Body::Trust(t) => assert_eq!(t.version, 1),
        other => panic!("GetTrust: {other:?}"),
    }

    let r: Vec<UpdateSigner> = (1..=3).map(|n| trust.signer("root", n).unwrap()).collect();
    let commands = UpdateSigner::generate();
    let v2 = signed_by(
        &root_doc(2, &[&r[0], &r[1], &r[2]], &commands),
        &[&r[0], &r[1]],
    );
    match publish_root(&mut api, v2.clone()).await {
        api_response::Body::Trust(t) => {
            assert_eq!(t.version, 2);
            assert_eq!(t.chain.unwrap().roots, [first.clone(), v2.clone()]);
        }
        other => panic!("successor: {other:?}"),
    }
    let live = dev.recv_on("fleet/trust/roots").await;
    assert_eq!(
        RootChain::decode(live.payload.as_slice()).unwrap().roots,
        [first.clone(), v2.clone()]
    );

    // Rollback: the first root again.
    match publish_root(&mut api, first.clone()).await {
        api_response::Body::Error(e) => {
            assert_eq!(e.code(), ApiErrorCode::Invalid);
            assert!(e.message.contains("not newer"), "{}", e.message);
        }
        other => panic!("rollback: {other:?}"),
    }
    // New keys only: the new root keys sign their own root.
    let n: Vec<UpdateSigner> = (0..3).map(|_| UpdateSigner::generate()).collect();
    let v3 = signed_by(
        &root_doc(3, &[&n[0], &n[1], &n[2]], &commands),
        &[&n[0], &n[1]],
    );
    match publish_root(&mut api, v3).await {
        api_response::Body::Error(e) => {
            assert_eq!(e.code(), ApiErrorCode::Invalid);
            assert!(
                e.message.contains("not signed by the current root"),
                "{}",
                e.message
            );
        }
        other => panic!("new keys only: {other:?}"),
    }
    dev.disconnect().await;
    let mut late = Peer::connect(&gw, "dev-2").await;
    late.subscribe("fleet/trust/roots").await;
    let got = late.recv_on("fleet/trust/roots").await;
    assert_eq!(
        RootChain::decode(got.payload.as_slice()).unwrap().roots,
        [first, v2]
    );
}

// ---- Trust reports ----

/// A device's trust report is kept and shown by GetStatus, a change is published as a
/// TrustEvent, and a device on an older root is counted as behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_reports_reach_get_status_and_events() {
    let gw = TestGateway::start_trusted().await;
    let mut api = Api::connect(&gw, "svc-1").await;
    let mut dev = Peer::connect(&gw, "dev-1").await;
    let report = TrustReport {
        root_version: 0,
        refused_version: 1,
        refusal: RootRefusal::Untrusted.into(),
        detail: "not signed by the current root".into(),
        timestamp_ms: fleet_proto::time::now_ms(),
        ..TrustReport::default()
    };
    dev.publish("devices/dev-1/trust", &report.encode_to_vec(), true)
        .await;
    let ev: TrustEvent = api
        .event("fleet/events/trust/dev-1", |_: &TrustEvent| true)
        .await;
    assert_eq!(ev.device_id, "dev-1");
    assert_eq!(ev.report.as_ref(), Some(&report));
    match api
        .call(api_request::Body::GetStatus(GetStatus {
            device_ids: vec!["dev-1".into()],
        }))
        .await
    {
        api_response::Body::GetStatus(s) => {
            assert_eq!(s.devices[0].trust.as_ref(), Some(&report));
        }
        other => panic!("GetStatus: {other:?}"),
    }
    let m = gw.handle.metrics();
    eventually(Duration::from_secs(5), "one device behind", || {
        Metrics::get(&m.trust_devices_behind) == 1
    })
    .await;
    // Caught up: no longer behind.
    let current = TrustReport {
        root_version: 1,
        root_expires_at_ms: fleet_proto::time::now_ms() + 3_600_000,
        timestamp_ms: fleet_proto::time::now_ms(),
        ..TrustReport::default()
    };
    dev.publish("devices/dev-1/trust", &current.encode_to_vec(), true)
        .await;
    let ev: TrustEvent = api
        .event("fleet/events/trust/dev-1", |e: &TrustEvent| {
            e.report.as_ref().is_some_and(|r| r.root_version == 1)
        })
        .await;
    assert_eq!(ev.report.as_ref(), Some(&current));
    eventually(Duration::from_secs(5), "no device behind", || {
        Metrics::get(&m.trust_devices_behind) == 0
    })
    .await;
}

// ---- Signed withdrawal ----

/// An abort without a signed withdrawal is refused; with one, the gateway publishes its exact
/// bytes, retained, on the target's manifest topic, and the record names the manifest digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_publishes_the_signed_withdrawal_byte_identical() {
    use fleet_proto::command::{sign_withdrawal, withdrawal_of};
    use fleet_proto::v1::{
        CampaignAction, CampaignState, ControlCampaign, CreateUpdate, DeployUpdate, UpdateManifest,
        UploadChunk,
    };
    let gw = TestGateway::start().await;
    let updates = UpdateSigner::generate();
    let commands = UpdateSigner::generate();
    let mut api = Api::connect(&gw, "svc-1").await;
    let image = vec![0x5au8; 1024];
    let summary = fleet_proto::chunker::summarize(image.as_slice(), 1024).unwrap();
    let now = fleet_proto::time::now_ms();
    let manifest = UpdateManifest {
        format_version: fleet_proto::manifest::FORMAT_VERSION,
        update_id: "u-1".into(),
        device_class: "pump".into(),
        version: "2.0".into(),
        sequence: 1,
        issued_at_ms: now,
        expires_at_ms: now + 3_600_000,
        components: vec![summary.component("fw")],
        ..UpdateManifest::default()
    };
    let signed = updates.sign_manifest(&manifest);
    for body in [
        api_request::Body::CreateUpdate(CreateUpdate {
            manifest: Some(signed.clone()),
        }),
        api_request::Body::UploadChunk(UploadChunk {
            update_id: "u-1".into(),
            component: "fw".into(),
            index: 0,
            data: image.clone(),
            proof: Vec::new(),
        }),
        api_request::Body::DeployUpdate(DeployUpdate {
            update_id: "u-1".into(),
            device_ids: vec!["dev-1".into()],
            ..DeployUpdate::default()
        }),
    ] {
        if let api_response::Body::Error(e) = api.call(body).await {
            panic!("setting up the update: {e:?}");
        }
    }
    let mut dev = Peer::connect(&gw, "dev-1").await;
    dev.subscribe("devices/dev-1/update/manifest").await;
    let offer = dev.recv_on("devices/dev-1/update/manifest").await;
    assert_eq!(offer.payload, signed.encode_to_vec(), "the offer");

    let abort = |withdrawal| {
        api_request::Body::ControlCampaign(ControlCampaign {
            update_id: "u-1".into(),
            action: CampaignAction::Abort.into(),
            withdrawal,
        })
    };
    match api.call(abort(None)).await {
        api_response::Body::Error(e) => {
            assert_eq!(e.code(), ApiErrorCode::Invalid);
            assert!(e.message.contains("withdrawal"), "{}", e.message);
        }
        other => panic!("abort without a withdrawal: {other:?}"),
    }
    let w = sign_withdrawal(
        &withdrawal_of("u-1", &signed.manifest, now, "bad batch"),
        &[&commands],
    )
    .unwrap();
    match api.call(abort(Some(w.clone()))).await {
        api_response::Body::Update(r) => {
            assert_eq!(r.campaign.unwrap().state(), CampaignState::Aborted);
            assert_eq!(r.manifest_sha256, Sha256::digest(&signed.manifest).to_vec());
        }
        other => panic!("abort: {other:?}"),
    }
    let live = dev.recv_on("devices/dev-1/update/manifest").await;
    assert_eq!(
        live.payload,
        w.encode_to_vec(),
        "the withdrawal, byte for byte"
    );
    dev.disconnect().await;
    let mut later = Peer::connect(&gw, "dev-1").await;
    later.subscribe("devices/dev-1/update/manifest").await;
    let kept = later.recv_on("devices/dev-1/update/manifest").await;
    assert!(kept.retain);
    assert_eq!(kept.payload, w.encode_to_vec());
}

/// A command with a not-before time is held (pending) until then, even for a connected
/// device, and handed over once it has come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_held_until_its_not_before_time() {
    let gw = TestGateway::start().await;
    let key = UpdateSigner::generate();
    let mut dev = Peer::connect(&gw, "dev-1").await;
    dev.subscribe("devices/dev-1/cmd").await;
    let mut api = Api::connect(&gw, "svc-1").await;
    let now = fleet_proto::time::now_ms();
    let not_before = now + 1_500;
    let c = Command {
        command_id: "c-later".into(),
        name: "reboot".into(),
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        device_id: "dev-1".into(),
        not_before_ms: not_before,
        ..Command::default()
    };
    let sc = sign_command(&c, &[&key]).unwrap();
    match api.call(send_signed(vec![sc.clone()])).await {
        api_response::Body::SendCommand(r) => {
            assert_eq!(r.commands[0].state(), CommandState::Pending, "held")
        }
        other => panic!("SendCommand: {other:?}"),
    }
    let got = dev.recv_on("devices/dev-1/cmd").await;
    assert!(
        fleet_proto::time::now_ms() >= not_before,
        "handed over before its not-before time"
    );
    let d = SignedCommand::decode(got.payload.as_slice()).unwrap();
    assert_eq!((d.command, d.attempt), (sc.command, 1));
}
