//! The command service: cloud services submit commands through the fleet API; the gateway
//! persists each one per target device, hands it to the device's live session (now, at its next
//! subscription, and again every `redeliver_after` without a result), closes it with the
//! device's result or at its expiry, and publishes every state change on
//! `fleet/events/commands/{device_id}`.
//!
//! The store is the truth: the service keeps only which devices are connected, so a restart
//! (or a crash) loses nothing but that, and the edge re-tells it as devices reconnect.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::topics::{self, DeviceTopic, FleetTopic, Topic};
use fleet_proto::v1::{
    Command, CommandEvent, CommandRecord, CommandResult, CommandState, CommandStatus,
};
use fleet_proto::Message;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::link::{LinkError, Received, ServiceLink};
use super::{SessionEvent, SharedStore};
use crate::config::CommandSettings;
use crate::metrics::Metrics;
use crate::router::RouterHandle;
use crate::store::StoredCommand;

/// How often expiries and overdue re-deliveries are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// How often closed commands past their retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The command service task.
pub struct CommandService {
    pub(super) link: ServiceLink,
    pub(super) store: SharedStore,
    pub(super) settings: CommandSettings,
    pub(super) metrics: Arc<Metrics>,
    /// Devices with a live session.
    pub(super) online: HashSet<String>,
    events: mpsc::UnboundedReceiver<SessionEvent>,
    /// Where update requests of the fleet API go.
    pub(super) updates: mpsc::UnboundedSender<super::updates::ApiCall>,
}

/// The device-facing form of a stored command, for delivery number `attempt`.
pub(super) fn to_command(c: &StoredCommand) -> Command {
    Command {
        command_id: c.command_id.clone(),
        name: c.name.clone(),
        payload: c.payload.clone(),
        issued_at_ms: c.issued_at_ms,
        expires_at_ms: c.expires_at_ms,
        attempt: c.attempts,
        issued_by: c.issued_by.clone(),
    }
}

/// The service-facing form of a stored command.
pub(super) fn to_record(c: &StoredCommand) -> CommandRecord {
    CommandRecord {
        device_id: c.device_id.clone(),
        command_id: c.command_id.clone(),
        name: c.name.clone(),
        state: c.state.into(),
        attempts: c.attempts,
        issued_at_ms: c.issued_at_ms,
        expires_at_ms: c.expires_at_ms,
        updated_at_ms: c.updated_at_ms,
        // Stored results were decoded when they arrived (or made here).
        result: c
            .result
            .as_deref()
            .and_then(|b| CommandResult::decode(b).ok()),
        issued_by: c.issued_by.clone(),
    }
}

/// The final state a device's result closes a command with; `None` for a result that closes
/// nothing (no status).
pub(super) fn closing_state(status: CommandStatus) -> Option<CommandState> {
    match status {
        CommandStatus::Succeeded => Some(CommandState::Succeeded),
        CommandStatus::Failed => Some(CommandState::Failed),
        CommandStatus::Rejected => Some(CommandState::Rejected),
        CommandStatus::Expired => Some(CommandState::Expired),
        CommandStatus::Unspecified => None,
    }
}

/// The result the gateway records for a command that expired undelivered or unanswered.
fn expired_result(c: &StoredCommand) -> Vec<u8> {
    CommandResult {
        command_id: c.command_id.clone(),
        status: CommandStatus::Expired.into(),
        output: Vec::new(),
        message: "expired at the gateway before a result arrived".into(),
        completed_at_ms: c.expires_at_ms,
    }
    .encode_to_vec()
}

/// Whether a subscription filter covers the device's command topic.
fn covers_cmd_topic(filter: &str, device: &str) -> bool {
    let Ok(id) = fleet_proto::DeviceId::new(device) else {
        return false;
    };
    let topic = topics::device_topic(&id, DeviceTopic::Cmd);
    crate::acl::filter::matches(filter, &topic)
}

impl CommandService {
    /// Opens the service's link.
    pub async fn start(
        router: &RouterHandle,
        store: SharedStore,
        settings: CommandSettings,
        metrics: Arc<Metrics>,
        events: mpsc::UnboundedReceiver<SessionEvent>,
        updates: mpsc::UnboundedSender<super::updates::ApiCall>,
    ) -> Result<Self, LinkError> {
        let results = topics::all_devices_filter(DeviceTopic::CmdResult);
        let link =
            ServiceLink::open(router, "commands", &[&results, topics::ALL_API_REQUESTS]).await?;
        Ok(CommandService {
            link,
            store,
            settings,
            metrics,
            online: HashSet::new(),
            events,
            updates,
        })
    }

    /// Runs until the router is gone.
    pub async fn run(mut self) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(ev) => self.on_session(ev).await,
                    None => break,
                },
                msg = self.link.recv() => match msg {
                    Some(msg) => self.on_message(msg).await,
                    None => break,
                },
                _ = sweep.tick() => self.sweep().await,
                _ = prune.tick() => self.prune().await,
            }
        }
        info!("command service stopped");
    }

    async fn on_session(&mut self, ev: SessionEvent) {
        match ev {
            SessionEvent::Connected {
                id,
                session_present,
            } => {
                self.online.insert(id.clone());
                // With its session kept, the device's subscription is already in the router.
                if session_present {
                    self.deliver_open(&id).await;
                }
            }
            SessionEvent::Subscribed { id, filters } => {
                if filters.iter().any(|f| covers_cmd_topic(f, &id)) {
                    self.deliver_open(&id).await;
                }
            }
            SessionEvent::Disconnected { id } => {
                self.online.remove(&id);
            }
        }
    }

    async fn on_message(&mut self, msg: Received) {
        match topics::parse(&msg.topic) {
            Ok(Topic::Device {
                id,
                kind: DeviceTopic::CmdResult,
            }) => self.on_result(id.as_str(), &msg).await,
            Ok(Topic::Fleet { path }) => match FleetTopic::parse(path) {
                Some(FleetTopic::ApiRequest { service_id }) => {
                    let service = service_id.to_owned();
                    self.on_request(&service, &msg.payload).await;
                }
                _ => debug!(topic = %msg.topic, "command service: not an API request"),
            },
            _ => debug!(topic = %msg.topic, "command service: unexpected topic"),
        }
    }

    async fn on_result(&mut self, device: &str, msg: &Received) {
        let result = match CommandResult::decode(msg.payload.as_ref()) {
            Ok(r) => r,
            Err(e) => {
                Metrics::inc(&self.metrics.malformed_payloads);
                warn!(device, error = %e, "command result: bad protobuf; dropped");
                return;
            }
        };
        let Some(state) = closing_state(result.status()) else {
            Metrics::inc(&self.metrics.malformed_payloads);
            warn!(device, command_id = %result.command_id, "command result without a status; dropped");
            return;
        };
        let (dev, id, bytes) = (
            device.to_owned(),
            result.command_id.clone(),
            msg.payload.to_vec(),
        );
        let now = fleet_proto::time::now_ms();
        let closed = self
            .store
            .call("close command", move |s| {
                s.close_command(&dev, &id, state, &bytes, now)
            })
            .await;
        match closed {
            Ok(Some(c)) => {
                Metrics::inc(&self.metrics.commands_completed);
                info!(device, command_id = %c.command_id, state = ?c.state, "command finished");
                self.event(&c);
            }
            Ok(None) => debug!(
                device,
                command_id = %result.command_id,
                "result for an unknown or already closed command (a re-sent result)"
            ),
            Err(_) => {}
        }
    }

    /// Hands every open command of `device` to its session.
    pub(super) async fn deliver_open(&mut self, device: &str) {
        let dev = device.to_owned();
        let now = fleet_proto::time::now_ms();
        let Ok(open) = self
            .store
            .call("open commands", move |s| s.open_commands(&dev, now))
            .await
        else {
            return;
        };
        for c in open {
            self.deliver(c).await;
        }
    }

    /// Records one more hand-over of `c` and publishes it to the device.
    pub(super) async fn deliver(&mut self, c: StoredCommand) {
        let (dev, id) = (c.device_id.clone(), c.command_id.clone());
        let now = fleet_proto::time::now_ms();
        let Ok(Some(updated)) = self
            .store
            .call("mark delivered", move |s| s.mark_delivered(&dev, &id, now))
            .await
        else {
            return;
        };
        let Ok(device) = fleet_proto::DeviceId::new(&updated.device_id) else {
            return;
        };
        let topic = topics::device_topic(&device, DeviceTopic::Cmd);
        if let Err(e) = self
            .link
            .publish(topic, to_command(&updated).encode_to_vec())
        {
            warn!(error = %e, "could not hand a command to the router");
            return;
        }
        Metrics::inc(&self.metrics.commands_delivered);
        info!(device = %updated.device_id, command_id = %updated.command_id, attempt = updated.attempts, "command delivered");
        if c.state != CommandState::Delivered {
            self.event(&updated);
        }
    }

    /// Expires what is due and re-delivers what is overdue to connected devices.
    async fn sweep(&mut self) {
        let now = fleet_proto::time::now_ms();
        if let Ok(expired) = self
            .store
            .call("expire commands", move |s| {
                s.expire_commands(now, expired_result)
            })
            .await
        {
            for c in &expired {
                Metrics::inc(&self.metrics.commands_expired);
                info!(device = %c.device_id, command_id = %c.command_id, "command expired");
                self.event(c);
            }
        }
        if self.online.is_empty() {
            return;
        }
        let before = now.saturating_sub(
            u64::try_from(self.settings.redeliver_after.as_millis()).unwrap_or(u64::MAX),
        );
        let Ok(overdue) = self
            .store
            .call("overdue commands", move |s| s.overdue_commands(before, now))
            .await
        else {
            return;
        };
        for c in overdue {
            if self.online.contains(&c.device_id) {
                self.deliver(c).await;
            }
        }
    }

    async fn prune(&mut self) {
        let keep = u64::try_from(self.settings.retention.as_millis()).unwrap_or(u64::MAX);
        let before = fleet_proto::time::now_ms().saturating_sub(keep);
        if let Ok(n) = self
            .store
            .call("prune commands", move |s| s.prune_commands(before))
            .await
        {
            if n > 0 {
                info!(deleted = n, "forgot finished commands past their retention");
            }
        }
    }

    /// Publishes a command's new state to services.
    pub(super) fn event(&mut self, c: &StoredCommand) {
        let ev = CommandEvent {
            command: Some(to_record(c)),
        };
        if let Err(e) = self.link.publish(
            topics::command_events_topic(&c.device_id),
            ev.encode_to_vec(),
        ) {
            warn!(error = %e, "could not publish a command event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmd_topic_coverage() {
        assert!(covers_cmd_topic("devices/dev-1/cmd", "dev-1"));
        assert!(covers_cmd_topic("devices/dev-1/#", "dev-1"));
        assert!(covers_cmd_topic("devices/+/cmd", "dev-1"));
        assert!(!covers_cmd_topic("devices/dev-1/cmd/result", "dev-1"));
        assert!(!covers_cmd_topic("devices/dev-2/cmd", "dev-1"));
        assert!(!covers_cmd_topic("devices/dev-1/status", "dev-1"));
    }

    #[test]
    fn every_device_status_closes_with_its_state() {
        assert_eq!(closing_state(CommandStatus::Unspecified), None);
        for (s, want) in [
            (CommandStatus::Succeeded, CommandState::Succeeded),
            (CommandStatus::Failed, CommandState::Failed),
            (CommandStatus::Rejected, CommandState::Rejected),
            (CommandStatus::Expired, CommandState::Expired),
        ] {
            assert_eq!(closing_state(s), Some(want));
            assert!(want.is_final(), "{want:?} closes a command");
        }
    }
}
