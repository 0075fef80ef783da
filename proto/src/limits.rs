//! Every bound the update path puts on untrusted input, in one place.
//!
//! A bound is checked before the work it protects: the size of an envelope before it is
//! decoded, the number of signatures before any is verified, the number of proof entries
//! before a chunk is decoded, a proof's length before anything is hashed. Bounds defined in the
//! module they belong to are re-exported here.

pub use crate::chunker::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
pub use crate::ids::{MAX_COMPONENT_NAME_LEN, MAX_ID_LEN};
pub use crate::manifest::{MAX_COMPONENTS, MAX_VERSION_LEN};
pub use crate::report::{MAX_DETAIL_LEN, MAX_EXCERPT_LEN};

/// Largest encoded `SignedManifest` a device or gateway accepts, in bytes (64 KiB). A manifest
/// of [`MAX_COMPONENTS`] components with a [`MAX_DESCRIPTION_LEN`] description and
/// [`MAX_SIGNATURES`] signatures is about 7 KiB; anything larger is refused before decoding.
pub const MAX_SIGNED_MANIFEST_LEN: usize = 64 * 1024;

/// Most signatures one `SignedManifest` may carry. Rotation needs two (old and new key), an
/// algorithm change a few more; an envelope with more is refused before any signature is
/// checked, so verification costs at most this many signature checks.
pub const MAX_SIGNATURES: usize = 8;

/// Longest `Signature.key_id` in bytes. Key ids are 16 hex characters today
/// ([`crate::signing::key_id`]); the margin leaves room for another format.
pub const MAX_KEY_ID_LEN: usize = 64;

/// Longest `UpdateManifest.description` in bytes (4 KiB).
pub const MAX_DESCRIPTION_LEN: usize = 4 * 1024;

/// Longest update id in bytes: an id like any other ([`crate::ids`]).
pub const MAX_UPDATE_ID_LEN: usize = MAX_ID_LEN;

/// Most hashes a Merkle proof can need: one per tree level, and a tree of at most `u32::MAX`
/// chunks has 32 levels above its leaves ([`crate::merkle::proof_len`] never exceeds it).
pub const MAX_PROOF_LEN: usize = 32;

/// Most key ids a [`crate::signing::VerifyError::UnknownKey`] names; the rest are counted.
pub const MAX_NAMED_KEY_IDS: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;
    use crate::signing::UpdateSigner;
    use crate::v1;
    use prost::Message as _;

    #[test]
    fn the_largest_valid_manifest_fits_the_envelope_bound() {
        let signer = UpdateSigner::generate();
        let mut m = sample();
        m.update_id = "u".repeat(MAX_UPDATE_ID_LEN);
        m.device_class = "c".repeat(MAX_ID_LEN);
        m.version = "v".repeat(MAX_VERSION_LEN);
        m.description = "d".repeat(MAX_DESCRIPTION_LEN);
        m.sequence = u64::MAX;
        m.issued_at_ms = u64::MAX;
        m.expires_at_ms = u64::MAX;
        m.components = (0..MAX_COMPONENTS)
            .map(|i| v1::Component {
                name: format!("{i:0>width$}", width = MAX_COMPONENT_NAME_LEN),
                ..m.components[0].clone()
            })
            .collect();
        assert_eq!(crate::manifest::validate(&m), Ok(()));
        let mut signed = signer.sign_manifest(&m);
        let sig = signed.signatures[0].clone();
        signed.signatures = vec![
            v1::Signature {
                key_id: "k".repeat(MAX_KEY_ID_LEN),
                ..sig
            };
            MAX_SIGNATURES
        ];
        let len = signed.encoded_len();
        assert!(len * 4 < MAX_SIGNED_MANIFEST_LEN, "{len}");
    }

    #[test]
    fn a_tree_of_u32_max_chunks_needs_at_most_max_proof_len_hashes() {
        for index in [0, 1, u32::MAX / 2, u32::MAX - 2, u32::MAX - 1] {
            assert!(crate::merkle::proof_len(index, u32::MAX) <= MAX_PROOF_LEN);
        }
        assert_eq!(crate::merkle::proof_len(0, u32::MAX), MAX_PROOF_LEN);
    }
}
