//! Fleet-wide operations over one connection to the cloud broker
//! ([`FleetClientBuilder::fleet`](crate::FleetClientBuilder::fleet)): the status of every
//! device on every online gateway, and a command to every device of a class across gateways.
//! Each gateway is asked in parallel, each request bounded by the client's request timeout; a
//! gateway that does not answer is reported, never fatal to the others.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_proto::v1::{CommandRecord, DeviceStatus, GatewayPresence, SendCommand};
use tokio::task::JoinSet;

use crate::client::{CommandHandle, FleetClient, SdkError};
use crate::rollout::class_of;
use crate::signed::new_command_id;

/// A gateway that did not answer, or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayFailure {
    /// The gateway.
    pub gateway_id: String,
    /// What went wrong, for a human.
    pub error: String,
}

/// One device, and the gateway that reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetDevice {
    /// The gateway.
    pub gateway_id: String,
    /// Its status as that gateway last knew it.
    pub status: DeviceStatus,
}

impl FleetDevice {
    /// The class the device last told its gateway (its presence, else its status report).
    pub fn device_class(&self) -> Option<&str> {
        class_of(&self.status)
    }
}

/// Every device of every online gateway.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetStatus {
    /// The gateways as their presence says, by id.
    pub gateways: Vec<GatewayPresence>,
    /// Every device of the gateways that answered, by gateway id then device id.
    pub devices: Vec<FleetDevice>,
    /// Online gateways that did not answer (or refused), by id.
    pub unreachable: Vec<GatewayFailure>,
}

impl FleetStatus {
    /// The devices of `class` (see [`FleetDevice::device_class`]).
    pub fn of_class<'a>(&'a self, class: &'a str) -> impl Iterator<Item = &'a FleetDevice> + 'a {
        self.devices
            .iter()
            .filter(move |d| d.device_class() == Some(class))
    }
}

/// One target's record of a fleet-wide command.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetCommandRecord {
    /// The gateway of the device.
    pub gateway_id: String,
    /// The device's command record.
    pub record: CommandRecord,
}

/// A command sent to devices on several gateways, under one command id.
pub struct FleetCommand {
    command_id: String,
    handles: Vec<(String, CommandHandle)>,
    failed: Vec<GatewayFailure>,
}

/// Where a fleet-wide command ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetCommandOutcome {
    /// The targets' records, by gateway id then device id.
    pub records: Vec<FleetCommandRecord>,
    /// Gateways the command could not be submitted to, or that did not bring every target
    /// to a final state in time.
    pub failed: Vec<GatewayFailure>,
}

impl FleetCommand {
    /// The command id (the same on every gateway).
    pub fn command_id(&self) -> &str {
        &self.command_id
    }

    /// The targets as submitted, by gateway.
    pub fn records(&self) -> Vec<FleetCommandRecord> {
        let mut out: Vec<FleetCommandRecord> = self
            .handles
            .iter()
            .flat_map(|(gw, h)| {
                h.records().iter().map(|r| FleetCommandRecord {
                    gateway_id: gw.clone(),
                    record: r.clone(),
                })
            })
            .collect();
        sort_records(&mut out);
        out
    }

    /// Gateways the command could not be submitted to.
    pub fn failed(&self) -> &[GatewayFailure] {
        &self.failed
    }

    /// Waits until every target on every gateway has a final state, or `timeout` passes
    /// (each gateway's handle is followed in parallel; see [`CommandHandle::wait`]). A gateway
    /// that does not finish in time is in [`FleetCommandOutcome::failed`] with its targets'
    /// records as submitted.
    pub async fn wait(self, timeout: Duration) -> FleetCommandOutcome {
        let mut set = JoinSet::new();
        let mut submitted = BTreeMap::new();
        for (gw, h) in self.handles {
            submitted.insert(gw.clone(), h.records().to_vec());
            set.spawn(async move { (gw, h.wait(timeout).await) });
        }
        let mut out = FleetCommandOutcome {
            records: Vec::new(),
            failed: self.failed,
        };
        while let Some(done) = set.join_next().await {
            let Ok((gw, result)) = done else { continue };
            let records = match result {
                Ok(records) => records,
                Err(e) => {
                    out.failed.push(GatewayFailure {
                        gateway_id: gw.clone(),
                        error: e.to_string(),
                    });
                    submitted.get(&gw).cloned().unwrap_or_default()
                }
            };
            out.records
                .extend(records.into_iter().map(|record| FleetCommandRecord {
                    gateway_id: gw.clone(),
                    record,
                }));
        }
        sort_records(&mut out.records);
        out.failed.sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
        out
    }
}

fn sort_records(r: &mut [FleetCommandRecord]) {
    r.sort_by(|a, b| {
        (&a.gateway_id, &a.record.device_id).cmp(&(&b.gateway_id, &b.record.device_id))
    });
}

impl FleetClient {
    /// Every device on every online gateway ([`gateways`](Self::gateways) with `online`), by
    /// gateway id then device id: one GetStatus per gateway, all in parallel, each bounded by
    /// the request timeout. A gateway that does not answer is listed in
    /// [`FleetStatus::unreachable`]. Only on a fleet connection.
    pub async fn fleet_status(&self) -> Result<FleetStatus, SdkError> {
        let gateways = self.gateways().await?;
        let mut set = JoinSet::new();
        for p in gateways.iter().filter(|p| p.online) {
            let client = self.gateway(&p.gateway_id)?;
            set.spawn(async move {
                let result = client.status(&[]).await;
                (client, result)
            });
        }
        let mut out = FleetStatus {
            gateways,
            ..FleetStatus::default()
        };
        while let Some(done) = set.join_next().await {
            let Ok((client, result)) = done else { continue };
            let gateway_id = client.gateway_id().unwrap_or_default().to_owned();
            match result {
                Ok(devices) => out
                    .devices
                    .extend(devices.into_iter().map(|status| FleetDevice {
                        gateway_id: gateway_id.clone(),
                        status,
                    })),
                Err(e) => out.unreachable.push(GatewayFailure {
                    gateway_id,
                    error: e.to_string(),
                }),
            }
        }
        out.devices.sort_by(|a, b| {
            (&a.gateway_id, &a.status.device_id).cmp(&(&b.gateway_id, &b.status.device_id))
        });
        out.unreachable
            .sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
        Ok(out)
    }

    /// Sends a command to every device of `class` on every online gateway (the class each
    /// device last told its gateway, from [`fleet_status`](Self::fleet_status)): one
    /// SendCommand per gateway naming its devices, all under one command id (`req.command_id`,
    /// or one the SDK picks), signed as [`send_command`](Self::send_command) signs. `req`
    /// gives `name`, `payload`, `ttl_ms`; its `device_ids` and `device_class` must be empty.
    /// Gateways that do not answer the status query or refuse the command are in
    /// [`FleetCommand::failed`]; [`SdkError::Api`] `NOT_FOUND` when no device of the class is
    /// known anywhere.
    pub async fn send_class_command(
        &self,
        class: &str,
        mut req: SendCommand,
    ) -> Result<FleetCommand, SdkError> {
        if !req.device_ids.is_empty() || !req.device_class.is_empty() {
            return Err(SdkError::Invalid(
                "a class command names its class only: leave device_ids and device_class empty"
                    .into(),
            ));
        }
        if class.is_empty() {
            return Err(SdkError::Invalid("no device class given".into()));
        }
        if req.command_id.is_empty() {
            req.command_id = new_command_id();
        }
        let status = self.fleet_status().await?;
        let mut targets: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in status.of_class(class) {
            targets
                .entry(d.gateway_id.clone())
                .or_default()
                .push(d.status.device_id.clone());
        }
        if targets.is_empty() {
            return Err(SdkError::Api {
                code: fleet_proto::v1::ApiErrorCode::NotFound,
                message: format!("no device of class {class:?} on any reachable gateway"),
            });
        }
        let mut set = JoinSet::new();
        for (gw, devices) in targets {
            let client = self.gateway(&gw)?;
            let req = SendCommand {
                device_ids: devices,
                ..req.clone()
            };
            set.spawn(async move { (gw, client.send_command(req).await) });
        }
        let mut out = FleetCommand {
            command_id: req.command_id,
            handles: Vec::new(),
            failed: status.unreachable,
        };
        while let Some(done) = set.join_next().await {
            let Ok((gw, result)) = done else { continue };
            match result {
                Ok(h) => out.handles.push((gw, h)),
                Err(e) => out.failed.push(GatewayFailure {
                    gateway_id: gw,
                    error: e.to_string(),
                }),
            }
        }
        out.handles.sort_by(|a, b| a.0.cmp(&b.0));
        out.failed.sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
        Ok(out)
    }
}
