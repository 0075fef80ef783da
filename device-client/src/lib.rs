//! The device library: a device's connection to its fleet gateway, with commands that run at
//! most once, status reports that never wait for the network, and verified, resumable updates.
//!
//! # Getting started
//!
//! Build a [`DeviceClient`] with [`DeviceClient::builder`]: the gateway's address, the device's
//! certificate and key, and a state directory that survives restarts. [`start`] returns the
//! client and the [`Commands`] stream; the connection is kept up in the background.
//!
//! ```no_run
//! # async fn demo() -> Result<(), device_client::ClientError> {
//! use device_client::{DeviceClient, StatusReport};
//!
//! let (client, mut commands) = DeviceClient::builder()
//!     .gateway("localhost", 8883)
//!     .pem_files("ca.crt", "dev-0001.crt", "dev-0001.key")
//!     .state_dir("/var/lib/my-device/fleet")
//!     .start()?;
//! client.report(StatusReport::default()).await?;
//! while let Some(cmd) = commands.next().await {
//!     cmd.succeed(b"done".to_vec()).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # What the client does for you
//!
//! * **Commands** arrive as [`IncomingCommand`]s; answer each with `succeed`, `fail` or
//!   `reject`. Every delivery first passes the [`CommandGate`], persisted in a [`Journal`]: a
//!   command never runs twice, even across a restart, and an expired one never runs.
//! * **Status**: [`DeviceClient::report`] returns once the [`StatusReport`] is on disk
//!   ([`OutboxStore`]); reports leave in order when the gateway can take them.
//! * **Updates**, with [`DeviceClientBuilder::update_keys`]: manifests are checked against the
//!   [`TrustedKeys`] before anything is downloaded, chunks are verified one by one and the
//!   download resumes after a restart. Your [`UpdateHandler`] decides ([`Decision`]), installs
//!   ([`StagedImage`]), activates the new image on trial, tests it and commits or rolls back;
//!   the agent journals every step first, so a power cut anywhere resumes, never bricks or
//!   rolls back. [`SlotInstaller`] is the default, an A/B slot file per component switched
//!   all at once. A step that fails returns a [`HandlerError`], reported upward with its
//!   causes.
//!   Progress: [`DeviceClient::update_reports`] ([`UpdateProgress`]).
//! * **Reconnects** back off exponentially with full jitter ([`BackoffConfig`]).
//!
//! # The building blocks
//!
//! The command gate and journal and the status outbox are public for code that drives its own
//! connection or checks durability from outside: [`CommandGate`] and [`Outbox`] do no I/O,
//! [`Journal`] and [`OutboxStore`] keep them on disk.
//!
//! [`start`]: DeviceClientBuilder::start
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod client;
mod commands;
mod session;
mod status;
mod update;

pub use client::{
    ClientError, ClientStats, Commands, DeviceClient, DeviceClientBuilder, IncomingCommand,
    STATE_LOCK_FILE,
};
pub use commands::journal::{Journal, JournalError, FILE_NAME as JOURNAL_FILE_NAME};
pub use commands::{CommandGate, GateError, Verdict, DEFAULT_WINDOW as DEFAULT_COMMAND_WINDOW};
pub use fleet_backoff::BackoffConfig;
pub use fleet_proto::signing::TrustedKeys;
pub use fleet_proto::v1::{
    Command, CommandResult, CommandStatus, Health, StatusReport, UpdateProgress,
};
pub use status::store::{OutboxError, OutboxStore};
pub use status::{Outbox, Pushed};
pub use update::download::DownloadSettings;
pub use update::{Decision, HandlerError, SlotInstaller, StagedImage, UpdateHandler};

/// The README's Rust examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
