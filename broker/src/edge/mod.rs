//! The TLS edge: the listener, shared state, reload and shutdown.
//!
//! Each accepted connection runs in its own task (module `connection`); a semaphore permit taken
//! *before* `accept` bounds the number of connections, so a full gateway stops accepting
//! (back-pressure in the kernel's backlog) instead of failing.

mod codec;
mod connection;
pub mod sessions;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleet_certs::{Identity, IdentityPolicy, TrustStore};
use rumqttd::local::LinkTx;
use rumqttd::protocol::LastWill;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use tracing::{error, info, warn};

use crate::acl::{Decision, Policy};
use crate::config::GatewayConfig;
use crate::firmware::FirmwareDir;
use crate::metrics::Metrics;
use crate::router::{RouterHandle, INTERNAL_PREFIX};
use crate::services::{self, SessionEvent, SharedStore};
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsFiles};
use sessions::{CloseReason, Sessions};

pub use codec::{decode, DecodeError};

/// Why the gateway cannot start or reload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The ACL policy file is unusable.
    #[error("ACL policy {path}: {source}")]
    Policy {
        /// The file.
        path: String,
        /// What is wrong.
        source: crate::acl::PolicyError,
    },
    /// Reading a file failed.
    #[error("{0}")]
    Io(String),
    /// The router could not start.
    #[error(transparent)]
    Router(#[from] crate::router::RouterError),
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A service could not start.
    #[error(transparent)]
    Service(#[from] services::LinkError),
    /// The bridge could not start.
    #[error(transparent)]
    Bridge(#[from] crate::bridge::BridgeError),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

pub(crate) struct Shared {
    pub(crate) config: GatewayConfig,
    tls_files: TlsFiles,
    tls: RwLock<Arc<ServerConfig>>,
    policy: RwLock<Arc<Policy>>,
    pub(crate) identity_policy: IdentityPolicy,
    pub(crate) router: RouterHandle,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) metrics: Arc<Metrics>,
    wills: Mutex<LinkTx>,
    session_events: tokio::sync::mpsc::UnboundedSender<SessionEvent>,
    pub(crate) status: services::registry::StatusWriter,
}

impl Shared {
    /// Tells the services about a device session (other roles are not reported).
    pub(crate) fn session_event(&self, who: &Identity, event: SessionEvent) {
        if who.role == fleet_certs::Role::Device && self.session_events.send(event).is_err() {
            warn!("command service is gone; session event dropped");
        }
    }

    pub(crate) fn tls_config(&self) -> Arc<ServerConfig> {
        match self.tls.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Publishes a will through the gateway's own link, after checking it against the policy
    /// in force now (it may have changed since CONNECT).
    pub(crate) async fn publish_will(&self, who: &Identity, will: LastWill) {
        let topic = String::from_utf8_lossy(&will.topic).into_owned();
        if let Decision::Deny(reason) = self.policy().check_publish(who, &topic) {
            Metrics::inc(&self.metrics.acl_denials);
            warn!(topic, %reason, "will denied by the current policy; not published");
            return;
        }
        let mut link = self.wills.lock().await;
        match link.send(connection::will_packet(will)).await {
            Ok(_) => {
                Metrics::inc(&self.metrics.wills_published);
                info!(topic, "will published");
            }
            Err(e) => error!(error = %e, topic, "could not publish will"),
        }
    }
}

fn load_policy(path: Option<&std::path::Path>) -> Result<Policy, GatewayError> {
    match path {
        None => Ok(Policy::default_policy()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| GatewayError::Io(format!("{}: {e}", p.display())))?;
            Policy::from_toml(&text).map_err(|source| GatewayError::Policy {
                path: p.display().to_string(),
                source,
            })
        }
    }
}

/// A gateway bound to its port, ready to serve.
pub struct Gateway {
    shared: Arc<Shared>,
    listener: TcpListener,
    metrics_addr: Option<SocketAddr>,
}

/// A handle to a running gateway: reload and metrics, usable from signal handlers and tests.
#[derive(Clone)]
pub struct GatewayHandle {
    shared: Arc<Shared>,
}

impl Gateway {
    /// Loads TLS material and policy, starts the router and binds the listener. Nothing is
    /// served until [`Gateway::serve`].
    pub async fn bind(config: GatewayConfig, tls_files: TlsFiles) -> Result<Gateway, GatewayError> {
        let tls = tls::server_config(&tls_files)?;
        let policy = load_policy(config.acl.policy.as_deref())?;
        let router = RouterHandle::start(config.limits.max_connections)?;
        let will_router = router.clone();
        let crate::router::Link {
            tx: wills,
            rx: mut wills_rx,
            ..
        } = tokio::task::spawn_blocking(move || {
            will_router.link(&format!("{INTERNAL_PREFIX}wills"), true)
        })
        .await
        .map_err(|e| GatewayError::Io(e.to_string()))?
        .map_err(|e| GatewayError::Io(e.to_string()))?;
        // The will link only publishes at QoS 0; keep its receiving side drained.
        tokio::spawn(async move {
            while let Ok(n) = wills_rx.next().await {
                if matches!(n, Some(rumqttd::Notification::Unschedule))
                    && wills_rx.wake().await.is_err()
                {
                    break;
                }
            }
        });
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| GatewayError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let identity_policy = IdentityPolicy {
            cn_fallback: config.identity.cn_fallback_role,
        };
        let metrics = Arc::new(Metrics::default());
        let data_dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open_in(&data_dir))
            .await
            .map_err(|e| GatewayError::Io(e.to_string()))??;
        info!(path = %store.path().display(), "store open");
        let firmware =
            FirmwareDir::open(&config.data_dir).map_err(|e| GatewayError::Io(e.to_string()))?;
        let sessions = Arc::new(Sessions::default());
        let store = SharedStore::new(store, metrics.clone());
        let mut metrics_addr = None;
        if let Some(addr) = config.metrics.listen {
            let sources = crate::http::Sources {
                metrics: metrics.clone(),
                sessions: sessions.clone(),
            };
            metrics_addr = Some(
                crate::http::start(addr, sources)
                    .await
                    .map_err(|source| GatewayError::Bind { addr, source })?,
            );
        }
        if config.bridge.upstream.is_some() {
            let b = &config.bridge;
            let bridge_tls = crate::bridge::BridgeTls {
                ca: b.ca.clone().unwrap_or_else(|| tls_files.ca.clone()),
                cert: b.cert.clone().unwrap_or_else(|| tls_files.cert.clone()),
                key: b.key.clone().unwrap_or_else(|| tls_files.key.clone()),
            };
            let bridge = crate::bridge::Bridge::start(
                &router,
                store.clone(),
                b.clone(),
                &bridge_tls,
                metrics.clone(),
            )
            .await?;
            tokio::spawn(bridge.run());
        }
        let services::ServiceHandles {
            session_events,
            status,
        } = services::start(
            &router,
            store,
            config.commands.clone(),
            config.updates.clone(),
            firmware,
            sessions.clone(),
            metrics.clone(),
        )
        .await?;
        let shared = Arc::new(Shared {
            config,
            tls_files,
            tls: RwLock::new(tls),
            policy: RwLock::new(Arc::new(policy)),
            identity_policy,
            router,
            sessions,
            metrics,
            wills: Mutex::new(wills),
            session_events,
            status,
        });
        Ok(Gateway {
            shared,
            listener,
            metrics_addr,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The metrics endpoint's bound address, when `metrics.listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// A handle for reload and metrics.
    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then stops accepting, asks every connection to close
    /// (publishing wills) and waits up to `grace` for them.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>, grace: Duration) {
        let limit = self.shared.config.limits.max_connections;
        let slots = Arc::new(Semaphore::new(limit));
        info!(addr = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), max_connections = limit, "gateway listening");
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(10);
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    backoff = Duration::from_millis(10);
                    Metrics::inc(&self.shared.metrics.tcp_accepted);
                    let _ = tcp.set_nodelay(true);
                    let shared = self.shared.clone();
                    tokio::spawn(async move {
                        connection::handle(shared, tcp, peer).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        info!("shutting down: closing connections");
        self.shared
            .sessions
            .close_unless(CloseReason::Shutdown, |_| false);
        let all = u32::try_from(limit).unwrap_or(u32::MAX);
        if tokio::time::timeout(grace, slots.acquire_many(all))
            .await
            .is_err()
        {
            warn!("grace period over with connections still open");
        }
        info!("gateway stopped");
    }
}

impl GatewayHandle {
    /// Reloads the CA bundle, CRL and policy from their files. Keeps the old ones if a file is
    /// unusable (and says so). Closes live connections whose certificate no longer verifies.
    /// Returns how many connections were closed.
    pub fn reload(&self) -> Result<usize, GatewayError> {
        let shared = &self.shared;
        let tls = tls::server_config(&shared.tls_files)?;
        let policy = load_policy(shared.config.acl.policy.as_deref())?;
        let store = TrustStore::from_files(
            &shared.tls_files.ca,
            shared.tls_files.crl.as_deref(),
            shared.identity_policy,
        )
        .map_err(|e| GatewayError::Io(e.to_string()))?;
        match shared.tls.write() {
            Ok(mut g) => *g = tls,
            Err(p) => *p.into_inner() = tls,
        }
        match shared.policy.write() {
            Ok(mut g) => *g = Arc::new(policy),
            Err(p) => *p.into_inner() = Arc::new(policy),
        }
        let now = rustls_pki_types::UnixTime::now();
        let closed = shared.sessions.close_unless(CloseReason::Revoked, |cert| {
            store.verify_client(cert, now).is_ok()
        });
        info!(closed, "reloaded CA bundle, CRL and ACL policy");
        Ok(closed)
    }

    /// The gateway's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Number of live MQTT sessions.
    pub fn sessions(&self) -> usize {
        self.shared.sessions.len()
    }
}
