//! The gateway store: migrations, refusal of newer or corrupt files, the status registry's
//! ordering rule, and durability across a SIGKILL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Duration;

use fleet_broker::{StatusOutcome, Store, StoreError, STORE_FILE_NAME as FILE_NAME};
use fleet_testkit::CrashChild;

#[test]
fn fresh_store_is_migrated_in_wal_mode_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open_in(&dir.path().join("data")).unwrap();
    assert!(s.schema_version().unwrap() >= 1);
    s.put_status("dev-1", 1, b"r1", 10).unwrap();
    // WAL mode: the write-ahead log file exists next to the database.
    assert!(dir
        .path()
        .join("data")
        .join(format!("{FILE_NAME}-wal"))
        .exists());
    let version = s.schema_version().unwrap();
    drop(s);
    let s = Store::open_in(&dir.path().join("data")).unwrap();
    assert_eq!(s.schema_version().unwrap(), version);
    assert_eq!(
        s.device_state("dev-1").unwrap().unwrap().status,
        Some((1, b"r1".to_vec(), 10))
    );
    s.check_integrity().unwrap();
}

#[test]
fn newer_and_corrupt_files_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    drop(Store::open(&path).unwrap());
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
    }
    match Store::open(&path) {
        Err(StoreError::TooNew { found: 99, .. }) => {}
        other => panic!("expected TooNew, got {other:?}"),
    }

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, b"this is not an SQLite database, just bytes").unwrap();
    match Store::open(&garbage) {
        Err(e @ StoreError::Sqlite { .. }) => assert!(e.to_string().contains("garbage.db"), "{e}"),
        other => panic!("expected an SQLite error, got {other:?}"),
    }
}

#[test]
fn registry_keeps_the_newest_report_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open_in(dir.path()).unwrap();
    let mut stored = 0;
    // 500 reports, each offered twice (a re-delivery), plus late ones from the past.
    for seq in 1..=500u64 {
        for _ in 0..2 {
            if s.put_status("dev-1", seq, format!("report-{seq}").as_bytes(), seq)
                .unwrap()
                == StatusOutcome::Stored
            {
                stored += 1;
            }
        }
        if seq > 10 {
            assert_eq!(
                s.put_status("dev-1", seq - 10, b"late", 0).unwrap(),
                StatusOutcome::Stale { stored: seq }
            );
        }
    }
    assert_eq!(stored, 500);
    let state = s.device_state("dev-1").unwrap().unwrap();
    assert_eq!(state.status, Some((500, b"report-500".to_vec(), 500)));
    // Presence is kept beside the report, independently.
    s.put_presence("dev-1", b"online", 7).unwrap();
    s.put_presence("dev-2", b"offline", 8).unwrap();
    let all = s.device_states().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].presence, Some((b"online".to_vec(), 7)));
    assert_eq!(all[0].status.as_ref().map(|s| s.0), Some(500));
    assert_eq!(all[1].status, None);
    // Sequences above i64::MAX survive the round trip.
    assert_eq!(
        s.put_status("dev-3", u64::MAX - 1, b"big", 1).unwrap(),
        StatusOutcome::Stored
    );
    assert_eq!(
        s.put_status("dev-3", u64::MAX - 2, b"older", 1).unwrap(),
        StatusOutcome::Stale {
            stored: u64::MAX - 1
        }
    );
}

/// Child half of the crash test: writes reports forever, printing each committed sequence.
/// Run only by `committed_reports_survive_sigkill`, as a child process.
#[test]
#[ignore = "helper process of committed_reports_survive_sigkill"]
fn crash_writer_child() {
    let Some(path) = std::env::var_os("STORE_CRASH_CHILD") else {
        return;
    };
    let mut s = Store::open(std::path::Path::new(&path)).unwrap();
    let mut out = std::io::stdout();
    for seq in 1.. {
        s.put_status("dev-1", seq, &[0xab; 200], seq).unwrap();
        writeln!(out, "{seq}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn committed_reports_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    drop(Store::open(&path).unwrap());
    let mut child = CrashChild::start(
        "crash_writer_child",
        ("STORE_CRASH_CHILD", path.as_os_str()),
    );
    let confirmed = child
        .confirmations(300, Duration::from_secs(60), |l| l.parse::<u64>().ok())
        .last()
        .copied()
        .unwrap_or(0);
    child.kill(); // SIGKILL, mid-write
    let s = Store::open(&path).unwrap();
    s.check_integrity().unwrap();
    let (seq, report, _) = s.device_state("dev-1").unwrap().unwrap().status.unwrap();
    assert!(seq >= confirmed, "confirmed {confirmed}, found {seq}");
    assert_eq!(report, vec![0xab; 200]);
}
