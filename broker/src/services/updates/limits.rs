//! Bounds on what the fleet API may ask of the update server, checked, I/O-free, before
//! anything is stored, allocated or logged for a request.
//!
//! * `CreateUpdate`: a few signatures with short key ids; a structurally valid manifest (1 to
//!   16 components, each with a chunk size in bounds and a chunk count that matches its size,
//!   computed with checked arithmetic); a bounded description; and the sum of its image sizes
//!   within `updates.max_update_bytes`. Everything the gateway keeps per chunk (the upload
//!   bitmap in an update's record, the chunk digests, the Merkle tree it serves proofs from)
//!   grows with the chunk count, which the size budget bounds.
//! * `UploadChunk`: valid ids, a chunk no larger than the largest chunk size, a proof no longer
//!   than the deepest tree.

use fleet_proto::chunker::MAX_CHUNK_SIZE;
use fleet_proto::ids::{validate_id, IdError};
use fleet_proto::manifest::{self, ManifestError};
use fleet_proto::v1::{SignedManifest, UpdateManifest, UploadChunk};

// The same bounds devices apply (one place: `fleet_proto::limits`).
use fleet_proto::limits::{MAX_KEY_ID_LEN, MAX_PROOF_LEN, MAX_SIGNATURES};

/// Longest signature, in bytes (an Ed25519 signature is 64).
pub(crate) const MAX_SIGNATURE_LEN: usize = 512;

/// Why a request is refused before any work is done for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Refusal {
    /// No signature, or more than [`MAX_SIGNATURES`].
    #[error("the manifest carries {0} signatures; 1 to {MAX_SIGNATURES} are allowed")]
    SignatureCount(usize),
    /// A key id that is empty, too long or has control characters.
    #[error(
        "signature {0}: key id must be 1 to {MAX_KEY_ID_LEN} bytes without control characters"
    )]
    KeyId(usize),
    /// A signature longer than [`MAX_SIGNATURE_LEN`].
    #[error("signature {index}: {len} bytes (at most {MAX_SIGNATURE_LEN})")]
    SignatureLength {
        /// Its position.
        index: usize,
        /// Its length.
        len: usize,
    },
    /// The manifest's structure.
    #[error("manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// The images together exceed the budget (or a `u64`).
    #[error(
        "the update's images total {} bytes, over this gateway's budget of {budget} bytes \
         (updates.max_update_bytes)",
        total.map_or_else(|| "more than 2^64".to_owned(), |t| t.to_string())
    )]
    TooLarge {
        /// The sum of the component sizes, `None` when it overflows.
        total: Option<u64>,
        /// The configured budget.
        budget: u64,
    },
    /// A bad update id or component name in an upload.
    #[error("{field}: {problem}")]
    Id {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        problem: IdError,
    },
    /// A chunk larger than any chunk size allows.
    #[error("chunk of {0} bytes; no chunk is larger than {MAX_CHUNK_SIZE}")]
    ChunkData(usize),
    /// A proof with more entries than any tree has levels.
    #[error("proof of {0} hashes; at most {MAX_PROOF_LEN}")]
    ProofLength(usize),
    /// A proof entry that is not a 32-byte hash.
    #[error("proof entry {0} is not 32 bytes")]
    ProofEntry(usize),
}

/// Checks a `CreateUpdate`'s signed manifest, decoded, and returns the total size of its
/// images.
pub(crate) fn check_create(
    signed: &SignedManifest,
    m: &UpdateManifest,
    max_update_bytes: u64,
) -> Result<u64, Refusal> {
    if signed.signatures.is_empty() || signed.signatures.len() > MAX_SIGNATURES {
        return Err(Refusal::SignatureCount(signed.signatures.len()));
    }
    for (index, s) in signed.signatures.iter().enumerate() {
        if s.key_id.is_empty()
            || s.key_id.len() > MAX_KEY_ID_LEN
            || s.key_id.chars().any(char::is_control)
        {
            return Err(Refusal::KeyId(index));
        }
        if s.signature.len() > MAX_SIGNATURE_LEN {
            return Err(Refusal::SignatureLength {
                index,
                len: s.signature.len(),
            });
        }
    }
    // Components (1 to 16), chunk sizes in bounds, chunk counts that match the sizes, ids,
    // the description's length.
    manifest::validate(m)?;
    let total = m
        .components
        .iter()
        .try_fold(0u64, |sum, c| sum.checked_add(c.size));
    match total {
        Some(t) if t <= max_update_bytes => Ok(t),
        total => Err(Refusal::TooLarge {
            total,
            budget: max_update_bytes,
        }),
    }
}

/// Checks an `UploadChunk`'s fields before the update is looked up.
pub(crate) fn check_upload(req: &UploadChunk) -> Result<(), Refusal> {
    validate_id(&req.update_id).map_err(|problem| Refusal::Id {
        field: "update_id",
        problem,
    })?;
    validate_id(&req.component).map_err(|problem| Refusal::Id {
        field: "component",
        problem,
    })?;
    if req.data.len() > MAX_CHUNK_SIZE as usize {
        return Err(Refusal::ChunkData(req.data.len()));
    }
    if req.proof.len() > MAX_PROOF_LEN {
        return Err(Refusal::ProofLength(req.proof.len()));
    }
    if let Some(i) = req.proof.iter().position(|h| h.len() != 32) {
        return Err(Refusal::ProofEntry(i));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::chunker::MIN_CHUNK_SIZE;
    use fleet_proto::v1::{Component, Signature};

    const GIB: u64 = 1 << 30;

    fn component(name: &str, size: u64, chunk_size: u32) -> Component {
        Component {
            name: name.into(),
            size,
            sha256: vec![1; 32],
            chunk_size,
            chunk_count: fleet_proto::chunker::chunk_count(size, chunk_size).unwrap_or(0),
            merkle_root: vec![2; 32],
        }
    }

    fn manifest(components: Vec<Component>) -> UpdateManifest {
        UpdateManifest {
            format_version: manifest::FORMAT_VERSION,
            update_id: "fw-1".into(),
            device_class: "sensor".into(),
            version: "1.0".into(),
            sequence: 1,
            issued_at_ms: 1,
            expires_at_ms: u64::MAX,
            components,
            description: String::new(),
        }
    }

    fn signed(n: usize) -> SignedManifest {
        SignedManifest {
            withdrawal: Default::default(),
            manifest: Vec::new(),
            signatures: (0..n)
                .map(|i| Signature {
                    key_id: format!("{i:016x}"),
                    algorithm: 1,
                    signature: vec![0; 64],
                })
                .collect(),
        }
    }

    #[test]
    fn sixteen_components_of_near_u32_max_chunks_are_refused_by_the_budget() {
        // Each component has u32::MAX - 1 chunks of the smallest size: consistent, and a
        // bitmap of 512 MiB each for the record of its upload.
        let size = u64::from(u32::MAX - 1) * u64::from(MIN_CHUNK_SIZE);
        let huge = manifest(
            (0..16)
                .map(|i| component(&format!("c{i}"), size, MIN_CHUNK_SIZE))
                .collect(),
        );
        assert_eq!(huge.components[0].chunk_count, u32::MAX - 1);
        assert_eq!(
            check_create(&signed(1), &huge, GIB),
            Err(Refusal::TooLarge {
                total: Some(16 * size),
                budget: GIB
            })
        );
        let a = u64::from(u32::MAX) * u64::from(fleet_proto::chunker::MAX_CHUNK_SIZE);
        let overflow = manifest(
            (0..5)
                .map(|i| component(&format!("c{i}"), a, fleet_proto::chunker::MAX_CHUNK_SIZE))
                .collect(),
        );
        // The largest images there are (2^52 bytes each) are refused just the same.
        assert!(matches!(
            check_create(&signed(1), &overflow, GIB),
            Err(Refusal::TooLarge { total: Some(_), .. })
        ));
        // Within the budget: accepted, with its total.
        let fits = manifest(vec![
            component("rootfs", 8 << 20, 16 * 1024),
            component("boot", 1 << 20, 16 * 1024),
        ]);
        assert_eq!(check_create(&signed(1), &fits, GIB), Ok(9 << 20));
        assert_eq!(check_create(&signed(1), &fits, (9 << 20) - 1).ok(), None);
    }

    #[test]
    fn malformed_manifests_and_signatures_are_refused() {
        let ok = manifest(vec![component("rootfs", 4096, MIN_CHUNK_SIZE)]);
        assert_eq!(
            check_create(&signed(0), &ok, GIB),
            Err(Refusal::SignatureCount(0))
        );
        assert_eq!(
            check_create(&signed(MAX_SIGNATURES + 1), &ok, GIB),
            Err(Refusal::SignatureCount(MAX_SIGNATURES + 1))
        );
        let mut bad_key = signed(2);
        bad_key.signatures[1].key_id = "\u{7}".repeat(3);
        assert_eq!(check_create(&bad_key, &ok, GIB), Err(Refusal::KeyId(1)));
        bad_key.signatures[1].key_id = "k".repeat(MAX_KEY_ID_LEN + 1);
        assert_eq!(check_create(&bad_key, &ok, GIB), Err(Refusal::KeyId(1)));
        let mut long_sig = signed(1);
        long_sig.signatures[0].signature = vec![0; MAX_SIGNATURE_LEN + 1];
        assert!(matches!(
            check_create(&long_sig, &ok, GIB),
            Err(Refusal::SignatureLength { index: 0, .. })
        ));
        // 17 components, a chunk size out of bounds, a chunk count that disagrees.
        let many = manifest(
            (0..17)
                .map(|i| component(&format!("c{i}"), 4096, MIN_CHUNK_SIZE))
                .collect(),
        );
        assert!(matches!(
            check_create(&signed(1), &many, GIB),
            Err(Refusal::Manifest(ManifestError::ComponentCount(17)))
        ));
        let mut tiny = manifest(vec![component("rootfs", 4096, 16)]);
        tiny.components[0].chunk_count = 256;
        assert!(matches!(
            check_create(&signed(1), &tiny, GIB),
            Err(Refusal::Manifest(_))
        ));
        let mut lying = manifest(vec![component("rootfs", 4096, MIN_CHUNK_SIZE)]);
        lying.components[0].chunk_count = u32::MAX;
        assert!(matches!(
            check_create(&signed(1), &lying, GIB),
            Err(Refusal::Manifest(_))
        ));
        let mut chatty = ok.clone();
        chatty.description = "x".repeat(fleet_proto::limits::MAX_DESCRIPTION_LEN + 1);
        assert!(matches!(
            check_create(&signed(1), &chatty, GIB),
            Err(Refusal::Manifest(ManifestError::Description { .. }))
        ));
        assert_eq!(check_create(&signed(1), &ok, GIB), Ok(4096));
    }

    #[test]
    fn uploads_with_oversized_fields_are_refused() {
        let ok = UploadChunk {
            update_id: "fw-1".into(),
            component: "rootfs".into(),
            index: 0,
            data: vec![0; 1024],
            proof: vec![vec![0; 32]; 3],
        };
        assert_eq!(check_upload(&ok), Ok(()));
        let mut r = ok.clone();
        r.update_id = "x".repeat(1 << 20);
        assert!(matches!(
            check_upload(&r),
            Err(Refusal::Id {
                field: "update_id",
                ..
            })
        ));
        let mut r = ok.clone();
        r.component = "../etc".into();
        assert!(matches!(
            check_upload(&r),
            Err(Refusal::Id {
                field: "component",
                ..
            })
        ));
        let mut r = ok.clone();
        r.data = vec![0; MAX_CHUNK_SIZE as usize + 1];
        assert!(matches!(check_upload(&r), Err(Refusal::ChunkData(_))));
        let mut r = ok.clone();
        r.proof = vec![vec![0; 32]; 100_000];
        assert_eq!(check_upload(&r), Err(Refusal::ProofLength(100_000)));
        let mut r = ok;
        r.proof[2] = Vec::new();
        assert_eq!(check_upload(&r), Err(Refusal::ProofEntry(2)));
    }
}
