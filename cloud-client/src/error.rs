//! The SDK's error type, shared by the client and the request builders.

use std::path::PathBuf;
use std::time::Duration;

use fleet_proto::v1::ApiErrorCode;

/// Why an SDK call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdkError {
    /// A required builder setting is missing.
    #[error("fleet client configuration: {0}")]
    Config(String),
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] fleet_certs::ClientTlsError),
    /// The certificate is not a service's.
    #[error("the certificate is a {0} certificate; the fleet API needs a service certificate")]
    NotAService(String),
    /// No connection to the gateway within the time given.
    #[error("could not connect to the gateway within {0:?} (last error: {1})")]
    Connect(Duration, String),
    /// The gateway did not answer in time.
    #[error("no answer from the gateway within {0:?}")]
    Timeout(Duration),
    /// The gateway refused the request.
    #[error("the gateway refused the request ({code:?}): {message}")]
    Api {
        /// The class of failure.
        code: ApiErrorCode,
        /// The gateway's explanation.
        message: String,
    },
    /// The gateway's answer was not what the request expects.
    #[error("unexpected answer from the gateway: {0}")]
    Protocol(String),
    /// The client has stopped.
    #[error("the fleet client has stopped")]
    Stopped,
    /// A command or a withdrawal is to be signed but no `commands` role key is configured
    /// (nothing is sent unsigned).
    #[error("no command signing key: commands and update withdrawals are signed with a key of the root's commands role (FleetClientBuilder::command_key_file or command_signer; fleetctl --command-key)")]
    NoCommandKey,
    /// A command signing key file is unusable.
    #[error("command signing key {path}: {reason}")]
    CommandKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A signer (a key file, an HSM) failed.
    #[error(transparent)]
    Sign(#[from] fleet_proto::signing::SignError),
    /// One gateway of a fleet-wide operation failed it.
    #[error("gateway {gateway_id}: {what}: {source}")]
    Gateway {
        /// The gateway.
        gateway_id: String,
        /// What was being done.
        what: String,
        /// Why it failed.
        source: Box<SdkError>,
    },
    /// The request is not valid (found before anything was signed or sent).
    #[error("invalid request: {0}")]
    Invalid(String),
}
