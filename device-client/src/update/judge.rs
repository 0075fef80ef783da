//! The first thing a device does with a manifest, before it downloads anything: signature
//! over the exact received bytes, then structure, then class, expiry and anti-rollback.
//! Pure: the trusted keys, the device's facts and the clock come in as values.
//!
//! Its cost is bounded whatever the input: an oversized envelope or one with too many
//! signatures is refused before it is decoded ([`fleet_proto::limits`]), and a rejection's
//! detail is at most [`fleet_proto::MAX_DETAIL_LEN`] bytes without control characters, so it
//! can be reported (and persisted, and re-sent) as it is.

use std::fmt::Display;

use fleet_proto::manifest::{self, DeviceFacts};
use fleet_proto::report::bounded_detail;
use fleet_proto::signing::{TrustedKeys, VerifiedManifest};
use fleet_proto::v1::{UpdateError, UpdateManifest};

/// Why a manifest was refused: the code reported upward in `UpdateProgress`, and a detail
/// (bounded and free of control characters, see [`bounded_detail`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {detail}")]
pub(crate) struct Rejection {
    /// The reason code.
    pub code: UpdateError,
    /// What exactly, for a human: at most `MAX_DETAIL_LEN` bytes, no control characters.
    pub detail: String,
}

impl Rejection {
    /// A rejection whose detail is `reason` made safe to report.
    fn new(code: UpdateError, reason: impl Display) -> Self {
        Self {
            code,
            detail: bounded_detail(&reason.to_string()),
        }
    }
}

/// Judges an encoded `SignedManifest` as received on `devices/{id}/update/manifest`.
pub(crate) fn judge(
    signed: &[u8],
    trusted: &TrustedKeys,
    facts: &DeviceFacts<'_>,
) -> Result<VerifiedManifest, Rejection> {
    // Authenticity first: nothing of an unauthenticated manifest is looked at.
    let verified = trusted
        .verify_encoded(signed)
        .map_err(|e| Rejection::new(e.code(), e))?;
    manifest::validate(&verified.manifest).map_err(|e| Rejection::new(e.code(), e))?;
    manifest::check_freshness(&verified.manifest, facts)
        .map_err(|e| Rejection::new(e.code(), e))?;
    Ok(verified)
}

/// Checks an already authenticated manifest again: structure, then class, expiry and
/// anti-rollback.
pub(crate) fn recheck(m: &UpdateManifest, facts: &DeviceFacts<'_>) -> Result<(), Rejection> {
    manifest::validate(m).map_err(|e| Rejection::new(e.code(), e))?;
    manifest::check_freshness(m, facts).map_err(|e| Rejection::new(e.code(), e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::signing::UpdateSigner;
    use fleet_proto::v1::{Component, Signature, SignedManifest};
    use fleet_proto::{Message, MAX_DETAIL_LEN};

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

    fn assert_reportable(rej: &Rejection) {
        assert!(
            rej.detail.len() <= MAX_DETAIL_LEN,
            "{} bytes",
            rej.detail.len()
        );
        assert!(
            !rej.detail.chars().any(char::is_control),
            "{:?}",
            rej.detail
        );
    }

    /// `n` signatures whose key ids are control bytes, after the authority's good one.
    fn flooded(authority: &UpdateSigner, n: usize, with_bytes: bool) -> Vec<u8> {
        let mut s = authority.sign_manifest(&manifest(11, "pump", 5_000));
        s.signatures.extend((0..n).map(|i| Signature {
            key_id: char::from((i % 32) as u8).to_string(),
            algorithm: if with_bytes { 1 } else { 0 },
            signature: if with_bytes { vec![0; 64] } else { vec![] },
        }));
        s.encode_to_vec()
    }

    #[test]
    fn a_flood_of_signatures_with_control_byte_key_ids_is_refused_with_a_short_clean_detail() {
        let authority = UpdateSigner::generate();
        let mut trusted = TrustedKeys::new();
        trusted.add(authority.verifying_key());
        // 20,000 full signatures (1.4 MB) and 12,000 bare ones (under the 64 KiB envelope
        // bound): both refused as malformed, before any signature is checked, even though the
        // authority's valid signature comes first.
        for (n, with_bytes) in [(20_000, true), (12_000, false)] {
            let bytes = flooded(&authority, n, with_bytes);
            let rej = judge(&bytes, &trusted, &FACTS).unwrap_err();
            assert_eq!(rej.code, UpdateError::MalformedManifest, "{n}: {rej}");
            assert_reportable(&rej);
        }
        // A handful is fine: the authority's signature verifies among untrusted ones.
        let few = flooded(&authority, 7, true);
        assert_eq!(judge(&few, &trusted, &FACTS).unwrap().manifest.sequence, 11);
    }

    #[test]
    fn unknown_hostile_key_ids_make_a_short_clean_detail() {
        let authority = UpdateSigner::generate();
        let stranger = UpdateSigner::generate();
        let mut trusted = TrustedKeys::new();
        trusted.add(authority.verifying_key());
        let mut s = stranger.sign_manifest(&manifest(11, "pump", 5_000));
        for sig in &mut s.signatures {
            sig.key_id = "\u{1b}[2J\r\n".repeat(10);
        }
        s.signatures = vec![s.signatures[0].clone(); 8];
        let rej = judge(&s.encode_to_vec(), &trusted, &FACTS).unwrap_err();
        assert_eq!(rej.code, UpdateError::UnknownKey);
        assert_reportable(&rej);
    }

    #[test]
    fn every_detail_is_bounded_whatever_the_reason_says() {
        // The bound holds for any reason text, not only for what today's errors print.
        let rej = Rejection::new(UpdateError::MalformedManifest, "\u{7}\n".repeat(1 << 20));
        assert_reportable(&rej);
        assert!(rej.detail.starts_with('\u{FFFD}'));
    }
}
