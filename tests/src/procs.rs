//! Real processes for integration tests: the `gateway` binary on its embedded default (a
//! development PKI in its data directory), `test-device` devices, `fleetctl`. Each is a
//! [`Proc`]: output captured, every wait bounded, killed when dropped; readiness and bound
//! addresses come from the process's own ready line, never from its log. Binaries are
//! taken from the target directory of the running test (`cargo test --workspace` builds them);
//! a missing one fails the test with the command that builds it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use fleet_testkit::Proc;
use serde::Deserialize;

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

/// How long a process of ours may take to print its ready line on a loaded machine.
const READY: Duration = Duration::from_secs(60);

/// What `gateway` prints when it is ready.
#[derive(Debug, Deserialize)]
struct GatewayReady {
    mqtt: SocketAddr,
    http: Option<SocketAddr>,
}

/// A `gateway` process on the embedded default in `dir` (PKI in `dir/data/pki`), on port 0:
/// its addresses come from its ready line.
pub struct GatewayProc {
    proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its metrics endpoint.
    pub metrics_addr: Option<SocketAddr>,
    dir: PathBuf,
}

impl GatewayProc {
    /// Starts a gateway with data in `dir/data`, listening on 127.0.0.1 (a port of its
    /// choosing), with `devices` device certificates in its development PKI, and `env` added;
    /// returns once it has said it is ready.
    pub fn start(dir: &Path, devices: u32, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin("gateway"));
        cmd.current_dir(dir)
            .args(["--dev-devices", &devices.to_string(), "--grace", "1s"])
            .env("GATEWAY__LISTEN", "127.0.0.1:0")
            .env("GATEWAY__METRICS__LISTEN", "127.0.0.1:0")
            .env("GATEWAY__DATA_DIR", dir.join("data"))
            // The first root of trust: the one the development PKI (made on first start, before
            // the root is read) provisions devices with.
            .env("GATEWAY__TRUST__ROOT", dir.join("data/pki/trust/root.bin"))
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn(cmd);
        let ready: GatewayReady = proc.ready(READY);
        GatewayProc {
            proc,
            addr: ready.mqtt,
            metrics_addr: ready.http,
            dir: dir.to_owned(),
        }
    }

    /// Its log lines so far (stdout).
    pub fn log(&self) -> Vec<String> {
        self.proc.stdout()
    }

    /// Whether some log line so far contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.proc.printed(needle)
    }

    /// `GET path` on the metrics endpoint: the response body.
    pub fn http_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let addr = self
            .metrics_addr
            .unwrap_or_else(|| panic!("the gateway has no metrics endpoint"));
        let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
        // The endpoint answers at once; a read that hangs is a failure, not a wait.
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
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
        self.proc.id()
    }

    /// The development PKI directory.
    pub fn pki(&self) -> PathBuf {
        self.dir.join("data/pki")
    }

    /// Publishes the file `payload` to `topic` at QoS 1 with the real `mosquitto_pub` (Debian's
    /// mosquitto-clients, installed by scripts/test.sh), as client `id` with the certificate in
    /// `pki/{role_dir}/` (`devices` or `services`); `extra`: more arguments (`-r`,
    /// `--repeat N`). Fails the test if mosquitto_pub fails.
    pub fn mosquitto_pub(
        &self,
        role_dir: &str,
        id: &str,
        topic: &str,
        payload: &Path,
        extra: &[&str],
    ) {
        let pki = self.pki();
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .arg("--cafile")
            .arg(pki.join("ca.crt"))
            .arg("--cert")
            .arg(pki.join(role_dir).join(format!("{id}.crt")))
            .arg("--key")
            .arg(pki.join(role_dir).join(format!("{id}.key")))
            .args(["-i", id, "-V", "mqttv311", "-q", "1", "-t", topic])
            .args(extra)
            .arg("-f")
            .arg(payload);
        let out = fleet_testkit::run(cmd, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "mosquitto_pub {topic}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.addr.port())
    }

    /// An SDK client for service `svc-0001`, signing commands with the development PKI's
    /// commands key (`trust/commands-1.key`).
    pub async fn fleet(&self) -> cloud_client::FleetClient {
        self.fleet_builder()
            .command_key_file(self.pki().join("trust/commands-1.key"))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("SDK connect: {e}"))
    }

    /// An SDK client for service `svc-0001` that signs commands with `signers` instead of the
    /// development commands key (after a rotation, or to play a key the root does not name).
    pub async fn fleet_signing_with(
        &self,
        signers: Vec<std::sync::Arc<dyn fleet_proto::signing::Signer>>,
    ) -> cloud_client::FleetClient {
        self.fleet_builder()
            .command_signers(signers)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("SDK connect: {e}"))
    }

    fn fleet_builder(&self) -> cloud_client::FleetClientBuilder {
        let pki = self.pki();
        cloud_client::FleetClient::builder()
            .gateway("127.0.0.1", self.addr.port())
            .pem_files(
                pki.join("ca.crt"),
                pki.join("services/svc-0001.crt"),
                pki.join("services/svc-0001.key"),
            )
    }

    /// Runs `fleetctl` as `svc-0001` against this gateway with `args`, bounded by `within`
    /// (killed and reported past it).
    pub fn fleetctl(&self, args: &[&str], within: Duration) -> Output {
        let mut cmd = Command::new(bin("fleetctl"));
        cmd.arg("--gateway")
            .arg(format!("localhost:{}", self.addr.port()))
            .arg("--pki")
            .arg(self.pki())
            .args(args);
        fleet_testkit::run(cmd, within)
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        self.proc.kill();
    }
}

/// A `test-device` process.
pub struct DeviceProc {
    proc: Proc,
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

/// What `test-device` prints when it is ready.
#[derive(Debug, Deserialize)]
struct DeviceReady {
    queued: u64,
}

impl DeviceProc {
    /// Starts a device against `gateway` (HOST:PORT) with the PKI in `pki`; returns once it
    /// has opened its state and queued its reports (its ready line), connected or not.
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
            // The development PKI's root of trust: commands and updates need it.
            .arg("--root")
            .arg(pki.join("trust").join("root.bin"))
            .env(
                "RUST_LOG",
                std::env::var("FLEET_TEST_DEVICE_LOG").unwrap_or_else(|_| "warn".into()),
            );
        if o.hold_results {
            cmd.arg("--hold-results");
        }
        if o.exit_after_flush {
            cmd.arg("--exit-after-flush");
        }
        cmd.args(&o.args);
        let mut proc = Proc::spawn(cmd);
        let ready: DeviceReady = proc.ready(READY);
        assert_eq!(ready.queued, o.reports, "{}", proc.cmdline());
        DeviceProc { proc }
    }

    /// Every line it printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.proc.stdout()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// Whether some line it printed contains `needle`.
    pub fn printed(&self, needle: &str) -> bool {
        self.proc.printed(needle)
    }

    /// Waits until it has connected (its `connected` line), or fails the test after `within`.
    pub async fn connected(&self, within: Duration) {
        fleet_testkit::eventually(within, format!("{} connects", self.proc.cmdline()), || {
            self.printed("connected")
        })
        .await;
    }

    /// Waits up to `within` for the process to exit by itself; its status. Past the deadline
    /// it is killed and the test fails with its output.
    pub fn wait_exit(mut self, within: Duration) -> std::process::ExitStatus {
        self.proc.wait(within)
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        self.proc.kill();
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
