//! A real `mosquitto` as the cloud broker: TLS with `require_certificate` and the
//! certificate's identity as user name, persistence in its directory (so a stop and start keeps
//! persistent sessions and their queued messages). Debian's package (installed by
//! scripts/test.sh); a missing binary fails the test with that advice.
//!
//! mosquitto cannot listen on port 0 and say which port it got, and a test that stops and
//! starts it needs the same address both times. So it listens on a Unix socket in its
//! directory, and clients reach it through a [`Relay`] holding a TCP port of its own for the
//! whole test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleet_testkit::{eventually_blocking, Proc};

use crate::proxy::{Relay, Target};

/// How long mosquitto may take to accept connections, or to stop.
const DEADLINE: Duration = Duration::from_secs(20);

/// The mosquitto binary.
pub fn binary() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("mosquitto is not installed: run ./scripts/test.sh (installs Debian's mosquitto)");
}

/// A running mosquitto.
pub struct Mosquitto {
    proc: Option<Proc>,
    relay: Relay,
    /// Its TCP port on 127.0.0.1 (the relay's, stable across restarts).
    pub port: u16,
    dir: PathBuf,
    socket: PathBuf,
}

impl Mosquitto {
    /// Starts mosquitto in `dir` with the server certificate `cert`/`key` and client
    /// certificates required to chain to `ca`, reached through `relay` (made before, so that
    /// the clients' configuration can name its port), which is pointed at it.
    pub fn start(dir: &Path, relay: Relay, ca: &Path, cert: &Path, key: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let socket = dir.join("mosquitto.sock");
        let conf = dir.join("mosquitto.conf");
        let text = format!(
            // Started as root, mosquitto would switch to its own user and could not read the
            // test's private files; as any other user this line changes nothing.
            "user root\n\
             per_listener_settings false\n\
             allow_anonymous false\n\
             persistence true\n\
             persistence_location {}/\n\
             autosave_interval 1\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             max_queued_messages 100000\n\
             listener 0 {}\n\
             cafile {}\n\
             certfile {}\n\
             keyfile {}\n\
             require_certificate true\n\
             use_identity_as_username true\n",
            dir.display(),
            socket.display(),
            ca.display(),
            cert.display(),
            key.display()
        );
        std::fs::write(&conf, text).unwrap_or_else(|e| panic!("{}: {e}", conf.display()));
        relay.point_to(Some(Target::Unix(socket.clone())));
        let mut m = Mosquitto {
            proc: None,
            port: relay.addr.port(),
            relay,
            dir: dir.to_owned(),
            socket,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        // A socket file left by the previous run would make the bind fail.
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new(binary());
        cmd.arg("-c").arg(self.dir.join("mosquitto.conf"));
        self.proc = Some(Proc::spawn(cmd));
        // Ready once its socket accepts.
        let socket = &self.socket;
        eventually_blocking(DEADLINE, "mosquitto accepts connections", || {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        });
    }

    /// The relay clients connect to.
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// Stops it (SIGTERM: it saves its persistent sessions) and waits.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let mut kill = Command::new("kill");
            kill.args(["-TERM", &p.id().to_string()]);
            fleet_testkit::run(kill, DEADLINE);
            p.wait(DEADLINE);
        }
    }

    /// Starts it again with the same configuration and address.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

/// Messages received: (topic, payload), in arrival order.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A cloud-side subscriber with a persistent session (QoS 1): it reconnects by itself and
/// keeps every message it receives, in arrival order.
pub struct Observer {
    seen: Seen,
    subscribed: tokio::sync::watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    /// Connects to 127.0.0.1:`port` as `client_id` with the PEM files given and subscribes to
    /// `filter`.
    pub fn start(
        port: u16,
        ca: &Path,
        cert: &Path,
        key: &Path,
        client_id: &str,
        filter: &str,
    ) -> Self {
        use rumqttc::{
            AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport,
        };
        let tls =
            fleet_certs::client_tls(ca, cert, key).unwrap_or_else(|e| panic!("observer TLS: {e}"));
        let mut o = MqttOptions::new(client_id, "localhost", port);
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls.config)))
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(10))
            .set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let seen: Seen = Default::default();
        let (tx, subscribed) = tokio::sync::watch::channel(false);
        let sink = seen.clone();
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = tx.send(true);
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if let Ok(mut g) = sink.lock() {
                            g.push((p.topic.clone(), p.payload.to_vec()));
                        }
                    }
                    Ok(_) => {}
                    // Down: rumqttc reconnects on the next poll; do not spin meanwhile.
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Observer {
            seen,
            subscribed,
            task,
        }
    }

    /// Waits until its subscription is granted.
    pub async fn wait_subscribed(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.subscribed.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<(String, Vec<u8>)> {
        match self.seen.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
