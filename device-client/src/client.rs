//! The tokio/rumqttc driver around the [`Session`] state machine, and the application's API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), device_client::ClientError> {
//! use device_client::{DeviceClient, StatusReport};
//!
//! let (client, mut commands) = DeviceClient::builder()
//!     .gateway("localhost", 8883)
//!     .pem_files("ca.crt", "dev-0001.crt", "dev-0001.key")
//!     .state_dir("/var/lib/my-device/fleet")
//!     .device_class("pump")
//!     .firmware_version("1.0.0")
//!     .start()?;
//! client.report(StatusReport::default()).await?; // queued on disk, sent when connected
//! while let Some(cmd) = commands.next().await {
//!     let output = format!("ran {}", cmd.command().name);
//!     cmd.succeed(output.into_bytes()).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! One task drives the MQTT connection. The application's calls do not wait for the network:
//! [`DeviceClient::report`] returns once the report is on disk, a command's answer once it is
//! in the journal; the driver sends them when it can.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fleet_backoff::{Backoff, BackoffConfig};
use fleet_proto::command::VerifiedCommand;
use fleet_proto::topics::{self, DeviceTopic};
use fleet_proto::trust::{TrustError, TrustedRoot};
use fleet_proto::v1::{Command, CommandResult, CommandStatus, StatusReport, UpdateProgress};
use fleet_proto::DeviceId;
use rand_core::RngCore;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::commands::journal::{Journal, JournalError};
use crate::commands::{CommandGate, GateError, DEFAULT_WINDOW};
use crate::session::{Action, DeviceInfo, Publish, Session, Tag, DEFAULT_STATUS_WINDOW};
use crate::status::store::{OutboxError, OutboxStore};
use crate::status::{Pushed, DEFAULT_CAPACITY};
use crate::trust::{LogLimit, RootStore, TrustClock, TrustState};
use crate::update::agent::{AgentHandle, AgentOut};
use crate::update::download::DownloadSettings;
use crate::update::{SlotInstaller, UpdateConfig, UpdateHandler};

/// Why the client cannot start or a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A required builder setting is missing or invalid.
    #[error("device client configuration: {0}")]
    Config(String),
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] fleet_certs::ClientTlsError),
    /// The certificate is not a device's.
    #[error("the certificate is a {0} certificate, not a device's")]
    NotADevice(String),
    /// The command journal cannot be read or written.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The status outbox cannot be read or written.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The command was already answered (or was not given to the application).
    #[error(transparent)]
    Gate(#[from] GateError),
    /// The update agent's directory cannot be created, or its thread cannot start. (An
    /// unreadable update journal is not an error: the agent reports it and carries on.)
    #[error("update agent: {0}")]
    Update(std::io::Error),
    /// Another client (in this process or another) owns the state directory: it holds the
    /// lock on [`STATE_LOCK_FILE`] there until it is shut down (or its process ends). Two
    /// clients on one directory would run commands twice and corrupt updates.
    #[error(
        "state directory {} is in use by another device client (one client per state directory)",
        .0.display()
    )]
    StateDirInUse(PathBuf),
    /// The provisioned root of trust is not a root signed by a threshold of its own root
    /// keys.
    #[error("provisioned root of trust: {0}")]
    Root(#[from] TrustError),
    /// The client has shut down.
    #[error("the device client has stopped")]
    Stopped,
}

/// File in the state directory a running client holds an exclusive lock on.
pub const STATE_LOCK_FILE: &str = "owner.lock";

/// Takes the state directory's owner lock, or says who has it.
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, ClientError> {
    let path = dir.join(STATE_LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ClientError::Config(format!("state_dir {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ClientError::StateDirInUse(dir.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => Err(ClientError::Config(format!(
            "state_dir {}: cannot lock: {e}",
            path.display()
        ))),
    }
}

enum TlsSource {
    Pem {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    Rustls(Arc<rustls::ClientConfig>, String),
}

enum RootSource {
    Bytes(Vec<u8>),
    File(PathBuf),
}

/// Builds a [`DeviceClient`]. Required: [`gateway`](Self::gateway), TLS
/// ([`pem_files`](Self::pem_files) or [`rustls_config`](Self::rustls_config)) and
/// [`state_dir`](Self::state_dir).
#[must_use]
pub struct DeviceClientBuilder {
    host: Option<String>,
    port: u16,
    tls: Option<TlsSource>,
    state_dir: Option<PathBuf>,
    device_class: String,
    firmware_version: String,
    keep_alive: Duration,
    reconnect: BackoffConfig,
    outbox_capacity: usize,
    status_window: usize,
    command_window: usize,
    command_queue: usize,
    #[cfg(feature = "fault-injection")]
    hold_results: bool,
    root: Option<RootSource>,
    update_handler: Option<Arc<dyn UpdateHandler>>,
    download: DownloadSettings,
    factory_sequence: u64,
    defer_retry: Duration,
    update_storage_budget: u64,
}

impl Default for DeviceClientBuilder {
    fn default() -> Self {
        Self {
            host: None,
            port: 8883,
            tls: None,
            state_dir: None,
            device_class: String::new(),
            firmware_version: String::new(),
            keep_alive: Duration::from_secs(30),
            reconnect: BackoffConfig::default(),
            outbox_capacity: DEFAULT_CAPACITY,
            status_window: DEFAULT_STATUS_WINDOW,
            command_window: DEFAULT_WINDOW,
            command_queue: 64,
            #[cfg(feature = "fault-injection")]
            hold_results: false,
            root: None,
            update_handler: None,
            download: DownloadSettings::default(),
            factory_sequence: 0,
            defer_retry: Duration::from_secs(300),
            update_storage_budget: crate::update::DEFAULT_STORAGE_BUDGET,
        }
    }
}

impl DeviceClientBuilder {
    /// The gateway's host name (checked against its certificate) and port (default 8883).
    pub fn gateway(mut self, host: impl Into<String>, port: u16) -> Self {
        self.host = Some(host.into());
        self.port = port;
        self
    }

    /// TLS from PEM files: the fleet CA bundle, the device's certificate chain and its key.
    /// The device id is read from the certificate.
    pub fn pem_files(
        mut self,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls = Some(TlsSource::Pem {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        });
        self
    }

    /// TLS from a ready rustls configuration (for keys in a TPM or secure element, through a
    /// custom signer), with the device id its certificate carries.
    pub fn rustls_config(
        mut self,
        config: Arc<rustls::ClientConfig>,
        device_id: impl Into<String>,
    ) -> Self {
        self.tls = Some(TlsSource::Rustls(config, device_id.into()));
        self
    }

    /// Directory for the command journal and the status outbox (created if missing). Must
    /// survive restarts; one per device. A running client owns it (an exclusive lock on
    /// [`STATE_LOCK_FILE`], released by [`DeviceClient::shutdown`]): starting a second client on
    /// it fails with [`ClientError::StateDirInUse`].
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// The device's hardware class, sent in presence messages.
    pub fn device_class(mut self, class: impl Into<String>) -> Self {
        self.device_class = class.into();
        self
    }

    /// The running firmware version, sent in presence messages.
    pub fn firmware_version(mut self, version: impl Into<String>) -> Self {
        self.firmware_version = version.into();
        self
    }

    /// MQTT keep-alive. Default 30 s.
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// Reconnect delays: exponential from `base` up to `max`, full jitter; the rest of the
    /// policy as in [`BackoffConfig::default`]. Default 500 ms to 60 s.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.reconnect = BackoffConfig {
            initial: base,
            max,
            ..self.reconnect
        };
        self
    }

    /// The whole reconnect policy (see [`BackoffConfig`] for its defaults).
    pub fn reconnect(mut self, policy: BackoffConfig) -> Self {
        self.reconnect = policy;
        self
    }

    /// Most status reports kept while they cannot be sent. When full, the oldest is dropped
    /// (and counted in [`ClientStats::reports_dropped`]): the newest state matters most.
    /// Default 1000.
    pub fn outbox_capacity(mut self, capacity: usize) -> Self {
        self.outbox_capacity = capacity.max(1);
        self
    }

    /// Status reports in flight at once. Default 32.
    pub fn status_window(mut self, window: usize) -> Self {
        self.status_window = window.max(1);
        self
    }

    /// Command ids remembered to never run a command twice. Default 1024.
    pub fn command_window(mut self, window: usize) -> Self {
        self.command_window = window.max(1);
        self
    }

    /// Test switch: results are recorded but never sent, as if the device always died before
    /// its result left. Only with the `fault-injection` feature (the test suite's).
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn hold_results_for_tests(mut self, hold: bool) -> Self {
        self.hold_results = hold;
        self
    }

    /// The root of trust the device is provisioned with: an encoded `SignedRoot`, signed by
    /// a threshold of its own `root` keys (checked at [`start`](Self::start)). Its `commands`
    /// role signs the commands the device runs, its `updates` role the manifests it takes;
    /// newer roots arrive in band and the newest accepted is kept in the state directory
    /// ([`ROOT_FILE`](crate::ROOT_FILE)). Without a root the device runs but refuses every
    /// command and every update.
    pub fn trust_root(mut self, signed_root: impl Into<Vec<u8>>) -> Self {
        self.root = Some(RootSource::Bytes(signed_root.into()));
        self
    }

    /// [`trust_root`](Self::trust_root) read from a file (read at [`start`](Self::start)).
    pub fn trust_root_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.root = Some(RootSource::File(path.into()));
        self
    }

    /// The application's update hooks (accept/defer, install, self-test, commit, rollback).
    /// Default: [`SlotInstaller`], A/B slot files in `STATE_DIR/slots`.
    pub fn update_handler(mut self, handler: impl UpdateHandler) -> Self {
        self.update_handler = Some(Arc::new(handler));
        self
    }

    /// Download window, request timeout and rejection limit.
    pub fn download_settings(mut self, settings: DownloadSettings) -> Self {
        self.download = settings;
        self
    }

    /// Anti-rollback sequence of the firmware the device shipped with (default 0): manifests
    /// must be newer than this and than anything installed since.
    pub fn factory_sequence(mut self, sequence: u64) -> Self {
        self.factory_sequence = sequence;
        self
    }

    /// How long a deferred update waits before it is offered to the application again
    /// (default 5 minutes; also on every reconnection).
    pub fn defer_retry(mut self, after: Duration) -> Self {
        self.defer_retry = after;
        self
    }

    /// Most bytes the staged images of one update may take on this device (default 1 GiB).
    /// A larger update is refused when offered (REJECTED, STORAGE), before any download.
    pub fn update_storage_budget(mut self, bytes: u64) -> Self {
        self.update_storage_budget = bytes;
        self
    }

    /// Starts the client: checks the provisioned root, loads the journal, the outbox, the
    /// newest root accepted and the update state, and spawns the connection driver and the
    /// update agent.
    pub fn start(self) -> Result<(DeviceClient, Commands), ClientError> {
        let provisioned = match &self.root {
            None => None,
            Some(RootSource::Bytes(b)) => Some(TrustedRoot::provisioned(b)?),
            Some(RootSource::File(path)) => {
                let b = std::fs::read(path).map_err(|e| {
                    ClientError::Config(format!("trust root {}: {e}", path.display()))
                })?;
                Some(TrustedRoot::provisioned(&b)?)
            }
        };
        let host = self
            .host
            .ok_or_else(|| ClientError::Config("gateway(host, port) is required".into()))?;
        let state_dir = self
            .state_dir
            .ok_or_else(|| ClientError::Config("state_dir is required".into()))?;
        let (config, id) = match self.tls {
            None => {
                return Err(ClientError::Config(
                    "pem_files(..) or rustls_config(..) is required".into(),
                ))
            }
            Some(TlsSource::Pem { ca, cert, key }) => {
                let tls = fleet_certs::client_tls(&ca, &cert, &key)?;
                if tls.identity.role != fleet_certs::Role::Device {
                    return Err(ClientError::NotADevice(tls.identity.role.to_string()));
                }
                (tls.config, tls.identity.id)
            }
            Some(TlsSource::Rustls(config, id)) => (config, id),
        };
        let id = DeviceId::new(&id).map_err(|e| ClientError::Config(format!("device id: {e}")))?;
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| ClientError::Config(format!("state_dir {}: {e}", state_dir.display())))?;
        // Before anything in the directory is read: one owner at a time.
        let owner = lock_state_dir(&state_dir)?;
        let journal = Journal::new(&state_dir);
        let gate = journal.load(self.command_window)?;
        let outbox = OutboxStore::open(&state_dir, self.outbox_capacity)?;
        for bad in &outbox.unreadable {
            warn!(file = %bad.display(), "status outbox: unreadable report set aside");
        }
        let root_store = RootStore::new(&state_dir);
        let loaded = root_store.load(provisioned);
        if let Some(problem) = &loaded.problem {
            warn!(%problem, "the persisted root of trust is unusable; using the provisioned one");
        }
        match &loaded.root {
            Some(r) => info!(root_version = r.version, "root of trust"),
            None => warn!("no root of trust configured: every command and update is refused"),
        }

        let info = DeviceInfo {
            id: id.clone(),
            device_class: self.device_class,
            firmware_version: self.firmware_version,
            session_id: random_hex(),
        };
        let mut session = Session::new(info.clone(), self.status_window);
        #[cfg(feature = "fault-injection")]
        session.set_hold_results(self.hold_results);
        // Always on: without a root every manifest is refused, and said so upward.
        session.set_updates(true);
        session.set_root_version(loaded.root.as_ref().map_or(0, |r| r.version));

        let mut options = MqttOptions::new(id.as_str(), host, self.port);
        options
            .set_transport(Transport::Tls(TlsConfiguration::Rustls(config)))
            .set_clean_session(false)
            .set_keep_alive(self.keep_alive)
            .set_max_packet_size(4 << 20, 4 << 20)
            .set_inflight(100);
        let (mqtt, eventloop) = AsyncClient::new(options, 256);

        let (connected_tx, connected_rx) = watch::channel(false);
        let (commands_tx, commands_rx) = mpsc::channel(self.command_queue.max(1));
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let (agent_out_tx, agent_out_rx) = mpsc::unbounded_channel();
        let (reports_tx, reports_rx) = watch::channel(None);
        let agent = {
            let handler = self
                .update_handler
                .unwrap_or_else(|| Arc::new(SlotInstaller::new(&state_dir)));
            let cfg = UpdateConfig {
                root: loaded.root.clone(),
                handler,
                settings: self.download,
                factory_sequence: self.factory_sequence,
                defer_retry: self.defer_retry,
                storage_budget: self.update_storage_budget,
            };
            // The agent thread holds the directory's lock too (a second handle on the same
            // lock), so the directory is not free before the thread is done.
            let agent_owner = owner.try_clone().map_err(ClientError::Update)?;
            let agent = AgentHandle::spawn(
                cfg,
                info.device_class.clone(),
                info.firmware_version.clone(),
                &state_dir,
                agent_owner,
                agent_out_tx.clone(),
                reports_tx,
            )
            .map_err(ClientError::Update)?;
            Some(Arc::new(agent))
        };
        let shared = Arc::new(Shared {
            owner: Mutex::new(Some(owner)),
            gate: Mutex::new(gate),
            journal,
            outbox: Mutex::new(outbox),
            outbox_changed: Notify::new(),
            stop: Notify::new(),
            stopped: watch::channel(false).0,
            connected: connected_tx,
            reports_dropped: std::sync::atomic::AtomicU64::new(0),
            agent,
            trust: Mutex::new(TrustState {
                root: loaded.root,
                refused: None,
            }),
            root_store,
            clock: TrustClock::new(crate::update::build_time_ms()),
            commands_refused: AtomicU64::new(0),
            roots_refused: AtomicU64::new(0),
            root_file_rejected: loaded.problem.is_some(),
        });
        let driver = Driver {
            agent_out: agent_out_rx,
            _agent_out_tx: agent_out_tx,
            manifest_topic: topics::device_topic(&id, DeviceTopic::UpdateManifest),
            chunk_topic: topics::device_topic(&id, DeviceTopic::UpdateChunk),
            request_topic: topics::device_topic(&id, DeviceTopic::UpdateGet),
            shared: shared.clone(),
            session,
            mqtt,
            eventloop,
            backoff: Backoff::new(self.reconnect),
            commands: commands_tx,
            results: results_rx,
            results_tx: results_tx.clone(),
            refusal_log: LogLimit::new(Duration::from_secs(60), 10),
            reported_expired: None,
        };
        tokio::spawn(driver.run());
        Ok((
            DeviceClient {
                shared,
                id,
                connected: connected_rx,
                update_reports: reports_rx,
            },
            Commands { rx: commands_rx },
        ))
    }
}

fn random_hex() -> String {
    let mut b = [0u8; 8];
    rand_core::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Records a lost connection or failed attempt; returns how long to wait before the next.
fn reconnect_delay(backoff: &mut Backoff) -> Duration {
    backoff.failed(
        tokio::time::Instant::now().into_std(),
        rand_core::OsRng.next_u64(),
    )
}

struct Shared {
    /// The state directory's lock; `None` once `shutdown` released it, after which nothing
    /// here writes to the directory. Lock order: `owner`, then `gate` or `outbox`.
    owner: Mutex<Option<std::fs::File>>,
    gate: Mutex<CommandGate>,
    journal: Journal,
    outbox: Mutex<OutboxStore>,
    outbox_changed: Notify,
    stop: Notify,
    stopped: watch::Sender<bool>,
    connected: watch::Sender<bool>,
    reports_dropped: std::sync::atomic::AtomicU64,
    /// The update agent (always present once started).
    agent: Option<Arc<AgentHandle>>,
    /// The current root and the last refused one. Lock order: `owner`, then `trust`; never
    /// held with `gate` or `outbox`.
    trust: Mutex<TrustState>,
    root_store: RootStore,
    /// The floored clock of trust decisions (raised from the update agent's floor).
    clock: TrustClock,
    commands_refused: AtomicU64,
    roots_refused: AtomicU64,
    root_file_rejected: bool,
}

impl Shared {
    /// The clock trust decisions are made by: never below the build time or the newest issue
    /// time the update agent accepted.
    fn trust_now(&self) -> u64 {
        if let Some(a) = &self.agent {
            self.clock.raise(a.time_floor_ms());
        }
        self.clock.now()
    }

    fn root(&self) -> Option<TrustedRoot> {
        lock(&self.trust).root.clone()
    }
}

/// Runs `write` (which changes files in the state directory) while this client still owns it.
fn while_owner<T>(
    shared: &Shared,
    write: impl FnOnce() -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let owner = lock(&shared.owner);
    if owner.is_none() {
        return Err(ClientError::Stopped);
    }
    write()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Counters and state of a running client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    /// Whether the session is up now.
    pub connected: bool,
    /// Reports waiting in the outbox (queued or in flight).
    pub outbox_len: usize,
    /// Reports dropped because the outbox was full (oldest first), since start.
    pub reports_dropped: u64,
    /// Update chunks dropped unread since start: they came while the update agent expected
    /// none (no download, or a hook running) or its inbox was full. The download asks again
    /// for what it misses.
    pub update_chunks_dropped: u64,
    /// Command deliveries refused before they reached the command gate (unsigned, untrusted,
    /// for another device, expired, replayed, no root...), since start.
    pub commands_refused: u64,
    /// Roots refused (on `fleet/trust/roots`), since start.
    pub roots_refused: u64,
    /// Messages on the manifest topic that withdrew nothing: empty, not signed by the
    /// `commands` role of the current root, or naming another offer; since start.
    pub withdrawals_ignored: u64,
    /// The persisted root was unreadable or did not check at start (the provisioned one is
    /// used).
    pub root_file_rejected: bool,
    /// Version of the root the device holds (0: none).
    pub root_version: u64,
    /// The root has expired: every command and manifest is refused until a newer root comes.
    pub root_expired: bool,
}

/// The application's handle: report status, watch the connection, shut down. Cheap to clone.
#[derive(Clone)]
pub struct DeviceClient {
    shared: Arc<Shared>,
    id: DeviceId,
    connected: watch::Receiver<bool>,
    update_reports: watch::Receiver<Option<UpdateProgress>>,
}

impl std::fmt::Debug for DeviceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceClient")
            .field("id", &self.id)
            .finish()
    }
}

impl DeviceClient {
    /// A builder.
    pub fn builder() -> DeviceClientBuilder {
        DeviceClientBuilder::default()
    }

    /// The device id (from the certificate).
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// The update agent's latest report (what it last told, or will tell, the gateway): watch
    /// it to follow an update's phases. `None` until there is one.
    pub fn update_reports(&self) -> watch::Receiver<Option<UpdateProgress>> {
        self.update_reports.clone()
    }

    /// Queues a status report: it gets the next sequence number, is written to disk, and is
    /// sent in order when connected. Never waits for the network. Returns the sequence.
    pub async fn report(&self, report: StatusReport) -> Result<u64, ClientError> {
        let shared = self.shared.clone();
        let (stored, pushed) = tokio::task::spawn_blocking(move || {
            while_owner(&shared, || Ok(lock(&shared.outbox).push(report)?))
        })
        .await
        .map_err(|_| ClientError::Stopped)??;
        if let Pushed::QueuedDroppingOldest { dropped, .. } = pushed {
            self.shared
                .reports_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(
                dropped,
                "status outbox full: dropped the oldest report to keep the newest"
            );
        }
        self.shared.outbox_changed.notify_one();
        Ok(stored.sequence)
    }

    /// Current counters.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            connected: *self.connected.borrow(),
            outbox_len: lock(&self.shared.outbox).outbox().len(),
            reports_dropped: self
                .shared
                .reports_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            update_chunks_dropped: self.shared.agent.as_ref().map_or(0, |a| a.chunks_dropped()),
            commands_refused: self.shared.commands_refused.load(Ordering::Relaxed),
            roots_refused: self.shared.roots_refused.load(Ordering::Relaxed),
            withdrawals_ignored: self
                .shared
                .agent
                .as_ref()
                .map_or(0, |a| a.withdrawals_ignored()),
            root_file_rejected: self.shared.root_file_rejected,
            root_version: self.shared.root().map_or(0, |r| r.version),
            root_expired: {
                let now = self.shared.trust_now();
                lock(&self.shared.trust).expired(now)
            },
        }
    }

    /// Waits until the session is up (or the client stopped).
    pub async fn wait_connected(&self) -> Result<(), ClientError> {
        let mut rx = self.connected.clone();
        rx.wait_for(|c| *c)
            .await
            .map(|_| ())
            .map_err(|_| ClientError::Stopped)
    }

    /// Waits until every queued report has been acknowledged by the gateway.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let mut stopped = self.shared.stopped.subscribe();
        loop {
            if lock(&self.shared.outbox).outbox().is_empty() {
                return Ok(());
            }
            if *stopped.borrow() {
                return Err(ClientError::Stopped);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stopped.changed() => {}
            }
        }
    }

    /// Says goodbye (a graceful OFFLINE presence, if connected), disconnects and stops the
    /// driver. Queued reports stay on disk for the next start.
    ///
    /// Returns once the update agent is done with the step it was in (a file write, an
    /// install hook, a self-test). Then the state directory is released: a new client may
    /// start on it, and this one's calls (and answers to its commands) fail with
    /// [`ClientError::Stopped`].
    pub async fn shutdown(&self) {
        let mut stopped = self.shared.stopped.subscribe();
        self.shared.stop.notify_one();
        let stopped = tokio::time::timeout(Duration::from_secs(5), stopped.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok());
        if let Some(agent) = &self.shared.agent {
            agent.stop().await;
        }
        // Last, after everything that writes the state directory has stopped. A driver that
        // did not stop in time keeps it until it ends and every handle is dropped.
        if stopped {
            lock(&self.shared.owner).take();
        }
    }
}

/// The stream of commands for the application.
pub struct Commands {
    rx: mpsc::Receiver<IncomingCommand>,
}

impl Commands {
    /// The next command to run; `None` once the client has stopped.
    pub async fn next(&mut self) -> Option<IncomingCommand> {
        self.rx.recv().await
    }
}

/// A command to run, exactly once. Answer it with one of the methods. While it is held, a
/// re-delivery by the gateway (it re-delivers open commands at every reconnect) is neither run
/// again nor answered: the answer goes out when it is given. A command dropped unanswered is
/// reported FAILED ("interrupted") when the gateway delivers it again, and is never run again.
pub struct IncomingCommand {
    verified: VerifiedCommand,
    shared: Arc<Shared>,
    results: mpsc::UnboundedSender<CommandResult>,
}

impl Drop for IncomingCommand {
    fn drop(&mut self) {
        // No effect once answered (the gate then has its result).
        lock(&self.shared.gate).abandon(&self.verified.command.command_id);
    }
}

impl std::fmt::Debug for IncomingCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingCommand")
            .field("command_id", &self.verified.command.command_id)
            .field("name", &self.verified.command.name)
            .field("attempt", &self.verified.attempt)
            .finish()
    }
}

impl IncomingCommand {
    /// The command, as its signers signed it (verified against the device's root).
    pub fn command(&self) -> &Command {
        &self.verified.command
    }

    /// The gateway's delivery number (not signed: informational only).
    pub fn attempt(&self) -> u32 {
        self.verified.attempt
    }

    /// The service that submitted the command, as the gateway authenticated it (not signed:
    /// informational only; `issued_by` in the command is the signed claim).
    pub fn submitted_by(&self) -> &str {
        &self.verified.submitted_by
    }

    /// SHA-256 of the signed command bytes (carried in every result for this command).
    pub fn digest(&self) -> &[u8] {
        &self.verified.digest
    }

    /// Answers SUCCEEDED with `output`.
    pub async fn succeed(self, output: Vec<u8>) -> Result<(), ClientError> {
        self.respond(CommandStatus::Succeeded, output, String::new())
            .await
    }

    /// Answers FAILED with a message.
    pub async fn fail(self, message: impl Into<String>) -> Result<(), ClientError> {
        self.respond(CommandStatus::Failed, Vec::new(), message.into())
            .await
    }

    /// Answers REJECTED (not run: unknown name, bad arguments) with a message.
    pub async fn reject(self, message: impl Into<String>) -> Result<(), ClientError> {
        self.respond(CommandStatus::Rejected, Vec::new(), message.into())
            .await
    }

    /// Answers with a status, output and message. The result is in the journal when this
    /// returns; it is sent now if connected, else when the gateway delivers the command again.
    pub async fn respond(
        self,
        status: CommandStatus,
        output: Vec<u8>,
        message: String,
    ) -> Result<(), ClientError> {
        let result = CommandResult {
            command_digest: self.verified.digest.clone(),
            refusal: Default::default(),
            command_id: self.verified.command.command_id.clone(),
            status: status.into(),
            output,
            message,
            completed_at_ms: fleet_proto::time::now_ms(),
        };
        let shared = self.shared.clone();
        let r = result.clone();
        tokio::task::spawn_blocking(move || {
            while_owner(&shared, || {
                let mut gate = lock(&shared.gate);
                gate.complete(&r)?;
                shared.journal.save(&gate)?;
                Ok(())
            })
        })
        .await
        .map_err(|_| ClientError::Stopped)??;
        // The driver may have stopped; the result is recorded either way.
        let _ = self.results.send(result);
        Ok(())
    }
}

struct Driver {
    agent_out: mpsc::UnboundedReceiver<AgentOut>,
    /// Keeps `agent_out` open when there is no agent.
    _agent_out_tx: mpsc::UnboundedSender<AgentOut>,
    manifest_topic: String,
    chunk_topic: String,
    request_topic: String,
    shared: Arc<Shared>,
    session: Session,
    mqtt: AsyncClient,
    eventloop: EventLoop,
    backoff: Backoff,
    commands: mpsc::Sender<IncomingCommand>,
    results: mpsc::UnboundedReceiver<CommandResult>,
    results_tx: mpsc::UnboundedSender<CommandResult>,
    /// Budget for the log lines of refused commands and roots.
    refusal_log: LogLimit,
    /// Whether the last trust report said the root had expired (`None`: none sent yet).
    reported_expired: Option<bool>,
}

impl Driver {
    async fn run(mut self) {
        let shared = self.shared.clone();
        // A root may expire while the device runs: the trust report says so when it does.
        let mut expiry_check = tokio::time::interval(Duration::from_secs(5));
        expiry_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !self.session.is_connected() {
                // Connecting is not cancel-safe: only a stop request interrupts it.
                let will = self.session.will(fleet_proto::time::now_ms());
                self.eventloop.mqtt_options.set_last_will(LastWill::new(
                    will.topic,
                    will.payload,
                    QoS::AtLeastOnce,
                    will.retain,
                ));
                let polled = tokio::select! {
                    _ = shared.stop.notified() => break,
                    ev = self.eventloop.poll() => ev,
                };
                if !self.on_poll(polled).await {
                    let delay = reconnect_delay(&mut self.backoff);
                    debug!(?delay, "reconnecting after");
                    tokio::select! {
                        _ = shared.stop.notified() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                continue;
            }
            tokio::select! {
                _ = shared.stop.notified() => {
                    self.goodbye().await;
                    break;
                }
                ev = self.eventloop.poll() => {
                    if !self.on_poll(ev).await {
                        let delay = reconnect_delay(&mut self.backoff);
                        tokio::select! {
                            _ = shared.stop.notified() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
                _ = shared.outbox_changed.notified() => {
                    let actions = {
                        let outbox = lock(&shared.outbox);
                        self.session.status_actions(outbox.outbox())
                    };
                    self.apply(actions).await;
                }
                _ = expiry_check.tick() => {
                    let now = shared.trust_now();
                    let expired = lock(&shared.trust).expired(now);
                    if self.reported_expired.is_some_and(|e| e != expired) {
                        self.publish_trust().await;
                    }
                }
                Some(result) = self.results.recv() => {
                    // Already recorded in the journal by `respond`.
                    let actions = self.session.send_result(result);
                    self.apply(actions).await;
                }
                Some(out) = self.agent_out.recv() => match out {
                    AgentOut::Request(bytes) => {
                        if let Err(e) = self.mqtt.try_publish(
                            self.request_topic.clone(),
                            QoS::AtMostOnce,
                            false,
                            bytes,
                        ) {
                            debug!(error = %e, "could not queue a chunk request");
                        }
                    }
                    AgentOut::Progress(p) => {
                        let actions = self.session.progress(&p);
                        self.apply(actions).await;
                    }
                },
            }
        }
        let _ = self.shared.connected.send(false);
        let _ = self.shared.stopped.send(true);
        info!(device = %self.session.info().id, "device client stopped");
    }

    async fn goodbye(&mut self) {
        let Some(action) = self.session.goodbye(fleet_proto::time::now_ms()) else {
            return;
        };
        self.apply(vec![action]).await;
        // Give the goodbye a moment to leave, then disconnect.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
            if matches!(ev, Event::Incoming(Incoming::PubAck(_))) {
                break;
            }
        }
        let _ = self.mqtt.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), self.eventloop.poll()).await;
    }

    /// Handles one event; false when the connection failed.
    async fn on_poll(&mut self, ev: Result<Event, ConnectionError>) -> bool {
        match ev {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                // Everything unacknowledged is re-sent from the outbox and the journal, in
                // order; rumqttc's own copies would only duplicate it.
                self.eventloop.pending.clear();
                self.backoff
                    .connected(tokio::time::Instant::now().into_std());
                info!(
                    session_present = ack.session_present,
                    "connected to the gateway"
                );
                let _ = self.shared.connected.send(true);
                if let Some(agent) = &self.shared.agent {
                    agent.connected(true);
                }
                let actions = {
                    let outbox = lock(&self.shared.outbox);
                    self.session
                        .on_connected(outbox.outbox(), fleet_proto::time::now_ms())
                };
                self.apply(actions).await;
                self.publish_trust().await;
            }
            Ok(Event::Incoming(Incoming::Publish(p))) if p.topic == topics::TRUST_ROOTS => {
                self.on_roots(&p.payload).await;
            }
            Ok(Event::Incoming(Incoming::Publish(p)))
                if self.shared.agent.is_some()
                    && (p.topic == self.manifest_topic || p.topic == self.chunk_topic) =>
            {
                if let Some(agent) = &self.shared.agent {
                    if p.topic == self.chunk_topic {
                        agent.chunk(p.payload.to_vec());
                    } else {
                        agent.manifest(p.payload.to_vec());
                    }
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                let topic = p.topic.clone();
                let now = self.shared.trust_now();
                let root = self.shared.root();
                let actions = {
                    let mut gate = lock(&self.shared.gate);
                    self.session
                        .on_message(&topic, &p.payload, &mut gate, root.as_ref(), now)
                };
                self.apply(actions).await;
            }
            Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                if let Some(Tag::Status(seq)) = self.session.on_acked(ack.pkid) {
                    let shared = self.shared.clone();
                    let acked =
                        tokio::task::spawn_blocking(move || lock(&shared.outbox).acknowledge(seq))
                            .await;
                    match acked {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            warn!(error = %e, "status outbox: could not remove an acknowledged report")
                        }
                        Err(e) => warn!(error = %e, "status outbox task failed"),
                    }
                    let actions = {
                        let outbox = lock(&self.shared.outbox);
                        self.session.status_actions(outbox.outbox())
                    };
                    self.apply(actions).await;
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    warn!("the gateway refused the command subscription (check its ACL)");
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.session.on_sent(pkid),
            Ok(_) => {}
            Err(e) => {
                if self.session.is_connected() {
                    warn!(error = %e, "connection to the gateway lost");
                } else {
                    debug!(error = %e, "cannot reach the gateway");
                }
                self.session.on_disconnected();
                let _ = self.shared.connected.send(false);
                if let Some(agent) = &self.shared.agent {
                    agent.connected(false);
                }
                return false;
            }
        }
        true
    }

    /// Publishes the trust report (what root the device holds, whether it expired, what it
    /// last refused).
    async fn publish_trust(&mut self) {
        let now = self.shared.trust_now();
        let report = lock(&self.shared.trust).report(now);
        self.reported_expired = Some(report.root_expired);
        let actions = self.session.trust(&report);
        self.apply(actions).await;
    }

    /// A root chain arrived on `fleet/trust/roots`: walked from the current root; the newest
    /// root accepted is persisted, then used (commands, the update agent, reports).
    async fn on_roots(&mut self, chain: &[u8]) {
        let now = self.shared.trust_now();
        let shared = self.shared.clone();
        let chain = chain.to_vec();
        // The walk and the write of an accepted root (two fsyncs) off the executor; the root
        // becomes current only once it is on disk.
        let taken = tokio::task::spawn_blocking(move || {
            while_owner(&shared, || {
                let mut trust = lock(&shared.trust);
                Ok(trust.take_chain(&chain, now, |r| {
                    shared.root_store.save(r).map_err(|e| e.to_string())
                }))
            })
        })
        .await;
        let taken = match taken {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                debug!(error = %e, "root chain not taken");
                return;
            }
            Err(e) => {
                warn!(error = %e, "root chain task failed");
                return;
            }
        };
        let log = self.refusal_log.allow(std::time::Instant::now());
        if taken.no_root {
            self.shared.roots_refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = log {
                warn!(
                    suppressed,
                    "a root chain arrived, but the device has no root to check it against"
                );
            }
            return;
        }
        if let Some(e) = &taken.persist_error {
            warn!(error = %e, "could not persist the new root; not using it");
        }
        if let Some(next) = &taken.accepted {
            info!(root_version = next.version, "accepted a new root of trust");
            self.session.set_root_version(next.version);
            if let Some(agent) = &self.shared.agent {
                agent.root(next.clone());
            }
        }
        if let Some((version, e)) = &taken.refused {
            self.shared.roots_refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = log {
                warn!(version, error = %e, suppressed, "root refused");
            }
        }
        if taken.changed {
            self.publish_trust().await;
        }
    }

    async fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Subscribe(filters) => {
                    for f in filters {
                        if let Err(e) = self.mqtt.try_subscribe(f, QoS::AtLeastOnce) {
                            warn!(error = %e, "could not queue a subscription");
                        }
                    }
                }
                Action::SubscribeAtMostOnce(filters) => {
                    for f in filters {
                        if let Err(e) = self.mqtt.try_subscribe(f, QoS::AtMostOnce) {
                            warn!(error = %e, "could not queue a subscription");
                        }
                    }
                }
                Action::Publish(Publish {
                    topic,
                    payload,
                    retain,
                    ..
                }) => {
                    if let Err(e) = self
                        .mqtt
                        .try_publish(topic, QoS::AtLeastOnce, retain, payload)
                    {
                        // Only when rumqttc's queue is full; the reconnect path re-sends.
                        warn!(error = %e, "could not queue a publish");
                    }
                }
                Action::SaveGate => {
                    let shared = self.shared.clone();
                    let saved = tokio::task::spawn_blocking(move || {
                        let gate = lock(&shared.gate);
                        shared.journal.save(&gate)
                    })
                    .await;
                    if !matches!(saved, Ok(Ok(()))) {
                        // Running a command whose start is not on disk could run it twice
                        // after a crash: stop here, the gateway will deliver it again.
                        warn!("command journal could not be saved; not running the command");
                        return;
                    }
                }
                Action::Run(verified) => {
                    info!(
                        command_id = %verified.command.command_id,
                        name = %verified.command.name,
                        attempt = verified.attempt,
                        "running command"
                    );
                    let incoming = IncomingCommand {
                        verified,
                        shared: self.shared.clone(),
                        results: self.results_tx.clone(),
                    };
                    if self.commands.send(incoming).await.is_err() {
                        warn!("the application dropped its command stream; command not run");
                    }
                }
                Action::Refused(r) => {
                    self.shared.commands_refused.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = self.refusal_log.allow(std::time::Instant::now()) {
                        warn!(
                            command_id = %r.command_id,
                            refusal = ?r.refusal,
                            detail = %r.detail,
                            suppressed,
                            "command refused"
                        );
                    }
                }
                Action::Malformed { topic, reason } => {
                    warn!(topic, reason, "message dropped");
                }
            }
        }
    }
}
