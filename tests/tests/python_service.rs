//! The example cloud service in Python (examples/python/fleet_service.py): paho-mqtt over mTLS to
//! the cloud cluster (three NATS nodes, tests/src/cluster.rs; the gateway bridged to one node,
//! the service on another), classes generated from proto/ by grpcio-tools, and
//! commands signed in Python with the `commands` role key. Its environment comes from
//! scripts/python-env.sh (a venv under target/python; pip and the generator run once).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use fleet_proto::command::{verify_command, Recipient, COMMAND_CONTEXT};
use fleet_proto::signing::UpdateSigner;
use fleet_proto::trust::{build, TrustedRoot, ROOT_FORMAT_VERSION};
use fleet_proto::v1;
use fleet_proto::Message;
use fleet_testkit::eventually;
use fleet_tests::cluster::{Acl, ClusterPki, NatsCluster};
use fleet_tests::procs::{DeviceOpts, DeviceProc, GatewayProc};
use fleet_tests::proxy::{Relay, Target};

const GW: &str = "gw-0001";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The venv's interpreter, after scripts/python-env.sh made sure of the venv and the classes
/// (quick when both are there; a first run installs from PyPI).
fn python() -> PathBuf {
    let root = workspace();
    let dir = root.join("target/python");
    let mut cmd = Command::new(root.join("scripts/python-env.sh"));
    cmd.env("FLEET_PYTHON_DIR", &dir);
    let out = fleet_testkit::run(cmd, Duration::from_secs(600));
    assert!(
        out.status.success(),
        "scripts/python-env.sh failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("venv/bin/python")
}

/// `fleet_service.py` with `args`, bounded by `within`.
fn service(python: &Path, args: &[&str], within: Duration) -> Output {
    let root = workspace();
    let mut cmd = Command::new(python);
    cmd.arg(root.join("examples/python/fleet_service.py"))
        .arg("--gen-dir")
        .arg(root.join("target/python/gen"))
        .args(args);
    fleet_testkit::run(cmd, within)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim();
    assert!(s.len().is_multiple_of(2), "odd hex: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn a_command_signed_in_python_verifies_in_rust_with_the_same_signature() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let commands = UpdateSigner::generate();
    let key = dir.path().join("commands.key");
    std::fs::write(&key, commands.to_pkcs8_pem().unwrap()).unwrap();
    let now = 1_700_000_000_000u64;
    let out = service(
        &python,
        &[
            "sign",
            "--command-key",
            key.to_str().unwrap(),
            "--device",
            "dev-0001",
            "--name",
            "ping",
            "--payload",
            "up",
            "--command-id",
            "c-py",
            "--issued-by",
            "svc-0001",
            "--issued-at-ms",
            &now.to_string(),
            "--ttl-ms",
            "60000",
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let signed = v1::SignedCommand::decode(unhex(&text(&out.stdout)).as_slice()).unwrap();
    assert_eq!(signed.signatures.len(), 1);
    // Ed25519 is deterministic: the same key over the same bytes and context gives the same
    // signature, key id and algorithm in both languages.
    assert_eq!(
        signed.signatures[0],
        commands.sign_in_context(COMMAND_CONTEXT, &signed.command)
    );
    // And a device holding a root that names the key runs it.
    let root_key = UpdateSigner::generate();
    let mut root = build::encode(&v1::Root {
        format_version: ROOT_FORMAT_VERSION,
        version: 1,
        expires_at_ms: now * 2,
        root: Some(build::role(&[root_key.verifying_key()], 1)),
        updates: Some(build::role(&[root_key.verifying_key()], 1)),
        commands: Some(build::role(&[commands.verifying_key()], 1)),
    });
    build::add_signature(&root_key, &mut root).unwrap();
    let root = TrustedRoot::provisioned(&root.encode_to_vec()).unwrap();
    let me = Recipient {
        device_id: "dev-0001",
        device_class: "pump",
    };
    let verified = verify_command(Some(&root), &signed.encode_to_vec(), me, now + 1).unwrap();
    assert_eq!(
        verified.command,
        v1::Command {
            command_id: "c-py".into(),
            name: "ping".into(),
            payload: b"up".to_vec(),
            issued_at_ms: now,
            expires_at_ms: now + 60_000,
            issued_by: "svc-0001".into(),
            device_id: "dev-0001".into(),
            device_class: String::new(),
            not_before_ms: 0,
        }
    );
    // Another device refuses it.
    let other = Recipient {
        device_id: "dev-0002",
        ..me
    };
    let refused = verify_command(Some(&root), &signed.encode_to_vec(), other, now + 1);
    assert_eq!(
        refused.map(|_| ()).unwrap_err().refusal,
        v1::CommandRefusal::WrongTarget
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_service_sends_a_durable_command_through_the_cloud_cluster() {
    let python = tokio::task::block_in_place(python);
    let dir = tempfile::tempdir().unwrap();
    // The cloud cluster's first node is reached through a relay whose address the gateway is
    // given before it starts (the cluster needs the PKI the gateway makes on its first start).
    let relay = Relay::start(None).unwrap();
    let gw = GatewayProc::start(
        dir.path(),
        1,
        &[
            (
                "GATEWAY__BRIDGE__UPSTREAM",
                &format!("localhost:{}", relay.addr.port()),
            ),
            ("GATEWAY__BRIDGE__RECONNECT_MAX", "1s"),
        ],
    );
    let pki = gw.pki();
    // Three NATS nodes with the development PKI (their server certificate is the gateway's)
    // and the fleet's ACL: the gateway under its prefix, the service requesting as itself.
    let cluster = NatsCluster::start(
        &dir.path().join("cloud"),
        &ClusterPki {
            ca: pki.join("ca.crt"),
            server_cert: pki.join(format!("gateways/{GW}.crt")),
            server_key: pki.join(format!("gateways/{GW}.key")),
        },
        &Acl::new([GW], ["svc-0001"]),
    )
    .await;
    let nodes = cluster.mqtt_addrs();
    relay.point_to(Some(Target::Tcp(nodes[0])));
    eventually(Duration::from_secs(30), "the bridge connects", || {
        gw.metric("bridge_connected") == 1.0
    })
    .await;
    // The service talks to another node than the gateway's.
    let cloud_port = nodes[1].port();
    let opts = DeviceOpts::new(dir.path(), "dev-0001");
    let dev = DeviceProc::start(&gw.address(), &pki, &opts);
    dev.connected(Duration::from_secs(30)).await;

    let path = |p: &str| pki.join(p).to_str().unwrap().to_owned();
    let port = cloud_port.to_string();
    let (ca, cert, key, command_key) = (
        path("ca.crt"),
        path("services/svc-0001.crt"),
        path("services/svc-0001.key"),
        path("trust/commands-1.key"),
    );
    let send = |command_key: &str| {
        tokio::task::block_in_place(|| {
            service(
                &python,
                &[
                    "send",
                    "--host",
                    "localhost",
                    "--port",
                    &port,
                    "--ca",
                    &ca,
                    "--cert",
                    &cert,
                    "--key",
                    &key,
                    "--command-key",
                    command_key,
                    "--gateway",
                    GW,
                    "--device",
                    "dev-0001",
                    "--name",
                    "ping",
                    "--payload",
                    "up",
                    "--timeout",
                    "30",
                ],
                Duration::from_secs(60),
            )
        })
    };
    let out = send(&command_key);
    assert!(
        out.status.success(),
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line: {stdout}");
    let result: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(result["state"], "SUCCEEDED", "{result}");
    assert_eq!(result["output"], "ok:ping:up", "{result}");
    assert_eq!(result["device_id"], "dev-0001", "{result}");
    assert_eq!(result["gateway"], GW, "{result}");
    let command_id = result["command_id"].as_str().unwrap().to_owned();
    assert!(command_id.starts_with("c-"), "{result}");
    // The device ran it exactly once.
    assert_eq!(opts.ran(), vec![command_id.clone()]);
    // The gateway stored it as svc-0001's, as the Rust SDK reads it through the cloud.
    let fleet = cloud_client::FleetClient::builder()
        .gateway("localhost", cloud_port)
        .pem_files(&ca, &cert, &key)
        .via_broker(GW)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let recs = fleet.get_command(&command_id, None).await.unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].state(), cloud_client::CommandState::Succeeded);
    assert_eq!(recs[0].issued_by, "svc-0001");

    // Signed by a key the fleet's root does not name: the device refuses it without running
    // it, and the service says so with its own exit status and the same JSON line.
    let stranger = dir.path().join("stranger.key");
    std::fs::write(&stranger, UpdateSigner::generate().to_pkcs8_pem().unwrap()).unwrap();
    let out = send(stranger.to_str().unwrap());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let result: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(result["state"], "REJECTED", "{result}");
    assert!(
        text(&out.stderr).contains("ended REJECTED"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(opts.ran(), vec![command_id]);
}
