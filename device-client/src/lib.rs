//! The device library: reconnecting session, commands, status reports and the update agent.
//!
//! The protocol logic is I/O-free state machines (values in, decisions out); a tokio/rumqttc
//! layer ([`DeviceClient`]) drives them:
//! * [`session`]: the connection's protocol logic (subscribe, presence, outbox window, acks).
//! * [`backoff`]: reconnect delays, exponential with full jitter.
//! * [`commands`]: the command gate (never run a command twice, even across a restart; never
//!   run an expired one) and its persisted journal.
//! * [`update`]: the update agent's manifest judgement and verified, resumable download.
//! * [`status`]: the status outbox (bounded, persisted, in order, sequence across restarts).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
pub mod commands;
pub mod session;
pub mod status;
pub mod update;

pub use client::{
    ClientError, ClientStats, Commands, DeviceClient, DeviceClientBuilder, IncomingCommand,
};
pub use fleet_proto::v1::{Command, CommandResult, CommandStatus, Health, StatusReport};

/// The README's Rust examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
