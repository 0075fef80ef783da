//! The update agent: a task beside the connection driver that turns manifests and chunks into
//! an installed update, and reports each step upward.
//!
//! * A manifest is judged first ([`super::judge`]): signature over the exact bytes, structure,
//!   class, expiry, anti-rollback. A refusal is reported (REJECTED with its reason) and nothing
//!   is downloaded.
//! * The application accepts, defers or declines ([`UpdateHandler::offer`]).
//! * The download ([`Download`]) asks for a window of chunks at a time; each chunk is verified
//!   on arrival, written at its offset in the staging file, and the bitmap persisted once the
//!   chunks it names are synced. A lost connection re-asks at once on the next one; a restart
//!   resumes from the saved bitmaps.
//! * Then whole-image SHA-256, install, self-test, commit or roll back. Every phase change and
//!   every 5 % of the download is reported; the latest report is sent again on every
//!   connection, so the gateway always learns the outcome.
//!
//! Memory is bounded by the download window: chunks go to disk as they arrive.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::manifest::DeviceFacts;
use fleet_proto::signing::TrustedKeys;
use fleet_proto::v1::{
    Chunk, SignedManifest, UpdateError, UpdateManifest, UpdatePhase, UpdateProgress,
};
use fleet_proto::Message;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::download::{ChunkOutcome, Download, DownloadSettings};
use super::install::{Decision, HandlerError, StagedImage, UpdateHandler};
use super::judge::{judge, Rejection};
use super::state::{file_sha256, AgentState, Current, StateError, UpdateDir};

/// How often the agent looks for due requests and deferred offers.
const TICK: Duration = Duration::from_millis(100);

/// What the agent is configured with.
#[derive(Clone)]
pub(crate) struct UpdateConfig {
    /// The update authority's keys.
    pub trusted: TrustedKeys,
    /// The application's hooks.
    pub handler: Arc<dyn UpdateHandler>,
    /// Download tuning.
    pub settings: DownloadSettings,
    /// Sequence of the firmware the device shipped with (before any update).
    pub factory_sequence: u64,
    /// A deferred offer is put to the application again after this long.
    pub defer_retry: Duration,
}

impl std::fmt::Debug for UpdateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateConfig")
            .field("trusted_keys", &self.trusted.len())
            .field("settings", &self.settings)
            .field("factory_sequence", &self.factory_sequence)
            .finish_non_exhaustive()
    }
}

/// Messages from the driver.
#[derive(Debug)]
pub(crate) enum AgentIn {
    /// A (retained) manifest; empty when the offer is withdrawn.
    Manifest(Vec<u8>),
    /// A chunk.
    Chunk(Vec<u8>),
}

/// What the agent asks the driver to publish.
#[derive(Debug)]
pub(crate) enum AgentOut {
    /// An encoded ChunkRequest (QoS 0).
    Request(Vec<u8>),
    /// A progress report (QoS 1).
    Progress(UpdateProgress),
}

struct Downloading {
    dl: Download,
    files: Vec<Arc<File>>,
    dirty: Vec<bool>,
}

enum Stage {
    Deferred { since: tokio::time::Instant },
    Downloading(Downloading),
}

struct Work {
    signed: Vec<u8>,
    manifest: UpdateManifest,
    stage: Stage,
}

/// The agent task.
pub(crate) struct Agent {
    cfg: UpdateConfig,
    device_class: String,
    factory_version: String,
    dir: UpdateDir,
    state: AgentState,
    rx: mpsc::UnboundedReceiver<AgentIn>,
    out: mpsc::UnboundedSender<AgentOut>,
    connected: watch::Receiver<bool>,
    reports: watch::Sender<Option<UpdateProgress>>,
    work: Option<Work>,
    last_report: Option<UpdateProgress>,
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The update id of a manifest that did not pass judgement, if it can be read at all.
fn unverified_update_id(bytes: &[u8]) -> String {
    SignedManifest::decode(bytes)
        .ok()
        .and_then(|s| UpdateManifest::decode(s.manifest.as_slice()).ok())
        .map(|m| m.update_id)
        .unwrap_or_default()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("task failed: {e}"))?
}

impl Agent {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: UpdateConfig,
        device_class: String,
        factory_version: String,
        dir: UpdateDir,
        rx: mpsc::UnboundedReceiver<AgentIn>,
        out: mpsc::UnboundedSender<AgentOut>,
        connected: watch::Receiver<bool>,
        reports: watch::Sender<Option<UpdateProgress>>,
    ) -> Result<Self, StateError> {
        let state = dir.load()?;
        let last_report = state
            .last_final
            .as_ref()
            .and_then(|(r, _)| hex::decode(r).ok())
            .and_then(|b| UpdateProgress::decode(b.as_slice()).ok());
        reports.send_replace(last_report.clone());
        Ok(Agent {
            cfg,
            device_class,
            factory_version,
            dir,
            state,
            rx,
            out,
            connected,
            reports,
            work: None,
            last_report,
        })
    }

    fn installed_sequence(&self) -> u64 {
        self.state.installed_sequence.max(self.cfg.factory_sequence)
    }

    fn running_version(&self) -> String {
        if self.state.running_version.is_empty() {
            self.factory_version.clone()
        } else {
            self.state.running_version.clone()
        }
    }

    pub(crate) async fn run(mut self) {
        self.resume().await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = self.rx.recv() => match m {
                    Some(AgentIn::Manifest(b)) => self.on_manifest(b).await,
                    Some(AgentIn::Chunk(b)) => self.on_chunk(&b).await,
                    None => break,
                },
                changed = self.connected.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let up = *self.connected.borrow_and_update();
                    if up {
                        self.on_connected().await;
                    }
                }
                _ = tick.tick() => self.on_tick().await,
            }
        }
        debug!("update agent stopped");
    }

    /// After a restart: carry on with the saved update.
    async fn resume(&mut self) {
        let Some(cur) = self.state.current.clone() else {
            return;
        };
        let Ok(bytes) = hex::decode(&cur.signed_manifest) else {
            warn!("update state holds an unreadable manifest; dropping the update in progress");
            self.drop_current().await;
            return;
        };
        info!(phase = ?UpdatePhase::try_from(cur.phase).unwrap_or_default(), "resuming the update in progress");
        match self.judge(&bytes) {
            Ok(m) => {
                if cur.phase == UpdatePhase::Deferred as i32 {
                    self.work = Some(Work {
                        signed: bytes,
                        manifest: m,
                        stage: Stage::Deferred {
                            since: tokio::time::Instant::now(),
                        },
                    });
                    return;
                }
                self.start_download(bytes, m, true).await;
            }
            Err(rej) => {
                let id = unverified_update_id(&bytes);
                self.finish(&id, &bytes, UpdatePhase::Rejected, rej.code, rej.detail)
                    .await;
            }
        }
    }

    fn judge(&self, bytes: &[u8]) -> Result<UpdateManifest, Rejection> {
        let facts = DeviceFacts {
            device_class: &self.device_class,
            installed_sequence: self.installed_sequence(),
            now_ms: fleet_proto::time::now_ms(),
        };
        judge(bytes, &self.cfg.trusted, &facts).map(|v| v.manifest)
    }

    async fn on_connected(&mut self) {
        if let Some(r) = self.last_report.clone() {
            let _ = self.out.send(AgentOut::Progress(r));
        }
        if let Some(Work {
            stage: Stage::Downloading(d),
            ..
        }) = &mut self.work
        {
            // Answers to the old connection's request will not come.
            d.dl.reset_outstanding();
        }
        self.maybe_request().await;
    }

    async fn on_tick(&mut self) {
        let retry = match &self.work {
            Some(Work {
                stage: Stage::Deferred { since },
                ..
            }) => since.elapsed() >= self.cfg.defer_retry,
            _ => false,
        };
        if retry {
            if let Some(w) = self.work.take() {
                self.offer(w.signed, w.manifest).await;
            }
            return;
        }
        self.maybe_request().await;
    }

    fn report(&mut self, update_id: &str, phase: UpdatePhase, error: UpdateError, detail: String) {
        let (held, total, rejected) = match &self.work {
            Some(Work {
                stage: Stage::Downloading(d),
                ..
            }) => (d.dl.held(), d.dl.total(), d.dl.rejected()),
            Some(w) => {
                let total = w.manifest.components.iter().map(|c| c.chunk_count).sum();
                let held = if phase >= UpdatePhase::Verifying {
                    total
                } else {
                    0
                };
                (held, total, 0)
            }
            None => (0, 0, 0),
        };
        let p = UpdateProgress {
            update_id: update_id.to_owned(),
            phase: phase.into(),
            chunks_held: held,
            chunks_total: total,
            error: error.into(),
            detail,
            timestamp_ms: fleet_proto::time::now_ms(),
            running_version: self.running_version(),
            chunks_rejected: rejected,
        };
        self.send_report(p);
    }

    fn send_report(&mut self, p: UpdateProgress) {
        self.last_report = Some(p.clone());
        self.reports.send_replace(Some(p.clone()));
        if *self.connected.borrow() {
            let _ = self.out.send(AgentOut::Progress(p));
        }
    }

    async fn save_phase(&mut self, signed: &[u8], phase: UpdatePhase) -> Result<(), String> {
        self.state.current = Some(Current {
            signed_manifest: hex::encode(signed),
            phase: phase.into(),
        });
        let (dir, state) = (self.dir.clone(), self.state.clone());
        blocking(move || dir.save(&state).map_err(|e| e.to_string())).await
    }

    async fn on_manifest(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            if let Some(w) = &self.work {
                info!("the update offer was withdrawn; dropping the update in progress");
                let (handler, m) = (self.cfg.handler.clone(), w.manifest.clone());
                self.drop_current().await;
                let _ = blocking(move || {
                    handler.withdrawn(&m);
                    Ok(())
                })
                .await;
            }
            return;
        }
        let sha = sha_hex(&bytes);
        if let Some((report, for_sha)) = &self.state.last_final {
            if *for_sha == sha {
                // Already answered: say it again (the gateway may have missed it).
                if let Some(p) = hex::decode(report)
                    .ok()
                    .and_then(|b| UpdateProgress::decode(b.as_slice()).ok())
                {
                    self.send_report(p);
                }
                return;
            }
        }
        if let Some(w) = &self.work {
            if w.signed == bytes {
                if matches!(w.stage, Stage::Deferred { .. }) {
                    if let Some(w) = self.work.take() {
                        self.offer(w.signed, w.manifest).await;
                    }
                }
                return;
            }
        }
        match self.judge(&bytes) {
            Err(rej) => {
                let id = unverified_update_id(&bytes);
                warn!(update_id = %id, code = ?rej.code, detail = %rej.detail, "update manifest rejected");
                if self.work.is_some() {
                    // A refused manifest does not cancel a genuine update in progress.
                    self.report_aside(&id, rej.code, rej.detail);
                } else {
                    self.finish(&id, &bytes, UpdatePhase::Rejected, rej.code, rej.detail)
                        .await;
                }
            }
            Ok(m) => {
                if self.work.is_some() {
                    info!(update_id = %m.update_id, "a newer update supersedes the one in progress");
                    self.drop_current().await;
                }
                info!(update_id = %m.update_id, version = %m.version, sequence = m.sequence, "update manifest verified");
                self.offer(bytes, m).await;
            }
        }
    }

    async fn offer(&mut self, signed: Vec<u8>, m: UpdateManifest) {
        let handler = self.cfg.handler.clone();
        let m2 = m.clone();
        let decision = blocking(move || Ok(handler.offer(&m2)))
            .await
            .unwrap_or(Decision::Defer);
        match decision {
            Decision::Accept => self.start_download(signed, m, false).await,
            Decision::Defer => {
                info!(update_id = %m.update_id, "the application deferred the update");
                let id = m.update_id.clone();
                let saved = self.save_phase(&signed, UpdatePhase::Deferred).await;
                self.work = Some(Work {
                    signed,
                    manifest: m,
                    stage: Stage::Deferred {
                        since: tokio::time::Instant::now(),
                    },
                });
                if let Err(e) = saved {
                    warn!(error = %e, "could not save the deferred update");
                }
                self.report(
                    &id,
                    UpdatePhase::Deferred,
                    UpdateError::Unspecified,
                    String::new(),
                );
            }
            Decision::Decline(reason) => {
                let id = m.update_id.clone();
                self.work = Some(Work {
                    signed: signed.clone(),
                    manifest: m,
                    stage: Stage::Deferred {
                        since: tokio::time::Instant::now(),
                    },
                });
                self.finish(
                    &id,
                    &signed,
                    UpdatePhase::Rejected,
                    UpdateError::Declined,
                    reason,
                )
                .await;
            }
        }
    }

    async fn start_download(&mut self, signed: Vec<u8>, m: UpdateManifest, resuming: bool) {
        let id = m.update_id.clone();
        let prepared = {
            let dir = self.dir.clone();
            let n = m.components.len();
            blocking(move || {
                if !resuming {
                    dir.clear_staging().map_err(|e| e.to_string())?;
                }
                let mut bitmaps = Vec::with_capacity(n);
                let mut files = Vec::with_capacity(n);
                for i in 0..n {
                    bitmaps.push(dir.load_bitmap(i).map_err(|e| e.to_string())?);
                    files.push(Arc::new(dir.open_staged(i).map_err(|e| e.to_string())?));
                }
                Ok((bitmaps, files))
            })
            .await
        };
        let (bitmaps, files) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.work = Some(Work {
                    signed: signed.clone(),
                    manifest: m,
                    stage: Stage::Deferred {
                        since: tokio::time::Instant::now(),
                    },
                });
                self.finish(&id, &signed, UpdatePhase::Failed, UpdateError::Storage, e)
                    .await;
                return;
            }
        };
        let dl = match Download::resume(&id, &m.components, &bitmaps, self.cfg.settings)
            .or_else(|_| Download::new(&id, &m.components, self.cfg.settings))
        {
            Ok(dl) => dl,
            Err(e) => {
                warn!(error = %e, "cannot set up the download");
                return;
            }
        };
        if let Err(e) = self.save_phase(&signed, UpdatePhase::Downloading).await {
            warn!(error = %e, "could not save the update state");
        }
        let n = files.len();
        let held = dl.held();
        self.work = Some(Work {
            signed,
            manifest: m,
            stage: Stage::Downloading(Downloading {
                dl,
                files,
                dirty: vec![false; n],
            }),
        });
        if resuming {
            info!(update_id = %id, held, "download resumed");
        }
        self.report(
            &id,
            UpdatePhase::Downloading,
            UpdateError::Unspecified,
            String::new(),
        );
        if self.download_complete() {
            self.install().await;
        } else {
            self.maybe_request().await;
        }
    }

    fn download_complete(&self) -> bool {
        matches!(&self.work, Some(Work { stage: Stage::Downloading(d), .. }) if d.dl.is_complete())
    }

    /// Syncs the staged chunks and persists the bitmaps that name them.
    async fn flush(&mut self) -> Result<(), String> {
        let Some(Work {
            stage: Stage::Downloading(d),
            ..
        }) = &mut self.work
        else {
            return Ok(());
        };
        let mut jobs = Vec::new();
        for (i, dirty) in d.dirty.iter_mut().enumerate() {
            if *dirty {
                *dirty = false;
                let bits = d.dl.bitmap(i).map(<[u8]>::to_vec).unwrap_or_default();
                jobs.push((i, d.files[i].clone(), bits));
            }
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let dir = self.dir.clone();
        blocking(move || {
            for (i, f, bits) in jobs {
                dir.persist(i, &f, &bits).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .await
    }

    async fn maybe_request(&mut self) {
        if !*self.connected.borrow() {
            return;
        }
        let now = fleet_proto::time::now_ms();
        let due = matches!(&self.work, Some(Work { stage: Stage::Downloading(d), .. }) if d.dl.request_due(now));
        if !due {
            return;
        }
        if let Err(e) = self.flush().await {
            self.fail_storage(e).await;
            return;
        }
        let Some(Work {
            stage: Stage::Downloading(d),
            manifest,
            ..
        }) = &mut self.work
        else {
            return;
        };
        let progress = d.dl.progress_due();
        let id = manifest.update_id.clone();
        if let Some(req) = d.dl.next_request(now) {
            let _ = self.out.send(AgentOut::Request(req.encode_to_vec()));
        }
        if progress {
            self.report(
                &id,
                UpdatePhase::Downloading,
                UpdateError::Unspecified,
                String::new(),
            );
        }
    }

    async fn on_chunk(&mut self, bytes: &[u8]) {
        let chunk = match Chunk::decode(bytes) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "chunk: bad protobuf; dropped");
                return;
            }
        };
        let Some(Work {
            stage: Stage::Downloading(d),
            manifest,
            ..
        }) = &mut self.work
        else {
            return;
        };
        match d.dl.on_chunk(&chunk) {
            ChunkOutcome::Verified(v) => {
                let f = &d.files[v.component];
                if let Err(e) = f.write_all_at(&chunk.data, v.offset) {
                    self.fail_storage(format!("staging write: {e}")).await;
                    return;
                }
                d.dl.mark_held(&v);
                d.dirty[v.component] = true;
            }
            ChunkOutcome::Rejected { index, reason } => {
                warn!(update_id = %manifest.update_id, component = %chunk.component, index, %reason, "chunk failed verification; asking again");
            }
            ChunkOutcome::Failed(rej) => {
                warn!(update_id = %manifest.update_id, detail = %rej.detail, "chunks keep failing verification; update abandoned");
                let (id, signed) = (manifest.update_id.clone(), self.current_signed());
                self.finish(&id, &signed, UpdatePhase::Failed, rej.code, rej.detail)
                    .await;
                return;
            }
            ChunkOutcome::Duplicate | ChunkOutcome::Stray => {}
        }
        if self.download_complete() {
            if let Err(e) = self.flush().await {
                self.fail_storage(e).await;
                return;
            }
            self.install().await;
        } else {
            self.maybe_request().await;
        }
    }

    fn current_signed(&self) -> Vec<u8> {
        self.work
            .as_ref()
            .map(|w| w.signed.clone())
            .unwrap_or_default()
    }

    async fn fail_storage(&mut self, e: String) {
        warn!(error = %e, "update storage failed");
        let Some(w) = &self.work else {
            return;
        };
        let (id, signed) = (w.manifest.update_id.clone(), w.signed.clone());
        self.finish(&id, &signed, UpdatePhase::Failed, UpdateError::Storage, e)
            .await;
    }

    /// Every chunk is held: check, install, test, commit or roll back.
    async fn install(&mut self) {
        let Some(w) = &self.work else {
            return;
        };
        let (m, signed) = (w.manifest.clone(), w.signed.clone());
        let id = m.update_id.clone();
        self.phase(&id, &signed, UpdatePhase::Verifying).await;
        let staged: Vec<StagedImage> = m
            .components
            .iter()
            .enumerate()
            .map(|(i, c)| StagedImage {
                component: c.name.clone(),
                path: self.dir.staged(i),
                size: c.size,
            })
            .collect();
        let check = {
            let (staged, m) = (staged.clone(), m.clone());
            blocking(move || {
                for (img, c) in staged.iter().zip(&m.components) {
                    let f = File::options()
                        .write(true)
                        .open(&img.path)
                        .map_err(|e| format!("{}: {e}", img.path.display()))?;
                    f.set_len(c.size)
                        .map_err(|e| format!("{}: {e}", img.path.display()))?;
                    let sha = file_sha256(&img.path).map_err(|e| e.to_string())?;
                    if sha.as_slice() != c.sha256.as_slice() {
                        return Ok(Some(format!(
                            "component {}: SHA-256 {} is not the manifest's {}",
                            c.name,
                            hex::encode(sha),
                            hex::encode(&c.sha256)
                        )));
                    }
                }
                Ok(None)
            })
            .await
        };
        match check {
            Ok(None) => {}
            Ok(Some(detail)) => {
                self.finish(
                    &id,
                    &signed,
                    UpdatePhase::Failed,
                    UpdateError::DigestMismatch,
                    detail,
                )
                .await;
                return;
            }
            Err(e) => {
                self.finish(&id, &signed, UpdatePhase::Failed, UpdateError::Storage, e)
                    .await;
                return;
            }
        }
        self.phase(&id, &signed, UpdatePhase::Installing).await;
        if let Err(e) = self.hook(&m, move |h, m| h.install(m, &staged)).await {
            self.finish(
                &id,
                &signed,
                UpdatePhase::Failed,
                UpdateError::InstallFailed,
                e,
            )
            .await;
            return;
        }
        self.phase(&id, &signed, UpdatePhase::SelfTest).await;
        if let Err(e) = self.hook(&m, |h, m| h.self_test(m)).await {
            warn!(update_id = %id, error = %e, "self-test failed; rolled back");
            self.finish(
                &id,
                &signed,
                UpdatePhase::RolledBack,
                UpdateError::SelfTestFailed,
                e,
            )
            .await;
            return;
        }
        if let Err(e) = self.hook(&m, |h, m| h.commit(m)).await {
            self.finish(
                &id,
                &signed,
                UpdatePhase::Failed,
                UpdateError::InstallFailed,
                e,
            )
            .await;
            return;
        }
        self.state.installed_sequence = self.state.installed_sequence.max(m.sequence);
        self.state.running_version = m.version.clone();
        info!(update_id = %id, version = %m.version, "update committed");
        self.finish(
            &id,
            &signed,
            UpdatePhase::Committed,
            UpdateError::Unspecified,
            String::new(),
        )
        .await;
    }

    /// Runs one of the application's hooks on the blocking pool; when it fails, the
    /// installation is rolled back too (the running firmware stays).
    async fn hook(
        &self,
        m: &UpdateManifest,
        f: impl FnOnce(&dyn UpdateHandler, &UpdateManifest) -> Result<(), HandlerError> + Send + 'static,
    ) -> Result<(), String> {
        let handler = self.cfg.handler.clone();
        let m = m.clone();
        blocking(move || match f(handler.as_ref(), &m) {
            Ok(()) => Ok(()),
            Err(e) => Err(match handler.rollback(&m) {
                Ok(()) => e.report(),
                Err(r) => format!("{}; rollback also failed: {}", e.report(), r.report()),
            }),
        })
        .await
    }

    /// Records and reports a phase change of the update in progress.
    async fn phase(&mut self, id: &str, signed: &[u8], phase: UpdatePhase) {
        if let Err(e) = self.save_phase(signed, phase).await {
            warn!(error = %e, "could not save the update state");
        }
        self.report(id, phase, UpdateError::Unspecified, String::new());
    }

    /// Ends the update in progress with a final report, remembered until the next one.
    async fn finish(
        &mut self,
        id: &str,
        signed: &[u8],
        phase: UpdatePhase,
        error: UpdateError,
        detail: String,
    ) {
        self.report(id, phase, error, detail);
        self.work = None;
        self.state.current = None;
        self.persist_final(signed).await;
        let dir = self.dir.clone();
        if let Err(e) = blocking(move || dir.clear_staging().map_err(|e| e.to_string())).await {
            warn!(error = %e, "could not clear the staging area");
        }
    }

    /// Reports a refused manifest without touching the update in progress.
    fn report_aside(&mut self, id: &str, error: UpdateError, detail: String) {
        let p = UpdateProgress {
            update_id: id.to_owned(),
            phase: UpdatePhase::Rejected.into(),
            error: error.into(),
            detail,
            timestamp_ms: fleet_proto::time::now_ms(),
            running_version: self.running_version(),
            ..Default::default()
        };
        if *self.connected.borrow() {
            let _ = self.out.send(AgentOut::Progress(p));
        }
    }

    async fn persist_final(&mut self, signed: &[u8]) {
        if let Some(p) = &self.last_report {
            self.state.last_final = Some((hex::encode(p.encode_to_vec()), sha_hex(signed)));
        }
        let (dir, state) = (self.dir.clone(), self.state.clone());
        if let Err(e) = blocking(move || dir.save(&state).map_err(|e| e.to_string())).await {
            warn!(error = %e, "could not save the update state");
        }
    }

    async fn drop_current(&mut self) {
        self.work = None;
        self.state.current = None;
        let (dir, state) = (self.dir.clone(), self.state.clone());
        if let Err(e) = blocking(move || {
            dir.save(&state).map_err(|e| e.to_string())?;
            dir.clear_staging().map_err(|e| e.to_string())
        })
        .await
        {
            warn!(error = %e, "could not drop the update in progress");
        }
    }
}
