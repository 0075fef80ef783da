//! The fleet's root of trust, as pure rules: which keys sign what, with what threshold, and
//! when a device moves from one root to the next.
//!
//! A [`v1::Root`] names the keys and threshold of three roles: `root` (signs roots; its keys
//! live offline), `updates` (manifests) and `commands` (commands and update withdrawals). It is
//! signed like a manifest, over its exact bytes with its own context
//! (`"fleet.v1.Root" || 0x00 || root`), and carries a version and an expiry.
//!
//! * A device starts from a provisioned root ([`TrustedRoot::provisioned`]: it must be signed
//!   by a threshold of its own `root` keys).
//! * It moves to a new root only through [`TrustedRoot::accept_next`]: signed by a threshold of
//!   the **current** root's `root` keys and by a threshold of the **new** root's own, with a
//!   higher version (never lower or equal: no rollback), not expired.
//! * A role's signatures count once per distinct key of that role; signatures by other keys
//!   are skipped without hashing; at most [`MAX_SIGNATURES`] are looked at.
//!
//! No I/O, no clock: the caller passes `now`.

use std::collections::BTreeSet;

use ed25519_dalek::{Signature as Ed25519Signature, VerifyingKey};
use prost::Message as _;

use crate::limits::{MAX_SIGNATURES, MAX_SIGNED_MANIFEST_LEN};
use crate::signing::{key_id, TrustedKeys};
use crate::v1::{self, SignatureAlgorithm};

/// Prefix of every signed root message (domain separation from manifests and commands).
pub const ROOT_CONTEXT: &[u8] = b"fleet.v1.Root\0";
/// The root format this library writes and understands.
pub const ROOT_FORMAT_VERSION: u32 = 1;
/// Most roots a [`v1::RootChain`] may carry.
pub const MAX_CHAIN_ROOTS: usize = 8;
/// Largest encoded RootChain looked at.
pub const MAX_ROOT_CHAIN_LEN: usize = MAX_CHAIN_ROOTS * MAX_SIGNED_ROOT_LEN;
/// Most keys one role may name.
pub const MAX_ROLE_KEYS: usize = 16;
/// Largest encoded SignedRoot looked at.
pub const MAX_SIGNED_ROOT_LEN: usize = MAX_SIGNED_MANIFEST_LEN;

/// The three roles of a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Signs roots.
    Root,
    /// Signs update manifests.
    Updates,
    /// Signs commands and update withdrawals.
    Commands,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Root => "root",
            Role::Updates => "updates",
            Role::Commands => "commands",
        })
    }
}

/// Why a root, or a document checked against one, is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// Larger than [`MAX_SIGNED_ROOT_LEN`], more than [`MAX_SIGNATURES`] signatures, or not a
    /// SignedRoot / Root at all.
    #[error("not a well-formed signed root: {0}")]
    Malformed(String),
    /// The format version is not [`ROOT_FORMAT_VERSION`].
    #[error("root format {0} is not supported (this library knows {ROOT_FORMAT_VERSION})")]
    UnsupportedFormat(u32),
    /// A role is missing, names no key, too many, a key twice, a key that is not one, or a
    /// threshold of 0 or above its number of keys.
    #[error("role {role}: {problem}")]
    Role {
        /// The role.
        role: Role,
        /// What is wrong.
        problem: String,
    },
    /// Fewer distinct keys of the role signed than its threshold.
    #[error("role {role}: {valid} valid signature(s) by its keys, {threshold} needed")]
    Threshold {
        /// The role whose keys had to sign.
        role: Role,
        /// Distinct keys of the role whose signature verified.
        valid: usize,
        /// How many were needed.
        threshold: u32,
    },
    /// Fewer distinct `root` keys of the **current** root signed the offered one than the
    /// current root's threshold (for example: signed by the new keys only).
    #[error("not signed by the current root: {valid} valid signature(s) by its root keys, {threshold} needed")]
    Untrusted {
        /// Distinct current root keys whose signature verified.
        valid: usize,
        /// How many were needed.
        threshold: u32,
    },
    /// The offered root's version is not above the current one.
    #[error("root version {offered} is not newer than the current version {current}")]
    NotNewer {
        /// The offered version.
        offered: u64,
        /// The current version.
        current: u64,
    },
    /// The root has expired (or has no expiry).
    #[error("root version {version} expired at {expires_at_ms} ms (now {now_ms} ms)")]
    Expired {
        /// Its version.
        version: u64,
        /// Its expiry.
        expires_at_ms: u64,
        /// The time it was checked at.
        now_ms: u64,
    },
}

impl TrustError {
    /// The reason reported upward in a [`v1::TrustReport`].
    pub fn refusal(&self) -> v1::RootRefusal {
        use v1::RootRefusal as R;
        match self {
            TrustError::Malformed(_) => R::Malformed,
            TrustError::UnsupportedFormat(_) => R::UnsupportedFormat,
            TrustError::Role { .. } => R::BadRole,
            TrustError::Threshold { .. } => R::SelfUnsigned,
            TrustError::Untrusted { .. } => R::Untrusted,
            TrustError::NotNewer { .. } => R::NotNewer,
            TrustError::Expired { .. } => R::Expired,
        }
    }
}

/// What walking a [`v1::RootChain`] from a held root gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk {
    /// The newest root accepted, if any root of the chain was newer and acceptable.
    pub accepted: Option<TrustedRoot>,
    /// The first root refused (its version, 0 when it did not decode), and why. Roots at or
    /// below the held version that are the held root itself are history, not refusals.
    pub refused: Option<(u64, TrustError)>,
}

/// The keys of one role, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleKeys {
    keys: Vec<(String, VerifyingKey)>,
    threshold: u32,
}

impl RoleKeys {
    fn from_proto(role: Role, r: Option<&v1::RoleKeys>) -> Result<Self, TrustError> {
        let bad = |problem: String| TrustError::Role { role, problem };
        let r = r.ok_or_else(|| bad("missing".into()))?;
        if r.keys.is_empty() || r.keys.len() > MAX_ROLE_KEYS {
            return Err(bad(format!(
                "names {} keys; 1 to {MAX_ROLE_KEYS} are allowed",
                r.keys.len()
            )));
        }
        let mut keys = Vec::with_capacity(r.keys.len());
        let mut seen = BTreeSet::new();
        for (i, k) in r.keys.iter().enumerate() {
            if k.algorithm != SignatureAlgorithm::Ed25519 as i32 {
                return Err(bad(format!("key {i} is not an Ed25519 key")));
            }
            let bytes: [u8; 32] = k
                .key
                .as_slice()
                .try_into()
                .map_err(|_| bad(format!("key {i} is not 32 bytes")))?;
            let vk = VerifyingKey::from_bytes(&bytes)
                .map_err(|_| bad(format!("key {i} is not a valid Ed25519 key")))?;
            let id = key_id(&vk);
            if !seen.insert(id.clone()) {
                return Err(bad(format!("key {id} appears twice")));
            }
            keys.push((id, vk));
        }
        if r.threshold == 0 || r.threshold as usize > keys.len() {
            return Err(bad(format!(
                "threshold {} is outside 1..={}",
                r.threshold,
                keys.len()
            )));
        }
        Ok(RoleKeys {
            keys,
            threshold: r.threshold,
        })
    }

    /// The role's keys and threshold for verifying manifests (the `updates` role).
    pub fn trusted_keys(&self) -> TrustedKeys {
        TrustedKeys::with_threshold(self.keys.iter().map(|(_, k)| *k), self.threshold)
    }

    /// The keys of the role with their ids.
    pub fn keys(&self) -> impl Iterator<Item = (&str, &VerifyingKey)> {
        self.keys.iter().map(|(id, k)| (id.as_str(), k))
    }

    /// The key ids of the role.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }

    /// How many distinct keys must sign.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// Checks that at least `threshold` distinct keys of this role signed `context || message`.
    /// Signatures by other keys are skipped without hashing; a key counts once.
    pub fn check(
        &self,
        role: Role,
        context: &[u8],
        message: &[u8],
        signatures: &[v1::Signature],
    ) -> Result<usize, TrustError> {
        let mut valid = BTreeSet::new();
        let mut signed: Option<Vec<u8>> = None;
        for s in signatures.iter().take(MAX_SIGNATURES) {
            let Some((id, key)) = self.keys.iter().find(|(id, _)| *id == s.key_id) else {
                continue;
            };
            if valid.contains(id) || s.algorithm != SignatureAlgorithm::Ed25519 as i32 {
                continue;
            }
            let Ok(sig) = Ed25519Signature::from_slice(&s.signature) else {
                continue;
            };
            let msg = signed.get_or_insert_with(|| [context, message].concat());
            if key.verify_strict(msg, &sig).is_ok() {
                valid.insert(id.clone());
            }
        }
        if valid.len() >= self.threshold as usize {
            Ok(valid.len())
        } else {
            Err(TrustError::Threshold {
                role,
                valid: valid.len(),
                threshold: self.threshold,
            })
        }
    }
}

/// A root whose structure and signatures have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedRoot {
    /// The SignedRoot exactly as received (to persist, and to hand to others).
    pub signed: Vec<u8>,
    /// Its version.
    pub version: u64,
    /// Its expiry.
    pub expires_at_ms: u64,
    /// Who signs roots.
    pub root: RoleKeys,
    /// Who signs manifests.
    pub updates: RoleKeys,
    /// Who signs commands and withdrawals.
    pub commands: RoleKeys,
}

/// Decodes a SignedRoot within its bounds, then the Root inside, and checks its structure.
fn parse(signed: &[u8]) -> Result<(v1::SignedRoot, TrustedRoot), TrustError> {
    if signed.len() > MAX_SIGNED_ROOT_LEN {
        return Err(TrustError::Malformed(format!(
            "{} bytes; at most {MAX_SIGNED_ROOT_LEN} are read",
            signed.len()
        )));
    }
    let env = v1::SignedRoot::decode(signed).map_err(|e| TrustError::Malformed(e.to_string()))?;
    if env.signatures.len() > MAX_SIGNATURES {
        return Err(TrustError::Malformed(format!(
            "{} signatures; at most {MAX_SIGNATURES}",
            env.signatures.len()
        )));
    }
    let r =
        v1::Root::decode(env.root.as_slice()).map_err(|e| TrustError::Malformed(e.to_string()))?;
    if r.format_version != ROOT_FORMAT_VERSION {
        return Err(TrustError::UnsupportedFormat(r.format_version));
    }
    let root = TrustedRoot {
        signed: signed.to_vec(),
        version: r.version,
        expires_at_ms: r.expires_at_ms,
        root: RoleKeys::from_proto(Role::Root, r.root.as_ref())?,
        updates: RoleKeys::from_proto(Role::Updates, r.updates.as_ref())?,
        commands: RoleKeys::from_proto(Role::Commands, r.commands.as_ref())?,
    };
    Ok((env, root))
}

impl TrustedRoot {
    /// The root a device is provisioned with: well formed and signed by a threshold of its own
    /// `root` keys. (Its expiry is not checked here: a device that has been on a shelf still
    /// starts, and asks for a newer root.)
    pub fn provisioned(signed: &[u8]) -> Result<Self, TrustError> {
        let (env, root) = parse(signed)?;
        root.root
            .check(Role::Root, ROOT_CONTEXT, &env.root, &env.signatures)?;
        Ok(root)
    }

    /// Whether this root has expired at `now_ms` (the device then reports that it is frozen).
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }

    /// The next root, if `signed` may replace this one at `now_ms`: signed by a threshold of
    /// this root's `root` keys and by a threshold of its own, with a higher version, not
    /// expired.
    pub fn accept_next(&self, signed: &[u8], now_ms: u64) -> Result<TrustedRoot, TrustError> {
        let (env, next) = parse(signed)?;
        if next.version <= self.version {
            return Err(TrustError::NotNewer {
                offered: next.version,
                current: self.version,
            });
        }
        if next.expired(now_ms) {
            return Err(TrustError::Expired {
                version: next.version,
                expires_at_ms: next.expires_at_ms,
                now_ms,
            });
        }
        self.root
            .check(Role::Root, ROOT_CONTEXT, &env.root, &env.signatures)
            .map_err(|e| match e {
                TrustError::Threshold {
                    valid, threshold, ..
                } => TrustError::Untrusted { valid, threshold },
                other => other,
            })?;
        next.root
            .check(Role::Root, ROOT_CONTEXT, &env.root, &env.signatures)?;
        Ok(next)
    }

    /// Walks a RootChain (encoded, as received on `fleet/trust/roots`) from this root:
    /// accepts each root newer than the last accepted in turn and stops at the first refusal.
    /// A chain that only repeats history (every root at or below this version) is nothing to
    /// do, unless its newest root is older than this one or differs from it at the same
    /// version: that is an attempted rollback, refused as [`TrustError::NotNewer`].
    pub fn walk(&self, chain: &[u8], now_ms: u64) -> Walk {
        let refuse = |version: u64, e: TrustError| Walk {
            accepted: None,
            refused: Some((version, e)),
        };
        if chain.len() > MAX_ROOT_CHAIN_LEN {
            return refuse(
                0,
                TrustError::Malformed(format!(
                    "root chain of {} bytes; at most {MAX_ROOT_CHAIN_LEN} are read",
                    chain.len()
                )),
            );
        }
        let chain = match v1::RootChain::decode(chain) {
            Ok(c) => c,
            Err(e) => return refuse(0, TrustError::Malformed(e.to_string())),
        };
        if chain.roots.len() > MAX_CHAIN_ROOTS {
            return refuse(
                0,
                TrustError::Malformed(format!(
                    "root chain of {} roots; at most {MAX_CHAIN_ROOTS}",
                    chain.roots.len()
                )),
            );
        }
        let mut current: Option<TrustedRoot> = None;
        let mut newest_seen: Option<(u64, bool)> = None;
        for bytes in &chain.roots {
            let held = current.as_ref().unwrap_or(self);
            let version = peek_version(bytes);
            if version <= held.version {
                newest_seen = Some((version, bytes.as_slice() == held.signed.as_slice()));
                continue;
            }
            match held.accept_next(bytes, now_ms) {
                Ok(next) => {
                    newest_seen = None;
                    current = Some(next);
                }
                Err(e) => {
                    return Walk {
                        accepted: current,
                        refused: Some((version, e)),
                    }
                }
            }
        }
        if current.is_none() {
            if let Some((version, same)) = newest_seen {
                if version < self.version || (version == self.version && !same) {
                    return refuse(
                        version,
                        TrustError::NotNewer {
                            offered: version,
                            current: self.version,
                        },
                    );
                }
            }
        }
        Walk {
            accepted: current,
            refused: None,
        }
    }

    /// The keys of `role`.
    pub fn role(&self, role: Role) -> &RoleKeys {
        match role {
            Role::Root => &self.root,
            Role::Updates => &self.updates,
            Role::Commands => &self.commands,
        }
    }
}

/// The version of an encoded SignedRoot without checking anything (0 if it does not decode):
/// only to order the roots of a chain, never to trust one.
fn peek_version(signed: &[u8]) -> u64 {
    if signed.len() > MAX_SIGNED_ROOT_LEN {
        return 0;
    }
    v1::SignedRoot::decode(signed)
        .ok()
        .and_then(|env| v1::Root::decode(env.root.as_slice()).ok())
        .map_or(0, |r| r.version)
}

/// Building and signing roots (the offline side).
pub mod build {
    use super::*;
    use crate::signing::{SignError, Signer};

    /// The public part of a role: its signers' keys and threshold.
    pub fn role(keys: &[VerifyingKey], threshold: u32) -> v1::RoleKeys {
        v1::RoleKeys {
            keys: keys
                .iter()
                .map(|k| v1::PublicKey {
                    algorithm: SignatureAlgorithm::Ed25519.into(),
                    key: k.as_bytes().to_vec(),
                })
                .collect(),
            threshold,
        }
    }

    /// Encodes `root` once; the signers sign those bytes (in separate steps if they like:
    /// [`sign`] returns one signature to add).
    pub fn encode(root: &v1::Root) -> v1::SignedRoot {
        v1::SignedRoot {
            root: root.encode_to_vec(),
            signatures: Vec::new(),
        }
    }

    /// One signer's signature over an encoded root.
    pub fn sign(signer: &dyn Signer, signed: &v1::SignedRoot) -> Result<v1::Signature, SignError> {
        signer.sign_in_context(ROOT_CONTEXT, &signed.root)
    }

    /// Adds `signer`'s signature to `signed` unless that key already signed it.
    pub fn add_signature(
        signer: &dyn Signer,
        signed: &mut v1::SignedRoot,
    ) -> Result<(), SignError> {
        if signed
            .signatures
            .iter()
            .any(|s| s.key_id == signer.key_id())
        {
            return Ok(());
        }
        let sig = sign(signer, signed)?;
        signed.signatures.push(sig);
        Ok(())
    }

    /// Combines partial signatures made on separate machines over the same encoded root:
    /// the signatures of every part, each key once. Parts over other bytes are refused.
    pub fn combine(parts: &[v1::SignedRoot]) -> Result<v1::SignedRoot, TrustError> {
        let Some(first) = parts.first() else {
            return Err(TrustError::Malformed("nothing to combine".into()));
        };
        let mut out = v1::SignedRoot {
            root: first.root.clone(),
            signatures: Vec::new(),
        };
        for p in parts {
            if p.root != first.root {
                return Err(TrustError::Malformed(
                    "the parts sign different roots".into(),
                ));
            }
            for s in &p.signatures {
                if !out.signatures.iter().any(|o| o.key_id == s.key_id) {
                    out.signatures.push(s.clone());
                }
            }
        }
        Ok(out)
    }

    /// A RootChain of encoded SignedRoots, oldest first; the newest [`MAX_CHAIN_ROOTS`] kept.
    pub fn chain(roots: &[Vec<u8>]) -> v1::RootChain {
        let skip = roots.len().saturating_sub(MAX_CHAIN_ROOTS);
        v1::RootChain {
            roots: roots[skip..].to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::build::{encode, role, sign};
    use super::*;
    use crate::signing::UpdateSigner;
    use proptest::prelude::*;

    fn keys(n: usize) -> Vec<UpdateSigner> {
        (0..n).map(|_| UpdateSigner::generate()).collect()
    }

    fn root(version: u64, root_keys: &[UpdateSigner], k: u32, expires: u64) -> v1::Root {
        let vk = |s: &[UpdateSigner]| {
            s.iter()
                .map(UpdateSigner::verifying_key)
                .collect::<Vec<_>>()
        };
        let other = keys(1);
        v1::Root {
            format_version: ROOT_FORMAT_VERSION,
            version,
            expires_at_ms: expires,
            root: Some(role(&vk(root_keys), k)),
            updates: Some(role(&vk(&other), 1)),
            commands: Some(role(&vk(&other), 1)),
        }
    }

    fn signed_by(r: &v1::Root, signers: &[&UpdateSigner]) -> Vec<u8> {
        let mut s = encode(r);
        for signer in signers {
            let sig = sign(*signer, &s).unwrap();
            s.signatures.push(sig);
        }
        s.encode_to_vec()
    }

    #[test]
    fn rotation_needs_the_old_and_the_new_threshold_and_a_higher_version() {
        let old = keys(3);
        let new = keys(3);
        let r1 = root(1, &old, 2, 1_000_000);
        let first = TrustedRoot::provisioned(&signed_by(&r1, &[&old[0], &old[2]])).unwrap();
        assert_eq!(first.version, 1);
        // Provisioned with one signature where two are needed: refused.
        assert!(matches!(
            TrustedRoot::provisioned(&signed_by(&r1, &[&old[0]])),
            Err(TrustError::Threshold {
                role: Role::Root,
                valid: 1,
                threshold: 2
            })
        ));
        let r2 = root(2, &new, 2, 1_000_000);
        // Both thresholds: accepted.
        let both = signed_by(&r2, &[&old[0], &old[1], &new[1], &new[2]]);
        let second = first.accept_next(&both, 10).unwrap();
        assert_eq!(second.version, 2);
        // The new keys only: refused (a thief of the new keys cannot take over).
        assert!(matches!(
            first.accept_next(&signed_by(&r2, &[&new[0], &new[1], &new[2]]), 10),
            Err(TrustError::Untrusted { valid: 0, .. })
        ));
        // The old keys only: refused (the new root must be able to sign itself).
        assert!(matches!(
            first.accept_next(&signed_by(&r2, &[&old[0], &old[1]]), 10),
            Err(TrustError::Threshold {
                role: Role::Root,
                valid: 0,
                ..
            })
        ));
        // One old signature given twice counts once.
        let mut dup = encode(&r2);
        let s0 = sign(&old[0], &dup).unwrap();
        dup.signatures = vec![
            s0.clone(),
            s0,
            sign(&new[0], &dup).unwrap(),
            sign(&new[1], &dup).unwrap(),
        ];
        assert!(matches!(
            first.accept_next(&dup.encode_to_vec(), 10),
            Err(TrustError::Untrusted { valid: 1, .. })
        ));
        // Rollback: version 1 again, or an equal version, after 2.
        assert!(matches!(
            second.accept_next(&signed_by(&r1, &[&old[0], &old[1]]), 10),
            Err(TrustError::NotNewer {
                offered: 1,
                current: 2
            })
        ));
        // Expired.
        let r3 = root(3, &new, 2, 100);
        assert!(matches!(
            second.accept_next(&signed_by(&r3, &[&new[0], &new[1]]), 100),
            Err(TrustError::Expired { version: 3, .. })
        ));
        // A manifest signature is not a root signature (context separation).
        let mut cross = encode(&r2);
        cross.signatures = [&old[0], &old[1], &new[0], &new[1]]
            .iter()
            .map(|s| s.sign(&cross.root))
            .collect();
        assert!(first.accept_next(&cross.encode_to_vec(), 10).is_err());
    }

    #[test]
    fn malformed_roles_are_refused_with_the_role_named() {
        let k = keys(2);
        let mut r = root(1, &k, 3, 10); // threshold above the key count
        let e = TrustedRoot::provisioned(&signed_by(&r, &[&k[0], &k[1]])).unwrap_err();
        assert!(
            matches!(
                e,
                TrustError::Role {
                    role: Role::Root,
                    ..
                }
            ),
            "{e}"
        );
        r.root = Some(role(&[k[0].verifying_key(), k[0].verifying_key()], 1));
        let e = TrustedRoot::provisioned(&signed_by(&r, &[&k[0]])).unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
        r = root(1, &k, 1, 10);
        r.updates = None;
        let e = TrustedRoot::provisioned(&signed_by(&r, &[&k[0]])).unwrap_err();
        assert!(
            matches!(
                e,
                TrustError::Role {
                    role: Role::Updates,
                    ..
                }
            ),
            "{e}"
        );
        r = root(1, &k, 1, 10);
        r.format_version = 2;
        assert_eq!(
            TrustedRoot::provisioned(&signed_by(&r, &[&k[0]])),
            Err(TrustError::UnsupportedFormat(2))
        );
        assert!(matches!(
            TrustedRoot::provisioned(&[0xff; 3]),
            Err(TrustError::Malformed(_))
        ));
    }

    #[test]
    fn a_chain_is_walked_root_by_root_and_rollbacks_are_reported() {
        let k1 = keys(2);
        let k2 = keys(2);
        let k3 = keys(2);
        let r1 = signed_by(&root(1, &k1, 2, 1_000), &[&k1[0], &k1[1]]);
        let r2 = signed_by(&root(2, &k2, 1, 1_000), &[&k1[0], &k1[1], &k2[0]]);
        let r3 = signed_by(&root(3, &k3, 1, 1_000), &[&k2[1], &k3[0]]);
        let v1 = TrustedRoot::provisioned(&r1).unwrap();
        let chain = |roots: &[&Vec<u8>]| {
            build::chain(&roots.iter().map(|r| (*r).clone()).collect::<Vec<_>>()).encode_to_vec()
        };
        // Two rotations missed: both taken in turn.
        let w = v1.walk(&chain(&[&r1, &r2, &r3]), 10);
        assert_eq!(
            (w.accepted.as_ref().map(|r| r.version), w.refused),
            (Some(3), None)
        );
        let v3 = w.accepted.unwrap();
        // Only history: nothing to do.
        assert_eq!(
            v3.walk(&chain(&[&r1, &r2, &r3]), 10),
            Walk {
                accepted: None,
                refused: None
            }
        );
        // An older chain offered after a newer root: reported as a rollback.
        let w = v3.walk(&chain(&[&r1, &r2]), 10);
        assert!(matches!(
            w.refused,
            Some((
                2,
                TrustError::NotNewer {
                    offered: 2,
                    current: 3
                }
            ))
        ));
        // v3 straight from v1 (not signed by v1's keys): refused, nothing accepted.
        let w = v1.walk(&chain(&[&r3]), 10);
        assert!(matches!(w.refused, Some((3, TrustError::Untrusted { .. }))));
        assert_eq!(w.refused.unwrap().1.refusal(), v1::RootRefusal::Untrusted);
        // Expired on the way: v2 accepted, v3 refused as expired.
        let r3_late = signed_by(&root(3, &k3, 1, 5), &[&k2[1], &k3[0]]);
        let w = v1.walk(&chain(&[&r2, &r3_late]), 10);
        assert_eq!(w.accepted.map(|r| r.version), Some(2));
        assert!(matches!(w.refused, Some((3, TrustError::Expired { .. }))));
        // Garbage and oversize.
        assert!(matches!(
            v1.walk(&[0xff], 10).refused,
            Some((0, TrustError::Malformed(_)))
        ));
        let too_many: Vec<Vec<u8>> = vec![r1.clone(); MAX_CHAIN_ROOTS + 1];
        let c = v1::RootChain { roots: too_many }.encode_to_vec();
        assert!(matches!(
            v1.walk(&c, 10).refused,
            Some((0, TrustError::Malformed(_)))
        ));
    }

    #[test]
    fn partial_signatures_made_apart_combine() {
        let k = keys(3);
        let r = root(1, &k, 2, 1_000);
        let mut a = encode(&r);
        build::add_signature(&k[0], &mut a).unwrap();
        build::add_signature(&k[0], &mut a).unwrap();
        assert_eq!(a.signatures.len(), 1);
        let mut b = encode(&r);
        build::add_signature(&k[2], &mut b).unwrap();
        let both = build::combine(&[a.clone(), b]).unwrap();
        assert_eq!(both.signatures.len(), 2);
        assert!(TrustedRoot::provisioned(&both.encode_to_vec()).is_ok());
        assert!(TrustedRoot::provisioned(&a.encode_to_vec()).is_err());
        let other = encode(&root(2, &k, 2, 1_000));
        assert!(build::combine(&[a, other]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        /// A root is accepted exactly when at least `k` distinct keys of the current root
        /// and at least `k2` of the new one signed it.
        #[test]
        fn thresholds_count_distinct_keys(
            n in 1usize..5, k_raw in 1u32..5, old_pick in proptest::collection::vec(0usize..5, 0..7),
            n2 in 1usize..5, k2_raw in 1u32..5, new_pick in proptest::collection::vec(0usize..5, 0..7),
        ) {
            let k = k_raw.min(n as u32);
            let k2 = k2_raw.min(n2 as u32);
            let old = keys(n);
            let new = keys(n2);
            let all: Vec<&UpdateSigner> = old.iter().collect();
            let current = TrustedRoot::provisioned(&signed_by(&root(1, &old, k, 1_000), &all)).unwrap();
            let mut signers: Vec<&UpdateSigner> = Vec::new();
            for i in &old_pick { if let Some(s) = old.get(*i) { signers.push(s); } }
            for i in &new_pick { if let Some(s) = new.get(*i) { signers.push(s); } }
            signers.truncate(MAX_SIGNATURES);
            let distinct_old = old.iter().filter(|o| signers.iter().any(|s| s.key_id() == o.key_id())).count();
            let distinct_new = new.iter().filter(|o| signers.iter().any(|s| s.key_id() == o.key_id())).count();
            let offered = signed_by(&root(2, &new, k2, 1_000), &signers);
            let accepted = current.accept_next(&offered, 1).is_ok();
            prop_assert_eq!(accepted, distinct_old >= k as usize && distinct_new >= k2 as usize);
        }
    }
}
