//! A demo device on the device library, for the README's gateway (embedded default).
//!
//! ```sh
//! cargo run --example device -- dev-0001 [HOST:PORT] [PKI_DIR]
//! ```
//!
//! Defaults: `localhost:8883` and `gateway-data/pki` (the development PKI the gateway creates);
//! state in `gateway-data/device-state/ID`. It answers the commands `blink` and `reboot`
//! (any payload) when they are signed by the `commands` role of its root of trust, rejects
//! others, reports its status every 10 seconds, and takes updates signed by the `updates` role
//! into A/B slot files in its state directory, printing each phase. Its root is the
//! development PKI's (`PKI_DIR/trust/root.bin`).

use std::time::Duration;

use device_client::{DeviceClient, Health, StatusReport};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttc=warn")),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let id = args
        .next()
        .ok_or("usage: device ID [HOST:PORT] [PKI_DIR]")?;
    let gateway = args.next().unwrap_or_else(|| "localhost:8883".into());
    let pki = std::path::PathBuf::from(args.next().unwrap_or_else(|| "gateway-data/pki".into()));
    let (host, port) = gateway
        .rsplit_once(':')
        .ok_or("gateway must be HOST:PORT")?;

    let (client, mut commands) = DeviceClient::builder()
        .gateway(host, port.parse()?)
        .pem_files(
            pki.join("ca.crt"),
            pki.join(format!("devices/{id}.crt")),
            pki.join(format!("devices/{id}.key")),
        )
        .state_dir(format!("gateway-data/device-state/{id}"))
        .device_class("demo-pump")
        .firmware_version("1.0.0")
        // The fleet's root of trust, provisioned "at manufacture".
        .trust_root_file(pki.join("trust/root.bin"))
        .start()?;

    // Follow updates: verified, downloaded, installed into the inactive slot, committed.
    let mut updates = client.update_reports();
    tokio::spawn(async move {
        while updates.changed().await.is_ok() {
            if let Some(p) = updates.borrow_and_update().clone() {
                println!(
                    "update {} {:?} {}/{} chunks {}",
                    p.update_id,
                    p.phase(),
                    p.chunks_held,
                    p.chunks_total,
                    p.detail
                );
            }
        }
    });

    // Status every 10 s; reports made while offline are kept and sent in order later.
    let reporter = client.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let mut r = StatusReport {
                timestamp_ms: fleet_proto::time::now_ms(),
                firmware_version: "1.0.0".into(),
                device_class: "demo-pump".into(),
                health: Health::Ok.into(),
                ..StatusReport::default()
            };
            r.metrics.insert("temperature_c".into(), 41.5);
            if let Err(e) = reporter.report(r).await {
                eprintln!("report: {e}");
            }
        }
    });

    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            cmd = commands.next() => {
                let Some(cmd) = cmd else { break };
                let c = cmd.command().clone();
                println!("command {} {:?} ({} bytes)", c.command_id, c.name, c.payload.len());
                match c.name.as_str() {
                    "blink" | "reboot" => cmd.succeed(format!("{} done", c.name).into_bytes()).await?,
                    other => cmd.reject(format!("unknown command {other:?}")).await?,
                }
            }
        }
    }
    client.shutdown().await;
    Ok(())
}
