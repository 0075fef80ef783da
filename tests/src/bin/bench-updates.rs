//! `bench-updates`: firmware fan-out figures (not a test).
//!
//! Starts the release `gateway` (its own process, so its CPU and memory are its own), uploads a
//! signed image through the SDK, runs N simulated devices on the device library in this process
//! (state directories under `--state`, /dev/shm by default so the devices' writes do not
//! measure the disk), deploys the update to all of them at once and times it until every
//! device has verified every chunk and the whole image and committed. Then, for comparison,
//! pushes the same number of bytes through one plain rustls stream over loopback.
//!
//! Run: `./scripts/bench.sh updates [--devices 200] [--image-mib 32]`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_demo::fleet::{self, FleetOptions};
use fleet_proto::signing::TrustedKeys;
use fleet_proto::v1::UpdatePhase;
use fleet_tests::procs::{cpu_seconds, status_kib, GatewayProc};
use fleet_tests::updates::{authority, write_image, Publish};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    devices: usize,
    image_mib: usize,
    chunk_kib: u32,
    state: PathBuf,
}

fn parse_args() -> Result<Args, Error> {
    let shm = PathBuf::from("/dev/shm");
    let mut a = Args {
        devices: 200,
        image_mib: 32,
        chunk_kib: 16,
        state: if shm.is_dir() {
            shm.join("fleet-bench-updates")
        } else {
            std::env::temp_dir().join("fleet-bench-updates")
        },
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--devices" => a.devices = val()?.parse()?,
            "--image-mib" => a.image_mib = val()?.parse()?,
            "--chunk-kib" => a.chunk_kib = val()?.parse()?,
            "--state" => a.state = val()?.into(),
            "--help" | "-h" => {
                println!(
                    "bench-updates [--devices N] [--image-mib M] [--chunk-kib K] [--state DIR]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let a = parse_args()?;
    let dir = tempfile::tempdir()?;
    let gw = GatewayProc::start(dir.path(), a.devices as u32, &[]);
    let pki = gw.pki();
    let (signer, _, public) = authority(dir.path());
    let image_path = dir.path().join("image");
    let size = a.image_mib << 20;
    write_image(&image_path, size, 42);
    let sdk = gw.fleet().await;
    let t = Instant::now();
    let mut p = Publish::new("bench-1.1", &image_path);
    p.chunk_size = a.chunk_kib * 1024;
    let rec = p.run(&sdk, &signer).await;
    let upload = t.elapsed();
    let chunks = rec.images.first().map_or(0, |i| i.chunk_count);

    let mut keys = TrustedKeys::new();
    keys.add_pem(&std::fs::read_to_string(&public)?)?;
    fleet::fresh_root(&a.state)?;
    let ids: Vec<String> = (1..=a.devices).map(|i| format!("dev-{i:04}")).collect();
    let devices = fleet::start(&FleetOptions {
        host: "localhost".into(),
        port: gw.addr.port(),
        pki: pki.clone(),
        state_root: a.state.clone(),
        ids: ids.clone(),
        class: "test-class".into(),
        version: "1.0.0".into(),
        keys,
        slots: false,
    })?;
    fleet::wait_connected(&devices).await?;

    let cpu0 = cpu_seconds(gw.pid());
    let t = Instant::now();
    sdk.deploy_update(cloud_client::DeployUpdate {
        update_id: "bench-1.1".into(),
        device_ids: ids.clone(),
        ..Default::default()
    })
    .await?;
    loop {
        let done = fleet::count_phase(&devices, "bench-1.1", UpdatePhase::Committed);
        let failed = fleet::reports(&devices)
            .iter()
            .flatten()
            .filter(|r| r.phase() == UpdatePhase::Failed)
            .count();
        if done + failed == a.devices {
            if failed > 0 {
                return Err(format!("{failed} devices failed the update").into());
            }
            break;
        }
        if t.elapsed() > Duration::from_secs(1800) {
            return Err(format!("only {done} of {} committed after 30 min", a.devices).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fan_out = t.elapsed();
    let cpu = cpu_seconds(gw.pid()) - cpu0;
    let hwm_mib = status_kib(gw.pid(), "VmHWM:") as f64 / 1024.0;
    let record = sdk.get_update("bench-1.1").await?;
    let sent: u64 = record.targets.iter().map(|t| t.chunks_sent).sum();
    for d in &devices {
        d.client.shutdown().await;
    }
    drop(devices);
    let _ = std::fs::remove_dir_all(&a.state);

    let total_bytes = (size * a.devices) as u64;
    let raw = raw_tls(&pki, total_bytes).await?;
    let mib = total_bytes as f64 / (1 << 20) as f64;
    let rate = mib / fan_out.as_secs_f64();
    let raw_rate = mib / raw.as_secs_f64();
    println!(
        "# bench-updates --devices {} --image-mib {} --chunk-kib {}",
        a.devices, a.image_mib, a.chunk_kib
    );
    println!("image: {} MiB, {chunks} chunks of {} KiB; upload through the fleet API: {:.2} s ({:.1} MiB/s)",
        a.image_mib, a.chunk_kib, upload.as_secs_f64(), a.image_mib as f64 / upload.as_secs_f64());
    println!("fan-out: {} devices committed in {:.2} s: {mib:.0} MiB delivered, {rate:.1} MiB/s aggregate",
        a.devices, fan_out.as_secs_f64());
    println!(
        "chunks sent {sent} for {} needed ({:.3}x)",
        u64::from(chunks) * a.devices as u64,
        sent as f64 / (u64::from(chunks) * a.devices as u64) as f64
    );
    println!("gateway: {cpu:.2} s CPU ({:.0} % of one core during the fan-out), peak RSS {hwm_mib:.0} MiB",
        100.0 * cpu / fan_out.as_secs_f64());
    println!(
        "raw TLS, one rustls stream over loopback, same {mib:.0} MiB: {:.2} s, {raw_rate:.1} MiB/s",
        raw.as_secs_f64()
    );
    println!("ratio fan-out / raw TLS: {:.2}", rate / raw_rate);
    Ok(())
}

/// Time to push `total` bytes through one TLS 1.3 stream (the gateway's certificate, a
/// device's client certificate), 16 KiB writes, read and discarded by the server.
async fn raw_tls(pki: &std::path::Path, total: u64) -> Result<Duration, Error> {
    let chain = CertificateDer::pem_file_iter(pki.join("gateways/gw-0001.crt"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(pki.join("gateways/gw-0001.key"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let client = fleet_tests::mqtt::client_config(
        &pki.join("ca.crt"),
        &std::fs::read_to_string(pki.join("devices/dev-0001.crt"))?,
        &std::fs::read_to_string(pki.join("devices/dev-0001.key"))?,
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        let mut tls = acceptor.accept(sock).await?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        while got < total {
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok::<u64, std::io::Error>(got)
    });
    let sock = tokio::net::TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(client);
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?.to_owned(), sock)
        .await?;
    let chunk = vec![0x5au8; 16 * 1024];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let n = chunk.len().min((total - sent) as usize);
        tls.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    tls.flush().await?;
    let got = reader.await??;
    let elapsed = t.elapsed();
    if got != total {
        return Err(format!("raw TLS: {got} of {total} bytes arrived").into());
    }
    Ok(elapsed)
}
