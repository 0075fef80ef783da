//! The command gate on disk: one JSON file in the device's state directory, replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory), so that after a
//! power loss it holds either the old or the new gate, never a torn one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{CommandGate, GateSnapshot};

/// File name of the journal in the state directory.
pub const FILE_NAME: &str = "commands.json";

/// Why the journal cannot be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a journal (corrupt, or another program's file).
    #[error("{path}: not a command journal: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// The persisted gate.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    /// The journal in `state_dir` (created on first save).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(FILE_NAME),
        }
    }

    /// Loads the gate, or an empty one if there is no journal yet. A corrupt journal is an
    /// error, not an empty gate: forgetting which commands ran could run one twice.
    pub fn load(&self, window: usize) -> Result<CommandGate, JournalError> {
        match fs::read(&self.path) {
            Ok(bytes) => {
                let snapshot: GateSnapshot =
                    serde_json::from_slice(&bytes).map_err(|source| JournalError::Corrupt {
                        path: self.path.clone(),
                        source,
                    })?;
                Ok(CommandGate::from_snapshot(snapshot, window))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CommandGate::new(window)),
            Err(source) => Err(JournalError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Saves the gate durably.
    pub fn save(&self, gate: &CommandGate) -> Result<(), JournalError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| JournalError::Io { path, source }
        };
        let json =
            serde_json::to_vec(&gate.snapshot()).map_err(|source| JournalError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io(dir))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(io(&tmp))?;
        fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
    }
}
