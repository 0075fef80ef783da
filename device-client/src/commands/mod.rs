//! Commands on the device: at most once, whatever the network and the device's restarts do.
//!
//! The gateway re-delivers a command until it has the result, so the same `command_id` can
//! arrive several times: after a lost PUBACK, a reconnect, or a device restart. The
//! [`CommandGate`] decides for each delivery:
//!
//! * new and not expired -> [`Verdict::Run`]; the gate records it as *started*, and the caller
//!   must persist that (see [`journal`]) **before** running it;
//! * finished before -> [`Verdict::Replay`] of the recorded result (the result was probably
//!   lost; it is sent again, the command is not run again);
//! * started but never finished (the device died while running it) -> [`Verdict::Interrupted`]:
//!   answered FAILED, not run again, because running twice is worse than not finishing for
//!   commands with effects in the physical world;
//! * expired (`expires_at_ms` passed) -> [`Verdict::Expired`], answered EXPIRED, never run;
//! * malformed (bad id) -> [`Verdict::Rejected`], answered REJECTED, not recorded.
//!
//! The gate remembers the last `window` command ids (default [`DEFAULT_WINDOW`]); older ones are
//! forgotten, oldest first. The gateway stops re-delivering a command once it has the result
//! or once it expires, so the window only needs to cover the commands still in flight.

pub(crate) mod journal;

use std::collections::{HashMap, VecDeque};

use fleet_proto::ids::validate_id;
use fleet_proto::v1::{Command, CommandResult, CommandStatus};
use serde::{Deserialize, Serialize};

/// Command ids remembered by default.
pub const DEFAULT_WINDOW: usize = 1024;

/// What to do with a delivered command.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Run it (it is recorded as started; persist the gate before running).
    Run,
    /// Already finished: send this recorded result again.
    Replay(CommandResult),
    /// Started before a restart and never finished: send this FAILED result, do not run.
    Interrupted(CommandResult),
    /// Expired: send this EXPIRED result, do not run.
    Expired(CommandResult),
    /// Malformed: send this REJECTED result, do not run.
    Rejected(CommandResult),
}

/// Why a completion is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    /// The command was never given out to run (or was forgotten).
    #[error("command {0:?} was not started")]
    NotStarted(String),
    /// The command already has a result.
    #[error("command {0:?} already has a result")]
    AlreadyFinished(String),
}

/// What the gate remembers of one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Entry {
    /// Handed to the application, no result yet.
    Started,
    /// Finished with this result (status, output, message, completed_at_ms).
    Done {
        status: i32,
        output: Vec<u8>,
        message: String,
        completed_at_ms: u64,
    },
}

impl Entry {
    fn from_result(r: &CommandResult) -> Self {
        Entry::Done {
            status: r.status,
            output: r.output.clone(),
            message: r.message.clone(),
            completed_at_ms: r.completed_at_ms,
        }
    }

    /// The recorded result, for a finished command.
    fn to_result(&self, id: &str) -> Option<CommandResult> {
        match self {
            Entry::Started => None,
            Entry::Done {
                status,
                output,
                message,
                completed_at_ms,
            } => Some(CommandResult {
                command_id: id.to_owned(),
                status: *status,
                output: output.clone(),
                message: message.clone(),
                completed_at_ms: *completed_at_ms,
            }),
        }
    }
}

/// The gate's persistent form.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GateSnapshot {
    /// Remembered commands, oldest first.
    entries: Vec<(String, Entry)>,
}

/// Decides, for each delivered command, whether it runs.
#[derive(Debug, Clone)]
pub struct CommandGate {
    window: usize,
    order: VecDeque<String>,
    entries: HashMap<String, Entry>,
}

fn result(id: &str, status: CommandStatus, message: &str, now_ms: u64) -> CommandResult {
    CommandResult {
        command_id: id.to_owned(),
        status: status.into(),
        output: Vec::new(),
        message: message.to_owned(),
        completed_at_ms: now_ms,
    }
}

impl CommandGate {
    /// An empty gate remembering `window` (at least 1) command ids.
    pub fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            order: VecDeque::new(),
            entries: HashMap::new(),
        }
    }

    /// A gate restored from its snapshot.
    pub fn from_snapshot(snapshot: GateSnapshot, window: usize) -> Self {
        let mut gate = Self::new(window);
        for (id, entry) in snapshot.entries {
            gate.remember(id, entry);
        }
        gate
    }

    /// The gate's persistent form.
    pub fn snapshot(&self) -> GateSnapshot {
        GateSnapshot {
            entries: self
                .order
                .iter()
                .filter_map(|id| self.entries.get(id).map(|e| (id.clone(), e.clone())))
                .collect(),
        }
    }

    /// Number of remembered commands.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn remember(&mut self, id: String, entry: Entry) {
        if self.entries.insert(id.clone(), entry).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.window {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }

    /// Judges one delivery of `cmd` at `now_ms`.
    pub fn offer(&mut self, cmd: &Command, now_ms: u64) -> Verdict {
        let id = cmd.command_id.as_str();
        if let Err(e) = validate_id(id) {
            return Verdict::Rejected(result(
                id,
                CommandStatus::Rejected,
                &format!("bad command id: {e}"),
                now_ms,
            ));
        }
        // Some(Some(result)): finished before; Some(None): started, never finished.
        match self.entries.get(id).map(|e| e.to_result(id)) {
            Some(Some(r)) => return Verdict::Replay(r),
            Some(None) => {
                let r = result(
                    id,
                    CommandStatus::Failed,
                    "interrupted: the device stopped while running this command; not run again",
                    now_ms,
                );
                self.record(&r);
                return Verdict::Interrupted(r);
            }
            None => {}
        }
        if cmd.expires_at_ms != 0 && now_ms >= cmd.expires_at_ms {
            let r = result(
                id,
                CommandStatus::Expired,
                "expired before it could run",
                now_ms,
            );
            self.record(&r);
            return Verdict::Expired(r);
        }
        self.remember(id.to_owned(), Entry::Started);
        Verdict::Run
    }

    fn record(&mut self, r: &CommandResult) {
        self.remember(r.command_id.clone(), Entry::from_result(r));
    }

    /// Records the application's result for a command it was told to run.
    pub fn complete(&mut self, r: &CommandResult) -> Result<(), GateError> {
        match self.entries.get(&r.command_id) {
            Some(Entry::Started) => {
                self.record(r);
                Ok(())
            }
            Some(Entry::Done { .. }) => Err(GateError::AlreadyFinished(r.command_id.clone())),
            None => Err(GateError::NotStarted(r.command_id.clone())),
        }
    }
}

impl Default for CommandGate {
    fn default() -> Self {
        Self::new(DEFAULT_WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cmd(id: &str, expires_at_ms: u64) -> Command {
        Command {
            command_id: id.into(),
            name: "reboot".into(),
            expires_at_ms,
            ..Command::default()
        }
    }

    fn done(id: &str, output: &[u8]) -> CommandResult {
        CommandResult {
            command_id: id.into(),
            status: CommandStatus::Succeeded.into(),
            output: output.to_vec(),
            message: String::new(),
            completed_at_ms: 5,
        }
    }

    #[test]
    fn runs_once_then_replays() {
        let mut g = CommandGate::default();
        assert_eq!(g.offer(&cmd("c1", 0), 1), Verdict::Run);
        assert_eq!(g.complete(&done("c1", b"ok")), Ok(()));
        assert_eq!(
            g.offer(&cmd("c1", 0), 2),
            Verdict::Replay(done("c1", b"ok"))
        );
        assert_eq!(
            g.complete(&done("c1", b"again")),
            Err(GateError::AlreadyFinished("c1".into()))
        );
        assert_eq!(
            g.complete(&done("c9", b"")),
            Err(GateError::NotStarted("c9".into()))
        );
    }

    #[test]
    fn started_but_unfinished_is_not_run_again() {
        let mut g = CommandGate::default();
        assert_eq!(g.offer(&cmd("c1", 0), 1), Verdict::Run);
        // The device restarts: the snapshot taken before running is all that is left.
        let mut g = CommandGate::from_snapshot(g.snapshot(), DEFAULT_WINDOW);
        let Verdict::Interrupted(r) = g.offer(&cmd("c1", 0), 2) else {
            panic!("not interrupted")
        };
        assert_eq!(r.status, i32::from(CommandStatus::Failed));
        // ...and every later delivery gets that same answer.
        assert_eq!(g.offer(&cmd("c1", 0), 3), Verdict::Replay(r));
    }

    #[test]
    fn expired_commands_never_run() {
        let mut g = CommandGate::default();
        let Verdict::Expired(r) = g.offer(&cmd("c1", 100), 100) else {
            panic!("ran an expired command")
        };
        assert_eq!(r.status, i32::from(CommandStatus::Expired));
        assert_eq!(
            g.offer(&cmd("c1", 100), 50),
            Verdict::Replay(r),
            "a re-delivery keeps the answer"
        );
        assert_eq!(g.offer(&cmd("c2", 101), 100), Verdict::Run);
        assert_eq!(
            g.offer(&cmd("c3", 0), u64::MAX),
            Verdict::Run,
            "0 never expires"
        );
    }

    #[test]
    fn malformed_ids_are_rejected_unrecorded() {
        let mut g = CommandGate::default();
        for bad in ["", "a/b", "#", &"x".repeat(65)] {
            assert!(
                matches!(g.offer(&cmd(bad, 0), 1), Verdict::Rejected(_)),
                "{bad:?}"
            );
        }
        assert!(g.is_empty());
    }

    #[test]
    fn window_forgets_oldest_first() {
        let mut g = CommandGate::new(3);
        for id in ["a", "b", "c", "d"] {
            assert_eq!(g.offer(&cmd(id, 0), 1), Verdict::Run);
            g.complete(&done(id, b"")).unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(g.len(), 3);
        assert_eq!(g.offer(&cmd("a", 0), 2), Verdict::Run, "forgotten");
        assert!(matches!(g.offer(&cmd("d", 0), 2), Verdict::Replay(_)));
    }

    proptest! {
        /// Whatever the order of deliveries, completions and restarts, a command id is handed
        /// out to run at most once while it is in the window.
        #[test]
        fn at_most_once(ops in prop::collection::vec((0u8..8, 0u8..3), 1..200)) {
            let mut g = CommandGate::new(64);
            let mut ran = std::collections::HashSet::new();
            for (id, op) in ops {
                let id = format!("c{id}");
                match op {
                    0 => if g.offer(&cmd(&id, 0), 1) == Verdict::Run {
                        prop_assert!(ran.insert(id.clone()), "{id} ran twice");
                    },
                    1 => { let _ = g.complete(&done(&id, b"")); }
                    _ => g = CommandGate::from_snapshot(g.snapshot(), 64),
                }
            }
        }
    }
}
