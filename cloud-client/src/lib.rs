//! The cloud-service SDK: send signed commands to devices and follow them, read the fleet's
//! status, watch command events, hand the gateway a new root of trust. It speaks the fleet API
//! (`fleet/api/{service_id}/...`, `fleet/events/...`) over MQTT with the service's
//! certificate. The CLI `fleetctl` is built on it.
//!
//! Through a cloud broker, [`FleetClientBuilder::fleet`] reaches every bridged gateway over one
//! connection: [`FleetClient::gateways`], [`FleetClient::fleet_status`],
//! [`FleetClient::send_class_command`] and [`FleetClient::fleet_update`] (one rollout with one
//! set of batch rules across gateways, [`FleetRolloutPlan`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), cloud_client::SdkError> {
//! use cloud_client::{FleetClient, SendCommand};
//! use std::time::Duration;
//!
//! let fleet = FleetClient::builder()
//!     .gateway("localhost", 8883)
//!     .pem_files("ca.crt", "svc-0001.crt", "svc-0001.key")
//!     // A key of the root's `commands` role: commands are signed before they leave.
//!     .command_key_file("trust/commands-1.key")
//!     .connect()
//!     .await?;
//! let handle = fleet
//!     .send_command(SendCommand {
//!         device_ids: vec!["dev-0001".into()],
//!         name: "reboot".into(),
//!         ttl_ms: 60_000,
//!         ..SendCommand::default()
//!     })
//!     .await?;
//! for record in handle.wait(Duration::from_secs(90)).await? {
//!     println!("{}: {:?}", record.device_id, record.state());
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod client;
mod error;
mod fleet;
mod fleet_rollout;
mod rollout;
mod signed;
mod trust;
mod updates;

pub use client::{CommandHandle, FleetClient, FleetClientBuilder, FleetEvent, SdkError};
pub use fleet::{
    FleetCommand, FleetCommandOutcome, FleetCommandRecord, FleetDevice, FleetStatus,
    FleetUpdateOptions, FleetUpdateReport, GatewayFailure,
};
pub use fleet_backoff::BackoffConfig;
pub use fleet_proto::signing::{SignError, Signer};
pub use fleet_proto::v1::{
    ApiErrorCode, CampaignAction, CampaignRecord, CampaignState, CommandEvent, CommandRecord,
    CommandState, DeployUpdate, DeviceStatus, GatewayPresence, ImageState, SendCommand,
    TargetRecord, TrustEvent, TrustRecord, TrustReport, UpdateError, UpdatePhase, UpdateRecord,
};
pub use fleet_rollout::{
    DeployBatch, FleetProgress, FleetRolloutPlan, FleetRolloutState, FleetTarget, TargetState,
};
pub use rollout::{BatchSize, BatchSizeError, Rollout};
pub use signed::DEFAULT_COMMAND_TTL;
pub use updates::{build_update, BuildError, BuiltUpdate, ImageSpec, UpdateSpec};
