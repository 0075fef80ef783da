//! The bridge: the gateway as an MQTT client of the cloud broker (rumqttc, mTLS with the
//! gateway's certificate, persistent session, reconnects with exponential backoff and full
//! jitter).
//!
//! * **Up** (store and forward): every message bound upstream is in the store's queue before
//!   it is sent, and leaves it only when the upstream broker acknowledges it (QoS 1). Status
//!   reports enter the queue in the transaction that stores them, before the device gets its
//!   acknowledgement (the status owner, `services::status`, does that when
//!   [`carries_status`]); other upward topics (API responses, events, presence, update progress)
//!   are queued as the bridge's link receives them. Order is kept; after a reconnect the queue
//!   is sent again from its head (at least once: subscribers drop duplicates by sequence or
//!   id). The queue has a disk budget; over it the oldest messages are dropped and counted.
//! * **Down**: the fleet API requests addressed to this gateway
//!   (`gateways/{id}/fleet/api/+/request`) are published into the local router, where the
//!   API answers them as if the service were connected here; answers and events flow up.
//!
//! Topic rules are in [`mapping`].

pub(crate) mod mapping;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use fleet_backoff::{Backoff, BackoffConfig};
use rand_core::RngCore;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS,
    TlsConfiguration, Transport,
};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use self::mapping::Mapping;
use crate::config::BridgeSettings;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::router::{LinkError, Received, ServiceLink};
use crate::store::SharedStore;

/// Upward messages in flight (sent, not yet acknowledged).
const WINDOW: usize = 64;
/// How often the queue is pumped, acknowledgements flushed, and the gauges refreshed.
const TICK: Duration = Duration::from_millis(50);
/// Acknowledged messages removed from the queue in one transaction, at most.
const ACK_BATCH: usize = 256;

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
    /// `upstream` is not HOST:PORT.
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

/// The bridge task.
pub(crate) struct Bridge {
    mapping: Mapping,
    store: SharedStore,
    link: ServiceLink,
    mqtt: AsyncClient,
    eventloop: EventLoop,
    metrics: Arc<Metrics>,
    settings: BridgeSettings,
    connected: bool,
    /// Sent, not yet numbered by rumqttc: (queue seq, payload bytes), in send order.
    unnumbered: VecDeque<(i64, usize)>,
    /// Sent and numbered, awaiting PUBACK.
    inflight: HashMap<u16, (i64, usize)>,
    /// Highest queue position handed to rumqttc on this connection.
    cursor: i64,
    /// Acknowledged, to be removed from the queue.
    acked: Vec<i64>,
    backoff: Backoff,
    retry_at: Option<Instant>,
}

impl Bridge {
    /// Sets up the upstream client and the local link; nothing is sent until [`Bridge::run`].
    pub(crate) async fn start(
        router: &Router,
        store: SharedStore,
        settings: BridgeSettings,
        tls: &BridgeTls,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BridgeError> {
        let upstream = settings.upstream.clone().unwrap_or_default();
        let (host, port) = upstream
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| BridgeError::Upstream(upstream.clone()))?;
        let client = fleet_certs::client_tls(&tls.ca, &tls.cert, &tls.key)?;
        let id = settings
            .gateway_id
            .clone()
            .unwrap_or(client.identity.id.clone());
        let gateway =
            fleet_proto::GatewayId::new(&id).map_err(|e| BridgeError::Id(e.to_string()))?;
        let mapping = Mapping::new(gateway, settings.up.clone(), settings.down.clone());
        let filters: Vec<&str> = mapping.up_filters().iter().map(String::as_str).collect();
        let link = ServiceLink::open(router, "bridge", &filters).await?;
        let mut options = MqttOptions::new(id.clone(), host, port);
        options
            .set_transport(Transport::Tls(TlsConfiguration::Rustls(client.config)))
            .set_clean_session(false)
            .set_keep_alive(settings.keep_alive)
            .set_max_packet_size(4 << 20, 4 << 20)
            .set_inflight(100);
        let (mqtt, eventloop) = AsyncClient::new(options, 256);
        info!(gateway_id = %id, upstream = %upstream, "bridge configured");
        let backoff = Backoff::new(BackoffConfig {
            initial: settings.reconnect_min,
            max: settings.reconnect_max,
            // Never retry at once: the upstream broker may be refusing us on purpose.
            floor: Duration::from_millis(50),
            ..BackoffConfig::default()
        });
        Ok(Bridge {
            mapping,
            store,
            link,
            mqtt,
            eventloop,
            metrics,
            settings,
            connected: false,
            unnumbered: VecDeque::new(),
            inflight: HashMap::new(),
            cursor: 0,
            acked: Vec::new(),
            backoff,
            retry_at: None,
        })
    }

    /// Runs until the router is gone.
    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                ev = self.eventloop.poll(), if retry_at.is_none() => self.on_event(ev).await,
                () = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    self.retry_at = None;
                }
                msg = self.link.recv() => match msg {
                    Some(first) => self.take_local(first).await,
                    None => break,
                },
                _ = tick.tick() => {
                    ticks += 1;
                    self.flush_acks().await;
                    self.pump().await;
                    if ticks.is_multiple_of(20) {
                        self.housekeeping().await;
                    }
                }
            }
        }
        info!("bridge stopped");
    }

    /// Queues what the local link received (and whatever else it has ready).
    async fn take_local(&mut self, first: Received) {
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            if self.mapping.queue_from_link(&m.topic) {
                batch.push((m.topic, m.payload.to_vec()));
            }
            if batch.len() >= 512 {
                break;
            }
            if let Ok(Some(m)) = tokio::time::timeout(Duration::ZERO, self.link.recv()).await {
                next = Some(m);
            }
        }
        if batch.is_empty() {
            return;
        }
        let now = fleet_proto::time::now_ms();
        if self
            .store
            .call("queue upward messages", move |s| {
                s.enqueue_uplink(&batch, now)
            })
            .await
            .is_err()
        {
            warn!("upward messages could not be queued; they are lost");
        }
        self.pump().await;
    }

    async fn on_event(&mut self, ev: Result<Event, ConnectionError>) {
        match ev {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                // Unacknowledged messages are sent again from the queue, in order; rumqttc's
                // own copies would only duplicate them.
                self.eventloop.pending.clear();
                self.flush_acks().await;
                self.unnumbered.clear();
                self.inflight.clear();
                self.cursor = 0;
                self.connected = true;
                self.backoff.connected(Instant::now().into_std());
                Metrics::set(&self.metrics.bridge_connected, 1);
                Metrics::inc(&self.metrics.bridge_connects);
                info!(
                    session_present = ack.session_present,
                    "bridge connected upstream"
                );
                for f in self.mapping.down_subscriptions() {
                    if let Err(e) = self.mqtt.try_subscribe(f, QoS::AtLeastOnce) {
                        warn!(error = %e, "bridge: could not queue a subscription");
                    }
                }
                self.pump().await;
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
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                if let Some(x) = self.unnumbered.pop_front() {
                    self.inflight.insert(pkid, x);
                }
            }
            Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                if let Some((seq, bytes)) = self.inflight.remove(&ack.pkid) {
                    Metrics::inc(&self.metrics.bridge_messages_up);
                    Metrics::add(&self.metrics.bridge_bytes_up, bytes as u64);
                    self.acked.push(seq);
                    if self.acked.len() >= ACK_BATCH {
                        self.flush_acks().await;
                    }
                    self.pump().await;
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    warn!("the upstream broker refused the bridge's subscription (check its ACL)");
                }
            }
            Ok(_) => {}
            Err(e) => {
                if self.connected {
                    warn!(error = %e, "bridge: upstream connection lost");
                } else {
                    debug!(error = %e, "bridge: cannot reach upstream");
                }
                self.connected = false;
                Metrics::set(&self.metrics.bridge_connected, 0);
                let now = Instant::now();
                let delay = self
                    .backoff
                    .failed(now.into_std(), rand_core::OsRng.next_u64());
                self.retry_at = Some(now + delay);
            }
        }
    }

    /// Hands queued messages to rumqttc while the window has room.
    async fn pump(&mut self) {
        if !self.connected {
            return;
        }
        let room = WINDOW.saturating_sub(self.unnumbered.len() + self.inflight.len());
        if room == 0 {
            return;
        }
        let after = self.cursor;
        let Ok(rows) = self
            .store
            .call("read the upward queue", move |s| {
                s.uplink_after(after, room)
            })
            .await
        else {
            return;
        };
        for r in rows {
            let topic = self.mapping.upstream(&r.topic);
            let len = r.payload.len();
            if self
                .mqtt
                .try_publish(topic, QoS::AtLeastOnce, false, r.payload)
                .is_err()
            {
                break;
            }
            self.unnumbered.push_back((r.seq, len));
            self.cursor = r.seq;
        }
    }

    async fn flush_acks(&mut self) {
        if self.acked.is_empty() {
            return;
        }
        let done = std::mem::take(&mut self.acked);
        let _ = self
            .store
            .call("remove acknowledged upward messages", move |s| {
                s.uplink_done(&done)
            })
            .await;
    }

    /// Every second: keep the queue within its budget and refresh the gauges.
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

/// Whether stored status reports are to be queued upward: a bridge is configured and its `up`
/// filters carry device status. The assembly decides this from the configuration and tells
/// the status owner, which queues them in the transaction that stores them.
pub(crate) fn carries_status(settings: &BridgeSettings) -> bool {
    settings.upstream.is_some() && mapping::status_up(&settings.up)
}
