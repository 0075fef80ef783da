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

use fleet_proto::topics::{self, DeviceTopic};
use fleet_proto::v1::{Command, CommandResult, Presence, PresenceState, UpdateProgress};
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
    /// Give this command to the application to run.
    Run(Command),
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
        }
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
            root_version: Default::default(),
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
        let mut filters = vec![topics::device_topic(&self.info.id, DeviceTopic::Cmd)];
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

    /// A message arrived on `topic`.
    pub(crate) fn on_message(
        &mut self,
        topic: &str,
        payload: &[u8],
        gate: &mut CommandGate,
        now_ms: u64,
    ) -> Vec<Action> {
        let cmd_topic = topics::device_topic(&self.info.id, DeviceTopic::Cmd);
        if topic != cmd_topic {
            return vec![Action::Malformed {
                topic: topic.to_owned(),
                reason: "not a topic this device subscribes to".into(),
            }];
        }
        let cmd = match Command::decode(payload) {
            Ok(c) => c,
            Err(e) => {
                return vec![Action::Malformed {
                    topic: topic.to_owned(),
                    reason: format!("bad Command protobuf: {e}"),
                }]
            }
        };
        match gate.offer(&cmd, now_ms) {
            Verdict::Run => vec![Action::SaveGate, Action::Run(cmd)],
            // The application still holds it: its result is sent when it finishes.
            Verdict::Running => Vec::new(),
            Verdict::Replay(r) | Verdict::Rejected(r) => self.send_result(r),
            Verdict::Interrupted(r) | Verdict::Expired(r) => {
                let mut out = vec![Action::SaveGate];
                out.extend(self.send_result(r));
                out
            }
        }
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
    use fleet_proto::v1::{CommandStatus, StatusReport};

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

    #[test]
    fn connect_subscribes_says_hello_and_fills_the_window() {
        let mut s = session();
        let mut o = outbox(3);
        let a = s.on_connected(&o, 5);
        assert!(matches!(&a[0], Action::Subscribe(f) if f == &["devices/dev-1/cmd"]));
        assert_eq!(
            published(&a),
            [Tag::Presence, Tag::Status(1), Tag::Status(2)]
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
        let cmd = Command {
            command_id: "c1".into(),
            name: "x".into(),
            ..Command::default()
        };
        let bytes = cmd.encode_to_vec();
        let a = s.on_message("devices/dev-1/cmd", &bytes, &mut gate, 1);
        assert!(matches!(&a[..], [Action::SaveGate, Action::Run(c)] if c.command_id == "c1"));
        let result = CommandResult {
            command_id: "c1".into(),
            status: CommandStatus::Succeeded.into(),
            ..CommandResult::default()
        };
        let a = s.on_completed(result.clone(), &mut gate).unwrap();
        assert_eq!(published(&a), [Tag::Result("c1".into())]);
        // Delivered again: replayed, not run.
        let a = s.on_message("devices/dev-1/cmd", &bytes, &mut gate, 2);
        assert_eq!(published(&a), [Tag::Result("c1".into())]);
        assert!(!a.iter().any(|x| matches!(x, Action::Run(_))));
        assert!(s.on_completed(result, &mut gate).is_err());
    }

    #[test]
    fn a_redelivery_while_running_sends_nothing_until_the_result() {
        let mut s = session();
        let mut gate = CommandGate::new(10);
        s.on_connected(&outbox(0), 0);
        let cmd = Command {
            command_id: "c1".into(),
            name: "x".into(),
            ..Command::default()
        };
        let bytes = cmd.encode_to_vec();
        let a = s.on_message("devices/dev-1/cmd", &bytes, &mut gate, 1);
        assert!(matches!(&a[..], [Action::SaveGate, Action::Run(_)]));
        // Reconnect: the gateway hands the open command over again while it runs.
        s.on_disconnected();
        s.on_connected(&outbox(0), 2);
        let a = s.on_message("devices/dev-1/cmd", &bytes, &mut gate, 3);
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
        for (topic, payload) in [
            ("devices/dev-1/cmd", vec![0xff, 0x01]),
            ("devices/dev-2/cmd", Command::default().encode_to_vec()),
        ] {
            let a = s.on_message(topic, &payload, &mut gate, 0);
            assert!(matches!(&a[..], [Action::Malformed { .. }]), "{topic}");
        }
        assert!(gate.is_empty());
    }
}
