//! A three-node NATS cluster as the cloud broker: Debian's `nats-server` (installed by
//! scripts/test.sh) with JetStream and its MQTT listener, on 127.0.0.1.
//!
//! * mTLS on the MQTT port and on the NATS client port, both with `verify_and_map`: a client
//!   needs a certificate of the fleet CA, and the certificate names its user. NATS matches a
//!   user against the certificate's email SANs, then its DNS SANs, then its URI SANs, then the
//!   RFC 2253 subject. The DNS SANs of our gateway certificates (`localhost`) name no one, so
//!   the users are the fleet SAN URIs, `urn:fleet:{role}:{id}` ([`user_name`]): the identity
//!   the gateway itself reads, role included (a service certificate for id `gw-0001` is not the
//!   gateway `gw-0001`).
//! * The MQTT streams are replicated on all three nodes (`stream_replicas: 3`), and a QoS 1
//!   message not acknowledged is sent again after [`ACK_WAIT`].
//! * [`Acl`]: a gateway publishes and subscribes only under `gateways/{its id}/`; a service
//!   publishes only its own requests, `gateways/+/fleet/api/{its id}/request`, and may
//!   subscribe to anything under `gateways/`. NATS answers a publish outside the ACL with a
//!   PUBACK and drops it (it logs `Publish Violation`), and a subscription outside it with
//!   SUBACK 0x80.
//!
//! Ports are found free a moment before the nodes start (bind to port 0, read it, close): the
//! cluster starts again on other ports if one was taken in between. Every wait is bounded and
//! fails with the nodes' logs; the nodes are killed when the value is dropped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleet_certs::{Identity, Role};
use fleet_testkit::Proc;

/// Number of nodes.
pub const NODES: usize = 3;

/// How long a cold cluster may take to be healthy on a loaded machine (0.5 s unloaded).
const READY: Duration = Duration::from_secs(30);

/// How long one restarted node may take to be in touch with the meta leader again.
const RESTART: Duration = Duration::from_secs(30);

/// Health of a node: JetStream in touch with the meta leader, and every stream and consumer
/// replica current. What a cold cluster is ready on.
const FULL_HEALTH: &str = "/healthz";

/// Health of a node's JetStream server alone. A restarted node can report a consumer replica
/// "not current" for as long as nothing acknowledges on that consumer (observed for over 30 s
/// with 2.9.10, while the cluster served its clients), so the full check is no signal there.
const SERVER_HEALTH: &str = "/healthz?js-server-only=true";

/// How long the warm-up connection may take: the first MQTT connection creates the replicated
/// streams (about 2 s unloaded).
const WARM_UP: Duration = Duration::from_secs(30);

/// Delay before a QoS 1 message not acknowledged is delivered again (NATS's default is 30 s).
pub const ACK_WAIT: Duration = Duration::from_secs(3);

/// Starts tried before giving up when ports are taken between finding and binding them.
const PORT_ATTEMPTS: usize = 5;

/// Installed path of the server.
pub fn binary() -> PathBuf {
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("nats-server is not installed: run ./scripts/test.sh (installs Debian's nats-server)");
}

/// The PEM files the nodes use: the CA clients must chain to, and the nodes' own certificate
/// (a gateway-role certificate with `localhost` and `127.0.0.1` among its SANs).
#[derive(Debug, Clone)]
pub struct ClusterPki {
    /// The fleet CA.
    pub ca: PathBuf,
    /// The nodes' server certificate.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
}

/// The NATS user of the holder of `role`/`id`'s certificate: its fleet SAN URI.
pub fn user_name(role: Role, id: &str) -> String {
    match Identity::new(role, id) {
        Ok(identity) => identity.uri(),
        Err(e) => panic!("{id:?} is not a fleet id: {e}"),
    }
}

/// Who may use the cluster, and for what.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    gateways: Vec<String>,
    services: Vec<String>,
}

impl Acl {
    /// Gateways `gateways` and services `services`. Panics on an id that is not one level of
    /// a NATS subject (it contains `.`, a space, `*` or `>`): NATS could not express its rules,
    /// and refuses such topics from MQTT clients anyway.
    pub fn new<G, S>(gateways: G, services: S) -> Self
    where
        G: IntoIterator,
        G::Item: Into<String>,
        S: IntoIterator,
        S::Item: Into<String>,
    {
        let gateways: Vec<String> = gateways.into_iter().map(Into::into).collect();
        let services: Vec<String> = services.into_iter().map(Into::into).collect();
        for id in gateways.iter().chain(&services) {
            assert!(
                !id.is_empty() && !id.contains(['.', ' ', '*', '>']),
                "{id:?} cannot be a level of a NATS subject"
            );
        }
        Acl { gateways, services }
    }

    /// The `users` of the nodes' `authorization` block. `extra` (the nodes' own identity, for
    /// the warm-up connection) gets no permission unless the ACL names it.
    fn users(&self, extra: &Identity) -> String {
        let mut users = Vec::new();
        let mut named = false;
        for id in &self.gateways {
            named |= extra.role == Role::Gateway && extra.id == *id;
            // `a/#` is the subjects `a` and `a.>`; every subscriber also needs the deliver
            // subjects of its JetStream consumers, `$MQTT.sub.>` (MQTT clients cannot
            // subscribe to those themselves: `$MQTT/sub/#` is refused).
            users.push(user(
                &user_name(Role::Gateway, id),
                &[&format!("gateways.{id}.>")],
                &[
                    &format!("gateways.{id}.>"),
                    &format!("gateways.{id}"),
                    "$MQTT.sub.>",
                ],
            ));
        }
        for id in &self.services {
            named |= extra.role == Role::Service && extra.id == *id;
            users.push(user(
                &user_name(Role::Service, id),
                &[&format!("gateways.*.fleet.api.{id}.request")],
                &["gateways.>", "gateways", "$MQTT.sub.>"],
            ));
        }
        if !named {
            users.push(user(&extra.uri(), &[], &[]));
        }
        users.join("\n")
    }
}

/// One user entry: allowed subjects, everything else denied (also when both lists are empty).
fn user(name: &str, publish: &[&str], subscribe: &[&str]) -> String {
    let list = |subjects: &[&str]| {
        if subjects.is_empty() {
            r#"deny: [">"]"#.to_owned()
        } else {
            let quoted: Vec<String> = subjects.iter().map(|s| format!("{s:?}")).collect();
            format!("allow: [{}]", quoted.join(", "))
        }
    };
    format!(
        "    {{ user: {name:?}, permissions: {{ publish: {{ {} }}, subscribe: {{ {} }} }} }}",
        list(publish),
        list(subscribe)
    )
}

/// The ports of one node on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    monitor: u16,
    route: u16,
    mqtt: u16,
}

/// `4 * NODES` ports free a moment ago (all held at once, so they differ).
fn free_ports() -> std::io::Result<Vec<Ports>> {
    let held = (0..4 * NODES)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let ports = held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(ports
        .chunks(4)
        .map(|p| Ports {
            client: p[0],
            monitor: p[1],
            route: p[2],
            mqtt: p[3],
        })
        .collect())
}

/// One node: its configuration, and the process while it runs.
struct Node {
    name: String,
    conf: PathBuf,
    ports: Ports,
    proc: Option<Proc>,
    /// Log lines of its earlier runs.
    earlier: Vec<String>,
}

impl Node {
    fn spawn(&mut self) {
        let mut cmd = Command::new(binary());
        cmd.arg("-c").arg(&self.conf);
        self.proc = Some(Proc::spawn(cmd));
    }

    fn logs(&self) -> Vec<String> {
        let mut all = self.earlier.clone();
        if let Some(p) = &self.proc {
            // nats-server logs to stderr.
            all.extend(p.stdout());
            all.extend(p.stderr());
        }
        all
    }

    /// Kills it (if it runs) and keeps its log.
    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
            self.earlier.extend(p.stdout());
            self.earlier.extend(p.stderr());
            self.earlier.push(format!("--- {} killed ---", self.name));
        }
    }

    /// Whether its process is gone (exited, a zombie not yet reaped).
    fn exited(&self) -> bool {
        let Some(p) = &self.proc else {
            return true;
        };
        match std::fs::read_to_string(format!("/proc/{}/stat", p.id())) {
            // The state follows the command name in parentheses: `pid (comm) S ...`.
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with(['Z', 'X'])),
            Err(_) => true,
        }
    }

    /// `GET {health}` on its monitoring port answers 200.
    fn healthy(&self, health: &str) -> bool {
        use std::io::{Read, Write};
        let addr = SocketAddr::from(([127, 0, 0, 1], self.ports.monitor));
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return false;
        };
        if s.set_read_timeout(Some(Duration::from_secs(2))).is_err()
            || write!(
                s,
                "GET {health} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .is_err()
        {
            return false;
        }
        let mut head = [0u8; 12];
        s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
    }
}

/// A running three-node cluster.
pub struct NatsCluster {
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts three nodes in `dir` (configuration, JetStream stores) serving `pki` and `acl`,
    /// and returns once every node is healthy and a first MQTT connection has set up the
    /// replicated streams. Panics (this is test support) with the nodes' logs if it cannot.
    pub async fn start(dir: &Path, pki: &ClusterPki, acl: &Acl) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let warm_up = fleet_certs::client_tls(&pki.ca, &pki.server_cert, &pki.server_key)
            .unwrap_or_else(|e| panic!("the nodes' certificate: {e}"));
        let users = acl.users(&warm_up.identity);
        let mut attempt = 0;
        let cluster = loop {
            attempt += 1;
            let ports = free_ports().unwrap_or_else(|e| panic!("free ports: {e}"));
            let mut cluster = NatsCluster {
                nodes: Vec::with_capacity(NODES),
            };
            for (n, p) in ports.iter().enumerate() {
                let name = format!("n{}", n + 1);
                let conf = dir.join(format!("{name}.conf"));
                let text = node_conf(&name, dir, pki, &ports, *p, &users);
                std::fs::write(&conf, text).unwrap_or_else(|e| panic!("{}: {e}", conf.display()));
                cluster.nodes.push(Node {
                    name,
                    conf,
                    ports: *p,
                    proc: None,
                    earlier: Vec::new(),
                });
            }
            for node in &mut cluster.nodes {
                node.spawn();
            }
            match cluster.wait_healthy(FULL_HEALTH, READY, "start").await {
                Ok(()) => break cluster,
                Err(why) => {
                    let taken = cluster.nodes.iter().any(|n| {
                        n.logs()
                            .iter()
                            .any(|l| l.contains("address already in use"))
                    });
                    if !taken || attempt == PORT_ATTEMPTS {
                        cluster.fail(&why);
                    }
                    // Dropped: killed; the next attempt takes other ports.
                }
            }
        };
        cluster.warm_up(warm_up.config).await;
        cluster
    }

    /// Waits until every running node answers `health` with 200; the reason if not.
    async fn wait_healthy(&self, health: &str, within: Duration, what: &str) -> Result<(), String> {
        let end = tokio::time::Instant::now() + within;
        loop {
            let running: Vec<&Node> = self.nodes.iter().filter(|n| n.proc.is_some()).collect();
            if let Some(gone) = running.iter().find(|n| n.exited()) {
                return Err(format!("{} exited during {what}", gone.name));
            }
            if running.iter().all(|n| n.healthy(health)) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= end {
                return Err(format!("not all nodes healthy within {within:?} of {what}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first MQTT connection creates the replicated streams, which takes seconds: do it
    /// here, not in the test's first step.
    async fn warm_up(&self, config: std::sync::Arc<rustls::ClientConfig>) {
        let addr = self.mqtt_addrs()[0].to_string();
        let connect = fleet_testkit::mqtt::Client::connect(&addr, config, "cluster-warm-up", 30);
        match tokio::time::timeout(WARM_UP, connect).await {
            Ok(Ok(client)) => client.disconnect().await,
            Ok(Err(e)) => self.fail(&format!("the warm-up connection failed: {e}")),
            Err(_) => self.fail(&format!("no warm-up CONNACK within {WARM_UP:?}")),
        }
    }

    /// Panics with `why` and every node's log.
    fn fail(&self, why: &str) -> ! {
        let mut text = format!("NATS cluster: {why}\n");
        for n in 0..self.nodes.len() {
            text.push_str(&format!(
                "--- {} ---\n{}\n",
                self.nodes[n].name,
                self.logs(n).join("\n")
            ));
        }
        panic!("{text}");
    }

    /// The MQTT listeners, node by node.
    pub fn mqtt_addrs(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .map(|n| SocketAddr::from(([127, 0, 0, 1], n.ports.mqtt)))
            .collect()
    }

    /// Node `node`'s log lines, its earlier runs included.
    pub fn logs(&self, node: usize) -> Vec<String> {
        self.nodes[node].logs()
    }

    /// Whether some log line of node `node` contains `needle`.
    pub fn logged(&self, node: usize, needle: &str) -> bool {
        self.logs(node).iter().any(|l| l.contains(needle))
    }

    /// The process id of node `node` while it runs.
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.nodes[node].proc.as_ref().map(Proc::id)
    }

    /// SIGKILL to node `node` (0-based), and reaps it.
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// Starts node `node` again (killing it first if it runs) on its ports and its store, and
    /// waits until every running node is in touch with the JetStream meta leader. Its streams
    /// and consumers catch up afterwards: a test waits for what it needs from them.
    pub async fn restart(&mut self, node: usize) {
        self.nodes[node].kill();
        self.nodes[node].spawn();
        if let Err(why) = self.wait_healthy(SERVER_HEALTH, RESTART, "a restart").await {
            self.fail(&why);
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// The configuration of node `name` at `me`, with routes to every node of `all`.
fn node_conf(
    name: &str,
    dir: &Path,
    pki: &ClusterPki,
    all: &[Ports],
    me: Ports,
    users: &str,
) -> String {
    let tls = format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify_and_map: true }}",
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
        pki.ca.display().to_string()
    );
    let routes: Vec<String> = all
        .iter()
        .map(|p| format!("\"nats-route://127.0.0.1:{}\"", p.route))
        .collect();
    let store = dir.join(format!("{name}-store"));
    format!(
        "server_name: {name}\n\
         listen: \"127.0.0.1:{client}\"\n\
         http: \"127.0.0.1:{monitor}\"\n\
         # The NATS client port maps certificates to users too: without it a NATS client\n\
         # with any fleet certificate would get in without the MQTT listener's checks.\n\
         {tls}\n\
         jetstream {{ store_dir: {store:?} }}\n\
         cluster {{ name: fleet-cloud, listen: \"127.0.0.1:{route}\", routes: [{routes}] }}\n\
         mqtt {{\n  listen: \"127.0.0.1:{mqtt}\"\n  {tls}\n  stream_replicas: {NODES}\n  ack_wait: \"{ack}ms\"\n}}\n\
         authorization {{\n  users: [\n{users}\n  ]\n}}\n",
        client = me.client,
        monitor = me.monitor,
        route = me.route,
        mqtt = me.mqtt,
        routes = routes.join(", "),
        store = store.display().to_string(),
        ack = ACK_WAIT.as_millis(),
    )
}
