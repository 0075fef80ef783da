//! Counters of the gateway, cheap to bump from any task.

use std::sync::atomic::{AtomicU64, Ordering};

/// The gateway's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections accepted at TCP level.
    pub tcp_accepted: AtomicU64,
    /// TLS handshakes that failed or timed out (wrong CA, revoked, expired, no certificate).
    pub handshake_failures: AtomicU64,
    /// Connections refused after the handshake (identity, CONNECT problems).
    pub connects_refused: AtomicU64,
    /// MQTT sessions established (CONNACK accepted sent).
    pub sessions_opened: AtomicU64,
    /// Publishes and subscriptions denied by the ACL (wills included).
    pub acl_denials: AtomicU64,
    /// Connections closed for a protocol violation or malformed input.
    pub protocol_errors: AtomicU64,
    /// PUBLISH packets received from clients and forwarded.
    pub publishes_in: AtomicU64,
    /// PUBLISH packets sent to clients.
    pub publishes_out: AtomicU64,
    /// Will messages published after an abnormal disconnect.
    pub wills_published: AtomicU64,
    /// Messages on device or fleet API topics whose payload did not decode (bad protobuf,
    /// missing required fields); logged and dropped.
    pub malformed_payloads: AtomicU64,
    /// Commands accepted by the command service (one per target device).
    pub commands_submitted: AtomicU64,
    /// Hand-overs of a command to a connected device (re-deliveries included).
    pub commands_delivered: AtomicU64,
    /// Commands closed by a device's result.
    pub commands_completed: AtomicU64,
    /// Commands closed because their time to live passed.
    pub commands_expired: AtomicU64,
    /// Status reports stored by the registry.
    pub status_stored: AtomicU64,
    /// Status reports not stored because an equal or newer sequence was already stored.
    pub status_duplicates: AtomicU64,
    /// Store operations that failed (disk full, I/O error); the message is not lost from its
    /// sender's point of view only where the protocol re-sends it.
    pub store_errors: AtomicU64,
    /// Firmware chunks uploaded into the cache (verified and written).
    pub chunks_uploaded: AtomicU64,
    /// Firmware chunks sent to devices.
    pub chunks_served: AtomicU64,
    /// Firmware chunks not sent because the device's connection queue was full (it asks
    /// again after its request timeout).
    pub chunks_dropped: AtomicU64,
    /// Update progress reports recorded.
    pub update_reports: AtomicU64,
}

impl Metrics {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
