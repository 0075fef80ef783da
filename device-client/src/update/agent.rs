//! The update agent's driver: a thread of its own that runs the state machine
//! ([`super::machine`]) over the state directory, fed by the connection driver through a
//! bounded inbox.
//!
//! * Everything slow (signature checks, SHA-256 of whole images, file writes, the
//!   application's hooks) runs on this thread, never on the async executor.
//! * The inbox holds the newest manifest (a newer one replaces an unread one), the connection
//!   state, and chunks: chunks arriving while the agent expects none (no download, or a hook
//!   running) or beyond [`MAX_QUEUED_CHUNKS`] / [`MAX_QUEUED_CHUNK_BYTES`] are dropped unread
//!   and counted; the download asks again for what it misses.
//! * [`AgentHandle::stop`] returns once the thread is done with the step it was in, so a new
//!   client on the same state directory never races the old one's file work.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use fleet_proto::trust::TrustedRoot;
use fleet_proto::v1::UpdateProgress;
use fleet_proto::Message;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::download::DownloadSettings;
use super::install::UpdateHandler;
use super::machine::{Machine, MachineConfig, Output, DEFAULT_MAX_TRIAL_STARTS};
use super::storage::DirStorage;

/// How often the agent looks for due requests and deferred offers.
const TICK: Duration = Duration::from_millis(100);
/// Most chunks waiting for the agent.
pub(crate) const MAX_QUEUED_CHUNKS: usize = 64;
/// Most chunk bytes waiting for the agent.
pub(crate) const MAX_QUEUED_CHUNK_BYTES: usize = 8 << 20;

/// What the agent is configured with.
#[derive(Clone)]
pub(crate) struct UpdateConfig {
    /// The device's root of trust at start (`None`: every manifest is refused).
    pub root: Option<TrustedRoot>,
    /// The application's hooks.
    pub handler: Arc<dyn UpdateHandler>,
    /// Download tuning.
    pub settings: DownloadSettings,
    /// Sequence of the firmware the device shipped with (before any update).
    pub factory_sequence: u64,
    /// A deferred offer is put to the application again after this long.
    pub defer_retry: Duration,
    /// Most bytes the staged images of one update may take.
    pub storage_budget: u64,
}

impl std::fmt::Debug for UpdateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateConfig")
            .field("root_version", &self.root.as_ref().map(|r| r.version))
            .field("settings", &self.settings)
            .field("factory_sequence", &self.factory_sequence)
            .finish_non_exhaustive()
    }
}

/// What the agent asks the connection driver to publish.
#[derive(Debug)]
pub(crate) enum AgentOut {
    /// An encoded ChunkRequest (QoS 0).
    Request(Vec<u8>),
    /// A progress report (QoS 1).
    Progress(UpdateProgress),
}

#[derive(Default)]
struct Pending {
    root: Option<TrustedRoot>,
    manifest: Option<Vec<u8>>,
    chunks: VecDeque<Vec<u8>>,
    chunk_bytes: usize,
    connected: Option<bool>,
    stop: bool,
}

#[derive(Default)]
struct Inbox {
    pending: Mutex<Pending>,
    ready: Condvar,
    wants_chunks: AtomicBool,
    dropped: AtomicU64,
    /// The machine's clock floor, for the rest of the client's trust decisions.
    time_floor_ms: AtomicU64,
    /// Withdrawals not acted on (empty, unsigned, foreign, for another offer).
    withdrawals_ignored: AtomicU64,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The connection driver's side of the agent.
pub(crate) struct AgentHandle {
    inbox: Arc<Inbox>,
    stopped: watch::Receiver<bool>,
}

impl AgentHandle {
    /// Starts the agent thread on `state_dir`, holding `owner` (a handle on the directory's
    /// lock) until it ends. The machine's start (journal read, a restart's pending step) runs
    /// on that thread too.
    pub(crate) fn spawn(
        cfg: UpdateConfig,
        device_class: String,
        factory_version: String,
        state_dir: &std::path::Path,
        owner: std::fs::File,
        out: mpsc::UnboundedSender<AgentOut>,
        reports: watch::Sender<Option<UpdateProgress>>,
    ) -> std::io::Result<Self> {
        let store = DirStorage::open(state_dir)?;
        let legacy = store.load_legacy().unwrap_or_else(|e| {
            warn!(error = %e, "the previous update state file cannot be read");
            None
        });
        let mcfg = MachineConfig {
            root: cfg.root,
            device_class,
            factory_version,
            factory_sequence: cfg.factory_sequence,
            settings: cfg.settings,
            defer_retry_ms: u64::try_from(cfg.defer_retry.as_millis()).unwrap_or(u64::MAX),
            max_trial_starts: DEFAULT_MAX_TRIAL_STARTS,
            storage_budget: cfg.storage_budget,
            build_time_ms: super::machine::build_time_ms(),
        };
        let inbox = Arc::new(Inbox::default());
        let (stopped_tx, stopped) = watch::channel(false);
        let handler = cfg.handler;
        let thread_inbox = inbox.clone();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("update-agent".into())
            .spawn(move || {
                let _entered = span.enter();
                let mut machine =
                    Machine::start(mcfg, store, handler, legacy, fleet_proto::time::now_ms());
                // Reports and requests leave the moment they are made (a self-test's report
                // while the self-test runs).
                reports.send_replace(machine.last_report().cloned());
                machine.set_sink(Box::new(move |o| match o {
                    Output::Request(r) => {
                        let _ = out.send(AgentOut::Request(r.encode_to_vec()));
                    }
                    Output::Report(p) => {
                        reports.send_replace(Some(p.clone()));
                        let _ = out.send(AgentOut::Progress(p));
                    }
                }));
                run(machine, &thread_inbox);
                // The state directory's lock (this handle on it) goes with the thread.
                drop(owner);
                let _ = stopped_tx.send(true);
                debug!("update agent stopped");
            })?;
        Ok(AgentHandle { inbox, stopped })
    }

    /// The device accepted a new root (already persisted): manifests from now on are checked
    /// against it.
    pub(crate) fn root(&self, root: TrustedRoot) {
        self.inbox.lock().root = Some(root);
        self.inbox.ready.notify_one();
    }

    /// The floor under the agent's clock (build time, newest issue time accepted).
    pub(crate) fn time_floor_ms(&self) -> u64 {
        self.inbox.time_floor_ms.load(Ordering::Relaxed)
    }

    /// Withdrawals seen and not acted on, since start.
    pub(crate) fn withdrawals_ignored(&self) -> u64 {
        self.inbox.withdrawals_ignored.load(Ordering::Relaxed)
    }

    /// A (retained) manifest, or a signed withdrawal, arrived.
    pub(crate) fn manifest(&self, bytes: Vec<u8>) {
        self.inbox.lock().manifest = Some(bytes);
        self.inbox.ready.notify_one();
    }

    /// A chunk arrived: queued if the agent expects chunks and has room, else dropped.
    pub(crate) fn chunk(&self, bytes: Vec<u8>) {
        if !self.inbox.wants_chunks.load(Ordering::Relaxed) {
            self.inbox.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut p = self.inbox.lock();
        if p.chunks.len() >= MAX_QUEUED_CHUNKS
            || p.chunk_bytes.saturating_add(bytes.len()) > MAX_QUEUED_CHUNK_BYTES
        {
            drop(p);
            self.inbox.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        p.chunk_bytes += bytes.len();
        p.chunks.push_back(bytes);
        drop(p);
        self.inbox.ready.notify_one();
    }

    /// The connection went up or down.
    pub(crate) fn connected(&self, up: bool) {
        self.inbox.lock().connected = Some(up);
        self.inbox.ready.notify_one();
    }

    /// Chunks dropped unread so far.
    pub(crate) fn chunks_dropped(&self) -> u64 {
        self.inbox.dropped.load(Ordering::Relaxed)
    }

    /// Asks the agent to stop after its current step, and waits until it has.
    pub(crate) async fn stop(&self) {
        self.inbox.lock().stop = true;
        self.inbox.ready.notify_one();
        let mut stopped = self.stopped.clone();
        let _ = stopped.wait_for(|s| *s).await;
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.inbox.lock().stop = true;
        self.inbox.ready.notify_one();
    }
}

fn run(mut machine: Machine<DirStorage>, inbox: &Inbox) {
    loop {
        inbox
            .wants_chunks
            .store(machine.wants_chunks(), Ordering::Relaxed);
        inbox
            .time_floor_ms
            .store(machine.time_floor_ms(), Ordering::Relaxed);
        inbox
            .withdrawals_ignored
            .store(machine.withdrawals_ignored(), Ordering::Relaxed);
        let work = {
            let mut p = inbox.lock();
            if !p.stop
                && p.root.is_none()
                && p.manifest.is_none()
                && p.chunks.is_empty()
                && p.connected.is_none()
            {
                p = inbox
                    .ready
                    .wait_timeout(p, TICK)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if p.stop {
                return;
            }
            let chunks = std::mem::take(&mut p.chunks);
            p.chunk_bytes = 0;
            (p.root.take(), p.connected.take(), p.manifest.take(), chunks)
        };
        let (root, connected, manifest, chunks) = work;
        let now = fleet_proto::time::now_ms();
        // A root first: a manifest that came with it is judged by it.
        if let Some(r) = root {
            machine.set_root(r, now);
        }
        match connected {
            Some(true) => machine.connected(now),
            Some(false) => machine.disconnected(),
            None => {}
        }
        if let Some(m) = manifest {
            machine.manifest(&m, now);
        }
        for c in chunks {
            if !machine.wants_chunks() {
                // A hook is about to run or the download ended: the rest is not read.
                inbox.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            machine.chunk(&c, fleet_proto::time::now_ms());
        }
        machine.tick(fleet_proto::time::now_ms());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn handle() -> (AgentHandle, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        // A handle without a thread: only the inbox is exercised.
        let inbox = Arc::new(Inbox::default());
        let (_tx, stopped) = watch::channel(true);
        (AgentHandle { inbox, stopped }, dir)
    }

    /// D5: chunks nobody asked for (no download, or a hook running) are dropped unread, and
    /// while a download runs the inbox holds at most MAX_QUEUED_CHUNKS / MAX_QUEUED_CHUNK_BYTES:
    /// a flood of 4 MiB garbage chunks costs at most 8 MiB here, whatever its length.
    #[test]
    fn unrequested_and_excess_chunks_are_dropped_unread() {
        let (h, _dir) = handle();
        let garbage = vec![0xA5u8; 4 << 20];
        for _ in 0..100 {
            h.chunk(garbage.clone());
        }
        assert_eq!(h.chunks_dropped(), 100);
        assert_eq!(h.inbox.lock().chunk_bytes, 0);

        h.inbox.wants_chunks.store(true, Ordering::Relaxed);
        for _ in 0..100 {
            h.chunk(garbage.clone());
        }
        let p = h.inbox.lock();
        assert_eq!(p.chunks.len(), 2, "two 4 MiB chunks fit in 8 MiB");
        assert!(p.chunk_bytes <= MAX_QUEUED_CHUNK_BYTES);
        drop(p);
        assert_eq!(h.chunks_dropped(), 198);
        for _ in 0..200 {
            h.chunk(vec![1; 16]);
        }
        assert!(h.inbox.lock().chunks.len() <= MAX_QUEUED_CHUNKS);
    }

    /// A newer manifest replaces one the agent has not read yet: a burst costs one.
    #[test]
    fn the_newest_manifest_wins() {
        let (h, _dir) = handle();
        for i in 0..1000u32 {
            h.manifest(i.to_be_bytes().to_vec());
        }
        assert_eq!(h.inbox.lock().manifest, Some(999u32.to_be_bytes().to_vec()));
    }
}
