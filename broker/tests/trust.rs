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
use fleet_proto::v1::{
    api_request, api_response, ApiErrorCode, Command, CommandEvent, CommandRefusal, CommandResult,
    CommandState, CommandStatus, GetCommand, SendCommand, SignedCommand,
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
