//! `fleetctl update ...`: the update authority's and the operator's update commands.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use cloud_client::{
    build_update, BatchSize, BuiltUpdate, CampaignAction, CampaignState, ImageSpec, Rollout,
    UpdatePhase, UpdateRecord, UpdateSpec,
};
use fleet_proto::signing::UpdateSigner;
use serde::Serialize;

use crate::{connect, duration, print_json, Conn, Failure};

#[derive(Subcommand)]
pub enum UpdateCmd {
    /// Create an update authority signing key (Ed25519, PKCS#8 PEM, mode 0600) and its public
    /// key (FILE.pub), which devices are provisioned with.
    Keygen {
        /// Where to write the private key; the public key goes to FILE.pub.
        #[arg(long)]
        out: PathBuf,
    },
    /// Build a manifest from image files, sign it, register it on the gateway and upload the
    /// images (resuming: run it again after an interruption and only missing chunks are sent).
    Create {
        #[command(flatten)]
        build: BuildArgs,
    },
    /// Roll an update out to devices, batch by batch.
    ///
    /// A batch is offered when every device of the previous one has finished. By default the
    /// rollout is cautious: batches of 5 % of the targets (at least one device), and the
    /// campaign pauses at the end of a batch when more than 1 % of the devices finished so
    /// far have failed; `fleetctl update resume` goes on, `abort` withdraws the update.
    /// `--batch all --max-failures 100` offers it to every target at once and never pauses.
    Deploy {
        /// The update id.
        update: String,
        /// Target device (repeatable).
        #[arg(long = "device", short = 'd')]
        devices: Vec<String>,
        /// Target every known device of this class (default, with no --device: the update's).
        #[arg(long)]
        class: Option<String>,
        /// Devices per batch: a number of devices (3), a percentage of the targets (5%,
        /// rounded up, at least one device) or all. The default starts small: in a fleet of up
        /// to 20 devices the first batch is one device.
        #[arg(long, default_value_t = Rollout::DEFAULT_BATCH)]
        batch: BatchSize,
        /// Pause when, at the end of a batch, more than this percentage (1 to 100) of the
        /// devices finished so far have failed (rolled back, rejected or failed); 100 never
        /// pauses. The default pauses at a failure in the first batch of any fleet of up to
        /// 2,000 devices.
        #[arg(long, default_value_t = Rollout::DEFAULT_MAX_FAILURES_PERCENT)]
        max_failures: u32,
        /// Wait until the campaign completes, pauses or is aborted (exit 0 only when every
        /// device committed).
        #[arg(long)]
        wait: bool,
    },
    /// Per-device progress of an update's campaign, with a summary.
    Status {
        /// The update id.
        update: String,
        /// Follow until the campaign completes, pauses or is aborted (exit 0 only when every
        /// device committed).
        #[arg(long)]
        wait: bool,
        /// Longest wait with --wait.
        #[arg(long, default_value = "30m", value_parser = duration)]
        timeout: Duration,
    },
    /// Offer no further batch (devices already offered carry on).
    Pause {
        /// The update id.
        update: String,
    },
    /// Go on with the next batch.
    Resume {
        /// The update id.
        update: String,
    },
    /// Withdraw the update from every device that has not finished: a withdrawal of exactly
    /// the manifest the gateway holds, signed with the commands key (--command-key), which
    /// the gateway publishes in place of the manifest.
    Abort {
        /// The update id.
        update: String,
    },
}

/// `16KiB`, `1MiB`, `4096`.
pub(crate) fn size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 16KiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        u => return Err(format!("unknown size unit {u:?} (use KiB or MiB)")),
    };
    u32::try_from(n * mult).map_err(|_| format!("{s:?} is too large"))
}

#[derive(Serialize)]
struct TargetView {
    device_id: String,
    batch: u32,
    offered: bool,
    aborted: bool,
    phase: String,
    chunks_held: u32,
    chunks_total: u32,
    chunks_rejected: u32,
    chunks_sent: u64,
    error: Option<String>,
    detail: String,
    running_version: String,
}

#[derive(Serialize, Default)]
struct Summary {
    devices: usize,
    committed: usize,
    failed: usize,
    in_progress: usize,
    waiting: usize,
    aborted: usize,
}

#[derive(Serialize)]
struct ImageView {
    component: String,
    chunk_count: u32,
    chunks_held: u32,
    complete: bool,
}

#[derive(Serialize)]
struct CampaignView {
    state: String,
    batch_size: u32,
    max_failures_percent: u32,
    current_batch: u32,
    batches: u32,
    reason: String,
}

#[derive(Serialize)]
struct UpdateView {
    update_id: String,
    version: String,
    device_class: String,
    sequence: u64,
    expires_at_ms: u64,
    images: Vec<ImageView>,
    campaign: Option<CampaignView>,
    targets: Vec<TargetView>,
    summary: Summary,
}

fn lower(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

impl From<&UpdateRecord> for UpdateView {
    fn from(r: &UpdateRecord) -> Self {
        let mut summary = Summary {
            devices: r.targets.len(),
            ..Summary::default()
        };
        for t in &r.targets {
            match t.phase() {
                UpdatePhase::Committed => summary.committed += 1,
                p if p.is_failure() => summary.failed += 1,
                _ if t.aborted => summary.aborted += 1,
                _ if !t.offered => summary.waiting += 1,
                _ => summary.in_progress += 1,
            }
        }
        UpdateView {
            update_id: r.update_id.clone(),
            version: r.version.clone(),
            device_class: r.device_class.clone(),
            sequence: r.sequence,
            expires_at_ms: r.expires_at_ms,
            images: r
                .images
                .iter()
                .map(|i| ImageView {
                    component: i.component.clone(),
                    chunk_count: i.chunk_count,
                    chunks_held: i.chunks_held,
                    complete: i.complete,
                })
                .collect(),
            campaign: r.campaign.as_ref().map(|c| CampaignView {
                state: lower(c.state().as_str_name(), "CAMPAIGN_STATE_"),
                batch_size: c.batch_size,
                max_failures_percent: c.max_failures_percent,
                current_batch: c.current_batch,
                batches: c.batches,
                reason: c.reason.clone(),
            }),
            targets: r
                .targets
                .iter()
                .map(|t| TargetView {
                    device_id: t.device_id.clone(),
                    batch: t.batch,
                    offered: t.offered,
                    aborted: t.aborted,
                    phase: if t.phase == 0 {
                        if t.aborted {
                            "aborted".into()
                        } else if t.offered {
                            "offered".into()
                        } else {
                            "waiting".into()
                        }
                    } else {
                        lower(t.phase().as_str_name(), "UPDATE_PHASE_")
                    },
                    chunks_held: t.chunks_held,
                    chunks_total: t.chunks_total,
                    chunks_rejected: t.chunks_rejected,
                    chunks_sent: t.chunks_sent,
                    error: (t.error != 0).then(|| lower(t.error().as_str_name(), "UPDATE_ERROR_")),
                    detail: t.detail.clone(),
                    running_version: t.running_version.clone(),
                })
                .collect(),
            summary,
        }
    }
}

fn bar(held: u32, total: u32) -> String {
    const W: u64 = 24;
    let filled = if total == 0 {
        0
    } else {
        (u64::from(held) * W / u64::from(total)).min(W)
    };
    let pct = if total == 0 {
        0
    } else {
        u64::from(held) * 100 / u64::from(total)
    };
    format!(
        "[{}{}] {pct:>3}%",
        "#".repeat(filled as usize),
        "-".repeat((W - filled) as usize)
    )
}

fn print_update(r: &UpdateRecord, json: bool) {
    let v = UpdateView::from(r);
    if json {
        print_json(&v);
        return;
    }
    println!(
        "update {}  version {}  class {}  sequence {}",
        v.update_id, v.version, v.device_class, v.sequence
    );
    for i in &v.images {
        println!(
            "  image {:<12} {} {}",
            i.component,
            bar(i.chunks_held, i.chunk_count),
            if i.complete { "uploaded" } else { "incomplete" }
        );
    }
    let Some(c) = &v.campaign else {
        println!("not deployed");
        return;
    };
    println!(
        "campaign {}  batch {}/{} of {}  max failures {} %{}",
        c.state,
        (c.current_batch + 1).min(c.batches),
        c.batches,
        c.batch_size,
        c.max_failures_percent,
        if c.reason.is_empty() {
            String::new()
        } else {
            format!("  ({})", c.reason)
        }
    );
    println!(
        "{:<20} {:>5} {:<12} {:<31} {:>8}  DETAIL",
        "DEVICE", "BATCH", "PHASE", "PROGRESS", "REJECTED"
    );
    for t in &v.targets {
        let detail = match (&t.error, t.detail.is_empty()) {
            (Some(e), false) => format!("{e}: {}", t.detail),
            (Some(e), true) => e.clone(),
            (None, _) if t.phase == "committed" => format!("running {}", t.running_version),
            (None, _) => String::new(),
        };
        println!(
            "{:<20} {:>5} {:<12} {:<31} {:>8}  {detail}",
            t.device_id,
            t.batch + 1,
            t.phase,
            bar(t.chunks_held, t.chunks_total),
            t.chunks_rejected
        );
    }
    let s = &v.summary;
    println!(
        "{} devices: {} committed, {} failed, {} in progress, {} waiting, {} aborted",
        s.devices, s.committed, s.failed, s.in_progress, s.waiting, s.aborted
    );
}

/// 0 when the campaign completed with every device committed, 1 otherwise.
fn verdict(r: &UpdateRecord) -> ExitCode {
    let done = r
        .campaign
        .as_ref()
        .is_some_and(|c| c.state() == CampaignState::Completed);
    if done
        && r.targets
            .iter()
            .all(|t| t.phase() == UpdatePhase::Committed)
    {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn follow(
    fleet: &cloud_client::FleetClient,
    update: &str,
    timeout: Duration,
    json: bool,
) -> Result<UpdateRecord, Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let tty = std::io::stderr().is_terminal() && !json;
    loop {
        let r = fleet.get_update(update).await?;
        let state = r.campaign.as_ref().map(|c| c.state());
        let settled = matches!(
            state,
            None | Some(CampaignState::Completed | CampaignState::Paused | CampaignState::Aborted)
        );
        if tty {
            let v = UpdateView::from(&r);
            let (held, total) = r.targets.iter().fold((0u64, 0u64), |(h, t), x| {
                (h + u64::from(x.chunks_held), t + u64::from(x.chunks_total))
            });
            let pct = (held * 100).checked_div(total).unwrap_or(0);
            eprint!(
                "\r{}: {} committed, {} failed, {} in progress, {} waiting  ({pct}% of chunks)   ",
                v.campaign.as_ref().map_or("-", |c| c.state.as_str()),
                v.summary.committed,
                v.summary.failed,
                v.summary.in_progress,
                v.summary.waiting
            );
            let _ = std::io::stderr().flush();
        }
        if settled || tokio::time::Instant::now() >= deadline {
            if tty {
                eprintln!();
            }
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(cmd: UpdateCmd, conn: &Conn, json: bool) -> Result<ExitCode, Failure> {
    match cmd {
        UpdateCmd::Keygen { out } => {
            let signer = UpdateSigner::generate();
            let private = signer
                .to_pkcs8_pem()
                .map_err(|e| Failure::Usage(format!("cannot encode the key: {e}")))?;
            let public = signer
                .public_key_pem()
                .map_err(|e| Failure::Usage(format!("cannot encode the key: {e}")))?;
            write_private(&out, private.as_bytes())?;
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            std::fs::write(&pub_path, public.as_bytes())
                .map_err(|e| Failure::Usage(format!("{}: {e}", pub_path.display())))?;
            if json {
                print_json(&serde_json::json!({
                    "key_id": signer.key_id(),
                    "private_key": out,
                    "public_key": pub_path,
                }));
            } else {
                println!(
                    "key {} written to {} (public key: {})",
                    signer.key_id(),
                    out.display(),
                    pub_path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        UpdateCmd::Create { build } => {
            let built = build_signed(conn, build).await?;
            let fleet = connect(conn).await?;
            let record = fleet.create_update(built.signed.clone()).await?;
            let tty = std::io::stderr().is_terminal() && !json;
            let sent = fleet
                .upload_images(&built, &record.images, |done, total| {
                    if tty && (done % 16 == 0 || done == total) {
                        eprint!(
                            "\ruploading {} {done}/{total} chunks",
                            bar(done as u32, total as u32)
                        );
                        let _ = std::io::stderr().flush();
                    }
                })
                .await?;
            if tty && sent > 0 {
                eprintln!();
            }
            let record = fleet.get_update(&built.manifest.update_id).await?;
            if !json {
                eprintln!(
                    "update {} registered; {sent} chunk(s) uploaded",
                    record.update_id
                );
            }
            print_update(&record, json);
            if record.images.iter().all(|i| i.complete) {
                Ok(ExitCode::SUCCESS)
            } else {
                Err(Failure::Refused(
                    "the gateway does not hold every image completely; run the command again"
                        .into(),
                ))
            }
        }
        UpdateCmd::Deploy {
            update,
            devices,
            class,
            batch,
            max_failures,
            wait,
        } => {
            if !(1..=100).contains(&max_failures) {
                return Err(Failure::Usage(
                    "--max-failures is a percentage, 1 to 100 (100 never pauses)".into(),
                ));
            }
            let fleet = connect(conn).await?;
            let rollout = Rollout {
                batch,
                max_failures_percent: max_failures,
            };
            let mut r = fleet
                .deploy_rollout(&update, devices, class, rollout)
                .await?;
            if wait {
                r = follow(&fleet, &update, Duration::from_secs(24 * 3600), json).await?;
                print_update(&r, json);
                return Ok(verdict(&r));
            }
            print_update(&r, json);
            Ok(ExitCode::SUCCESS)
        }
        UpdateCmd::Status {
            update,
            wait,
            timeout,
        } => {
            let fleet = connect(conn).await?;
            if wait {
                let r = follow(&fleet, &update, timeout, json).await?;
                print_update(&r, json);
                return Ok(verdict(&r));
            }
            let r = fleet.get_update(&update).await?;
            print_update(&r, json);
            Ok(ExitCode::SUCCESS)
        }
        UpdateCmd::Pause { update } => control(conn, &update, CampaignAction::Pause, json).await,
        UpdateCmd::Resume { update } => control(conn, &update, CampaignAction::Resume, json).await,
        UpdateCmd::Abort { update } => control(conn, &update, CampaignAction::Abort, json).await,
    }
}

async fn control(
    conn: &Conn,
    update: &str,
    action: CampaignAction,
    json: bool,
) -> Result<ExitCode, Failure> {
    let fleet = connect(conn).await?;
    let r = fleet.control_campaign(update, action).await?;
    print_update(&r, json);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn write_private(path: &PathBuf, bytes: &[u8]) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            Failure::Usage(format!(
                "{}: {e} (keygen never overwrites a key)",
                path.display()
            ))
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

/// What `update create` and `fleet update` sign an update from.
#[derive(Debug, clap::Args)]
pub(crate) struct BuildArgs {
    /// Image file (repeatable; pair each with a --component, in the same order).
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// Component name of each --image (e.g. rootfs).
    #[arg(long = "component", required = true)]
    pub components: Vec<String>,
    /// Firmware version after the update (e.g. 1.1.0).
    #[arg(long)]
    pub version: String,
    /// Device class the update is for (with `fleet update`: its devices on every gateway
    /// are the targets).
    #[arg(long)]
    pub class: String,
    /// Anti-rollback sequence: devices install only what is newer than what they have.
    #[arg(long)]
    pub sequence: u64,
    /// Update authority signing key (PKCS#8 PEM, see `fleetctl update keygen`). Default:
    /// the development PKI's (`--pki`/update-signing.key).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Chunk size (1KiB to 1MiB).
    #[arg(long, default_value = "16KiB", value_parser = size)]
    pub chunk_size: u32,
    /// Update id. Default: CLASS-VERSION.
    #[arg(long)]
    pub id: Option<String>,
    /// Devices refuse the manifest after this long (e.g. 30days).
    #[arg(long, default_value = "30days", value_parser = duration)]
    pub expires_in: Duration,
    /// Release notes summary.
    #[arg(long, default_value = "")]
    pub description: String,
}

/// Builds and signs an update from the command line's arguments (the key defaults to the
/// development PKI's `update-signing.key`); every problem is a usage error naming its flag.
pub(crate) async fn build_signed(conn: &Conn, a: BuildArgs) -> Result<BuiltUpdate, Failure> {
    let BuildArgs {
        images,
        components,
        version,
        class,
        sequence,
        key,
        chunk_size,
        id,
        expires_in,
        description,
    } = a;
    if images.len() != components.len() {
        return Err(Failure::Usage(format!(
            "{} --image but {} --component: give one component name per image",
            images.len(),
            components.len()
        )));
    }
    let key = key.unwrap_or_else(|| conn.pki.join("update-signing.key"));
    let pem = std::fs::read_to_string(&key)
        .map_err(|e| Failure::Usage(format!("--key {}: {e}", key.display())))?;
    let signer = UpdateSigner::from_pkcs8_pem(&pem)
        .map_err(|e| Failure::Usage(format!("--key {}: {e}", key.display())))?;
    let spec = UpdateSpec {
        update_id: id.unwrap_or_else(|| format!("{class}-{version}")),
        version,
        device_class: class,
        sequence,
        chunk_size,
        expires_at_ms: fleet_proto::time::now_ms()
            .saturating_add(u64::try_from(expires_in.as_millis()).unwrap_or(u64::MAX)),
        description,
        images: images
            .into_iter()
            .zip(components)
            .map(|(path, component)| ImageSpec { component, path })
            .collect(),
    };
    tokio::task::spawn_blocking(move || build_update(&spec, &signer))
        .await
        .map_err(|e| Failure::Usage(e.to_string()))?
        .map_err(|e| Failure::Usage(e.to_string()))
}
