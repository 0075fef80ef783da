//! The gateway's in-process services: trusted links into the router, state in the store.
//!
//! * [`commands`]: the command service (accept, persist, deliver, re-deliver, expire, events)
//!   and the fleet API requests (`fleet/api/{service}/request`).
//! * [`registry`]: the status registry (last report and presence per device); status reports
//!   are stored before the edge lets them be acknowledged.
//! * [`updates`]: the update server (firmware cache uploads, campaigns, chunk serving,
//!   progress); the API dispatcher passes it the update requests.
//!
//! The edge tells the services about device sessions through [`SessionEvent`]s, in the order in
//! which it forwarded the matching packets to the router: a `Subscribed` event is sent after
//! the SUBSCRIBE went to the router, so a publish the service sends afterwards is routed to it.

pub mod api;
pub mod commands;
pub(crate) mod link;
pub mod registry;
pub mod updates;

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::error;

use crate::config::{CommandSettings, UpdateSettings};
use crate::firmware::FirmwareDir;
use crate::metrics::Metrics;
use crate::router::RouterHandle;
use crate::store::{Store, StoreError};

pub use link::LinkError;

/// What the edge reports about client sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A device's session is open (CONNACK sent).
    Connected {
        /// The device id.
        id: String,
        /// Whether the router still had its persistent session.
        session_present: bool,
    },
    /// A device subscribed to these filters (forwarded to the router).
    Subscribed {
        /// The device id.
        id: String,
        /// The granted filters.
        filters: Vec<String>,
    },
    /// A device's session ended.
    Disconnected {
        /// The device id.
        id: String,
    },
}

/// The store shared by the services: calls run on the blocking pool, one at a time.
#[derive(Clone)]
pub struct SharedStore {
    inner: Arc<Mutex<Store>>,
    metrics: Arc<Metrics>,
}

impl SharedStore {
    /// Wraps an open store.
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(store)),
            metrics,
        }
    }

    /// Runs `f` with the store on the blocking pool. A failure is logged and counted here, so
    /// callers only decide what it means for their message.
    pub async fn call<R: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let inner = self.inner.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut guard = match inner.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            f(&mut guard)
        })
        .await;
        let result = match joined {
            Ok(r) => r,
            Err(e) => Err(StoreError::Task(e.to_string())),
        };
        if let Err(e) = &result {
            Metrics::inc(&self.metrics.store_errors);
            error!(error = %e, what, "store operation failed");
        }
        result
    }
}

/// What the edge needs from the services.
pub struct ServiceHandles {
    /// Where device sessions are reported.
    pub session_events: mpsc::UnboundedSender<SessionEvent>,
    /// Where status reports are stored before they are acknowledged.
    pub status: registry::StatusWriter,
}

/// Starts the services on their own links.
pub async fn start(
    router: &RouterHandle,
    store: SharedStore,
    settings: CommandSettings,
    update_settings: UpdateSettings,
    firmware: FirmwareDir,
    sessions: Arc<crate::edge::sessions::Sessions>,
    metrics: Arc<Metrics>,
) -> Result<ServiceHandles, LinkError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (calls_tx, calls_rx) = mpsc::unbounded_channel();
    let status = registry::StatusWriter::start(store.clone(), metrics.clone());
    let registry = registry::Registry::start(router, store.clone(), metrics.clone()).await?;
    let updates = updates::UpdateService::start(
        router,
        store.clone(),
        firmware,
        update_settings,
        sessions,
        metrics.clone(),
        calls_rx,
    )
    .await?;
    let service =
        commands::CommandService::start(router, store, settings, metrics, rx, calls_tx).await?;
    tokio::spawn(registry.run());
    tokio::spawn(updates.run());
    tokio::spawn(service.run());
    Ok(ServiceHandles {
        session_events: tx,
        status,
    })
}
