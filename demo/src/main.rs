//! `demo`: the whole product on one machine, unattended. Starts a gateway (in this process)
//! with a fresh development PKI, a simulated fleet of devices on the real device library (one
//! process, each device with its own certificate, mTLS connection and state), sends a signed
//! command to all of them, rotates the commands key (root of trust version 2) and shows the old
//! key refused and the new one obeyed, rolls out a signed update in two batches with live
//! progress, prints a summary and exits 0 when everything succeeded.
//!
//! ```sh
//! cargo run --release --bin demo -- [--devices 100] [--image-kib 2048] [--churn 5] [--keep-running]
//! ```

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use cloud_client::{
    build_update, CampaignState, CommandRecord, DeployUpdate, FleetClient, ImageSpec, SendCommand,
    UpdatePhase, UpdateRecord, UpdateSpec,
};
use fleet_broker::{Gateway, GatewayConfig, MetricsSettings, TrustSettings};
use fleet_demo::fleet::{self, FleetOptions};
use fleet_proto::signing::{Signer, UpdateSigner};
use fleet_proto::trust::build;
use fleet_proto::v1::{CommandRefusal, Root, SignedRoot};
use fleet_proto::Message;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Marks a directory as the demo's, so it may be wiped on the next run.
const MARKER: &str = ".fleet-demo";
const CLASS: &str = "demo-pump";

#[derive(Parser)]
#[command(
    name = "demo",
    about = "Run a gateway, a simulated fleet, a command and a signed update rollout on this machine"
)]
struct Args {
    /// Simulated devices (each on the device library with its own certificate).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Size of the firmware image, KiB.
    #[arg(long, default_value_t = 2048)]
    image_kib: usize,
    /// Directory for the gateway's data, the PKI and the devices' state (wiped at start if it
    /// is a previous demo's).
    #[arg(long, default_value = "demo-data")]
    data: PathBuf,
    /// Leave the gateway and the fleet running afterwards (for fleetctl), until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Gateway port (0: any free port). With --keep-running, 8883 is the default.
    #[arg(long)]
    port: Option<u16>,
    /// Connection churn during the rollout: this many devices shut down and come back every
    /// second (their downloads resume where they stopped).
    #[arg(long, default_value_t = 0)]
    churn: usize,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEMO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::from(1)
        }
    }
}

/// Creates `dir`, wiping it first if a previous demo made it; refuses any other directory.
fn fresh_dir(dir: &Path) -> Result<(), Error> {
    if dir.exists() {
        if !dir.join(MARKER).exists() {
            return Err(format!(
                "{} exists and is not a demo directory; choose another with --data",
                dir.display()
            )
            .into());
        }
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(MARKER),
        b"made by the fleet gateway demo; wiped by the next run\n",
    )?;
    Ok(())
}

/// A firmware image of `size` pseudo-random bytes (the same every run).
fn write_image(path: &Path, size: usize) -> std::io::Result<()> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut data = Vec::with_capacity(size + 8);
    while data.len() < size {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    std::fs::write(path, data)
}

fn step(t: Instant, what: &str) {
    println!("[{:>5.1} s] {what}", t.elapsed().as_secs_f64());
}

async fn run(a: Args) -> Result<bool, Error> {
    let t0 = Instant::now();
    fresh_dir(&a.data)?;
    let data = std::fs::canonicalize(&a.data)?;
    let n = a.devices.max(1);
    let (files, _) = fleet_broker::ensure_dev_pki(&data.join("gateway"), n as u32)?;
    let pki = data.join("gateway/pki");
    let port = a.port.unwrap_or(if a.keep_running { 8883 } else { 0 });
    let config = GatewayConfig {
        listen: ([127, 0, 0, 1], port).into(),
        data_dir: data.join("gateway"),
        metrics: MetricsSettings { listen: None },
        // The devices' root of trust, which the gateway distributes (and replaces below).
        trust: TrustSettings {
            root: Some(pki.join("trust/root.bin")),
        },
        ..GatewayConfig::default()
    };
    let gateway = Gateway::bind(config, files).await?;
    let port = gateway.local_addr()?.port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gateway.serve(
        async {
            let _ = stop_rx.await;
        },
        Duration::from_secs(2),
    ));
    step(
        t0,
        &format!(
            "gateway on 127.0.0.1:{port}; development PKI with {n} device certificates in {}",
            pki.display()
        ),
    );

    let root = std::fs::read(pki.join("trust/root.bin"))?;
    let ids: Vec<String> = (1..=n).map(|i| format!("dev-{i:04}")).collect();
    let fleet_options = FleetOptions {
        host: "localhost".into(),
        port,
        pki: pki.clone(),
        state_root: data.join("devices"),
        ids: ids.clone(),
        class: CLASS.into(),
        version: "1.0.0".into(),
        root: Some(root),
        slots: true,
    };
    let devices = fleet::start(&fleet_options)?;
    tokio::time::timeout(Duration::from_secs(60), fleet::wait_connected(&devices)).await??;
    let devices = std::sync::Arc::new(tokio::sync::Mutex::new(devices));
    step(
        t0,
        &format!("{n} devices connected (mTLS, one certificate each), firmware 1.0.0"),
    );

    let sdk = service(&pki, port)
        // Commands and withdrawals are signed with the development PKI's commands key.
        .command_key_file(pki.join("trust/commands-1.key"))
        .connect()
        .await?;
    // Devices announce their class with their presence; wait until the gateway knows all.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sdk
        .status(&[])
        .await?
        .iter()
        .filter(|d| d.connected)
        .count()
        < n
    {
        if Instant::now() > deadline {
            return Err("the gateway did not see every device in 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 1. A command to the whole class.
    let t_cmd = Instant::now();
    let records = blink(&sdk, b"3").await?;
    let ok = succeeded(&records);
    step(
        t0,
        &format!(
            "command 'blink' to class {CLASS}: {ok}/{} succeeded in {:.2} s",
            records.len(),
            t_cmd.elapsed().as_secs_f64()
        ),
    );

    // 2. A key rotation while the fleet runs: a new commands key, named by root version 2, which
    // two of the three root keys sign (the ceremony `fleetctl trust new/sign/combine/publish`
    // runs on separate machines). Then a command signed with the old key, which every device
    // refuses, and one with the new key.
    let t_rot = Instant::now();
    let rotation = rotate_commands_key(&pki, &sdk, n).await?;
    step(
        t0,
        &format!(
            "root of trust version 2 (new commands key {}) taken by {n}/{n} devices in {:.2} s",
            rotation.new_key.key_id(),
            t_rot.elapsed().as_secs_f64()
        ),
    );
    let old_key = blink(&sdk, b"1").await?;
    let refused = old_key
        .iter()
        .filter(|r| r.result.as_ref().map(|x| x.refusal()) == Some(CommandRefusal::Untrusted))
        .count();
    step(
        t0,
        &format!(
            "command signed with the old commands key: {refused}/{} refused by the devices (untrusted)",
            old_key.len()
        ),
    );
    let sdk = service(&pki, port)
        .command_signer(rotation.new_key.clone())
        .connect()
        .await?;
    let new_key = blink(&sdk, b"2").await?;
    let rotated_ok = succeeded(&new_key);
    step(
        t0,
        &format!(
            "command signed with the new commands key: {rotated_ok}/{} succeeded",
            new_key.len()
        ),
    );

    // 3. A signed update, built and uploaded like `fleetctl update create`.
    let image = data.join("rootfs-1.1.0.img");
    write_image(&image, a.image_kib * 1024)?;
    let signer =
        UpdateSigner::from_pkcs8_pem(&std::fs::read_to_string(pki.join("update-signing.key"))?)?;
    let spec = UpdateSpec {
        update_id: "demo-1.1.0".into(),
        version: "1.1.0".into(),
        device_class: CLASS.into(),
        sequence: 2,
        chunk_size: 16 * 1024,
        expires_at_ms: fleet_proto::time::now_ms() + 86_400_000,
        description: "demo update".into(),
        images: vec![ImageSpec {
            component: "rootfs".into(),
            path: image.clone(),
        }],
    };
    let t_up = Instant::now();
    let built = build_update(&spec, &signer)?;
    let created = sdk.create_update(built.signed.clone()).await?;
    sdk.upload_images(&built, &created.images, |_, _| {})
        .await?;
    let rec = sdk.get_update(&spec.update_id).await?;
    let chunks = rec.images.first().map_or(0, |i| i.chunk_count);
    step(t0, &format!("update demo-1.1.0 signed (Ed25519) and uploaded: {} KiB, {chunks} chunks of 16 KiB, each checked by the gateway, in {:.2} s", a.image_kib, t_up.elapsed().as_secs_f64()));

    let t_roll = Instant::now();
    sdk.deploy_update(DeployUpdate {
        update_id: "demo-1.1.0".into(),
        device_class: CLASS.into(),
        batch_size: n.div_ceil(2) as u32,
        max_failures_percent: 10,
        ..DeployUpdate::default()
    })
    .await?;
    step(t0, "rollout in two batches (pause if more than 10 % fail)");
    let restarts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let churn = (a.churn > 0).then(|| {
        println!("  with {} device(s) restarting every second", a.churn);
        fleet::churn(
            fleet_options.clone(),
            devices.clone(),
            Duration::from_secs(1),
            a.churn,
            restarts.clone(),
        )
    });
    let record = follow(&sdk).await;
    if let Some(c) = churn {
        c.abort();
        println!(
            "  {} device restarts while the rollout ran",
            restarts.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    let record = record?;
    let roll = t_roll.elapsed();
    println!();

    // 4. Summary.
    let committed = record
        .targets
        .iter()
        .filter(|t| t.phase() == UpdatePhase::Committed)
        .count();
    let failed = record.targets.len() - committed;
    let sent: u64 = record.targets.iter().map(|t| t.chunks_sent).sum();
    let rejected: u32 = record.targets.iter().map(|t| t.chunks_rejected).sum();
    let mut after: std::collections::BTreeMap<String, usize> = Default::default();
    for t in &record.targets {
        *after
            .entry(if t.running_version.is_empty() {
                "?".into()
            } else {
                t.running_version.clone()
            })
            .or_default() += 1;
    }
    let after: Vec<String> = after.iter().map(|(v, c)| format!("{v} x {c}")).collect();
    let state = record
        .campaign
        .as_ref()
        .map(|c| c.state())
        .unwrap_or_default();
    println!("summary");
    println!("  {:<22} {n}", "devices");
    println!("  {:<22} 1.0.0 x {n}", "version before");
    println!("  {:<22} {}", "version after", after.join(", "));
    println!(
        "  {:<22} {ok}/{} succeeded",
        "command 'blink'",
        records.len()
    );
    println!(
        "  {:<22} root version 2 on {n} devices; old commands key refused {refused}/{}, new key {rotated_ok}/{} succeeded",
        "key rotation",
        old_key.len(),
        new_key.len()
    );
    println!(
        "  {:<22} {committed} committed, {failed} failed ({})",
        "update demo-1.1.0",
        lower(state.as_str_name(), "CAMPAIGN_STATE_")
    );
    println!(
        "  {:<22} {} KiB image; {} chunks sent to devices ({:.1} MiB), {rejected} rejected",
        "bytes",
        a.image_kib,
        sent,
        sent as f64 * 16.0 / 1024.0
    );
    println!(
        "  {:<22} rollout {:.1} s, total {:.1} s",
        "time",
        roll.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let success = ok == n
        && refused == n
        && rotated_ok == n
        && committed == n
        && state == CampaignState::Completed;
    println!(
        "{}",
        if success {
            "demo: everything succeeded"
        } else {
            "demo: something failed (see above)"
        }
    );

    if a.keep_running {
        println!("\nThe gateway and the fleet keep running. In another terminal, for example:");
        println!(
            "  cargo run --bin fleetctl -- --gateway localhost:{port} --pki {} status",
            pki.display()
        );
        println!("  cargo run --bin fleetctl -- --gateway localhost:{port} --pki {} update status demo-1.1.0", pki.display());
        println!("Ctrl-C stops them.");
        let _ = tokio::signal::ctrl_c().await;
    }
    for d in devices.lock().await.iter() {
        d.client.shutdown().await;
    }
    let _ = stop_tx.send(());
    let _ = served.await;
    Ok(success)
}

/// A client of service `svc-0001` of the development PKI; commands are signed with the key
/// the caller gives.
fn service(pki: &Path, port: u16) -> cloud_client::FleetClientBuilder {
    FleetClient::builder().gateway("localhost", port).pem_files(
        pki.join("ca.crt"),
        pki.join("services/svc-0001.crt"),
        pki.join("services/svc-0001.key"),
    )
}

/// How many of `records` succeeded.
fn succeeded(records: &[CommandRecord]) -> usize {
    records
        .iter()
        .filter(|r| r.state() == cloud_client::CommandState::Succeeded)
        .count()
}

/// Command `blink` with `payload` to every device of the class, signed with the client's key;
/// the records once all are final.
async fn blink(sdk: &FleetClient, payload: &[u8]) -> Result<Vec<CommandRecord>, Error> {
    Ok(sdk
        .send_command(SendCommand {
            device_class: CLASS.into(),
            name: "blink".into(),
            payload: payload.to_vec(),
            ttl_ms: 60_000,
            ..SendCommand::default()
        })
        .await?
        .wait(Duration::from_secs(60))
        .await?)
}

/// What the rotation made.
struct Rotation {
    /// The new commands key (a real fleet makes it on its holder's machine or HSM).
    new_key: std::sync::Arc<UpdateSigner>,
}

/// Drafts root version 2 with a new commands key, has two of the three development root keys
/// sign it, publishes it through the gateway and waits until every device reports it.
async fn rotate_commands_key(pki: &Path, sdk: &FleetClient, n: usize) -> Result<Rotation, Error> {
    let trust = pki.join("trust");
    let current = SignedRoot::decode(std::fs::read(trust.join("root.bin"))?.as_slice())?;
    let mut next = Root::decode(current.root.as_slice())?;
    next.version += 1;
    let new_key = std::sync::Arc::new(UpdateSigner::generate());
    next.commands = Some(build::role(&[Signer::verifying_key(new_key.as_ref())], 1));
    let mut signed = build::encode(&next);
    for holder in ["root-1.key", "root-2.key"] {
        let key = UpdateSigner::from_pkcs8_pem(&std::fs::read_to_string(trust.join(holder))?)?;
        build::add_signature(&key, &mut signed)?;
    }
    sdk.publish_root(signed.encode_to_vec()).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let on_v2 = sdk
            .status(&[])
            .await?
            .iter()
            .filter(|d| {
                d.trust
                    .as_ref()
                    .is_some_and(|t| t.root_version == next.version)
            })
            .count();
        if on_v2 >= n {
            return Ok(Rotation { new_key });
        }
        if Instant::now() > deadline {
            return Err(format!("{on_v2}/{n} devices took the new root in 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn lower(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = ((done * width as u64).checked_div(total).unwrap_or(0) as usize).min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Draws the rollout's progress (one bar per batch) until the campaign settles.
async fn follow(sdk: &FleetClient) -> Result<UpdateRecord, Error> {
    let tty = std::io::stdout().is_terminal();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut drawn = false;
    let mut last_line = String::new();
    loop {
        let r = sdk.get_update("demo-1.1.0").await?;
        let batches = r.campaign.as_ref().map_or(1, |c| c.batches.max(1));
        let mut lines = Vec::new();
        let mut keys = Vec::new();
        for b in 0..batches {
            let ts: Vec<_> = r.targets.iter().filter(|t| t.batch == b).collect();
            let held: u64 = ts.iter().map(|t| u64::from(t.chunks_held)).sum();
            let total: u64 = ts.iter().map(|t| u64::from(t.chunks_total.max(1))).sum();
            let done = ts
                .iter()
                .filter(|t| t.phase() == UpdatePhase::Committed)
                .count();
            let phase = if done == ts.len() {
                "committed".to_string()
            } else if ts.iter().all(|t| !t.offered) {
                "waiting".to_string()
            } else {
                "downloading".to_string()
            };
            let pct = if ts.iter().all(|t| t.chunks_total == 0) {
                0
            } else {
                held * 100 / total
            };
            keys.push(format!("{}:{done}", pct / 10));
            lines.push(format!(
                "  batch {} {} {pct:>3}%  {done:>4}/{} committed  {phase}",
                b + 1,
                bar(held, total, 30),
                ts.len()
            ));
        }
        if tty {
            if drawn {
                print!("\x1b[{}A", lines.len());
            }
            for l in &lines {
                println!("\x1b[2K{l}");
            }
            drawn = true;
        } else {
            // Not a terminal: a line per batch when it moves by 10 % or commits more.
            let key = keys.join(",");
            if key != last_line {
                println!("{}", lines.join("\n"));
                last_line = key;
            }
        }
        let _ = std::io::stdout().flush();
        let settled = matches!(
            r.campaign.as_ref().map(|c| c.state()),
            Some(CampaignState::Completed | CampaignState::Paused | CampaignState::Aborted)
        );
        if settled || Instant::now() > deadline {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
