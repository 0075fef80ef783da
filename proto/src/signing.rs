//! Manifest signing (the update authority) and verification (devices).
//!
//! The authority encodes an [`v1::UpdateManifest`] once and signs those exact bytes; the
//! [`v1::SignedManifest`] carries them unchanged. A verifier checks a signature over the bytes
//! it received **before** it decodes them as a manifest (no re-encoding, no parsing of
//! unauthenticated data beyond the outer envelope), then checks the manifest's structure.
//! Freshness for one device is a separate step ([`crate::manifest::check_freshness`]).
//!
//! Signed message: `"fleet.v1.UpdateManifest" || 0x00 || manifest bytes`, Ed25519 (RFC 8032),
//! verified with `verify_strict`. Keys are addressed by [`key_id`].
//!
//! Cost is bounded before it is spent ([`crate::limits`]): an envelope over
//! [`MAX_SIGNED_MANIFEST_LEN`] bytes or with more than [`MAX_SIGNATURES`] signatures is refused
//! before it is decoded (and before any signature is checked); a signature whose key id is not
//! trusted is skipped without hashing anything, so at most [`MAX_SIGNATURES`] signature checks
//! run per envelope. A [`VerifyError`]'s `Display` names at most [`MAX_NAMED_KEY_IDS`] key
//! ids, each shortened and escaped.

use std::collections::BTreeMap;

use ed25519_dalek::pkcs8::{spki::der::pem::LineEnding, DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, KeypairBytes};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::limits::{MAX_KEY_ID_LEN, MAX_NAMED_KEY_IDS, MAX_SIGNATURES, MAX_SIGNED_MANIFEST_LEN};
use crate::manifest::{self, ManifestError};
use crate::merkle::Hash;
use crate::report::{clip, excerpt};
use crate::v1::{self, SignatureAlgorithm, UpdateError};
use crate::wire::{self, WireError};

/// Prefix of every signed manifest message (domain separation).
pub const MANIFEST_CONTEXT: &[u8] = b"fleet.v1.UpdateManifest\0";

/// The key id of an Ed25519 public key: lowercase hex of the first 8 bytes of its SHA-256.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

fn signed_message(manifest: &[u8]) -> Vec<u8> {
    [MANIFEST_CONTEXT, manifest].concat()
}

/// Why a key cannot be loaded or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The private key PEM is not an Ed25519 PKCS#8 key.
    #[error("not an Ed25519 PKCS#8 private key: {0}")]
    PrivateKey(ed25519_dalek::pkcs8::Error),
    /// The public key PEM is not an Ed25519 SubjectPublicKeyInfo.
    #[error("not an Ed25519 public key: {0}")]
    PublicKey(ed25519_dalek::pkcs8::spki::Error),
}

/// Why a [`Signer`] could not sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The key's backend (an HSM, a remote signer) failed or refused.
    #[error("the signing key {key_id} could not sign: {reason}")]
    Backend {
        /// The key.
        key_id: String,
        /// What its backend said.
        reason: String,
    },
}

/// Something that signs with one Ed25519 key: a key file ([`UpdateSigner`]), or an HSM or
/// remote signer behind the same three calls. Every document kind is signed under its own
/// context ([`MANIFEST_CONTEXT`], `trust::ROOT_CONTEXT`, `command::COMMAND_CONTEXT`, ...).
pub trait Signer: Send + Sync {
    /// The key's id ([`key_id`] of its public key).
    fn key_id(&self) -> &str;
    /// The public key.
    fn verifying_key(&self) -> VerifyingKey;
    /// A signature over `context || message`.
    fn sign_in_context(&self, context: &[u8], message: &[u8]) -> Result<v1::Signature, SignError>;
}

/// The update authority's signing key.
pub struct UpdateSigner {
    key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for UpdateSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("UpdateSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl UpdateSigner {
    fn from_key(key: SigningKey) -> Self {
        let key_id = key_id(&key.verifying_key());
        Self { key, key_id }
    }

    /// A new random key from the operating system's generator.
    pub fn generate() -> Self {
        Self::from_key(SigningKey::generate(&mut rand_core::OsRng))
    }

    /// Loads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self::from_key)
            .map_err(KeyError::PrivateKey)
    }

    /// The private key as PKCS#8 v1 PEM (write it with owner-only permissions). v1, without
    /// the optional public key of v2, because OpenSSL 3.0 and many HSM tools read only v1.
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        }
        .to_pkcs8_pem(LineEnding::LF)
        .map(|z| z.as_str().to_owned())
        .map_err(KeyError::PrivateKey)
    }

    /// The public key as SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`), for devices.
    pub fn public_key_pem(&self) -> Result<String, KeyError> {
        self.key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(KeyError::PublicKey)
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// This key's id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// A signature over encoded manifest bytes.
    pub fn sign(&self, manifest: &[u8]) -> v1::Signature {
        v1::Signature {
            key_id: self.key_id.clone(),
            algorithm: SignatureAlgorithm::Ed25519.into(),
            signature: self.key.sign(&signed_message(manifest)).to_bytes().to_vec(),
        }
    }

    /// A signature over `context || message`: the same key signing another kind of document
    /// (a root, a command) under that document's own context, so no signature of one kind is
    /// ever valid as another.
    pub fn sign_in_context(&self, context: &[u8], message: &[u8]) -> v1::Signature {
        v1::Signature {
            key_id: self.key_id.clone(),
            algorithm: SignatureAlgorithm::Ed25519.into(),
            signature: self
                .key
                .sign(&[context, message].concat())
                .to_bytes()
                .to_vec(),
        }
    }

    /// Encodes `manifest` once and signs those bytes.
    pub fn sign_manifest(&self, manifest: &v1::UpdateManifest) -> v1::SignedManifest {
        let bytes = manifest.encode_to_vec();
        let signature = self.sign(&bytes);
        v1::SignedManifest {
            manifest: bytes,
            signatures: vec![signature],
            withdrawal: Vec::new(),
        }
    }
}

impl Signer for UpdateSigner {
    fn key_id(&self) -> &str {
        UpdateSigner::key_id(self)
    }

    fn verifying_key(&self) -> VerifyingKey {
        UpdateSigner::verifying_key(self)
    }

    fn sign_in_context(&self, context: &[u8], message: &[u8]) -> Result<v1::Signature, SignError> {
        Ok(UpdateSigner::sign_in_context(self, context, message))
    }
}

/// Signs encoded manifest bytes with every signer in `signers` (a role with a threshold above
/// one needs several), in order.
pub fn sign_manifest_with(
    manifest: &v1::UpdateManifest,
    signers: &[&dyn Signer],
) -> Result<v1::SignedManifest, SignError> {
    let bytes = manifest.encode_to_vec();
    let signatures = signers
        .iter()
        .map(|s| s.sign_in_context(MANIFEST_CONTEXT, &bytes))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(v1::SignedManifest {
        manifest: bytes,
        signatures,
        withdrawal: Vec::new(),
    })
}

/// Why a signed manifest is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The SignedManifest envelope is over a bound ([`crate::limits`]) or does not decode;
    /// nothing in it was verified.
    #[error("signed manifest refused: {0}")]
    Envelope(WireError),
    /// The envelope carries no signature at all.
    #[error("manifest carries no signature")]
    Unsigned,
    /// No signature is by a trusted key.
    #[error("no signature by a trusted key ({})", KeyIds::new(.key_ids, .signatures))]
    UnknownKey {
        /// How many signatures the envelope carries.
        signatures: usize,
        /// The key ids of the first [`MAX_NAMED_KEY_IDS`] of them, each cut to
        /// [`MAX_KEY_ID_LEN`] bytes (untrusted text: display them through the error's
        /// `Display`, which escapes them).
        key_ids: Vec<String>,
    },
    /// Some trusted keys signed, but fewer distinct ones than the threshold.
    #[error("{valid} valid signature(s) by trusted keys, {threshold} needed")]
    BelowThreshold {
        /// Distinct trusted keys whose signature verified.
        valid: usize,
        /// How many are needed.
        threshold: u32,
    },
    /// A signature by a trusted key does not verify over the received bytes.
    #[error("signature by key {} does not verify", excerpt(.0))]
    BadSignature(String),
    /// The authenticated bytes do not decode as a manifest.
    #[error("signed bytes are not a manifest: {0}")]
    Decode(prost::DecodeError),
    /// The authenticated manifest is structurally invalid.
    #[error("invalid manifest: {0}")]
    Invalid(#[from] ManifestError),
}

impl VerifyError {
    /// The reason code reported upward in `UpdateProgress`.
    pub fn code(&self) -> UpdateError {
        match self {
            VerifyError::Envelope(_) | VerifyError::Decode(_) => UpdateError::MalformedManifest,
            VerifyError::Unsigned | VerifyError::UnknownKey { .. } => UpdateError::UnknownKey,
            VerifyError::BadSignature(_) => UpdateError::BadSignature,
            VerifyError::BelowThreshold { .. } => UpdateError::BelowThreshold,
            VerifyError::Invalid(ManifestError::UnsupportedFormat(_)) => {
                UpdateError::UnsupportedFormat
            }
            VerifyError::Invalid(_) => UpdateError::MalformedManifest,
        }
    }
}

/// The key ids an [`VerifyError::UnknownKey`] names, for display: escaped, shortened, and
/// the rest counted.
struct KeyIds<'a> {
    ids: &'a [String],
    total: usize,
}

impl<'a> KeyIds<'a> {
    fn new(ids: &'a [String], total: &usize) -> Self {
        Self { ids, total: *total }
    }
}

impl std::fmt::Display for KeyIds<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.total == 1 { "" } else { "s" };
        write!(f, "{} signature{s}", self.total)?;
        let named = &self.ids[..self.ids.len().min(MAX_NAMED_KEY_IDS)];
        for (i, id) in named.iter().enumerate() {
            let sep = if i == 0 { ", key ids " } else { ", " };
            write!(f, "{sep}{}", excerpt(id))?;
        }
        if self.total > named.len() && !named.is_empty() {
            write!(f, " and {} more", self.total - named.len())?;
        }
        Ok(())
    }
}

/// A manifest whose signature and structure have been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedManifest {
    /// The decoded manifest.
    pub manifest: v1::UpdateManifest,
    /// SHA-256 of the signed manifest bytes: a stable key for resume state.
    pub digest: Hash,
    /// Id of the first trusted key whose signature verified.
    pub key_id: String,
}

/// The authority keys a device trusts, by key id, and how many distinct ones must sign.
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
    threshold: u32,
}

impl Default for TrustedKeys {
    fn default() -> Self {
        Self {
            keys: BTreeMap::new(),
            threshold: 1,
        }
    }
}

impl TrustedKeys {
    /// No trusted keys (every manifest is refused); threshold 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// `keys`, of which `threshold` (at least 1) distinct ones must sign. The keys of a role of
    /// the fleet's root: `trust::RoleKeys::trusted_keys`.
    pub fn with_threshold(keys: impl IntoIterator<Item = VerifyingKey>, threshold: u32) -> Self {
        let mut t = Self {
            keys: BTreeMap::new(),
            threshold: threshold.max(1),
        };
        for k in keys {
            t.add(k);
        }
        t
    }

    /// How many distinct trusted keys must sign (at least 1).
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// Trusts `key`; returns its key id.
    pub fn add(&mut self, key: VerifyingKey) -> String {
        let id = key_id(&key);
        self.keys.insert(id.clone(), key);
        id
    }

    /// Trusts the key in a SubjectPublicKeyInfo PEM; returns its key id.
    pub fn add_pem(&mut self, pem: &str) -> Result<String, KeyError> {
        VerifyingKey::from_public_key_pem(pem)
            .map(|k| self.add(k))
            .map_err(KeyError::PublicKey)
    }

    /// Number of trusted keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies an encoded SignedManifest exactly as received off the wire. The envelope's
    /// size and its number of signatures are checked before it is decoded
    /// ([`wire::decode_signed_manifest_bounded`]).
    pub fn verify_encoded(&self, signed: &[u8]) -> Result<VerifiedManifest, VerifyError> {
        let envelope =
            wire::decode_signed_manifest_bounded(signed).map_err(VerifyError::Envelope)?;
        self.verify(&envelope)
    }

    /// Verifies a SignedManifest: a signature by a trusted key over `manifest` must verify;
    /// only then are the bytes decoded and the manifest's structure checked. More than
    /// [`MAX_SIGNATURES`] signatures, or manifest bytes over [`MAX_SIGNED_MANIFEST_LEN`], are
    /// refused before any signature is checked.
    pub fn verify(&self, signed: &v1::SignedManifest) -> Result<VerifiedManifest, VerifyError> {
        if signed.manifest.len() > MAX_SIGNED_MANIFEST_LEN {
            return Err(VerifyError::Envelope(WireError::TooLarge {
                len: signed.manifest.len(),
                max: MAX_SIGNED_MANIFEST_LEN,
            }));
        }
        if signed.signatures.is_empty() {
            return Err(VerifyError::Unsigned);
        }
        if signed.signatures.len() > MAX_SIGNATURES {
            return Err(VerifyError::Envelope(WireError::TooMany {
                field: "signature",
                max: MAX_SIGNATURES,
            }));
        }
        // Built on the first signature by a trusted key: untrusted ones cost no hashing. A key
        // counts once however often it signed.
        let mut message = None;
        let mut failed = None;
        let mut good: Vec<&str> = Vec::new();
        for sig in &signed.signatures {
            if good.len() >= self.threshold as usize {
                break;
            }
            if sig.key_id.len() > MAX_KEY_ID_LEN || good.contains(&sig.key_id.as_str()) {
                continue;
            }
            let Some(key) = self.keys.get(&sig.key_id) else {
                continue;
            };
            let message = message.get_or_insert_with(|| signed_message(&signed.manifest));
            let verifies = sig.algorithm == i32::from(SignatureAlgorithm::Ed25519)
                && ed25519_dalek::Signature::from_slice(&sig.signature)
                    .is_ok_and(|s| key.verify_strict(message, &s).is_ok());
            if verifies {
                good.push(&sig.key_id);
                continue;
            }
            failed.get_or_insert_with(|| sig.key_id.clone());
        }
        let key_id = match (good.first(), failed) {
            (Some(id), _) if good.len() >= self.threshold as usize => (*id).to_owned(),
            (Some(_), _) => {
                return Err(VerifyError::BelowThreshold {
                    valid: good.len(),
                    threshold: self.threshold,
                })
            }
            (None, Some(id)) => return Err(VerifyError::BadSignature(id)),
            (None, None) => {
                return Err(VerifyError::UnknownKey {
                    signatures: signed.signatures.len(),
                    key_ids: signed
                        .signatures
                        .iter()
                        .take(MAX_NAMED_KEY_IDS)
                        .map(|s| clip(&s.key_id, MAX_KEY_ID_LEN).to_owned())
                        .collect(),
                });
            }
        };
        let manifest =
            v1::UpdateManifest::decode(signed.manifest.as_slice()).map_err(VerifyError::Decode)?;
        manifest::validate(&manifest)?;
        Ok(VerifiedManifest {
            manifest,
            digest: Sha256::digest(&signed.manifest).into(),
            key_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;
    use crate::manifest::{check_freshness, DeviceFacts, FreshnessError};

    fn trusting(signer: &UpdateSigner) -> TrustedKeys {
        let mut t = TrustedKeys::new();
        t.add(signer.verifying_key());
        t
    }

    #[test]
    fn round_trip_through_the_wire() {
        let signer = UpdateSigner::generate();
        let signed = signer.sign_manifest(&sample());
        let wire = signed.encode_to_vec();
        let v = trusting(&signer)
            .verify_encoded(&wire)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.manifest, sample());
        assert_eq!(v.key_id, signer.key_id());
        assert_eq!(v.digest, <[u8; 32]>::from(Sha256::digest(&signed.manifest)));
    }

    #[test]
    fn every_flipped_byte_of_the_wire_form_is_rejected() {
        let signer = UpdateSigner::generate();
        let trusted = trusting(&signer);
        let wire = signer.sign_manifest(&sample()).encode_to_vec();
        for i in 0..wire.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = wire.clone();
                bad[i] ^= bit;
                assert!(
                    trusted.verify_encoded(&bad).is_err(),
                    "byte {i} bit {bit:#x} accepted"
                );
            }
        }
    }

    #[test]
    fn every_flipped_manifest_byte_is_a_bad_signature() {
        let signer = UpdateSigner::generate();
        let trusted = trusting(&signer);
        let signed = signer.sign_manifest(&sample());
        for i in 0..signed.manifest.len() {
            let mut bad = signed.clone();
            bad.manifest[i] ^= 0x04;
            assert_eq!(
                trusted.verify(&bad).map_err(|e| e.code()),
                Err(UpdateError::BadSignature),
                "byte {i}"
            );
        }
    }

    #[test]
    fn untrusted_and_missing_signatures() {
        let signer = UpdateSigner::generate();
        let other = UpdateSigner::generate();
        let signed = signer.sign_manifest(&sample());
        // Signed by a key the device does not trust.
        assert_eq!(
            trusting(&other).verify(&signed),
            Err(VerifyError::UnknownKey {
                signatures: 1,
                key_ids: vec![signer.key_id().to_owned()]
            })
        );
        // A forger claims the trusted key's id with its own signature.
        let mut forged = signer.sign_manifest(&sample());
        forged.signatures[0].signature = other.sign(&forged.manifest).signature;
        assert_eq!(
            trusting(&signer).verify(&forged),
            Err(VerifyError::BadSignature(signer.key_id().to_owned()))
        );
        // No signature at all.
        let unsigned = v1::SignedManifest {
            withdrawal: Default::default(),
            manifest: signed.manifest.clone(),
            signatures: vec![],
        };
        assert_eq!(
            trusting(&signer).verify(&unsigned),
            Err(VerifyError::Unsigned)
        );
        // Right key, wrong algorithm tag.
        let mut alg = signed.clone();
        alg.signatures[0].algorithm = 0;
        assert!(matches!(
            trusting(&signer).verify(&alg),
            Err(VerifyError::BadSignature(_))
        ));
        // Truncated signature bytes.
        let mut short = signed.clone();
        short.signatures[0].signature.truncate(10);
        assert!(matches!(
            trusting(&signer).verify(&short),
            Err(VerifyError::BadSignature(_))
        ));
    }

    /// `n` signatures whose key ids are long runs of control bytes.
    fn hostile_signatures(n: usize, key_id_len: usize) -> Vec<v1::Signature> {
        (0..n)
            .map(|i| v1::Signature {
                key_id: char::from((i % 32) as u8).to_string().repeat(key_id_len),
                algorithm: SignatureAlgorithm::Ed25519.into(),
                signature: vec![0; 64],
            })
            .collect()
    }

    #[test]
    fn twenty_thousand_signatures_are_refused_before_any_check() {
        let signer = UpdateSigner::generate();
        let mut signed = signer.sign_manifest(&sample());
        signed.signatures.extend(hostile_signatures(20_000, 1));
        // 1.4 MB on the wire: refused by its size, before a byte is decoded.
        assert!(matches!(
            trusting(&signer).verify_encoded(&signed.encode_to_vec()),
            Err(VerifyError::Envelope(WireError::TooLarge { .. }))
        ));
        // 20,000 empty signatures fit in 40 KB: refused by their number, before decoding.
        let mut wire = signer.sign_manifest(&sample()).encode_to_vec();
        wire.extend([0x12, 0x00].repeat(20_000));
        assert!(wire.len() < MAX_SIGNED_MANIFEST_LEN);
        let err = trusting(&signer)
            .verify_encoded(&wire)
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        assert_eq!(
            err,
            VerifyError::Envelope(WireError::TooMany {
                field: "signature",
                max: MAX_SIGNATURES
            })
        );
        assert_eq!(err.code(), UpdateError::MalformedManifest);
        // The same envelope decoded by someone else and handed over is refused too, even
        // though the authority's valid signature comes first.
        assert_eq!(trusting(&signer).verify(&signed), Err(err));
    }

    #[test]
    fn unknown_keys_are_named_briefly_and_escaped() {
        let signer = UpdateSigner::generate();
        let mut signed = signer.sign_manifest(&sample());
        signed.signatures = hostile_signatures(MAX_SIGNATURES, 10_000);
        let err = trusting(&signer)
            .verify(&signed)
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        assert_eq!(err.code(), UpdateError::UnknownKey);
        let VerifyError::UnknownKey {
            signatures,
            ref key_ids,
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!(signatures, MAX_SIGNATURES);
        assert_eq!(key_ids.len(), MAX_NAMED_KEY_IDS);
        assert!(key_ids.iter().all(|k| k.len() <= MAX_KEY_ID_LEN));
        let msg = err.to_string();
        assert!(msg.len() < 400, "{} bytes: {msg}", msg.len());
        assert!(!msg.chars().any(char::is_control), "{msg:?}");
        assert!(
            msg.contains("8 signatures") && msg.contains("and 5 more"),
            "{msg}"
        );
    }

    #[test]
    fn oversized_envelopes_are_refused_before_decoding() {
        let signer = UpdateSigner::generate();
        let mut m = sample();
        m.description = "d".repeat(MAX_SIGNED_MANIFEST_LEN);
        let signed = signer.sign_manifest(&m);
        let err = trusting(&signer)
            .verify_encoded(&signed.encode_to_vec())
            .err();
        assert!(
            matches!(err, Some(VerifyError::Envelope(WireError::TooLarge { .. }))),
            "{err:?}"
        );
        assert!(matches!(
            trusting(&signer).verify(&signed),
            Err(VerifyError::Envelope(WireError::TooLarge { .. }))
        ));
        // Just under the envelope bound, the description bound still applies once verified.
        m.description = "d".repeat(crate::limits::MAX_DESCRIPTION_LEN + 1);
        assert!(matches!(
            trusting(&signer).verify_encoded(&signer.sign_manifest(&m).encode_to_vec()),
            Err(VerifyError::Invalid(ManifestError::Description { .. }))
        ));
    }

    #[test]
    fn untrusted_signatures_are_skipped_and_the_good_one_found_among_the_maximum() {
        let signer = UpdateSigner::generate();
        let good = signer.sign_manifest(&sample());
        // Seven untrusted (including over-long key ids) before the authority's.
        let mut signed = good.clone();
        signed.signatures = hostile_signatures(MAX_SIGNATURES - 1, MAX_KEY_ID_LEN + 1);
        signed.signatures.push(good.signatures[0].clone());
        let v = trusting(&signer)
            .verify_encoded(&signed.encode_to_vec())
            .map_err(|e| e.to_string());
        assert!(v.is_err(), "over-long key ids are refused on the wire");
        assert!(trusting(&signer).verify(&signed).is_ok());
        // Seven bad signatures claiming the trusted key, then the good one: all verified.
        let mut claimed = good.clone();
        let mut bad = good.signatures[0].clone();
        bad.signature[0] ^= 1;
        claimed.signatures = vec![bad; MAX_SIGNATURES - 1];
        claimed.signatures.push(good.signatures[0].clone());
        assert!(trusting(&signer)
            .verify_encoded(&claimed.encode_to_vec())
            .is_ok());
    }

    #[test]
    fn rotation_several_keys_and_signatures() {
        let old = UpdateSigner::generate();
        let new = UpdateSigner::generate();
        let mut signed = new.sign_manifest(&sample());
        signed.signatures.insert(0, old.sign(&signed.manifest));
        // A device that only knows the old key, one that only knows the new, and one with both.
        for keys in [vec![&old], vec![&new], vec![&old, &new]] {
            let mut t = TrustedKeys::new();
            for k in &keys {
                t.add(k.verifying_key());
            }
            assert!(t.verify(&signed).is_ok());
        }
    }

    #[test]
    fn signature_does_not_transfer_to_other_contexts() {
        // A raw Ed25519 signature over the bare manifest bytes (no context) is refused.
        let signer = UpdateSigner::generate();
        let mut signed = signer.sign_manifest(&sample());
        signed.signatures[0].signature = signer.key.sign(&signed.manifest).to_bytes().to_vec();
        assert!(matches!(
            trusting(&signer).verify(&signed),
            Err(VerifyError::BadSignature(_))
        ));
    }

    #[test]
    fn authentic_but_invalid_or_stale_manifests() {
        let signer = UpdateSigner::generate();
        let trusted = trusting(&signer);
        // Authentic bytes that are not a manifest.
        let garbage = v1::SignedManifest {
            withdrawal: Default::default(),
            manifest: vec![0xff; 7],
            signatures: vec![signer.sign(&[0xff; 7])],
        };
        assert!(matches!(
            trusted.verify(&garbage),
            Err(VerifyError::Decode(_))
        ));
        // Authentic but structurally invalid.
        let mut m = sample();
        m.expires_at_ms = 0;
        assert_eq!(
            trusted.verify(&signer.sign_manifest(&m)),
            Err(VerifyError::Invalid(ManifestError::NoExpiry))
        );
        // Authentic, valid, and then judged stale by the freshness rules.
        let v = trusted
            .verify(&signer.sign_manifest(&sample()))
            .unwrap_or_else(|e| panic!("{e}"));
        let facts = DeviceFacts {
            device_class: "pump-v2",
            installed_sequence: 11,
            now_ms: 0,
        };
        assert!(matches!(
            check_freshness(&v.manifest, &facts),
            Err(FreshnessError::NotNewer { .. })
        ));
    }

    #[test]
    fn pem_round_trip() {
        let signer = UpdateSigner::generate();
        let pem = signer.to_pkcs8_pem().unwrap_or_else(|e| panic!("{e}"));
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let again = UpdateSigner::from_pkcs8_pem(&pem).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.key_id(), signer.key_id());
        let mut t = TrustedKeys::new();
        let id = t.add_pem(&signer.public_key_pem().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(id.ok().as_deref(), Some(signer.key_id()));
        assert!(UpdateSigner::from_pkcs8_pem("not a key").is_err());
        assert!(t
            .add_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .is_err());
    }

    use proptest::prelude::*;

    fn assert_reportable(e: &VerifyError) -> Result<(), TestCaseError> {
        let msg = e.to_string();
        prop_assert!(
            msg.len() <= crate::report::MAX_DETAIL_LEN,
            "{} bytes: {}",
            msg.len(),
            msg
        );
        prop_assert!(!msg.chars().any(char::is_control), "{:?}", msg);
        Ok(())
    }

    fn hostile_string() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,80}",
            "[\\x00-\\x1f\\x7f./\\\\a-z]{0,80}",
            (any::<char>(), 0usize..5000).prop_map(|(c, n)| c.to_string().repeat(n)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever arrives, a refusal's message is short and clean enough to report as is.
        #[test]
        fn prop_refusals_of_arbitrary_envelopes_are_reportable(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
            key_ids in prop::collection::vec(hostile_string(), 0..12),
        ) {
            let signer = UpdateSigner::generate();
            let trusted = trusting(&signer);
            if let Err(e) = trusted.verify_encoded(&bytes) {
                assert_reportable(&e)?;
            }
            let envelope = v1::SignedManifest {
                withdrawal: Default::default(),
                manifest: bytes,
                signatures: key_ids
                    .into_iter()
                    .map(|key_id| v1::Signature { key_id, algorithm: 1, signature: vec![0; 64] })
                    .collect(),
            };
            for e in [trusted.verify(&envelope).err(), trusted.verify_encoded(&envelope.encode_to_vec()).err()]
                .into_iter()
                .flatten()
            {
                assert_reportable(&e)?;
            }
        }

        /// An authentic manifest full of hostile strings is refused with a reportable message
        /// too (the authority's tooling validates, but a device must not trust that it did).
        #[test]
        fn prop_refusals_of_authentic_hostile_manifests_are_reportable(
            update_id in hostile_string(),
            class in hostile_string(),
            version in hostile_string(),
            names in prop::collection::vec(hostile_string(), 1..4),
            description in hostile_string(),
        ) {
            let signer = UpdateSigner::generate();
            let mut m = sample();
            m.update_id = update_id;
            m.device_class = class;
            m.version = version;
            m.description = description;
            m.components = names
                .into_iter()
                .map(|name| v1::Component { name, ..m.components[0].clone() })
                .collect();
            let signed = signer.sign_manifest(&m);
            if let Err(e) = trusting(&signer).verify_encoded(&signed.encode_to_vec()) {
                assert_reportable(&e)?;
            }
            let facts = DeviceFacts { device_class: &m.device_class, installed_sequence: 0, now_ms: 0 };
            let other = DeviceFacts { device_class: "\u{1b}x", ..facts };
            if let Err(e) = check_freshness(&m, &other) {
                let msg = e.to_string();
                prop_assert!(msg.len() <= crate::report::MAX_DETAIL_LEN && !msg.chars().any(char::is_control), "{:?}", msg);
            }
        }
    }
}
