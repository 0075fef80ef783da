//! What each kind of fleet certificate contains, and issuing them with rcgen.
//!
//! * Fleet CA: ECDSA P-256, CA with path length 0 (it signs leaves only), key usages
//!   keyCertSign + cRLSign.
//! * Leaf: ECDSA P-256, CN = id, SAN URI `urn:fleet:{role}:{id}`, digitalSignature,
//!   EKU clientAuth; a gateway also gets serverAuth and its DNS/IP SANs (it is the devices'
//!   TLS server and the bridge's client).
//! * Serials are 16 random bytes, positive.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{Identity, Role};

/// Why a certificate cannot be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// rcgen refused the parameters or failed to sign.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A DNS SAN is not a valid name.
    #[error("bad DNS name {0:?} for a SAN")]
    DnsName(String),
    /// The validity period ends before it starts.
    #[error("validity ends before it starts")]
    Validity,
    /// The identity is invalid.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one hour ago (clock skew between gateway and devices) for `days` days.
    pub fn days_from_now(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days.into()),
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The serial number.
    pub serial: Vec<u8>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("serial", &hex::encode(&self.serial))
            .finish_non_exhaustive()
    }
}

fn random_serial() -> Vec<u8> {
    let mut s = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut s);
    // Positive and without a leading zero byte, so the DER INTEGER is exactly 16 bytes.
    s[0] = (s[0] & 0x7f) | 0x40;
    s.to_vec()
}

fn base_params(cn: &str, validity: Validity) -> Result<(CertificateParams, Vec<u8>), ProfileError> {
    if validity.not_after <= validity.not_before {
        return Err(ProfileError::Validity);
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let serial = random_serial();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok((params, serial))
}

/// A new self-signed fleet CA named `name`.
pub fn new_ca(
    name: &str,
    validity: Validity,
) -> Result<(Issued, Issuer<'static, KeyPair>), ProfileError> {
    let key = KeyPair::generate()?;
    let (mut params, serial) = base_params(name, validity)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    let issued = Issued {
        cert_pem: cert.pem(),
        cert_der: cert.der().to_vec(),
        key_pem: key.serialize_pem(),
        serial,
    };
    Ok((issued, Issuer::new(params, key)))
}

/// Extra names for a gateway's server certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNames {
    /// DNS names devices use to reach the gateway.
    pub dns: Vec<String>,
    /// IP addresses devices use to reach the gateway.
    pub ips: Vec<IpAddr>,
}

impl ServerNames {
    /// `localhost` and `127.0.0.1`: what a development gateway is reached by.
    pub fn local() -> Self {
        Self {
            dns: vec!["localhost".into()],
            ips: vec![IpAddr::from([127, 0, 0, 1])],
        }
    }
}

/// Signs a leaf: `extra` adds the SANs and usages beyond the common leaf profile.
fn leaf(
    cn: &str,
    validity: Validity,
    issuer: &Issuer<'_, KeyPair>,
    extra: impl FnOnce(&mut CertificateParams) -> Result<(), ProfileError>,
) -> Result<Issued, ProfileError> {
    let key = KeyPair::generate()?;
    let (mut params, serial) = base_params(cn, validity)?;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    extra(&mut params)?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        cert_der: cert.der().to_vec(),
        key_pem: key.serialize_pem(),
        serial,
    })
}

/// A leaf certificate for `identity`, signed by `issuer`. `server` is used for gateways only.
pub fn new_leaf(
    identity: &Identity,
    validity: Validity,
    server: &ServerNames,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<Issued, ProfileError> {
    leaf(&identity.id, validity, issuer, |params| {
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
        if identity.role == Role::Gateway {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
            for name in &server.dns {
                let dns = name
                    .clone()
                    .try_into()
                    .map_err(|_| ProfileError::DnsName(name.clone()))?;
                params.subject_alt_names.push(SanType::DnsName(dns));
            }
            params
                .subject_alt_names
                .extend(server.ips.iter().copied().map(SanType::IpAddress));
        }
        Ok(())
    })
}

/// A certificate for `cn` that carries no fleet SAN URI (for interoperability and tests of the
/// CN fallback rule): clientAuth, signed by `issuer`.
pub fn new_cn_only_leaf(
    cn: &str,
    validity: Validity,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<Issued, ProfileError> {
    leaf(cn, validity, issuer, |_| Ok(()))
}
