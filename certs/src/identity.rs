//! Identities carried by fleet certificates, and their extraction from a DER certificate.
//!
//! A fleet certificate names its holder in a SAN URI `urn:fleet:{role}:{id}` (for example
//! `urn:fleet:device:dev-0001`) and repeats the id as its subject CN. [`identity_from_der`]
//! reads exactly that. It does **not** check the signature chain: call it on a certificate that
//! a TLS handshake (or [`crate::verify::TrustStore`]) has already verified.
//!
//! Rules, in order:
//! 1. Exactly one SAN URI must start with `urn:fleet:`; two are ambiguous and refused.
//! 2. Its role must be `device`, `service` or `gateway`, and its id must pass the id rules of
//!    [`fleet_proto::ids`] (it becomes a topic level).
//! 3. If the subject has a CN, it must equal the id (a certificate that says two names is
//!    refused rather than guessed at).
//! 4. Without a fleet SAN URI the certificate is refused, unless the policy names a CN fallback
//!    role: then the CN is the id and the role is that fallback. The default has no fallback,
//!    because a CN carries no role and any certificate of the CA would then pass as that role.

use std::fmt;
use std::str::FromStr;

use fleet_proto::ids::{validate_id, IdError};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Prefix of the SAN URI that carries an identity.
pub const URI_PREFIX: &str = "urn:fleet:";

/// What a certificate holder is allowed to be.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A field device: sees only its own `devices/{id}/...` tree.
    Device,
    /// A cloud or operator service: commands and updates to any device, all device reports.
    Service,
    /// A gateway: the TLS server for devices, and the bridge's client identity upstream.
    Gateway,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Device, Role::Service, Role::Gateway];

    /// The role's name in SAN URIs, file names and policies.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Service => "service",
            Role::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownRole(s.to_owned()))
    }
}

/// A verified holder of a fleet certificate: role plus id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What the holder is.
    pub role: Role,
    /// The holder's id (the MQTT client id it must use).
    pub id: String,
}

impl Identity {
    /// An identity after checking the id rules.
    pub fn new(role: Role, id: impl Into<String>) -> Result<Self, IdentityError> {
        let id = id.into();
        validate_id(&id).map_err(|e| IdentityError::BadId {
            id: id.clone(),
            source: e,
        })?;
        Ok(Self { role, id })
    }

    /// The SAN URI encoding this identity.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}:{}", self.role, self.id)
    }

    /// Parses a `urn:fleet:{role}:{id}` URI.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix(URI_PREFIX)
            .ok_or_else(|| IdentityError::NotFleetUri(uri.to_owned()))?;
        let (role, id) = rest
            .split_once(':')
            .ok_or_else(|| IdentityError::NotFleetUri(uri.to_owned()))?;
        Identity::new(role.parse()?, id)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.id)
    }
}

/// How to read identities from certificates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityPolicy {
    /// Role given to a certificate that has no fleet SAN URI but has a CN; `None` (the default)
    /// refuses such certificates.
    pub cn_fallback: Option<Role>,
}

/// Why no identity can be read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The bytes are not a DER X.509 certificate.
    #[error("not a DER X.509 certificate: {0}")]
    Malformed(String),
    /// No `urn:fleet:` SAN URI, and no CN fallback applies.
    #[error("certificate has no {URI_PREFIX} SAN URI")]
    MissingIdentity,
    /// More than one `urn:fleet:` SAN URI.
    #[error("certificate has {0} {URI_PREFIX} SAN URIs; exactly one is allowed")]
    Ambiguous(usize),
    /// A `urn:fleet:` URI that is not `urn:fleet:{role}:{id}`.
    #[error("{0:?} is not of the form {URI_PREFIX}ROLE:ID")]
    NotFleetUri(String),
    /// The role is not `device`, `service` or `gateway`.
    #[error("unknown role {0:?}")]
    UnknownRole(String),
    /// The id breaks the id rules.
    #[error("bad id {id:?}: {source}")]
    BadId {
        /// The id as found.
        id: String,
        /// Which rule it breaks.
        source: IdError,
    },
    /// The CN names someone else than the SAN URI.
    #[error("subject CN {cn:?} differs from the SAN URI id {id:?}")]
    CnMismatch {
        /// The CN.
        cn: String,
        /// The id in the SAN URI.
        id: String,
    },
}

/// Reads the identity of a (verified) DER certificate.
pub fn identity_from_der(der: &[u8], policy: &IdentityPolicy) -> Result<Identity, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
    identity_from_cert(&cert, policy)
}

/// Reads the identity of a parsed certificate.
pub fn identity_from_cert(
    cert: &X509Certificate<'_>,
    policy: &IdentityPolicy,
) -> Result<Identity, IdentityError> {
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) if u.starts_with(URI_PREFIX) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(IdentityError::Malformed(e.to_string())),
    };
    let cns: Vec<&str> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .collect();
    let cn = match cns.as_slice() {
        [] => None,
        [one] => Some(*one),
        _ => return Err(IdentityError::Malformed("subject has several CNs".into())),
    };
    match (uris.as_slice(), cn, policy.cn_fallback) {
        ([uri], cn, _) => {
            let identity = Identity::from_uri(uri)?;
            match cn {
                Some(cn) if cn != identity.id => Err(IdentityError::CnMismatch {
                    cn: cn.to_owned(),
                    id: identity.id,
                }),
                _ => Ok(identity),
            }
        }
        ([], Some(cn), Some(role)) => Identity::new(role, cn),
        ([], _, _) => Err(IdentityError::MissingIdentity),
        (many, _, _) => Err(IdentityError::Ambiguous(many.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip_and_errors() {
        for role in Role::ALL {
            let i = Identity::new(role, "x-1").unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(Identity::from_uri(&i.uri()), Ok(i));
        }
        assert!(matches!(
            Identity::from_uri("urn:other:device:a"),
            Err(IdentityError::NotFleetUri(_))
        ));
        assert!(matches!(
            Identity::from_uri("urn:fleet:device"),
            Err(IdentityError::NotFleetUri(_))
        ));
        assert!(matches!(
            Identity::from_uri("urn:fleet:admin:a"),
            Err(IdentityError::UnknownRole(_))
        ));
        assert!(matches!(
            Identity::from_uri("urn:fleet:device:a/b"),
            Err(IdentityError::BadId { .. })
        ));
        assert!(matches!(
            Identity::from_uri("urn:fleet:device:"),
            Err(IdentityError::BadId { .. })
        ));
        assert!(matches!(
            Identity::from_uri("urn:fleet:device:#"),
            Err(IdentityError::BadId { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            identity_from_der(b"\x30\x03\x02\x01\x01", &IdentityPolicy::default()),
            Err(IdentityError::Malformed(_))
        ));
        assert!(matches!(
            identity_from_der(&[], &IdentityPolicy::default()),
            Err(IdentityError::Malformed(_))
        ));
    }
}
