//! Authorization: MQTT topic matching and the per-role policy. No I/O.

pub mod filter;
pub mod policy;

pub use policy::{Decision, DenyReason, Policy, PolicyError};
