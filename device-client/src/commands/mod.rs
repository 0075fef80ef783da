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
//! * started by this gate and not finished yet (the application is still running it; the
//!   gateway re-delivers open commands at every reconnect) -> [`Verdict::Running`]: nothing is
//!   answered now, the result is sent when the application finishes, and replayed after;
//! * started but never finished by a previous process (the device stopped while running it:
//!   the entry was found *started* in the journal), or dropped unanswered by the application
//!   -> [`Verdict::Interrupted`]: answered FAILED, not run again, because running twice is worse
//!   than not finishing for commands with effects in the physical world;
//! * expired (`expires_at_ms` passed) -> [`Verdict::Expired`], answered EXPIRED, never run;
//! * malformed (bad id) -> [`Verdict::Rejected`], answered REJECTED, not recorded;
//! * not remembered and issued at or before the replay floor -> [`Verdict::TooOld`]: it may
//!   be a command the gate has forgotten, so it is refused (REPLAYED), not recorded.
//!
//! Which commands are running *in this process* is not persisted: a gate rebuilt from its
//! snapshot ([`CommandGate::from_snapshot`], i.e. after a restart) treats every started,
//! unfinished command as interrupted.
//!
//! The gate remembers the last `window` command ids (default [`DEFAULT_WINDOW`]); older ones are
//! forgotten, oldest first. The gateway stops re-delivering a command once it has the result
//! or once it expires, so the window only needs to cover the commands still in flight. Replays
//! beyond that memory are caught by the **replay floor**: the highest `issued_at_ms` of the
//! commands the gate has forgotten, persisted with it. A command the gate does not remember
//! and that was issued at or before the floor may have run already: it is refused. (Commands
//! are signed, so the issue time cannot be moved by whoever replays one.)

pub(crate) mod journal;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

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
    /// Handed out by this gate and still running: do not run it again and answer nothing
    /// now; its result is sent when the application finishes it.
    Running,
    /// Already finished: send this recorded result again.
    Replay(CommandResult),
    /// Started before a restart and never finished (or dropped unanswered by the
    /// application): send this FAILED result (now recorded), do not run.
    Interrupted(CommandResult),
    /// Expired: send this EXPIRED result, do not run.
    Expired(CommandResult),
    /// Malformed: send this REJECTED result, do not run.
    Rejected(CommandResult),
    /// Not remembered, and issued at or before the replay floor (the newest issue time of
    /// the commands the gate has forgotten): it may have run already. Refused, not recorded.
    TooOld {
        /// The floor it fell under.
        floor_ms: u64,
    },
}

/// Why a completion is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    /// The command was never given out to run by this gate (or was forgotten, or was started
    /// by a previous process).
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
                command_digest: Default::default(),
                refusal: Default::default(),
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
    /// Issue time of the remembered commands (absent in journals of earlier versions: 0).
    #[serde(default)]
    issued_at_ms: BTreeMap<String, u64>,
    /// The replay floor: the newest issue time of a forgotten command.
    #[serde(default)]
    floor_ms: u64,
}

/// Decides, for each delivered command, whether it runs.
#[derive(Debug, Clone)]
pub struct CommandGate {
    window: usize,
    order: VecDeque<String>,
    entries: HashMap<String, Entry>,
    /// Started by this gate (this process) and not finished: the application holds them. Not
    /// persisted: after a restart nothing is running.
    running: HashSet<String>,
    /// Started by this gate and dropped by the application without an answer.
    abandoned: HashSet<String>,
    /// Issue time of each remembered command.
    issued: HashMap<String, u64>,
    /// The newest issue time of a forgotten command.
    floor_ms: u64,
}

/// The answer to a command started but never finished by a previous process.
const INTERRUPTED: &str =
    "interrupted: the device stopped while running this command; not run again";
/// The answer to a command the application dropped without answering.
const ABANDONED: &str =
    "interrupted: the application dropped this command without answering; not run again";

fn result(id: &str, status: CommandStatus, message: &str, now_ms: u64) -> CommandResult {
    CommandResult {
        command_digest: Default::default(),
        refusal: Default::default(),
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
            running: HashSet::new(),
            abandoned: HashSet::new(),
            issued: HashMap::new(),
            floor_ms: 0,
        }
    }

    /// A gate restored from its snapshot. Commands the snapshot has started and unfinished
    /// were running in a previous process: a delivery of one is answered
    /// [`Verdict::Interrupted`].
    pub fn from_snapshot(snapshot: GateSnapshot, window: usize) -> Self {
        let mut gate = Self::new(window);
        gate.floor_ms = snapshot.floor_ms;
        for (id, entry) in snapshot.entries {
            if let Some(t) = snapshot.issued_at_ms.get(&id) {
                gate.issued.insert(id.clone(), *t);
            }
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
            issued_at_ms: self.issued.iter().map(|(id, t)| (id.clone(), *t)).collect(),
            floor_ms: self.floor_ms,
        }
    }

    /// The replay floor: commands not remembered and issued at or before it are refused.
    pub fn replay_floor_ms(&self) -> u64 {
        self.floor_ms
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
                self.running.remove(&old);
                self.abandoned.remove(&old);
                if let Some(t) = self.issued.remove(&old) {
                    self.floor_ms = self.floor_ms.max(t);
                }
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
            Some(None) if self.running.contains(id) => return Verdict::Running,
            Some(None) => {
                let why = if self.abandoned.contains(id) {
                    ABANDONED
                } else {
                    INTERRUPTED
                };
                let r = result(id, CommandStatus::Failed, why, now_ms);
                self.record(&r);
                return Verdict::Interrupted(r);
            }
            None => {}
        }
        if self.floor_ms > 0 && cmd.issued_at_ms <= self.floor_ms {
            return Verdict::TooOld {
                floor_ms: self.floor_ms,
            };
        }
        self.issued.insert(id.to_owned(), cmd.issued_at_ms);
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
        self.running.insert(id.to_owned());
        Verdict::Run
    }

    fn record(&mut self, r: &CommandResult) {
        self.running.remove(&r.command_id);
        self.abandoned.remove(&r.command_id);
        self.remember(r.command_id.clone(), Entry::from_result(r));
    }

    /// The application dropped a command it was given without answering it: the next
    /// delivery answers it FAILED ([`Verdict::Interrupted`]) instead of waiting for a result
    /// that will not come. No effect on a command that is not running.
    pub fn abandon(&mut self, command_id: &str) {
        if self.running.remove(command_id) {
            self.abandoned.insert(command_id.to_owned());
        }
    }

    /// Records the application's result for a command this gate told it to run. A command
    /// started by a previous process (found in the snapshot) cannot be completed: nothing in
    /// this process runs it.
    pub fn complete(&mut self, r: &CommandResult) -> Result<(), GateError> {
        let id = &r.command_id;
        match self.entries.get(id) {
            Some(Entry::Started) if self.running.contains(id) || self.abandoned.contains(id) => {
                self.record(r);
                Ok(())
            }
            Some(Entry::Done { .. }) => Err(GateError::AlreadyFinished(id.clone())),
            Some(Entry::Started) | None => Err(GateError::NotStarted(id.clone())),
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
    #![allow(clippy::unwrap_used)]
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
            command_digest: Default::default(),
            refusal: Default::default(),
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

    #[test]
    fn a_redelivery_while_running_waits_for_the_result() {
        let mut g = CommandGate::default();
        assert_eq!(g.offer(&cmd("c1", 0), 1), Verdict::Run);
        // The gateway re-delivers at a reconnect while the application still runs it.
        assert_eq!(g.offer(&cmd("c1", 0), 2), Verdict::Running);
        assert_eq!(g.offer(&cmd("c1", 0), 3), Verdict::Running);
        assert_eq!(g.complete(&done("c1", b"ok")), Ok(()));
        assert_eq!(
            g.offer(&cmd("c1", 0), 4),
            Verdict::Replay(done("c1", b"ok"))
        );
        // Running is not persisted: after a restart the same journal says interrupted.
        assert_eq!(g.offer(&cmd("c2", 0), 5), Verdict::Run);
        let mut g = CommandGate::from_snapshot(g.snapshot(), DEFAULT_WINDOW);
        assert!(matches!(
            g.offer(&cmd("c2", 0), 6),
            Verdict::Interrupted(r) if r.message == INTERRUPTED
        ));
        assert_eq!(
            g.complete(&done("c2", b"late")),
            Err(GateError::AlreadyFinished("c2".into()))
        );
    }

    #[test]
    fn a_previous_process_command_cannot_be_completed() {
        let mut g = CommandGate::default();
        assert_eq!(g.offer(&cmd("c1", 0), 1), Verdict::Run);
        let mut g = CommandGate::from_snapshot(g.snapshot(), DEFAULT_WINDOW);
        assert_eq!(
            g.complete(&done("c1", b"")),
            Err(GateError::NotStarted("c1".into()))
        );
    }

    #[test]
    fn a_dropped_command_is_answered_interrupted() {
        let mut g = CommandGate::default();
        assert_eq!(g.offer(&cmd("c1", 0), 1), Verdict::Run);
        g.abandon("c1");
        let Verdict::Interrupted(r) = g.offer(&cmd("c1", 0), 2) else {
            panic!("not interrupted")
        };
        assert_eq!(r.message, ABANDONED);
        assert_eq!(g.offer(&cmd("c1", 0), 3), Verdict::Replay(r));
        g.abandon("c9"); // unknown: nothing happens
        assert_eq!(g.offer(&cmd("c9", 0), 4), Verdict::Run);
    }

    #[test]
    fn the_floor_survives_a_restart_and_old_journals_load() {
        let mut g = CommandGate::new(1);
        let c = |id: &str, t: u64| Command {
            issued_at_ms: t,
            ..cmd(id, 0)
        };
        assert_eq!(g.offer(&c("a", 5), 1), Verdict::Run);
        assert_eq!(g.offer(&c("b", 3), 1), Verdict::Run); // "a" forgotten: floor 5
        assert_eq!(g.replay_floor_ms(), 5);
        let json = serde_json::to_string(&g.snapshot()).unwrap();
        let mut g = CommandGate::from_snapshot(serde_json::from_str(&json).unwrap(), 1);
        assert_eq!(g.offer(&c("a", 5), 2), Verdict::TooOld { floor_ms: 5 });
        assert_eq!(g.offer(&c("z", 4), 2), Verdict::TooOld { floor_ms: 5 });
        assert_eq!(g.offer(&c("y", 6), 2), Verdict::Run);
        // The format of earlier versions (no issue times, no floor).
        let old: GateSnapshot = serde_json::from_str(r#"{"entries":[["a","Started"]]}"#).unwrap();
        let mut g = CommandGate::from_snapshot(old, 4);
        assert_eq!(g.replay_floor_ms(), 0);
        assert!(matches!(g.offer(&c("a", 1), 3), Verdict::Interrupted(_)));
    }

    /// One step of [`gate_matches_what_the_device_did`].
    #[derive(Debug, Clone)]
    enum Op {
        /// The gateway delivers (or re-delivers) command `c{0}`.
        Deliver(u8),
        /// The application answers `c{0}` SUCCEEDED with this output, or FAILED.
        Answer(u8, Option<u8>),
        /// The application drops `c{0}` without answering.
        Drop(u8),
        /// Power loss: the process dies; the next one rebuilds the gate from the journal.
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..8).prop_map(Op::Deliver),
            3 => (0u8..8, prop::option::of(any::<u8>())).prop_map(|(i, o)| Op::Answer(i, o)),
            1 => (0u8..8).prop_map(Op::Drop),
            1 => Just(Op::Restart),
        ]
    }

    /// What the device did, tracked beside the gate (the reference the gate must agree with).
    #[derive(Default)]
    struct Device {
        /// Every command ever handed to the application, across restarts.
        ran: std::collections::HashSet<String>,
        /// Held by the application of the running process, unanswered.
        holding: std::collections::HashSet<String>,
        /// Dropped unanswered by the application of the running process.
        dropped: std::collections::HashSet<String>,
        /// Held, unanswered, by a process that died.
        cut: std::collections::HashSet<String>,
        /// The first answer each command got (the application's, or the gate's own).
        answers: HashMap<String, CommandResult>,
    }

    /// Commands c6 and c7 expire at this instant (the clock is the step number).
    const EXPIRES: u64 = 40;

    fn expiry(i: u8) -> u64 {
        if i >= 6 {
            EXPIRES
        } else {
            0
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random deliveries, re-deliveries, answers, drops and power losses (the gate rebuilt
        /// from its last saved snapshot, through its JSON form). Every verdict is the one the
        /// device's history calls for: a command runs at most once; one the application still
        /// holds is never answered (above all not "interrupted"); one held by a process that
        /// died is answered interrupted, exactly those; every later answer repeats the first.
        #[test]
        fn gate_matches_what_the_device_did(ops in prop::collection::vec(op(), 1..300)) {
            let mut g = CommandGate::new(64);
            let mut d = Device::default();
            for (step, op) in ops.into_iter().enumerate() {
                let now = step as u64 + 1;
                match op {
                    Op::Deliver(i) => {
                        let id = format!("c{i}");
                        let v = g.offer(&cmd(&id, expiry(i)), now);
                        if d.holding.contains(&id) {
                            prop_assert_eq!(&v, &Verdict::Running, "{} is running here", id);
                        } else if let Some(first) = d.answers.get(&id) {
                            prop_assert_eq!(&v, &Verdict::Replay(first.clone()), "{}", id);
                        } else if d.cut.contains(&id) || d.dropped.contains(&id) {
                            let Verdict::Interrupted(r) = &v else {
                                return Err(TestCaseError::fail(format!("{id}: {v:?}")));
                            };
                            prop_assert_eq!(r.status, i32::from(CommandStatus::Failed));
                            let why = if d.cut.contains(&id) { INTERRUPTED } else { ABANDONED };
                            prop_assert_eq!(r.message.as_str(), why);
                            d.answers.insert(id.clone(), r.clone());
                        } else {
                            prop_assert!(!d.ran.contains(&id), "{} would run twice: {:?}", id, v);
                            if expiry(i) != 0 && now >= expiry(i) {
                                let Verdict::Expired(r) = &v else {
                                    return Err(TestCaseError::fail(format!("{id}: {v:?}")));
                                };
                                d.answers.insert(id.clone(), r.clone());
                            } else {
                                prop_assert_eq!(&v, &Verdict::Run, "{}", id);
                                d.ran.insert(id.clone());
                                d.holding.insert(id.clone());
                            }
                        }
                    }
                    Op::Answer(i, output) => {
                        let id = format!("c{i}");
                        let r = match output {
                            Some(o) => CommandResult { completed_at_ms: now, ..done(&id, &[o]) },
                            None => result(&id, CommandStatus::Failed, "no", now),
                        };
                        let got = g.complete(&r);
                        if d.holding.remove(&id) {
                            // The application's answer is never refused.
                            prop_assert_eq!(got, Ok(()), "{}", id);
                            prop_assert!(d.answers.insert(id, r).is_none());
                        } else if d.dropped.contains(&id) && !d.answers.contains_key(&id) {
                            // A late answer (a cancelled respond) still counts.
                            prop_assert_eq!(got, Ok(()), "{}", id);
                            d.answers.insert(id, r);
                        } else {
                            prop_assert!(got.is_err(), "{} completed by nobody", id);
                        }
                    }
                    Op::Drop(i) => {
                        let id = format!("c{i}");
                        g.abandon(&id);
                        if d.holding.remove(&id) {
                            d.dropped.insert(id);
                        }
                    }
                    Op::Restart => {
                        let json = serde_json::to_vec(&g.snapshot())
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let snapshot = serde_json::from_slice(&json)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        g = CommandGate::from_snapshot(snapshot, 64);
                        let unanswered: Vec<String> = d
                            .holding
                            .drain()
                            .chain(d.dropped.drain())
                            .filter(|id| !d.answers.contains_key(id))
                            .collect();
                        d.cut.extend(unanswered);
                    }
                }
            }
        }

        /// With a window far smaller than the commands in flight, answers, drops and power
        /// losses (the gate rebuilt from its JSON snapshot, replay floor included): a command
        /// runs at most once EVER, even after the gate forgot it; a command is refused as too
        /// old only if it was issued no later than a command the gate saw before; and a
        /// command issued after everything seen so far always runs.
        #[test]
        fn the_replay_floor_keeps_forgotten_commands_from_running_again(
            ops in prop::collection::vec((0u8..24, 0u8..4), 1..300),
            window in 1usize..6,
        ) {
            // Issue times are not in id order (commands are not delivered in issue order).
            let issued = |i: u8| u64::from(i.wrapping_mul(7) % 24) + 1;
            let mut g = CommandGate::new(window);
            let mut ran = std::collections::HashSet::new();
            let mut newest_seen = 0u64;
            for (step, (i, op)) in ops.into_iter().enumerate() {
                let id = format!("c{i}");
                let now = step as u64 + 1;
                match op {
                    0 | 1 => {
                        let c = Command { issued_at_ms: issued(i), ..cmd(&id, 0) };
                        let v = g.offer(&c, now);
                        match &v {
                            Verdict::Run => {
                                prop_assert!(ran.insert(id.clone()), "{} ran twice", id);
                            }
                            Verdict::TooOld { floor_ms } => {
                                prop_assert!(issued(i) <= *floor_ms);
                                prop_assert!(*floor_ms <= newest_seen, "floor {} above anything seen", floor_ms);
                            }
                            _ => {}
                        }
                        if issued(i) > newest_seen && !ran.contains(&id) {
                            prop_assert_eq!(&v, &Verdict::Run, "{} is newer than anything seen", id);
                        }
                        newest_seen = newest_seen.max(issued(i));
                    }
                    2 => { let _ = g.complete(&done(&id, b"")); }
                    _ => {
                        let json = serde_json::to_vec(&g.snapshot())
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let snapshot = serde_json::from_slice(&json)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        g = CommandGate::from_snapshot(snapshot, window);
                    }
                }
            }
        }

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
