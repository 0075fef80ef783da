//! `merkle::verify` on arbitrary proofs.
//!
//! Input: a leaf count (first byte, 1 to 256), the claimed index (second byte, may be out of
//! range), then edits applied to the true proof of that index, two bytes each (what, where).
//! The tree is real (built from the chunk digests with `MerkleTree`), so the property is exact:
//! verification succeeds if and only if the claimed index is in range and the proof is the
//! tree's own, unedited. The raw form (arbitrary count and index, up to `u32::MAX`) runs too,
//! for "never panics".
#![no_main]

use fleet_proto::merkle::{self, Hash, MerkleTree};
use libfuzzer_sys::fuzz_target;

fn digest(i: u32) -> Hash {
    merkle::chunk_digest(&i.to_le_bytes())
}

fuzz_target!(|data: &[u8]| {
    let [count, index, edits @ ..] = data else {
        return;
    };
    let count = u32::from(*count) + 1;
    let index = u32::from(*index);
    let digests: Vec<Hash> = (0..count).map(digest).collect();
    let tree = MerkleTree::from_chunk_digests(&digests).expect("a tree of 1 to 256 leaves");
    let root = tree.root();
    let real: Vec<Vec<u8>> = tree
        .proof(index.min(count - 1))
        .expect("an index in range has a proof")
        .iter()
        .map(|h| h.to_vec())
        .collect();
    let mut proof = real.clone();
    for edit in edits.chunks(2) {
        let (what, at) = (edit[0], usize::from(*edit.get(1).unwrap_or(&0)));
        match what % 5 {
            0 if !proof.is_empty() => {
                let n = proof.len();
                let entry = &mut proof[at % n];
                if !entry.is_empty() {
                    let len = entry.len();
                    entry[at % len] ^= 1 << (what >> 5);
                }
            }
            1 if !proof.is_empty() => {
                let n = proof.len();
                proof.remove(at % n);
            }
            2 => {
                let n = proof.len() + 1;
                proof.insert(at % n, digest(u32::from(what)).to_vec());
            }
            3 if !proof.is_empty() => {
                let n = proof.len();
                proof[at % n].pop();
            }
            4 if !proof.is_empty() => {
                let n = proof.len();
                proof[at % n].push(what);
            }
            _ => {}
        }
    }
    let claimed_digest = digests[(index % count) as usize];
    let ok = merkle::verify(&root, count, index, &claimed_digest, &proof).is_ok();
    let expected = index < count && proof == real;
    assert_eq!(ok, expected, "count {count} index {index} proof {proof:?}");

    // The same bytes read raw: any count and index, any root, any proof entries.
    if data.len() >= 8 + 32 {
        let count = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let index = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
        let mut root: Hash = [0; 32];
        root.copy_from_slice(&data[8..40]);
        let proof: Vec<&[u8]> = data[40..].chunks(32).collect();
        let _ = merkle::verify(&root, count, index, &claimed_digest, &proof);
        let _ = merkle::proof_len(index, count);
    }
});
