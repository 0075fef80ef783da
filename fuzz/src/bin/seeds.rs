//! Writes the seed corpora (`corpus/TARGET/`) from real encoded messages of the fixed fleet.
//! Run from the fuzz directory: `cargo run --bin seeds` (deterministic: Ed25519 signatures do
//! not depend on a random source, so running it again rewrites the same files).

use std::fs;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use fleet_fuzz::{
    device_root, image, image_summary, manifest, Keys, CHUNK_SIZE, COMPONENT, DEVICE_CLASS,
    DEVICE_ID, NOW_MS, UPDATE_ID,
};
use fleet_mqtt::codec::encode;
use fleet_mqtt::{Connect, Packet, Publish, QoS, Subscribe, Unsubscribe, Will};
use fleet_proto::limits::MAX_PROOF_LEN;
use fleet_proto::merkle::{self, MerkleTree};
use fleet_proto::signing::{sign_manifest_with, Signer};
use fleet_proto::trust::build;
use fleet_proto::{command, v1, wire, Message as _};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    if let Err(e) = fs::create_dir_all(&dir).and_then(|()| fs::write(dir.join(name), bytes)) {
        panic!("cannot write the seed {target}/{name}: {e}");
    }
}

fn tagged(tag: u8, payload: &[u8]) -> Vec<u8> {
    [&[tag][..], payload].concat()
}

fn mqtt(packets: &[Packet]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for p in packets {
        if let Err(e) = encode(p, &mut out) {
            panic!("a seed packet does not encode: {e}");
        }
    }
    out.to_vec()
}

fn mqtt_seeds() {
    let connect = Packet::Connect(Connect {
        level: 4,
        clean_session: false,
        keep_alive: 30,
        client_id: DEVICE_ID.into(),
        will: Some(Will {
            topic: format!("devices/{DEVICE_ID}/presence"),
            payload: Bytes::from_static(b"\x08\x00"),
            qos: QoS::AtLeastOnce,
            retain: true,
        }),
        username: Some("user".into()),
        password: Some(Bytes::from_static(b"secret")),
    });
    let publish = |qos, packet_id| {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: format!("devices/{DEVICE_ID}/status"),
            packet_id,
            payload: Bytes::from_static(b"\x0a\x05dev-1\x10\x01"),
        })
    };
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![
            (format!("devices/{DEVICE_ID}/cmd"), QoS::AtLeastOnce),
            (format!("devices/{DEVICE_ID}/update/#"), QoS::ExactlyOnce),
            ("fleet/trust/+".into(), QoS::AtMostOnce),
        ],
    });
    let unsubscribe = Packet::Unsubscribe(Unsubscribe {
        packet_id: 2,
        filters: vec!["fleet/trust/+".into()],
    });
    // The first byte is where the target splits the stream in two.
    let session = [
        connect.clone(),
        subscribe.clone(),
        publish(QoS::AtMostOnce, None),
        publish(QoS::AtLeastOnce, Some(7)),
        publish(QoS::ExactlyOnce, Some(8)),
        Packet::PubRel(8),
        Packet::PubAck(3),
        Packet::PubRec(4),
        Packet::PubComp(5),
        unsubscribe.clone(),
        Packet::PingReq,
        Packet::Disconnect,
    ];
    write("mqtt_codec", "session", &tagged(40, &mqtt(&session)));
    write("mqtt_codec", "connect", &tagged(3, &mqtt(&[connect])));
    write("mqtt_codec", "subscribe", &tagged(0, &mqtt(&[subscribe])));
    write(
        "mqtt_codec",
        "unsubscribe",
        &tagged(5, &mqtt(&[unsubscribe])),
    );
    write(
        "mqtt_codec",
        "publish_qos1",
        &tagged(2, &mqtt(&[publish(QoS::AtLeastOnce, Some(1))])),
    );
    write(
        "mqtt_codec",
        "publish_qos2",
        &tagged(9, &mqtt(&[publish(QoS::ExactlyOnce, Some(2))])),
    );
}

fn command_bytes(keys: &Keys, device_id: &str, device_class: &str) -> Vec<u8> {
    let c = v1::Command {
        command_id: "cmd-1".into(),
        name: "reboot".into(),
        payload: b"now".to_vec(),
        issued_at_ms: NOW_MS - 1000,
        expires_at_ms: NOW_MS + 3_600_000,
        issued_by: "ops".into(),
        device_id: device_id.into(),
        device_class: device_class.into(),
        not_before_ms: 0,
    };
    let signed = match command::sign_command(&c, &[&keys.commands as &dyn Signer]) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    signed.encode_to_vec()
}

fn signed_manifest(keys: &Keys) -> Vec<u8> {
    match sign_manifest_with(&manifest(), &[&keys.updates as &dyn Signer]) {
        Ok(s) => s.encode_to_vec(),
        Err(e) => panic!("{e}"),
    }
}

fn withdrawal(keys: &Keys) -> Vec<u8> {
    let signed = manifest_envelope(keys);
    let w = command::withdrawal_of(UPDATE_ID, &signed.manifest, NOW_MS, "recalled");
    match command::sign_withdrawal(&w, &[&keys.commands as &dyn Signer]) {
        Ok(s) => s.encode_to_vec(),
        Err(e) => panic!("{e}"),
    }
}

fn manifest_envelope(keys: &Keys) -> v1::SignedManifest {
    match v1::SignedManifest::decode(signed_manifest(keys).as_slice()) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

fn chunks() -> Vec<Vec<u8>> {
    let summary = image_summary();
    let tree = match MerkleTree::from_chunk_digests(&summary.chunk_digests) {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    let image = image();
    image
        .chunks(CHUNK_SIZE as usize)
        .enumerate()
        .map(|(i, data)| {
            let index = i as u32;
            let proof = match tree.proof(index) {
                Ok(p) => p,
                Err(e) => panic!("{e}"),
            };
            v1::Chunk {
                update_id: UPDATE_ID.into(),
                component: COMPONENT.into(),
                index,
                data: data.to_vec(),
                proof: proof.iter().map(|h| h.to_vec()).collect(),
                request_id: 9,
            }
            .encode_to_vec()
        })
        .collect()
}

fn device_seeds(keys: &Keys) {
    let t = "device_inputs";
    write(
        t,
        "command",
        &tagged(0, &command_bytes(keys, DEVICE_ID, "")),
    );
    write(
        t,
        "command_class",
        &tagged(0, &command_bytes(keys, "", DEVICE_CLASS)),
    );
    let chain = build::chain(&[
        keys.signed_root(1),
        keys.signed_root(2),
        keys.signed_root(3),
    ]);
    write(t, "root_chain", &tagged(1, &chain.encode_to_vec()));
    write(t, "manifest", &tagged(2, &signed_manifest(keys)));
    let all = chunks();
    write(t, "chunk_first", &tagged(3, &all[0]));
    write(t, "chunk_last", &tagged(3, &all[all.len() - 1]));
    write(t, "withdrawal", &tagged(4, &withdrawal(keys)));
}

fn api(body: v1::api_request::Body) -> Vec<u8> {
    v1::ApiRequest {
        request_id: "req-1".into(),
        body: Some(body),
    }
    .encode_to_vec()
}

fn api_seeds(keys: &Keys) {
    use v1::api_request::Body;
    let t = "gateway_api";
    write(
        t,
        "send_command",
        &api(Body::SendCommand(v1::SendCommand {
            command_id: "cmd-1".into(),
            device_ids: vec![DEVICE_ID.into(), "dev-2".into()],
            name: "reboot".into(),
            payload: b"now".to_vec(),
            ttl_ms: 60_000,
            ..Default::default()
        })),
    );
    write(
        t,
        "create_update",
        &api(Body::CreateUpdate(v1::CreateUpdate {
            manifest: Some(manifest_envelope(keys)),
        })),
    );
    let first = match v1::Chunk::decode(chunks()[0].as_slice()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    write(
        t,
        "upload_chunk",
        &api(Body::UploadChunk(v1::UploadChunk {
            update_id: first.update_id,
            component: first.component,
            index: first.index,
            data: first.data,
            proof: first.proof,
        })),
    );
    write(t, "bare_signed_manifest", &signed_manifest(keys));
    write(
        t,
        "bare_upload_chunk",
        &v1::UploadChunk {
            update_id: UPDATE_ID.into(),
            component: COMPONENT.into(),
            index: 1,
            data: vec![0x5a; 64],
            proof: vec![vec![1; 32], vec![2; 32]],
        }
        .encode_to_vec(),
    );
    write(
        t,
        "publish_root",
        &api(Body::PublishRoot(v1::PublishRoot {
            signed_root: keys.signed_root(2),
        })),
    );
    write(
        t,
        "get_command",
        &api(Body::GetCommand(v1::GetCommand {
            command_id: "cmd-1".into(),
            device_id: DEVICE_ID.into(),
        })),
    );
}

fn merkle_seeds() {
    // Layout: count (1 byte), index (1 byte), then edits (none: the real proof).
    let t = "merkle_proof";
    write(t, "five_last", &[5, 4]);
    write(t, "five_first", &[5, 0]);
    write(t, "seven_mid_edited", &[7, 3, 0, 17, 1, 0]);
    write(t, "one", &[1, 0]);
}

fn acl_seeds() {
    // Layout: mode byte, then "filter\ntopic".
    let t = "acl_match";
    let pairs = [
        ("devices/+/status", "devices/dev-1/status"),
        ("devices/dev-1/#", "devices/dev-1"),
        ("fleet/trust/+", "fleet/trust/roots"),
        ("#", "$SYS/broker"),
        ("+/+", "/finance"),
        ("fleet/api/+/request", "fleet/api/svc-1/request"),
    ];
    for (i, (f, topic)) in pairs.iter().enumerate() {
        write(
            t,
            &format!("pair{i}"),
            format!("\x00{f}\n{topic}").as_bytes(),
        );
    }
    // Containment: "outer\ninner", both filters (the ACL's `within`).
    let nested = [
        ("devices/+/cmd", "devices/dev-1/cmd"),
        ("devices/dev-1/#", "devices/dev-1/update/+"),
        ("#", "$SYS/#"),
        ("+/#", "#"),
    ];
    for (i, (outer, inner)) in nested.iter().enumerate() {
        write(
            t,
            &format!("within{i}"),
            format!("\x00{outer}\n{inner}").as_bytes(),
        );
    }
}

/// The gateway's default bridge rules.
const BRIDGE_UP: [&str; 5] = [
    "fleet/api/+/response",
    "fleet/events/#",
    "devices/+/status",
    "devices/+/presence",
    "devices/+/update/progress",
];
const BRIDGE_DOWN: &str = "fleet/api/+/request";

fn bridge_seeds() {
    // Layout: mode byte, then lines: gateway id, filters (first byte even: up, odd: down),
    // a local topic, an upstream topic.
    let t = "bridge_mapping";
    let mut rules = String::from("gw-1\n");
    for f in BRIDGE_UP {
        rules.push_str(&format!("u{f}\n"));
    }
    rules.push_str(&format!("d{BRIDGE_DOWN}\n"));
    let cases = [
        (
            "defaults",
            "devices/dev-1/status",
            "gateways/gw-1/fleet/api/svc-1/request",
        ),
        (
            "command_down",
            "fleet/api/svc-1/response",
            "gateways/gw-1/devices/dev-1/cmd",
        ),
        (
            "other_gateway",
            "devices/dev-1/presence",
            "gateways/gw-10/fleet/api/s/request",
        ),
        ("dollar", "$SYS/x", "gateways/gw-1/$SYS/x"),
    ];
    for (name, local, upstream) in cases {
        write(
            t,
            name,
            format!("\x00{rules}{local}\n{upstream}").as_bytes(),
        );
    }
    write(
        t,
        "everything_down",
        b"\x00gw-1\nu#\nd#\nfleet/x\ngateways/gw-1/devices/dev-1/cmd",
    );
}

/// Device-to-gateway messages the gateway accepts, one per kind (the first byte picks it).
fn gateway_device_messages() -> Vec<(&'static str, Vec<u8>)> {
    let status = v1::StatusReport {
        sequence: 7,
        timestamp_ms: NOW_MS,
        firmware_version: "1.0".into(),
        device_class: DEVICE_CLASS.into(),
        ..Default::default()
    };
    let presence = v1::Presence {
        state: v1::PresenceState::Online.into(),
        timestamp_ms: NOW_MS,
        device_class: DEVICE_CLASS.into(),
        session_id: "s-1".into(),
        ..Default::default()
    };
    let result = v1::CommandResult {
        command_id: "cmd-1".into(),
        status: v1::CommandStatus::Succeeded.into(),
        output: b"ok".to_vec(),
        completed_at_ms: NOW_MS,
        command_digest: vec![7; 32],
        ..Default::default()
    };
    let progress = v1::UpdateProgress {
        update_id: UPDATE_ID.into(),
        phase: v1::UpdatePhase::Downloading.into(),
        chunks_held: 2,
        chunks_total: 5,
        timestamp_ms: NOW_MS,
        ..Default::default()
    };
    let get = v1::ChunkRequest {
        update_id: UPDATE_ID.into(),
        component: COMPONENT.into(),
        ranges: vec![v1::ChunkRange { start: 1, end: 3 }],
        bitmap: vec![0b1001_0000],
        bitmap_offset: 0,
        window: 4,
        request_id: 9,
    };
    let trust = v1::TrustReport {
        root_version: 2,
        root_expires_at_ms: NOW_MS + 1,
        ..Default::default()
    };
    // Chunk request parameters: count mode 0 with 5 chunks, windows 16 and 64.
    let get_params = [0u8, 5, 0, 0, 0, 15, 63];
    vec![
        ("status", [&[0u8, 0][..], &status.encode_to_vec()].concat()),
        (
            "presence",
            [&[1u8, 0][..], &presence.encode_to_vec()].concat(),
        ),
        ("command_result", tagged(2, &result.encode_to_vec())),
        ("update_progress", tagged(3, &progress.encode_to_vec())),
        (
            "chunk_request",
            [&[4u8][..], &get_params, &get.encode_to_vec()].concat(),
        ),
        (
            "trust_report",
            [&[5u8, 3][..], &trust.encode_to_vec()].concat(),
        ),
    ]
}

fn gateway_device_seeds() {
    for (name, bytes) in gateway_device_messages() {
        write("gateway_device_inputs", name, &bytes);
    }
}

/// The device-to-gateway seeds, and the update requests of the API seeds, must pass the
/// gateway's checks.
fn check_gateway_seeds(keys: &Keys) {
    use fleet_broker::fuzzing;
    if let Err(e) = fuzzing::check_create(&manifest_envelope(keys), &manifest(), 1 << 30) {
        panic!("the create_update seed is refused by the gateway: {e}");
    }
    let first = match v1::Chunk::decode(chunks()[0].as_slice()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let upload = v1::UploadChunk {
        update_id: first.update_id,
        component: first.component,
        index: first.index,
        data: first.data,
        proof: first.proof,
    };
    if let Err(e) = fuzzing::check_upload(&upload) {
        panic!("the upload_chunk seed is refused by the gateway: {e}");
    }
    for (name, bytes) in gateway_device_messages() {
        let payload = match name {
            "status" | "presence" | "trust_report" => &bytes[2..],
            "chunk_request" => &bytes[8..],
            _ => &bytes[1..],
        };
        let verdict = match name {
            "status" => fuzzing::status_report(DEVICE_ID, payload),
            "presence" => fuzzing::presence(&format!("devices/{DEVICE_ID}/presence"), payload),
            "command_result" => fuzzing::command_result(payload).map(drop),
            "update_progress" => fuzzing::update_progress(payload).map(drop),
            "chunk_request" => fuzzing::chunk_request(payload, 5, 16, 64).map(|(_, wanted)| {
                assert_eq!(
                    wanted,
                    [1, 2, 4],
                    "the chunk request seed wants other chunks"
                );
            }),
            _ => fuzzing::trust_report(payload, Some(3), NOW_MS).map(drop),
        };
        if let Err(e) = verdict {
            panic!("the {name} seed is refused by the gateway: {e}");
        }
    }
}

/// The device seeds must pass every check, or the fuzzer would start from refusals only.
fn check_device_seeds(keys: &Keys) {
    let root = device_root();
    let me = command::Recipient {
        device_id: DEVICE_ID,
        device_class: DEVICE_CLASS,
    };
    for (device, class) in [(DEVICE_ID, ""), ("", DEVICE_CLASS)] {
        if let Err(e) =
            command::verify_command(Some(&root), &command_bytes(keys, device, class), me, NOW_MS)
        {
            panic!("the command seed is refused: {e}");
        }
    }
    let chain = build::chain(&[
        keys.signed_root(1),
        keys.signed_root(2),
        keys.signed_root(3),
    ]);
    let walk = root.walk(&chain.encode_to_vec(), NOW_MS);
    assert!(
        walk.refused.is_none() && walk.accepted.as_ref().map(|r| r.version) == Some(3),
        "the root chain seed is refused: {:?}",
        walk.refused
    );
    if let Err(e) = root
        .updates
        .trusted_keys()
        .verify_encoded(&signed_manifest(keys))
    {
        panic!("the manifest seed is refused: {e}");
    }
    let component = image_summary().component(COMPONENT);
    for bytes in chunks() {
        let c = match wire::decode_chunk_bounded(&bytes, MAX_PROOF_LEN) {
            Ok(c) => c,
            Err(e) => panic!("a chunk seed does not decode: {e}"),
        };
        if let Err(e) = merkle::verify_chunk(&component, c.index, &c.data, &c.proof) {
            panic!("a chunk seed is refused: {e}");
        }
    }
    let w = match wire::decode_signed_manifest_bounded(&withdrawal(keys)) {
        Ok(w) => w,
        Err(e) => panic!("the withdrawal seed does not decode: {e}"),
    };
    if let Err(e) = command::verify_withdrawal(Some(&root), &w, NOW_MS) {
        panic!("the withdrawal seed is refused: {e}");
    }
}

fn main() {
    let keys = Keys::fixed();
    check_device_seeds(&keys);
    check_gateway_seeds(&keys);
    mqtt_seeds();
    device_seeds(&keys);
    api_seeds(&keys);
    merkle_seeds();
    acl_seeds();
    bridge_seeds();
    gateway_device_seeds();
}
