//! Gateway configuration: typed, with documented defaults, validated before any port is bound.
//!
//! Sources, later ones winning: built-in defaults, the TOML file given with `--config`, then
//! environment variables `GATEWAY__SECTION__KEY` (for example `GATEWAY__LISTEN=0.0.0.0:8883`,
//! `GATEWAY__LIMITS__MAX_CONNECTIONS=20000`). Every option is described in
//! `broker/gateway.example.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_certs::Role;
use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address of the mTLS MQTT listener. Default `127.0.0.1:8883`: local only until the
    /// operator decides otherwise.
    pub listen: SocketAddr,
    /// Directory for the gateway's state; with no TLS files configured, the development PKI is
    /// created in `DATA_DIR/pki` on first start. Default `gateway-data`.
    pub data_dir: PathBuf,
    /// TLS files and handshake limits.
    pub tls: TlsSettings,
    /// Connection and packet limits.
    pub limits: Limits,
    /// Queues and caps of the MQTT core.
    pub mqtt: MqttSettings,
    /// Authorization.
    pub acl: AclSettings,
    /// How identities are read from certificates.
    pub identity: IdentitySettings,
    /// The command service.
    pub commands: CommandSettings,
    /// The update server.
    pub updates: UpdateSettings,
    /// The bridge to the cloud MQTT broker.
    pub bridge: BridgeSettings,
    /// The metrics and health endpoint.
    pub metrics: MetricsSettings,
    /// The fleet's root of trust, which the gateway distributes (it holds no key).
    pub trust: TrustSettings,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
            data_dir: PathBuf::from("gateway-data"),
            tls: TlsSettings::default(),
            limits: Limits::default(),
            mqtt: MqttSettings::default(),
            acl: AclSettings::default(),
            identity: IdentitySettings::default(),
            commands: CommandSettings::default(),
            updates: UpdateSettings::default(),
            bridge: BridgeSettings::default(),
            metrics: MetricsSettings::default(),
            trust: TrustSettings::default(),
        }
    }
}

/// TLS files. Either all of `ca`, `cert` and `key` are set, or none (embedded development PKI).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM bundle of the CAs whose certificates clients may present.
    pub ca: Option<PathBuf>,
    /// PEM CRL(s) of those CAs; reloaded on SIGHUP. Optional.
    pub crl: Option<PathBuf>,
    /// What a CRL past its nextUpdate leads to: `warn` (the default: a WARN line and the
    /// `crl_stale` gauge; clients are still checked against it) or `refuse` (every CONNECT is
    /// refused, and live sessions closed, until a fresh CRL is loaded).
    pub stale_crl: StaleCrl,
    /// The gateway's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// The gateway's private key (PEM, PKCS#8 or SEC1).
    pub key: Option<PathBuf>,
    /// Longest a TLS handshake may take before the connection is dropped. Default 10 s: slow
    /// radio links need seconds; an idle socket must not hold a slot for longer.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            ca: None,
            crl: None,
            stale_crl: StaleCrl::Warn,
            cert: None,
            key: None,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// What a CRL past its nextUpdate leads to.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StaleCrl {
    /// Warn and count; keep using it.
    #[default]
    Warn,
    /// Refuse every client until a fresh CRL is loaded.
    Refuse,
}

/// Limits that protect the gateway from its clients.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most simultaneous authenticated client sessions. When full, a new client is answered
    /// CONNACK 0x03 (server unavailable) and closed. Default 10,000.
    pub max_connections: usize,
    /// Largest MQTT packet accepted, in bytes; a larger one closes the connection. Default
    /// 2 MiB: a 1 MiB firmware chunk plus framing fits.
    pub max_packet_size: usize,
    /// Connections still in their TLS handshake or before CONNECT, overall. When full, the
    /// oldest pending one is dropped for the newcomer, so idle sockets never keep a client out.
    /// Separate from `max_connections`. Default 1,024.
    pub max_handshakes: usize,
    /// The same, per source address. Default 256.
    pub max_handshakes_per_source: usize,
    /// Longest wait for CONNECT after the handshake. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A write to a client that makes no progress for this long closes the connection (a
    /// client that does not read cannot hold the gateway's close signals back). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_packet_size: 2 << 20,
            max_handshakes: 1024,
            max_handshakes_per_source: 256,
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Queues, windows and caps of the MQTT core (see `fleet_mqtt::Settings` for what each does).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// QoS 1/2 messages in flight to one client. Default 32.
    pub max_inflight: usize,
    /// Incoming QoS 1/2 publishes one client may have unanswered while their subscribers are
    /// full; over it the client is disconnected. Default 100 (the default in-flight window of
    /// common clients); at least 64.
    pub max_held: usize,
    /// Incoming QoS 2 ids awaiting PUBREL per client; over it the client is disconnected.
    /// Default 100.
    pub max_unreleased: usize,
    /// Messages queued for one online client beyond its in-flight ones. Default 1,000.
    pub queue_messages: usize,
    /// Payload bytes queued for one online client. Default 8 MiB.
    pub queue_bytes: usize,
    /// Messages kept for one offline persistent session (oldest dropped, counted). Default 1,000.
    pub offline_messages: usize,
    /// Payload bytes kept for one offline persistent session. Default 16 MiB.
    pub offline_bytes: usize,
    /// A client whose queue stays full this long is disconnected. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub stalled_after: Duration,
    /// A persistent session offline this long is removed. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
}

impl Default for MqttSettings {
    fn default() -> Self {
        let d = fleet_mqtt::Settings::default();
        MqttSettings {
            max_inflight: d.max_inflight_out,
            max_held: d.max_held_in,
            max_unreleased: d.max_unreleased_in,
            queue_messages: d.queue_messages,
            queue_bytes: d.queue_bytes,
            offline_messages: d.offline_messages,
            offline_bytes: d.offline_bytes,
            stalled_after: d.stalled_after,
            session_expiry: d.session_expiry,
        }
    }
}

impl MqttSettings {
    /// The engine's settings, with the ACL's choice for denied publishes.
    pub(crate) fn engine(&self, denied: DeniedPublish) -> fleet_mqtt::Settings {
        fleet_mqtt::Settings {
            max_inflight_out: self.max_inflight,
            max_held_in: self.max_held,
            max_unreleased_in: self.max_unreleased,
            queue_messages: self.queue_messages,
            queue_bytes: self.queue_bytes,
            offline_messages: self.offline_messages,
            offline_bytes: self.offline_bytes,
            stalled_after: self.stalled_after,
            session_expiry: self.session_expiry,
            denied_publish: match denied {
                DeniedPublish::Drop => fleet_mqtt::DeniedPublish::AckAndDrop,
                DeniedPublish::Disconnect => fleet_mqtt::DeniedPublish::Disconnect,
            },
        }
    }
}

/// What happens to a PUBLISH the ACL denies.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeniedPublish {
    /// Drop it (acknowledged at QoS 1 so the client does not retry forever), log and count.
    #[default]
    Drop,
    /// Log, count and close the connection.
    Disconnect,
}

/// Authorization settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AclSettings {
    /// ACL policy file (TOML); reloaded on SIGHUP. Default: the built-in policy
    /// (`broker/src/acl/default_policy.toml`).
    pub policy: Option<PathBuf>,
    /// What to do with a denied PUBLISH. Default `drop`.
    pub on_denied_publish: DeniedPublish,
}

/// Identity settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct IdentitySettings {
    /// Role given to certificates without a `urn:fleet:` SAN URI (their CN is the id). Default
    /// none: such certificates are refused.
    pub cn_fallback_role: Option<Role>,
}

/// The root of trust the gateway distributes on `fleet/trust/roots`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TrustSettings {
    /// An encoded SignedRoot (such as the development PKI's `trust/root.bin`): the gateway's
    /// first root, taken when it holds none yet (or, if newer, as the successor of the newest
    /// it holds, by the same rules as a device). Newer roots arrive through the fleet API
    /// (PublishRoot) and are kept in the store. Default none: the gateway distributes nothing
    /// until a service publishes a first root.
    pub root: Option<PathBuf>,
}

/// The command service's timing.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CommandSettings {
    /// Time to live of a command submitted without one. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Longest time to live a service may ask for; longer requests are cut to it. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// A command handed to a connected device without a result after this long is handed over
    /// again (with `SignedCommand.attempt` + 1). Reconnects re-deliver at once regardless.
    /// Default 30 s.
    #[serde(with = "humantime_serde")]
    pub redeliver_after: Duration,
    /// How long finished commands stay queryable before they are forgotten. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Most open (pending or delivered) commands per device; a submission that would exceed it
    /// is refused with LIMIT, so an absent device cannot grow the store without bound.
    /// Default 1000.
    pub max_open_per_device: u32,
    /// Accept unsigned SendCommand requests (name, payload, targets) and deliver them as
    /// SignedCommands without signatures. Default false: a command must be signed by the
    /// `commands` role of the fleet's root, and devices that hold a root refuse unsigned ones
    /// anyway; only for fleets whose devices have no root of trust yet.
    pub allow_unsigned: bool,
}

/// The bridge: an MQTT client of the cloud broker that carries this gateway's tree there
/// under `gateways/{gateway_id}/`, and the fleet API requests addressed to it back down.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeSettings {
    /// Upstream broker addresses, `HOST:PORT` each (mTLS; HOST is checked against its
    /// certificate): a list (`["a:8883", "b:8883"]`), one string, or in the environment a
    /// comma-separated list. The bridge connects to the first; a failed attempt or a lost
    /// connection moves it to the next, round robin. Empty (the default): no bridge.
    #[serde(deserialize_with = "one_or_many")]
    pub upstream: Vec<String>,
    /// This gateway's id upstream. Default: the id in the gateway's certificate.
    pub gateway_id: Option<String>,
    /// CA bundle the upstream broker's certificate must chain to. Default: `tls.ca` (or the
    /// development PKI's CA).
    pub ca: Option<PathBuf>,
    /// Client certificate and key presented upstream. Default: the gateway's own.
    pub cert: Option<PathBuf>,
    /// See `cert`.
    pub key: Option<PathBuf>,
    /// MQTT keep-alive upstream. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// The gateway's presence upstream (`gateways/{id}/presence`, retained) is published when
    /// the bridge connects and again when the device counts change, at most this often.
    /// Default 10 s.
    #[serde(with = "humantime_serde")]
    pub presence_interval: Duration,
    /// The presence is also published again, unchanged, once this has passed since the last
    /// time: a presence the upstream broker lost, or the will of an earlier connection it
    /// published after this connection's presence, is put right within it. At least
    /// `presence_interval`. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub presence_refresh: Duration,
    /// Reconnect delay: exponential from `reconnect_min` to `reconnect_max`, with full jitter.
    /// Defaults 500 ms and 30 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// See `reconnect_min`.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Disk budget of the store-and-forward queue (bytes of topics and payloads). Over it the
    /// oldest queued messages are dropped, logged and counted (`bridge_dropped`). Default
    /// 256 MiB.
    pub max_queue_bytes: u64,
    /// Local topic filters that flow up. Default: API responses, fleet events, device status,
    /// presence and update progress.
    pub up: Vec<String>,
    /// Local topic filters that flow down (subscribed upstream under the gateway's prefix).
    /// Default: the fleet API requests.
    pub down: Vec<String>,
    /// Characters the upstream broker does not take in a topic (it closes the connection of a
    /// client that publishes one). A local message whose upstream topic holds one of them is
    /// not sent up (it stays stored locally where it is stored anyway); it is counted
    /// (`bridge_refused_topics`) and logged. Default empty: Mosquitto, EMQX and HiveMQ take any
    /// UTF-8. For NATS set `". "`. The gateway id must hold none of them.
    pub refuse_topic_chars: String,
}

impl BridgeSettings {
    /// Whether a bridge is configured (at least one upstream address).
    pub fn enabled(&self) -> bool {
        !self.upstream.is_empty()
    }
}

/// Checks that the gateway id `id` holds none of `refuse` (`bridge.refuse_topic_chars`):
/// every upward topic starts with it, so the upstream broker would take nothing.
pub(crate) fn check_gateway_id(id: &str, refuse: &str) -> Result<(), ConfigError> {
    match id.chars().find(|c| refuse.contains(*c)) {
        None => Ok(()),
        Some(c) => Err(ConfigError::Invalid(format!(
            "the gateway id {id:?} holds {c:?}, which bridge.refuse_topic_chars says the upstream \
             broker does not take in a topic: choose another bridge.gateway_id"
        ))),
    }
}

/// `HOST:PORT` split, with a non-empty host and a port from 1 to 65535.
pub(crate) fn parse_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    (!host.is_empty()).then_some((host, port))
}

/// A list of strings given as a list, or as one string of comma-separated items (how an
/// environment variable carries a list). Items are trimmed; empty ones are left out.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s.split(',').map(str::to_owned).collect(),
        OneOrMany::Many(v) => v,
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect())
}

impl Default for BridgeSettings {
    fn default() -> Self {
        Self {
            upstream: Vec::new(),
            gateway_id: None,
            ca: None,
            cert: None,
            key: None,
            keep_alive: Duration::from_secs(30),
            presence_interval: Duration::from_secs(10),
            presence_refresh: Duration::from_secs(60),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            max_queue_bytes: 256 << 20,
            up: [
                "fleet/api/+/response",
                "fleet/events/#",
                "devices/+/status",
                "devices/+/presence",
                "devices/+/update/progress",
            ]
            .map(String::from)
            .to_vec(),
            down: vec!["fleet/api/+/request".into()],
            refuse_topic_chars: String::new(),
        }
    }
}

/// The Prometheus metrics and health endpoint (plain HTTP; keep it on a local address).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address of `GET /metrics` (Prometheus text format) and `GET /health`. Default
    /// `127.0.0.1:9464`. Unset (`metrics = {}` with no listen, or the environment variable
    /// set to an empty string) disables it.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

/// The update server: how chunks are handed out to devices.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct UpdateSettings {
    /// Chunks sent for one request that names no window. Default 16.
    pub default_window: u32,
    /// Most chunks sent for one request, whatever window it names (at most 256): with fair
    /// round-robin serving this bounds what one device can hold queued. Default 64.
    pub max_window: u32,
    /// The firmware cache's budget for one update: the most bytes its images may total (the
    /// sum of its components' sizes). A larger `CreateUpdate` is refused (`LIMIT`) before
    /// anything is stored, which also bounds what the gateway keeps per chunk (upload bitmaps,
    /// chunk digests, the Merkle trees it serves proofs from). Default 1 GiB (1073741824):
    /// above any firmware image we know of, and at the 1 KiB smallest chunk size at most 1 Mi
    /// chunks (32 MiB of digests).
    pub max_update_bytes: u64,
}

impl Default for UpdateSettings {
    fn default() -> Self {
        Self {
            default_window: 16,
            max_window: 64,
            max_update_bytes: 1 << 30,
        }
    }
}

impl Default for CommandSettings {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            redeliver_after: Duration::from_secs(30),
            retention: Duration::from_secs(7 * 24 * 3600),
            max_open_per_device: 1000,
            allow_unsigned: false,
        }
    }
}

/// Why the configuration is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file or environment could not be read or parsed.
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl GatewayConfig {
    /// Loads defaults, then `file` (if any), then `GATEWAY__*` environment variables, and
    /// validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(f) = file {
            builder = builder.add_source(config::File::from(f).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("GATEWAY")
                .prefix_separator("__")
                .separator("__"),
        );
        let cfg: GatewayConfig = builder.build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: &str| Err(ConfigError::Invalid(s.to_owned()));
        let t = &self.tls;
        let set = [t.ca.is_some(), t.cert.is_some(), t.key.is_some()];
        if set.iter().any(|s| *s) && !set.iter().all(|s| *s) {
            return bad("tls.ca, tls.cert and tls.key must be set together (or none, for the development PKI)");
        }
        if t.ca.is_none() && t.crl.is_some() {
            return bad("tls.crl needs tls.ca");
        }
        if t.handshake_timeout.is_zero()
            || self.limits.connect_timeout.is_zero()
            || self.limits.write_timeout.is_zero()
        {
            return bad("timeouts must be greater than zero");
        }
        let m = &self.mqtt;
        if [
            m.max_inflight,
            m.max_held,
            m.max_unreleased,
            m.queue_messages,
            m.queue_bytes,
        ]
        .contains(&0)
            || m.stalled_after.is_zero()
            || m.session_expiry.is_zero()
        {
            return bad("mqtt.* limits and durations must be greater than zero");
        }
        if m.max_held < 64 {
            // The gateway's own services keep up to 48 publishes unanswered (router::link).
            return bad("mqtt.max_held must be at least 64");
        }
        if m.max_inflight > 65_535 {
            return bad("mqtt.max_inflight must be at most 65535 (packet ids)");
        }
        if self.limits.max_connections == 0
            || self.limits.max_handshakes == 0
            || self.limits.max_handshakes_per_source == 0
        {
            return bad("limits.max_connections, max_handshakes and max_handshakes_per_source must be at least 1");
        }
        if !(1024..=(256 << 20)).contains(&self.limits.max_packet_size) {
            return bad("limits.max_packet_size must be between 1 KiB and 256 MiB");
        }
        let c = &self.commands;
        if c.default_ttl.is_zero() || c.redeliver_after.is_zero() || c.retention.is_zero() {
            return bad(
                "commands.default_ttl, redeliver_after and retention must be greater than zero",
            );
        }
        if c.max_open_per_device == 0 {
            return bad("commands.max_open_per_device must be at least 1");
        }
        if c.max_ttl < c.default_ttl {
            return bad("commands.max_ttl must be at least commands.default_ttl");
        }
        let b = &self.bridge;
        for up in &b.upstream {
            if parse_host_port(up).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "bridge.upstream {up:?} is not HOST:PORT (a port from 1 to 65535)"
                )));
            }
        }
        if b.presence_interval < Duration::from_secs(1) {
            return bad("bridge.presence_interval must be at least 1 s");
        }
        if b.presence_refresh < b.presence_interval {
            return bad("bridge.presence_refresh must be at least bridge.presence_interval");
        }
        if b.cert.is_some() != b.key.is_some() {
            return bad("bridge.cert and bridge.key must be set together");
        }
        if b.keep_alive < Duration::from_secs(5)
            || b.reconnect_min.is_zero()
            || b.reconnect_max < b.reconnect_min
        {
            return bad(
                "bridge.keep_alive must be at least 5 s, and 0 < reconnect_min <= reconnect_max",
            );
        }
        if b.max_queue_bytes < (1 << 20) {
            return bad("bridge.max_queue_bytes must be at least 1 MiB");
        }
        for f in b.up.iter().chain(&b.down) {
            if crate::acl::filter::check_filter(f).is_err() || f.starts_with('$') {
                return bad("bridge.up and bridge.down must be valid MQTT topic filters");
            }
        }
        if b.refuse_topic_chars.contains(['/', '+', '#']) {
            return bad("bridge.refuse_topic_chars cannot hold '/', '+' or '#'");
        }
        if let Some(id) = &b.gateway_id {
            check_gateway_id(id, &b.refuse_topic_chars)?;
        }
        let u = &self.updates;
        if u.default_window == 0 || u.max_window < u.default_window || u.max_window > 256 {
            return bad(
                "updates.default_window must be at least 1, and updates.max_window between it and 256",
            );
        }
        if u.max_update_bytes == 0 {
            return bad("updates.max_update_bytes must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_local() {
        let c = GatewayConfig::default();
        assert!(c.validate().is_ok());
        assert!(c.listen.ip().is_loopback());
    }

    #[test]
    fn file_values_and_errors() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("g.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:0\"\n[limits]\nmax_connections = 5\nconnect_timeout = \"3s\"\n[acl]\non_denied_publish = \"disconnect\"\n").unwrap_or_else(|e| panic!("{e}"));
        let c = GatewayConfig::load(Some(&f)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.limits.max_connections, 5);
        assert_eq!(c.limits.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.acl.on_denied_publish, DeniedPublish::Disconnect);
        for bad in [
            "listen = \"nowhere\"",
            "[limits]\nmax_connections = 0",
            "[limits]\nmax_packet_size = 10",
            "[mqtt]\nmax_held = 10",
            "[mqtt]\nqueue_messages = 0",
            "[limits]\nmax_handshakes = 0",
            "[limits]\nwrite_timeout = \"0s\"",
            "[tls]\nca = \"ca.crt\"",
            "unknown_key = 1",
            "[identity]\ncn_fallback_role = \"admin\"",
            "[commands]\nredeliver_after = \"0s\"",
            "[commands]\nmax_ttl = \"1m\"",
            "[bridge]\nupstream = [\"a:8883\", \"b\"]",
            "[bridge]\nupstream = \"a:8883,:8883\"",
            "[bridge]\nupstream = \"a:0\"",
            "[bridge]\nupstream = [\"a:70000\"]",
            "[bridge]\npresence_interval = \"0s\"",
            "[bridge]\npresence_refresh = \"5s\"",
        ] {
            std::fs::write(&f, bad).unwrap_or_else(|e| panic!("{e}"));
            assert!(GatewayConfig::load(Some(&f)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_bridge_takes_one_address_a_list_or_a_comma_separated_string() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("g.toml");
        let load = |text: &str| {
            std::fs::write(&f, text).unwrap_or_else(|e| panic!("{e}"));
            GatewayConfig::load(Some(&f)).map(|c| c.bridge)
        };
        let b = load("").unwrap_or_else(|e| panic!("{e}"));
        assert!(!b.enabled());
        assert_eq!(b.presence_interval, Duration::from_secs(10));
        assert_eq!(b.presence_refresh, Duration::from_secs(60));
        let one = load("[bridge]\nupstream = \"cloud:8883\"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.upstream, ["cloud:8883"]);
        assert!(one.enabled());
        let list = load("[bridge]\nupstream = [\"a:8883\", \"[::1]:8884\"]")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(list.upstream, ["a:8883", "[::1]:8884"]);
        // How GATEWAY__BRIDGE__UPSTREAM arrives: one string.
        let env = load("[bridge]\nupstream = \"a:8883, b:8883\"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(env.upstream, ["a:8883", "b:8883"]);
        // The error names the bad address.
        let err = load("[bridge]\nupstream = [\"a:8883\", \"nowhere\"]")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("\"nowhere\" is not HOST:PORT"), "{err}");
    }

    #[test]
    fn refused_topic_characters_are_checked_against_the_gateway_id() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("g.toml");
        let load = |text: &str| {
            std::fs::write(&f, text).unwrap_or_else(|e| panic!("{e}"));
            GatewayConfig::load(Some(&f)).map(|c| c.bridge)
        };
        let b = load("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.refuse_topic_chars, "");
        let nats = load("[bridge]\nrefuse_topic_chars = \". \"\ngateway_id = \"gw-1\"")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(nats.refuse_topic_chars, ". ");
        let err = load("[bridge]\nrefuse_topic_chars = \". \"\ngateway_id = \"site.1\"")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("\"site.1\" holds '.'") && err.contains("bridge.gateway_id"),
            "{err}"
        );
        assert!(load("[bridge]\nrefuse_topic_chars = \"/\"").is_err());
        assert!(check_gateway_id("gw 1", " ").is_err());
        assert!(check_gateway_id("gw.1", "").is_ok());
    }
}
