//! The update agent.
//! * [`machine`]: the agent as a state machine over a storage trait and the application's
//!   hooks: its phases, what is journaled before each, what a restart does in each.
//! * [`judge`]: signature over the exact received bytes, then structure, class, expiry and
//!   anti-rollback; a refusal carries its `UpdateError` code. Nothing is downloaded before it
//!   passes.
//! * [`download`]: what to request (windowed, one request outstanding, re-asked after a
//!   timeout) and whether each arriving chunk is genuine (length, index, Merkle proof).
//! * [`bitmap`]: the held chunks, persisted so a restart resumes where it stopped.
//! * [`install`]: the application's hooks ([`UpdateHandler`]) and the default A/B slots.
//! * [`storage`]: the journal and staged files ([`storage::DirStorage`] in the state
//!   directory; a simulated disk that loses power in tests).
//! * `agent`: the thread that runs the machine beside the connection.

pub(crate) mod agent;
pub(crate) mod bitmap;
pub(crate) mod download;
pub(crate) mod install;
pub(crate) mod judge;
pub(crate) mod machine;
#[cfg(test)]
mod machine_tests;
#[cfg(test)]
mod power_loss;
pub(crate) mod storage;

pub(crate) use agent::UpdateConfig;
pub use install::{Decision, HandlerError, SlotInstaller, StagedImage, UpdateHandler};
pub(crate) use machine::{build_time_ms, DEFAULT_STORAGE_BUDGET};
