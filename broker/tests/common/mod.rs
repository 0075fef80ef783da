//! Fixtures for the gateway's integration tests: a gateway on 127.0.0.1:0 with a fresh PKI,
//! the mosquitto command-line clients as real third-party devices and services, and a raw TLS
//! client for sending hostile bytes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_broker::{Gateway, GatewayConfig, GatewayHandle, TlsFiles};
use fleet_certs::pki::{InitOptions, Pki};
use fleet_certs::profile::{ServerNames, Validity};
use fleet_certs::{Identity, Role};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

#[allow(unused_imports)] // each test file uses a different subset
pub use fleet_testkit::eventually;
#[allow(unused_imports)]
pub use fleet_testkit::mqtt::{connect_packet, publish_packet, subscribe_packet};
use fleet_testkit::Proc;

/// How long a mosquitto client may run: longer than any `-W` a test gives it.
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

/// A PKI with devices dev-1..dev-3, services svc-1 and svc-2 and gateway gw-1.
pub fn make_pki(dir: &Path) -> Pki {
    let mut pki = Pki::init(
        dir,
        &InitOptions {
            devices: 0,
            gateway_id: "gw-1".into(),
            service_id: "svc-1".into(),
            ..InitOptions::default()
        },
    )
    .unwrap();
    for id in ["dev-1", "dev-2", "dev-3"] {
        pki.issue(
            &Identity::new(Role::Device, id).unwrap(),
            Validity::days_from_now(30),
            &ServerNames::default(),
        )
        .unwrap();
    }
    // A second service, so a watcher and a publisher can be connected at once (one connection
    // per identity: a second one replaces the first).
    pki.issue(
        &Identity::new(Role::Service, "svc-2").unwrap(),
        Validity::days_from_now(30),
        &ServerNames::default(),
    )
    .unwrap();
    pki
}

pub struct TestGateway {
    pub addr: std::net::SocketAddr,
    pub handle: GatewayHandle,
    pub pki: Pki,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestGateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        Self::start_inner(false, tweak).await
    }

    /// A gateway whose first root of trust is the development PKI's `trust/root.bin`.
    pub async fn start_trusted() -> Self {
        Self::start_inner(true, |_| {}).await
    }

    async fn start_inner(trusted: bool, tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = make_pki(&dir.path().join("pki"));
        let gw = pki.entry("gw-1").unwrap();
        let files = TlsFiles {
            ca: Pki::ca_cert_path(pki.dir()),
            crl: Some(pki.crl_path()),
            cert: pki.cert_path(gw),
            key: pki.key_path(gw),
        };
        let mut config = GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("data"),
            metrics: fleet_broker::MetricsSettings {
                listen: Some("127.0.0.1:0".parse().unwrap()),
            },
            ..GatewayConfig::default()
        };
        if trusted {
            config.trust.root = Some(pki.trust().root_path());
        }
        tweak(&mut config);
        let gateway = Gateway::bind(config, files).await.unwrap();
        let addr = gateway.local_addr().unwrap();
        let handle = gateway.handle();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(gateway.serve(
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(2),
        ));
        TestGateway {
            addr,
            handle,
            pki,
            dir,
            stop: Some(stop),
        }
    }

    pub fn cert(&self, id: &str) -> (PathBuf, PathBuf) {
        let e = self
            .pki
            .entry(id)
            .unwrap_or_else(|| panic!("no certificate for {id}"));
        (self.pki.cert_path(e), self.pki.key_path(e))
    }

    pub fn ca(&self) -> PathBuf {
        Pki::ca_cert_path(self.pki.dir())
    }

    /// Common arguments of mosquitto_pub/sub for the holder of `id`'s certificate.
    pub fn mosq_args(&self, id: &str) -> Vec<String> {
        let (cert, key) = self.cert(id);
        self.mosq_args_with(&cert, &key, id)
    }

    pub fn mosq_args_with(&self, cert: &Path, key: &Path, client_id: &str) -> Vec<String> {
        mosquitto_args(self.addr.port(), &self.ca(), cert, key, client_id)
    }

    /// Runs mosquitto_pub to completion.
    pub fn publish(&self, id: &str, topic: &str, message: &str, extra: &[&str]) -> Output {
        let mut c = Command::new(tool("mosquitto_pub"));
        c.args(self.mosq_args(id))
            .args(["-t", topic, "-m", message])
            .args(extra);
        run_output(c)
    }

    /// Starts mosquitto_sub in the background; `extra` may add -C, -W, -q, -c...
    pub fn subscribe(&self, id: &str, topic: &str, extra: &[&str]) -> Sub {
        mosquitto_sub(self.mosq_args(id), topic, extra)
    }

    /// Gives `id` a persistent session (clean session off) subscribed to `topic` at QoS 1, and
    /// leaves. mosquitto_sub -E exits once the SUBACK has arrived, so the subscription is
    /// known to exist when this returns (a fixed -W window only hopes so).
    pub async fn persistent_session(&self, id: &str, topic: &str) {
        let out = finish(self.subscribe(id, topic, &["-c", "-q", "1", "-E"])).await;
        assert!(
            out.status.success() && text(&out).contains("received SUBACK"),
            "{}",
            text(&out)
        );
        self.wait_sessions(0).await;
    }

    /// Waits until `id` has a live session at the gateway (its SUBSCRIBE may follow shortly).
    pub async fn wait_sessions(&self, n: usize) {
        let h = self.handle.clone();
        eventually(Duration::from_secs(5), &format!("{n} sessions"), || {
            h.sessions() == n
        })
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// mosquitto_pub/sub arguments: MQTT 3.1.1 over mTLS to 127.0.0.1:`port` as `client_id`.
pub fn mosquitto_args(
    port: u16,
    ca: &Path,
    cert: &Path,
    key: &Path,
    client_id: &str,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
    ];
    for (flag, path) in [("--cafile", ca), ("--cert", cert), ("--key", key)] {
        args.push(flag.into());
        args.push(path.display().to_string());
    }
    args.extend([
        "-i".into(),
        client_id.into(),
        "-V".into(),
        "mqttv311".into(),
    ]);
    args
}

/// The path of a third-party tool, or a loud failure naming the package to install.
pub fn tool(name: &str) -> &str {
    let mut probe = Command::new("sh");
    probe.args(["-c", &format!("command -v {name}")]);
    let found = fleet_testkit::run(probe, CLIENT_DEADLINE).status.success();
    assert!(found, "{name} is not installed: run ./scripts/test.sh (it installs mosquitto-clients) or apt-get install mosquitto-clients");
    name
}

/// Runs a client to completion (killed and reported if it outlives [`CLIENT_DEADLINE`]).
pub fn run_output(c: Command) -> Output {
    fleet_testkit::run(c, CLIENT_DEADLINE)
}

/// Starts mosquitto_sub with `args` (see [`mosquitto_args`]) on `topic` in the background;
/// `extra` may add -C, -W, -q, -c...
pub fn mosquitto_sub(args: Vec<String>, topic: &str, extra: &[&str]) -> Sub {
    // -d: debug lines tell when the SUBACK has arrived (see Sub::subscribed); stdbuf makes
    // mosquitto_sub's stdout line-buffered, or they would only arrive when it exits.
    let mut c = Command::new(tool("stdbuf"));
    c.args(["-oL", tool("mosquitto_sub")]);
    c.args(args).args(["-t", topic, "-v", "-d"]).args(extra);
    Sub {
        proc: Proc::spawn(c),
    }
}

/// A mosquitto_sub running in the background.
pub struct Sub {
    proc: Proc,
}

impl Sub {
    /// Waits until the subscription is acknowledged (granted or refused), instead of guessing
    /// with a sleep.
    pub async fn subscribed(&self) {
        eventually(Duration::from_secs(10), "SUBACK", || {
            self.proc.printed("received SUBACK")
        })
        .await;
    }

    /// Kills the client (no DISCONNECT: its will fires).
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

fn is_debug(line: &str) -> bool {
    line.starts_with("Client ") || line.starts_with("Subscribed (")
}

/// Waits for a background subscriber to exit. `stdout` holds the messages only, one per line;
/// `stderr` holds its debug lines and error output.
pub async fn finish(sub: Sub) -> Output {
    tokio::task::spawn_blocking(move || {
        let out = sub.proc.finish(CLIENT_DEADLINE);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let messages: Vec<&str> = lines.iter().copied().filter(|l| !is_debug(l)).collect();
        let debug: Vec<&str> = lines.iter().copied().filter(|l| is_debug(l)).collect();
        let mut stderr = debug.join("\n").into_bytes();
        stderr.push(b'\n');
        stderr.extend_from_slice(&out.stderr);
        Output {
            status: out.status,
            stdout: messages.join("\n").into_bytes(),
            stderr,
        }
    })
    .await
    .unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ---- Raw MQTT over TLS, for hostile input ----

pub fn client_tls(ca: &Path, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    let pem = |p: &Path| std::fs::read_to_string(p).unwrap();
    fleet_testkit::mqtt::client_config(ca, &pem(cert), &pem(key)).unwrap()
}

/// A TLS connection as `id`, no MQTT yet.
pub async fn raw_tls(gw: &TestGateway, id: &str) -> TlsStream<TcpStream> {
    let (cert, key) = gw.cert(id);
    let config = client_tls(&gw.ca(), &cert, &key);
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Sends bytes, then reads until the gateway closes the connection (or `within` passes).
/// Returns what was read and whether the connection was closed.
pub async fn send_and_wait_close(
    s: &mut TlsStream<TcpStream>,
    bytes: &[u8],
    within: Duration,
) -> (Vec<u8>, bool) {
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + within;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (got, false);
        }
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

/// Reads exactly `n` bytes (a CONNACK is 4) or fails.
pub async fn read_n(s: &mut TlsStream<TcpStream>, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf
}

// ---- A protobuf-speaking MQTT peer (a device or a service without any SDK) ----

/// One publish a [`Peer`] received.
#[derive(Debug, Clone)]
pub struct Got {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// An MQTT 3.1.1 client over real mTLS speaking raw packets: publishes binary payloads at
/// QoS 1 and hands back what it receives, so a test sees the exact bytes on the wire.
pub struct Peer {
    stream: TlsStream<TcpStream>,
    buf: Vec<u8>,
    next_id: u16,
    /// Publishes read while waiting for something else.
    pending: std::collections::VecDeque<Got>,
}

/// How long a peer waits for one packet.
const PEER_DEADLINE: Duration = Duration::from_secs(15);

impl Peer {
    /// Connects as `id` (clean session) and checks the CONNACK.
    pub async fn connect(gw: &TestGateway, id: &str) -> Peer {
        let mut stream = raw_tls(gw, id).await;
        stream
            .write_all(&connect_packet(id, 60))
            .await
            .expect("CONNECT");
        let mut p = Peer {
            stream,
            buf: Vec::new(),
            next_id: 0,
            pending: Default::default(),
        };
        let (first, body) = p.packet().await;
        assert_eq!((first, body.get(1)), (0x20, Some(&0)), "{id}: CONNACK");
        p
    }

    fn id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }

    async fn packet(&mut self) -> (u8, Vec<u8>) {
        let end = Instant::now() + PEER_DEADLINE;
        loop {
            if let Some(p) = fleet_testkit::mqtt::split_packet(&mut self.buf).expect("framing") {
                return p;
            }
            let mut chunk = [0u8; 16 * 1024];
            let left = end.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.stream.read(&mut chunk))
                .await
                .expect("no packet from the gateway in time")
                .expect("read");
            assert!(n > 0, "the gateway closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads packets until one with first byte `want` arrives (publishes are acknowledged and
    /// kept for [`Peer::recv`]).
    async fn until(&mut self, want: u8) -> Vec<u8> {
        loop {
            let (first, body) = self.packet().await;
            if first >> 4 == 3 {
                self.take_publish(first, &body).await;
            } else if first == want {
                return body;
            }
        }
    }

    async fn take_publish(&mut self, first: u8, body: &[u8]) {
        let qos = (first >> 1) & 3;
        let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = String::from_utf8(body[2..2 + tlen].to_vec()).expect("topic");
        let mut at = 2 + tlen;
        if qos > 0 {
            let pkid = [body[at], body[at + 1]];
            at += 2;
            self.stream
                .write_all(&[0x40, 0x02, pkid[0], pkid[1]])
                .await
                .expect("PUBACK");
        }
        self.pending.push_back(Got {
            topic,
            payload: body[at..].to_vec(),
            retain: first & 1 == 1,
        });
    }

    /// Subscribes to `filter` at QoS 1; panics unless granted.
    pub async fn subscribe(&mut self, filter: &str) {
        let id = self.id();
        self.stream
            .write_all(&subscribe_packet(id, &[(filter, 1)]))
            .await
            .expect("SUBSCRIBE");
        let body = self.until(0x90).await;
        assert_ne!(body.get(2), Some(&0x80), "subscription to {filter} refused");
    }

    /// Publishes at QoS 1 (retained if asked) and waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], retain: bool) {
        let id = self.id();
        let mut p = publish_packet(topic.as_bytes(), payload, 1, id);
        if retain {
            p[0] |= 1;
        }
        self.stream.write_all(&p).await.expect("PUBLISH");
        self.until(0x40).await;
    }

    /// The next publish received.
    pub async fn recv(&mut self) -> Got {
        loop {
            if let Some(g) = self.pending.pop_front() {
                return g;
            }
            let (first, body) = self.packet().await;
            if first >> 4 == 3 {
                self.take_publish(first, &body).await;
            }
        }
    }

    /// The next publish on `topic` (others are skipped).
    pub async fn recv_on(&mut self, topic: &str) -> Got {
        loop {
            let g = self.recv().await;
            if g.topic == topic {
                return g;
            }
        }
    }

    /// Sends DISCONNECT and closes.
    pub async fn disconnect(mut self) {
        let _ = self.stream.write_all(&[0xe0, 0x00]).await;
        let _ = self.stream.shutdown().await;
    }
}

/// A service speaking the fleet API over a [`Peer`]: requests on its request topic, answers
/// read from its response topic (it is subscribed to it and to every event).
pub struct Api {
    pub peer: Peer,
    id: String,
    n: u32,
}

impl Api {
    pub async fn connect(gw: &TestGateway, id: &str) -> Api {
        let mut peer = Peer::connect(gw, id).await;
        peer.subscribe(&format!("fleet/api/{id}/response")).await;
        peer.subscribe("fleet/events/#").await;
        Api {
            peer,
            id: id.to_owned(),
            n: 0,
        }
    }

    /// Sends one request and returns the response's body.
    pub async fn call(
        &mut self,
        body: fleet_proto::v1::api_request::Body,
    ) -> fleet_proto::v1::api_response::Body {
        use fleet_proto::Message;
        self.n += 1;
        let request_id = format!("r{}", self.n);
        let req = fleet_proto::v1::ApiRequest {
            request_id: request_id.clone(),
            body: Some(body),
        };
        let topic = format!("fleet/api/{}/request", self.id);
        self.peer.publish(&topic, &req.encode_to_vec(), false).await;
        let answer = format!("fleet/api/{}/response", self.id);
        loop {
            let got = self.peer.recv_on(&answer).await;
            let r = fleet_proto::v1::ApiResponse::decode(got.payload.as_slice()).expect("response");
            if r.request_id == request_id {
                return r.body.expect("response body");
            }
        }
    }

    /// The next event on `topic` that `pred` accepts, decoded as `M` (others are skipped).
    pub async fn event<M: fleet_proto::Message + Default>(
        &mut self,
        topic: &str,
        pred: impl Fn(&M) -> bool,
    ) -> M {
        loop {
            let got = self.peer.recv_on(topic).await;
            let m = M::decode(got.payload.as_slice()).expect("event");
            if pred(&m) {
                return m;
            }
        }
    }
}
