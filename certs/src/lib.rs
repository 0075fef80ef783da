//! The fleet PKI: certificates for devices, services and gateways, CRLs, and the identities
//! certificates carry.
//!
//! * [`identity`]: role and id from a certificate (`urn:fleet:{role}:{id}` SAN URI, CN = id).
//! * [`client_tls`]: a client's rustls configuration from PEM files, with its identity.
//! * [`verify`]: chain + CRL + identity check outside a TLS handshake.
//! * [`profile`]: what each certificate contains; issuing with rcgen.
//! * [`pki`]: the development PKI directory behind the `certs` CLI.
//! * [`inspect`]: human-readable descriptions for `certs inspect`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client_tls;
pub mod files;
pub mod identity;
pub mod inspect;
pub mod pki;
pub mod profile;
pub mod trust;
pub mod verify;

pub use client_tls::{client_tls, ClientTls, ClientTlsError};
pub use identity::{identity_from_der, Identity, IdentityError, IdentityPolicy, Role};
pub use pki::{InitOptions, Pki, PkiError};
pub use trust::{TrustFiles, TrustFilesError, TrustSpec};
pub use verify::{TrustStore, VerifyError};
