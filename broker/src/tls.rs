//! The TLS server configuration: client certificates mandatory, verified against the whole CA
//! bundle (rustls `WebPkiClientVerifier`), then checked against the CRLs. Rebuilt from files on
//! start and on every reload.
//!
//! Revocation is not left to webpki: given CRLs, it verifies each CRL's signature again in
//! every handshake (a third public-key operation per connection). Here every CRL is parsed and
//! its signature verified once, when the configuration is built, against the CA of the bundle
//! that issued it; a CRL that does not parse, that no CA of the bundle issued, or whose
//! signature does not verify makes the build fail (a reload keeps the previous configuration).
//! A handshake then looks up serial numbers only, with webpki's rules: every certificate from
//! the end entity up to a CA of the bundle is checked, a certificate whose issuer has no CRL is
//! refused (unknown revocation status), and a CRL's nextUpdate is not enforced here (the edge
//! watches it: `tls.stale_crl`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use fleet_certs::files::{read_certs, read_crls, PemError};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, SignatureVerificationAlgorithm,
    UnixTime,
};
use webpki::{CertRevocationList, EndEntityCert, OwnedCertRevocationList};
use x509_parser::asn1_rs::{Any, FromDer, Tag};
use x509_parser::prelude::X509Certificate;

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
    /// A CRL cannot be used: it does not parse, no CA of the bundle issued it, or its signature
    /// does not verify with that CA's key.
    #[error("{path}: {detail}")]
    Crl {
        /// The CRL file.
        path: String,
        /// Which CRL of the file, and what is wrong with it.
        detail: String,
    },
    /// rustls refused a certificate or the key.
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
    let cas = read_certs(&files.ca)?;
    let crls = match &files.crl {
        Some(p) => read_crls(p)?,
        None => Vec::new(),
    };
    let crl_file = files
        .crl
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let verifier = client_verifier(&cas, &crls, &crl_file, &provider)?;
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

/// The client certificate verifier: webpki against `cas`, then, when there are CRLs, the
/// revocation check of [`Revocation`]. Without CRLs no revocation is checked. `crl_file` names
/// the CRLs' file in errors.
fn client_verifier(
    cas: &[CertificateDer<'static>],
    crls: &[CertificateRevocationListDer<'static>],
    crl_file: &str,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone())?;
    }
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    if crls.is_empty() {
        return Ok(inner);
    }
    let revocation = Revocation::new(cas, crls, provider.signature_verification_algorithms.all)
        .map_err(|detail| TlsError::Crl {
            path: crl_file.to_owned(),
            detail,
        })?;
    Ok(Arc::new(RevocationVerifier { inner, revocation }))
}

/// webpki's client verifier, followed by a look-up in CRLs verified when it was built.
#[derive(Debug)]
struct RevocationVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocation: Revocation,
}

impl ClientCertVerifier for RevocationVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.revocation.check(end_entity, intermediates)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// The revoked serial numbers of each CA that has a CRL, from CRLs whose signatures were
/// verified once, at build.
///
/// Names are compared as webpki compares them: the DER of the Name's contents, byte for byte.
/// Several CRLs of one issuer are all consulted (a serial listed in any of them is revoked).
struct Revocation {
    /// Subjects of the bundle's CAs: where a chain ends (the CAs themselves are not checked).
    anchors: HashSet<Vec<u8>>,
    /// CRL issuer -> its CRLs.
    crls: HashMap<Vec<u8>, Vec<CertRevocationList<'static>>>,
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation")
            .field("anchors", &self.anchors.len())
            .field("issuers_with_crls", &self.crls.len())
            .finish()
    }
}

/// A CA of the bundle, as needed to verify a CRL it signed.
struct CaKey {
    /// The Name's contents (no outer SEQUENCE), as webpki stores it.
    subject: Vec<u8>,
    /// The SubjectPublicKeyInfo's contents (no outer SEQUENCE).
    spki: Vec<u8>,
    /// Whether its key usage (if it has one) allows signing CRLs.
    crl_signer: bool,
}

impl Revocation {
    /// Parses `crls` and verifies each one's signature with the key of its issuer in `cas`.
    /// The error tells which CRL (1-based, in file order) and why.
    fn new(
        cas: &[CertificateDer<'_>],
        crls: &[CertificateRevocationListDer<'_>],
        algs: &[&dyn SignatureVerificationAlgorithm],
    ) -> Result<Self, String> {
        let keys = cas
            .iter()
            .enumerate()
            .map(|(i, der)| {
                ca_key(der).map_err(|e| format!("CA certificate {} of the bundle: {e}", i + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut by_issuer: HashMap<Vec<u8>, Vec<CertRevocationList<'static>>> = HashMap::new();
        for (i, der) in crls.iter().enumerate() {
            let what = format!("CRL {} of the file", i + 1);
            let crl: CertRevocationList<'static> = OwnedCertRevocationList::from_der(der)
                .map_err(|e| format!("{what} does not parse: {e}"))?
                .into();
            let issuer = crl.issuer().to_vec();
            let mut candidates = keys.iter().filter(|k| k.subject == issuer).peekable();
            if candidates.peek().is_none() {
                return Err(format!(
                    "{what}: no CA of the bundle is its issuer ({})",
                    printable_issuer(der)
                ));
            }
            let mut last = String::new();
            let mut verified = false;
            for ca in candidates {
                match verify_crl_signature(der, &ca.spki, algs) {
                    Ok(()) if ca.crl_signer => {
                        verified = true;
                        break;
                    }
                    Ok(()) => last = "its issuer's key usage does not allow CRL signing".into(),
                    Err(e) => last = e.into(),
                }
            }
            if !verified {
                return Err(format!("{what} (issuer {}): {last}", printable_issuer(der)));
            }
            by_issuer.entry(issuer).or_default().push(crl);
        }
        Ok(Self {
            anchors: keys.into_iter().map(|k| k.subject).collect(),
            crls: by_issuer,
        })
    }

    /// Checks the end entity and each certificate above it, following issuer names through
    /// the `intermediates` the client sent, up to a CA of the bundle (which is not checked:
    /// webpki checks anchors no more).
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        let bad = |_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
        let mut cert = EndEntityCert::try_from(end_entity).map_err(bad)?;
        // Each step moves to another of the intermediates; more steps mean a loop.
        for _ in 0..=intermediates.len() {
            self.check_one(cert.issuer(), cert.serial())?;
            if self.anchors.contains(cert.issuer()) {
                return Ok(());
            }
            let issuer = cert.issuer();
            let next = intermediates
                .iter()
                .filter_map(|der| EndEntityCert::try_from(der).ok())
                .find(|c| c.subject() == issuer);
            cert = next.ok_or(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))?;
        }
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ))
    }

    /// One certificate: revoked if a CRL of its issuer lists its serial; unknown status (as
    /// webpki says when no CRL is authoritative) if its issuer has no CRL.
    fn check_one(&self, issuer: &[u8], serial: &[u8]) -> Result<(), rustls::Error> {
        let crls = self
            .crls
            .get(issuer)
            .ok_or(rustls::Error::InvalidCertificate(
                CertificateError::UnknownRevocationStatus,
            ))?;
        // find_serial is a map look-up that cannot fail for an owned CRL; an error is treated
        // as "listed", so nothing is let through on it.
        if crls
            .iter()
            .any(|crl| !matches!(crl.find_serial(serial), Ok(None)))
        {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(())
    }
}

/// The subject, public key and CRL-signing permission of a CA certificate.
fn ca_key(der: &CertificateDer<'_>) -> Result<CaKey, String> {
    let anchor = webpki::anchor_from_trusted_cert(der).map_err(|e| e.to_string())?;
    let (_, parsed) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let crl_signer = match parsed.key_usage() {
        Ok(Some(ku)) => ku.value.crl_sign(),
        Ok(None) => true,
        Err(e) => return Err(format!("bad key usage: {e}")),
    };
    Ok(CaKey {
        subject: anchor.subject.as_ref().to_vec(),
        spki: anchor.subject_public_key_info.as_ref().to_vec(),
        crl_signer,
    })
}

/// The CRL's issuer for messages (`CN=...`), or `?` when it does not parse.
fn printable_issuer(crl: &[u8]) -> String {
    x509_parser::revocation_list::CertificateRevocationList::from_der(crl)
        .map(|(_, c)| c.issuer().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Verifies a CRL's signature with `spki` (a SubjectPublicKeyInfo's contents), choosing among
/// `algs` (the provider's, as webpki does) the one whose identifiers equal the CRL's signature
/// algorithm and the key's algorithm.
fn verify_crl_signature(
    crl: &[u8],
    spki: &[u8],
    algs: &[&dyn SignatureVerificationAlgorithm],
) -> Result<(), &'static str> {
    const MALFORMED: &str = "malformed signed structure";
    // CertificateList ::= SEQUENCE { tbsCertList, signatureAlgorithm, signatureValue }
    let body = sole(crl, Tag::Sequence).ok_or(MALFORMED)?;
    let (after_tbs, tbs) = Any::from_der(body).map_err(|_| MALFORMED)?;
    if tbs.tag() != Tag::Sequence {
        return Err(MALFORMED);
    }
    let signed = &body[..body.len() - after_tbs.len()];
    let (after_alg, sig_alg) = Any::from_der(after_tbs).map_err(|_| MALFORMED)?;
    let signature = bit_string_bytes(sole(after_alg, Tag::BitString).ok_or(MALFORMED)?)?;
    if sig_alg.tag() != Tag::Sequence {
        return Err(MALFORMED);
    }
    // SubjectPublicKeyInfo ::= SEQUENCE { algorithm, subjectPublicKey BIT STRING }
    let (after_key_alg, key_alg) = Any::from_der(spki).map_err(|_| "malformed CA key")?;
    let key = bit_string_bytes(sole(after_key_alg, Tag::BitString).ok_or("malformed CA key")?)?;
    let alg = algs
        .iter()
        .find(|a| {
            a.signature_alg_id().as_ref() == sig_alg.data
                && a.public_key_alg_id().as_ref() == key_alg.data
        })
        .ok_or("signature algorithm unsupported for its issuer's key")?;
    alg.verify_signature(key, signed, signature)
        .map_err(|_| "signature does not verify with its issuer's key")
}

/// The contents of `input` when it is exactly one element tagged `tag`.
fn sole(input: &[u8], tag: Tag) -> Option<&[u8]> {
    match Any::from_der(input) {
        Ok((rest, any)) if rest.is_empty() && any.tag() == tag => Some(any.data),
        _ => None,
    }
}

/// The bytes of a BIT STRING's contents that has no unused bits (signatures, keys).
fn bit_string_bytes(contents: &[u8]) -> Result<&[u8], &'static str> {
    match contents.split_first() {
        Some((0, bytes)) => Ok(bytes),
        _ => Err("malformed bit string"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use fleet_certs::pki::{InitOptions, Pki};
    use rustls::{ClientConnection, ServerConnection};
    use rustls_pki_types::ServerName;

    use super::*;

    /// A PKI with two devices, its CA named `ca_name`.
    fn pki(dir: &Path, ca_name: &str) -> Pki {
        Pki::init(
            dir,
            &InitOptions {
                ca_name: ca_name.into(),
                devices: 2,
                ..InitOptions::default()
            },
        )
        .unwrap()
    }

    /// The gateway's files of `pki`, with `pki`'s CRL or none.
    fn files(pki: &Pki, with_crl: bool) -> TlsFiles {
        let gw = pki.entry("gw-0001").unwrap();
        TlsFiles {
            ca: Pki::ca_cert_path(pki.dir()),
            crl: with_crl.then(|| pki.crl_path()),
            cert: pki.cert_path(gw),
            key: pki.key_path(gw),
        }
    }

    /// A full TLS handshake in memory between `server` and device `id` of `pki` (trusting the
    /// CA in `ca`); the server's error if it refuses.
    fn handshake(
        server: Arc<ServerConfig>,
        ca: &Path,
        pki: &Pki,
        id: &str,
    ) -> Result<(), rustls::Error> {
        let e = pki.entry(id).unwrap();
        let client = fleet_certs::client_tls(ca, &pki.cert_path(e), &pki.key_path(e)).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = ClientConnection::new(client.config, name).unwrap();
        let mut s = ServerConnection::new(server).unwrap();
        // A TLS 1.3 handshake with client authentication takes two round trips; a few more
        // rounds than needed, then the test fails rather than spins.
        for _ in 0..8 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let mut rd = &wire[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets()?;
            }
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            let mut rd = &wire[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets()
                    .expect("the client accepts the gateway");
            }
            if !s.is_handshaking() && !c.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    fn refused_as(result: Result<(), rustls::Error>, expected: CertificateError) {
        match result {
            Err(rustls::Error::InvalidCertificate(e)) if e == expected => {}
            other => panic!("expected the certificate refused as {expected:?}, got {other:?}"),
        }
    }

    fn crl_error<T>(result: Result<T, TlsError>) -> String {
        match result {
            Err(TlsError::Crl { detail, .. }) => detail,
            Err(other) => panic!("expected a CRL error at load, got {other}"),
            Ok(_) => panic!("expected a CRL error at load, the configuration was built"),
        }
    }

    #[test]
    fn a_revoked_certificate_is_refused_and_a_good_one_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut pki = pki(dir.path(), "Fleet Test CA");
        pki.revoke("dev-0002").unwrap();
        let f = files(&pki, true);
        let server = server_config(&f).unwrap();
        handshake(server.clone(), &f.ca, &pki, "dev-0001").unwrap();
        refused_as(
            handshake(server, &f.ca, &pki, "dev-0002"),
            CertificateError::Revoked,
        );
    }

    #[test]
    fn without_a_crl_no_revocation_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut pki = pki(dir.path(), "Fleet Test CA");
        pki.revoke("dev-0002").unwrap();
        let f = files(&pki, false);
        let server = server_config(&f).unwrap();
        handshake(server, &f.ca, &pki, "dev-0002").unwrap();
    }

    #[test]
    fn a_certificate_whose_issuer_has_no_crl_has_an_unknown_revocation_status() {
        let dir = tempfile::tempdir().unwrap();
        let ours = pki(&dir.path().join("ours"), "Fleet Test CA");
        let theirs = pki(&dir.path().join("theirs"), "Other CA");
        // Both CAs trusted, only ours has a CRL.
        let mut f = files(&ours, true);
        let bundle = dir.path().join("bundle.pem");
        let mut pem = std::fs::read(&f.ca).unwrap();
        pem.extend(std::fs::read(Pki::ca_cert_path(theirs.dir())).unwrap());
        std::fs::write(&bundle, pem).unwrap();
        f.ca = bundle;
        let server = server_config(&f).unwrap();
        handshake(server.clone(), &f.ca, &ours, "dev-0001").unwrap();
        refused_as(
            handshake(server, &f.ca, &theirs, "dev-0001"),
            CertificateError::UnknownRevocationStatus,
        );
    }

    #[test]
    fn a_crl_not_signed_by_a_ca_of_the_bundle_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let ours = pki(&dir.path().join("ours"), "Fleet Test CA");
        // Same issuer name, another key: the signature does not verify.
        let twin = pki(&dir.path().join("twin"), "Fleet Test CA");
        let mut f = files(&ours, true);
        f.crl = Some(twin.crl_path());
        let detail = crl_error(server_config(&f));
        assert!(detail.contains("signature does not verify"), "{detail}");
        // Another issuer name: no CA of the bundle issued it.
        let other = pki(&dir.path().join("other"), "Other CA");
        f.crl = Some(other.crl_path());
        let detail = crl_error(server_config(&f));
        assert!(detail.contains("no CA of the bundle"), "{detail}");
        assert!(detail.contains("Other CA"), "{detail}");
    }

    #[test]
    fn a_tampered_crl_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut pki = pki(dir.path(), "Fleet Test CA");
        let revoked = pki.revoke("dev-0002").unwrap();
        let cas = read_certs(&Pki::ca_cert_path(pki.dir())).unwrap();
        let crls = read_crls(&pki.crl_path()).unwrap();
        let provider = provider();
        // Untouched, it loads.
        client_verifier(&cas, &crls, "crl.pem", &provider).unwrap();
        // Change the revoked serial number, as if to un-revoke dev-0002.
        let serial = hex::decode(&revoked.serial).unwrap();
        let mut der = crls[0].to_vec();
        let at = der
            .windows(serial.len())
            .position(|w| w == serial.as_slice())
            .expect("the CRL lists the serial");
        der[at + serial.len() - 1] ^= 1;
        let tampered = [CertificateRevocationListDer::from(der)];
        let detail = crl_error(client_verifier(&cas, &tampered, "crl.pem", &provider));
        assert!(detail.contains("signature does not verify"), "{detail}");
        // Bytes that are no CRL at all.
        let garbage = [CertificateRevocationListDer::from(vec![
            0x30, 0x03, 1, 2, 3,
        ])];
        let detail = crl_error(client_verifier(&cas, &garbage, "crl.pem", &provider));
        assert!(detail.contains("does not parse"), "{detail}");
    }
}
