//! `bench-gateway`: load figures for the gateway's mTLS edge (not a test).
//!
//! Starts the release `gateway` binary (from the same target directory) on a fresh PKI and
//! measures, with the gateway in its own process so that its CPU and memory are its own:
//! 1. idle mTLS device connections held, and the gateway's memory per connection;
//! 2. mTLS connects per second (TLS handshake + CONNECT + CONNACK);
//! 3. QoS 1 publish throughput device -> service, 256-byte payloads, with a loss check.
//!
//! Run: `./scripts/bench.sh` (builds in release mode, then runs this).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_certs::pki::{InitOptions, Pki};
use fleet_certs::profile::Validity;
use fleet_certs::{Identity, Role};
use fleet_tests::brokers::{Broker, Tls, BENCH_TOPIC};
use fleet_tests::mqtt::{self, Client};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    idle: usize,
    connects: usize,
    publishers: usize,
    seconds: u64,
    rates: Vec<u64>,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        idle: 5_000,
        connects: 2_000,
        publishers: 20,
        seconds: 10,
        rates: vec![10_000, 20_000, 40_000, 60_000],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--idle" => a.idle = value.parse()?,
            "--connects" => a.connects = value.parse()?,
            "--publishers" => a.publishers = value.parse()?,
            "--seconds" => a.seconds = value.parse()?,
            "--rates" => {
                a.rates = value.split(',').map(str::parse).collect::<Result<_, _>>()?;
            }
            other => {
                return Err(format!(
                    "unknown flag {other}; flags: --idle N --connects N --publishers N --seconds N --rates R1,R2,.."
                )
                .into())
            }
        }
    }
    Ok(a)
}

type Ids = Vec<(String, Arc<rustls::ClientConfig>)>;

fn identities(pki: &Pki, prefix: &str, n: usize, role: Role) -> Result<Ids, Error> {
    let ca = Pki::ca_cert_path(pki.dir());
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i:05}");
            let issued =
                pki.sign_unrecorded(&Identity::new(role, &id)?, Validity::days_from_now(2))?;
            Ok((
                id,
                mqtt::client_config(&ca, &issued.cert_pem, &issued.key_pem)?,
            ))
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let args = parse_args()?;
    let tmp = tempfile::tempdir()?;
    let pki = Pki::init(
        &tmp.path().join("pki"),
        &InitOptions {
            devices: 0,
            ..InitOptions::default()
        },
    )?;
    let max = args.idle.max(args.connects) + args.publishers + 100;
    let tls = Tls::from_pki(&pki, "gw-0001")?;
    let gw = Broker::gateway(&tmp.path().join("gateway"), &tls, max, &[])?;
    let addr = gw.address();
    println!(
        "# bench-gateway --idle {} --connects {} --publishers {} --seconds {} --rates {}",
        args.idle,
        args.connects,
        args.publishers,
        args.seconds,
        args.rates
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    println!(
        "# {} cores shared by the gateway (release build) and this load generator",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    // 1. Idle connections.
    let ids = identities(&pki, "idle-", args.idle, Role::Device)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base_rss = gw.rss_kib();
    let mut held = Vec::with_capacity(ids.len());
    let start = Instant::now();
    for chunk in ids.chunks(50) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|(id, cfg)| {
                let (id, cfg, addr) = (id.clone(), cfg.clone(), addr.clone());
                tokio::spawn(async move { Client::connect(&addr, cfg, &id, 600).await })
            })
            .collect();
        for t in tasks {
            held.push(t.await??);
        }
    }
    let took = start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = gw.rss_kib();
    let per = rss.saturating_sub(base_rss) as f64 / held.len().max(1) as f64;
    println!(
        "idle mTLS connections held: {} (opened in {:.1} s); gateway RSS {} MiB -> {} MiB: \
         {:.1} KiB per connection",
        held.len(),
        took.as_secs_f64(),
        base_rss / 1024,
        rss / 1024,
        per
    );
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 2. Connects per second, 32 at a time.
    let ids = Arc::new(identities(&pki, "conn-", args.connects, Role::Device)?);
    let cpu0 = gw.cpu_seconds();
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (next, ids, addr) = (next.clone(), ids.clone(), addr.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some((id, cfg)) = ids.get(i) else {
                        return Ok::<_, Error>(());
                    };
                    let c = Client::connect(&addr, cfg.clone(), id, 60).await?;
                    c.disconnect().await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "mTLS connects (handshake + CONNECT/CONNACK, 32 concurrent): {} in {:.2} s = {:.0}/s; \
         gateway CPU {:.0}% of one core",
        args.connects,
        secs,
        args.connects as f64 / secs,
        100.0 * (gw.cpu_seconds() - cpu0) / secs
    );

    // 3. QoS 1 device -> service, 256-byte payloads: at fixed rates (loss and latency), then
    // flat out.
    let service = identities(&pki, "svc-bench-", 1, Role::Service)?;
    let pubs = identities(&pki, "pub-", args.publishers, Role::Device)?;
    let mut rounds: Vec<Option<u64>> = args.rates.iter().copied().map(Some).collect();
    rounds.push(None);
    for rate in rounds {
        let r = throughput(&gw, &addr, &service[0], &pubs, rate, args.seconds).await?;
        println!("{r}");
    }
    Ok(())
}

/// One throughput round: `rate` messages per second in total, or as fast as 64 in flight per
/// publisher allow (`None`).
async fn throughput(
    gw: &Broker,
    addr: &str,
    service: &(String, Arc<rustls::ClientConfig>),
    pubs: &Ids,
    rate: Option<u64>,
    seconds: u64,
) -> Result<String, Error> {
    let base = Instant::now();
    let (svc_id, svc_cfg) = service;
    let mut sub = Client::connect(addr, svc_cfg.clone(), svc_id, 60).await?;
    // A device topic nothing inside the gateway consumes: this measures the edge and the MQTT
    // core (status reports are stored before they are acknowledged, progress reports decoded).
    sub.subscribe(&format!("devices/+/{BENCH_TOPIC}"), 1)
        .await?;
    let received = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (rx_count, lat) = (received.clone(), latencies.clone());
    let receiver =
        tokio::spawn(async move { sub.receive_and_ack(rx_count, Some((base, lat))).await });
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(seconds);
    let cpu0 = gw.cpu_seconds();
    let start = Instant::now();
    let mut tasks = Vec::new();
    let per_publisher = rate.map(|r| r as f64 / pubs.len().max(1) as f64);
    for (id, cfg) in pubs.iter().cloned() {
        let (addr, acked) = (addr.to_owned(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr, cfg, &id, 60).await?;
            let topic = format!("devices/{id}/{BENCH_TOPIC}");
            match per_publisher {
                Some(r) => {
                    c.publish_qos1_paced(&topic, 256, r, 64, stop, base, &acked)
                        .await?
                }
                None => {
                    c.publish_qos1_until(&topic, &mqtt::stamp(base, 256), 64, stop, &acked)
                        .await?
                }
            }
            c.disconnect().await;
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = gw.cpu_seconds() - cpu0;
    let sent = acked.load(Ordering::Relaxed);
    let drain_end = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = received.load(Ordering::Relaxed);
    receiver.abort();
    let mut lat = latencies.lock().map(|v| v.clone()).unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |n| *n as f64 / 1e6)
    };
    let loss = if got >= sent {
        "none lost".to_owned()
    } else {
        format!("{} LOST", sent - got)
    };
    let what = match rate {
        Some(r) => format!("at {r} msg/s offered"),
        None => "flat out (64 in flight per publisher)".to_owned(),
    };
    Ok(format!(
        "QoS 1 device -> service, 256 B, {} publishers, {what}, {seconds} s: {sent} acked = {:.0} msg/s; \
         received {got} ({loss}); latency p50 {:.2} ms p99 {:.2} ms; gateway CPU {:.0}% of one core, RSS {} MiB",
        pubs.len(),
        sent as f64 / secs,
        pct(0.50),
        pct(0.99),
        100.0 * cpu / secs,
        gw.rss_kib() / 1024
    ))
}
