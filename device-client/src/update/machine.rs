//! The update agent as a state machine: events in (start, connection up or down, a manifest, a
//! chunk, a tick), chunk requests and progress reports out. Time comes in with every event;
//! files are reached only through [`Storage`], and the application only through its
//! [`UpdateHandler`], so a test can run it against a disk that loses power.
//!
//! # Phases, what is journaled before each, and what a restart does
//!
//! | phase (journal) | entered after the journal says so | a restart in it |
//! |---|---|---|
//! | none | - | waits for a manifest |
//! | `Deferred` | the application deferred the offer | judges the manifest again, offers it after `defer_retry` |
//! | `Downloading` | the application accepted | judges again (expiry), resumes from the saved bitmaps |
//! | `Installing` | every chunk held, whole-image SHA-256 matched, not expired | runs the install hook again (hooks are idempotent) |
//! | `Trial` | the install hook returned | counts one more start on trial; after `max_trial_starts` without a confirmed self-test: rolls back |
//! | `Committing` | the self-test passed and the manifest had not expired; the anti-rollback sequence is raised in the same journal write | runs the commit hook again |
//! | `RollingBack` | a step failed; the final report is journaled with it | runs the rollback hook again, then reports |
//!
//! The trial step calls [`UpdateHandler::activate`] (which may restart the device: the next
//! start carries on); the new firmware becomes permanent only through
//! [`UpdateHandler::commit`], and only after the journal holds the raised sequence. So a power
//! cut at any point leaves either the old firmware with the old sequence, or the new firmware
//! on trial (falls back unless confirmed), or the new firmware with the new sequence.
//!
//! A final report (committed, rolled back, failed, rejected) is journaled before it is sent
//! and re-sent on every connection until the next one; the same manifest offered again (by its
//! digest, whatever signatures were added to the envelope) gets the same answer.
//!
//! A running update is replaced only by a manifest with a higher sequence, and only while it
//! is deferred or downloading. Staged files are named by the manifest's digest.

use std::sync::Arc;

use fleet_proto::command::verify_withdrawal;
use fleet_proto::manifest::DeviceFacts;
use fleet_proto::signing::TrustedKeys;
use fleet_proto::trust::TrustedRoot;
use fleet_proto::v1::{
    ChunkRequest, SignedManifest, UpdateError, UpdateManifest, UpdatePhase, UpdateProgress,
};
use fleet_proto::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::{debug, info, warn};

use super::download::{ChunkOutcome, Download, DownloadSettings};
use super::install::{Decision, HandlerError, StagedImage, UpdateHandler};
use super::judge::{judge, recheck, Rejection};
use super::storage::{Staged, StagedKind, Storage};

use fleet_proto::limits::{MAX_PROOF_LEN, MAX_SIGNED_MANIFEST_LEN as MAX_MANIFEST_BYTES};
use fleet_proto::report::{bounded_detail, unverified_update_id as reportable_id};
use fleet_proto::wire;

/// Starts on trial without a passed self-test before the agent falls back, by default.
pub(crate) const DEFAULT_MAX_TRIAL_STARTS: u32 = 3;
/// Bytes the staged images of one update may take, by default.
pub(crate) const DEFAULT_STORAGE_BUDGET: u64 = 1 << 30;

/// What the machine is configured with.
#[derive(Clone)]
pub(crate) struct MachineConfig {
    /// The device's root of trust at start (its `updates` role signs manifests); `None`:
    /// every manifest is refused (NO_ROOT).
    pub root: Option<TrustedRoot>,
    /// The device's class (manifests for another are refused).
    pub device_class: String,
    /// The firmware version the device shipped with.
    pub factory_version: String,
    /// The sequence of the firmware the device shipped with.
    pub factory_sequence: u64,
    /// Download tuning.
    pub settings: DownloadSettings,
    /// A deferred offer is put to the application again after this long.
    pub defer_retry_ms: u64,
    /// Starts on trial without a passed self-test before falling back.
    pub max_trial_starts: u32,
    /// Most bytes the staged images of one update may take.
    pub storage_budget: u64,
    /// The clock is never trusted below this (ms since 1970): the firmware's build time.
    pub build_time_ms: u64,
}

/// The build time of this library, from `SOURCE_DATE_EPOCH` (seconds) when the build set it
/// (reproducible builds do), else 0: the floor under the device's clock before any manifest
/// was accepted.
pub(crate) fn build_time_ms() -> u64 {
    option_env!("SOURCE_DATE_EPOCH")
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(0, |s| s.saturating_mul(1000))
}

/// What the driver must send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Output {
    /// A chunk request (QoS 0).
    Request(ChunkRequest),
    /// A progress report (QoS 1).
    Report(UpdateProgress),
}

/// Where the update in progress stands, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Phase {
    /// Offered; the application said "not now".
    Deferred,
    /// Accepted; chunks are being fetched.
    Downloading,
    /// Verified; the install hook runs.
    Installing,
    /// Installed; on trial (self-tests begun so far).
    Trial {
        /// Self-tests started.
        starts: u32,
    },
    /// Confirmed; the commit hook runs. The sequence is already raised.
    Committing {
        /// The version that ran before (restored in the journal if the commit fails).
        previous_version: String,
    },
    /// A step failed; the rollback hook runs, then this report is final.
    RollingBack {
        /// The final report (encoded UpdateProgress, hex).
        report: String,
    },
}

/// The update in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Current {
    /// The encoded SignedManifest as received (hex).
    pub signed_manifest: String,
    /// Its phase.
    pub phase: Phase,
}

/// A final report and the manifest it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Final {
    /// Encoded UpdateProgress (hex).
    pub report: String,
    /// SHA-256 of the manifest bytes (hex); empty when unknown.
    pub manifest_digest: String,
}

/// The agent's persistent state: one record, replaced atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Journal {
    /// Highest manifest sequence made (or being made) permanent: anti-rollback.
    pub installed_sequence: u64,
    /// Version of the firmware committed last (empty: the factory version).
    pub running_version: String,
    /// The newest `issued_at_ms` of a manifest accepted: the clock is not trusted below it.
    pub time_floor_ms: u64,
    /// The update in progress.
    pub current: Option<Current>,
    /// The last final report.
    pub last_final: Option<Final>,
}

/// The journal format of earlier versions (`agent.json`), read once.
#[derive(Debug, Deserialize)]
struct LegacyJournal {
    installed_sequence: u64,
    running_version: String,
    current: Option<LegacyCurrent>,
}

#[derive(Debug, Deserialize)]
struct LegacyCurrent {
    signed_manifest: String,
    phase: i32,
}

impl Journal {
    /// Reads the legacy format: what was installed, and an update deferred or downloading
    /// (one further along is installed again from the start of verification).
    pub(crate) fn from_legacy(bytes: &[u8]) -> Option<Journal> {
        let old: LegacyJournal = serde_json::from_slice(bytes).ok()?;
        let current = old.current.map(|c| Current {
            signed_manifest: c.signed_manifest,
            phase: if c.phase == UpdatePhase::Deferred as i32 {
                Phase::Deferred
            } else {
                Phase::Downloading
            },
        });
        Some(Journal {
            installed_sequence: old.installed_sequence,
            running_version: old.running_version,
            time_floor_ms: 0,
            current,
            last_final: None,
        })
    }
}

/// The manifest keys of a root: its `updates` role (none without a root).
fn keys_of(root: Option<&TrustedRoot>) -> TrustedKeys {
    root.map_or_else(TrustedKeys::new, |r| r.updates.trusted_keys())
}

/// The name staged files of the manifest with this digest (hex) go by: its first 16 bytes.
fn staging_key(digest: &str) -> String {
    digest.chars().take(32).collect()
}

fn digest_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

enum Stage {
    Deferred { since_ms: u64 },
    Downloading { dl: Download, dirty: Vec<bool> },
}

struct Work {
    signed: Vec<u8>,
    /// SHA-256 of the manifest bytes (hex).
    digest: String,
    manifest: UpdateManifest,
    stage: Stage,
}

impl Work {
    fn key(&self) -> String {
        staging_key(&self.digest)
    }

    fn staged(&self, component: usize, kind: StagedKind) -> Staged {
        Staged {
            key: self.key(),
            component,
            kind,
        }
    }
}

/// How a failed step ends.
struct Ending {
    phase: UpdatePhase,
    error: UpdateError,
    detail: String,
}

impl Ending {
    /// FAILED, for the reason a check gave.
    fn failed(rej: Rejection) -> Self {
        Ending {
            phase: UpdatePhase::Failed,
            error: rej.code,
            detail: rej.detail,
        }
    }
}

/// Where output goes the moment it is made (the driver's channel), instead of waiting for
/// [`Machine::take_output`]: a report of the self-test is seen while the self-test runs.
pub(crate) type Sink = Box<dyn FnMut(Output) + Send>;

/// The agent's state machine.
pub(crate) struct Machine<S: Storage> {
    cfg: MachineConfig,
    /// The keys of the current root's `updates` role (empty without a root).
    keys: TrustedKeys,
    store: S,
    handler: Arc<dyn UpdateHandler>,
    journal: Journal,
    work: Option<Work>,
    connected: bool,
    out: Vec<Output>,
    sink: Option<Sink>,
    last_report: Option<UpdateProgress>,
    /// Withdrawals not acted on: empty messages, bad or foreign signatures, other offers.
    withdrawals_ignored: u64,
    /// The last manifest refused for want of trusted signatures (judged again by a new root).
    refused_for_keys: Option<Vec<u8>>,
}

impl<S: Storage> Machine<S> {
    /// Starts from what `store` holds (`legacy`: the old-format journal, if any), carrying on
    /// with the update in progress. Never fails: unreadable state is reported and the device
    /// keeps running (the anti-rollback floor is then the factory sequence).
    pub(crate) fn start(
        cfg: MachineConfig,
        mut store: S,
        handler: Arc<dyn UpdateHandler>,
        legacy: Option<Vec<u8>>,
        now_ms: u64,
    ) -> Self {
        let mut problem = None;
        let journal = match store.load_journal() {
            Ok(Some(bytes)) => match serde_json::from_slice::<Journal>(&bytes) {
                Ok(j) => j,
                Err(e) => {
                    problem = Some(format!("the update journal is unreadable ({e})"));
                    Journal::default()
                }
            },
            Ok(None) => legacy
                .as_deref()
                .and_then(Journal::from_legacy)
                .unwrap_or_default(),
            Err(e) => {
                problem = Some(format!("the update journal cannot be read ({e})"));
                Journal::default()
            }
        };
        let last_report = journal
            .last_final
            .as_ref()
            .and_then(|f| hex::decode(&f.report).ok())
            .and_then(|b| UpdateProgress::decode(b.as_slice()).ok());
        let keys = keys_of(cfg.root.as_ref());
        let mut m = Machine {
            cfg,
            keys,
            store,
            handler,
            journal,
            work: None,
            connected: false,
            out: Vec::new(),
            sink: None,
            last_report,
            withdrawals_ignored: 0,
            refused_for_keys: None,
        };
        if let Some(p) = problem {
            warn!(problem = %p, "update state lost; the anti-rollback floor is the factory sequence");
            m.send_report(m.progress(
                "",
                UpdatePhase::Failed,
                UpdateError::Storage,
                format!("{p}; the anti-rollback floor is the factory sequence"),
                (0, 0, 0),
                now_ms,
            ));
        }
        m.resume(now_ms);
        m
    }

    /// Sends output to `sink` as it is made from now on (what is buffered goes first).
    pub(crate) fn set_sink(&mut self, mut sink: Sink) {
        for o in self.out.drain(..) {
            sink(o);
        }
        self.sink = Some(sink);
    }

    fn emit(&mut self, o: Output) {
        match &mut self.sink {
            Some(sink) => sink(o),
            None => self.out.push(o),
        }
    }

    /// What to send, in order (when no sink is set, as in tests).
    #[cfg(test)]
    pub(crate) fn take_output(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// The latest report (what the gateway was or will be told).
    pub(crate) fn last_report(&self) -> Option<&UpdateProgress> {
        self.last_report.as_ref()
    }

    /// Whether chunks are expected now: anything else arriving is dropped unread.
    pub(crate) fn wants_chunks(&self) -> bool {
        matches!(
            &self.work,
            Some(Work {
                stage: Stage::Downloading { .. },
                ..
            })
        )
    }

    fn installed_sequence(&self) -> u64 {
        self.journal
            .installed_sequence
            .max(self.cfg.factory_sequence)
    }

    fn running_version(&self) -> String {
        if self.journal.running_version.is_empty() {
            self.cfg.factory_version.clone()
        } else {
            self.journal.running_version.clone()
        }
    }

    /// The clock, never below the newest issue time seen nor the build time.
    fn trusted_now(&self, now_ms: u64) -> u64 {
        now_ms
            .max(self.journal.time_floor_ms)
            .max(self.cfg.build_time_ms)
    }

    fn save(&mut self) -> Result<(), String> {
        let bytes = serde_json::to_vec(&self.journal).map_err(|e| e.to_string())?;
        self.store
            .save_journal(&bytes)
            .map_err(|e| format!("saving the update journal: {e}"))
    }

    fn set_phase(&mut self, signed: &[u8], phase: Phase) -> Result<(), String> {
        self.journal.current = Some(Current {
            signed_manifest: hex::encode(signed),
            phase,
        });
        self.save()
    }

    fn facts(&self, now_ms: u64) -> DeviceFacts<'_> {
        DeviceFacts {
            device_class: &self.cfg.device_class,
            installed_sequence: self.installed_sequence(),
            now_ms: self.trusted_now(now_ms),
        }
    }

    /// Judges manifest `bytes` for this device against the `updates` role of the current
    /// root (the envelope's bounds are checked by `TrustedKeys::verify_encoded` before
    /// anything is decoded). No root, or an expired one, refuses everything.
    fn judge(&self, bytes: &[u8], now_ms: u64) -> Result<UpdateManifest, Rejection> {
        let now = self.trusted_now(now_ms);
        match &self.cfg.root {
            None => {
                return Err(Rejection {
                    code: UpdateError::NoRoot,
                    detail: "the device holds no root of trust".into(),
                })
            }
            Some(r) if r.expired(now) => {
                return Err(Rejection {
                    code: UpdateError::RootExpired,
                    detail: format!(
                        "the device's root (version {}) expired at {} ms (now {now} ms)",
                        r.version, r.expires_at_ms
                    ),
                })
            }
            Some(_) => {}
        }
        judge(bytes, &self.keys, &self.facts(now_ms)).map(|v| v.manifest)
    }

    /// Checks a manifest verified earlier (journaled work) again: structure, class, expiry
    /// and anti-rollback, not its signatures: the update in progress keeps the manifest it
    /// verified when the root changes.
    fn recheck(&self, m: &UpdateManifest, now_ms: u64) -> Result<(), Rejection> {
        recheck(m, &self.facts(now_ms))
    }

    /// A new root: manifests from now on are checked against its `updates` role. The update
    /// in progress is not judged again; the last manifest refused for want of trusted
    /// signatures is (it may have arrived just before the root that vouches for it).
    pub(crate) fn set_root(&mut self, root: TrustedRoot, now_ms: u64) {
        self.keys = keys_of(Some(&root));
        self.cfg.root = Some(root);
        if let Some(bytes) = self.refused_for_keys.take() {
            self.manifest(&bytes, now_ms);
        }
    }

    /// The floor under the clock: the build time, or the newest issue time accepted.
    pub(crate) fn time_floor_ms(&self) -> u64 {
        self.journal.time_floor_ms.max(self.cfg.build_time_ms)
    }

    // ---- reports ----

    fn progress(
        &self,
        update_id: &str,
        phase: UpdatePhase,
        error: UpdateError,
        detail: String,
        (held, total, rejected): (u32, u32, u32),
        now_ms: u64,
    ) -> UpdateProgress {
        UpdateProgress {
            update_id: update_id.to_owned(),
            phase: phase.into(),
            chunks_held: held,
            chunks_total: total,
            error: error.into(),
            detail: bounded_detail(&detail),
            timestamp_ms: now_ms,
            running_version: self.running_version(),
            chunks_rejected: rejected,
        }
    }

    fn counts(&self, phase: UpdatePhase) -> (u32, u32, u32) {
        match &self.work {
            Some(Work {
                stage: Stage::Downloading { dl, .. },
                ..
            }) => (dl.held(), dl.total(), dl.rejected()),
            Some(w) => {
                let total = w
                    .manifest
                    .components
                    .iter()
                    .fold(0u32, |a, c| a.saturating_add(c.chunk_count));
                let held = if phase >= UpdatePhase::Verifying {
                    total
                } else {
                    0
                };
                (held, total, 0)
            }
            None => (0, 0, 0),
        }
    }

    fn report(&mut self, phase: UpdatePhase, now_ms: u64) {
        let Some(w) = &self.work else {
            return;
        };
        let p = self.progress(
            &w.manifest.update_id,
            phase,
            UpdateError::Unspecified,
            String::new(),
            self.counts(phase),
            now_ms,
        );
        self.send_report(p);
    }

    fn send_report(&mut self, p: UpdateProgress) {
        self.last_report = Some(p.clone());
        if self.connected {
            self.emit(Output::Report(p));
        }
    }

    /// The report refusing manifest `bytes`.
    fn rejection(&self, bytes: &[u8], rej: Rejection, now_ms: u64) -> UpdateProgress {
        self.progress(
            &reportable_id(bytes),
            UpdatePhase::Rejected,
            rej.code,
            rej.detail,
            (0, 0, 0),
            now_ms,
        )
    }

    /// Reports a refused manifest without touching the update in progress.
    fn report_aside(&mut self, bytes: &[u8], rej: Rejection, now_ms: u64) {
        let p = self.rejection(bytes, rej, now_ms);
        if self.connected {
            self.emit(Output::Report(p));
        }
    }

    /// Ends the update in progress (or answers a manifest that never became one): the final
    /// report is journaled, then sent (not at all if it cannot be journaled); then the staging
    /// area is cleared.
    fn finish_with(&mut self, report: UpdateProgress, manifest_digest: String) {
        self.work = None;
        self.journal.current = None;
        self.journal.last_final = Some(Final {
            report: hex::encode(report.encode_to_vec()),
            manifest_digest,
        });
        // Only a journaled answer leaves the device: one that is not could be contradicted
        // by what the next start does.
        match self.save() {
            Ok(()) => self.send_report(report),
            Err(e) => {
                warn!(error = %e, "could not journal the final report; not sent, the next start answers again")
            }
        }
        if let Err(e) = self.store.clear_staging(None) {
            warn!(error = %e, "could not clear the staging area");
        }
    }

    fn finish(&mut self, ending: Ending, now_ms: u64) {
        let Some(w) = &self.work else {
            return;
        };
        let digest = w.digest.clone();
        let p = self.progress(
            &w.manifest.update_id,
            ending.phase,
            ending.error,
            ending.detail,
            self.counts(ending.phase),
            now_ms,
        );
        self.finish_with(p, digest);
    }

    // ---- events ----

    /// The connection to the gateway is up: the latest report goes out again, and the
    /// download asks at once for what it misses.
    pub(crate) fn connected(&mut self, now_ms: u64) {
        self.connected = true;
        if let Some(r) = self.last_report.clone() {
            self.emit(Output::Report(r));
        }
        if let Some(Work {
            stage: Stage::Downloading { dl, .. },
            ..
        }) = &mut self.work
        {
            dl.reset_outstanding();
        }
        self.maybe_request(now_ms);
    }

    /// The connection is down.
    pub(crate) fn disconnected(&mut self) {
        self.connected = false;
    }

    /// Time passes: retries of deferred offers and of unanswered requests.
    pub(crate) fn tick(&mut self, now_ms: u64) {
        let retry = matches!(
            &self.work,
            Some(Work { stage: Stage::Deferred { since_ms }, .. })
                if now_ms.saturating_sub(*since_ms) >= self.cfg.defer_retry_ms
        );
        if retry {
            if let Some(w) = self.work.take() {
                self.reoffer(w, now_ms);
            }
            return;
        }
        self.maybe_request(now_ms);
    }

    /// Withdrawals seen and not acted on, since start.
    pub(crate) fn withdrawals_ignored(&self) -> u64 {
        self.withdrawals_ignored
    }

    /// A withdrawal arrived: acted on only if the `commands` role of the current root signed
    /// it and it names the manifest in progress (by digest); then the update in progress is
    /// dropped. Anything else is logged and counted, and the update goes on.
    fn withdrawal(&mut self, signed: &SignedManifest, now_ms: u64) {
        let now = self.trusted_now(now_ms);
        let w = match verify_withdrawal(self.cfg.root.as_ref(), signed, now) {
            Ok(w) => w,
            Err(e) => {
                self.withdrawals_ignored += 1;
                warn!(error = %e, "update withdrawal not acted on");
                return;
            }
        };
        let ours = self
            .work
            .as_ref()
            .is_some_and(|work| work.digest == hex::encode(&w.manifest_sha256));
        if !ours {
            self.withdrawals_ignored += 1;
            info!(update_id = %w.update_id, "a signed withdrawal of another offer; the update goes on");
            return;
        }
        if let Some(work) = self.work.take() {
            info!(update_id = %work.manifest.update_id, reason = %w.reason, "the update offer was withdrawn; dropping the update in progress");
            self.journal.current = None;
            if let Err(e) = self.save() {
                warn!(error = %e, "could not journal the withdrawal");
            }
            if let Err(e) = self.store.clear_staging(None) {
                warn!(error = %e, "could not clear the staging area");
            }
            self.handler.withdrawn(&work.manifest);
        }
    }

    /// A message arrived on `devices/{id}/update/manifest` (retained): a signed manifest, or
    /// a signed withdrawal of one. An empty message withdraws nothing (anyone who may publish
    /// there could send one): it is counted and logged.
    pub(crate) fn manifest(&mut self, bytes: &[u8], now_ms: u64) {
        if bytes.is_empty() {
            self.withdrawals_ignored += 1;
            info!(
                "an empty message on the manifest topic; only a signed withdrawal drops an update"
            );
            return;
        }
        if bytes.len() <= MAX_MANIFEST_BYTES {
            if let Ok(s) = wire::decode_signed_manifest_bounded(bytes) {
                if !s.withdrawal.is_empty() {
                    self.withdrawal(&s, now_ms);
                    return;
                }
            }
        }
        if bytes.len() > MAX_MANIFEST_BYTES {
            let rej = Rejection {
                code: UpdateError::MalformedManifest,
                detail: format!(
                    "signed manifest of {} bytes; at most {MAX_MANIFEST_BYTES} are read",
                    bytes.len()
                ),
            };
            self.report_aside(&[], rej, now_ms);
            return;
        }
        // The manifest's own digest, whatever signatures the envelope carries.
        let digest = wire::decode_signed_manifest_bounded(bytes)
            .ok()
            .map(|s| digest_hex(&s.manifest));
        if let (Some(d), Some(f)) = (&digest, &self.journal.last_final) {
            if *d == f.manifest_digest {
                // Already answered: say it again (the gateway may have missed it).
                if let Some(p) = self.last_report.clone() {
                    if self.connected {
                        self.emit(Output::Report(p));
                    }
                }
                return;
            }
        }
        if let (Some(d), Some(w)) = (&digest, &self.work) {
            if *d == w.digest {
                if matches!(w.stage, Stage::Deferred { .. }) {
                    if let Some(w) = self.work.take() {
                        self.reoffer(w, now_ms);
                    }
                }
                return;
            }
        }
        let m = match self.judge(bytes, now_ms) {
            Ok(m) => m,
            Err(rej) => {
                warn!(code = ?rej.code, detail = %bounded_detail(&rej.detail), "update manifest rejected");
                // A manifest the current root's keys do not vouch for may be signed for the
                // next root, which can arrive just after it: kept (the newest one only) to be
                // judged again when the root changes.
                self.refused_for_keys = matches!(
                    rej.code,
                    UpdateError::UnknownKey
                        | UpdateError::BelowThreshold
                        | UpdateError::NoRoot
                        | UpdateError::RootExpired
                )
                .then(|| bytes.to_vec());
                if self.work.is_some() {
                    // A refused manifest does not cancel a genuine update in progress.
                    self.report_aside(bytes, rej, now_ms);
                } else {
                    // Not journaled: a stream of refused manifests must not wear the flash.
                    // The retained manifest comes again on the next connection and gets the
                    // same answer.
                    let p = self.rejection(bytes, rej, now_ms);
                    self.send_report(p);
                }
                return;
            }
        };
        let digest = digest.unwrap_or_default();
        if let Some(w) = &self.work {
            if m.sequence <= w.manifest.sequence {
                let rej = Rejection {
                    code: UpdateError::NotNewer,
                    detail: format!(
                        "update {} (sequence {}) is in progress; only a higher sequence replaces it",
                        w.manifest.update_id, w.manifest.sequence
                    ),
                };
                self.report_aside(bytes, rej, now_ms);
                return;
            }
            info!(update_id = %m.update_id, "a newer update supersedes the one in progress");
            if let Some(old) = self.work.take() {
                self.handler.withdrawn(&old.manifest);
            }
        }
        info!(update_id = %m.update_id, version = %m.version, sequence = m.sequence, "update manifest verified");
        self.refused_for_keys = None;
        self.journal.time_floor_ms = self.journal.time_floor_ms.max(m.issued_at_ms);
        let w = Work {
            signed: bytes.to_vec(),
            digest,
            manifest: m,
            stage: Stage::Deferred { since_ms: now_ms },
        };
        self.offer(w, now_ms);
    }

    /// A chunk arrived.
    pub(crate) fn chunk(&mut self, bytes: &[u8], now_ms: u64) {
        // Only a chunk the download misses is decoded; its header is read without allocating.
        let wanted = match wire::peek_chunk(bytes, MAX_PROOF_LEN) {
            Ok(h) => matches!(
                &self.work,
                Some(Work { stage: Stage::Downloading { dl, .. }, .. })
                    if dl.wants(h.update_id, h.component, h.index)
            ),
            Err(e) => {
                debug!(error = %e, "chunk: malformed or over its bounds; dropped");
                false
            }
        };
        if !wanted {
            return;
        }
        let chunk = match wire::decode_chunk_bounded(bytes, MAX_PROOF_LEN) {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "chunk: bad protobuf; dropped");
                return;
            }
        };
        let Some(w) = &mut self.work else {
            return;
        };
        let key = w.key();
        let Stage::Downloading { dl, dirty } = &mut w.stage else {
            return;
        };
        match dl.on_chunk(&chunk) {
            ChunkOutcome::Verified(v) => {
                let file = Staged {
                    key,
                    component: v.component,
                    kind: StagedKind::Image,
                };
                if let Err(e) = self.store.write_at(&file, v.offset, &chunk.data) {
                    self.fail_storage(format!("staging write: {e}"), now_ms);
                    return;
                }
                dl.mark_held(&v);
                if let Some(d) = dirty.get_mut(v.component) {
                    *d = true;
                }
            }
            ChunkOutcome::Rejected { index, reason } => {
                debug!(index, reason = %bounded_detail(&reason), "chunk failed verification; asking again");
            }
            ChunkOutcome::Failed(rej) => {
                warn!(detail = %bounded_detail(&rej.detail), "chunks keep failing verification; update abandoned");
                self.finish(Ending::failed(rej), now_ms);
                return;
            }
            ChunkOutcome::Duplicate | ChunkOutcome::Stray => {}
        }
        let complete = matches!(&self.work, Some(Work { stage: Stage::Downloading { dl, .. }, .. }) if dl.is_complete());
        if complete {
            if let Err(e) = self.flush() {
                self.fail_storage(e, now_ms);
                return;
            }
            self.verify_and_install(now_ms);
        } else {
            self.maybe_request(now_ms);
        }
    }

    // ---- steps ----

    /// After a start: carry on with the journaled update.
    fn resume(&mut self, now_ms: u64) {
        let cur = self.journal.current.clone();
        let decoded = cur.as_ref().and_then(|c| {
            let b = hex::decode(&c.signed_manifest).ok()?;
            let s = SignedManifest::decode(b.as_slice()).ok()?;
            let m = UpdateManifest::decode(s.manifest.as_slice()).ok()?;
            Some((b, digest_hex(&s.manifest), m))
        });
        // Staged files of any other update are stale.
        let keep = decoded.as_ref().map(|(_, digest, _)| staging_key(digest));
        if let Err(e) = self.store.clear_staging(keep.as_deref()) {
            warn!(error = %e, "could not clear stale staged files");
        }
        let Some(cur) = cur else {
            return;
        };
        let Some((signed, digest, m)) = decoded else {
            warn!("the journal holds an unreadable manifest; dropping the update in progress");
            self.journal.current = None;
            if let Err(e) = self.save() {
                warn!(error = %e, "could not journal the dropped update");
            }
            return;
        };
        info!(update_id = %m.update_id, phase = ?cur.phase, "resuming the update in progress");
        let w = Work {
            signed,
            digest,
            manifest: m,
            stage: Stage::Deferred { since_ms: now_ms },
        };
        match cur.phase {
            Phase::Deferred | Phase::Downloading => {
                // Checked again: it may have expired, or the floor moved. (Its signatures
                // were checked when it was journaled; a root change since does not undo that.)
                if let Err(rej) = self.recheck(&w.manifest, now_ms) {
                    self.work = Some(w);
                    self.finish(Ending::failed(rej), now_ms);
                    return;
                }
                if cur.phase == Phase::Deferred {
                    self.work = Some(w);
                } else {
                    self.start_download(w, now_ms);
                }
            }
            Phase::Installing => {
                self.work = Some(w);
                self.install(now_ms);
            }
            Phase::Trial { starts } => {
                self.work = Some(w);
                self.trial(starts, now_ms);
            }
            Phase::Committing { previous_version } => {
                self.work = Some(w);
                self.commit(previous_version, now_ms);
            }
            Phase::RollingBack { report } => {
                self.work = Some(w);
                self.roll_back_then(report);
            }
        }
    }

    fn reoffer(&mut self, w: Work, now_ms: u64) {
        // Expired while deferred?
        match self.recheck(&w.manifest, now_ms) {
            Ok(()) => self.offer(w, now_ms),
            Err(rej) => {
                self.work = Some(w);
                self.finish(Ending::failed(rej), now_ms);
            }
        }
    }

    fn offer(&mut self, w: Work, now_ms: u64) {
        let need = w
            .manifest
            .components
            .iter()
            .fold(0u64, |a, c| a.saturating_add(c.size));
        if need > self.cfg.storage_budget {
            let p = self.progress(
                &w.manifest.update_id,
                UpdatePhase::Rejected,
                UpdateError::Storage,
                format!(
                    "the update needs {need} bytes of staging; the budget is {}",
                    self.cfg.storage_budget
                ),
                (0, 0, 0),
                now_ms,
            );
            self.finish_with(p, w.digest);
            return;
        }
        match self.handler.offer(&w.manifest) {
            Decision::Accept => self.start_download(w, now_ms),
            Decision::Defer => {
                info!(update_id = %w.manifest.update_id, "the application deferred the update");
                let saved = self.set_phase(&w.signed, Phase::Deferred);
                self.work = Some(Work {
                    stage: Stage::Deferred { since_ms: now_ms },
                    ..w
                });
                if let Err(e) = saved {
                    warn!(error = %e, "could not journal the deferred update");
                }
                self.report(UpdatePhase::Deferred, now_ms);
            }
            Decision::Decline(reason) => {
                self.work = Some(w);
                self.finish(
                    Ending {
                        phase: UpdatePhase::Rejected,
                        error: UpdateError::Declined,
                        detail: reason,
                    },
                    now_ms,
                );
            }
        }
    }

    fn start_download(&mut self, w: Work, now_ms: u64) {
        let key = w.key();
        if let Err(e) = self.store.clear_staging(Some(&key)) {
            self.work = Some(w);
            self.fail_storage(e.to_string(), now_ms);
            return;
        }
        let n = w.manifest.components.len();
        let mut bitmaps = Vec::with_capacity(n);
        for i in 0..n {
            match self.store.load(&w.staged(i, StagedKind::Bitmap)) {
                Ok(b) => bitmaps.push(b.unwrap_or_default()),
                Err(e) => {
                    self.work = Some(w);
                    self.fail_storage(e.to_string(), now_ms);
                    return;
                }
            }
        }
        let id = w.manifest.update_id.clone();
        let dl = match Download::resume(&id, &w.manifest.components, &bitmaps, self.cfg.settings)
            .or_else(|_| Download::new(&id, &w.manifest.components, self.cfg.settings))
        {
            Ok(dl) => dl,
            Err(e) => {
                self.work = Some(w);
                self.finish(
                    Ending {
                        phase: UpdatePhase::Failed,
                        error: UpdateError::MalformedManifest,
                        detail: e.to_string(),
                    },
                    now_ms,
                );
                return;
            }
        };
        let held = dl.held();
        let saved = self.set_phase(&w.signed, Phase::Downloading);
        self.work = Some(Work {
            stage: Stage::Downloading {
                dl,
                dirty: vec![false; n],
            },
            ..w
        });
        if let Err(e) = saved {
            self.fail_storage(e, now_ms);
            return;
        }
        if held > 0 {
            info!(update_id = %id, held, "download resumed");
        }
        self.report(UpdatePhase::Downloading, now_ms);
        let complete = matches!(&self.work, Some(Work { stage: Stage::Downloading { dl, .. }, .. }) if dl.is_complete());
        if complete {
            self.verify_and_install(now_ms);
        } else {
            self.maybe_request(now_ms);
        }
    }

    /// Syncs the staged chunks, then persists the bitmaps that name them.
    fn flush(&mut self) -> Result<(), String> {
        let Some(w) = &mut self.work else {
            return Ok(());
        };
        let key = w.key();
        let Stage::Downloading { dl, dirty } = &mut w.stage else {
            return Ok(());
        };
        for (i, d) in dirty.iter_mut().enumerate() {
            if !*d {
                continue;
            }
            let file = |kind| Staged {
                key: key.clone(),
                component: i,
                kind,
            };
            self.store
                .sync(&file(StagedKind::Image))
                .map_err(|e| e.to_string())?;
            let bits = dl.bitmap(i).unwrap_or_default();
            let bitmap = file(StagedKind::Bitmap);
            self.store
                .write_at(&bitmap, 0, bits)
                .and_then(|()| self.store.sync(&bitmap))
                .map_err(|e| e.to_string())?;
            *d = false;
        }
        Ok(())
    }

    fn maybe_request(&mut self, now_ms: u64) {
        if !self.connected {
            return;
        }
        let due = matches!(&self.work, Some(Work { stage: Stage::Downloading { dl, .. }, .. }) if dl.request_due(now_ms));
        if !due {
            return;
        }
        if let Err(e) = self.flush() {
            self.fail_storage(e, now_ms);
            return;
        }
        let Some(Work {
            stage: Stage::Downloading { dl, .. },
            ..
        }) = &mut self.work
        else {
            return;
        };
        let progress = dl.progress_due();
        if let Some(req) = dl.next_request(now_ms) {
            self.emit(Output::Request(req));
        }
        if progress {
            self.report(UpdatePhase::Downloading, now_ms);
        }
    }

    fn fail_storage(&mut self, e: String, now_ms: u64) {
        warn!(error = %e, "update storage failed");
        self.finish(
            Ending {
                phase: UpdatePhase::Failed,
                error: UpdateError::Storage,
                detail: e,
            },
            now_ms,
        );
    }

    fn expired(&self, now_ms: u64) -> Option<String> {
        let w = self.work.as_ref()?;
        let now = self.trusted_now(now_ms);
        (now >= w.manifest.expires_at_ms).then(|| {
            format!(
                "manifest expired at {} ms (now {now} ms)",
                w.manifest.expires_at_ms
            )
        })
    }

    fn staged_images(&self) -> Vec<StagedImage> {
        let Some(w) = &self.work else {
            return Vec::new();
        };
        w.manifest
            .components
            .iter()
            .enumerate()
            .map(|(i, c)| StagedImage {
                component: c.name.clone(),
                path: self.store.path(&w.staged(i, StagedKind::Image)),
                size: c.size,
            })
            .collect()
    }

    /// Every chunk is held: whole-image SHA-256, expiry, then install.
    fn verify_and_install(&mut self, now_ms: u64) {
        self.report(UpdatePhase::Verifying, now_ms);
        if let Err(ending) = self.verify_images() {
            self.finish(ending, now_ms);
            return;
        }
        if let Some(detail) = self.expired(now_ms) {
            self.finish(
                Ending {
                    phase: UpdatePhase::Failed,
                    error: UpdateError::Expired,
                    detail,
                },
                now_ms,
            );
            return;
        }
        let signed = self
            .work
            .as_ref()
            .map(|w| w.signed.clone())
            .unwrap_or_default();
        if let Err(e) = self.set_phase(&signed, Phase::Installing) {
            self.fail_storage(e, now_ms);
            return;
        }
        self.install(now_ms);
    }

    fn verify_images(&mut self) -> Result<(), Ending> {
        let Some(w) = &self.work else {
            return Ok(());
        };
        let files: Vec<(Staged, u64, Vec<u8>, String)> = w
            .manifest
            .components
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    w.staged(i, StagedKind::Image),
                    c.size,
                    c.sha256.clone(),
                    c.name.clone(),
                )
            })
            .collect();
        let storage = |e: std::io::Error| Ending {
            phase: UpdatePhase::Failed,
            error: UpdateError::Storage,
            detail: e.to_string(),
        };
        for (file, size, want, name) in files {
            self.store.set_len(&file, size).map_err(storage)?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut at = 0u64;
            loop {
                let n = self.store.read_at(&file, at, &mut buf).map_err(storage)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                at = at.saturating_add(n as u64);
            }
            let got = h.finalize();
            if got.as_slice() != want.as_slice() {
                return Err(Ending {
                    phase: UpdatePhase::Failed,
                    error: UpdateError::DigestMismatch,
                    detail: format!(
                        "component {name}: SHA-256 {} is not the manifest's {}",
                        hex::encode(got),
                        hex::encode(&want)
                    ),
                });
            }
        }
        Ok(())
    }

    /// Runs the install hook (journal: `Installing`), then puts the update on trial.
    fn install(&mut self, now_ms: u64) {
        let Some(w) = &self.work else {
            return;
        };
        let (m, signed) = (w.manifest.clone(), w.signed.clone());
        self.report(UpdatePhase::Installing, now_ms);
        let images = self.staged_images();
        if let Err(e) = self.handler.install(&m, &images) {
            self.fail_and_roll_back(UpdatePhase::Failed, UpdateError::InstallFailed, &e, now_ms);
            return;
        }
        if let Err(e) = self.set_phase(&signed, Phase::Trial { starts: 0 }) {
            self.fail_storage(e, now_ms);
            return;
        }
        if let Err(e) = self.handler.activate(&m) {
            self.fail_and_roll_back(UpdatePhase::Failed, UpdateError::InstallFailed, &e, now_ms);
            return;
        }
        self.trial(0, now_ms);
    }

    /// The update runs on trial: self-test (counted), then commit, or fall back.
    fn trial(&mut self, starts: u32, now_ms: u64) {
        let Some(w) = &self.work else {
            return;
        };
        let signed = w.signed.clone();
        let m = w.manifest.clone();
        if starts >= self.cfg.max_trial_starts {
            let e = HandlerError::msg(format!(
                "the update was not confirmed after {starts} starts on trial"
            ));
            self.fail_and_roll_back(
                UpdatePhase::RolledBack,
                UpdateError::SelfTestFailed,
                &e,
                now_ms,
            );
            return;
        }
        if let Err(e) = self.set_phase(
            &signed,
            Phase::Trial {
                starts: starts.saturating_add(1),
            },
        ) {
            self.fail_storage(e, now_ms);
            return;
        }
        self.report(UpdatePhase::SelfTest, now_ms);
        if let Err(e) = self.handler.self_test(&m) {
            warn!(update_id = %m.update_id, error = %e.report(), "self-test failed; rolling back");
            self.fail_and_roll_back(
                UpdatePhase::RolledBack,
                UpdateError::SelfTestFailed,
                &e,
                now_ms,
            );
            return;
        }
        if let Some(detail) = self.expired(now_ms) {
            let e = HandlerError::msg(detail);
            self.fail_and_roll_back(UpdatePhase::RolledBack, UpdateError::Expired, &e, now_ms);
            return;
        }
        // The sequence is raised in the same journal write that allows the commit.
        let previous_version =
            std::mem::replace(&mut self.journal.running_version, m.version.clone());
        self.journal.installed_sequence = self.journal.installed_sequence.max(m.sequence);
        if let Err(e) = self.set_phase(
            &signed,
            Phase::Committing {
                previous_version: previous_version.clone(),
            },
        ) {
            self.journal.running_version = previous_version;
            self.fail_storage(e, now_ms);
            return;
        }
        self.commit(previous_version, now_ms);
    }

    /// Runs the commit hook (journal: `Committing`, sequence raised).
    fn commit(&mut self, previous_version: String, now_ms: u64) {
        let Some(w) = &self.work else {
            return;
        };
        let m = w.manifest.clone();
        if let Err(e) = self.handler.commit(&m) {
            // The sequence stays raised: this release cannot be retried, a newer one can.
            self.journal.running_version = previous_version;
            self.fail_and_roll_back(UpdatePhase::Failed, UpdateError::InstallFailed, &e, now_ms);
            return;
        }
        info!(update_id = %m.update_id, version = %m.version, "update committed");
        self.finish(
            Ending {
                phase: UpdatePhase::Committed,
                error: UpdateError::Unspecified,
                detail: String::new(),
            },
            now_ms,
        );
    }

    /// Journals the final report with `RollingBack`, runs the rollback hook, then finishes.
    fn fail_and_roll_back(
        &mut self,
        phase: UpdatePhase,
        error: UpdateError,
        e: &HandlerError,
        now_ms: u64,
    ) {
        let Some(w) = &self.work else {
            return;
        };
        let signed = w.signed.clone();
        let p = self.progress(
            &w.manifest.update_id,
            phase,
            error,
            e.report(),
            self.counts(phase),
            now_ms,
        );
        let report = hex::encode(p.encode_to_vec());
        if let Err(e) = self.set_phase(
            &signed,
            Phase::RollingBack {
                report: report.clone(),
            },
        ) {
            warn!(error = %e, "could not journal the rollback");
        }
        self.roll_back_then(report);
    }

    fn roll_back_then(&mut self, report: String) {
        let Some(w) = &self.work else {
            return;
        };
        let (m, digest) = (w.manifest.clone(), w.digest.clone());
        let mut p = hex::decode(&report)
            .ok()
            .and_then(|b| UpdateProgress::decode(b.as_slice()).ok())
            .unwrap_or_default();
        if let Err(e) = self.handler.rollback(&m) {
            p.detail = bounded_detail(&format!(
                "{}; rollback also failed: {}",
                p.detail,
                e.report()
            ));
        }
        p.running_version = self.running_version();
        self.finish_with(p, digest);
    }
}
