//! The combined chaos test: a real gateway process bridged to a real cloud broker (mosquitto)
//! through a link the test can cut, ~50 `test-device` processes on the device library, and
//! during one run a two-batch signed rollout, hundreds of durable signed commands and steady
//! status reports from every device, while faults land at random moments: the gateway
//! SIGKILLed and restarted, devices SIGKILLed and restarted, the uplink cut and restored, the
//! cloud broker restarted. Then it checks what the guarantees promise (see `Checks`).
//!
//! Reproducible: every random choice (fault times and kinds, which devices, command targets)
//! comes from one seed, printed first and in every failure (`FLEET_CHAOS_SEED=N` runs it
//! again). Process timing is not reproducible; the schedule is.
//!
//! Environment: `FLEET_CHAOS_SEED`, `FLEET_CHAOS_DEVICES` (50), `FLEET_CHAOS_SECONDS` (length
//! of the fault phase, 60; large: a soak), `FLEET_CHAOS_COMMANDS` (5 per second of the fault
//! phase), `FLEET_CHAOS_SAMPLES=PATH` (one CSV line appended per second, after a header line
//! when the file is new: unix_ms, gateway_rss_kib, gateway_fds, connections,
//! bridge_queue_depth, bridge_connected, commands_open — submitted minus completed and expired
//! since that gateway process started), and
//! `FLEET_CHAOS_BREAK=status-ack-order` (the gateway acknowledges status reports before it
//! stores them: a broken guarantee the test must catch).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloud_client::{
    ApiErrorCode, CommandRecord, CommandState, DeployUpdate, FleetClient, SdkError, SendCommand,
    UpdatePhase,
};
use fleet_proto::Message;
use fleet_tests::mosquitto::{Mosquitto, Observer};
use fleet_tests::procs::{status_kib, DeviceOpts, DeviceProc, GatewayProc};
use fleet_tests::proxy::{Relay, Target};
use fleet_tests::updates::{authority, write_image, Publish};

const UPDATE: &str = "fw-chaos";
/// Generous fixed bounds for the gateway process (about 55 connections).
const MAX_RSS_KIB: u64 = 512 * 1024;
const MAX_FDS: u64 = 1024;
/// Most the setup (processes started, update published, fleet connected) may take.
const SETUP: Duration = Duration::from_secs(60);
/// Most the settling after the fault phase may take (every wait in it shares this deadline).
const SETTLE: Duration = Duration::from_secs(120);
/// The delay of the broken status path: long enough that a SIGKILL lands in the gap.
const BROKEN_ACK_DELAY_MS: &str = "1500";

/// SplitMix64: small, seedable, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi` (`lo` when empty).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next() % (hi - lo)
        }
    }
    fn percent(&mut self, p: u64) -> bool {
        self.range(0, 100) < p
    }
}

#[derive(Debug, Clone)]
struct Config {
    seed: u64,
    devices: usize,
    seconds: u64,
    commands: usize,
    samples: Option<PathBuf>,
    broken: bool,
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

impl Config {
    fn from_env() -> Self {
        let seed = env_num("FLEET_CHAOS_SEED").unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            Rng(t ^ u64::from(std::process::id()).rotate_left(32)).next()
        });
        let seconds = env_num("FLEET_CHAOS_SECONDS").unwrap_or(60).max(10);
        let broken = match std::env::var("FLEET_CHAOS_BREAK").as_deref() {
            Err(_) | Ok("") => false,
            Ok("status-ack-order") => true,
            Ok(other) => panic!("FLEET_CHAOS_BREAK={other:?}: only status-ack-order exists"),
        };
        Config {
            seed,
            devices: env_num("FLEET_CHAOS_DEVICES").unwrap_or(50).clamp(2, 500) as usize,
            seconds,
            commands: env_num("FLEET_CHAOS_COMMANDS").unwrap_or(seconds * 5) as usize,
            samples: std::env::var_os("FLEET_CHAOS_SAMPLES").map(PathBuf::from),
            broken,
        }
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone)]
enum Fault {
    /// SIGKILL the gateway; start it again on the same data after `down_ms`.
    GatewayKill { down_ms: u64 },
    /// SIGKILL these devices; start them again on the same state after `down_ms`.
    DeviceKill { devices: Vec<usize>, down_ms: u64 },
    /// Cut the uplink (every connection dropped, new ones refused).
    UplinkCut,
    /// Restore it.
    UplinkRestore,
    /// Stop the cloud broker (SIGTERM: it saves its sessions) and start it again.
    CloudRestart,
    /// Not a fault: the devices' update self-tests, held until now, pass. The first batch of
    /// the rollout waits in its self-test through the first half of the faults.
    ReleaseSelfTests,
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::GatewayKill { .. } => "gateway SIGKILL+restart",
            Fault::DeviceKill { .. } => "device SIGKILL+restart",
            Fault::UplinkCut => "uplink cut",
            Fault::UplinkRestore => "uplink restored",
            Fault::CloudRestart => "cloud broker restart",
            Fault::ReleaseSelfTests => "self-tests released",
        }
    }
}

/// The fault schedule of a run: (ms into the fault phase, fault), in order. A pure function
/// of the seed, the phase length and the fleet size.
fn schedule(rng: &mut Rng, seconds: u64, devices: usize) -> Vec<(u64, Fault)> {
    let span = seconds * 1000;
    let at = |rng: &mut Rng, lo: u64, hi: u64| rng.range(span * lo / 100, span * hi / 100);
    let mut out = Vec::new();
    for _ in 0..(2 + seconds / 60 + rng.range(0, 2)) {
        let t = at(rng, 8, 85);
        out.push((
            t,
            Fault::GatewayKill {
                down_ms: rng.range(300, 3000),
            },
        ));
    }
    for _ in 0..(1 + seconds / 40 + rng.range(0, 2)) {
        let t = at(rng, 5, 80);
        out.push((t, Fault::UplinkCut));
        out.push(((t + rng.range(2000, 8000)).min(span), Fault::UplinkRestore));
    }
    for _ in 0..(1 + seconds / 60) {
        let t = at(rng, 10, 90);
        out.push((t, Fault::CloudRestart));
    }
    for _ in 0..(seconds / 4).max(1) {
        let t = at(rng, 3, 95);
        let mut picked = Vec::new();
        for _ in 0..rng.range(1, 4) {
            let d = rng.range(0, devices as u64) as usize;
            if !picked.contains(&d) {
                picked.push(d);
            }
        }
        out.push((
            t,
            Fault::DeviceKill {
                devices: picked,
                down_ms: rng.range(200, 3000),
            },
        ));
    }
    out.push((span / 2, Fault::ReleaseSelfTests));
    // Stable: a cut and its restore at the same moment stay in that order.
    out.sort_by_key(|(t, _)| *t);
    out
}

/// A command the run will submit.
#[derive(Debug, Clone)]
struct PlannedCommand {
    id: String,
    device: usize,
    name: &'static str,
    ttl_ms: u64,
    at_ms: u64,
}

fn plan_commands(rng: &mut Rng, cfg: &Config) -> Vec<PlannedCommand> {
    let span = cfg.seconds * 1000;
    let mut out: Vec<PlannedCommand> = (0..cfg.commands)
        .map(|i| PlannedCommand {
            id: format!("chaos-{:016x}-{i:05}", cfg.seed),
            device: rng.range(0, cfg.devices as u64) as usize,
            name: if rng.percent(10) { "fail" } else { "ping" },
            // A few expire quickly, so expiry happens during the faults; the rest live long.
            ttl_ms: if rng.percent(10) { 3_000 } else { 600_000 },
            at_ms: rng.range(0, span * 9 / 10),
        })
        .collect();
    out.sort_by_key(|c| c.at_ms);
    out
}

/// What the run did and found, printed at the end and in every failure.
#[derive(Debug, Default)]
struct Summary {
    seed: u64,
    devices: usize,
    seconds: u64,
    broken: bool,
    phase: String,
    faults: BTreeMap<&'static str, u64>,
    commands_planned: usize,
    commands_submit_errors: u64,
    commands: BTreeMap<String, u64>,
    reports_acked: u64,
    reports_in_registry: u64,
    reports_upstream: u64,
    reports_upstream_distinct: u64,
    rollout: BTreeMap<String, u64>,
    rollout_midway: BTreeMap<String, u64>,
    samples: u64,
    max_rss_kib: u64,
    max_fds: u64,
    checks: Vec<(String, bool, String)>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "=== chaos summary (seed {}) ===", self.seed)?;
        writeln!(
            f,
            "rerun with FLEET_CHAOS_SEED={}{}",
            self.seed,
            if self.broken {
                " FLEET_CHAOS_BREAK=status-ack-order"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "phase: {}; devices: {}; fault phase: {} s; broken guarantee: {}",
            self.phase,
            self.devices,
            self.seconds,
            if self.broken {
                "status-ack-order"
            } else {
                "none"
            }
        )?;
        writeln!(f, "faults injected: {:?}", self.faults)?;
        writeln!(
            f,
            "commands: {} planned, {} submission errors (retried or checked), final states {:?}",
            self.commands_planned, self.commands_submit_errors, self.commands
        )?;
        writeln!(
            f,
            "reports: {} acknowledged to devices, {} in the registry, {} distinct upstream ({} received, {} duplicates)",
            self.reports_acked,
            self.reports_in_registry,
            self.reports_upstream_distinct,
            self.reports_upstream,
            self.reports_upstream.saturating_sub(self.reports_upstream_distinct)
        )?;
        writeln!(
            f,
            "rollout ({UPDATE}, two batches): {:?} (halfway through the faults: {:?})",
            self.rollout, self.rollout_midway
        )?;
        writeln!(
            f,
            "gateway: {} samples, max RSS {} KiB (bound {MAX_RSS_KIB}), max fds {} (bound {MAX_FDS})",
            self.samples, self.max_rss_kib, self.max_fds
        )?;
        writeln!(f, "checks:")?;
        for (name, ok, detail) in &self.checks {
            let verdict = if *ok { "PASS" } else { "FAIL" };
            writeln!(
                f,
                "  [{verdict}] {name}{}",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            )?;
        }
        Ok(())
    }
}

type Shared = Arc<Mutex<Summary>>;

fn with<T>(s: &Shared, f: impl FnOnce(&mut Summary) -> T) -> T {
    match s.lock() {
        Ok(mut g) => f(&mut g),
        Err(p) => f(&mut p.into_inner()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let cfg = Config::from_env();
    let seed = cfg.seed;
    {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "chaos: seed {seed} (rerun with FLEET_CHAOS_SEED={seed})"
        );
    }
    let summary: Shared = Arc::new(Mutex::new(Summary {
        seed,
        devices: cfg.devices,
        seconds: cfg.seconds,
        broken: cfg.broken,
        phase: "setup".into(),
        ..Summary::default()
    }));
    // The whole run, fault phase included, within this; past it the test fails with the
    // summary so far.
    let hard = Duration::from_secs(cfg.seconds) + SETUP + SETTLE + Duration::from_secs(30);
    // Run here (the processes are owned by this future: dropped, they are killed), with the
    // panics of the run caught so that its failure carries the summary.
    let outcome =
        tokio::time::timeout(hard, CatchUnwind(Box::pin(run(cfg, summary.clone())))).await;
    let text = with(&summary, |s| s.to_string());
    match outcome {
        // Past the test harness's capture, so that a passing run shows it too.
        Ok(Ok(())) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "{text}");
        }
        Ok(Err(p)) => {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".into());
            eprintln!("{text}");
            panic!("chaos test failed (rerun with FLEET_CHAOS_SEED={seed}): {why}\n{text}");
        }
        Err(_) => {
            eprintln!("{text}");
            panic!(
                "chaos test passed its deadline of {hard:?} (rerun with FLEET_CHAOS_SEED={seed})\n{text}"
            );
        }
    }
}

/// A future whose panic becomes its output.
struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Err(p) => std::task::Poll::Ready(Err(p)),
        }
    }
}

/// The running gateway, for the sampler.
type Current = Arc<Mutex<Option<(u32, Option<SocketAddr>)>>>;

fn set_current(c: &Current, v: Option<(u32, Option<SocketAddr>)>) {
    match c.lock() {
        Ok(mut g) => *g = v,
        Err(p) => *p.into_inner() = v,
    }
}

fn start_gateway(dir: &Path, devices: usize, env: &[(String, String)]) -> GatewayProc {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    tokio::task::block_in_place(|| GatewayProc::start(dir, devices as u32, &env))
}

fn device_opts(dir: &Path, i: usize) -> DeviceOpts {
    let id = device_id(i);
    let mut o = DeviceOpts::new(dir, &id);
    o.args = vec![
        "--report-every".into(),
        "1000".into(),
        "--report-stop".into(),
        dir.join("stop-reports").display().to_string(),
        "--report-log".into(),
        dir.join(format!("{id}-reports.log")).display().to_string(),
        "--self-test-until".into(),
        dir.join("self-tests-pass").display().to_string(),
        "--committed-log".into(),
        dir.join(format!("{id}-commits.log")).display().to_string(),
    ];
    o
}

fn device_id(i: usize) -> String {
    format!("dev-{:04}", i + 1)
}

/// An SDK call bounded in time (a publish can wait for the client's queue while the gateway
/// is down).
async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, SdkError>>,
) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_secs(15), f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 15 s".into()),
    }
}

async fn run(cfg: Config, sum: Shared) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng(cfg.seed);
    let plan = schedule(&mut rng, cfg.seconds, cfg.devices);
    let commands = plan_commands(&mut rng, &cfg);
    with(&sum, |s| s.commands_planned = commands.len());
    eprintln!(
        "chaos: {} devices, {} s of faults ({} planned), {} commands",
        cfg.devices,
        cfg.seconds,
        plan.len(),
        commands.len()
    );

    // The cloud broker's stable address; the uplink (the bridge's way there) in front of it,
    // so cutting the uplink leaves the cloud-side observer connected.
    let cloud_relay = Relay::start(None).unwrap();
    let cloud_addr = cloud_relay.addr;
    let uplink = Relay::start(Some(Target::Tcp(cloud_addr))).unwrap();
    // Devices and the SDK reach the gateway, wherever it restarts, here.
    let front = Relay::start(None).unwrap();
    let mut env = vec![
        (
            "GATEWAY__BRIDGE__UPSTREAM".to_owned(),
            format!("localhost:{}", uplink.addr.port()),
        ),
        ("GATEWAY__BRIDGE__RECONNECT_MAX".to_owned(), "1s".to_owned()),
        (
            "GATEWAY__COMMANDS__REDELIVER_AFTER".to_owned(),
            "5s".to_owned(),
        ),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ];
    if cfg.broken {
        env.push((
            "GATEWAY_TEST_STATUS_ACK_FIRST_MS".to_owned(),
            BROKEN_ACK_DELAY_MS.to_owned(),
        ));
    }
    let mut gw = Some(start_gateway(dir, cfg.devices, &env));
    if cfg.broken {
        // A gateway built without the test switches would ignore the variable and pass.
        let said = "status reports are acknowledged before they are stored";
        fleet_testkit::eventually(Duration::from_secs(10), said, || {
            gw.as_ref().unwrap().logged(said)
        })
        .await;
    }
    let current: Current = Arc::new(Mutex::new(None));
    {
        let g = gw.as_ref().unwrap();
        front.point_to(Some(Target::Tcp(g.addr)));
        set_current(&current, Some((g.pid(), g.metrics_addr)));
    }
    let pki = gw.as_ref().unwrap().pki();
    let mut cloud = tokio::task::block_in_place(|| {
        Mosquitto::start(
            &dir.join("cloud"),
            cloud_relay,
            &pki.join("ca.crt"),
            &pki.join("gateways/gw-0001.crt"),
            &pki.join("gateways/gw-0001.key"),
        )
    });
    let mut observer = Observer::start(
        cloud_addr.port(),
        &pki.join("ca.crt"),
        &pki.join("services/svc-0001.crt"),
        &pki.join("services/svc-0001.key"),
        "chaos-observer",
        "gateways/gw-0001/devices/+/status",
    );
    assert!(
        observer.wait_subscribed(Duration::from_secs(30)).await,
        "the cloud observer subscribes"
    );

    let fleet = FleetClient::builder()
        .gateway("127.0.0.1", front.addr.port())
        .pem_files(
            pki.join("ca.crt"),
            pki.join("services/svc-0001.crt"),
            pki.join("services/svc-0001.key"),
        )
        .request_timeout(Duration::from_secs(5))
        .command_key_file(pki.join("trust/commands-1.key"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("SDK connect: {e}"));

    // The update, published before the faults.
    let (signer, _, _) = authority(dir);
    let image_path = dir.join("image");
    let image = write_image(&image_path, 512 * 1024, cfg.seed);
    Publish::new(UPDATE, &image_path).run(&fleet, &signer).await;

    // The fleet.
    let opts: Vec<DeviceOpts> = (0..cfg.devices).map(|i| device_opts(dir, i)).collect();
    let front_addr = format!("127.0.0.1:{}", front.addr.port());
    let mut devices: Vec<Option<DeviceProc>> = tokio::task::block_in_place(|| {
        opts.iter()
            .map(|o| Some(DeviceProc::start(&front_addr, &pki, o)))
            .collect()
    });
    for d in devices.iter().flatten() {
        d.connected(Duration::from_secs(90)).await;
    }
    fleet_testkit::eventually(Duration::from_secs(30), "the bridge connects", || {
        http_metrics(gw.as_ref().unwrap().metrics_addr).and_then(|m| metric(&m, "bridge_connected"))
            == Some(1.0)
    })
    .await;

    // The sampler, every second, for the whole run.
    let samples: Arc<Mutex<Vec<[u64; 2]>>> = Arc::default();
    let sampler = tokio::spawn(sample(
        current.clone(),
        samples.clone(),
        cfg.samples.clone(),
    ));

    // The fault phase: the rollout starts, the commands flow, the faults land.
    with(&sum, |s| s.phase = "fault phase".into());
    let ids: Vec<String> = (0..cfg.devices).map(device_id).collect();
    let start = tokio::time::Instant::now();
    deploy(&fleet, &ids).await;
    let submitted: Arc<Mutex<Submitted>> = Arc::default();
    let mut submitter = tokio::spawn(submit(
        fleet.clone(),
        commands.clone(),
        start,
        sum.clone(),
        submitted.clone(),
    ));
    let began = Instant::now();
    for (at, fault) in &plan {
        tokio::time::sleep_until(start + Duration::from_millis(*at)).await;
        eprintln!(
            "chaos: t={:.1}s {} {:?}",
            began.elapsed().as_secs_f64(),
            fault.kind(),
            fault
        );
        match fault {
            Fault::GatewayKill { down_ms } => {
                front.point_to(None);
                set_current(&current, None);
                if let Some(g) = gw.take() {
                    g.kill();
                }
                tokio::time::sleep(Duration::from_millis(*down_ms)).await;
                let g = start_gateway(dir, cfg.devices, &env);
                front.point_to(Some(Target::Tcp(g.addr)));
                set_current(&current, Some((g.pid(), g.metrics_addr)));
                gw = Some(g);
            }
            Fault::DeviceKill {
                devices: which,
                down_ms,
            } => {
                for &i in which {
                    if let Some(d) = devices[i].take() {
                        d.kill();
                    }
                }
                tokio::time::sleep(Duration::from_millis(*down_ms)).await;
                tokio::task::block_in_place(|| {
                    for &i in which {
                        devices[i] = Some(DeviceProc::start(&front_addr, &pki, &opts[i]));
                    }
                });
            }
            Fault::UplinkCut => {
                uplink.point_to(None);
                uplink.sever();
            }
            Fault::UplinkRestore => uplink.point_to(Some(Target::Tcp(cloud_addr))),
            Fault::CloudRestart => tokio::task::block_in_place(|| cloud.restart()),
            Fault::ReleaseSelfTests => {
                // Where the rollout stands when its held self-tests are let through.
                if let Ok(r) = bounded(fleet.get_update(UPDATE)).await {
                    let mut phases: BTreeMap<String, u64> = BTreeMap::new();
                    for t in &r.targets {
                        *phases.entry(phase_name(t.phase())).or_default() += 1;
                    }
                    eprintln!("chaos: rollout before the self-tests pass: {phases:?}");
                    with(&sum, |s| s.rollout_midway = phases);
                }
                std::fs::write(dir.join("self-tests-pass"), b"go").unwrap();
            }
        }
        if !matches!(fault, Fault::ReleaseSelfTests) {
            with(&sum, |s| *s.faults.entry(fault.kind()).or_default() += 1);
        }
    }
    std::fs::write(dir.join("self-tests-pass"), b"go").unwrap();
    uplink.point_to(Some(Target::Tcp(cloud_addr)));
    tokio::time::sleep_until(start + Duration::from_secs(cfg.seconds)).await;

    // Settling: no more faults. Everything submitted must reach a final state, every report
    // must drain, the rollout must finish.
    with(&sum, |s| s.phase = "settling".into());
    let settle = Instant::now() + SETTLE;
    if tokio::time::timeout_at(settle.into(), &mut submitter)
        .await
        .is_err()
    {
        // Those not tried yet are not submitted: the gateway will not know them.
        eprintln!("chaos: the submitter is behind its plan at the deadline; stopped");
        submitter.abort();
    }
    let submitted = match submitted.lock() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    };
    eprintln!(
        "chaos: t={:.1}s commands submitted",
        began.elapsed().as_secs_f64()
    );
    std::fs::write(dir.join("stop-reports"), b"stop").unwrap();
    let drained = wait_drained(&devices, settle).await;
    eprintln!(
        "chaos: t={:.1}s reports drained",
        began.elapsed().as_secs_f64()
    );
    let rollout = wait_rollout(&fleet, settle).await;
    eprintln!(
        "chaos: t={:.1}s rollout settled",
        began.elapsed().as_secs_f64()
    );
    let finals = wait_commands(&fleet, &commands, settle).await;
    eprintln!(
        "chaos: t={:.1}s commands settled",
        began.elapsed().as_secs_f64()
    );
    let last: HashMap<String, u64> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), drained.get(&i).map_or(0, |d| d.0)))
        .collect();
    wait_upstream(&observer, &last, settle).await;
    eprintln!(
        "chaos: t={:.1}s upstream settled",
        began.elapsed().as_secs_f64()
    );
    let registry = bounded(fleet.status(&ids)).await.unwrap_or_default();
    sampler.abort();

    with(&sum, |s| s.phase = "checking".into());
    let mut checks = Checks::default();
    checks.faults(&sum);
    checks.rollout(&rollout, &opts, &image, &sum);
    checks.commands(&commands, &finals, &submitted, &opts, &sum);
    checks.status(&opts, &drained, &registry, &observer, &sum);
    checks.bounds(&samples, &sum);
    let failed: Vec<String> = checks
        .0
        .iter()
        .filter(|c| !c.1)
        .map(|c| c.0.clone())
        .collect();
    with(&sum, |s| {
        s.checks = checks.0;
        s.phase = "done".into();
    });
    drop(observer);
    drop(devices);
    drop(gw);
    drop(cloud);
    assert!(failed.is_empty(), "checks failed: {}", failed.join("; "));
}

/// Deploys the update to every device in two batches, never pausing (a failure is reported,
/// not a stop); retried while the gateway is down.
async fn deploy(fleet: &FleetClient, ids: &[String]) {
    let req = DeployUpdate {
        update_id: UPDATE.into(),
        device_ids: ids.to_vec(),
        batch_size: ids.len().div_ceil(2) as u32,
        max_failures_percent: 100,
        ..DeployUpdate::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match bounded(fleet.deploy_update(req.clone())).await {
            Ok(rec) => {
                let batches = rec.campaign.as_ref().map_or(0, |c| c.batches);
                assert_eq!(batches, 2, "{rec:?}");
                return;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("chaos: deploy: {e}; again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("deploying {UPDATE}: {e}"),
        }
    }
}

/// Submission outcome per command id: whether some attempt was answered with its record.
type Submitted = HashMap<String, bool>;

/// Submits the planned commands at their times; an attempt that fails is tried again twice
/// (with the same id: the gateway takes a command id once). Whether a failed attempt reached
/// the gateway anyway is settled at the end by asking for the command.
async fn submit(
    fleet: FleetClient,
    plan: Vec<PlannedCommand>,
    start: tokio::time::Instant,
    sum: Shared,
    out: Arc<Mutex<Submitted>>,
) {
    for c in plan {
        tokio::time::sleep_until(start + Duration::from_millis(c.at_ms)).await;
        let req = SendCommand {
            command_id: c.id.clone(),
            device_ids: vec![device_id(c.device)],
            name: c.name.into(),
            payload: c.id.clone().into_bytes(),
            ttl_ms: c.ttl_ms,
            ..SendCommand::default()
        };
        let mut accepted = false;
        for attempt in 0..3 {
            match bounded(fleet.send_command(req.clone())).await {
                Ok(_) => {
                    accepted = true;
                    break;
                }
                Err(e) => {
                    with(&sum, |s| s.commands_submit_errors += 1);
                    if attempt < 2 {
                        eprintln!("chaos: submit {}: {e}; again", c.id);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        match out.lock() {
            Ok(mut g) => g.insert(c.id, accepted),
            Err(p) => p.into_inner().insert(c.id, accepted),
        };
    }
}

/// Waits (bounded) until every device has stopped reporting and has nothing left to send:
/// device index -> (last sequence, reports dropped from its outbox).
async fn wait_drained(
    devices: &[Option<DeviceProc>],
    deadline: Instant,
) -> HashMap<usize, (u64, u64)> {
    loop {
        let mut out = HashMap::new();
        for (i, d) in devices.iter().enumerate() {
            let Some(d) = d else { continue };
            for l in d.lines() {
                if let Some(rest) = l.strip_prefix("drained ") {
                    let mut it = rest.split_whitespace();
                    let last = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    let dropped = it
                        .next()
                        .and_then(|v| v.strip_prefix("dropped="))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    out.insert(i, (last, dropped));
                }
            }
        }
        if out.len() == devices.len() || Instant::now() > deadline {
            if out.len() < devices.len() {
                eprintln!(
                    "chaos: {} of {} devices drained their reports",
                    out.len(),
                    devices.len()
                );
            }
            return out;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn phase_name(p: UpdatePhase) -> String {
    p.as_str_name()
        .trim_start_matches("UPDATE_PHASE_")
        .to_lowercase()
}

fn phase_final(p: UpdatePhase) -> bool {
    matches!(
        p,
        UpdatePhase::Committed
            | UpdatePhase::Failed
            | UpdatePhase::RolledBack
            | UpdatePhase::Rejected
    )
}

/// Waits (bounded) until every target of the rollout has a final phase: the last record read.
async fn wait_rollout(
    fleet: &FleetClient,
    deadline: Instant,
) -> Option<cloud_client::UpdateRecord> {
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(r) = bounded(fleet.get_update(UPDATE)).await {
            let done = r.targets.iter().all(|t| phase_final(t.phase()));
            last = Some(r);
            if done {
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    last
}

/// What the gateway says about a planned command at the end.
#[derive(Debug, Clone)]
enum Final {
    /// It has no such command: never submitted.
    Unknown,
    Record(Box<CommandRecord>),
    /// It could not be read.
    Unreadable(String),
}

/// Waits (bounded) until every planned command is final or unknown to the gateway.
async fn wait_commands(
    fleet: &FleetClient,
    plan: &[PlannedCommand],
    deadline: Instant,
) -> HashMap<String, Final> {
    let mut out: HashMap<String, Final> = HashMap::new();
    loop {
        for c in plan {
            if matches!(out.get(&c.id), Some(Final::Unknown))
                || matches!(out.get(&c.id), Some(Final::Record(r)) if r.state().is_final())
            {
                continue;
            }
            let got =
                match tokio::time::timeout(Duration::from_secs(15), fleet.get_command(&c.id, None))
                    .await
                {
                    Ok(Ok(mut recs)) if recs.len() == 1 => Final::Record(Box::new(recs.remove(0))),
                    Ok(Ok(recs)) => Final::Unreadable(format!("{} records", recs.len())),
                    Ok(Err(SdkError::Api {
                        code: ApiErrorCode::NotFound,
                        ..
                    })) => Final::Unknown,
                    Ok(Err(e)) => Final::Unreadable(e.to_string()),
                    Err(_) => Final::Unreadable("no answer".into()),
                };
            out.insert(c.id.clone(), got);
        }
        let open = out
            .values()
            .filter(|f| match f {
                Final::Unknown => false,
                Final::Record(r) => !r.state().is_final(),
                Final::Unreadable(_) => true,
            })
            .count();
        if open == 0 || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Status sequences per device, in arrival order, as the cloud observer received them.
fn upstream(obs: &Observer) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for (topic, payload) in obs.seen() {
        let Some(device) = topic.split('/').nth(3) else {
            continue;
        };
        if let Ok(r) = fleet_proto::v1::StatusReport::decode(payload.as_slice()) {
            out.entry(device.to_owned()).or_default().push(r.sequence);
        }
    }
    out
}

/// Waits (bounded) until the observer has every device's last report.
async fn wait_upstream(obs: &Observer, last: &HashMap<String, u64>, deadline: Instant) {
    while Instant::now() < deadline {
        let up = upstream(obs);
        let complete = last.iter().all(|(d, n)| {
            let got: HashSet<u64> = up
                .get(d)
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default();
            // The bridge sends in order: with the newest there, the rest came before.
            *n == 0 || got.contains(n)
        });
        if complete {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `GET /metrics`, or None when the gateway does not answer (it may be down).
fn http_metrics(addr: Option<SocketAddr>) -> Option<String> {
    use std::io::{Read, Write};
    let addr = addr?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

fn metric(body: &str, name: &str) -> Option<f64> {
    let key = format!("fleet_gateway_{name} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// The first line of a new samples file.
const CSV_HEADER: &str =
    "unix_ms,gateway_rss_kib,gateway_fds,connections,bridge_queue_depth,bridge_connected,commands_open";

/// Every second: the gateway's RSS and open fds (kept), and a CSV line when asked.
async fn sample(current: Current, samples: Arc<Mutex<Vec<[u64; 2]>>>, csv: Option<PathBuf>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = match current.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        };
        let Some((pid, metrics_addr)) = now else {
            continue;
        };
        let line = tokio::task::spawn_blocking(move || {
            let rss = status_kib(pid, "VmRSS:");
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d.count() as u64)
                .unwrap_or(0);
            let m = http_metrics(metrics_addr).unwrap_or_default();
            let get = |n: &str| metric(&m, n).map(|v| v.to_string()).unwrap_or_default();
            let open = match (
                metric(&m, "commands_submitted_total"),
                metric(&m, "commands_completed_total"),
                metric(&m, "commands_expired_total"),
            ) {
                (Some(a), Some(b), Some(c)) => (a - b - c).to_string(),
                _ => String::new(),
            };
            let unix_ms = fleet_proto::time::now_ms();
            (
                rss,
                fds,
                format!(
                    "{unix_ms},{rss},{fds},{},{},{},{open}",
                    get("connections"),
                    get("bridge_queue_depth"),
                    get("bridge_connected")
                ),
            )
        })
        .await;
        let Ok((rss, fds, line)) = line else { continue };
        // A process that is gone reads as zero: not a sample.
        if rss == 0 {
            continue;
        }
        match samples.lock() {
            Ok(mut g) => g.push([rss, fds]),
            Err(p) => p.into_inner().push([rss, fds]),
        }
        if let Some(path) = &csv {
            use std::io::Write;
            if !path.exists() {
                let _ = std::fs::write(path, format!("{CSV_HEADER}\n"));
            }
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

/// Lines of a file (none if it does not exist).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The checks: (what, passed, detail).
#[derive(Default)]
struct Checks(Vec<(String, bool, String)>);

impl Checks {
    fn add(&mut self, what: &str, problems: &[String], ok_detail: String) {
        let detail = if problems.is_empty() {
            ok_detail
        } else {
            let mut d = format!("{} problem(s): ", problems.len());
            for p in problems.iter().take(8) {
                let _ = write!(d, "{p}; ");
            }
            d
        };
        self.0.push((what.to_owned(), problems.is_empty(), detail));
    }

    fn faults(&mut self, sum: &Shared) {
        let f = with(sum, |s| s.faults.clone());
        let n = |k: &str| f.get(k).copied().unwrap_or(0);
        let mut p = Vec::new();
        if n("gateway SIGKILL+restart") < 2 {
            p.push("fewer than 2 gateway kills".into());
        }
        for k in [
            "uplink cut",
            "cloud broker restart",
            "device SIGKILL+restart",
        ] {
            if n(k) < 1 {
                p.push(format!("no {k}"));
            }
        }
        self.add(
            "every kind of fault was injected (gateway killed twice or more)",
            &p,
            String::new(),
        );
    }

    fn rollout(
        &mut self,
        rec: &Option<cloud_client::UpdateRecord>,
        opts: &[DeviceOpts],
        image: &[u8],
        sum: &Shared,
    ) {
        let mut p = Vec::new();
        let mut phases: BTreeMap<String, u64> = BTreeMap::new();
        let mut gap = 0;
        let mut rerun = 0u64;
        let Some(rec) = rec else {
            self.add(
                "rollout: every device committed once or its failure is reported",
                &["the update could not be read".into()],
                String::new(),
            );
            return;
        };
        let targets: HashMap<&str, UpdatePhase> = rec
            .targets
            .iter()
            .map(|t| (t.device_id.as_str(), t.phase()))
            .collect();
        for o in opts {
            let log = lines(&o.state.with_file_name(format!("{}-commits.log", o.id)));
            let commits = match commit_history(&log, UPDATE) {
                Ok(c) => c,
                Err(e) => {
                    p.push(format!("{}: {e}", o.id));
                    continue;
                }
            };
            let (committed, committing) = (commits.committed, commits.committing);
            rerun += commits.reruns as u64;
            let phase = targets.get(o.id.as_str()).copied();
            *phases
                .entry(phase.map_or("not a target".into(), phase_name))
                .or_default() += 1;
            match phase {
                Some(UpdatePhase::Committed) => {
                    let active = device_client::SlotInstaller::new(&o.state)
                        .active_image("rootfs")
                        .ok()
                        .and_then(|f| std::fs::read(f).ok());
                    if active.as_deref() != Some(image) {
                        p.push(format!(
                            "{} reported committed but does not run the image",
                            o.id
                        ));
                    }
                    if committed == 0 {
                        if committing > 0 {
                            // Killed between the commit and its log line.
                            gap += 1;
                        } else {
                            p.push(format!("{} reported committed but never committed", o.id));
                        }
                    }
                }
                Some(ph) if phase_final(ph) => {
                    if committed > 0 {
                        p.push(format!("{} committed but the campaign says {ph:?}", o.id));
                    }
                }
                other => p.push(format!("{} ended in {other:?}", o.id)),
            }
        }
        if gap > 0 {
            phases.insert("committed (killed before its log line)".into(), gap);
        }
        if rerun > 0 {
            phases.insert(
                "commit hook run again at the next start (killed before the journal)".into(),
                rerun,
            );
        }
        let detail = format!("{phases:?}");
        with(sum, |s| s.rollout = phases);
        self.add(
            "rollout: every device committed the update exactly once, or its failure is reported",
            &p,
            detail,
        );
    }

    fn commands(
        &mut self,
        plan: &[PlannedCommand],
        finals: &HashMap<String, Final>,
        submitted: &Submitted,
        opts: &[DeviceOpts],
        sum: &Shared,
    ) {
        // Every execution, across every device's ran-log.
        let mut ran: HashMap<String, Vec<String>> = HashMap::new();
        for o in opts {
            for id in o.ran() {
                ran.entry(id).or_default().push(o.id.clone());
            }
        }
        let planned: HashMap<&str, &PlannedCommand> =
            plan.iter().map(|c| (c.id.as_str(), c)).collect();
        let mut twice = Vec::new();
        for (id, on) in &ran {
            if on.len() > 1 {
                twice.push(format!("{id} ran {} times ({on:?})", on.len()));
            }
            match planned.get(id.as_str()) {
                None => twice.push(format!("{id} ran on {on:?} but was never planned")),
                Some(c) if on.iter().any(|d| *d != device_id(c.device)) => twice.push(format!(
                    "{id} ran on {on:?}, meant for {}",
                    device_id(c.device)
                )),
                Some(_) => {}
            }
        }
        self.add(
            "commands: every command ran at most once, on its device",
            &twice,
            format!("{} executions", ran.values().map(Vec::len).sum::<usize>()),
        );

        let mut p = Vec::new();
        let mut states: BTreeMap<String, u64> = BTreeMap::new();
        for c in plan {
            let n = ran.get(&c.id).map_or(0, Vec::len);
            let f = finals
                .get(&c.id)
                .cloned()
                .unwrap_or(Final::Unreadable("never read".into()));
            let (label, ok) = match &f {
                Final::Unknown => {
                    if submitted.get(&c.id) == Some(&true) {
                        p.push(format!(
                            "{} was accepted but the gateway does not know it",
                            c.id
                        ));
                    }
                    ("not submitted".to_owned(), n == 0)
                }
                Final::Unreadable(e) => (format!("unreadable ({e})"), false),
                Final::Record(r) => {
                    let msg = r
                        .result
                        .as_ref()
                        .map(|x| x.message.clone())
                        .unwrap_or_default();
                    match r.state() {
                        CommandState::Succeeded => ("succeeded".into(), n == 1),
                        CommandState::Failed if msg.contains("interrupted") => {
                            ("failed interrupted".into(), n <= 1)
                        }
                        CommandState::Failed => {
                            ("failed (asked to)".into(), n == 1 && c.name == "fail")
                        }
                        // Its time ran out before a result arrived: it may have run (once).
                        CommandState::Expired => ("expired".into(), n <= 1),
                        CommandState::Rejected => ("rejected".into(), n == 0),
                        other => (format!("not final: {other:?}"), false),
                    }
                }
            };
            if !ok {
                p.push(format!(
                    "{} ({} to {}): {label}, ran {n} time(s)",
                    c.id,
                    c.name,
                    device_id(c.device)
                ));
            }
            *states.entry(label).or_default() += 1;
        }
        with(sum, |s| s.commands = states.clone());
        self.add(
            "commands: every submitted command has a final state matching what its device did (succeeded: ran once; failed interrupted / expired: at most once; not submitted / rejected: never)",
            &p,
            format!("{states:?}"),
        );
    }

    fn status(
        &mut self,
        opts: &[DeviceOpts],
        drained: &HashMap<usize, (u64, u64)>,
        registry: &[cloud_client::DeviceStatus],
        obs: &Observer,
        sum: &Shared,
    ) {
        let mut drain_p = Vec::new();
        let mut reg_p = Vec::new();
        let mut up_p = Vec::new();
        let up = upstream(obs);
        let reg: HashMap<&str, &cloud_client::DeviceStatus> =
            registry.iter().map(|s| (s.device_id.as_str(), s)).collect();
        let (mut acked_total, mut in_registry, mut received, mut distinct) =
            (0u64, 0u64, 0u64, 0u64);
        for (i, o) in opts.iter().enumerate() {
            // What the device queued (`q`) and saw acknowledged (`a`, and everything once it
            // drained).
            let log = lines(&o.state.with_file_name(format!("{}-reports.log", o.id)));
            let field = |tag: &str| -> Vec<u64> {
                log.iter()
                    .filter_map(|l| l.strip_prefix(tag).and_then(|v| v.parse().ok()))
                    .collect()
            };
            let logged = field("a ").into_iter().max().unwrap_or(0);
            let upto = match drained.get(&i) {
                Some((last, dropped)) => {
                    if *dropped > 0 {
                        drain_p.push(format!(
                            "{}: {dropped} reports dropped from a full outbox",
                            o.id
                        ));
                    }
                    if *last < logged {
                        drain_p.push(format!(
                            "{}: drained at {last} below its acknowledged {logged}",
                            o.id
                        ));
                    }
                    (*last).max(logged)
                }
                None => {
                    drain_p.push(format!("{}: never drained its outbox", o.id));
                    logged
                }
            };
            let acked: Vec<u64> = {
                let set: std::collections::BTreeSet<u64> =
                    field("q ").into_iter().filter(|s| *s <= upto).collect();
                set.into_iter().collect()
            };
            acked_total += acked.len() as u64;
            let seen = up.get(&o.id).cloned().unwrap_or_default();
            let up_distinct: HashSet<u64> = seen.iter().copied().collect();
            // The registry keeps a report only if it is newer than the stored one, counts
            // those it keeps, and queues each upward in the same transaction: so what it
            // stored is what reached the cloud. Every acknowledged report stored, in order,
            // means a count no smaller than the acknowledged reports, the newest among them
            // stored, and the count equal to the distinct reports upstream (which must hold
            // every acknowledged one: checked below).
            match reg.get(o.id.as_str()) {
                Some(s) => {
                    let last = s.last_report.as_ref().map_or(0, |r| r.sequence);
                    let newest = acked.last().copied().unwrap_or(0);
                    let missing = acked.len() as u64 - s.reports_stored.min(acked.len() as u64);
                    in_registry += acked.len() as u64 - missing;
                    if missing > 0 || last < newest || s.reports_stored != up_distinct.len() as u64
                    {
                        reg_p.push(format!(
                            "{}: {} acknowledged (newest {newest}), the registry stored {} (newest {last}), {} distinct upstream",
                            o.id,
                            acked.len(),
                            s.reports_stored,
                            up_distinct.len()
                        ));
                    }
                }
                None => reg_p.push(format!("{}: not in the registry", o.id)),
            }
            received += seen.len() as u64;
            let mut firsts = Vec::new();
            let mut set = HashSet::new();
            for s in &seen {
                if set.insert(*s) {
                    firsts.push(*s);
                }
            }
            distinct += set.len() as u64;
            let missing: Vec<u64> = acked.iter().copied().filter(|s| !set.contains(s)).collect();
            if !missing.is_empty() {
                up_p.push(format!(
                    "{}: {} acknowledged reports never reached the cloud (first {:?})",
                    o.id,
                    missing.len(),
                    &missing[..missing.len().min(5)]
                ));
            }
            if firsts.windows(2).any(|w| w[0] > w[1]) {
                up_p.push(format!("{}: first arrivals upstream out of order", o.id));
            }
        }
        with(sum, |s| {
            s.reports_acked = acked_total;
            s.reports_in_registry = in_registry;
            s.reports_upstream = received;
            s.reports_upstream_distinct = distinct;
        });
        self.add(
            "status: every device drained its outbox, none dropped",
            &drain_p,
            String::new(),
        );
        self.add(
            "status: every acknowledged report is in the gateway's registry, stored in order",
            &reg_p,
            format!("{in_registry} of {acked_total}"),
        );
        self.add(
            "status: every acknowledged report reached the cloud, first arrivals in order",
            &up_p,
            format!("{distinct} distinct, {} duplicates", received - distinct),
        );
    }

    fn bounds(&mut self, samples: &Arc<Mutex<Vec<[u64; 2]>>>, sum: &Shared) {
        let s = match samples.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let rss = s.iter().map(|x| x[0]).max().unwrap_or(0);
        let fds = s.iter().map(|x| x[1]).max().unwrap_or(0);
        with(sum, |x| {
            x.samples = s.len() as u64;
            x.max_rss_kib = rss;
            x.max_fds = fds;
        });
        let mut p = Vec::new();
        if s.len() < 10 {
            p.push(format!("only {} samples", s.len()));
        }
        if rss > MAX_RSS_KIB {
            p.push(format!("RSS reached {rss} KiB"));
        }
        if fds > MAX_FDS {
            p.push(format!("{fds} open fds"));
        }
        self.add(
            "gateway memory and file descriptors bounded",
            &p,
            format!("max RSS {rss} KiB, max fds {fds}"),
        );
    }
}

/// What one device's commit log (`started`, `installing ID`, `committing ID`, `committed ID`,
/// `journaled ID` lines) says about update `id`.
#[derive(Debug, PartialEq, Eq)]
struct Commits {
    /// Whether a commit hook completed (0 or 1: a second is an error or a rerun).
    committed: usize,
    /// Commit hooks begun.
    committing: usize,
    /// Commit hooks run again by a later start: allowed while the commit is not journaled,
    /// because the agent journals a commit after its hook, so a kill in between runs the
    /// (idempotent) hook once more; it is then the first thing that start does.
    reruns: usize,
}

/// Reads a commit log: the update is committed once, except that while the commit is not
/// journaled, a start may run the commit hook again, first thing. Anything else (two commits
/// in one start, a commit after the journal has it, an install after a commit) is an error
/// naming what happened.
fn commit_history(log: &[String], id: &str) -> Result<Commits, String> {
    let line = |what: &str| format!("{what} {id}");
    let (installing, committing, committed, journaled) = (
        line("installing"),
        line("committing"),
        line("committed"),
        line("journaled"),
    );
    // The lines of each start.
    let mut starts: Vec<Vec<&str>> = vec![Vec::new()];
    for l in log {
        if l == "started" {
            starts.push(Vec::new());
        } else if let Some(cur) = starts.last_mut() {
            cur.push(l.as_str());
        }
    }
    let mut c = Commits {
        committed: 0,
        committing: 0,
        reruns: 0,
    };
    let mut is_journaled = false;
    for (n, lines) in starts.iter().enumerate() {
        c.committing += lines.iter().filter(|l| **l == committing).count();
        let mut done_here = 0;
        for (k, l) in lines.iter().enumerate() {
            if *l == journaled {
                is_journaled = true;
            } else if *l == installing && c.committed > 0 {
                return Err(format!("installed again in start {n}, after it committed"));
            } else if *l == committed {
                done_here += 1;
                if done_here > 1 {
                    return Err(format!("committed twice in start {n}: {lines:?}"));
                }
                if c.committed > 0 {
                    let first_thing = lines[..k].iter().all(|l| *l == committing);
                    if is_journaled || !first_thing {
                        return Err(format!(
                            "committed again in start {n} ({lines:?}), after the journal had it"
                        ));
                    }
                    c.reruns += 1;
                }
                c.committed = 1;
            }
        }
    }
    Ok(c)
}

#[test]
fn commit_history_tells_a_rerun_from_a_second_commit() {
    let log = |s: &str| -> Vec<String> { s.split(',').map(str::to_owned).collect() };
    let ok = |s: &str| commit_history(&log(s), "u").unwrap();
    let once = "started,installing u,committing u,committed u";
    let journaled = format!("{once},journaled u");
    assert_eq!(
        ok(once),
        Commits {
            committed: 1,
            committing: 1,
            reruns: 0
        }
    );
    // Killed right after the hook, before the journal: the next start runs it again first.
    let rerun = format!("{once},started,committing u,committed u,started");
    assert_eq!(
        ok(&rerun),
        Commits {
            committed: 1,
            committing: 2,
            reruns: 1
        }
    );
    // Killed inside the hook.
    let cut = "started,installing u,committing u,started,committing u,committed u";
    assert_eq!(
        ok(cut),
        Commits {
            committed: 1,
            committing: 2,
            reruns: 0
        }
    );
    let not = |s: &str| commit_history(&log(s), "u").unwrap_err();
    // Twice in one start.
    not(&format!("{once},committing u,committed u"));
    // A start killed before it resumed, or inside the hook, and the next one finishes.
    let late = format!("{once},started,started,committing u,started,committing u,committed u");
    assert_eq!(
        ok(&late),
        Commits {
            committed: 1,
            committing: 3,
            reruns: 1
        }
    );
    // Again after the journal had it: in the same start, or in a later one.
    not(&format!("{journaled},started,committing u,committed u"));
    not(&format!(
        "{journaled},started,journaled u,committing u,committed u"
    ));
    // Not first thing in its start.
    not(&format!("{once},started,x,committing u,committed u"));
    // Installed again.
    not(&format!(
        "{once},started,installing u,committing u,committed u"
    ));
    not(&format!("{once},started,installing u"));
}
