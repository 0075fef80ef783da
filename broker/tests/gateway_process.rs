//! The `gateway` binary as an operator runs it: embedded default, SIGHUP reload after a
//! revocation, SIGTERM drain, and refusal of bad configuration.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{mosquitto_args, text, tool};
use fleet_certs::pki::Pki;

struct GatewayProcess {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
}

impl GatewayProcess {
    /// Starts `gateway` in `dir` with no configuration but a free port.
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// The same with `env` added.
    fn start_with(dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .current_dir(dir)
            .env("GATEWAY__LISTEN", "127.0.0.1:0")
            .env("GATEWAY__METRICS__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(at) = line.find("gateway listening addr=") {
                    let rest = &line[at + "gateway listening addr=".len()..];
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("gateway did not start listening")
            .parse()
            .unwrap();
        GatewayProcess {
            child,
            addr,
            log,
            dir: dir.to_owned(),
        }
    }

    fn pki(&self) -> PathBuf {
        self.dir.join("gateway-data/pki")
    }

    fn args(&self, role_dir: &str, id: &str) -> Vec<String> {
        let pki = self.pki();
        let (cert, key) = (
            pki.join(format!("{role_dir}/{id}.crt")),
            pki.join(format!("{role_dir}/{id}.key")),
        );
        mosquitto_args(self.addr.port(), &pki.join("ca.crt"), &cert, &key, id)
    }

    fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if self.log.lock().unwrap().iter().any(|l| pred(l)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "no log line for {what}:\n{}",
            self.log.lock().unwrap().join("\n")
        );
    }

    /// `GET path` on the metrics endpoint: the status code and the body.
    fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let key = "metrics endpoint listening addr=";
        let addr: SocketAddr = self
            .log
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| {
                let rest = &l[l.find(key)? + key.len()..];
                rest.split_whitespace().next()?.parse().ok()
            })
            .expect("no metrics endpoint in the log");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {out}"));
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
        (code, body.unwrap_or_default())
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn session_open(id: &str) -> impl Fn(&str) -> bool + '_ {
    move |l: &str| l.contains("session open") && l.contains(&format!("client_id=\"{id}\""))
}

#[test]
fn embedded_default_reload_revocation_and_drain() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = GatewayProcess::start(tmp.path());
    // The embedded default made a development PKI in its data directory.
    assert!(gw.pki().join("devices/dev-0001.crt").exists());

    let sub = |id: &str, extra: &[&str]| {
        Command::new(tool("mosquitto_sub"))
            .args(gw.args("devices", id))
            .args(["-t", &format!("devices/{id}/cmd"), "-v"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let dev1 = sub("dev-0001", &["-C", "1", "-W", "20"]);
    let mut dev2 = sub("dev-0002", &["-W", "20"]);
    gw.wait_log("dev-0001 session", session_open("dev-0001"));
    gw.wait_log("dev-0002 session", session_open("dev-0002"));

    // certs revoke dev-0002, then SIGHUP.
    Pki::open(&gw.pki()).unwrap().revoke("dev-0002").unwrap();
    gw.signal("HUP");
    gw.wait_log("reload", |l| {
        l.contains("SIGHUP: reloaded") && l.contains("closed=1")
    });
    gw.wait_log("dev-0002 closed", |l| {
        l.contains("dev-0002") && l.contains("certificate no longer valid")
    });
    let _ = dev2.kill();
    let _ = dev2.wait();

    // dev-0002 cannot come back.
    let out = Command::new(tool("mosquitto_pub"))
        .args(gw.args("devices", "dev-0002"))
        .args(["-t", "devices/dev-0002/status", "-m", "back?"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "revoked device reconnected: {}",
        text(&out)
    );
    gw.wait_log("revoked handshake refused", |l| {
        l.contains("TLS handshake failed") && l.to_lowercase().contains("revoked")
    });

    // dev-0001 stayed up: its original subscription still receives a command.
    let out = Command::new(tool("mosquitto_pub"))
        .args(gw.args("services", "svc-0001"))
        .args(["-t", "devices/dev-0001/cmd", "-m", "still-there", "-q", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let got = dev1.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "devices/dev-0001/cmd still-there",
        "{}",
        text(&got)
    );
    assert_eq!(
        gw.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| session_open("dev-0001")(l))
            .count(),
        1,
        "dev-0001 reconnected"
    );

    // SIGTERM: the gateway drains and exits 0.
    gw.signal("TERM");
    let end = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "gateway did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    gw.wait_log("stopped", |l| l.contains("gateway stopped"));
}

#[test]
fn health_is_200_when_serving_and_503_naming_an_unreachable_bridge() {
    let tmp = tempfile::tempdir().unwrap();
    let json = |(code, body): (u16, String)| {
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        (code, v)
    };

    // No bridge configured: listener and store are all there is to check.
    let alone = tmp.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    let gw = GatewayProcess::start(&alone);
    let (code, h) = json(gw.http_get("/health"));
    assert_eq!(code, 200, "{h}");
    assert_eq!(h["status"], "ok");
    assert_eq!(h["failed"], serde_json::json!([]));
    assert_eq!(h["checks"]["listener"], "ok");
    assert_eq!(h["checks"]["store"], "ok");
    assert_eq!(h["checks"]["bridge"], "not configured");
    drop(gw);

    // A bridge whose upstream refuses connections (a port just released): unavailable, and
    // the answer says it is the bridge.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let bridged = tmp.path().join("bridged");
    std::fs::create_dir_all(&bridged).unwrap();
    let gw = GatewayProcess::start_with(
        &bridged,
        &[("GATEWAY__BRIDGE__UPSTREAM", &closed.to_string())],
    );
    let (code, h) = json(gw.http_get("/health"));
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["status"], "unavailable");
    assert_eq!(h["failed"], serde_json::json!(["bridge"]));
    assert_eq!(h["checks"]["bridge"], "not connected upstream");
    assert_eq!(h["checks"]["listener"], "ok");
    assert_eq!(h["checks"]["store"], "ok");
}

#[test]
fn bad_configuration_exits_64_before_binding() {
    let tmp = tempfile::tempdir().unwrap();
    let run_with = |file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .current_dir(tmp.path())
            .arg("--config")
            .arg(file)
            .output()
            .unwrap()
    };
    let cases = [
        ("[limits]\nmax_connections = 0\n", "max_connections"),
        ("listen = \"not-an-address\"\n", "listen"),
        ("[tls]\nca = \"ca.crt\"\n", "tls.ca"),
        ("no_such_option = true\n", "no_such_option"),
        ("[acl]\non_denied_publish = \"ignore\"\n", "ignore"),
    ];
    for (body, mention) in cases {
        let file = tmp.path().join("gateway.toml");
        std::fs::write(&file, body).unwrap();
        let out = run_with(&file);
        assert_eq!(out.status.code(), Some(64), "{body}: {}", text(&out));
        assert!(
            text(&out).contains(mention),
            "{body}: message does not name {mention}: {}",
            text(&out)
        );
        // Nothing was created: the config is checked before any side effect.
        assert!(!tmp.path().join("gateway-data").exists(), "{body}");
    }
    // A policy file that does not parse is refused at start too.
    let policy = tmp.path().join("policy.toml");
    std::fs::write(&policy, "[device]\npublish = [\"devices/x{id}\"]\n").unwrap();
    let file = tmp.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:0\"\n[acl]\npolicy = \"{}\"\n",
            policy.display()
        ),
    )
    .unwrap();
    let out = run_with(&file);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("policy"), "{}", text(&out));
}

#[test]
fn example_configuration_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.example.toml");
    let cfg = fleet_broker::GatewayConfig::load(Some(&example))
        .unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    assert_eq!(
        cfg,
        fleet_broker::GatewayConfig::default(),
        "the example must show the defaults"
    );
}
