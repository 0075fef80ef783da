//! `fleetctl` as a user meets it: help for every command, the exit codes that do not need a
//! gateway (usage errors, unusable certificates), and the offline key ceremony of `fleetctl
//! trust`. Commands against a running gateway are tested in `tests/tests/commands.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::time::Duration;

/// Runs fleetctl; killed and reported if it takes more than a minute.
fn fleetctl(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
    cmd.args(args)
        .env_remove("FLEETCTL_GATEWAY")
        .env_remove("FLEETCTL_PKI")
        .env_remove("FLEET_COMMAND_KEY");
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
                "--not-before",
                "--command-key",
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
        (&["update", "abort", "--help"], &["UPDATE", "--command-key"]),
        (
            &["trust", "--help"],
            &[
                "init", "keygen", "new", "sign", "combine", "verify", "show", "publish", "status",
            ],
        ),
        (
            &["trust", "init", "--help"],
            &[
                "--dir",
                "--root-keys",
                "--root-threshold",
                "--updates-keys",
                "--updates-threshold",
                "--commands-keys",
                "--commands-threshold",
                "--expires",
            ],
        ),
        (
            &["trust", "new", "--help"],
            &[
                "--current",
                "--set-role",
                "--key",
                "--threshold",
                "--remove-key",
                "--expires",
                "--out",
            ],
        ),
        (&["trust", "keygen", "--help"], &["--out"]),
        (&["trust", "sign", "--help"], &["FILE", "--key", "--out"]),
        (&["trust", "combine", "--help"], &["PARTS", "--out"]),
        (&["trust", "verify", "--help"], &["--current", "FILE"]),
        (&["trust", "show", "--help"], &["FILE", "--json"]),
        (&["trust", "publish", "--help"], &["FILE"]),
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

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs fleetctl and asserts its exit code, showing its output when it differs.
fn fleetctl_ok(args: &[&str], code: i32) -> Output {
    let out = fleetctl(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

/// A new key pair (KEY and KEY.pub) made by `update keygen`; returns its key id.
fn keygen(path: &std::path::Path) -> String {
    let out = fleetctl_ok(
        &[
            "--json",
            "update",
            "keygen",
            "--out",
            path.to_str().unwrap(),
        ],
        0,
    );
    json(&out)["key_id"].as_str().unwrap().to_owned()
}

#[test]
fn a_new_commands_key_is_drafted_signed_on_two_machines_combined_and_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_owned();
    let dir = p("trust");
    let out = fleetctl_ok(
        &[
            "--json",
            "trust",
            "init",
            "--dir",
            &dir,
            "--root-keys",
            "3",
            "--root-threshold",
            "2",
            "--commands-keys",
            "2",
            "--commands-threshold",
            "1",
        ],
        0,
    );
    let first = json(&out);
    assert_eq!(first["version"], 1);
    assert_eq!(first["root"]["threshold"], 2);
    assert_eq!(first["root"]["key_ids"].as_array().unwrap().len(), 3);
    assert_eq!(first["commands"]["key_ids"].as_array().unwrap().len(), 2);
    assert_eq!(first["self_signatures"], 2);
    let root_v1 = format!("{dir}/root.bin");
    // The first root is a valid first root.
    fleetctl_ok(&["trust", "verify", &root_v1], 0);

    // Rotation of the commands role to one new key.
    let out = fleetctl_ok(
        &["--json", "trust", "keygen", "--out", &p("commands-new.key")],
        0,
    );
    let new_id = json(&out)["key_id"].as_str().unwrap().to_owned();
    // Never over an existing key.
    fleetctl_ok(&["trust", "keygen", "--out", &p("commands-new.key")], 2);
    fleetctl_ok(
        &[
            "trust",
            "new",
            "--current",
            &root_v1,
            "--set-role",
            "commands",
            "--key",
            &p("commands-new.pub"),
            "--threshold",
            "1",
            "--out",
            &p("v2.unsigned"),
        ],
        0,
    );
    // Unsigned: refused, as not signed by the current root.
    let out = fleetctl_ok(
        &[
            "--json",
            "trust",
            "verify",
            "--current",
            &root_v1,
            &p("v2.unsigned"),
        ],
        1,
    );
    assert_eq!(json(&out)["refusal"], "untrusted");
    // Two root key holders sign on their own machines (separate invocations, separate files).
    for n in ["1", "3"] {
        fleetctl_ok(
            &[
                "trust",
                "sign",
                &p("v2.unsigned"),
                "--key",
                &format!("{dir}/root-{n}.key"),
                "--out",
                &p(&format!("v2.part{n}")),
            ],
            0,
        );
    }
    // One part alone is below the threshold.
    let out = fleetctl_ok(
        &[
            "--json",
            "trust",
            "verify",
            "--current",
            &root_v1,
            &p("v2.part1"),
        ],
        1,
    );
    let v = json(&out);
    assert_eq!(v["refusal"], "untrusted", "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("1 valid signature"),
        "{v}"
    );
    fleetctl_ok(
        &[
            "trust",
            "combine",
            &p("v2.part1"),
            &p("v2.part3"),
            "--out",
            &p("v2.bin"),
        ],
        0,
    );
    let out = fleetctl_ok(&["trust", "verify", "--current", &root_v1, &p("v2.bin")], 0);
    assert!(stdout(&out).contains("accepted"), "{}", stdout(&out));
    // What a device does with it, checked by the library a device uses.
    let held =
        fleet_proto::trust::TrustedRoot::provisioned(&std::fs::read(&root_v1).unwrap()).unwrap();
    let next = held
        .accept_next(
            &std::fs::read(p("v2.bin")).unwrap(),
            fleet_proto::time::now_ms(),
        )
        .unwrap();
    assert_eq!(next.version, 2);
    assert_eq!(
        next.commands.key_ids().collect::<Vec<_>>(),
        vec![new_id.as_str()]
    );
    assert_eq!(next.root, held.root, "the root keys did not change");
    // show --json says the same.
    let shown = json(&fleetctl_ok(&["--json", "trust", "show", &p("v2.bin")], 0));
    assert_eq!(shown["version"], 2);
    assert_eq!(shown["expired"], false);
    assert_eq!(shown["commands"]["key_ids"], serde_json::json!([new_id]));
    assert_eq!(shown["commands"]["threshold"], 1);
    assert_eq!(shown["root"], first["root"]);
    assert_eq!(shown["updates"], first["updates"]);
    assert_eq!(shown["signatures"].as_array().unwrap().len(), 2);
    assert_eq!(shown["self_signatures"], 2);
    // Text form names the key ids too.
    let text = stdout(&fleetctl_ok(&["trust", "show", &p("v2.bin")], 0));
    assert!(
        text.contains("root version 2") && text.contains(&new_id),
        "{text}"
    );

    // Rollback: a device holding version 2 refuses version 1.
    let out = fleetctl_ok(
        &[
            "--json",
            "trust",
            "verify",
            "--current",
            &p("v2.bin"),
            &root_v1,
        ],
        1,
    );
    assert_eq!(json(&out)["refusal"], "not_newer");
    // Parts over different roots are not combined; files are never overwritten.
    let out = fleetctl_ok(
        &[
            "trust",
            "combine",
            &p("v2.part1"),
            &root_v1,
            "--out",
            &p("mixed"),
        ],
        2,
    );
    assert!(stderr(&out).contains("different roots"), "{}", stderr(&out));
    fleetctl_ok(
        &["trust", "combine", &p("v2.part1"), "--out", &p("v2.bin")],
        2,
    );
}

#[test]
fn a_root_signed_by_the_new_root_keys_only_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_owned();
    let dir = p("trust");
    fleetctl_ok(
        &[
            "trust",
            "init",
            "--dir",
            &dir,
            "--root-keys",
            "2",
            "--root-threshold",
            "2",
        ],
        0,
    );
    let root_v1 = format!("{dir}/root.bin");
    keygen(&tmp.path().join("n1.key"));
    keygen(&tmp.path().join("n2.key"));
    fleetctl_ok(
        &[
            "trust",
            "new",
            "--current",
            &root_v1,
            "--set-role",
            "root",
            "--key",
            &p("n1.key.pub"),
            "--key",
            &p("n2.key.pub"),
            "--threshold",
            "2",
            "--out",
            &p("r2.unsigned"),
        ],
        0,
    );
    let sign = |input: &str, key: &str, out: &str| {
        fleetctl_ok(
            &["trust", "sign", &p(input), "--key", key, "--out", &p(out)],
            0,
        );
    };
    sign("r2.unsigned", &p("n1.key"), "new1");
    sign("new1", &p("n2.key"), "new-only");
    let out = fleetctl_ok(
        &[
            "--json",
            "trust",
            "verify",
            "--current",
            &root_v1,
            &p("new-only"),
        ],
        1,
    );
    let v = json(&out);
    assert_eq!(v["refusal"], "untrusted", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("not signed by the current root"),
        "{v}"
    );
    // The old keys only: the new root cannot sign itself.
    sign("r2.unsigned", &format!("{dir}/root-1.key"), "old1");
    sign("old1", &format!("{dir}/root-2.key"), "old-only");
    let out = fleetctl_ok(
        &[
            "--json",
            "trust",
            "verify",
            "--current",
            &root_v1,
            &p("old-only"),
        ],
        1,
    );
    assert_eq!(json(&out)["refusal"], "self_unsigned");
    // Both: accepted.
    fleetctl_ok(
        &[
            "trust",
            "combine",
            &p("new-only"),
            &p("old-only"),
            "--out",
            &p("r2.bin"),
        ],
        0,
    );
    fleetctl_ok(&["trust", "verify", "--current", &root_v1, &p("r2.bin")], 0);
    let shown = json(&fleetctl_ok(&["--json", "trust", "show", &p("r2.bin")], 0));
    let by: Vec<&str> = shown["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["by"].as_str().unwrap())
        .collect();
    assert_eq!(by, ["root", "root", "other", "other"], "{shown}");
}

#[test]
fn impossible_drafts_and_unusable_keys_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_owned();
    let dir = p("trust");
    fleetctl_ok(&["trust", "init", "--dir", &dir], 0);
    let root_v1 = format!("{dir}/root.bin");
    // A second init over it is refused.
    fleetctl_ok(&["trust", "init", "--dir", &dir], 2);
    // Removing the only commands key leaves the role empty.
    let shown = json(&fleetctl_ok(&["--json", "trust", "show", &root_v1], 0));
    let commands_id = shown["commands"]["key_ids"][0].as_str().unwrap().to_owned();
    let out = fleetctl_ok(
        &[
            "trust",
            "new",
            "--current",
            &root_v1,
            "--remove-key",
            &commands_id,
            "--out",
            &p("x"),
        ],
        2,
    );
    assert!(stderr(&out).contains("role commands"), "{}", stderr(&out));
    // A key nobody names.
    let out = fleetctl_ok(
        &[
            "trust",
            "new",
            "--current",
            &root_v1,
            "--remove-key",
            "0011223344556677",
            "--out",
            &p("x"),
        ],
        2,
    );
    assert!(stderr(&out).contains("no role names"), "{}", stderr(&out));
    // A threshold above the keys.
    let out = fleetctl_ok(
        &[
            "trust",
            "new",
            "--current",
            &root_v1,
            "--set-role",
            "updates",
            "--key",
            &format!("{dir}/updates-1.pub"),
            "--threshold",
            "2",
            "--out",
            &p("x"),
        ],
        2,
    );
    assert!(stderr(&out).contains("threshold"), "{}", stderr(&out));
    assert!(!tmp.path().join("x").exists());
    // Signing with a public key, or with something that is not a key.
    std::fs::write(p("junk.key"), "not a key").unwrap();
    for key in [format!("{dir}/root-1.pub"), p("junk.key")] {
        let out = fleetctl_ok(
            &["trust", "sign", &root_v1, "--key", &key, "--out", &p("s")],
            2,
        );
        assert!(stderr(&out).contains("--key"), "{}", stderr(&out));
    }
    // A command key file that is not a key: said before anything is sent.
    let out = fleetctl_ok(
        &[
            "--command-key",
            &p("junk.key"),
            "command",
            "send",
            "--device",
            "dev-0001",
            "--name",
            "x",
        ],
        2,
    );
    assert!(
        stderr(&out).contains("command signing key") && stderr(&out).contains("junk.key"),
        "{}",
        stderr(&out)
    );
}
