//! The edge gateway: the mTLS edge with certificate identities and ACLs in front of an
//! embedded rumqttd router.
//!
//! Layers, top to bottom; a module imports only modules below it:
//!
//! 1. [`Gateway`] (module `assembly`): builds and wires everything; the only module that knows
//!    all others. The `gateway` binary calls it.
//! 2. Peers that never import each other:
//!    * [`edge`]: listener, TLS and identity, per-connection tasks driving the router, reload
//!      of its own TLS material and policy, shutdown.
//!    * [`services`]: the in-process command service and fleet API, the status owner, the
//!      presence registry and the update server.
//!    * [`bridge`]: the MQTT bridge to the cloud broker, with store-and-forward.
//!    * [`http`]: the metrics and health endpoint.
//! 3. What they share:
//!    * [`router`]: the embedded rumqttd router behind a narrow seam, and the in-process links
//!      services and the bridge open on it.
//!    * [`ports`]: what the peers hand each other through the assembly (session events, the
//!      status intake, direct delivery to a connection).
//!    * [`acl`]: topic matching and the per-role policy (pure).
//!    * [`store`]: the durable state, one SQLite file, and its shared handle.
//!    * [`firmware`]: the firmware cache on disk (content-addressed, chunk-verified, resumable).
//!    * [`config`]: typed configuration with documented defaults.
//!    * [`metrics`]: the counters and gauges.
//!    * [`tls`]: the rustls server configuration (client certificates mandatory, CRLs).
//!    * `fault`: test-only fault injection (feature `fault-injection`, off by default).
//!    * [`devpki`]: the development PKI the binary creates when no certificates are configured.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod acl;
mod assembly;
pub mod bridge;
pub mod config;
pub mod devpki;
pub mod edge;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod firmware;
pub mod http;
pub mod metrics;
pub mod ports;
pub mod router;
pub mod services;
pub mod store;
pub mod tls;

pub use assembly::{Gateway, GatewayError, GatewayHandle};
pub use config::GatewayConfig;
