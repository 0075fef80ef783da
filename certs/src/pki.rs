//! A development PKI kept in one directory: the fleet CA, issued certificates, the CRL and the
//! update-signing key, with an index of what was issued and revoked.
//!
//! ```text
//! DIR/ca.crt ca.key            fleet CA (key 0600)
//! DIR/crl.pem                  CRL signed by the CA, rewritten on every revocation
//! DIR/index.json               issued certificates: id, role, serial, files, revocation
//! DIR/{role}s/{id}.crt .key    leaf certificates (keys 0600), e.g. devices/dev-0001.crt
//! DIR/update-signing.key .pub  Ed25519 update-authority key (private key 0600)
//! DIR/trust/                   the chain of trust: root keys (2 of 3), updates key (the
//!                              update-signing key), commands key, and root.bin (version 1)
//! ```
//!
//! Ids are unique across roles (an id is an MQTT client id). The CLI is single-user: two
//! `certs` processes must not change the same directory at once.

use std::path::{Path, PathBuf};

use fleet_proto::signing::{KeyError, UpdateSigner};
use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::files::{read_string, write_atomic, FileError};
use crate::identity::{Identity, Role};
use crate::profile::{self, Issued, ProfileError, ServerNames, Validity};
use crate::trust::{TrustFiles, TrustSpec};

/// How long a CRL is declared valid (`next_update`). Revocations rewrite it earlier.
pub const CRL_VALIDITY_DAYS: i64 = 365;

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// `init` on a directory that already has a CA.
    #[error("{0} already holds a PKI (ca.crt exists); use another directory or remove it")]
    AlreadyInitialised(PathBuf),
    /// The CA certificate or key cannot be loaded.
    #[error("cannot load the CA from {path}: {detail}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The index is not valid JSON of the expected shape.
    #[error("{path}: bad index: {source}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The id already has a valid (unrevoked) certificate.
    #[error("{0} already has a valid certificate ({1}); revoke it first")]
    AlreadyIssued(String, Role),
    /// No certificate was ever issued to this id.
    #[error("no certificate was issued to {0:?}")]
    UnknownId(String),
    /// The id's certificate is already revoked.
    #[error("{0:?} is already revoked")]
    AlreadyRevoked(String),
    /// Making a certificate failed.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// Making the CRL failed.
    #[error("signing the CRL failed: {0}")]
    Crl(rcgen::Error),
    /// The signing key could not be made or written.
    #[error("update-signing key: {0}")]
    SigningKey(#[from] KeyError),
    /// The trust directory could not be made.
    #[error("chain of trust: {0}")]
    Trust(#[from] crate::trust::TrustFilesError),
}

/// One issued certificate in the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The holder's id.
    pub id: String,
    /// The holder's role.
    pub role: Role,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// Certificate file, relative to the PKI directory.
    pub cert: PathBuf,
    /// Key file, relative to the PKI directory.
    pub key: PathBuf,
    /// When it was revoked, Unix seconds.
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Index {
    /// Last CRL number used.
    crl_number: u64,
    entries: Vec<Entry>,
}

/// Options of [`Pki::init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    /// Subject CN of the CA.
    pub ca_name: String,
    /// Number of device certificates, named `dev-0001`, `dev-0002`, ...
    pub devices: u32,
    /// Id of the gateway certificate.
    pub gateway_id: String,
    /// Names of the gateway's server certificate.
    pub gateway_names: ServerNames,
    /// Id of the service certificate.
    pub service_id: String,
    /// Validity of leaf certificates, in days.
    pub leaf_days: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            ca_name: "Fleet Development CA".into(),
            devices: 3,
            gateway_id: "gw-0001".into(),
            gateway_names: ServerNames::local(),
            service_id: "svc-0001".into(),
            leaf_days: 365,
        }
    }
}

/// The id of the n-th generated device (1-based): `dev-0001`.
pub fn device_id(n: u32) -> String {
    format!("dev-{n:04}")
}

/// An open PKI directory.
pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    index: Index,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Path of the CA certificate in `dir`.
    pub fn ca_cert_path(dir: &Path) -> PathBuf {
        dir.join("ca.crt")
    }

    /// Creates a PKI in `dir`: CA, empty CRL, update-signing key, then the gateway, service and
    /// device certificates `opts` asks for.
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<Pki, PkiError> {
        if Self::ca_cert_path(dir).exists() {
            return Err(PkiError::AlreadyInitialised(dir.to_owned()));
        }
        let (ca, issuer) = profile::new_ca(&opts.ca_name, Validity::days_from_now(3650))?;
        write_atomic(&dir.join("ca.key"), ca.key_pem.as_bytes(), true)?;
        let signer = UpdateSigner::generate();
        write_atomic(
            &dir.join("update-signing.key"),
            signer.to_pkcs8_pem()?.as_bytes(),
            true,
        )?;
        write_atomic(
            &dir.join("update-signing.pub"),
            signer.public_key_pem()?.as_bytes(),
            false,
        )?;
        let mut pki = Pki {
            dir: dir.to_owned(),
            issuer,
            index: Index::default(),
        };
        pki.save_index()?;
        pki.write_crl()?;
        let now_ms = u64::try_from(OffsetDateTime::now_utc().unix_timestamp())
            .unwrap_or(0)
            .saturating_mul(1000);
        TrustFiles::create(
            &dir.join("trust"),
            &TrustSpec::development(now_ms),
            Some(&signer),
        )?;
        // The CA certificate last: its presence marks a complete PKI.
        write_atomic(&Self::ca_cert_path(dir), ca.cert_pem.as_bytes(), false)?;

        let leaf = Validity::days_from_now(opts.leaf_days);
        pki.issue(
            &Identity::new(Role::Gateway, &opts.gateway_id)?,
            leaf,
            &opts.gateway_names,
        )?;
        pki.issue(
            &Identity::new(Role::Service, &opts.service_id)?,
            leaf,
            &ServerNames::default(),
        )?;
        for n in 1..=opts.devices {
            pki.issue(
                &Identity::new(Role::Device, device_id(n))?,
                leaf,
                &ServerNames::default(),
            )?;
        }
        Ok(pki)
    }

    /// Opens an existing PKI directory.
    pub fn open(dir: &Path) -> Result<Pki, PkiError> {
        let ca_path = Self::ca_cert_path(dir);
        let key_path = dir.join("ca.key");
        let ca_err = |path: &Path, detail: String| PkiError::Ca {
            path: path.to_owned(),
            detail,
        };
        let key = KeyPair::from_pem(&read_string(&key_path)?)
            .map_err(|e| ca_err(&key_path, e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&read_string(&ca_path)?, key)
            .map_err(|e| ca_err(&ca_path, e.to_string()))?;
        let index_path = dir.join("index.json");
        let index =
            serde_json::from_str(&read_string(&index_path)?).map_err(|source| PkiError::Index {
                path: index_path,
                source,
            })?;
        Ok(Pki {
            dir: dir.to_owned(),
            issuer,
            index,
        })
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CRL file.
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    /// The update-signing private key file.
    pub fn signing_key_path(&self) -> PathBuf {
        self.dir.join("update-signing.key")
    }

    /// The update-signing public key file (what devices trust).
    pub fn signing_pub_path(&self) -> PathBuf {
        self.dir.join("update-signing.pub")
    }

    /// The chain of trust's key files and first root (`DIR/trust`).
    pub fn trust(&self) -> TrustFiles {
        TrustFiles::at(&self.dir.join("trust"))
    }

    /// Everything issued so far, in issue order.
    pub fn entries(&self) -> &[Entry] {
        &self.index.entries
    }

    /// The newest entry for `id`.
    pub fn entry(&self, id: &str) -> Option<&Entry> {
        self.index.entries.iter().rev().find(|e| e.id == id)
    }

    /// Absolute path of an entry's certificate.
    pub fn cert_path(&self, entry: &Entry) -> PathBuf {
        self.dir.join(&entry.cert)
    }

    /// Absolute path of an entry's key.
    pub fn key_path(&self, entry: &Entry) -> PathBuf {
        self.dir.join(&entry.key)
    }

    /// Issues a certificate for `identity` and writes it (and its key) into the directory.
    /// Refused while the id holds an unrevoked certificate.
    pub fn issue(
        &mut self,
        identity: &Identity,
        validity: Validity,
        server: &ServerNames,
    ) -> Result<Entry, PkiError> {
        if let Some(e) = self.entry(&identity.id).filter(|e| e.revoked_at.is_none()) {
            return Err(PkiError::AlreadyIssued(e.id.clone(), e.role));
        }
        let issued: Issued = profile::new_leaf(identity, validity, server, &self.issuer)?;
        let sub = PathBuf::from(format!("{}s", identity.role));
        let entry = Entry {
            id: identity.id.clone(),
            role: identity.role,
            serial: hex::encode(&issued.serial),
            not_after: validity.not_after.unix_timestamp(),
            cert: sub.join(format!("{}.crt", identity.id)),
            key: sub.join(format!("{}.key", identity.id)),
            revoked_at: None,
        };
        write_atomic(&self.key_path(&entry), issued.key_pem.as_bytes(), true)?;
        write_atomic(&self.cert_path(&entry), issued.cert_pem.as_bytes(), false)?;
        self.index.entries.push(entry.clone());
        self.save_index()?;
        Ok(entry)
    }

    /// Revokes the current certificate of `id` and rewrites the CRL.
    pub fn revoke(&mut self, id: &str) -> Result<Entry, PkiError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let entry = self
            .index
            .entries
            .iter_mut()
            .rev()
            .find(|e| e.id == id)
            .ok_or_else(|| PkiError::UnknownId(id.to_owned()))?;
        if entry.revoked_at.is_some() {
            return Err(PkiError::AlreadyRevoked(id.to_owned()));
        }
        entry.revoked_at = Some(now);
        let entry = entry.clone();
        self.write_crl()?;
        self.save_index()?;
        Ok(entry)
    }

    /// Signs a fresh CRL listing every revoked serial, with the next CRL number.
    pub fn write_crl(&mut self) -> Result<PathBuf, PkiError> {
        self.write_crl_until(OffsetDateTime::now_utc() + Duration::days(CRL_VALIDITY_DAYS))
    }

    /// Like [`Pki::write_crl`], declaring `next_update` as the time the next CRL is due (in the
    /// past, it makes a stale CRL: for testing how relying parties treat one).
    pub fn write_crl_until(&mut self, next_update: OffsetDateTime) -> Result<PathBuf, PkiError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = self
            .index
            .entries
            .iter()
            .filter_map(|e| {
                let at = e.revoked_at?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&hex::decode(&e.serial).ok()?),
                    revocation_time: OffsetDateTime::from_unix_timestamp(at).unwrap_or(now),
                    reason_code: Some(RevocationReason::Unspecified),
                    invalidity_date: None,
                })
            })
            .collect();
        self.index.crl_number += 1;
        let params = CertificateRevocationListParams {
            this_update: now.min(next_update - Duration::seconds(1)),
            next_update,
            crl_number: SerialNumber::from(self.index.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(PkiError::Crl)?;
        let pem = crl.pem().map_err(PkiError::Crl)?;
        let path = self.crl_path();
        write_atomic(&path, pem.as_bytes(), false)?;
        self.save_index()?;
        Ok(path)
    }

    fn save_index(&self) -> Result<(), PkiError> {
        let path = self.dir.join("index.json");
        let json = serde_json::to_vec_pretty(&self.index).map_err(|source| PkiError::Index {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &json, false)?;
        Ok(())
    }

    /// Signs a certificate for `identity` without writing it or recording it in the index:
    /// for load generators that need thousands of identities in memory.
    pub fn sign_unrecorded(
        &self,
        identity: &Identity,
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        Ok(profile::new_leaf(
            identity,
            validity,
            &ServerNames::default(),
            &self.issuer,
        )?)
    }

    /// Issues a certificate without the fleet SAN URI (CN only), for CN-fallback setups and
    /// tests; it is not recorded in the index.
    pub fn issue_cn_only(&self, cn: &str, validity: Validity) -> Result<Issued, PkiError> {
        Ok(profile::new_cn_only_leaf(cn, validity, &self.issuer)?)
    }
}

impl From<crate::identity::IdentityError> for PkiError {
    fn from(e: crate::identity::IdentityError) -> Self {
        PkiError::Profile(ProfileError::Identity(e))
    }
}
