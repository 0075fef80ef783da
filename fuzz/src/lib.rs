//! What the fuzz targets share: a fixed fleet (deterministic keys, one root, one signed update)
//! that both the targets and the seed generator (`src/bin/seeds.rs`) build the same way, so the
//! seeds are real messages that pass every check and the fuzzer starts from the accepting
//! paths, not only from the first refusal.

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use fleet_proto::signing::{key_id, SignError, Signer};
use fleet_proto::trust::{build, TrustedRoot};
use fleet_proto::v1::{self, SignatureAlgorithm};
use fleet_proto::Message as _;

/// The device's clock in every target: 2025-01-01.
pub const NOW_MS: u64 = 1_735_689_600_000;
/// The device the commands are for.
pub const DEVICE_ID: &str = "dev-1";
/// Its class.
pub const DEVICE_CLASS: &str = "sensor";
/// The component of the fixed update.
pub const COMPONENT: &str = "firmware";
/// The fixed update's id.
pub const UPDATE_ID: &str = "upd-1";
/// Chunk size of the fixed update's image (the smallest allowed, so the image stays small).
pub const CHUNK_SIZE: u32 = fleet_proto::chunker::MIN_CHUNK_SIZE;
/// Its image: five chunks, the last one short.
pub const IMAGE_LEN: usize = 4 * CHUNK_SIZE as usize + 100;

/// One Ed25519 key from a fixed seed.
pub struct FixedKey {
    key: SigningKey,
    id: String,
}

impl FixedKey {
    /// The key whose secret is `seed` repeated.
    pub fn new(seed: u8) -> Self {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let id = key_id(&key.verifying_key());
        Self { key, id }
    }
}

impl Signer for FixedKey {
    fn key_id(&self) -> &str {
        &self.id
    }

    fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    fn sign_in_context(&self, context: &[u8], message: &[u8]) -> Result<v1::Signature, SignError> {
        Ok(v1::Signature {
            key_id: self.id.clone(),
            algorithm: SignatureAlgorithm::Ed25519.into(),
            signature: self
                .key
                .sign(&[context, message].concat())
                .to_bytes()
                .to_vec(),
        })
    }
}

/// The fleet's keys: two root keys (threshold 2), one updates key, one commands key.
pub struct Keys {
    /// Root role.
    pub root: [FixedKey; 2],
    /// Updates role.
    pub updates: FixedKey,
    /// Commands role.
    pub commands: FixedKey,
}

impl Keys {
    /// Always the same keys.
    pub fn fixed() -> Self {
        Keys {
            root: [FixedKey::new(1), FixedKey::new(2)],
            updates: FixedKey::new(3),
            commands: FixedKey::new(4),
        }
    }

    /// An encoded SignedRoot of `version`, signed by both root keys.
    pub fn signed_root(&self, version: u64) -> Vec<u8> {
        let root = v1::Root {
            format_version: 1,
            version,
            expires_at_ms: NOW_MS + 365 * 24 * 3600 * 1000,
            root: Some(build::role(
                &[self.root[0].verifying_key(), self.root[1].verifying_key()],
                2,
            )),
            updates: Some(build::role(&[self.updates.verifying_key()], 1)),
            commands: Some(build::role(&[self.commands.verifying_key()], 1)),
        };
        let mut signed = build::encode(&root);
        for k in &self.root {
            // FixedKey never fails to sign.
            let _ = build::add_signature(k, &mut signed);
        }
        signed.encode_to_vec()
    }
}

/// The root every target's device holds (version 1).
pub fn device_root() -> TrustedRoot {
    match TrustedRoot::provisioned(&Keys::fixed().signed_root(1)) {
        Ok(r) => r,
        Err(e) => panic!("the fixed root does not verify: {e}"),
    }
}

/// The fixed update's image: bytes that differ from chunk to chunk.
pub fn image() -> Vec<u8> {
    (0..IMAGE_LEN).map(|i| (i * 7 % 251) as u8).collect()
}

/// The image's summary (component, chunk digests, Merkle tree).
pub fn image_summary() -> fleet_proto::chunker::ImageSummary {
    match fleet_proto::chunker::summarize(image().as_slice(), CHUNK_SIZE) {
        Ok(s) => s,
        Err(e) => panic!("the fixed image does not chunk: {e}"),
    }
}

/// The fixed update's manifest.
pub fn manifest() -> v1::UpdateManifest {
    v1::UpdateManifest {
        format_version: 1,
        update_id: UPDATE_ID.into(),
        device_class: DEVICE_CLASS.into(),
        version: "2.0.0".into(),
        sequence: 2,
        issued_at_ms: NOW_MS - 60_000,
        expires_at_ms: NOW_MS + 24 * 3600 * 1000,
        components: vec![image_summary().component(COMPONENT)],
        description: "fuzzing seed".into(),
    }
}
