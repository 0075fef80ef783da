//! Test support for every crate of the workspace, with no dependency on any product crate
//! (so `fleet-broker` and `device-client` can dev-depend on it without a cycle).
//!
//! * [`eventually`] and its twins: the one way a test waits for a condition, always with a
//!   deadline and a message saying what did not happen.
//! * [`Proc`] and [`run`]: child processes whose output is captured, whose every wait is
//!   bounded, and which are killed (and reported with their output) when a deadline passes or
//!   the fixture is dropped.
//! * [`Proc::ready`]: readiness from the process itself, one JSON line on stdout such as
//!   `{"ready":{"mqtt":"127.0.0.1:40123","http":"127.0.0.1:40124"}}`.
//! * [`CrashChild`]: an ignored test of the running test binary as a child to SIGKILL.
//! * [`mqtt`]: a deliberately small MQTT 3.1.1 client over TLS for load and hostile input.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod child;
mod crash;
mod eventually;
pub mod mqtt;

pub use child::{run, Proc, READY_KEY};
pub use crash::CrashChild;
pub use eventually::{eventually, eventually_async, eventually_blocking, Condition, POLL};
