//! The TLS edge: the listener, TLS and identity, the per-connection tasks that drive the
//! MQTT core, reload of its own TLS material and policy, and shutdown.
//!
//! The edge knows the router below it and, through [`crate::ports`], where device sessions and
//! status reports go; the assembly builds it and hands it those ends. It imports no service.
//!
//! Each accepted connection runs in its own task (module `connection`); a semaphore permit taken
//! *before* `accept` bounds the number of connections, so a full gateway stops accepting
//! (back-pressure in the kernel's backlog) instead of failing.

mod connection;
mod preauth;
pub(crate) mod sessions;
mod tls_stream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleet_certs::{Identity, IdentityPolicy, TrustStore};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::acl::{Policy, PolicyAuthorizer};
use crate::config::{GatewayConfig, StaleCrl};
use crate::metrics::{LogBudget, Metrics};
use crate::ports::{SessionEvent, StatusIntake};
use crate::router::Router;
use crate::tls::{self, TlsFiles};
use preauth::PreAuth;
use sessions::CloseReason;
pub(crate) use sessions::Sessions;

/// Why the edge cannot start or reload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EdgeError {
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
    /// The CA bundle and CRL in force, for the check at CONNECT.
    trust: RwLock<Arc<TrustStore>>,
    /// Whether the CRL was stale at the last check (to log changes only).
    crl_was_stale: AtomicBool,
    /// Bumped after each reload has replaced the TLS configuration and trust store.
    trust_generation: AtomicU64,
    /// The log budget for malformed packets and protocol violations (each is counted).
    pub(crate) bad_input_log: LogBudget,
    pub(crate) identity_policy: IdentityPolicy,
    pub(crate) router: Router,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) metrics: Arc<Metrics>,
    session_events: tokio::sync::mpsc::UnboundedSender<SessionEvent>,
    pub(crate) status: StatusIntake,
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

    fn trust(&self) -> Arc<TrustStore> {
        match self.trust.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether the CRL in force is past its nextUpdate now; sets the `crl_stale` gauge and
    /// says so (once per change) in the log.
    pub(crate) fn crl_stale(&self) -> bool {
        let stale = self.trust().crl_stale(rustls_pki_types::UnixTime::now());
        Metrics::set(&self.metrics.crl_stale, u64::from(stale));
        if self.crl_was_stale.swap(stale, Ordering::Relaxed) != stale {
            if stale {
                warn!(
                    refuse = self.config.tls.stale_crl == StaleCrl::Refuse,
                    "the CRL is past its nextUpdate: revocations issued since may be missing; load a fresh one"
                );
            } else {
                info!("the CRL in force is current again");
            }
        }
        stale
    }

    /// How many times the trust material (CA bundle, CRL) has been replaced.
    pub(crate) fn trust_generation(&self) -> u64 {
        self.trust_generation.load(Ordering::Acquire)
    }

    /// Checks `cert`, which a handshake verified against the trust material of generation
    /// `verified_as_of`, against the CA bundle and CRL in force now: again only if a reload
    /// replaced them since (the handshake's verification stands otherwise). Refuses everyone
    /// while the CRL is stale, if so configured.
    pub(crate) fn verify_now(&self, cert: &[u8], verified_as_of: u64) -> Result<(), String> {
        if self.crl_stale() && self.config.tls.stale_crl == StaleCrl::Refuse {
            return Err("the CRL is past its nextUpdate (tls.stale_crl = \"refuse\")".into());
        }
        if self.trust_generation() == verified_as_of {
            return Ok(());
        }
        self.trust()
            .verify_client(cert, rustls_pki_types::UnixTime::now())
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

fn load_policy(path: Option<&std::path::Path>) -> Result<Policy, EdgeError> {
    match path {
        None => Ok(Policy::default_policy()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| EdgeError::Io(format!("{}: {e}", p.display())))?;
            Policy::from_toml(&text).map_err(|source| EdgeError::Policy {
                path: p.display().to_string(),
                source,
            })
        }
    }
}

/// What the edge is built from; the assembly fills it in.
pub(crate) struct EdgeParts {
    /// The configuration.
    pub config: GatewayConfig,
    /// The gateway's TLS files (reloaded from the same paths).
    pub tls_files: TlsFiles,
    /// The MQTT core the connections are driven into.
    pub router: Router,
    /// The live connections (shared with whoever delivers to them directly).
    pub sessions: Arc<Sessions>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Where device sessions are reported.
    pub session_events: tokio::sync::mpsc::UnboundedSender<SessionEvent>,
    /// Where device status reports are offered before they are acknowledged.
    pub status: StatusIntake,
}

/// The edge bound to its port, ready to serve.
pub(crate) struct Edge {
    shared: Arc<Shared>,
    listener: TcpListener,
    /// True while the accept loop runs (the health endpoint's `listener` check).
    listening: Arc<AtomicBool>,
}

/// A handle to a running edge: reload and counts, usable from signal handlers and tests.
#[derive(Clone)]
pub(crate) struct EdgeHandle {
    shared: Arc<Shared>,
}

/// TLS material, trust store and ACL policy, loaded before any port is bound.
pub(crate) struct Security {
    tls: Arc<ServerConfig>,
    trust: TrustStore,
    /// The ACL policy (the MQTT core is built with it).
    pub(crate) policy: Arc<Policy>,
}

fn load_trust(config: &GatewayConfig, tls_files: &TlsFiles) -> Result<TrustStore, EdgeError> {
    TrustStore::from_files(
        &tls_files.ca,
        tls_files.crl.as_deref(),
        IdentityPolicy {
            cn_fallback: config.identity.cn_fallback_role,
        },
    )
    .map_err(|e| EdgeError::Io(e.to_string()))
}

/// Loads the TLS material and the ACL policy, so that a bad file stops the gateway before any
/// port is bound.
pub(crate) fn load_security(
    config: &GatewayConfig,
    tls_files: &TlsFiles,
) -> Result<Security, EdgeError> {
    Ok(Security {
        tls: tls::server_config(tls_files)?,
        trust: load_trust(config, tls_files)?,
        policy: Arc::new(load_policy(config.acl.policy.as_deref())?),
    })
}

impl Edge {
    /// Binds the listener with the TLS material and policy from [`load_security`]. Nothing
    /// is served until [`Edge::serve`].
    pub(crate) async fn bind(parts: EdgeParts, security: Security) -> Result<Edge, EdgeError> {
        let EdgeParts {
            config,
            tls_files,
            router,
            sessions,
            metrics,
            session_events,
            status,
        } = parts;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| EdgeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let identity_policy = IdentityPolicy {
            cn_fallback: config.identity.cn_fallback_role,
        };
        let shared = Arc::new(Shared {
            config,
            tls_files,
            tls: RwLock::new(security.tls),
            policy: RwLock::new(security.policy),
            trust: RwLock::new(Arc::new(security.trust)),
            crl_was_stale: AtomicBool::new(false),
            trust_generation: AtomicU64::new(0),
            bad_input_log: LogBudget::default(),
            identity_policy,
            router,
            sessions,
            metrics,
            session_events,
            status,
        });
        Ok(Edge {
            shared,
            listener,
            listening: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A flag that is true while the accept loop runs (for the health endpoint).
    pub(crate) fn listening(&self) -> Arc<AtomicBool> {
        self.listening.clone()
    }

    /// The bound address (useful with port 0).
    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle for reload and counts.
    pub(crate) fn handle(&self) -> EdgeHandle {
        EdgeHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then stops accepting, asks every connection to close
    /// (publishing wills) and waits up to `grace` for them.
    pub(crate) async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
        grace: Duration,
    ) {
        let limits = &self.shared.config.limits;
        let limit = limits.max_connections;
        let slots = Arc::new(Semaphore::new(limit));
        let preauth = PreAuth::new(limits.max_handshakes, limits.max_handshakes_per_source);
        // Every connection task holds a clone; shutdown waits until all are dropped.
        let (tasks, mut tasks_done) = tokio::sync::mpsc::channel::<()>(1);
        info!(addr = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), max_connections = limit, max_handshakes = limits.max_handshakes, "gateway listening");
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(10);
        self.listening.store(true, Ordering::Relaxed);
        self.spawn_crl_watch();
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    backoff = Duration::from_millis(10);
                    Metrics::inc(&self.shared.metrics.tcp_accepted);
                    let _ = tcp.set_nodelay(true);
                    let (ticket, evicted) = preauth.admit(peer.ip());
                    if evicted > 0 {
                        Metrics::add(&self.shared.metrics.handshakes_evicted, evicted as u64);
                    }
                    let shared = self.shared.clone();
                    let slots = slots.clone();
                    let task = tasks.clone();
                    let fut = async move {
                        connection::handle(shared, tcp, peer, ticket, slots).await;
                        drop(task);
                    };
                    tokio::spawn(fut);
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        self.listening.store(false, Ordering::Relaxed);
        info!("shutting down: closing connections");
        self.shared
            .sessions
            .close_unless(CloseReason::Shutdown, |_| false);
        preauth.evict_all();
        drop(tasks);
        if tokio::time::timeout(grace, tasks_done.recv())
            .await
            .is_err()
        {
            warn!("grace period over with connections still open");
        }
        info!("gateway stopped");
    }

    /// Checks the CRL's nextUpdate every 30 s: the gauge and the log follow it, and with
    /// `tls.stale_crl = "refuse"` live sessions are closed once it is stale.
    fn spawn_crl_watch(&self) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(30));
            loop {
                every.tick().await;
                if shared.crl_stale() && shared.config.tls.stale_crl == StaleCrl::Refuse {
                    shared
                        .sessions
                        .close_unless(CloseReason::Revoked, |_| false);
                }
            }
        });
    }
}

impl EdgeHandle {
    /// Reloads the CA bundle, CRL and policy from their files. Keeps the old ones if a file is
    /// unusable (and says so). Closes live connections whose certificate no longer verifies.
    /// Returns how many connections were closed.
    pub(crate) fn reload(&self) -> Result<usize, EdgeError> {
        let shared = &self.shared;
        let tls = tls::server_config(&shared.tls_files)?;
        let policy = Arc::new(load_policy(shared.config.acl.policy.as_deref())?);
        let store = Arc::new(load_trust(&shared.config, &shared.tls_files)?);
        match shared.tls.write() {
            Ok(mut g) => *g = tls,
            Err(p) => *p.into_inner() = tls,
        }
        match shared.policy.write() {
            Ok(mut g) => *g = policy.clone(),
            Err(p) => *p.into_inner() = policy.clone(),
        }
        match shared.trust.write() {
            Ok(mut g) => *g = store.clone(),
            Err(p) => *p.into_inner() = store.clone(),
        }
        // After both are replaced: a handshake that read the old number verified against the
        // old material (or the new), and is checked again at CONNECT.
        shared.trust_generation.fetch_add(1, Ordering::AcqRel);
        // Live and stored subscriptions are checked against the new policy.
        shared
            .router
            .set_authorizer(Arc::new(PolicyAuthorizer(policy)));
        let now = rustls_pki_types::UnixTime::now();
        let closed = shared.sessions.close_unless(CloseReason::Revoked, |cert| {
            store.verify_client(cert, now).is_ok()
        });
        info!(closed, "reloaded CA bundle, CRL and ACL policy");
        Ok(closed)
    }

    /// Number of live MQTT sessions.
    pub(crate) fn sessions(&self) -> usize {
        self.shared.sessions.len()
    }
}
