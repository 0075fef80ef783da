//! The update server: registers signed updates and fills the firmware cache (fleet API), runs
//! campaigns, offers manifests to devices (retained on `devices/{id}/update/manifest`), answers
//! their `ChunkRequest`s with proven `Chunk`s and records their `UpdateProgress`.
//!
//! * Chunks are read from the cache file one at a time (`pread`), never a whole image, and
//!   proofs come from the chunk digests kept in the store.
//! * Every request is bounded before any work is done for it ([`limits`] for the fleet API,
//!   [`queue::wanted`] for a device's `ChunkRequest`); a refusal is answered (fleet API) or
//!   dropped (devices), counted in `update_requests_refused_total` and logged under a budget.
//! * Each device has at most one window of chunks queued; devices are served round-robin
//!   ([`queue`]), so one device cannot starve the others.
//! * Campaign decisions are pure ([`campaign`]); each is persisted before its effects are
//!   published, and after a restart the manifests of unfinished devices are offered again.
//! * The gateway is not trusted with signatures: devices verify the manifest themselves, and
//!   each chunk against it. The gateway only checks what it needs to serve: structure, expiry,
//!   and every uploaded chunk against the manifest's Merkle roots.

mod api;
pub(crate) mod campaign;
pub(crate) mod limits;
pub(crate) mod queue;

use std::collections::HashMap;
use std::sync::Arc;

use fleet_proto::chunker::chunk_span;
use fleet_proto::ids::validate_id;
use fleet_proto::merkle::MerkleTree;
use fleet_proto::topics::{self, DeviceTopic, Topic};
use fleet_proto::v1::{
    api_request, Chunk, ChunkRequest, SignedManifest, UpdateManifest, UpdateProgress,
};
use fleet_proto::Message;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use self::campaign::{Campaign, Effects};
use self::queue::{FairQueue, Job};
use crate::config::UpdateSettings;
use crate::firmware::FirmwareDir;
use crate::metrics::{LogBudget, Metrics};
use crate::ports::{DeliverError, DirectSink};
use crate::router::Router;
use crate::router::{LinkError, Received, ServiceLink};
use crate::store::SharedStore;
use crate::store::StoreError;

/// Chunks read and published per turn of the service loop.
const SERVE_BATCH: usize = 32;

/// A fleet API request for the update server, passed on by the API's dispatcher.
#[derive(Debug)]
pub(crate) struct ApiCall {
    /// The requesting service.
    pub service: String,
    /// Its request id.
    pub request_id: String,
    /// The request.
    pub body: api_request::Body,
}

/// One component as served: its manifest entry, digest and (once complete) Merkle tree.
#[derive(Debug)]
struct ServedComponent {
    name: String,
    sha: [u8; 32],
    size: u64,
    chunk_size: u32,
    chunk_count: u32,
    tree: Option<MerkleTree>,
}

/// An update as served to devices.
#[derive(Debug)]
struct Served {
    manifest: UpdateManifest,
    /// The SignedManifest exactly as registered.
    signed: Vec<u8>,
    components: Vec<ServedComponent>,
}

/// Why a device's `UpdateProgress` is dropped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadProgress {
    /// Not protobuf of an `UpdateProgress`.
    #[error("bad protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    /// No phase: nothing to record.
    #[error("update progress without a phase")]
    NoPhase,
}

/// A device's `UpdateProgress`, checked before it reaches a campaign: it decodes and names a
/// phase. Its free text (`detail`, `running_version`) is cut to the contract's bound with
/// control characters replaced ([`fleet_proto::bounded_detail`], what a conforming device
/// sends anyway), so a device cannot make its campaign record or a log line as large as a
/// packet, nor write control characters into either.
pub(crate) fn checked_progress(payload: &[u8]) -> Result<UpdateProgress, BadProgress> {
    let mut p = UpdateProgress::decode(payload)?;
    if p.phase == 0 {
        return Err(BadProgress::NoPhase);
    }
    p.detail = fleet_proto::bounded_detail(&p.detail);
    p.running_version = fleet_proto::bounded_detail(&p.running_version);
    Ok(p)
}

/// Decodes a registered SignedManifest and its UpdateManifest.
fn decode_signed(bytes: &[u8]) -> Result<(SignedManifest, UpdateManifest), String> {
    let signed = SignedManifest::decode(bytes).map_err(|e| format!("not a SignedManifest: {e}"))?;
    let manifest = UpdateManifest::decode(signed.manifest.as_slice())
        .map_err(|e| format!("manifest is not an UpdateManifest: {e}"))?;
    Ok((signed, manifest))
}

/// Loads an update for serving: its manifest and a tree for each complete image.
fn load_served(s: &mut crate::store::Store, update_id: &str) -> Result<Option<Served>, StoreError> {
    let Some(u) = s.update(update_id)? else {
        return Ok(None);
    };
    let Ok((_, manifest)) = decode_signed(&u.signed_manifest) else {
        return Ok(None);
    };
    let mut components = Vec::with_capacity(manifest.components.len());
    for c in &manifest.components {
        let Ok(sha) = <[u8; 32]>::try_from(c.sha256.as_slice()) else {
            return Ok(None);
        };
        let hex = hex::encode(sha);
        let complete = s.image(&hex)?.is_some_and(|i| i.complete);
        let tree = if complete {
            let digests: Vec<_> = s.image_chunks(&hex)?.into_iter().map(|(_, d)| d).collect();
            MerkleTree::from_chunk_digests(&digests)
                .ok()
                .filter(|t| t.root().as_slice() == c.merkle_root.as_slice())
        } else {
            None
        };
        components.push(ServedComponent {
            name: c.name.clone(),
            sha,
            size: c.size,
            chunk_size: c.chunk_size,
            chunk_count: c.chunk_count,
            tree,
        });
    }
    Ok(Some(Served {
        manifest,
        signed: u.signed_manifest,
        components,
    }))
}

/// The update server task.
pub(crate) struct UpdateService {
    link: ServiceLink,
    store: SharedStore,
    firmware: FirmwareDir,
    /// Chunks go straight to the device's connection: through the router they would stay in
    /// its per-topic in-memory log (up to 80 MiB per device).
    direct: Arc<dyn DirectSink>,
    metrics: Arc<Metrics>,
    settings: UpdateSettings,
    calls: mpsc::UnboundedReceiver<ApiCall>,
    served: HashMap<String, Arc<Served>>,
    campaigns: HashMap<String, Campaign>,
    queue: FairQueue,
    sent: u64,
    /// Log lines for refused requests: a flood is counted in full, logged in a few lines.
    refused_log: LogBudget,
    /// The signed withdrawal (encoded SignedManifest) of each update aborted since start, for
    /// a device that asks for chunks of it after missing the withdrawal.
    pub(super) withdrawals: HashMap<String, Vec<u8>>,
}

impl UpdateService {
    /// Opens the service's link and loads the campaigns.
    pub(crate) async fn start(
        router: &Router,
        store: SharedStore,
        firmware: FirmwareDir,
        settings: UpdateSettings,
        direct: Arc<dyn DirectSink>,
        metrics: Arc<Metrics>,
        calls: mpsc::UnboundedReceiver<ApiCall>,
    ) -> Result<Self, LinkError> {
        let gets = topics::all_devices_filter(DeviceTopic::UpdateGet);
        let progress = topics::all_devices_filter(DeviceTopic::UpdateProgress);
        let link = ServiceLink::open(router, "updates", &[&gets, &progress]).await?;
        #[cfg(feature = "fault-injection")]
        if crate::fault::corrupt_every() > 0 {
            warn!(
                every = crate::fault::corrupt_every(),
                "TEST SWITCH: the update server corrupts chunks it sends"
            );
        }
        let mut this = UpdateService {
            link,
            store,
            firmware,
            direct,
            metrics,
            settings,
            calls,
            served: HashMap::new(),
            campaigns: HashMap::new(),
            queue: FairQueue::default(),
            sent: 0,
            refused_log: LogBudget::new(),
            withdrawals: HashMap::new(),
        };
        this.restore().await;
        Ok(this)
    }

    /// Loads every campaign and offers the update again to devices that have not finished
    /// (retained messages do not survive a restart).
    async fn restore(&mut self) {
        let Ok(all) = self.store.call("load campaigns", |s| s.campaigns()).await else {
            return;
        };
        for (id, record, targets) in all {
            let c = Campaign::from_parts(record, targets);
            let again = c.offered_unfinished();
            if !again.is_empty() {
                info!(update_id = %id, devices = again.len(), state = ?c.record.state(), "campaign continues");
            }
            self.campaigns.insert(id.clone(), c);
            for d in again {
                self.offer(&id, &d).await;
            }
        }
    }

    /// Runs until the router is gone.
    pub(crate) async fn run(mut self) {
        loop {
            tokio::select! {
                biased;
                call = self.calls.recv() => match call {
                    Some(call) => self.on_call(call).await,
                    None => break,
                },
                msg = self.link.recv() => match msg {
                    Some(msg) => self.on_message(msg).await,
                    None => break,
                },
                () = std::future::ready(()), if !self.queue.is_empty() => self.serve_some().await,
            }
        }
        info!("update server stopped");
    }

    async fn on_message(&mut self, msg: Received) {
        match topics::parse(&msg.topic) {
            Ok(Topic::Device {
                id,
                kind: DeviceTopic::UpdateGet,
            }) => self.on_get(id.as_str(), &msg.payload).await,
            Ok(Topic::Device {
                id,
                kind: DeviceTopic::UpdateProgress,
            }) => self.on_progress(id.as_str(), &msg.payload).await,
            _ => debug!(topic = %msg.topic, "update server: unexpected topic"),
        }
    }

    /// The served form of `update_id`, cached.
    async fn served(&mut self, update_id: &str) -> Option<Arc<Served>> {
        if let Some(s) = self.served.get(update_id) {
            return Some(s.clone());
        }
        let id = update_id.to_owned();
        let loaded = self
            .store
            .call("load update", move |s| load_served(s, &id))
            .await
            .ok()
            .flatten()?;
        let loaded = Arc::new(loaded);
        self.served.insert(update_id.to_owned(), loaded.clone());
        Some(loaded)
    }

    async fn on_get(&mut self, device: &str, payload: &[u8]) {
        let req = match ChunkRequest::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                if let Some(suppressed) = self.metrics.malformed_payload() {
                    warn!(device, error = %e, suppressed, "chunk request: bad protobuf; dropped");
                }
                return;
            }
        };
        // Ids are bounded before they are looked up or logged.
        if let Err(e) = validate_id(&req.update_id).and_then(|()| validate_id(&req.component)) {
            self.refused(
                device,
                &format!("chunk request: bad update id or component: {e}"),
            );
            return;
        }
        let active = self
            .campaigns
            .get(&req.update_id)
            .is_some_and(|c| c.is_active(device));
        if !active {
            debug!(device, update_id = %req.update_id, "chunk request for an update not offered to this device");
            // A device that missed the withdrawal (offline when its campaign was aborted)
            // would ask forever: tell it the offer is gone (with the signed withdrawal when
            // there is one), unless another update is offered to it (its manifest supersedes
            // this one, and this publish would clear it).
            if !self.campaigns.values().any(|c| c.is_active(device)) {
                if let Ok(id) = fleet_proto::DeviceId::new(device) {
                    let topic = topics::device_topic(&id, DeviceTopic::UpdateManifest);
                    let gone = self
                        .withdrawals
                        .get(&req.update_id)
                        .cloned()
                        .unwrap_or_default();
                    if let Err(e) = self.link.publish(topic, gone) {
                        warn!(device, error = %e, "could not tell a device its offer is gone");
                    }
                }
            }
            return;
        }
        let Some(served) = self.served(&req.update_id).await else {
            if let Some(suppressed) = self.refused_log.allow() {
                warn!(device, update_id = %req.update_id, suppressed, "chunk request for an update that cannot be served");
            }
            return;
        };
        let Some(ci) = served
            .components
            .iter()
            .position(|c| c.name == req.component)
        else {
            self.refused(
                device,
                &format!(
                    "chunk request for an unknown component {:?} of {}",
                    req.component, req.update_id
                ),
            );
            return;
        };
        if served.components[ci].tree.is_none() {
            if let Some(suppressed) = self.refused_log.allow() {
                warn!(device, update_id = %req.update_id, component = %req.component, suppressed, "image not complete in the cache; cannot serve");
            }
            return;
        }
        let window = queue::window(
            req.window,
            self.settings.default_window,
            self.settings.max_window,
        );
        let wanted = match queue::wanted(&req, served.components[ci].chunk_count, window) {
            Ok(w) => w,
            Err(e) => {
                self.refused(device, &format!("chunk request refused: {e}"));
                return;
            }
        };
        let update_id: Arc<str> = Arc::from(req.update_id.as_str());
        let jobs = wanted
            .into_iter()
            .map(|index| Job {
                update_id: update_id.clone(),
                component: ci,
                index,
                request_id: req.request_id,
            })
            .collect();
        self.queue.replace(device, jobs);
    }

    /// Counts a request refused by a bound, with a log line when the budget allows one.
    fn refused(&self, who: &str, what: &str) {
        Metrics::inc(&self.metrics.update_refused);
        if let Some(suppressed) = self.refused_log.allow() {
            warn!(from = who, suppressed, "{what}");
        }
    }

    /// Reads and publishes the next chunks, one per device per turn.
    async fn serve_some(&mut self) {
        let batch = self.queue.take(SERVE_BATCH);
        let mut work = Vec::with_capacity(batch.len());
        for (device, job) in batch {
            if let Some(served) = self.served(&job.update_id).await {
                work.push((device, job, served));
            }
        }
        let firmware = self.firmware.clone();
        let read = tokio::task::spawn_blocking(move || {
            work.into_iter()
                .map(|(device, job, served)| {
                    let c = &served.components[job.component];
                    let data = chunk_span(job.index, c.size, c.chunk_size)
                        .ok_or_else(|| format!("chunk {} out of range", job.index))
                        .and_then(|(offset, len)| {
                            firmware
                                .read(&c.sha, offset, len)
                                .map_err(|e| e.to_string())
                        });
                    (device, job, served, data)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(read) = read else {
            warn!("chunk read task failed");
            return;
        };
        for (device, job, served, data) in read {
            let data = match data {
                Ok(d) => d,
                Err(e) => {
                    warn!(device = %device, update_id = %job.update_id, error = %e, "cannot read a chunk from the cache");
                    continue;
                }
            };
            let c = &served.components[job.component];
            let proof = c
                .tree
                .as_ref()
                .and_then(|t| t.proof(job.index).ok())
                .unwrap_or_default();
            #[cfg_attr(not(feature = "fault-injection"), allow(unused_mut))]
            let mut chunk = Chunk {
                update_id: job.update_id.to_string(),
                component: c.name.clone(),
                index: job.index,
                data,
                proof: proof.iter().map(|h| h.to_vec()).collect(),
                request_id: job.request_id,
            };
            self.sent += 1;
            #[cfg(feature = "fault-injection")]
            crate::fault::corrupt_chunk(self.sent, &mut chunk.data);
            let Ok(id) = fleet_proto::DeviceId::new(&device) else {
                continue;
            };
            let topic = topics::device_topic(&id, DeviceTopic::UpdateChunk);
            let publish = fleet_mqtt::Publish {
                dup: false,
                qos: fleet_mqtt::QoS::AtMostOnce,
                retain: false,
                topic,
                packet_id: None,
                payload: chunk.encode_to_vec().into(),
            };
            match self
                .direct
                .deliver(&device, fleet_mqtt::Packet::Publish(publish))
            {
                Ok(()) => {}
                Err(DeliverError::NotConnected) => {
                    // Gone: it asks again when it is back.
                    self.queue.remove(&device);
                    continue;
                }
                Err(DeliverError::Full) => {
                    Metrics::inc(&self.metrics.chunks_dropped);
                    debug!(device = %device, "device's queue is full; chunk dropped (it asks again)");
                    continue;
                }
            }
            Metrics::inc(&self.metrics.chunks_served);
            if let Some(c) = self.campaigns.get_mut(&*job.update_id) {
                c.note_sent(&device);
            }
        }
    }

    async fn on_progress(&mut self, device: &str, payload: &[u8]) {
        let p = match checked_progress(payload) {
            Ok(p) => p,
            Err(e) => {
                if let Some(suppressed) = self.metrics.malformed_payload() {
                    warn!(device, error = %e, suppressed, "update progress dropped");
                }
                return;
            }
        };
        let now = fleet_proto::time::now_ms();
        let Some(c) = self.campaigns.get_mut(&p.update_id) else {
            debug!(device, update_id = %p.update_id, "progress for an update without a campaign; ignored");
            return;
        };
        let Some(effects) = c.on_progress(device, &p, now) else {
            debug!(device, update_id = %p.update_id, phase = ?p.phase(), "progress from a device not working on this update; ignored");
            return;
        };
        Metrics::inc(&self.metrics.update_reports);
        if p.phase().is_final() {
            self.queue.remove(device);
            info!(device, update_id = %p.update_id, phase = ?p.phase(), error = ?p.error(), detail = %p.detail, "device finished an update");
        } else if !effects.changed.is_empty() {
            info!(device, update_id = %p.update_id, phase = ?p.phase(), "update phase");
        }
        let update_id = p.update_id.clone();
        self.apply(&update_id, effects).await;
    }

    /// Persists a campaign change, then publishes its offers and withdrawals.
    async fn apply(&mut self, update_id: &str, e: Effects) -> bool {
        if e.needs_save() {
            let Some(c) = self.campaigns.get(update_id) else {
                return false;
            };
            let record = c.record.clone();
            let changed: Vec<_> = e
                .changed
                .iter()
                .filter_map(|&i| c.targets.get(i).cloned())
                .collect();
            let id = update_id.to_owned();
            if self
                .store
                .call("save campaign", move |s| {
                    s.save_campaign(&id, &record, &changed.iter().collect::<Vec<_>>())
                })
                .await
                .is_err()
            {
                return false;
            }
            if e.campaign_changed {
                if let Some(c) = self.campaigns.get(update_id) {
                    info!(update_id, state = ?c.record.state(), batch = c.record.current_batch, reason = %c.record.reason, "campaign");
                }
            }
        }
        for d in &e.offer {
            self.offer(update_id, d).await;
        }
        for d in &e.withdraw {
            self.queue.remove(d);
            self.publish_manifest(d, Vec::new()).await;
        }
        true
    }

    /// Publishes an update's signed withdrawal, retained, in place of its manifest.
    pub(super) async fn publish_withdrawal(&mut self, device: &str, withdrawal: Vec<u8>) {
        self.queue.remove(device);
        self.publish_manifest(device, withdrawal).await;
    }

    /// Offers the update to `device`: its manifest, retained.
    async fn offer(&mut self, update_id: &str, device: &str) {
        let Some(served) = self.served(update_id).await else {
            warn!(
                update_id,
                device, "cannot offer an update that is not registered"
            );
            return;
        };
        debug!(update_id, device, version = %served.manifest.version, "offering update");
        self.publish_manifest(device, served.signed.clone()).await;
    }

    async fn publish_manifest(&mut self, device: &str, bytes: Vec<u8>) {
        let Ok(id) = fleet_proto::DeviceId::new(device) else {
            return;
        };
        let topic = topics::device_topic(&id, DeviceTopic::UpdateManifest);
        if let Err(e) = self.link.publish_retained(topic, bytes).await {
            warn!(device, error = %e, "could not publish a manifest");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::v1::UpdatePhase;
    use fleet_proto::MAX_DETAIL_LEN;

    // Found by the gateway_device_inputs fuzz target: a device's progress text went into the
    // campaign record and the "device finished an update" log line whole (up to a packet).
    #[test]
    fn progress_text_is_cut_to_the_contracts_bound() {
        let long = UpdateProgress {
            update_id: "fw-1".into(),
            phase: UpdatePhase::Failed.into(),
            detail: format!("line\n{}", "x".repeat(1 << 20)),
            running_version: "v".repeat(100_000),
            ..Default::default()
        };
        let p = checked_progress(&long.encode_to_vec()).unwrap();
        assert!(p.detail.len() <= MAX_DETAIL_LEN, "{} bytes", p.detail.len());
        assert!(!p.detail.chars().any(char::is_control));
        assert!(p.detail.starts_with("line"));
        assert!(p.running_version.len() <= MAX_DETAIL_LEN);
        assert_eq!((p.update_id.as_str(), p.phase), ("fw-1", long.phase));

        let short = UpdateProgress {
            detail: "disk full".into(),
            running_version: "1.2.3".into(),
            ..long
        };
        assert_eq!(checked_progress(&short.encode_to_vec()).unwrap(), short);
        assert!(matches!(
            checked_progress(&UpdateProgress::default().encode_to_vec()),
            Err(BadProgress::NoPhase)
        ));
        assert!(matches!(
            checked_progress(b"\xff"),
            Err(BadProgress::Decode(_))
        ));

        // The fuzzer's input: phase 16 (unknown, not 0), a detail of 16 control characters.
        let mut found = vec![0x38, 0x10, 0x10, 0x10, 0x32];
        found.extend([0x10; 43]);
        let p = checked_progress(&found).unwrap();
        assert_eq!(p.phase, 16);
        assert_eq!(p.detail, "\u{fffd}".repeat(16));
    }
}
