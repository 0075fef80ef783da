//! A fleet of gateway processes bridged to one cloud broker, on one fleet PKI: one CA, one
//! service, every gateway's and device's certificate. "Start gateway K of the fleet, bridged
//! to these upstream addresses, with these devices."
//!
//! The cloud broker stays behind [`CloudBroker`]: today mosquitto ([`CloudBroker::mosquitto`]);
//! any broker that serves the fleet's mTLS on the addresses it returns fits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_certs::profile::{ServerNames, Validity};
use fleet_certs::{Identity, InitOptions, Pki, Role};
use fleet_proto::Message;

use crate::mosquitto::Mosquitto;
use crate::procs::{DeviceOpts, DeviceProc, GatewayProc};
use crate::proxy::Relay;

/// The id of gateway `k` (1-based): `gw-0001`.
pub fn gateway_id(k: u32) -> String {
    format!("gw-{k:04}")
}

/// One PKI for the whole fleet, in a directory.
#[derive(Debug, Clone)]
pub struct FleetPki {
    /// The PKI directory (`ca.crt`, `gateways/`, `services/svc-0001.*`, `devices/`, `trust/`).
    pub dir: PathBuf,
}

impl FleetPki {
    /// Makes the fleet PKI in `dir`: gateways `gw-0001` to `gw-{gateways}` (server names of
    /// the local host), service `svc-0001`, devices `dev-0001` to `dev-{devices}`, and the
    /// development root of trust.
    pub fn init(dir: &Path, gateways: u32, devices: u32) -> Self {
        let mut pki = Pki::init(
            dir,
            &InitOptions {
                devices,
                ..InitOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("fleet PKI in {}: {e}", dir.display()));
        for k in 2..=gateways {
            let id = Identity::new(Role::Gateway, gateway_id(k))
                .unwrap_or_else(|e| panic!("gateway id: {e}"));
            pki.issue(&id, Validity::days_from_now(365), &ServerNames::local())
                .unwrap_or_else(|e| panic!("certificate of {}: {e}", gateway_id(k)));
        }
        FleetPki {
            dir: dir.to_owned(),
        }
    }

    /// The CA bundle.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Certificate and key of `id` in `role_dir` (`gateways`, `services`, `devices`).
    pub fn pair(&self, role_dir: &str, id: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.join(role_dir);
        (d.join(format!("{id}.crt")), d.join(format!("{id}.key")))
    }

    /// The `commands` role key of the development root.
    pub fn commands_key(&self) -> PathBuf {
        self.dir.join("trust/commands-1.key")
    }

    /// An SDK builder for `svc-0001` at `host:port` signing with the commands key.
    pub fn sdk(&self, host: &str, port: u16) -> cloud_client::FleetClientBuilder {
        let (cert, key) = self.pair("services", "svc-0001");
        cloud_client::FleetClient::builder()
            .gateway(host, port)
            .pem_files(self.ca(), cert, key)
            .command_key_file(self.commands_key())
    }
}

/// The cloud broker the gateways bridge to.
pub struct CloudBroker {
    port: u16,
    _broker: Mosquitto,
}

impl CloudBroker {
    /// mosquitto in `dir` on the fleet PKI (its server certificate: `gw-0001`'s, which names
    /// the local host), behind a relay holding its port.
    pub fn mosquitto(dir: &Path, pki: &FleetPki) -> Self {
        let relay = Relay::start(None).unwrap_or_else(|e| panic!("relay: {e}"));
        let port = relay.addr.port();
        let (cert, key) = pki.pair("gateways", &gateway_id(1));
        let broker = Mosquitto::start(&dir.join("cloud"), relay, &pki.ca(), &cert, &key);
        CloudBroker {
            port,
            _broker: broker,
        }
    }

    /// Where gateways and services reach it: `localhost:PORT` (one per node of a cluster).
    pub fn addresses(&self) -> Vec<String> {
        vec![format!("localhost:{}", self.port)]
    }

    /// The port of its first address, for the SDK.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Publishes `presence` retained at QoS 1 on gateway `gateway`'s presence topic, with
    /// that gateway's certificate (`mosquitto_pub`), as the gateway's bridge does.
    pub fn publish_presence(
        &self,
        pki: &FleetPki,
        gateway: &str,
        presence: &fleet_proto::v1::GatewayPresence,
    ) {
        let (cert, key) = pki.pair("gateways", gateway);
        let file = pki.dir.join(format!("presence-{gateway}.bin"));
        std::fs::write(&file, presence.encode_to_vec())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let gw: fleet_proto::GatewayId = gateway
            .parse()
            .unwrap_or_else(|e| panic!("gateway id {gateway}: {e}"));
        let mut cmd = std::process::Command::new("mosquitto_pub");
        cmd.args(["-h", "localhost", "-p", &self.port.to_string()])
            .arg("--cafile")
            .arg(pki.ca())
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["-i", &format!("{gateway}-presence"), "-V", "mqttv311"])
            .args(["-q", "1", "-r", "-t"])
            .arg(fleet_proto::topics::gateway_presence_topic(&gw))
            .arg("-f")
            .arg(&file);
        let out = fleet_testkit::run(cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "mosquitto_pub presence of {gateway}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A gateway of the fleet and its devices.
pub struct FleetGateway {
    /// Its id.
    pub id: String,
    /// Its devices, in the order given.
    pub devices: Vec<DeviceProc>,
    /// The gateway process (dropped after its devices).
    pub proc: GatewayProc,
}

impl FleetGateway {
    /// Starts gateway `k` of the fleet (`gw-{k}`'s certificate, the fleet's root of trust) with
    /// its data in `dir/gw-{k}`, bridged to `upstream` (the bridge's list of addresses, tried
    /// in this order), and test devices `(id, class)` connected to it; returns once its bridge
    /// is up and every device is connected.
    pub async fn start(
        dir: &Path,
        pki: &FleetPki,
        k: u32,
        upstream: &[String],
        devices: &[(&str, &str)],
    ) -> Self {
        Self::start_with(dir, pki, k, upstream, devices, &[]).await
    }

    /// [`FleetGateway::start`] with `settings` added to the gateway's environment (e.g.
    /// `GATEWAY__BRIDGE__PRESENCE_INTERVAL`).
    pub async fn start_with(
        dir: &Path,
        pki: &FleetPki,
        k: u32,
        upstream: &[String],
        devices: &[(&str, &str)],
        settings: &[(&str, &str)],
    ) -> Self {
        let id = gateway_id(k);
        let dir = dir.join(&id);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let (cert, key) = pki.pair("gateways", &id);
        assert!(!upstream.is_empty(), "no upstream address");
        let upstream = upstream.join(",");
        let ca = pki.ca();
        let crl = pki.dir.join("crl.pem");
        let root = pki.dir.join("trust/root.bin");
        let mut env: Vec<(&str, &Path)> = vec![
            ("GATEWAY__TLS__CA", &ca),
            ("GATEWAY__TLS__CERT", &cert),
            ("GATEWAY__TLS__KEY", &key),
            ("GATEWAY__TRUST__ROOT", &root),
        ];
        if crl.exists() {
            env.push(("GATEWAY__TLS__CRL", &crl));
        }
        let mut vars: Vec<(&str, String)> = env
            .into_iter()
            .map(|(k, v)| (k, v.display().to_string()))
            .collect();
        vars.push(("GATEWAY__BRIDGE__UPSTREAM", upstream));
        vars.push(("GATEWAY__BRIDGE__RECONNECT_MAX", "1s".into()));
        let mut vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        vars.extend_from_slice(settings);
        let proc = GatewayProc::start(&dir, 0, &vars);
        fleet_testkit::eventually(Duration::from_secs(30), format!("{id} bridges"), || {
            proc.metric("bridge_connected") == 1.0
        })
        .await;
        let mut procs = Vec::new();
        for (dev, class) in devices {
            let mut o = DeviceOpts::new(&dir, dev);
            o.args = vec!["--class".into(), (*class).into()];
            procs.push(DeviceProc::start(&proc.address(), &pki.dir, &o));
        }
        for d in &procs {
            d.connected(Duration::from_secs(30)).await;
        }
        FleetGateway {
            id,
            devices: procs,
            proc,
        }
    }
}
