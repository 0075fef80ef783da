//! Key files of the fleet's chain of trust, and the first root made from them.
//!
//! ```text
//! DIR/root-1.key .pub ...      root role keys (private keys 0600): sign roots, keep offline
//! DIR/updates-1.key .pub ...   updates role keys: sign manifests
//! DIR/commands-1.key .pub ...  commands role keys: sign commands and update withdrawals
//! DIR/root.bin                 the SignedRoot (version 1), signed by a threshold of root keys
//! ```
//!
//! Keys are Ed25519, PKCS#8 PEM (private) and SubjectPublicKeyInfo PEM (public). Devices are
//! provisioned with `root.bin`; everything after it is signed by the keys, never by this tool.

use std::path::{Path, PathBuf};

use fleet_proto::signing::{KeyError, UpdateSigner};
use fleet_proto::trust::{build, ROOT_FORMAT_VERSION};
use fleet_proto::v1;
use prost::Message as _;

use crate::files::{read_string, write_atomic, FileError};

/// Why a trust directory could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustFilesError {
    /// Reading or writing a file failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// A key could not be made, written or read.
    #[error("key: {0}")]
    Key(#[from] KeyError),
    /// The directory already holds a root.
    #[error("{0} already holds a root of trust")]
    Exists(PathBuf),
    /// A role's numbers are impossible.
    #[error("role {role}: threshold {threshold} of {keys} keys (1 <= threshold <= keys <= 16)")]
    Threshold {
        /// The role.
        role: &'static str,
        /// Its threshold.
        threshold: u32,
        /// Its number of keys.
        keys: u32,
    },
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] fleet_proto::signing::SignError),
}

/// How many keys each role gets and how many must sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustSpec {
    /// Root keys (n) and threshold (k).
    pub root: (u32, u32),
    /// Updates keys and threshold.
    pub updates: (u32, u32),
    /// Commands keys and threshold.
    pub commands: (u32, u32),
    /// Expiry of the first root, ms since 1970.
    pub expires_at_ms: u64,
}

impl TrustSpec {
    /// The development defaults: root 2 of 3, updates 1 of 1, commands 1 of 1, a year.
    pub fn development(now_ms: u64) -> Self {
        Self {
            root: (3, 2),
            updates: (1, 1),
            commands: (1, 1),
            expires_at_ms: now_ms.saturating_add(365 * 24 * 3600 * 1000),
        }
    }
}

/// The files of a trust directory.
#[derive(Debug, Clone)]
pub struct TrustFiles {
    dir: PathBuf,
}

impl TrustFiles {
    /// A trust directory at `dir` (nothing is read yet).
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first root, as provisioned to devices.
    pub fn root_path(&self) -> PathBuf {
        self.dir.join("root.bin")
    }

    /// The private key file of the `n`-th (1-based) key of `role` ("root", "updates",
    /// "commands").
    pub fn key_path(&self, role: &str, n: u32) -> PathBuf {
        self.dir.join(format!("{role}-{n}.key"))
    }

    /// The public key file of the `n`-th key of `role`.
    pub fn pub_path(&self, role: &str, n: u32) -> PathBuf {
        self.dir.join(format!("{role}-{n}.pub"))
    }

    /// Loads the `n`-th private key of `role`.
    pub fn signer(&self, role: &str, n: u32) -> Result<UpdateSigner, TrustFilesError> {
        let pem = read_string(&self.key_path(role, n))?;
        Ok(UpdateSigner::from_pkcs8_pem(&pem)?)
    }

    /// Creates the keys `spec` asks for and the first root, signed by the first `k` root keys.
    /// `updates`, if given, is used as the first updates key instead of a new one (a PKI that
    /// already has an update-signing key keeps it).
    pub fn create(
        dir: &Path,
        spec: &TrustSpec,
        updates: Option<&UpdateSigner>,
    ) -> Result<TrustFiles, TrustFilesError> {
        let files = TrustFiles::at(dir);
        if files.root_path().exists() {
            return Err(TrustFilesError::Exists(files.root_path()));
        }
        for (role, (n, k)) in [
            ("root", spec.root),
            ("updates", spec.updates),
            ("commands", spec.commands),
        ] {
            if k == 0 || k > n || n > 16 {
                return Err(TrustFilesError::Threshold {
                    role,
                    threshold: k,
                    keys: n,
                });
            }
        }
        let make = |role: &str, n: u32| -> Result<Vec<UpdateSigner>, TrustFilesError> {
            (1..=n)
                .map(|i| {
                    let key = match (role, i, updates) {
                        ("updates", 1, Some(u)) => {
                            UpdateSigner::from_pkcs8_pem(&u.to_pkcs8_pem()?)?
                        }
                        _ => UpdateSigner::generate(),
                    };
                    write_atomic(
                        &files.key_path(role, i),
                        key.to_pkcs8_pem()?.as_bytes(),
                        true,
                    )?;
                    write_atomic(
                        &files.pub_path(role, i),
                        key.public_key_pem()?.as_bytes(),
                        false,
                    )?;
                    Ok(key)
                })
                .collect()
        };
        let root_keys = make("root", spec.root.0)?;
        let updates_keys = make("updates", spec.updates.0)?;
        let commands_keys = make("commands", spec.commands.0)?;
        let vk = |keys: &[UpdateSigner]| {
            keys.iter()
                .map(UpdateSigner::verifying_key)
                .collect::<Vec<_>>()
        };
        let root = v1::Root {
            format_version: ROOT_FORMAT_VERSION,
            version: 1,
            expires_at_ms: spec.expires_at_ms,
            root: Some(build::role(&vk(&root_keys), spec.root.1)),
            updates: Some(build::role(&vk(&updates_keys), spec.updates.1)),
            commands: Some(build::role(&vk(&commands_keys), spec.commands.1)),
        };
        let mut signed = build::encode(&root);
        for key in root_keys.iter().take(spec.root.1 as usize) {
            build::add_signature(key, &mut signed)?;
        }
        // The root last: its presence marks a complete directory.
        write_atomic(&files.root_path(), &signed.encode_to_vec(), false)?;
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::trust::TrustedRoot;

    #[test]
    fn creates_keys_and_a_first_root_devices_accept() {
        let tmp = tempfile::tempdir().unwrap();
        let updates = UpdateSigner::generate();
        let spec = TrustSpec::development(1_000);
        let files = TrustFiles::create(tmp.path(), &spec, Some(&updates)).unwrap();
        let root = TrustedRoot::provisioned(&std::fs::read(files.root_path()).unwrap()).unwrap();
        assert_eq!((root.version, root.root.threshold()), (1, 2));
        assert_eq!(root.root.key_ids().count(), 3);
        assert!(root.updates.key_ids().any(|id| id == updates.key_id()));
        let commands = files.signer("commands", 1).unwrap();
        assert!(root.commands.key_ids().any(|id| id == commands.key_id()));
        // Never over an existing root; impossible thresholds refused.
        assert!(matches!(
            TrustFiles::create(tmp.path(), &spec, None),
            Err(TrustFilesError::Exists(_))
        ));
        let other = tempfile::tempdir().unwrap();
        let bad = TrustSpec {
            root: (2, 3),
            ..spec
        };
        assert!(matches!(
            TrustFiles::create(other.path(), &bad, None),
            Err(TrustFilesError::Threshold { role: "root", .. })
        ));
    }
}
