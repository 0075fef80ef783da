//! The status outbox on disk: reports survive restarts and crashes, in order, numbered past
//! anything ever handed out, and the bound is enforced on disk too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Duration;

use device_client::{OutboxStore, Pushed};
use fleet_proto::v1::StatusReport;
use fleet_testkit::CrashChild;

fn report(i: u64) -> StatusReport {
    StatusReport {
        firmware_version: format!("r{i}"),
        ..StatusReport::default()
    }
}

fn pending(s: &OutboxStore) -> Vec<u64> {
    s.outbox().pending().map(|r| r.sequence).collect()
}

#[test]
fn five_hundred_reports_wait_across_restarts_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = OutboxStore::open(dir.path(), 1000).unwrap();
    for i in 0..500 {
        s.push(report(i)).unwrap();
    }
    drop(s);
    let mut s = OutboxStore::open(dir.path(), 1000).unwrap();
    assert_eq!(pending(&s), (1..=500).collect::<Vec<_>>());
    assert!(s
        .outbox()
        .pending()
        .enumerate()
        .all(|(i, r)| r.firmware_version == format!("r{i}")));
    s.acknowledge(200).unwrap();
    drop(s);
    let mut s = OutboxStore::open(dir.path(), 1000).unwrap();
    assert_eq!(pending(&s), (201..=500).collect::<Vec<_>>());
    // Numbering continues after the restart; acknowledged sequences are never reused.
    assert_eq!(
        s.push(report(0)).unwrap().1,
        Pushed::Queued { sequence: 501 }
    );
    s.acknowledge(501).unwrap();
    drop(s);
    let mut s = OutboxStore::open(dir.path(), 1000).unwrap();
    assert!(pending(&s).is_empty());
    assert_eq!(
        s.push(report(0)).unwrap().1,
        Pushed::Queued { sequence: 502 }
    );
}

#[test]
fn the_bound_holds_on_disk_and_bad_files_are_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = OutboxStore::open(dir.path(), 5).unwrap();
    for i in 0..8 {
        s.push(report(i)).unwrap();
    }
    assert_eq!(pending(&s), [4, 5, 6, 7, 8]);
    assert_eq!(s.outbox().dropped(), 3);
    let files = std::fs::read_dir(dir.path().join("status"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "pb")
        })
        .count();
    assert_eq!(files, 5);
    drop(s);
    // A smaller bound at the next start drops the oldest, on disk too.
    let s = OutboxStore::open(dir.path(), 2).unwrap();
    assert_eq!(pending(&s), [7, 8]);
    drop(s);
    let s = OutboxStore::open(dir.path(), 10).unwrap();
    assert_eq!(pending(&s), [7, 8]);
    drop(s);
    // A damaged file is set aside and reported, the rest restored.
    std::fs::write(
        dir.path().join("status").join(format!("{:020}.pb", 8)),
        [0xff, 0xff, 0xff],
    )
    .unwrap();
    let s = OutboxStore::open(dir.path(), 10).unwrap();
    assert_eq!(pending(&s), [7]);
    assert_eq!(s.unreadable.len(), 1);
    assert!(s.unreadable[0].exists());
}

/// Child half of the crash test: pushes reports forever, printing each sequence once `push`
/// has returned.
#[test]
#[ignore = "helper process of queued_reports_survive_sigkill"]
fn reporter_child() {
    let Some(dir) = std::env::var_os("OUTBOX_CHILD") else {
        return;
    };
    let mut s = OutboxStore::open(std::path::Path::new(&dir), 10_000).unwrap();
    let mut out = std::io::stdout();
    for i in 0.. {
        let (r, _) = s.push(report(i)).unwrap();
        writeln!(out, "{}", r.sequence).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn queued_reports_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = CrashChild::start("reporter_child", ("OUTBOX_CHILD", dir.path().as_os_str()));
    let confirmed: Vec<u64> = child.confirmations(300, Duration::from_secs(60), |l| l.parse().ok());
    child.kill();
    let mut s = OutboxStore::open(dir.path(), 10_000).unwrap();
    let have = pending(&s);
    for seq in &confirmed {
        assert!(have.contains(seq), "report {seq} was confirmed but is gone");
    }
    assert!(have.windows(2).all(|w| w[0] < w[1]));
    let last = *have.last().unwrap();
    let (next, _) = s.push(report(0)).unwrap();
    assert!(
        next.sequence > last,
        "sequence {} reused after a crash",
        next.sequence
    );
}
