//! Authorization: MQTT topic matching and the per-role policy. No I/O.

pub(crate) mod filter;
pub(crate) mod policy;

pub use policy::PolicyError;
pub(crate) use policy::{Decision, DenyReason, Policy};
