//! The device's protocol logic as an I/O-free state machine: values in, actions out.
//!
//! The driver (module `client`) feeds it what happens (connected, a message arrived, a packet
//! id was assigned, an acknowledgement came, the application reported or finished something)
//! and carries out the [`Action`]s it returns: subscribe, publish, persist the command gate, hand
//! a command to the application. Everything here is deterministic and testable without a
//! network or a clock.
//!
//! Acknowledgements: the MQTT client numbers QoS 1 publishes in the order they are handed to
//! it, so the session keeps the tags of the publishes it asked for in that order and binds each
//! to the packet id the client reports ([`Session::on_sent`]); a PUBACK then names what was
//! delivered. A lost connection forgets all of it: the status outbox is re-sent from its head
//! on the next connection (the gateway drops duplicates by sequence), and command results are
//! re-sent when the gateway re-delivers their command.

use std::collections::{HashMap, VecDeque};

use fleet_proto::command::{verify_command, Recipient, Refused, VerifiedCommand};
use fleet_proto::topics::{self, DeviceTopic};
use fleet_proto::trust::TrustedRoot;
use fleet_proto::v1::{
    CommandRefusal, CommandResult, Presence, PresenceState, TrustReport, UpdateProgress,
};
use fleet_proto::{DeviceId, Message};

use crate::commands::{CommandGate, Verdict};
use crate::status::Outbox;

/// Status reports in flight (sent, not yet acknowledged) on one connection.
pub(crate) const DEFAULT_STATUS_WINDOW: usize = 32;

/// What a publish is, so its acknowledgement can be acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tag {
    /// A status report with this sequence.
    Status(u64),
    /// The result of this command.
    Result(String),
    /// A presence message.
    Presence,
    /// An update progress report.
    Progress,
    /// The device's trust report.
    Trust,
}

/// One publish for the driver to send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Publish {
    /// Topic name.
    pub topic: String,
    /// Encoded protobuf.
    pub payload: Vec<u8>,
    /// Retained on the gateway.
    pub retain: bool,
    /// What it is. Every publish of the session is QoS 1.
    pub tag: Tag,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Subscribe (QoS 1) to these filters.
    Subscribe(Vec<String>),
    /// Subscribe at QoS 0 (update chunks: the update agent asks again for what is lost).
    SubscribeAtMostOnce(Vec<String>),
    /// Publish at QoS 1.
    Publish(Publish),
    /// Persist the command gate (before the actions that follow).
    SaveGate,
    /// Give this command (verified) to the application to run.
    Run(VerifiedCommand),
    /// A delivery was refused before the gate saw it (its answer follows): count and log it.
    Refused(Refused),
    /// A message was not understood; log it (it is dropped).
    Malformed {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
}

/// Fixed facts about the device, carried in presence messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceInfo {
    /// The device id (its certificate's).
    pub id: DeviceId,
    /// Hardware class.
    pub device_class: String,
    /// Running firmware version.
    pub firmware_version: String,
    /// Random per process start.
    pub session_id: String,
}

/// The session state machine.
#[derive(Debug)]
pub(crate) struct Session {
    info: DeviceInfo,
    connected: bool,
    window: usize,
    /// Tags of requested publishes not yet given a packet id, in request order.
    unnumbered: VecDeque<Tag>,
    /// Publishes sent and not yet acknowledged, by packet id.
    by_pkid: HashMap<u16, Tag>,
    /// Highest status sequence handed to the client on this connection.
    status_sent_upto: Option<u64>,
    /// Status reports in flight on this connection.
    status_inflight: usize,
    /// Results to hold back (tests of the device crashing before its result is delivered).
    #[cfg(feature = "fault-injection")]
    hold_results: bool,
    /// Whether the update agent runs (subscribe to manifests and chunks).
    updates: bool,
    /// Version of the root the device holds (0: none), in presence messages.
    root_version: u64,
}

impl Session {
    /// A disconnected session keeping at most `window` status reports in flight.
    pub(crate) fn new(info: DeviceInfo, window: usize) -> Self {
        Session {
            info,
            connected: false,
            window: window.max(1),
            unnumbered: VecDeque::new(),
            by_pkid: HashMap::new(),
            status_sent_upto: None,
            status_inflight: 0,
            #[cfg(feature = "fault-injection")]
            hold_results: false,
            updates: false,
            root_version: 0,
        }
    }

    /// The version of the root the device holds, for presence messages from now on.
    pub(crate) fn set_root_version(&mut self, version: u64) {
        self.root_version = version;
    }

    /// Publishes the device's trust report (retained; nothing while disconnected: it is
    /// published again on every connection).
    pub(crate) fn trust(&mut self, report: &TrustReport) -> Vec<Action> {
        if !self.connected {
            return Vec::new();
        }
        let p = Publish {
            topic: topics::device_topic(&self.info.id, DeviceTopic::Trust),
            payload: report.encode_to_vec(),
            retain: true,
            tag: Tag::Trust,
        };
        vec![self.publish(p)]
    }

    /// Subscribe to update manifests and chunks on every connection.
    pub(crate) fn set_updates(&mut self, on: bool) {
        self.updates = on;
    }

    /// Publishes an update progress report (QoS 1; nothing while disconnected: the agent
    /// re-sends its latest report on every connection).
    pub(crate) fn progress(&mut self, p: &UpdateProgress) -> Vec<Action> {
        if !self.connected {
            return Vec::new();
        }
        let p = Publish {
            topic: topics::device_topic(&self.info.id, DeviceTopic::UpdateProgress),
            payload: p.encode_to_vec(),
            retain: false,
            tag: Tag::Progress,
        };
        vec![self.publish(p)]
    }

    /// Results are recorded but never published (a test switch: the device behaves as if it
    /// died before its result left). Only with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub(crate) fn set_hold_results(&mut self, hold: bool) {
        self.hold_results = hold;
    }

    /// Whether the session is connected.
    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    /// The device's facts.
    pub(crate) fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn presence(&self, state: PresenceState, graceful: bool, now_ms: u64) -> Publish {
        let p = Presence {
            root_version: self.root_version,
            state: state.into(),
            timestamp_ms: now_ms,
            firmware_version: self.info.firmware_version.clone(),
            device_class: self.info.device_class.clone(),
            session_id: self.info.session_id.clone(),
            graceful,
        };
        Publish {
            topic: topics::device_topic(&self.info.id, DeviceTopic::Presence),
            payload: p.encode_to_vec(),
            retain: true,
            tag: Tag::Presence,
        }
    }

    /// The will to register with the next CONNECT: OFFLINE, not graceful.
    pub(crate) fn will(&self, now_ms: u64) -> Publish {
        self.presence(PresenceState::Offline, false, now_ms)
    }

    /// The goodbye to publish before a deliberate disconnect: OFFLINE, graceful.
    pub(crate) fn goodbye(&mut self, now_ms: u64) -> Option<Action> {
        self.connected
            .then(|| self.publish(self.presence(PresenceState::Offline, true, now_ms)))
    }

    fn publish(&mut self, p: Publish) -> Action {
        self.unnumbered.push_back(p.tag.clone());
        Action::Publish(p)
    }

    /// The connection is up (CONNACK accepted): subscribe, say hello, send the outbox.
    pub(crate) fn on_connected(&mut self, outbox: &Outbox, now_ms: u64) -> Vec<Action> {
        self.forget_connection();
        self.connected = true;
        // Roots first: a manifest or command that depends on a new root comes after it.
        let mut filters = vec![
            topics::TRUST_ROOTS.to_owned(),
            topics::device_topic(&self.info.id, DeviceTopic::Cmd),
        ];
        if self.updates {
            filters.push(topics::device_topic(
                &self.info.id,
                DeviceTopic::UpdateManifest,
            ));
        }
        let mut out = vec![Action::Subscribe(filters)];
        if self.updates {
            out.push(Action::SubscribeAtMostOnce(vec![topics::device_topic(
                &self.info.id,
                DeviceTopic::UpdateChunk,
            )]));
        }
        let birth = self.presence(PresenceState::Online, false, now_ms);
        out.push(self.publish(birth));
        out.extend(self.status_actions(outbox));
        out
    }

    fn forget_connection(&mut self) {
        self.unnumbered.clear();
        self.by_pkid.clear();
        self.status_sent_upto = None;
        self.status_inflight = 0;
    }

    /// The connection is gone: everything unacknowledged will be sent again.
    pub(crate) fn on_disconnected(&mut self) {
        self.connected = false;
        self.forget_connection();
    }

    /// The client gave packet id `pkid` to the oldest publish not yet numbered.
    pub(crate) fn on_sent(&mut self, pkid: u16) {
        // QoS 0 publishes (the update agent's chunk requests) have no packet id.
        if pkid == 0 {
            return;
        }
        if let Some(tag) = self.unnumbered.pop_front() {
            self.by_pkid.insert(pkid, tag);
        }
    }

    /// The gateway acknowledged `pkid`: what it was, if the session asked for it.
    pub(crate) fn on_acked(&mut self, pkid: u16) -> Option<Tag> {
        let tag = self.by_pkid.remove(&pkid)?;
        if matches!(tag, Tag::Status(_)) {
            self.status_inflight = self.status_inflight.saturating_sub(1);
        }
        Some(tag)
    }

    /// Status reports to send now: the outbox's oldest not yet sent on this connection, up to
    /// the window. Call after the outbox changed (a report queued or acknowledged).
    pub(crate) fn status_actions(&mut self, outbox: &Outbox) -> Vec<Action> {
        if !self.connected {
            return Vec::new();
        }
        let mut out = Vec::new();
        let upto = self.status_sent_upto;
        let next: Vec<_> = outbox
            .pending()
            .filter(|r| upto.is_none_or(|u| r.sequence > u))
            .take(self.window.saturating_sub(self.status_inflight))
            .cloned()
            .collect();
        for r in next {
            self.status_sent_upto = Some(r.sequence);
            self.status_inflight += 1;
            let p = Publish {
                topic: topics::device_topic(&self.info.id, DeviceTopic::Status),
                payload: r.encode_to_vec(),
                retain: false,
                tag: Tag::Status(r.sequence),
            };
            out.push(self.publish(p));
        }
        out
    }

    /// A command delivery arrived on `topic`: its signatures, target and validity are
    /// checked against `root` before the gate sees it. A refusal is answered at once and not
    /// recorded (a forged copy of a real command id does not burn that id).
    pub(crate) fn on_message(
        &mut self,
        topic: &str,
        payload: &[u8],
        gate: &mut CommandGate,
        root: Option<&TrustedRoot>,
        now_ms: u64,
    ) -> Vec<Action> {
        let cmd_topic = topics::device_topic(&self.info.id, DeviceTopic::Cmd);
        if topic != cmd_topic {
            return vec![Action::Malformed {
                topic: topic.to_owned(),
                reason: "not a topic this device subscribes to".into(),
            }];
        }
        let me = Recipient {
            device_id: self.info.id.as_str(),
            device_class: &self.info.device_class,
        };
        let v = match verify_command(root, payload, me, now_ms) {
            Ok(v) => v,
            Err(refused) => return self.refuse(refused, now_ms),
        };
        let digest = v.digest.clone();
        let with_digest = |mut r: CommandResult| {
            r.command_digest = digest.clone();
            r
        };
        match gate.offer(&v.command, now_ms) {
            Verdict::Run => vec![Action::SaveGate, Action::Run(v)],
            // The application still holds it: its result is sent when it finishes.
            Verdict::Running => Vec::new(),
            Verdict::Replay(r) | Verdict::Rejected(r) => self.send_result(with_digest(r)),
            Verdict::Interrupted(r) | Verdict::Expired(r) => {
                let mut out = vec![Action::SaveGate];
                out.extend(self.send_result(with_digest(r)));
                out
            }
            Verdict::TooOld { floor_ms } => {
                let refused = Refused {
                    refusal: CommandRefusal::Replayed,
                    detail: format!(
                        "issued at {} ms, not after the newest command this device has forgotten ({floor_ms} ms): it may have run already",
                        v.command.issued_at_ms
                    ),
                    command_id: v.command.command_id.clone(),
                    digest: v.digest,
                };
                self.refuse(refused, now_ms)
            }
        }
    }

    /// Answers a refused delivery (not recorded anywhere).
    fn refuse(&mut self, refused: Refused, now_ms: u64) -> Vec<Action> {
        let result = refused.to_result(now_ms);
        let mut out = vec![Action::Refused(refused)];
        out.extend(self.send_result(result));
        out
    }

    /// Publishes a result already recorded in the gate (nothing while disconnected: the
    /// gateway delivers the command again and the gate replays the result).
    pub(crate) fn send_result(&mut self, r: CommandResult) -> Vec<Action> {
        #[cfg(feature = "fault-injection")]
        if self.hold_results {
            return Vec::new();
        }
        if !self.connected {
            // Recorded in the gate; sent when the gateway delivers the command again.
            return Vec::new();
        }
        let p = Publish {
            topic: topics::device_topic(&self.info.id, DeviceTopic::CmdResult),
            payload: r.encode_to_vec(),
            retain: false,
            tag: Tag::Result(r.command_id),
        };
        vec![self.publish(p)]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::commands::GateError;
    use fleet_proto::command::sign_command;
    use fleet_proto::signing::UpdateSigner;
    use fleet_proto::v1::{Command, CommandStatus, StatusReport};
    use std::sync::LazyLock;

    impl Session {
        /// What `IncomingCommand::respond` and the driver do when the application finished a
        /// command: record the result in the gate, then send it.
        fn on_completed(
            &mut self,
            result: CommandResult,
            gate: &mut CommandGate,
        ) -> Result<Vec<Action>, GateError> {
            gate.complete(&result)?;
            let mut out = vec![Action::SaveGate];
            out.extend(self.send_result(result));
            Ok(out)
        }
    }

    /// The fleet's keys: a root whose commands role is `commands` (threshold 1), valid until
    /// `EXPIRES`.
    struct Keys {
        root: TrustedRoot,
        commands: UpdateSigner,
        stranger: UpdateSigner,
    }

    const EXPIRES: u64 = 1_000_000;

    static KEYS: LazyLock<Keys> = LazyLock::new(|| {
        let root_key = UpdateSigner::generate();
        let commands = UpdateSigner::generate();
        let stranger = UpdateSigner::generate();
        let signed = crate::trust::tests::signed_root(
            1,
            EXPIRES,
            &[&root_key],
            &[&root_key],
            1,
            &[&commands],
            &[&root_key],
        );
        Keys {
            root: TrustedRoot::provisioned(&signed).unwrap(),
            commands,
            stranger,
        }
    });

    fn root() -> Option<&'static TrustedRoot> {
        Some(&KEYS.root)
    }

    fn command(id: &str) -> Command {
        Command {
            command_id: id.into(),
            name: "x".into(),
            issued_at_ms: 1,
            expires_at_ms: 500_000,
            device_id: "dev-1".into(),
            ..Command::default()
        }
    }

    /// `c` signed by the commands role, as delivered (attempt 2, by "svc").
    fn signed(c: &Command) -> Vec<u8> {
        let mut s = sign_command(c, &[&KEYS.commands]).unwrap();
        s.attempt = 2;
        s.submitted_by = "svc".into();
        s.encode_to_vec()
    }

    fn digest(c: &Command) -> Vec<u8> {
        use sha2::Digest as _;
        sha2::Sha256::digest(c.encode_to_vec()).to_vec()
    }

    fn session() -> Session {
        Session::new(
            DeviceInfo {
                id: DeviceId::new("dev-1").unwrap(),
                device_class: "pump".into(),
                firmware_version: "1.0".into(),
                session_id: "s".into(),
            },
            2,
        )
    }

    fn outbox(n: u64) -> Outbox {
        let mut o = Outbox::new(100, 1);
        for _ in 0..n {
            o.push(StatusReport::default());
        }
        o
    }

    fn published(actions: &[Action]) -> Vec<Tag> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish(p) => Some(p.tag.clone()),
                _ => None,
            })
            .collect()
    }

    /// The results published by `actions`.
    fn results(actions: &[Action]) -> Vec<CommandResult> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish(p) if matches!(p.tag, Tag::Result(_)) => {
                    Some(CommandResult::decode(p.payload.as_slice()).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn connect_subscribes_says_hello_and_fills_the_window() {
        let mut s = session();
        s.set_root_version(7);
        let mut o = outbox(3);
        let a = s.on_connected(&o, 5);
        assert!(
            matches!(&a[0], Action::Subscribe(f) if f == &["fleet/trust/roots", "devices/dev-1/cmd"])
        );
        assert_eq!(
            published(&a),
            [Tag::Presence, Tag::Status(1), Tag::Status(2)]
        );
        let Action::Publish(hello) = &a[1] else {
            panic!("{:?}", a[1]);
        };
        assert_eq!(
            Presence::decode(hello.payload.as_slice())
                .unwrap()
                .root_version,
            7
        );
        // Packet ids in request order; acks free the window.
        for pkid in 1..=3 {
            s.on_sent(pkid);
        }
        assert!(s.status_actions(&o).is_empty());
        assert_eq!(s.on_acked(2), Some(Tag::Status(1)));
        o.acknowledge(1);
        assert_eq!(published(&s.status_actions(&o)), [Tag::Status(3)]);
        assert_eq!(s.on_acked(99), None);
    }

    #[test]
    fn a_reconnect_resends_from_the_outbox_head() {
        let mut s = session();
        let o = outbox(2);
        s.on_connected(&o, 0);
        s.on_sent(1);
        s.on_disconnected();
        assert!(s.status_actions(&o).is_empty(), "nothing is sent offline");
        assert_eq!(
            s.on_acked(1),
            None,
            "acks of the old connection mean nothing"
        );
        let a = s.on_connected(&o, 1);
        assert_eq!(
            published(&a),
            [Tag::Presence, Tag::Status(1), Tag::Status(2)]
        );
    }

    #[test]
    fn commands_run_once_and_replay_their_result() {
        let mut s = session();
        let mut gate = CommandGate::new(10);
        s.on_connected(&outbox(0), 0);
        let bytes = signed(&command("c1"));
        let a = s.on_message("devices/dev-1/cmd", &bytes, &mut gate, root(), 1);
        let [Action::SaveGate, Action::Run(v)] = &a[..] else {
            panic!("{a:?}");
        };
        assert_eq!(
            (
                v.command.command_id.as_str(),
                v.attempt,
                v.submitted_by.as_str()
            ),
            ("c1", 2, "svc")
        );
        let result = CommandResult {
            command_id: "c1".into(),
            status: CommandStatus::Succeeded.into(),
            command_digest: v.digest.clone(),
            ..CommandResult::default()
        };
        let a = s.on_completed(result.clone(), &mut gate).unwrap();
        assert_eq!(published(&a), [Tag::Result("c1".into())]);
        // Delivered again: replayed with its digest, not run.
        let a = s.on_message("devices/dev-1/cmd", &bytes, &mut gate, root(), 2);
        assert_eq!(published(&a), [Tag::Result("c1".into())]);
        assert_eq!(results(&a)[0].command_digest, digest(&command("c1")));
        assert!(!a.iter().any(|x| matches!(x, Action::Run(_))));
        assert!(s.on_completed(result, &mut gate).is_err());
    }

    #[test]
    fn a_redelivery_while_running_sends_nothing_until_the_result() {
        let mut s = session();
        let mut gate = CommandGate::new(10);
        s.on_connected(&outbox(0), 0);
        let bytes = signed(&command("c1"));
        let a = s.on_message("devices/dev-1/cmd", &bytes, &mut gate, root(), 1);
        assert!(matches!(&a[..], [Action::SaveGate, Action::Run(_)]));
        // Reconnect: the gateway hands the open command over again while it runs.
        s.on_disconnected();
        s.on_connected(&outbox(0), 2);
        let a = s.on_message("devices/dev-1/cmd", &bytes, &mut gate, root(), 3);
        assert_eq!(a, [], "neither run again nor answered");
        let result = CommandResult {
            command_id: "c1".into(),
            status: CommandStatus::Succeeded.into(),
            output: b"out".to_vec(),
            ..CommandResult::default()
        };
        let a = s.on_completed(result, &mut gate).unwrap();
        assert_eq!(published(&a), [Tag::Result("c1".into())]);
    }

    #[test]
    fn garbage_is_reported_not_run() {
        let mut s = session();
        let mut gate = CommandGate::new(10);
        s.on_connected(&outbox(0), 0);
        let a = s.on_message("devices/dev-1/cmd", &[0xff, 0x01], &mut gate, root(), 0);
        let r = results(&a);
        assert_eq!(r[0].refusal(), CommandRefusal::Malformed);
        assert!(matches!(&a[0], Action::Refused(_)));
        let a = s.on_message(
            "devices/dev-2/cmd",
            &signed(&command("c1")),
            &mut gate,
            root(),
            0,
        );
        assert!(matches!(&a[..], [Action::Malformed { .. }]));
        assert!(gate.is_empty());
    }

    /// One delivery refused before the gate: answered at once with its reason, status and
    /// digest, counted (Action::Refused), not recorded, not run.
    fn assert_refused(
        what: &str,
        bytes: &[u8],
        root: Option<&TrustedRoot>,
        now: u64,
        want: CommandRefusal,
        status: CommandStatus,
    ) {
        let mut s = session();
        let mut gate = CommandGate::new(10);
        s.on_connected(&outbox(0), 0);
        let a = s.on_message("devices/dev-1/cmd", bytes, &mut gate, root, now);
        assert!(
            matches!(&a[..], [Action::Refused(r), Action::Publish(_)] if r.refusal == want),
            "{what}: {a:?}"
        );
        let r = &results(&a)[0];
        assert_eq!(
            (r.refusal(), r.status()),
            (want, status),
            "{what}: {}",
            r.message
        );
        assert!(!r.message.is_empty(), "{what}");
        assert_eq!(r.command_digest.len(), 32, "{what}");
        assert!(gate.is_empty(), "{what}: recorded in the gate");
    }

    #[test]
    fn every_refusal_is_answered_with_its_reason_and_never_reaches_the_gate() {
        use CommandRefusal as R;
        use CommandStatus as S;
        let mut unsigned = sign_command(&command("c1"), &[&KEYS.commands]).unwrap();
        unsigned.signatures.clear();
        assert_refused(
            "unsigned",
            &unsigned.encode_to_vec(),
            root(),
            10,
            R::Unsigned,
            S::Rejected,
        );
        let stranger = sign_command(&command("c1"), &[&KEYS.stranger]).unwrap();
        assert_refused(
            "a key the root does not name",
            &stranger.encode_to_vec(),
            root(),
            10,
            R::Untrusted,
            S::Rejected,
        );
        let mut other = command("c1");
        other.device_id = "dev-2".into();
        assert_refused(
            "for another device",
            &signed(&other),
            root(),
            10,
            R::WrongTarget,
            S::Rejected,
        );
        let mut class = command("c1");
        class.device_id.clear();
        class.device_class = "valve".into();
        assert_refused(
            "for another class",
            &signed(&class),
            root(),
            10,
            R::WrongTarget,
            S::Rejected,
        );
        assert_refused(
            "expired",
            &signed(&command("c1")),
            root(),
            500_000,
            R::Expired,
            S::Expired,
        );
        let mut forever = command("c1");
        forever.expires_at_ms = 0;
        assert_refused(
            "no expiry",
            &signed(&forever),
            root(),
            10,
            R::NoExpiry,
            S::Rejected,
        );
        let mut later = command("c1");
        later.not_before_ms = 400_000;
        assert_refused(
            "not yet valid",
            &signed(&later),
            root(),
            10,
            R::NotYetValid,
            S::Rejected,
        );
        assert_refused(
            "no root",
            &signed(&command("c1")),
            None,
            10,
            R::NoRoot,
            S::Rejected,
        );
        let mut long = command("c1");
        long.expires_at_ms = 2 * EXPIRES;
        assert_refused(
            "root expired",
            &signed(&long),
            root(),
            EXPIRES,
            R::RootExpired,
            S::Rejected,
        );
        // A class command for this device's class runs.
        let mut mine = command("c1");
        mine.device_id.clear();
        mine.device_class = "pump".into();
        let mut s = session();
        let mut gate = CommandGate::new(10);
        let a = s.on_message("devices/dev-1/cmd", &signed(&mine), &mut gate, root(), 10);
        assert!(
            matches!(&a[..], [Action::SaveGate, Action::Run(_)]),
            "{a:?}"
        );
    }

    /// A forged copy of a real command's id (unsigned) is refused without burning the id: the
    /// genuine command still runs after it.
    #[test]
    fn a_forged_copy_does_not_burn_the_real_command_id() {
        let mut s = session();
        let mut gate = CommandGate::new(10);
        s.on_connected(&outbox(0), 0);
        let mut forged = sign_command(&command("c1"), &[&KEYS.stranger]).unwrap();
        forged.signatures.clear();
        let a = s.on_message(
            "devices/dev-1/cmd",
            &forged.encode_to_vec(),
            &mut gate,
            root(),
            1,
        );
        assert_eq!(results(&a)[0].command_id, "c1");
        let a = s.on_message(
            "devices/dev-1/cmd",
            &signed(&command("c1")),
            &mut gate,
            root(),
            2,
        );
        assert!(
            matches!(&a[..], [Action::SaveGate, Action::Run(_)]),
            "{a:?}"
        );
    }

    /// A command the gate has forgotten (beyond its window) and issued before the newest one
    /// it forgot is refused REPLAYED; one issued later runs.
    #[test]
    fn a_replay_beyond_the_gates_memory_is_refused() {
        let mut s = session();
        let mut gate = CommandGate::new(2);
        s.on_connected(&outbox(0), 0);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let mut c = command(id);
            c.issued_at_ms = 10 + i as u64;
            let a = s.on_message("devices/dev-1/cmd", &signed(&c), &mut gate, root(), 20);
            assert!(
                matches!(&a[..], [Action::SaveGate, Action::Run(_)]),
                "{a:?}"
            );
        }
        // "a" (issued at 10) is forgotten: the floor is 10.
        let mut old = command("a");
        old.issued_at_ms = 10;
        let a = s.on_message("devices/dev-1/cmd", &signed(&old), &mut gate, root(), 30);
        let r = &results(&a)[0];
        assert_eq!(
            (r.refusal(), r.status(), r.command_digest.clone()),
            (
                CommandRefusal::Replayed,
                CommandStatus::Rejected,
                digest(&old)
            )
        );
        assert!(matches!(&a[0], Action::Refused(_)));
        assert_eq!(gate.len(), 2, "not recorded");
        let mut fresh = command("d");
        fresh.issued_at_ms = 11;
        let a = s.on_message("devices/dev-1/cmd", &signed(&fresh), &mut gate, root(), 30);
        assert!(
            matches!(&a[..], [Action::SaveGate, Action::Run(_)]),
            "{a:?}"
        );
    }

    #[test]
    fn the_trust_report_is_retained_and_only_sent_when_connected() {
        let mut s = session();
        let report = TrustReport {
            root_version: 3,
            ..TrustReport::default()
        };
        assert!(s.trust(&report).is_empty());
        s.on_connected(&outbox(0), 0);
        let a = s.trust(&report);
        let [Action::Publish(p)] = &a[..] else {
            panic!("{a:?}");
        };
        assert_eq!(
            (p.topic.as_str(), p.retain, &p.tag),
            ("devices/dev-1/trust", true, &Tag::Trust)
        );
    }
}
