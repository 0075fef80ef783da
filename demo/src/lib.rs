//! The demo's building blocks, also used by the update benchmark: a simulated fleet of devices
//! on the real device library in one process (see [`fleet`]). The `demo` binary runs the
//! whole product on one machine: `cargo run --release --bin demo`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod fleet;
