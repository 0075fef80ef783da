//! Small file helpers: atomic writes, owner-only secrets, PEM bundles.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};

/// A file operation that failed, with the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct FileError {
    /// What was being done ("reading", "writing", ...).
    pub action: &'static str,
    /// The path concerned.
    pub path: PathBuf,
    /// The underlying error.
    pub source: std::io::Error,
}

impl FileError {
    pub(crate) fn new(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// Writes `data` to `path` atomically (temporary file, fsync, rename), with mode `0600` if
/// `secret`, else `0644`.
pub fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), FileError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| FileError::new("creating", parent, e))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(|e| FileError::new("creating", &tmp, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| FileError::new("writing", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| FileError::new("renaming into", path, e))
}

/// Reads a file to a string.
pub fn read_string(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(|e| FileError::new("reading", path, e))
}

/// Why a PEM file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    /// Reading the file failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The PEM is malformed.
    #[error("{path}: bad PEM: {detail}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        detail: String,
    },
    /// The file has no object of the wanted kind.
    #[error("{path}: no {what} found")]
    Empty {
        /// The file.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
    },
}

/// Every object of type `T` in a PEM file; `what` names it in errors.
fn read_pem_all<T: PemObject>(path: &Path, what: &'static str) -> Result<Vec<T>, PemError> {
    let data = fs::read(path).map_err(|e| FileError::new("reading", path, e))?;
    let all = T::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if all.is_empty() {
        return Err(PemError::Empty {
            path: path.to_owned(),
            what,
        });
    }
    Ok(all)
}

/// Every certificate in a PEM file (a CA bundle may hold several).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    read_pem_all(path, "CERTIFICATE")
}

/// Every CRL in a PEM file.
pub fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, PemError> {
    read_pem_all(path, "X509 CRL")
}
