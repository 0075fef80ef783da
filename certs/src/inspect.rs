//! Human-readable description of a certificate or CRL file (`certs inspect`).

use std::fmt::Write as _;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::files::FileError;
use crate::identity::{identity_from_cert, IdentityPolicy};

/// Why a file cannot be described.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    /// Reading failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// Neither a certificate nor a CRL, in PEM or DER.
    #[error("{0}: neither a certificate nor a CRL (PEM or DER)")]
    Unknown(String),
    /// The object does not parse.
    #[error("{path}: {detail}")]
    Malformed {
        /// The file.
        path: String,
        /// What the parser said.
        detail: String,
    },
}

/// Describes every certificate or CRL in `path` (PEM, possibly several, or one DER object).
pub fn describe_file(path: &Path) -> Result<String, InspectError> {
    let data = std::fs::read(path).map_err(|e| FileError::new("reading", path, e))?;
    let shown = path.display().to_string();
    let malformed = |e: String| InspectError::Malformed {
        path: shown.clone(),
        detail: e,
    };
    let mut out = String::new();
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .filter_map(Result::ok)
        .collect();
    let crls: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&data)
        .filter_map(Result::ok)
        .collect();
    for c in &certs {
        out += &describe_cert(c).map_err(malformed)?;
    }
    for c in &crls {
        out += &describe_crl(c).map_err(malformed)?;
    }
    if certs.is_empty() && crls.is_empty() {
        // Maybe DER.
        if let Ok(s) = describe_cert(&data) {
            out = s;
        } else if let Ok(s) = describe_crl(&data) {
            out = s;
        } else {
            return Err(InspectError::Unknown(shown));
        }
    }
    Ok(out)
}

/// Describes one DER certificate.
pub fn describe_cert(der: &[u8]) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut s = String::new();
    let _ = writeln!(s, "Certificate");
    let _ = writeln!(s, "  subject:    {}", cert.subject());
    let _ = writeln!(s, "  issuer:     {}", cert.issuer());
    let _ = writeln!(s, "  serial:     {}", hex::encode(cert.raw_serial()));
    let _ = writeln!(s, "  not before: {}", cert.validity().not_before);
    let _ = writeln!(s, "  not after:  {}", cert.validity().not_after);
    let _ = writeln!(s, "  CA:         {}", cert.is_ca());
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    let v = match n {
                        GeneralName::URI(u) => format!("URI {u}"),
                        GeneralName::DNSName(d) => format!("DNS {d}"),
                        GeneralName::IPAddress(ip) => format!("IP {}", fmt_ip(ip)),
                        other => format!("{other:?}"),
                    };
                    let _ = writeln!(s, "  SAN:        {v}");
                }
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                let mut uses = Vec::new();
                if eku.server_auth {
                    uses.push("serverAuth");
                }
                if eku.client_auth {
                    uses.push("clientAuth");
                }
                let _ = writeln!(s, "  EKU:        {}", uses.join(", "));
            }
            _ => {}
        }
    }
    match identity_from_cert(&cert, &IdentityPolicy::default()) {
        Ok(i) => {
            let _ = writeln!(s, "  identity:   {} {}", i.role, i.id);
        }
        Err(e) if cert.is_ca() => {
            let _ = e;
        }
        Err(e) => {
            let _ = writeln!(s, "  identity:   none ({e})");
        }
    }
    Ok(s)
}

fn fmt_ip(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
        16 => <[u8; 16]>::try_from(bytes)
            .map(|b| std::net::Ipv6Addr::from(b).to_string())
            .unwrap_or_default(),
        _ => hex::encode(bytes),
    }
}

/// Describes one DER CRL.
pub fn describe_crl(der: &[u8]) -> Result<String, String> {
    let (_, crl) = CertificateRevocationList::from_der(der).map_err(|e| e.to_string())?;
    let mut s = String::new();
    let _ = writeln!(s, "Certificate revocation list");
    let _ = writeln!(s, "  issuer:      {}", crl.issuer());
    if let Some(n) = crl.crl_number() {
        let _ = writeln!(s, "  CRL number:  {n}");
    }
    let _ = writeln!(s, "  this update: {}", crl.last_update());
    if let Some(next) = crl.next_update() {
        let _ = writeln!(s, "  next update: {next}");
    }
    let revoked: Vec<_> = crl.iter_revoked_certificates().collect();
    let _ = writeln!(s, "  revoked:     {}", revoked.len());
    for r in revoked {
        let _ = writeln!(
            s,
            "    serial {} at {}",
            hex::encode(r.raw_serial()),
            r.revocation_date
        );
    }
    Ok(s)
}
