//! The first thing a device does with a manifest, before it downloads anything: signature
//! over the exact received bytes, then structure, then class, expiry and anti-rollback.
//! Pure: the trusted keys, the device's facts and the clock come in as values.

use fleet_proto::manifest::{self, DeviceFacts};
use fleet_proto::signing::{TrustedKeys, VerifiedManifest};
use fleet_proto::v1::UpdateError;

/// Why a manifest was refused: the code reported upward in `UpdateProgress`, and a detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {detail}")]
pub(crate) struct Rejection {
    /// The reason code.
    pub code: UpdateError,
    /// What exactly, for a human.
    pub detail: String,
}

/// Judges an encoded `SignedManifest` as received on `devices/{id}/update/manifest`.
pub(crate) fn judge(
    signed: &[u8],
    trusted: &TrustedKeys,
    facts: &DeviceFacts<'_>,
) -> Result<VerifiedManifest, Rejection> {
    // Authenticity first: nothing of an unauthenticated manifest is looked at.
    let verified = trusted.verify_encoded(signed).map_err(|e| Rejection {
        code: e.code(),
        detail: e.to_string(),
    })?;
    manifest::validate(&verified.manifest).map_err(|e| Rejection {
        code: e.code(),
        detail: e.to_string(),
    })?;
    manifest::check_freshness(&verified.manifest, facts).map_err(|e| Rejection {
        code: e.code(),
        detail: e.to_string(),
    })?;
    Ok(verified)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::signing::UpdateSigner;
    use fleet_proto::v1::{Component, SignedManifest, UpdateManifest};
    use fleet_proto::Message;

    fn manifest(sequence: u64, class: &str, expires_at_ms: u64) -> UpdateManifest {
        UpdateManifest {
            format_version: fleet_proto::manifest::FORMAT_VERSION,
            update_id: "fw-1.1".into(),
            device_class: class.into(),
            version: "1.1.0".into(),
            sequence,
            issued_at_ms: 1,
            expires_at_ms,
            components: vec![Component {
                name: "rootfs".into(),
                size: 5000,
                sha256: vec![1; 32],
                chunk_size: 1024,
                chunk_count: 5,
                merkle_root: vec![2; 32],
            }],
            description: String::new(),
        }
    }

    const FACTS: DeviceFacts<'static> = DeviceFacts {
        device_class: "pump",
        installed_sequence: 10,
        now_ms: 1_000,
    };

    #[test]
    fn every_refusal_has_its_reason_and_a_good_manifest_passes() {
        let authority = UpdateSigner::generate();
        let mut trusted = TrustedKeys::new();
        trusted.add(authority.verifying_key());
        let sign = |m: &UpdateManifest| authority.sign_manifest(m).encode_to_vec();

        let good = sign(&manifest(11, "pump", 5_000));
        assert_eq!(
            judge(&good, &trusted, &FACTS).unwrap().manifest.sequence,
            11
        );

        let code = |bytes: &[u8]| judge(bytes, &trusted, &FACTS).unwrap_err().code;
        // Forged: signed by another key.
        let forger = UpdateSigner::generate();
        let forged = forger
            .sign_manifest(&manifest(11, "pump", 5_000))
            .encode_to_vec();
        assert_eq!(code(&forged), UpdateError::UnknownKey);
        // One manifest byte changed after signing.
        let mut s = SignedManifest::decode(good.as_slice()).unwrap();
        let last = s.manifest.len() - 1;
        s.manifest[last] ^= 1;
        assert_eq!(code(&s.encode_to_vec()), UpdateError::BadSignature);
        // Equal and older sequence, wrong class, expired.
        assert_eq!(
            code(&sign(&manifest(10, "pump", 5_000))),
            UpdateError::NotNewer
        );
        assert_eq!(
            code(&sign(&manifest(3, "pump", 5_000))),
            UpdateError::NotNewer
        );
        assert_eq!(
            code(&sign(&manifest(11, "valve", 5_000))),
            UpdateError::WrongClass
        );
        assert_eq!(
            code(&sign(&manifest(11, "pump", 1_000))),
            UpdateError::Expired
        );
        // Not a SignedManifest at all.
        assert_eq!(code(&[0xff, 0xff]), UpdateError::MalformedManifest);
    }
}
