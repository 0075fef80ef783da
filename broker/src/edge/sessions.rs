//! Live connections by client id: one connection per identity (a second one replaces the
//! first cleanly), and a way to close connections from outside (revocation, shutdown).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use fleet_mqtt::Packet;
use tokio::sync::{watch, Notify};

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
    direct: Arc<DirectQueue>,
    cert: Arc<Vec<u8>>,
}

/// Packets services deliver to one connection directly, bypassing the MQTT core (firmware
/// chunks), at most [`DIRECT_CAPACITY`]. A queue and a wake-up rather than a channel: a
/// channel allocates its first block up front, and an idle connection should cost little
/// (about 100 bytes here against 800).
#[derive(Default)]
pub(crate) struct DirectQueue {
    packets: Mutex<VecDeque<Packet>>,
    ready: Notify,
}

impl DirectQueue {
    /// Resolves when packets may be waiting (a wake-up is never lost: one given while nobody
    /// waits is kept for the next wait).
    pub(crate) async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Moves up to `max` packets to `out`; the queue's storage is released once it is empty.
    /// Returns how many were moved. When more are left, the next [`Self::ready`] resolves at
    /// once.
    pub(crate) fn take(&self, max: usize, out: &mut Vec<Packet>) -> usize {
        let mut q = match self.packets.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        let n = q.len().min(max);
        out.extend(q.drain(..n));
        if q.is_empty() {
            *q = VecDeque::new();
        } else {
            self.ready.notify_one();
        }
        n
    }

    fn push(&self, packet: Packet) -> Result<(), DeliverError> {
        {
            let mut q = match self.packets.lock() {
                Ok(q) => q,
                Err(poisoned) => poisoned.into_inner(),
            };
            if q.len() >= DIRECT_CAPACITY {
                return Err(DeliverError::Full);
            }
            q.push_back(packet);
        }
        self.ready.notify_one();
        Ok(())
    }
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
    pub direct: Arc<DirectQueue>,
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
        let direct = Arc::new(DirectQueue::default());
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
                direct: Arc::clone(&direct),
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
            direct,
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
        // The connection task owns the other end for as long as the entry exists (both go
        // when its registration is dropped), so a queued packet is always read or dropped
        // with the connection.
        entry.direct.push(packet)
    }
}
