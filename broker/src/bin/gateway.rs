//! `gateway`: the edge gateway binary. Parses config, sets up logging, runs the library.
//!
//! With no configuration it runs the embedded default: a development PKI created in
//! `gateway-data/pki` on first start, listening on 127.0.0.1:8883.
//!
//! Once bound it prints one JSON line on stdout with the bound addresses, e.g.
//! `{"ready":{"mqtt":"127.0.0.1:8883","http":null}}` (see `announce_ready`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fleet_broker::{ensure_dev_pki, Gateway, GatewayConfig, TlsFiles};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

/// Exit code for a configuration error (EX_CONFIG would be 78; sysexits' EX_USAGE, 64, is
/// what operators and service managers conventionally read as "fix the invocation").
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "MQTT command and update gateway (mTLS edge + ACL)"
)]
struct Args {
    /// Configuration file (TOML); see broker/gateway.example.toml. Environment variables
    /// GATEWAY__SECTION__KEY override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Device certificates to create when the development PKI is made on first start.
    #[arg(long, default_value_t = 3)]
    dev_devices: u32,
    /// How long shutdown waits for connections to close.
    #[arg(long, default_value = "5s", value_parser = humantime_parse)]
    grace: Duration,
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = match GatewayConfig::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    #[cfg(feature = "fault-injection")]
    if let Err(e) = fault_switches() {
        eprintln!("gateway: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config, args))
}

/// Test switches from the environment; they exist only in a build with the `fault-injection`
/// feature (the test suite's), never in a release binary.
#[cfg(feature = "fault-injection")]
fn fault_switches() -> Result<(), String> {
    const CORRUPT: &str = "GATEWAY_TEST_CORRUPT_CHUNKS";
    if let Ok(v) = std::env::var(CORRUPT) {
        let n = v
            .parse()
            .map_err(|_| format!("{CORRUPT} must be a number, not {v:?}"))?;
        fleet_broker::fault::corrupt_chunks_every(n);
    }
    const ACK_FIRST: &str = "GATEWAY_TEST_STATUS_ACK_FIRST_MS";
    if let Ok(v) = std::env::var(ACK_FIRST) {
        let ms = v
            .parse()
            .map_err(|_| format!("{ACK_FIRST} must be a number of ms, not {v:?}"))?;
        fleet_broker::fault::status_ack_first(Duration::from_millis(ms));
        if ms > 0 {
            warn!(
                delay_ms = ms,
                "test switch: status reports are acknowledged before they are stored"
            );
        }
    }
    Ok(())
}

/// Prints the one machine-readable line saying that the gateway is ready, once the MQTT
/// listener and the metrics endpoint are bound (connections are accepted from then on; they
/// are served as soon as `serve` runs):
/// `{"ready":{"mqtt":"127.0.0.1:8883","http":"127.0.0.1:9090"}}` (`http` is null without a
/// metrics endpoint). It is alone on its line of stdout, so supervisors and tests need not
/// read the log to learn the bound addresses (with port 0, say).
fn announce_ready(gateway: &Gateway) -> std::io::Result<()> {
    use std::io::Write;
    let ready = serde_json::json!({
        "ready": {
            "mqtt": gateway.local_addr()?.to_string(),
            "http": gateway.metrics_addr().map(|a| a.to_string()),
        }
    });
    // One write of the whole line under the stdout lock: log lines cannot interleave with it.
    let mut out = std::io::stdout().lock();
    writeln!(out, "{ready}")?;
    out.flush()
}

async fn run(mut config: GatewayConfig, args: Args) -> ExitCode {
    let files = match (&config.tls.ca, &config.tls.cert, &config.tls.key) {
        (Some(ca), Some(cert), Some(key)) => TlsFiles {
            ca: ca.clone(),
            crl: config.tls.crl.clone(),
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => match ensure_dev_pki(&config.data_dir, args.dev_devices) {
            Ok((files, created)) => {
                let dir = config.data_dir.join("pki");
                if created {
                    info!(dir = %dir.display(), "created a development PKI");
                }
                info!(dir = %dir.display(), "using the development PKI (device certificates in devices/)");
                // Its devices are provisioned with its root: distribute that one unless the
                // configuration names another.
                let root = dir.join("trust/root.bin");
                if config.trust.root.is_none() && root.exists() {
                    info!(root = %root.display(), "distributing the development PKI's root of trust");
                    config.trust.root = Some(root);
                }
                files
            }
            Err(e) => {
                eprintln!(
                    "gateway: development PKI in {}: {e}",
                    config.data_dir.display()
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let gateway = match Gateway::bind(config, files).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = announce_ready(&gateway) {
        eprintln!("gateway: cannot announce readiness on stdout: {e}");
        return ExitCode::FAILURE;
    }
    let handle = gateway.handle();
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("gateway: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match handle.reload() {
                Ok(closed) => info!(closed, "SIGHUP: reloaded"),
                Err(e) => {
                    warn!(error = %e, "SIGHUP: reload failed; keeping the previous configuration")
                }
            }
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
        }
    };
    gateway.serve(shutdown, args.grace).await;
    ExitCode::SUCCESS
}
