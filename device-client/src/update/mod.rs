//! The update agent's pure parts (the driver comes with the update server):
//! * [`judge`]: signature over the exact received bytes, then structure, class, expiry and
//!   anti-rollback; a refusal carries its `UpdateError` code. Nothing is downloaded before it
//!   passes.
//! * [`download`]: what to request (windowed, one request outstanding, re-asked after a
//!   timeout) and whether each arriving chunk is genuine (length, index, Merkle proof).
//! * [`bitmap`]: the held chunks, persisted so a restart resumes where it stopped.

pub mod bitmap;
pub mod download;
pub mod judge;
