//! `fleetctl` as a user meets it: help for every command, and the exit codes that do not need
//! a gateway (usage errors, unusable certificates). Commands against a running gateway are
//! tested in `tests/tests/commands.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::time::Duration;

/// Runs fleetctl; killed and reported if it takes more than a minute.
fn fleetctl(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
    cmd.args(args)
        .env_remove("FLEETCTL_GATEWAY")
        .env_remove("FLEETCTL_PKI");
    fleet_testkit::run(cmd, Duration::from_secs(60))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_command_has_help() {
    for (args, must) in [
        (
            &["--help"][..],
            &[
                "command",
                "status",
                "events",
                "--gateway",
                "--json",
                "Exit codes",
            ][..],
        ),
        (&["command", "--help"], &["send", "get"]),
        (
            &["command", "send", "--help"],
            &[
                "--device",
                "--class",
                "--name",
                "--payload",
                "--ttl",
                "--no-wait",
                "--wait",
            ],
        ),
        (&["command", "get", "--help"], &["--device"]),
        (&["events", "--help"], &["--device", "--count"]),
        (&["status", "--help"], &["DEVICES"]),
        (
            &["update", "--help"],
            &[
                "keygen", "create", "deploy", "status", "pause", "resume", "abort",
            ],
        ),
        (&["update", "keygen", "--help"], &["--out"]),
        (
            &["update", "create", "--help"],
            &[
                "--image",
                "--component",
                "--version",
                "--class",
                "--sequence",
                "--key",
                "--chunk-size",
                "--expires-in",
            ],
        ),
        (
            &["update", "deploy", "--help"],
            &[
                "--device",
                "--class",
                "--batch",
                "--max-failures",
                "--wait",
                "[default: 5%]",
            ],
        ),
        (&["update", "status", "--help"], &["--wait", "--timeout"]),
        (&["update", "abort", "--help"], &["UPDATE"]),
    ] {
        let out = fleetctl(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let text = stdout(&out);
        for m in must {
            assert!(text.contains(m), "{args:?} help lacks {m}:\n{text}");
        }
    }
}

#[test]
fn usage_and_certificate_errors_have_their_exit_codes() {
    // No target: usage (2), said plainly.
    let out = fleetctl(&["command", "send", "--name", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device"));
    // Unknown flag: clap's usage error, also 2.
    assert_eq!(fleetctl(&["status", "--bogus"]).status.code(), Some(2));
    // A PKI directory that does not exist: certificates (5), with what to do.
    let dir = std::env::temp_dir().join("fleetctl-no-such-pki");
    let out = fleetctl(&["--pki", dir.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca/--cert/--cert-key"), "{err}");
}

#[test]
fn update_usage_errors_exit_2_and_keygen_writes_a_usable_key_pair() {
    let dir = tempfile::tempdir().unwrap();
    // One component name per image.
    let out = fleetctl(&[
        "update",
        "create",
        "--image",
        "a",
        "--image",
        "b",
        "--component",
        "rootfs",
        "--version",
        "1",
        "--class",
        "c",
        "--sequence",
        "1",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("one component name per image"));
    let key = dir.path().join("authority.pem");
    let out = fleetctl(&["--json", "update", "keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["key_id"].as_str().unwrap();
    let signer =
        fleet_proto::signing::UpdateSigner::from_pkcs8_pem(&std::fs::read_to_string(&key).unwrap())
            .unwrap();
    assert_eq!(signer.key_id(), id);
    let mut trusted = fleet_proto::signing::TrustedKeys::new();
    let public = std::fs::read_to_string(dir.path().join("authority.pem.pub")).unwrap();
    assert_eq!(trusted.add_pem(&public).unwrap(), id);
    // Never overwrites a key.
    let out = fleetctl(&["update", "keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    // A bad chunk size is a usage error.
    let out = fleetctl(&[
        "update",
        "create",
        "--image",
        "a",
        "--component",
        "r",
        "--version",
        "1",
        "--class",
        "c",
        "--sequence",
        "1",
        "--chunk-size",
        "16 parsecs",
    ]);
    assert_eq!(out.status.code(), Some(2));
}
