//! The update agent's files in `STATE_DIR/update/`:
//! * `agent.json`: what the device has installed (sequence, version), the update in progress
//!   (its signed manifest exactly as received, and its phase) and the last final report (sent
//!   again on every connection until the gateway has it). Replaced atomically.
//! * `staging/{i}.img` and `staging/{i}.bitmap`: component `i`'s staged bytes and held-chunk
//!   bitmap. The bitmap is written (and synced) only after the chunks it names are synced, so
//!   after a power loss it never claims a chunk that is not on disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why the agent's files cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct StateError {
    /// The file.
    pub path: PathBuf,
    /// The error.
    pub source: io::Error,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError {
        path: path.to_owned(),
        source,
    }
}

/// The update in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Current {
    /// The encoded SignedManifest as received (hex).
    pub signed_manifest: String,
    /// Its phase (fleet.v1.UpdatePhase as i32).
    pub phase: i32,
}

/// The persisted agent state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AgentState {
    /// Highest manifest sequence ever installed (anti-rollback).
    pub installed_sequence: u64,
    /// Version of the firmware committed last (empty: the factory version).
    pub running_version: String,
    /// The update being worked on.
    pub current: Option<Current>,
    /// The last final report (encoded UpdateProgress, hex) and the SHA-256 (hex) of the
    /// manifest bytes it answers: the same manifest offered again gets this answer again.
    pub last_final: Option<(String, String)>,
}

/// The agent's directory.
#[derive(Debug, Clone)]
pub(crate) struct UpdateDir {
    dir: PathBuf,
}

impl UpdateDir {
    /// `STATE_DIR/update` (created).
    pub(crate) fn open(state_dir: &Path) -> Result<Self, StateError> {
        let dir = state_dir.join("update");
        let staging = dir.join("staging");
        fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        Ok(UpdateDir { dir })
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("agent.json")
    }

    /// The staged image of component `i`.
    pub(crate) fn staged(&self, i: usize) -> PathBuf {
        self.dir.join("staging").join(format!("{i}.img"))
    }

    fn bitmap_path(&self, i: usize) -> PathBuf {
        self.dir.join("staging").join(format!("{i}.bitmap"))
    }

    /// Loads the state (default when there is none). A corrupt file is an error: forgetting
    /// the installed sequence would reopen rollback.
    pub(crate) fn load(&self) -> Result<AgentState, StateError> {
        let path = self.state_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError {
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(e) => Err(StateError { path, source: e }),
        }
    }

    /// Saves the state atomically and durably.
    pub(crate) fn save(&self, state: &AgentState) -> Result<(), StateError> {
        let path = self.state_path();
        let json = serde_json::to_vec(state)
            .map_err(|e| io_err(&path)(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        let tmp = path.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }

    /// The saved bitmap of component `i` (empty when none).
    pub(crate) fn load_bitmap(&self, i: usize) -> Result<Vec<u8>, StateError> {
        let path = self.bitmap_path(i);
        match fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(StateError { path, source: e }),
        }
    }

    /// Opens component `i`'s staging file for writing at offsets.
    pub(crate) fn open_staged(&self, i: usize) -> Result<File, StateError> {
        let path = self.staged(i);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&path))
    }

    /// Syncs the staged bytes, then writes and syncs the bitmap that names them. The bitmap
    /// is written in place: its bits only ever go from 0 to 1, so a torn write leaves a mix of
    /// old and new bits, each naming synced chunks.
    pub(crate) fn persist(&self, i: usize, staged: &File, bitmap: &[u8]) -> Result<(), StateError> {
        staged.sync_data().map_err(io_err(&self.staged(i)))?;
        let path = self.bitmap_path(i);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.write_all_at(bitmap, 0)
            .and_then(|()| f.sync_data())
            .map_err(io_err(&path))
    }

    /// Deletes every staged file.
    pub(crate) fn clear_staging(&self) -> Result<(), StateError> {
        let staging = self.dir.join("staging");
        for entry in fs::read_dir(&staging).map_err(io_err(&staging))? {
            let entry = entry.map_err(io_err(&staging))?;
            fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
        }
        Ok(())
    }
}

/// SHA-256 of a file, streamed.
pub(crate) fn file_sha256(path: &Path) -> Result<[u8; 32], StateError> {
    let f = File::open(path).map_err(io_err(path))?;
    fleet_proto::chunker::sha256_of(f).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn state_and_bitmaps_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let u = UpdateDir::open(dir.path()).unwrap();
        assert_eq!(u.load().unwrap(), AgentState::default());
        let st = AgentState {
            installed_sequence: 7,
            running_version: "1.1".into(),
            current: Some(Current {
                signed_manifest: "00ff".into(),
                phase: 3,
            }),
            last_final: None,
        };
        u.save(&st).unwrap();
        let f = u.open_staged(0).unwrap();
        f.write_all_at(b"abc", 10).unwrap();
        u.persist(0, &f, &[0b101]).unwrap();
        let u = UpdateDir::open(dir.path()).unwrap();
        assert_eq!(u.load().unwrap(), st);
        assert_eq!(u.load_bitmap(0).unwrap(), vec![0b101]);
        assert!(u.load_bitmap(1).unwrap().is_empty());
        u.clear_staging().unwrap();
        assert!(u.load_bitmap(0).unwrap().is_empty());
        fs::write(dir.path().join("update/agent.json"), b"{").unwrap();
        assert!(u.load().is_err());
    }
}
