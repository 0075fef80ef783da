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
    /// 1 while the bridge is connected upstream (gauge).
    pub bridge_connected: AtomicU64,
    /// Messages in the store-and-forward queue (gauge).
    pub bridge_queue_depth: AtomicU64,
    /// Bytes in the store-and-forward queue (gauge).
    pub bridge_queue_bytes: AtomicU64,
    /// When the oldest queued message was queued, Unix ms; 0 when empty (gauge).
    pub bridge_queue_oldest_ms: AtomicU64,
    /// Messages sent upstream and acknowledged.
    pub bridge_messages_up: AtomicU64,
    /// Messages received from upstream.
    pub bridge_messages_down: AtomicU64,
    /// Payload bytes sent upstream (acknowledged).
    pub bridge_bytes_up: AtomicU64,
    /// Payload bytes received from upstream.
    pub bridge_bytes_down: AtomicU64,
    /// Queued messages dropped to keep the queue within its disk budget.
    pub bridge_dropped: AtomicU64,
    /// Upstream connections established.
    pub bridge_connects: AtomicU64,
}

impl Metrics {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Ordering::Relaxed);
    }

    /// Every series in the Prometheus text format (0.0.4), names prefixed `fleet_gateway_`.
    /// `connections` is the number of live client sessions; `now_ms` dates the queue's age.
    pub fn render(&self, connections: usize, now_ms: u64) -> String {
        use std::fmt::Write as _;
        let oldest = Self::get(&self.bridge_queue_oldest_ms);
        let age = if oldest == 0 {
            0.0
        } else {
            now_ms.saturating_sub(oldest) as f64 / 1000.0
        };
        let c = |v: &AtomicU64| Self::get(v) as f64;
        let series: [(&str, &str, &str, f64); 32] = [
            (
                "connections",
                "gauge",
                "Live client sessions.",
                connections as f64,
            ),
            (
                "tcp_accepted_total",
                "counter",
                "TCP connections accepted.",
                c(&self.tcp_accepted),
            ),
            (
                "handshake_failures_total",
                "counter",
                "TLS handshakes failed or timed out.",
                c(&self.handshake_failures),
            ),
            (
                "connects_refused_total",
                "counter",
                "Connections refused after the handshake.",
                c(&self.connects_refused),
            ),
            (
                "sessions_opened_total",
                "counter",
                "MQTT sessions established.",
                c(&self.sessions_opened),
            ),
            (
                "acl_denials_total",
                "counter",
                "Publishes and subscriptions denied by the ACL.",
                c(&self.acl_denials),
            ),
            (
                "protocol_errors_total",
                "counter",
                "Connections closed for a protocol violation.",
                c(&self.protocol_errors),
            ),
            (
                "messages_in_total",
                "counter",
                "PUBLISH packets received from clients.",
                c(&self.publishes_in),
            ),
            (
                "messages_out_total",
                "counter",
                "PUBLISH packets sent to clients.",
                c(&self.publishes_out),
            ),
            (
                "wills_published_total",
                "counter",
                "Wills published after an abnormal loss.",
                c(&self.wills_published),
            ),
            (
                "malformed_payloads_total",
                "counter",
                "Payloads that did not decode; dropped.",
                c(&self.malformed_payloads),
            ),
            (
                "commands_submitted_total",
                "counter",
                "Commands accepted (one per target).",
                c(&self.commands_submitted),
            ),
            (
                "commands_delivered_total",
                "counter",
                "Command hand-overs to devices.",
                c(&self.commands_delivered),
            ),
            (
                "commands_completed_total",
                "counter",
                "Commands closed by a device's result.",
                c(&self.commands_completed),
            ),
            (
                "commands_expired_total",
                "counter",
                "Commands expired.",
                c(&self.commands_expired),
            ),
            (
                "status_stored_total",
                "counter",
                "Status reports stored.",
                c(&self.status_stored),
            ),
            (
                "status_duplicates_total",
                "counter",
                "Status reports not stored (not newer).",
                c(&self.status_duplicates),
            ),
            (
                "store_errors_total",
                "counter",
                "Store operations that failed.",
                c(&self.store_errors),
            ),
            (
                "update_chunks_uploaded_total",
                "counter",
                "Firmware chunks uploaded into the cache.",
                c(&self.chunks_uploaded),
            ),
            (
                "update_chunks_served_total",
                "counter",
                "Firmware chunks sent to devices.",
                c(&self.chunks_served),
            ),
            (
                "update_chunks_dropped_total",
                "counter",
                "Firmware chunks dropped on a full device queue.",
                c(&self.chunks_dropped),
            ),
            (
                "update_progress_reports_total",
                "counter",
                "Update progress reports recorded.",
                c(&self.update_reports),
            ),
            (
                "bridge_connected",
                "gauge",
                "1 while the bridge is connected upstream.",
                c(&self.bridge_connected),
            ),
            (
                "bridge_connects_total",
                "counter",
                "Upstream connections established.",
                c(&self.bridge_connects),
            ),
            (
                "bridge_queue_depth",
                "gauge",
                "Messages waiting in the store-and-forward queue.",
                c(&self.bridge_queue_depth),
            ),
            (
                "bridge_queue_bytes",
                "gauge",
                "Bytes waiting in the store-and-forward queue.",
                c(&self.bridge_queue_bytes),
            ),
            (
                "bridge_queue_age_seconds",
                "gauge",
                "Age of the oldest queued message.",
                age,
            ),
            (
                "bridge_messages_up_total",
                "counter",
                "Messages sent upstream and acknowledged.",
                c(&self.bridge_messages_up),
            ),
            (
                "bridge_messages_down_total",
                "counter",
                "Messages received from upstream.",
                c(&self.bridge_messages_down),
            ),
            (
                "bridge_bytes_up_total",
                "counter",
                "Payload bytes sent upstream.",
                c(&self.bridge_bytes_up),
            ),
            (
                "bridge_bytes_down_total",
                "counter",
                "Payload bytes received from upstream.",
                c(&self.bridge_bytes_down),
            ),
            (
                "bridge_dropped_total",
                "counter",
                "Queued messages dropped over the disk budget.",
                c(&self.bridge_dropped),
            ),
        ];
        let mut out = String::with_capacity(4096);
        for (name, kind, help, v) in series {
            let _ = writeln!(out, "# HELP fleet_gateway_{name} {help}");
            let _ = writeln!(out, "# TYPE fleet_gateway_{name} {kind}");
            let _ = writeln!(out, "fleet_gateway_{name} {v}");
        }
        out
    }
}
