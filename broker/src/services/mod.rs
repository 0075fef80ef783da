//! The gateway's in-process services: trusted links into the router, state in the store.
//!
//! * [`commands`]: the command service (accept, persist, deliver, re-deliver, expire, events)
//!   and the fleet API requests (`fleet/api/{service}/request`).
//! * [`status`]: the status owner: a device's status report is stored (and queued upward when
//!   a bridge carries status) before the edge lets it be acknowledged.
//! * [`registry`]: the presence reader (last presence and class per device).
//! * [`updates`]: the update server (firmware cache uploads, campaigns, chunk serving,
//!   progress); the API dispatcher passes it the update requests.
//! * [`trust`]: the roots of trust the gateway distributes (PublishRoot, GetTrust) and the
//!   devices' trust reports.
//!
//! Services reach devices through the router, or for firmware chunks through the
//! [`DirectSink`] the assembly hands them; they never import the edge. The edge reaches them
//! through the channels of [`crate::ports`], whose ends the assembly hands to both.

pub(crate) mod api;
pub(crate) mod commands;
pub(crate) mod registry;
pub(crate) mod status;
pub(crate) mod trust;
pub(crate) mod updates;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::{CommandSettings, UpdateSettings};
use crate::firmware::FirmwareDir;
use crate::metrics::Metrics;
use crate::ports::{DirectSink, SessionEvent, StatusOffer};
use crate::router::{LinkError, Router};
use crate::store::SharedStore;

/// What the services need from the rest of the gateway.
pub(crate) struct ServiceDeps {
    /// The router the services' links open on.
    pub router: Router,
    /// The store.
    pub store: SharedStore,
    /// Command service settings.
    pub commands: CommandSettings,
    /// Update server settings.
    pub updates: UpdateSettings,
    /// The firmware cache.
    pub firmware: FirmwareDir,
    /// Where firmware chunks go, straight to a device's connection.
    pub direct: Arc<dyn DirectSink>,
    /// Stored status reports are also queued for the bridge (it is configured and carries
    /// status upward).
    pub status_uplink: bool,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The device sessions the edge reports (the other end was handed to the edge).
    pub session_events: mpsc::UnboundedReceiver<SessionEvent>,
    /// The status reports the edge offers (the other end, a [`crate::ports::StatusIntake`],
    /// was handed to the edge).
    pub status_offers: mpsc::Receiver<StatusOffer>,
    /// The configured first root of trust (an encoded SignedRoot, checked), if any.
    pub first_root: Option<Vec<u8>>,
}

/// Starts the services on their own links.
pub(crate) async fn start(deps: ServiceDeps) -> Result<(), LinkError> {
    let ServiceDeps {
        router,
        store,
        commands,
        updates,
        firmware,
        direct,
        status_uplink,
        metrics,
        session_events,
        status_offers,
        first_root,
    } = deps;
    let (calls_tx, calls_rx) = mpsc::unbounded_channel();
    let (trust_tx, trust_rx) = mpsc::unbounded_channel();
    let trust = trust::TrustService::start(
        &router,
        store.clone(),
        metrics.clone(),
        first_root,
        trust_rx,
    )
    .await?;
    status::start(status_offers, store.clone(), metrics.clone(), status_uplink);
    let registry = registry::Registry::start(&router, store.clone(), metrics.clone()).await?;
    let updates = updates::UpdateService::start(
        &router,
        store.clone(),
        firmware,
        updates,
        direct,
        metrics.clone(),
        calls_rx,
    )
    .await?;
    let service = commands::CommandService::start(
        &router,
        store,
        commands,
        metrics,
        session_events,
        calls_tx,
        trust_tx,
    )
    .await?;
    tokio::spawn(trust.run());
    tokio::spawn(registry.run());
    tokio::spawn(updates.run());
    tokio::spawn(service.run());
    Ok(())
}
