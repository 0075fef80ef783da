//! The assembly: builds every part of the gateway and wires them together. It is the only
//! module that knows all the others; each part gets what it needs from here (the store handle,
//! the router, the ends of the [`crate::ports`] channels, the [`crate::ports::DirectSink`]) and
//! imports nothing of its peers.
//!
//! Order: TLS material and policy are loaded first (a bad file stops the gateway before any
//! port is bound), then the router, the edge's listener, the store and firmware cache, the
//! metrics endpoint, the bridge and the services.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use std::sync::OnceLock;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{error, info};

use crate::acl::PolicyAuthorizer;
use crate::bridge::{self, Bridge, BridgeTls, DeviceCounts};
use crate::config::GatewayConfig;
use crate::edge::{self, Edge, EdgeHandle, EdgeParts, Sessions};
use crate::firmware::FirmwareDir;
use crate::metrics::Metrics;
use crate::ports::{DirectSink, SessionEvent, StatusIntake};
use crate::router::{Router, ServiceLink};
use crate::services::{self, ServiceDeps};
use crate::store::{SessionWriter, SharedStore, Store, StoreError};
use crate::tls::TlsFiles;

/// Why the gateway cannot start or reload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The edge cannot start or reload (TLS material, ACL policy, its listener).
    #[error(transparent)]
    Edge(#[from] edge::EdgeError),
    /// Opening a directory or joining a start-up task failed.
    #[error("{0}")]
    Io(String),
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A service could not start.
    #[error(transparent)]
    Service(#[from] crate::router::LinkError),
    /// The bridge could not start.
    #[error(transparent)]
    Bridge(#[from] crate::bridge::BridgeError),
    /// The configured root of trust cannot be read or is not a valid root.
    #[error("trust.root {path}: {reason}")]
    Trust {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Binding the metrics endpoint failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// Reads the configured first root of trust and checks it is one (well formed, signed by a
/// threshold of its own root keys), before any port is bound.
fn load_first_root(config: &GatewayConfig) -> Result<Option<Vec<u8>>, GatewayError> {
    let Some(path) = &config.trust.root else {
        return Ok(None);
    };
    let fail = |reason: String| GatewayError::Trust {
        path: path.clone(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let root =
        fleet_proto::trust::TrustedRoot::provisioned(&bytes).map_err(|e| fail(e.to_string()))?;
    info!(path = %path.display(), version = root.version, "configured root of trust read");
    Ok(Some(bytes))
}

/// What `/health` checks: the accept loop, a probe write into the store, the bridge if one is
/// configured.
fn health_sources(
    config: &GatewayConfig,
    store: &SharedStore,
    listening: Arc<AtomicBool>,
) -> crate::http::HealthSources {
    let store = store.clone();
    crate::http::HealthSources {
        listening,
        store_probe: Arc::new(move || {
            let store = store.clone();
            Box::pin(async move {
                let now = fleet_proto::time::now_ms();
                store
                    .call("health probe", move |s| s.probe_write(now))
                    .await
                    .map_err(|e| e.to_string())
            })
        }),
        bridge_configured: config.bridge.enabled(),
    }
}

/// How long a clean shutdown waits for the bridge to say the gateway is going offline.
const BRIDGE_STOP: Duration = Duration::from_secs(5);

/// The device counts the bridge announces upstream: devices online from the edge's session
/// events (passed on to the services unchanged and in order), devices known from the store
/// (counted once a second, starting from `known`).
fn count_devices(
    mut from_edge: mpsc::UnboundedReceiver<SessionEvent>,
    store: SharedStore,
    known: u32,
) -> (
    mpsc::UnboundedReceiver<SessionEvent>,
    watch::Receiver<DeviceCounts>,
) {
    let (to_services, events) = mpsc::unbounded_channel();
    let (counts, counts_rx) = watch::channel(DeviceCounts { known, online: 0 });
    tokio::spawn(async move {
        let mut online = services::commands::Online::default();
        let mut live = 0u32;
        let mut recount = tokio::time::interval(Duration::from_secs(1));
        recount.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = from_edge.recv() => {
                    let Some(ev) = ev else { break };
                    match &ev {
                        SessionEvent::Connected { id, .. } => {
                            live += u32::from(!online.contains(id));
                            online.connected(id);
                        }
                        SessionEvent::Disconnected { id } => {
                            let was = online.contains(id);
                            online.disconnected(id);
                            live -= u32::from(was && !online.contains(id));
                        }
                        SessionEvent::Subscribed { .. } => {}
                    }
                    counts.send_if_modified(|c| std::mem::replace(&mut c.online, live) != live);
                    if to_services.send(ev).is_err() {
                        break;
                    }
                }
                _ = recount.tick() => {
                    if let Ok(n) = store.call("count devices", |s| s.device_count()).await {
                        let known = u32::try_from(n).unwrap_or(u32::MAX);
                        counts.send_if_modified(|c| std::mem::replace(&mut c.known, known) != known);
                    }
                }
            }
        }
    });
    (events, counts_rx)
}

/// The MQTT core and the writer of its persistent state: the writer reports durable writes to
/// the core, and a failed write stops the gateway (the returned `Notify` is notified then).
fn start_core(
    config: &GatewayConfig,
    security: &edge::Security,
    store: &Store,
    metrics: Arc<Metrics>,
) -> Result<(Router, Arc<Notify>), GatewayError> {
    let core: Arc<OnceLock<Router>> = Arc::new(OnceLock::new());
    let failed = Arc::new(Notify::new());
    let durable_to = core.clone();
    let fail = failed.clone();
    let fail_metrics = metrics.clone();
    // The writer's thread lives as long as the process (every router clone holds a sender).
    let (ops, _writer) = SessionWriter::spawn(
        store.path(),
        move |seq| {
            if let Some(router) = durable_to.get() {
                router.durable(seq);
            }
        },
        move |_| {
            Metrics::inc(&fail_metrics.store_errors);
            fail.notify_one();
        },
    )?;
    let router = Router::new(
        config.mqtt.engine(config.acl.on_denied_publish),
        Arc::new(PolicyAuthorizer(security.policy.clone())),
        ops,
        metrics,
    );
    // Set before any write can be made: the engine writes nothing until it is driven.
    let _ = core.set(router.clone());
    Ok((router, failed))
}

/// A gateway bound to its ports, ready to serve.
pub struct Gateway {
    edge: Edge,
    metrics: Arc<Metrics>,
    metrics_addr: Option<SocketAddr>,
    /// Notified when the MQTT core's store writes fail: the gateway stops (it may not
    /// acknowledge what it cannot keep).
    store_failed: Arc<Notify>,
    /// The bridge's stop signal and task, when one is configured.
    bridge: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

/// A handle to a running gateway: reload and metrics, usable from signal handlers and tests.
#[derive(Clone)]
pub struct GatewayHandle {
    edge: EdgeHandle,
    metrics: Arc<Metrics>,
}

impl Gateway {
    /// Loads TLS material and policy, starts the router, binds the listener, opens the store
    /// and starts the metrics endpoint, the bridge and the services. Connections are accepted
    /// from [`Gateway::serve`] on.
    pub async fn bind(config: GatewayConfig, tls_files: TlsFiles) -> Result<Gateway, GatewayError> {
        let security = edge::load_security(&config, &tls_files)?;
        let first_root = load_first_root(&config)?;
        let metrics = Arc::new(Metrics::default());

        // The store first: the MQTT core is rebuilt from its persistent sessions and retained
        // messages before any client can connect.
        let data_dir = config.data_dir.clone();
        let (store, (stored_sessions, retained)) = tokio::task::spawn_blocking(move || {
            let store = Store::open_in(&data_dir)?;
            let saved = store.load_sessions()?;
            Ok::<_, StoreError>((store, saved))
        })
        .await
        .map_err(|e| GatewayError::Io(e.to_string()))??;
        info!(
            path = %store.path().display(),
            sessions = stored_sessions.len(),
            retained = retained.len(),
            "store open"
        );
        let (router, store_failed) = start_core(&config, &security, &store, metrics.clone())?;
        router.restore(stored_sessions, retained);
        router.spawn_clock();
        let sessions = Arc::new(Sessions::default());
        let (session_events, session_events_rx) = mpsc::unbounded_channel();
        let (status, status_offers) = StatusIntake::channel(services::status::QUEUE);
        let edge_parts = EdgeParts {
            config: config.clone(),
            tls_files: tls_files.clone(),
            router: router.clone(),
            sessions: sessions.clone(),
            metrics: metrics.clone(),
            session_events,
            status,
        };
        let edge = Edge::bind(edge_parts, security).await?;

        let firmware =
            FirmwareDir::open(&config.data_dir).map_err(|e| GatewayError::Io(e.to_string()))?;
        let store = SharedStore::new(store, metrics.clone());

        let mut metrics_addr = None;
        if let Some(addr) = config.metrics.listen {
            let live = sessions.clone();
            let sources = crate::http::Sources {
                metrics: metrics.clone(),
                connections: Arc::new(move || live.len()),
                health: health_sources(&config, &store, edge.listening()),
            };
            let bound = crate::http::start(addr, sources)
                .await
                .map_err(|source| GatewayError::Bind { addr, source })?;
            metrics_addr = Some(bound);
        }

        let mut session_events_rx = session_events_rx;
        let mut bridge_task = None;
        if config.bridge.enabled() {
            let b = &config.bridge;
            let known = store
                .call("count devices", |s| s.device_count())
                .await
                .unwrap_or(0);
            let (events, devices) = count_devices(
                session_events_rx,
                store.clone(),
                u32::try_from(known).unwrap_or(u32::MAX),
            );
            session_events_rx = events;
            let bridge_tls = BridgeTls {
                ca: b.ca.clone().unwrap_or_else(|| tls_files.ca.clone()),
                cert: b.cert.clone().unwrap_or_else(|| tls_files.cert.clone()),
                key: b.key.clone().unwrap_or_else(|| tls_files.key.clone()),
            };
            let bridge = Bridge::start(
                &router,
                store.clone(),
                b.clone(),
                &bridge_tls,
                metrics.clone(),
                devices,
            )
            .await?;
            let (stop, stopped) = oneshot::channel();
            bridge_task = Some((stop, tokio::spawn(bridge.run(stopped))));
        } else {
            // A bridge configured before left its durable link's session in the store, where it
            // would go on collecting upward messages until it expired: a clean link of the same
            // name discards it.
            drop(
                ServiceLink::open(&router, bridge::LINK, &[])
                    .await
                    .map_err(bridge::BridgeError::from)?,
            );
        }

        let direct: Arc<dyn DirectSink> = sessions;
        services::start(ServiceDeps {
            router,
            store,
            commands: config.commands.clone(),
            updates: config.updates.clone(),
            firmware,
            direct,
            status_uplink: bridge::carries_status(&config.bridge),
            metrics: metrics.clone(),
            session_events: session_events_rx,
            status_offers,
            first_root,
        })
        .await?;
        Ok(Gateway {
            edge,
            metrics,
            metrics_addr,
            store_failed,
            bridge: bridge_task,
        })
    }

    /// The bound address of the device listener (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.edge.local_addr()
    }

    /// The bound address of the metrics endpoint, when one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// A handle for reload and metrics.
    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            edge: self.edge.handle(),
            metrics: self.metrics.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then stops accepting, asks every connection to close
    /// (publishing wills) and waits up to `grace` for them; then the bridge announces the
    /// gateway offline upstream (waiting a few seconds at most).
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>, grace: Duration) {
        let store_failed = self.store_failed.clone();
        let stop = async move {
            tokio::select! {
                () = shutdown => {}
                () = store_failed.notified() => {
                    error!("stopping: the store cannot keep the MQTT core's writes");
                }
            }
        };
        self.edge.serve(stop, grace).await;
        if let Some((stop, task)) = self.bridge {
            let _ = stop.send(());
            let _ = tokio::time::timeout(BRIDGE_STOP, task).await;
        }
    }
}

impl GatewayHandle {
    /// Reloads the CA bundle, CRL and policy from their files. Keeps the old ones if a file is
    /// unusable (and says so). Closes live connections whose certificate no longer verifies.
    /// Returns how many connections were closed.
    pub fn reload(&self) -> Result<usize, GatewayError> {
        Ok(self.edge.reload()?)
    }

    /// The gateway's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Number of live MQTT sessions.
    pub fn sessions(&self) -> usize {
        self.edge.sessions()
    }
}
