//! `test-device`: one device on the real `device-client` library, for process-level tests
//! (SIGKILL, restarts). Once its state is open and its `--reports` are queued it prints its
//! ready line, `{"ready":{"queued":N}}` (connected or not). Then it prints what it does on
//! stdout, one line per event: `connected`, `ran COMMAND_ID`, `answered COMMAND_ID` (result
//! journaled), `flushed`, one line per update report:
//! `update UPDATE_ID PHASE HELD/TOTAL rejected=N error=ERROR` (phase and error in lower case),
//! `{"withdrawn":{"update_id":ID}}` when a signed withdrawal drops an offer it was deferring
//! or downloading, and, as they change, `root_version N` (the root of trust it holds; first
//! printed once the client runs), `commands_refused N`, `withdrawals_ignored N` and
//! `roots_refused N`.
//!
//! Commands and updates need `--root FILE` (the fleet's signed root, e.g. the development
//! PKI's `trust/root.bin`): without it the device refuses them all (NO_ROOT).
//!
//! Every command run is appended (and synced) to `--ran-log` before it is answered, so a test
//! can count executions across restarts.
//!
//! Steady reporting for long-running tests: `--report-every MS` queues a report (its
//! `metrics["i"]` a counter of this run) every MS ms, after one boot report at start, until
//! the file `--report-stop` exists. `--report-log FILE` gets `q SEQ` for every report queued
//! (once `report()` has returned: it is on disk) and `a SEQ`, synced, each time the highest
//! sequence the device holds acknowledged grows: the library's outbox drops an acknowledged
//! prefix, so all but the `outbox_len` newest reports are acknowledged. (A device killed
//! inside `report()` may leave a sequence unused: the library writes its counter first. Such
//! a sequence has no `q` line.) Once the stop file exists and nothing waits, `drained SEQ
//! dropped=N` is printed (SEQ: the last report queued; N: reports dropped from a full outbox).
//! `--committed-log FILE` gets `started` at each start, `installing ID` before each install,
//! `committing ID` before and `committed ID` after each update commit, and `journaled ID` when
//! the agent's report of the commit (sent only once journaled) is seen (all synced): a kill
//! between a commit and a line on stdout is not missed, and a commit hook run again by the next
//! start (killed before the agent journaled the first) can be told from a second commit.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use device_client::{
    Decision, DeviceClient, DownloadSettings, HandlerError, Health, SlotInstaller, StagedImage,
    StatusReport, UpdateHandler,
};
use fleet_proto::v1::{UpdateManifest, UpdatePhase};

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
    /// Record results but never send them (the test then kills the process). Only in a build
    /// with the `fault-injection` feature (the test suite's).
    #[cfg(feature = "fault-injection")]
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
    /// The root of trust (an encoded SignedRoot): its `commands` role signs the commands the
    /// device runs, its `updates` role the manifests it takes.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Ignored (updates are checked against the root's `updates` role); accepted so that
    /// invocations written before roots existed still run.
    #[arg(long, hide = true)]
    update_key: Option<PathBuf>,
    /// Anti-rollback sequence of the factory firmware.
    #[arg(long, default_value_t = 0)]
    factory_sequence: u64,
    /// Fail every update's self-test (it is then rolled back).
    #[arg(long)]
    fail_self_test: bool,
    /// Defer every update offered during the first SECS seconds after start (asked again
    /// every second).
    #[arg(long, default_value_t = 0)]
    defer_for: u64,
    /// Chunks asked for per request (the library's default is 16).
    #[arg(long)]
    window: Option<u32>,
    /// The first commit aborts the process (as firmware that restarts the device in its
    /// commit step would); later ones commit.
    #[arg(long)]
    abort_in_commit: bool,
    /// The self-test lasts until this file exists (at most two minutes).
    #[arg(long)]
    self_test_until: Option<std::path::PathBuf>,
    /// Queue a status report every MS ms (after a boot report), until `--report-stop` exists.
    #[arg(long)]
    report_every: Option<u64>,
    /// Stop the steady reports once this file exists.
    #[arg(long)]
    report_stop: Option<PathBuf>,
    /// Append `q SEQ` per report queued and `a SEQ` (synced) as the acknowledged prefix grows.
    #[arg(long)]
    report_log: Option<PathBuf>,
    /// Append `started` at start, `installing ID` before an install, `committing ID` /
    /// `committed ID` around each update commit, `journaled ID` once it is journaled (synced).
    #[arg(long)]
    committed_log: Option<PathBuf>,
}

/// Appends `line` to `path` and syncs it to disk.
fn append_synced(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")?;
    f.sync_all()
}

/// The default A/B slots, with a self-test that can be told to fail.
struct Slots {
    inner: SlotInstaller,
    fail_self_test: bool,
    defer_until: std::time::Instant,
    /// Present: the first commit aborts the process and leaves this file behind.
    abort_marker: Option<std::path::PathBuf>,
    self_test_until: Option<std::path::PathBuf>,
    committed_log: Option<PathBuf>,
}

impl UpdateHandler for Slots {
    fn offer(&self, _m: &UpdateManifest) -> Decision {
        if std::time::Instant::now() < self.defer_until {
            Decision::Defer
        } else {
            Decision::Accept
        }
    }
    fn install(&self, m: &UpdateManifest, images: &[StagedImage]) -> Result<(), HandlerError> {
        if let Some(log) = &self.committed_log {
            append_synced(log, &format!("installing {}", m.update_id))?;
        }
        self.inner.install(m, images)
    }
    fn self_test(&self, _m: &UpdateManifest) -> Result<(), HandlerError> {
        if let Some(file) = &self.self_test_until {
            let give_up = std::time::Instant::now() + Duration::from_secs(120);
            while !file.exists() && std::time::Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if self.fail_self_test {
            Err("self-test failed (test switch)".into())
        } else {
            Ok(())
        }
    }
    fn commit(&self, m: &UpdateManifest) -> Result<(), HandlerError> {
        if let Some(marker) = &self.abort_marker {
            if !marker.exists() {
                std::fs::write(marker, b"aborted in commit")?;
                println!("aborting in commit");
                std::process::abort();
            }
        }
        if let Some(log) = &self.committed_log {
            append_synced(log, &format!("committing {}", m.update_id))?;
        }
        self.inner.commit(m)?;
        if let Some(log) = &self.committed_log {
            append_synced(log, &format!("committed {}", m.update_id))?;
        }
        Ok(())
    }
    fn rollback(&self, m: &UpdateManifest) -> Result<(), HandlerError> {
        self.inner.rollback(m)
    }
    fn withdrawn(&self, m: &UpdateManifest) {
        let line = serde_json::json!({ "withdrawn": { "update_id": m.update_id } });
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// A report of class `class` with `metrics["i"] = i`.
fn report(class: &str, i: u64) -> StatusReport {
    let mut r = StatusReport {
        timestamp_ms: fleet_proto::time::now_ms(),
        firmware_version: "1.0.0".into(),
        device_class: class.to_owned(),
        health: Health::Ok.into(),
        ..StatusReport::default()
    };
    r.metrics.insert("i".into(), i as f64);
    r
}

/// Queues a report every `every` until `stop` exists, logging each in `log`; records the
/// acknowledged prefix in `log` as it grows; prints `drained SEQ` once stopped with nothing
/// waiting. `last`: the sequence of the report queued last (the boot report).
async fn steady_reports(
    client: DeviceClient,
    every: Duration,
    mut last: u64,
    stop: Option<PathBuf>,
    log: Option<PathBuf>,
    class: String,
) -> Result<(), Box<dyn std::error::Error>> {
    // A write that returned survives a SIGKILL (it is in the kernel's cache); only the
    // acknowledgements, which the device acts on, are synced too.
    let queued = |seq: u64| -> std::io::Result<()> {
        if let Some(log) = &log {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?;
            writeln!(f, "q {seq}")?;
        }
        Ok(())
    };
    queued(last)?;
    let mut i = 1u64;
    let mut acked = 0u64;
    let mut next = tokio::time::Instant::now() + every;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let stopped = || stop.as_ref().is_some_and(|f| f.exists());
    loop {
        tick.tick().await;
        let halted = stopped();
        if !halted && tokio::time::Instant::now() >= next {
            last = client.report(report(&class, i)).await?;
            queued(last)?;
            i += 1;
            next += every;
        }
        // All but the `outbox_len` newest of the reports queued up to `last` are acknowledged
        // (a report dropped from a full outbox would count too: `drained` says how many).
        let s = client.stats();
        let upto = last.saturating_sub(s.outbox_len as u64);
        if upto > acked {
            acked = upto;
            if let Some(log) = &log {
                append_synced(log, &format!("a {acked}"))?;
            }
        }
        if halted && s.outbox_len == 0 {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "drained {last} dropped={}", s.reports_dropped);
            let _ = out.flush();
            return Ok(());
        }
    }
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
    if let Some(log) = &a.committed_log {
        append_synced(log, "started")?;
    }
    let (host, port) = a.gateway.rsplit_once(':').ok_or("--gateway HOST:PORT")?;
    let dev = a.pki.join("devices");
    let mut builder = DeviceClient::builder();
    if let Some(root) = &a.root {
        builder = builder.trust_root_file(root);
    }
    if a.update_key.is_some() && a.root.is_none() {
        eprintln!("--update-key is ignored: give the fleet's root with --root");
    }
    {
        builder = builder
            .factory_sequence(a.factory_sequence)
            .defer_retry(Duration::from_secs(1))
            .download_settings(DownloadSettings {
                window: a.window.unwrap_or(DownloadSettings::default().window),
                ..DownloadSettings::default()
            })
            .update_handler(Slots {
                inner: SlotInstaller::new(&a.state),
                fail_self_test: a.fail_self_test,
                defer_until: std::time::Instant::now() + Duration::from_secs(a.defer_for),
                abort_marker: a.abort_in_commit.then(|| a.state.join("aborted-in-commit")),
                self_test_until: a.self_test_until.clone(),
                committed_log: a.committed_log.clone(),
            });
    }
    #[cfg(feature = "fault-injection")]
    let builder = builder.hold_results_for_tests(a.hold_results);
    let (client, mut commands) = builder
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
        .start()?;
    let say = |s: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    };
    for i in 0..a.reports {
        client.report(report(&a.class, i)).await?;
    }
    let steady = match a.report_every {
        Some(ms) => {
            // The boot report: the sequence of this run's first report is known at once.
            let first = client.report(report(&a.class, 0)).await?;
            Some((Duration::from_millis(ms.max(1)), first))
        }
        None => None,
    };
    say(serde_json::json!({ "ready": { "queued": a.reports } }).to_string());
    if let Some((every, first)) = steady {
        let c = client.clone();
        let (stop, report_log, class) =
            (a.report_stop.clone(), a.report_log.clone(), a.class.clone());
        tokio::spawn(async move {
            if let Err(e) = steady_reports(c, every, first, stop, report_log, class).await {
                eprintln!("steady reports stopped: {e}");
            }
        });
    }
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
    {
        // Counters, printed as they change (the root version also at start).
        let c = client.clone();
        tokio::spawn(async move {
            let mut last: Option<[u64; 5]> = None;
            loop {
                let s = c.stats();
                let now = [
                    s.update_chunks_dropped,
                    s.root_version,
                    s.commands_refused,
                    s.withdrawals_ignored,
                    s.roots_refused,
                ];
                let names = [
                    "update_chunks_dropped",
                    "root_version",
                    "commands_refused",
                    "withdrawals_ignored",
                    "roots_refused",
                ];
                {
                    let mut out = std::io::stdout().lock();
                    for (i, (name, n)) in names.iter().zip(now).enumerate() {
                        let before = last.map(|l| l[i]);
                        // Counters from their first change; the root version at once.
                        let show = match before {
                            None => name == &"root_version" || n != 0,
                            Some(b) => b != n,
                        };
                        if show {
                            let _ = writeln!(out, "{name} {n}");
                        }
                    }
                    let _ = out.flush();
                }
                last = Some(now);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    {
        let mut reports = client.update_reports();
        let committed_log = a.committed_log.clone();
        tokio::spawn(async move {
            loop {
                // The agent sends a final report only once it is journaled.
                let journaled = reports
                    .borrow()
                    .as_ref()
                    .filter(|p| p.phase() == UpdatePhase::Committed)
                    .map(|p| p.update_id.clone());
                if let (Some(log), Some(id)) = (&committed_log, journaled) {
                    if let Err(e) = append_synced(log, &format!("journaled {id}")) {
                        eprintln!("commit log: {e}");
                    }
                }
                let line = reports.borrow_and_update().as_ref().map(|p| {
                    format!(
                        "update {} {} {}/{} rejected={} error={}",
                        p.update_id,
                        p.phase()
                            .as_str_name()
                            .trim_start_matches("UPDATE_PHASE_")
                            .to_lowercase(),
                        p.chunks_held,
                        p.chunks_total,
                        p.chunks_rejected,
                        p.error()
                            .as_str_name()
                            .trim_start_matches("UPDATE_ERROR_")
                            .to_lowercase(),
                    )
                });
                if let Some(line) = line {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
                if reports.changed().await.is_err() {
                    break;
                }
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
