//! What the layers above the MQTT core hand each other, defined below all of them so that no
//! module imports a peer: the assembly builds the implementations and passes them in.
//!
//! * [`SessionEvent`]: the edge tells the services about device sessions.
//! * [`StatusIntake`]: the edge offers a device's status report and learns whether it may be
//!   acknowledged (implemented by `services::status`).
//! * [`DirectSink`]: a service writes bulk packets straight to one connection, bypassing the
//!   MQTT core's queues (implemented by the edge's session registry).

use bytes::Bytes;
use fleet_mqtt::Packet;
use tokio::sync::{mpsc, oneshot};

/// What the edge reports about device sessions, in the order in which it handed the matching
/// packets to the MQTT core: a `Subscribed` event is sent after the core took the SUBSCRIBE, so
/// a publish a service sends afterwards is routed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionEvent {
    /// A device's session is open (CONNACK sent).
    Connected {
        /// The device id.
        id: String,
        /// Whether the core still had its persistent session.
        session_present: bool,
    },
    /// A device subscribed to these filters (the policy allows them).
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

/// Why a direct delivery did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeliverError {
    /// No live connection for the id.
    NotConnected,
    /// Its direct queue is full (a stalled client).
    Full,
}

/// Writes packets straight to one live connection, as they are: for bulk data that must not
/// sit in the core's queues (firmware chunks, sent at QoS 0 and asked for again when lost). The caller has checked that the client
/// may receive it.
pub(crate) trait DirectSink: Send + Sync {
    /// Queues `packet` for the live connection of `client_id`; never waits.
    fn deliver(&self, client_id: &str, packet: Packet) -> Result<(), DeliverError>;
}

/// What becomes of a device's status report, as far as its connection is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusVerdict {
    /// Stored (and queued upward when a bridge carries status): acknowledge it and route it.
    Stored,
    /// Not stored and not routed, but acknowledged so the device does not send it forever: a
    /// duplicate or late report (its newer one is stored), or one that does not decode.
    Dropped,
    /// The store failed: do not acknowledge; the device sends it again later.
    Failed,
}

/// One offered report and where its verdict goes.
#[derive(Debug)]
pub(crate) struct StatusOffer {
    /// The device, from the topic it published on (the ACL made sure it is its own).
    pub device: String,
    /// The payload as received.
    pub payload: Bytes,
    /// Where the verdict is sent.
    pub reply: oneshot::Sender<StatusVerdict>,
}

/// Where the edge offers status reports before acknowledging them. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct StatusIntake {
    tx: mpsc::Sender<StatusOffer>,
}

impl StatusIntake {
    /// A connected pair: the edge's side and the receiving side for the status owner.
    /// `capacity` reports wait before offering ones wait for room.
    pub(crate) fn channel(capacity: usize) -> (Self, mpsc::Receiver<StatusOffer>) {
        let (tx, rx) = mpsc::channel(capacity);
        (StatusIntake { tx }, rx)
    }

    /// Offers a report and waits for its verdict; [`StatusVerdict::Failed`] when the status
    /// owner is gone.
    pub(crate) async fn offer(&self, device: &str, payload: Bytes) -> StatusVerdict {
        let (reply, verdict) = oneshot::channel();
        let offer = StatusOffer {
            device: device.to_owned(),
            payload,
            reply,
        };
        if self.tx.send(offer).await.is_err() {
            return StatusVerdict::Failed;
        }
        verdict.await.unwrap_or(StatusVerdict::Failed)
    }
}
