//! The edge gateway: the mTLS edge with certificate identities and ACLs in front of the
//! gateway's own MQTT core (crate `fleet-mqtt`).
//!
//! # Public API
//!
//! [`Gateway::bind`] loads the TLS material ([`TlsFiles`]) and policy, binds the ports and
//! returns a [`Gateway`]; [`Gateway::serve`] runs it until shutdown, and a [`GatewayHandle`]
//! reloads it and reads its [`Metrics`]. [`GatewayConfig`] and its settings types are the typed
//! configuration with documented defaults. Around that:
//!
//! * the errors that explain a refusal to start ([`GatewayError`] and its sources);
//! * [`Store`], to open and inspect a gateway's state file offline (integrity, device state);
//! * [`ensure_dev_pki`], the development PKI the `gateway` binary creates when no certificates
//!   are configured;
//! * `fault`: test-only fault injection (feature `fault-injection`, off by default).
//!
//! Everything else is internal.
//!
//! # Layers
//!
//! Top to bottom; a module imports only modules below it (all private):
//!
//! 1. [`Gateway`] (module `assembly`): builds and wires everything; the only module that knows
//!    all others. The `gateway` binary calls it.
//! 2. Peers that never import each other:
//!    * `edge`: listener, TLS and identity, per-connection tasks driving the core, reload of
//!      its own TLS material and policy, shutdown.
//!    * `services`: the in-process command service and fleet API, the status owner, the
//!      presence registry and the update server.
//!    * `bridge`: the MQTT bridge to the cloud broker, with store-and-forward.
//!    * `http`: the metrics and health endpoint.
//! 3. What they share:
//!    * `router`: the driver of the MQTT core (`fleet_mqtt::Engine`): its lock, the wake-up of
//!      each connection, the clock, and the in-process links services and the bridge open on it.
//!    * `ports`: what the peers hand each other through the assembly (session events, the
//!      status intake, direct delivery to a connection).
//!    * `acl`: topic matching and the per-role policy (pure).
//!    * `store`: the durable state, one SQLite file, and its shared handle.
//!    * `firmware`: the firmware cache on disk (content-addressed, chunk-verified, resumable).
//!    * `config`: typed configuration with documented defaults.
//!    * `metrics`: the counters and gauges.
//!    * `tls`: the rustls server configuration (client certificates mandatory, CRLs).
//!    * `fault`: test-only fault injection (feature `fault-injection`, off by default).
//!    * `devpki`: the development PKI the binary creates when no certificates are configured.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod acl;
mod assembly;
mod bridge;
mod config;
mod devpki;
mod edge;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod firmware;
/// Entry points for the fuzz targets in `fuzz/`; not an API (see the module).
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod metrics;
mod ports;
mod router;
mod services;
mod store;
mod tls;

pub use acl::PolicyError;
pub use assembly::{Gateway, GatewayError, GatewayHandle};
pub use bridge::BridgeError;
pub use config::{
    AclSettings, BridgeSettings, CommandSettings, ConfigError, DeniedPublish, GatewayConfig,
    IdentitySettings, Limits, MetricsSettings, MqttSettings, StaleCrl, TlsSettings, TrustSettings,
    UpdateSettings,
};
pub use devpki::ensure as ensure_dev_pki;
pub use edge::EdgeError;
pub use metrics::Metrics;
pub use router::LinkError;
pub use store::{DeviceState, StatusOutcome, Store, StoreError, FILE_NAME as STORE_FILE_NAME};
pub use tls::{TlsError, TlsFiles};
