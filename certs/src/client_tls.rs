//! The client side of the fleet's mTLS: a rustls `ClientConfig` from PEM files, and the
//! identity the certificate carries. Used by the device library and the cloud SDK, so both
//! present their certificate and check the gateway's the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::files::{read_certs, PemError};
use crate::identity::{identity_from_der, Identity, IdentityError, IdentityPolicy};

/// Why the client's TLS material is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientTlsError {
    /// A certificate file is missing or holds no certificate.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// The key file is missing or holds no usable key.
    #[error("{path}: no usable private key: {detail}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The certificate carries no fleet identity.
    #[error("{path}: {source}")]
    Identity {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong.
        source: IdentityError,
    },
    /// rustls refused the material (key does not match the certificate, bad CA).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A client's TLS configuration and the identity of its certificate.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// For the MQTT client.
    pub config: Arc<ClientConfig>,
    /// Who the certificate says the client is.
    pub identity: Identity,
}

/// Builds the client configuration: trust the CAs in `ca` (all of them), present `cert` (leaf
/// first, then intermediates) with `key` (PKCS#8, SEC1 or PKCS#1 PEM). TLS 1.3 and 1.2, ring.
pub fn client_tls(ca: &Path, cert: &Path, key: &Path) -> Result<ClientTls, ClientTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c)?;
    }
    let chain: Vec<CertificateDer<'static>> = read_certs(cert)?;
    let identity = chain
        .first()
        .map(|leaf| identity_from_der(leaf, &IdentityPolicy::default()))
        .transpose()
        .map_err(|source| ClientTlsError::Identity {
            path: cert.to_owned(),
            source,
        })?
        .ok_or_else(|| ClientTlsError::Key {
            path: cert.to_owned(),
            detail: "no certificate".into(),
        })?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ClientTlsError::Key {
        path: key.to_owned(),
        detail: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(ClientTls {
        config: Arc::new(config),
        identity,
    })
}
