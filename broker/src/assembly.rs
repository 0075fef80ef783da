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

use tokio::sync::{mpsc, Notify};
use tracing::{error, info};

use crate::acl::PolicyAuthorizer;
use crate::bridge::{self, Bridge, BridgeTls};
use crate::config::GatewayConfig;
use crate::edge::{self, Edge, EdgeHandle, EdgeParts, Sessions};
use crate::firmware::FirmwareDir;
use crate::metrics::Metrics;
use crate::ports::{DirectSink, StatusIntake};
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
        bridge_configured: config.bridge.upstream.is_some(),
    }
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

        if config.bridge.upstream.is_some() {
            let b = &config.bridge;
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
            )
            .await?;
            tokio::spawn(bridge.run());
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
    /// (publishing wills) and waits up to `grace` for them.
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
