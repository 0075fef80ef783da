//! Brokers under benchmark, each its own child process on 127.0.0.1 with the same PKI and the
//! same policy: the release `gateway` binary, or Mosquitto with mTLS required
//! (`require_certificate`, `use_identity_as_username`), the CRL, and an ACL file. Both get
//! the gateway's default policy (`broker/src/acl/default_policy.toml`) plus one topic per
//! device that nothing inside the gateway consumes ([`BENCH_TOPIC`]), written from one table
//! ([`POLICY`]) for both. Their CPU time and memory are read from `/proc`. Every wait is
//! bounded; the process is killed when the value is dropped.
//!
//! Mosquitto cannot listen on port 0 and say which port it got, so it is given a port found
//! free a moment before (bind to port 0, read the port, close), and started again on another
//! one if that port was taken in between.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_certs::pki::Pki;

/// Errors of this module (it serves benchmark tools).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long a broker may take to start listening.
const START: Duration = Duration::from_secs(30);

/// Ports tried before giving up on starting Mosquitto.
const PORT_ATTEMPTS: usize = 5;

/// Log lines of a broker echoed to stderr before the rest are only counted.
const ECHOED: u64 = 10;

/// The device topic benchmarks publish on, `devices/{id}/bench`: every topic of the default
/// policy that a device publishes to has a consumer inside the gateway (status reports are
/// stored before they are acknowledged, progress and results are decoded by services), so a
/// figure taken on one of those would measure that consumer, not the MQTT path.
pub const BENCH_TOPIC: &str = "bench";

/// Publish and subscribe rules of one role; `{id}` is the client's identity.
#[derive(Debug)]
pub struct Rules {
    /// Topics it may publish to.
    pub publish: &'static [&'static str],
    /// Filters it may subscribe within.
    pub subscribe: &'static [&'static str],
}

/// The policy both brokers enforce: (devices, services). The gateway's default policy, with
/// [`BENCH_TOPIC`] added in the directions of a status report.
pub const POLICY: (Rules, Rules) = (
    Rules {
        publish: &[
            "devices/{id}/cmd/result",
            "devices/{id}/status",
            "devices/{id}/presence",
            "devices/{id}/update/get",
            "devices/{id}/update/progress",
            "devices/{id}/bench",
        ],
        subscribe: &[
            "devices/{id}/cmd",
            "devices/{id}/update/manifest",
            "devices/{id}/update/chunk",
        ],
    },
    Rules {
        publish: &[
            "devices/+/cmd",
            "devices/+/update/manifest",
            "fleet/api/{id}/request",
        ],
        subscribe: &[
            "devices/+/cmd/result",
            "devices/+/status",
            "devices/+/presence",
            "devices/+/update/progress",
            "fleet/api/{id}/response",
            "fleet/events/#",
            "devices/+/bench",
        ],
    },
);

/// Which broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The release `gateway` binary of this workspace.
    Gateway,
    /// Debian's Mosquitto.
    Mosquitto,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Gateway => "gateway",
            Kind::Mosquitto => "mosquitto",
        })
    }
}

/// The PKI files a broker is started with.
#[derive(Debug, Clone)]
pub struct Tls {
    /// CA certificate clients must chain to.
    pub ca: PathBuf,
    /// CRL of that CA (PEM).
    pub crl: PathBuf,
    /// The broker's certificate (its SAN names `localhost`).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl Tls {
    /// The files of `pki`, with the certificate of gateway `server_id` as the server's.
    pub fn from_pki(pki: &Pki, server_id: &str) -> Result<Self, Error> {
        let entry = pki
            .entry(server_id)
            .ok_or_else(|| format!("no certificate for {server_id} in the PKI"))?;
        Ok(Tls {
            ca: Pki::ca_cert_path(pki.dir()),
            crl: pki.crl_path(),
            cert: pki.cert_path(entry),
            key: pki.key_path(entry),
        })
    }
}

/// A running broker.
pub struct Broker {
    kind: Kind,
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Warnings and errors it logged.
    warnings: Arc<AtomicU64>,
    log: Option<PathBuf>,
}

/// Echoes a broker's warning and error lines (with `every`, all its lines) to stderr: the first
/// few; the rest are counted.
fn watch_log(
    name: String,
    reader: impl std::io::Read + Send + 'static,
    every: bool,
    warnings: Arc<AtomicU64>,
    ready: Option<std::sync::mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            let notable = every || line.contains("WARN") || line.contains("ERROR");
            // Every notable line is counted; only the first few are echoed.
            if notable && warnings.fetch_add(1, Ordering::Relaxed) < ECHOED {
                eprintln!("{name}: {line}");
            }
            // The gateway's ready line: {"ready":{"mqtt":"127.0.0.1:PORT",...}}.
            if let Some(tx) = &ready {
                let v = serde_json::from_str::<serde_json::Value>(&line).ok();
                if let Some(mqtt) = v.as_ref().and_then(|v| v["ready"]["mqtt"].as_str()) {
                    let _ = tx.send(mqtt.to_owned());
                }
            }
        }
    });
}

impl Broker {
    /// Starts the `gateway` found beside the running executable, state in `dir`, on a port of
    /// its choosing, allowing `max_connections`, with `env` added to its environment
    /// (`GATEWAY__SECTION__KEY` settings). Returns once it has said it is ready.
    pub fn gateway(
        dir: &Path,
        tls: &Tls,
        max_connections: usize,
        env: &[(String, String)],
    ) -> Result<Self, Error> {
        let exe = std::env::current_exe()?.with_file_name("gateway");
        if !exe.exists() {
            return Err(format!(
                "{} not found: build it with cargo build --release --bin gateway",
                exe.display()
            )
            .into());
        }
        std::fs::create_dir_all(dir)?;
        let policy = dir.join("policy.toml");
        std::fs::write(&policy, gateway_policy())?;
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[tls]\nca = \"{}\"\ncrl = \"{}\"\n\
                 cert = \"{}\"\nkey = \"{}\"\n[limits]\nmax_connections = {}\n\
                 [acl]\npolicy = \"{}\"\n",
                dir.join("data").display(),
                tls.ca.display(),
                tls.crl.display(),
                tls.cert.display(),
                tls.key.display(),
                max_connections,
                policy.display(),
            ),
        )?;
        let mut child = Command::new(exe)
            .arg("--config")
            .arg(&config)
            .env("GATEWAY__METRICS__LISTEN", "127.0.0.1:0")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("BENCH_GATEWAY_LOG")
                    .unwrap_or_else(|_| "info,fleet_broker::edge::connection=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let warnings = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            watch_log("gateway".into(), out, false, warnings.clone(), Some(tx));
        }
        if let Some(err) = child.stderr.take() {
            // Its log is on stdout; stderr has only what stops it (a bad configuration).
            watch_log("gateway".into(), err, true, warnings.clone(), None);
        }
        let mut broker = Broker {
            kind: Kind::Gateway,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            warnings,
            log: None,
        };
        // Dropping `broker` on an error below kills the process.
        let ready = match rx.recv_timeout(START) {
            Ok(ready) => ready,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // Its output ended: it exited (its log, echoed above, says why).
                let status = broker.child.wait()?;
                return Err(format!("the gateway exited before it was ready ({status})").into());
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "the gateway did not say it was ready within {} s",
                    START.as_secs()
                )
                .into())
            }
        };
        broker.addr = ready.parse()?;
        Ok(broker)
    }

    /// Starts Mosquitto with its files in `dir`, devices and the one service `service_id`
    /// allowed what [`POLICY`] allows them, and the configuration lines `extra` added. Returns
    /// once it accepts TCP connections on 127.0.0.1.
    pub fn mosquitto(
        dir: &Path,
        tls: &Tls,
        service_id: &str,
        extra: &[String],
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let acl = dir.join("acl");
        std::fs::write(&acl, mosquitto_acl(service_id))?;
        let mut last_error = String::new();
        for attempt in 1..=PORT_ATTEMPTS {
            let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
            let log = dir.join(format!("mosquitto-{attempt}.log"));
            let conf = dir.join(format!("mosquitto-{attempt}.conf"));
            let mut text = mosquitto_conf(port, tls, &acl, &log);
            for line in extra {
                text.push_str(line);
                text.push('\n');
            }
            std::fs::write(&conf, text)?;
            let child = Command::new(mosquitto_binary()?)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(
                    dir.join(format!("stderr-{attempt}")),
                )?)
                .spawn()?;
            let mut broker = Broker {
                kind: Kind::Mosquitto,
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                warnings: Arc::new(AtomicU64::new(0)),
                log: Some(log),
            };
            let deadline = Instant::now() + START;
            loop {
                if let Some(status) = broker.child.try_wait()? {
                    last_error = format!(
                        "mosquitto exited ({status}) on port {port}: {}{}",
                        std::fs::read_to_string(dir.join(format!("stderr-{attempt}")))
                            .unwrap_or_default(),
                        broker.log_text()
                    );
                    break;
                }
                if TcpStream::connect_timeout(&broker.addr, Duration::from_millis(200)).is_ok() {
                    return Ok(broker);
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "mosquitto did not accept connections on port {port} within {} s: {}",
                        START.as_secs(),
                        broker.log_text()
                    )
                    .into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(format!("mosquitto did not start after {PORT_ATTEMPTS} ports: {last_error}").into())
    }

    /// Which broker this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now, KiB.
    pub fn rss_kib(&self) -> u64 {
        crate::procs::status_kib(self.pid(), "VmRSS:")
    }

    /// Peak resident memory since it started, KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        crate::procs::status_kib(self.pid(), "VmHWM:")
    }

    /// User + system CPU seconds it has used.
    pub fn cpu_seconds(&self) -> f64 {
        crate::procs::cpu_seconds(self.pid())
    }

    /// Whether it is still running (neither gone nor a zombie).
    pub fn running(&self) -> bool {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next());
        matches!(state, Some(s) if s != 'Z' && s != 'X')
    }

    /// Warning and error lines it logged so far (Mosquitto: lines of its log file).
    pub fn warnings(&self) -> u64 {
        match &self.log {
            Some(_) => self.log_text().lines().count() as u64,
            None => self.warnings.load(Ordering::Relaxed),
        }
    }

    /// Mosquitto's log so far (empty for the gateway, whose log goes to stderr).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mosquitto binary.
pub fn mosquitto_binary() -> Result<PathBuf, Error> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| "mosquitto is not installed (Debian: apt-get install mosquitto)".into())
}

/// Mosquitto's version line (`mosquitto version 2.0.11`), bounded by a deadline.
pub fn mosquitto_version() -> Result<String, Error> {
    let mut cmd = Command::new(mosquitto_binary()?);
    cmd.arg("-h");
    // `-h` prints its usage and exits at once.
    let out = fleet_testkit::run(cmd, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(text
        .lines()
        .find(|l| l.contains("version"))
        .unwrap_or("mosquitto (version unknown)")
        .trim()
        .to_owned())
}

/// Mosquitto's configuration: one mTLS listener, no persistence, default queue limits
/// (`max_inflight_messages 20`, `max_queued_messages 1000` per client).
fn mosquitto_conf(port: u16, tls: &Tls, acl: &Path, log: &Path) -> String {
    format!(
        // Started as root, mosquitto would switch to its own user and could not read the
        // run's private files; as any other user this line changes nothing.
        "user root\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         persistence false\n\
         log_dest file {}\n\
         log_type error\n\
         log_type warning\n\
         acl_file {}\n\
         listener {port} 127.0.0.1\n\
         cafile {}\n\
         crlfile {}\n\
         certfile {}\n\
         keyfile {}\n\
         require_certificate true\n\
         use_identity_as_username true\n",
        log.display(),
        acl.display(),
        tls.ca.display(),
        tls.crl.display(),
        tls.cert.display(),
        tls.key.display(),
    )
}

/// [`POLICY`] as the gateway's policy file.
pub fn gateway_policy() -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (device, service) = &POLICY;
    format!(
        "[device]\npublish = [{}]\nsubscribe = [{}]\n\n\
         [service]\npublish = [{}]\nsubscribe = [{}]\n\n\
         [gateway]\npublish = []\nsubscribe = []\n",
        list(device.publish),
        list(device.subscribe),
        list(service.publish),
        list(service.subscribe),
    )
}

/// [`POLICY`] as a Mosquitto ACL file, for devices and the one service `service_id`. The user
/// name is the certificate's CN, which is the identity's id. Mosquitto has no roles: the
/// device patterns apply to the service too (they only name topics under its own id, which no
/// device has), and the service's rules are given for its name.
pub fn mosquitto_acl(service_id: &str) -> String {
    let (device, service) = &POLICY;
    let mut acl = String::from("# Devices: their own tree.\n");
    for (access, rules) in [("write", device.publish), ("read", device.subscribe)] {
        for r in rules {
            acl.push_str(&format!("pattern {access} {}\n", r.replace("{id}", "%u")));
        }
    }
    acl.push_str(&format!("\n# The service.\nuser {service_id}\n"));
    for (access, rules) in [("write", service.publish), ("read", service.subscribe)] {
        for r in rules {
            acl.push_str(&format!(
                "topic {access} {}\n",
                r.replace("{id}", service_id)
            ));
        }
    }
    acl
}
