//! Real processes for integration tests: the `gateway` binary on its embedded default (a
//! development PKI in its data directory), `test-device` devices, `fleetctl`. Binaries are
//! taken from the target directory of the running test (`cargo test --workspace` builds them);
//! a missing one fails the test with the command that builds it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of a binary of this workspace next to the running test's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    // A tool in target/PROFILE/ looks beside itself; a test in target/PROFILE/deps/ one up.
    let here = exe
        .parent()
        .unwrap_or_else(|| panic!("no directory above {}", exe.display()));
    let dir = if here.ends_with("deps") {
        here.parent().unwrap_or(here)
    } else {
        here
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --bin {name}` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; its last value.
pub async fn until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// Lines a child printed, shared with the thread reading them.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether some line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }

    /// Waits up to `timeout` for a line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn push(&self, line: String) {
        match self.0.lock() {
            Ok(mut g) => g.push(line),
            Err(p) => p.into_inner().push(line),
        }
    }
}

fn capture(child: &mut Child, echo: &'static str) -> (Output, mpsc::Receiver<String>) {
    let out = Output::default();
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if std::env::var_os("FLEET_TEST_ECHO").is_some() {
                    eprintln!("{echo}: {line}");
                }
                let _ = tx.send(line.clone());
                sink.push(line);
            }
        });
    }
    (out, rx)
}

/// A `gateway` process on the embedded default in `dir` (PKI in `dir/data/pki`).
pub struct GatewayProc {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its log (stdout).
    pub log: Output,
    /// Its metrics endpoint.
    pub metrics_addr: Option<SocketAddr>,
    dir: PathBuf,
}

impl GatewayProc {
    /// Starts a gateway with data in `dir/data`, listening on 127.0.0.1:`port` (0: any), with
    /// `devices` device certificates in its development PKI, and `env` added.
    pub fn start(dir: &Path, port: u16, devices: u32, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin("gateway"));
        cmd.current_dir(dir)
            .args(["--dev-devices", &devices.to_string(), "--grace", "1s"])
            .env("GATEWAY__LISTEN", format!("127.0.0.1:{port}"))
            .env("GATEWAY__METRICS__LISTEN", "127.0.0.1:0")
            .env("GATEWAY__DATA_DIR", dir.join("data"))
            .env("RUST_LOG", "info,rumqttd=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting the gateway: {e}"));
        let (log, rx) = capture(&mut child, "gateway");
        let end = Instant::now() + Duration::from_secs(60);
        let mut metrics_addr = None;
        let addr = loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the gateway did not start listening"));
            if let Some(at) = line.find("metrics endpoint listening addr=") {
                let rest = &line[at + "metrics endpoint listening addr=".len()..];
                let a: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                metrics_addr = a.parse().ok();
            }
            if let Some(at) = line.find("gateway listening addr=") {
                let rest = &line[at + "gateway listening addr=".len()..];
                let a: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                break a
                    .parse()
                    .unwrap_or_else(|e| panic!("listening address {a:?}: {e}"));
            }
        };
        GatewayProc {
            child,
            addr,
            log,
            metrics_addr,
            dir: dir.to_owned(),
        }
    }

    /// `GET path` on the metrics endpoint: the response body.
    pub fn http_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let addr = self
            .metrics_addr
            .unwrap_or_else(|| panic!("the gateway has no metrics endpoint"));
        let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        let mut out = String::new();
        s.read_to_string(&mut out)
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    }

    /// A metric's value from `/metrics` (`fleet_gateway_` prefix added).
    pub fn metric(&self, name: &str) -> f64 {
        let body = self.http_get("/metrics");
        let key = format!("fleet_gateway_{name} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no series {name} in:\n{body}"))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The development PKI directory.
    pub fn pki(&self) -> PathBuf {
        self.dir.join("data/pki")
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.addr.port())
    }

    /// An SDK client for service `svc-0001`.
    pub async fn fleet(&self) -> cloud_client::FleetClient {
        let pki = self.pki();
        cloud_client::FleetClient::builder()
            .gateway("127.0.0.1", self.addr.port())
            .pem_files(
                pki.join("ca.crt"),
                pki.join("services/svc-0001.crt"),
                pki.join("services/svc-0001.key"),
            )
            .connect()
            .await
            .unwrap_or_else(|e| panic!("SDK connect: {e}"))
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `test-device` process.
pub struct DeviceProc {
    child: Child,
    /// What it printed.
    pub out: Output,
}

/// How to run a test device.
#[derive(Debug, Clone)]
pub struct DeviceOpts {
    /// Device id (`dev-0001`, ...).
    pub id: String,
    /// Its state directory.
    pub state: PathBuf,
    /// Where executed command ids are appended.
    pub ran_log: PathBuf,
    /// Never send results.
    pub hold_results: bool,
    /// Reports to queue at start.
    pub reports: u64,
    /// Exit once the reports are acknowledged.
    pub exit_after_flush: bool,
    /// More arguments (update keys, test switches).
    pub args: Vec<String>,
}

impl DeviceOpts {
    /// Defaults for device `id`, with state and log under `dir`.
    pub fn new(dir: &Path, id: &str) -> Self {
        DeviceOpts {
            id: id.into(),
            state: dir.join(format!("{id}-state")),
            ran_log: dir.join(format!("{id}-ran.log")),
            hold_results: false,
            reports: 0,
            exit_after_flush: false,
            args: Vec::new(),
        }
    }

    /// The command ids the device ran, in order.
    pub fn ran(&self) -> Vec<String> {
        std::fs::read_to_string(&self.ran_log)
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

impl DeviceProc {
    /// Starts a device against `gateway` (HOST:PORT) with the PKI in `pki`.
    pub fn start(gateway: &str, pki: &Path, o: &DeviceOpts) -> Self {
        let mut cmd = Command::new(bin("test-device"));
        cmd.args(["--gateway", gateway, "--id", &o.id])
            .arg("--pki")
            .arg(pki)
            .arg("--state")
            .arg(&o.state)
            .arg("--ran-log")
            .arg(&o.ran_log)
            .args(["--reports", &o.reports.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("FLEET_TEST_DEVICE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if o.hold_results {
            cmd.arg("--hold-results");
        }
        if o.exit_after_flush {
            cmd.arg("--exit-after-flush");
        }
        cmd.args(&o.args);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting test-device: {e}"));
        let (out, _rx) = capture(&mut child, "device");
        DeviceProc { child, out }
    }

    /// Waits for the process to exit by itself; its success.
    pub fn wait_exit(mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DeviceProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`); 0 when unreadable.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds a process has used; 0 when unreadable.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses: utime is the 12th, stime the
    // 13th of those.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / 100.0
}
