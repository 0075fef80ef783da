//! The outbox on disk: one file per queued report (`SEQUENCE.pb`, the encoded StatusReport)
//! and a counter file, in `STATE_DIR/status/`. Each file is written atomically (temporary
//! file, fsync, rename), so a power loss leaves whole reports only; a report is on disk before
//! `report()` returns, and its file is removed when the gateway acknowledges it.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use fleet_proto::v1::StatusReport;
use fleet_proto::Message;

use super::{Outbox, Pushed};

/// Why the outbox's files cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError {
    let path = path.to_owned();
    move |source| OutboxError::Io { path, source }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), OutboxError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// The persisted outbox.
#[derive(Debug)]
pub struct OutboxStore {
    dir: PathBuf,
    outbox: Outbox,
    /// Files that did not decode at load (left in place, renamed `.bad`), for the caller to log.
    pub unreadable: Vec<PathBuf>,
}

impl OutboxStore {
    /// Opens (creating) `state_dir/status` and restores the outbox from it.
    pub fn open(state_dir: &Path, capacity: usize) -> Result<Self, OutboxError> {
        let dir = state_dir.join("status");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let counter = dir.join("next_sequence");
        let next = fs::read_to_string(&counter)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1);
        let mut reports = Vec::new();
        let mut unreadable = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pb") {
                continue;
            }
            match fs::read(&path)
                .ok()
                .and_then(|b| StatusReport::decode(b.as_slice()).ok())
            {
                Some(r) => reports.push(r),
                None => {
                    let bad = path.with_extension("bad");
                    let _ = fs::rename(&path, &bad);
                    unreadable.push(bad);
                }
            }
        }
        let outbox = Outbox::restore(capacity, next, reports);
        let mut store = Self {
            dir,
            outbox,
            unreadable,
        };
        // Reports restore() dropped for capacity must not come back at the next open.
        store.remove_files_not_pending()?;
        Ok(store)
    }

    fn file(&self, sequence: u64) -> PathBuf {
        self.dir.join(format!("{sequence:020}.pb"))
    }

    fn remove_files_not_pending(&mut self) -> Result<(), OutboxError> {
        let keep: std::collections::HashSet<PathBuf> = self
            .outbox
            .pending()
            .map(|r| self.file(r.sequence))
            .collect();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            if path.extension().and_then(|e| e.to_str()) == Some("pb") && !keep.contains(&path) {
                fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }

    /// Queues a report durably; returns it as numbered and what happened.
    pub fn push(&mut self, report: StatusReport) -> Result<(StatusReport, Pushed), OutboxError> {
        let (report, pushed) = self.outbox.push(report);
        // Counter first: a crash after it leaves a gap, never a reused sequence.
        write_atomic(
            &self.dir.join("next_sequence"),
            self.outbox.next_sequence().to_string().as_bytes(),
        )?;
        write_atomic(&self.file(report.sequence), &report.encode_to_vec())?;
        if let Pushed::QueuedDroppingOldest { dropped, .. } = pushed {
            let old = self.file(dropped);
            fs::remove_file(&old).map_err(io(&old))?;
        }
        Ok((report, pushed))
    }

    /// The gateway acknowledged `sequence`: it and older reports leave the outbox and the disk.
    pub fn acknowledge(&mut self, sequence: u64) -> Result<(), OutboxError> {
        for s in self.outbox.acknowledge(sequence) {
            let f = self.file(s);
            match fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&f)(e)),
            }
        }
        Ok(())
    }

    /// The outbox in memory.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }
}
