//! Bounded decoding of the update messages a device receives from the network.
//!
//! prost allocates for every entry of a repeated field as it decodes: an empty `bytes` entry
//! costs two input bytes and a 24-byte `Vec` (plus the outer vector's growth), so a 1 MiB
//! `Chunk` of empty proof entries becomes over 12 MiB in memory before anyone can look at it.
//! The functions here first walk the protobuf wire format of the untrusted bytes (tags,
//! varints, length prefixes; no allocation) and refuse a message whose repeated fields have
//! more entries, or whose fields are longer, than the bounds in [`crate::limits`]; only then do
//! they let prost decode it.
//!
//! The walk follows prost's own rules (varints of at most 10 bytes, keys within `u32`, wire
//! types 0 to 5, field numbers from 1, groups skipped to their matching end with prost's
//! recursion limit, the wire type prost expects for each known field, UTF-8 for strings), so
//! for any input it accepts exactly what prost accepts, minus what is over the bounds. Bounds
//! apply to the decoded value: for a singular field the last occurrence counts (prost keeps
//! the last), for a repeated field every entry and their number.

use crate::limits::{
    MAX_CHUNK_SIZE, MAX_COMPONENT_NAME_LEN, MAX_KEY_ID_LEN, MAX_SIGNATURES,
    MAX_SIGNED_MANIFEST_LEN, MAX_UPDATE_ID_LEN,
};
use crate::merkle::Hash;
use crate::v1;
use prost::Message as _;

/// prost's nesting limit for messages and groups (`prost::RECURSION_LIMIT`, not public).
const RECURSION_LIMIT: u32 = 100;

/// Why untrusted bytes were refused before or while decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The whole message is larger than its bound.
    #[error("message is {len} bytes; at most {max} are accepted")]
    TooLarge {
        /// Its length in bytes.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A repeated field has more entries than its bound (counting stopped there).
    #[error("more than {max} {field} entries")]
    TooMany {
        /// The field's name.
        field: &'static str,
        /// The bound.
        max: usize,
    },
    /// A field is longer than its bound.
    #[error("{field} is {len} bytes; at most {max} are accepted")]
    FieldTooLong {
        /// The field's name.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The bytes are not well-formed protobuf for this message (prost would refuse them too).
    #[error("not a well-formed message: {0}")]
    Malformed(&'static str),
    /// prost refused the message after the walk accepted it.
    #[error("does not decode: {0}")]
    Decode(prost::DecodeError),
}

impl WireError {
    /// Whether the message was refused for a bound rather than for being malformed.
    pub fn is_over_bound(&self) -> bool {
        matches!(
            self,
            WireError::TooLarge { .. } | WireError::TooMany { .. } | WireError::FieldTooLong { .. }
        )
    }
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// A cursor over untrusted protobuf bytes. Every read is bounds-checked; nothing allocates.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// A varint as prost reads it: at most 10 bytes, the 10th at most 1.
    fn varint(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for (i, &b) in self.buf.iter().take(10).enumerate() {
            // i <= 9, so the shift is at most 63.
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                if i == 9 && b >= 2 {
                    return Err(WireError::Malformed("varint overflows 64 bits"));
                }
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err(WireError::Malformed("truncated or over-long varint"))
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], WireError> {
        match usize::try_from(len) {
            Ok(len) if len <= self.buf.len() => {
                let (head, tail) = self.buf.split_at(len);
                self.buf = tail;
                Ok(head)
            }
            _ => Err(WireError::Malformed(
                "field runs past the end of the message",
            )),
        }
    }

    /// A field key: (field number, wire type).
    fn key(&mut self) -> Result<(u32, u8), WireError> {
        let key = u32::try_from(self.varint()?)
            .map_err(|_| WireError::Malformed("field key out of range"))?;
        let wire = (key & 7) as u8;
        if wire > FIXED32 {
            return Err(WireError::Malformed("unknown wire type"));
        }
        let tag = key >> 3;
        if tag == 0 {
            return Err(WireError::Malformed("field number 0"));
        }
        Ok((tag, wire))
    }

    /// A length-delimited field's contents.
    fn delimited(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.varint()?;
        self.take(len)
    }

    /// Skips an unknown field as prost does; `depth` is prost's remaining recursion budget.
    fn skip(&mut self, wire: u8, tag: u32, depth: u32) -> Result<(), WireError> {
        if depth == 0 {
            return Err(WireError::Malformed("nested too deeply"));
        }
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            FIXED32 => self.take(4).map(drop),
            LEN => self.delimited().map(drop),
            START_GROUP => loop {
                let (inner_tag, inner_wire) = self.key()?;
                if inner_wire == END_GROUP {
                    if inner_tag != tag {
                        return Err(WireError::Malformed("group ends with another tag"));
                    }
                    return Ok(());
                }
                self.skip(inner_wire, inner_tag, depth - 1)?;
            },
            _ => Err(WireError::Malformed("end of a group that was not started")),
        }
    }
}

fn expect(wire: u8, want: u8) -> Result<(), WireError> {
    if wire == want {
        Ok(())
    } else {
        Err(WireError::Malformed("known field with the wrong wire type"))
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, WireError> {
    std::str::from_utf8(bytes).map_err(|_| WireError::Malformed("string field is not UTF-8"))
}

fn at_most(field: &'static str, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        Err(WireError::FieldTooLong { field, len, max })
    } else {
        Ok(())
    }
}

/// What a `Chunk` says about itself, read without decoding it: enough to drop a chunk nobody
/// asked for before its data and proof are copied anywhere.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkHeader<'a> {
    /// `Chunk.update_id`.
    pub update_id: &'a str,
    /// `Chunk.component`.
    pub component: &'a str,
    /// `Chunk.index`.
    pub index: u32,
    /// `Chunk.request_id`.
    pub request_id: u64,
    /// Length of `Chunk.data` in bytes.
    pub data_len: usize,
    /// Number of `Chunk.proof` entries.
    pub proof_len: usize,
}

/// Walks an encoded `Chunk` without decoding it, and refuses it when it is not well-formed,
/// has more than `max_proof` proof entries (counting stops at the first one over), a proof
/// entry longer than a hash, an update id or component name longer than an id, or data longer
/// than [`MAX_CHUNK_SIZE`]. Use [`crate::limits::MAX_PROOF_LEN`] as `max_proof`, or the exact
/// [`crate::merkle::proof_len`] when the component is already known.
pub fn peek_chunk(bytes: &[u8], max_proof: usize) -> Result<ChunkHeader<'_>, WireError> {
    let mut r = Reader::new(bytes);
    let mut h = ChunkHeader::default();
    while !r.is_empty() {
        let (tag, wire) = r.key()?;
        match tag {
            1 | 2 => {
                expect(wire, LEN)?;
                let s = utf8(r.delimited()?)?;
                if tag == 1 {
                    h.update_id = s;
                } else {
                    h.component = s;
                }
            }
            3 => {
                expect(wire, VARINT)?;
                // prost truncates a uint32 varint the same way.
                h.index = r.varint()? as u32;
            }
            4 => {
                expect(wire, LEN)?;
                h.data_len = r.delimited()?.len();
            }
            5 => {
                expect(wire, LEN)?;
                let entry = r.delimited()?;
                if h.proof_len >= max_proof {
                    return Err(WireError::TooMany {
                        field: "proof",
                        max: max_proof,
                    });
                }
                h.proof_len += 1;
                at_most("proof entry", entry.len(), std::mem::size_of::<Hash>())?;
            }
            6 => {
                expect(wire, VARINT)?;
                h.request_id = r.varint()?;
            }
            _ => r.skip(wire, tag, RECURSION_LIMIT)?,
        }
    }
    at_most("update id", h.update_id.len(), MAX_UPDATE_ID_LEN)?;
    at_most("component", h.component.len(), MAX_COMPONENT_NAME_LEN)?;
    at_most("data", h.data_len, MAX_CHUNK_SIZE as usize)?;
    Ok(h)
}

/// Decodes an untrusted `Chunk` after [`peek_chunk`] accepted it, so prost never allocates
/// for more than `max_proof` proof entries of at most 32 bytes, one id-sized update id and
/// component, and at most [`MAX_CHUNK_SIZE`] bytes of data.
pub fn decode_chunk_bounded(bytes: &[u8], max_proof: usize) -> Result<v1::Chunk, WireError> {
    peek_chunk(bytes, max_proof)?;
    v1::Chunk::decode(bytes).map_err(WireError::Decode)
}

/// Walks an encoded `SignedManifest` without decoding it, and refuses it when it is larger
/// than [`MAX_SIGNED_MANIFEST_LEN`] (checked first, before reading a byte), not well-formed,
/// carries more than [`MAX_SIGNATURES`] signatures (counting stops at the first one over), or
/// a key id longer than [`MAX_KEY_ID_LEN`]. Returns the number of signatures.
pub fn check_signed_manifest(bytes: &[u8]) -> Result<usize, WireError> {
    if bytes.len() > MAX_SIGNED_MANIFEST_LEN {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: MAX_SIGNED_MANIFEST_LEN,
        });
    }
    let mut r = Reader::new(bytes);
    let mut signatures = 0;
    while !r.is_empty() {
        let (tag, wire) = r.key()?;
        match tag {
            // manifest, withdrawal
            1 | 3 => {
                expect(wire, LEN)?;
                r.delimited()?;
            }
            2 => {
                expect(wire, LEN)?;
                let inner = r.delimited()?;
                if signatures >= MAX_SIGNATURES {
                    return Err(WireError::TooMany {
                        field: "signature",
                        max: MAX_SIGNATURES,
                    });
                }
                signatures += 1;
                // prost decodes a nested message one recursion level down.
                check_signature(inner, RECURSION_LIMIT - 1)?;
            }
            _ => r.skip(wire, tag, RECURSION_LIMIT)?,
        }
    }
    Ok(signatures)
}

fn check_signature(bytes: &[u8], depth: u32) -> Result<(), WireError> {
    let mut r = Reader::new(bytes);
    let mut key_id = "";
    while !r.is_empty() {
        let (tag, wire) = r.key()?;
        match tag {
            1 => {
                expect(wire, LEN)?;
                key_id = utf8(r.delimited()?)?;
            }
            2 => {
                expect(wire, VARINT)?;
                r.varint()?;
            }
            3 => {
                expect(wire, LEN)?;
                r.delimited()?;
            }
            _ => r.skip(wire, tag, depth)?,
        }
    }
    at_most("key id", key_id.len(), MAX_KEY_ID_LEN)
}

/// Decodes an untrusted `SignedManifest` after [`check_signed_manifest`] accepted it.
pub fn decode_signed_manifest_bounded(bytes: &[u8]) -> Result<v1::SignedManifest, WireError> {
    check_signed_manifest(bytes)?;
    v1::SignedManifest::decode(bytes).map_err(WireError::Decode)
}

/// The contents of the last occurrence of length-delimited field `tag` at the top level of
/// `bytes`, walking (not decoding) the message; `None` if the walk finds it malformed or the
/// field absent.
fn last_delimited(bytes: &[u8], tag: u32) -> Option<&[u8]> {
    let mut r = Reader::new(bytes);
    let mut found = None;
    while !r.is_empty() {
        let (t, wire) = r.key().ok()?;
        if t == tag {
            expect(wire, LEN).ok()?;
            found = Some(r.delimited().ok()?);
        } else {
            r.skip(wire, t, RECURSION_LIMIT).ok()?;
        }
    }
    found
}

/// The `update_id` of the manifest inside an encoded `SignedManifest`, read without decoding
/// anything and without verifying anything: `None` when the envelope is over its bounds
/// ([`check_signed_manifest`]), when the envelope or the manifest's top level is not
/// well-formed, or when there is no update id. Unauthenticated: report it only through
/// [`crate::report::reportable_update_id`].
pub fn peek_update_id(signed: &[u8]) -> Option<&str> {
    check_signed_manifest(signed).ok()?;
    let manifest = last_delimited(signed, 1)?;
    std::str::from_utf8(last_delimited(manifest, 2)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_PROOF_LEN;
    use proptest::prelude::*;

    fn chunk() -> v1::Chunk {
        v1::Chunk {
            update_id: "fw-1.1".into(),
            component: "rootfs".into(),
            index: 7,
            data: vec![5; 1024],
            proof: vec![vec![1; 32]; 10],
            request_id: 99,
        }
    }

    fn signed() -> v1::SignedManifest {
        v1::SignedManifest {
            withdrawal: Default::default(),
            manifest: vec![1, 2, 3],
            signatures: vec![
                v1::Signature {
                    key_id: "0123456789abcdef".into(),
                    algorithm: 1,
                    signature: vec![9; 64],
                };
                2
            ],
        }
    }

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    #[test]
    fn a_good_chunk_is_peeked_and_decoded() {
        let bytes = chunk().encode_to_vec();
        let h = peek_chunk(&bytes, MAX_PROOF_LEN).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            h,
            ChunkHeader {
                update_id: "fw-1.1",
                component: "rootfs",
                index: 7,
                request_id: 99,
                data_len: 1024,
                proof_len: 10,
            }
        );
        assert_eq!(decode_chunk_bounded(&bytes, 10), Ok(chunk()));
        assert_eq!(
            decode_chunk_bounded(&bytes, 9),
            Err(WireError::TooMany {
                field: "proof",
                max: 9
            })
        );
    }

    #[test]
    fn empty_proof_entries_are_refused_before_decoding() {
        // 1 MiB of `2a 00`: half a million empty proof entries, 12+ MiB once decoded.
        let bytes = [0x2a, 0x00].repeat(512 * 1024);
        assert_eq!(
            decode_chunk_bounded(&bytes, MAX_PROOF_LEN),
            Err(WireError::TooMany {
                field: "proof",
                max: MAX_PROOF_LEN
            })
        );
        // Exactly at the bound is fine.
        let ok = [0x2a, 0x00].repeat(MAX_PROOF_LEN);
        assert_eq!(
            decode_chunk_bounded(&ok, MAX_PROOF_LEN).map(|c| c.proof.len()),
            Ok(MAX_PROOF_LEN)
        );
    }

    #[test]
    fn over_long_fields_are_refused() {
        let mut c = chunk();
        c.proof[3] = vec![0; 33];
        assert!(matches!(
            decode_chunk_bounded(&c.encode_to_vec(), MAX_PROOF_LEN),
            Err(WireError::FieldTooLong {
                field: "proof entry",
                len: 33,
                ..
            })
        ));
        let mut c = chunk();
        c.update_id = "u".repeat(MAX_UPDATE_ID_LEN + 1);
        assert!(matches!(
            decode_chunk_bounded(&c.encode_to_vec(), MAX_PROOF_LEN),
            Err(WireError::FieldTooLong {
                field: "update id",
                ..
            })
        ));
        let mut c = chunk();
        c.component = "\u{1}".repeat(1000);
        assert!(matches!(
            decode_chunk_bounded(&c.encode_to_vec(), MAX_PROOF_LEN),
            Err(WireError::FieldTooLong {
                field: "component",
                ..
            })
        ));
        let mut c = chunk();
        c.data = vec![0; MAX_CHUNK_SIZE as usize + 1];
        assert!(matches!(
            decode_chunk_bounded(&c.encode_to_vec(), MAX_PROOF_LEN),
            Err(WireError::FieldTooLong { field: "data", .. })
        ));
        // Last occurrence wins, as in prost: a long id followed by a short one is fine.
        let mut bytes = v1::Chunk {
            update_id: "u".repeat(1000),
            ..Default::default()
        }
        .encode_to_vec();
        bytes.extend(chunk().encode_to_vec());
        assert_eq!(decode_chunk_bounded(&bytes, MAX_PROOF_LEN), Ok(chunk()));
    }

    #[test]
    fn malformed_chunks_are_refused_like_prost_does() {
        let mut long_varint = vec![0x18];
        long_varint.extend([0xff; 9]);
        long_varint.push(0x02);
        // Field 7 as nested groups: prost skips 100 levels and refuses 101.
        let groups = |n: u32| {
            let mut g = vec![0x3b; n as usize]; // start group
            g.extend(vec![0x3c; n as usize]); // end group
            g
        };
        let (deep, shallow) = (groups(RECURSION_LIMIT + 1), groups(RECURSION_LIMIT));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated varint", vec![0x18, 0x80]),
            ("10-byte varint over 64 bits", long_varint),
            ("field 0", vec![0x00, 0x00]),
            ("wire type 6", vec![0x1e]),
            ("string not UTF-8", vec![0x0a, 0x01, 0xff]),
            ("length past the end", vec![0x22, 0x05, 0x00]),
            ("index as bytes", vec![0x1a, 0x00]),
            ("proof as varint", vec![0x28, 0x00]),
            ("lone end group", vec![0x3c]),
            ("unclosed group", vec![0x3b, 0x08, 0x01]),
            ("group closed by another tag", vec![0x3b, 0x44]),
            ("groups nested 101 deep", deep),
            ("fixed64 cut short", vec![0x39, 0, 0, 0]),
            ("key over u32", vec![0x80, 0x80, 0x80, 0x80, 0x10]),
        ];
        for (what, bytes) in cases {
            assert!(
                v1::Chunk::decode(bytes.as_slice()).is_err(),
                "prost accepts {what}"
            );
            assert!(
                matches!(
                    peek_chunk(&bytes, MAX_PROOF_LEN),
                    Err(WireError::Malformed(_))
                ),
                "{what}: {:?}",
                peek_chunk(&bytes, MAX_PROOF_LEN)
            );
        }
        // And what prost accepts, the walk accepts: unknown fields of every wire type, groups
        // 100 deep, a 10-byte varint.
        let mut fine = vec![0x38, 0x01, 0x41, 0, 0, 0, 0, 0, 0, 0, 0, 0x4d, 0, 0, 0, 0];
        fine.extend([0x52, 0x02, 0xff, 0xff]);
        fine.extend(shallow);
        fine.push(0x18);
        fine.extend([0xff; 9]);
        fine.push(0x01);
        assert!(v1::Chunk::decode(fine.as_slice()).is_ok());
        assert_eq!(
            decode_chunk_bounded(&fine, MAX_PROOF_LEN).map(|c| c.index),
            Ok(u32::MAX)
        );
    }

    #[test]
    fn signed_manifests_are_bounded_before_decoding() {
        let bytes = signed().encode_to_vec();
        assert_eq!(check_signed_manifest(&bytes), Ok(2));
        assert_eq!(decode_signed_manifest_bounded(&bytes), Ok(signed()));
        // Too many signatures, even empty ones.
        let mut many = signed().encode_to_vec();
        many.extend([0x12, 0x00].repeat(20_000));
        assert_eq!(
            check_signed_manifest(&many),
            Err(WireError::TooMany {
                field: "signature",
                max: MAX_SIGNATURES
            })
        );
        // Over the size bound: refused whatever the contents.
        let big = vec![0xff; MAX_SIGNED_MANIFEST_LEN + 1];
        assert_eq!(
            check_signed_manifest(&big),
            Err(WireError::TooLarge {
                len: MAX_SIGNED_MANIFEST_LEN + 1,
                max: MAX_SIGNED_MANIFEST_LEN
            })
        );
        // A long key id.
        let mut s = signed();
        s.signatures[1].key_id = "\u{7}".repeat(MAX_KEY_ID_LEN + 1);
        assert!(matches!(
            check_signed_manifest(&s.encode_to_vec()),
            Err(WireError::FieldTooLong {
                field: "key id",
                ..
            })
        ));
        // A malformed nested signature (its length runs past its own end).
        let nested = vec![0x12, 0x02, 0x0a, 0x05];
        assert!(v1::SignedManifest::decode(nested.as_slice()).is_err());
        assert!(matches!(
            check_signed_manifest(&nested),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn the_update_id_of_an_unverified_envelope_is_peeked_cheaply() {
        let manifest = v1::UpdateManifest {
            update_id: "fw-2".into(),
            components: vec![v1::Component::default(); 3],
            description: "notes".into(),
            ..Default::default()
        };
        let mut envelope = signed();
        envelope.manifest = manifest.encode_to_vec();
        let bytes = envelope.encode_to_vec();
        assert_eq!(peek_update_id(&bytes), Some("fw-2"));
        // No manifest, no id, garbage, too many signatures: nothing.
        assert_eq!(peek_update_id(&signed().encode_to_vec()), None);
        assert_eq!(peek_update_id(&[0xff, 0xff]), None);
        let mut many = bytes.clone();
        many.extend([0x12, 0x00].repeat(MAX_SIGNATURES + 1));
        assert_eq!(peek_update_id(&many), None);
        // A manifest whose top level is cut short.
        envelope.manifest.truncate(3);
        assert_eq!(peek_update_id(&envelope.encode_to_vec()), None);
    }

    /// What the bounds say about a value prost decoded.
    fn chunk_within(c: &v1::Chunk, max_proof: usize) -> bool {
        c.proof.len() <= max_proof
            && c.proof.iter().all(|p| p.len() <= 32)
            && c.update_id.len() <= MAX_UPDATE_ID_LEN
            && c.component.len() <= MAX_COMPONENT_NAME_LEN
            && c.data.len() <= MAX_CHUNK_SIZE as usize
    }

    fn signed_within(s: &v1::SignedManifest) -> bool {
        s.signatures.len() <= MAX_SIGNATURES
            && s.signatures
                .iter()
                .all(|g| g.key_id.len() <= MAX_KEY_ID_LEN)
    }

    /// Arbitrary bytes biased towards protobuf: random fields with plausible keys.
    fn protobuf_ish() -> impl Strategy<Value = Vec<u8>> {
        let field = (
            0u32..12,
            0u8..8,
            prop::collection::vec(any::<u8>(), 0..40),
            any::<u64>(),
        )
            .prop_map(|(tag, wire, payload, v)| {
                let mut out = Vec::new();
                varint(u64::from(tag << 3 | u32::from(wire)), &mut out);
                match wire {
                    0 => varint(v, &mut out),
                    2 => {
                        varint(payload.len() as u64, &mut out);
                        out.extend(payload);
                    }
                    _ => out.extend(payload.iter().take((v % 9) as usize)),
                }
                out
            });
        prop::collection::vec(field, 0..40).prop_map(|f| f.concat())
    }

    fn agree_on_chunk(bytes: &[u8], max_proof: usize) -> Result<(), TestCaseError> {
        let ours = decode_chunk_bounded(bytes, max_proof);
        match v1::Chunk::decode(bytes) {
            Ok(c) if chunk_within(&c, max_proof) => prop_assert_eq!(ours, Ok(c)),
            Ok(_) => prop_assert!(
                ours.as_ref().is_err_and(WireError::is_over_bound),
                "{:?}",
                ours
            ),
            Err(_) => prop_assert!(
                matches!(ours, Err(ref e) if !matches!(e, WireError::Decode(_))),
                "prost refuses, the walk lets it through: {:?}",
                ours
            ),
        }
        Ok(())
    }

    fn agree_on_signed(bytes: &[u8]) -> Result<(), TestCaseError> {
        let ours = decode_signed_manifest_bounded(bytes);
        match v1::SignedManifest::decode(bytes) {
            Ok(s) if signed_within(&s) => prop_assert_eq!(ours, Ok(s)),
            Ok(_) => prop_assert!(
                ours.as_ref().is_err_and(WireError::is_over_bound),
                "{:?}",
                ours
            ),
            Err(_) => prop_assert!(
                matches!(ours, Err(ref e) if !matches!(e, WireError::Decode(_))),
                "prost refuses, the walk lets it through: {:?}",
                ours
            ),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn prop_chunk_walk_agrees_with_prost(bytes in prop::collection::vec(any::<u8>(), 0..200),
                                             max_proof in 0usize..4) {
            agree_on_chunk(&bytes, max_proof)?;
        }

        #[test]
        fn prop_chunk_walk_agrees_with_prost_on_protobuf_like_input(bytes in protobuf_ish(),
                                                                     max_proof in 0usize..4) {
            agree_on_chunk(&bytes, max_proof)?;
        }

        #[test]
        fn prop_signed_walk_agrees_with_prost(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            agree_on_signed(&bytes)?;
        }

        #[test]
        fn prop_signed_walk_agrees_with_prost_on_protobuf_like_input(bytes in protobuf_ish()) {
            agree_on_signed(&bytes)?;
        }

        #[test]
        fn prop_peeked_update_id_is_what_prost_decodes(bytes in protobuf_ish(), id in ".{0,20}") {
            // Whatever the envelope, a peeked id is the id prost finds in the manifest.
            let envelope = v1::SignedManifest {
                withdrawal: Default::default(),
                manifest: [v1::UpdateManifest { update_id: id, ..Default::default() }.encode_to_vec(), bytes.clone()].concat(),
                signatures: vec![],
            };
            for b in [bytes, envelope.encode_to_vec()] {
                if let Some(peeked) = peek_update_id(&b) {
                    let decoded = v1::SignedManifest::decode(b.as_slice())
                        .and_then(|s| v1::UpdateManifest::decode(s.manifest.as_slice()));
                    if let Ok(m) = decoded {
                        prop_assert_eq!(peeked, m.update_id.as_str());
                    }
                }
            }
        }

        #[test]
        fn prop_mutated_real_messages_agree(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
                                            cut in any::<prop::sample::Index>()) {
            let mut c = chunk();
            c.data.truncate(3);
            for mut bytes in [c.encode_to_vec(), signed().encode_to_vec()] {
                for (at, x) in &flips {
                    let i = at.index(bytes.len());
                    bytes[i] ^= x;
                }
                bytes.truncate(cut.index(bytes.len() + 1));
                agree_on_chunk(&bytes, 10)?;
                agree_on_signed(&bytes)?;
            }
        }
    }
}
