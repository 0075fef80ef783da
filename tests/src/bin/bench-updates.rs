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
//!
//! With `--status-during-upload`, it measures instead how long devices wait for the
//! acknowledgement of their status reports (each stored before it is acknowledged) while a
//! service uploads an image: `--reporters` devices each publish one report (QoS 1) every
//! `--report-ms` and wait for its PUBACK, first for `--baseline-s` seconds with nothing else
//! going on, then while the image (`--image-mib`, 64 by default in this mode) is uploaded
//! through the fleet API. Prints p50, p99 and the maximum of both phases.
//! Run: `./scripts/bench.sh updates --status-during-upload --image-mib 64`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_demo::fleet::{self, FleetOptions};
use fleet_proto::v1::{StatusReport, UpdatePhase};
use fleet_proto::Message;
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
    status_during_upload: bool,
    reporters: usize,
    report_ms: u64,
    baseline_s: u64,
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
        status_during_upload: false,
        reporters: 20,
        report_ms: 20,
        baseline_s: 5,
    };
    let mut image_mib = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--devices" => a.devices = val()?.parse()?,
            "--image-mib" => image_mib = Some(val()?.parse()?),
            "--chunk-kib" => a.chunk_kib = val()?.parse()?,
            "--state" => a.state = val()?.into(),
            "--status-during-upload" => a.status_during_upload = true,
            "--reporters" => a.reporters = val()?.parse()?,
            "--report-ms" => a.report_ms = val()?.parse()?,
            "--baseline-s" => a.baseline_s = val()?.parse()?,
            "--help" | "-h" => {
                println!(
                    "bench-updates [--devices N] [--image-mib M] [--chunk-kib K] [--state DIR]\n\
                     bench-updates --status-during-upload [--image-mib M] [--chunk-kib K] \
                     [--reporters N] [--report-ms MS] [--baseline-s S]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    a.image_mib = image_mib.unwrap_or(if a.status_during_upload { 64 } else { 32 });
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let a = parse_args()?;
    if a.status_during_upload {
        return status_during_upload(&a).await;
    }
    let dir = tempfile::tempdir()?;
    let gw = GatewayProc::start(dir.path(), a.devices as u32, &[]);
    let pki = gw.pki();
    let (signer, _, _) = authority(dir.path());
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

    let root = std::fs::read(pki.join("trust/root.bin"))?;
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
        root: Some(root),
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

/// Which phase a status acknowledgement was measured in.
const WARMUP: u8 = 0;
const BASELINE: u8 = 1;
const UPLOAD: u8 = 2;
const STOP: u8 = 3;

/// Status acknowledgement latencies (microseconds) per phase.
type Samples = Arc<Mutex<[Vec<u64>; 3]>>;

async fn status_during_upload(a: &Args) -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let gw = GatewayProc::start(dir.path(), a.reporters as u32, &[]);
    let pki = gw.pki();
    let (signer, _, _) = authority(dir.path());
    let image_path = dir.path().join("image");
    write_image(&image_path, a.image_mib << 20, 42);
    let sdk = gw.fleet().await;

    let phase = Arc::new(AtomicU8::new(WARMUP));
    let samples: Samples = Arc::default();
    let mut reporters = Vec::new();
    for i in 1..=a.reporters {
        let id = format!("dev-{i:04}");
        let stream = connect(&gw.address(), &pki, &id).await?;
        reporters.push(tokio::spawn(report_loop(
            stream,
            id,
            Duration::from_millis(a.report_ms),
            phase.clone(),
            samples.clone(),
        )));
    }
    // Let every reporter store its first reports before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = cpu_seconds(gw.pid());
    phase.store(BASELINE, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(a.baseline_s)).await;
    let cpu1 = cpu_seconds(gw.pid());
    phase.store(UPLOAD, Ordering::Relaxed);
    let t = Instant::now();
    let mut p = Publish::new("bench-status-1", &image_path);
    p.chunk_size = a.chunk_kib * 1024;
    p.run(&sdk, &signer).await;
    let upload = t.elapsed();
    phase.store(STOP, Ordering::Relaxed);
    let cpu2 = cpu_seconds(gw.pid());
    for r in reporters {
        r.await??;
    }
    let hwm_mib = status_kib(gw.pid(), "VmHWM:") as f64 / 1024.0;

    println!(
        "# bench-updates --status-during-upload --image-mib {} --chunk-kib {} --reporters {} --report-ms {} --baseline-s {}",
        a.image_mib, a.chunk_kib, a.reporters, a.report_ms, a.baseline_s
    );
    let all = samples.lock().map_err(|_| "samples poisoned")?.clone();
    let line = |name: &str, v: &[u64], secs: f64, cpu: f64| {
        println!(
            "{name}: {} status acks in {secs:.2} s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; gateway CPU {:.0} % of one core",
            v.len(),
            percentile(v, 50.0),
            percentile(v, 99.0),
            percentile(v, 100.0),
            100.0 * cpu / secs
        );
    };
    line(
        "no upload",
        &all[usize::from(BASELINE)],
        a.baseline_s as f64,
        cpu1 - cpu0,
    );
    line(
        &format!(
            "during the upload of {} MiB ({:.2} s, {:.1} MiB/s)",
            a.image_mib,
            upload.as_secs_f64(),
            a.image_mib as f64 / upload.as_secs_f64()
        ),
        &all[usize::from(UPLOAD)],
        upload.as_secs_f64(),
        cpu2 - cpu1,
    );
    println!("gateway: peak RSS {hwm_mib:.0} MiB");
    Ok(())
}

/// The `q`th percentile of `v` (microseconds) in milliseconds; 0 when empty.
fn percentile(v: &[u64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return 0.0;
    }
    let at = ((q / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[at.min(v.len() - 1)] as f64 / 1000.0
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// mTLS to the gateway as device `id`, CONNECT, CONNACK accepted.
async fn connect(addr: &str, pki: &Path, id: &str) -> Result<(Tls, Vec<u8>), Error> {
    let config = fleet_testkit::mqtt::client_config(
        &pki.join("ca.crt"),
        &std::fs::read_to_string(pki.join(format!("devices/{id}.crt")))?,
        &std::fs::read_to_string(pki.join(format!("devices/{id}.key")))?,
    )?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
        .await?;
    tls.write_all(&fleet_testkit::mqtt::connect_packet(id, 60))
        .await?;
    let mut inbuf = Vec::new();
    let (first, body) = next_packet(&mut tls, &mut inbuf).await?;
    if first != 0x20 || body.get(1) != Some(&0) {
        return Err(format!("{id}: CONNACK refused").into());
    }
    Ok((tls, inbuf))
}

async fn next_packet(tls: &mut Tls, inbuf: &mut Vec<u8>) -> Result<(u8, Vec<u8>), Error> {
    loop {
        if let Some(p) = fleet_testkit::mqtt::split_packet(inbuf)? {
            return Ok(p);
        }
        let mut chunk = [0u8; 4096];
        let n = tls.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed".into());
        }
        inbuf.extend_from_slice(&chunk[..n]);
    }
}

/// One device: a status report every `every`, each waiting for its PUBACK; the wait is
/// recorded in the phase it started in.
async fn report_loop(
    (mut tls, mut inbuf): (Tls, Vec<u8>),
    id: String,
    every: Duration,
    phase: Arc<AtomicU8>,
    samples: Samples,
) -> Result<(), Error> {
    let topic = format!("devices/{id}/status");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    loop {
        tick.tick().await;
        let now_phase = phase.load(Ordering::Relaxed);
        if now_phase == STOP {
            return Ok(());
        }
        sequence += 1;
        let pkid = (sequence % 60_000 + 1) as u16;
        let report = StatusReport {
            sequence,
            ..StatusReport::default()
        }
        .encode_to_vec();
        let t = Instant::now();
        tls.write_all(&fleet_testkit::mqtt::publish_packet(
            topic.as_bytes(),
            &report,
            1,
            pkid,
        ))
        .await?;
        loop {
            let (first, body) = next_packet(&mut tls, &mut inbuf).await?;
            if first == 0x40 && body.get(..2) == Some(&pkid.to_be_bytes()[..]) {
                break;
            }
        }
        let waited = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        if now_phase != WARMUP {
            if let Ok(mut s) = samples.lock() {
                s[usize::from(now_phase)].push(waited);
            }
        }
    }
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
    let client = fleet_testkit::mqtt::client_config(
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
