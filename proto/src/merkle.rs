//! Merkle tree over chunk digests, with per-chunk inclusion proofs.
//!
//! * `d_i = SHA-256(chunk_i)`, `leaf_i = SHA-256(0x00 || d_i)`,
//!   `node = SHA-256(0x01 || left || right)`: the prefixes keep a leaf from ever passing for an
//!   inner node (second-preimage resistance).
//! * Levels pair neighbours left to right; an unpaired last node is promoted unchanged (never
//!   duplicated, so two different chunk lists can never share a root). This is the RFC 9162
//!   tree shape. The root of a single-chunk image is `leaf_0`.
//! * A proof is the list of sibling hashes from the leaf level up, one per level where the node
//!   has a sibling. Verification needs the chunk's index and the chunk count, both taken from
//!   the signed manifest, so a proof binds a chunk to its position.

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Domain prefix of a leaf hash.
const LEAF: u8 = 0x00;
/// Domain prefix of an inner node hash.
const NODE: u8 = 0x01;

/// SHA-256 of one chunk's bytes (`d_i`).
pub fn chunk_digest(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// Leaf hash of a chunk digest.
pub fn leaf_hash(chunk_digest: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([LEAF]);
    h.update(chunk_digest);
    h.finalize().into()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([NODE]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Why a proof does not verify, or a tree cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MerkleError {
    /// A tree needs at least one chunk.
    #[error("a Merkle tree needs at least one chunk")]
    Empty,
    /// The index is not below the chunk count.
    #[error("chunk index {index} is out of range for {count} chunks")]
    IndexOutOfRange {
        /// The index asked for.
        index: u32,
        /// The chunk count.
        count: u32,
    },
    /// The proof has a different number of hashes than the tree shape needs.
    #[error("proof has {got} hashes; {expected} expected for chunk {index} of {count}")]
    ProofLength {
        /// The chunk index.
        index: u32,
        /// The chunk count.
        count: u32,
        /// Hashes the shape needs.
        expected: usize,
        /// Hashes received.
        got: usize,
    },
    /// A proof element is not 32 bytes.
    #[error("proof element {position} is {len} bytes, not 32")]
    ProofElementSize {
        /// Position in the proof.
        position: usize,
        /// Its length.
        len: usize,
    },
    /// The recomputed root differs from the expected one.
    #[error("chunk {index} does not hash to the Merkle root")]
    RootMismatch {
        /// The chunk index.
        index: u32,
    },
}

/// Number of proof hashes for `index` in a tree of `count` leaves (`index < count`): at most
/// [`crate::limits::MAX_PROOF_LEN`]. Any `u32` values are safe (no overflow, no panic).
pub fn proof_len(index: u32, count: u32) -> usize {
    let (mut i, mut n, mut len) = (index, count, 0);
    while n > 1 {
        // `n > 1`, so `n - 1` cannot underflow (and `i + 1` could overflow).
        if i % 2 == 1 || i < n - 1 {
            len += 1;
        }
        i /= 2;
        n = n.div_ceil(2);
    }
    len
}

/// A whole tree kept in memory, level by level (32 bytes per node, about 64 bytes per chunk):
/// what the gateway's update server holds per component to answer with proofs.
#[derive(Debug, Clone)]
pub struct MerkleTree {
    /// `levels[0]` are the leaves, the last level is the root alone.
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// Builds the tree from the chunk digests `d_i`, in order.
    pub fn from_chunk_digests(digests: &[Hash]) -> Result<Self, MerkleError> {
        if digests.is_empty() {
            return Err(MerkleError::Empty);
        }
        if u32::try_from(digests.len()).is_err() {
            return Err(MerkleError::IndexOutOfRange {
                index: u32::MAX,
                count: u32::MAX,
            });
        }
        let mut levels = vec![digests.iter().map(leaf_hash).collect::<Vec<_>>()];
        while let Some(below) = levels.last().filter(|l| l.len() > 1) {
            let up = below
                .chunks(2)
                // chunks(2) yields one or two nodes; a lone last node is promoted.
                .map(|pair| match pair {
                    [l, r] => node_hash(l, r),
                    other => other[0],
                })
                .collect();
            levels.push(up);
        }
        Ok(Self { levels })
    }

    /// Number of chunks (leaves).
    pub fn len(&self) -> u32 {
        // Bounded by the check in `from_chunk_digests`.
        self.levels[0].len() as u32
    }

    /// Always false: a tree has at least one leaf.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The root hash.
    pub fn root(&self) -> Hash {
        // The constructor guarantees a last level of exactly one node.
        self.levels[self.levels.len() - 1][0]
    }

    /// The inclusion proof of chunk `index`.
    pub fn proof(&self, index: u32) -> Result<Vec<Hash>, MerkleError> {
        let count = self.len();
        if index >= count {
            return Err(MerkleError::IndexOutOfRange { index, count });
        }
        let mut i = index as usize;
        let mut proof = Vec::with_capacity(proof_len(index, count));
        for level in &self.levels[..self.levels.len() - 1] {
            let sibling = i ^ 1;
            if sibling < level.len() {
                proof.push(level[sibling]);
            }
            i /= 2;
        }
        Ok(proof)
    }
}

/// The root over chunk digests, without keeping the tree.
pub fn root(digests: &[Hash]) -> Result<Hash, MerkleError> {
    MerkleTree::from_chunk_digests(digests).map(|t| t.root())
}

/// Checks that a chunk with digest `digest` sits at `index` in the tree of `count` chunks whose
/// root is `root`. Proof elements arrive off the wire, hence `AsRef<[u8]>` with a length check.
pub fn verify<P: AsRef<[u8]>>(
    root: &Hash,
    count: u32,
    index: u32,
    digest: &Hash,
    proof: &[P],
) -> Result<(), MerkleError> {
    if index >= count {
        return Err(MerkleError::IndexOutOfRange { index, count });
    }
    let expected = proof_len(index, count);
    if proof.len() != expected {
        return Err(MerkleError::ProofLength {
            index,
            count,
            expected,
            got: proof.len(),
        });
    }
    let mut acc = leaf_hash(digest);
    let mut siblings = proof.iter().enumerate();
    let (mut i, mut n) = (index, count);
    while n > 1 {
        let is_right = i % 2 == 1;
        if is_right || i < n - 1 {
            // proof_len() counted exactly these steps, so the iterator cannot run dry.
            let Some((position, p)) = siblings.next() else {
                return Err(MerkleError::RootMismatch { index });
            };
            let sibling: &Hash =
                p.as_ref()
                    .try_into()
                    .map_err(|_| MerkleError::ProofElementSize {
                        position,
                        len: p.as_ref().len(),
                    })?;
            acc = if is_right {
                node_hash(sibling, &acc)
            } else {
                node_hash(&acc, sibling)
            };
        }
        i /= 2;
        n = n.div_ceil(2);
    }
    if &acc == root {
        Ok(())
    } else {
        Err(MerkleError::RootMismatch { index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_chunk_checks_index_length_and_proof() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let summary =
            crate::chunker::summarize(data.as_slice(), 1024).unwrap_or_else(|e| panic!("{e}"));
        let c = summary.component("rootfs");
        let digests: Vec<Hash> = data.chunks(1024).map(chunk_digest).collect();
        let tree = MerkleTree::from_chunk_digests(&digests).unwrap_or_else(|e| panic!("{e}"));
        let proof = |i| tree.proof(i).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            verify_chunk(&c, 4, &data[4096..], &proof(4)),
            Ok((4096, digests[4]))
        );
        assert!(matches!(
            verify_chunk(&c, 5, &data[..1], &proof(4)),
            Err(ChunkCheckError::Index { index: 5, count: 5 })
        ));
        assert!(matches!(
            verify_chunk(&c, 4, &data[4095..], &proof(4)),
            Err(ChunkCheckError::Length { .. })
        ));
        assert!(matches!(
            verify_chunk(&c, 1, &data[..1024], &proof(1)),
            Err(ChunkCheckError::Proof { index: 1, .. })
        ));
        let mut rootless = c.clone();
        rootless.merkle_root.pop();
        assert_eq!(
            verify_chunk(&rootless, 0, &data[..1024], &proof(0)),
            Err(ChunkCheckError::Root)
        );
    }
    use proptest::prelude::*;

    fn digests(n: u32) -> Vec<Hash> {
        (0..n).map(|i| chunk_digest(&i.to_le_bytes())).collect()
    }

    fn tree(n: u32) -> MerkleTree {
        MerkleTree::from_chunk_digests(&digests(n)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The RFC 9162 definition, recursively: the reference the level-wise code must match.
    fn rfc_root(leaves: &[Hash]) -> Hash {
        if leaves.len() == 1 {
            return leaves[0];
        }
        let k = leaves.len().next_power_of_two() / 2;
        node_hash(&rfc_root(&leaves[..k]), &rfc_root(&leaves[k..]))
    }

    #[test]
    fn empty_is_refused() {
        assert_eq!(root(&[]).err(), Some(MerkleError::Empty));
    }

    #[test]
    fn single_chunk_root_is_its_leaf() {
        let d = digests(1);
        assert_eq!(root(&d), Ok(leaf_hash(&d[0])));
        assert_eq!(tree(1).proof(0), Ok(vec![]));
    }

    #[test]
    fn known_shape_for_three() {
        let d = digests(3);
        let l: Vec<Hash> = d.iter().map(leaf_hash).collect();
        let expected = node_hash(&node_hash(&l[0], &l[1]), &l[2]);
        assert_eq!(root(&d), Ok(expected));
        // Chunk 2 is promoted at the first level: its proof is only the left subtree.
        assert_eq!(tree(3).proof(2), Ok(vec![node_hash(&l[0], &l[1])]));
    }

    #[test]
    fn every_index_verifies_for_the_required_counts() {
        for n in [1u32, 2, 3, 7, 1000] {
            let d = digests(n);
            let t = tree(n);
            let r = t.root();
            let leaves: Vec<Hash> = d.iter().map(leaf_hash).collect();
            assert_eq!(r, rfc_root(&leaves), "n={n}");
            for i in 0..n {
                let proof = t.proof(i).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(proof.len(), proof_len(i, n));
                assert_eq!(
                    verify(&r, n, i, &d[i as usize], &proof),
                    Ok(()),
                    "n={n} i={i}"
                );
            }
        }
    }

    #[test]
    fn tampering_is_caught_at_every_index() {
        for n in [1u32, 2, 3, 7, 1000] {
            let d = digests(n);
            let t = tree(n);
            let r = t.root();
            for i in 0..n {
                let proof = t.proof(i).unwrap_or_else(|e| panic!("{e}"));
                // Tampered chunk.
                let bad = chunk_digest(b"not the chunk");
                assert!(verify(&r, n, i, &bad, &proof).is_err(), "chunk n={n} i={i}");
                // Tampered proof: flip one bit of each element in turn.
                for k in 0..proof.len() {
                    let mut p = proof.clone();
                    p[k][7] ^= 0x20;
                    assert!(
                        verify(&r, n, i, &d[i as usize], &p).is_err(),
                        "proof n={n} i={i}"
                    );
                }
                // Truncated and extended proofs.
                if !proof.is_empty() {
                    assert!(verify(&r, n, i, &d[i as usize], &proof[1..]).is_err());
                }
                let mut longer = proof.clone();
                longer.push([0; 32]);
                assert!(verify(&r, n, i, &d[i as usize], &longer).is_err());
                // Wrong index: the proof of i does not place chunk i anywhere else.
                for j in [i.wrapping_sub(1), i + 1, n - 1 - i] {
                    if j < n && j != i {
                        assert!(
                            verify(&r, n, j, &d[i as usize], &proof).is_err(),
                            "n={n} {i}->{j}"
                        );
                    }
                }
            }
            assert_eq!(
                verify(&r, n, n, &d[0], &Vec::<Hash>::new()),
                Err(MerkleError::IndexOutOfRange { index: n, count: n })
            );
        }
    }

    #[test]
    fn malformed_proof_elements_are_errors_not_panics() {
        let d = digests(4);
        let t = tree(4);
        let proof: Vec<Vec<u8>> = vec![vec![1; 31], vec![2; 33]];
        assert_eq!(
            verify(&t.root(), 4, 0, &d[0], &proof),
            Err(MerkleError::ProofElementSize {
                position: 0,
                len: 31
            })
        );
    }

    #[test]
    fn extreme_counts_and_indexes_neither_overflow_nor_panic() {
        let d = chunk_digest(b"x");
        let r = [7; 32];
        // The deepest trees a manifest can name.
        assert_eq!(proof_len(0, u32::MAX), 32);
        assert_eq!(proof_len(1 << 31, u32::MAX), 32);
        // The last chunk of an odd count is promoted at the first level.
        assert_eq!(proof_len(u32::MAX - 1, u32::MAX), 31);
        // Out-of-contract values are still safe.
        for (index, count) in [(u32::MAX, u32::MAX), (u32::MAX, 0), (u32::MAX, 1), (0, 0)] {
            assert!(proof_len(index, count) <= 32);
        }
        assert_eq!(
            verify(&r, u32::MAX, u32::MAX, &d, &Vec::<Hash>::new()),
            Err(MerkleError::IndexOutOfRange {
                index: u32::MAX,
                count: u32::MAX
            })
        );
        assert_eq!(
            verify(&r, 0, 0, &d, &Vec::<Hash>::new()),
            Err(MerkleError::IndexOutOfRange { index: 0, count: 0 })
        );
        // A proof of the right length for the deepest tree is hashed to a mismatch, one entry
        // too many is refused by its length.
        let proof = vec![[0u8; 32]; 32];
        assert_eq!(
            verify(&r, u32::MAX, 1 << 31, &d, &proof),
            Err(MerkleError::RootMismatch { index: 1 << 31 })
        );
        let long = vec![[0u8; 32]; 33];
        assert!(matches!(
            verify(&r, u32::MAX, 1 << 31, &d, &long),
            Err(MerkleError::ProofLength {
                expected: 32,
                got: 33,
                ..
            })
        ));
    }

    #[test]
    fn chunk_checks_survive_extreme_components() {
        let huge = crate::v1::Component {
            name: "rootfs".into(),
            size: u64::MAX,
            sha256: vec![0; 32],
            chunk_size: crate::chunker::MAX_CHUNK_SIZE,
            chunk_count: u32::MAX,
            merkle_root: vec![0; 32],
        };
        let none: [Hash; 0] = [];
        // The last index of u32::MAX chunks of 1 MiB: its offset is near 2^52, no overflow.
        assert!(matches!(
            verify_chunk(&huge, u32::MAX - 1, &[0; 10], &none),
            Err(ChunkCheckError::Length {
                expected: 1_048_576,
                ..
            })
        ));
        assert!(matches!(
            verify_chunk(&huge, u32::MAX, &[], &none),
            Err(ChunkCheckError::Index { .. })
        ));
        // A chunk size of 0 (never valid, but a caller may not have validated) names no chunk.
        let zero = crate::v1::Component {
            chunk_size: 0,
            ..huge.clone()
        };
        assert!(matches!(
            verify_chunk(&zero, 0, &[], &none),
            Err(ChunkCheckError::Index { .. })
        ));
        // A proof longer than the tree needs is refused by its length, before any hashing.
        let data = vec![0; 1 << 20];
        let long = vec![[0u8; 32]; 33];
        assert!(matches!(
            verify_chunk(&huge, 0, &data, &long),
            Err(ChunkCheckError::Proof {
                source: MerkleError::ProofLength { got: 33, .. },
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn prop_proofs_verify_and_bind(n in 1u32..300, seed in any::<u64>(), pick in any::<u32>()) {
            let d: Vec<Hash> = (0..n).map(|i| chunk_digest(&[seed.to_le_bytes(), u64::from(i).to_le_bytes()].concat())).collect();
            let t = MerkleTree::from_chunk_digests(&d).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let leaves: Vec<Hash> = d.iter().map(leaf_hash).collect();
            prop_assert_eq!(t.root(), rfc_root(&leaves));
            let i = pick % n;
            let proof = t.proof(i).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(verify(&t.root(), n, i, &d[i as usize], &proof).is_ok());
            // Any other chunk at this position fails.
            let other = d[((i + 1) % n) as usize];
            if n > 1 {
                prop_assert!(verify(&t.root(), n, i, &other, &proof).is_err());
            }
            // Any other position for this chunk fails.
            let j = (i + 1 + pick % n.max(2)) % n;
            if j != i {
                prop_assert!(verify(&t.root(), n, j, &d[i as usize], &proof).is_err());
            }
        }

        #[test]
        fn prop_different_lists_different_roots(a in prop::collection::vec(any::<[u8; 4]>(), 1..40),
                                                b in prop::collection::vec(any::<[u8; 4]>(), 1..40)) {
            let da: Vec<Hash> = a.iter().map(|x| chunk_digest(x)).collect();
            let db: Vec<Hash> = b.iter().map(|x| chunk_digest(x)).collect();
            if da != db {
                prop_assert_ne!(root(&da), root(&db));
            }
        }
    }
}

/// Why a received chunk is not the chunk the manifest describes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkCheckError {
    /// The component's Merkle root is not 32 bytes.
    #[error("the component has no usable Merkle root")]
    Root,
    /// The index is past the component's last chunk.
    #[error("index {index} is beyond the {count} chunks")]
    Index {
        /// The index received.
        index: u32,
        /// Chunks in the component.
        count: u32,
    },
    /// The data is not the chunk's length.
    #[error("chunk {index} is {got} bytes, expected {expected}")]
    Length {
        /// The index.
        index: u32,
        /// Bytes received.
        got: usize,
        /// Bytes the chunk has.
        expected: usize,
    },
    /// The proof does not lead from this data at this index to the root.
    #[error("chunk {index}: {source}")]
    Proof {
        /// The index.
        index: u32,
        /// What failed.
        source: MerkleError,
    },
}

/// Checks chunk `index` of component `c` as received (data and proof from the wire) against
/// the component's signed description. Returns the chunk's byte offset and digest. Everything
/// that costs nothing (root, index, length, proof length) is checked before the chunk is
/// hashed.
pub fn verify_chunk<P: AsRef<[u8]>>(
    c: &crate::v1::Component,
    index: u32,
    data: &[u8],
    proof: &[P],
) -> Result<(u64, Hash), ChunkCheckError> {
    let root: Hash = c
        .merkle_root
        .as_slice()
        .try_into()
        .map_err(|_| ChunkCheckError::Root)?;
    let (offset, len) = crate::chunker::chunk_span(index, c.size, c.chunk_size)
        .filter(|_| index < c.chunk_count)
        .ok_or(ChunkCheckError::Index {
            index,
            count: c.chunk_count,
        })?;
    if data.len() != len {
        return Err(ChunkCheckError::Length {
            index,
            got: data.len(),
            expected: len,
        });
    }
    let expected = proof_len(index, c.chunk_count);
    if proof.len() != expected {
        return Err(ChunkCheckError::Proof {
            index,
            source: MerkleError::ProofLength {
                index,
                count: c.chunk_count,
                expected,
                got: proof.len(),
            },
        });
    }
    let digest = chunk_digest(data);
    verify(&root, c.chunk_count, index, &digest, proof)
        .map_err(|source| ChunkCheckError::Proof { index, source })?;
    Ok((offset, digest))
}
