//! Authorization: MQTT topic matching and the per-role policy. No I/O.

mod authorizer;
pub(crate) mod filter;
pub(crate) mod policy;

pub(crate) use authorizer::PolicyAuthorizer;
pub use policy::PolicyError;
pub(crate) use policy::{Decision, Policy};
