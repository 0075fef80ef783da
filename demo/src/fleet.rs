//! A simulated fleet: many devices on the real `device-client` library in one process, each
//! with its own certificate (from a development PKI), state directory, command loop and update
//! agent. Used by the demo and the update benchmark.

use std::path::{Path, PathBuf};
use std::time::Duration;

use device_client::{ClientError, DeviceClient, HandlerError, StagedImage, UpdateHandler};
use fleet_proto::v1::{UpdateManifest, UpdatePhase, UpdateProgress};

/// Installs nothing: the agent has verified every chunk and the whole image; a simulated
/// device has no flash to write, and copying into slot files would measure the disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOnly;

impl UpdateHandler for VerifyOnly {
    fn install(&self, _m: &UpdateManifest, _images: &[StagedImage]) -> Result<(), HandlerError> {
        Ok(())
    }
    fn commit(&self, _m: &UpdateManifest) -> Result<(), HandlerError> {
        Ok(())
    }
    fn rollback(&self, _m: &UpdateManifest) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// How to run the fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Gateway host and port.
    pub host: String,
    /// Gateway port.
    pub port: u16,
    /// Development PKI directory (ca.crt, devices/ID.crt, devices/ID.key).
    pub pki: PathBuf,
    /// Where each device's state directory is made.
    pub state_root: PathBuf,
    /// Device ids.
    pub ids: Vec<String>,
    /// Device class.
    pub class: String,
    /// Firmware version before any update.
    pub version: String,
    /// The fleet's root of trust (an encoded SignedRoot; none: the devices refuse every
    /// command and update).
    pub root: Option<Vec<u8>>,
    /// Install updates into the library's A/B slot files (as a real device would) instead of
    /// only verifying them.
    pub slots: bool,
}

/// One simulated device.
#[derive(Debug)]
pub struct SimDevice {
    /// Its id.
    pub id: String,
    /// Its client.
    pub client: DeviceClient,
}

/// Starts every device; each answers commands with success (`ok:NAME`).
pub fn start(o: &FleetOptions) -> Result<Vec<SimDevice>, ClientError> {
    o.ids.iter().map(|id| start_one(o, id)).collect()
}

/// Starts device `id` of the fleet (again, after [`churn`] stopped it: same state).
pub fn start_one(o: &FleetOptions, id: &str) -> Result<SimDevice, ClientError> {
    let dev = o.pki.join("devices");
    {
        let mut b = DeviceClient::builder()
            .gateway(o.host.clone(), o.port)
            .pem_files(
                o.pki.join("ca.crt"),
                dev.join(format!("{id}.crt")),
                dev.join(format!("{id}.key")),
            )
            .state_dir(o.state_root.join(id))
            .device_class(&o.class)
            .firmware_version(&o.version)
            .backoff(Duration::from_millis(200), Duration::from_secs(2));
        if let Some(root) = &o.root {
            b = b.trust_root(root.clone());
            if !o.slots {
                b = b.update_handler(VerifyOnly);
            }
        }
        let (client, mut commands) = b.start()?;
        tokio::spawn(async move {
            while let Some(cmd) = commands.next().await {
                let out = format!("ok:{}", cmd.command().name);
                if cmd.succeed(out.into_bytes()).await.is_err() {
                    break;
                }
            }
        });
        Ok(SimDevice {
            id: id.to_owned(),
            client,
        })
    }
}

/// Connection churn: at once and then every `every`, `count` devices chosen round-robin go
/// away (shut down, goodbye sent) and come back with the same state, as devices that sleep or
/// reboot do. Runs until the returned task is aborted; the devices live in `fleet`; each
/// restart is counted in `restarts`.
pub fn churn(
    o: FleetOptions,
    fleet: std::sync::Arc<tokio::sync::Mutex<Vec<SimDevice>>>,
    every: Duration,
    count: usize,
    restarts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut next = 0usize;
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let mut devices = fleet.lock().await;
            let n = devices.len();
            for _ in 0..count.min(n) {
                let i = next % n;
                next += 1;
                let id = devices[i].id.clone();
                devices[i].client.shutdown().await;
                match start_one(&o, &id) {
                    Ok(d) => {
                        devices[i] = d;
                        restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(device = %id, error = %e, "churn: restart failed"),
                }
            }
        }
    })
}

/// The latest update report of every device.
pub fn reports(fleet: &[SimDevice]) -> Vec<Option<UpdateProgress>> {
    fleet
        .iter()
        .map(|d| d.client.update_reports().borrow().clone())
        .collect()
}

/// How many devices have reached `phase` for `update_id`.
pub fn count_phase(fleet: &[SimDevice], update_id: &str, phase: UpdatePhase) -> usize {
    reports(fleet)
        .iter()
        .flatten()
        .filter(|p| p.update_id == update_id && p.phase() == phase)
        .count()
}

/// Waits until every device is connected.
pub async fn wait_connected(fleet: &[SimDevice]) -> Result<(), ClientError> {
    for d in fleet {
        d.client.wait_connected().await?;
    }
    Ok(())
}

/// State directories are created under `root`, which is removed first.
pub fn fresh_root(root: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(root)
}
