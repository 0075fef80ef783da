//! The bridge: the gateway as an MQTT client of the cloud broker (rumqttc, mTLS with the
//! gateway's certificate, persistent session, reconnects with exponential backoff and full
//! jitter).
//!
//! * **Up** (store and forward): every message bound upstream is in the store's queue before
//!   it is sent, and leaves it only when the upstream broker acknowledges it (QoS 1). The
//!   window, the acknowledgements, the cursor into the queue and the backoff are the I/O-free
//!   [`machine`]; this module drives it. Status reports enter the queue in the transaction
//!   that stores them, before the device gets its acknowledgement (the status owner,
//!   `services::status`, does that when [`carries_status`]). Every other upward topic
//!   (presence, update progress, API responses, events) comes through the bridge's link, a
//!   persistent session of the MQTT core: the core answers a device's publish only once the
//!   message is durable in that session's queue, and the bridge confirms it to the core only
//!   once the transaction that queues it upward has committed, so nothing a device saw
//!   acknowledged is lost to a crash. Order is kept; after a reconnect the queue is sent again
//!   from its head (at least once: subscribers drop duplicates by sequence or id). The queue
//!   has a disk budget; over it the oldest messages are dropped and counted.
//! * **Down**: the fleet API requests addressed to this gateway
//!   (`gateways/{id}/fleet/api/+/request`) are published into the local router, where the
//!   API answers them as if the service were connected here; answers and events flow up.
//! * **Fail-over**: `bridge.upstream` may list several addresses (the nodes of a cluster). The
//!   machine picks the next one after every failed attempt or lost connection, round robin;
//!   the driver gives rumqttc's event loop new options for it. rumqttc drops its own
//!   unacknowledged publishes when a broker has no session for the bridge: nothing depends on
//!   them, as every row stays in the store's queue until a PUBACK and a new connection sends
//!   again from the queue's head.
//! * **Presence**: the gateway announces itself upstream on [`topics::gateway_presence_topic`]
//!   (a retained `GatewayPresence`, QoS 1): online with its version and device counts when the
//!   bridge connects, again when the counts change (at most once per
//!   `bridge.presence_interval`) and unchanged every `bridge.presence_refresh`, offline when
//!   the gateway stops cleanly, and offline as the bridge's MQTT will when it is lost
//!   otherwise.
//!
//! * **Refused topics**: a broker that does not take some characters in a topic closes the
//!   connection of a client that publishes one (NATS: `.` and space). Such a message would be
//!   sent again after every reconnect and block everything behind it, so with
//!   `bridge.refuse_topic_chars` set it is not sent up: the link does not queue it, and a row
//!   already queued (a status report, or one queued before the setting) leaves the queue
//!   unsent. Either way it is counted and logged (a few lines a minute).
//!
//! Topic rules are in [`mapping`].

pub(crate) mod machine;
pub(crate) mod mapping;

use std::sync::Arc;
use std::time::Duration;

use fleet_backoff::BackoffConfig;
use fleet_proto::topics;
use fleet_proto::Message;
use rand_core::RngCore;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

pub(crate) use self::machine::DeviceCounts;
use self::machine::{Action, Machine, MachineConfig, Row};
use self::mapping::Mapping;
use crate::config::BridgeSettings;
use crate::metrics::{LogBudget, Metrics};
use crate::router::Router;
use crate::router::{LinkError, Received, ServiceLink};
use crate::store::SharedStore;

/// How often the machine is ticked: acknowledgements flushed, the queue read, housekeeping.
const TICK: Duration = Duration::from_millis(50);
/// Local messages queued upward in one transaction, at most.
const LOCAL_BATCH: usize = 512;

/// The name of the bridge's durable link into the MQTT core (its stored session's id).
pub(crate) const LINK: &str = "bridge";
/// How long a clean stop waits for the upstream broker to acknowledge the offline presence.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Log lines for a lost upstream connection, at most (a flapping link is seen in the
/// counters; the log keeps a few lines a minute and says how many it left out).
const LOST_LINES: u32 = 3;
/// Log lines for messages not sent up for a refused topic, at most per [`LOG_WINDOW`].
const REFUSED_LINES: u32 = 5;
/// The window of the bridge's log budgets.
const LOG_WINDOW: Duration = Duration::from_secs(60);

/// Why the bridge cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// Its TLS material is unusable.
    #[error("bridge TLS: {0}")]
    Tls(#[from] fleet_certs::ClientTlsError),
    /// The gateway id is not a valid id.
    #[error("bridge gateway id: {0}")]
    Id(String),
    /// Its local link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// An `upstream` address is not HOST:PORT, or there is none.
    #[error("bridge.upstream {0:?} is not HOST:PORT")]
    Upstream(String),
}

/// The bridge's TLS files, resolved from its settings and the gateway's.
#[derive(Debug, Clone)]
pub(crate) struct BridgeTls {
    /// CA bundle for the upstream broker.
    pub ca: std::path::PathBuf,
    /// Client certificate.
    pub cert: std::path::PathBuf,
    /// Its key.
    pub key: std::path::PathBuf,
}

/// Local messages taken from the link but not yet in the upward queue (the store failed):
/// queued again on the next tick, confirmed to the core only then.
#[derive(Default)]
struct Unqueued {
    msgs: Vec<(String, Vec<u8>)>,
    confirm: Vec<u16>,
}

/// The bridge task: the driver of [`Machine`] (rumqttc, the store, the clock), the down path,
/// and the local link's intake.
pub(crate) struct Bridge {
    mapping: Mapping,
    gateway: fleet_proto::GatewayId,
    /// The upstream addresses, as configured and as (host, port).
    upstreams: Vec<(String, (String, u16))>,
    tls: Arc<rustls::ClientConfig>,
    /// The device counts, as the assembly keeps them.
    devices: watch::Receiver<DeviceCounts>,
    started_at_ms: u64,
    store: SharedStore,
    link: ServiceLink,
    mqtt: AsyncClient,
    eventloop: EventLoop,
    metrics: Arc<Metrics>,
    settings: BridgeSettings,
    machine: Machine,
    /// Rows of the last read, until handed to the client.
    fetched: std::collections::VecDeque<(i64, String, Vec<u8>)>,
    unqueued: Unqueued,
    retry_at: Option<Instant>,
    /// Budget of "upstream connection lost" lines.
    lost_log: LogBudget,
    /// Budget of "topic refused" lines.
    refused_log: LogBudget,
    /// Budget of "subscription refused" lines.
    unsubscribed_log: LogBudget,
}

impl Bridge {
    /// Sets up the upstream client and the local link; nothing is sent until [`Bridge::run`].
    /// `devices` carries the device counts the gateway announces upstream.
    pub(crate) async fn start(
        router: &Router,
        store: SharedStore,
        settings: BridgeSettings,
        tls: &BridgeTls,
        metrics: Arc<Metrics>,
        devices: watch::Receiver<DeviceCounts>,
    ) -> Result<Self, BridgeError> {
        let upstreams = settings
            .upstream
            .iter()
            .map(|a| {
                crate::config::parse_host_port(a)
                    .map(|(h, p)| (a.clone(), (h.to_owned(), p)))
                    .ok_or_else(|| BridgeError::Upstream(a.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if upstreams.is_empty() {
            return Err(BridgeError::Upstream(String::new()));
        }
        let client = fleet_certs::client_tls(&tls.ca, &tls.cert, &tls.key)?;
        let id = settings
            .gateway_id
            .clone()
            .unwrap_or(client.identity.id.clone());
        let gateway =
            fleet_proto::GatewayId::new(&id).map_err(|e| BridgeError::Id(e.to_string()))?;
        // Checked at load when configured; the certificate's id only now.
        crate::config::check_gateway_id(&id, &settings.refuse_topic_chars)
            .map_err(|e| BridgeError::Id(e.to_string()))?;
        let mapping = Mapping::new(gateway.clone(), settings.up.clone(), settings.down.clone())
            .refusing(&settings.refuse_topic_chars);
        let filters = mapping.link_filters(carries_status(&settings));
        let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
        // Durable: what a device publishes upward is in the link's stored session queue before
        // the device's PUBACK, and is confirmed only once it is in the upward queue.
        let link = ServiceLink::open_durable(router, LINK, &filters).await?;
        let mut machine = Machine::new(MachineConfig {
            backoff: BackoffConfig {
                initial: settings.reconnect_min,
                max: settings.reconnect_max,
                // Never retry at once: the upstream broker may be refusing us on purpose.
                floor: Duration::from_millis(50),
                ..BackoffConfig::default()
            },
            upstreams: upstreams.len(),
            presence_interval: settings.presence_interval,
            presence_refresh: settings.presence_refresh,
        });
        let counts = *devices.borrow();
        machine.devices(Instant::now().into_std(), counts);
        let started_at_ms = fleet_proto::time::now_ms();
        let options = options(
            &id,
            &upstreams[0].1,
            &client.config,
            &settings,
            will(&gateway, counts, started_at_ms),
        );
        let (mqtt, eventloop) = AsyncClient::new(options, 256);
        let addresses: Vec<&str> = upstreams.iter().map(|u| u.0.as_str()).collect();
        info!(gateway_id = %id, upstream = ?addresses, "bridge configured");
        Metrics::set(&metrics.bridge_upstream_index, 0);
        Ok(Bridge {
            mapping,
            gateway,
            upstreams,
            tls: client.config,
            devices,
            started_at_ms,
            store,
            link,
            mqtt,
            eventloop,
            metrics,
            settings,
            machine,
            fetched: std::collections::VecDeque::new(),
            unqueued: Unqueued::default(),
            retry_at: None,
            lost_log: LogBudget::per(LOST_LINES, LOG_WINDOW),
            refused_log: LogBudget::per(REFUSED_LINES, LOG_WINDOW),
            unsubscribed_log: LogBudget::per(LOST_LINES, LOG_WINDOW),
        })
    }

    /// Runs until the router is gone or `stop` fires (or its sender is dropped). On a stop,
    /// announces the gateway offline upstream, waits a little for the acknowledgement and
    /// disconnects cleanly (so the broker drops the will).
    pub(crate) async fn run(mut self, stop: oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = std::pin::pin!(stop);
        let mut stopping: Option<Instant> = None;
        let mut devices_open = true;
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                ev = self.eventloop.poll(), if retry_at.is_none() => self.on_event(ev),
                () = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    self.retry_at = None;
                }
                msg = self.link.recv_unconfirmed() => match msg {
                    Some(first) => self.take_local(first).await,
                    None => break,
                },
                changed = self.devices.changed(), if devices_open => match changed {
                    Ok(()) => {
                        let counts = *self.devices.borrow_and_update();
                        self.machine.devices(Instant::now().into_std(), counts);
                    }
                    Err(_) => devices_open = false,
                },
                _ = &mut stop, if stopping.is_none() => {
                    if !self.machine.stop(Instant::now().into_std()) {
                        break;
                    }
                    stopping = Some(Instant::now() + STOP_GRACE);
                }
                () = sleep_until(stopping.unwrap_or_else(Instant::now)), if stopping.is_some() => {
                    warn!("bridge: the offline presence was not acknowledged in time");
                    break;
                }
                _ = tick.tick() => {
                    if !self.unqueued.msgs.is_empty() || !self.unqueued.confirm.is_empty() {
                        self.queue_local().await;
                    }
                    self.machine.tick(Instant::now().into_std());
                }
            }
            if self.execute().await {
                self.disconnect().await;
                break;
            }
        }
        info!("bridge stopped");
    }

    /// Says goodbye to the upstream broker (a DISCONNECT: it drops the will), waiting a little
    /// for the packet to go out.
    async fn disconnect(&mut self) {
        if self.mqtt.try_disconnect().is_err() {
            return;
        }
        let sent = async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), sent).await;
        Metrics::set(&self.metrics.bridge_connected, 0);
    }

    /// rumqttc options for upstream address `index`, with the gateway's will.
    fn options_for(&self, index: usize) -> MqttOptions {
        let counts = *self.devices.borrow();
        options(
            self.gateway.as_str(),
            &self.upstreams[index % self.upstreams.len()].1,
            &self.tls,
            &self.settings,
            will(&self.gateway, counts, self.started_at_ms),
        )
    }

    /// Subscribes to the downward filters (again: a subscription replaces the one it repeats).
    fn subscribe_down(&mut self) {
        for f in self.mapping.down_subscriptions() {
            if let Err(e) = self.mqtt.try_subscribe(f, QoS::AtLeastOnce) {
                warn!(error = %e, "bridge: could not queue a subscription");
            }
        }
    }

    /// The gateway's presence now.
    fn presence(&self, online: bool, counts: DeviceCounts) -> Vec<u8> {
        presence(&self.gateway, online, counts, self.started_at_ms).encode_to_vec()
    }

    /// Queues what the local link received (and whatever else it has ready), then confirms it
    /// to the core.
    async fn take_local(&mut self, first: (Received, Option<u16>)) {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some((m, confirm)) = next.take() {
            if self.mapping.queue_from_link(&m.topic) {
                if self.mapping.refused(&m.topic) {
                    self.note_refused(&m.topic);
                } else {
                    self.unqueued.msgs.push((m.topic, m.payload.to_vec()));
                }
            }
            self.unqueued.confirm.extend(confirm);
            taken += 1;
            if taken >= LOCAL_BATCH {
                break;
            }
            if let Ok(Some(m)) =
                tokio::time::timeout(Duration::ZERO, self.link.recv_unconfirmed()).await
            {
                next = Some(m);
            }
        }
        self.queue_local().await;
    }

    /// Counts a message not sent up because of its topic, and logs it within the budget.
    fn note_refused(&self, local: &str) {
        Metrics::inc(&self.metrics.bridge_refused_topics);
        if let Some(suppressed) = self.refused_log.allow() {
            warn!(
                topic = mapping::shown(local),
                suppressed,
                refuse_topic_chars = ?self.settings.refuse_topic_chars,
                "bridge: not sent up: the upstream broker refuses a character of this topic"
            );
        }
    }

    /// Writes the taken messages to the upward queue in one transaction; once it committed,
    /// confirms them to the core (which then forgets them). When the store fails they are kept
    /// and tried again on the next tick: unconfirmed, the core still holds them, so not even
    /// a restart meanwhile loses them.
    async fn queue_local(&mut self) {
        let Unqueued { msgs, confirm } = std::mem::take(&mut self.unqueued);
        if !msgs.is_empty() {
            let now = fleet_proto::time::now_ms();
            let batch = msgs.clone();
            let queued = self
                .store
                .call("queue upward messages", move |s| {
                    s.enqueue_uplink(&batch, now)
                })
                .await;
            if queued.is_err() {
                warn!(
                    messages = msgs.len(),
                    "upward messages could not be queued; trying again"
                );
                self.unqueued = Unqueued { msgs, confirm };
                return;
            }
            self.machine.queued();
        }
        for id in confirm {
            self.link.confirm(id);
        }
    }

    fn on_event(&mut self, ev: Result<Event, ConnectionError>) {
        let now = Instant::now().into_std();
        match ev {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                // Unacknowledged messages are sent again from the queue, in order; rumqttc's
                // own copies (and anything it took before the connection was lost) would only
                // duplicate them and shift the numbering the machine relies on.
                self.eventloop.pending.clear();
                self.machine.connected(now, ack.session_present);
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                Metrics::inc(&self.metrics.bridge_messages_down);
                Metrics::add(&self.metrics.bridge_bytes_down, p.payload.len() as u64);
                match self.mapping.local(&p.topic) {
                    Some(local) => {
                        if let Err(e) = self.link.publish(local.to_owned(), p.payload.to_vec()) {
                            warn!(error = %e, "bridge: could not hand a message to the router");
                        }
                    }
                    None => {
                        Metrics::inc(&self.metrics.acl_denials);
                        warn!(topic = %p.topic, "bridge: upstream message outside the down filters; dropped");
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => self.machine.sent(pkid),
            Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                if !self.machine.puback(ack.pkid) {
                    debug!(pkid = ack.pkid, "bridge: PUBACK for no message in flight");
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    // Asked for again: a cluster refuses while it elects leaders.
                    self.machine.subscribe_refused(now);
                    if let Some(suppressed) = self.unsubscribed_log.allow() {
                        warn!(
                            suppressed,
                            "bridge: the upstream broker refused a subscription; asking again \
                             (check its ACL if this goes on)"
                        );
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if self.machine.is_connected() {
                    if let Some(suppressed) = self.lost_log.allow() {
                        warn!(error = %e, suppressed, "bridge: upstream connection lost");
                    }
                } else {
                    debug!(error = %e, "bridge: cannot reach upstream");
                }
                self.machine.disconnected(now, rand_core::OsRng.next_u64());
            }
        }
    }

    /// Carries out what the machine asks for, in order; true once the upstream broker
    /// acknowledged the offline presence of a stop.
    async fn execute(&mut self) -> bool {
        let mut offline = false;
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::Read { read, after, room } => {
                    let rows = self
                        .store
                        .call("read the upward queue", move |s| {
                            s.uplink_after(after, room)
                        })
                        .await
                        .unwrap_or_default();
                    for r in rows.iter().filter(|r| self.mapping.refused(&r.topic)) {
                        if self.machine.refused(&[r.seq]) > 0 {
                            self.note_refused(&r.topic);
                        }
                    }
                    let meta: Vec<Row> = rows
                        .iter()
                        .map(|r| Row {
                            seq: r.seq,
                            len: r.payload.len(),
                        })
                        .collect();
                    self.fetched = rows
                        .into_iter()
                        .map(|r| (r.seq, r.topic, r.payload))
                        .collect();
                    self.machine.rows(read, &meta);
                }
                Action::Publish(row) => self.publish(row),
                Action::Remove(seqs) => {
                    let done = seqs.clone();
                    let ok = self
                        .store
                        .call("remove acknowledged upward messages", move |s| {
                            s.uplink_done(&done)
                        })
                        .await
                        .is_ok();
                    self.machine.removed(&seqs, ok);
                }
                Action::Up { session_present } => {
                    Metrics::set(&self.metrics.bridge_connected, 1);
                    Metrics::inc(&self.metrics.bridge_connects);
                    let upstream = &self.upstreams[self.machine.upstream()].0;
                    info!(session_present, %upstream, "bridge connected upstream");
                    self.subscribe_down();
                }
                Action::Resubscribe => self.subscribe_down(),
                Action::Down {
                    retry_at,
                    was_up,
                    upstream,
                    switched,
                } => {
                    Metrics::set(&self.metrics.bridge_connected, 0);
                    self.fetched.clear();
                    self.retry_at = Some(Instant::from_std(retry_at));
                    // Also when the address stays: the will carries the latest counts.
                    self.eventloop.mqtt_options = self.options_for(upstream);
                    if switched {
                        Metrics::inc(&self.metrics.bridge_failovers);
                        Metrics::set(&self.metrics.bridge_upstream_index, upstream as u64);
                        let next = &self.upstreams[upstream].0;
                        if was_up {
                            info!(%next, "bridge: upstream lost; trying the next address");
                        } else {
                            debug!(%next, "bridge: trying the next upstream address");
                        }
                    }
                }
                Action::Presence { online, counts } => {
                    let payload = self.presence(online, counts);
                    let topic = topics::gateway_presence_topic(&self.gateway);
                    if self
                        .mqtt
                        .try_publish(topic, QoS::AtLeastOnce, true, payload)
                        .is_err()
                    {
                        self.machine.presence_unsent();
                    }
                }
                Action::Announced { online } => offline |= !online,
                Action::Delivered(row) => {
                    Metrics::inc(&self.metrics.bridge_messages_up);
                    Metrics::add(&self.metrics.bridge_bytes_up, row.len as u64);
                }
                Action::Housekeeping => self.housekeeping().await,
            }
        }
        offline
    }

    /// Hands row `row` of the last read to rumqttc.
    fn publish(&mut self, row: Row) {
        while self.fetched.front().is_some_and(|r| r.0 < row.seq) {
            self.fetched.pop_front();
        }
        let Some((_, local, payload)) = self.fetched.pop_front().filter(|r| r.0 == row.seq) else {
            // Not from the last read (cannot happen: the machine asks for rows it was given).
            self.machine.unsent(row.seq);
            return;
        };
        let topic = self.mapping.upstream(&local);
        if self
            .mqtt
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .is_err()
        {
            self.machine.unsent(row.seq);
        }
    }

    /// Keeps the queue within its budget and refreshes the gauges.
    async fn housekeeping(&mut self) {
        let max = self.settings.max_queue_bytes;
        let Ok((dropped, stats)) = self
            .store
            .call("uplink queue stats", move |s| {
                let dropped = s.uplink_trim(max)?;
                Ok((dropped, s.uplink_stats()?))
            })
            .await
        else {
            return;
        };
        if dropped > 0 {
            Metrics::add(&self.metrics.bridge_dropped, dropped);
            warn!(
                dropped,
                max_queue_bytes = max,
                "upward queue over its disk budget: oldest messages dropped"
            );
        }
        Metrics::set(&self.metrics.bridge_queue_depth, stats.depth);
        Metrics::set(&self.metrics.bridge_queue_bytes, stats.bytes);
        Metrics::set(&self.metrics.bridge_queue_oldest_ms, stats.oldest_at_ms);
    }
}

/// The client options for one upstream address (`host`, `port`).
fn options(
    client_id: &str,
    (host, port): &(String, u16),
    tls: &Arc<rustls::ClientConfig>,
    settings: &BridgeSettings,
    will: LastWill,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, host.clone(), *port);
    o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls.clone())))
        .set_clean_session(false)
        .set_keep_alive(settings.keep_alive)
        .set_max_packet_size(4 << 20, 4 << 20)
        .set_inflight(100)
        .set_last_will(will);
    o
}

/// The gateway's presence message.
fn presence(
    gateway: &fleet_proto::GatewayId,
    online: bool,
    counts: DeviceCounts,
    started_at_ms: u64,
) -> fleet_proto::v1::GatewayPresence {
    fleet_proto::v1::GatewayPresence {
        gateway_id: gateway.to_string(),
        online,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        devices_known: counts.known,
        devices_online: counts.online,
        timestamp_ms: fleet_proto::time::now_ms(),
        started_at_ms,
    }
}

/// The bridge's will: the gateway offline, retained, on its presence topic.
fn will(gateway: &fleet_proto::GatewayId, counts: DeviceCounts, started_at_ms: u64) -> LastWill {
    LastWill::new(
        topics::gateway_presence_topic(gateway),
        presence(gateway, false, counts, started_at_ms).encode_to_vec(),
        QoS::AtLeastOnce,
        true,
    )
}

/// Whether stored status reports are to be queued upward: a bridge is configured and its `up`
/// filters carry device status. The assembly decides this from the configuration and tells
/// the status owner, which queues them in the transaction that stores them.
pub(crate) fn carries_status(settings: &BridgeSettings) -> bool {
    settings.enabled() && mapping::status_up(&settings.up)
}
