//! `fleetctl`: the operator's CLI for the fleet API of a gateway (and, with `fleetctl fleet`,
//! of every gateway bridged to a cloud broker).
//!
//! Exit codes: 0 done (every target succeeded); 1 a target failed, was rejected or expired
//! (`trust verify`: the root is refused); 2 bad usage; 3 the gateway could not be reached or did
//! not answer; 4 the gateway refused the request; 5 unusable certificates.

mod fleet;
mod trust;
mod update;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use cloud_client::{CommandRecord, CommandState, DeviceStatus, FleetClient, SdkError, SendCommand};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Send commands and signed updates to devices and read fleet status through a gateway's fleet API",
    long_about = "Send commands and signed updates to devices and read fleet status through a gateway's fleet API.\n\n\
        Connects with a service certificate over mTLS. Without --ca/--cert/--cert-key it uses the \
        development PKI of the README's gateway (--pki, default gateway-data/pki, service \
        svc-0001).\n\n\
        Commands and update aborts are signed with a key of the root's commands role \
        (--command-key, default PKI/trust/commands-1.key); `fleetctl trust` manages the root of \
        trust offline and hands new roots to the gateway.\n\n\
        Exit codes: 0 done; 1 a target failed, was rejected or expired (trust verify: the \
        root is refused); 2 bad usage; \
        3 gateway unreachable or silent; 4 request refused; 5 unusable certificates."
)]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    /// Print JSON instead of text (one document on stdout).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Conn {
    /// Gateway address, HOST:PORT. The host is checked against the gateway's certificate.
    #[arg(
        long,
        env = "FLEETCTL_GATEWAY",
        default_value = "localhost:8883",
        global = true
    )]
    gateway: String,
    /// Development PKI directory to take the CA and the service certificate from.
    #[arg(
        long,
        env = "FLEETCTL_PKI",
        default_value = "gateway-data/pki",
        global = true
    )]
    pki: PathBuf,
    /// Service id in the development PKI.
    #[arg(
        long,
        env = "FLEETCTL_SERVICE",
        default_value = "svc-0001",
        global = true
    )]
    service: String,
    /// CA bundle (PEM); overrides --pki.
    #[arg(long, env = "FLEETCTL_CA", global = true)]
    ca: Option<PathBuf>,
    /// Service certificate (PEM); overrides --pki.
    #[arg(long, env = "FLEETCTL_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Service private key (PEM); overrides --pki. (`--key` is the update signing key of
    /// `update create`.)
    #[arg(long, env = "FLEETCTL_KEY", global = true)]
    cert_key: Option<PathBuf>,
    /// Reach this gateway through the cloud MQTT broker given as --gateway (its bridge maps
    /// the API under gateways/GATEWAY_ID/).
    #[arg(long, env = "FLEETCTL_VIA", global = true, value_name = "GATEWAY_ID")]
    via: Option<String>,
    /// How long to wait for the gateway to answer a request.
    #[arg(long, default_value = "10s", value_parser = duration, global = true)]
    request_timeout: Duration,
    /// How long to try to connect to the gateway.
    #[arg(long, default_value = "10s", value_parser = duration, global = true)]
    connect_timeout: Duration,
    /// Key of the root's commands role (PKCS#8 PEM) that signs commands (`command send`) and
    /// update withdrawals (`update abort`); repeat it for a role whose threshold is above one.
    /// Default: the development PKI's (--pki)/trust/commands-1.key, when it exists.
    #[arg(long, env = "FLEET_COMMAND_KEY", global = true, value_name = "FILE")]
    command_key: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Commands: send one, read one.
    #[command(subcommand)]
    Command(CommandCmd),
    /// Firmware updates: sign and upload, deploy in batches, follow, pause, resume, abort.
    #[command(subcommand)]
    Update(update::UpdateCmd),
    /// The chain of trust: create the root keys and first root, draft, sign (key by key, on
    /// separate machines), combine, verify and show roots; publish one to the gateway.
    ///
    /// A key ceremony that replaces the commands key: `trust keygen --out new.key`, `trust new
    /// --current root.bin --set-role commands --key new.pub --threshold 1 --out v2.unsigned`,
    /// then on each root
    /// key holder's machine `trust sign v2.unsigned --key root-N.key --out v2.N` (a threshold
    /// of the current root keys, and of the new root's own when they differ), `trust combine
    /// v2.* --out v2.bin`, `trust verify --current root.bin v2.bin`, `trust publish v2.bin`.
    #[command(subcommand)]
    Trust(trust::TrustCmd),
    /// Every gateway bridged to the cloud broker given as --gateway, over one connection:
    /// list the gateways, read every device's status, command a class, roll an update out to
    /// a class across gateways.
    #[command(subcommand)]
    Fleet(fleet::FleetCmd),
    /// Last known status and presence of devices (all when none is named).
    Status {
        /// Device ids.
        devices: Vec<String>,
    },
    /// Print command state changes as they happen, until interrupted (with --json: one JSON
    /// object per line).
    Events {
        /// Only this device's commands (repeatable).
        #[arg(long = "device", short = 'd')]
        devices: Vec<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand)]
enum CommandCmd {
    /// Sign a command with the commands key (--command-key) and send it to devices; by
    /// default wait for every result.
    ///
    /// One command is signed per device (and one for --class), bound to its target, its id,
    /// name, payload, validity period and expiry; devices refuse it unsigned, mis-addressed or
    /// expired.
    Send {
        /// Target device (repeatable).
        #[arg(long = "device", short = 'd')]
        devices: Vec<String>,
        /// Target every known device of this class.
        #[arg(long)]
        class: Option<String>,
        /// Command name, as the device application knows it.
        #[arg(long)]
        name: String,
        /// Argument, as text.
        #[arg(long, conflicts_with = "payload_file")]
        payload: Option<String>,
        /// Argument, from a file.
        #[arg(long)]
        payload_file: Option<PathBuf>,
        /// Time to live: the command expires this long after it is signed and is never run
        /// after (e.g. 30s, 10m, 1h). Default: 1h.
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        /// Do not run before this time: a delay from now (10m) or a time (2026-12-01T08:00:00Z).
        /// The gateway holds the command until then; it must be before the expiry.
        #[arg(long, value_parser = not_before)]
        not_before: Option<u64>,
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
    /// Show a command's state on each target.
    Get {
        /// Command id.
        id: String,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// `--not-before`: a delay from now or an RFC 3339 time, as ms since 1970.
fn not_before(s: &str) -> Result<u64, String> {
    let at = match humantime_serde::re::humantime::parse_duration(s) {
        Ok(d) => std::time::SystemTime::now() + d,
        Err(_) => humantime_serde::re::humantime::parse_rfc3339_weak(s).map_err(|_| {
            format!("{s:?} is neither a delay (10m) nor a time (2026-12-01T08:00:00Z)")
        })?,
    };
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))?
        .as_millis();
    u64::try_from(ms).map_err(|_| format!("{s:?} is too far ahead"))
}

/// A command record as printed.
#[derive(Serialize)]
struct RecordView {
    device_id: String,
    command_id: String,
    name: String,
    state: &'static str,
    attempts: u32,
    issued_by: String,
    issued_at_ms: u64,
    expires_at_ms: u64,
    updated_at_ms: u64,
    result_message: Option<String>,
    result_output: Option<String>,
}

fn state_name(s: CommandState) -> &'static str {
    match s {
        CommandState::Unspecified => "unknown",
        CommandState::Pending => "pending",
        CommandState::Delivered => "delivered",
        CommandState::Succeeded => "succeeded",
        CommandState::Failed => "failed",
        CommandState::Rejected => "rejected",
        CommandState::Expired => "expired",
    }
}

impl From<&CommandRecord> for RecordView {
    fn from(r: &CommandRecord) -> Self {
        RecordView {
            device_id: r.device_id.clone(),
            command_id: r.command_id.clone(),
            name: r.name.clone(),
            state: state_name(r.state()),
            attempts: r.attempts,
            issued_by: r.issued_by.clone(),
            issued_at_ms: r.issued_at_ms,
            expires_at_ms: r.expires_at_ms,
            updated_at_ms: r.updated_at_ms,
            result_message: r
                .result
                .as_ref()
                .map(|x| x.message.clone())
                .filter(|m| !m.is_empty()),
            result_output: r
                .result
                .as_ref()
                .filter(|x| !x.output.is_empty())
                .map(|x| String::from_utf8_lossy(&x.output).into_owned()),
        }
    }
}

/// A device status as printed.
#[derive(Serialize)]
struct StatusView {
    device_id: String,
    connected: bool,
    presence: Option<&'static str>,
    firmware_version: Option<String>,
    device_class: Option<String>,
    health: Option<String>,
    last_sequence: Option<u64>,
    last_report_at_ms: Option<u64>,
    reports_stored: u64,
    metrics: std::collections::BTreeMap<String, f64>,
    /// Version of the root of trust the device reported holding.
    root_version: Option<u64>,
    /// Its root has expired: it refuses every command and manifest until a newer root arrives.
    root_expired: bool,
    /// The last root it refused, and why.
    root_refused: Option<String>,
}

impl From<&DeviceStatus> for StatusView {
    fn from(d: &DeviceStatus) -> Self {
        let r = d.last_report.as_ref();
        let p = d.presence.as_ref();
        StatusView {
            device_id: d.device_id.clone(),
            connected: d.connected,
            presence: p.map(|p| match p.state() {
                fleet_proto::v1::PresenceState::Online => "online",
                fleet_proto::v1::PresenceState::Offline if p.graceful => "offline",
                fleet_proto::v1::PresenceState::Offline => "lost",
                fleet_proto::v1::PresenceState::Unspecified => "unknown",
            }),
            firmware_version: r
                .map(|r| r.firmware_version.clone())
                .or_else(|| p.map(|p| p.firmware_version.clone()))
                .filter(|v| !v.is_empty()),
            device_class: r
                .map(|r| r.device_class.clone())
                .or_else(|| p.map(|p| p.device_class.clone()))
                .filter(|v| !v.is_empty()),
            health: r.map(|r| format!("{:?}", r.health()).to_lowercase()),
            last_sequence: r.map(|r| r.sequence),
            last_report_at_ms: r.map(|_| d.report_received_at_ms),
            reports_stored: d.reports_stored,
            metrics: r
                .map(|r| r.metrics.clone().into_iter().collect())
                .unwrap_or_default(),
            root_version: d.trust.as_ref().map(|t| t.root_version),
            root_expired: d.trust.as_ref().is_some_and(|t| t.root_expired),
            root_refused: d
                .trust
                .as_ref()
                .filter(|t| t.refused_version != 0)
                .map(|t| {
                    format!(
                        "version {} ({}): {}",
                        t.refused_version,
                        t.refusal()
                            .as_str_name()
                            .trim_start_matches("ROOT_REFUSAL_")
                            .to_lowercase(),
                        t.detail
                    )
                }),
        }
    }
}

enum Failure {
    Usage(String),
    Certs(String),
    Unreachable(String),
    Refused(String),
}

impl From<SdkError> for Failure {
    fn from(e: SdkError) -> Self {
        match e {
            SdkError::Config(m) | SdkError::Invalid(m) => Failure::Usage(m),
            SdkError::NoCommandKey | SdkError::CommandKey { .. } => Failure::Usage(e.to_string()),
            SdkError::Tls(_) | SdkError::NotAService(_) => Failure::Certs(e.to_string()),
            SdkError::Api { .. } => Failure::Refused(e.to_string()),
            SdkError::Gateway { ref source, .. } if matches!(**source, SdkError::Api { .. }) => {
                Failure::Refused(e.to_string())
            }
            _ => Failure::Unreachable(e.to_string()),
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEETCTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttc=error")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleetctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(f) => {
            let (code, msg) = match f {
                Failure::Usage(m) => (2, m),
                Failure::Unreachable(m) => (
                    3,
                    format!("{m}\n  is the gateway running, and is --gateway right?"),
                ),
                Failure::Refused(m) => (4, m),
                Failure::Certs(m) => (
                    5,
                    format!("{m}\n  give --ca/--cert/--cert-key, or --pki with the gateway's development PKI"),
                ),
            };
            eprintln!("fleetctl: {msg}");
            ExitCode::from(code)
        }
    }
}

async fn connect(conn: &Conn) -> Result<FleetClient, Failure> {
    connect_to(conn, false).await
}

/// A fleet connection to the cloud broker given as --gateway (`fleetctl fleet`).
async fn connect_fleet(conn: &Conn) -> Result<FleetClient, Failure> {
    if conn.via.is_some() {
        return Err(Failure::Usage(
            "`fleetctl fleet` reaches every gateway: leave out --via".into(),
        ));
    }
    connect_to(conn, true).await
}

async fn connect_to(conn: &Conn, fleet: bool) -> Result<FleetClient, Failure> {
    let (host, port) = conn
        .gateway
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| Failure::Usage(format!("--gateway {:?} is not HOST:PORT", conn.gateway)))?;
    let ca = conn.ca.clone().unwrap_or_else(|| conn.pki.join("ca.crt"));
    let cert = conn.cert.clone().unwrap_or_else(|| {
        conn.pki
            .join("services")
            .join(format!("{}.crt", conn.service))
    });
    let key = conn.cert_key.clone().unwrap_or_else(|| {
        conn.pki
            .join("services")
            .join(format!("{}.key", conn.service))
    });
    let mut b = FleetClient::builder()
        .gateway(host, port)
        .pem_files(ca, cert, key)
        .request_timeout(conn.request_timeout)
        .connect_timeout(conn.connect_timeout);
    if let Some(gw) = &conn.via {
        b = b.via_broker(gw)?;
    }
    if fleet {
        b = b.fleet();
    }
    if conn.command_key.is_empty() {
        let dev = conn.pki.join("trust").join("commands-1.key");
        if dev.exists() {
            b = b.command_key_file(dev);
        }
    }
    for k in &conn.command_key {
        b = b.command_key_file(k);
    }
    Ok(b.connect().await?)
}

fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("fleetctl: cannot encode JSON: {e}"),
    }
}

fn print_records(records: &[RecordView], json: bool) {
    if json {
        print_json(&records);
        return;
    }
    println!(
        "{:<20} {:<24} {:<10} {:>8}  RESULT",
        "DEVICE", "COMMAND", "STATE", "ATTEMPTS"
    );
    for r in records {
        let detail = r
            .result_output
            .as_deref()
            .or(r.result_message.as_deref())
            .unwrap_or("");
        println!(
            "{:<20} {:<24} {:<10} {:>8}  {}",
            r.device_id, r.command_id, r.state, r.attempts, detail
        );
    }
}

/// 0 when every record succeeded (or is still open with `open_ok`), 1 otherwise.
fn outcome(records: &[CommandRecord], open_ok: bool) -> ExitCode {
    let ok = records
        .iter()
        .all(|r| r.state() == CommandState::Succeeded || (open_ok && !r.state().is_final()));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.cmd {
        Cmd::Update(cmd) => update::run(cmd, &cli.conn, cli.json).await,
        Cmd::Trust(cmd) => trust::run(cmd, &cli.conn, cli.json).await,
        Cmd::Fleet(cmd) => fleet::run(cmd, &cli.conn, cli.json).await,
        Cmd::Command(CommandCmd::Send {
            devices,
            class,
            name,
            payload,
            payload_file,
            ttl,
            not_before,
            id,
            no_wait,
            wait,
        }) => {
            if devices.is_empty() && class.is_none() {
                return Err(Failure::Usage(
                    "name a target: --device ID (repeatable) or --class CLASS".into(),
                ));
            }
            let payload = payload_bytes(payload, payload_file)?;
            let fleet = connect(&cli.conn).await?;
            let handle = fleet
                .send_command_not_before(
                    SendCommand {
                        signed: Default::default(),
                        command_id: id.unwrap_or_default(),
                        device_ids: devices,
                        device_class: class.unwrap_or_default(),
                        name,
                        payload,
                        ttl_ms: ttl
                            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1))
                            .unwrap_or(0),
                    },
                    not_before.unwrap_or(0),
                )
                .await?;
            if no_wait {
                let recs = handle.records().to_vec();
                print_records(
                    &recs.iter().map(RecordView::from).collect::<Vec<_>>(),
                    cli.json,
                );
                return Ok(outcome(&recs, true));
            }
            if !cli.json {
                eprintln!(
                    "command {} accepted for {} device(s); waiting for results...",
                    handle.command_id(),
                    handle.records().len()
                );
            }
            let recs = handle.wait(wait).await?;
            print_records(
                &recs.iter().map(RecordView::from).collect::<Vec<_>>(),
                cli.json,
            );
            Ok(outcome(&recs, false))
        }
        Cmd::Command(CommandCmd::Get { id, device }) => {
            let fleet = connect(&cli.conn).await?;
            let recs = fleet.get_command(&id, device.as_deref()).await?;
            print_records(
                &recs.iter().map(RecordView::from).collect::<Vec<_>>(),
                cli.json,
            );
            Ok(outcome(&recs, true))
        }
        Cmd::Events { devices, count } => {
            let fleet = connect(&cli.conn).await?;
            let mut events = fleet.events();
            // Subscribed from here on (connect waits for it): say so, for people and scripts.
            eprintln!("fleetctl: watching command events (Ctrl-C to stop)");
            let mut seen = 0u64;
            while count.is_none_or(|c| seen < c) {
                let ev = tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    ev = events.recv() => ev,
                };
                let rec = match ev {
                    Ok(cloud_client::CommandEvent {
                        command: Some(rec), ..
                    }) => rec,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        eprintln!("fleetctl: {n} events missed (too slow)");
                        continue;
                    }
                    Err(_) => return Err(Failure::Unreachable("connection closed".into())),
                };
                if !devices.is_empty() && !devices.contains(&rec.device_id) {
                    continue;
                }
                seen += 1;
                let v = RecordView::from(&rec);
                if cli.json {
                    match serde_json::to_string(&v) {
                        Ok(s) => println!("{s}"),
                        Err(e) => eprintln!("fleetctl: cannot encode JSON: {e}"),
                    }
                } else {
                    println!(
                        "{:<20} {:<24} {:<10} attempt {}",
                        v.device_id, v.command_id, v.state, v.attempts
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { devices } => {
            let fleet = connect(&cli.conn).await?;
            let all = fleet.status(&devices).await?;
            let views: Vec<StatusView> = all.iter().map(StatusView::from).collect();
            if cli.json {
                print_json(&views);
            } else {
                println!(
                    "{:<20} {:<9} {:<8} {:<10} {:<10} {:<9} {:>8}",
                    "DEVICE", "CONNECTED", "PRESENCE", "FIRMWARE", "CLASS", "HEALTH", "REPORTS"
                );
                for v in &views {
                    println!(
                        "{:<20} {:<9} {:<8} {:<10} {:<10} {:<9} {:>8}",
                        v.device_id,
                        if v.connected { "yes" } else { "no" },
                        v.presence.unwrap_or("-"),
                        v.firmware_version.as_deref().unwrap_or("-"),
                        v.device_class.as_deref().unwrap_or("-"),
                        v.health.as_deref().unwrap_or("-"),
                        v.reports_stored
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A command's argument: `--payload` as text, or the bytes of `--payload-file`, or nothing.
pub(crate) fn payload_bytes(
    payload: Option<String>,
    file: Option<PathBuf>,
) -> Result<Vec<u8>, Failure> {
    match (payload, file) {
        (Some(p), _) => Ok(p.into_bytes()),
        (None, Some(f)) => std::fs::read(&f)
            .map_err(|e| Failure::Usage(format!("--payload-file {}: {e}", f.display()))),
        (None, None) => Ok(Vec::new()),
    }
}
