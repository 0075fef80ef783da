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
pub(crate) mod bitmap;
pub(crate) mod download;
pub(crate) mod install;
pub(crate) mod judge;
pub(crate) mod state;

pub(crate) use agent::UpdateConfig;
pub use install::{Decision, HandlerError, SlotInstaller, StagedImage, UpdateHandler};
