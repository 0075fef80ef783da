//! The README's main command: the demo runs unattended to a successful summary (here with a
//! smaller fleet and image, the same code path). It lives beside the demo so that cargo builds
//! the `demo` binary it runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use fleet_testkit::run;

/// How long one demo run may take on a loaded machine.
const DEMO: Duration = Duration::from_secs(600);

#[test]
fn the_demo_runs_to_a_successful_summary() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo-data");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_demo"));
    cmd.args(["--devices", "12", "--image-kib", "512", "--data"])
        .arg(&data);
    let out = run(cmd, DEMO);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "12 devices connected",
        "command 'blink' to class demo-pump: 12/12 succeeded",
        "version after          1.1.0 x 12",
        "12 committed, 0 failed (completed)",
        "demo: everything succeeded",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // Each device's running slot holds the released image.
    let image = std::fs::read(data.join("rootfs-1.1.0.img")).unwrap();
    for i in 1..=12 {
        let state = data.join(format!("devices/dev-{i:04}"));
        let slot = device_client::SlotInstaller::new(&state)
            .active_image("rootfs")
            .unwrap();
        assert!(std::fs::read(slot).unwrap() == image, "dev-{i:04}");
    }
    // A second run wipes the first one's directory; another directory is never wiped.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_demo"));
    cmd.args(["--devices", "2", "--image-kib", "64", "--data"])
        .arg(&data);
    let again = run(cmd, DEMO);
    assert!(again.status.success());
    let foreign = dir.path().join("mine");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("keep"), b"x").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_demo"));
    cmd.args(["--devices", "2", "--data"]).arg(&foreign);
    let refused = run(cmd, DEMO);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a demo directory"));
    assert!(foreign.join("keep").exists());
}

/// Devices restarted mid-update (shut down and started again on the same state directory, a
/// few every second) resume and commit: none fails with a missing staging file or slot, as
/// they did when a new client could start while the old one's update agent still worked.
#[test]
fn churn_during_the_rollout_fails_no_device() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo-data");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_demo"));
    cmd.args([
        "--devices",
        "40",
        "--image-kib",
        "4096",
        "--churn",
        "8",
        "--data",
    ])
    .arg(&data);
    let out = run(cmd, DEMO);
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    for want in [
        "with 8 device(s) restarting every second",
        "40 committed, 0 failed (completed)",
        "demo: everything succeeded",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}\n{err}");
    }
    assert!(!err.contains("churn: restart failed"), "{err}");
    // The first round of restarts comes as the rollout starts, so some always hit it.
    let restarts: usize = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_suffix(" device restarts while the rollout ran")
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no restart count in:\n{text}"));
    assert!(restarts >= 8, "{restarts} restarts");
}
