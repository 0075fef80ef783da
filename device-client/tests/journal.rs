//! The command gate across process deaths: a command that ran is never run again after a
//! restart, whatever instant the process was killed at.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Duration;

use device_client::{
    Journal, JournalError, Verdict, DEFAULT_COMMAND_WINDOW as DEFAULT_WINDOW,
    JOURNAL_FILE_NAME as FILE_NAME,
};
use fleet_proto::v1::{Command, CommandResult, CommandStatus};
use fleet_testkit::CrashChild;

fn cmd(id: &str) -> Command {
    Command {
        command_id: id.into(),
        name: "actuate".into(),
        ..Command::default()
    }
}

fn ok(id: &str) -> CommandResult {
    CommandResult {
        command_id: id.into(),
        status: CommandStatus::Succeeded.into(),
        output: id.as_bytes().to_vec(),
        ..CommandResult::default()
    }
}

#[test]
fn result_survives_a_restart_and_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::new(dir.path());
    let mut gate = journal.load(DEFAULT_WINDOW).unwrap();
    assert_eq!(gate.offer(&cmd("c1"), 1), Verdict::Run);
    journal.save(&gate).unwrap();
    gate.complete(&ok("c1")).unwrap();
    journal.save(&gate).unwrap();
    // The process dies before the result is acknowledged; the gateway re-delivers.
    let mut gate = journal.load(DEFAULT_WINDOW).unwrap();
    assert_eq!(gate.offer(&cmd("c1"), 2), Verdict::Replay(ok("c1")));
}

#[test]
fn corrupt_journal_is_an_error_not_amnesia() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE_NAME), b"{ not json").unwrap();
    assert!(matches!(
        Journal::new(dir.path()).load(DEFAULT_WINDOW),
        Err(JournalError::Corrupt { .. })
    ));
}

/// Child half of the crash test: runs commands c0, c1, ... through gate and journal forever,
/// printing "ran cN" after each command's effect and before recording its result.
#[test]
#[ignore = "helper process of a_command_that_ran_never_runs_again_after_sigkill"]
fn device_child() {
    let Some(dir) = std::env::var_os("JOURNAL_CHILD") else {
        return;
    };
    let journal = Journal::new(std::path::Path::new(&dir));
    let mut gate = journal.load(DEFAULT_WINDOW).unwrap();
    let mut out = std::io::stdout();
    for i in 0.. {
        let id = format!("c{i}");
        if gate.offer(&cmd(&id), 1) != Verdict::Run {
            continue;
        }
        journal.save(&gate).unwrap(); // started: persisted before the effect
        writeln!(out, "ran {id}").unwrap(); // the effect
        out.flush().unwrap();
        gate.complete(&ok(&id)).unwrap();
        journal.save(&gate).unwrap();
    }
}

#[test]
fn a_command_that_ran_never_runs_again_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = CrashChild::start("device_child", ("JOURNAL_CHILD", dir.path().as_os_str()));
    let ran = child.confirmations(200, Duration::from_secs(60), |l| {
        l.strip_prefix("ran ").map(str::to_owned)
    });
    child.kill(); // SIGKILL at an arbitrary point of the loop

    // After the restart the gateway re-delivers every one of them: none runs again.
    let mut gate = Journal::new(dir.path()).load(DEFAULT_WINDOW).unwrap();
    for id in &ran {
        match gate.offer(&cmd(id), 2) {
            Verdict::Replay(r) => assert!(
                r.status == i32::from(CommandStatus::Succeeded)
                    || r.status == i32::from(CommandStatus::Failed)
            ),
            Verdict::Interrupted(_) => {} // killed between its effect and its result
            other => panic!("{id} would run again: {other:?}"),
        }
    }
}
