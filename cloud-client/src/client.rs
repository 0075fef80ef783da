//! The SDK's connection: one rumqttc session driven by a task, requests matched to responses
//! by request id, events fanned out to every listener.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fleet_backoff::{Backoff, BackoffConfig};
use fleet_proto::signing::{Signer, UpdateSigner};
use fleet_proto::topics::{self, FleetTopic, Topic};
use fleet_proto::v1::{
    api_request, api_response, ApiRequest, ApiResponse, CommandEvent, CommandRecord, DeviceStatus,
    GetCommand, GetStatus, SendCommand, TrustEvent,
};
use fleet_proto::Message;
use rand_core::RngCore;
use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{broadcast, oneshot, watch};
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
    via: Option<fleet_proto::GatewayId>,
    signers: Vec<Arc<dyn Signer>>,
    key_files: Vec<PathBuf>,
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
        self.via = Some(id);
        Ok(self)
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
            events: broadcast::channel(4096).0,
            trust_events: broadcast::channel(1024).0,
            request_timeout: self.request_timeout,
            via: self.via,
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
            Ok(true) => Ok(FleetClient { inner }),
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

struct Inner {
    mqtt: AsyncClient,
    service_id: String,
    pending: Mutex<HashMap<String, oneshot::Sender<ApiResponse>>>,
    events: broadcast::Sender<CommandEvent>,
    trust_events: broadcast::Sender<TrustEvent>,
    request_timeout: Duration,
    /// Through a cloud broker: topics are under `gateways/{id}/`.
    via: Option<fleet_proto::GatewayId>,
    /// Keys of the `commands` role.
    signers: Vec<Arc<dyn Signer>>,
}

impl Inner {
    /// The topic on the broker the client is connected to.
    fn topic(&self, local: &str) -> String {
        match &self.via {
            Some(gw) => topics::to_upstream(gw, local),
            None => local.to_owned(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

async fn drive(
    inner: Arc<Inner>,
    mut eventloop: EventLoop,
    ready: watch::Sender<Ready>,
    mut backoff: Backoff,
) {
    let response_topic = inner.topic(&topics::api_response_topic(&inner.service_id));
    let events_topic = inner.topic(topics::ALL_COMMAND_EVENTS);
    let trust_topic = inner.topic(&topics::trust_events_topic("+"));
    let mut sub_pkid = None;
    loop {
        if ready.is_closed() && Arc::strong_count(&inner) == 1 {
            // Every FleetClient is gone.
            break;
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                backoff.connected(tokio::time::Instant::now().into_std());
                let filters = vec![
                    rumqttc::SubscribeFilter::new(response_topic.clone(), QoS::AtLeastOnce),
                    rumqttc::SubscribeFilter::new(events_topic.clone(), QoS::AtLeastOnce),
                    rumqttc::SubscribeFilter::new(trust_topic.clone(), QoS::AtLeastOnce),
                ];
                if let Err(e) = inner.mqtt.try_subscribe_many(filters) {
                    warn!(error = %e, "could not subscribe");
                }
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
                        "the gateway refused the API subscriptions (check its ACL)".into(),
                    ));
                } else {
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

fn on_publish(inner: &Inner, topic: &str, payload: &[u8]) {
    let topic = match &inner.via {
        Some(gw) => match topics::from_upstream(gw, topic) {
            Some(local) => local,
            None => return,
        },
        None => topic,
    };
    let Ok(Topic::Fleet { path }) = topics::parse(topic) else {
        return;
    };
    if path.starts_with("events/trust/") {
        match TrustEvent::decode(payload) {
            Ok(ev) => {
                let _ = inner.trust_events.send(ev);
            }
            Err(e) => warn!(error = %e, "bad trust event from the gateway"),
        }
        return;
    }
    match FleetTopic::parse(path) {
        Some(FleetTopic::ApiResponse { .. }) => match ApiResponse::decode(payload) {
            Ok(r) => {
                if let Some(tx) = lock(&inner.pending).remove(&r.request_id) {
                    let _ = tx.send(r);
                }
            }
            Err(e) => warn!(error = %e, "bad API response from the gateway"),
        },
        Some(FleetTopic::CommandEvents { .. }) => match CommandEvent::decode(payload) {
            Ok(ev) => {
                let _ = inner.events.send(ev);
            }
            Err(e) => warn!(error = %e, "bad command event from the gateway"),
        },
        _ => {}
    }
}

/// A connection to the fleet API of one gateway. Cheap to clone.
#[derive(Clone)]
pub struct FleetClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FleetClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetClient")
            .field("service_id", &self.inner.service_id)
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
            via: None,
            signers: Vec::new(),
            key_files: Vec::new(),
        }
    }

    /// The service id (from the certificate).
    pub fn service_id(&self) -> &str {
        &self.inner.service_id
    }

    /// Every command event from now on (state changes of every command on the gateway).
    pub fn events(&self) -> broadcast::Receiver<CommandEvent> {
        self.inner.events.subscribe()
    }

    /// Every trust event from now on: a device's TrustReport changed (the root it holds, a
    /// root it refused, an expired root that froze it).
    pub fn trust_events(&self) -> broadcast::Receiver<TrustEvent> {
        self.inner.trust_events.subscribe()
    }

    pub(crate) async fn request(
        &self,
        body: api_request::Body,
    ) -> Result<api_response::Body, SdkError> {
        let mut b = [0u8; 8];
        rand_core::OsRng.fill_bytes(&mut b);
        let request_id = hex::encode(b);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(request_id.clone(), tx);
        let req = ApiRequest {
            request_id: request_id.clone(),
            body: Some(body),
        };
        let sent = self
            .inner
            .mqtt
            .publish(
                self.inner
                    .topic(&topics::api_request_topic(&self.inner.service_id)),
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

    /// A client that never connects (its event loop is not polled).
    fn offline() -> Inner {
        let (mqtt, _eventloop) = AsyncClient::new(MqttOptions::new("t", "localhost", 1), 8);
        Inner {
            mqtt,
            service_id: "svc-0001".into(),
            pending: Mutex::new(HashMap::new()),
            events: broadcast::channel(8).0,
            trust_events: broadcast::channel(8).0,
            request_timeout: Duration::from_secs(1),
            via: None,
            signers: Vec::new(),
        }
    }

    #[tokio::test]
    async fn trust_events_reach_their_listeners_and_command_events_theirs() {
        let inner = offline();
        let mut trust = inner.trust_events.subscribe();
        let mut commands = inner.events.subscribe();
        let ev = TrustEvent {
            device_id: "dev-0001".into(),
            report: Some(TrustReport {
                root_version: 2,
                ..TrustReport::default()
            }),
        };
        on_publish(
            &inner,
            &topics::trust_events_topic("dev-0001"),
            &ev.encode_to_vec(),
        );
        assert_eq!(trust.try_recv().unwrap(), ev);
        assert!(commands.try_recv().is_err());
        // Garbage is dropped (and logged), not delivered.
        on_publish(
            &inner,
            &topics::trust_events_topic("dev-0001"),
            &[0xff, 0xff],
        );
        assert!(trust.try_recv().is_err());
        let cev = CommandEvent::default();
        on_publish(
            &inner,
            &topics::command_events_topic("dev-0001"),
            &cev.encode_to_vec(),
        );
        assert_eq!(commands.try_recv().unwrap(), cev);
        assert!(trust.try_recv().is_err());
    }
}
