//! The embedded rumqttd router: volatile in-memory routing, sessions and retained messages.
//!
//! rumqttd's router runs on its own OS thread. Connections reach it through in-process links
//! (`rumqttd::local::LinkBuilder`); this module hides the router's channel type (which rumqttd
//! does not export) behind [`RouterHandle::link`].

mod link;

use std::sync::Arc;

use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::Packet;
use rumqttd::{Router, RouterConfig};

pub use link::LinkError;
pub(crate) use link::{Received, ServiceLink};

/// Client ids of the gateway's own in-process links start with this. DEL is a control
/// character, which no certificate id may contain, so no client can ever claim these sessions.
pub(crate) const INTERNAL_PREFIX: &str = "\u{7f}gateway-";

/// An open link: what to send to the router, what it sends back, and its CONNACK.
pub(crate) struct Link {
    /// Packets towards the router.
    pub tx: LinkTx,
    /// Notifications from the router.
    pub rx: LinkRx,
    /// The router's CONNACK for this link.
    pub connack: Option<Packet>,
}

/// The router refused or failed to open a link (rumqttd's error, as text: its error type is
/// large and carries channel internals).
#[derive(Debug, thiserror::Error)]
#[error("router link: {0}")]
pub(crate) struct LinkFailed(String);

type MakeLink = dyn Fn(&str, bool) -> Result<Link, LinkFailed> + Send + Sync;

/// A handle to the running router.
#[derive(Clone)]
pub(crate) struct RouterHandle {
    make: Arc<MakeLink>,
}

impl std::fmt::Debug for RouterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterHandle")
    }
}

/// Why the router cannot start.
#[derive(Debug, thiserror::Error)]
#[error("router configuration: {0}")]
pub struct RouterError(String);

impl RouterHandle {
    /// Starts a router sized for `max_connections` client connections.
    pub(crate) fn start(max_connections: usize) -> Result<Self, RouterError> {
        // RouterConfig has no constructor; its fields are public but some nested types are
        // not, so it is built from the same shape rumqttd's own config files use.
        let config: RouterConfig = serde_json::from_value(serde_json::json!({
            // Room for the gateway's own links beside the clients.
            "max_connections": max_connections + 64,
            // Messages the router keeps in flight towards one connection.
            "max_outgoing_packet_count": 200,
            // Per-filter in-memory log: 10 segments of 8 MiB.
            "max_segment_size": 8 << 20,
            "max_segment_count": 10,
        }))
        .map_err(|e| RouterError(e.to_string()))?;
        let router_tx = Router::new(0, config).spawn();
        let make = move |client_id: &str, clean: bool| {
            LinkBuilder::new(client_id, router_tx.clone())
                .clean_session(clean)
                .build()
                .map(|(tx, rx, connack)| Link {
                    tx,
                    rx,
                    connack: connack.into(),
                })
                .map_err(|e| LinkFailed(e.to_string()))
        };
        Ok(Self {
            make: Arc::new(make),
        })
    }

    /// Opens a link for `client_id`. Blocks until the router answers: call it from
    /// `spawn_blocking`.
    pub(crate) fn link(&self, client_id: &str, clean_session: bool) -> Result<Link, LinkFailed> {
        (self.make)(client_id, clean_session)
    }
}
