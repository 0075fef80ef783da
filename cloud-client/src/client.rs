//! The SDK's connection: one rumqttc session driven by a task, requests matched to responses
//! by request id, events fanned out to every listener.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fleet_backoff::{Backoff, BackoffConfig};
use fleet_proto::signing::{Signer, UpdateSigner};
use fleet_proto::topics::{self, FleetTopic, Topic};
use fleet_proto::v1::{
    api_request, api_response, ApiRequest, ApiResponse, CommandEvent, CommandRecord, DeviceStatus,
    GatewayPresence, GetCommand, GetStatus, SendCommand, TrustEvent,
};
use fleet_proto::Message;
use rand_core::RngCore;
use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{broadcast, oneshot, watch, Notify};
use tracing::{debug, warn};

use crate::signed::{signed_request, Issue};

pub use crate::error::SdkError;

/// Builds a [`FleetClient`].
#[must_use]
pub struct FleetClientBuilder {
    host: Option<String>,
    port: u16,
    pem: Option<(PathBuf, PathBuf, PathBuf)>,
    request_timeout: Duration,
    connect_timeout: Duration,
    reconnect: BackoffConfig,
    scope: Scope,
    presence_quiet: Duration,
    presence_max_wait: Duration,
    signers: Vec<Arc<dyn Signer>>,
    key_files: Vec<PathBuf>,
}

/// Which gateways a connection reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// Connected to the gateway itself: local topics.
    Direct,
    /// One gateway through a cloud broker: its topics under `gateways/{id}/`.
    Via(fleet_proto::GatewayId),
    /// Every gateway through a cloud broker ([`FleetClient::gateway`] picks one).
    Fleet,
}

impl FleetClientBuilder {
    /// The gateway's host name (checked against its certificate) and port.
    pub fn gateway(mut self, host: impl Into<String>, port: u16) -> Self {
        self.host = Some(host.into());
        self.port = port;
        self
    }

    /// The fleet CA bundle, and the service's certificate and key (PEM).
    pub fn pem_files(
        mut self,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.pem = Some((ca.into(), cert.into(), key.into()));
        self
    }

    /// How long a request waits for its answer. Default 10 s.
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// How long [`connect`](Self::connect) tries before giving up. Default 10 s.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Reconnect delays, exponential with full jitter. Default: from 200 ms up to 5 s (an
    /// operator's tool waits for its answer), otherwise as [`BackoffConfig::default`].
    pub fn reconnect(mut self, policy: BackoffConfig) -> Self {
        self.reconnect = policy;
        self
    }

    /// Reach the gateway `gateway_id` through a cloud MQTT broker (the address given to
    /// [`gateway`](Self::gateway)) that its bridge connects to: the same API, under
    /// `gateways/{gateway_id}/`.
    pub fn via_broker(mut self, gateway_id: &str) -> Result<Self, SdkError> {
        let id = fleet_proto::GatewayId::new(gateway_id)
            .map_err(|e| SdkError::Config(format!("gateway id {gateway_id:?}: {e}")))?;
        self.scope = Scope::Via(id);
        Ok(self)
    }

    /// Reach every gateway bridged to a cloud MQTT broker (the address given to
    /// [`gateway`](Self::gateway)) over this one connection: the client subscribes to the
    /// responses and events of all of them (`gateways/+/...`) and to their retained presence;
    /// [`FleetClient::gateway`] addresses one, [`FleetClient::gateways`] lists them.
    pub fn fleet(mut self) -> Self {
        self.scope = Scope::Fleet;
        self
    }

    /// When the list of gateways is complete after (re)subscribing (see
    /// [`FleetClient::gateways`]): once no presence message has arrived for `quiet` since the
    /// subscription was granted (or since the last one), and at the latest `max_wait` after
    /// the grant. Defaults 300 ms and 5 s.
    pub fn presence_settle(mut self, quiet: Duration, max_wait: Duration) -> Self {
        self.presence_quiet = quiet;
        self.presence_max_wait = max_wait.max(quiet);
        self
    }

    /// Adds a key of the root's `commands` role that signs every command and update
    /// withdrawal this client sends (a file key, or an HSM behind [`Signer`]). A role with a
    /// threshold above one needs that many signers. Without any, sending a command is
    /// [`SdkError::NoCommandKey`].
    pub fn command_signer(mut self, signer: Arc<dyn Signer>) -> Self {
        self.signers.push(signer);
        self
    }

    /// Adds several `commands` role signers (see [`command_signer`](Self::command_signer)).
    pub fn command_signers(mut self, signers: Vec<Arc<dyn Signer>>) -> Self {
        self.signers.extend(signers);
        self
    }

    /// Adds a `commands` role key from a PKCS#8 PEM file (`-----BEGIN PRIVATE KEY-----`, as
    /// `fleetctl trust init` writes them), read by [`connect`](Self::connect); an unreadable
    /// or invalid file is [`SdkError::CommandKey`].
    pub fn command_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.key_files.push(path.into());
        self
    }

    /// Reads the command key files, connects, subscribes to the service's responses, the
    /// command events and the trust events, and returns once the subscriptions are granted.
    /// Reconnects by itself afterwards.
    pub async fn connect(self) -> Result<FleetClient, SdkError> {
        let mut signers = self.signers;
        for path in &self.key_files {
            signers.push(Arc::new(load_command_key(path)?));
        }
        let host = self
            .host
            .ok_or_else(|| SdkError::Config("gateway(host, port) is required".into()))?;
        let (ca, cert, key) = self
            .pem
            .ok_or_else(|| SdkError::Config("pem_files(ca, cert, key) is required".into()))?;
        let tls = fleet_certs::client_tls(&ca, &cert, &key)?;
        if tls.identity.role != fleet_certs::Role::Service {
            return Err(SdkError::NotAService(tls.identity.role.to_string()));
        }
        let service_id = tls.identity.id.clone();
        // `{id}:{instance}`: several processes of one service may be connected at once.
        let mut b = [0u8; 6];
        rand_core::OsRng.fill_bytes(&mut b);
        let client_id = format!("{service_id}:{}", hex::encode(b));
        let mut options = MqttOptions::new(client_id, host, self.port);
        options
            .set_transport(Transport::Tls(TlsConfiguration::Rustls(tls.config)))
            .set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(16 << 20, 16 << 20);
        let (mqtt, eventloop) = AsyncClient::new(options, 256);
        let (ready_tx, mut ready_rx) = watch::channel(Ready::Connecting(String::new()));
        let inner = Arc::new(Inner {
            mqtt,
            service_id,
            pending: Mutex::new(HashMap::new()),
            events: Mutex::new(HashMap::new()),
            trust_events: Mutex::new(HashMap::new()),
            fleet_events: broadcast::channel(4096).0,
            request_timeout: self.request_timeout,
            scope: self.scope,
            presence: Mutex::new(PresenceTable::default()),
            presence_changed: Notify::new(),
            presence_quiet: self.presence_quiet,
            presence_max_wait: self.presence_max_wait,
            signers,
        });
        let backoff = Backoff::new(self.reconnect);
        tokio::spawn(drive(inner.clone(), eventloop, ready_tx, backoff));
        let waited = tokio::time::timeout(
            self.connect_timeout,
            ready_rx.wait_for(|r| matches!(r, Ready::Subscribed)),
        )
        .await
        .map(|r| r.is_ok());
        match waited {
            Ok(true) => {
                let gateway = match &inner.scope {
                    Scope::Via(gw) => Some(gw.clone()),
                    Scope::Direct | Scope::Fleet => None,
                };
                Ok(FleetClient { inner, gateway })
            }
            Ok(false) => Err(SdkError::Stopped),
            Err(_) => {
                let last = match &*ready_rx.borrow() {
                    Ready::Connecting(e) => e.clone(),
                    Ready::Subscribed => String::new(),
                };
                inner.mqtt.try_disconnect().ok();
                Err(SdkError::Connect(self.connect_timeout, last))
            }
        }
    }
}

/// Loads a PKCS#8 PEM Ed25519 private key.
fn load_command_key(path: &Path) -> Result<UpdateSigner, SdkError> {
    let bad = |reason: String| SdkError::CommandKey {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    UpdateSigner::from_pkcs8_pem(&pem).map_err(|e| bad(e.to_string()))
}

#[derive(Debug, Clone)]
enum Ready {
    /// Not (yet) subscribed; the last connection error, if any.
    Connecting(String),
    Subscribed,
}

/// A command event, and the gateway it came from (through a cloud broker).
#[derive(Debug, Clone, PartialEq)]
pub struct FleetEvent {
    /// The gateway (empty when connected to the gateway itself).
    pub gateway_id: String,
    /// The event.
    pub event: CommandEvent,
}

/// A waiting request: the gateway it went to (its key in [`Inner::events`]) and its answer.
struct Pending {
    gateway: String,
    tx: oneshot::Sender<ApiResponse>,
}

/// Gateways' presence as the cloud broker last delivered it.
#[derive(Default)]
struct PresenceTable {
    gateways: BTreeMap<String, GatewayPresence>,
    /// When the presence subscription was last granted.
    granted_at: Option<tokio::time::Instant>,
    /// When the last presence message arrived.
    last_at: Option<tokio::time::Instant>,
}

/// Per gateway (key: its id; "" when connected to the gateway itself) event channels are made
/// when a client of that gateway first asks for them: events nobody listens to are dropped.
type Channels<T> = Mutex<HashMap<String, broadcast::Sender<T>>>;

struct Inner {
    mqtt: AsyncClient,
    service_id: String,
    pending: Mutex<HashMap<String, Pending>>,
    events: Channels<CommandEvent>,
    trust_events: Channels<TrustEvent>,
    fleet_events: broadcast::Sender<FleetEvent>,
    request_timeout: Duration,
    scope: Scope,
    presence: Mutex<PresenceTable>,
    presence_changed: Notify,
    presence_quiet: Duration,
    presence_max_wait: Duration,
    /// Keys of the `commands` role.
    signers: Vec<Arc<dyn Signer>>,
}

impl Inner {
    /// The filter on the connected broker for a local filter of every gateway this
    /// connection reaches.
    fn filter(&self, local: &str) -> String {
        match &self.scope {
            Scope::Direct => local.to_owned(),
            Scope::Via(gw) => topics::to_upstream(gw, local),
            Scope::Fleet => format!("{}/+/{local}", topics::GATEWAYS),
        }
    }

    /// The gateway a topic on the connected broker belongs to ("" directly) and its local
    /// name; `None` for a topic of no gateway this connection reaches.
    fn split<'a>(&'a self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        match &self.scope {
            Scope::Direct => Some(("", topic)),
            Scope::Via(gw) => topics::from_upstream(gw, topic).map(|l| (gw.as_str(), l)),
            Scope::Fleet => {
                let rest = topic.strip_prefix(topics::GATEWAYS)?.strip_prefix('/')?;
                let (gw, local) = rest.split_once('/')?;
                fleet_proto::GatewayId::new(gw).ok()?;
                (!local.is_empty()).then_some((gw, local))
            }
        }
    }

    fn sender<T: Clone>(
        channels: &Channels<T>,
        gateway: &str,
        capacity: usize,
    ) -> broadcast::Sender<T> {
        lock(channels)
            .entry(gateway.to_owned())
            .or_insert_with(|| broadcast::channel(capacity).0)
            .clone()
    }

    fn on_presence(&self, gateway: &str, payload: &[u8]) {
        let mut table = lock(&self.presence);
        table.last_at = Some(tokio::time::Instant::now());
        if payload.is_empty() {
            // A retained presence cleared: the gateway is gone from the fleet.
            table.gateways.remove(gateway);
        } else {
            match GatewayPresence::decode(payload) {
                Ok(mut p) => {
                    if p.gateway_id != gateway {
                        debug!(gateway, claimed = %p.gateway_id, "presence names another gateway; its topic wins");
                        p.gateway_id = gateway.to_owned();
                    }
                    table.gateways.insert(gateway.to_owned(), p);
                }
                Err(e) => warn!(gateway, error = %e, "bad gateway presence"),
            }
        }
        drop(table);
        self.presence_changed.notify_waiters();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// First wait before subscriptions the cloud broker refused are asked for again.
const RESUBSCRIBE_MIN: Duration = Duration::from_secs(1);
/// Longest wait between two requests of subscriptions the broker keeps refusing.
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(30);

/// Drives the connection. A SUBACK that refuses any filter leaves the client not ready, and
/// the subscriptions are asked for again on the same connection after [`RESUBSCRIBE_MIN`],
/// doubling up to [`RESUBSCRIBE_MAX`]: a cluster refuses subscriptions while it elects
/// leaders (NATS: "Unable to add JetStream consumer"), and taking that as final left the
/// client deaf to every answer until its next connection.
async fn drive(
    inner: Arc<Inner>,
    mut eventloop: EventLoop,
    ready: watch::Sender<Ready>,
    mut backoff: Backoff,
) {
    let mut filters = vec![
        inner.filter(&topics::api_response_topic(&inner.service_id)),
        inner.filter(topics::ALL_COMMAND_EVENTS),
        inner.filter(&topics::trust_events_topic("+")),
    ];
    if inner.scope == Scope::Fleet {
        filters.push(topics::ALL_GATEWAY_PRESENCE.to_owned());
    }
    let mut sub_pkid = None;
    // Counts connections, so that a request again scheduled for one is dropped after it.
    let connection = Arc::new(AtomicU64::new(0));
    let mut resubscribe = RESUBSCRIBE_MIN;
    loop {
        if ready.is_closed() && Arc::strong_count(&inner) == 1 {
            // Every FleetClient is gone.
            break;
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                backoff.connected(tokio::time::Instant::now().into_std());
                connection.fetch_add(1, Ordering::Relaxed);
                resubscribe = RESUBSCRIBE_MIN;
                subscribe(&inner.mqtt, &filters);
                sub_pkid = None;
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Subscribe(pkid))) => sub_pkid = Some(pkid),
            Ok(Event::Incoming(Incoming::SubAck(ack))) if Some(ack.pkid) == sub_pkid => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    let _ = ready.send(Ready::Connecting(
                        "the broker refused the API subscriptions; asking again (check its ACL \
                         if this goes on)"
                            .into(),
                    ));
                    warn!(
                        again_in = ?resubscribe,
                        "the broker refused the API subscriptions; asking again"
                    );
                    let (mqtt, connections) = (inner.mqtt.clone(), connection.clone());
                    let this = connections.load(Ordering::Relaxed);
                    let (wait, filters) = (resubscribe, filters.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        if connections.load(Ordering::Relaxed) == this {
                            subscribe(&mqtt, &filters);
                        }
                    });
                    resubscribe = (resubscribe * 2).min(RESUBSCRIBE_MAX);
                } else {
                    // Retained presence follows the grant.
                    lock(&inner.presence).granted_at = Some(tokio::time::Instant::now());
                    let _ = ready.send(Ready::Subscribed);
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => on_publish(&inner, &p.topic, &p.payload),
            Ok(Event::Incoming(Incoming::Disconnect)) => {}
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "fleet client connection failed");
                if !matches!(&*ready.borrow(), Ready::Subscribed) {
                    let _ = ready.send(Ready::Connecting(e.to_string()));
                }
                if matches!(e, rumqttc::ConnectionError::RequestsDone) {
                    break;
                }
                let delay = backoff.failed(
                    tokio::time::Instant::now().into_std(),
                    rand_core::OsRng.next_u64(),
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Subscribes to `filters` at QoS 1 (again: a subscription replaces the one it repeats).
fn subscribe(mqtt: &AsyncClient, filters: &[String]) {
    let filters = filters
        .iter()
        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
        .collect::<Vec<_>>();
    if let Err(e) = mqtt.try_subscribe_many(filters) {
        warn!(error = %e, "could not subscribe");
    }
}

fn on_publish(inner: &Inner, topic: &str, payload: &[u8]) {
    if inner.scope == Scope::Fleet {
        if let Some(gw) = topics::parse_gateway_presence(topic) {
            if fleet_proto::GatewayId::new(gw).is_ok() {
                inner.on_presence(gw, payload);
            }
            return;
        }
    }
    let Some((gateway, topic)) = inner.split(topic) else {
        return;
    };
    let Ok(Topic::Fleet { path }) = topics::parse(topic) else {
        return;
    };
    if path.starts_with("events/trust/") {
        match TrustEvent::decode(payload) {
            Ok(ev) => {
                if let Some(tx) = lock(&inner.trust_events).get(gateway) {
                    let _ = tx.send(ev);
                }
            }
            Err(e) => warn!(gateway, error = %e, "bad trust event from the gateway"),
        }
        return;
    }
    match FleetTopic::parse(path) {
        Some(FleetTopic::ApiResponse { .. }) => match ApiResponse::decode(payload) {
            Ok(r) => {
                let mut pending = lock(&inner.pending);
                // Only the gateway the request went to answers it.
                if pending
                    .get(&r.request_id)
                    .is_some_and(|p| p.gateway == gateway)
                {
                    if let Some(p) = pending.remove(&r.request_id) {
                        let _ = p.tx.send(r);
                    }
                }
            }
            Err(e) => warn!(gateway, error = %e, "bad API response from the gateway"),
        },
        Some(FleetTopic::CommandEvents { .. }) => match CommandEvent::decode(payload) {
            Ok(ev) => {
                if let Some(tx) = lock(&inner.events).get(gateway) {
                    let _ = tx.send(ev.clone());
                }
                let _ = inner.fleet_events.send(FleetEvent {
                    gateway_id: gateway.to_owned(),
                    event: ev,
                });
            }
            Err(e) => warn!(gateway, error = %e, "bad command event from the gateway"),
        },
        _ => {}
    }
}

/// A connection to the fleet API of one gateway, or to every gateway bridged to a cloud
/// broker ([`FleetClientBuilder::fleet`]; [`gateway`](FleetClient::gateway) addresses one of
/// them over the same connection). Cheap to clone.
#[derive(Clone)]
pub struct FleetClient {
    inner: Arc<Inner>,
    /// The gateway this client addresses through a cloud broker.
    gateway: Option<fleet_proto::GatewayId>,
}

impl std::fmt::Debug for FleetClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetClient")
            .field("service_id", &self.inner.service_id)
            .field("gateway", &self.gateway)
            .finish()
    }
}

impl FleetClient {
    /// A builder.
    pub fn builder() -> FleetClientBuilder {
        FleetClientBuilder {
            host: None,
            port: 8883,
            pem: None,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            reconnect: BackoffConfig::exponential(
                Duration::from_millis(200),
                Duration::from_secs(5),
            ),
            scope: Scope::Direct,
            presence_quiet: Duration::from_millis(300),
            presence_max_wait: Duration::from_secs(5),
            signers: Vec::new(),
            key_files: Vec::new(),
        }
    }

    /// This client for gateway `gateway_id`, over the same connection. Only a fleet connection
    /// ([`FleetClientBuilder::fleet`]) reaches several gateways; elsewhere it is
    /// [`SdkError::Config`].
    pub fn gateway(&self, gateway_id: &str) -> Result<FleetClient, SdkError> {
        if self.inner.scope != Scope::Fleet {
            return Err(SdkError::Config(
                "only a fleet connection (FleetClientBuilder::fleet) addresses gateways by id"
                    .into(),
            ));
        }
        let id = fleet_proto::GatewayId::new(gateway_id)
            .map_err(|e| SdkError::Config(format!("gateway id {gateway_id:?}: {e}")))?;
        Ok(FleetClient {
            inner: self.inner.clone(),
            gateway: Some(id),
        })
    }

    /// The gateway this client addresses through a cloud broker, if it addresses one.
    pub fn gateway_id(&self) -> Option<&str> {
        self.gateway.as_ref().map(|g| g.as_str())
    }

    /// Whether this is a fleet connection ([`FleetClientBuilder::fleet`]).
    pub fn is_fleet(&self) -> bool {
        self.inner.scope == Scope::Fleet
    }

    /// Key of this client's gateway in the per-gateway tables.
    fn key(&self) -> &str {
        self.gateway_id().unwrap_or_default()
    }

    /// The topic on the connected broker of this client's gateway's `local` topic.
    fn topic(&self, local: &str) -> String {
        match &self.gateway {
            Some(gw) => topics::to_upstream(gw, local),
            None => local.to_owned(),
        }
    }

    /// The service id (from the certificate).
    pub fn service_id(&self) -> &str {
        &self.inner.service_id
    }

    /// Every command event from now on (state changes of every command on the gateway).
    pub fn events(&self) -> broadcast::Receiver<CommandEvent> {
        Inner::sender(&self.inner.events, self.key(), 4096).subscribe()
    }

    /// Every command event from now on, of every gateway this connection reaches, with the
    /// gateway it came from.
    pub fn fleet_events(&self) -> broadcast::Receiver<FleetEvent> {
        self.inner.fleet_events.subscribe()
    }

    /// Every trust event from now on: a device's TrustReport changed (the root it holds, a
    /// root it refused, an expired root that froze it).
    pub fn trust_events(&self) -> broadcast::Receiver<TrustEvent> {
        Inner::sender(&self.inner.trust_events, self.key(), 1024).subscribe()
    }

    /// Every gateway whose presence the cloud broker holds (retained `GatewayPresence` on
    /// `gateways/+/presence`; a gateway that went away without a clean shutdown is listed
    /// with `online == false`, from its will), by id. Only on a fleet connection.
    ///
    /// When the list is complete: the broker sends the retained presence messages right after
    /// it grants the subscription, so the first call waits until no presence message has
    /// arrived for a quiet period since the grant or since the last message, at most a bound
    /// after the grant ([`FleetClientBuilder::presence_settle`], defaults 300 ms and 5 s).
    /// Afterwards the list is kept up to date by live presence messages and returned at once.
    pub async fn gateways(&self) -> Result<Vec<GatewayPresence>, SdkError> {
        if self.inner.scope != Scope::Fleet {
            return Err(SdkError::Config(
                "listing gateways needs a fleet connection (FleetClientBuilder::fleet)".into(),
            ));
        }
        loop {
            let changed = self.inner.presence_changed.notified();
            let wake = {
                let table = lock(&self.inner.presence);
                let Some(granted) = table.granted_at else {
                    return Err(SdkError::Stopped);
                };
                let now = tokio::time::Instant::now();
                let quiet_since = table.last_at.map_or(granted, |l| l.max(granted));
                let settled = quiet_since + self.inner.presence_quiet;
                let cap = granted + self.inner.presence_max_wait;
                if now >= settled || now >= cap {
                    return Ok(table.gateways.values().cloned().collect());
                }
                settled.min(cap)
            };
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    pub(crate) async fn request(
        &self,
        body: api_request::Body,
    ) -> Result<api_response::Body, SdkError> {
        let mut b = [0u8; 8];
        rand_core::OsRng.fill_bytes(&mut b);
        let request_id = hex::encode(b);
        if self.inner.scope == Scope::Fleet && self.gateway.is_none() {
            return Err(SdkError::Config(
                "a fleet connection sends requests to one gateway: FleetClient::gateway(id)".into(),
            ));
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(
            request_id.clone(),
            Pending {
                gateway: self.key().to_owned(),
                tx,
            },
        );
        let req = ApiRequest {
            request_id: request_id.clone(),
            body: Some(body),
        };
        let sent = self
            .inner
            .mqtt
            .publish(
                self.topic(&topics::api_request_topic(&self.inner.service_id)),
                QoS::AtLeastOnce,
                false,
                req.encode_to_vec(),
            )
            .await;
        if sent.is_err() {
            lock(&self.inner.pending).remove(&request_id);
            return Err(SdkError::Stopped);
        }
        let t = self.inner.request_timeout;
        let answer = tokio::time::timeout(t, rx).await;
        lock(&self.inner.pending).remove(&request_id);
        match answer {
            Ok(Ok(ApiResponse {
                body: Some(api_response::Body::Error(e)),
                ..
            })) => Err(SdkError::Api {
                code: e.code(),
                message: e.message,
            }),
            Ok(Ok(ApiResponse { body: Some(b), .. })) => Ok(b),
            Ok(Ok(ApiResponse { body: None, .. })) => {
                Err(SdkError::Protocol("response without a body".into()))
            }
            Ok(Err(_)) => Err(SdkError::Stopped),
            Err(_) => Err(SdkError::Timeout(t)),
        }
    }

    /// Keys of the `commands` role this client signs with.
    pub(crate) fn signers(&self) -> &[Arc<dyn Signer>] {
        &self.inner.signers
    }

    /// Signs and submits a command; the handle follows it to its final state on every target.
    ///
    /// `req` names the targets (`device_ids`, `device_class`), `name`, `payload`, `ttl_ms`
    /// (0: [`DEFAULT_COMMAND_TTL`](crate::DEFAULT_COMMAND_TTL)) and optionally `command_id`
    /// (empty: the SDK picks one). The SDK builds one Command per device id (and one for the
    /// class), issued now by this service, expiring after the ttl, signs each with the
    /// configured `commands` key(s) and sends only the signed commands. Without a key it
    /// fails with [`SdkError::NoCommandKey`]. A request that is already signed (only
    /// `command_id` and `signed` set) is sent unchanged.
    pub async fn send_command(&self, req: SendCommand) -> Result<CommandHandle, SdkError> {
        self.send_command_not_before(req, 0).await
    }

    /// As [`send_command`](Self::send_command), with a not-before time (ms since 1970; 0:
    /// none): the gateway holds the command until then and a device refuses it earlier.
    pub async fn send_command_not_before(
        &self,
        req: SendCommand,
        not_before_ms: u64,
    ) -> Result<CommandHandle, SdkError> {
        let issue = Issue {
            signers: &self.inner.signers,
            issued_by: &self.inner.service_id,
            now_ms: fleet_proto::time::now_ms(),
            not_before_ms,
        };
        let signed = signed_request(&req, &issue)?;
        self.submit(signed).await
    }

    /// Submits a command in the unsigned form, for devices that hold no root of trust (devices
    /// with one refuse it, and a gateway refuses it unless configured to accept it).
    pub async fn send_unsigned_command(&self, req: SendCommand) -> Result<CommandHandle, SdkError> {
        self.submit(req).await
    }

    async fn submit(&self, req: SendCommand) -> Result<CommandHandle, SdkError> {
        // Listen before sending, so no event is missed.
        let events = self.events();
        match self.request(api_request::Body::SendCommand(req)).await? {
            api_response::Body::SendCommand(r) => Ok(CommandHandle {
                client: self.clone(),
                command_id: r.command_id,
                records: r.commands,
                events,
            }),
            other => Err(SdkError::Protocol(format!("{other:?}"))),
        }
    }

    /// A command's state on each target (or one device).
    pub async fn get_command(
        &self,
        command_id: &str,
        device_id: Option<&str>,
    ) -> Result<Vec<CommandRecord>, SdkError> {
        let req = GetCommand {
            command_id: command_id.to_owned(),
            device_id: device_id.unwrap_or_default().to_owned(),
        };
        match self.request(api_request::Body::GetCommand(req)).await? {
            api_response::Body::GetCommand(r) => Ok(r.commands),
            other => Err(SdkError::Protocol(format!("{other:?}"))),
        }
    }

    /// The last known status of these devices (all when empty), by id.
    pub async fn status(&self, device_ids: &[String]) -> Result<Vec<DeviceStatus>, SdkError> {
        let req = GetStatus {
            device_ids: device_ids.to_vec(),
        };
        match self.request(api_request::Body::GetStatus(req)).await? {
            api_response::Body::GetStatus(r) => Ok(r.devices),
            other => Err(SdkError::Protocol(format!("{other:?}"))),
        }
    }
}

/// A submitted command, to be followed to its result.
pub struct CommandHandle {
    client: FleetClient,
    command_id: String,
    records: Vec<CommandRecord>,
    events: broadcast::Receiver<CommandEvent>,
}

impl CommandHandle {
    /// The command id.
    pub fn command_id(&self) -> &str {
        &self.command_id
    }

    /// The records as last known (one per target).
    pub fn records(&self) -> &[CommandRecord] {
        &self.records
    }

    fn all_final(&self) -> bool {
        self.records.iter().all(|r| r.state().is_final())
    }

    fn update(&mut self, rec: CommandRecord) {
        if let Some(old) = self
            .records
            .iter_mut()
            .find(|r| r.device_id == rec.device_id)
        {
            // Never go back from a final state (events and queries may cross).
            if !old.state().is_final() || rec.state().is_final() {
                *old = rec;
            }
        }
    }

    /// Waits until every target has a final state (succeeded, failed, rejected, expired) or
    /// `timeout` passes, and returns the records. Events bring changes at once; the state is
    /// also re-read every few seconds, so a missed event (a reconnect) only delays the answer.
    pub async fn wait(mut self, timeout: Duration) -> Result<Vec<CommandRecord>, SdkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut poll = tokio::time::interval(Duration::from_secs(3));
        poll.tick().await;
        while !self.all_final() {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Err(SdkError::Timeout(timeout)),
                ev = self.events.recv() => match ev {
                    Ok(CommandEvent { command: Some(rec), foreign: false }) if rec.command_id == self.command_id => self.update(rec),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(SdkError::Stopped),
                },
                _ = poll.tick() => {
                    if let Ok(recs) = self.client.get_command(&self.command_id, None).await {
                        for r in recs {
                            self.update(r);
                        }
                    }
                }
            }
        }
        Ok(self.records)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::v1::TrustReport;

    /// A connection that never connects (its event loop is not polled).
    fn offline(scope: Scope) -> Inner {
        let (mqtt, _eventloop) = AsyncClient::new(MqttOptions::new("t", "localhost", 1), 8);
        Inner {
            mqtt,
            service_id: "svc-0001".into(),
            pending: Mutex::new(HashMap::new()),
            events: Mutex::new(HashMap::new()),
            trust_events: Mutex::new(HashMap::new()),
            fleet_events: broadcast::channel(8).0,
            request_timeout: Duration::from_secs(1),
            scope,
            presence: Mutex::new(PresenceTable::default()),
            presence_changed: Notify::new(),
            presence_quiet: Duration::from_millis(300),
            presence_max_wait: Duration::from_secs(5),
            signers: Vec::new(),
        }
    }

    fn client(inner: Inner, gateway: Option<&str>) -> FleetClient {
        FleetClient {
            inner: Arc::new(inner),
            gateway: gateway.map(|g| fleet_proto::GatewayId::new(g).unwrap()),
        }
    }

    #[tokio::test]
    async fn trust_events_reach_their_listeners_and_command_events_theirs() {
        let fleet = client(offline(Scope::Direct), None);
        let inner = &*fleet.inner;
        let mut trust = fleet.trust_events();
        let mut commands = fleet.events();
        let ev = TrustEvent {
            device_id: "dev-0001".into(),
            report: Some(TrustReport {
                root_version: 2,
                ..TrustReport::default()
            }),
        };
        on_publish(
            inner,
            &topics::trust_events_topic("dev-0001"),
            &ev.encode_to_vec(),
        );
        assert_eq!(trust.try_recv().unwrap(), ev);
        assert!(commands.try_recv().is_err());
        // Garbage is dropped (and logged), not delivered.
        on_publish(
            inner,
            &topics::trust_events_topic("dev-0001"),
            &[0xff, 0xff],
        );
        assert!(trust.try_recv().is_err());
        let cev = CommandEvent::default();
        on_publish(
            inner,
            &topics::command_events_topic("dev-0001"),
            &cev.encode_to_vec(),
        );
        assert_eq!(commands.try_recv().unwrap(), cev);
        assert!(trust.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_fleet_connection_tells_gateways_apart() {
        let fleet = client(offline(Scope::Fleet), None);
        let gw1 = fleet.gateway("gw-0001").unwrap();
        let gw2 = fleet.gateway("gw-0002").unwrap();
        let (mut ev1, mut ev2, mut all) = (gw1.events(), gw2.events(), fleet.fleet_events());
        let cev = CommandEvent {
            foreign: true,
            ..CommandEvent::default()
        };
        let up = |gw: &str, local: &str| format!("gateways/{gw}/{local}");
        on_publish(
            &fleet.inner,
            &up("gw-0002", &topics::command_events_topic("dev-0001")),
            &cev.encode_to_vec(),
        );
        assert_eq!(ev2.try_recv().unwrap(), cev);
        assert!(ev1.try_recv().is_err(), "gw-0001 did not send it");
        let got = all.try_recv().unwrap();
        assert_eq!(
            (got.gateway_id.as_str(), got.event),
            ("gw-0002", cev.clone())
        );
        // A response is taken only from the gateway its request went to.
        let (tx, mut rx) = oneshot::channel();
        lock(&fleet.inner.pending).insert(
            "r1".into(),
            Pending {
                gateway: "gw-0001".into(),
                tx,
            },
        );
        let resp = ApiResponse {
            request_id: "r1".into(),
            ..ApiResponse::default()
        };
        let resp_topic = topics::api_response_topic("svc-0001");
        on_publish(
            &fleet.inner,
            &up("gw-0002", &resp_topic),
            &resp.encode_to_vec(),
        );
        assert!(rx.try_recv().is_err());
        on_publish(
            &fleet.inner,
            &up("gw-0001", &resp_topic),
            &resp.encode_to_vec(),
        );
        assert_eq!(rx.try_recv().unwrap(), resp);
        // Topics of no gateway, and bad ids, are ignored.
        on_publish(
            &fleet.inner,
            &topics::command_events_topic("dev-0001"),
            &cev.encode_to_vec(),
        );
        on_publish(
            &fleet.inner,
            &up("$bad", &topics::command_events_topic("d")),
            &[],
        );
        assert!(all.try_recv().is_err());
        // Requests need a gateway.
        assert!(matches!(fleet.status(&[]).await, Err(SdkError::Config(_))));
        // Only a fleet connection picks gateways.
        assert!(client(offline(Scope::Direct), None)
            .gateway("gw-0001")
            .is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_gateway_list_is_complete_after_a_quiet_period() {
        let fleet = client(offline(Scope::Fleet), None);
        let presence = |gw: &str, online: bool| GatewayPresence {
            gateway_id: gw.into(),
            online,
            ..GatewayPresence::default()
        };
        lock(&fleet.inner.presence).granted_at = Some(tokio::time::Instant::now());
        let inner = fleet.inner.clone();
        let start = tokio::time::Instant::now();
        // Retained presence trickles in 200 ms apart (each within the quiet period).
        let feeder = tokio::spawn(async move {
            for (i, gw) in ["gw-0001", "gw-0002", "gw-0003"].into_iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let p = presence(gw, i != 1);
                on_publish(
                    &inner,
                    &topics::gateway_presence_topic(&gw.parse().unwrap()),
                    &p.encode_to_vec(),
                );
            }
        });
        let list = fleet.gateways().await.unwrap();
        feeder.await.unwrap();
        let ids: Vec<_> = list
            .iter()
            .map(|p| (p.gateway_id.as_str(), p.online))
            .collect();
        assert_eq!(
            ids,
            [("gw-0001", true), ("gw-0002", false), ("gw-0003", true)]
        );
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
        // Settled: later calls answer at once, live changes included (an empty retained
        // message removes a gateway).
        on_publish(&fleet.inner, "gateways/gw-0002/presence", &[]);
        tokio::time::advance(Duration::from_secs(1)).await;
        let t = tokio::time::Instant::now();
        let list = fleet.gateways().await.unwrap();
        assert_eq!(t.elapsed(), Duration::ZERO);
        assert_eq!(list.len(), 2);
        // A stream that never goes quiet is cut at the bound.
        let fleet = client(offline(Scope::Fleet), None);
        lock(&fleet.inner.presence).granted_at = Some(tokio::time::Instant::now());
        let inner = fleet.inner.clone();
        let start = tokio::time::Instant::now();
        let feeder = tokio::spawn(async move {
            for i in 0..100u32 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let gw = format!("gw-{i:04}");
                on_publish(
                    &inner,
                    &format!("gateways/{gw}/presence"),
                    &presence(&gw, true).encode_to_vec(),
                );
            }
        });
        let list = fleet.gateways().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!((45..=50).contains(&list.len()), "{}", list.len());
        feeder.abort();
        // Not on a single gateway's connection.
        assert!(client(offline(Scope::Direct), None)
            .gateways()
            .await
            .is_err());
    }
}
