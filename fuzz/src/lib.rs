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

/// The longest refusal message the gateway's checks may give: a bounded log line and API
/// error.
pub const MAX_REFUSAL_LEN: usize = 512;

/// Asserts that a refusal, if `r` is one, is bounded.
pub fn bounded<T>(r: &Result<T, String>) {
    if let Err(e) = r {
        assert!(
            e.len() <= MAX_REFUSAL_LEN,
            "refusal of {} bytes: {e:.200}",
            e.len()
        );
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

/// Plain references for topic names and filters, written from MQTT 3.1.1 section 4.7, that
/// the targets hold the gateway's matching against (the ACL's, the router's and the bridge's).
pub mod reference {
    /// A topic name is non-empty, without `+`, `#` or NUL, at most 65,535 bytes.
    pub fn valid_name(t: &str) -> bool {
        !t.is_empty() && t.len() <= 65_535 && t.chars().all(|c| c != '+' && c != '#' && c != '\0')
    }

    /// A filter is non-empty, without NUL, at most 65,535 bytes; every level is `+`, or `#`
    /// as the last level, or contains neither.
    pub fn valid_filter(f: &str) -> bool {
        if f.is_empty() || f.len() > 65_535 || f.contains('\0') {
            return false;
        }
        let levels: Vec<&str> = f.split('/').collect();
        levels.iter().enumerate().all(|(i, l)| {
            *l == "+"
                || (*l == "#" && i == levels.len() - 1)
                || !(l.contains('+') || l.contains('#'))
        })
    }

    /// Matching on levels, recursively.
    fn levels(f: &[&str], t: &[&str]) -> bool {
        match (f.split_first(), t.split_first()) {
            // `#` matches the parent level too, and any number of levels below.
            (Some((&"#", _)), _) => true,
            (Some((&"+", fr)), Some((_, tr))) => levels(fr, tr),
            (Some((a, fr)), Some((b, tr))) => a == b && levels(fr, tr),
            (None, None) => true,
            _ => false,
        }
    }

    /// Whether the (valid) filter `f` matches the (valid) topic name `t`.
    pub fn matches(f: &str, t: &str) -> bool {
        let f: Vec<&str> = f.split('/').collect();
        let t: Vec<&str> = t.split('/').collect();
        // A wildcard as the first level never matches a `$` topic [MQTT-4.7.2-1].
        if t[0].starts_with('$') && (f[0] == "+" || f[0] == "#") {
            return false;
        }
        levels(&f, &t)
    }

    /// Topic names that stand for everything the (valid) filter `inner` matches, as far as a
    /// filter `outer` can tell them apart: every `+` becomes a level `outer` does not name,
    /// and a final `#` becomes 0 to `outer`'s depth + 1 such levels. `inner` is within `outer`
    /// if and only if `outer` matches all of them.
    pub fn witnesses(inner: &str, outer: &str) -> Vec<String> {
        let longest = outer.split('/').map(str::len).max().unwrap_or(0);
        // Longer than any level of `outer`, so equal to none; not a `$` level.
        let fresh = "z".repeat(longest + 1);
        let mut levels: Vec<&str> = inner
            .split('/')
            .map(|l| if l == "+" { fresh.as_str() } else { l })
            .collect();
        if levels.last() != Some(&"#") {
            return vec![levels.join("/")];
        }
        levels.pop();
        let depth = outer.split('/').count() + 1;
        (0..=depth)
            .map(|extra| {
                let mut t = levels.clone();
                t.extend(std::iter::repeat_n(fresh.as_str(), extra));
                t.join("/")
            })
            // `#` with no level before it and none added is no topic.
            .filter(|t| !t.is_empty())
            .collect()
    }
}
