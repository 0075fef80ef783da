//! Live connections by client id: one connection per identity (a second one replaces the
//! first cleanly), and a way to close connections from outside (revocation, shutdown).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fleet_mqtt::Packet;
use tokio::sync::{mpsc, watch};

use crate::ports::{DeliverError, DirectSink};

/// Packets a service may queue for direct delivery to one connection (firmware chunks; the
/// update server sends at most one window per device, so this is never reached in normal
/// operation).
pub(crate) const DIRECT_CAPACITY: usize = 256;

/// Why the gateway closes a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// Another connection of the same identity arrived.
    Takeover,
    /// The certificate no longer verifies (revoked, or its CA removed) after a reload.
    Revoked,
    /// The gateway is shutting down.
    Shutdown,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseReason::Takeover => "replaced by a new connection of the same identity",
            CloseReason::Revoked => "certificate no longer valid",
            CloseReason::Shutdown => "gateway shutting down",
        })
    }
}

struct Entry {
    generation: u64,
    close: watch::Sender<Option<CloseReason>>,
    // Boxed: a channel allocates its first block of 32 slots up front, and a boxed slot is a
    // pointer rather than a whole packet (about 4 KiB less per idle connection).
    direct: mpsc::Sender<Box<Packet>>,
    cert: Arc<Vec<u8>>,
}

/// The registry.
#[derive(Default)]
pub(crate) struct Sessions {
    inner: Mutex<(u64, HashMap<String, Entry>)>,
}

/// Held by a connection task while it is registered; deregisters on drop.
pub(crate) struct Registration {
    sessions: Arc<Sessions>,
    id: String,
    generation: u64,
    /// Becomes `Some(reason)` when the gateway wants this connection closed.
    pub close: watch::Receiver<Option<CloseReason>>,
    /// Packets services deliver to this connection directly, bypassing the router.
    pub direct: mpsc::Receiver<Box<Packet>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut g) = self.sessions.inner.lock() {
            if g.1
                .get(&self.id)
                .is_some_and(|e| e.generation == self.generation)
            {
                g.1.remove(&self.id);
            }
        }
    }
}

impl Sessions {
    /// Registers a connection for `id` and asks any previous one to close. It does not wait
    /// for it: the MQTT core hands the session over at CONNECT (the old connection is closed
    /// there and whatever it still sends is ignored), and a close signal abandons even a
    /// blocked write.
    pub(crate) fn register(self: &Arc<Self>, id: &str, cert: Vec<u8>) -> Registration {
        let (close_tx, close_rx) = watch::channel(None);
        let (direct_tx, direct_rx) = mpsc::channel(DIRECT_CAPACITY);
        let (generation, previous) = {
            let mut g = match self.inner.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            g.0 += 1;
            let generation = g.0;
            let entry = Entry {
                generation,
                close: close_tx,
                direct: direct_tx,
                cert: Arc::new(cert),
            };
            let previous = g.1.insert(id.to_owned(), entry);
            (generation, previous)
        };
        if let Some(old) = previous {
            let _ = old.close.send(Some(CloseReason::Takeover));
        }
        Registration {
            sessions: Arc::clone(self),
            id: id.to_owned(),
            generation,
            close: close_rx,
            direct: direct_rx,
        }
    }

    /// Asks every connection for which `keep(certificate)` is false to close with `reason`;
    /// returns how many were asked.
    pub(crate) fn close_unless(&self, reason: CloseReason, keep: impl Fn(&[u8]) -> bool) -> usize {
        let g = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut asked = 0;
        for e in g.1.values().filter(|e| !keep(&e.cert)) {
            let _ = e.close.send(Some(reason));
            asked += 1;
        }
        asked
    }

    /// Number of registered connections.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().map(|g| g.1.len()).unwrap_or(0)
    }
}

impl DirectSink for Sessions {
    /// Queues `packet` on the connection task's direct queue ([`DIRECT_CAPACITY`]), written
    /// by that task as it is.
    fn deliver(&self, client_id: &str, packet: Packet) -> Result<(), DeliverError> {
        let g = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let entry = g.1.get(client_id).ok_or(DeliverError::NotConnected)?;
        entry
            .direct
            .try_send(Box::new(packet))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => DeliverError::Full,
                mpsc::error::TrySendError::Closed(_) => DeliverError::NotConnected,
            })
    }
}
