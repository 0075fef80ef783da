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
//! * **Commands** arrive as [`IncomingCommand`]s, each signed by the `commands` role of the
//!   device's root of trust (see below) and verified before anything else sees it; answer
//!   each with `succeed`, `fail` or `reject`. Every verified delivery then passes the
//!   [`CommandGate`], persisted in a [`Journal`]: a command never runs twice, even across a
//!   restart or after the gate has forgotten it (its replay floor), and an expired one never
//!   runs.
//! * **Status**: [`DeviceClient::report`] returns once the [`StatusReport`] is on disk
//!   ([`OutboxStore`]); reports leave in order when the gateway can take them.
//! * **Updates**: manifests are checked against the `updates` role of the current root (its
//!   keys and threshold) before anything is downloaded, chunks are verified one by one and the
//!   download resumes after a restart. Your [`UpdateHandler`] decides ([`Decision`]), installs
//!   ([`StagedImage`]), activates the new image on trial, tests it and commits or rolls back;
//!   the agent journals every step first, so a power cut anywhere resumes, never bricks or
//!   rolls back. [`SlotInstaller`] is the default, an A/B slot file per component switched
//!   all at once. A step that fails returns a [`HandlerError`], reported upward with its
//!   causes. An offer is withdrawn only by a withdrawal signed by the `commands` role naming
//!   that exact manifest; an empty retained message withdraws nothing.
//!   Progress: [`DeviceClient::update_reports`] ([`UpdateProgress`]).
//! * **Reconnects** back off exponentially with full jitter ([`BackoffConfig`]).
//!
//! # Root of trust on the device
//!
//! The device is provisioned with a root ([`DeviceClientBuilder::trust_root`] or
//! [`trust_root_file`](DeviceClientBuilder::trust_root_file)): a signed document naming the
//! keys and thresholds of three roles, `root` (signs roots, kept offline), `updates` (signs
//! manifests) and `commands` (signs commands and withdrawals). It must be signed by a
//! threshold of its own root keys, or [`start`] fails. Newer roots arrive in band on
//! `fleet/trust/roots`: one is taken only if a threshold of the current root's keys and of
//! its own signed it, its version is higher (never a rollback) and it has not expired. It is
//! written to [`ROOT_FILE`] in the state directory before it is used, and a restart starts
//! from it (a corrupt file is logged and counted, [`ClientStats::root_file_rejected`], and the
//! provisioned root is used). Rotating or revoking an `updates` or `commands` key is a new
//! root; an update already downloading keeps the manifest it verified. The device reports
//! what it holds and what it last refused in a retained `TrustReport` on
//! `devices/{id}/trust` (and its root version in presence). An expired root freezes the
//! device: it refuses every command and manifest, says so in the report, and waits for a
//! newer root. Expiry is judged by a clock that never goes below the build time or the newest
//! issue time the update agent accepted. Without any root the device runs but refuses every
//! command (NO_ROOT) and every update.
//!
//! Commands are checked ([`fleet_proto::command::verify_command`]: signatures, this device
//! or its class, expiry, not-before) before the command gate sees them; a refusal is answered
//! at once with its reason and the command's digest and counted in
//! [`ClientStats::commands_refused`], never recorded, so a forged copy of a real command id
//! cannot burn that id.
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
mod trust;
mod update;

pub use client::{
    ClientError, ClientStats, Commands, DeviceClient, DeviceClientBuilder, IncomingCommand,
    STATE_LOCK_FILE,
};
pub use commands::journal::{Journal, JournalError, FILE_NAME as JOURNAL_FILE_NAME};
pub use commands::{CommandGate, GateError, Verdict, DEFAULT_WINDOW as DEFAULT_COMMAND_WINDOW};
pub use fleet_backoff::BackoffConfig;
pub use fleet_proto::v1::{
    Command, CommandResult, CommandStatus, Health, StatusReport, UpdateProgress,
};
pub use status::store::{OutboxError, OutboxStore};
pub use status::{Outbox, Pushed};
pub use trust::ROOT_FILE;
pub use update::download::DownloadSettings;
pub use update::{Decision, HandlerError, SlotInstaller, StagedImage, UpdateHandler};

/// The README's Rust examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
