//! The gateway's durable state: one SQLite file in the data directory, owned by this module.
//!
//! * WAL journal with `synchronous = FULL`: a committed transaction survives a process kill and
//!   a power loss; readers do not block the writer.
//! * Versioned migrations (module `migrations`): applied in order inside one transaction each, the
//!   version kept in `PRAGMA user_version`. A file written by a newer gateway is refused rather
//!   than misread.
//! * Everything that must outlive a restart goes through here (pending commands, last known
//!   device state, the upstream queue, the firmware index, and the MQTT core's persistent
//!   sessions and retained messages).
//! * The MQTT core's writes (module `sessions`) are group-committed by their own thread and
//!   connection (module `session_writer`), so one disk sync covers every write waiting for it.
//!
//! * Two connections write the file: the gateway's own and the MQTT core's session writer.
//!   Every write transaction is `BEGIN IMMEDIATE`, so it waits for the other's commit
//!   (`busy_timeout`); a deferred one that read first would fail at once with SQLITE_BUSY when
//!   the other committed in between.
//!
//! The API is synchronous (rusqlite); async callers use `spawn_blocking` or a store task.

mod commands;
mod images;
mod migrations;
mod session_writer;
mod sessions;
mod shared;
mod status;
mod trust;
mod updates;
mod uplink;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

pub(crate) use commands::{StoredCommand, Submitted};
pub(crate) use images::ImageRow;
pub(crate) use session_writer::SessionWriter;
pub(crate) use shared::SharedStore;
pub(crate) use status::StatusWrite;
pub use status::{DeviceState, StatusOutcome};
pub(crate) use updates::{StoredUpdate, UpdatePut};

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Creating the directory failed.
    #[error("creating {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// SQLite refused (unreadable or corrupt file, disk full, ...).
    #[error("store {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The error.
        source: rusqlite::Error,
    },
    /// The file was written by a newer gateway (a later schema version).
    #[error("store {path} has schema version {found}; this gateway knows up to {known}: refusing to downgrade")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: u32,
        /// The newest this build knows.
        known: u32,
    },
    /// The task running a store operation died (a bug: it panicked).
    #[error("store task failed: {0}")]
    Task(String),
}

/// The open store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// An open write transaction (see [`Store::write`]); each table's module adds its writes.
pub(crate) struct WriteTx<'a> {
    tx: rusqlite::Transaction<'a>,
    path: &'a Path,
}

impl std::fmt::Debug for WriteTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTx")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// File name of the store inside the data directory.
pub const FILE_NAME: &str = "gateway.db";

impl Store {
    /// Opens (creating if needed) `DATA_DIR/gateway.db` and brings its schema up to date.
    pub fn open_in(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Dir {
            path: data_dir.to_owned(),
            source,
        })?;
        Self::open(&data_dir.join(FILE_NAME))
    }

    /// Opens (creating if needed) the store file at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| err(path, e))?;
        let mut store = Store {
            conn,
            path: path.to_owned(),
        };
        store.configure()?;
        migrations::apply(&mut store.conn, path)?;
        Ok(store)
    }

    fn configure(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        // journal_mode answers with the mode in force; anything but WAL is an error worth
        // knowing about (e.g. a filesystem without shared memory).
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| err(&path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(err(
                &path,
                rusqlite::Error::InvalidParameterName(format!("journal_mode is {mode}, not wal")),
            ));
        }
        self.conn
            .execute_batch(
                "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
            )
            .map_err(|e| err(&path, e))
    }

    /// The schema version of the open file.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        migrations::version(&self.conn).map_err(|e| err(&self.path, e))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one write transaction, committed (one disk sync) when it returns `Ok`, rolled
    /// back when it returns an error. Writes to several tables that must be durable together
    /// (a status report and its upward copy) go through one of these.
    pub(crate) fn write<R>(
        &mut self,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(&self.path, e))?;
        let mut w = WriteTx {
            tx,
            path: &self.path,
        };
        let r = f(&mut w)?;
        let WriteTx { tx, path } = w;
        tx.commit().map_err(|e| err(path, e))?;
        Ok(r)
    }

    /// Proves the file takes writes: rewrites the one row of `health_probe` in a committed,
    /// synced transaction like any other write. A read-only file, a full disk or an I/O error
    /// makes it fail.
    pub(crate) fn probe_write(&mut self, now_ms: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO health_probe (id, probed_at_ms) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET probed_at_ms = excluded.probed_at_ms",
                [to_sql(now_ms)],
            )
            .map(|_| ())
            .map_err(|e| err(&self.path, e))
    }

    /// Runs SQLite's own consistency check; `Ok(())` when the file is sound.
    pub fn check_integrity(&self) -> Result<(), StoreError> {
        let verdict: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| err(&self.path, e))?;
        if verdict == "ok" {
            Ok(())
        } else {
            Err(err(
                &self.path,
                rusqlite::Error::InvalidParameterName(verdict),
            ))
        }
    }
}

// SQLite integers are i64; sequences and times are u64 on the wire. Values above i64::MAX are
// stored as their two's complement and read back the same way.
fn to_sql(v: u64) -> i64 {
    v as i64
}

fn from_sql(v: i64) -> u64 {
    v as u64
}

fn err(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_probe_write_commits_and_fails_when_the_file_takes_no_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        s.probe_write(10).unwrap();
        s.probe_write(20).unwrap();
        let at: i64 = s
            .conn
            .query_row("SELECT probed_at_ms FROM health_probe", [], |r| r.get(0))
            .unwrap();
        assert_eq!(at, 20);
        // SQLite refusing writes (as on a read-only file) fails the probe.
        s.conn.execute_batch("PRAGMA query_only = ON").unwrap();
        assert!(s.probe_write(30).is_err());
    }
}
