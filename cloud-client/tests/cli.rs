//! `fleetctl` as a user meets it: help for every command, and the exit codes that do not need
//! a gateway (usage errors, unusable certificates). Commands against a running gateway are
//! tested in `tests/tests/commands.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn fleetctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(args)
        .env_remove("FLEETCTL_GATEWAY")
        .env_remove("FLEETCTL_PKI")
        .output()
        .unwrap()
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
