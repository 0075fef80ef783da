//! The command service: cloud services submit commands through the fleet API; the gateway
//! persists each one per target device, hands it to the device's live session (now, at its next
//! subscription, and again every `redeliver_after` without a result), closes it with the
//! device's result or at its expiry, and publishes every state change on
//! `fleet/events/commands/{device_id}`.
//!
//! Commands are signed by the issuing service; the gateway holds no key, stores the signed
//! Command bytes and signatures unchanged and delivers them as a `SignedCommand` (adding only
//! the unsigned delivery number and the submitter it authenticated), holding a command until
//! its not-before time. A device's result closes the stored command only when its
//! `command_digest` names the stored bytes: a result for anything else (a forgery the device
//! refused, a raw publish on its command topic) is counted and reported as a foreign event and
//! changes nothing.
//!
//! The store is the truth: the service keeps only which devices are connected, so a restart
//! (or a crash) loses nothing but that, and the edge re-tells it as devices reconnect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::topics::{self, DeviceTopic, FleetTopic, Topic};
use fleet_proto::v1::{CommandEvent, CommandRecord, CommandResult, CommandState, CommandStatus};
use fleet_proto::Message;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::CommandSettings;
use crate::metrics::{LogBudget, Metrics};
use crate::ports::SessionEvent;
use crate::router::Router;
use crate::router::{LinkError, Received, ServiceLink};
use crate::store::SharedStore;
use crate::store::StoredCommand;

/// Longest the service sleeps without a sweep, even with nothing scheduled: bounds how late an
/// expiry is noticed if the wall clock steps (deadlines are wall-clock times, sleeps are not).
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// How soon the schedule is asked for again after the store failed to answer.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);
/// How often closed commands past their retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The budget of "result for a delivery the gateway did not store" lines.
static FOREIGN_LOG: LogBudget = LogBudget::new();

/// The command service task.
pub(crate) struct CommandService {
    pub(super) link: ServiceLink,
    pub(super) store: SharedStore,
    pub(super) settings: CommandSettings,
    pub(super) metrics: Arc<Metrics>,
    /// Devices with a live session.
    pub(super) online: Online,
    events: mpsc::UnboundedReceiver<SessionEvent>,
    /// Where update requests of the fleet API go.
    pub(super) updates: mpsc::UnboundedSender<super::updates::ApiCall>,
    /// Where trust requests of the fleet API go.
    pub(super) trust: mpsc::UnboundedSender<super::updates::ApiCall>,
    /// Set when something may have moved the next deadline earlier (a command accepted or
    /// handed over, a sweep done): the schedule is read again before the next wait.
    pub(super) reschedule: bool,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How long the service may sleep at `now_ms` before its next sweep: until the earliest of the
/// next deadline (an expiry, or a held command's release) and the next re-delivery (the oldest hand-over not yet overdue plus
/// `redeliver_after`), zero if one is already due, and never more than [`MAX_SLEEP`]. All
/// times are Unix ms.
pub(super) fn next_sweep_in(
    now_ms: u64,
    next_deadline: Option<u64>,
    oldest_fresh_delivery: Option<u64>,
    redeliver_after: Duration,
) -> Duration {
    let redelivery = oldest_fresh_delivery.map(|t| t.saturating_add(millis(redeliver_after)));
    match next_deadline.into_iter().chain(redelivery).min() {
        Some(due) => Duration::from_millis(due.saturating_sub(now_ms)).min(MAX_SLEEP),
        None => MAX_SLEEP,
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
pub(crate) fn closing_state(status: CommandStatus) -> Option<CommandState> {
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
        command_digest: Default::default(),
        refusal: Default::default(),
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

/// The devices with a live session, counted per device: one connection's `Connected` and
/// `Disconnected` always come in that order, but a device that reconnects gets its new
/// session's `Connected` before the old connection (taken over, or not yet seen dead) has
/// ended. A set would then mark a live device offline when the old one's `Disconnected`
/// arrives, and its commands would wait for its next reconnect.
#[derive(Debug, Default)]
pub(crate) struct Online {
    sessions: HashMap<String, u32>,
}

impl Online {
    /// A session of `id` opened.
    pub(crate) fn connected(&mut self, id: &str) {
        *self.sessions.entry(id.to_owned()).or_insert(0) += 1;
    }

    /// A session of `id` ended.
    pub(crate) fn disconnected(&mut self, id: &str) {
        if let Some(n) = self.sessions.get_mut(id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.sessions.remove(id);
            }
        }
    }

    /// Whether `id` has a live session.
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.sessions.contains_key(id)
    }

    /// Whether no device has one.
    pub(crate) fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

impl CommandService {
    /// Opens the service's link.
    pub(crate) async fn start(
        router: &Router,
        store: SharedStore,
        settings: CommandSettings,
        metrics: Arc<Metrics>,
        events: mpsc::UnboundedReceiver<SessionEvent>,
        updates: mpsc::UnboundedSender<super::updates::ApiCall>,
        trust: mpsc::UnboundedSender<super::updates::ApiCall>,
    ) -> Result<Self, LinkError> {
        let results = topics::all_devices_filter(DeviceTopic::CmdResult);
        let link =
            ServiceLink::open(router, "commands", &[&results, topics::ALL_API_REQUESTS]).await?;
        Ok(CommandService {
            link,
            store,
            settings,
            metrics,
            online: Online::default(),
            events,
            updates,
            trust,
            reschedule: false,
        })
    }

    /// Runs until the router is gone. Sleeps until the next expiry or re-delivery is due (see
    /// `next_sweep_in`) or a message or session event arrives; the first sweep runs at once
    /// (what expired while the gateway was down).
    pub(crate) async fn run(mut self) {
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wake = tokio::time::Instant::now();
        loop {
            if self.reschedule {
                self.reschedule = false;
                wake = tokio::time::Instant::now() + self.next_sweep().await;
            }
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(ev) => self.on_session(ev).await,
                    None => break,
                },
                msg = self.link.recv() => match msg {
                    Some(msg) => self.on_message(msg).await,
                    None => break,
                },
                _ = tokio::time::sleep_until(wake) => {
                    self.sweep().await;
                    self.reschedule = true;
                }
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
                self.online.connected(&id);
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
                self.online.disconnected(&id);
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
                if let Some(suppressed) = self.metrics.malformed_payload() {
                    warn!(device, error = %e, suppressed, "command result: bad protobuf; dropped");
                }
                return;
            }
        };
        let Some(state) = closing_state(result.status()) else {
            if let Some(suppressed) = self.metrics.malformed_payload() {
                warn!(device, command_id = %result.command_id, suppressed, "command result without a status; dropped");
            }
            return;
        };
        let (dev, id, bytes, digest) = (
            device.to_owned(),
            result.command_id.clone(),
            msg.payload.to_vec(),
            result.command_digest.clone(),
        );
        let now = fleet_proto::time::now_ms();
        let closed = self
            .store
            .call("close command", move |s| {
                match s.command(&dev, &id)? {
                    Some(c) if c.digest() == digest => {
                        s.close_command(&dev, &id, state, &bytes, now).map(Ok)
                    }
                    // Not an answer to the stored bytes: leave the stored command alone.
                    _ => Ok(Err(())),
                }
            })
            .await;
        match closed {
            Ok(Err(())) => self.foreign_result(device, state, result, now),
            Ok(Ok(Some(c))) => {
                Metrics::inc(&self.metrics.commands_completed);
                info!(device, command_id = %c.command_id, state = ?c.state, "command finished");
                self.event(&c);
            }
            Ok(Ok(None)) => debug!(
                device,
                command_id = %result.command_id,
                "result for an unknown or already closed command (a re-sent result)"
            ),
            Err(_) => {}
        }
    }

    /// A result that answers no stored command: counted, logged within a budget, and passed to
    /// services as a foreign event carrying the device's answer.
    fn foreign_result(
        &mut self,
        device: &str,
        state: CommandState,
        result: CommandResult,
        now_ms: u64,
    ) {
        Metrics::inc(&self.metrics.command_results_foreign);
        if let Some(suppressed) = FOREIGN_LOG.allow() {
            warn!(
                device,
                command_id = %result.command_id,
                refusal = ?result.refusal(),
                message = %result.message,
                suppressed,
                "command result for a delivery the gateway did not store (a forgery or a raw publish the device answered)"
            );
        }
        let record = CommandRecord {
            device_id: device.to_owned(),
            command_id: result.command_id.clone(),
            name: String::new(),
            state: state.into(),
            attempts: 0,
            issued_at_ms: 0,
            expires_at_ms: 0,
            updated_at_ms: now_ms,
            result: Some(result),
            issued_by: String::new(),
        };
        self.publish_event(device, record, true);
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
        if let Err(e) = self.link.publish(topic, updated.delivery().encode_to_vec()) {
            warn!(error = %e, "could not hand a command to the router");
            return;
        }
        Metrics::inc(&self.metrics.commands_delivered);
        self.reschedule = true;
        info!(device = %updated.device_id, command_id = %updated.command_id, attempt = updated.attempts, "command delivered");
        if c.state != CommandState::Delivered {
            self.event(&updated);
        }
    }

    /// How long to sleep before the next sweep, from the store's deadlines.
    async fn next_sweep(&self) -> Duration {
        let now = fleet_proto::time::now_ms();
        let redeliver_after = self.settings.redeliver_after;
        let after = now.saturating_sub(millis(redeliver_after));
        match self
            .store
            .call("command deadlines", move |s| {
                // A held command's release is a deadline like an expiry.
                let deadline = s
                    .next_expiry()?
                    .into_iter()
                    .chain(s.next_release(now)?)
                    .min();
                Ok((deadline, s.oldest_fresh_delivery(after, now)?))
            })
            .await
        {
            Ok((deadline, delivery)) => next_sweep_in(now, deadline, delivery, redeliver_after),
            Err(_) => RETRY_AFTER_ERROR,
        }
    }

    /// Expires what is due, hands over held commands whose time has come and re-delivers what
    /// is overdue, to connected devices.
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
        if let Ok(released) = self
            .store
            .call("released commands", move |s| s.released_commands(now))
            .await
        {
            for c in released {
                if self.online.contains(&c.device_id) {
                    self.deliver(c).await;
                }
            }
        }
        let before = now.saturating_sub(millis(self.settings.redeliver_after));
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
        self.publish_event(&c.device_id, to_record(c), false);
    }

    fn publish_event(&mut self, device: &str, record: CommandRecord, foreign: bool) {
        let ev = CommandEvent {
            foreign,
            command: Some(record),
        };
        if let Err(e) = self
            .link
            .publish(topics::command_events_topic(device), ev.encode_to_vec())
        {
            warn!(error = %e, "could not publish a command event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sleeps_until_the_earliest_deadline() {
        let r = Duration::from_secs(10);
        assert_eq!(next_sweep_in(1_000, None, None, r), MAX_SLEEP);
        assert_eq!(
            next_sweep_in(1_000, Some(1_500), None, r),
            Duration::from_millis(500)
        );
        // Handed over at 900: due again at 10_900.
        assert_eq!(
            next_sweep_in(1_000, Some(20_000), Some(900), r),
            Duration::from_millis(9_900)
        );
        // Already due: at once.
        assert_eq!(next_sweep_in(1_000, Some(999), None, r), Duration::ZERO);
        // Far away: no longer than the cap.
        assert_eq!(next_sweep_in(0, Some(u64::MAX), None, r), MAX_SLEEP);
        assert_eq!(next_sweep_in(0, None, Some(u64::MAX), r), MAX_SLEEP);
    }

    #[test]
    fn a_late_disconnect_of_a_replaced_session_leaves_the_device_online() {
        let mut o = Online::default();
        o.connected("dev-1");
        // It reconnects; the old connection's end is seen only afterwards.
        o.connected("dev-1");
        o.disconnected("dev-1");
        assert!(o.contains("dev-1"));
        o.disconnected("dev-1");
        assert!(!o.contains("dev-1") && o.is_empty());
        // An end without a start (never sent, but harmless) changes nothing.
        o.disconnected("dev-2");
        assert!(o.is_empty());
    }

    proptest! {
        /// Whatever the interleaving of several connections of several devices (each
        /// connection's start before its end), a device is online exactly while one of its
        /// connections has started and not ended.
        #[test]
        fn online_while_any_connection_is_live(
            order in proptest::collection::vec((0usize..3, 0usize..4), 0..40),
        ) {
            let mut o = Online::default();
            // (device, connection) -> started, ended
            let mut state = [[(false, false); 4]; 3];
            for (d, c) in order {
                let id = format!("dev-{d}");
                let (started, ended) = state[d][c];
                if !started {
                    o.connected(&id);
                    state[d][c].0 = true;
                } else if !ended {
                    o.disconnected(&id);
                    state[d][c].1 = true;
                }
                for (dev, conns) in state.iter().enumerate() {
                    let live = conns.iter().any(|&(s, e)| s && !e);
                    prop_assert_eq!(o.contains(&format!("dev-{dev}")), live);
                }
            }
        }
    }

    proptest! {
        /// The sweep never comes after a deadline (so an expiry is acted on at its time and a
        /// re-delivery at `redeliver_after`), never sleeps past the cap, and sleeps exactly until
        /// the earliest deadline when that is within the cap.
        #[test]
        fn the_next_sweep_is_at_the_earliest_deadline(
            now in 0u64..1_000_000_000,
            expiry in proptest::option::of(0u64..2_000_000_000),
            delivered in proptest::option::of(0u64..2_000_000_000),
            redeliver_ms in 0u64..100_000_000,
        ) {
            let r = Duration::from_millis(redeliver_ms);
            let wait = next_sweep_in(now, expiry, delivered, r);
            prop_assert!(wait <= MAX_SLEEP);
            let at = now + millis(wait);
            let deadlines: Vec<u64> =
                expiry.into_iter().chain(delivered.map(|d| d + redeliver_ms)).collect();
            for d in &deadlines {
                prop_assert!(at <= (*d).max(now), "sweep at {at} after deadline {d}");
            }
            match deadlines.iter().min() {
                Some(&first) if first.saturating_sub(now) < millis(MAX_SLEEP) => {
                    prop_assert_eq!(at, first.max(now));
                }
                _ => prop_assert_eq!(wait, MAX_SLEEP),
            }
        }
    }

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
