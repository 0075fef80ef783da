//! The device library: reconnecting session, commands, status reports and the update agent.
//! Built out by the device-library issue; the protocol contract lives in `fleet-proto`.
#![forbid(unsafe_code)]
