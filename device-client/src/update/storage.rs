//! Where the update agent keeps its files, behind a trait so that the state machine
//! ([`super::machine`]) never touches a file itself and tests can cut power at any point.
//!
//! The agent needs two kinds of storage:
//! * the **journal**: one small record (installed sequence, the update in progress and its
//!   phase, the last final report), replaced atomically and durably;
//! * **staged files** per update, named by the manifest's digest: each component's image,
//!   written at chunk offsets, and its held-chunk bitmap.
//!
//! What "durable" means is the contract the power-loss tests check: after a power cut, a staged
//! file holds what was last [`Storage::sync`]ed (bytes written since then may be lost, kept or
//! torn), a file created or removed but not synced may or may not exist, and the journal is
//! either the last one saved or, if the cut came during a save, the one before it.
//! [`DirStorage`] keeps that contract with `fsync` on files and on the directory.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Which staged file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Staged {
    /// The update: hex of the first 16 bytes of its manifest's SHA-256.
    pub key: String,
    /// Component index in the manifest.
    pub component: usize,
    /// Image or bitmap.
    pub kind: StagedKind,
}

/// The two files of a staged component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum StagedKind {
    /// The image bytes, written at chunk offsets.
    Image,
    /// The held-chunk bitmap; it only ever names synced chunks.
    Bitmap,
}

impl Staged {
    /// The file's name in the staging directory.
    pub(crate) fn file_name(&self) -> String {
        let ext = match self.kind {
            StagedKind::Image => "img",
            StagedKind::Bitmap => "bitmap",
        };
        format!("{}.{}.{ext}", self.key, self.component)
    }

    /// The update key a staging file name belongs to.
    pub(crate) fn key_of(file_name: &str) -> Option<&str> {
        file_name.split('.').next()
    }
}

/// The agent's storage. Every method may fail; the machine turns a failure into a reported
/// STORAGE error, never a panic.
pub(crate) trait Storage: Send {
    /// The journal, if one was ever saved.
    fn load_journal(&mut self) -> io::Result<Option<Vec<u8>>>;
    /// Replaces the journal atomically and durably.
    fn save_journal(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Writes `data` at `offset` of a staged file (created when absent). Not durable until
    /// [`Storage::sync`].
    fn write_at(&mut self, file: &Staged, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes a staged file's bytes and its directory entry durable.
    fn sync(&mut self, file: &Staged) -> io::Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`; 0 at the end.
    fn read_at(&mut self, file: &Staged, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// A staged file's whole content (`None`: absent).
    fn load(&mut self, file: &Staged) -> io::Result<Option<Vec<u8>>>;
    /// Cuts or extends a staged file to `len` bytes.
    fn set_len(&mut self, file: &Staged, len: u64) -> io::Result<()>;
    /// Removes (durably) every staged file except those of update `keep`.
    fn clear_staging(&mut self, keep: Option<&str>) -> io::Result<()>;
    /// Where a staged file lives, for the application's install hook.
    fn path(&self, file: &Staged) -> PathBuf;
}

/// The journal's file name under `STATE_DIR/update/`.
pub(crate) const JOURNAL_FILE: &str = "journal.json";
/// The journal of earlier versions of this library, read once when there is no journal.
pub(crate) const LEGACY_STATE_FILE: &str = "agent.json";

/// [`Storage`] in `STATE_DIR/update/`: `journal.json` and `staging/`.
#[derive(Debug)]
pub(crate) struct DirStorage {
    dir: PathBuf,
    staging: PathBuf,
    /// Staged files opened so far: a chunk write does not open its file again.
    open: HashMap<Staged, File>,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A whole file, `None` when it does not exist.
fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(at(path, e)),
    }
}

fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl DirStorage {
    /// Opens (creating) `STATE_DIR/update`.
    pub(crate) fn open(state_dir: &Path) -> io::Result<Self> {
        let dir = state_dir.join("update");
        let staging = dir.join("staging");
        fs::create_dir_all(&staging).map_err(|e| at(&staging, e))?;
        Ok(DirStorage {
            dir,
            staging,
            open: HashMap::new(),
        })
    }

    /// The legacy state file, when it exists (for a one-time migration).
    pub(crate) fn load_legacy(&self) -> io::Result<Option<Vec<u8>>> {
        read_optional(&self.dir.join(LEGACY_STATE_FILE))
    }

    /// The staged file, opened (created when absent) the first time it is used.
    fn staged(&mut self, file: &Staged) -> io::Result<&File> {
        if !self.open.contains_key(file) {
            let path = self.path(file);
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| at(&path, e))?;
            self.open.insert(file.clone(), f);
        }
        self.open
            .get(file)
            .ok_or_else(|| io::Error::other("staged file vanished from the cache"))
    }
}

impl Storage for DirStorage {
    fn load_journal(&mut self) -> io::Result<Option<Vec<u8>>> {
        read_optional(&self.dir.join(JOURNAL_FILE))
    }

    fn save_journal(&mut self, bytes: &[u8]) -> io::Result<()> {
        let path = self.dir.join(JOURNAL_FILE);
        let tmp = self.dir.join("journal.json.tmp");
        let mut f = File::create(&tmp).map_err(|e| at(&tmp, e))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| at(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| at(&path, e))?;
        sync_dir(&self.dir).map_err(|e| at(&self.dir, e))
    }

    fn write_at(&mut self, file: &Staged, offset: u64, data: &[u8]) -> io::Result<()> {
        let r = self.staged(file)?.write_all_at(data, offset);
        r.map_err(|e| at(&self.path(file), e))
    }

    fn sync(&mut self, file: &Staged) -> io::Result<()> {
        let r = self.staged(file)?.sync_data();
        r.map_err(|e| at(&self.path(file), e))?;
        sync_dir(&self.staging).map_err(|e| at(&self.staging, e))
    }

    fn read_at(&mut self, file: &Staged, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let path = self.path(file);
        if !path.exists() {
            return Err(at(&path, io::ErrorKind::NotFound.into()));
        }
        let r = self.staged(file)?.read_at(buf, offset);
        r.map_err(|e| at(&path, e))
    }

    fn load(&mut self, file: &Staged) -> io::Result<Option<Vec<u8>>> {
        read_optional(&self.path(file))
    }

    fn set_len(&mut self, file: &Staged, len: u64) -> io::Result<()> {
        let r = self.staged(file)?.set_len(len);
        r.map_err(|e| at(&self.path(file), e))
    }

    fn clear_staging(&mut self, keep: Option<&str>) -> io::Result<()> {
        self.open.retain(|f, _| keep == Some(f.key.as_str()));
        let mut removed = false;
        for entry in fs::read_dir(&self.staging).map_err(|e| at(&self.staging, e))? {
            let entry = entry.map_err(|e| at(&self.staging, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if keep.is_some() && Staged::key_of(&name) == keep {
                continue;
            }
            fs::remove_file(entry.path()).map_err(|e| at(&entry.path(), e))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.staging).map_err(|e| at(&self.staging, e))?;
        }
        Ok(())
    }

    fn path(&self, file: &Staged) -> PathBuf {
        self.staging.join(file.file_name())
    }
}

#[cfg(test)]
pub(crate) mod sim {
    //! A storage that loses power: what was not synced is lost, kept or torn at the cut.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex, MutexGuard};

    use super::*;

    #[derive(Debug, Clone, Default)]
    struct SimFile {
        /// What survives a power cut for sure.
        durable: Option<Vec<u8>>,
        /// What a reader sees now.
        live: Option<Vec<u8>>,
    }

    /// The device's persistent memory, shared between the storage and the simulated
    /// application (whose slots also survive or not).
    #[derive(Debug, Default)]
    pub(crate) struct Disk {
        journal: Option<Vec<u8>>,
        /// A journal save that was cut: it may or may not have landed.
        journal_in_flight: Option<Vec<u8>>,
        files: BTreeMap<String, SimFile>,
        /// Operations done since the last power-up.
        pub ops: u64,
        /// Power is lost when `ops` reaches this.
        pub cut_at: Option<u64>,
        /// Power is off: every operation fails.
        pub dead: bool,
        /// Cuts so far.
        pub cuts: u64,
    }

    /// A handle on the disk, cloned into the storage and the simulated hooks.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct SimDisk(pub Arc<Mutex<Disk>>);

    impl SimDisk {
        pub(crate) fn lock(&self) -> MutexGuard<'_, Disk> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    impl Disk {
        /// Counts one operation; `Err` when power is (now) off.
        pub(crate) fn op(&mut self) -> io::Result<()> {
            if self.dead {
                return Err(io::Error::other("power lost"));
            }
            self.ops += 1;
            if self.cut_at.is_some_and(|c| self.ops >= c) {
                self.dead = true;
                self.cuts += 1;
                return Err(io::Error::other("power lost"));
            }
            Ok(())
        }

        /// Powers the device up again after a cut: every file not synced becomes, byte by
        /// byte, its durable or its live content (chosen by `rng`), or vanishes if it was
        /// never synced and `rng` says so.
        pub(crate) fn power_up(&mut self, rng: &mut impl FnMut() -> u64) {
            if let Some(j) = self.journal_in_flight.take() {
                if rng().is_multiple_of(2) {
                    self.journal = Some(j);
                }
            }
            for f in self.files.values_mut() {
                let settled = match (&f.durable, &f.live) {
                    (Some(d), Some(l)) if d != l => Some(match rng() % 3 {
                        0 => d.clone(),
                        1 => l.clone(),
                        _ => {
                            // Torn: each byte old or new, length either.
                            let len = if rng().is_multiple_of(2) {
                                d.len()
                            } else {
                                l.len()
                            };
                            (0..len)
                                .map(|i| {
                                    let pick = if rng().is_multiple_of(2) {
                                        d.get(i)
                                    } else {
                                        l.get(i)
                                    };
                                    pick.or(d.get(i)).or(l.get(i)).copied().unwrap_or(0)
                                })
                                .collect()
                        }
                    }),
                    (d, l) if d == l => d.clone(),
                    (d, l) => {
                        if rng().is_multiple_of(2) {
                            d.clone()
                        } else {
                            l.clone()
                        }
                    }
                };
                f.durable = settled.clone();
                f.live = settled;
            }
            self.files.retain(|_, f| f.live.is_some());
            self.dead = false;
            self.ops = 0;
            self.cut_at = None;
        }

        /// The journal that survives a cut now (read without an operation).
        pub(crate) fn durable_journal(&self) -> Option<Vec<u8>> {
            self.journal.clone()
        }

        /// How many files' names end with `suffix`.
        pub(crate) fn files_named(&self, suffix: &str) -> usize {
            self.files.keys().filter(|n| n.ends_with(suffix)).count()
        }

        /// A staged file's live content (for the simulated install hook).
        pub(crate) fn read_file(&self, name: &str) -> Option<Vec<u8>> {
            self.files.get(name).and_then(|f| f.live.clone())
        }
    }

    /// [`Storage`] on a [`SimDisk`].
    #[derive(Debug, Clone)]
    pub(crate) struct SimStorage(pub SimDisk);

    impl Storage for SimStorage {
        fn load_journal(&mut self) -> io::Result<Option<Vec<u8>>> {
            let mut d = self.0.lock();
            d.op()?;
            Ok(d.journal.clone())
        }

        fn save_journal(&mut self, bytes: &[u8]) -> io::Result<()> {
            let mut d = self.0.lock();
            let was_dead = d.dead;
            if d.op().is_err() {
                if !was_dead {
                    // Power went during this save: it may or may not have landed.
                    d.journal_in_flight = Some(bytes.to_vec());
                }
                return Err(io::Error::other("power lost"));
            }
            d.journal = Some(bytes.to_vec());
            Ok(())
        }

        fn write_at(&mut self, file: &Staged, offset: u64, data: &[u8]) -> io::Result<()> {
            let mut d = self.0.lock();
            d.op()?;
            let f = d.files.entry(file.file_name()).or_default();
            let live = f.live.get_or_insert_with(Vec::new);
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let end = start + data.len();
            if live.len() < end {
                live.resize(end, 0);
            }
            live[start..end].copy_from_slice(data);
            Ok(())
        }

        fn sync(&mut self, file: &Staged) -> io::Result<()> {
            let mut d = self.0.lock();
            d.op()?;
            let f = d.files.entry(file.file_name()).or_default();
            if f.live.is_none() {
                f.live = Some(Vec::new());
            }
            f.durable = f.live.clone();
            Ok(())
        }

        fn read_at(&mut self, file: &Staged, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
            let mut d = self.0.lock();
            d.op()?;
            let Some(live) = d.files.get(&file.file_name()).and_then(|f| f.live.as_ref()) else {
                return Err(io::ErrorKind::NotFound.into());
            };
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let rest = live.get(start..).unwrap_or_default();
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            Ok(n)
        }

        fn load(&mut self, file: &Staged) -> io::Result<Option<Vec<u8>>> {
            let mut d = self.0.lock();
            d.op()?;
            Ok(d.read_file(&file.file_name()))
        }

        fn set_len(&mut self, file: &Staged, len: u64) -> io::Result<()> {
            let mut d = self.0.lock();
            d.op()?;
            let f = d.files.entry(file.file_name()).or_default();
            let len = usize::try_from(len).map_err(io::Error::other)?;
            f.live.get_or_insert_with(Vec::new).resize(len, 0);
            Ok(())
        }

        fn clear_staging(&mut self, keep: Option<&str>) -> io::Result<()> {
            let mut d = self.0.lock();
            d.op()?;
            d.files
                .retain(|name, _| keep.is_some() && Staged::key_of(name) == keep);
            Ok(())
        }

        fn path(&self, file: &Staged) -> PathBuf {
            PathBuf::from("/sim/staging").join(file.file_name())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dir_storage_keeps_the_journal_and_staged_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DirStorage::open(dir.path()).unwrap();
        assert_eq!(s.load_journal().unwrap(), None);
        s.save_journal(b"{}").unwrap();
        let img = Staged {
            key: "ab".into(),
            component: 0,
            kind: StagedKind::Image,
        };
        let other = Staged {
            key: "cd".into(),
            ..img.clone()
        };
        s.write_at(&img, 4, b"xyz").unwrap();
        s.sync(&img).unwrap();
        s.write_at(&other, 0, b"1").unwrap();
        let mut s = DirStorage::open(dir.path()).unwrap();
        assert_eq!(s.load_journal().unwrap().unwrap(), b"{}");
        assert_eq!(s.load(&img).unwrap().unwrap(), b"\0\0\0\0xyz");
        let mut buf = [0u8; 8];
        assert_eq!(s.read_at(&img, 5, &mut buf).unwrap(), 2);
        s.clear_staging(Some("ab")).unwrap();
        assert!(s.load(&img).unwrap().is_some());
        assert!(s.load(&other).unwrap().is_none());
        s.clear_staging(None).unwrap();
        assert!(s.load(&img).unwrap().is_none());
    }
}
