//! The `gateway` binary as an operator runs it: embedded default, SIGHUP reload after a
//! revocation, SIGTERM drain, and refusal of bad configuration.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{finish, mosquitto_args, mosquitto_sub, text, tool};
use fleet_certs::pki::Pki;
use fleet_testkit::{eventually_blocking, run, Proc};

/// How long a child (the gateway starting or stopping, a client) may take.
const DEADLINE: Duration = Duration::from_secs(60);

/// What the gateway prints on stdout once it is bound.
#[derive(serde::Deserialize)]
struct Ready {
    mqtt: SocketAddr,
    http: Option<SocketAddr>,
}

struct GatewayProcess {
    proc: Proc,
    addr: SocketAddr,
    http: Option<SocketAddr>,
    dir: PathBuf,
}

impl GatewayProcess {
    /// Starts `gateway` in `dir` with no configuration but port 0; its address comes from its
    /// ready line.
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// The same with `env` added.
    fn start_with(dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
        cmd.current_dir(dir)
            .env("GATEWAY__LISTEN", "127.0.0.1:0")
            .env("GATEWAY__METRICS__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        let mut proc = Proc::spawn(cmd);
        let ready: Ready = proc.ready(DEADLINE);
        GatewayProcess {
            proc,
            addr: ready.mqtt,
            http: ready.http,
            dir: dir.to_owned(),
        }
    }

    /// `GET path` on the metrics endpoint: the status code and the body.
    fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.http.expect("the gateway has no metrics endpoint");
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

    /// Waits for a log line (what the operator reads) matching `pred`.
    fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) {
        eventually_blocking(
            Duration::from_secs(10),
            format!("log line for {what}"),
            || {
                let log = self.proc.stdout();
                if log.iter().any(|l| pred(l)) {
                    Ok(())
                } else {
                    Err(log.join("\n"))
                }
            },
        );
    }

    fn signal(&self, sig: &str) {
        let mut kill = Command::new("kill");
        kill.args([&format!("-{sig}"), &self.proc.id().to_string()]);
        let ok = run(kill, DEADLINE).status.success();
        assert!(ok, "kill -{sig} failed");
    }
}

fn session_open(id: &str) -> impl Fn(&str) -> bool + '_ {
    move |l: &str| l.contains("session open") && l.contains(&format!("client_id=\"{id}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_reload_revocation_and_drain() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = GatewayProcess::start(tmp.path());
    // The embedded default made a development PKI in its data directory.
    assert!(gw.pki().join("devices/dev-0001.crt").exists());

    let sub = |id: &str, extra: &[&str]| {
        mosquitto_sub(gw.args("devices", id), &format!("devices/{id}/cmd"), extra)
    };
    let dev1 = sub("dev-0001", &["-C", "1", "-W", "20"]);
    let mut dev2 = sub("dev-0002", &["-W", "20"]);
    dev1.subscribed().await;
    dev2.subscribed().await;

    // certs revoke dev-0002, then SIGHUP.
    Pki::open(&gw.pki()).unwrap().revoke("dev-0002").unwrap();
    gw.signal("HUP");
    gw.wait_log("reload", |l| {
        l.contains("SIGHUP: reloaded") && l.contains("closed=1")
    });
    gw.wait_log("dev-0002 closed", |l| {
        l.contains("dev-0002") && l.contains("certificate no longer valid")
    });
    dev2.kill();

    // dev-0002 cannot come back.
    let mut publish = Command::new(tool("mosquitto_pub"));
    publish.args(gw.args("devices", "dev-0002")).args([
        "-t",
        "devices/dev-0002/status",
        "-m",
        "back?",
    ]);
    let out = run(publish, DEADLINE);
    assert!(
        !out.status.success(),
        "revoked device reconnected: {}",
        text(&out)
    );
    gw.wait_log("revoked handshake refused", |l| {
        l.contains("TLS handshake failed") && l.to_lowercase().contains("revoked")
    });

    // dev-0001 stayed up: its original subscription still receives a command.
    let mut publish = Command::new(tool("mosquitto_pub"));
    publish.args(gw.args("services", "svc-0001")).args([
        "-t",
        "devices/dev-0001/cmd",
        "-m",
        "still-there",
        "-q",
        "1",
    ]);
    let out = run(publish, DEADLINE);
    assert!(out.status.success(), "{}", text(&out));
    let got = finish(dev1).await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "devices/dev-0001/cmd still-there",
        "{}",
        text(&got)
    );
    assert_eq!(
        gw.proc
            .stdout()
            .iter()
            .filter(|l| session_open("dev-0001")(l))
            .count(),
        1,
        "dev-0001 reconnected"
    );

    // SIGTERM: the gateway drains and exits 0.
    gw.signal("TERM");
    let status = tokio::task::block_in_place(|| gw.proc.wait(Duration::from_secs(15)));
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
    // The ready line comes just before the accept loop starts: healthy from then on.
    eventually_blocking(DEADLINE, "health 200 once serving", || {
        match json(gw.http_get("/health")) {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
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
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
        cmd.current_dir(tmp.path()).arg("--config").arg(file);
        run(cmd, DEADLINE)
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

/// What a persistent session was sent while offline, and the retained messages, are in the
/// store: a SIGKILL of the gateway loses none of what it acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_and_retained_messages_survive_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = GatewayProcess::start(tmp.path());
    // dev-0001 subscribes with a persistent session (-c), then goes away.
    let mut sub = mosquitto_sub(
        gw.args("devices", "dev-0001"),
        "devices/dev-0001/cmd",
        &["-c", "-q", "1", "-W", "30"],
    );
    sub.subscribed().await;
    sub.kill();
    let publish = |gw: &GatewayProcess, topic: &str, message: &str, extra: &[&str]| {
        let mut c = Command::new(tool("mosquitto_pub"));
        c.args(gw.args("services", "svc-0001"))
            .args(["-t", topic, "-m", message, "-q", "1"])
            .args(extra);
        let out = run(c, DEADLINE);
        assert!(out.status.success(), "{}", text(&out));
    };
    gw.wait_log("dev-0001 offline", |l| {
        l.contains("dev-0001") && l.contains("connection lost")
    });
    // Acknowledged by the gateway (mosquitto_pub exits 0 only after PUBACK).
    for n in 1..=3 {
        publish(&gw, "devices/dev-0001/cmd", &format!("queued-{n}"), &[]);
    }
    publish(
        &gw,
        "devices/dev-0001/update/manifest",
        "retained-m",
        &["-r"],
    );
    gw.signal("KILL");
    let _ = tokio::task::block_in_place(|| gw.proc.wait(Duration::from_secs(15)));

    let gw = GatewayProcess::start(tmp.path());
    let got = finish(mosquitto_sub(
        gw.args("devices", "dev-0001"),
        "devices/dev-0001/cmd",
        &["-c", "-q", "1", "-C", "3", "-W", "30"],
    ))
    .await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "devices/dev-0001/cmd queued-1\ndevices/dev-0001/cmd queued-2\ndevices/dev-0001/cmd queued-3",
        "{}",
        text(&got)
    );
    let got = finish(mosquitto_sub(
        gw.args("devices", "dev-0001"),
        "devices/dev-0001/update/manifest",
        &["-C", "1", "-W", "30"],
    ))
    .await;
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "devices/dev-0001/update/manifest retained-m",
        "{}",
        text(&got)
    );
}
