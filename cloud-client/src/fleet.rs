//! Fleet-wide operations over one connection to the cloud broker
//! ([`FleetClientBuilder::fleet`](crate::FleetClientBuilder::fleet)): the status of every
//! device on every online gateway, and a command to every device of a class across gateways.
//! Each gateway is asked in parallel, each request bounded by the client's request timeout; a
//! gateway that does not answer is reported, never fatal to the others. And an update rolled
//! out to a class across gateways under one set of batch rules
//! ([`fleet_update`](FleetClient::fleet_update)).

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_proto::v1::{
    CommandRecord, DeployUpdate, DeviceStatus, GatewayPresence, SendCommand, TargetRecord,
};
use tokio::task::JoinSet;
use tracing::warn;

use crate::client::{CommandHandle, FleetClient, SdkError};
use crate::fleet_rollout::{
    DeployBatch, FleetProgress, FleetRolloutPlan, FleetRolloutState, FleetTarget, TargetState,
};
use crate::rollout::{class_of, Rollout};
use crate::signed::new_command_id;
use crate::updates::BuiltUpdate;

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
    /// known anywhere. A gateway missing from the presence list at that moment (its retained
    /// presence not yet back after a cloud broker fail-over) is in neither: compare the
    /// gateways of [`FleetCommand::records`] with those you expect, and send it the same
    /// command id through [`gateway`](Self::gateway) (the id makes a repeat harmless).
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

/// How [`FleetClient::fleet_update`] drives a fleet rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetUpdateOptions {
    /// Batch size (of the whole fleet's targets) and failure threshold.
    pub rollout: Rollout,
    /// How often gateways with devices in flight are asked for their update records.
    /// Default 2 s.
    pub poll: Duration,
    /// How long to follow the rollout before [`SdkError::Timeout`]; the rollout's state stays
    /// on the gateways and a new call continues it. Default 1 h.
    pub timeout: Duration,
    /// Go on past a pause at the threshold found when starting (a rollout restored from the
    /// gateways pauses again where it paused). Default false.
    pub resume: bool,
}

impl Default for FleetUpdateOptions {
    fn default() -> Self {
        FleetUpdateOptions {
            rollout: Rollout::default(),
            poll: Duration::from_secs(2),
            timeout: Duration::from_secs(3600),
            resume: false,
        }
    }
}

/// Where a fleet rollout stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetUpdateReport {
    /// Completed or paused.
    pub state: FleetRolloutState,
    /// Counts.
    pub progress: FleetProgress,
    /// Every target in rollout order with its state.
    pub targets: Vec<(FleetTarget, TargetState)>,
    /// Online gateways that did not answer the status query (their devices are not targets).
    pub unreachable: Vec<GatewayFailure>,
}

impl FleetClient {
    /// Rolls `built` out to every device of its class on every online gateway, under ONE set
    /// of batch and threshold rules for the whole fleet ([`FleetRolloutPlan`]): each gateway
    /// holding targets gets the update registered and its images uploaded once (what it
    /// already holds is skipped), then fleet batch after fleet batch is handed to the
    /// gateways concerned (`DeployUpdate` with `add_targets`; each gateway's own campaign
    /// never pauses, the fleet rule does). Returns when the rollout completes or pauses.
    ///
    /// Restartable: it starts from the gateways' update records, so calling it again after
    /// the service died (or after a pause, with `resume`) continues the same rollout.
    /// `progress` is called after every change.
    pub async fn fleet_update(
        &self,
        built: &BuiltUpdate,
        opts: &FleetUpdateOptions,
        mut progress: impl FnMut(&FleetRolloutPlan),
    ) -> Result<FleetUpdateReport, SdkError> {
        let deadline = tokio::time::Instant::now() + opts.timeout;
        let update_id = built.manifest.update_id.clone();
        let status = self.fleet_status().await?;
        let targets: Vec<FleetTarget> = status
            .of_class(&built.manifest.device_class)
            .map(|d| FleetTarget {
                gateway_id: d.gateway_id.clone(),
                device_id: d.status.device_id.clone(),
            })
            .collect();
        let gateways: std::collections::BTreeSet<String> =
            targets.iter().map(|t| t.gateway_id.clone()).collect();
        // Register and upload on every gateway concerned, in parallel: its current targets
        // come back with the record.
        let mut set = JoinSet::new();
        for gw in &gateways {
            let client = self.gateway(gw)?;
            let built = built.clone();
            set.spawn(async move {
                let r: Result<Vec<TargetRecord>, SdkError> = async {
                    let rec = client.create_update(built.signed.clone()).await?;
                    client.upload_images(&built, &rec.images, |_, _| {}).await?;
                    Ok(client.get_update(&built.manifest.update_id).await?.targets)
                }
                .await;
                (client.gateway_id().unwrap_or_default().to_owned(), r)
            });
        }
        let mut records = BTreeMap::new();
        while let Some(done) = set.join_next().await {
            let (gw, r) = done.map_err(|e| SdkError::Protocol(format!("upload task: {e}")))?;
            match r {
                Ok(t) => {
                    records.insert(gw, t);
                }
                Err(e) => {
                    return Err(SdkError::Gateway {
                        gateway_id: gw,
                        what: "registering and uploading the update".into(),
                        source: Box::new(e),
                    })
                }
            }
        }
        let (mut plan, mut next) = FleetRolloutPlan::restore(targets, opts.rollout, &records);
        if opts.resume {
            next.extend(plan.resume());
        }
        loop {
            if !next.is_empty() {
                self.deploy_batches(&update_id, std::mem::take(&mut next))
                    .await?;
                progress(&plan);
            }
            if *plan.state() != FleetRolloutState::Running {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(SdkError::Timeout(opts.timeout));
            }
            tokio::time::sleep_until((now + opts.poll).min(deadline)).await;
            let before = plan.progress();
            for gw in plan.in_flight().into_keys() {
                match self.gateway(&gw)?.get_update(&update_id).await {
                    Ok(rec) => {
                        for t in &rec.targets {
                            next.extend(plan.on_record(&gw, t));
                        }
                    }
                    // Asked again at the next poll.
                    Err(e) => warn!(gateway = %gw, error = %e, "fleet rollout: no update record"),
                }
            }
            if next.is_empty() && plan.progress() != before {
                progress(&plan);
            }
        }
        Ok(FleetUpdateReport {
            state: plan.state().clone(),
            progress: plan.progress(),
            targets: plan.targets().to_vec(),
            unreachable: status.unreachable,
        })
    }

    /// Hands each gateway its devices of a fleet batch.
    async fn deploy_batches(
        &self,
        update_id: &str,
        batches: Vec<DeployBatch>,
    ) -> Result<(), SdkError> {
        for b in batches {
            let req = DeployUpdate {
                update_id: update_id.to_owned(),
                device_ids: b.device_ids,
                add_targets: true,
                // The fleet's rule pauses; the gateway's campaign never does.
                max_failures_percent: 100,
                ..DeployUpdate::default()
            };
            self.gateway(&b.gateway_id)?
                .deploy_update(req)
                .await
                .map_err(|e| SdkError::Gateway {
                    gateway_id: b.gateway_id.clone(),
                    what: format!("deploying fleet batch {}", b.batch + 1),
                    source: Box::new(e),
                })?;
        }
        Ok(())
    }
}
