//! Shared fixtures for cross-crate integration tests and the benchmark tools.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod crash;
pub mod fleet;
pub mod mosquitto;
pub mod mqtt;
pub mod procs;
pub mod proxy;
pub mod updates;
