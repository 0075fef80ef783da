//! The TLS server configuration: client certificates mandatory, verified against the whole CA
//! bundle and the CRLs (rustls `WebPkiClientVerifier`). Rebuilt from files on reload.

use std::path::Path;
use std::sync::Arc;

use fleet_certs::files::{read_certs, read_crls, PemError};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

/// Why the TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file is unusable.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// The private key file is unusable.
    #[error("{path}: no usable private key: {detail}")]
    Key {
        /// The key file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused a certificate, key or CRL.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Paths of the TLS material.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA bundle.
    pub ca: std::path::PathBuf,
    /// CRL file, if any.
    pub crl: Option<std::path::PathBuf>,
    /// Server certificate chain.
    pub cert: std::path::PathBuf,
    /// Server key.
    pub key: std::path::PathBuf,
}

/// The crypto provider used everywhere in the gateway (ring).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration from files.
pub(crate) fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&files.ca)? {
        roots.add(ca)?;
    }
    let crls = match &files.crl {
        Some(p) => read_crls(p)?,
        None => Vec::new(),
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .build()?;
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}
