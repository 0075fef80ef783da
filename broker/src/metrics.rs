//! Counters of the gateway, cheap to bump from any task.
//!
//! Every series is declared once, in the `series!` table below: the field (with its rustdoc),
//! the Prometheus name, type and help text. [`Metrics::render`] walks that same table.

use std::sync::atomic::{AtomicU64, Ordering};

/// Declares the [`Metrics`] struct and its render table from one list of series.
///
/// Each entry: field doc comments, `field: kind "name" "help"`, and optionally `via f`, where
/// `f(raw, now_ms) -> f64` turns the stored value into the exported one. Names get the
/// `fleet_gateway_` prefix when rendered; `kind` is `counter` or `gauge`.
macro_rules! series {
    ($(
        $(#[doc = $doc:literal])+
        $field:ident: $kind:ident $name:literal $help:literal $(via $via:path)?,
    )+) => {
        /// The gateway's counters.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(
                $(#[doc = $doc])+
                pub $field: AtomicU64,
            )+
        }

        impl Metrics {
            /// Every stored series as (name, type, help, value at `now_ms`), in declaration order.
            fn stored(&self, now_ms: u64) -> Vec<(&'static str, &'static str, &'static str, f64)> {
                let _ = now_ms; // only `via` conversions read it
                vec![$((
                    $name,
                    series!(@kind $kind),
                    $help,
                    series!(@value Self::get(&self.$field), now_ms $(, $via)?),
                ),)+]
            }
        }
    };
    (@kind counter) => { "counter" };
    (@kind gauge) => { "gauge" };
    (@value $raw:expr, $now:ident) => { $raw as f64 };
    (@value $raw:expr, $now:ident, $via:path) => { $via($raw, $now) };
}

/// Seconds since `oldest_ms` (Unix ms) at `now_ms`; 0 when nothing is queued (`oldest_ms` 0).
fn age_seconds(oldest_ms: u64, now_ms: u64) -> f64 {
    if oldest_ms == 0 {
        0.0
    } else {
        now_ms.saturating_sub(oldest_ms) as f64 / 1000.0
    }
}

series! {
    /// Connections accepted at TCP level.
    tcp_accepted: counter "tcp_accepted_total" "TCP connections accepted.",
    /// TLS handshakes that failed or timed out (wrong CA, revoked, expired, no certificate).
    handshake_failures: counter "handshake_failures_total" "TLS handshakes failed or timed out.",
    /// Pending handshakes dropped to make room for newer connections (pre-authentication
    /// budget full, overall or for one source address).
    handshakes_evicted: counter "handshakes_evicted_total" "Pending handshakes dropped for newer connections.",
    /// Connections refused after the handshake (identity, CONNECT problems).
    connects_refused: counter "connects_refused_total" "Connections refused after the handshake.",
    /// MQTT sessions established (CONNACK accepted sent).
    sessions_opened: counter "sessions_opened_total" "MQTT sessions established.",
    /// Publishes and subscriptions denied by the ACL (wills included).
    acl_denials: counter "acl_denials_total" "Publishes and subscriptions denied by the ACL.",
    /// Connections closed for a protocol violation or malformed input.
    protocol_errors: counter "protocol_errors_total" "Connections closed for a protocol violation.",
    /// PUBLISH packets received from clients and forwarded.
    publishes_in: counter "messages_in_total" "PUBLISH packets received from clients.",
    /// PUBLISH packets sent to clients.
    publishes_out: counter "messages_out_total" "PUBLISH packets sent to clients.",
    /// Will messages published after an abnormal disconnect.
    wills_published: counter "wills_published_total" "Wills published after an abnormal loss.",
    /// Messages on device or fleet API topics whose payload did not decode (bad protobuf,
    /// missing required fields); logged and dropped.
    malformed_payloads: counter "malformed_payloads_total" "Payloads that did not decode; dropped.",
    /// Commands accepted by the command service (one per target device).
    commands_submitted: counter "commands_submitted_total" "Commands accepted (one per target).",
    /// Hand-overs of a command to a connected device (re-deliveries included).
    commands_delivered: counter "commands_delivered_total" "Command hand-overs to devices.",
    /// Commands closed by a device's result.
    commands_completed: counter "commands_completed_total" "Commands closed by a device's result.",
    /// Commands closed because their time to live passed.
    commands_expired: counter "commands_expired_total" "Commands expired.",
    /// Unsigned SendCommand requests refused (the gateway takes signed commands only).
    commands_unsigned_refused: counter "commands_unsigned_refused_total" "Unsigned command submissions refused.",
    /// Command results that answer no stored command (their digest names other bytes: a
    /// device refusing a forgery or a raw publish on its command topic); stored commands are
    /// left untouched and services get a foreign CommandEvent.
    command_results_foreign: counter "command_results_foreign_total" "Command results for deliveries the gateway did not store.",
    /// Devices whose last trust report names an expired root or one older than the newest the
    /// gateway distributes (gauge): frozen or not yet caught up.
    trust_devices_behind: gauge "trust_devices_behind" "Devices whose root is expired or older than the gateway's newest.",
    /// Status reports stored by the registry.
    status_stored: counter "status_stored_total" "Status reports stored.",
    /// Status reports not stored because an equal or newer sequence was already stored.
    status_duplicates: counter "status_duplicates_total" "Status reports not stored (not newer).",
    /// Store operations that failed (disk full, I/O error); the message is not lost from its
    /// sender's point of view only where the protocol re-sends it.
    store_errors: counter "store_errors_total" "Store operations that failed.",
    /// 1 while a loaded CRL is past its nextUpdate (gauge): revocations issued since may be
    /// missing. Clients are refused meanwhile when `tls.stale_crl = "refuse"`.
    crl_stale: gauge "crl_stale" "1 while a loaded CRL is past its nextUpdate.",
    /// Firmware chunks uploaded into the cache (verified and written).
    chunks_uploaded: counter "update_chunks_uploaded_total" "Firmware chunks uploaded into the cache.",
    /// Firmware chunks sent to devices.
    chunks_served: counter "update_chunks_served_total" "Firmware chunks sent to devices.",
    /// Firmware chunks not sent because the device's connection queue was full (it asks
    /// again after its request timeout).
    chunks_dropped: counter "update_chunks_dropped_total" "Firmware chunks dropped on a full device queue.",
    /// Update API calls and device chunk requests refused by a bound (too large an update,
    /// too many ranges, an oversized field) before any work was done for them.
    update_refused: counter "update_requests_refused_total" "Update requests refused by a bound before any work.",
    /// Update progress reports recorded.
    update_reports: counter "update_progress_reports_total" "Update progress reports recorded.",
    /// 1 while the bridge is connected upstream (gauge).
    bridge_connected: gauge "bridge_connected" "1 while the bridge is connected upstream.",
    /// Upstream connections established.
    bridge_connects: counter "bridge_connects_total" "Upstream connections established.",
    /// Messages in the store-and-forward queue (gauge).
    bridge_queue_depth: gauge "bridge_queue_depth" "Messages waiting in the store-and-forward queue.",
    /// Bytes in the store-and-forward queue (gauge).
    bridge_queue_bytes: gauge "bridge_queue_bytes" "Bytes waiting in the store-and-forward queue.",
    /// When the oldest queued message was queued, Unix ms; 0 when empty. Exported as its age.
    bridge_queue_oldest_ms: gauge "bridge_queue_age_seconds" "Age of the oldest queued message." via age_seconds,
    /// Messages sent upstream and acknowledged.
    bridge_messages_up: counter "bridge_messages_up_total" "Messages sent upstream and acknowledged.",
    /// Messages received from upstream.
    bridge_messages_down: counter "bridge_messages_down_total" "Messages received from upstream.",
    /// Payload bytes sent upstream (acknowledged).
    bridge_bytes_up: counter "bridge_bytes_up_total" "Payload bytes sent upstream.",
    /// Payload bytes received from upstream.
    bridge_bytes_down: counter "bridge_bytes_down_total" "Payload bytes received from upstream.",
    /// Queued messages dropped to keep the queue within its disk budget.
    bridge_dropped: counter "bridge_dropped_total" "Queued messages dropped over the disk budget.",
    /// Index (from 0) in `bridge.upstream` of the address the bridge is connected to or tries
    /// next (gauge).
    bridge_upstream_index: gauge "bridge_upstream_index" "Index in bridge.upstream of the address in use.",
    /// Moves of the bridge to the next upstream address after a failed attempt or a lost
    /// connection.
    bridge_failovers: counter "bridge_failovers_total" "Bridge moves to the next upstream address.",
    /// Local messages not sent up because their upstream topic holds a character of
    /// `bridge.refuse_topic_chars` (the upstream broker would close the connection).
    bridge_refused_topics: counter "bridge_refused_topics_total" "Messages not sent up: their topic holds a character the upstream broker refuses.",
    /// Messages the MQTT core dropped: QoS 0 for a full queue, the oldest of an offline
    /// session's queue over its cap, the queue of an expired session.
    messages_dropped: counter "messages_dropped_total" "Messages dropped by the MQTT core (queue caps, QoS 0 under pressure).",
    /// Subscriptions removed because a reloaded policy no longer allows them.
    subscriptions_revoked: counter "subscriptions_revoked_total" "Subscriptions removed by a policy reload.",
    /// Connections the MQTT core closed: over a cap on held or unreleased publishes, a queue
    /// full too long, or a write that did not finish in time.
    clients_closed_over_limits: counter "clients_closed_over_limits_total" "Clients closed for exceeding a cap, stalling, or not reading.",
}

/// A log line budget: at most a few lines per window (by default per second) for one kind of
/// event, so a flood of bad input is counted in full but logged in a handful of lines, each
/// saying how many were left out since the last one.
#[derive(Debug)]
pub(crate) struct LogBudget {
    lines: u32,
    window: std::time::Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u32, u64)>,
}

/// The budget of "payload did not decode" lines, shared by every service.
static MALFORMED_LOG: LogBudget = LogBudget::new();

impl Default for LogBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl LogBudget {
    /// A fresh budget of [`LogBudget::LINES`] per [`LogBudget::WINDOW`].
    pub(crate) const fn new() -> Self {
        Self::per(Self::LINES, Self::WINDOW)
    }

    /// A fresh budget of `lines` per `window`, for events that repeat slowly but for long.
    pub(crate) const fn per(lines: u32, window: std::time::Duration) -> Self {
        LogBudget {
            lines,
            window,
            state: std::sync::Mutex::new((None, 0, 0)),
        }
    }

    /// Lines per window, by default.
    pub(crate) const LINES: u32 = 5;
    /// The window, by default.
    pub(crate) const WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

    /// Whether a line may be logged at `now`; if so, how many were suppressed before it.
    pub(crate) fn allow_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut g = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let (start, used, suppressed) = &mut *g;
        if start.is_none_or(|s| now.duration_since(s) >= self.window) {
            *start = Some(now);
            *used = 0;
        }
        if *used < self.lines {
            *used += 1;
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }

    /// [`LogBudget::allow_at`] now.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(std::time::Instant::now())
    }
}

impl Metrics {
    /// Counts a payload that did not decode and says whether a log line for it fits the
    /// shared budget (and how many were left out before it).
    pub(crate) fn malformed_payload(&self) -> Option<u64> {
        Self::inc(&self.malformed_payloads);
        MALFORMED_LOG.allow()
    }

    /// Adds one to `counter`.
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Sets a gauge.
    pub(crate) fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Ordering::Relaxed);
    }

    /// Every series in the Prometheus text format (0.0.4), names prefixed `fleet_gateway_`:
    /// `connections` (the live client sessions, passed in), then the table above. `now_ms`
    /// dates the queue's age.
    pub(crate) fn render(&self, connections: usize, now_ms: u64) -> String {
        use std::fmt::Write as _;
        let live = (
            "connections",
            "gauge",
            "Live client sessions.",
            connections as f64,
        );
        let mut out = String::with_capacity(4096);
        for (name, kind, help, v) in std::iter::once(live).chain(self.stored(now_ms)) {
            let _ = writeln!(out, "# HELP fleet_gateway_{name} {help}");
            let _ = writeln!(out, "# TYPE fleet_gateway_{name} {kind}");
            let _ = writeln!(out, "fleet_gateway_{name} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The series as the README and the dashboards know them: name and type, in order.
    const EXPORTED: [(&str, &str); 44] = [
        ("connections", "gauge"),
        ("tcp_accepted_total", "counter"),
        ("handshake_failures_total", "counter"),
        ("handshakes_evicted_total", "counter"),
        ("connects_refused_total", "counter"),
        ("sessions_opened_total", "counter"),
        ("acl_denials_total", "counter"),
        ("protocol_errors_total", "counter"),
        ("messages_in_total", "counter"),
        ("messages_out_total", "counter"),
        ("wills_published_total", "counter"),
        ("malformed_payloads_total", "counter"),
        ("commands_submitted_total", "counter"),
        ("commands_delivered_total", "counter"),
        ("commands_completed_total", "counter"),
        ("commands_expired_total", "counter"),
        ("commands_unsigned_refused_total", "counter"),
        ("command_results_foreign_total", "counter"),
        ("trust_devices_behind", "gauge"),
        ("status_stored_total", "counter"),
        ("status_duplicates_total", "counter"),
        ("store_errors_total", "counter"),
        ("crl_stale", "gauge"),
        ("update_chunks_uploaded_total", "counter"),
        ("update_chunks_served_total", "counter"),
        ("update_chunks_dropped_total", "counter"),
        ("update_requests_refused_total", "counter"),
        ("update_progress_reports_total", "counter"),
        ("bridge_connected", "gauge"),
        ("bridge_connects_total", "counter"),
        ("bridge_queue_depth", "gauge"),
        ("bridge_queue_bytes", "gauge"),
        ("bridge_queue_age_seconds", "gauge"),
        ("bridge_messages_up_total", "counter"),
        ("bridge_messages_down_total", "counter"),
        ("bridge_bytes_up_total", "counter"),
        ("bridge_bytes_down_total", "counter"),
        ("bridge_dropped_total", "counter"),
        ("bridge_upstream_index", "gauge"),
        ("bridge_failovers_total", "counter"),
        ("bridge_refused_topics_total", "counter"),
        ("messages_dropped_total", "counter"),
        ("subscriptions_revoked_total", "counter"),
        ("clients_closed_over_limits_total", "counter"),
    ];

    #[test]
    fn a_flood_is_logged_a_few_lines_a_window_and_the_rest_counted() {
        let b = LogBudget::default();
        let t0 = std::time::Instant::now();
        let allowed = (0..100).filter(|_| b.allow_at(t0).is_some()).count();
        assert_eq!(allowed, LogBudget::LINES as usize);
        // The next window's first line says how many were suppressed.
        assert_eq!(
            b.allow_at(t0 + LogBudget::WINDOW),
            Some(100 - u64::from(LogBudget::LINES))
        );
        // A slower budget: one line a minute.
        let minute = std::time::Duration::from_secs(60);
        let slow = LogBudget::per(1, minute);
        assert_eq!(slow.allow_at(t0), Some(0));
        assert_eq!(slow.allow_at(t0 + LogBudget::WINDOW), None);
        assert_eq!(slow.allow_at(t0 + minute), Some(1));
    }

    #[test]
    fn every_series_keeps_its_name_type_and_value() {
        let m = Metrics::default();
        Metrics::add(&m.tcp_accepted, 7);
        Metrics::inc(&m.commands_expired);
        Metrics::set(&m.bridge_connected, 1);
        Metrics::set(&m.bridge_queue_oldest_ms, 1_000);
        let text = m.render(3, 3_500);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3 * EXPORTED.len(), "{text}");
        for ((name, kind), block) in EXPORTED.iter().zip(lines.chunks(3)) {
            let full = format!("fleet_gateway_{name}");
            assert!(
                block[0].starts_with(&format!("# HELP {full} ")),
                "{block:?}"
            );
            assert!(
                block[0].len() > "# HELP ".len() + full.len() + 1,
                "{name} has no help"
            );
            assert_eq!(block[1], format!("# TYPE {full} {kind}"));
            assert!(block[2].starts_with(&format!("{full} ")), "{block:?}");
        }
        for (series, value) in [
            ("connections", "3"),
            ("tcp_accepted_total", "7"),
            ("commands_expired_total", "1"),
            ("bridge_connected", "1"),
            ("bridge_queue_age_seconds", "2.5"),
            ("bridge_dropped_total", "0"),
        ] {
            let line = format!("\nfleet_gateway_{series} {value}\n");
            assert!(text.contains(&line), "{series} != {value}:\n{text}");
        }
        // An empty queue has no age, whatever the time.
        Metrics::set(&m.bridge_queue_oldest_ms, 0);
        assert!(m
            .render(0, 9_999)
            .contains("\nfleet_gateway_bridge_queue_age_seconds 0\n"));
    }
}
