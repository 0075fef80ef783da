//! Identity extraction and chain verification with certificates the library issued.

use fleet_certs::identity::{identity_from_der, IdentityError, IdentityPolicy, Role};
use fleet_certs::pki::{InitOptions, Pki};
use fleet_certs::profile::{ServerNames, Validity};
use fleet_certs::{Identity, TrustStore, VerifyError};
use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use rustls_pki_types::UnixTime;
use time::{Duration, OffsetDateTime};

fn pki(dir: &std::path::Path) -> Pki {
    Pki::init(
        dir,
        &InitOptions {
            devices: 2,
            ..InitOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn der_of(pki: &Pki, id: &str) -> Vec<u8> {
    let e = pki.entry(id).unwrap_or_else(|| panic!("no {id}"));
    fleet_certs::files::read_certs(&pki.cert_path(e)).unwrap_or_else(|e| panic!("{e}"))[0].to_vec()
}

fn store(pki: &Pki, policy: IdentityPolicy) -> TrustStore {
    TrustStore::from_files(&Pki::ca_cert_path(pki.dir()), Some(&pki.crl_path()), policy)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn device_service_and_gateway_identities() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pki = pki(tmp.path());
    let s = store(&pki, IdentityPolicy::default());
    for (id, role) in [
        ("dev-0001", Role::Device),
        ("dev-0002", Role::Device),
        ("svc-0001", Role::Service),
        ("gw-0001", Role::Gateway),
    ] {
        let der = der_of(&pki, id);
        let want = Identity {
            role,
            id: id.into(),
        };
        assert_eq!(
            identity_from_der(&der, &IdentityPolicy::default()).as_ref(),
            Ok(&want)
        );
        assert_eq!(s.verify_client(&der, UnixTime::now()).ok(), Some(want));
    }
}

#[test]
fn another_ca_expired_and_revoked_are_rejected() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut ours = pki(&tmp.path().join("ours"));
    let theirs = pki(&tmp.path().join("theirs"));
    let s = store(&ours, IdentityPolicy::default());

    // Same id, same shape, other CA (with the same CA name, so the issuer name matches and
    // only the signature can tell): the identity parses but the chain does not verify.
    let foreign = der_of(&theirs, "dev-0001");
    assert!(identity_from_der(&foreign, &IdentityPolicy::default()).is_ok());
    match s.verify_client(&foreign, UnixTime::now()) {
        Err(VerifyError::Chain(e)) => {
            let e = format!("{e:?}");
            assert!(
                e.contains("InvalidSignatureForPublicKey") || e.contains("UnknownIssuer"),
                "{e}"
            );
        }
        other => panic!("foreign certificate: {other:?}"),
    }

    // Expired yesterday.
    let now = OffsetDateTime::now_utc();
    let past = Validity {
        not_before: now - Duration::days(30),
        not_after: now - Duration::days(1),
    };
    ours.issue(
        &Identity::new(Role::Device, "dev-old").unwrap_or_else(|e| panic!("{e}")),
        past,
        &ServerNames::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    match s.verify_client(&der_of(&ours, "dev-old"), UnixTime::now()) {
        Err(VerifyError::Chain(e)) => assert!(format!("{e:?}").contains("Expired"), "{e:?}"),
        other => panic!("expired certificate: {other:?}"),
    }

    // Revoked: refused once the new CRL is loaded, accepted by a store with the old CRL.
    let dev2 = der_of(&ours, "dev-0002");
    ours.revoke("dev-0002").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        s.verify_client(&dev2, UnixTime::now()).is_ok(),
        "old CRL still accepts"
    );
    match store(&ours, IdentityPolicy::default()).verify_client(&dev2, UnixTime::now()) {
        Err(VerifyError::Chain(e)) => assert!(format!("{e:?}").contains("Revoked"), "{e:?}"),
        other => panic!("revoked certificate: {other:?}"),
    }
}

#[test]
fn certificate_without_san_uses_documented_rule() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pki = pki(tmp.path());
    let issued = pki
        .issue_cn_only("legacy-7", Validity::days_from_now(10))
        .unwrap_or_else(|e| panic!("{e}"));
    // Default: refused.
    assert_eq!(
        identity_from_der(&issued.cert_der, &IdentityPolicy::default()),
        Err(IdentityError::MissingIdentity)
    );
    match store(&pki, IdentityPolicy::default()).verify_client(&issued.cert_der, UnixTime::now()) {
        Err(VerifyError::Identity(IdentityError::MissingIdentity)) => {}
        other => panic!("{other:?}"),
    }
    // With a CN fallback role: the CN is the id.
    let fallback = IdentityPolicy {
        cn_fallback: Some(Role::Device),
    };
    assert_eq!(
        store(&pki, fallback)
            .verify_client(&issued.cert_der, UnixTime::now())
            .ok(),
        Some(Identity {
            role: Role::Device,
            id: "legacy-7".into()
        })
    );
    // The fallback never overrides a SAN URI.
    assert_eq!(
        identity_from_der(&der_of(&pki, "svc-0001"), &fallback).map(|i| i.role),
        Ok(Role::Service)
    );
}

/// Certificates no `certs` command makes, built with rcgen directly (self-signed: identity
/// extraction does not check chains).
fn custom(cn: Option<&str>, uris: &[&str]) -> Vec<u8> {
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        p.distinguished_name.push(DnType::CommonName, cn);
    }
    for u in uris {
        p.subject_alt_names.push(SanType::URI(
            (*u).try_into().unwrap_or_else(|e| panic!("{e}")),
        ));
    }
    p.self_signed(&key)
        .unwrap_or_else(|e| panic!("{e}"))
        .der()
        .to_vec()
}

#[test]
fn each_malformed_identity_has_its_error() {
    let d = IdentityPolicy::default();
    assert_eq!(
        identity_from_der(&custom(Some("dev-2"), &["urn:fleet:device:dev-1"]), &d),
        Err(IdentityError::CnMismatch {
            cn: "dev-2".into(),
            id: "dev-1".into()
        })
    );
    assert_eq!(
        identity_from_der(&custom(None, &["urn:fleet:device:dev-1"]), &d).map(|i| i.id),
        Ok("dev-1".into())
    );
    assert_eq!(
        identity_from_der(
            &custom(None, &["urn:fleet:device:a", "urn:fleet:device:b"]),
            &d
        ),
        Err(IdentityError::Ambiguous(2))
    );
    assert_eq!(
        identity_from_der(&custom(Some("x"), &["urn:fleet:root:x"]), &d),
        Err(IdentityError::UnknownRole("root".into()))
    );
    assert!(matches!(
        identity_from_der(&custom(Some("+"), &["urn:fleet:device:+"]), &d),
        Err(IdentityError::BadId { .. })
    ));
    assert!(matches!(
        identity_from_der(&custom(None, &["urn:fleet:device"]), &d),
        Err(IdentityError::NotFleetUri(_))
    ));
    assert_eq!(
        identity_from_der(&custom(Some("x"), &["https://example.com/x"]), &d),
        Err(IdentityError::MissingIdentity)
    );
    // A wildcard CN through the fallback is still an invalid id.
    let fallback = IdentityPolicy {
        cn_fallback: Some(Role::Device),
    };
    assert!(matches!(
        identity_from_der(&custom(Some("#"), &[]), &fallback),
        Err(IdentityError::BadId { .. })
    ));
}
