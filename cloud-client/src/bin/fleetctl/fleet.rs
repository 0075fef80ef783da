//! `fleetctl fleet ...`: operations on every gateway bridged to a cloud broker, over one
//! connection to it (`--gateway` is the cloud broker's address).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use cloud_client::{
    BatchSize, CommandState, FleetCommandRecord, FleetRolloutState, FleetUpdateOptions, Rollout,
    SendCommand, TargetState,
};
use serde::Serialize;

use crate::update::{build_signed, BuildArgs};
use crate::{
    connect_fleet, duration, payload_bytes, print_json, Conn, Failure, RecordView, StatusView,
};

#[derive(Subcommand)]
pub enum FleetCmd {
    /// Every gateway the cloud broker holds a presence for: online or not, version, devices.
    Gateways,
    /// Every device of every online gateway, with its gateway (a gateway that does not answer
    /// is reported on stderr, or under `unreachable` with --json).
    Status {
        /// Only devices of this class.
        #[arg(long)]
        class: Option<String>,
    },
    /// Sign a command with the commands key (--command-key) and send it to every device of a
    /// class on every online gateway, under one command id; by default wait for every result.
    Command {
        /// The device class (as the devices report it).
        #[arg(long)]
        class: String,
        /// Command name, as the device application knows it.
        #[arg(long)]
        name: String,
        /// Argument, as text.
        #[arg(long, conflicts_with = "payload_file")]
        payload: Option<String>,
        /// Argument, from a file.
        #[arg(long)]
        payload_file: Option<PathBuf>,
        /// Time to live (e.g. 30s, 10m, 1h). Default: 1h.
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        /// Command id (idempotency key). Default: a fresh one.
        #[arg(long)]
        id: Option<String>,
        /// Print the accepted command and return without waiting for results.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for results.
        #[arg(long, default_value = "2m", value_parser = duration)]
        wait: Duration,
    },
    /// Build and sign an update for a class, register it and upload its images once on every
    /// gateway with devices of the class, and roll it out fleet-wide under ONE set of batch
    /// and threshold rules (batches of the whole fleet's targets, in gateway then device
    /// order). Returns when the rollout completes or pauses; run it again (with --resume after
    /// a pause) to continue from what the gateways hold.
    Update {
        #[command(flatten)]
        build: BuildArgs,
        /// Devices per fleet batch: a number (3), a percentage of all targets (5%) or all.
        #[arg(long, default_value_t = Rollout::DEFAULT_BATCH)]
        batch: BatchSize,
        /// Pause when, at the end of a batch, more than this percentage of the devices
        /// finished so far (fleet-wide) have failed; 100 never pauses.
        #[arg(long, default_value_t = Rollout::DEFAULT_MAX_FAILURES_PERCENT)]
        max_failures: u32,
        /// Go on past a pause at the threshold.
        #[arg(long)]
        resume: bool,
        /// Longest time to follow the rollout.
        #[arg(long, default_value = "1h", value_parser = duration)]
        timeout: Duration,
    },
}

#[derive(Serialize)]
struct GatewayView {
    gateway_id: String,
    online: bool,
    version: String,
    devices_known: u32,
    devices_online: u32,
    timestamp_ms: u64,
    started_at_ms: u64,
}

#[derive(Serialize)]
struct DeviceView {
    gateway_id: String,
    #[serde(flatten)]
    status: StatusView,
}

#[derive(Serialize)]
struct FailureView {
    gateway_id: String,
    error: String,
}

#[derive(Serialize)]
struct FleetStatusView {
    devices: Vec<DeviceView>,
    unreachable: Vec<FailureView>,
}

#[derive(Serialize)]
struct FleetRecordView {
    gateway_id: String,
    #[serde(flatten)]
    record: RecordView,
}

#[derive(Serialize)]
struct FleetCommandView {
    command_id: String,
    records: Vec<FleetRecordView>,
    failed: Vec<FailureView>,
}

#[derive(Serialize)]
struct RolloutTargetView {
    gateway_id: String,
    device_id: String,
    state: &'static str,
}

#[derive(Serialize)]
struct RolloutView {
    update_id: String,
    state: &'static str,
    reason: String,
    targets: Vec<RolloutTargetView>,
    unreachable: Vec<FailureView>,
}

fn failures(f: &[cloud_client::GatewayFailure]) -> Vec<FailureView> {
    f.iter()
        .map(|f| FailureView {
            gateway_id: f.gateway_id.clone(),
            error: f.error.clone(),
        })
        .collect()
}

fn warn_failures(f: &[FailureView], what: &str) {
    for x in f {
        eprintln!("fleetctl: gateway {} {what}: {}", x.gateway_id, x.error);
    }
}

fn print_fleet_records(v: &FleetCommandView, json: bool) {
    if json {
        print_json(v);
        return;
    }
    println!(
        "{:<12} {:<20} {:<24} {:<10} {:>8}  RESULT",
        "GATEWAY", "DEVICE", "COMMAND", "STATE", "ATTEMPTS"
    );
    for r in &v.records {
        let x = &r.record;
        let detail = x
            .result_output
            .as_deref()
            .or(x.result_message.as_deref())
            .unwrap_or("");
        println!(
            "{:<12} {:<20} {:<24} {:<10} {:>8}  {}",
            r.gateway_id, x.device_id, x.command_id, x.state, x.attempts, detail
        );
    }
    warn_failures(&v.failed, "failed the command");
}

fn fleet_records(recs: &[FleetCommandRecord]) -> Vec<FleetRecordView> {
    recs.iter()
        .map(|r| FleetRecordView {
            gateway_id: r.gateway_id.clone(),
            record: RecordView::from(&r.record),
        })
        .collect()
}

fn target_state(s: TargetState) -> &'static str {
    match s {
        TargetState::Waiting => "waiting",
        TargetState::Deployed => "deployed",
        TargetState::Succeeded => "committed",
        TargetState::Failed => "failed",
    }
}

pub async fn run(cmd: FleetCmd, conn: &Conn, json: bool) -> Result<ExitCode, Failure> {
    match cmd {
        FleetCmd::Gateways => {
            let fleet = connect_fleet(conn).await?;
            let views: Vec<GatewayView> = fleet
                .gateways()
                .await?
                .into_iter()
                .map(|p| GatewayView {
                    gateway_id: p.gateway_id,
                    online: p.online,
                    version: p.version,
                    devices_known: p.devices_known,
                    devices_online: p.devices_online,
                    timestamp_ms: p.timestamp_ms,
                    started_at_ms: p.started_at_ms,
                })
                .collect();
            if json {
                print_json(&views);
            } else {
                println!(
                    "{:<12} {:<7} {:<12} {:>7} {:>7}",
                    "GATEWAY", "ONLINE", "VERSION", "DEVICES", "ONLINE"
                );
                for v in &views {
                    println!(
                        "{:<12} {:<7} {:<12} {:>7} {:>7}",
                        v.gateway_id,
                        if v.online { "yes" } else { "no" },
                        if v.version.is_empty() {
                            "-"
                        } else {
                            &v.version
                        },
                        v.devices_known,
                        v.devices_online
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FleetCmd::Status { class } => {
            let fleet = connect_fleet(conn).await?;
            let status = fleet.fleet_status().await?;
            let view = FleetStatusView {
                devices: status
                    .devices
                    .iter()
                    .filter(|d| class.as_deref().is_none_or(|c| d.device_class() == Some(c)))
                    .map(|d| DeviceView {
                        gateway_id: d.gateway_id.clone(),
                        status: StatusView::from(&d.status),
                    })
                    .collect(),
                unreachable: failures(&status.unreachable),
            };
            if json {
                print_json(&view);
            } else {
                println!(
                    "{:<12} {:<20} {:<9} {:<8} {:<10} {:<10} {:<9} {:>8}",
                    "GATEWAY",
                    "DEVICE",
                    "CONNECTED",
                    "PRESENCE",
                    "FIRMWARE",
                    "CLASS",
                    "HEALTH",
                    "REPORTS"
                );
                for d in &view.devices {
                    let v = &d.status;
                    println!(
                        "{:<12} {:<20} {:<9} {:<8} {:<10} {:<10} {:<9} {:>8}",
                        d.gateway_id,
                        v.device_id,
                        if v.connected { "yes" } else { "no" },
                        v.presence.unwrap_or("-"),
                        v.firmware_version.as_deref().unwrap_or("-"),
                        v.device_class.as_deref().unwrap_or("-"),
                        v.health.as_deref().unwrap_or("-"),
                        v.reports_stored
                    );
                }
                warn_failures(&view.unreachable, "did not answer");
            }
            Ok(ExitCode::SUCCESS)
        }
        FleetCmd::Command {
            class,
            name,
            payload,
            payload_file,
            ttl,
            id,
            no_wait,
            wait,
        } => {
            let payload = payload_bytes(payload, payload_file)?;
            let fleet = connect_fleet(conn).await?;
            let cmd = fleet
                .send_class_command(
                    &class,
                    SendCommand {
                        command_id: id.unwrap_or_default(),
                        name,
                        payload,
                        ttl_ms: ttl
                            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1))
                            .unwrap_or(0),
                        ..SendCommand::default()
                    },
                )
                .await?;
            let command_id = cmd.command_id().to_owned();
            let (records, failed, open_ok) = if no_wait {
                (cmd.records(), failures(cmd.failed()), true)
            } else {
                if !json {
                    eprintln!(
                        "command {command_id} accepted for {} device(s); waiting for results...",
                        cmd.records().len()
                    );
                }
                let out = cmd.wait(wait).await;
                (out.records, failures(&out.failed), false)
            };
            let ok = failed.is_empty()
                && records.iter().all(|r| {
                    let s = r.record.state();
                    s == CommandState::Succeeded || (open_ok && !s.is_final())
                });
            print_fleet_records(
                &FleetCommandView {
                    command_id,
                    records: fleet_records(&records),
                    failed,
                },
                json,
            );
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        FleetCmd::Update {
            build,
            batch,
            max_failures,
            resume,
            timeout,
        } => {
            let built = build_signed(conn, build).await?;
            let fleet = connect_fleet(conn).await?;
            let opts = FleetUpdateOptions {
                rollout: Rollout {
                    batch,
                    max_failures_percent: max_failures,
                },
                timeout,
                resume,
                ..FleetUpdateOptions::default()
            };
            let tty = std::io::stderr().is_terminal() && !json;
            let report = fleet
                .fleet_update(&built, &opts, |plan| {
                    if tty {
                        let p = plan.progress();
                        eprint!(
                            "\r{} targets: {} deployed, {} committed, {} failed   ",
                            p.targets, p.deployed, p.succeeded, p.failed
                        );
                        let _ = std::io::stderr().flush();
                    }
                })
                .await?;
            if tty {
                eprintln!();
            }
            let (state, reason) = match &report.state {
                FleetRolloutState::Running => ("running", String::new()),
                FleetRolloutState::Paused(r) => ("paused", r.clone()),
                FleetRolloutState::Completed => ("completed", String::new()),
            };
            let view = RolloutView {
                update_id: built.manifest.update_id.clone(),
                state,
                reason,
                targets: report
                    .targets
                    .iter()
                    .map(|(t, s)| RolloutTargetView {
                        gateway_id: t.gateway_id.clone(),
                        device_id: t.device_id.clone(),
                        state: target_state(*s),
                    })
                    .collect(),
                unreachable: failures(&report.unreachable),
            };
            if json {
                print_json(&view);
            } else {
                println!(
                    "fleet rollout of {}: {}{}",
                    view.update_id,
                    view.state,
                    if view.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", view.reason)
                    }
                );
                println!("{:<12} {:<20} STATE", "GATEWAY", "DEVICE");
                for t in &view.targets {
                    println!("{:<12} {:<20} {}", t.gateway_id, t.device_id, t.state);
                }
                warn_failures(
                    &view.unreachable,
                    "did not answer (its devices are not targets)",
                );
            }
            let ok = report.state == FleetRolloutState::Completed
                && report.progress.failed == 0
                && view.unreachable.is_empty();
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
