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
pub mod registry;
pub mod updates;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::{CommandSettings, UpdateSettings};
use crate::firmware::FirmwareDir;
use crate::metrics::Metrics;
use crate::router::{LinkError, RouterHandle};
use crate::store::SharedStore;

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
