//! The update agent.
//! * [`judge`]: signature over the exact received bytes, then structure, class, expiry and
//!   anti-rollback; a refusal carries its `UpdateError` code. Nothing is downloaded before it
//!   passes.
//! * [`download`]: what to request (windowed, one request outstanding, re-asked after a
//!   timeout) and whether each arriving chunk is genuine (length, index, Merkle proof).
//! * [`bitmap`]: the held chunks, persisted so a restart resumes where it stopped.
//! * [`install`]: the application's hooks ([`UpdateHandler`]) and the default A/B slots.
//! * [`state`]: the agent's files (installed sequence, update in progress, staging).
//! * `agent`: the task that runs all of it beside the connection.

pub(crate) mod agent;
pub mod bitmap;
pub mod download;
pub mod install;
pub mod judge;
pub mod state;

pub use agent::UpdateConfig;
pub use install::{Decision, SlotInstaller, StagedImage, UpdateHandler};
