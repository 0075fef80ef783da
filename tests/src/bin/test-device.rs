//! `test-device`: one device on the real `device-client` library, for process-level tests
//! (SIGKILL, restarts). Prints what it does on stdout, one line per event:
//! `connected`, `ran COMMAND_ID`, `answered COMMAND_ID` (result journaled), `queued N`,
//! `flushed`.
//!
//! Every command run is appended (and synced) to `--ran-log` before it is answered, so a test
//! can count executions across restarts.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use device_client::{DeviceClient, Health, StatusReport};

#[derive(Parser)]
struct Args {
    /// HOST:PORT of the gateway.
    #[arg(long)]
    gateway: String,
    /// Development PKI directory (ca.crt, devices/ID.crt, devices/ID.key).
    #[arg(long)]
    pki: PathBuf,
    /// Device id.
    #[arg(long)]
    id: String,
    /// State directory.
    #[arg(long)]
    state: PathBuf,
    /// File the ids of executed commands are appended to.
    #[arg(long)]
    ran_log: PathBuf,
    /// Record results but never send them (the test then kills the process).
    #[arg(long)]
    hold_results: bool,
    /// Status reports to queue at start.
    #[arg(long, default_value_t = 0)]
    reports: u64,
    /// Exit once every queued report is acknowledged.
    #[arg(long)]
    exit_after_flush: bool,
    /// Device class.
    #[arg(long, default_value = "test-class")]
    class: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttc=warn")),
        )
        .init();
    let a = Args::parse();
    let (host, port) = a.gateway.rsplit_once(':').ok_or("--gateway HOST:PORT")?;
    let dev = a.pki.join("devices");
    let (client, mut commands) = DeviceClient::builder()
        .gateway(host, port.parse()?)
        .pem_files(
            a.pki.join("ca.crt"),
            dev.join(format!("{}.crt", a.id)),
            dev.join(format!("{}.key", a.id)),
        )
        .state_dir(&a.state)
        .device_class(&a.class)
        .firmware_version("1.0.0")
        .backoff(Duration::from_millis(100), Duration::from_millis(500))
        .hold_results_for_tests(a.hold_results)
        .start()?;
    let say = |s: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    };
    for i in 0..a.reports {
        let mut r = StatusReport {
            timestamp_ms: fleet_proto::time::now_ms(),
            firmware_version: "1.0.0".into(),
            device_class: a.class.clone(),
            health: Health::Ok.into(),
            ..StatusReport::default()
        };
        r.metrics.insert("i".into(), i as f64);
        client.report(r).await?;
    }
    say(format!("queued {}", a.reports));
    {
        let c = client.clone();
        tokio::spawn(async move {
            if c.wait_connected().await.is_ok() {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "connected");
                let _ = out.flush();
            }
        });
    }
    if a.exit_after_flush {
        client.flush().await?;
        say("flushed".into());
        client.shutdown().await;
        return Ok(());
    }
    while let Some(cmd) = commands.next().await {
        let c = cmd.command().clone();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.ran_log)?;
        writeln!(log, "{}", c.command_id)?;
        log.sync_all()?;
        say(format!("ran {}", c.command_id));
        if c.name == "fail" {
            cmd.fail("asked to fail").await?;
        } else {
            let out = format!("ok:{}:{}", c.name, String::from_utf8_lossy(&c.payload));
            cmd.succeed(out.into_bytes()).await?;
        }
        // The result is in the journal now.
        say(format!("answered {}", c.command_id));
    }
    Ok(())
}
