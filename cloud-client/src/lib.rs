//! The cloud-service SDK (commands, updates, campaigns, fleet status) and the `fleetctl` CLI.
//! Built out by the command and update issues.
#![forbid(unsafe_code)]
