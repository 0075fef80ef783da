//! Shared fixtures for cross-crate integration tests and the benchmark tools.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod brokers;
pub mod cluster;
pub mod fleet;
pub mod mosquitto;
pub use fleet_testkit::mqtt;
pub mod procs;
pub mod proxy;
pub mod scripted_broker;
pub mod updates;
