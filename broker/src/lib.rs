//! The edge gateway: the mTLS edge with certificate identities and ACLs in front of an
//! embedded rumqttd router.
//!
//! * [`bridge`]: the MQTT bridge to the cloud broker, with store-and-forward.
//! * [`config`]: typed configuration with documented defaults.
//! * [`tls`]: the rustls server configuration (client certificates mandatory, CRLs).
//! * [`acl`]: topic matching and the per-role policy (pure).
//! * [`edge`]: listener, per-connection tasks, identity binding, reload, shutdown.
//! * `fault`: test-only fault injection (feature `fault-injection`, off by default).
//! * [`http`]: the metrics and health endpoint.
//! * [`firmware`]: the firmware cache on disk (content-addressed, chunk-verified, resumable).
//! * [`router`]: the embedded rumqttd router and its in-process links.
//! * [`services`]: the in-process command service, fleet API and status registry.
//! * [`store`]: the durable state, one SQLite file.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod acl;
pub mod bridge;
pub mod config;
pub mod devpki;
pub mod edge;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod firmware;
pub mod http;
pub mod metrics;
pub mod router;
pub mod services;
pub mod store;
pub mod tls;

pub use config::GatewayConfig;
pub use edge::{Gateway, GatewayError, GatewayHandle};
