//! Chain verification outside a TLS handshake: a CA bundle plus CRLs, checked with webpki
//! (the verifier rustls uses at the handshake), then the identity read from the leaf.
//! The gateway's handshake uses rustls directly; this serves tools and tests that hold a
//! certificate and must know whether the fleet would accept it.

use std::path::Path;

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use webpki::{
    anchor_from_trusted_cert, CertRevocationList, EndEntityCert, KeyUsage, OwnedCertRevocationList,
    RevocationOptionsBuilder,
};

use x509_parser::prelude::FromDer;

use crate::files::{read_certs, read_crls, PemError};
use crate::identity::{identity_from_der, Identity, IdentityError, IdentityPolicy};

/// Why a certificate is not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A CA or CRL file cannot be read.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// A CA certificate cannot serve as a trust anchor.
    #[error("CA certificate unusable as a trust anchor: {0}")]
    Anchor(webpki::Error),
    /// A CRL does not parse.
    #[error("bad CRL: {0}")]
    Crl(webpki::Error),
    /// The certificate does not chain to the bundle, is expired, revoked, or not for client
    /// authentication.
    #[error("certificate rejected: {0}")]
    Chain(webpki::Error),
    /// The chain is good but the identity cannot be read.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// A CA bundle and the CRLs that go with it.
#[derive(Debug, Clone)]
pub struct TrustStore {
    cas: Vec<CertificateDer<'static>>,
    crls: Vec<OwnedCertRevocationList>,
    /// The earliest nextUpdate among the CRLs (Unix seconds), if any CRL names one.
    crl_next_update: Option<u64>,
    policy: IdentityPolicy,
}

impl TrustStore {
    /// From DER CA certificates and DER CRLs.
    pub fn new(
        cas: Vec<CertificateDer<'static>>,
        crls: &[CertificateRevocationListDer<'_>],
        policy: IdentityPolicy,
    ) -> Result<Self, VerifyError> {
        for ca in &cas {
            anchor_from_trusted_cert(ca).map_err(VerifyError::Anchor)?;
        }
        let crl_next_update = crls
            .iter()
            .filter_map(|c| {
                let (_, parsed) =
                    x509_parser::revocation_list::CertificateRevocationList::from_der(c).ok()?;
                u64::try_from(parsed.next_update()?.timestamp()).ok()
            })
            .min();
        let crls = crls
            .iter()
            .map(|c| OwnedCertRevocationList::from_der(c).map_err(VerifyError::Crl))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            cas,
            crls,
            crl_next_update,
            policy,
        })
    }

    /// When the earliest of the CRLs expects to be replaced (its nextUpdate), Unix seconds;
    /// `None` without CRLs or when none names a next update.
    pub fn crl_next_update(&self) -> Option<u64> {
        self.crl_next_update
    }

    /// Whether a CRL is past its nextUpdate at `now`: revocations issued since may be missing.
    pub fn crl_stale(&self, now: UnixTime) -> bool {
        self.crl_next_update
            .is_some_and(|next| now.as_secs() >= next)
    }

    /// From a PEM CA bundle and an optional PEM CRL file.
    pub fn from_files(
        ca: &Path,
        crl: Option<&Path>,
        policy: IdentityPolicy,
    ) -> Result<Self, VerifyError> {
        let crls = match crl {
            Some(p) => read_crls(p)?,
            None => Vec::new(),
        };
        Self::new(read_certs(ca)?, &crls, policy)
    }

    /// Verifies a client certificate (chain, validity at `now`, clientAuth usage, CRLs) and
    /// returns its identity.
    pub fn verify_client(&self, der: &[u8], now: UnixTime) -> Result<Identity, VerifyError> {
        let anchors = self
            .cas
            .iter()
            .map(anchor_from_trusted_cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(VerifyError::Anchor)?;
        let cert = CertificateDer::from(der);
        let ee = EndEntityCert::try_from(&cert).map_err(VerifyError::Chain)?;
        let crls: Vec<CertRevocationList<'_>> = self
            .crls
            .iter()
            .cloned()
            .map(CertRevocationList::from)
            .collect();
        let crl_refs: Vec<&CertRevocationList<'_>> = crls.iter().collect();
        let revocation = RevocationOptionsBuilder::new(&crl_refs)
            .ok()
            .map(|b| b.build());
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            now,
            KeyUsage::client_auth(),
            revocation,
            None,
        )
        .map_err(VerifyError::Chain)?;
        Ok(identity_from_der(der, &self.policy)?)
    }
}
